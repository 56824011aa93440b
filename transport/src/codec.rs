use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("could not encode value: {0}")]
    Encode(#[source] bincode::error::EncodeError),
    #[error("could not decode message: {0}; the peer may run an incompatible ferry version")]
    Decode(#[source] bincode::error::DecodeError),
    #[error(
        "message has {trailing} unexpected trailing bytes after a {used}-byte value; \
         the peer may run an incompatible ferry version"
    )]
    TrailingBytes { used: usize, trailing: usize },
}

/// What decoding one small untrusted message (a datagram) may make the
/// decoder read or allocate: a forged length prefix must not cost memory.
const SMALL_DECODE_LIMIT: usize = 64 * 1024;

/// Encode with bincode's standard configuration through serde.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(CodecError::Encode)
}

/// Decode a value that must span all of `bytes`: trailing data means the
/// sender and receiver disagree on the type, which must not pass silently.
/// The most a decoded value may claim: twice a frame's cap (16 MiB, see
/// `frame::MAX_FRAME`), room for bookkeeping.
pub const DECODE_LIMIT: usize = 32 * 1024 * 1024;

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    // The limit bounds what a decoded value may claim (a length prefix
    // announcing a huge vector), not just the input's size.
    let config = bincode::config::standard().with_limit::<DECODE_LIMIT>();
    let (value, used) =
        bincode::serde::decode_from_slice(bytes, config).map_err(CodecError::Decode)?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes {
            used,
            trailing: bytes.len() - used,
        });
    }
    Ok(value)
}

/// Decode one value from the front of `bytes` (several values may follow
/// each other, as in a gossip packet); returns it and the bytes it used.
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
    bincode::serde::decode_from_slice(
        bytes,
        bincode::config::standard().with_limit::<SMALL_DECODE_LIMIT>(),
    )
    .map_err(CodecError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_preserves_value() {
        let value = (String::from("node-a"), vec![1u32, 2, 3], Some(7u64));
        let bytes = encode(&value).unwrap();
        let back: (String, Vec<u32>, Option<u64>) = decode(&bytes).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode(&5u32).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<u32>(&bytes),
            Err(CodecError::TrailingBytes { trailing: 1, .. })
        ));
    }

    #[test]
    fn prefix_decoding_reads_values_one_after_another() {
        let mut bytes = encode(&7u32).unwrap();
        bytes.extend(encode(&String::from("next")).unwrap());
        let (first, used): (u32, usize) = decode_prefix(&bytes).unwrap();
        assert_eq!(first, 7);
        let (second, _): (String, usize) = decode_prefix(&bytes[used..]).unwrap();
        assert_eq!(second, "next");
    }

    #[test]
    fn prefix_decoding_refuses_a_forged_huge_length() {
        // A length prefix claiming 4 GiB of payload in a 10-byte message.
        let bytes = [0xfc, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5];
        assert!(decode_prefix::<Vec<u8>>(&bytes).is_err());
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let bytes = encode(&String::from("hello")).unwrap();
        assert!(decode::<String>(&bytes[..3]).is_err());
    }
}
