//! Becoming the launcher of a checkpoint: the `execve` hand-over shared by `lamcr restart` and
//! automatic restarts.
//!
//! The verified schema and the launcher's options are encoded into a memfd, and the process
//! `execve`s `/proc/self/exe resume --schema-fd N`, keeping its pid, stdin, stdout and stderr.
//! [`crate::sys::exec_self`] resets the signal mask and dispositions first, since both survive
//! `execve`. The new image reads the hand-over and starts daemons that restore the ranks.

use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use bincode::{Decode, Encode};

use super::{Launcher, RunOptions, Start};
use crate::schema::{FileEntry, JobId, RestartPolicy, RestartSchema};

/// What the restarted launcher receives across its `execve`.
#[derive(Debug, Encode, Decode)]
pub struct Handover {
    pub schema: RestartSchema,
    /// Image files whose checksums each node's lamd verifies while CRIU restores from them.
    pub unverified: Vec<FileEntry>,
    pub epoch_dir: String,
    pub print_all_exitcodes: bool,
    pub grace_ms: u64,
    pub policy: RestartPolicy,
    /// Keep this job id (an automatic restart: the same job goes on, its epochs continue).
    /// `None`: a new job (`lamcr restart`, which may run beside the original).
    pub job_id: Option<JobId>,
    /// Say on stdout that the output from this epoch on is written again.
    pub replay_marker: bool,
}

/// Replaces this process with a launcher restoring `h`. Returns only on failure.
pub fn exec(h: &Handover) -> std::io::Error {
    let bytes = crate::schema::codec::encode(h);
    let fd =
        match nix::sys::memfd::memfd_create("lamcr-schema", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        {
            Ok(fd) => fd,
            Err(e) => return e.into(),
        };
    let mut file = std::fs::File::from(fd);
    if let Err(e) = file.write_all(&bytes).and_then(|_| file.rewind()) {
        return e;
    }
    let raw = file.as_raw_fd();
    let raw_s = raw.to_string();
    let argv = [
        std::ffi::OsStr::new("lamcr"),
        "resume".as_ref(),
        "--schema-fd".as_ref(),
        raw_s.as_ref(),
    ];
    let env: Vec<_> = std::env::vars_os().collect();
    crate::sys::exec_self(&argv, &env, &[raw])
}

/// The restarted launcher: read the hand-over, start daemons that restore the ranks, run to the end.
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
    spec.job_id = h
        .job_id
        .clone()
        .unwrap_or_else(|| JobId::fresh(std::process::id()));
    let opts = RunOptions {
        print_all_exitcodes: h.print_all_exitcodes,
        grace: Duration::from_millis(h.grace_ms),
        ckpt_dir: h.schema.ckpt_dir.clone().into(),
        launcher_argv: h.schema.launcher_argv.clone(),
        policy: h.policy.clone(),
    };
    if h.replay_marker {
        // Written straight to stdout, where the replayed lines follow (never into rank files).
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "lamcr: --- output replayed from checkpoint epoch {} ---",
            h.schema.epoch
        );
        let _ = out.flush();
    }
    let start = Start::Restore {
        epoch: h.schema.epoch,
        epoch_dir: PathBuf::from(h.epoch_dir),
        nodes: h.schema.nodes.clone(),
        unverified: h.unverified,
    };
    match Launcher::new(spec, opts, start) {
        Ok(l) => l.run(),
        Err(e) => {
            eprintln!("lamcr: {}", crate::error_chain(&e));
            1
        }
    }
}
