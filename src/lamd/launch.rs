//! lamd's `Launch` verb: make the ranks' pipes, fork the holder with the ranks to start.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, fcntl};

use super::holder::{CONTROL_FD, HolderRank, STATUS_FD};
use super::{Daemon, DaemonError, Holder, Slot, cloexec_pipe, nonblocking, socketpair_for_child};
use crate::schema::RankSpec;
use crate::sys::{Forked, SpawnSpec, fork_in_place, inode_of};

/// Rank stdout pipes are enlarged up to this size, so a fast writer makes fewer round trips
/// through lamd. stderr pipes keep the default size, and so do stdin pipes: what a rank has not
/// read from its stdin pipe when it is checkpointed is not in the image (§8 of the design)...
const PIPE_SIZE_MAX: usize = 1 << 20;
/// ...as long as all of a node's enlarged pipes together stay within this. An unprivileged
/// user's pipes share one budget (`/proc/sys/fs/pipe-user-pages-soft`, 64 MiB by default); once
/// it is spent, enlarging fails and every new pipe of that user, in the job or not, gets two
/// pages. It also bounds what full pipes can pin in the kernel while a console is slow.
const PIPE_BUDGET: usize = 32 << 20;
/// The default size, below which nothing is shrunk.
pub(super) const PIPE_SIZE_DEFAULT: usize = 64 << 10;

/// The size to enlarge each of a node's `pipes` rank pipes to, or `None` to leave them at the
/// default: an equal share of [`PIPE_BUDGET`], a power of two, at most [`PIPE_SIZE_MAX`].
pub(super) fn pipe_size(pipes: usize) -> Option<i32> {
    let share = (PIPE_BUDGET / pipes.max(1)).min(PIPE_SIZE_MAX);
    let size = 1usize << share.ilog2();
    (size > PIPE_SIZE_DEFAULT).then_some(size as i32)
}

/// Enlarges a rank pipe (through its write end) to `size`, if given; a refusal (the user's pipe
/// budget) leaves it as it is. Returns the pipe's capacity.
pub(super) fn enlarge(w: &OwnedFd, size: Option<i32>) -> usize {
    if let Some(size) = size {
        let _ = fcntl(w, FcntlArg::F_SETPIPE_SZ(size));
    }
    capacity(w)
}

/// A pipe's capacity in bytes.
pub(super) fn capacity(pipe: &OwnedFd) -> usize {
    fcntl(pipe, FcntlArg::F_GETPIPE_SZ).map_or(PIPE_SIZE_DEFAULT, |c| c as usize)
}

/// First holder-side fd number for rank stdio ends.
const FIRST_RANK_FD: RawFd = 10;

/// Where a rank's callback socket is in the rank.
pub const CR_FD: RawFd = 3;
/// Where a `self`-engine restart puts the rank's saved state.
pub const STATE_FD: RawFd = 4;

/// A rank to start: fresh, or (`self` engine) restarted with the state it saved.
pub(crate) struct Launching {
    pub spec: RankSpec,
    /// The saved state (read-only) and the epoch directory it comes from.
    pub state: Option<(OwnedFd, String)>,
}

impl Daemon {
    pub(super) fn launch(&mut self, ranks: Vec<RankSpec>) -> Result<(), DaemonError> {
        if !self.ranks.is_empty() {
            return Err(DaemonError::Io(std::io::Error::other(
                "ranks already launched",
            )));
        }
        self.launch_ranks(
            ranks
                .into_iter()
                .map(|spec| Launching { spec, state: None })
                .collect(),
        )
    }

