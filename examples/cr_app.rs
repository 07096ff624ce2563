//! A rank that takes part in its checkpoints through `lamcr::cr` (BLCR-style callbacks): the
//! complete Rust example of docs/design.md, and the test fixture of tests/callbacks.rs.
//!
//! `cr_app LINES INTERVAL_MS [MODE]` prints `rank R seq N` for N = 0..LINES, one line per
//! INTERVAL_MS, each inside a critical section, so a checkpoint always falls between two lines.
//! Its state (the next N and a 64 KiB pattern derived from it) is what the `self` engine saves.
//! Two thread-context callbacks and one signal-context callback (registered by a thread blocked
//! in `read()`, LAM's pattern) log every step to `$CR_LOG.<rank>`.
//!
//! MODE: `plain` (default); `tempfail`: the first checkpoint is cancelled (TEMP_FAILURE, code 7);
//! `perm`: PERM_FAILURE with code 9; `wait`: the callback waits until the file `$CR_LOG.go`
//! exists; `cs`: rank 0 requests a checkpoint inside a critical section at line 2.
use std::fs::File;
use std::io::{Read, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lamcr::cr::{self, Flags, Outcome, Start, Status};

static LOG: OnceLock<File> = OnceLock::new();
static NEXT: AtomicU64 = AtomicU64::new(0);
static ROUNDS: AtomicU32 = AtomicU32::new(0);
static CONTINUES: AtomicU32 = AtomicU32::new(0);
static RESTARTS: AtomicU32 = AtomicU32::new(0);

/// One `write(2)`: async-signal-safe, so the signal-context callback may use it too.
fn log(line: &[u8]) {
    if let Some(mut f) = LOG.get() {
        let _ = f.write_all(line);
    }
}

fn word(r: &Result<Outcome, cr::CrError>) -> &'static str {
    match r {
        Ok(Outcome::Continue) => "continue",
        Ok(Outcome::Restarted) => "restarted",
        Err(cr::CrError::TempFailure) => "cancelled",
        Err(cr::CrError::Omitted) => "omitted",
        Err(_) => "failed",
    }
}

/// The state: next line number, then 64 KiB derived from it.
fn state_of(next: u64) -> Vec<u8> {
    let mut s = next.to_le_bytes().to_vec();
    s.extend((0..65536u64).map(|i| (i.wrapping_mul(0x9E37_79B9) ^ next) as u8));
    s
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let lines: u64 = args[0].parse().expect("LINES");
    let interval = Duration::from_millis(args[1].parse().expect("INTERVAL_MS"));
    let mode = args.get(2).cloned().unwrap_or_else(|| "plain".into());
    let rank: u32 = std::env::var("LAMCR_RANK")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let base = std::env::var("CR_LOG").expect("CR_LOG");
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{base}.{rank}"))
        .expect("log file");
    let _ = LOG.set(log_file);

    let start = cr::init().expect("cr::init (run me under lamcr run)");
    if start == Start::Restarted {
        let state = cr::restored_state().unwrap_or_default();
        let next = u64::from_le_bytes(state[..8].try_into().expect("8 bytes"));
        let ok = state == state_of(next);
        NEXT.store(next, Ordering::SeqCst);
        log(format!("restored {next} {}\n", if ok { "ok" } else { "CORRUPT" }).as_bytes());
    }

    // LAM's pattern: a thread blocked in read(), with a signal-context callback.
    let (mut wake_r, mut wake_w) = std::io::pipe().expect("pipe");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        // SAFETY: the callback only calls `log` (one write(2)) and `cr::checkpoint`, both
        // async-signal-safe.
        #[allow(unsafe_code)]
        let _id = unsafe {
            cr::register_signal(|| {
                log(b"signal pre\n");
                let r = cr::checkpoint(Flags::READY);
                log(match word(&r) {
                    "continue" => b"signal continue\n",
                    "restarted" => b"signal restarted\n",
                    _ => b"signal cancelled\n",
                });
                0
            })
        };
        tx.send(()).expect("registered");
        let mut b = [0u8; 1];
        let n = wake_r.read(&mut b).unwrap_or(0);
        log(format!("reader woke {n}\n").as_bytes());
    });
    rx.recv().expect("reader registered");

    // Registered first, so it runs last (nested inside the newer one).
    cr::register_thread(|| {
        log(b"thread1 pre\n");
        let r = cr::checkpoint(Flags::READY);
        match r {
            Ok(Outcome::Continue) => CONTINUES.fetch_add(1, Ordering::SeqCst),
            Ok(Outcome::Restarted) => RESTARTS.fetch_add(1, Ordering::SeqCst),
            Err(_) => 0,
        };
        log(format!("thread1 {}\n", word(&r)).as_bytes());
        0
    });
    let mode2 = mode.clone();
    let base2 = base.clone();
    cr::register_thread(move || {
        let round = ROUNDS.fetch_add(1, Ordering::SeqCst);
        log(b"thread2 pre\n");
        let flags = match mode2.as_str() {
            "tempfail" if round == 0 => Flags::TEMP_FAILURE.with_code(7),
            "perm" => Flags::PERM_FAILURE.with_code(9),
            "wait" => {
                let go = format!("{base2}.go");
                let limit = Instant::now() + Duration::from_secs(60);
                while !std::path::Path::new(&go).exists() && Instant::now() < limit {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Flags::READY
            }
            _ => Flags::READY,
        };
        let next = NEXT.load(Ordering::SeqCst);
        cr::save_state(&state_of(next));
        log(format!("saved {next}\n").as_bytes());
        let r = cr::checkpoint(flags);
        log(format!("thread2 {}\n", word(&r)).as_bytes());
        0
    });

    let mut out = std::io::stdout().lock();
    loop {
        let cs = cr::enter_cs();
        let seq = NEXT.load(Ordering::SeqCst);
        if seq >= lines {
            break;
        }
        let _ = writeln!(out, "rank {rank} seq {seq}");
        let _ = out.flush();
        NEXT.store(seq + 1, Ordering::SeqCst);
        if mode == "cs" && rank == 0 && seq == 2 && start == Start::Fresh {
            log(b"cs enter\n");
            cr::request_checkpoint().expect("request");
            let pending = cr::wait_status(Status::Pending, Duration::from_secs(60));
            log(format!("cs pending {pending}\n").as_bytes());
            cs.leave();
            log(b"cs left\n");
        } else {
            drop(cs);
        }
        std::thread::sleep(interval);
    }
    let _ = wake_w.write_all(b"x");
    let _ = reader.join();
    let _ = writeln!(
        out,
        "rank {rank} done continues={} restarts={}",
        CONTINUES.load(Ordering::SeqCst),
        RESTARTS.load(Ordering::SeqCst)
    );
    log(b"done\n");
}
