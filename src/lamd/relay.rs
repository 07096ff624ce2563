//! lamd's relaying of rank output to the launcher.
//!
//! A rank's stdout and stderr are pipes whose read ends lamd holds. They are read only while
//! the link to the launcher has room (see [`super::HIGH_WATER`]), so a rank that writes faster
//! than the console reads blocks on its own pipe and nothing buffers without bound.
//!
//! **Zero-copy path.** While nothing else waits to go to the launcher, a data frame is built in
//! a staging pipe: its 10-byte header is written there, then the payload is `splice`d from the
//! rank's pipe behind it, and the whole frame goes to the socket with `splice` as the socket
//! takes it. The bytes are never copied into lamd. What follows a staged frame (messages, or
//! output read during a checkpoint's drain) waits in the ordinary [`Outbox`] behind it.
//!
//! **Coalescing.** A stream that is pouring out data (its last frame was large) but holds little
//! right now is left alone for [`HOLD`] once, so the next frame carries more bytes: fewer
//! wake-ups and system calls per byte when a rank streams, and no delay at all for a rank that
//! writes a line now and then.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};

use super::Daemon;
use crate::schema::Rank;
use crate::schema::wire::{Channel, DATA_HEADER, Outbox, WireError, push_data_header};

/// The largest payload staged as one frame. The staging pipe holds twice this, so a header and
/// a full frame always fit in it.
const MAX_STAGED: usize = 512 << 10;
/// A stream whose last frame was at least this big is streaming: worth coalescing.
const STREAMING: usize = 64 << 10;
/// How long a streaming rank's pipe is left to fill before the next frame is taken.
const HOLD: Duration = Duration::from_micros(100);

/// The staging pipe of the launcher link; its bytes go out before the [`Outbox`]'s.
pub(crate) struct Stage {
    r: OwnedFd,
    w: OwnedFd,
    /// Largest payload that fits in the pipe behind a header.
    max: usize,
    /// Bytes in the pipe.
    staged: usize,
}

