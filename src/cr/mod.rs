//! The rank side: what an application links to take part in its checkpoints, BLCR's libcr
//! rebuilt (the C ABI over it is `sys::capi`, header `include/libcr.h`).
//!
//! A rank started by lamcr finds its **callback socket** in `LAMCR_CR_FD`. [`init`] connects the
//! library to it and starts the `lamcr-cr` thread, which blocks reading that socket. When lamd
//! checkpoints the node it sends `Prepare`; the thread then
//!
//! 1. waits until no critical section is held ([`enter_cs`]; [`status`] is `Pending`),
//! 2. runs the thread-context callbacks, newest first, nested: each one's [`checkpoint`] runs the
//!    next older one, and the innermost goes on to
//! 3. interrupt, with the checkpoint signal, every thread that registered signal-context callbacks;
//!    each runs its own, newest first, nested, and waits in the innermost `checkpoint()`;
//! 4. with the `self` engine, writes what the callbacks gave [`save_state`] to the path lamd named,
//! 5. answers `Ready` (or the first failure flag) and waits for lamd's `Resume`: after the dump
//!    (`Continue`), after a CRIU restore (`Restarted`: the thread was blocked in this very read
//!    when the image was taken), or when the checkpoint is cancelled.
//!
//! Every `checkpoint()` of the round then returns that outcome and the callbacks unwind. The socket
//! survives CRIU like the stdio pipes: lamd declares it external and hands a fresh one in at
//! restore. Ranks that never call [`init`] are checkpointed transparently by CRIU.

pub(crate) mod round;

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::schema::codec;
use crate::schema::wire::{FromRank, ToRank};

pub use crate::sys::cr::register_signal;

/// `LAMCR_CR_FD`: the callback socket's fd number in a rank.
pub const ENV_FD: &str = "LAMCR_CR_FD";
/// `LAMCR_CR_RESTART`: set (to the epoch) when a `self`-engine restart started this rank.
pub const ENV_RESTART: &str = "LAMCR_CR_RESTART";
/// `LAMCR_CR_STATE_FD`: with `LAMCR_CR_RESTART`, the fd of the state the rank saved.
pub const ENV_STATE_FD: &str = "LAMCR_CR_STATE_FD";
/// Version of the rank protocol, sent in `Hello`.
pub const RANK_PROTOCOL: u32 = 1;

/// libcr's `cr_checkpoint()` flags. The high 16 bits carry a user code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags(pub u32);

impl Flags {
    /// Ready to be checkpointed.
    pub const READY: Flags = Flags(0);
    /// Cancel this checkpoint; every rank continues.
    pub const TEMP_FAILURE: Flags = Flags(1);
    /// Cancel this checkpoint and end the job (this process exits with the code, or 1).
    pub const PERM_FAILURE: Flags = Flags(2);
    /// Go on without me: CRIU still saves this rank transparently; the `self` engine saves no
    /// state for it, so a restart starts it afresh.
    pub const OMIT: Flags = Flags(4);

    /// The flag with a user code (libcr's `*_CODE(v)`).
    pub fn with_code(self, code: u16) -> Flags {
        Flags((self.0 & 0xffff) | (u32::from(code) << 16))
    }
    pub fn code(self) -> u16 {
        (self.0 >> 16) as u16
    }
    fn kind(self) -> u32 {
        self.0 & 0xffff
    }
}

/// Where a callback runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// In the library's checkpoint thread: may do anything (allocate, lock, write files).
    Thread,
    /// In a signal handler of the thread that registered it: async-signal-safe work only.
    Signal,
}

/// How `checkpoint()` returned successfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The checkpoint is taken; this process goes on.
    Continue,
    /// This process was restarted from the checkpoint.
    Restarted,
}

/// How this process started, as [`init`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Fresh,
    /// A `self`-engine restart: [`restored_state`] holds what the callbacks saved.
    Restarted,
}

/// [`status`]: whether a checkpoint concerns this process right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Idle,
    /// Requested, waiting for the last critical section to be left.
    Pending,
    /// The callbacks are running.
    Active,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CrError {
    #[error("checkpoint() is only callable inside a checkpoint callback")]
    NotInCallback,
    #[error("the checkpoint was cancelled")]
    TempFailure,
    #[error("the checkpoint failed permanently; the job ends")]
    PermFailure,
    #[error("this process was omitted from the checkpoint")]
    Omitted,
    #[error("not started by lamcr ({ENV_FD} is not set to a socket)")]
    NotUnderLamcr,
    #[error("the library is not initialised (call init first)")]
    NotInitialized,
    #[error("the connection to lamd failed")]
    Io,
}

/// Identifies a registered callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallbackId(pub u64);

pub(crate) type CallbackFn = Arc<dyn Fn() -> i32 + Send + Sync>;

