//! The rank library's system pieces: the checkpoint signal, futex waits, and the publication of a
//! signal round to signal handlers.
//!
//! A *signal round* is built by the library's checkpoint thread, published here, and read by the
//! checkpoint-signal handler of every thread that registered signal-context callbacks. Handlers
//! announce themselves in [`IN_HANDLER`] before they load the round and leave it after; a round is
//! freed only once it is unpublished and no handler is inside, otherwise it is leaked. That is the
//! whole memory-safety argument for the `&'static` references handed out below.

use std::io;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::cr::round::SignalRound as Round;

static ROUND: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());
static IN_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// The calling thread's kernel id (async-signal-safe).
pub fn gettid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// Sends `sig` to one thread of this process.
pub fn signal_thread(tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: tgkill takes plain integers and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits while `word` holds `expected`, at most `timeout` (async-signal-safe: one system call).
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, aligned 32-bit atomic for the whole call; `ts_ptr` is null or
    // points to a timespec that outlives the call. FUTEX_WAIT only reads both.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            ts_ptr,
        );
    }
}

/// Wakes every waiter on `word` (async-signal-safe).
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a live, aligned 32-bit atomic; FUTEX_WAKE does not access it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

/// Waits until `cond(word)` holds or `deadline` passes; returns whether it holds.
pub fn futex_wait_until(
    word: &AtomicU32,
    deadline: Option<Instant>,
    cond: impl Fn(u32) -> bool,
) -> bool {
    loop {
        let v = word.load(Ordering::Acquire);
        if cond(v) {
            return true;
        }
        let left = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(l) if !l.is_zero() => Some(l),
                _ => return false,
            },
            None => None,
        };
        futex_wait(word, v, left);
    }
}

/// Installs `action` as a handler of `sig` (SA_RESTART: a thread blocked in `read()` goes on
/// reading once its callbacks are done).
pub fn install_checkpoint_signal(sig: i32, action: fn()) -> io::Result<()> {
    // SAFETY: `action` is the library's signal entry, which only loads atomics, makes futex and
    // tgkill system calls and runs callbacks the application registered as signal-context ones,
    // i.e. declared async-signal-safe through the `unsafe` `register_signal`.
    unsafe { signal_hook::low_level::register(sig, action) }.map(drop)
}

/// Publishes a round for the signal handlers. The reference stays valid for ever unless it is
/// passed to [`retire`].
pub(crate) fn publish(round: Box<Round>) -> &'static Round {
    let r: &'static Round = Box::leak(round);
    ROUND.store(r as *const Round as *mut (), Ordering::SeqCst);
    r
}

/// A handler's view of the published round.
pub(crate) struct Entered {
    round: Option<&'static Round>,
}

impl Entered {
    pub(crate) fn round(&self) -> Option<&'static Round> {
        self.round
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        IN_HANDLER.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Called at the start of the checkpoint-signal handler (async-signal-safe).
pub(crate) fn enter() -> Entered {
    IN_HANDLER.fetch_add(1, Ordering::SeqCst);
    let p = ROUND.load(Ordering::SeqCst) as *const Round;
    // SAFETY: ROUND is null or was stored by `publish` from a leaked Box<Round>, and `retire`
    // frees it only after unpublishing it and seeing IN_HANDLER at zero, which cannot happen
    // while this handler's count is held.
    let round = unsafe { p.as_ref() };
    Entered { round }
}

/// Unpublishes `round` and frees it once no handler is inside; leaks it if one stays inside past
/// `wait`. The caller must not use `round` afterwards.
pub(crate) fn retire(round: &'static Round, wait: Duration) {
    let p = round as *const Round as *mut Round;
    let _ = ROUND.compare_exchange(
        p as *mut (),
        std::ptr::null_mut(),
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let deadline = Instant::now() + wait;
    while IN_HANDLER.load(Ordering::SeqCst) != 0 {
        if Instant::now() >= deadline {
            return; // leaked: a late handler may still read it
        }
        std::thread::yield_now();
    }
    // SAFETY: `p` came from Box::leak in `publish`, it is no longer published, no handler is
    // inside (a handler entering from now on loads null or a newer round), and the caller gives
    // up its reference.
    drop(unsafe { Box::from_raw(p) });
}

/// Registers a signal-context callback for the calling thread (libcr's `CR_SIGNAL_CONTEXT`).
///
/// At a checkpoint, after every thread-context callback has reached `checkpoint()`, the thread
/// that registered this callback is interrupted by a signal and its signal-context callbacks run
/// in that handler, newest first, nested. A blocked `read()` in that thread resumes afterwards.
///
/// # Safety
/// `callback` runs in signal context: it may only do async-signal-safe work (no allocation, no
/// locks, no stdio; `write(2)`, atomics and [`crate::cr::checkpoint`] are fine).
pub unsafe fn register_signal(
    callback: impl Fn() -> i32 + Send + Sync + 'static,
) -> crate::cr::CallbackId {
    crate::cr::register_any(crate::cr::Context::Signal, std::sync::Arc::new(callback))
}

/// Keeps `sig` blocked in the calling thread while alive: a thread that holds one of the
/// library's locks must not run signal-context callbacks, which wait for the checkpoint thread.
pub struct SignalBlocked {
    old: libc::sigset_t,
    /// The mask is per thread: the guard must be dropped where it was made.
    _not_send: std::marker::PhantomData<*const ()>,
}

pub fn block_signal(sig: i32) -> SignalBlocked {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset/pthread_sigmask only write the sets
    // we pass, which live on this stack frame or in the returned guard.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        SignalBlocked {
            old,
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for SignalBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `block_signal` in this same thread (the guard is
        // !Send); pthread_sigmask only reads `old`.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut());
        }
    }
}
