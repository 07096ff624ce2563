//! lamd's `Launch` verb: make the ranks' pipes, start the holder, hand it the ranks.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, fcntl};

use super::holder::{CONTROL_FD, HolderCommand, HolderRank, STATUS_FD};
use super::{Daemon, DaemonError, Holder, Slot, cloexec_pipe, nonblocking};
use crate::schema::RankSpec;
use crate::sys::{SpawnSpec, inode_of, spawn};

/// Rank pipes are enlarged to this size, so a fast writer makes fewer round trips through lamd.
const PIPE_SIZE: i32 = 1 << 20;
/// First holder-side fd number for rank stdio ends.
const FIRST_RANK_FD: RawFd = 10;

impl Daemon {
    pub(super) fn launch(&mut self, ranks: Vec<RankSpec>) -> Result<(), DaemonError> {
        if self.holder.is_some() || !self.ranks.is_empty() {
            return Err(DaemonError::Io(std::io::Error::other(
                "ranks already launched",
            )));
        }
        let mut child_ends: Vec<OwnedFd> = Vec::new();
        let mut fd_map: Vec<(RawFd, RawFd)> = Vec::new();
        let mut holder_ranks = Vec::new();
        let mut next_fd = FIRST_RANK_FD;
        let mut alloc = |fd: &OwnedFd, map: &mut Vec<(RawFd, RawFd)>| {
            let n = next_fd;
            next_fd += 1;
            map.push((fd.as_raw_fd(), n));
            n
        };
        for spec in ranks {
            let mut slot = Slot::new(spec.clone());
            let (out_r, out_w) = cloexec_pipe()?;
            let (err_r, err_w) = cloexec_pipe()?;
            let _ = fcntl(&out_w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
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
            child_ends.push(out_w);
            child_ends.push(err_w);
            slot.stdout = Some(out_r);
            slot.stderr = Some(err_r);
            holder_ranks.push(HolderRank {
                rank: spec.rank,
                program: spec.program.clone(),
                argv: spec.argv.clone(),
                env: spec.env.clone(),
                cwd: spec.cwd.clone(),
                stdin_fd,
                stdout_fd,
                stderr_fd,
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
        let (pid, pid_namespace) = start_holder(&fd_map)?;
        drop((ctl_r, st_w, child_ends, devnull));
        let mut holder = Holder::new(pid, ctl_w, st_r, pid_namespace)?;
        self.expect_spawns = holder_ranks.len();
        holder.control_out.push(&HolderCommand::Spawn {
            ranks: holder_ranks,
        });
        let _ = holder.control_out.flush(holder.control.as_fd());
        self.holder = Some(holder);
        Ok(())
    }
}

/// Starts `lamcr holder` as the init of a new PID namespace, or, where that is not permitted
/// (unprivileged users), as a plain child that is a subreaper.
fn start_holder(fds: &[(RawFd, RawFd)]) -> Result<(nix::unistd::Pid, bool), DaemonError> {
    let mut spec = SpawnSpec {
        program: "/proc/self/exe".into(),
        argv: vec!["lamcr".into(), "holder".into()],
        env: std::env::vars_os()
            .filter(|(k, _)| k == "PATH" || k == "LAMCR_RUN_DIR")
            .collect(),
        fds: fds.to_vec(),
        cwd: Some("/".into()),
        new_pid_namespace: std::env::var_os("LAMCR_NO_PIDNS").is_none(),
        setsid: true,
        parent_death_signal: Some(libc::SIGKILL),
        close_stdio: true,
    };
    match spawn(&spec) {
        Ok(pid) => Ok((pid, spec.new_pid_namespace)),
        Err(e)
            if spec.new_pid_namespace
                && matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EINVAL)) =>
        {
            spec.new_pid_namespace = false;
            Ok((spawn(&spec)?, false))
        }
        Err(e) => Err(e.into()),
    }
}
