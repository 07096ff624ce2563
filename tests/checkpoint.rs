//! Checkpoint and restart with real CRIU: a 4-rank job printing sequenced lines and holding a
//! memory pattern. Never skipped in CI (`LAMCR_REQUIRE_CRIU=1`).

mod common;

use std::collections::BTreeMap;

use common::{Env, LiveJob, criu_available, example, stderr_of, stdout_of};

const RANKS: u64 = 4;

/// `rank -> sequence numbers seen`, from `rank R seq N` lines; also checks `mem ok` lines.
fn sequences(lines: &[String]) -> (BTreeMap<u64, Vec<u64>>, usize) {
    let mut map: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut mem_ok = 0;
    for l in lines {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["rank", r, "seq", n] => map
                .entry(r.parse().unwrap())
                .or_default()
                .push(n.parse().unwrap()),
            ["rank", _, "mem", "ok"] => mem_ok += 1,
            _ => panic!("unexpected line {l:?}"),
        }
    }
    (map, mem_ok)
}

/// Every rank's sequence is exactly `from[r]..lines`, each number once, in order.
fn assert_segment(seqs: &BTreeMap<u64, Vec<u64>>, lines: u64, from: &BTreeMap<u64, u64>) {
    assert_segment_by(seqs, |_| lines, from)
}

fn assert_segment_by(
    seqs: &BTreeMap<u64, Vec<u64>>,
    lines: impl Fn(u64) -> u64,
    from: &BTreeMap<u64, u64>,
) {
    assert_eq!(seqs.len() as u64, RANKS, "{seqs:?}");
    for (r, got) in seqs {
        let want: Vec<u64> = (from.get(r).copied().unwrap_or(0)..lines(*r)).collect();
        assert_eq!(got, &want, "rank {r}");
    }
}

fn first_seqs(seqs: &BTreeMap<u64, Vec<u64>>) -> BTreeMap<u64, u64> {
    seqs.iter().map(|(r, v)| (*r, v[0])).collect()
}

fn ranks_printed(lines: &[String], at_least: usize) -> bool {
    (0..RANKS).all(|r| {
        lines
            .iter()
            .filter(|l| l.starts_with(&format!("rank {r} seq")))
            .count()
            >= at_least
    })
}

#[test]
fn checkpoint_keeps_the_job_running_and_restarts_while_the_original_runs() {
    if !criu_available("checkpoint_keeps_the_job_running") {
        return;
    }
    let env = Env::new();
    let counter = example("counter");
    let lines = 80u64;
    let mut job = LiveJob::start(
        &env,
        &[
            "run",
            "-n",
            "4",
            &counter,
            &lines.to_string(),
            "25",
            "16",
            "0",
        ],
    );
    job.wait_for("5 lines per rank", |l| ranks_printed(l, 5));
    let ck = env.run(&["checkpoint", &job.pid().to_string()]);
    assert!(ck.status.success(), "{}", stderr_of(&ck));
    let path = stdout_of(&ck).trim().to_string();
    assert!(std::path::Path::new(&path).join("manifest").is_file());
    let mode = std::fs::metadata(&path).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o700
    );

    // Restart while the original job still runs: its pids are all taken.
    let restarted = env.run(&["restart", &path]);
    assert!(restarted.status.success(), "{}", stderr_of(&restarted));
    let (status, original, err) = job.finish();
    assert!(status.success(), "{err}");
    let (seqs, mem_ok) = sequences(&original);
    assert_segment(&seqs, lines, &BTreeMap::new());
    assert_eq!(mem_ok, RANKS as usize);

    let out: Vec<String> = stdout_of(&restarted).lines().map(String::from).collect();
    let (seqs, mem_ok) = sequences(&out);
    let from = first_seqs(&seqs);
    assert!(from.values().all(|&f| f >= 5 && f < lines), "{from:?}");
    assert_segment(&seqs, lines, &from);
    assert_eq!(
        mem_ok, RANKS as usize,
        "memory pattern verified after restore"
    );
    env.assert_no_leftovers();
}

