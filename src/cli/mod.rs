//! The command line: one file per verb. `main` parses, dispatches, prints an error chain once
//! and returns the exit code (the job's status for `run` and `restart`).

mod check;
mod checkpoint;
mod restart;
mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lamcr",
    version,
    about = "Run parallel jobs, checkpoint them, restart them (CRIU)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a parallel job (an mpirun).
    Run(run::RunArgs),
    /// Checkpoint a running job and print the checkpoint's path.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Restart a job from a checkpoint.
    Restart(restart::RestartArgs),
    /// List running jobs.
    Ps,
    /// Tell whether checkpointing works on this machine, and why not.
    Check,
    /// Node daemon (started by the launcher).
    #[command(hide = true)]
    Lamd {
        #[arg(long)]
        node: u32,
        #[arg(long)]
        job: String,
        #[arg(long)]
        fd: i32,
        #[arg(long)]
        listen: PathBuf,
        #[arg(long)]
        work_dir: PathBuf,
    },
    /// Checkpoint helper (started by the launcher's async handler).
    #[command(hide = true)]
    Helper {
        #[arg(long)]
        job: String,
        #[arg(long)]
        epoch: u64,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        stop: bool,
        #[arg(long, default_value = "criu", value_parser = ["criu", "self"])]
        engine: String,
        #[arg(long, default_value = "30000")]
        callback_timeout_ms: u64,
        #[arg(long = "node", value_parser = parse_node)]
        nodes: Vec<(u32, PathBuf)>,
    },
    /// The launcher after its self-exec on restart.
    #[command(hide = true)]
    Resume {
        #[arg(long)]
        schema_fd: i32,
    },
}

fn parse_node(s: &str) -> Result<(u32, PathBuf), String> {
    let (n, p) = s.split_once('=').ok_or("expected N=PATH")?;
    Ok((n.parse().map_err(|_| "bad node number")?, p.into()))
}

/// LAM users type `-np 4` and `-wd DIR`; clap knows only one-letter short options. Rewrites them
/// among `lamcr run`'s own options, stopping at the program name.
fn normalize(mut args: Vec<String>) -> Vec<String> {
    if args.get(1).map(String::as_str) != Some("run") {
        return args;
    }
    let mut i = 2;
    while i < args.len() {
        match args[i].as_str() {
            "-np" => args[i] = "--np".into(),
            "-wd" | "-wdir" => args[i] = "--wdir".into(),
            _ => {}
        }
        let a = args[i].as_str();
        if !a.starts_with('-') || a == "--" {
            break;
        }
        if run::VALUE_OPTIONS.contains(&a) {
            i += 1;
        }
        i += 1;
    }
    args
}

/// The hidden roles are started by `execve("/proc/self/exe")`, which names every one of them
/// `exe` in `ps`, `top` and `pgrep`. Each takes the name an admin looks for.
fn name_process(cmd: &Cmd) {
    let name = match cmd {
        Cmd::Lamd { .. } => c"lamd",
        Cmd::Helper { .. } => c"lamcr-helper",
        Cmd::Resume { .. } => c"lamcr",
        _ => return,
    };
    let _ = nix::sys::prctl::set_name(name);
}

pub fn main() -> i32 {
    let args = normalize(std::env::args().collect());
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            if e.use_stderr() {
                // One line: clap's first line without its usage block.
                let text = e.to_string();
                let first = text.lines().next().unwrap_or("invalid arguments");
                eprintln!("lamcr: {}", first.trim_start_matches("error: "));
            } else {
                let _ = e.print();
            }
            return code;
        }
    };
    name_process(&cli.cmd);
    match cli.cmd {
        Cmd::Run(a) => run::main(a),
        Cmd::Checkpoint(a) => checkpoint::main(a),
        Cmd::Restart(a) => restart::main(a),
        Cmd::Ps => checkpoint::ps(),
        Cmd::Check => check::main(),
        Cmd::Lamd {
            node,
            job,
            fd,
            listen,
            work_dir,
        } => crate::lamd::main(crate::lamd::DaemonArgs {
            node: crate::schema::NodeId(node),
            job_id: crate::schema::JobId(job),
            launcher_fd: fd,
            listen,
            work_dir,
        }),
        Cmd::Helper {
            job,
            epoch,
            dir,
            stop,
            engine,
            callback_timeout_ms,
            nodes,
        } => crate::handlers::helper::main(
            crate::schema::JobId(job),
            crate::schema::Epoch(epoch),
            dir,
            stop,
            if engine == "self" {
                crate::schema::Engine::SelfState
            } else {
                crate::schema::Engine::Criu
            },
            callback_timeout_ms,
            nodes
                .into_iter()
                .map(|(n, p)| (crate::schema::NodeId(n), p))
                .collect(),
        ),
        Cmd::Resume { schema_fd } => crate::launcher::resume::resume(schema_fd),
    }
}
