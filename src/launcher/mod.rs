//! The launcher (`lamcr run`, `lamcr restart`): an mpirun.
//!
//! It starts one lamd per node (locally: fork/exec of itself with a socketpair), sends each its
//! ranks (or, on restart, its part of the checkpoint), forwards stdin to the chosen ranks, writes
//! the ranks' output, collects exit statuses, turns signals into job actions, and serves
//! checkpoint requests through the handlers. It never forks ranks itself.
//!
//! One poll loop. Its fds: the signal self-pipe (sync handler), each lamd connection, stdin, the
//! control socket, accepted control connections, and the async handler's wake-up pipe.

pub mod commit;
pub mod control;
pub mod output;
pub mod parse;
pub mod resume;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::handlers::{AsyncHandler, CheckpointContext, Outcome, Request};
use crate::schema::wire::{
    Channel, Frame, FrameReader, FromDaemon, FromLauncher, MAGIC, MAX_CHUNK, Outbox,
    PROTOCOL_VERSION, Part, Role, ToDaemon, ToLauncher, WireError,
};
use crate::schema::{
    Epoch, ExitStatus, FileEntry, JobSpec, NodeId, NodeImage, Rank, RankImage, RestartPolicy,
    Stream,
};
use control::{JobInfo, RunDir};
use output::OutputSink;

/// Most stdin bytes in flight to one node before the launcher waits for acknowledgements.
const STDIN_WINDOW: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot create the run directory")]
    RunDir(#[source] std::io::Error),
    #[error("cannot start lamd for node {node}")]
    Daemon {
        node: NodeId,
        source: std::io::Error,
    },
    #[error("system call failed")]
    Sys(#[from] Errno),
    #[error(transparent)]
    Output(#[from] output::OutputFileError),
    #[error("i/o failed")]
    Io(#[from] std::io::Error),
}

/// Options of a run that are not part of the job spec.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub print_all_exitcodes: bool,
    pub grace: Duration,
    pub ckpt_dir: PathBuf,
    pub launcher_argv: Vec<String>,
    pub policy: RestartPolicy,
}

/// How the job is to be started.
pub enum Start {
    /// Fresh ranks.
    Launch,
    /// From a checkpoint: its epoch, the epoch directory and each node's image.
    Restore {
        epoch: Epoch,
        epoch_dir: PathBuf,
        nodes: Vec<NodeImage>,
        /// Files whose checksums the nodes verify during the restore.
        unverified: Vec<FileEntry>,
    },
}

/// Why the job failed (the first failure decides the exit status).
#[derive(Debug, Clone)]
enum Failure {
    Rank { rank: Rank, status: ExitStatus },
    NodeLost { node: NodeId },
    Signal { signal: i32 },
    Start { reason: String },
}

impl Failure {
    fn exit_code(&self) -> i32 {
        match self {
            Failure::Rank { status, .. } => status.exit_code(),
            Failure::NodeLost { .. } => 1,
            Failure::Signal { signal } => 128 + signal,
            Failure::Start { .. } => 1,
        }
    }
}

struct Node {
    id: NodeId,
    pid: Pid,
    fd: OwnedFd,
    reader: FrameReader,
    out: Outbox,
    started: bool,
    gone: bool,
    reaped: bool,
    stdin_inflight: u64,
    /// A data frame whose payload is being moved from the socket: rank, stream, bytes left.
    payload: Option<(Rank, Stream, usize)>,
}

/// The daemons spawned for a job, each with the launcher's end of its socket, in node order.
/// Those still here when this is dropped (the launcher failed to start) are killed and reaped.
struct Daemons(Vec<(Pid, OwnedFd)>);

impl Daemons {
    /// Starts one lamd per node of `spec` (locally: fork/exec of ourselves).
    fn spawn(spec: &JobSpec, run_dir: &RunDir) -> Result<Self, LaunchError> {
        let mut daemons = Daemons(Vec::new());
        for node in &spec.nodes {
            let (ours, theirs) = crate::lamd::socketpair_for_child()?;
            let work = run_dir
                .node_work_dir(node.id.0)
                .map_err(LaunchError::RunDir)?;
            let lamd = crate::sys::SpawnSpec {
                program: "/proc/self/exe".into(),
                argv: vec![
                    "lamcr".into(),
                    "lamd".into(),
                    "--node".into(),
                    node.id.0.to_string().into(),
                    "--job".into(),
                    spec.job_id.0.clone().into(),
                    "--fd".into(),
                    "3".into(),
                    "--listen".into(),
                    run_dir.node_socket(node.id.0).into(),
                    "--work-dir".into(),
                    work.into(),
                ],
                env: std::env::vars_os().collect(),
                fds: vec![(theirs.as_raw_fd(), 3)],
                // Its own session: a terminal's ^C reaches the launcher only, which decides.
                setsid: true,
                ..Default::default()
            };
            let pid = crate::sys::spawn(&lamd).map_err(|source| LaunchError::Daemon {
                node: node.id,
                source,
            })?;
            daemons.0.push((pid, ours));
        }
        Ok(daemons)
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for (pid, _) in &self.0 {
            let _ = nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(*pid, None);
        }
    }
}

struct ControlConn {
    fd: OwnedFd,
    reader: FrameReader,
    out: Outbox,
    greeted: bool,
    closing: bool,
    /// It asked for a checkpoint: it gets progress reports until the answer.
    waiting: bool,
}

/// Job state, as an enum carrying what each state needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Daemons starting ranks; checkpoint requests are held.
    Starting,
    Running,
    /// Ranks are being stopped; no new checkpoints.
    Stopping,
}

pub struct Launcher {
    spec: JobSpec,
    opts: RunOptions,
    run_dir: RunDir,
    nodes: Vec<Node>,
    sink: OutputSink,
    signals: OwnedFd,
    statuses: BTreeMap<Rank, ExitStatus>,
    failure: Option<Failure>,
    state: State,
    interrupts: u32,
    stdin_open: bool,
    stdin_targets: Vec<Rank>,
    /// Where stdin is read into, one chunk at a time.
    stdin_buf: Vec<u8>,
    control: UnixListener,
    conns: HashMap<u64, ControlConn>,
    next_conn: u64,
    held: Vec<Request>,
    handler: AsyncHandler,
    wake: OwnedFd,
    info: JobInfo,
    terminated_by_checkpoint: bool,
    start: Start,
    /// The newest checkpoint this job can restart from: the last one committed, or the one it
    /// was restored from.
    last_committed: Option<(Epoch, PathBuf)>,
    /// When the next periodic checkpoint is due (`--ckpt-interval`).
    next_ckpt: Option<Instant>,
    /// A request is with the async handler and its outcome has not come back.
    ckpt_inflight: bool,
    /// The job failed and will be restored from a checkpoint once what is left of it is gone.
    pending_restart: Option<PendingRestart>,
    /// While a restore is under way: how far it has got.
    restoring: Option<RestoreProgress>,
}

/// Progress of a restore: a bar on a terminal, then one summary line.
struct RestoreProgress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    /// Image bytes of each node.
    node_bytes: HashMap<NodeId, u64>,
    bytes: u64,
    ranks: u64,
}

