//! `lamcr check`: will checkpointing work here? Each line says what was checked and the verdict.

pub fn main() -> i32 {
    let checks = crate::engine::checks();
    for c in &checks {
        println!(
            "{} {}: {}",
            if c.ok { "ok  " } else { "FAIL" },
            c.what,
            c.detail
        );
    }
    if checks.iter().all(|c| c.ok) {
        println!("checkpointing will work on this machine");
        0
    } else {
        println!("checkpointing will not work: see the FAIL lines");
        1
    }
}