impl Stage {
    pub fn new() -> Result<Self, Errno> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(2 * MAX_STAGED as i32));
        let cap = fcntl(&w, FcntlArg::F_GETPIPE_SZ)? as usize;
        Ok(Stage {
            r,
            w,
            max: (cap / 2).min(MAX_STAGED),
            staged: 0,
        })
    }

    pub fn pending(&self) -> usize {
        self.staged
    }

    /// Splices staged bytes into the socket. Returns true once the stage is empty.
    pub fn flush(&mut self, sock: BorrowedFd<'_>) -> Result<bool, WireError> {
        while self.staged > 0 {
            match splice(
                &self.r,
                None,
                sock,
                None,
                self.staged,
                SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
            ) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => self.staged -= n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(false),
                Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(WireError::Closed),
                Err(e) => return Err(WireError::Io(e.into())),
            }
        }
        Ok(true)
    }

    /// Stages one data frame holding the next `avail` (or fewer) bytes of `pipe`, which only
    /// lamd reads. Must only be called while the stage is empty and `queue` is empty. Returns
    /// the payload size.
    fn stage(
        &mut self,
        queue: &mut Outbox,
        rank: Rank,
        channel: Channel,
        pipe: BorrowedFd<'_>,
        avail: usize,
    ) -> Result<usize, Errno> {
        debug_assert!(self.staged == 0 && queue.pending() == 0);
        let n = avail.min(self.max);
        let mut header = Vec::with_capacity(DATA_HEADER);
        push_data_header(&mut header, rank, channel, n);
        // An empty pipe takes a header whole.
        nix::unistd::write(&self.w, &header)?;
        self.staged = header.len();
        let mut moved = 0;
        while moved < n {
            match splice(
                pipe,
                None,
                &self.w,
                None,
                n - moved,
                SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
            ) {
                Ok(0) => break,
                Ok(m) => moved += m,
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        self.staged += moved;
        if moved < n {
            // Pipe slots, not bytes, ran out (a rank that wrote in tiny pieces): the header is
            // already promised, so the rest of the payload, which is in the rank's pipe, goes by
            // copy right behind it.
            let mut rest = vec![0; n - moved];
            let mut got = 0;
            while got < rest.len() {
                match nix::unistd::read(pipe, &mut rest[got..]) {
                    Ok(0) => return Err(Errno::EIO),
                    Ok(k) => got += k,
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(e),
                }
            }
            queue.buf().extend_from_slice(&rest);
        }
        Ok(n)
    }
}

/// Per-stream relay state.
pub(crate) struct Flow {
    /// The rank pipe's capacity: the stream is held only while its pipe is less than half full.
    pub capacity: usize,
    /// Payload of the last frame taken from this stream.
    last: usize,
    /// Not polled until then (coalescing).
    pub hold_until: Option<Instant>,
    /// The current hold has been served: take whatever is there next time.
    held: bool,
}

impl Default for Flow {
    fn default() -> Self {
        Flow {
            capacity: super::launch::PIPE_SIZE_DEFAULT,
            last: 0,
            hold_until: None,
            held: false,
        }
    }
}

impl Daemon {
    /// Everything that waits to go to the launcher.
    pub(super) fn link_pending(&self) -> usize {
        self.stage.pending() + self.launcher.out.pending()
    }

    /// Writes what waits for the launcher, staged frames first. True when all is written.
    pub(super) fn flush_link(&mut self) -> Result<bool, WireError> {
        let fd = self.launcher.fd.as_fd();
        Ok(self.stage.flush(fd)? && self.launcher.out.flush(fd)?)
    }

    /// Whether rank streams are read at all right now (back-pressure).
    pub(super) fn relaying(&self) -> bool {
        self.stage.pending() == 0 && self.launcher.out.pending() < super::HIGH_WATER
    }

    /// Takes a rank stream's output for the launcher. `drain` reads until the pipe is empty
    /// (before a dump, or once the rank has exited).
    pub(super) fn relay(&mut self, rank: Rank, channel: Channel, drain: bool) {
        if !drain && self.relay_spliced(rank, channel) {
            return;
        }
        let Some(slot) = self.ranks.get_mut(&rank) else {
            return;
        };
        let Some((fd, count, _)) = slot.stream(channel) else {
            return;
        };
        loop {
            let Some(f) = fd.as_ref() else { return };
            match nix::unistd::read(f.as_fd(), &mut self.buf) {
                Ok(0) => {
                    *fd = None;
                    return;
                }
                Ok(n) => {
                    *count += n as u64;
                    self.launcher.out.push_data(rank, channel, &self.buf[..n]);
                    if !drain {
                        return;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    *fd = None;
                    return;
                }
            }
        }
    }

    /// The zero-copy path. Returns false when the ordinary read path must run instead (the
    /// pipe is empty, which may mean end of file, or the link has queued frames).
    fn relay_spliced(&mut self, rank: Rank, channel: Channel) -> bool {
        let linked = self.launcher.out.pending() == 0 && self.stage.pending() == 0;
        let Some(slot) = self.ranks.get_mut(&rank) else {
            return true;
        };
        let Some((fd, count, flow)) = slot.stream(channel) else {
            return true;
        };
        let Some(fd) = fd.as_ref() else {
            return true;
        };
        let Ok(avail) = crate::sys::readable_bytes(fd.as_fd()) else {
            return false;
        };
        if avail == 0 || !linked {
            return false;
        }
        // Held only while the pipe could still take as much again: a small pipe (stderr, or one
        // of many ranks' pipes) that a streaming rank keeps full is never held, or the rank would
        // sit blocked through every hold.
        let worth = self.stage.max.min(flow.capacity) / 2;
        if flow.last >= STREAMING && avail < worth && !flow.held {
            flow.held = true;
            flow.hold_until = Some(Instant::now() + HOLD);
            return true;
        }
        flow.held = false;
        match self
            .stage
            .stage(&mut self.launcher.out, rank, channel, fd.as_fd(), avail)
        {
            Ok(n) => {
                *count += n as u64;
                flow.last = n;
                let _ = self.flush_link();
                true
            }
            Err(_) => false,
        }
    }

    /// The earliest end of a coalescing hold, clearing those that have ended.
    pub(super) fn next_hold(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for slot in self.ranks.values_mut() {
            for flow in [&mut slot.stdout_flow, &mut slot.stderr_flow] {
                match flow.hold_until {
                    Some(t) if t <= now => flow.hold_until = None,
                    Some(t) => next = Some(next.map_or(t, |n| n.min(t))),
                    None => {}
                }
            }
        }
        next
    }
}