/// An automatic restart decided on at the failure, carried out at shutdown.
struct PendingRestart {
    what: String,
    epoch: Epoch,
    dir: PathBuf,
}

impl Launcher {
    /// Sets up signals, the run directory and the daemons. Signal handlers are registered before
    /// any thread starts.
    pub fn new(spec: JobSpec, opts: RunOptions, start: Start) -> Result<Self, LaunchError> {
        let (sig_r, sig_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        crate::sys::install_signal_pipe(
            &[
                libc::SIGINT,
                libc::SIGTERM,
                libc::SIGHUP,
                libc::SIGUSR1,
                libc::SIGUSR2,
                libc::SIGCONT,
                libc::SIGTSTP,
                libc::SIGCHLD,
            ],
            sig_w.as_raw_fd(),
        )?;
        std::mem::forget(sig_w);
        crate::sys::ignore_sigpipe();
        let run_dir = RunDir::create(&spec.job_id).map_err(LaunchError::RunDir)?;
        // The daemons first: their start-up overlaps the rest of ours.
        let daemons = Daemons::spawn(&spec, &run_dir)?;
        let control = UnixListener::bind(run_dir.control_socket()).map_err(LaunchError::RunDir)?;
        control.set_nonblocking(true)?;
        let (wake_r, wake_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let ctx = CheckpointContext {
            job: spec.clone(),
            ckpt_dir: opts.ckpt_dir.clone(),
            launcher_argv: opts.launcher_argv.clone(),
            nodes: spec
                .nodes
                .iter()
                .map(|n| (n.id, run_dir.node_socket(n.id.0)))
                .collect(),
            keep: opts.policy.keep,
        };
        let handler = AsyncHandler::start(ctx, wake_w);
        let mut sink = OutputSink::new(spec.io.clone());
        let truncate: HashMap<Rank, (u64, u64)> = match &start {
            Start::Restore { nodes, .. } => nodes
                .iter()
                .flat_map(|n| &n.ranks)
                .map(|r| match r {
                    RankImage::Running {
                        rank,
                        stdout_bytes,
                        stderr_bytes,
                        ..
                    }
                    | RankImage::Exited {
                        rank,
                        stdout_bytes,
                        stderr_bytes,
                        ..
                    } => (*rank, (*stdout_bytes, *stderr_bytes)),
                })
                .collect(),
            Start::Launch => HashMap::new(),
        };
        for r in &spec.ranks {
            sink.open_files(r.rank, truncate.get(&r.rank).copied())?;
        }
        let stdin_targets: Vec<Rank> = spec
            .ranks
            .iter()
            .filter(|r| r.stdin)
            .map(|r| r.rank)
            .collect();
        let info = JobInfo {
            job: spec.job_id.0.clone(),
            pid: std::process::id(),
            ranks: spec.ranks.len(),
            nodes: spec.nodes.len(),
            ckpt_dir: opts.ckpt_dir.display().to_string(),
            latest: String::new(),
        };
        run_dir.write_info(&info);
        let mut l = Self {
            stdin_open: !stdin_targets.is_empty(),
            stdin_buf: if stdin_targets.is_empty() {
                Vec::new()
            } else {
                vec![0; MAX_CHUNK]
            },
            stdin_targets,
            spec,
            opts,
            run_dir,
            nodes: Vec::new(),
            sink,
            signals: sig_r,
            statuses: BTreeMap::new(),
            failure: None,
            state: State::Starting,
            interrupts: 0,
            control,
            conns: HashMap::new(),
            next_conn: 0,
            held: Vec::new(),
            handler,
            wake: wake_r,
            info,
            terminated_by_checkpoint: false,
            last_committed: match &start {
                Start::Restore {
                    epoch, epoch_dir, ..
                } => Some((*epoch, epoch_dir.clone())),
                Start::Launch => None,
            },
            start,
            next_ckpt: None,
            ckpt_inflight: false,
            pending_restart: None,
            restoring: None,
        };
        if let Start::Restore {
            epoch_dir, nodes, ..
        } = &l.start
        {
            let node_bytes: HashMap<NodeId, u64> = nodes
                .iter()
                .filter(|n| !n.images_dir.is_empty())
                .map(|n| {
                    let size = crate::handlers::dir_size(&epoch_dir.join(&n.images_dir));
                    (n.node, size)
                })
                .collect();
            let bar = output::progress_bar("restore");
            if let Some(b) = &bar {
                b.set_length(l.spec.ranks.len() as u64);
                b.set_message(format!("0 B of {}", human_bytes(node_bytes.values().sum())));
            }
            l.restoring = Some(RestoreProgress {
                bar,
                started: Instant::now(),
                node_bytes,
                bytes: 0,
                ranks: 0,
            });
            for r in nodes.iter().flat_map(|n| &n.ranks) {
                if let RankImage::Exited { rank, status, .. } = r {
                    l.statuses.insert(*rank, *status);
                }
            }
        }
        l.start_daemons(daemons)?;
        Ok(l)
    }

    /// Greets the daemons started in `new` and tells each what to run.
    fn start_daemons(&mut self, mut daemons: Daemons) -> Result<(), LaunchError> {
        for (node, (pid, ours)) in self
            .spec
            .nodes
            .clone()
            .into_iter()
            .zip(std::mem::take(&mut daemons.0))
        {
            crate::lamd::size_link_buffers(ours.as_fd(), 1 << 20, 4 << 20);
            let mut n = Node {
                id: node.id,
                pid,
                fd: ours,
                reader: FrameReader::new(),
                out: Outbox::default(),
                started: false,
                gone: false,
                reaped: false,
                stdin_inflight: 0,
                payload: None,
            };
            n.out.push(&ToDaemon::hello(
                self.spec.job_id.clone(),
                node.id,
                Role::Launcher,
            ));
            let ranks: Vec<_> = self.spec.ranks_on(node.id).cloned().collect();
            match &self.start {
                Start::Launch => n.out.push(&ToDaemon::Launch { ranks }),
                Start::Restore {
                    epoch_dir,
                    nodes,
                    unverified,
                    ..
                } => {
                    let image =
                        nodes
                            .iter()
                            .find(|i| i.node == node.id)
                            .cloned()
                            .unwrap_or(NodeImage {
                                node: node.id,
                                images_dir: String::new(),
                                control_pipe: 0,
                                status_pipe: 0,
                                pid_namespace: false,
                                ranks: Vec::new(),
                                engine: self.spec.engine,
                                cr_round: 0,
                            });
                    let prefix = format!("{}/", image.images_dir);
                    let verify = unverified
                        .iter()
                        .filter(|f| !image.images_dir.is_empty() && f.path.starts_with(&prefix))
                        .cloned()
                        .collect();
                    n.out.push(&ToDaemon::Restore {
                        epoch_dir: epoch_dir.display().to_string(),
                        image,
                        ranks,
                        verify,
                    });
                }
            }
            let _ = n.out.flush(n.fd.as_fd());
            self.nodes.push(n);
        }
        Ok(())
    }

    /// Runs the job to its end and returns the launcher's exit code.
    pub fn run(mut self) -> i32 {
        while !self.finished() {
            if let Err(e) = self.poll_once() {
                self.fail(Failure::Start {
                    reason: crate::error_chain(&e),
                });
                self.kill_all();
            }
        }
        self.shutdown()
    }

    fn finished(&self) -> bool {
        let all_ranks = self.statuses.len() == self.spec.ranks.len();
        all_ranks || self.nodes.iter().all(|n| n.gone)
    }

    fn shutdown(mut self) -> i32 {
        for n in &mut self.nodes {
            if !n.gone {
                n.out.push(&ToDaemon::Shutdown);
                let _ = n.out.flush_blocking(n.fd.as_fd(), 2000);
            }
        }
        // Wait for each daemon to exit (bounded), draining any last output on the way.
        let deadline = Instant::now() + Duration::from_secs(10);
        for i in 0..self.nodes.len() {
            while !self.nodes[i].gone && Instant::now() < deadline {
                let mut fds = [PollFd::new(self.nodes[i].fd.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(200u16));
                self.on_node(i);
            }
            let pid = self.nodes[i].pid;
            if !self.nodes[i].reaped
                && waitpid(pid, Some(WaitPidFlag::WNOHANG)) == Ok(WaitStatus::StillAlive)
            {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = waitpid(pid, None);
            }
        }
        for req in self
            .handler
            .stop()
            .into_iter()
            .chain(std::mem::take(&mut self.held))
        {
            self.reply(
                req.waiter,
                FromLauncher::Failed {
                    reason: "the job ended before the checkpoint could be taken".into(),
                },
            );
        }
        for o in self.handler.take_outcomes() {
            self.on_outcome(o);
        }
        for (_, c) in self.conns.iter_mut() {
            let _ = c.out.flush_blocking(c.fd.as_fd(), 1000);
        }
        if self.terminated_by_checkpoint {
            return 0;
        }
        if let Some(r) = self.pending_restart.take() {
            self.restart_from(r);
        }
        if self.opts.print_all_exitcodes {
            for r in &self.spec.ranks {
                let s = self
                    .statuses
                    .get(&r.rank)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "was lost".into());
                eprintln!("lamcr: rank {} ({}) {s}", r.rank, r.argv[0]);
            }
        }
        match &self.failure {
            None => 0,
            Some(f) => f.exit_code(),
        }
    }

    /// One line's worth of what went wrong.
    fn describe(&self, f: &Failure) -> String {
        let host = |node: NodeId| {
            self.spec
                .nodes
                .get(node.0 as usize)
                .map(|n| n.host.clone())
                .unwrap_or_default()
        };
        match f {
            Failure::Rank { rank, status } => {
                let node = self
                    .spec
                    .ranks
                    .get(rank.0 as usize)
                    .map(|r| r.node)
                    .unwrap_or(NodeId(0));
                format!("rank {rank} on node {node} ({}) {status}", host(node))
            }
            Failure::NodeLost { node } => {
                format!("node {node} ({}) lost: its lamd exited", host(*node))
            }
            Failure::Signal { signal } => {
                let name = nix::sys::signal::Signal::try_from(*signal)
                    .map(|s| s.as_str())
                    .unwrap_or("?");
                format!("received {name}")
            }
            Failure::Start { reason } => reason.clone(),
        }
    }

    /// Whether `--auto-restart` covers this failure (a checkpoint to restart from aside).
    fn restart_covers(&self, f: &Failure) -> bool {
        let p = &self.opts.policy;
        p.auto_restart > 0
            && match f {
                Failure::Rank { status, .. } => {
                    matches!(status, ExitStatus::Signal(_)) || p.on_exit
                }
                Failure::NodeLost { .. } => true,
                Failure::Signal { .. } | Failure::Start { .. } => false,
            }
    }

    fn fail(&mut self, f: Failure) {
        if self.failure.is_some() || self.terminated_by_checkpoint {
            return;
        }
        let what = self.describe(&f);
        if let Failure::Start { .. } = f {
            eprintln!("lamcr: {what}");
        } else if self.restart_covers(&f) {
            let p = &self.opts.policy;
            match &self.last_committed {
                Some((epoch, dir)) if p.restarts < p.auto_restart => {
                    // Nothing may be committed from here on: the restart uses this epoch.
                    self.handler.abort();
                    self.pending_restart = Some(PendingRestart {
                        what,
                        epoch: *epoch,
                        dir: dir.clone(),
                    });
                    self.failure = Some(f);
                    // Whatever is left is restored from the image: no grace period.
                    self.kill_all();
                    return;
                }
                Some(_) => eprintln!(
                    "lamcr: {what}; stopping the job ({} automatic restarts used)",
                    p.restarts
                ),
                None => {
                    eprintln!("lamcr: {what}; stopping the job (no checkpoint to restart from)")
                }
            }
        } else {
            eprintln!("lamcr: {what}; stopping the job");
        }
        self.failure = Some(f);
        self.terminate();
    }

    /// Carries out an automatic restart: the launcher `execve`s itself with the newest committed
    /// schema, keeping its pid and console. Returns only if that cannot be done.
    fn restart_from(&mut self, r: PendingRestart) {
        let p = &self.opts.policy;
        eprintln!(
            "lamcr: {}; restarting from checkpoint epoch {} (restart {} of {})",
            r.what,
            r.epoch,
            p.restarts + 1,
            p.auto_restart
        );
        let (manifest, unverified) = match commit::load(&r.dir) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("lamcr: cannot restart: {}", crate::error_chain(&e));
                return;
            }
        };
        let handover = resume::Handover {
            schema: manifest.schema,
            unverified,
            epoch_dir: r.dir.display().to_string(),
            print_all_exitcodes: self.opts.print_all_exitcodes,
            grace_ms: self.opts.grace.as_millis() as u64,
            policy: RestartPolicy {
                restarts: p.restarts + 1,
                ..p.clone()
            },
            job_id: Some(self.spec.job_id.clone()),
            replay_marker: true,
        };
        // The new image makes the same job's run directory again; nothing else outlives exec
        // (every other fd is close-on-exec, every child has been reaped).
        let _ = std::fs::remove_dir_all(&self.run_dir.path);
        let err = resume::exec(&handover);
        eprintln!("lamcr: cannot restart: cannot exec /proc/self/exe: {err}");
    }

