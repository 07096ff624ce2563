//! The launcher <-> lamd protocol: length-prefixed, versioned frames over any stream socket
//! (a socketpair for a local lamd today, TCP between machines later, unchanged).
//!
//! A frame is `u32 LE length` followed by `length` bytes: one kind byte, then either a bincode
//! message (kind 0) or a raw data chunk (kind 1: `u32 LE rank`, one channel byte, the bytes). Data
//! chunks carry rank stdio without any encoding on the hot path. The length is checked against
//! [`MAX_FRAME`] *before* anything is allocated for the body.
//!
//! [`FrameReader`] and [`Outbox`] work on non-blocking fds and never block; the poll loops of the
//! launcher and lamd drive them.

use std::os::fd::{AsFd, BorrowedFd};

use bincode::{Decode, Encode};
use nix::errno::Errno;

use super::codec::{self, CodecError};
use super::{Engine, Epoch, ExitStatus, FileEntry, JobId, NodeId, NodeImage, Rank, RankSpec};

/// Bumped on any incompatible change to the messages below.
pub const PROTOCOL_VERSION: u32 = 4;
/// First bytes of every hello, so a stray connection is told apart from a peer speaking another version.
pub const MAGIC: [u8; 4] = *b"LAMD";
/// The largest frame accepted (16 MiB).
pub const MAX_FRAME: usize = 16 << 20;
/// The largest data chunk lamcr sends.
pub const MAX_CHUNK: usize = 256 << 10;

const KIND_MESSAGE: u8 = 0;
const KIND_DATA: u8 = 1;

/// Which of a rank's stdio streams a data chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Stdin,
    Stdout,
    Stderr,
}

impl Channel {
    fn to_byte(self) -> u8 {
        match self {
            Channel::Stdin => 0,
            Channel::Stdout => 1,
            Channel::Stderr => 2,
        }
    }
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Channel::Stdin),
            1 => Some(Channel::Stdout),
            2 => Some(Channel::Stderr),
            _ => None,
        }
    }
}

/// Who opened a connection to a lamd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum Role {
    /// The launcher: owns the job, receives output and exit statuses.
    Launcher,
    /// The checkpoint helper: orders one checkpoint and waits for its result.
    Helper,
}

/// Messages to a lamd.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ToDaemon {
    Hello {
        magic: [u8; 4],
        version: u32,
        job_id: JobId,
        node: NodeId,
        role: Role,
    },
    /// Start these ranks (all of this node's ranks, in one holder).
    Launch { ranks: Vec<RankSpec> },
    /// Restore this node's part of a checkpoint as the daemon's children.
    Restore {
        epoch_dir: String,
        image: NodeImage,
        ranks: Vec<RankSpec>,
        /// Image files to checksum while CRIU restores from them; no restored process runs
        /// before they pass.
        verify: Vec<FileEntry>,
    },
    /// The launcher's stdin reached EOF for this rank.
    StdinEof { rank: Rank },
    /// Deliver a signal to every rank.
    Signal { signal: i32 },
    /// Stop the ranks: SIGTERM, then SIGKILL after the grace period.
    Terminate { grace_ms: u64 },
    /// Kill the ranks at once.
    Kill,
    /// Dump this node's ranks into `epoch_dir` (helper connection only). They keep running, or,
    /// with `stop`, stay stopped after the dump until the launcher sends `Kill` or `Continue`.
    Checkpoint {
        epoch: Epoch,
        epoch_dir: String,
        stop: bool,
        engine: Engine,
        /// How long the ranks' callbacks may take to be ready.
        callback_timeout_ms: u64,
    },
    /// Resume ranks left stopped by a `stop` checkpoint that was not committed.
    Continue,
    /// The job is over: exit.
    Shutdown,
}

/// Messages from a lamd.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum FromDaemon {
    Hello {
        version: u32,
        node: NodeId,
        pid: u32,
    },
    /// Every rank of the node runs (pids as seen from the daemon).
    Started {
        pids: Vec<(Rank, u32)>,
    },
    /// The node could not start or restore its ranks; nothing of it runs.
    StartFailed {
        reason: String,
    },
    /// This many stdin bytes were written into rank pipes (or discarded): the launcher may send more.
    StdinAck {
        bytes: u64,
    },
    /// A rank ended; all its output was sent before this message.
    RankExited {
        rank: Rank,
        status: ExitStatus,
    },
    /// The node's dump is complete and its files are listed.
    Checkpointed {
        image: NodeImage,
        files: Vec<FileEntry>,
        dump_ms: u64,
    },
    CheckpointFailed {
        reason: String,
    },
    /// A rank asked for a checkpoint of the whole job (`cr::request_checkpoint`).
    CheckpointRequest {
        rank: Rank,
    },
    /// The daemon refuses a request (bad hello, wrong state).
    Refused {
        reason: String,
    },
}

