//! A directory tree moves over a real QUIC channel: a full pass while the
//! source changes, then a final pass of what changed makes the copy exact.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_agent::transfer::space::Reserve;
use ferry_agent::transfer::tree::{self, Transferred};
use ferry_transport::endpoint::{Endpoint, Expect};
use ferry_transport::frame::FrameError;
use ferry_transport::pki::{new_serial, ClusterCa, Identity};
use ferry_transport::rpc::{serve, Peer, Pool, Service};
use tokio::sync::mpsc;

/// Receives a tree into `dest` for each channel opened with `delta` flag.
struct Receiver {
    dest: PathBuf,
    /// The disk reserve the receiver keeps, if any.
    reserve: Option<Reserve>,
    /// The last whole pass received, as a move's target keeps it.
    held: Mutex<Option<u128>>,
    done: mpsc::UnboundedSender<Result<Transferred, String>>,
}

impl Service for Receiver {
    type Request = bool;
    type Response = ();

    async fn handle(&self, _peer: Arc<Peer>, _request: bool) {}

    fn bad_frame(&self, _error: &FrameError) {}

    fn wants_stream(&self, _request: &bool) -> bool {
        true
    }

    async fn handle_stream(
        &self,
        _peer: Arc<Peer>,
        delta: bool,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let progress = std::sync::atomic::AtomicU64::new(0);
        // As a move does: the first pass synced, the final one not (and
        // synced as a whole after it).
        let writing = tree::Writing {
            progress: &progress,
            reserve: self.reserve.as_ref(),
            synced: !delta,
        };
        let held = self.held.lock().unwrap().take();
        let pass = match delta {
            true => tree::Pass::Changes { holds: held },
            false => tree::Pass::Whole,
        };
        let mut result =
            tree::receive_counted(&mut send, &mut recv, &self.dest, pass, writing).await;
        if let (false, Ok(whole)) = (delta, &result) {
            *self.held.lock().unwrap() = Some(whole.pass);
        }
        if delta && result.is_ok() {
            if let Err(e) = tree::sync(&self.dest).await {
                result = Err(e);
            }
        }
        let _ = send.finish();
        let _ = self.done.send(result.map_err(|e| e.to_string()));
    }
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// Wait until every entry of `root` last changed longer ago than a first
/// pass trusts (one changed just before it is always sent again).
async fn settled(root: &Path) {
    let newest = tree::scan(root)
        .unwrap()
        .iter()
        .map(|e| e.ctime_ns)
        .max()
        .unwrap_or(0);
    let due =
        std::time::UNIX_EPOCH + Duration::from_nanos(u64::try_from(newest).unwrap()) + tree::SETTLE;
    while std::time::SystemTime::now() < due {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn same_tree(a: &Path, b: &Path) {
    let (left, right) = (tree::scan(a).unwrap(), tree::scan(b).unwrap());
    assert_eq!(left.len(), right.len());
    for (l, r) in left.iter().zip(&right) {
        assert!(l.matches(r), "{l:?} != {r:?}");
    }
    for e in &left {
        if let tree::EntryKind::File { .. } = e.kind {
            assert_eq!(
                std::fs::read(a.join(&e.path)).unwrap(),
                std::fs::read(b.join(&e.path)).unwrap(),
                "{}",
                e.path
            );
        }
    }
}

/// A receiving endpoint writing into `dest`, and a pool to reach it.
fn pair(
    dest: PathBuf,
) -> (
    Pool,
    std::net::SocketAddr,
    Expect,
    mpsc::UnboundedReceiver<Result<Transferred, String>>,
) {
    pair_keeping(dest, None)
}

/// As [`pair`], the receiver keeping `reserve` free.
fn pair_keeping(
    dest: PathBuf,
    reserve: Option<Reserve>,
) -> (
    Pool,
    std::net::SocketAddr,
    Expect,
    mpsc::UnboundedReceiver<Result<Transferred, String>>,
) {
    let ca = ClusterCa::generate().unwrap();
    let server_creds = ca
        .issue(&Identity::Node("target".into()), &new_serial())
        .unwrap();
    let endpoint = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &server_creds).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (done, results) = mpsc::unbounded_channel();
    tokio::spawn(serve(
        endpoint,
        Arc::new(Receiver {
            dest,
            reserve,
            held: Mutex::new(None),
            done,
        }),
    ));
    let client_creds = ca
        .issue(&Identity::Node("source".into()), &new_serial())
        .unwrap();
    let pool = Pool::new(Endpoint::bind("127.0.0.1:0".parse().unwrap(), &client_creds).unwrap());
    (pool, addr, Expect::Node("target".into()), results)
}

/// One pass of `src` to the receiver behind `pool`; what was sent.
async fn pass(
    to: &(Pool, std::net::SocketAddr, Expect),
    results: &mut mpsc::UnboundedReceiver<Result<Transferred, String>>,
    src: &Path,
    delta: bool,
    since: Option<&tree::Stamps>,
) -> (Transferred, tree::Stamps) {
    let (pool, addr, expect) = to;
    let (mut send, mut recv) = pool
        .open_stream(*addr, expect, &delta, Duration::from_secs(5))
        .await
        .unwrap();
    let sent = tree::send(&mut send, &mut recv, src, delta, since)
        .await
        .unwrap();
    let received = results.recv().await.unwrap().unwrap();
    assert_eq!(sent.0, received);
    sent
}

#[tokio::test]
async fn a_file_put_back_with_its_size_and_mtime_is_still_resent() {
    let source_dir = tempfile::tempdir().unwrap();
    let dest_dir = tempfile::tempdir().unwrap();
    let src = source_dir.path();
    write(src, "etc/shadow", b"root:old");
    let dest = dest_dir.path().join("rootfs");
    let (pool, addr, expect, mut results) = pair(dest.clone());
    let to = (pool, addr, expect);
    settled(src).await;
    let (_, first_pass) = pass(&to, &mut results, src, false, None).await;
    // What a running container can do: another file in its place, same
    // size, mode and mtime (it cannot set the ctime, or keep the inode).
    let path = src.join("etc/shadow");
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    std::fs::write(src.join("etc/shadow.new"), b"root:new").unwrap();
    std::fs::rename(src.join("etc/shadow.new"), &path).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let (sent, _) = pass(&to, &mut results, src, true, Some(&first_pass)).await;
    assert_eq!(sent.files, 1, "the replaced file travels again");
    assert_eq!(std::fs::read(dest.join("etc/shadow")).unwrap(), b"root:new");
}

#[tokio::test]
async fn full_then_delta_makes_an_exact_copy() {
    let source_dir = tempfile::tempdir().unwrap();
    let dest_dir = tempfile::tempdir().unwrap();
    let src = source_dir.path();
    write(src, "bin/busybox", &vec![7u8; 3 << 20]);
    std::os::unix::fs::symlink("busybox", src.join("bin/sh")).unwrap();
    write(src, "etc/hostname", b"c1\n");
    write(src, "var/log/old", b"gone soon");
    let dest = dest_dir.path().join("rootfs");
    let (pool, addr, expect, mut results) = pair(dest.clone());
    let to = (pool, addr, expect);
    settled(src).await;
    let (sent, first_pass) = pass(&to, &mut results, src, false, None).await;
    assert_eq!(sent.files, 3);
    same_tree(src, &dest);

    // The source changes while "running"; the delta moves only that.
    write(src, "etc/hostname", b"c1-moved\n");
    write(src, "data/new", b"fresh");
    std::fs::remove_file(src.join("var/log/old")).unwrap();
    let (sent, _) = pass(&to, &mut results, src, true, Some(&first_pass)).await;
    assert_eq!(sent.files, 2, "only the changed and the new file travel");
    assert!(sent.bytes < 100);
    same_tree(src, &dest);
}

#[tokio::test]
async fn a_final_pass_over_an_unchanged_tree_sends_nothing() {
    let source_dir = tempfile::tempdir().unwrap();
    let dest_dir = tempfile::tempdir().unwrap();
    let src = source_dir.path();
    for i in 0..300 {
        write(src, &format!("d{}/f{i}", i % 5), b"some bytes");
    }
    let dest = dest_dir.path().join("rootfs");
    let (pool, addr, expect, mut results) = pair(dest.clone());
    let to = (pool, addr, expect);
    settled(src).await;
    let (_, first_pass) = pass(&to, &mut results, src, false, None).await;
    let (sent, _) = pass(&to, &mut results, src, true, Some(&first_pass)).await;
    assert_eq!((sent.files, sent.bytes), (0, 0));
    same_tree(src, &dest);
}

#[tokio::test]
async fn a_receiver_that_no_longer_holds_the_first_pass_gets_the_whole_tree() {
    let source_dir = tempfile::tempdir().unwrap();
    let dest_dir = tempfile::tempdir().unwrap();
    let src = source_dir.path();
    write(src, "etc/hostname", b"c1\n");
    write(src, "etc/passwd", b"root:x:0:0");
    let dest = dest_dir.path().join("rootfs");
    let (pool, addr, expect, mut results) = pair(dest.clone());
    settled(src).await;
    let (_, first_pass) = pass(&(pool, addr, expect), &mut results, src, false, None).await;
    // What that pass wrote changed here, and this receiver (a restarted
    // one) does not know of the pass.
    std::fs::remove_file(dest.join("etc/passwd")).unwrap();
    write(&dest, "stray", b"not the source's");
    let (pool, addr, expect, mut results) = pair(dest.clone());
    let to = (pool, addr, expect);
    let (sent, _) = pass(&to, &mut results, src, true, Some(&first_pass)).await;
    assert_eq!(sent.files, 2, "everything travels again");
    same_tree(src, &dest);
}

#[tokio::test]
async fn a_final_pass_deleting_many_files_says_so_in_parts() {
    let source_dir = tempfile::tempdir().unwrap();
    let src = source_dir.path();
    for i in 0..2500 {
        write(src, &format!("d{}/f{i}", i % 7), b"");
    }
    let dest_dir = tempfile::tempdir().unwrap();
    let dest = dest_dir.path().join("rootfs");
    let (pool, addr, expect, mut results) = pair(dest.clone());
    let to = (pool, addr, expect);
    let (_, first_pass) = pass(&to, &mut results, src, false, None).await;
    for i in 0..7 {
        std::fs::remove_dir_all(src.join(format!("d{i}"))).unwrap();
    }
    pass(&to, &mut results, src, true, Some(&first_pass)).await;
    same_tree(src, &dest);
    assert!(std::fs::read_dir(&dest).unwrap().next().is_none());
}

/// `tree`'s frames as a hostile sender writes them: the same variants in
/// the same order (only the ones it sends carry real payloads).
#[derive(serde::Serialize)]
#[allow(dead_code)]
enum HostileFrame {
    Changes {
        pass: Option<u128>,
        removed: Vec<String>,
        last: bool,
    },
    Holds(()),
    Entry(tree::Entry),
    Chunk(()),
    Hole(()),
    FileEnd(()),
    End {
        files: u64,
        bytes: u64,
        root: tree::Entry,
        pass: u128,
    },
}

fn entry(path: &str, kind: tree::EntryKind, mode: u32) -> tree::Entry {
    tree::Entry {
        path: path.into(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        ino: 0,
        ctime_ns: 0,
        xattrs: Vec::new(),
    }
}

#[tokio::test]
async fn a_sender_swapping_a_directory_for_a_symlink_changes_nothing_outside_the_root() {
    use std::os::unix::fs::PermissionsExt;
    let outside = tempfile::tempdir().unwrap();
    std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dest_dir = tempfile::tempdir().unwrap();
    let dest = dest_dir.path().join("rootfs");
    let (pool, addr, expect, mut results) = pair(dest.clone());
    let (mut send, _recv) = pool
        .open_stream(addr, &expect, &false, Duration::from_secs(5))
        .await
        .unwrap();
    let target = outside.path().to_string_lossy().into_owned();
    for frame in [
        HostileFrame::Entry(entry("a", tree::EntryKind::Dir, 0o777)),
        HostileFrame::Entry(entry("a", tree::EntryKind::Symlink { target }, 0o777)),
        HostileFrame::End {
            files: 0,
            bytes: 0,
            root: entry("", tree::EntryKind::Dir, 0o755),
            pass: 0,
        },
    ] {
        ferry_transport::frame::write_frame(&mut send, &frame)
            .await
            .unwrap();
    }
    let _ = results.recv().await.unwrap();
    let mode = std::fs::metadata(outside.path())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o755, "the directory outside the root was changed");
    assert!(std::fs::symlink_metadata(dest.join("a"))
        .unwrap()
        .file_type()
        .is_symlink());
}

/// Root is needed for owners, device nodes and file capabilities; under
/// CI its absence fails the test, elsewhere it is skipped, saying why.
fn running_as_root() -> bool {
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI=true: this test needs root (owners, device nodes, file capabilities)"
    );
    eprintln!("skipped: needs root (owners, device nodes, file capabilities)");
    false
}

/// `security.capability` granting cap_net_bind_service, effective.
fn capability() -> Vec<u8> {
    [0x0200_0001u32, 1 << 10, 0, 0, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

#[tokio::test]
async fn a_rootfs_arrives_as_it_was() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    if !running_as_root() {
        return;
    }
    let source_dir = tempfile::tempdir().unwrap();
    let src = source_dir.path();
    std::fs::set_permissions(src, std::fs::Permissions::from_mode(0o750)).unwrap();
    write(src, "bin/ping", b"an ELF, say");
    std::fs::hard_link(src.join("bin/ping"), src.join("bin/ping6")).unwrap();
    let flags = rustix::fs::XattrFlags::empty();
    rustix::fs::setxattr(
        src.join("bin/ping"),
        "security.capability",
        &capability(),
        flags,
    )
    .unwrap();
    rustix::fs::setxattr(src.join("bin/ping"), "user.origin", b"debian", flags).unwrap();
    std::fs::create_dir_all(src.join("dev")).unwrap();
    let node = |name: &str, kind, dev| {
        let mode = rustix::fs::Mode::from_raw_mode(0o620);
        rustix::fs::mknodat(rustix::fs::CWD, src.join(name), kind, mode, dev).unwrap();
        // Past the umask.
        std::fs::set_permissions(src.join(name), std::fs::Permissions::from_mode(0o620)).unwrap();
    };
    node(
        "dev/null",
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::makedev(1, 3),
    );
    node("dev/fifo", rustix::fs::FileType::Fifo, 0);
    drop(std::os::unix::net::UnixListener::bind(src.join("dev/log")).unwrap());
    // 64 MiB with 4 KiB of data in the middle.
    let sparse = std::fs::File::create(src.join("var/sparse")).unwrap_or_else(|_| {
        std::fs::create_dir_all(src.join("var")).unwrap();
        std::fs::File::create(src.join("var/sparse")).unwrap()
    });
    sparse.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&sparse, &[9u8; 4096], 32 << 20).unwrap();
    drop(sparse);
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::open(src.join("dev"))
        .unwrap()
        .set_modified(old)
        .unwrap();

    let dest_dir = tempfile::tempdir().unwrap();
    let dest = dest_dir.path().join("rootfs");
    let (pool, addr, expect, mut results) = pair(dest.clone());
    let (mut send, mut recv) = pool
        .open_stream(addr, &expect, &false, Duration::from_secs(5))
        .await
        .unwrap();
    let (sent, _) = tree::send(&mut send, &mut recv, src, false, None)
        .await
        .unwrap();
    results.recv().await.unwrap().unwrap();
    same_tree(src, &dest);

    let meta = |p: &str| std::fs::symlink_metadata(dest.join(p)).unwrap();
    assert_eq!(
        meta("").permissions().mode() & 0o777,
        0o750,
        "root dir mode"
    );
    assert_eq!(
        meta("bin/ping").ino(),
        meta("bin/ping6").ino(),
        "hard link kept"
    );
    assert_eq!(
        sent.files, 2,
        "a hard link is not sent twice (ping, sparse)"
    );
    let mut value = [0u8; 64];
    let n =
        rustix::fs::getxattr(dest.join("bin/ping"), "security.capability", &mut value[..]).unwrap();
    assert_eq!(&value[..n], &capability()[..], "file capability kept");
    let n = rustix::fs::getxattr(dest.join("bin/ping"), "user.origin", &mut value[..]).unwrap();
    assert_eq!(&value[..n], b"debian");
    assert!(meta("dev/null").file_type().is_char_device());
    assert_eq!(meta("dev/null").rdev(), rustix::fs::makedev(1, 3));
    assert_eq!(meta("dev/null").permissions().mode() & 0o777, 0o620);
    assert!(meta("dev/fifo").file_type().is_fifo());
    assert!(meta("dev/log").file_type().is_socket());
    assert_eq!(meta("var/sparse").len(), 64 << 20);
    assert!(meta("var/sparse").blocks() * 512 < 1 << 20, "holes kept");
    assert_eq!(sent.bytes, 4096 + 11, "only data travels");
    assert_eq!(meta("dev").modified().unwrap(), old, "directory mtime kept");
}

#[tokio::test]
async fn a_sender_cannot_delete_through_a_symlink() {
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "keep", b"not the receiver's");
    let source_dir = tempfile::tempdir().unwrap();
    let src = source_dir.path();
    std::os::unix::fs::symlink(outside.path(), src.join("a")).unwrap();
    let dest_dir = tempfile::tempdir().unwrap();
    let dest = dest_dir.path().join("rootfs");
    let (pool, addr, expect, mut results) = pair(dest.clone());
    let to = (pool, addr, expect);
    let (_, first_pass) = pass(&to, &mut results, src, false, None).await;
    let (mut send, _recv) =
        to.0.open_stream(addr, &to.2, &true, Duration::from_secs(5))
            .await
            .unwrap();
    let frame = HostileFrame::Changes {
        pass: Some(first_pass.pass()),
        removed: vec!["a/keep".into()],
        last: true,
    };
    ferry_transport::frame::write_frame(&mut send, &frame)
        .await
        .unwrap();
    let receiver = results.recv().await.unwrap().unwrap_err();
    assert!(receiver.contains("unsafe path 'a/keep'"), "{receiver}");
    assert!(
        outside.path().join("keep").exists(),
        "deleted outside the root"
    );
}

