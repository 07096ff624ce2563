//! lamd, the node daemon: one per node per job.
//!
//! It owns the node's side of the job: the holder process (see [`holder`]) whose children are the
//! ranks, the read ends of the ranks' stdout/stderr pipes and the write ends of their stdin pipes,
//! the connection to the launcher, and a listening socket on which the checkpoint helper connects.
//!
//! One poll loop, one thread. Back-pressure: rank pipes are only read while the launcher's outbox
//! is below [`HIGH_WATER`], so a rank writing faster than the console reads is blocked by its
//! pipe, and nothing buffers without bound. Stdin is credit-based: lamd acknowledges bytes it has
//! written into rank pipes, and the launcher never has more than a window in flight.
//!
//! Invariant: a rank's `RankExited` is sent only after every byte it wrote before exiting has been
//! queued for the launcher (its pipes are drained when the holder reports the exit).

pub mod callbacks;
pub mod digest;
pub mod dump;
pub mod holder;
pub mod launch;
pub mod relay;
pub mod restore;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::schema::wire::Resumed;
use crate::schema::wire::{
    Channel, FrameReader, FrameRef, FromDaemon, MAGIC, Outbox, PROTOCOL_VERSION, Role, ToDaemon,
    WireError,
};
use crate::schema::{ExitStatus, JobId, NodeId, Rank, RankCr, RankSpec};
use holder::{HolderCommand, HolderEvent};

/// Stop reading rank pipes while this much output waits for the launcher.
pub const HIGH_WATER: usize = 4 << 20;
const READ_CHUNK: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("launcher connection failed")]
    Launcher(#[source] WireError),
    #[error("system call failed")]
    Sys(#[from] Errno),
    #[error("i/o failed")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Checkpoint(#[from] crate::launcher::commit::StoreError),
}

/// How `lamcr lamd` was started.
#[derive(Debug, Clone)]
pub struct DaemonArgs {
    pub node: NodeId,
    pub job_id: JobId,
    /// The launcher connection, inherited.
    pub launcher_fd: i32,
    /// Where helpers connect.
    pub listen: PathBuf,
    /// Private directory for criu logs and sockets.
    pub work_dir: PathBuf,
}

/// A connection to the launcher or a helper.
pub(crate) struct Peer {
    fd: OwnedFd,
    reader: FrameReader,
    out: Outbox,
    greeted: bool,
    role: Role,
}

/// The holder process and lamd's ends of its two pipes.
pub(crate) struct Holder {
    pid: Pid,
    control: OwnedFd,
    control_out: Outbox,
    status: Option<OwnedFd>,
    status_reader: FrameReader,
    control_pipe: u64,
    status_pipe: u64,
    pid_namespace: bool,
    /// What the holder was forked with. Freed only once it is gone: until then their pages are
    /// shared with it, and freeing them would copy each one (copy-on-write) during the launch.
    specs: Vec<holder::HolderRank>,
}

/// A rank as lamd sees it.
pub(crate) struct Slot {
    spec: RankSpec,
    stdin: Option<OwnedFd>,
    /// Stdin bytes the rank's pipe has not taken yet (bounded by the launcher's window, plus
    /// one chunk per stdin rank of the node).
    stdin_queue: Outbox,
    stdin_eof: bool,
    stdin_closed: bool,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    stdin_pipe: Option<u64>,
    stdout_pipe: u64,
    stderr_pipe: u64,
    stdout_bytes: u64,
    stderr_bytes: u64,
    stdout_flow: relay::Flow,
    stderr_flow: relay::Flow,
    status: Option<ExitStatus>,
    reported: bool,
    /// lamd's end of the rank's callback socket (the rank has the other at `LAMCR_CR_FD`).
    cr: Option<OwnedFd>,
    cr_reader: FrameReader,
    cr_out: Outbox,
    /// Inode of the rank's end: CRIU's name for it (`unix[INODE]`).
    cr_socket: u64,
    /// The rank initialised the library: its callbacks take part in checkpoints.
    cr_enabled: bool,
    /// Where it stands in the checkpoint being taken (recorded in the image).
    cr_mark: RankCr,
    /// `self` engine: its state file in the checkpoint being taken.
    state: Option<String>,
}

pub(crate) struct Daemon {
    node: NodeId,
    job_id: JobId,
    work_dir: PathBuf,
    launcher: Peer,
    listener: UnixListener,
    helpers: Vec<Peer>,
    holder: Option<Holder>,
    ranks: BTreeMap<Rank, Slot>,
    signals: OwnedFd,
    kill_at: Option<Instant>,
    started_reported: bool,
    spawned: Vec<(Rank, u32)>,
    expect_spawns: usize,
    shutdown: bool,
    buf: Vec<u8>,
    /// Data frames on their way to the launcher without a copy (see [`relay`]).
    stage: relay::Stage,
    /// The last callback round started (see [`callbacks`]).
    cr_round: u64,
    /// Ranks whose callbacks wait in a `stop` checkpoint until `Continue` or `Kill`.
    cr_held: Vec<Rank>,
}

/// Runs lamd until the job is over. Returns the process exit code.
pub fn main(args: DaemonArgs) -> i32 {
    match Daemon::new(args).and_then(|mut d| d.run()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("lamd: {}", crate::error_chain(&e));
            1
        }
    }
}

