//! A client for CRIU's RPC ("swrk") mode.
//!
//! The caller (a lamd) makes a `SOCK_SEQPACKET` socketpair, starts `criu swrk 3` as its own child
//! with the other end on fd 3, and sends one `criu_req` per packet. While a request runs, CRIU may
//! send `NOTIFY` messages at its action-script stages; each is answered before CRIU goes on. lamd
//! uses `post-dump` (ranks still frozen) to drain the rank pipes, so output written before the dump
//! is forwarded exactly once.
//!
//! Running criu as the daemon's child matters for restore: with `rst_sibling` the restored tree
//! becomes a sibling of criu, i.e. the daemon's child, so `waitpid` sees the ranks' real statuses.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, recv, send, socketpair};
use nix::sys::wait::{WaitStatus, waitpid};
use protobuf::Message;
use rust_criu::rust_criu_protobuf::rpc::{
    Criu_network_lock_method, Criu_opts, Criu_req, Criu_req_type, Criu_resp, Inherit_fd,
};

use crate::sys::{SpawnSpec, spawn};

/// The CRIU version lamcr is built and tested against.
pub const REQUIRED_VERSION: &str = "4.2";

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("criu not found (set LAMCR_CRIU or install CRIU {REQUIRED_VERSION}: scripts/setup.sh)")]
    NotFound,
    #[error("cannot start criu")]
    Spawn(#[source] std::io::Error),
    #[error("criu rpc i/o failed")]
    Io(#[source] nix::errno::Errno),
    #[error("criu sent a malformed response")]
    Protocol(#[source] protobuf::Error),
    #[error("criu {action} failed: {message} (log: {log})")]
    Failed {
        action: &'static str,
        message: String,
        log: String,
    },
    #[error("criu exited before answering (log: {log})")]
    Died { log: String },
}

/// Where criu is: `$LAMCR_CRIU`, or `criu` in PATH, or the usual sbin directories.
pub fn criu_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LAMCR_CRIU") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin".into(), "/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("criu"))
        .find(|p| p.is_file())
}

/// Settings shared by dump and restore.
pub struct Common<'a> {
    /// Directory holding the images (criu reads it through /proc/<our pid>/fd).
    pub images_dir: BorrowedFd<'a>,
    /// Directory for criu's log.
    pub work_dir: BorrowedFd<'a>,
    pub log_file: &'a str,
    /// Keep established TCP connections (locks the network with nftables while dumping).
    pub tcp_established: bool,
    /// Resources outside the tree, e.g. `unix[INODE]` for the ranks' callback sockets.
    pub external: &'a [String],
}

fn base_opts(c: &Common<'_>) -> Criu_opts {
    let mut opts = Criu_opts::new();
    opts.set_images_dir_fd(c.images_dir.as_raw_fd());
    opts.set_work_dir_fd(c.work_dir.as_raw_fd());
    opts.set_log_file(c.log_file.to_string());
    let level = std::env::var("LAMCR_CRIU_LOG_LEVEL")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(2);
    opts.set_log_level(level);
    opts.set_notify_scripts(true);
    opts.external = c.external.to_vec();
    // UCX / shm users keep big unlinked files; CRIU's 1 MiB default is far too small.
    opts.set_ghost_limit(256 << 20);
    if c.tcp_established {
        opts.set_tcp_established(true);
        opts.set_network_lock(Criu_network_lock_method::NFTABLES);
    }
    opts
}

/// Errors CRIU logs on this kernel although nothing is wrong: never the reason a call failed.
const HARMLESS: &[&str] = &["Can't setup RLIMIT_NOFILE for self"];

impl CriuError {
    /// CRIU reports the *first* error it logged; when that one is harmless, the reason is the next
    /// error line of the log (read through the work directory fd).
    fn explained(self, common: &Common<'_>) -> Self {
        match self {
            CriuError::Failed {
                action,
                message,
                log,
            } if HARMLESS.iter().any(|h| message.contains(h)) => {
                let path = format!(
                    "/proc/self/fd/{}/{}",
                    common.work_dir.as_raw_fd(),
                    common.log_file
                );
                let better = std::fs::read_to_string(path)
                    .ok()
                    .and_then(|text| {
                        text.lines()
                            .filter(|l| l.starts_with("Error"))
                            .find(|l| !HARMLESS.iter().any(|h| l.contains(h)))
                            .map(str::to_string)
                    })
                    .unwrap_or(message);
                CriuError::Failed {
                    action,
                    message: better,
                    log,
                }
            }
            other => other,
        }
    }
}

/// Dumps the process tree rooted at `pid`, which keeps running (or, with `stop`, stays stopped). `on_notify` is called with each
/// action-script stage name while the tree is frozen; returning false fails the dump.
pub fn dump(
    pid: i32,
    common: &Common<'_>,
    stop: bool,
    on_notify: &mut dyn FnMut(&str) -> bool,
) -> Result<(), CriuError> {
    let mut opts = base_opts(common);
    opts.set_pid(pid);
    opts.set_leave_running(true);
    if stop {
        // Stopped, not running, from the dump on: nothing happens after the image is taken.
        opts.set_leave_stopped(true);
    }
    let mut session = Session::start(&[])?;
    session
        .call(
            Criu_req_type::DUMP,
            opts,
            on_notify,
            "dump",
            common.log_file,
        )
        .map_err(|e| e.explained(common))?;
    session.finish();
    Ok(())
}

