//! ferry's QEMU command line and QMP client against a real QEMU running
//! the test guest (scripts/make-test-guest.sh): it boots, counts on its
//! serial console, stops and goes on over QMP, and quits. TCG: this
//! machine kind's KVM runs only PVM guests (docs/vm-migration-recipe.md).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_agent::vm::qemu::{Accel, QemuConfig};
use ferry_agent::vm::qmp::Qmp;

/// Whether QEMU and the guest kernel are here; under CI their absence
/// fails the test, elsewhere it is skipped saying why.
fn prerequisites() -> bool {
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let guest = std::fs::read_dir("/var/cache/ferry-build/guest").is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".deb")))
    });
    if qemu && guest {
        return true;
    }
    let why = "QEMU and the guest kernel (run scripts/install-deps.sh as root)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("the QEMU test needs {why}");
    }
    eprintln!("SKIPPED: the QEMU test needs {why}");
    false
}

fn make_guest(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-test-guest.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(dir.join("disk.qcow2"))
        .arg("32M")
        .status()
        .unwrap();
    assert!(img.success());
}

fn ticks(log: &Path) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().filter(|l| l.starts_with("tick ")).count()
}

fn wait_ticks(log: &Path, more_than: usize, within: Duration) -> usize {
    let end = Instant::now() + within;
    loop {
        let n = ticks(log);
        if n > more_than {
            return n;
        }
        assert!(Instant::now() < end, "the guest's counter stayed at {n}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn a_guest_boots_counts_pauses_and_quits_over_qmp() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_guest(d);
    let path = |f: &str| -> PathBuf { d.join(f) };
    let config = QemuConfig {
        accel: Accel::Tcg,
        cpu_model: "qemu64".into(),
        cpus: 1,
        memory_mib: 256,
        kernel: Some(path("vmlinuz")),
        initrd: Some(path("initrd.gz")),
        append: Some("console=ttyS0 quiet panic=-1".into()),
        disk: Some(path("disk.qcow2")),
        serial_log: path("console.log"),
        qmp_socket: path("qmp.sock"),
        status_socket: None,
        guest_agent_socket: path("qga.sock"),
        pid_file: path("qemu.pid"),
        incoming: false,
        daemonize: false,
        nic: None,
    };
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
        .args(config.argv().unwrap())
        .stderr(std::fs::File::create(path("qemu.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let qmp = Qmp::connect(&config.qmp_socket, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(qmp.status().await.unwrap(), "running");
    let log = config.serial_log.clone();
    let counted = tokio::task::spawn_blocking(move || wait_ticks(&log, 5, Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(counted > 5);
    let mut events = qmp.events();
    qmp.execute("stop", None).await.unwrap();
    assert_eq!(qmp.status().await.unwrap(), "paused");
    let (name, _) = events.next(Duration::from_secs(5)).await.expect("an event");
    assert_eq!(name, "STOP");
    // Stopped, the guest's counter stands still; going on, it counts on.
    let stopped_at = ticks(&config.serial_log);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        ticks(&config.serial_log),
        stopped_at,
        "the guest ran while stopped"
    );
    qmp.execute("cont", None).await.unwrap();
    let log = config.serial_log.clone();
    tokio::task::spawn_blocking(move || wait_ticks(&log, stopped_at, Duration::from_secs(10)))
        .await
        .unwrap();
    let err = qmp.execute("no-such-command", None).await.unwrap_err();
    assert!(err.to_string().contains("no-such-command"), "{err}");
    let pid_file = std::fs::read_to_string(path("qemu.pid")).unwrap_or_default();
    assert_eq!(
        pid_file.trim().parse::<u32>().ok(),
        qemu.id(),
        "pid file: {pid_file:?}"
    );
    let _ = qmp.execute("quit", None).await;
    let status = tokio::time::timeout(Duration::from_secs(10), qemu.wait()).await;
    assert!(status.is_ok_and(|s| s.is_ok()), "QEMU did not quit");
}