impl Holder {
    /// The holder `pid` with lamd's ends of its control (write) and status (read) pipes; the
    /// pipes' inodes are what CRIU will call them in the next dump.
    pub(crate) fn new(
        pid: Pid,
        control: OwnedFd,
        status: OwnedFd,
        pid_namespace: bool,
    ) -> Result<Self, DaemonError> {
        nonblocking(control.as_fd())?;
        nonblocking(status.as_fd())?;
        Ok(Holder {
            pid,
            control_pipe: crate::sys::inode_of(control.as_fd())?,
            status_pipe: crate::sys::inode_of(status.as_fd())?,
            control,
            control_out: Outbox::default(),
            status: Some(status),
            status_reader: FrameReader::new(),
            pid_namespace,
            specs: Vec::new(),
        })
    }
}

pub(crate) fn nonblocking(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

pub(crate) fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
}

/// A connected pair of Unix stream sockets, both close-on-exec: ours non-blocking, and the one
/// for a child (a lamd, a rank's callback socket) left blocking.
pub(crate) fn socketpair_for_child() -> Result<(OwnedFd, OwnedFd), Errno> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    nonblocking(ours.as_fd())?;
    Ok((ours, theirs))
}

/// Sizes the send and receive buffers of one end of the launcher link (best effort): fewer
/// wake-ups per forwarded MiB on both sides.
pub(crate) fn size_link_buffers(fd: BorrowedFd<'_>, send: usize, recv: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(&fd, sockopt::SndBufForce, &send);
    let _ = setsockopt(&fd, sockopt::RcvBufForce, &recv);
}

