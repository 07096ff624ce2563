//! `lamcr checkpoint [JOB] [--term]` and `lamcr ps`.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use clap::Args;

use crate::launcher::control;
use crate::schema::wire::{
    FrameReader, FromLauncher, MAGIC, PROTOCOL_VERSION, ToLauncher, push_message, recv,
};

#[derive(Args, Debug)]
pub struct CheckpointArgs {
    /// Job id or launcher pid; may be omitted when exactly one job runs.
    pub job: Option<String>,
    /// End the job after a successful checkpoint.
    #[arg(long)]
    pub term: bool,
}

pub fn main(a: CheckpointArgs) -> i32 {
    let (info, dir) = match control::find_job(a.job.as_deref()) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("lamcr: {e}");
            return 1;
        }
    };
    let stream = match UnixStream::connect(control::socket_path(&dir)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lamcr: cannot reach the launcher of job {}: {e}", info.job);
            return 1;
        }
    };
    let mut out = Vec::new();
    push_message(
        &mut out,
        &ToLauncher::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
        },
    );
    push_message(&mut out, &ToLauncher::Checkpoint { term: a.term });
    use std::io::Write;
    if let Err(e) = (&stream).write_all(&out) {
        eprintln!("lamcr: cannot reach the launcher of job {}: {e}", info.job);
        return 1;
    }
    let bar = crate::launcher::output::progress_bar("checkpoint");
    let mut reader = FrameReader::new();
    let answer = loop {
        match recv::<FromLauncher>(stream.as_fd(), &mut reader) {
            Ok(FromLauncher::Progress {
                bytes,
                ranks_done,
                ranks,
            }) => {
                if let Some(b) = &bar {
                    b.set_length(u64::from(ranks));
                    b.set_position(u64::from(ranks_done));
                    b.set_message(format!("{} written", crate::launcher::human_bytes(bytes)));
                }
            }
            other => break other,
        }
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    match answer {
        Ok(FromLauncher::Committed {
            path, bytes, ms, ..
        }) => {
            eprintln!(
                "lamcr: checkpoint of job {}: {} in {:.2} s",
                info.job,
                crate::launcher::human_bytes(bytes),
                ms as f64 / 1000.0
            );
            println!("{path}");
            0
        }
        Ok(FromLauncher::Failed { reason }) => {
            eprintln!("lamcr: checkpoint of job {} failed: {reason}", info.job);
            1
        }
        Ok(FromLauncher::Progress { .. }) => unreachable!("progress is consumed above"),
        Err(e) => {
            eprintln!(
                "lamcr: the launcher of job {} did not answer: {e}",
                info.job
            );
            1
        }
    }
}

pub fn ps() -> i32 {
    let jobs = control::running_jobs();
    println!(
        "{:<24} {:>8} {:>6} {:>6}  NEWEST CHECKPOINT",
        "JOB", "PID", "RANKS", "NODES"
    );
    for (i, _) in jobs {
        let latest = if i.latest.is_empty() {
            "-".to_string()
        } else {
            i.latest
        };
        println!(
            "{:<24} {:>8} {:>6} {:>6}  {latest}",
            i.job, i.pid, i.ranks, i.nodes
        );
    }
    0
}