/// A rank's library -> its lamd, on the rank's callback socket (`LAMCR_CR_FD`).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum FromRank {
    /// The rank initialised the library: from now on its callbacks take part in checkpoints.
    Hello { version: u32, pid: u32 },
    /// Every callback of the round reached `checkpoint()` (or one of them failed): `flags` is
    /// libcr's `CR_CHECKPOINT_*` value, user code in the high 16 bits.
    Ready { round: u64, flags: u32 },
    /// Checkpoint the whole job.
    RequestCheckpoint,
}

/// lamd -> a rank's library.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ToRank {
    /// Run the callbacks. With the `self` engine, write the saved state to `state_path`.
    Prepare {
        round: u64,
        engine: Engine,
        state_path: Option<String>,
        timeout_ms: u64,
    },
    /// The round is over: how `checkpoint()` returns.
    Resume { round: u64, how: Resumed },
}

/// How a callback's `checkpoint()` returns, as lamd decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum Resumed {
    /// The image is taken; the job goes on.
    Continue,
    /// This process was restored from the image.
    Restarted,
    /// The checkpoint was cancelled (a rank's TEMP_FAILURE, a timeout, or a failed dump).
    Cancelled,
}

/// Requests to a running launcher (from `lamcr checkpoint`).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ToLauncher {
    Hello { magic: [u8; 4], version: u32 },
    Checkpoint { term: bool },
}

/// Answers of a running launcher.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum FromLauncher {
    Committed {
        epoch: Epoch,
        path: String,
        bytes: u64,
        ms: u64,
    },
    Failed {
        reason: String,
    },
    /// How far the checkpoint has got (sent while it runs, before `Committed` or `Failed`).
    Progress {
        bytes: u64,
        ranks_done: u32,
        ranks: u32,
    },
}

/// One decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<M> {
    Message(M),
    Data {
        rank: Rank,
        channel: Channel,
        bytes: Vec<u8>,
    },
}

