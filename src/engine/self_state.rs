//! The `self` engine's files: each rank's callbacks hand the library a byte string
//! ([`crate::cr::save_state`]); the library writes it to the file lamd names; lamd checksums it
//! into the manifest like any image. A restart starts the rank afresh and gives it the file on
//! an inherited fd (`LAMCR_CR_STATE_FD`).

use std::path::Path;

use crate::schema::{FileEntry, Rank};

/// The state file of `rank` on node directory `node_dir` (relative to the epoch directory).
pub fn state_file(node_dir: &str, rank: Rank) -> String {
    format!("{node_dir}/rank.{rank}.state")
}

/// Size and checksum of a committed state file.
pub fn entry(epoch_dir: &Path, rel: &str) -> std::io::Result<FileEntry> {
    let path = epoch_dir.join(rel);
    let (size, xxh3) = crate::launcher::commit::hash_file(&path)?;
    Ok(FileEntry {
        path: rel.to_string(),
        size,
        xxh3,
    })
}
