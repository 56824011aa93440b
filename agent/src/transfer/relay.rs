//! Raw bytes both ways between a local socket and a QUIC stream pair: a
//! runtime's own protocol carried over a move's connection (QEMU's
//! migration streams, CRIU's page server), counted and, where asked,
//! checksummed end to end. The checksum is XXH3-128, not SHA-256: QUIC
//! already authenticates every byte between the agents, so it guards
//! only the relays' own handling (truncation, reordering), and SHA-256
//! was the largest single cost of a 256 MiB container's page stream
//! (9 % of both cores in its frozen window, `perf record -a`).

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use xxhash_rust::xxh3::Xxh3;

/// What one direction of a splice does with the bytes it passes.
#[derive(Default)]
pub struct Tap<'a> {
    counter: Option<&'a AtomicU64>,
    checksum: Option<Box<Xxh3>>,
    /// Most bytes it passes; more is an error.
    cap: Option<u64>,
}

impl<'a> Tap<'a> {
    pub fn counted(counter: &'a AtomicU64) -> Self {
        Tap {
            counter: Some(counter),
            ..Tap::default()
        }
    }

    pub fn checksummed(counter: Option<&'a AtomicU64>) -> Self {
        Tap {
            counter,
            checksum: Some(Box::default()),
            cap: None,
        }
    }

    pub fn capped(self, cap: u64) -> Self {
        Tap {
            cap: Some(cap),
            ..self
        }
    }
}

/// What passed one way: its bytes and, when checksummed, their XXH3-128.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Passed {
    pub bytes: u64,
    pub checksum: Option<u128>,
}

/// Copy both ways between `local` and a QUIC stream pair until both ends
/// are done; returns what came from the stream and what went to it.
pub async fn splice<S>(
    local: S,
    (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
    inbound: Tap<'_>,
    outbound: Tap<'_>,
) -> std::io::Result<(Passed, Passed)>
where
    S: AsyncRead + AsyncWrite,
{
    let (mut local_read, mut local_write) = tokio::io::split(local);
    let inbound = async {
        let passed = from_stream(&mut recv, &mut local_write, inbound).await?;
        // The runtime may have closed its end already.
        let _ = local_write.shutdown().await;
        Ok::<Passed, std::io::Error>(passed)
    };
    let outbound = async {
        let passed = to_stream(&mut local_read, &mut send, outbound).await?;
        let _ = send.finish();
        delivered(&send).await?;
        Ok::<Passed, std::io::Error>(passed)
    };
    tokio::try_join!(inbound, outbound)
}

/// How long the peer may take to acknowledge a relay's last bytes.
const DELIVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Wait until the peer has every byte written to `send`. A relay may be
/// its connection's last user (the pool drops a connection whose Raft
/// call went unanswered while the relay filled it), and dropping the last
/// user closes the connection at once, losing what QUIC still held: the
/// end of a 64 MiB page stream, seen as "closed by peer: 0" on the target
/// (bench-move, 9 moves in 13 on one machine).
pub async fn delivered(send: &quinn::SendStream) -> std::io::Result<()> {
    match tokio::time::timeout(DELIVERY, send.stopped()).await {
        Ok(Ok(None)) => Ok(()),
        Ok(Ok(Some(code))) => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            format!("the peer stopped the stream (code {code}) before taking all of it"),
        )),
        Ok(Err(quinn::StoppedError::ConnectionLost(why))) => Err(lost(why)),
        Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the peer did not acknowledge the stream's end within {DELIVERY:?}"),
        )),
    }
}

/// What a relay reads from its local socket at once.
const CHUNK: usize = 256 << 10;

/// Local socket to stream: a large read is handed to QUIC as it is, not
/// copied again; a small one is copied out, so it does not pin a whole
/// chunk's allocation while QUIC holds it.
async fn to_stream<R>(
    from: &mut R,
    to: &mut quinn::SendStream,
    mut tap: Tap<'_>,
) -> std::io::Result<Passed>
where
    R: AsyncRead + Unpin,
{
    let mut bytes = 0u64;
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        if from.read_buf(&mut buf).await? == 0 {
            return Ok(tap.passed(bytes));
        }
        let chunk = match buf.len() < CHUNK / 4 {
            true => {
                let small = Bytes::copy_from_slice(&buf);
                buf.clear();
                small
            }
            false => std::mem::replace(&mut buf, BytesMut::with_capacity(CHUNK)).freeze(),
        };
        tap.pass(&chunk)?;
        bytes += chunk.len() as u64;
        to.write_chunk(chunk).await.map_err(|e| match e {
            // The connection's own reason, which quinn's io error drops.
            quinn::WriteError::ConnectionLost(why) => lost(why),
            other => other.into(),
        })?;
    }
}

/// Stream to local socket, QUIC's own buffers written out as they come.
async fn from_stream<W>(
    from: &mut quinn::RecvStream,
    to: &mut W,
    mut tap: Tap<'_>,
) -> std::io::Result<Passed>
where
    W: AsyncWrite + Unpin,
{
    let mut bytes = 0u64;
    while let Some(chunk) = from.read_chunk(CHUNK, true).await.map_err(|e| match e {
        quinn::ReadError::ConnectionLost(why) => lost(why),
        other => other.into(),
    })? {
        tap.pass(&chunk.bytes)?;
        to.write_all(&chunk.bytes).await?;
        bytes += chunk.bytes.len() as u64;
    }
    Ok(tap.passed(bytes))
}

fn lost(why: quinn::ConnectionError) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        format!("connection lost: {why}"),
    )
}

impl Tap<'_> {
    fn pass(&mut self, data: &[u8]) -> std::io::Result<()> {
        if let Some(cap) = self.cap.as_mut() {
            *cap = cap
                .checked_sub(data.len() as u64)
                .ok_or_else(|| std::io::Error::other("more bytes than the stream may carry"))?;
        }
        if let Some(checksum) = self.checksum.as_mut() {
            checksum.update(data);
        }
        if let Some(counter) = self.counter {
            counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn passed(self, bytes: u64) -> Passed {
        Passed {
            bytes,
            checksum: self.checksum.map(|c| c.digest128()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checksummed_tap_names_the_xxh3_of_what_passed_in_any_chunks() {
        let data = vec![7u8; 600 << 10];
        let counter = AtomicU64::new(0);
        let mut tap = Tap::checksummed(Some(&counter));
        for chunk in data.chunks(CHUNK / 3) {
            tap.pass(chunk).unwrap();
        }
        let passed = tap.passed(data.len() as u64);
        assert_eq!(passed.bytes, data.len() as u64);
        assert_eq!(counter.load(Ordering::Relaxed), data.len() as u64);
        let whole = xxhash_rust::xxh3::xxh3_128(&data);
        assert_eq!(passed.checksum, Some(whole));
        let mut other = Tap::checksummed(None);
        other.pass(&data[1..]).unwrap();
        assert_ne!(other.passed(0).checksum, Some(whole));
        let mut plain = Tap::default();
        plain.pass(&data[..5]).unwrap();
        assert_eq!(plain.passed(5).checksum, None);
    }

    #[test]
    fn a_capped_tap_refuses_what_goes_past_its_cap() {
        let mut tap = Tap::default().capped(10);
        tap.pass(&[0; 6]).unwrap();
        tap.pass(&[0; 4]).unwrap();
        assert!(tap.pass(&[0; 1]).is_err());
    }
}
