//! lamd's `Checkpoint` verb: dump the holder tree with CRIU while the ranks keep running.
//!
//! The tree is frozen from the start of the dump until CRIU's `post-dump` stage ends. At that
//! stage lamd drains every rank pipe and the holder's status pipe: the bytes drained were written
//! before the checkpoint, so they are forwarded now and never again; the byte counts recorded
//! right there are the output lengths at the epoch.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;

use super::Daemon;
use crate::engine::criu::{self, Common, CriuError};
use crate::schema::wire::{Channel, Frame};
use crate::schema::{Epoch, FileEntry, NodeImage, RankImage};

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("cannot create image directory {path}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node has no holder to dump")]
    NoHolder,
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error("cannot checksum {path}")]
    Checksum {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Daemon {
    pub(super) fn checkpoint(
        &mut self,
        _epoch: Epoch,
        epoch_dir: &str,
        stop: bool,
    ) -> Result<(NodeImage, Vec<FileEntry>, u64), DumpError> {
        let rel = format!("node{}", self.node);
        let dir = Path::new(epoch_dir).join(&rel);
        let started = Instant::now();
        if self.holder.is_none() {
            // Every rank of this node has ended: the image is just their statuses.
            if self.ranks.values().all(|s| s.status.is_some()) {
                return Ok((self.node_image(String::new()), Vec::new(), 0));
            }
            return Err(DumpError::NoHolder);
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| DumpError::Dir {
                path: dir.clone(),
                source,
            })?;
        let images = open_dir(&dir).map_err(|source| DumpError::Dir {
            path: dir.clone(),
            source,
        })?;
        let work = open_dir(&self.work_dir).map_err(|source| DumpError::Dir {
            path: self.work_dir.clone(),
            source,
        })?;
        let pid = self.holder.as_ref().map(|h| h.pid.as_raw()).unwrap_or(0);
        let log = self.work_dir.join("dump.log").display().to_string();
        let common = Common {
            images_dir: images.as_fd(),
            work_dir: work.as_fd(),
            log_file: "dump.log",
            tcp_established: tcp_wanted(),
        };
        let mut snapshot = None;
        let digest = super::digest::Follower::start(&dir);
        let result = criu::dump(pid, &common, stop, &mut |stage| {
            if stage == "post-dump" {
                self.drain_frozen();
                snapshot = Some(self.node_image(rel.clone()));
            }
            true
        });
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(match e {
                CriuError::Failed {
                    action, message, ..
                } => CriuError::Failed {
                    action,
                    message,
                    log,
                },
                other => other,
            }
            .into());
        }
        let dump_ms = started.elapsed().as_millis() as u64;
        let image = snapshot.unwrap_or_else(|| self.node_image(rel.clone()));
        let files = digest
            .finish(&rel)
            .map_err(|(path, source)| DumpError::Checksum { path, source })?;
        Ok((image, files, dump_ms))
    }

    /// Forwards everything the frozen ranks had written and reads the holder's last events.
    fn drain_frozen(&mut self) {
        let ranks: Vec<_> = self.ranks.keys().copied().collect();
        for rank in ranks {
            self.relay(rank, Channel::Stdout, true);
            self.relay(rank, Channel::Stderr, true);
        }
        let mut events = Vec::new();
        if let Some(h) = &mut self.holder {
            if let Some(fd) = &h.status {
                let _ = h.status_reader.fill(fd.as_fd());
                while let Ok(Some(Frame::Message(ev))) = h.status_reader.next_frame() {
                    events.push(ev);
                }
            }
        }
        for ev in events {
            self.on_holder_event(ev);
        }
    }

    /// This node's part of the restart schema, as of now.
    pub(super) fn node_image(&self, images_dir: String) -> NodeImage {
        let (control_pipe, status_pipe, pid_namespace) = self
            .holder
            .as_ref()
            .map(|h| (h.control_pipe, h.status_pipe, h.pid_namespace))
            .unwrap_or((0, 0, false));
        let ranks = self
            .ranks
            .iter()
            .map(|(rank, s)| match s.status {
                Some(status) => RankImage::Exited {
                    rank: *rank,
                    status,
                    stdout_bytes: s.stdout_bytes,
                    stderr_bytes: s.stderr_bytes,
                },
                None => RankImage::Running {
                    rank: *rank,
                    stdin_pipe: s.stdin_pipe,
                    stdin_closed: s.stdin_closed || s.stdin.is_none(),
                    stdout_pipe: s.stdout_pipe,
                    stderr_pipe: s.stderr_pipe,
                    stdout_bytes: s.stdout_bytes,
                    stderr_bytes: s.stderr_bytes,
                },
            })
            .collect();
        NodeImage {
            node: self.node,
            images_dir,
            control_pipe,
            status_pipe,
            pid_namespace,
            ranks,
        }
    }
}

/// Whether dumps keep established TCP connections (on by default; MPI ranks need it).
pub(crate) fn tcp_wanted() -> bool {
    std::env::var_os("LAMCR_NO_TCP").is_none()
}

pub(crate) fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(open(
        path,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

use std::os::unix::fs::DirBuilderExt;
