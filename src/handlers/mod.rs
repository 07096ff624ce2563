//! The launcher's checkpoint handlers, after LAM/MPI's design.
//!
//! - The **sync handler** runs in signal context: it only writes the signal number to the main
//!   loop's self-pipe ([`crate::sys::install_signal_pipe`]), which interrupts the loop's blocking
//!   `poll`. The loop then decides what the signal means.
//! - The **async handler** is a thread. For each (coalesced) request it allocates the next epoch
//!   directory, starts the **helper** process (`lamcr helper`, fork+exec, see [`helper`]) that
//!   orders every lamd to dump and waits for all of them, and meanwhile builds the **restart
//!   schema** in memory. When the helper reports, it commits the manifest (or abandons the epoch)
//!   and wakes the main loop with the outcome.
//!
//! Requests made while the job starts or stops are held by the main loop (its critical section)
//! and handed over once the job runs; requests arriving while one is queued join it.

pub mod helper;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::launcher::commit;
use crate::schema::manifest::Manifest;
use crate::schema::{Engine, Epoch, JobSpec, NodeId, RestartSchema};

/// What the async handler needs to take a checkpoint of the job.
#[derive(Clone)]
pub struct CheckpointContext {
    pub job: JobSpec,
    pub ckpt_dir: PathBuf,
    pub launcher_argv: Vec<String>,
    /// Each node's lamd listening socket.
    pub nodes: Vec<(NodeId, PathBuf)>,
    /// Keep only the newest N committed epochs (`--keep`).
    pub keep: Option<u32>,
}

/// One request: who waits for it (a control connection id) and whether to end the job after.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub waiter: Option<u64>,
    pub term: bool,
}

/// A committed checkpoint.
#[derive(Debug, Clone)]
pub struct Committed {
    pub epoch: Epoch,
    pub path: PathBuf,
    pub bytes: u64,
    pub ranks: usize,
    pub elapsed: Duration,
    /// The slowest node's dump time.
    pub dump_ms: u64,
    pub engine: Engine,
}

/// The result of one checkpoint, for every request it served.
#[derive(Debug)]
pub struct Outcome {
    pub result: Result<Committed, String>,
    pub requests: Vec<Request>,
}

/// How far the checkpoint under way has got.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Image bytes written so far.
    pub bytes: u64,
    pub ranks_done: u32,
    pub ranks: u32,
}

struct Shared {
    progress: Mutex<Option<Progress>>,
    /// The job is failing: the checkpoint under way must not be committed, none may start.
    abort: AtomicBool,
    queue: Mutex<Queue>,
    cv: Condvar,
    outcomes: Mutex<Vec<Outcome>>,
}

#[derive(Default)]
struct Queue {
    requests: Vec<Request>,
    quit: bool,
}

