//! The checkpoint helper: a short-lived process (`lamcr helper`) started by the async handler.
//! It connects to every lamd's listening socket at once, orders the dump, waits for every node
//! (each bounded by `LAMCR_CKPT_TIMEOUT`, default 600 s) and prints one [`Report`] on stdout.
//! Nodes dump in parallel. Being a separate process, it can never block the launcher's loop.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use bincode::{Decode, Encode};

use crate::schema::wire::{FrameReader, FromDaemon, Role, ToDaemon, request};
use crate::schema::{Epoch, FileEntry, JobId, NodeId, NodeImage};

#[derive(Debug, Encode, Decode)]
pub struct NodeDone {
    pub image: NodeImage,
    pub files: Vec<FileEntry>,
    pub dump_ms: u64,
}

#[derive(Debug, Encode, Decode)]
pub struct NodeResult {
    pub node: NodeId,
    pub result: Result<NodeDone, String>,
}

#[derive(Debug, Encode, Decode)]
pub struct Report {
    pub nodes: Vec<NodeResult>,
}

/// Runs the helper; returns its exit code.
pub fn main(
    job: JobId,
    epoch: Epoch,
    dir: PathBuf,
    stop: bool,
    nodes: Vec<(NodeId, PathBuf)>,
) -> i32 {
    let timeout = std::env::var("LAMCR_CKPT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let threads: Vec<_> = nodes
        .into_iter()
        .map(|(node, sock)| {
            let job = job.clone();
            let dir = dir.clone();
            std::thread::spawn(move || NodeResult {
                node,
                result: one_node(&job, node, epoch, &dir, stop, &sock, timeout),
            })
        })
        .collect();
    let nodes = threads
        .into_iter()
        .map(|t| {
            t.join().unwrap_or(NodeResult {
                node: NodeId(u32::MAX),
                result: Err("helper thread panicked".into()),
            })
        })
        .collect();
    let bytes = crate::schema::codec::encode(&Report { nodes });
    use std::io::Write;
    match std::io::stdout().lock().write_all(&bytes) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

fn one_node(
    job: &JobId,
    node: NodeId,
    epoch: Epoch,
    dir: &std::path::Path,
    stop: bool,
    sock: &std::path::Path,
    timeout: u64,
) -> Result<NodeDone, String> {
    let stream = UnixStream::connect(sock)
        .map_err(|e| format!("cannot reach lamd at {}: {e}", sock.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(timeout)))
        .map_err(|e| e.to_string())?;
    let fd = stream.as_fd();
    let mut reader = FrameReader::new();
    let hello: FromDaemon = request(
        fd,
        &ToDaemon::hello(job.clone(), node, Role::Helper),
        &mut reader,
    )
    .map_err(|e| e.to_string())?;
    if let FromDaemon::Refused { reason } = hello {
        return Err(reason);
    }
    let reply: FromDaemon = request(
        fd,
        &ToDaemon::Checkpoint {
            epoch,
            epoch_dir: dir.display().to_string(),
            stop,
        },
        &mut reader,
    )
    .map_err(|e| format!("no answer from lamd: {e}"))?;
    match reply {
        FromDaemon::Checkpointed {
            image,
            files,
            dump_ms,
        } => Ok(NodeDone {
            image,
            files,
            dump_ms,
        }),
        FromDaemon::CheckpointFailed { reason } | FromDaemon::Refused { reason } => Err(reason),
        other => Err(format!("unexpected answer {other:?}")),
    }
}