#[test]
fn checkpoint_with_term_then_restart_twice_with_the_exit_status() {
    if !criu_available("checkpoint_with_term") {
        return;
    }
    let env = Env::new();
    let counter = example("counter");
    // Ranks 0-2 print 40 lines and exit 0; rank 3 prints 60 and exits 3, last.
    let lines = |r: u64| if r == 3 { 60 } else { 40 };
    let out_dir = env.path("out");
    let out_arg = out_dir.to_str().unwrap();
    let mut job = LiveJob::start(
        &env,
        &[
            "run",
            "--output-filename",
            out_arg,
            "-n",
            "3",
            &counter,
            "40",
            "25",
            "8",
            "0",
            ":",
            "-n",
            "1",
            &counter,
            "60",
            "25",
            "8",
            "3",
        ],
    );
    job.wait_for("3 lines per rank", |l| ranks_printed(l, 3));
    let ck = env.run(&["checkpoint", "--term"]);
    assert!(ck.status.success(), "{}", stderr_of(&ck));
    let (status, before, err) = job.finish();
    assert_eq!(
        status.code(),
        Some(0),
        "a job ended by checkpoint --term exits 0: {err}"
    );
    let (seqs_before, _) = sequences(&before);
    env.assert_no_leftovers();

    for round in 0..2 {
        // The job directory form: its newest committed epoch.
        let job_dir = env.job_dir().expect("a job directory");
        let o = env.run(&["restart", job_dir.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(3), "round {round}: {}", stderr_of(&o));
        let out: Vec<String> = stdout_of(&o).lines().map(String::from).collect();
        let (seqs, mem_ok) = sequences(&out);
        let from = first_seqs(&seqs);
        assert_segment_by(&seqs, lines, &from);
        assert_eq!(mem_ok, RANKS as usize);
        // Output before the checkpoint plus output after it: every number exactly once.
        for (r, seq) in &seqs_before {
            let last_before = *seq.last().unwrap();
            assert_eq!(
                last_before + 1,
                from[r],
                "rank {r}: nothing lost or repeated across the checkpoint"
            );
        }
        // Per-rank files hold the whole run exactly once.
        for r in 0..RANKS {
            let text = std::fs::read_to_string(out_dir.join(format!("rank.{r}/stdout"))).unwrap();
            let file_lines: Vec<String> = text.lines().map(String::from).collect();
            let (fs, _) = sequences(&file_lines);
            assert_eq!(
                fs[&r],
                (0..lines(r)).collect::<Vec<_>>(),
                "round {round} rank {r} file"
            );
        }
        env.assert_no_leftovers();
    }
}

#[test]
fn bad_checkpoints_are_refused_with_the_file_named_and_nothing_started() {
    if !criu_available("bad_checkpoints") {
        return;
    }
    let env = Env::new();
    let counter = example("counter");
    let mut job = LiveJob::start(&env, &["run", "-n", "2", &counter, "200", "20", "1", "0"]);
    job.wait_for("a line per rank", |l| l.len() >= 2);
    let ck = env.run(&["checkpoint", "--term"]);
    assert!(ck.status.success(), "{}", stderr_of(&ck));
    let _ = job.finish();
    let good = std::path::PathBuf::from(stdout_of(&ck).trim());

    let copy = |name: &str| {
        let dst = env.path(name);
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(&good)
            .arg(&dst)
            .status()
            .unwrap();
        assert!(status.success());
        dst
    };
    let first_image = |dir: &std::path::Path| {
        let mut files: Vec<_> = std::fs::read_dir(dir.join("node0"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        files
            .into_iter()
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("pages-")
            })
            .unwrap()
    };
    let mut cases: Vec<(std::path::PathBuf, String)> = Vec::new();

    let d = copy("corrupt-image");
    let img = first_image(&d);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&img, bytes).unwrap();
    cases.push((d, format!("{}: image checksum mismatch", img.display())));

    let d = copy("truncated-image");
    let img = first_image(&d);
    let len = std::fs::metadata(&img).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    cases.push((d, format!("{}: image is {} bytes", img.display(), len / 2)));

    let d = copy("missing-image");
    let img = first_image(&d);
    std::fs::remove_file(&img).unwrap();
    cases.push((d, format!("{}: missing image file", img.display())));

    let d = copy("truncated-manifest");
    let m = d.join("manifest");
    let len = std::fs::metadata(&m).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&m)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    cases.push((d.clone(), format!("{}: truncated manifest", m.display())));

    let d = copy("corrupt-manifest");
    let m = d.join("manifest");
    let mut bytes = std::fs::read(&m).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&m, bytes).unwrap();
    cases.push((
        d.clone(),
        format!("{}: manifest checksum mismatch", m.display()),
    ));

    let d = copy("foreign-manifest");
    let m = d.join("manifest");
    std::fs::write(&m, b"{\"this is\": \"not ours\"}").unwrap();
    cases.push((d.clone(), format!("{}: not a lamcr manifest", m.display())));

    let d = copy("missing-manifest");
    std::fs::remove_file(d.join("manifest")).unwrap();
    cases.push((
        d.clone(),
        format!(
            "{}: no manifest: this checkpoint was never committed",
            d.join("manifest").display()
        ),
    ));

    cases.push((
        env.path("nowhere"),
        format!("{}: no such checkpoint", env.path("nowhere").display()),
    ));

    for (dir, want) in cases {
        let o = env.run(&["restart", dir.to_str().unwrap()]);
        let err = stderr_of(&o);
        assert_eq!(o.status.code(), Some(1), "{}: {err}", dir.display());
        assert!(
            err.contains(&want),
            "{}: want {want:?}, got {err}",
            dir.display()
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(o.stdout.is_empty());
        env.assert_no_leftovers();
    }
}

