//! The checkpoint manifest: the restart schema plus every image file's size and checksum.
//!
//! Layout on disk: `LAMCRMAN` magic, a little-endian u32 format version, the u64 payload length,
//! the xxh3-64 of the payload, then the payload (the bincode of [`Manifest`]). A checkpoint is committed exactly when
//! its manifest exists; it is written last and renamed into place.

use bincode::{Decode, Encode};

use super::codec::{self, CodecError};
use super::{FileEntry, RestartSchema};

pub const MAGIC: &[u8; 8] = b"LAMCRMAN";
pub const FORMAT_VERSION: u32 = 2;
/// The manifest's file name inside an epoch directory.
pub const FILE_NAME: &str = "manifest";
const HEADER: usize = 28;

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Manifest {
    pub schema: RestartSchema,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not a lamcr manifest (bad magic)")]
    Foreign,
    #[error("truncated manifest ({0} bytes)")]
    Truncated(usize),
    #[error(
        "manifest format version {0} is not supported (this lamcr reads version {FORMAT_VERSION})"
    )]
    Version(u32),
    #[error("manifest checksum mismatch: the file is corrupt")]
    Checksum,
    #[error("manifest payload is malformed")]
    Payload(#[source] CodecError),
}

impl Manifest {
    pub fn to_bytes(&self) -> Vec<u8> {
        let payload = codec::encode(self);
        let mut out = Vec::with_capacity(payload.len() + HEADER);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(if bytes.len() < MAGIC.len() && MAGIC.starts_with(bytes) {
                ManifestError::Truncated(bytes.len())
            } else {
                ManifestError::Foreign
            });
        }
        if bytes.len() < HEADER {
            return Err(ManifestError::Truncated(bytes.len()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(ManifestError::Version(version));
        }
        let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let sum = u64::from_le_bytes(bytes[20..28].try_into().expect("8 bytes"));
        let payload = &bytes[HEADER..];
        if (payload.len() as u64) < len {
            return Err(ManifestError::Truncated(bytes.len()));
        }
        if payload.len() as u64 != len {
            return Err(ManifestError::Checksum);
        }
        if xxhash_rust::xxh3::xxh3_64(payload) != sum {
            return Err(ManifestError::Checksum);
        }
        codec::decode(payload).map_err(ManifestError::Payload)
    }
}
