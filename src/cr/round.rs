//! One checkpoint round inside a rank: the gate, the nested callback chains, the signal phase and
//! the answer to lamd. See the module documentation of [`crate::cr`] for the sequence.
//!
//! Everything reachable from [`on_signal`] is async-signal-safe: const thread-locals, atomics,
//! futex and tgkill system calls, and the application's signal-context callbacks.

use std::cell::Cell;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{
    CALLBACKS, CallbackFn, Context, CrError, Flags, GATE, GATE_CV, Outcome, SAVED, Status, recv,
    send_ready,
};
use crate::schema::Engine;
use crate::schema::wire::{Resumed, ToRank};
use crate::sys::cr::{futex_wait_until, futex_wake, gettid};

/// How a round ended for the callbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    Continue = 1,
    Restarted = 2,
    Cancelled = 3,
    Perm = 4,
    Omitted = 5,
}

impl Out {
    fn from_code(c: u32) -> Out {
        match c {
            1 => Out::Continue,
            2 => Out::Restarted,
            4 => Out::Perm,
            5 => Out::Omitted,
            _ => Out::Cancelled,
        }
    }
    fn result(self) -> Result<Outcome, CrError> {
        match self {
            Out::Continue => Ok(Outcome::Continue),
            Out::Restarted => Ok(Outcome::Restarted),
            Out::Cancelled => Err(CrError::TempFailure),
            Out::Perm => Err(CrError::PermFailure),
            Out::Omitted => Err(CrError::Omitted),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Thread,
    Signal,
}

/// Where the current thread is in a callback chain.
#[derive(Debug, Clone, Copy)]
struct Pos {
    kind: Kind,
    idx: usize,
    result: Option<Out>,
}

/// One thread's signal-context callbacks for a round, newest first.
pub(crate) struct SigThread {
    tid: i32,
    callbacks: Vec<CallbackFn>,
}

/// What the checkpoint thread and the signal handlers share during a round.
pub(crate) struct SignalRound {
    threads: Vec<SigThread>,
    /// Threads whose innermost `checkpoint()` was reached.
    ready: AtomicU32,
    /// Threads that left the handler.
    left: AtomicU32,
    /// 0 while undecided, else an [`Out`] code.
    outcome: AtomicU32,
    /// The first failure flag a signal-context callback gave, else 0.
    flags: AtomicU32,
}

thread_local! {
    static CHAIN: Cell<Option<Pos>> = const { Cell::new(None) };
    static SIG_THREAD: Cell<Option<&'static SigThread>> = const { Cell::new(None) };
    static SIG_ROUND: Cell<Option<&'static SignalRound>> = const { Cell::new(None) };
}

/// The checkpoint thread's round.
struct RoundCtx {
    round: u64,
    engine: Engine,
    state_path: Option<String>,
    deadline: Instant,
    callbacks: Vec<CallbackFn>,
    reader: UnixStream,
    perm_code: Option<u16>,
}

static CTX: Mutex<Option<RoundCtx>> = Mutex::new(None);

/// The checkpoint signal: `$LAMCR_CR_SIGNAL`, else SIGRTMIN+4.
pub(crate) fn signal_number() -> i32 {
    std::env::var("LAMCR_CR_SIGNAL")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| libc::SIGRTMIN() + 4)
}

pub(crate) fn in_callback() -> bool {
    CHAIN.with(|c| c.get().is_some())
}

/// The `lamcr-cr` thread: waits for lamd's `Prepare` and runs each round.
pub(crate) fn serve(mut reader: UnixStream) {
    loop {
        match recv(&mut reader) {
            None => return, // lamd is gone: the job is ending
            Some(ToRank::Prepare {
                round,
                engine,
                state_path,
                timeout_ms,
            }) => {
                let ctx = RoundCtx {
                    round,
                    engine,
                    state_path,
                    deadline: Instant::now() + Duration::from_millis(timeout_ms),
                    callbacks: Vec::new(),
                    reader,
                    perm_code: None,
                };
                let (r, perm) = run_round(ctx);
                reader = r;
                if let Some(code) = perm {
                    // PERM_FAILURE: the checkpoint is cancelled and this process ends the job.
                    std::process::exit(if code == 0 { 1 } else { i32::from(code) });
                }
            }
            Some(ToRank::Resume { .. }) => {} // of a round this process already left
        }
    }
}

fn run_round(mut ctx: RoundCtx) -> (UnixStream, Option<u16>) {
    {
        let mut g = GATE.lock();
        g.status = Status::Pending;
        GATE_CV.notify_all();
        while g.cs > 0 {
            GATE_CV.wait(&mut g);
        }
        g.status = Status::Active;
        GATE_CV.notify_all();
    }
    ctx.callbacks = CALLBACKS
        .lock()
        .iter()
        .rev()
        .filter(|c| c.context == Context::Thread)
        .map(|c| c.f.clone())
        .collect();
    *CTX.lock() = Some(ctx);
    let _ = run_from(Kind::Thread, 0);
    let ctx = CTX.lock().take().expect("round context");
    {
        let mut g = GATE.lock();
        g.status = Status::Idle;
        g.rounds_done += 1;
        GATE_CV.notify_all();
    }
    (ctx.reader, ctx.perm_code)
}

/// Runs callback `idx` of the chain (and, through its `checkpoint()`, the rest).
fn run_from(kind: Kind, idx: usize) -> Out {
    let f: Option<&CallbackFn>;
    let owned: Option<CallbackFn>;
    match kind {
        Kind::Thread => {
            owned = CTX
                .lock()
                .as_ref()
                .and_then(|c| c.callbacks.get(idx).cloned());
            f = owned.as_ref();
        }
        Kind::Signal => {
            f = SIG_THREAD
                .with(Cell::get)
                .and_then(|t| t.callbacks.get(idx));
        }
    }
    let Some(f) = f else {
        return innermost(kind, Flags::READY);
    };
    let prev = CHAIN.with(|c| {
        c.replace(Some(Pos {
            kind,
            idx,
            result: None,
        }))
    });
    let _ = f();
    let pos = CHAIN.with(Cell::get);
    let out = match pos.and_then(|p| p.result) {
        Some(o) => o,
        // Returned without calling checkpoint(): taken as READY.
        None => proceed(kind, idx, Flags::READY),
    };
    CHAIN.with(|c| c.set(prev));
    out
}

pub(crate) fn checkpoint(flags: Flags) -> Result<Outcome, CrError> {
    let Some(pos) = CHAIN.with(Cell::get) else {
        return Err(CrError::NotInCallback);
    };
    if let Some(o) = pos.result {
        return o.result();
    }
    let o = proceed(pos.kind, pos.idx, flags);
    CHAIN.with(|c| {
        c.set(Some(Pos {
            result: Some(o),
            ..pos
        }))
    });
    o.result()
}

fn proceed(kind: Kind, idx: usize, flags: Flags) -> Out {
    if flags.kind() != Flags::READY.0 {
        // A failure skips the older callbacks: the round ends here.
        return innermost(kind, flags);
    }
    run_from(kind, idx + 1)
}

fn innermost(kind: Kind, flags: Flags) -> Out {
    match kind {
        Kind::Thread => thread_innermost(flags),
        Kind::Signal => signal_innermost(flags),
    }
}

/// The bottom of the thread-context chain: signal phase, state, answer to lamd, outcome.
fn thread_innermost(mut flags: Flags) -> Out {
    let (round, engine, state_path, deadline) = {
        let c = CTX.lock();
        let c = c.as_ref().expect("round context");
        (c.round, c.engine, c.state_path.clone(), c.deadline)
    };
    let mut sig = None;
    if flags.kind() == Flags::READY.0 {
        if let Some((r, all)) = signal_phase(deadline) {
            let f = r.flags.load(Ordering::Acquire);
            if f != 0 {
                flags = Flags(f);
            } else if !all {
                eprintln!("lamcr: a thread's signal-context callbacks did not run in time");
                flags = Flags::TEMP_FAILURE;
            }
            sig = Some(r);
        }
    }
    if flags.kind() == Flags::READY.0 && engine == Engine::SelfState {
        if let Err(e) = write_state(state_path.as_deref()) {
            eprintln!("lamcr: cannot save this rank's state: {e}");
            flags = Flags::TEMP_FAILURE;
        }
    }
    let out = if send_ready(round, flags).is_err() {
        Out::Cancelled
    } else if flags.kind() == Flags::OMIT.0 {
        Out::Omitted
    } else {
        match wait_resume(round) {
            _ if flags.kind() == Flags::PERM_FAILURE.0 => Out::Perm,
            Some(Resumed::Continue) => Out::Continue,
            Some(Resumed::Restarted) => Out::Restarted,
            Some(Resumed::Cancelled) | None => Out::Cancelled,
        }
    };
    if out == Out::Perm {
        if let Some(c) = CTX.lock().as_mut() {
            c.perm_code = Some(flags.code());
        }
    }
    if let Some(r) = sig {
        release(r, out);
    }
    out
}

fn wait_resume(round: u64) -> Option<Resumed> {
    // Only this thread uses CTX while a round runs; holding it across the read blocks nobody.
    let mut ctx = CTX.lock();
    let reader = &mut ctx.as_mut()?.reader;
    loop {
        match recv(reader)? {
            ToRank::Resume { round: r, how } if r == round => return Some(how),
            _ => continue,
        }
    }
}

fn write_state(path: Option<&str>) -> std::io::Result<()> {
    let path = path.ok_or_else(|| std::io::Error::other("lamd named no state file"))?;
    let state = SAVED.lock().take().unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(&state)?;
    f.sync_all()
}

/// Interrupts every thread with signal-context callbacks and waits until each has reached its
/// innermost `checkpoint()`. Returns the round and whether all did before `deadline`.
fn signal_phase(deadline: Instant) -> Option<(&'static SignalRound, bool)> {
    let me = gettid();
    let mut threads: Vec<SigThread> = Vec::new();
    for c in CALLBACKS.lock().iter().rev() {
        if c.context != Context::Signal || c.tid == me {
            continue;
        }
        match threads.iter_mut().find(|t| t.tid == c.tid) {
            Some(t) => t.callbacks.push(c.f.clone()),
            None => threads.push(SigThread {
                tid: c.tid,
                callbacks: vec![c.f.clone()],
            }),
        }
    }
    if threads.is_empty() {
        return None;
    }
    let n = threads.len() as u32;
    let round = crate::sys::cr::publish(Box::new(SignalRound {
        threads,
        ready: AtomicU32::new(0),
        left: AtomicU32::new(0),
        outcome: AtomicU32::new(0),
        flags: AtomicU32::new(0),
    }));
    let sig = signal_number();
    let mut gone = Vec::new();
    for t in &round.threads {
        if crate::sys::cr::signal_thread(t.tid, sig).is_err() {
            // The thread has exited: its callbacks go with it.
            gone.push(t.tid);
            round.ready.fetch_add(1, Ordering::AcqRel);
            round.left.fetch_add(1, Ordering::AcqRel);
        }
    }
    let all = futex_wait_until(&round.ready, Some(deadline), |v| v >= n);
    if !gone.is_empty() {
        // Only now: a signalled thread may hold this lock until its handler is released, but
        // every live one has reached checkpoint() or missed the deadline by here. Threads that
        // exited take their callbacks with them.
        if let Some(mut cbs) = CALLBACKS.try_lock_for(Duration::from_millis(100)) {
            cbs.retain(|c| c.context != Context::Signal || !gone.contains(&c.tid));
        }
    }
    Some((round, all))
}

fn release(round: &'static SignalRound, out: Out) {
    round.outcome.store(out as u32, Ordering::Release);
    futex_wake(&round.outcome);
    // Wait for the threads that reached checkpoint() to unwind; one that had not by now sees
    // the outcome and skips its callbacks (the hazard count in `retire` covers a late one).
    let _ = futex_wait_until(
        &round.left,
        Some(Instant::now() + Duration::from_secs(5)),
        |v| v >= round.ready.load(Ordering::Acquire),
    );
    crate::sys::cr::retire(round, Duration::from_secs(1));
}

fn signal_innermost(flags: Flags) -> Out {
    let Some(round) = SIG_ROUND.with(Cell::get) else {
        return Out::Cancelled;
    };
    if flags.kind() != Flags::READY.0 {
        let _ = round
            .flags
            .compare_exchange(0, flags.0, Ordering::AcqRel, Ordering::Acquire);
    }
    round.ready.fetch_add(1, Ordering::AcqRel);
    futex_wake(&round.ready);
    futex_wait_until(&round.outcome, None, |v| v != 0);
    Out::from_code(round.outcome.load(Ordering::Acquire))
}

/// The checkpoint signal's handler (signal context).
pub(crate) fn on_signal() {
    let errno = nix::errno::Errno::last_raw();
    let entered = crate::sys::cr::enter();
    if let Some(round) = entered.round() {
        let tid = gettid();
        if round.outcome.load(Ordering::Acquire) == 0 {
            if let Some(t) = round.threads.iter().find(|t| t.tid == tid) {
                let prev_t = SIG_THREAD.with(|c| c.replace(Some(t)));
                let prev_r = SIG_ROUND.with(|c| c.replace(Some(round)));
                let prev = CHAIN.with(|c| c.replace(None));
                let _ = run_from(Kind::Signal, 0);
                CHAIN.with(|c| c.set(prev));
                SIG_ROUND.with(|c| c.set(prev_r));
                SIG_THREAD.with(|c| c.set(prev_t));
                round.left.fetch_add(1, Ordering::AcqRel);
                futex_wake(&round.left);
            }
        }
    }
    drop(entered);
    nix::errno::Errno::set_raw(errno);
}