pub(crate) struct Registered {
    id: u64,
    context: Context,
    /// The registering thread (signal context only).
    tid: i32,
    f: CallbackFn,
}

struct Client {
    writer: Mutex<UnixStream>,
    start: Start,
}

/// Critical sections and status, shared by the app's threads and the checkpoint thread.
struct Gate {
    cs: usize,
    status: Status,
    /// Rounds finished, so `leave` can wait for the one it let run.
    rounds_done: u64,
}

static CLIENT: Mutex<Option<Arc<Client>>> = Mutex::new(None);
static GATE: Mutex<Gate> = Mutex::new(Gate {
    cs: 0,
    status: Status::Idle,
    rounds_done: 0,
});
static GATE_CV: Condvar = Condvar::new();
static CALLBACKS: Mutex<Vec<Registered>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static SAVED: Mutex<Option<Vec<u8>>> = Mutex::new(None);
static RESTORED: Mutex<Option<Vec<u8>>> = Mutex::new(None);

/// Connects this rank to its lamd. Idempotent. Outside lamcr it fails with
/// [`CrError::NotUnderLamcr`], and the rest of the API still works locally (critical sections,
/// registration) so an app can run either way.
pub fn init() -> Result<Start, CrError> {
    let mut client = CLIENT.lock();
    if let Some(c) = client.as_ref() {
        return Ok(c.start);
    }
    let fd: i32 = std::env::var(ENV_FD)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or(CrError::NotUnderLamcr)?;
    let sock = adopt_socket(fd).ok_or(CrError::NotUnderLamcr)?;
    let start = match restored_from_env() {
        Some(state) => {
            *RESTORED.lock() = Some(state);
            Start::Restarted
        }
        None => Start::Fresh,
    };
    crate::sys::cr::install_checkpoint_signal(round::signal_number(), round::on_signal)
        .map_err(|_| CrError::Io)?;
    let reader = sock.try_clone().map_err(|_| CrError::Io)?;
    let mut writer = sock;
    send(
        &mut writer,
        &FromRank::Hello {
            version: RANK_PROTOCOL,
            pid: std::process::id(),
        },
    )?;
    let c = Arc::new(Client {
        writer: Mutex::new(writer),
        start,
    });
    std::thread::Builder::new()
        .name("lamcr-cr".into())
        .spawn(move || round::serve(reader))
        .map_err(|_| CrError::Io)?;
    *client = Some(c);
    Ok(start)
}

