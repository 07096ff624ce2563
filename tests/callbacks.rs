//! Applications that take part in their checkpoints: BLCR-style callbacks (Rust and C fixtures),
//! critical sections, cancelled checkpoints, the `self` engine as an unprivileged user.
//! Rank fixtures log every callback step to `$CR_LOG.<rank>`; the tests read those logs.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Env, LAMCR, LiveJob, criu_available, example, stderr_of, stdout_of};

const LINES: u64 = 60;

fn log_of(env: &Env, rank: u32) -> Vec<String> {
    std::fs::read_to_string(env.path(&format!("log.{rank}")))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn count(log: &[String], line: &str) -> usize {
    log.iter().filter(|l| *l == line).count()
}

fn pos(log: &[String], line: &str) -> usize {
    log.iter()
        .position(|l| l == line)
        .unwrap_or_else(|| panic!("{line:?} not in {log:?}"))
}

/// `rank -> sequence numbers`, from `rank R seq N` lines.
fn sequences(lines: &[String]) -> BTreeMap<u32, Vec<u64>> {
    let mut map: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for l in lines {
        let w: Vec<&str> = l.split_whitespace().collect();
        if let ["rank", r, "seq", n] = w.as_slice() {
            map.entry(r.parse().unwrap())
                .or_default()
                .push(n.parse().unwrap());
        }
    }
    map
}

/// The job's output before and after a restart holds every line of every rank exactly once.
fn assert_exactly_once(ranks: u32, before: &[String], after: &[String]) {
    let (a, b) = (sequences(before), sequences(after));
    for r in 0..ranks {
        let mut all = a.get(&r).cloned().unwrap_or_default();
        all.extend(b.get(&r).cloned().unwrap_or_default());
        assert_eq!(all, (0..LINES).collect::<Vec<_>>(), "rank {r}");
    }
}

fn printed(lines: &[String], ranks: u32, at_least: usize) -> bool {
    let s = sequences(lines);
    (0..ranks).all(|r| s.get(&r).is_some_and(|v| v.len() >= at_least))
}

/// The fixture's environment: the event log base.
fn with_log(env: &Env, mut cmd: Command) -> Command {
    cmd.env("CR_LOG", env.path("log"));
    cmd
}

/// Starts `lamcr run --engine self ARGS...` with the fixture's event log.
fn run_self(env: &Env, args: &[&str]) -> LiveJob {
    let mut all = vec!["run", "--engine", "self"];
    all.extend_from_slice(args);
    LiveJob::start_cmd(with_log(env, env.cmd(&all)))
}

/// Runs a `lamcr restart` command to its end; returns its stdout lines.
fn restart_lines(cmd: Command) -> Vec<String> {
    let mut cmd = cmd;
    let out = common::wait_output(cmd.spawn().unwrap(), Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr_of(&out));
    stdout_of(&out).lines().map(str::to_string).collect()
}

fn checkpoint(env: &Env, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["checkpoint"];
    args.extend_from_slice(extra);
    let mut c = env.cmd(&args);
    let child = c.spawn().expect("lamcr checkpoint");
    common::wait_output(child, Duration::from_secs(60))
}

/// `lamcr checkpoint` fails, and its one-line reason contains `why`.
fn assert_checkpoint_fails(env: &Env, why: &str) {
    let o = checkpoint(env, &[]);
    assert!(!o.status.success(), "the checkpoint should fail");
    assert!(stderr_of(&o).contains(why), "{}", stderr_of(&o));
}

/// The epoch directory a successful `lamcr checkpoint` printed.
fn epoch_of(o: &std::process::Output) -> String {
    assert!(o.status.success(), "checkpoint failed: {}", stderr_of(o));
    stdout_of(o).trim().to_string()
}

#[test]
fn rust_callbacks_run_in_libcr_order_and_learn_continue_then_restarted() {
    if !criu_available("rust_callbacks_run_in_libcr_order") {
        return;
    }
    let env = Env::new();
    let app = example("cr_app");
    let cmd = with_log(
        &env,
        env.cmd(&["run", "-n", "2", &app, &LINES.to_string(), "40"]),
    );
    let mut job = LiveJob::start_cmd(cmd);
    job.wait_for("three lines per rank", |l| printed(l, 2, 3));
    let first = checkpoint(&env, &[]);
    epoch_of(&first);
    job.wait_for("more lines", |l| printed(l, 2, 6));
    let second = epoch_of(&checkpoint(&env, &["--term"]));
    let (status, before, err) = job.finish();
    assert!(status.success(), "{err}");
    assert!(err.contains("(criu engine)"), "{err}");

    let after = restart_lines(with_log(&env, env.cmd(&["restart", &second])));
    assert_exactly_once(2, &before, &after);
    for r in 0..2 {
        assert!(
            after.contains(&format!("rank {r} done continues=1 restarts=1")),
            "{after:?}"
        );
        let log = log_of(&env, r);
        // Both rounds: every thread-context callback (newest first) reaches checkpoint()
        // before the signal-context callback of the thread blocked in read() runs.
        let pres: Vec<&str> = log
            .iter()
            .map(String::as_str)
            .filter(|l| l.ends_with(" pre"))
            .collect();
        assert_eq!(
            pres,
            [
                "thread2 pre",
                "thread1 pre",
                "signal pre",
                "thread2 pre",
                "thread1 pre",
                "signal pre"
            ],
            "rank {r}: {log:?}"
        );
        for who in ["thread1", "thread2", "signal"] {
            assert_eq!(count(&log, &format!("{who} continue")), 1, "{log:?}");
            assert_eq!(count(&log, &format!("{who} restarted")), 1, "{log:?}");
        }
        // The reader thread's read() went on after both rounds.
        assert_eq!(count(&log, "reader woke 1"), 1, "{log:?}");
    }
    env.assert_no_leftovers();
}

#[test]
fn temp_failure_cancels_the_checkpoint_and_the_job_goes_on() {
    let env = Env::new();
    let app = example("cr_app");
    let mut job = run_self(
        &env,
        &["-n", "2", &app, &LINES.to_string(), "20", "tempfail"],
    );
    job.wait_for("two lines per rank", |l| printed(l, 2, 2));
    assert_checkpoint_fails(&env, "cancelled the checkpoint (TEMP_FAILURE, code 7)");
    // Nothing of the cancelled epoch is left, and the next checkpoint works.
    let second = epoch_of(&checkpoint(&env, &[]));
    assert!(Path::new(&second).join("manifest").exists());
    let (status, lines, err) = job.finish();
    assert!(status.success(), "{err}");
    assert!(err.contains("the job continues"), "{err}");
    assert_exactly_once(2, &lines, &[]);
    for r in 0..2u32 {
        let log = log_of(&env, r);
        assert_eq!(count(&log, "thread2 cancelled"), 1, "{log:?}");
        // The cancelled round stopped at the newest callback: the older one ran only once.
        assert_eq!(count(&log, "thread1 pre"), 1, "{log:?}");
        assert_eq!(count(&log, "thread1 continue"), 1, "{log:?}");
        assert!(lines.contains(&format!("rank {r} done continues=1 restarts=0")));
    }
    let epochs = std::fs::read_dir(env.job_dir().unwrap()).unwrap().count();
    assert_eq!(epochs, 1, "only the committed epoch remains");
    env.assert_no_leftovers();
}

#[test]
fn checkpoint_requested_in_a_critical_section_waits_until_it_is_left() {
    let env = Env::new();
    let app = example("cr_app");
    let mut job = run_self(&env, &["-n", "2", &app, &LINES.to_string(), "10", "cs"]);
    job.wait_for_stderr("checkpoint 1 committed");
    let (status, lines, err) = job.finish();
    assert!(status.success(), "{err}");
    assert_exactly_once(2, &lines, &[]);
    let log = log_of(&env, 0);
    // Rank 0 asked inside its critical section: the request became pending, the callbacks ran
    // only once the section was left, and leave returned after the checkpoint.
    let seq = [
        "cs enter",
        "cs pending true",
        "thread2 pre",
        "thread1 continue",
        "thread2 continue",
        "cs left",
    ];
    let at: Vec<usize> = seq.iter().map(|l| pos(&log, l)).collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{log:?}");
    env.assert_no_leftovers();
}

/// Runs `cmd` as user nobody when we are root (the self engine needs no privilege).
fn as_nobody(env: &Env, args: &[&str]) -> Command {
    if !nix::unistd::geteuid().is_root() {
        return env.cmd(args);
    }
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(LAMCR)
        .args(args)
        .envs(env.vars())
        .env("HOME", env.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn self_engine_restart_recovers_state_exactly_as_an_unprivileged_user() {
    let env = Env::new();
    if nix::unistd::geteuid().is_root() {
        let nobody = Some(nix::unistd::Uid::from_raw(65534));
        let nogroup = Some(nix::unistd::Gid::from_raw(65534));
        nix::unistd::chown(env.dir.path(), nobody, nogroup).expect("chown test dir");
    }
    let app = example("cr_app");
    // `--engine auto` (the default) picks self for an unprivileged user and says so.
    let cmd = with_log(
        &env,
        as_nobody(&env, &["run", "-n", "2", &app, &LINES.to_string(), "20"]),
    );
    let mut job = LiveJob::start_cmd(cmd);
    job.wait_for("five lines per rank", |l| printed(l, 2, 5));
    let o = common::wait_output(
        as_nobody(&env, &["checkpoint", "--term"]).spawn().unwrap(),
        Duration::from_secs(60),
    );
    let epoch = epoch_of(&o);
    let (status, before, err) = job.finish();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("checkpoints use the self engine: privileges"),
        "{err}"
    );
    assert!(err.contains("(self engine)"), "{err}");
    let saved: Vec<String> = (0..2u32)
        .map(|r| {
            log_of(&env, r)
                .iter()
                .rev()
                .find(|l| l.starts_with("saved "))
                .cloned()
                .expect("a saved state")
        })
        .collect();

    let after = restart_lines(with_log(&env, as_nobody(&env, &["restart", &epoch])));
    assert_exactly_once(2, &before, &after);
    for r in 0..2u32 {
        let n = saved[r as usize].trim_start_matches("saved ");
        let log = log_of(&env, r);
        // The restarted rank got back exactly the bytes its callback saved.
        assert_eq!(count(&log, &format!("restored {n} ok")), 1, "{log:?}");
        assert_eq!(sequences(&after)[&r][0].to_string(), n);
    }
    env.assert_no_leftovers();
}

#[test]
fn callbacks_not_ready_in_time_fail_the_checkpoint_and_the_job_goes_on() {
    let env = Env::new();
    let app = example("cr_app");
    let mut job = run_self(
        &env,
        &[
            "--callback-timeout",
            "500ms",
            "-n",
            "1",
            &app,
            "20",
            "10",
            "wait",
        ],
    );
    job.wait_for("a line", |l| printed(l, 1, 1));
    assert_checkpoint_fails(&env, "rank 0 did not reach the checkpoint within 500ms");
    // Let the callback finish: it learns the checkpoint was cancelled, and the job goes on.
    std::fs::write(env.path("log.go"), "").unwrap();
    let (status, lines, err) = job.finish();
    assert!(status.success(), "{err}");
    assert!(lines.contains(&"rank 0 done continues=0 restarts=0".to_string()));
    let log = log_of(&env, 0);
    assert_eq!(count(&log, "thread2 cancelled"), 1, "{log:?}");
    env.assert_no_leftovers();
}

#[test]
fn perm_failure_cancels_the_checkpoint_and_ends_the_job() {
    let env = Env::new();
    let app = example("cr_app");
    let mut job = run_self(&env, &["-n", "2", &app, "1000", "10", "perm"]);
    job.wait_for("a line per rank", |l| printed(l, 2, 1));
    assert_checkpoint_fails(&env, "(PERM_FAILURE, code 9); it ends the job");
    let (status, _, err) = job.finish();
    assert_eq!(status.code(), Some(9), "{err}");
    env.assert_no_leftovers();
}

#[test]
fn the_self_engine_refuses_ranks_without_the_library_and_bad_engines() {
    let env = Env::new();
    let counter = example("counter");
    let mut job = LiveJob::start(
        &env,
        &[
            "run", "--engine", "self", "-n", "2", &counter, "40", "10", "0", "0",
        ],
    );
    job.wait_for("a line", |l| !l.is_empty());
    assert_checkpoint_fails(&env, "has not initialised the lamcr library");
    let (status, _, err) = job.finish();
    assert!(status.success(), "{err}");

    let bad = env.run(&["run", "--engine", "dmtcp", "-n", "1", "true"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr_of(&bad).contains("dmtcp"), "{}", stderr_of(&bad));
    env.assert_no_leftovers();
}

/// Installs lamcr's library, header and pkg-config file into the test dir (from this build).
fn install(env: &Env) -> PathBuf {
    let prefix = env.path("prefix");
    let target = Path::new(LAMCR).parent().unwrap().parent().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(root.join("scripts/install.sh"))
        .args(["--debug", "--no-build", "--prefix"])
        .arg(&prefix)
        .env("CARGO_TARGET_DIR", target)
        .output()
        .expect("install.sh");
    assert!(o.status.success(), "{}", stderr_of(&o));
    prefix
}

/// Builds examples/c/cr_app.c: with pkg-config against the shared library, or statically.
fn build_c(env: &Env, prefix: &Path, statically: bool) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/c/cr_app.c");
    let out = env.path(if statically {
        "cr_app_static"
    } else {
        "cr_app"
    });
    let pc = |flag: &str| {
        let o = Command::new("pkg-config")
            .args([flag, "lamcr"])
            .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
            .output()
            .expect("pkg-config");
        assert!(o.status.success(), "{}", stderr_of(&o));
        stdout_of(&o)
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let mut cc = Command::new("cc");
    cc.args(["-Wall", "-Werror", "-o"]).arg(&out).arg(&src);
    cc.args(pc("--cflags"));
    if statically {
        cc.arg(prefix.join("lib/liblamcr.a"))
            .args(["-lpthread", "-ldl", "-lm"]);
    } else {
        cc.args(pc("--libs"));
    }
    let o = cc.output().expect("cc");
    assert!(o.status.success(), "cc failed: {}", stderr_of(&o));
    // The documentation's example builds the same way.
    let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/c/hello_cr.c");
    let mut cc = Command::new("cc");
    cc.args(["-Wall", "-Werror", "-o"])
        .arg(env.path("hello_cr"))
        .arg(&hello)
        .args(pc("--cflags"))
        .args(pc("--libs"));
    let o = cc.output().expect("cc");
    assert!(
        o.status.success(),
        "cc hello_cr.c failed: {}",
        stderr_of(&o)
    );
    out.display().to_string()
}

#[test]
fn c_app_built_against_the_installed_library_counts_continue_and_restart() {
    if !criu_available("c_app_built_against_the_installed_library") {
        return;
    }
    let env = Env::new();
    let prefix = install(&env);
    let app = build_c(&env, &prefix, false);
    let lib = prefix.join("lib").display().to_string();
    let mut cmd = with_log(
        &env,
        env.cmd(&["run", "-n", "2", &app, &LINES.to_string(), "40"]),
    );
    cmd.env("LD_LIBRARY_PATH", &lib);
    let mut job = LiveJob::start_cmd(cmd);
    job.wait_for("three lines per rank", |l| printed(l, 2, 3));
    epoch_of(&checkpoint(&env, &[]));
    job.wait_for("more lines", |l| printed(l, 2, 6));
    let epoch = epoch_of(&checkpoint(&env, &["--term"]));
    let (status, before, err) = job.finish();
    assert!(status.success(), "{err}");
    let after = restart_lines(with_log(&env, env.cmd(&["restart", &epoch])));
    assert_exactly_once(2, &before, &after);
    for r in 0..2u32 {
        assert!(
            after.contains(&format!("rank {r} done continues=1 restarts=1")),
            "{after:?}"
        );
        let log = log_of(&env, r);
        assert!(pos(&log, "thread pre") < pos(&log, "signal pre"), "{log:?}");
        assert_eq!(count(&log, "signal continue"), 1, "{log:?}");
        assert_eq!(count(&log, "signal restarted"), 1, "{log:?}");
    }
    env.assert_no_leftovers();
}

#[test]
fn static_c_app_restarts_from_its_saved_state_with_the_self_engine() {
    let env = Env::new();
    let prefix = install(&env);
    let app = build_c(&env, &prefix, true);
    let mut job = run_self(&env, &["-n", "2", &app, &LINES.to_string(), "20"]);
    job.wait_for("four lines per rank", |l| printed(l, 2, 4));
    let epoch = epoch_of(&checkpoint(&env, &["--term"]));
    let (status, before, err) = job.finish();
    assert!(status.success(), "{err}");
    let after = restart_lines(with_log(&env, env.cmd(&["restart", &epoch])));
    assert_exactly_once(2, &before, &after);
    for r in 0..2u32 {
        let log = log_of(&env, r);
        let saved = log.iter().rev().find(|l| l.starts_with("saved ")).unwrap();
        let n = saved.trim_start_matches("saved ");
        assert_eq!(count(&log, &format!("restored {n} ok")), 1, "{log:?}");
    }
    env.assert_no_leftovers();
}
