//! `lamcr run`: parse the job, start the launcher, return the job's exit status.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::launcher::parse::{self, Placement};
use crate::launcher::{Launcher, RunOptions, Start};
use crate::schema::{Engine, IoOptions, JobId, Rank, RestartPolicy, StdinTarget};

/// Options that take a value (so the program name can be told apart from option values).
pub const VALUE_OPTIONS: &[&str] = &[
    "-n",
    "--np",
    "-x",
    "--wdir",
    "--wd",
    "--app",
    "--hostfile",
    "--machinefile",
    "--host",
    "-H",
    "--stdin",
    "--output-filename",
    "--ckpt-dir",
    "--grace",
    "--ckpt-interval",
    "--keep",
    "--engine",
    "--callback-timeout",
    "--auto-restart",
];

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Number of ranks (also -np).
    #[arg(short = 'n', long = "np", value_name = "N")]
    pub np: Option<u32>,
    /// LAM appschema file: one `[-np N] [-wd DIR] [-x VAR[=VAL]] program args` per line.
    #[arg(long, value_name = "FILE")]
    pub app: Option<PathBuf>,
    /// Export an environment variable to the ranks (repeatable).
    #[arg(short = 'x', value_name = "VAR[=VAL]")]
    pub export: Vec<String>,
    /// Working directory of the ranks (also -wd).
    #[arg(long = "wdir", alias = "wd", value_name = "DIR")]
    pub wdir: Option<String>,
    /// Hostfile: `host slots=N` per line.
    #[arg(long, alias = "machinefile", value_name = "FILE")]
    pub hostfile: Option<PathBuf>,
    /// Hosts: `h1:2,h2`.
    #[arg(long, short = 'H', value_name = "LIST")]
    pub host: Option<String>,
    /// Allow more ranks than slots.
    #[arg(long)]
    pub oversubscribe: bool,
    /// Which rank gets the launcher's stdin: a rank number, `all` or `none`.
    #[arg(long, default_value = "0", value_parser = parse_stdin)]
    pub stdin: StdinTarget,
    /// Prefix each line with `[R]<stdout>: ` / `[R]<stderr>: `.
    #[arg(long)]
    pub tag_output: bool,
    /// Prefix each line with `R: `.
    #[arg(short = 'l', long)]
    pub label: bool,
    /// Prefix each line with a timestamp.
    #[arg(long)]
    pub timestamp_output: bool,
    /// Also write DIR/rank.R/stdout and DIR/rank.R/stderr.
    #[arg(long, value_name = "DIR")]
    pub output_filename: Option<String>,
    /// Print every rank's exit status at the end.
    #[arg(long)]
    pub print_all_exitcodes: bool,
    /// Checkpoint root [default: $LAMCR_CKPT_DIR or ~/.lamcr/checkpoints].
    #[arg(long, value_name = "DIR")]
    pub ckpt_dir: Option<PathBuf>,
    /// Time between SIGTERM and SIGKILL when the job is stopped.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Checkpoint engine: `criu` (whole process trees, needs root), `self` (each rank saves its own
    /// state through the lamcr library; no privilege), or `auto`: criu where it can work, else self.
    #[arg(long, default_value = "auto", value_parser = ["auto", "criu", "self"])]
    pub engine: String,
    /// How long ranks' checkpoint callbacks may take to be ready before a checkpoint fails (the
    /// job goes on).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub callback_timeout: Duration,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// The program and its arguments; `:` separates MPMD contexts.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM [ARGS]... [: ...]"
    )]
    pub command: Vec<String>,
}

/// Periodic checkpoints and automatic restarts (shared by `run` and `restart`).
#[derive(Args, Debug, Clone, Default)]
pub struct PolicyArgs {
    /// Take a checkpoint every DURATION (`30s`, `10m`, `1h`).
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    pub ckpt_interval: Option<Duration>,
    /// Keep only the newest N committed checkpoints (older ones go once a newer one is committed).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: Option<u32>,
    /// After a rank dies by a signal or a node is lost, restart from the newest checkpoint, at most
    /// N times.
    #[arg(long, value_name = "N", default_value = "0")]
    pub auto_restart: u32,
    /// With --auto-restart, a rank's non-zero exit is a failure to restart from too.
    #[arg(long)]
    pub auto_restart_on_exit: bool,
}