/// A frame whose data bytes are borrowed from the [`FrameReader`].
#[derive(Debug, PartialEq)]
pub enum FrameRef<'a, M> {
    Message(M),
    Data {
        rank: Rank,
        channel: Channel,
        bytes: &'a [u8],
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte cap")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("malformed data frame")]
    BadData,
    #[error("malformed message")]
    Message(#[source] CodecError),
    #[error("peer speaks protocol version {0}, this lamcr speaks {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("peer is not a lamcr daemon or launcher")]
    Magic,
    #[error("connection closed")]
    Closed,
    #[error("i/o error")]
    Io(#[source] std::io::Error),
}

/// Encodes a message frame onto `out`.
pub fn push_message<M: Encode>(out: &mut Vec<u8>, msg: &M) {
    let body = codec::encode(msg);
    out.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
    out.push(KIND_MESSAGE);
    out.extend_from_slice(&body);
}

/// Size of a data frame's header: length, kind, rank, channel.
pub const DATA_HEADER: usize = 10;

/// Encodes the header of a data frame of `len` bytes onto `out`; the caller appends the bytes.
pub fn push_data_header(out: &mut Vec<u8>, rank: Rank, channel: Channel, len: usize) {
    out.extend_from_slice(&((len + 6) as u32).to_le_bytes());
    out.push(KIND_DATA);
    out.extend_from_slice(&rank.0.to_le_bytes());
    out.push(channel.to_byte());
}

/// A frame, or the start of a data frame whose payload is still (`rest` bytes of it) in the fd.
#[derive(Debug, PartialEq)]
pub enum Part<M> {
    Message(M),
    Data {
        rank: Rank,
        channel: Channel,
        bytes: Vec<u8>,
        rest: usize,
    },
}

impl<M> From<Frame<M>> for Part<M> {
    fn from(f: Frame<M>) -> Self {
        match f {
            Frame::Message(m) => Part::Message(m),
            Frame::Data {
                rank,
                channel,
                bytes,
            } => Part::Data {
                rank,
                channel,
                bytes,
                rest: 0,
            },
        }
    }
}

/// Reassembles frames from a non-blocking stream fd. The buffer is always initialised up to its
/// length; `start..end` holds unread bytes.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    pub fn new() -> Self {
        Self {
            buf: vec![0; 2 * MAX_CHUNK],
            start: 0,
            end: 0,
            eof: false,
        }
    }

    /// Makes room for at least `want` more bytes after `end`.
    fn make_room(&mut self, want: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end >= want {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            self.buf.resize(self.end + want, 0);
        }
    }

    /// Reads what the fd has, once. Returns false once the peer has closed.
    pub fn fill(&mut self, fd: BorrowedFd<'_>) -> Result<bool, WireError> {
        self.fill_upto(fd, MAX_CHUNK + 16)
    }

    /// Reads at most `max` bytes, once. Returns false once the peer has closed.
    pub fn fill_upto(&mut self, fd: BorrowedFd<'_>, max: usize) -> Result<bool, WireError> {
        self.make_room(max);
        let end = self.end + max;
        loop {
            match nix::unistd::read(fd, &mut self.buf[self.end..end]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    // One read per wake-up keeps a busy peer from starving the other fds.
                    self.end += n;
                    return Ok(true);
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(true),
                Err(Errno::ECONNRESET) => {
                    self.eof = true;
                    return Ok(false);
                }
                Err(e) => return Err(WireError::Io(e.into())),
            }
        }
    }

    /// How many bytes can be read next without reading into a data frame's payload: the rest
    /// of the current frame's header, or of a message. Zero when a frame (or a data frame's
    /// header) is complete and [`next_part`](Self::next_part) has something to return.
    pub fn header_room(&self) -> usize {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 5 {
            return DATA_HEADER - avail.len();
        }
        let len = u32::from_le_bytes(avail[..4].try_into().expect("4 bytes")) as usize;
        if avail[4] == KIND_DATA || len > MAX_FRAME {
            return DATA_HEADER.saturating_sub(avail.len());
        }
        (4 + len).saturating_sub(avail.len())
    }

    /// Like [`next_frame`](Self::next_frame), but a data frame is returned as soon as its
    /// header is buffered, with the part of its payload that is buffered; the caller takes the
    /// other `rest` bytes straight from the fd (with `splice`, say).
    pub fn next_part<M: Decode<()>>(&mut self) -> Result<Option<Part<M>>, WireError> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() >= DATA_HEADER && avail[4] == KIND_DATA {
            let len = u32::from_le_bytes(avail[..4].try_into().expect("4 bytes")) as usize;
            if len > MAX_FRAME {
                return Err(WireError::TooLarge(len));
            }
            if len < 6 {
                return Err(WireError::BadData);
            }
            let rank = Rank(u32::from_le_bytes(avail[5..9].try_into().expect("4 bytes")));
            let channel = Channel::from_byte(avail[9]).ok_or(WireError::BadData)?;
            let payload = len - 6;
            let here = payload.min(avail.len() - DATA_HEADER);
            let bytes = avail[DATA_HEADER..DATA_HEADER + here].to_vec();
            self.start += DATA_HEADER + here;
            return Ok(Some(Part::Data {
                rank,
                channel,
                bytes,
                rest: payload - here,
            }));
        }
        Ok(self.next_frame()?.map(Part::from))
    }

    /// The next complete frame, if one is buffered.
    pub fn next_frame<M: Decode<()>>(&mut self) -> Result<Option<Frame<M>>, WireError> {
        Ok(self.next_frame_ref()?.map(|f| match f {
            FrameRef::Message(m) => Frame::Message(m),
            FrameRef::Data {
                rank,
                channel,
                bytes,
            } => Frame::Data {
                rank,
                channel,
                bytes: bytes.to_vec(),
            },
        }))
    }

    /// Like [`next_frame`](Self::next_frame), but a data frame's bytes are lent from the
    /// reader's buffer instead of copied out (lamd writes stdin straight from it).
    pub fn next_frame_ref<M: Decode<()>>(&mut self) -> Result<Option<FrameRef<'_, M>>, WireError> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 4 {
            return if self.eof && !avail.is_empty() {
                Err(WireError::Closed)
            } else {
                Ok(None)
            };
        }
        let len = u32::from_le_bytes(avail[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        if len == 0 {
            return Err(WireError::Empty);
        }
        if avail.len() < 4 + len {
            if self.eof {
                return Err(WireError::Closed);
            }
            self.make_room(4 + len - avail.len());
            return Ok(None);
        }
        // The frame is consumed only once it has decoded: a malformed one stays where it is, so
        // a caller that goes on reading gets the same error, never the frames behind it.
        let body = &self.buf[self.start + 4..self.start + 4 + len];
        let frame = match body[0] {
            KIND_MESSAGE => {
                FrameRef::Message(codec::decode(&body[1..]).map_err(WireError::Message)?)
            }
            KIND_DATA => {
                if body.len() < 6 {
                    return Err(WireError::BadData);
                }
                let rank = Rank(u32::from_le_bytes(body[1..5].try_into().expect("4 bytes")));
                let channel = Channel::from_byte(body[5]).ok_or(WireError::BadData)?;
                FrameRef::Data {
                    rank,
                    channel,
                    bytes: &body[6..],
                }
            }
            k => return Err(WireError::Kind(k)),
        };
        self.start += 4 + len;
        Ok(Some(frame))
    }

    /// Whether the peer has closed its end.
    pub fn at_eof(&self) -> bool {
        self.eof
    }
}