/// Restores the tree in the images as children of the calling process. `inherit` maps CRIU's
/// names of external objects (`pipe:[INODE]`) to fds of ours that replace them. Returns the pid of
/// the restored root.
pub fn restore(
    common: &Common<'_>,
    inherit: &[(String, BorrowedFd<'_>)],
    on_notify: &mut dyn FnMut(&str) -> bool,
) -> Result<i32, CriuError> {
    let mut opts = base_opts(common);
    opts.set_rst_sibling(true);
    // Fds are mapped into criu's process at 10, 11, ... and named by those numbers.
    let mut fds = Vec::new();
    for (i, (key, fd)) in inherit.iter().enumerate() {
        let target = 10 + i as RawFd;
        fds.push((fd.as_raw_fd(), target));
        let mut inh = Inherit_fd::new();
        inh.set_key(key.clone());
        inh.set_fd(target);
        opts.inherit_fd.push(inh);
    }
    let mut session = Session::start(&fds)?;
    let resp = session
        .call(
            Criu_req_type::RESTORE,
            opts,
            on_notify,
            "restore",
            common.log_file,
        )
        .map_err(|e| e.explained(common))?;
    session.finish();
    Ok(resp.restore.as_ref().map(|r| r.pid()).unwrap_or(-1))
}

/// A running `criu swrk` child and our end of its socket.
struct Session {
    sock: Option<OwnedFd>,
    pid: nix::unistd::Pid,
    reaped: bool,
}

impl Session {
    fn start(extra_fds: &[(RawFd, RawFd)]) -> Result<Self, CriuError> {
        let criu = criu_path().ok_or(CriuError::NotFound)?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(CriuError::Io)?;
        let mut fds = vec![(theirs.as_raw_fd(), 3)];
        fds.extend_from_slice(extra_fds);
        let spec = SpawnSpec {
            program: criu,
            argv: vec!["criu".into(), "swrk".into(), "3".into()],
            env: std::env::vars_os().collect(),
            fds,
            ..Default::default()
        };
        let pid = spawn(&spec).map_err(CriuError::Spawn)?;
        drop(theirs);
        Ok(Self {
            sock: Some(ours),
            pid,
            reaped: false,
        })
    }

    fn fd(&self) -> RawFd {
        self.sock.as_ref().map_or(-1, |s| s.as_fd().as_raw_fd())
    }

    fn send(&self, req: &Criu_req) -> Result<(), CriuError> {
        let bytes = req.write_to_bytes().map_err(CriuError::Protocol)?;
        loop {
            match send(self.fd(), &bytes, MsgFlags::empty()) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(CriuError::Io(e)),
            }
        }
    }

    fn recv(&self, log: &str) -> Result<Criu_resp, CriuError> {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match recv(self.fd(), &mut buf, MsgFlags::empty()) {
                Ok(0) => {
                    return Err(CriuError::Died {
                        log: log.to_string(),
                    });
                }
                Ok(n) => {
                    return Criu_resp::parse_from_bytes(&buf[..n]).map_err(CriuError::Protocol);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(CriuError::Io(e)),
            }
        }
    }

    fn call(
        &mut self,
        kind: Criu_req_type,
        opts: Criu_opts,
        on_notify: &mut dyn FnMut(&str) -> bool,
        action: &'static str,
        log: &str,
    ) -> Result<Criu_resp, CriuError> {
        let mut req = Criu_req::new();
        req.set_type(kind);
        req.opts = Some(opts).into();
        self.send(&req)?;
        loop {
            let resp = self.recv(log)?;
            if resp.type_() == Criu_req_type::NOTIFY {
                let script = resp
                    .notify
                    .as_ref()
                    .map(|n| n.script().to_string())
                    .unwrap_or_default();
                let ok = on_notify(&script);
                let mut ack = Criu_req::new();
                ack.set_type(Criu_req_type::NOTIFY);
                ack.set_notify_success(ok);
                self.send(&ack)?;
                continue;
            }
            if resp.success() {
                return Ok(resp);
            }
            let mut message = resp.cr_errmsg().to_string();
            if message.is_empty() {
                message = match resp.cr_errno() {
                    0 => "no reason given".to_string(),
                    e => nix::errno::Errno::from_raw(e).desc().to_string(),
                };
            }
            return Err(CriuError::Failed {
                action,
                message,
                log: log.to_string(),
            });
        }
    }

    /// Closes the socket (criu then exits) and reaps criu.
    fn finish(mut self) {
        self.sock = None;
        while let Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) =
            waitpid(self.pid, None)
        {}
        self.reaped = true;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(self.pid, None);
        }
    }
}
