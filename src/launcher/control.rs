//! How the outside world finds and talks to a running job.
//!
//! Each job has a private run directory `RUN/<jobid>/` (RUN = `$LAMCR_RUN_DIR`, else `/run/lamcr`
//! for root, else `$XDG_RUNTIME_DIR/lamcr`, else `/tmp/lamcr-<uid>`) holding the launcher's control
//! socket (`launcher.sock`, used by `lamcr checkpoint`), each lamd's socket (`nodeN.sock`, used by
//! the checkpoint helper), lamd work directories, and `info`, the line-based record `lamcr ps`
//! reads. The directory is removed when the launcher ends.

use std::fs::DirBuilder;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::schema::JobId;

pub fn run_root() -> PathBuf {
    if let Some(d) = std::env::var_os("LAMCR_RUN_DIR") {
        return d.into();
    }
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        return "/run/lamcr".into();
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("lamcr");
    }
    PathBuf::from(format!("/tmp/lamcr-{uid}"))
}

/// A job's run directory, removed on drop.
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    pub fn create(job: &JobId) -> std::io::Result<Self> {
        let root = run_root();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)?;
        let path = root.join(&job.0);
        DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self { path })
    }

    pub fn control_socket(&self) -> PathBuf {
        self.path.join("launcher.sock")
    }

    pub fn node_socket(&self, node: u32) -> PathBuf {
        self.path.join(format!("node{node}.sock"))
    }

    pub fn node_work_dir(&self, node: u32) -> std::io::Result<PathBuf> {
        let p = self.path.join(format!("node{node}"));
        DirBuilder::new().recursive(true).mode(0o700).create(&p)?;
        Ok(p)
    }

    /// Rewrites the `info` record atomically.
    pub fn write_info(&self, info: &JobInfo) {
        let tmp = self.path.join("info.tmp");
        let ok =
            std::fs::File::create(&tmp).and_then(|mut f| f.write_all(info.render().as_bytes()));
        if ok.is_ok() {
            let _ = std::fs::rename(&tmp, self.path.join("info"));
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What `lamcr ps` shows about a job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobInfo {
    pub job: String,
    pub pid: u32,
    pub ranks: usize,
    pub nodes: usize,
    pub ckpt_dir: String,
    pub latest: String,
}

impl JobInfo {
    fn render(&self) -> String {
        format!(
            "job={}\npid={}\nranks={}\nnodes={}\nckpt_dir={}\nlatest={}\n",
            self.job, self.pid, self.ranks, self.nodes, self.ckpt_dir, self.latest
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let mut i = JobInfo::default();
        for line in text.lines() {
            let (k, v) = line.split_once('=')?;
            match k {
                "job" => i.job = v.into(),
                "pid" => i.pid = v.parse().ok()?,
                "ranks" => i.ranks = v.parse().ok()?,
                "nodes" => i.nodes = v.parse().ok()?,
                "ckpt_dir" => i.ckpt_dir = v.into(),
                "latest" => i.latest = v.into(),
                _ => {}
            }
        }
        (!i.job.is_empty()).then_some(i)
    }
}

/// Running jobs of this user: those whose launcher is still alive.
pub fn running_jobs() -> Vec<(JobInfo, PathBuf)> {
    let mut jobs: Vec<(JobInfo, PathBuf)> = std::fs::read_dir(run_root())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            let info = JobInfo::parse(&std::fs::read_to_string(dir.join("info")).ok()?)?;
            let alive =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(info.pid as i32), None).is_ok();
            alive.then_some((info, dir))
        })
        .collect();
    jobs.sort_by(|a, b| a.0.job.cmp(&b.0.job));
    jobs
}

/// Finds a running job by job id or launcher pid, or the only one.
pub fn find_job(which: Option<&str>) -> Result<(JobInfo, PathBuf), String> {
    let jobs = running_jobs();
    match which {
        Some(w) => jobs
            .into_iter()
            .find(|(i, _)| i.job == w || i.pid.to_string() == w)
            .ok_or_else(|| format!("no running job {w} (see lamcr ps)")),
        None => match jobs.len() {
            0 => Err("no running job".into()),
            1 => Ok(jobs.into_iter().next().expect("one")),
            n => Err(format!("{n} jobs are running; name one (see lamcr ps)")),
        },
    }
}

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("launcher.sock")
}