/// Frames waiting to be written to a non-blocking stream fd. Its length is the back-pressure
/// signal: producers stop reading their sources while it is above a high-water mark.
#[derive(Default)]
pub struct Outbox {
    buf: Vec<u8>,
    start: usize,
}

impl Outbox {
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The buffer to append encoded frames to.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > (1 << 20) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        &mut self.buf
    }

    pub fn push<M: Encode>(&mut self, msg: &M) {
        push_message(self.buf(), msg);
    }

    pub fn push_data(&mut self, rank: Rank, channel: Channel, bytes: &[u8]) {
        for chunk in bytes.chunks(MAX_CHUNK) {
            let buf = self.buf();
            push_data_header(buf, rank, channel, chunk.len());
            buf.extend_from_slice(chunk);
        }
    }

    /// Sends a data chunk of at most [`MAX_CHUNK`] bytes. When nothing else is queued it goes to
    /// the fd straight from `bytes` (one `writev` of header and payload); only what the fd does
    /// not take is copied into the queue.
    pub fn send_data(
        &mut self,
        fd: BorrowedFd<'_>,
        rank: Rank,
        channel: Channel,
        bytes: &[u8],
    ) -> Result<(), WireError> {
        if self.pending() > 0 || bytes.len() > MAX_CHUNK {
            self.push_data(rank, channel, bytes);
            return self.flush(fd).map(|_| ());
        }
        let mut header = Vec::with_capacity(DATA_HEADER);
        push_data_header(&mut header, rank, channel, bytes.len());
        let iov = [std::io::IoSlice::new(&header), std::io::IoSlice::new(bytes)];
        let sent = loop {
            match nix::sys::uio::writev(fd, &iov) {
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break 0,
                Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(WireError::Closed),
                Err(e) => return Err(WireError::Io(e.into())),
            }
        };
        let buf = self.buf();
        if sent < header.len() {
            buf.extend_from_slice(&header[sent..]);
            buf.extend_from_slice(bytes);
        } else {
            buf.extend_from_slice(&bytes[sent - header.len()..]);
        }
        Ok(())
    }

    /// Writes as much as the fd takes without blocking. Returns true when everything is written.
    pub fn flush(&mut self, fd: BorrowedFd<'_>) -> Result<bool, WireError> {
        while self.start < self.buf.len() {
            match nix::unistd::write(fd, &self.buf[self.start..]) {
                Ok(n) => self.start += n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(false),
                Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(WireError::Closed),
                Err(e) => return Err(WireError::Io(e.into())),
            }
        }
        Ok(true)
    }

    /// Writes everything, waiting for the fd to drain (used for the last words before exit).
    pub fn flush_blocking(&mut self, fd: BorrowedFd<'_>, timeout_ms: u16) -> Result<(), WireError> {
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms.into());
        while !self.flush(fd)? {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(WireError::Io(std::io::ErrorKind::TimedOut.into()));
            }
            let mut pfd = [nix::poll::PollFd::new(
                fd.as_fd(),
                nix::poll::PollFlags::POLLOUT,
            )];
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let _ = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(ms));
        }
        Ok(())
    }
}

/// Sends one message on a blocking fd and waits for one reply (helper, `lamcr checkpoint`).
pub fn request<Q: Encode, A: Decode<()>>(
    fd: BorrowedFd<'_>,
    msg: &Q,
    reader: &mut FrameReader,
) -> Result<A, WireError> {
    let mut out = Vec::new();
    push_message(&mut out, msg);
    let mut off = 0;
    while off < out.len() {
        match nix::unistd::write(fd, &out[off..]) {
            Ok(n) => off += n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(WireError::Closed),
            Err(e) => return Err(WireError::Io(e.into())),
        }
    }
    recv(fd, reader)
}

