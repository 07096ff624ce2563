//! Checkpoint storage: `DIR/<jobid>/<epoch>/` with one `nodeN/` image directory per node and a
//! `manifest` written last (write, fsync, rename, fsync the directory). An epoch directory without
//! a manifest is not a checkpoint. Every directory lamcr creates here is 0700: images hold
//! process memory.

use std::fs::DirBuilder;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::schema::manifest::{FILE_NAME, Manifest, ManifestError};
use crate::schema::{Engine, Epoch, FileEntry, JobId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no such checkpoint")]
    Missing { path: PathBuf },
    #[error("{path}: no manifest: this checkpoint was never committed")]
    NoManifest { path: PathBuf },
    #[error("{path}: no committed checkpoint in this job directory")]
    NoEpoch { path: PathBuf },
    #[error("{path}: holds {count} jobs; name one of them")]
    Ambiguous { path: PathBuf, count: usize },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Manifest {
        path: PathBuf,
        source: ManifestError,
    },
    #[error("{path}: missing image file")]
    ImageMissing { path: PathBuf },
    #[error("{path}: image is {actual} bytes, the manifest says {expected}")]
    ImageSize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: image checksum mismatch (corrupt)")]
    ImageChecksum { path: PathBuf },
    #[error("{path}: manifest names a file outside the checkpoint")]
    Escapes { path: PathBuf },
}

/// The default checkpoint root: `$LAMCR_CKPT_DIR`, else `$HOME/.lamcr/checkpoints`.
pub fn default_ckpt_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LAMCR_CKPT_DIR") {
        return d.into();
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    home.join(".lamcr").join("checkpoints")
}

fn private_dir(path: &Path, recursive: bool) -> Result<(), StoreError> {
    DirBuilder::new()
        .mode(0o700)
        .recursive(recursive)
        .create(path)
        .map_err(|source| StoreError::Create {
            path: path.to_path_buf(),
            source,
        })
}

/// Committed epochs of a job directory, oldest first.
pub fn committed_epochs(job_dir: &Path) -> Vec<(Epoch, PathBuf)> {
    let mut out: Vec<(Epoch, PathBuf)> = std::fs::read_dir(job_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n: u64 = e.file_name().to_str()?.parse().ok()?;
            let p = e.path();
            p.join(FILE_NAME).is_file().then_some((Epoch(n), p))
        })
        .collect();
    out.sort();
    out
}

