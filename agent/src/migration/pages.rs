//! A stateful move's memory pages, streamed while the source's runtime
//! dumps them (CRIU's page-server protocol through a stream of the move's
//! connection, `TransferPart::Pages`), instead of written to files and
//! sent after the dump: the send overlaps the dump inside the frozen
//! window. The source listens on a loopback port for its runtime's dump
//! and takes only a connection of its own user; the target feeds its
//! runtime's page server. Both ends checksum what passes, and the target
//! restores only if what its page server got is what the source names in
//! the freeze header.

use std::net::Ipv4Addr;
use std::time::Duration;

use ferry_raft::Job;
use tokio::net::{TcpListener, TcpStream};

use super::error::{instance_name, MoveError};
use super::source;
use crate::api::names::InstanceName;
use crate::api::transfer::{PageStream, TransferPart};
use crate::node::peers::Channel;
use crate::node::Agent;
use crate::transfer::relay::{self, Passed, Tap};

/// How long the pages may take to pass on after the dump ended.
const DRAIN: Duration = Duration::from_secs(30);
/// How long the target's final pass waits, once the source's header has
/// come, for its page server to be done with the stream the header names.
const SETTLE: Duration = Duration::from_secs(30);

fn local(what: &'static str) -> impl FnOnce(std::io::Error) -> MoveError {
    move |e| MoveError::Local(format!("cannot {what}: {e}"))
}

/// Source, frozen: the final dump with its pages streamed to the target,
/// about `bytes` of them. An error leaves the copy frozen here for the
/// caller to thaw.
pub(super) async fn dump_streaming(
    agent: &Agent,
    job: &Job,
    name: &InstanceName,
    bytes: u64,
) -> Result<PageStream, MoveError> {
    let driver = agent.driver();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(local("listen for the dump's pages"))?;
    let addr = listener
        .local_addr()
        .map_err(local("listen for the dump's pages"))?;
    let stream = stream_id()?;
    let part = TransferPart::Pages { stream, bytes };
    let channel = source::open(agent, job, job.target, part).await?;
    let mut relayed = AbortOnDrop(tokio::spawn(relay_dump(listener, channel)));
    if let Err(e) = driver.dump_frozen(name, Some(addr)).await {
        // The relay's own failure (the target's) is often the cause.
        let relay = match relayed.0.is_finished() {
            true => (&mut relayed.0).await.ok().and_then(Result::err),
            false => None,
        };
        return Err(match relay {
            Some(cause) => MoveError::Local(format!("{e} (the page stream: {cause})")),
            None => e.into(),
        });
    }
    let passed = match tokio::time::timeout(DRAIN, &mut relayed.0).await {
        Ok(Ok(passed)) => passed?,
        Ok(Err(e)) => return Err(MoveError::Local(format!("the page relay ended: {e}"))),
        Err(_) => {
            return Err(MoveError::Local(format!(
                "the dump's pages were still in flight {DRAIN:?} after the dump"
            )))
        }
    };
    Ok(PageStream {
        stream,
        bytes: passed.bytes,
        // Always there: the outbound side is checksummed.
        checksum: passed.checksum.unwrap_or_default(),
    })
}

/// The relay ends with the dump's future, however that ends (its accept
/// would wait forever for a dump that never connects).
pub(super) struct AbortOnDrop<T>(pub(super) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A page stream's id: random, so no earlier attempt's stream answers
/// for this one.
fn stream_id() -> Result<u64, MoveError> {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| MoveError::Local("no randomness for a page stream's id".into()))?;
    Ok(u64::from_le_bytes(bytes))
}

async fn relay_dump(listener: TcpListener, channel: Channel) -> Result<Passed, MoveError> {
    let dump = accept_own(&listener).await?;
    // One connection: nobody else gets in once the dump's is there.
    drop(listener);
    let (_, sent) = relay::splice(dump, channel, Tap::default(), Tap::checksummed(None)).await?;
    Ok(sent)
}

/// The first connection from this agent's own user (the runtime's dump
/// runs as it), established, not one closed already (a closed socket's
/// row names root); another user's is refused, so nobody else on the
/// host can feed pages into a move or keep the dump out.
async fn accept_own(listener: &TcpListener) -> Result<TcpStream, MoveError> {
    let port = listener
        .local_addr()
        .map_err(local("accept the dump"))?
        .port();
    let uid = rustix::process::geteuid().as_raw();
    loop {
        let (conn, peer) = listener.accept().await.map_err(local("accept the dump"))?;
        let table = tokio::fs::read_to_string("/proc/self/net/tcp")
            .await
            .unwrap_or_default();
        if socket_owner(&table, peer.port(), port) == Some(uid) {
            return Ok(conn);
        }
        tracing::warn!(%peer, "refused a connection to a move's page relay from another user");
    }
}

/// The owner (uid) of the established TCP socket from `local_port` to
/// `remote_port` in a `/proc/net/tcp` table: state `01`, a live inode.
fn socket_owner(table: &str, local_port: u16, remote_port: u16) -> Option<u32> {
    let port = |addr: &str| {
        addr.split_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let ends = (port(fields.get(1)?)?, port(fields.get(2)?)?);
        let live = *fields.get(3)? == "01" && *fields.get(9)? != "0";
        (ends == (local_port, remote_port) && live)
            .then(|| fields.get(7)?.parse().ok())
            .flatten()
    })
}

