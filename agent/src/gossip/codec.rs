//! foca's wire format, through the project's one codec module.

use bytes::{Buf, BufMut};
use ferry_transport::codec::{decode_prefix, encode, CodecError};
use foca::{Header, Member};

use super::identity::GossipId;

#[derive(Debug, thiserror::Error)]
pub enum GossipCodecError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("no room for a {0}-byte item in the packet")]
    NoRoom(usize),
}

#[derive(Clone, Copy, Debug, Default)]
pub struct GossipCodec;

fn put(bytes: Vec<u8>, mut buf: impl BufMut) -> Result<(), GossipCodecError> {
    // foca fills packets item by item and relies on a failed item leaving
    // the buffer untouched.
    if buf.remaining_mut() < bytes.len() {
        return Err(GossipCodecError::NoRoom(bytes.len()));
    }
    buf.put_slice(&bytes);
    Ok(())
}

fn take<T: serde::de::DeserializeOwned>(mut buf: impl Buf) -> Result<T, GossipCodecError> {
    // foca hands contiguous buffers (it decodes from one datagram).
    let (value, used) = decode_prefix::<T>(buf.chunk())?;
    buf.advance(used);
    Ok(value)
}

impl foca::Codec<GossipId> for GossipCodec {
    type Error = GossipCodecError;

    fn encode_header(
        &mut self,
        header: &Header<GossipId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        put(encode(header)?, buf)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<GossipId>, Self::Error> {
        take(buf)
    }

    fn encode_member(
        &mut self,
        member: &Member<GossipId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        put(encode(member)?, buf)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<GossipId>, Self::Error> {
        take(buf)
    }
}

#[cfg(test)]
mod tests {
    use foca::Codec;

    use super::*;

    fn id(node: u64) -> GossipId {
        GossipId {
            node,
            addr: "127.0.0.1:7000".parse().unwrap(),
            bump: 5,
        }
    }

    #[test]
    fn gossip_codec_round_trips_and_leaves_a_full_buffer_untouched() {
        let header = Header {
            src: id(1),
            src_incarnation: 2,
            dst: id(2),
            message: foca::Message::Ping(7),
        };
        let mut buf = Vec::new();
        GossipCodec.encode_header(&header, &mut buf).unwrap();
        let back = GossipCodec.decode_header(&buf[..]).unwrap();
        assert_eq!(back, header);

        let mut small = [0u8; 3];
        let mut slice = &mut small[..];
        assert!(GossipCodec
            .encode_member(&Member::alive(id(3)), &mut slice)
            .is_err());
        assert_eq!(small, [0u8; 3]);
    }

    #[test]
    fn gossip_codec_refuses_garbage() {
        assert!(GossipCodec.decode_header(&[0xff_u8; 9][..]).is_err());
        assert!(GossipCodec.decode_header(&[][..]).is_err());
    }
}