/// Deletes all but the newest `keep` committed epochs of a job directory. Called only right after
/// a commit, so a newer checkpoint always exists before an older one goes.
pub fn prune(job_dir: &Path, keep: usize) {
    let epochs = committed_epochs(job_dir);
    let excess = epochs.len().saturating_sub(keep);
    for (_, dir) in &epochs[..excess] {
        // Unpublish first (the manifest), so a half-deleted epoch never looks committed.
        let _ = std::fs::remove_file(dir.join(FILE_NAME));
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Creates the next epoch directory of a job: one more than any epoch directory present.
pub fn allocate_epoch(ckpt_dir: &Path, job: &JobId) -> Result<(Epoch, PathBuf), StoreError> {
    private_dir(ckpt_dir, true)?;
    let job_dir = ckpt_dir.join(&job.0);
    if !job_dir.is_dir() {
        private_dir(&job_dir, false)?;
    }
    let next = std::fs::read_dir(&job_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let dir = job_dir.join(next.to_string());
    private_dir(&dir, false)?;
    Ok((Epoch(next), dir))
}

/// Writes the manifest last and renames it into place: the checkpoint now exists.
pub fn commit(epoch_dir: &Path, manifest: &Manifest) -> Result<u64, StoreError> {
    let tmp = epoch_dir.join(format!("{FILE_NAME}.tmp"));
    let path = epoch_dir.join(FILE_NAME);
    let bytes = manifest.to_bytes();
    let werr = |source| StoreError::Write {
        path: tmp.clone(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(werr)?;
    f.write_all(&bytes).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, &path).map_err(|source| StoreError::Write {
        path: path.clone(),
        source,
    })?;
    if let Ok(d) = std::fs::File::open(epoch_dir) {
        let _ = d.sync_all();
    }
    Ok(manifest.files.iter().map(|f| f.size).sum())
}

/// Removes an uncommitted epoch directory.
pub fn abandon(epoch_dir: &Path) {
    let _ = std::fs::remove_dir_all(epoch_dir);
}

/// Size and xxh3-64 of a file (read through a mapping: no copy).
pub fn hash_file(path: &Path) -> std::io::Result<(u64, u64)> {
    let f = std::fs::File::open(path)?;
    Ok(match crate::sys::FileMap::new(&f)? {
        None => (0, xxhash_rust::xxh3::xxh3_64(&[])),
        Some(map) => (
            map.bytes().len() as u64,
            xxhash_rust::xxh3::xxh3_64(map.bytes()),
        ),
    })
}

/// Finds the epoch directory `path` names: an epoch directory, a job directory (its newest
/// committed epoch) or a checkpoint root holding exactly one job.
pub fn resolve(path: &Path) -> Result<PathBuf, StoreError> {
    if !path.exists() {
        return Err(StoreError::Missing {
            path: path.to_path_buf(),
        });
    }
    // An epoch directory: it has a manifest, or node image directories (then an uncommitted one).
    let has_images = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix("node")
                .is_some_and(|n| n.parse::<u32>().is_ok())
                && e.path().is_dir()
        });
    if path.join(FILE_NAME).exists() || has_images {
        return Ok(path.to_path_buf());
    }
    if let Some((_, newest)) = committed_epochs(path).pop() {
        return Ok(newest);
    }
    let jobs: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|source| StoreError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !committed_epochs(p).is_empty())
        .collect();
    match jobs.len() {
        0 => Err(StoreError::NoEpoch {
            path: path.to_path_buf(),
        }),
        1 => Ok(committed_epochs(&jobs[0]).pop().expect("non-empty").1),
        count => Err(StoreError::Ambiguous {
            path: path.to_path_buf(),
            count,
        }),
    }
}

/// Reads and verifies a checkpoint: the manifest, then every image file's name and size, then
/// the checksums of the files no CRIU restore reads. A CRIU node's images are checksummed by
/// its lamd while CRIU restores from them (see [`verify_checksums`]): the files are read once
/// in parallel instead of twice in a row, and no restored process runs before they pass.
/// Returns the manifest and the files whose checksums are still to be verified.
pub fn load(epoch_dir: &Path) -> Result<(Manifest, Vec<FileEntry>), StoreError> {
    let mpath = epoch_dir.join(FILE_NAME);
    let bytes = std::fs::read(&mpath).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => StoreError::NoManifest {
            path: mpath.clone(),
        },
        _ => StoreError::Read {
            path: mpath.clone(),
            source,
        },
    })?;
    let manifest = Manifest::from_bytes(&bytes).map_err(|source| StoreError::Manifest {
        path: mpath.clone(),
        source,
    })?;
    // Names and sizes first (cheap, and the first error in manifest order is the one reported).
    for f in &manifest.files {
        let rel = Path::new(&f.path);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(StoreError::Escapes { path: mpath });
        }
        let path = epoch_dir.join(rel);
        let meta = std::fs::metadata(&path)
            .map_err(|_| StoreError::ImageMissing { path: path.clone() })?;
        if meta.len() != f.size {
            return Err(StoreError::ImageSize {
                path,
                expected: f.size,
                actual: meta.len(),
            });
        }
    }
    let criu_dirs: Vec<String> = manifest
        .schema
        .nodes
        .iter()
        .filter(|n| n.engine == Engine::Criu && !n.images_dir.is_empty())
        .map(|n| format!("{}/", n.images_dir))
        .collect();
    let (deferred, now): (Vec<FileEntry>, Vec<FileEntry>) = manifest
        .files
        .iter()
        .cloned()
        .partition(|f| criu_dirs.iter().any(|d| f.path.starts_with(d.as_str())));
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    verify_checksums(epoch_dir, &now, workers)?;
    Ok((manifest, deferred))
}

/// Checks `files` (relative to `epoch_dir`) against their checksums with up to `workers`
/// threads. The first mismatch in `files` order is the one reported.
pub fn verify_checksums(
    epoch_dir: &Path,
    files: &[FileEntry],
    workers: usize,
) -> Result<(), StoreError> {
    let paths: Vec<PathBuf> = files.iter().map(|f| epoch_dir.join(&f.path)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<(usize, Result<u64, std::io::Error>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers.max(1).min(paths.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(path) = paths.get(i) else {
                            return done;
                        };
                        done.push((i, hash_file(path).map(|(_, sum)| sum)));
                    }
                })
            })
            .collect();
        let mut all: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect();
        all.sort_by_key(|(i, _)| *i);
        all
    });
    if results.len() != paths.len() {
        return Err(StoreError::Read {
            path: epoch_dir.to_path_buf(),
            source: std::io::Error::other("checksum worker failed"),
        });
    }
    for (i, r) in results {
        let path = paths[i].clone();
        let sum = r.map_err(|source| StoreError::Read {
            path: path.clone(),
            source,
        })?;
        if sum != files[i].xxh3 {
            return Err(StoreError::ImageChecksum { path });
        }
    }
    Ok(())
}