impl Daemon {
    fn new(args: DaemonArgs) -> Result<Self, DaemonError> {
        let launcher_fd = crate::sys::take_inherited_fd(args.launcher_fd);
        let _ = fcntl(
            &launcher_fd,
            FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        nonblocking(launcher_fd.as_fd())?;
        size_link_buffers(launcher_fd.as_fd(), 4 << 20, 1 << 20);
        let _ = std::fs::remove_file(&args.listen);
        let listener = UnixListener::bind(&args.listen).map_err(|source| DaemonError::Listen {
            path: args.listen.clone(),
            source,
        })?;
        listener.set_nonblocking(true)?;
        let (sig_r, sig_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        crate::sys::install_signal_pipe(
            &[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP],
            sig_w.as_raw_fd(),
        )?;
        std::mem::forget(sig_w);
        crate::sys::ignore_sigpipe();
        Ok(Self {
            node: args.node,
            job_id: args.job_id,
            work_dir: args.work_dir,
            launcher: Peer {
                fd: launcher_fd,
                reader: FrameReader::new(),
                out: Outbox::default(),
                greeted: false,
                role: Role::Launcher,
            },
            listener,
            helpers: Vec::new(),
            holder: None,
            ranks: BTreeMap::new(),
            signals: sig_r,
            kill_at: None,
            started_reported: false,
            spawned: Vec::new(),
            expect_spawns: 0,
            shutdown: false,
            buf: vec![0; READ_CHUNK],
            stage: relay::Stage::new()?,
            cr_round: 0,
            cr_held: Vec::new(),
        })
    }

    fn run(&mut self) -> Result<(), DaemonError> {
        loop {
            self.reap();
            if self.shutdown && self.link_pending() == 0 {
                self.kill_ranks();
                self.wait_holder_gone(Duration::from_secs(5));
                return Ok(());
            }
            if self.launcher.reader.at_eof() {
                // The launcher is gone: nothing may outlive it.
                self.kill_ranks();
                self.wait_holder_gone(Duration::from_secs(5));
                return Ok(());
            }
            self.poll_once()?;
        }
    }

    fn poll_once(&mut self) -> Result<(), DaemonError> {
        #[derive(Clone, Copy)]
        enum Src {
            Signals,
            Launcher,
            Listener,
            Helper(usize),
            HolderStatus,
            HolderControl,
            Out(Rank, Channel),
            In(Rank),
            Cr(Rank),
        }
        let hold = self.next_hold();
        let mut srcs = Vec::new();
        let mut fds = Vec::new();
        fds.push(PollFd::new(self.signals.as_fd(), PollFlags::POLLIN));
        srcs.push(Src::Signals);
        let mut lflags = PollFlags::POLLIN;
        if self.link_pending() > 0 {
            lflags |= PollFlags::POLLOUT;
        }
        fds.push(PollFd::new(self.launcher.fd.as_fd(), lflags));
        srcs.push(Src::Launcher);
        fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
        srcs.push(Src::Listener);
        for (i, h) in self.helpers.iter().enumerate() {
            let mut f = PollFlags::POLLIN;
            if h.out.pending() > 0 {
                f |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(h.fd.as_fd(), f));
            srcs.push(Src::Helper(i));
        }
        if let Some(h) = &self.holder {
            if let Some(s) = &h.status {
                fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
                srcs.push(Src::HolderStatus);
            }
            if h.control_out.pending() > 0 {
                fds.push(PollFd::new(h.control.as_fd(), PollFlags::POLLOUT));
                srcs.push(Src::HolderControl);
            }
        }
        let relay = self.relaying();
        for (rank, slot) in &self.ranks {
            if relay {
                if let (Some(fd), None) = (&slot.stdout, slot.stdout_flow.hold_until) {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                    srcs.push(Src::Out(*rank, Channel::Stdout));
                }
                if let (Some(fd), None) = (&slot.stderr, slot.stderr_flow.hold_until) {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                    srcs.push(Src::Out(*rank, Channel::Stderr));
                }
            }
            if let Some(fd) = &slot.stdin {
                if slot.stdin_queue.pending() > 0 {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLOUT));
                    srcs.push(Src::In(*rank));
                }
            }
            if let Some(fd) = &slot.cr {
                let mut f = PollFlags::POLLIN;
                if slot.cr_out.pending() > 0 {
                    f |= PollFlags::POLLOUT;
                }
                fds.push(PollFd::new(fd.as_fd(), f));
                srcs.push(Src::Cr(*rank));
            }
        }
        let deadline = match (self.kill_at, hold) {
            (Some(k), Some(h)) => Some(k.min(h)),
            (k, h) => k.or(h),
        };
        let ready = crate::event::ready_by(&mut fds, &srcs, deadline)?;
        drop(fds);
        for (src, revents) in ready {
            match src {
                Src::Signals => self.on_signals(),
                Src::Launcher => {
                    if revents.contains(PollFlags::POLLOUT) {
                        self.flush_link().map_err(DaemonError::Launcher)?;
                    }
                    if revents
                        .intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                    {
                        self.on_launcher()?;
                    }
                }
                Src::Listener => self.accept(),
                Src::Helper(i) => self.on_helper(i),
                Src::HolderStatus => self.on_holder_status(),
                Src::HolderControl => {
                    if let Some(h) = &mut self.holder {
                        let _ = h.control_out.flush(h.control.as_fd());
                    }
                }
                Src::Out(rank, ch) => self.relay(rank, ch, false),
                Src::In(rank) => self.write_stdin(rank),
                Src::Cr(rank) => self.on_rank_socket(rank),
            }
        }
        self.helpers
            .retain(|h| !h.reader.at_eof() || h.out.pending() > 0);
        if let Some(at) = self.kill_at {
            if Instant::now() >= at {
                self.kill_at = None;
                self.kill_ranks();
            }
        }
        self.report_exits();
        let _ = self.flush_link();
        Ok(())
    }