/// Target: feed the source's page stream `stream` to a page server of
/// the job's instance, while this agent's final pass of the job waits
/// for it (else it is refused: a stream arriving at any other time would
/// wipe staged images in use); how it ends is kept for the final pass.
pub async fn serve(agent: &Agent, job: &Job, (stream, bytes): (u64, u64), channel: Channel) {
    if !agent.transfers().expects_pages(job.id) {
        tracing::warn!(job = job.id, "refused a page stream outside a final pass");
        return;
    }
    let outcome = receive(agent, job, bytes, channel).await;
    if let Err(e) = &outcome {
        tracing::warn!(job = job.id, "the memory page stream failed: {e}");
    }
    let outcome = outcome.map_err(|e| e.to_string());
    agent.transfers().pages_ended(job.id, stream, outcome);
}

/// Most a page stream may carry: its estimate twice over and a margin (a
/// runaway sender must not fill the staging area).
fn cap(bytes: u64) -> u64 {
    bytes.saturating_mul(2).saturating_add(64 << 20)
}

async fn receive(
    agent: &Agent,
    job: &Job,
    bytes: u64,
    channel: Channel,
) -> Result<Passed, MoveError> {
    let name = instance_name(job)?;
    // As the images' files would be: room checked before they come.
    let room = agent.reserve().check(bytes, "receiving the memory pages");
    room.map_err(|e| MoveError::Tree(e.into()))?;
    let server = agent.driver().page_server(&name, bytes).await?;
    let counter = agent.transfers().stage(job.id, "memory pages");
    let tap = Tap::checksummed(Some(&counter)).capped(cap(bytes));
    let spliced = relay::splice(server.socket, channel, tap, Tap::default());
    // At once: a server that fails or hangs (killed at its timeout) ends
    // the splice by closing its socket, and its reasons come first.
    let (spliced, done) = tokio::join!(spliced, server.done);
    done?;
    Ok(spliced?.0)
}

/// Target, final pass: the bytes of the pages the source says it sent,
/// once the page server has them all and they are what was sent.
pub(super) async fn received(
    agent: &Agent,
    job: &Job,
    sent: &PageStream,
) -> Result<u64, MoveError> {
    let outcome = agent
        .transfers()
        .pages_of(job.id, sent.stream, SETTLE)
        .await;
    check(sent, outcome).map_err(MoveError::Local)
}

fn check(sent: &PageStream, outcome: Option<Result<Passed, String>>) -> Result<u64, String> {
    match outcome {
        None => Err(format!(
            "the memory pages the source sent did not all arrive within {SETTLE:?}"
        )),
        Some(Err(why)) => Err(format!("receiving the memory pages failed: {why}")),
        Some(Ok(got)) if got.bytes == sent.bytes && got.checksum == Some(sent.checksum) => {
            Ok(got.bytes)
        }
        Some(Ok(got)) => Err(format!(
            "the memory pages arrived damaged: the source sent {} bytes (checksum {:032x}), the page server got {} ({:032x})",
            sent.bytes,
            sent.checksum,
            got.bytes,
            got.checksum.unwrap_or_default()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pages_the_source_sent_are_restored() {
        let sent = PageStream {
            stream: 1,
            bytes: 4096,
            checksum: 0xaa,
        };
        let got = |bytes, checksum| {
            Some(Ok(Passed {
                bytes,
                checksum: Some(checksum),
            }))
        };
        assert_eq!(check(&sent, got(4096, 0xaa)), Ok(4096));
        let damaged = check(&sent, got(4096, 0xab)).unwrap_err();
        assert!(damaged.contains("damaged"), "{damaged}");
        assert!(check(&sent, got(4095, 0xaa)).is_err());
        assert!(check(&sent, None)
            .unwrap_err()
            .contains("did not all arrive"));
        let failed = check(&sent, Some(Err("page server failed".into()))).unwrap_err();
        assert!(failed.contains("page server failed"), "{failed}");
    }

    #[tokio::test]
    async fn the_relay_takes_a_connection_of_its_own_user() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await });
        let accepted = tokio::time::timeout(Duration::from_secs(10), accept_own(&listener)).await;
        let conn = accepted.expect("accepted in time").expect("accepted");
        let client = client.await.unwrap().unwrap();
        assert_eq!(conn.peer_addr().unwrap(), client.local_addr().unwrap());
    }

    #[test]
    fn the_owner_of_a_loopback_connection_is_read_from_the_tcp_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                     0: 0100007F:9C40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n   \
                     1: 0100007F:D431 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 2 1\n   \
                     2: 0100007F:D432 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 3 1\n   \
                     3: 0100007F:D434 0100007F:9C40 06 00000000:00000000 03:00001000 00000000     0        0 0 3\n";
        assert_eq!(socket_owner(table, 0xD431, 0x9C40), Some(1000));
        assert_eq!(socket_owner(table, 0xD432, 0x9C40), Some(0));
        assert_eq!(socket_owner(table, 0xD433, 0x9C40), None);
        // Closed (TIME_WAIT, no inode): its row names root, but no one.
        assert_eq!(socket_owner(table, 0xD434, 0x9C40), None);
    }
}