/// Takes the inherited callback socket, if `fd` is one (a Unix socket).
fn adopt_socket(fd: i32) -> Option<UnixStream> {
    use nix::sys::socket::{AddressFamily, SockaddrLike, SockaddrStorage, getsockname};
    use std::os::fd::{AsRawFd, IntoRawFd};
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(format!("/proc/self/fd/{fd}")).ok()?;
    if !meta.file_type().is_socket() {
        return None;
    }
    let owned: OwnedFd = crate::sys::take_inherited_fd(fd);
    let unix = getsockname::<SockaddrStorage>(owned.as_raw_fd())
        .ok()
        .is_some_and(|a| a.family() == Some(AddressFamily::Unix));
    if !unix {
        // Not ours: leave it open for whoever owns it.
        let _ = owned.into_raw_fd();
        return None;
    }
    // Children the rank execs must not inherit it.
    let _ = nix::fcntl::fcntl(
        owned.as_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Some(UnixStream::from(owned))
}

fn restored_from_env() -> Option<Vec<u8>> {
    std::env::var_os(ENV_RESTART)?;
    let fd: i32 = std::env::var(ENV_STATE_FD).ok()?.parse().ok()?;
    if !std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .ok()?
        .is_file()
    {
        return None;
    }
    let mut f = std::fs::File::from(crate::sys::take_inherited_fd(fd));
    let mut state = Vec::new();
    f.read_to_end(&mut state).ok()?;
    Some(state)
}

/// How this process started (after [`init`]).
pub fn start() -> Option<Start> {
    CLIENT.lock().as_ref().map(|c| c.start)
}

/// Registers a thread-context callback: it runs in the library's checkpoint thread and should call
/// [`checkpoint`] once, with [`Flags::READY`] or a failure flag. A callback that returns without
/// calling it is taken as READY. Its return value is kept for libcr compatibility only.
pub fn register_thread(callback: impl Fn() -> i32 + Send + Sync + 'static) -> CallbackId {
    register_any(Context::Thread, Arc::new(callback))
}

pub(crate) fn register_any(context: Context, f: CallbackFn) -> CallbackId {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let tid = crate::sys::cr::gettid();
    let _masked = crate::sys::cr::block_signal(round::signal_number());
    CALLBACKS.lock().push(Registered {
        id,
        context,
        tid,
        f,
    });
    CallbackId(id)
}

/// Removes a callback (it will not run in later checkpoints).
pub fn unregister(id: CallbackId) {
    let _masked = crate::sys::cr::block_signal(round::signal_number());
    CALLBACKS.lock().retain(|c| c.id != id.0);
}

/// Inside a callback: lets the checkpoint proceed (READY) or fails it, and returns when the
/// round is over: `Continue` after the image is taken, `Restarted` in the restored process.
pub fn checkpoint(flags: Flags) -> Result<Outcome, CrError> {
    round::checkpoint(flags)
}

/// Inside a thread-context callback: the application state the `self` engine saves for this
/// rank. A restart hands it back through [`restored_state`].
pub fn save_state(state: &[u8]) {
    *SAVED.lock() = Some(state.to_vec());
}

/// The state saved at the checkpoint this process was restarted from (`self` engine).
pub fn restored_state() -> Option<Vec<u8>> {
    RESTORED.lock().clone()
}

/// Asks for a checkpoint of the whole job. It is taken asynchronously: this process's callbacks
/// run as part of it (after the last critical section is left, if one is held).
pub fn request_checkpoint() -> Result<(), CrError> {
    let _masked = crate::sys::cr::block_signal(round::signal_number());
    let client = CLIENT.lock().clone().ok_or(CrError::NotInitialized)?;
    let mut w = client.writer.lock();
    send(&mut w, &FromRank::RequestCheckpoint)
}

/// Idle, Pending (requested, held back by a critical section) or Active (callbacks running).
pub fn status() -> Status {
    GATE.lock().status
}

/// Waits until [`status`] is `want`, at most `timeout`; returns whether it is.
pub fn wait_status(want: Status, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut g = GATE.lock();
    while g.status != want {
        if GATE_CV.wait_until(&mut g, deadline).timed_out() {
            return g.status == want;
        }
    }
    true
}

/// A held critical section: no checkpoint of this process starts while one is held. Leaving the
/// last one runs a checkpoint that was requested meanwhile before `leave` (or drop) returns.
#[must_use = "the critical section ends when this is dropped"]
pub struct CriticalSection {
    counted: bool,
}

/// Enters a critical section, waiting while a checkpoint is pending or running. Inside a
/// checkpoint callback it returns at once.
pub fn enter_cs() -> CriticalSection {
    if round::in_callback() {
        return CriticalSection { counted: false };
    }
    let mut g = GATE.lock();
    while g.status != Status::Idle {
        GATE_CV.wait(&mut g);
    }
    g.cs += 1;
    CriticalSection { counted: true }
}

/// Enters a critical section unless a checkpoint is pending or running.
pub fn try_enter_cs() -> Option<CriticalSection> {
    if round::in_callback() {
        return Some(CriticalSection { counted: false });
    }
    let mut g = GATE.lock();
    if g.status != Status::Idle {
        return None;
    }
    g.cs += 1;
    Some(CriticalSection { counted: true })
}

impl CriticalSection {
    /// Leaves the critical section (same as dropping it).
    pub fn leave(self) {}
}

impl Drop for CriticalSection {
    fn drop(&mut self) {
        if self.counted {
            leave_cs_raw();
        }
    }
}

/// Counted enter/leave for the C ABI (`cr_enter_cs` / `cr_leave_cs`).
pub(crate) fn enter_cs_raw() {
    std::mem::forget(enter_cs());
}

pub(crate) fn try_enter_cs_raw() -> bool {
    try_enter_cs().map(std::mem::forget).is_some()
}

pub(crate) fn leave_cs_raw() {
    if round::in_callback() {
        return;
    }
    let mut g = GATE.lock();
    g.cs = g.cs.saturating_sub(1);
    if g.cs == 0 && g.status == Status::Pending {
        // The checkpoint thread waits for this: let it run the round, and return only after.
        let seen = g.rounds_done;
        GATE_CV.notify_all();
        while g.rounds_done == seen {
            GATE_CV.wait(&mut g);
        }
    }
}

fn send(w: &mut UnixStream, msg: &FromRank) -> Result<(), CrError> {
    let mut buf = Vec::new();
    crate::schema::wire::push_message(&mut buf, msg);
    w.write_all(&buf).map_err(|_| CrError::Io)
}

fn send_ready(round: u64, flags: Flags) -> Result<(), CrError> {
    let client = CLIENT.lock().clone().ok_or(CrError::NotInitialized)?;
    let mut w = client.writer.lock();
    send(
        &mut w,
        &FromRank::Ready {
            round,
            flags: flags.0,
        },
    )
}

/// Reads one message from lamd (blocking). None at EOF or on a malformed frame.
fn recv(r: &mut UnixStream) -> Option<ToRank> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).ok()?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > crate::schema::wire::MAX_FRAME {
        return None;
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    if body[0] != 0 {
        return None;
    }
    codec::decode(&body[1..]).ok()
}