    fn on_signals(&mut self) {
        let mut buf = [0u8; 64];
        while let Ok(n) = nix::unistd::read(self.signals.as_fd(), &mut buf) {
            if n == 0 {
                break;
            }
            for &sig in &buf[..n] {
                if i32::from(sig) != libc::SIGCHLD {
                    // lamd runs in its own session; a signal here is an admin's: end the job.
                    self.kill_ranks();
                    self.shutdown = true;
                }
            }
        }
    }

    fn on_launcher(&mut self) -> Result<(), DaemonError> {
        self.launcher
            .reader
            .fill(self.launcher.fd.as_fd())
            .map_err(DaemonError::Launcher)?;
        loop {
            let frame = match self.launcher.reader.next_frame_ref::<ToDaemon>() {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(WireError::Closed) => return Ok(()),
                Err(e) => {
                    eprintln!("lamd: node {}: bad frame from the launcher: {e}", self.node);
                    self.kill_ranks();
                    self.shutdown = true;
                    return Ok(());
                }
            };
            match frame {
                FrameRef::Data {
                    rank,
                    channel: Channel::Stdin,
                    bytes,
                } => {
                    // Bytes nobody will read are acknowledged at once, so the launcher's
                    // window stays open.
                    let done = match self.ranks.get_mut(&rank) {
                        Some(slot) => slot.take_stdin(bytes),
                        None => bytes.len(),
                    };
                    if done > 0 {
                        self.launcher
                            .out
                            .push(&FromDaemon::StdinAck { bytes: done as u64 });
                    }
                }
                FrameRef::Data { .. } => {}
                FrameRef::Message(msg) => self.on_launcher_message(msg),
            }
        }
    }

    fn on_launcher_message(&mut self, msg: ToDaemon) {
        if !self.launcher.greeted {
            match check_hello(&msg, &self.job_id) {
                Ok(()) => {
                    self.launcher.greeted = true;
                    self.launcher.out.push(&FromDaemon::Hello {
                        version: PROTOCOL_VERSION,
                        node: self.node,
                        pid: std::process::id(),
                    });
                }
                Err(reason) => {
                    self.launcher.out.push(&FromDaemon::Refused { reason });
                    self.shutdown = true;
                }
            }
            return;
        }
        match msg {
            ToDaemon::Launch { ranks } => {
                if let Err(e) = self.launch(ranks) {
                    self.launcher.out.push(&FromDaemon::StartFailed {
                        reason: crate::error_chain(&e),
                    });
                }
            }
            ToDaemon::Restore {
                epoch_dir,
                image,
                ranks,
                verify,
            } => match self.restore(&epoch_dir, image, ranks, verify) {
                Ok(()) => self.report_started_if_ready(),
                Err(e) => {
                    self.launcher.out.push(&FromDaemon::StartFailed {
                        reason: crate::error_chain(&e),
                    });
                    // Nothing of this node runs: its ranks are over (as killed) for the launcher.
                    for slot in self.ranks.values_mut() {
                        slot.status.get_or_insert(ExitStatus::Signal(libc::SIGKILL));
                    }
                }
            },
            ToDaemon::StdinEof { rank } => {
                if let Some(slot) = self.ranks.get_mut(&rank) {
                    slot.stdin_eof = true;
                    if slot.stdin_queue.pending() == 0 {
                        slot.close_stdin();
                    }
                }
            }
            ToDaemon::Signal { signal } => self.send_holder(HolderCommand::Signal { signal }),
            ToDaemon::Terminate { grace_ms } => {
                self.send_holder(HolderCommand::Signal {
                    signal: libc::SIGTERM,
                });
                // SIGTERM may be ignored by a stopped rank; wake it so it can act on it.
                self.send_holder(HolderCommand::Signal {
                    signal: libc::SIGCONT,
                });
                if self.kill_at.is_none() {
                    self.kill_at = Some(Instant::now() + Duration::from_millis(grace_ms));
                }
            }
            ToDaemon::Kill => self.kill_ranks(),
            ToDaemon::Continue => {
                if let Some(h) = &self.holder {
                    continue_tree(h.pid);
                }
                // Callbacks held by the `stop` checkpoint learn it was not kept.
                let held = std::mem::take(&mut self.cr_held);
                self.resume_ranks(&held, Resumed::Cancelled);
            }
            ToDaemon::Shutdown => self.shutdown = true,
            ToDaemon::Hello { .. } | ToDaemon::Checkpoint { .. } => {
                self.launcher.out.push(&FromDaemon::Refused {
                    reason: "unexpected message".into(),
                })
            }
        }
    }

