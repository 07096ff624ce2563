//! Test and demo fixture: prints sequenced lines while holding a memory pattern.
//!
//! `counter LINES INTERVAL_MS MEM_MIB EXIT_CODE`: fills MEM_MIB of memory with a pattern derived
//! from the rank, prints `rank R seq N` LINES times, one every INTERVAL_MS, verifies the pattern
//! before every line, prints `rank R mem ok` and exits with EXIT_CODE (99 if memory was wrong).
use std::io::Write;

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric arguments"))
        .collect();
    let (lines, interval, mib, code) = (args[0], args[1], args[2], args[3] as i32);
    let rank: u64 = std::env::var("LAMCR_RANK")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let words = (mib << 20) / 8;
    let pattern = |i: u64| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ rank;
    let mem: Vec<u64> = (0..words).map(pattern).collect();
    let mut out = std::io::stdout().lock();
    for seq in 0..lines {
        let probe = if words == 0 { 0 } else { (seq * 7919) % words };
        if words > 0 && mem[probe as usize] != pattern(probe) {
            let _ = writeln!(out, "rank {rank} memory corrupt at word {probe}");
            std::process::exit(99);
        }
        let _ = writeln!(out, "rank {rank} seq {seq}");
        let _ = out.flush();
        std::thread::sleep(std::time::Duration::from_millis(interval));
    }
    if mem.iter().enumerate().any(|(i, &w)| w != pattern(i as u64)) {
        let _ = writeln!(out, "rank {rank} memory corrupt");
        std::process::exit(99);
    }
    let _ = writeln!(out, "rank {rank} mem ok");
    std::process::exit(code);
}
