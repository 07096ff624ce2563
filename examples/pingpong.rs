//! Test fixture: two ranks exchanging sequence numbers over a TCP connection on loopback.
//!
//! `pingpong PORT LINES INTERVAL_MS`: rank 0 listens on 127.0.0.1:PORT, rank 1 connects. For each
//! N in 0..LINES, rank 1 sends N, rank 0 checks it, prints `rank 0 seq N` and echoes it, rank 1
//! checks the echo and prints `rank 1 seq N`. Anything out of sequence, or a broken connection,
//! prints a line saying so and exits 99: a checkpoint must keep the connection exactly as it was.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric arguments"))
        .collect();
    let (port, lines, interval) = (args[0] as u16, args[1], args[2]);
    let rank: u32 = std::env::var("LAMCR_RANK")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let addr = ("127.0.0.1", port);
    let mut sock = if rank == 0 {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| fail(rank, &format!("bind: {e}")));
        l.accept()
            .unwrap_or_else(|e| fail(rank, &format!("accept: {e}")))
            .0
    } else {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => fail(rank, &format!("connect: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    };
    let mut out = std::io::stdout().lock();
    for seq in 0..lines {
        if rank == 1 {
            send(&mut sock, seq, rank);
            expect(&mut sock, seq, rank);
        } else {
            expect(&mut sock, seq, rank);
            send(&mut sock, seq, rank);
        }
        let _ = writeln!(out, "rank {rank} seq {seq}");
        let _ = out.flush();
        if rank == 1 {
            std::thread::sleep(Duration::from_millis(interval));
        }
    }
}

fn send(s: &mut TcpStream, n: u64, rank: u32) {
    if let Err(e) = s.write_all(&n.to_le_bytes()) {
        fail(rank, &format!("send {n}: {e}"));
    }
}

fn expect(s: &mut TcpStream, n: u64, rank: u32) {
    let mut b = [0u8; 8];
    if let Err(e) = s.read_exact(&mut b) {
        fail(rank, &format!("receive {n}: {e}"));
    }
    let got = u64::from_le_bytes(b);
    if got != n {
        fail(rank, &format!("expected {n}, received {got}"));
    }
}

fn fail(rank: u32, what: &str) -> ! {
    println!("rank {rank} tcp broken: {what}");
    std::process::exit(99);
}
