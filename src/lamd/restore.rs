//! lamd's `Restore` verb: bring a node's holder tree back with CRIU as this daemon's children.
//!
//! Fresh pipes replace the old ones: CRIU names each external pipe of the image by the inode it
//! had (`pipe:[INODE]`), and `inherit_fd` swaps in ours. criu runs as our child in swrk mode with
//! `rst_sibling`, so the restored holder is our child and `waitpid` sees real exit statuses.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{FcntlArg, fcntl};

use super::dump::{open_dir, tcp_wanted};
use super::{Daemon, DaemonError, Holder, Slot, cloexec_pipe, nonblocking};
use crate::engine::criu::{self, Common};
use crate::schema::{NodeImage, RankImage, RankSpec};

impl Daemon {
    pub(super) fn restore(
        &mut self,
        epoch_dir: &str,
        image: NodeImage,
        specs: Vec<RankSpec>,
    ) -> Result<(), DaemonError> {
        if self.holder.is_some() || !self.ranks.is_empty() {
            return Err(DaemonError::Io(std::io::Error::other(
                "ranks already running",
            )));
        }
        let mut inherit: Vec<(String, OwnedFd)> = Vec::new();
        for spec in specs {
            let rank = spec.rank;
            let mut slot = Slot::new(spec);
            match image.ranks.iter().find(|r| r.rank() == rank) {
                Some(RankImage::Running {
                    stdin_pipe,
                    stdin_closed,
                    stdout_pipe,
                    stderr_pipe,
                    stdout_bytes,
                    stderr_bytes,
                    ..
                }) => {
                    let (out_r, out_w) = cloexec_pipe()?;
                    let (err_r, err_w) = cloexec_pipe()?;
                    let _ = fcntl(&out_w, FcntlArg::F_SETPIPE_SZ(1 << 20));
                    nonblocking(out_r.as_fd())?;
                    nonblocking(err_r.as_fd())?;
                    slot.stdout_pipe = crate::sys::inode_of(out_r.as_fd())?;
                    slot.stderr_pipe = crate::sys::inode_of(err_r.as_fd())?;
                    inherit.push((format!("pipe:[{stdout_pipe}]"), out_w));
                    inherit.push((format!("pipe:[{stderr_pipe}]"), err_w));
                    slot.stdout = Some(out_r);
                    slot.stderr = Some(err_r);
                    slot.stdout_bytes = *stdout_bytes;
                    slot.stderr_bytes = *stderr_bytes;
                    if let Some(ino) = stdin_pipe {
                        let (in_r, in_w) = cloexec_pipe()?;
                        nonblocking(in_w.as_fd())?;
                        slot.stdin_pipe = Some(crate::sys::inode_of(in_r.as_fd())?);
                        inherit.push((format!("pipe:[{ino}]"), in_r));
                        if *stdin_closed {
                            slot.stdin_closed = true;
                        } else {
                            slot.stdin = Some(in_w);
                        }
                    }
                }
                Some(RankImage::Exited {
                    status,
                    stdout_bytes,
                    stderr_bytes,
                    ..
                }) => {
                    // Ended before the checkpoint: the launcher knows; nothing to restore.
                    slot.status = Some(*status);
                    slot.reported = true;
                    slot.stdout_bytes = *stdout_bytes;
                    slot.stderr_bytes = *stderr_bytes;
                }
                None => {
                    return Err(DaemonError::Io(std::io::Error::other(format!(
                        "rank {rank} is not in the node image"
                    ))));
                }
            }
            self.ranks.insert(rank, slot);
        }
        if image.images_dir.is_empty() {
            self.expect_spawns = 0;
            return Ok(());
        }
        let (ctl_r, ctl_w) = cloexec_pipe()?;
        let (st_r, st_w) = cloexec_pipe()?;
        inherit.push((format!("pipe:[{}]", image.control_pipe), ctl_r));
        inherit.push((format!("pipe:[{}]", image.status_pipe), st_w));

        let images_path = Path::new(epoch_dir).join(&image.images_dir);
        let images = open_dir(&images_path)?;
        let work = open_dir(&self.work_dir)?;
        let common = Common {
            images_dir: images.as_fd(),
            work_dir: work.as_fd(),
            log_file: "restore.log",
            tcp_established: tcp_wanted(),
        };
        let borrowed: Vec<(String, BorrowedFd<'_>)> = inherit
            .iter()
            .map(|(k, fd)| (k.clone(), fd.as_fd()))
            .collect();
        let pid = criu::restore(&common, &borrowed, &mut |_| true).map_err(|e| {
            DaemonError::Io(std::io::Error::other(format!(
                "{} ({})",
                crate::error_chain(&e),
                self.work_dir.join("restore.log").display()
            )))
        })?;
        drop(borrowed);
        drop(inherit);
        self.holder = Some(Holder::new(
            nix::unistd::Pid::from_raw(pid),
            ctl_w,
            st_r,
            image.pid_namespace,
        )?);
        self.expect_spawns = 0;
        self.spawned = self
            .ranks
            .iter()
            .filter(|(_, s)| s.status.is_none())
            .map(|(r, _)| (*r, 0))
            .collect();
        Ok(())
    }
}