    fn send_holder(&mut self, cmd: HolderCommand) {
        if let Some(h) = &mut self.holder {
            h.control_out.push(&cmd);
            let _ = h.control_out.flush(h.control.as_fd());
        }
    }

    /// Kills every rank now: the holder's namespace goes with it.
    fn kill_ranks(&mut self) {
        self.send_holder(HolderCommand::Kill);
        if let Some(h) = &self.holder {
            if h.pid_namespace {
                let _ = kill(h.pid, Signal::SIGKILL);
            }
        }
    }

    fn wait_holder_gone(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.holder.is_some() && Instant::now() < deadline {
            self.reap();
            if self.holder.is_none() {
                break;
            }
            let mut fds = [PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(100u8));
            let mut buf = [0u8; 64];
            let _ = nix::unistd::read(self.signals.as_fd(), &mut buf);
        }
        let _ = self
            .launcher
            .out
            .flush_blocking(self.launcher.fd.as_fd(), 2000);
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            let fd: OwnedFd = stream.into();
            if nonblocking(fd.as_fd()).is_ok() {
                self.helpers.push(Peer {
                    fd,
                    reader: FrameReader::new(),
                    out: Outbox::default(),
                    greeted: false,
                    role: Role::Helper,
                });
            }
        }
    }

    fn on_helper(&mut self, i: usize) {
        let h = &mut self.helpers[i];
        let _ = h.out.flush(h.fd.as_fd());
        if h.reader.fill(h.fd.as_fd()).is_err() {
            self.helpers[i].out = Outbox::default();
            return;
        }
        loop {
            let msg = match self.helpers[i].reader.next_frame::<ToDaemon>() {
                Ok(Some(crate::schema::wire::Frame::Message(m))) => m,
                Ok(Some(_)) => continue,
                Ok(None) => return,
                Err(_) => {
                    // A malformed frame: drop this connection, the job is unaffected.
                    let _ = nix::sys::socket::shutdown(
                        self.helpers[i].fd.as_raw_fd(),
                        nix::sys::socket::Shutdown::Both,
                    );
                    self.helpers[i].out = Outbox::default();
                    return;
                }
            };
            if !self.helpers[i].greeted {
                let reply = match check_hello(&msg, &self.job_id) {
                    Ok(()) => {
                        self.helpers[i].greeted = true;
                        FromDaemon::Hello {
                            version: PROTOCOL_VERSION,
                            node: self.node,
                            pid: std::process::id(),
                        }
                    }
                    Err(reason) => FromDaemon::Refused { reason },
                };
                let h = &mut self.helpers[i];
                h.out.push(&reply);
                let _ = h.out.flush(h.fd.as_fd());
                continue;
            }
            let reply = match msg {
                ToDaemon::Checkpoint {
                    epoch,
                    epoch_dir,
                    stop,
                    engine,
                    callback_timeout_ms,
                } => match self.checkpoint(
                    epoch,
                    &epoch_dir,
                    stop,
                    engine,
                    Duration::from_millis(callback_timeout_ms),
                ) {
                    Ok((image, files, dump_ms)) => FromDaemon::Checkpointed {
                        image,
                        files,
                        dump_ms,
                    },
                    Err(e) => FromDaemon::CheckpointFailed {
                        reason: crate::error_chain(&e),
                    },
                },
                _ => FromDaemon::Refused {
                    reason: "a helper may only order checkpoints".into(),
                },
            };
            let h = &mut self.helpers[i];
            debug_assert_eq!(h.role, Role::Helper);
            h.out.push(&reply);
            let _ = h.out.flush_blocking(h.fd.as_fd(), 5000);
        }
    }

    fn on_holder_status(&mut self) {
        let Some(h) = &mut self.holder else { return };
        let Some(fd) = &h.status else { return };
        let open = h.status_reader.fill(fd.as_fd()).unwrap_or(false);
        let mut events = Vec::new();
        while let Ok(Some(crate::schema::wire::Frame::Message(ev))) =
            h.status_reader.next_frame::<HolderEvent>()
        {
            events.push(ev);
        }
        if !open {
            h.status = None;
        }
        for ev in events {
            self.on_holder_event(ev);
        }
    }

    fn on_holder_event(&mut self, ev: HolderEvent) {
        match ev {
            HolderEvent::Spawned { rank, pid } => {
                self.spawned.push((rank, pid as u32));
                self.report_started_if_ready();
            }
            HolderEvent::SpawnFailed { rank, errno } => {
                let err = std::io::Error::from_raw_os_error(errno);
                let program = self
                    .ranks
                    .get(&rank)
                    .map(|s| s.spec.argv[0].clone())
                    .unwrap_or_default();
                self.launcher.out.push(&FromDaemon::StartFailed {
                    reason: format!("rank {rank}: cannot execute {program}: {err}"),
                });
                self.spawned.push((rank, 0));
            }
            HolderEvent::Exited { rank, status } => {
                if let Some(slot) = self.ranks.get_mut(&rank) {
                    slot.status.get_or_insert(status);
                }
                // Everything the rank wrote before exiting is in its pipes now: forward it first.
                self.relay(rank, Channel::Stdout, true);
                self.relay(rank, Channel::Stderr, true);
            }
        }
    }

    fn report_started_if_ready(&mut self) {
        if !self.started_reported
            && (self.spawned.len() >= self.expect_spawns || self.holder.is_none())
        {
            self.started_reported = true;
            let pids = std::mem::take(&mut self.spawned);
            self.launcher.out.push(&FromDaemon::Started { pids });
        }
    }

    fn write_stdin(&mut self, rank: Rank) {
        let Some(slot) = self.ranks.get_mut(&rank) else {
            return;
        };
        let written = slot.flush_stdin();
        if written > 0 {
            self.launcher.out.push(&FromDaemon::StdinAck {
                bytes: written as u64,
            });
        }
    }

    /// Sends `RankExited` for ranks whose status is known and whose output has been queued.
    fn report_exits(&mut self) {
        for (rank, slot) in self.ranks.iter_mut() {
            if let (Some(status), false) = (slot.status, slot.reported) {
                slot.reported = true;
                // What the rank never read is done with: acknowledged, or the launcher's window
                // for this node would stay spent (a child of the rank may hold the pipe open).
                let dropped = slot.stdin_queue.pending();
                slot.close_stdin();
                if dropped > 0 {
                    self.launcher.out.push(&FromDaemon::StdinAck {
                        bytes: dropped as u64,
                    });
                }
                self.launcher.out.push(&FromDaemon::RankExited {
                    rank: *rank,
                    status,
                });
            }
        }
    }

    fn reap(&mut self) {
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _)) => {
                    if self.holder.as_ref().is_some_and(|h| h.pid == pid) {
                        self.holder_gone();
                    }
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }

    /// The holder exited: read its last events, then account for ranks it never reported.
    fn holder_gone(&mut self) {
        let mut events = Vec::new();
        if let Some(mut h) = self.holder.take() {
            if let Some(fd) = h.status.take() {
                // Every writer is gone, so this ends in EOF; the bound guards against surprises.
                for _ in 0..1024 {
                    if !h.status_reader.fill(fd.as_fd()).unwrap_or(false) {
                        break;
                    }
                }
            }
            while let Ok(Some(crate::schema::wire::Frame::Message(ev))) =
                h.status_reader.next_frame::<HolderEvent>()
            {
                events.push(ev);
            }
        }
        for ev in events {
            self.on_holder_event(ev);
        }
        let lost: Vec<Rank> = self
            .ranks
            .iter()
            .filter(|(_, s)| s.status.is_none())
            .map(|(r, _)| *r)
            .collect();
        for rank in lost {
            if let Some(slot) = self.ranks.get_mut(&rank) {
                slot.status = Some(ExitStatus::Signal(libc::SIGKILL));
            }
            self.relay(rank, Channel::Stdout, true);
            self.relay(rank, Channel::Stderr, true);
        }
        self.report_started_if_ready();
    }
}

