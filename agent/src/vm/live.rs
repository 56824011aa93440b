//! A VM's live move as QMP sequences (docs/vm-migration-recipe.md): the
//! target's QEMU waits `-incoming defer` and serves its empty disk over
//! NBD; the source mirrors its disk into it until the mirror is ready,
//! then migrates memory with `pause-before-switchover`; at pre-switchover
//! (the guest paused) the mirror is cancelled (after READY that leaves a
//! complete copy) and the migration continued to completion. The source
//! reaches the target only through the sockets the engine relays.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::machine::runtime;
use super::qemu::DISK_NODE;
use super::qmp::Qmp;
use crate::driver::{DriverError, LiveEnd};
use ferry_raft::LiveSettings;

const POLL: Duration = Duration::from_millis(20);
const MIRROR_JOB: &str = "mirror0";
const MIRROR_NODE: &str = "mirror-dst";
const EXPORT: &str = "exp0";
/// QEMU's default migration cap is 128 MiB/s; a move takes what the link
/// gives.
const MAX_BANDWIDTH: u64 = 10 << 30;
/// The longest pause QEMU aims for at the switchover, in ms.
const DOWNTIME_LIMIT_MS: u64 = 300;

/// The capabilities both sides must agree on (events, the pause before
/// the switchover); `source` adds auto-converge (a guest dirtying memory
/// faster than the link is slowed until the migration converges). Not
/// multifd: over the relay one of three tries left a channel unread and
/// hung (docs/vm-migration-recipe.md).
async fn capabilities(qmp: &Qmp, source: bool) -> Result<(), DriverError> {
    // Every one is set, on or off: QEMU keeps them from an earlier
    // migration.
    let caps = [
        ("events", true),
        ("pause-before-switchover", true),
        ("multifd", false),
        ("auto-converge", source),
    ];
    let caps: Vec<Value> = caps
        .into_iter()
        .map(|(c, on)| json!({ "capability": c, "state": on }))
        .collect();
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": caps })),
    )
    .await?;
    Ok(())
}

/// Target: serve the disk over NBD (`sockets.0`) and wait for the
/// migration stream (`sockets.1`).
pub async fn prepare_incoming(
    qmp: &Qmp,
    (nbd, incoming): &(PathBuf, PathBuf),
) -> Result<(), DriverError> {
    capabilities(qmp, false).await?;
    let addr = json!({ "type": "unix", "data": { "path": nbd } });
    qmp.execute("nbd-server-start", Some(json!({ "addr": addr })))
        .await?;
    let export = json!({
        "type": "nbd", "id": EXPORT, "node-name": DISK_NODE,
        "name": DISK_NODE, "writable": true,
    });
    qmp.execute("block-export-add", Some(export)).await?;
    let uri = format!("unix:{}", incoming.display());
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await?;
    Ok(())
}

/// Target: wait for the incoming migration to complete (the guest stays
/// paused), then stop serving the disk.
pub async fn incoming_done(qmp: &Qmp, timeout: Duration) -> Result<(), DriverError> {
    wait_migration(qmp, &["completed"], timeout).await?;
    let _ = qmp
        .execute("block-export-del", Some(json!({ "id": EXPORT })))
        .await;
    let _ = qmp.execute("nbd-server-stop", None).await;
    Ok(())
}

/// Source: mirror the disk, migrate the memory, and at the switchover
/// (guest paused) finish both, if `go_on` still says so. Returns a note
/// with QEMU's figures. On failure the mirror and migration are cancelled
/// (the guest runs on unless it was paused for the switchover).
pub async fn send(
    qmp: &Qmp,
    (relay, hooks): (&Path, &Path),
    settings: &LiveSettings,
    go_on: &(dyn Fn() -> bool + Send + Sync),
    timeout: Duration,
) -> Result<LiveEnd, DriverError> {
    let result = mirror_and_migrate(qmp, (relay, hooks), settings, go_on, timeout).await;
    if result.is_err() {
        let _ = qmp.execute("migrate_cancel", None).await;
        let cancel = json!({ "device": MIRROR_JOB, "force": true });
        let _ = qmp.execute("block-job-cancel", Some(cancel)).await;
        let _ = wait_job_gone(qmp, Duration::from_secs(10)).await;
        let _ = qmp
            .execute("blockdev-del", Some(json!({ "node-name": MIRROR_NODE })))
            .await;
    }
    result
}