/// Handle to the async handler thread.
pub struct AsyncHandler {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AsyncHandler {
    /// Starts the thread. `wake` is written one byte after each outcome.
    pub fn start(ctx: CheckpointContext, wake: OwnedFd) -> Self {
        let shared = Arc::new(Shared {
            abort: AtomicBool::new(false),
            progress: Mutex::new(None),
            queue: Mutex::new(Queue::default()),
            cv: Condvar::new(),
            outcomes: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lamcr-ckpt".into())
            .spawn(move || run(ctx, s, wake))
            .expect("spawning the checkpoint thread");
        Self {
            shared,
            thread: Some(thread),
        }
    }

    /// Queues a request; it joins any request not yet started.
    pub fn request(&self, req: Request) {
        self.shared.queue.lock().requests.push(req);
        self.shared.cv.notify_one();
    }

    /// The job is failing: abandon the checkpoint under way (whatever its dumps say) and refuse
    /// further ones, so a restart can only use an epoch committed before the failure.
    pub fn abort(&self) {
        self.shared.abort.store(true, Ordering::SeqCst);
    }

    /// The newest progress of the checkpoint under way, if any came since the last call.
    pub fn take_progress(&self) -> Option<Progress> {
        self.shared.progress.lock().take()
    }

    /// Outcomes ready since the last call.
    pub fn take_outcomes(&self) -> Vec<Outcome> {
        std::mem::take(&mut *self.shared.outcomes.lock())
    }

    /// Stops the thread after the checkpoint in progress, if any.
    pub fn stop(&mut self) -> Vec<Request> {
        let left = {
            let mut q = self.shared.queue.lock();
            q.quit = true;
            std::mem::take(&mut q.requests)
        };
        self.shared.cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        left
    }
}

fn run(mut ctx: CheckpointContext, shared: Arc<Shared>, wake: OwnedFd) {
    loop {
        let requests = {
            let mut q = shared.queue.lock();
            while q.requests.is_empty() && !q.quit {
                shared.cv.wait(&mut q);
            }
            if q.quit {
                return;
            }
            std::mem::take(&mut q.requests)
        };
        let stop = requests.iter().any(|r| r.term);
        if ctx.job.engine == Engine::Auto {
            // Decided at the first checkpoint, here, so `criu check` never delays a launch.
            let (engine, why) = crate::engine::auto();
            match why {
                Some(why) => eprintln!("lamcr: checkpoints use the self engine: {why}"),
                None => eprintln!("lamcr: checkpoints use the criu engine (lamcr check passes)"),
            }
            ctx.job.engine = engine;
        }
        let result = if shared.abort.load(Ordering::SeqCst) {
            Err("the job is failing".to_string())
        } else {
            let progress = |p: Progress| {
                *shared.progress.lock() = Some(p);
                let _ = nix::unistd::write(&wake, &[2u8]);
            };
            checkpoint(&ctx, stop, &shared.abort, &progress)
        };
        shared.outcomes.lock().push(Outcome { result, requests });
        let _ = nix::unistd::write(&wake, &[1u8]);
    }
}

/// Takes one checkpoint of the whole job.
fn checkpoint(
    ctx: &CheckpointContext,
    stop: bool,
    abort: &AtomicBool,
    progress: &dyn Fn(Progress),
) -> Result<Committed, String> {
    let started = Instant::now();
    let (epoch, dir) = commit::allocate_epoch(&ctx.ckpt_dir, &ctx.job.job_id)
        .map_err(|e| crate::error_chain(&e))?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("lamcr")
        .arg("helper")
        .arg("--job")
        .arg(&ctx.job.job_id.0)
        .arg("--epoch")
        .arg(epoch.0.to_string())
        .arg("--dir")
        .arg(&dir);
    if stop {
        cmd.arg("--stop");
    }
    cmd.arg("--engine")
        .arg(ctx.job.engine.name())
        .arg("--callback-timeout-ms")
        .arg(ctx.job.callback_timeout_ms.to_string());
    for (node, sock) in &ctx.nodes {
        cmd.arg("--node").arg(format!("{node}={}", sock.display()));
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            commit::abandon(&dir);
            return Err(format!("cannot start the checkpoint helper: {e}"));
        }
    };
    // While the helper drives the dumps, build the restart schema.
    let mut schema = RestartSchema {
        job: ctx.job.clone(),
        epoch,
        ckpt_dir: ctx.ckpt_dir.display().to_string(),
        launcher_argv: ctx.launcher_argv.clone(),
        nodes: Vec::new(),
        created_unix: 0,
    };
    let ranks = ctx.job.ranks.len() as u32;
    let results = collect_results(&mut child, &dir, ranks, &ctx.job, progress);
    let status = child
        .wait()
        .map_err(|e| format!("checkpoint helper failed: {e}"))?;
    let mut files = Vec::new();
    let mut failures = Vec::new();
    let mut dump_ms = 0;
    for (node, _) in &ctx.nodes {
        match results.iter().position(|r| r.node == *node) {
            None => failures.push(format!(
                "node {node}: the checkpoint helper ({status}) gave no report"
            )),
            Some(i) => match &results[i].result {
                Ok(done) => {
                    dump_ms = dump_ms.max(done.dump_ms);
                    files.extend(done.files.iter().cloned());
                    schema.nodes.push(done.image.clone());
                }
                Err(reason) => failures.push(format!("node {node}: {reason}")),
            },
        }
    }
    if !failures.is_empty() {
        commit::abandon(&dir);
        return Err(failures.join("; "));
    }
    schema.nodes.sort_by_key(|n| n.node);
    schema.created_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if abort.load(Ordering::SeqCst) {
        commit::abandon(&dir);
        return Err("the job failed while the checkpoint was taken".into());
    }
    let manifest = Manifest { schema, files };
    let bytes = match commit::commit(&dir, &manifest) {
        Ok(b) => b,
        Err(e) => {
            commit::abandon(&dir);
            return Err(crate::error_chain(&e));
        }
    };
    if let Some(keep) = ctx.keep {
        commit::prune(&ctx.ckpt_dir.join(&ctx.job.job_id.0), keep as usize);
    }
    Ok(Committed {
        epoch,
        path: dir,
        bytes,
        ranks: ctx.job.ranks.len(),
        elapsed: started.elapsed(),
        dump_ms,
        engine: ctx.job.engine,
    })
}

use std::os::unix::process::CommandExt;

/// Reads the helper's node results as they come, reporting progress every 100 ms meanwhile.
fn collect_results(
    child: &mut std::process::Child,
    dir: &Path,
    ranks: u32,
    job: &JobSpec,
    progress: &dyn Fn(Progress),
) -> Vec<helper::NodeResult> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::io::Read;
    use std::os::fd::AsFd;
    let mut results: Vec<helper::NodeResult> = Vec::new();
    let Some(mut out) = child.stdout.take() else {
        return results;
    };
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let readable = {
            let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(100u16)).is_ok_and(|n| n > 0)
        };
        if readable {
            match out.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
            // A result that does not decode is dropped: its node then counts as unreported.
            while let Some(r) = helper::next_result(&mut buf) {
                results.extend(r.ok());
            }
        }
        let ranks_done = results
            .iter()
            .filter(|r| r.result.is_ok())
            .map(|r| job.ranks_on(r.node).count() as u32)
            .sum();
        progress(Progress {
            bytes: dir_size(dir),
            ranks_done,
            ranks,
        });
    }
    results
}

/// Bytes of the files under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}
