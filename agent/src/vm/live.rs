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
/// the switchover, multifd with its number of channels); `source` adds
/// auto-converge (a guest dirtying memory faster than the link is slowed
/// until the migration converges). QEMU 10 tells a multifd channel from
/// the main one by its first bytes, so the relay may connect them on the
/// target in any order.
async fn capabilities(qmp: &Qmp, settings: &LiveSettings, source: bool) -> Result<(), DriverError> {
    let channels = settings.multifd_channels;
    // Every one is set, on or off: QEMU keeps them from an earlier
    // migration.
    let caps = [
        ("events", true),
        ("pause-before-switchover", true),
        ("multifd", channels > 0),
        ("postcopy-ram", settings.postcopy),
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
    if channels > 0 {
        let params = json!({ "multifd-channels": channels });
        qmp.execute("migrate-set-parameters", Some(params)).await?;
    }
    Ok(())
}

/// Target: serve the disk over NBD (`sockets.0`) and wait for the
/// migration stream (`sockets.1`).
pub async fn prepare_incoming(
    qmp: &Qmp,
    (nbd, incoming): &(PathBuf, PathBuf),
    settings: &LiveSettings,
) -> Result<(), DriverError> {
    capabilities(qmp, settings, false).await?;
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

/// Target: wait for the incoming migration to complete, or in post-copy
/// to hold the device state (the guest stays paused either way), then
/// stop serving the disk.
pub async fn incoming_done(qmp: &Qmp, timeout: Duration) -> Result<(), DriverError> {
    let done = wait_migration(qmp, &["completed", "postcopy-active"], timeout).await?;
    tracing::info!(status = ?done.last["status"], "the incoming migration holds the guest");
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
    capabilities(qmp, settings, true).await?;
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
    if settings.postcopy {
        start_postcopy(qmp, timeout).await?;
    }
    let copying = wait_migration(qmp, &["pre-switchover"], timeout).await?;
    tracing::info!("QEMU paused the guest for the switchover");
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
    // In post-copy the target holds the device state now and fetches
    // the rest once it runs; `sent` waits for that.
    let done = wait_migration(qmp, &["completed", "postcopy-active"], timeout).await?;
    tracing::info!(status = ?done.last["status"], "QEMU switched over");
    Ok(LiveEnd {
        note: Some(figures(
            (disk_bytes, started.elapsed()),
            &done.last,
            copying.dirty_rate,
            settings,
        )),
        paused_ms: done.last["downtime"].as_u64().unwrap_or(0),
    })
}

/// Source, after `send`: wait until QEMU has sent everything (in
/// post-copy, the pages the running target still lacked).
pub async fn sent(qmp: &Qmp, timeout: Duration) -> Result<(), DriverError> {
    wait_migration(qmp, &["completed"], timeout)
        .await
        .map(|_| ())
}

/// Ask QEMU to switch to post-copy once the migration runs: it does at
/// its next iteration, pausing the guest for the switchover as before.
async fn start_postcopy(qmp: &Qmp, timeout: Duration) -> Result<(), DriverError> {
    let status = wait_migration(qmp, &["active", "pre-switchover"], timeout).await?;
    if status.last["status"].as_str() == Some("active") {
        qmp.execute("migrate-start-postcopy", None).await?;
    }
    Ok(())
}

/// "QEMU copied 192 MiB of disk and 180 MiB of memory in 2400 ms (the
/// memory in 1300 ms at 850 Mbit/s over 2 multifd channels; the guest
/// dirtied 12.0 MiB/s), its downtime 80 ms".
fn figures(
    (disk_bytes, took): (u64, Duration),
    info: &Value,
    dirty_rate: Option<u64>,
    settings: &LiveSettings,
) -> String {
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
    let multifd = match settings.multifd_channels {
        0 => String::new(),
        n => format!(" over {n} multifd channels"),
    };
    let postcopy = match (settings.postcopy, info["status"].as_str()) {
        (true, Some("postcopy-active")) => {
            "; post-copy from the switchover: the target runs and fetches the rest, no way back once it runs"
        }
        (true, _) => "; post-copy was asked for, but the memory was all copied before it began",
        _ => "",
    };
    format!(
        "QEMU copied {} MiB of disk and {ram} MiB of memory in {} ms (the memory in {total} ms at {mbps:.0} Mbit/s{multifd}{dirtied}), its downtime {downtime} ms{postcopy}",
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
        // Post-copy paused: the link to the target broke.
        if matches!(
            status,
            "failed" | "cancelled" | "cancelling" | "postcopy-paused"
        ) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn note(status: &str, settings: LiveSettings) -> String {
        let info = json!({
            "status": status, "total-time": 900, "downtime": 40,
            "ram": { "transferred": 300u64 << 20, "mbps": 850.0 },
        });
        let copy = (64u64 << 20, Duration::from_millis(1200));
        figures(copy, &info, Some(3 << 20), &settings)
    }

    #[test]
    fn the_note_says_no_way_back_only_when_post_copy_began() {
        let postcopy = LiveSettings {
            postcopy: true,
            ..LiveSettings::default()
        };
        let began = note("postcopy-active", postcopy);
        assert!(began.contains("no way back"), "{began}");
        let converged = note("completed", postcopy);
        assert!(!converged.contains("no way back"), "{converged}");
        assert!(converged.contains("before it began"), "{converged}");
        let plain = note("completed", LiveSettings::default());
        assert!(!plain.contains("post-copy"), "{plain}");
    }

    #[test]
    fn the_note_has_qemus_figures_and_the_multifd_channels() {
        let multifd = LiveSettings {
            multifd_channels: 4,
            ..LiveSettings::default()
        };
        let text = note("completed", multifd);
        assert!(
            text.starts_with("QEMU copied 64 MiB of disk and 300 MiB of memory in 1200 ms"),
            "{text}"
        );
        assert!(text.contains("over 4 multifd channels"), "{text}");
        assert!(text.contains("dirtied 3.0 MiB/s"), "{text}");
        assert!(text.ends_with("its downtime 40 ms"), "{text}");
    }
}
