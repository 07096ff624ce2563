//! Where rank output ends up: the launcher's stdout/stderr, optionally tagged, labelled or
//! timestamped line by line, and optionally also `DIR/rank.R/{stdout,stderr}`.
//!
//! Untagged output is written through byte-exact as it arrives. With any prefix, partial lines
//! are held per (rank, stream) until their newline and flushed when the rank exits.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};

use crate::schema::wire::WireError;
use crate::schema::{IoOptions, Rank, Stream};

fn io_err(e: Errno) -> WireError {
    WireError::Io(e.into())
}

pub struct OutputSink {
    opts: IoOptions,
    partial: HashMap<(Rank, Stream), Vec<u8>>,
    files: HashMap<(Rank, Stream), File>,
    stdout: std::io::Stdout,
    stderr: std::io::Stderr,
    /// The console reader went away (EPIPE): keep running, drop console output.
    console_closed: bool,
    /// The pipe output passes through on its way from a socket to the console (see
    /// [`splice_from`](Self::splice_from)), made on first use.
    through: Option<Through>,
    /// The console refused `splice` (stdout, stderr): copy instead.
    no_splice: [bool; 2],
}

struct Through {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open output file {path}")]
pub struct OutputFileError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl OutputSink {
    pub fn new(opts: IoOptions) -> Self {
        Self {
            opts,
            partial: HashMap::new(),
            files: HashMap::new(),
            stdout: std::io::stdout(),
            stderr: std::io::stderr(),
            console_closed: false,
            through: None,
            no_splice: [false; 2],
        }
    }

    /// Output goes to the console byte for byte (no prefix, no files): it may then come from
    /// the socket by [`splice_from`](Self::splice_from).
    pub fn raw(&self) -> bool {
        !self.prefixed() && self.opts.output_dir.is_none()
    }