impl PolicyArgs {
    pub fn policy(&self) -> RestartPolicy {
        RestartPolicy {
            ckpt_interval_ms: self.ckpt_interval.map(|d| d.as_millis() as u64),
            keep: self.keep,
            auto_restart: self.auto_restart,
            restarts: 0,
            on_exit: self.auto_restart_on_exit,
        }
    }
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (try 30s, 10m or 1h)"))?;
    if d < Duration::from_millis(10) {
        return Err("the interval must be at least 10ms".into());
    }
    Ok(d)
}

fn parse_stdin(s: &str) -> Result<StdinTarget, String> {
    match s {
        "all" => Ok(StdinTarget::All),
        "none" => Ok(StdinTarget::None),
        r => r
            .parse()
            .map(|r| StdinTarget::Rank(Rank(r)))
            .map_err(|_| format!("expected all, none or a rank number, not {r:?}")),
    }
}

pub fn main(a: RunArgs) -> i32 {
    match prepare(&a) {
        Ok((spec, opts)) => match Launcher::new(spec, opts, Start::Launch) {
            Ok(l) => l.run(),
            Err(e) => {
                eprintln!("lamcr: {}", crate::error_chain(&e));
                1
            }
        },
        Err(msg) => {
            eprintln!("lamcr: {msg}");
            2
        }
    }
}

fn prepare(a: &RunArgs) -> Result<(crate::schema::JobSpec, RunOptions), String> {
    if let Some(first) = a
        .command
        .first()
        .filter(|c| c.starts_with('-') && c.len() > 1)
    {
        return Err(format!("unknown option {first} (see lamcr run --help)"));
    }
    if a.np == Some(0) {
        return Err(parse::ParseError::ZeroRanks.to_string());
    }
    let contexts = match (&a.app, a.command.is_empty()) {
        (Some(file), true) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            parse::parse_appschema(&text, &file.display().to_string()).map_err(|e| e.to_string())?
        }
        (Some(_), false) => return Err("give either --app FILE or a program, not both".into()),
        (None, true) => return Err(parse::ParseError::NoProgram.to_string()),
        (None, false) => parse::split_contexts(&a.command).map_err(|e| e.to_string())?,
    };
    let mut hosts = Vec::new();
    if let Some(f) = &a.hostfile {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        hosts.extend(
            parse::parse_hostfile(&text, &f.display().to_string()).map_err(|e| e.to_string())?,
        );
    }
    if let Some(h) = &a.host {
        hosts.extend(parse::parse_host_list(h).map_err(|e| e.to_string())?);
    }
    let place = Placement {
        hosts,
        oversubscribe: a.oversubscribe,
        default_np: a.np,
        global_env: a.export.iter().map(|x| parse::parse_export(x)).collect(),
        global_wdir: a.wdir.clone(),
    };
    let io = IoOptions {
        stdin: a.stdin,
        tag_output: a.tag_output,
        label: a.label,
        timestamp: a.timestamp_output,
        output_dir: a.output_filename.clone(),
    };
    let mut spec = parse::build_job(JobId::fresh(std::process::id()), &contexts, &place, io)
        .map_err(|e| e.to_string())?;
    spec.engine = match a.engine.as_str() {
        "criu" => Engine::Criu,
        "self" => Engine::SelfState,
        _ => Engine::Auto,
    };
    spec.callback_timeout_ms = a.callback_timeout.as_millis() as u64;
    let opts = RunOptions {
        print_all_exitcodes: a.print_all_exitcodes,
        grace: a.grace,
        ckpt_dir: a
            .ckpt_dir
            .clone()
            .unwrap_or_else(crate::launcher::commit::default_ckpt_dir),
        launcher_argv: std::env::args().collect(),
        policy: a.policy.policy(),
    };
    Ok((spec, opts))
}