    /// Starts the holder with `ranks`. Slots already present (ranks that had ended before a
    /// restart's checkpoint) stay as they are.
    pub(crate) fn launch_ranks(&mut self, ranks: Vec<Launching>) -> Result<(), DaemonError> {
        if self.holder.is_some() {
            return Err(DaemonError::Io(std::io::Error::other(
                "ranks already launched",
            )));
        }
        if ranks.is_empty() {
            self.expect_spawns = 0;
            return Ok(());
        }
        let mut child_ends: Vec<OwnedFd> = Vec::new();
        let mut fd_map: Vec<(RawFd, RawFd)> = Vec::new();
        let size = pipe_size(ranks.len());
        let mut holder_ranks = Vec::new();
        let mut next_fd = FIRST_RANK_FD;
        let mut alloc = |fd: &OwnedFd, map: &mut Vec<(RawFd, RawFd)>| {
            let n = next_fd;
            next_fd += 1;
            map.push((fd.as_raw_fd(), n));
            n
        };
        for Launching { spec, state } in ranks {
            let mut slot = Slot::new(spec.clone());
            let (out_r, out_w) = cloexec_pipe()?;
            let (err_r, err_w) = cloexec_pipe()?;
            slot.stdout_flow.capacity = enlarge(&out_w, size);
            slot.stderr_flow.capacity = capacity(&err_w);
            nonblocking(out_r.as_fd())?;
            nonblocking(err_r.as_fd())?;
            slot.stdout_pipe = inode_of(out_r.as_fd())?;
            slot.stderr_pipe = inode_of(err_r.as_fd())?;
            let stdout_fd = alloc(&out_w, &mut fd_map);
            let stderr_fd = alloc(&err_w, &mut fd_map);
            let stdin_fd = if spec.stdin {
                let (in_r, in_w) = cloexec_pipe()?;
                nonblocking(in_w.as_fd())?;
                slot.stdin_pipe = Some(inode_of(in_r.as_fd())?);
                let n = alloc(&in_r, &mut fd_map);
                child_ends.push(in_r);
                slot.stdin = Some(in_w);
                Some(n)
            } else {
                None
            };
            let (cr_ours, cr_theirs) = socketpair_for_child()?;
            slot.cr_socket = inode_of(cr_theirs.as_fd())?;
            let mut env = spec.env.clone();
            env.push((crate::cr::ENV_FD.into(), CR_FD.to_string()));
            let mut extra_fds = vec![(alloc(&cr_theirs, &mut fd_map), CR_FD)];
            child_ends.push(cr_theirs);
            slot.cr = Some(cr_ours);
            if let Some((fd, epoch_dir)) = state {
                extra_fds.push((alloc(&fd, &mut fd_map), STATE_FD));
                env.push((crate::cr::ENV_RESTART.into(), epoch_dir));
                env.push((crate::cr::ENV_STATE_FD.into(), STATE_FD.to_string()));
                child_ends.push(fd);
            }
            child_ends.push(out_w);
            child_ends.push(err_w);
            slot.stdout = Some(out_r);
            slot.stderr = Some(err_r);
            holder_ranks.push(HolderRank {
                rank: spec.rank,
                program: spec.program.clone(),
                argv: spec.argv.clone(),
                env,
                cwd: spec.cwd.clone(),
                stdin_fd,
                stdout_fd,
                stderr_fd,
                extra_fds,
            });
            self.ranks.insert(spec.rank, slot);
        }
        let (ctl_r, ctl_w) = cloexec_pipe()?;
        let (st_r, st_w) = cloexec_pipe()?;
        let devnull = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        fd_map.push((ctl_r.as_raw_fd(), CONTROL_FD));
        fd_map.push((st_w.as_raw_fd(), STATUS_FD));
        for std_fd in 0..3 {
            fd_map.push((devnull.as_raw_fd(), std_fd));
        }
        let expect_spawns = holder_ranks.len();
        let (pid, pid_namespace, holder_ranks) = start_holder(&fd_map, holder_ranks)?;
        drop((ctl_r, st_w, child_ends, devnull));
        self.expect_spawns = expect_spawns;
        let mut holder = Holder::new(pid, ctl_w, st_r, pid_namespace)?;
        holder.specs = holder_ranks;
        self.holder = Some(holder);
        Ok(())
    }
}

/// Forks the holder as the init of a new PID namespace, or, where that is not permitted
/// (unprivileged users), as a plain child that is a subreaper. The child runs `holder::main` with
/// `ranks` and never returns here; lamd gets `ranks` back, to keep while the holder lives.
fn start_holder(
    fds: &[(RawFd, RawFd)],
    ranks: Vec<HolderRank>,
) -> Result<(nix::unistd::Pid, bool, Vec<HolderRank>), DaemonError> {
    // As a namespace init, the holder dies with lamd and the kernel kills the whole namespace.
    // Without one that would orphan the ranks: the holder outlives lamd instead, sees its
    // control pipe close, and kills them itself.
    let spec = |pid_namespace: bool| SpawnSpec {
        fds: fds.to_vec(),
        cwd: Some("/".into()),
        setsid: true,
        parent_death_signal: pid_namespace.then_some(libc::SIGKILL),
        close_stdio: true,
        ..Default::default()
    };
    let mut pid_namespace = std::env::var_os("LAMCR_NO_PIDNS").is_none();
    let forked = match fork_in_place(&spec(pid_namespace), pid_namespace) {
        Err(e)
            if pid_namespace
                && matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EINVAL)) =>
        {
            pid_namespace = false;
            fork_in_place(&spec(false), false)?
        }
        other => other?,
    };
    match forked {
        Forked::Parent(pid) => Ok((pid, pid_namespace, ranks)),
        Forked::Child => super::holder::main(ranks),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_pipes_share_one_budget() {
        assert_eq!(pipe_size(1), Some(1 << 20));
        assert_eq!(pipe_size(32), Some(1 << 20));
        assert_eq!(pipe_size(33), Some(512 << 10));
        assert_eq!(pipe_size(128), Some(256 << 10));
        assert_eq!(pipe_size(256), Some(128 << 10));
        assert_eq!(pipe_size(512), None, "the default size is left alone");
        for n in 1..5000 {
            if let Some(size) = pipe_size(n) {
                assert!(n * size as usize <= PIPE_BUDGET, "{n} pipes of {size}");
                assert!((size as usize).is_power_of_two());
            }
        }
    }
}
