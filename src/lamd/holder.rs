//! The holder: one small process per job per node that forks the node's ranks and reaps them.
//!
//! lamd forks it without exec (`sys::fork_in_place`; it shows as `lamcr holder`) as the init of a
//! fresh PID namespace when it can (root), as a session leader inside that namespace, with its
//! stdio on /dev/null. It starts with the ranks to spawn in memory. It is the root of the tree
//! CRIU dumps: ranks that may share memory are dumped together, restored pids can never collide
//! with pids in use, and a SIGKILL to the holder takes every rank with it.
//!
//! Fds: 3 = control pipe from lamd (commands), 4 = status pipe to lamd (events). Both are
//! replaced by fresh pipes when CRIU restores the holder under a new lamd. The ranks' stdio pipe
//! ends are at the fds named in their `HolderRank`s; each rank's are closed here once it runs.
//!
//! The holder never outlives lamd: EOF on the control pipe kills the ranks and ends the holder
//! (and with a PID namespace the kernel also kills everything when the holder dies).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd, RawFd};

use bincode::{Decode, Encode};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::schema::wire::{Frame, FrameReader, Outbox};
use crate::schema::{ExitStatus, Rank};
use crate::sys::{SpawnSpec, Spawner};

pub const CONTROL_FD: RawFd = 3;
pub const STATUS_FD: RawFd = 4;

/// One rank to start, with the holder-side fd numbers of its stdio pipe ends.
#[derive(Debug, Clone)]
pub struct HolderRank {
    pub rank: Rank,
    pub program: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// None: /dev/null.
    pub stdin_fd: Option<RawFd>,
    pub stdout_fd: RawFd,
    pub stderr_fd: RawFd,
    /// More `(holder fd, rank fd)` pairs: the callback socket, a restarted rank's saved state.
    pub extra_fds: Vec<(RawFd, RawFd)>,
}

/// lamd -> holder.
#[derive(Debug, Clone, Encode, Decode)]
pub enum HolderCommand {
    Signal { signal: i32 },
    Kill,
}

/// holder -> lamd.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum HolderEvent {
    Spawned { rank: Rank, pid: i32 },
    SpawnFailed { rank: Rank, errno: i32 },
    Exited { rank: Rank, status: ExitStatus },
}

/// Runs the holder in the child lamd has just forked (see `sys::fork_in_place`), starting
/// `ranks` at once. Never returns.
pub fn main(ranks: Vec<HolderRank>) -> ! {
    // A panic must end the holder here: unwinding would return into lamd's code in the child.
    let code = match std::panic::catch_unwind(|| run(ranks)) {
        Ok(Ok(())) => 0,
        Ok(Err(_)) => 1,
        Err(_) => 101,
    };
    std::process::exit(code)
}