#[tokio::test]
async fn a_side_that_fails_tells_the_other_why() {
    let dest_dir = tempfile::tempdir().unwrap();
    // The receiver cannot make its root: a file is in the way.
    let blocked = dest_dir.path().join("blocked");
    std::fs::write(&blocked, b"in the way").unwrap();
    let (pool, addr, expect, mut results) = pair(blocked);
    let src = tempfile::tempdir().unwrap();
    write(src.path(), "a", b"data");
    let (mut send, mut recv) = pool
        .open_stream(addr, &expect, &true, Duration::from_secs(5))
        .await
        .unwrap();
    let sent = tree::send(&mut send, &mut recv, src.path(), true, None).await;
    let receiver = results.recv().await.unwrap().unwrap_err();
    let sender = sent.unwrap_err().to_string();
    assert!(sender.contains("the other side failed: create"), "{sender}");
    assert!(receiver.starts_with("create"), "{receiver}");

    // The sender's tree is gone: the receiver hears why, not just that
    // the stream ended.
    let dest_dir = tempfile::tempdir().unwrap();
    let (pool, addr, expect, mut results) = pair(dest_dir.path().join("copy"));
    let missing = src.path().join("gone");
    let (mut send, mut recv) = pool
        .open_stream(addr, &expect, &false, Duration::from_secs(5))
        .await
        .unwrap();
    let sent = tree::send(&mut send, &mut recv, &missing, false, None).await;
    let _ = send.finish();
    assert!(sent.is_err());
    let receiver = results.recv().await.unwrap().unwrap_err();
    assert!(
        receiver.contains("the other side failed: stat"),
        "{receiver}"
    );
}