    fn terminate(&mut self) {
        self.state = State::Stopping;
        let grace_ms = self.opts.grace.as_millis() as u64;
        self.broadcast(ToDaemon::Terminate { grace_ms });
    }

    fn kill_all(&mut self) {
        self.state = State::Stopping;
        self.broadcast(ToDaemon::Kill);
    }

    fn broadcast(&mut self, msg: ToDaemon) {
        for n in &mut self.nodes {
            if !n.gone {
                n.out.push(&msg);
                let _ = n.out.flush(n.fd.as_fd());
            }
        }
    }

    fn poll_once(&mut self) -> Result<(), LaunchError> {
        #[derive(Clone, Copy)]
        enum Src {
            Signals,
            Wake,
            Control,
            Conn(u64),
            Node(usize),
            Stdin,
        }
        let mut fds = Vec::new();
        let mut srcs = Vec::new();
        fds.push(PollFd::new(self.signals.as_fd(), PollFlags::POLLIN));
        srcs.push(Src::Signals);
        fds.push(PollFd::new(self.wake.as_fd(), PollFlags::POLLIN));
        srcs.push(Src::Wake);
        fds.push(PollFd::new(self.control.as_fd(), PollFlags::POLLIN));
        srcs.push(Src::Control);
        for (id, c) in &self.conns {
            let mut f = PollFlags::POLLIN;
            if c.out.pending() > 0 {
                f |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(c.fd.as_fd(), f));
            srcs.push(Src::Conn(*id));
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if n.gone {
                continue;
            }
            let mut f = PollFlags::POLLIN;
            if n.out.pending() > 0 {
                f |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(n.fd.as_fd(), f));
            srcs.push(Src::Node(i));
        }
        let stdin = std::io::stdin();
        if self.stdin_open && self.state != State::Stopping && self.stdin_window_open() {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
            srcs.push(Src::Stdin);
        }
        let timeout = crate::event::timeout_until(self.next_ckpt, Some(Duration::from_secs(1)));
        let ready = crate::event::ready(&mut fds, &srcs, timeout)?;
        drop(fds);
        for (src, revents) in ready {
            match src {
                Src::Signals => self.on_signals(),
                Src::Wake => {
                    let mut b = [0u8; 16];
                    let _ = nix::unistd::read(self.wake.as_fd(), &mut b);
                    if let Some(p) = self.handler.take_progress() {
                        self.on_progress(p);
                    }
                    for o in self.handler.take_outcomes() {
                        self.on_outcome(o);
                    }
                }
                Src::Control => self.accept_control(),
                Src::Conn(id) => self.on_conn(id, revents),
                Src::Node(i) => {
                    if revents.contains(PollFlags::POLLOUT) {
                        let n = &mut self.nodes[i];
                        let _ = n.out.flush(n.fd.as_fd());
                    }
                    if revents
                        .intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                    {
                        self.on_node(i);
                    }
                }
                Src::Stdin => self.on_stdin(),
            }
        }
        self.conns
            .retain(|_, c| !(c.closing && c.out.pending() == 0));
        self.periodic_checkpoint();
        Ok(())
    }