    /// Moves up to `len` bytes of a rank's output from `sock` to the console without copying
    /// them into this process: socket to a pipe to the console, both with `splice` (a console
    /// that refuses it, such as an `O_APPEND` file, is written with a copy). Returns how many
    /// bytes moved; 0 when the socket has nothing right now.
    pub fn splice_from(
        &mut self,
        sock: BorrowedFd<'_>,
        stream: Stream,
        len: usize,
    ) -> Result<usize, WireError> {
        if self.through.is_none() {
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io_err)?;
            let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(1 << 20));
            let cap = fcntl(&w, FcntlArg::F_GETPIPE_SZ).map_err(io_err)? as usize;
            self.through = Some(Through { r, w, cap });
        }
        let t = self.through.as_ref().expect("made above");
        let n = loop {
            match splice(
                sock,
                None,
                &t.w,
                None,
                len.min(t.cap),
                SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
            ) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(0),
                Err(Errno::ECONNRESET) => return Err(WireError::Closed),
                Err(e) => return Err(io_err(e)),
            }
        };
        self.through_to_console(stream, n);
        Ok(n)
    }

    /// Empties the through pipe, which holds `n` bytes, onto the console.
    fn through_to_console(&mut self, stream: Stream, mut n: usize) {
        let which = usize::from(stream == Stream::Stderr);
        while n > 0 {
            let t = self.through.as_ref().expect("through pipe");
            if self.console_closed || self.no_splice[which] {
                let mut buf = vec![0; n.min(256 << 10)];
                match nix::unistd::read(&t.r, &mut buf) {
                    Ok(k) => {
                        n -= k;
                        self.console(stream, &buf[..k]);
                    }
                    Err(Errno::EINTR) => {}
                    Err(_) => return,
                }
                continue;
            }
            let out = match stream {
                Stream::Stdout => self.stdout.as_fd(),
                Stream::Stderr => self.stderr.as_fd(),
            };
            match splice(&t.r, None, out, None, n, SpliceFFlags::SPLICE_F_MOVE) {
                Ok(k) => n -= k,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => wait_writable(out),
                Err(Errno::EPIPE) => self.console_closed = true,
                Err(_) => self.no_splice[which] = true,
            }
        }
    }

    fn prefixed(&self) -> bool {
        self.opts.tag_output || self.opts.label || self.opts.timestamp
    }

    /// Opens (or, with `truncate_to`, truncates back to a length) the per-rank files.
    pub fn open_files(
        &mut self,
        rank: Rank,
        truncate_to: Option<(u64, u64)>,
    ) -> Result<(), OutputFileError> {
        let Some(dir) = &self.opts.output_dir else {
            return Ok(());
        };
        let rank_dir = PathBuf::from(dir).join(format!("rank.{rank}"));
        std::fs::create_dir_all(&rank_dir).map_err(|source| OutputFileError {
            path: rank_dir.clone(),
            source,
        })?;
        for (stream, len) in [
            (Stream::Stdout, truncate_to.map(|t| t.0)),
            (Stream::Stderr, truncate_to.map(|t| t.1)),
        ] {
            let path = rank_dir.join(stream.name());
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| OutputFileError {
                    path: path.clone(),
                    source,
                })?;
            match len {
                Some(len) => file.set_len(len).map_err(|source| OutputFileError {
                    path: path.clone(),
                    source,
                })?,
                None => file.set_len(0).map_err(|source| OutputFileError {
                    path: path.clone(),
                    source,
                })?,
            }
            self.files.insert((rank, stream), file);
        }
        Ok(())
    }

    /// Writes a chunk of a rank's output.
    pub fn write(&mut self, rank: Rank, stream: Stream, bytes: &[u8]) {
        if let Some(f) = self.files.get_mut(&(rank, stream)) {
            let _ = f.write_all(bytes);
        }
        if !self.prefixed() {
            self.console(stream, bytes);
            return;
        }
        let mut buf = self.partial.remove(&(rank, stream)).unwrap_or_default();
        buf.extend_from_slice(bytes);
        let mut out = Vec::with_capacity(buf.len() + 64);
        let mut start = 0;
        while let Some(pos) = buf[start..].iter().position(|&b| b == b'\n') {
            self.prefix(&mut out, rank, stream);
            out.extend_from_slice(&buf[start..start + pos + 1]);
            start += pos + 1;
        }
        buf.drain(..start);
        if !buf.is_empty() {
            self.partial.insert((rank, stream), buf);
        }
        self.console(stream, &out);
    }

    /// Flushes a held partial line of a rank that has exited (with a newline added).
    pub fn finish_rank(&mut self, rank: Rank) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            if let Some(mut rest) = self.partial.remove(&(rank, stream)) {
                let mut out = Vec::new();
                self.prefix(&mut out, rank, stream);
                rest.push(b'\n');
                out.extend_from_slice(&rest);
                self.console(stream, &out);
            }
        }
    }

    fn prefix(&self, out: &mut Vec<u8>, rank: Rank, stream: Stream) {
        if self.opts.timestamp {
            let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
            let _ = write!(out, "[{now}] ");
        }
        if self.opts.tag_output {
            let _ = write!(out, "[{rank}]<{}>: ", stream.name());
        } else if self.opts.label {
            let _ = write!(out, "{rank}: ");
        }
    }

    fn console(&mut self, stream: Stream, bytes: &[u8]) {
        if bytes.is_empty() || self.console_closed {
            return;
        }
        // Straight to the fd: no line buffering of binary data, no copy.
        let r = match stream {
            Stream::Stdout => write_fd(self.stdout.as_fd(), bytes),
            Stream::Stderr => write_fd(self.stderr.as_fd(), bytes),
        };
        if let Err(e) = r {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                self.console_closed = true;
            }
        }
    }
}

/// A non-blocking console: waits until it takes more.
fn wait_writable(fd: BorrowedFd<'_>) {
    let mut p = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLOUT)];
    let _ = nix::poll::poll(&mut p, nix::poll::PollTimeout::NONE);
}

fn write_fd(fd: std::os::fd::BorrowedFd<'_>, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match nix::unistd::write(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => wait_writable(fd),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A progress bar on a terminal for a checkpoint or restore (ranks done, bytes); nothing
/// otherwise: the summary line says it all.
pub fn progress_bar(prefix: &'static str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {prefix} [{bar:30}] {pos}/{len} ranks, {msg} ({elapsed})",
    ) {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_prefix(prefix);
    b.enable_steady_tick(std::time::Duration::from_millis(100));
    Some(b)
}
