//! `lamcr restart PATH`: verify the checkpoint, then become its launcher.
//!
//! The verified schema goes to [`crate::launcher::resume`], which `execve`s `/proc/self/exe`
//! keeping this pid (the same path an automatic restart takes).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::run::PolicyArgs;
use crate::launcher::commit;
use crate::launcher::resume::{self, Handover};

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
    #[command(flatten)]
    pub policy: PolicyArgs,
}

pub fn main(a: RestartArgs) -> i32 {
    let (epoch_dir, (manifest, unverified)) =
        match commit::resolve(&a.path).and_then(|d| commit::load(&d).map(|m| (d, m))) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("lamcr: {}", crate::error_chain(&e));
                return 1;
            }
        };
    let handover = Handover {
        schema: manifest.schema,
        unverified,
        epoch_dir: epoch_dir
            .canonicalize()
            .unwrap_or(epoch_dir)
            .display()
            .to_string(),
        print_all_exitcodes: a.print_all_exitcodes,
        grace_ms: a.grace.as_millis() as u64,
        policy: a.policy.policy(),
        job_id: None,
        replay_marker: false,
    };
    let err = resume::exec(&handover);
    eprintln!("lamcr: cannot exec /proc/self/exe: {err}");
    1
}