    /// `--ckpt-interval`: asks for a checkpoint when one is due and none is under way.
    fn periodic_checkpoint(&mut self) {
        if let Some(due) = self.next_ckpt
            && self.state == State::Running
            && !self.ckpt_inflight
            && Instant::now() >= due
        {
            self.next_ckpt = None;
            self.on_checkpoint_request(Request {
                waiter: None,
                term: false,
            });
        }
    }

    fn schedule_checkpoint(&mut self) {
        if let Some(ms) = self.opts.policy.ckpt_interval_ms {
            self.next_ckpt = Some(Instant::now() + Duration::from_millis(ms));
        }
    }

    fn submit(&mut self, req: Request) {
        self.ckpt_inflight = true;
        self.handler.request(req);
    }

    fn stdin_window_open(&self) -> bool {
        self.nodes
            .iter()
            .all(|n| n.gone || n.stdin_inflight < STDIN_WINDOW)
    }

    fn on_stdin(&mut self) {
        let buf = &mut self.stdin_buf;
        let n = loop {
            match nix::unistd::read(std::io::stdin().as_fd(), buf) {
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(_) => break 0,
            }
        };
        for &rank in &self.stdin_targets {
            let node = self.spec.ranks[rank.0 as usize].node;
            let Some(nd) = self.nodes.iter_mut().find(|x| x.id == node) else {
                continue;
            };
            if nd.gone {
                continue;
            }
            if n == 0 {
                nd.out.push(&ToDaemon::StdinEof { rank });
                let _ = nd.out.flush(nd.fd.as_fd());
            } else {
                let _ = nd
                    .out
                    .send_data(nd.fd.as_fd(), rank, Channel::Stdin, &buf[..n]);
                nd.stdin_inflight += n as u64;
            }
        }
        if n == 0 {
            self.stdin_open = false;
        }
    }

