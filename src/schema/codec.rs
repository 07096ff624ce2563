//! The one place that knows how lamcr's types become bytes: bincode 2, little-endian, varints,
//! with a decode limit so that a hostile length can never make us allocate without bound.

use bincode::{Decode, Encode};

/// The largest frame or schema lamcr accepts (64 MiB).
pub const MAX_MESSAGE: usize = 64 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<MAX_MESSAGE>()
}

/// A byte sequence that does not decode as the expected type.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("malformed data")]
    Decode(#[source] bincode::error::DecodeError),
    #[error("{0} trailing bytes after the data")]
    Trailing(usize),
}

/// Encodes `value`. Encoding into memory cannot fail for lamcr's types.
pub fn encode<T: Encode>(value: &T) -> Vec<u8> {
    bincode::encode_to_vec(value, config()).expect("encoding into a Vec cannot fail")
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Encode>(value: &T, out: &mut Vec<u8>) {
    out.extend_from_slice(&encode(value));
}

/// Decodes a whole byte slice as `T`.
pub fn decode<T: Decode<()>>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::decode_from_slice(bytes, config()).map_err(CodecError::Decode)?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}