#[tokio::test]
async fn a_file_that_would_cross_the_disk_reserve_is_refused_before_it_is_written() {
    let dest_dir = tempfile::tempdir().unwrap();
    let free = Reserve::new(dest_dir.path(), 0).free().unwrap();
    // A reserve that leaves 1 MiB of room: a 4 MiB file does not fit.
    let reserve = Reserve::new(dest_dir.path(), free.saturating_sub(1 << 20));
    let copy = dest_dir.path().join("copy");
    let (pool, addr, expect, mut results) = pair_keeping(copy.clone(), Some(reserve));
    let src = tempfile::tempdir().unwrap();
    write(src.path(), "small", b"fits");
    write(src.path(), "big", &vec![7u8; 4 << 20]);
    let (mut send, mut recv) = pool
        .open_stream(addr, &expect, &false, Duration::from_secs(5))
        .await
        .unwrap();
    // The sender may finish before it hears why: the receiver's error is
    // what counts.
    let _ = tree::send(&mut send, &mut recv, src.path(), false, None).await;
    let _ = send.finish();
    let receiver = results.recv().await.unwrap().unwrap_err();
    assert!(receiver.contains("receiving big needs 4 MiB"), "{receiver}");
    assert!(receiver.contains("--disk-reserve"), "{receiver}");
    assert!(!copy.join("big").exists(), "the file was created");
}
