//! `lamcr run` end to end: real launcher, real lamd, real holder, real ranks and pipes.

mod common;

use std::time::Duration;

use nix::sys::signal::Signal;

use common::{Env, LiveJob, stderr_of, stdout_of, wait_status, write_file};

fn sorted_lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(String::from).collect();
    v.sort();
    v
}

#[test]
fn ranks_get_their_environment_and_exit_zero() {
    let env = Env::new();
    let o = env.run(&[
        "run",
        "-np",
        "3",
        "sh",
        "-c",
        "echo $LAMCR_RANK/$LAMCR_SIZE $LAMCR_LOCAL_RANK/$LAMCR_LOCAL_SIZE $LAMCR_NODE $OMPI_COMM_WORLD_RANK/$OMPI_COMM_WORLD_SIZE ${LAMCR_JOBID:+job}",
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(
        sorted_lines(&stdout_of(&o)),
        vec![
            "0/3 0/3 0 0/3 job",
            "1/3 1/3 0 1/3 job",
            "2/3 2/3 0 2/3 job"
        ]
    );
    env.assert_no_leftovers();
}

#[test]
fn mpmd_contexts_exports_and_working_directory() {
    let env = Env::new();
    let wd = env.path("wd");
    std::fs::create_dir(&wd).unwrap();
    let o = env.run(&[
        "run",
        "-x",
        "GLOBAL=g",
        "-n",
        "1",
        "sh",
        "-c",
        "echo a $LAMCR_RANK $GLOBAL",
        ":",
        "-n",
        "2",
        "-x",
        "LOCAL=l",
        "-wd",
        wd.to_str().unwrap(),
        "sh",
        "-c",
        "echo b $LAMCR_RANK $GLOBAL $LOCAL $(pwd)",
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let w = wd.display();
    assert_eq!(
        sorted_lines(&stdout_of(&o)),
        vec![
            "a 0 g".to_string(),
            format!("b 1 g l {w}"),
            format!("b 2 g l {w}")
        ]
    );
}

#[test]
fn appschema_file() {
    let env = Env::new();
    let app = env.path("app");
    write_file(
        &app,
        "# two contexts\n-np 2 -x X=1 sh -c 'echo one $X'\nsh -c \"echo two\" # trailing comment\n",
    );
    let o = env.run(&["run", "--app", app.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(sorted_lines(&stdout_of(&o)), vec!["one 1", "one 1", "two"]);
}

#[test]
fn output_is_byte_exact_even_when_the_rank_exits_right_after_writing() {
    let env = Env::new();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = env.path("blob");
    std::fs::write(&file, &data).unwrap();
    let o = env.run(&["run", "-n", "1", "cat", file.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(
        o.stdout == data,
        "binary output differs ({} vs {} bytes)",
        o.stdout.len(),
        data.len()
    );
}

/// Output moved by `splice` reaches every kind of console byte for byte: a pipe (above), a
/// regular file, and a file opened for appending (which refuses `splice`: copied instead).
#[test]
fn output_is_byte_exact_into_files_and_appending_files() {
    let env = Env::new();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
        .collect();
    let blob = env.path("blob");
    std::fs::write(&blob, &data).unwrap();
    for append in [false, true] {
        let out = env.path(if append { "appended" } else { "written" });
        std::fs::write(&out, b"before\n").unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .append(append)
            .open(&out)
            .unwrap();
        if !append {
            file.set_len(0).unwrap();
        }
        let mut cmd = env.cmd(&["run", "-n", "1", "cat", blob.to_str().unwrap()]);
        cmd.stdout(file);
        let status = wait_status(&mut cmd.spawn().unwrap(), Duration::from_secs(60));
        assert!(status.success());
        let mut want = if append {
            b"before\n".to_vec()
        } else {
            Vec::new()
        };
        want.extend_from_slice(&data);
        let got = std::fs::read(&out).unwrap();
        assert!(
            got == want,
            "append={append}: {} bytes, want {}",
            got.len(),
            want.len()
        );
    }
    env.assert_no_leftovers();
}

#[test]
fn stdin_goes_to_rank_zero_by_default_with_eof() {
    let env = Env::new();
    let o = env.run_with_stdin(
        &[
            "run",
            "-n",
            "2",
            "sh",
            "-c",
            "echo $LAMCR_RANK:$(cat | wc -c)",
        ],
        Some(b"hello\n"),
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(sorted_lines(&stdout_of(&o)), vec!["0:6", "1:0"]);
    let o = env.run_with_stdin(
        &[
            "run",
            "-n",
            "2",
            "--stdin",
            "all",
            "sh",
            "-c",
            "echo $LAMCR_RANK:$(cat | wc -c)",
        ],
        Some(b"abc"),
    );
    assert_eq!(sorted_lines(&stdout_of(&o)), vec!["0:3", "1:3"]);
    let o = env.run_with_stdin(
        &[
            "run",
            "-n",
            "2",
            "--stdin",
            "1",
            "sh",
            "-c",
            "echo $LAMCR_RANK:$(cat | wc -c)",
        ],
        Some(b"abcd"),
    );
    assert_eq!(sorted_lines(&stdout_of(&o)), vec!["0:0", "1:4"]);
    let o = env.run_with_stdin(
        &[
            "run",
            "-n",
            "1",
            "--stdin",
            "none",
            "sh",
            "-c",
            "echo $(cat | wc -c)",
        ],
        Some(b"abcd"),
    );
    assert_eq!(stdout_of(&o), "0\n");
}

#[test]
fn large_stdin_is_forwarded_whole() {
    let env = Env::new();
    let data = vec![b'x'; 5 << 20];
    let o = env.run_with_stdin(&["run", "-n", "1", "sh", "-c", "wc -c"], Some(&data));
    assert_eq!(stdout_of(&o).trim(), (5 << 20).to_string());
}

/// Binary stdin to several ranks at once: one reads fast, one in 512-byte sips (so lamd must
/// queue behind its full pipe), one stops reading after 100 bytes and exits (so lamd must drop
/// the rest and still acknowledge it, or the launcher's window would stall the others).
#[test]
fn binary_stdin_reaches_every_chosen_rank_byte_exact() {
    let env = Env::new();
    let data: Vec<u8> = (0..6u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = env.path("input");
    std::fs::write(&file, &data).expect("write the input");
    let f = file.display();
    let script = format!(
        "case $LAMCR_RANK in \
         0) cmp - {f} && echo 0 same;; \
         1) dd bs=512 status=none | cmp - {f} && echo 1 same;; \
         2) head -c 100 >/dev/null; echo 2 stopped;; esac"
    );
    let o = env.run_with_stdin(
        &["run", "-n", "3", "--stdin", "all", "sh", "-c", &script],
        Some(&data),
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(
        sorted_lines(&stdout_of(&o)),
        vec!["0 same", "1 same", "2 stopped"]
    );
    env.assert_no_leftovers();
}

/// Rank 0 leaves a child holding its stdin open without reading it (through fd 7: an
/// asynchronous list's stdin would be /dev/null), and exits once lamd holds stdin queued for it
/// (the node's window is spent on rank 0's full pipe by the time rank 1 has read 1 MiB). The
/// queued bytes must be acknowledged when rank 0 is reported, or the launcher's window would stay
/// closed and rank 1 would never get the rest.
#[test]
fn stdin_queued_for_an_exited_rank_does_not_stall_the_others() {
    let env = Env::new();
    let data = vec![b'y'; 6 << 20];
    let mark = env.path("rank1-has-1MiB");
    let m = mark.display();
    let script = format!(
        "case $LAMCR_RANK in \
         0) exec 7<&0; sleep 60 <&7 7<&- & \
            for i in $(seq 3000); do [ -e {m} ] && exit 0; sleep 0.01; done; exit 3;; \
         1) head -c 1048576 >/dev/null; touch {m}; cat >/dev/null; echo 1 done;; esac"
    );
    let o = env.run_with_stdin(
        &["run", "-n", "2", "--stdin", "all", "sh", "-c", &script],
        Some(&data),
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(stdout_of(&o), "1 done\n");
    env.assert_no_leftovers();
}

#[test]
fn tagging_labels_timestamps_and_partial_lines() {
    let env = Env::new();
    let o = env.run(&[
        "run",
        "-n",
        "1",
        "--tag-output",
        "sh",
        "-c",
        "printf 'a\\nb'; printf 'e\\n' >&2",
    ]);
    assert_eq!(stdout_of(&o), "[0]<stdout>: a\n[0]<stdout>: b\n");
    assert_eq!(stderr_of(&o), "[0]<stderr>: e\n");
    let o = env.run(&["run", "-n", "2", "-l", "sh", "-c", "echo x"]);
    assert_eq!(sorted_lines(&stdout_of(&o)), vec!["0: x", "1: x"]);
    let o = env.run(&["run", "-n", "1", "--timestamp-output", "echo", "t"]);
    let line = stdout_of(&o);
    assert!(
        line.starts_with("[20") && line.ends_with("] t\n"),
        "{line:?}"
    );
}

#[test]
fn output_files_per_rank() {
    let env = Env::new();
    let dir = env.path("out");
    let o = env.run(&[
        "run",
        "-n",
        "2",
        "--output-filename",
        dir.to_str().unwrap(),
        "sh",
        "-c",
        "echo o$LAMCR_RANK; echo e$LAMCR_RANK >&2",
    ]);
    assert!(o.status.success());
    for r in 0..2 {
        assert_eq!(
            std::fs::read_to_string(dir.join(format!("rank.{r}/stdout"))).unwrap(),
            format!("o{r}\n")
        );
        assert_eq!(
            std::fs::read_to_string(dir.join(format!("rank.{r}/stderr"))).unwrap(),
            format!("e{r}\n")
        );
    }
}

#[test]
fn first_failure_decides_the_exit_status_and_stops_the_rest() {
    let env = Env::new();
    let o = env.run(&[
        "run",
        "-n",
        "3",
        "sh",
        "-c",
        "if [ $LAMCR_RANK = 1 ]; then exit 7; fi; exec sleep 60",
    ]);
    assert_eq!(o.status.code(), Some(7));
    let err = stderr_of(&o);
    assert!(
        err.contains("rank 1 on node 0 (localhost) exited with status 7"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    env.assert_no_leftovers();

    let o = env.run(&[
        "run",
        "-n",
        "2",
        "--print-all-exitcodes",
        "sh",
        "-c",
        "[ $LAMCR_RANK = 0 ] && kill -9 $$; exec sleep 60",
    ]);
    assert_eq!(o.status.code(), Some(137));
    let err = stderr_of(&o);
    assert!(
        err.contains("rank 0 on node 0 (localhost) was killed by signal 9 (SIGKILL)"),
        "{err}"
    );
    assert!(
        err.contains("lamcr: rank 1 (sh) was killed by signal 15 (SIGTERM)"),
        "{err}"
    );
    env.assert_no_leftovers();
}

/// Two ranks that run `trap` and then idle; returns once both have said they are up.
fn two_idle_ranks(env: &Env, options: &[&str], trap: &str) -> LiveJob {
    let script = format!("{trap}; echo up; while :; do sleep 0.05; done");
    let mut args = vec!["run", "-n", "2"];
    args.extend_from_slice(options);
    args.extend(["sh", "-c", &script]);
    let mut job = LiveJob::start(env, &args);
    job.wait_for("both ranks up", |l| {
        l.iter().filter(|x| *x == "up").count() == 2
    });
    job
}

fn has_both(lines: &[String], prefix: &str) -> bool {
    lines.contains(&format!("{prefix} 0")) && lines.contains(&format!("{prefix} 1"))
}

#[test]
fn sigterm_stops_the_job_gracefully() {
    let env = Env::new();
    let job = two_idle_ranks(&env, &[], "trap 'echo bye $LAMCR_RANK; exit 0' TERM");
    job.signal(Signal::SIGTERM);
    let (status, lines, err) = job.finish();
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(has_both(&lines, "bye"), "{lines:?}");
    assert!(err.contains("received SIGTERM"), "{err}");
    env.assert_no_leftovers();
}

#[test]
fn second_interrupt_kills_at_once() {
    let env = Env::new();
    let mut job = two_idle_ranks(&env, &["--grace", "60s"], "trap '' TERM INT");
    job.signal(Signal::SIGINT);
    job.wait_for_stderr("received SIGINT");
    job.signal(Signal::SIGINT);
    let (status, _, err) = job.finish();
    assert_eq!(status.code(), Some(130), "{err}");
    env.assert_no_leftovers();
}

#[test]
fn usr2_is_forwarded_to_the_ranks() {
    let env = Env::new();
    let job = two_idle_ranks(&env, &[], "trap 'echo usr2 $LAMCR_RANK; exit 0' USR2");
    job.signal(Signal::SIGUSR2);
    let (status, lines, err) = job.finish();
    assert!(status.success(), "{err}");
    assert!(has_both(&lines, "usr2"), "{lines:?}");
}

#[test]
fn tstp_stops_the_ranks_and_cont_resumes_them() {
    let env = Env::new();
    let job = two_idle_ranks(&env, &[], "trap 'exit 0' TERM");
    let ranks = || -> Vec<char> {
        env.leftovers()
            .into_iter()
            .filter(|(_, c)| c.starts_with("sh -c"))
            .filter_map(|(pid, _)| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                stat.split(") ").nth(1)?.chars().next()
            })
            .collect()
    };
    let wait_state = |want_stopped: bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let states = ranks();
            if states.len() == 2 && states.iter().all(|&s| (s == 'T') == want_stopped) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "rank states {states:?}, want stopped={want_stopped}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    job.signal(Signal::SIGTSTP);
    wait_state(true);
    job.signal(Signal::SIGCONT);
    wait_state(false);
    job.signal(Signal::SIGTERM);
    let (status, _, err) = job.finish();
    assert_eq!(status.code(), Some(143), "{err}");
    env.assert_no_leftovers();
}

#[test]
fn killing_the_launcher_leaves_nothing_behind() {
    let env = Env::new();
    let mut job = LiveJob::start(
        &env,
        &["run", "-n", "3", "sh", "-c", "echo up; exec sleep 600"],
    );
    job.wait_for("ranks up", |l| l.iter().filter(|x| *x == "up").count() == 3);
    assert!(!env.leftovers().is_empty());
    job.child.kill().unwrap();
    let _ = job.finish();
    env.assert_no_leftovers();
}

#[test]
fn a_lost_daemon_fails_the_job_and_leaves_nothing_behind() {
    lose_a_daemon(false);
}

/// As unprivileged users run it: no PID namespace, so no kernel kills the ranks when the holder
/// dies; the holder must outlive lamd and kill them.
#[test]
fn a_lost_daemon_leaves_nothing_behind_without_a_pid_namespace() {
    lose_a_daemon(true);
}

fn lose_a_daemon(no_pid_namespace: bool) {
    let env = Env::new();
    let mut cmd = env.cmd(&[
        "run",
        "--host",
        "localhost:2,127.0.0.1:2",
        "sh",
        "-c",
        "echo up $LAMCR_NODE; exec sleep 600",
    ]);
    if no_pid_namespace {
        cmd.env("LAMCR_NO_PIDNS", "1");
    }
    let mut job = LiveJob::start_cmd(cmd);
    job.wait_for("ranks up", |l| {
        l.iter().filter(|x| x.starts_with("up")).count() == 4
    });
    let mut nodes: Vec<&String> = job.seen.iter().collect();
    nodes.sort();
    assert_eq!(nodes, vec!["up 0", "up 0", "up 1", "up 1"]);
    let lamd = env
        .leftovers()
        .into_iter()
        .find(|(_, c)| c.contains(" lamd ") && c.contains("--node 1"))
        .expect("lamd of node 1");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lamd.0),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (status, _, err) = job.finish();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("node 1 (127.0.0.1) lost"), "{err}");
    env.assert_no_leftovers();
}

#[test]
fn bad_input_gets_one_line_and_a_nonzero_exit() {
    let env = Env::new();
    let hostfile = env.path("hosts");
    write_file(
        &hostfile,
        "localhost slots=2\n# fine\nlocalhost slots=two\n",
    );
    let noexec = env.path("noexec");
    write_file(&noexec, "#!/bin/sh\n");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["run", "-n", "1", "/nonexistent/prog"],
            "/nonexistent/prog: command not found",
        ),
        (
            vec!["run", "-n", "1", "no-such-program-lamcr"],
            "no-such-program-lamcr: command not found",
        ),
        (
            vec!["run", "-n", "1", noexec.to_str().unwrap()],
            "not an executable file",
        ),
        (vec!["run", "-n", "0", "true"], "-n must be at least 1"),
        (
            vec!["run", "--hostfile", hostfile.to_str().unwrap(), "true"],
            "hosts:3: slots must be a positive number",
        ),
        (vec!["run", "--bogus", "true"], "unknown option --bogus"),
        (
            vec!["run", "--host", "localhost:2", "-n", "3", "true"],
            "3 ranks requested but only 2 slots",
        ),
        (
            vec!["run", "--host", "far.example:2", "-n", "1", "true"],
            "remote nodes are not supported yet",
        ),
        (
            vec!["run", "--stdin", "7", "-n", "2", "true"],
            "there is no rank 7",
        ),
    ];
    for (args, want) in cases {
        let o = env.run(&args);
        let err = stderr_of(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    let o = env.run(&[
        "run",
        "--host",
        "localhost:2",
        "-n",
        "3",
        "--oversubscribe",
        "true",
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    env.assert_no_leftovers();
}

#[test]
fn a_rank_that_cannot_exec_fails_the_job_and_stops_the_others() {
    // The launcher's checks pass (an executable file), but the kernel refuses the image: the
    // holder learns it only after the clone, while the ranks around it are already running.
    let env = Env::new();
    let bad = env.path("bad-image");
    write_file(&bad, "\x7fELF but not really\n");
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let bad = bad.to_str().unwrap();
    let o = env.run(&[
        "run", "-n", "8", "sleep", "600", ":", "-n", "1", bad, ":", "-n", "7", "sleep", "600",
    ]);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("rank 8: cannot execute {bad}: Exec format error")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    env.assert_no_leftovers();
}

#[test]
fn slow_console_back_pressures_the_rank_with_bounded_memory() {
    // The rank writes 256 MiB while nobody reads the launcher's stdout: the rank must block, and
    // the launcher and lamd must stay small; then everything arrives.
    let env = Env::new();
    let mut child = env
        .cmd(&["run", "-n", "1", "head", "-c", "268435456", "/dev/zero"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let writer = loop {
        let blocked = env.leftovers().into_iter().find(|(pid, c)| {
            c.starts_with("head")
                && std::fs::read_to_string(format!("/proc/{pid}/wchan"))
                    .is_ok_and(|w| w.contains("pipe_write"))
        });
        if let Some(w) = blocked {
            break w;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never blocked"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let rss = |pid: i32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let launcher_kb = rss(child.id() as i32);
    let lamd_kb: u64 = env
        .leftovers()
        .iter()
        .filter(|(_, c)| c.contains(" lamd "))
        .map(|(p, _)| rss(*p))
        .sum();
    eprintln!(
        "while blocked: writer {}, launcher {launcher_kb} KiB, lamd {lamd_kb} KiB",
        writer.0
    );
    assert!(launcher_kb < 48 * 1024, "launcher RSS {launcher_kb} KiB");
    assert!(lamd_kb < 48 * 1024, "lamd RSS {lamd_kb} KiB");
    let mut out = child.stdout.take().unwrap();
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        use std::io::Read;
        let k = out.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    assert_eq!(n, 268_435_456);
    assert!(common::wait_status(&mut child, Duration::from_secs(30)).success());
}

#[test]
fn many_ranks_on_one_node() {
    let env = Env::new();
    let o = env.run(&["run", "-n", "100", "--print-all-exitcodes", "/bin/true"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(
        stderr_of(&o)
            .lines()
            .filter(|l| l.ends_with("exited with status 0"))
            .count(),
        100
    );
    env.assert_no_leftovers();
}

#[test]
fn hostfile_places_ranks_by_slot() {
    let env = Env::new();
    let hosts = env.path("hosts");
    write_file(
        &hosts,
        "# two local nodes\nlocalhost slots=2\n127.0.0.1 slots=1 # one slot\n",
    );
    let o = env.run(&[
        "run",
        "--hostfile",
        hosts.to_str().unwrap(),
        "sh",
        "-c",
        "echo $LAMCR_RANK $LAMCR_NODE $LAMCR_LOCAL_RANK/$LAMCR_LOCAL_SIZE",
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(
        sorted_lines(&stdout_of(&o)),
        vec!["0 0 0/2", "1 0 1/2", "2 1 0/1"]
    );
    env.assert_no_leftovers();
}

/// The holder is a fork of lamd that never execs. It must show as itself, be the init of its PID
/// namespace, and hold nothing of lamd's: a leaked rank pipe end would keep EOF from ever coming.
#[test]
fn the_holder_is_lamds_fork_and_holds_only_its_own_fds() {
    let env = Env::new();
    let job = two_idle_ranks(&env, &[], "true");
    let holder = env
        .process("lamcr holder")
        .expect("a process shown as `lamcr holder`");
    let proc = format!("/proc/{holder}");
    let comm = std::fs::read_to_string(format!("{proc}/comm")).unwrap();
    assert_eq!(comm.trim(), "lamcr-holder");
    // lamd is `/proc/self/exe` exec'd, which the kernel would name `exe`.
    let lamd = env
        .process("lamcr lamd")
        .expect("a process shown as `lamcr lamd`");
    let comm = std::fs::read_to_string(format!("/proc/{lamd}/comm")).unwrap();
    assert_eq!(comm.trim(), "lamd");
    let status = std::fs::read_to_string(format!("{proc}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "{nspid}");
    // Once every rank has been started (the ranks may run before the holder has seen all of
    // them exec), the holder keeps exactly its own fds.
    let fds_of = || {
        let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("{proc}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let fd = e.file_name().to_string_lossy().parse().ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                Some((fd, target.display().to_string()))
            })
            .collect();
        fds.sort();
        fds
    };
    let kinds_of = |fds: &[(i32, String)]| -> Vec<String> {
        fds.iter()
            .map(|(fd, t)| match t.as_str() {
                "/dev/null" => format!("{fd}:null"),
                t if t.starts_with("pipe:") => format!("{fd}:pipe"),
                t if t.contains("signalfd") => format!("{fd}:signalfd"),
                t => format!("{fd}:{t}"),
            })
            .collect()
    };
    let want = [
        "0:null",
        "1:null",
        "2:null",
        "3:pipe",
        "4:pipe",
        "5:signalfd",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let fds = fds_of();
        if kinds_of(&fds) == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the holder holds {fds:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    job.signal(Signal::SIGTERM);
    let (status, _, err) = job.finish();
    assert_eq!(status.code(), Some(143), "{err}");
    env.assert_no_leftovers();
}
