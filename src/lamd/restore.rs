//! lamd's `Restore` verb: bring a node's holder tree back with CRIU as this daemon's children.
//!
//! Fresh pipes replace the old ones: CRIU names each external pipe of the image by the inode it
//! had (`pipe:[INODE]`), and `inherit_fd` swaps in ours. criu runs as our child in swrk mode with
//! `rst_sibling`, so the restored holder is our child and `waitpid` sees real exit statuses.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::dump::{open_dir, tcp_wanted};
use super::launch::Launching;
use super::socketpair_for_child;
use super::{Daemon, DaemonError, Holder, Slot, cloexec_pipe, nonblocking};
use crate::engine::criu::{self, Common};
use crate::launcher::commit::{StoreError, verify_checksums};
use crate::schema::wire::Resumed;
use crate::schema::{Engine, FileEntry, NodeImage, RankCr, RankImage, RankSpec};

impl Daemon {
    pub(super) fn restore(
        &mut self,
        epoch_dir: &str,
        image: NodeImage,
        specs: Vec<RankSpec>,
        verify: Vec<FileEntry>,
    ) -> Result<(), DaemonError> {
        if self.holder.is_some() || !self.ranks.is_empty() {
            return Err(DaemonError::Io(std::io::Error::other(
                "ranks already running",
            )));
        }
        if image.engine == Engine::SelfState {
            // The launcher verified the (small) state files before it started us.
            return self.restore_self(epoch_dir, image, specs);
        }
        let mut inherit: Vec<(String, OwnedFd)> = Vec::new();
        let mut restarted = Vec::new();
        let size = super::launch::pipe_size(specs.len());
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
                    cr_socket,
                    cr,
                    ..
                }) => {
                    if *cr_socket != 0 {
                        let (ours, theirs) = socketpair_for_child()?;
                        slot.cr_socket = crate::sys::inode_of(theirs.as_fd())?;
                        inherit.push((format!("socket:[{cr_socket}]"), theirs));
                        slot.cr = Some(ours);
                        slot.cr_enabled = *cr != RankCr::Unaware;
                        if *cr == RankCr::Ready {
                            restarted.push(rank);
                        }
                    }
                    let (out_r, out_w) = cloexec_pipe()?;
                    let (err_r, err_w) = cloexec_pipe()?;
                    slot.stdout_flow.capacity = super::launch::enlarge(&out_w, size);
                    slot.stderr_flow.capacity = super::launch::capacity(&err_w);
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
                    slot.ended_before(*status, *stdout_bytes, *stderr_bytes);
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
            external: &[],
        };
        let borrowed: Vec<(String, BorrowedFd<'_>)> = inherit
            .iter()
            .map(|(k, fd)| (k.clone(), fd.as_fd()))
            .collect();
        // The images are checksummed on one core while CRIU restores from them on the other. CRIU
        // asks at `post-restore`, when every process is rebuilt and none has run yet: a mismatch
        // there makes CRIU kill them all, so a corrupt image never runs.
        let mut verifier = Some(Verifier::start(Path::new(epoch_dir), verify));
        let mut mismatch = None;
        let restored = criu::restore(&common, &borrowed, &mut |stage| {
            if stage == "post-restore" {
                if let Some(Err(e)) = verifier.take().map(Verifier::finish) {
                    mismatch = Some(e);
                    return false;
                }
            }
            true
        });
        // Should CRIU fail (or never ask) first, the checksums still decide what is reported.
        if let Some(Err(e)) = verifier.take().map(Verifier::finish) {
            mismatch.get_or_insert(e);
        }
        let pid = match (restored, mismatch) {
            (Ok(pid), None) => pid,
            (restored, Some(e)) => {
                if let Ok(pid) = restored {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
                }
                return Err(e.into());
            }
            (Err(e), None) => {
                return Err(DaemonError::Io(std::io::Error::other(format!(
                    "{} ({})",
                    crate::error_chain(&e),
                    self.work_dir.join("restore.log").display()
                ))));
            }
        };
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
        // Their callbacks were waiting in `checkpoint()` when the image was taken.
        self.cr_round = image.cr_round;
        self.resume_ranks(&restarted, Resumed::Restarted);
        Ok(())
    }

    /// `self` engine: start the ranks afresh, each with the state it saved on an inherited fd.
    fn restore_self(
        &mut self,
        epoch_dir: &str,
        image: NodeImage,
        specs: Vec<RankSpec>,
    ) -> Result<(), DaemonError> {
        let mut launching = Vec::new();
        let mut counts = Vec::new();
        for spec in specs {
            let rank = spec.rank;
            match image.ranks.iter().find(|r| r.rank() == rank) {
                Some(RankImage::Running {
                    state,
                    stdout_bytes,
                    stderr_bytes,
                    ..
                }) => {
                    let state = match state {
                        Some(rel) => {
                            let path = Path::new(epoch_dir).join(rel);
                            let f = std::fs::File::open(&path).map_err(|e| {
                                DaemonError::Io(std::io::Error::other(format!(
                                    "rank {rank}: cannot open its saved state {}: {e}",
                                    path.display()
                                )))
                            })?;
                            Some((OwnedFd::from(f), epoch_dir.to_string()))
                        }
                        // Omitted from the checkpoint: it starts as new.
                        None => None,
                    };
                    counts.push((rank, *stdout_bytes, *stderr_bytes));
                    launching.push(Launching { spec, state });
                }
                Some(RankImage::Exited {
                    status,
                    stdout_bytes,
                    stderr_bytes,
                    ..
                }) => {
                    let mut slot = Slot::new(spec);
                    slot.ended_before(*status, *stdout_bytes, *stderr_bytes);
                    self.ranks.insert(rank, slot);
                }
                None => {
                    return Err(DaemonError::Io(std::io::Error::other(format!(
                        "rank {rank} is not in the node image"
                    ))));
                }
            }
        }
        self.launch_ranks(launching)?;
        for (rank, out, err) in counts {
            if let Some(s) = self.ranks.get_mut(&rank) {
                s.stdout_bytes = out;
                s.stderr_bytes = err;
            }
        }
        self.cr_round = image.cr_round;
        Ok(())
    }
}

/// Checksums a node's image files on a thread of its own.
struct Verifier(std::thread::JoinHandle<Result<(), StoreError>>);

impl Verifier {
    fn start(epoch_dir: &Path, files: Vec<FileEntry>) -> Self {
        let dir = epoch_dir.to_path_buf();
        // One core for CRIU, the rest for the checksums.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().max(2) - 1);
        Verifier(std::thread::spawn(move || {
            verify_checksums(&dir, &files, workers)
        }))
    }

    fn finish(self) -> Result<(), StoreError> {
        self.0.join().unwrap_or_else(|_| {
            Err(StoreError::Read {
                path: PathBuf::new(),
                source: std::io::Error::other("checksum thread failed"),
            })
        })
    }
}
