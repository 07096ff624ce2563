//! Periodic checkpoints and automatic self-exec restart, with real CRIU and real failures: a rank
//! SIGKILLed, a lamd killed, more failures than allowed, a failure during a checkpoint. Never
//! skipped in CI (`LAMCR_REQUIRE_CRIU=1`).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Env, LiveJob, criu_available, example, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const LINES: u64 = 60;
const MARKER: &str = "lamcr: --- output replayed from checkpoint epoch";

fn start(env: &Env, auto_restart: &str, mem_mib: &str) -> LiveJob {
    let out = env.path("out");
    LiveJob::start(
        env,
        &[
            "run",
            "-n",
            "2",
            "--ckpt-interval",
            "200ms",
            "--keep",
            "2",
            "--auto-restart",
            auto_restart,
            "--output-filename",
            out.to_str().unwrap(),
            &example("counter"),
            &LINES.to_string(),
            "40",
            mem_mib,
            "0",
        ],
    )
}

fn sigkill(pid: i32) {
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
}

/// The launcher's pid now runs the restarted launcher image (checked from outside, in /proc),
/// and still shows as `lamcr`, not as the `exe` of `/proc/self/exe`.
fn wait_resumed_in_place(pid: u32) {
    wait_until(
        "the launcher to exec itself and name itself lamcr",
        Duration::from_secs(30),
        || {
            let resumed = std::fs::read(format!("/proc/{pid}/cmdline"))
                .ok()?
                .split(|&b| b == 0)
                .any(|a| a == b"resume");
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (resumed && comm.trim() == "lamcr").then_some(())
        },
    );
}

/// Each rank's output file holds every sequence number exactly once, in order, then `mem ok`.
fn assert_files_exact(env: &Env) {
    for r in 0..2 {
        let path = env.path("out").join(format!("rank.{r}/stdout"));
        let text = std::fs::read_to_string(&path).expect("rank output file");
        let mut want: Vec<String> = (0..LINES).map(|n| format!("rank {r} seq {n}")).collect();
        want.push(format!("rank {r} mem ok"));
        let got: Vec<&str> = text.lines().collect();
        assert_eq!(got, want, "{}", path.display());
    }
}

fn restart_lines(err: &str) -> Vec<&str> {
    err.lines()
        .filter(|l| l.contains("restarting from"))
        .collect()
}

#[test]
fn a_killed_rank_is_restored_from_the_newest_checkpoint_in_the_same_launcher() {
    if !criu_available("a_killed_rank_is_restored") {
        return;
    }
    let env = Env::new();
    let mut job = start(&env, "2", "8");
    let launcher = job.pid();
    job.wait_for_stderr("checkpoint 2 committed");
    sigkill(env.rank_pid(1).expect("rank 1"));
    job.wait_for_stderr("restarting from checkpoint epoch");
    wait_resumed_in_place(launcher);
    job.wait_for("the replay marker", |l| {
        l.iter().any(|l| l.starts_with(MARKER))
    });
    let (status, out, err) = job.finish();
    assert!(status.success(), "{err}");
    let restarts = restart_lines(&err);
    assert_eq!(restarts.len(), 1, "{err}");
    assert!(
        restarts[0].contains("rank 1 on node 0 (localhost) was killed by signal 9"),
        "{err}"
    );
    assert_eq!(out.iter().filter(|l| l.starts_with(MARKER)).count(), 1);
    assert_files_exact(&env);
    // --keep 2: never more than two committed epochs left.
    let job_dir = env.job_dir().expect("a job directory");
    let committed = std::fs::read_dir(&job_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("manifest").is_file())
        .count();
    assert!((1..=2).contains(&committed), "{committed} epochs kept");
    env.assert_no_leftovers();
}

#[test]
fn a_lost_daemon_is_restored_too() {
    if !criu_available("a_lost_daemon_is_restored_too") {
        return;
    }
    let env = Env::new();
    let mut job = start(&env, "2", "8");
    let launcher = job.pid();
    job.wait_for_stderr("checkpoint 1 committed");
    sigkill(env.process(" lamd ").expect("lamd"));
    job.wait_for_stderr("restarting from checkpoint epoch");
    wait_resumed_in_place(launcher);
    let (status, _, err) = job.finish();
    assert!(status.success(), "{err}");
    let restarts = restart_lines(&err);
    assert_eq!(restarts.len(), 1, "{err}");
    assert!(restarts[0].contains("node 0 (localhost) lost"), "{err}");
    assert_files_exact(&env);
    env.assert_no_leftovers();
}