/// Waits for the next message on a blocking fd.
pub fn recv<A: Decode<()>>(fd: BorrowedFd<'_>, reader: &mut FrameReader) -> Result<A, WireError> {
    loop {
        match reader.next_frame::<A>()? {
            Some(Frame::Message(m)) => return Ok(m),
            Some(Frame::Data { .. }) => continue,
            None => {
                let before = reader.end - reader.start;
                let open = reader.fill(fd)?;
                if open && reader.end - reader.start == before {
                    // A blocking fd that returned EAGAIN: its receive timeout expired.
                    return Err(WireError::Io(std::io::ErrorKind::TimedOut.into()));
                }
                if !open {
                    return match reader.next_frame::<A>()? {
                        Some(Frame::Message(m)) => Ok(m),
                        _ => Err(WireError::Closed),
                    };
                }
            }
        }
    }
}

impl ToDaemon {
    pub fn hello(job_id: JobId, node: NodeId, role: Role) -> Self {
        ToDaemon::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            job_id,
            node,
            role,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader_over(bytes: &[u8]) -> FrameReader {
        let mut r = FrameReader::new();
        r.push(bytes);
        r
    }

    impl FrameReader {
        fn push(&mut self, bytes: &[u8]) {
            self.make_room(bytes.len());
            self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
            self.end += bytes.len();
        }
    }

    /// `send_data` writes straight through while the socket takes it, then queues the rest in
    /// order, and a message pushed behind it stays behind it.
    #[test]
    fn send_data_queues_what_the_socket_does_not_take() {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_NONBLOCK,
        )
        .unwrap();
        let payload: Vec<u8> = (0..MAX_CHUNK).map(|i| (i * 7 + i / 256) as u8).collect();
        let mut out = Outbox::default();
        for r in 0..8 {
            out.send_data(a.as_fd(), Rank(r), Channel::Stdin, &payload)
                .unwrap();
        }
        assert!(
            out.pending() > 0,
            "a socket buffer never takes 2 MiB at once"
        );
        out.push(&ToDaemon::Kill);
        let mut reader = FrameReader::new();
        let mut got = Vec::new();
        for _ in 0..100_000 {
            out.flush(a.as_fd()).unwrap();
            reader.fill(b.as_fd()).unwrap();
            while let Some(f) = reader.next_frame::<ToDaemon>().unwrap() {
                got.push(f);
            }
            if got.len() == 9 {
                break;
            }
        }
        assert_eq!(got.len(), 9);
        for (r, f) in got[..8].iter().enumerate() {
            assert_eq!(
                f,
                &Frame::Data {
                    rank: Rank(r as u32),
                    channel: Channel::Stdin,
                    bytes: payload.clone(),
                }
            );
        }
        assert_eq!(got[8], Frame::Message(ToDaemon::Kill));
    }

    #[test]
    fn message_and_data_round_trip() {
        let mut out = Vec::new();
        push_message(&mut out, &ToDaemon::Kill);
        push_data_header(&mut out, Rank(3), Channel::Stderr, 3);
        out.extend_from_slice(b"a\0b");
        let mut r = reader_over(&out);
        assert_eq!(
            r.next_frame::<ToDaemon>().unwrap(),
            Some(Frame::Message(ToDaemon::Kill))
        );
        assert_eq!(
            r.next_frame::<ToDaemon>().unwrap(),
            Some(Frame::Data {
                rank: Rank(3),
                channel: Channel::Stderr,
                bytes: b"a\0b".to_vec()
            })
        );
        assert_eq!(r.next_frame::<ToDaemon>().unwrap(), None);
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let r = &mut reader_over(&u32::MAX.to_le_bytes());
        assert!(matches!(
            r.next_frame::<ToDaemon>(),
            Err(WireError::TooLarge(_))
        ));
    }

    #[test]
    fn garbage_message_is_an_error() {
        let mut bytes = 5u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            reader_over(&bytes).next_frame::<ToDaemon>(),
            Err(WireError::Message(_))
        ));
        let mut bytes = 1u32.to_le_bytes().to_vec();
        bytes.push(9);
        assert!(matches!(
            reader_over(&bytes).next_frame::<ToDaemon>(),
            Err(WireError::Kind(9))
        ));
    }

    #[test]
    fn partial_frame_waits_for_more() {
        let mut out = Vec::new();
        push_message(&mut out, &ToDaemon::Terminate { grace_ms: 5 });
        let mut r = reader_over(&out[..out.len() - 1]);
        assert_eq!(r.next_frame::<ToDaemon>().unwrap(), None);
        r.push(&out[out.len() - 1..]);
        assert!(r.next_frame::<ToDaemon>().unwrap().is_some());
    }
}
