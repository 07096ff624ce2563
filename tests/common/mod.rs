//! Shared test harness: drives the real `lamcr` binary in an isolated run and checkpoint
//! directory, with a deadline on every wait, and finds any process the job left behind.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const LAMCR: &str = env!("CARGO_BIN_EXE_lamcr");

/// One test's private world: run dir (sockets, job records) and checkpoint dir.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("lamcr-test")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn ckpt_dir(&self) -> PathBuf {
        self.dir.path().join("ckpt")
    }

    /// The checkpoint directory of this test's only job, once it has one.
    pub fn job_dir(&self) -> Option<PathBuf> {
        Some(
            std::fs::read_dir(self.ckpt_dir())
                .ok()?
                .next()?
                .ok()?
                .path(),
        )
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The environment every lamcr command of this test gets: its own run and checkpoint
    /// directories, and the project's CRIU first on PATH.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LAMCR_RUN_DIR", self.run_dir().display().to_string()),
            ("LAMCR_CKPT_DIR", self.ckpt_dir().display().to_string()),
            (
                "PATH",
                format!(
                    "/usr/local/sbin:{}",
                    std::env::var("PATH").unwrap_or_default()
                ),
            ),
        ]
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(LAMCR);
        c.args(args)
            .envs(self.vars())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs lamcr to completion (bounded) and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, None)
    }

    pub fn run_with_stdin(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        let mut c = self.cmd(args);
        if input.is_some() {
            c.stdin(Stdio::piped());
        }
        let mut child = c.spawn().expect("spawn lamcr");
        if let Some(data) = input {
            let mut stdin = child.stdin.take().expect("stdin");
            let data = data.to_vec();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
        }
        wait_output(child, Duration::from_secs(60))
    }

    /// Processes still alive that belong to this test's jobs (they carry its run dir in their env).
    pub fn leftovers(&self) -> Vec<(i32, String)> {
        let needle = format!("LAMCR_RUN_DIR={}", self.run_dir().display());
        let me = std::process::id() as i32;
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(env) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            if env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) {
                let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
                // Zombies are already dead; their parent reaps them.
                if stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z')) {
                    continue;
                }
                let cmd = std::fs::read_to_string(entry.path().join("cmdline"))
                    .unwrap_or_default()
                    .replace('\0', " ");
                out.push((pid, cmd));
            }
        }
        out
    }

    /// The live process of this test that is rank `rank` (its environment says so).
    pub fn rank_pid(&self, rank: u32) -> Option<i32> {
        let needle = format!("LAMCR_RANK={rank}");
        self.leftovers()
            .into_iter()
            .filter(|(_, cmd)| !cmd.starts_with("criu") && !cmd.contains("lamcr "))
            .find(|(pid, _)| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|e| e.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()))
            })
            .map(|(pid, _)| pid)
    }

    /// The live process of this test whose command line contains `what`.
    pub fn process(&self, what: &str) -> Option<i32> {
        self.leftovers()
            .into_iter()
            .find(|(_, cmd)| cmd.contains(what))
            .map(|(pid, _)| pid)
    }

    /// Waits (bounded) until no process of this test is left, and fails with the list otherwise.
    pub fn assert_no_leftovers(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                for (pid, _) in &left {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
                panic!("processes left behind: {left:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Waits for a child with a deadline, collecting its output; kills it when the deadline passes.
pub fn wait_output(mut child: Child, limit: Duration) -> Output {
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut v);
        }
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut v);
        }
        v
    });
    let status = wait_status(&mut child, limit);
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

pub fn wait_status(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lamcr did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running job whose stdout lines arrive on a channel as they are printed.
pub struct LiveJob {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
    err_lines: mpsc::Receiver<String>,
    err_seen: Vec<String>,
}

impl LiveJob {
    pub fn start(env: &Env, args: &[&str]) -> Self {
        Self::start_cmd(env.cmd(args))
    }

    /// Starts a prepared command (stdout and stderr piped).
    pub fn start_cmd(mut cmd: Command) -> Self {
        let mut child = cmd.spawn().expect("spawn lamcr");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (etx, erx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if etx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines: rx,
            seen: Vec::new(),
            err_lines: erx,
            err_seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the launcher.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig)
            .expect("signal the launcher");
    }

    /// Waits (bounded) until `pred` holds for the lines seen so far.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pred(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("timed out waiting for {what}; saw {:?}", self.seen),
            }
        }
    }

    /// Waits (bounded) until a stderr line contains `needle`.
    pub fn wait_for_stderr(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.err_seen.iter().any(|l| l.contains(needle)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.err_lines.recv_timeout(left) {
                Ok(l) => self.err_seen.push(l),
                Err(_) => panic!(
                    "timed out waiting for {needle:?} on stderr; saw {:?}",
                    self.err_seen
                ),
            }
        }
    }

    /// Waits for the end of the job; returns its status, all stdout lines and stderr.
    pub fn finish(mut self) -> (ExitStatus, Vec<String>, String) {
        let status = wait_status(&mut self.child, Duration::from_secs(60));
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.seen.push(l);
        }
        while let Ok(l) = self.err_lines.recv_timeout(Duration::from_secs(10)) {
            self.err_seen.push(l);
        }
        (status, self.seen, self.err_seen.join("\n"))
    }
}

/// Whether CRIU tests can run; panics when they must (`LAMCR_REQUIRE_CRIU=1`) but cannot.
pub fn criu_available(test: &str) -> bool {
    let ok = nix::unistd::geteuid().is_root()
        && Command::new(LAMCR)
            .arg("check")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("LAMCR_REQUIRE_CRIU").as_deref() == Ok("1") {
            panic!("{test}: CRIU is required (LAMCR_REQUIRE_CRIU=1) but `lamcr check` fails");
        }
        eprintln!(
            "skipping {test}: CRIU is not usable here (run `lamcr check`); set LAMCR_REQUIRE_CRIU=1 to make this fatal"
        );
    }
    ok
}

pub fn example(name: &str) -> String {
    let exe = PathBuf::from(LAMCR);
    let dir = exe.parent().expect("target dir");
    let p = dir.join("examples").join(name);
    assert!(
        p.exists(),
        "{} missing: build with `cargo build --examples`",
        p.display()
    );
    p.display().to_string()
}

pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write fixture");
}

/// Polls `cond` until it returns `Some` (bounded by `limit`); panics naming `what` otherwise.
pub fn wait_until<T>(what: &str, limit: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