/// `hooks`: the data dir, for the test build's holds.
async fn mirror_and_migrate(
    qmp: &Qmp,
    (relay, hooks): (&Path, &Path),
    settings: &LiveSettings,
    go_on: &(dyn Fn() -> bool + Send + Sync),
    timeout: Duration,
) -> Result<LiveEnd, DriverError> {
    let started = std::time::Instant::now();
    let nbd = relay.join("disk.sock");
    let target = json!({
        "driver": "nbd", "node-name": MIRROR_NODE,
        "server": { "type": "unix", "path": nbd }, "export": DISK_NODE,
    });
    qmp.execute("blockdev-add", Some(target)).await?;
    let mirror = json!({
        "job-id": MIRROR_JOB, "device": DISK_NODE, "target": MIRROR_NODE, "sync": "full",
    });
    qmp.execute("blockdev-mirror", Some(mirror)).await?;
    let disk_bytes = wait_mirror_ready(qmp, timeout).await?;
    crate::hooks::hold_at(hooks, "live-mirror").await;
    capabilities(qmp, true).await?;
    let bandwidth = match settings.bandwidth {
        0 => MAX_BANDWIDTH,
        n => n,
    };
    let downtime = match settings.downtime_limit_ms {
        0 => DOWNTIME_LIMIT_MS,
        n => n,
    };
    let params = json!({ "max-bandwidth": bandwidth, "downtime-limit": downtime });
    qmp.execute("migrate-set-parameters", Some(params)).await?;
    let uri = format!("unix:{}", relay.join("memory.sock").display());
    qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
    crate::hooks::hold_at(hooks, "live-memory").await;
    let copying = wait_migration(qmp, &["pre-switchover"], timeout).await?;
    // The guest is paused here: the last moment the move may still stop.
    if !go_on() {
        return Err(runtime(
            "the move may no longer go on (aborted, or the job moved on); the VM runs on",
        ));
    }
    let cancel = json!({ "device": MIRROR_JOB });
    qmp.execute("block-job-cancel", Some(cancel)).await?;
    wait_job_gone(qmp, timeout).await?;
    qmp.execute("blockdev-del", Some(json!({ "node-name": MIRROR_NODE })))
        .await?;
    qmp.execute(
        "migrate-continue",
        Some(json!({ "state": "pre-switchover" })),
    )
    .await?;
    let done = wait_migration(qmp, &["completed"], timeout).await?;
    Ok(LiveEnd {
        note: Some(figures(
            (disk_bytes, started.elapsed()),
            &done.last,
            copying.dirty_rate,
        )),
        paused_ms: done.last["downtime"].as_u64().unwrap_or(0),
    })
}

/// "QEMU copied 192 MiB of disk and 180 MiB of memory in 2400 ms (the
/// memory in 1300 ms at 850 Mbit/s; the guest dirtied 12.0 MiB/s), its
/// downtime 80 ms".
fn figures((disk_bytes, took): (u64, Duration), info: &Value, dirty_rate: Option<u64>) -> String {
    let ram = info["ram"]["transferred"].as_u64().unwrap_or(0) >> 20;
    let total = info["total-time"].as_u64().unwrap_or(0);
    let mbps = info["ram"]["mbps"].as_f64().unwrap_or(0.0);
    let downtime = info["downtime"].as_u64().unwrap_or(0);
    let dirtied = dirty_rate.map_or(String::new(), |rate| {
        format!(
            "; the guest dirtied {:.1} MiB/s",
            rate as f64 / f64::from(1 << 20)
        )
    });
    format!(
        "QEMU copied {} MiB of disk and {ram} MiB of memory in {} ms (the memory in {total} ms at {mbps:.0} Mbit/s{dirtied}), its downtime {downtime} ms",
        disk_bytes >> 20,
        took.as_millis()
    )
}

/// What `query-migrate` said when it reached the state waited for, and
/// the guest's dirty rate as QEMU last measured it (bytes per second).
struct Migration {
    last: Value,
    dirty_rate: Option<u64>,
}

/// Poll `query-migrate` until its status is one of `want`; a failed or
/// cancelled migration is an error with QEMU's reason.
async fn wait_migration(
    qmp: &Qmp,
    want: &[&str],
    timeout: Duration,
) -> Result<Migration, DriverError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut dirty_rate = None;
    loop {
        let info = qmp.execute("query-migrate", None).await?;
        let ram = &info["ram"];
        if let (Some(pages), Some(size)) = (
            ram["dirty-pages-rate"].as_u64().filter(|n| *n > 0),
            ram["page-size"].as_u64(),
        ) {
            dirty_rate = Some(pages.saturating_mul(size));
        }
        let status = info["status"].as_str().unwrap_or("");
        if want.contains(&status) {
            return Ok(Migration {
                last: info,
                dirty_rate,
            });
        }
        if matches!(status, "failed" | "cancelled" | "cancelling") {
            let why = info["error-desc"].as_str().unwrap_or(status);
            return Err(runtime(format!("QEMU's migration failed: {why}")));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(runtime(format!(
                "QEMU's migration did not reach {want:?} within {timeout:?} (it is {status})"
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn mirror_job(jobs: &Value) -> Option<&Value> {
    jobs.as_array()?
        .iter()
        .find(|j| j["device"].as_str() == Some(MIRROR_JOB))
}

/// Wait for the mirror to be ready; returns the disk bytes it copied.
async fn wait_mirror_ready(qmp: &Qmp, timeout: Duration) -> Result<u64, DriverError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let jobs = qmp.execute("query-block-jobs", None).await?;
        match mirror_job(&jobs) {
            None => {
                return Err(runtime(
                    "the disk mirror ended before it was ready (the target's disk went away?)",
                ))
            }
            Some(job) if job["ready"].as_bool() == Some(true) => {
                return Ok(job["offset"].as_u64().unwrap_or(0))
            }
            Some(job) if tokio::time::Instant::now() >= deadline => {
                let (done, len) = (job["offset"].as_u64(), job["len"].as_u64());
                return Err(runtime(format!(
                    "the disk mirror was not ready within {timeout:?} ({done:?} of {len:?} bytes)"
                )));
            }
            Some(_) => tokio::time::sleep(POLL).await,
        }
    }
}

async fn wait_job_gone(qmp: &Qmp, timeout: Duration) -> Result<(), DriverError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let jobs = qmp.execute("query-block-jobs", None).await?;
        if mirror_job(&jobs).is_none() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(runtime("the disk mirror did not end"));
        }
        tokio::time::sleep(POLL).await;
    }
}