fn check_hello(msg: &ToDaemon, job_id: &JobId) -> Result<(), String> {
    match msg {
        ToDaemon::Hello {
            magic,
            version,
            job_id: j,
            ..
        } => {
            if *magic != MAGIC {
                Err("not a lamcr peer".into())
            } else if *version != PROTOCOL_VERSION {
                Err(format!(
                    "protocol version {version} is not {PROTOCOL_VERSION}"
                ))
            } else if j != job_id {
                Err(format!("this daemon serves job {job_id}, not {j}"))
            } else {
                Ok(())
            }
        }
        _ => Err("expected a hello".into()),
    }
}

impl Slot {
    pub(crate) fn new(spec: RankSpec) -> Self {
        Slot {
            spec,
            stdin: None,
            stdin_queue: Outbox::default(),
            stdin_eof: false,
            stdin_closed: false,
            stdout: None,
            stderr: None,
            stdin_pipe: None,
            stdout_pipe: 0,
            stderr_pipe: 0,
            stdout_bytes: 0,
            stderr_bytes: 0,
            stdout_flow: relay::Flow::default(),
            stderr_flow: relay::Flow::default(),
            status: None,
            reported: false,
            cr: None,
            cr_reader: FrameReader::new(),
            cr_out: Outbox::default(),
            cr_socket: 0,
            cr_enabled: false,
            cr_mark: RankCr::Unaware,
            state: None,
        }
    }
}

