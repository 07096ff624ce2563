//! The checkpoint helper: a short-lived process (`lamcr helper`) started by the async handler.
//! It connects to every lamd's listening socket at once, orders the dump, waits for every node
//! (each bounded by `LAMCR_CKPT_TIMEOUT`, default 600 s) and writes one [`NodeResult`] on stdout
//! per node as soon as that node is done (`u32` LE length + bincode), so the async handler can
//! report progress. Nodes dump in parallel. Being a separate process, it can never block the
//! launcher's loop.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use bincode::{Decode, Encode};

use crate::schema::wire::{FrameReader, FromDaemon, Role, ToDaemon, request};
use crate::schema::{Engine, Epoch, FileEntry, JobId, NodeId, NodeImage};

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

/// Runs the helper; returns its exit code.
pub fn main(
    job: JobId,
    epoch: Epoch,
    dir: PathBuf,
    stop: bool,
    engine: Engine,
    callback_timeout_ms: u64,
    nodes: Vec<(NodeId, PathBuf)>,
) -> i32 {
    let timeout = std::env::var("LAMCR_CKPT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let (tx, rx) = std::sync::mpsc::channel();
    let count = nodes.len();
    for (node, sock) in nodes {
        let job = job.clone();
        let dir = dir.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let order = ToDaemon::Checkpoint {
                epoch,
                epoch_dir: dir.display().to_string(),
                stop,
                engine,
                callback_timeout_ms,
            };
            let result = one_node(&job, node, order, &sock, timeout);
            let _ = tx.send(NodeResult { node, result });
        });
    }
    drop(tx);
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let mut reported = 0;
    for r in rx {
        let bytes = crate::schema::codec::encode(&r);
        let ok = out
            .write_all(&(bytes.len() as u32).to_le_bytes())
            .and_then(|_| out.write_all(&bytes))
            .and_then(|_| out.flush());
        if ok.is_err() {
            return 1;
        }
        reported += 1;
    }
    if reported == count { 0 } else { 1 }
}

/// Splits the helper's output into node results; `None` while a result is incomplete.
pub fn next_result(buf: &mut Vec<u8>) -> Option<Result<NodeResult, String>> {
    if buf.len() < 4 {
        return None;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if buf.len() < 4 + len {
        return None;
    }
    let r = crate::schema::codec::decode(&buf[4..4 + len]).map_err(|e| e.to_string());
    buf.drain(..4 + len);
    Some(r)
}

fn one_node(
    job: &JobId,
    node: NodeId,
    order: ToDaemon,
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
    let reply: FromDaemon =
        request(fd, &order, &mut reader).map_err(|e| format!("no answer from lamd: {e}"))?;
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
