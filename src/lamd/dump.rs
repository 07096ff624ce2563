//! lamd's `Checkpoint` verb: dump the holder tree with CRIU while the ranks keep running.
//!
//! The tree is frozen from the start of the dump until CRIU's `post-dump` stage ends. At that
//! stage lamd drains every rank pipe and the holder's status pipe: the bytes drained were written
//! before the checkpoint, so they are forwarded now and never again; the byte counts recorded
//! right there are the output lengths at the epoch.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;

use super::Daemon;
use crate::engine::criu::{self, Common, CriuError};
use crate::schema::wire::{Channel, Frame, Resumed};
use crate::schema::{Engine, Epoch, FileEntry, NodeImage, RankImage};

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
    #[error("{0}")]
    Callbacks(String),
}

impl Daemon {
    pub(super) fn checkpoint(
        &mut self,
        _epoch: Epoch,
        epoch_dir: &str,
        stop: bool,
        engine: Engine,
        callback_timeout: Duration,
    ) -> Result<(NodeImage, Vec<FileEntry>, u64), DumpError> {
        let rel = format!("node{}", self.node);
        let dir = Path::new(epoch_dir).join(&rel);
        let started = Instant::now();
        if self.holder.is_none() {
            // Every rank of this node has ended: the image is just their statuses.
            if self.ranks.values().all(|s| s.status.is_some()) {
                return Ok((self.node_image(String::new(), engine), Vec::new(), 0));
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
        let prepared =
            match self.prepare_ranks(engine, Path::new(epoch_dir), &rel, callback_timeout) {
                Ok(p) => p,
                Err(reason) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(DumpError::Callbacks(reason));
                }
            };
        let resume = if stop { None } else { Some(Resumed::Continue) };
        if engine == Engine::SelfState {
            let result = self.save_states(Path::new(epoch_dir), &rel, started);
            match (&result, resume) {
                (Err(_), _) => {
                    self.resume_ranks(&prepared.ready, Resumed::Cancelled);
                    let _ = std::fs::remove_dir_all(&dir);
                }
                (Ok(_), Some(how)) => self.resume_ranks(&prepared.ready, how),
                (Ok(_), None) => self.cr_held = prepared.ready.clone(),
            }
            return result;
        }
        let work = open_dir(&self.work_dir).map_err(|source| DumpError::Dir {
            path: self.work_dir.clone(),
            source,
        })?;
        let pid = self.holder.as_ref().map(|h| h.pid.as_raw()).unwrap_or(0);
        let log = self.work_dir.join("dump.log").display().to_string();
        // The ranks' callback sockets lead to lamd, outside the tree: CRIU records them as external
        // and a restore hands in fresh ones (`inherit_fd socket:[INODE]`).
        let external: Vec<String> = self
            .ranks
            .values()
            .filter(|s| s.status.is_none() && s.cr_socket != 0)
            .map(|s| format!("unix[{}]", s.cr_socket))
            .collect();
        let common = Common {
            images_dir: images.as_fd(),
            work_dir: work.as_fd(),
            log_file: "dump.log",
            tcp_established: tcp_wanted(),
            external: &external,
        };
        let mut snapshot = None;
        let digest = super::digest::Follower::start(&dir);
        let result = criu::dump(pid, &common, stop, &mut |stage| {
            if stage == "post-dump" {
                self.drain_frozen();
                snapshot = Some(self.node_image(rel.clone(), engine));
            }
            true
        });
        if let Err(e) = result {
            self.resume_ranks(&prepared.ready, Resumed::Cancelled);
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
        // The image is taken: callbacks go on now (or, stopped, when the launcher decides).
        match resume {
            Some(how) => self.resume_ranks(&prepared.ready, how),
            None => self.cr_held = prepared.ready.clone(),
        }
        let image = snapshot.unwrap_or_else(|| self.node_image(rel.clone(), engine));
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
    /// `self` engine: the ranks wrote their state files; record and checksum them.
    fn save_states(
        &mut self,
        epoch_dir: &Path,
        rel: &str,
        started: Instant,
    ) -> Result<(NodeImage, Vec<FileEntry>, u64), DumpError> {
        self.drain_frozen();
        let mut files = Vec::new();
        for s in self.ranks.values() {
            if let Some(state) = &s.state {
                files.push(crate::engine::self_state::entry(epoch_dir, state).map_err(
                    |source| DumpError::Checksum {
                        path: epoch_dir.join(state),
                        source,
                    },
                )?);
            }
        }
        let image = self.node_image(rel.to_string(), Engine::SelfState);
        Ok((image, files, started.elapsed().as_millis() as u64))
    }

    pub(super) fn node_image(&self, images_dir: String, engine: Engine) -> NodeImage {
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
                    cr_socket: s.cr_socket,
                    cr: s.cr_mark,
                    state: s.state.clone(),
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
            engine,
            cr_round: self.cr_round,
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
