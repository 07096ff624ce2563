//! `lamcr restart PATH`: verify the checkpoint, then become its launcher.
//!
//! The verified schema is written into a memfd and the process `execve`s `/proc/self/exe resume`
//! with that fd, keeping its pid (the same path an automatic restart takes). Signal mask and
//! dispositions are reset before the exec, since both survive it.

use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::time::Duration;

use bincode::{Decode, Encode};
use clap::Args;

use crate::launcher::{Launcher, RunOptions, Start, commit};
use crate::schema::{JobId, RestartSchema};

#[derive(Args, Debug)]
pub struct RestartArgs {
    /// An epoch directory, a job directory (its newest checkpoint) or a checkpoint root with one job.
    pub path: PathBuf,
    /// Print every rank's exit status at the end.
    #[arg(long)]
    pub print_all_exitcodes: bool,
    /// Time between SIGTERM and SIGKILL when the job is stopped.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
}

/// What the restarted launcher receives across its `execve`.
#[derive(Debug, Encode, Decode)]
struct Handover {
    schema: RestartSchema,
    epoch_dir: String,
    print_all_exitcodes: bool,
    grace_ms: u64,
}

pub fn main(a: RestartArgs) -> i32 {
    let dir = match commit::resolve(&a.path).and_then(|d| commit::load(&d).map(|m| (d, m))) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("lamcr: {}", crate::error_chain(&e));
            return 1;
        }
    };
    let (epoch_dir, manifest) = dir;
    let handover = Handover {
        schema: manifest.schema,
        epoch_dir: epoch_dir
            .canonicalize()
            .unwrap_or(epoch_dir)
            .display()
            .to_string(),
        print_all_exitcodes: a.print_all_exitcodes,
        grace_ms: a.grace.as_millis() as u64,
    };
    let bytes = crate::schema::codec::encode(&handover);
    let fd =
        match nix::sys::memfd::memfd_create("lamcr-schema", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!("lamcr: cannot hand the schema over: {e}");
                return 1;
            }
        };
    let mut file = std::fs::File::from(fd);
    if let Err(e) = file.write_all(&bytes).and_then(|_| file.rewind()) {
        eprintln!("lamcr: cannot hand the schema over: {e}");
        return 1;
    }
    use std::os::fd::AsRawFd;
    let raw = file.as_raw_fd();
    let raw_s = raw.to_string();
    let argv = [
        std::ffi::OsStr::new("lamcr"),
        "resume".as_ref(),
        "--schema-fd".as_ref(),
        raw_s.as_ref(),
    ];
    let env: Vec<_> = std::env::vars_os().collect();
    let err = crate::sys::exec_self(&argv, &env, &[raw]);
    eprintln!("lamcr: cannot exec /proc/self/exe: {err}");
    1
}

/// The restarted launcher: read the schema, start daemons that restore the ranks, run to the end.
pub fn resume(fd: i32) -> i32 {
    let mut file = std::fs::File::from(crate::sys::take_inherited_fd(fd));
    let mut bytes = Vec::new();
    if let Err(e) = file.read_to_end(&mut bytes) {
        eprintln!("lamcr: cannot read the handed-over schema: {e}");
        return 1;
    }
    drop(file);
    let h: Handover = match crate::schema::codec::decode(&bytes) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("lamcr: handed-over schema is malformed: {e}");
            return 1;
        }
    };
    let mut spec = h.schema.job.clone();
    // A restarted job is a new job: two restarts of one checkpoint may run side by side.
    spec.job_id = JobId::fresh(std::process::id());
    let opts = RunOptions {
        print_all_exitcodes: h.print_all_exitcodes,
        grace: Duration::from_millis(h.grace_ms),
        ckpt_dir: h.schema.ckpt_dir.clone().into(),
        launcher_argv: h.schema.launcher_argv.clone(),
    };
    let start = Start::Restore {
        epoch_dir: h.epoch_dir.into(),
        nodes: h.schema.nodes.clone(),
    };
    match Launcher::new(spec, opts, start) {
        Ok(l) => l.run(),
        Err(e) => {
            eprintln!("lamcr: {}", crate::error_chain(&e));
            1
        }
    }
}