    fn on_signals(&mut self) {
        let mut buf = [0u8; 64];
        let n = nix::unistd::read(self.signals.as_fd(), &mut buf).unwrap_or(0);
        for &sig in &buf[..n] {
            let sig = i32::from(sig);
            match sig {
                libc::SIGINT | libc::SIGTERM | libc::SIGHUP => {
                    self.interrupts += 1;
                    if self.interrupts >= 2 && sig == libc::SIGINT {
                        eprintln!("lamcr: second interrupt; killing the job");
                        self.kill_all();
                    } else {
                        // The first failure stops the job; a later signal changes nothing.
                        self.fail(Failure::Signal { signal: sig });
                    }
                }
                libc::SIGUSR1 => self.on_checkpoint_request(Request {
                    waiter: None,
                    term: false,
                }),
                libc::SIGTSTP => self.broadcast(ToDaemon::Signal {
                    signal: libc::SIGSTOP,
                }),
                libc::SIGUSR2 | libc::SIGCONT => self.broadcast(ToDaemon::Signal { signal: sig }),
                libc::SIGCHLD => self.reap_daemons(),
                _ => {}
            }
        }
    }

    /// Reaps exited lamds. Only our daemons' pids are waited for: the async handler's helper is
    /// a child too, and its thread must be the one to reap it.
    fn reap_daemons(&mut self) {
        for i in 0..self.nodes.len() {
            let pid = self.nodes[i].pid;
            if matches!(
                waitpid(pid, Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..))
            ) {
                self.nodes[i].reaped = true;
                // Its socket may still hold its last words: read them first.
                self.on_node(i);
                if !self.nodes[i].gone {
                    self.node_lost(i);
                }
            }
        }
    }

    fn node_lost(&mut self, i: usize) {
        self.nodes[i].gone = true;
        let id = self.nodes[i].id;
        let lost: Vec<Rank> = self
            .spec
            .ranks_on(id)
            .map(|r| r.rank)
            .filter(|r| !self.statuses.contains_key(r))
            .collect();
        if lost.is_empty() {
            return;
        }
        for r in lost {
            self.statuses.insert(r, ExitStatus::Signal(libc::SIGKILL));
            self.sink.finish_rank(r);
        }
        self.fail(Failure::NodeLost { node: id });
    }

    /// Reads what a lamd sent. When output goes to the console as is (`sink.raw()`), only frame
    /// headers and messages are read: each data payload is spliced from the socket to the
    /// console, one splice per wake-up.
    fn on_node(&mut self, i: usize) {
        if self.nodes[i].gone {
            return;
        }
        let raw = self.sink.raw();
        if let Some((rank, stream, rest)) = self.nodes[i].payload {
            match self
                .sink
                .splice_from(self.nodes[i].fd.as_fd(), stream, rest)
            {
                Ok(n) => {
                    self.nodes[i].payload = (n < rest).then_some((rank, stream, rest - n));
                }
                Err(e) => {
                    if !matches!(e, WireError::Closed) {
                        eprintln!("lamcr: node {}: {e}", self.nodes[i].id);
                    }
                    self.node_lost(i);
                }
            }
            return;
        }
        let open = {
            let n = &mut self.nodes[i];
            match (raw, n.reader.header_room()) {
                (false, _) => n.reader.fill(n.fd.as_fd()),
                (true, 0) => Ok(true),
                (true, room) => n.reader.fill_upto(n.fd.as_fd(), room),
            }
            .unwrap_or(false)
        };
        loop {
            let reader = &mut self.nodes[i].reader;
            let part = if raw {
                reader.next_part::<FromDaemon>()
            } else {
                reader.next_frame::<FromDaemon>().map(|f| f.map(Part::from))
            };
            let part = match part {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    eprintln!("lamcr: node {}: {e}", self.nodes[i].id);
                    self.node_lost(i);
                    return;
                }
            };
            match part {
                Part::Data {
                    rank,
                    channel,
                    bytes,
                    rest,
                } => {
                    let stream = if channel == Channel::Stderr {
                        Stream::Stderr
                    } else {
                        Stream::Stdout
                    };
                    self.sink.write(rank, stream, &bytes);
                    if rest > 0 {
                        self.nodes[i].payload = Some((rank, stream, rest));
                        break;
                    }
                }
                Part::Message(m) => self.on_daemon_message(i, m),
            }
        }
        if !open {
            self.node_lost(i);
        }
    }

    fn on_daemon_message(&mut self, i: usize, msg: FromDaemon) {
        match msg {
            FromDaemon::Hello { .. } => {}
            FromDaemon::Started { .. } => {
                self.nodes[i].started = true;
                let id = self.nodes[i].id;
                let node_ranks = self.spec.ranks_on(id).count() as u64;
                if let Some(r) = &mut self.restoring {
                    r.ranks += node_ranks;
                    r.bytes += r.node_bytes.get(&id).copied().unwrap_or(0);
                    if let Some(b) = &r.bar {
                        b.set_position(r.ranks);
                        b.set_message(format!(
                            "{} of {}",
                            human_bytes(r.bytes),
                            human_bytes(r.node_bytes.values().sum())
                        ));
                    }
                }
                if self.state == State::Starting && self.nodes.iter().all(|n| n.started || n.gone) {
                    self.state = State::Running;
                    self.schedule_checkpoint();
                    if let Some(r) = self.restoring.take() {
                        if let Some(b) = r.bar {
                            b.finish_and_clear();
                        }
                        eprintln!(
                            "lamcr: restored {} ranks, {} in {:.2} s <- {}",
                            self.spec.ranks.len(),
                            human_bytes(r.bytes),
                            r.started.elapsed().as_secs_f64(),
                            self.last_committed
                                .as_ref()
                                .map(|(_, d)| d.display().to_string())
                                .unwrap_or_default()
                        );
                    }
                    for req in std::mem::take(&mut self.held) {
                        self.submit(req);
                    }
                }
            }
            FromDaemon::StartFailed { reason } => self.fail(Failure::Start { reason }),
            FromDaemon::StdinAck { bytes } => {
                let n = &mut self.nodes[i];
                n.stdin_inflight = n.stdin_inflight.saturating_sub(bytes);
            }
            FromDaemon::RankExited { rank, status } => {
                self.sink.finish_rank(rank);
                self.statuses.insert(rank, status);
                if !status.success() {
                    self.fail(Failure::Rank { rank, status });
                }
            }
            FromDaemon::Refused { reason } => {
                let id = self.nodes[i].id;
                self.fail(Failure::Start {
                    reason: format!("node {id}: {reason}"),
                });
            }
            FromDaemon::CheckpointRequest { .. } => {
                // An app asked (`cr_request_checkpoint`): the same request SIGUSR1 makes.
                self.on_checkpoint_request(Request {
                    waiter: None,
                    term: false,
                });
            }
            FromDaemon::Checkpointed { .. } | FromDaemon::CheckpointFailed { .. } => {}
        }
    }

    /// Start-up and teardown are the launcher's critical sections: a request made then is held,
    /// never dropped. Held at start-up, it is taken once every node runs; held at teardown, it is
    /// answered when the job ends (there is nothing left to checkpoint).
    fn on_checkpoint_request(&mut self, req: Request) {
        match self.state {
            State::Starting | State::Stopping => self.held.push(req),
            State::Running => self.submit(req),
        }
    }

    fn on_outcome(&mut self, o: Outcome) {
        self.ckpt_inflight = false;
        if self.state == State::Running {
            self.schedule_checkpoint();
        }
        let reply = match &o.result {
            Ok(c) => {
                let size = human_bytes(c.bytes);
                eprintln!(
                    "lamcr: checkpoint {} committed: {} ranks, {size} in {:.2} s ({} engine) -> {}",
                    c.epoch,
                    c.ranks,
                    c.elapsed.as_secs_f64(),
                    c.engine,
                    c.path.display()
                );
                self.info.latest = c.path.display().to_string();
                self.last_committed = Some((c.epoch, c.path.clone()));
                self.run_dir.write_info(&self.info);
                FromLauncher::Committed {
                    epoch: c.epoch,
                    path: c.path.display().to_string(),
                    bytes: c.bytes,
                    ms: c.elapsed.as_millis() as u64,
                }
            }
            Err(reason) => {
                if self.failure.is_some() {
                    eprintln!("lamcr: checkpoint abandoned: {reason}");
                } else {
                    eprintln!("lamcr: checkpoint failed: {reason}; the job continues");
                }
                FromLauncher::Failed {
                    reason: reason.clone(),
                }
            }
        };
        let term = o.requests.iter().any(|r| r.term);
        for r in &o.requests {
            self.reply(r.waiter, reply.clone());
        }
        if term {
            if o.result.is_ok() {
                // The ranks have been stopped since their dump; nothing ran after the image.
                eprintln!("lamcr: ending the job after its checkpoint (--term)");
                self.terminated_by_checkpoint = true;
                self.kill_all();
            } else {
                self.broadcast(ToDaemon::Continue);
            }
        }
    }

    /// Passes the checkpoint's progress to everyone waiting for it.
    fn on_progress(&mut self, p: crate::handlers::Progress) {
        for c in self.conns.values_mut().filter(|c| c.waiting && !c.closing) {
            c.out.push(&FromLauncher::Progress {
                bytes: p.bytes,
                ranks_done: p.ranks_done,
                ranks: p.ranks,
            });
            let _ = c.out.flush(c.fd.as_fd());
        }
    }

    fn reply(&mut self, waiter: Option<u64>, msg: FromLauncher) {
        if let Some(c) = waiter.and_then(|w| self.conns.get_mut(&w)) {
            c.out.push(&msg);
            let _ = c.out.flush(c.fd.as_fd());
            c.closing = true;
        }
    }

    fn accept_control(&mut self) {
        while let Ok((s, _)) = self.control.accept() {
            let fd: OwnedFd = s.into();
            if crate::lamd::nonblocking(fd.as_fd()).is_ok() {
                self.next_conn += 1;
                self.conns.insert(
                    self.next_conn,
                    ControlConn {
                        fd,
                        reader: FrameReader::new(),
                        out: Outbox::default(),
                        greeted: false,
                        closing: false,
                        waiting: false,
                    },
                );
            }
        }
    }

    fn on_conn(&mut self, id: u64, revents: PollFlags) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if revents.contains(PollFlags::POLLOUT) {
            let _ = c.out.flush(c.fd.as_fd());
        }
        let open = c.reader.fill(c.fd.as_fd()).unwrap_or(false);
        let mut reqs = Vec::new();
        loop {
            match c.reader.next_frame::<ToLauncher>() {
                Ok(Some(Frame::Message(ToLauncher::Hello { magic, version }))) => {
                    if magic != MAGIC || version != PROTOCOL_VERSION {
                        c.out.push(&FromLauncher::Failed {
                            reason: format!("protocol version {version} is not {PROTOCOL_VERSION}"),
                        });
                        c.closing = true;
                    } else {
                        c.greeted = true;
                    }
                }
                Ok(Some(Frame::Message(ToLauncher::Checkpoint { term }))) if c.greeted => {
                    c.waiting = true;
                    reqs.push(Request {
                        waiter: Some(id),
                        term,
                    })
                }
                Ok(None) => break,
                Ok(Some(_)) | Err(_) => {
                    c.out.push(&FromLauncher::Failed {
                        reason: "malformed request".into(),
                    });
                    c.closing = true;
                    break;
                }
            }
        }
        if !open && reqs.is_empty() {
            c.closing = true;
            c.out = Outbox::default();
        }
        for r in reqs {
            self.on_checkpoint_request(r);
        }
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