#[test]
fn more_failures_than_allowed_fail_cleanly_with_the_status() {
    if !criu_available("more_failures_than_allowed") {
        return;
    }
    let env = Env::new();
    let mut job = start(&env, "1", "8");
    job.wait_for_stderr("checkpoint 1 committed");
    sigkill(env.rank_pid(1).expect("rank 1"));
    // Wait until the restored rank 1 prints again, then kill it a second time.
    job.wait_for("rank 1 printing after the restart", |l| {
        l.iter()
            .skip_while(|l| !l.starts_with(MARKER))
            .any(|l| l.starts_with("rank 1 seq"))
    });
    sigkill(env.rank_pid(1).expect("restored rank 1"));
    let (status, _, err) = job.finish();
    assert_eq!(status.code(), Some(137), "{err}");
    assert_eq!(restart_lines(&err).len(), 1, "{err}");
    assert!(
        err.contains("stopping the job (1 automatic restarts used)"),
        "{err}"
    );
    env.assert_no_leftovers();
}

#[test]
fn without_a_checkpoint_the_job_fails_as_usual() {
    let env = Env::new();
    let mut job = LiveJob::start(
        &env,
        &[
            "run",
            "-n",
            "2",
            "--auto-restart",
            "3",
            &example("counter"),
            "1000",
            "20",
            "0",
            "0",
        ],
    );
    job.wait_for("both ranks", |l| l.iter().any(|l| l.starts_with("rank 1")));
    sigkill(env.rank_pid(1).expect("rank 1"));
    let (status, _, err) = job.finish();
    assert_eq!(status.code(), Some(137), "{err}");
    assert!(err.contains("no checkpoint to restart from"), "{err}");
    env.assert_no_leftovers();
}

#[test]
fn a_failure_during_a_checkpoint_restarts_from_the_previous_epoch() {
    if !criu_available("a_failure_during_a_checkpoint") {
        return;
    }
    let env = Env::new();
    // Big enough images that lamd spends a while checksumming after CRIU is done.
    let mut job = start(&env, "2", "64");
    job.wait_for_stderr("checkpoint 1 committed");
    // Catch a dump in progress: CRIU runs, and the newest epoch has no manifest yet. lamd only
    // answers after CRIU exits and the images are checksummed, so this dump cannot commit.
    let (lamd, epoch) = wait_until("a dump in progress", Duration::from_secs(30), || {
        let lamd = env.process(" lamd ")?;
        env.process("criu swrk")?;
        let job_dir = env.job_dir()?;
        let newest = newest_epoch(&job_dir)?;
        (!job_dir.join(newest.to_string()).join("manifest").exists()).then_some((lamd, newest))
    });
    sigkill(lamd);
    let (status, _, err) = job.finish();
    assert!(status.success(), "{err}");
    let restarts = restart_lines(&err);
    assert_eq!(restarts.len(), 1, "{err}");
    assert!(
        restarts[0].ends_with(&format!(
            "restarting from checkpoint epoch {} (restart 1 of 2)",
            epoch - 1
        )),
        "dump of epoch {epoch} was under way: {err}"
    );
    assert_files_exact(&env);
    env.assert_no_leftovers();
}

fn newest_epoch(job_dir: &Path) -> Option<u64> {
    std::fs::read_dir(job_dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .max()
}

#[test]
fn auto_restart_on_exit_treats_a_nonzero_exit_as_a_failure() {
    if !criu_available("auto_restart_on_exit") {
        return;
    }
    let env = Env::new();
    let job = LiveJob::start(
        &env,
        &[
            "run",
            "-n",
            "2",
            "--ckpt-interval",
            "100ms",
            "--auto-restart",
            "1",
            "--auto-restart-on-exit",
            &example("counter"),
            "30",
            "20",
            "4",
            "3",
        ],
    );
    let (status, _, err) = job.finish();
    assert_eq!(status.code(), Some(3), "{err}");
    let restarts = restart_lines(&err);
    assert_eq!(restarts.len(), 1, "{err}");
    assert!(restarts[0].contains("exited with status 3"), "{err}");
    assert!(err.contains("(1 automatic restarts used)"), "{err}");
    env.assert_no_leftovers();
}