impl Slot {
    /// Takes stdin bytes from the launcher for this rank. They go into the rank's pipe now when
    /// nothing is queued before them, and wait in the queue otherwise. Returns how many bytes are
    /// done with: written, or dropped because the rank will never read them.
    fn take_stdin(&mut self, bytes: &[u8]) -> usize {
        let Some(fd) = &self.stdin else {
            return bytes.len();
        };
        if self.stdin_queue.pending() > 0 {
            self.stdin_queue.buf().extend_from_slice(bytes);
            return 0;
        }
        let written = loop {
            match nix::unistd::write(fd.as_fd(), bytes) {
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break 0,
                Err(_) => {
                    self.close_stdin();
                    return bytes.len();
                }
            }
        };
        self.stdin_queue.buf().extend_from_slice(&bytes[written..]);
        written
    }

    /// Writes queued stdin bytes the pipe now takes; closes the pipe once the launcher's EOF
    /// has come and nothing is left. Returns how many bytes are done with.
    fn flush_stdin(&mut self) -> usize {
        let Some(fd) = &self.stdin else {
            return 0;
        };
        let before = self.stdin_queue.pending();
        let done = match self.stdin_queue.flush(fd.as_fd()) {
            Ok(_) => before - self.stdin_queue.pending(),
            Err(_) => {
                // The rank closed its stdin: what it will never read is dropped.
                self.close_stdin();
                before
            }
        };
        if self.stdin_queue.pending() == 0 && self.stdin_eof {
            self.close_stdin();
        }
        done
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
        self.stdin_queue = Outbox::default();
        self.stdin_closed = true;
    }

    /// A rank's output stream: lamd's read end, its byte count and its relay state.
    pub(crate) fn stream(
        &mut self,
        channel: Channel,
    ) -> Option<(&mut Option<OwnedFd>, &mut u64, &mut relay::Flow)> {
        match channel {
            Channel::Stdout => Some((
                &mut self.stdout,
                &mut self.stdout_bytes,
                &mut self.stdout_flow,
            )),
            Channel::Stderr => Some((
                &mut self.stderr,
                &mut self.stderr_bytes,
                &mut self.stderr_flow,
            )),
            Channel::Stdin => None,
        }
    }

    /// A rank that had exited when the checkpoint being restored was taken: the launcher has
    /// its status already, and its output counts stand at the epoch's.
    pub(crate) fn ended_before(
        &mut self,
        status: ExitStatus,
        stdout_bytes: u64,
        stderr_bytes: u64,
    ) {
        self.status = Some(status);
        self.reported = true;
        self.stdout_bytes = stdout_bytes;
        self.stderr_bytes = stderr_bytes;
    }
}

/// Sends SIGCONT to a process and all its descendants (after a `stop` checkpoint that was not
/// committed). The holder is stopped too, so it cannot forward the signal itself.
fn continue_tree(pid: Pid) {
    let _ = kill(pid, Signal::SIGCONT);
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
        continue_tree(Pid::from_raw(child));
    }
}