/// Two ranks talking over an established TCP connection on loopback: `checkpoint --term`, then a
/// restart continues the very same connection, with no number lost, repeated or out of order.
#[test]
fn tcp_connections_between_ranks_survive_checkpoint_and_restart() {
    if !criu_available("tcp_connections_between_ranks") {
        return;
    }
    let env = Env::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let lines = 60u64;
    let mut job = LiveJob::start(
        &env,
        &[
            "run",
            "-n",
            "2",
            &example("pingpong"),
            &port,
            &lines.to_string(),
            "20",
        ],
    );
    let seen = |l: &[String], r: u64| {
        l.iter()
            .filter(|l| l.starts_with(&format!("rank {r} seq")))
            .count()
    };
    job.wait_for("5 exchanges", |l| seen(l, 1) >= 5);
    let ck = env.run(&["checkpoint", "--term"]);
    assert!(ck.status.success(), "{}", stderr_of(&ck));
    let path = stdout_of(&ck).trim().to_string();
    let (status, before, err) = job.finish();
    assert!(status.success(), "{err}");
    let o = env.run(&["restart", &path]);
    assert!(o.status.success(), "{}{}", stdout_of(&o), stderr_of(&o));
    let after: Vec<String> = stdout_of(&o).lines().map(String::from).collect();
    for r in 0..2u64 {
        let nums = |ls: &[String]| -> Vec<u64> {
            ls.iter()
                .filter_map(|l| l.strip_prefix(&format!("rank {r} seq ")))
                .map(|n| n.parse().unwrap())
                .collect()
        };
        let mut all = nums(&before);
        assert!(!nums(&after).is_empty(), "rank {r} printed after restore");
        all.extend(nums(&after));
        assert_eq!(all, (0..lines).collect::<Vec<_>>(), "rank {r}");
    }
    assert!(!after.iter().any(|l| l.contains("broken")), "{after:?}");
    env.assert_no_leftovers();
}

/// On a terminal, checkpoint and restart draw a progress bar (ranks done, bytes); either way one
/// summary line follows. The terminal is a real pty, from util-linux's `script`.
#[test]
fn progress_bars_on_a_terminal_and_summary_lines() {
    if !criu_available("progress_bars_on_a_terminal") {
        return;
    }
    let env = Env::new();
    let mut job = LiveJob::start(
        &env,
        &[
            "run",
            "-n",
            "2",
            &example("counter"),
            "150",
            "20",
            "16",
            "0",
        ],
    );
    job.wait_for("both ranks", |l| {
        (0..2).all(|r| l.iter().any(|l| l.starts_with(&format!("rank {r} seq"))))
    });
    let on_tty = |args: &str| {
        let mut script = std::process::Command::new("script");
        script
            .args(["-qefc", &format!("{} {args}", common::LAMCR), "/dev/null"])
            .envs(env.vars())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let o = common::wait_output(
            script.spawn().expect("script (util-linux)"),
            std::time::Duration::from_secs(60),
        );
        (o.status.success(), stdout_of(&o))
    };
    let (ok, tty) = on_tty("checkpoint --term");
    assert!(ok, "{tty}");
    assert!(tty.contains("checkpoint ["), "no bar: {tty:?}");
    assert!(tty.contains("2/2 ranks"), "{tty:?}");
    assert!(tty.contains("lamcr: checkpoint of job"), "{tty:?}");
    let (status, _, _) = job.finish();
    assert!(status.success());
    let job_dir = env.job_dir().expect("a job directory");
    let (ok, tty) = on_tty(&format!("restart {}", job_dir.display()));
    assert!(ok, "{tty}");
    assert!(tty.contains("restore ["), "no bar: {tty:?}");
    assert!(tty.contains("lamcr: restored 2 ranks"), "{tty:?}");
    assert!(tty.contains("rank 1 mem ok"), "{tty:?}");
    env.assert_no_leftovers();
}
