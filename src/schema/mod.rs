//! The data lamcr moves between processes and stores on disk: the job specification, the restart
//! schema, the checkpoint manifest and the wire messages. No I/O happens here except through the
//! [`codec`] functions that turn these types into bytes and back.
//!
//! Invariant: every persistent or on-the-wire byte sequence goes through [`codec`], so the format
//! changes in exactly one place.

pub mod codec;
pub mod manifest;
pub mod wire;

use bincode::{Decode, Encode};
use std::fmt;

/// A job's identifier: unique per launch on a machine (time and launcher pid).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Encode, Decode)]
pub struct JobId(pub String);

impl JobId {
    /// A fresh id for a job started now by process `pid`.
    pub fn fresh(pid: u32) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        JobId(format!(
            "{:x}{:03x}-{}",
            now.as_secs(),
            now.subsec_millis(),
            pid
        ))
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A rank's number in the job (0-based, dense).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode)]
pub struct Rank(pub u32);

impl fmt::Display for Rank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A node's number in the job (index into [`JobSpec::nodes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A checkpoint's number within a job: 1, 2, 3...
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How a rank ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum ExitStatus {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The launcher's exit code for this status: the code, or 128+N for signal N.
    pub fn exit_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }

    /// Whether this is a clean exit.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    /// From a raw `waitpid` status.
    pub fn from_raw(raw: i32) -> Self {
        if libc::WIFSIGNALED(raw) {
            ExitStatus::Signal(libc::WTERMSIG(raw))
        } else {
            ExitStatus::Code(libc::WEXITSTATUS(raw))
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitStatus::Code(c) => write!(f, "exited with status {c}"),
            ExitStatus::Signal(s) => {
                let name = nix::sys::signal::Signal::try_from(s)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown signal");
                write!(f, "was killed by signal {s} ({name})")
            }
        }
    }
}

/// A rank's output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Where the launcher's stdin goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum StdinTarget {
    /// One rank (rank 0 by default).
    Rank(Rank),
    /// Every rank gets a copy.
    All,
    /// No rank: every rank's stdin is /dev/null.
    None,
}

impl StdinTarget {
    pub fn includes(self, rank: Rank) -> bool {
        match self {
            StdinTarget::Rank(r) => r == rank,
            StdinTarget::All => true,
            StdinTarget::None => false,
        }
    }
}

/// How the launcher presents the ranks' output.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct IoOptions {
    pub stdin: StdinTarget,
    /// `[R]<stdout>: ` prefixes.
    pub tag_output: bool,
    /// `R: ` prefixes.
    pub label: bool,
    /// A timestamp before every line.
    pub timestamp: bool,
    /// Also write `DIR/rank.R/{stdout,stderr}`.
    pub output_dir: Option<String>,
}

/// A machine the job runs on, with its slot count.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct NodeSpec {
    pub id: NodeId,
    pub host: String,
    pub slots: u32,
}

/// Everything needed to start one rank.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct RankSpec {
    pub rank: Rank,
    pub node: NodeId,
    /// Index of the rank's application context (MPMD), MPI's appnum.
    pub app: u32,
    /// Resolved program path (argv[0] is kept as the user typed it).
    pub program: String,
    pub argv: Vec<String>,
    /// The complete environment, `LAMCR_*` variables included.
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// Whether the rank's stdin is a pipe from the launcher.
    pub stdin: bool,
}

/// A complete job: what `lamcr run` parsed, and what a restart needs to relaunch.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct JobSpec {
    pub job_id: JobId,
    pub nodes: Vec<NodeSpec>,
    pub ranks: Vec<RankSpec>,
    pub io: IoOptions,
    /// How checkpoints are taken (resolved from `--engine` at launch).
    pub engine: Engine,
    /// How long a node waits for its ranks' callbacks to be ready before it fails a checkpoint.
    pub callback_timeout_ms: u64,
}