fn run(ranks: Vec<HolderRank>) -> std::io::Result<()> {
    // No exec happened: without these, `ps` would show it as lamd.
    let _ = nix::sys::prctl::set_name(c"lamcr-holder");
    let _ = crate::sys::set_cmdline(&["lamcr", "holder"]);
    // SAFETY-free: these fds were mapped by lamd; taking ownership is the holder's contract.
    let control = own_fd(CONTROL_FD);
    let status = own_fd(STATUS_FD);
    nix::fcntl::fcntl(
        &status,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    nix::fcntl::fcntl(
        &control,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    if nix::unistd::getpid().as_raw() != 1 {
        // Not a namespace init: still be the reaper of the ranks' orphans.
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }
    // SIGCHLD arrives on a signalfd: the holder is a fork of lamd, whose handlers it must not
    // run (the fork reset them); the ranks unblock it before they exec.
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    chld.thread_block()?;
    let sig = SignalFd::with_flags(&chld, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
    crate::sys::ignore_sigpipe();

    let mut reader = FrameReader::new();
    let mut out = Outbox::default();
    let mut live: BTreeMap<i32, Rank> = BTreeMap::new();
    spawn_ranks(&ranks, &mut live, &mut out);
    // Not freed: their pages are shared with lamd, and freeing would copy each (copy-on-write)
    // while the ranks start. They go with this process.
    std::mem::forget(ranks);
    let mut control_open = true;
    loop {
        reap(&mut live, &mut out);
        if live.is_empty() && out.pending() == 0 {
            return Ok(());
        }
        if !control_open {
            for pid in live.keys() {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            if live.is_empty() {
                return Ok(());
            }
        }
        let mut fds = vec![PollFd::new(sig.as_fd(), PollFlags::POLLIN)];
        if control_open {
            fds.push(PollFd::new(control.as_fd(), PollFlags::POLLIN));
        }
        let want_out = out.pending() > 0;
        if want_out {
            fds.push(PollFd::new(status.as_fd(), PollFlags::POLLOUT));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        while let Ok(Some(_)) = sig.read_signal() {}
        if control_open {
            match reader.fill(control.as_fd()) {
                Ok(true) => {}
                Ok(false) | Err(_) => control_open = false,
            }
            while let Ok(Some(Frame::Message(cmd))) = reader.next_frame::<HolderCommand>() {
                match cmd {
                    HolderCommand::Signal { signal } => {
                        for pid in live.keys() {
                            let _ = nix::sys::signal::kill(
                                Pid::from_raw(*pid),
                                Signal::try_from(signal).ok(),
                            );
                        }
                    }
                    HolderCommand::Kill => {
                        for pid in live.keys() {
                            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
                        }
                    }
                }
            }
        }
        if out.pending() > 0 && out.flush(status.as_fd()).is_err() {
            // lamd is gone: nobody can report our ranks any more.
            control_open = false;
        }
    }
}

fn own_fd(fd: RawFd) -> OwnedFd {
    crate::sys::take_inherited_fd(fd)
}

fn spawn_ranks(ranks: &[HolderRank], live: &mut BTreeMap<i32, Rank>, out: &mut Outbox) {
    let devnull = std::fs::File::open("/dev/null").ok();
    let mut spawner = Spawner::new();
    // Each child execs on its own while the next is made; whether it could is known once all
    // have been started.
    let mut started = Vec::with_capacity(ranks.len());
    for r in ranks {
        let stdin = r
            .stdin_fd
            .or_else(|| devnull.as_ref().map(std::os::fd::AsRawFd::as_raw_fd));
        let mut fds = vec![(r.stdout_fd, 1), (r.stderr_fd, 2)];
        if let Some(fd) = stdin {
            fds.push((fd, 0));
        }
        fds.extend(r.extra_fds.iter().copied());
        let spec = SpawnSpec {
            program: r.program.clone().into(),
            argv: r.argv.iter().map(Into::into).collect(),
            env: r.env.iter().map(|(k, v)| (k.into(), v.into())).collect(),
            fds,
            cwd: Some(r.cwd.clone().into()),
            close_stdio: true,
            ..Default::default()
        };
        match spawner.start(&spec) {
            Ok(pid) => started.push((r.rank, pid)),
            Err(e) => spawn_failed(out, r.rank, &e),
        }
        // The rank holds its ends now (its fd table is its own from the clone on); lamd holds
        // the others. Ours must go, or EOF never comes; and at once, or every later child
        // inherits them only to close them.
        for fd in [r.stdin_fd, Some(r.stdout_fd), Some(r.stderr_fd)]
            .into_iter()
            .flatten()
            .chain(r.extra_fds.iter().map(|&(fd, _)| fd))
        {
            drop(own_fd(fd));
        }
    }
    // Every child has its own fd table by now.
    drop(devnull);
    let failed = spawner.settle();
    for (rank, pid) in started {
        match failed.iter().find(|(p, _)| *p == pid) {
            Some((_, e)) => spawn_failed(out, rank, e),
            None => {
                live.insert(pid.as_raw(), rank);
                out.push(&HolderEvent::Spawned {
                    rank,
                    pid: pid.as_raw(),
                });
            }
        }
    }
}

/// A rank that never ran: why, and its exit as the shell's 127.
fn spawn_failed(out: &mut Outbox, rank: Rank, e: &std::io::Error) {
    out.push(&HolderEvent::SpawnFailed {
        rank,
        errno: e.raw_os_error().unwrap_or(0),
    });
    out.push(&HolderEvent::Exited {
        rank,
        status: ExitStatus::Code(127),
    });
}

fn reap(live: &mut BTreeMap<i32, Rank>, out: &mut Outbox) {
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => report(live, out, pid, ExitStatus::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                report(live, out, pid, ExitStatus::Signal(sig as i32))
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

fn report(live: &mut BTreeMap<i32, Rank>, out: &mut Outbox, pid: Pid, status: ExitStatus) {
    if let Some(rank) = live.remove(&pid.as_raw()) {
        out.push(&HolderEvent::Exited { rank, status });
    }
}
