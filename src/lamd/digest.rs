//! Checksums of a dump's image files, computed while CRIU writes them.
//!
//! Hashing 1 GiB of images after the dump would add a read of every byte to the checkpoint's
//! critical path. Instead a thread follows the page images (`pages-*.img`, which CRIU only ever
//! appends to) as they grow and feeds each into its own xxh3 state. When the dump is over,
//! [`Follower::finish`] hashes whatever was appended since and every other (small) image file.
//! Only bytes below the file size are read, and the kernel makes a write's bytes visible before it
//! moves the size past them, so a read never sees half a write. Should CRIU ever rewrite bytes
//! already hashed, the sum would not match at restart, which refuses the checkpoint: a loud error,
//! never silent corruption.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use xxhash_rust::xxh3::Xxh3;

use crate::schema::FileEntry;

struct Followed {
    file: File,
    hasher: Xxh3,
    size: u64,
}

type Table = BTreeMap<String, Followed>;

/// A thread hashing the page images of `dir` as they grow.
pub struct Follower {
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<Table>>>,
}

impl Follower {
    pub fn start(dir: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (dir.to_path_buf(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("lamd-digest".into())
            .spawn(move || follow(&d, &s))
            .ok();
        Self {
            dir: dir.to_path_buf(),
            stop,
            thread,
        }
    }

    /// Stops following, then completes every file's sum. Entries are named `prefix/<file>`.
    pub fn finish(mut self, prefix: &str) -> Result<Vec<FileEntry>, (PathBuf, std::io::Error)> {
        self.stop.store(true, Ordering::SeqCst);
        let mut table = match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(t))) => t,
            // The follower failed: hash everything now, from the start.
            _ => Table::new(),
        };
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .map_err(|e| (self.dir.clone(), e))?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let path = self.dir.join(&name);
            let mut f = match table.remove(&name) {
                Some(f) => f,
                None => Followed {
                    file: File::open(&path).map_err(|e| (path.clone(), e))?,
                    hasher: Xxh3::new(),
                    size: 0,
                },
            };
            read_to_end(&mut f).map_err(|e| (path.clone(), e))?;
            out.push(FileEntry {
                path: format!("{prefix}/{name}"),
                size: f.size,
                xxh3: f.hasher.digest(),
            });
        }
        Ok(out)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn follow(dir: &Path, stop: &AtomicBool) -> std::io::Result<Table> {
    let mut table = Table::new();
    while !stop.load(Ordering::SeqCst) {
        let mut progressed = false;
        for e in std::fs::read_dir(dir)?.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if !(name.starts_with("pages-") && name.ends_with(".img")) {
                continue;
            }
            if !table.contains_key(&name) {
                let file = File::open(e.path())?;
                table.insert(
                    name.clone(),
                    Followed {
                        file,
                        hasher: Xxh3::new(),
                        size: 0,
                    },
                );
            }
            if let Some(f) = table.get_mut(&name) {
                progressed |= read_to_end(f)? > 0;
            }
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(table)
}

/// Hashes what the file holds beyond what was hashed already; returns the bytes hashed. The new
/// bytes are hashed where they lie in the page cache (a mapping), not copied out first: the dump
/// is writing them on the other core, and a copy would double this thread's memory traffic.
fn read_to_end(f: &mut Followed) -> std::io::Result<u64> {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u64);
    let size = f.file.metadata()?.len();
    if size <= f.size {
        return Ok(0);
    }
    let start = f.size - f.size % page;
    if let Some(map) = crate::sys::FileMap::range(&f.file, start, size - start)? {
        f.hasher.update(&map.bytes()[(f.size - start) as usize..]);
    }
    let read = size - f.size;
    f.size = size;
    Ok(read)
}