/// How a checkpoint saves the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub enum Engine {
    /// CRIU dumps each node's whole process tree; ranks need not know (callbacks optional).
    Criu,
    /// The `self` engine: every rank saves its own state through the library's callbacks, and a
    /// restart starts the ranks afresh with that state. Needs no privilege.
    SelfState,
    /// `--engine auto`: CRIU if `lamcr check` passes, else `self`; decided at the first
    /// checkpoint. Never in an image.
    Auto,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Criu => "criu",
            Engine::SelfState => "self",
            Engine::Auto => "auto",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a rank stood with its checkpoint callbacks when its node was dumped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum RankCr {
    /// The rank never initialised the library: saved transparently (CRIU) or not at all.
    Unaware,
    /// Its callbacks ran and wait in `checkpoint()`: after a restore they learn "restarted".
    Ready,
    /// Its callbacks asked to be left out (`OMIT`).
    Omitted,
}

impl JobSpec {
    pub fn ranks_on(&self, node: NodeId) -> impl Iterator<Item = &RankSpec> {
        self.ranks.iter().filter(move |r| r.node == node)
    }
}

/// What a node's image says about one rank at the moment of the dump.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum RankImage {
    /// Alive in the image; the inodes name its stdio pipes for CRIU's `inherit_fd`.
    Running {
        rank: Rank,
        stdin_pipe: Option<u64>,
        /// Whether the launcher had already closed the rank's stdin (EOF seen).
        stdin_closed: bool,
        stdout_pipe: u64,
        stderr_pipe: u64,
        /// Bytes of stdout/stderr forwarded up to the dump (the output file lengths at the epoch).
        stdout_bytes: u64,
        stderr_bytes: u64,
        /// Inode of the rank's end of its callback socket (CRIU's `unix[INODE]`), 0 if none.
        cr_socket: u64,
        cr: RankCr,
        /// `self` engine: the rank's saved state, relative to the epoch directory.
        state: Option<String>,
    },
    /// Had already exited when the node was dumped.
    Exited {
        rank: Rank,
        status: ExitStatus,
        stdout_bytes: u64,
        stderr_bytes: u64,
    },
}

impl RankImage {
    pub fn rank(&self) -> Rank {
        match self {
            RankImage::Running { rank, .. } | RankImage::Exited { rank, .. } => *rank,
        }
    }
}

/// One node's part of a checkpoint: the holder tree CRIU dumped and how its pipes were named.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct NodeImage {
    pub node: NodeId,
    /// Directory of CRIU's images, relative to the epoch directory.
    pub images_dir: String,
    /// Inode of the holder's control pipe (daemon -> holder).
    pub control_pipe: u64,
    /// Inode of the holder's status pipe (holder -> daemon).
    pub status_pipe: u64,
    /// Whether the holder is the init of its own PID namespace.
    pub pid_namespace: bool,
    pub ranks: Vec<RankImage>,
    /// Which engine saved this node.
    pub engine: Engine,
    /// The callback round of this checkpoint (ranks waiting in it are told "restarted").
    pub cr_round: u64,
}

/// One file of a checkpoint, as committed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct FileEntry {
    /// Path relative to the epoch directory.
    pub path: String,
    pub size: u64,
    /// xxh3-64 of the content.
    pub xxh3: u64,
}

/// Everything a restart needs, built by the async handler while the helper drives the dump.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct RestartSchema {
    pub job: JobSpec,
    pub epoch: Epoch,
    /// The checkpoint root the job used (`--ckpt-dir`).
    pub ckpt_dir: String,
    /// The launcher's own argv, as the user typed it.
    pub launcher_argv: Vec<String>,
    pub nodes: Vec<NodeImage>,
    /// Seconds since the epoch when the checkpoint was committed.
    pub created_unix: u64,
}

/// What the launcher does on its own about checkpoints and failures (`--ckpt-interval`, `--keep`,
/// `--auto-restart`). It travels across a restart's `execve` so the policy outlives one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
pub struct RestartPolicy {
    /// Take a checkpoint this often (milliseconds after the previous one ended).
    pub ckpt_interval_ms: Option<u64>,
    /// Keep only the newest N committed epochs of the job.
    pub keep: Option<u32>,
    /// Restarts allowed in all.
    pub auto_restart: u32,
    /// Restarts done so far.
    pub restarts: u32,
    /// A rank's non-zero exit counts as a failure to restart from, not only a signal.
    pub on_exit: bool,
}
