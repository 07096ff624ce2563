//! The smallest complete rank that takes part in its checkpoints (docs/design.md, §7b).
//! `lamcr run -n 2 cr_hello` — then `lamcr checkpoint`, `lamcr checkpoint --term`, `lamcr restart`.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lamcr::cr::{self, Flags, Outcome, Start};

fn main() {
    let step = Arc::new(AtomicU64::new(0));
    // With the self engine a restart begins here, with the state the callback saved.
    if cr::init() == Ok(Start::Restarted) {
        let saved = cr::restored_state().unwrap_or_default();
        let n = u64::from_le_bytes(saved[..8].try_into().unwrap());
        step.store(n, Ordering::SeqCst);
    }
    let s = step.clone();
    cr::register_thread(move || {
        cr::save_state(&s.load(Ordering::SeqCst).to_le_bytes()); // used by the self engine
        match cr::checkpoint(Flags::READY) {
            Ok(Outcome::Continue) => eprintln!("checkpoint taken, going on"),
            Ok(Outcome::Restarted) => eprintln!("restarted by CRIU"),
            Err(e) => eprintln!("no checkpoint: {e}"),
        }
        0
    });
    while step.load(Ordering::SeqCst) < 100 {
        let cs = cr::enter_cs(); // no checkpoint in the middle of a step
        let n = step.fetch_add(1, Ordering::SeqCst);
        println!("step {n}");
        drop(cs);
        std::thread::sleep(Duration::from_millis(100));
    }
}
