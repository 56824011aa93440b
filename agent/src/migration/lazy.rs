//! Lazy moves (`--lazy`, CRIU lazy pages): the source's final dump leaves
//! out the memory pages and serves them from its still frozen copy; the
//! target restores without them, runs from `Restored` on, and its
//! lazy-pages daemon fetches every page over a `LazyPages` stream of the
//! move's connection (the pages a task touches first, the rest in the
//! background). The target opens that stream, so the source's CRIU
//! listens on loopback only and takes the one connection this agent makes
//! for the stream. The job is Done only once the daemon has every page;
//! before `Restored` a failure rolls back as ever, after it there is no
//! way back: the target's copy is killed (it ran on memory it lacked) and
//! the job says so.

use std::time::Duration;

use ferry_raft::{CheckResult, InstanceKind, Job, MoveOptions};
use futures::FutureExt;
use tokio::net::TcpStream;

use super::error::MoveError;
use super::source;
use crate::api::names::InstanceName;
use crate::api::transfer::TransferPart;
use crate::node::peers::Channel;
use crate::node::Agent;
use crate::transfer::progress::LazyFetch;
use crate::transfer::relay::{self, Tap};

/// Whether `job` moves `name` lazily: a container's post-copy (a VM's is
/// QEMU's own, `live.rs`).
pub(super) fn moves_lazily(agent: &Agent, job: &Job, name: &InstanceName) -> bool {
    job.options.live.postcopy && job.options.stateful && !agent.driver().moves_itself(name)
}

/// Why `--lazy` cannot be asked of this move, if it cannot.
pub fn refused(kind: Option<InstanceKind>, options: &MoveOptions) -> Option<String> {
    if !options.live.postcopy || kind == Some(InstanceKind::Vm) {
        return None;
    }
    if !options.stateful {
        return Some("--lazy moves the memory: it needs a stateful move".into());
    }
    options.mode.pushes().then(|| {
        "--lazy works in pull and relay mode (the target fetches the pages): leave out --mode push"
            .into()
    })
}

/// The lazy move's row of the compatibility report: on the source, whether
/// it can serve the pages; in a dry run (asked of any member), what the
/// mode gives up.
pub fn check(
    kind: Option<InstanceKind>,
    options: &MoveOptions,
    unavailable: Option<String>,
) -> Option<CheckResult> {
    if !options.live.postcopy || kind == Some(InstanceKind::Vm) {
        return None;
    }
    Some(CheckResult {
        check: "lazy".into(),
        ok: unavailable.is_none(),
        detail: unavailable.unwrap_or_else(|| {
            "the target runs before it has every page: once it runs there is no way back (a failure then loses the memory state)".into()
        }),
    })
}

/// Source, frozen: the lazy dump, its page server kept for the target's
/// stream; the dump ends by itself once the target has every page.
pub(super) async fn dump(agent: &Agent, job: &Job, name: &InstanceName) -> Result<(), MoveError> {
    let dump = agent.driver().dump_lazy(name).await?;
    let ended = agent.transfers().serve_lazy(job.id, dump.server, dump.pid);
    let id = job.id;
    tokio::spawn(async move {
        let result = dump.done.await;
        ended.store(true, std::sync::atomic::Ordering::SeqCst);
        match result {
            Ok(()) => tracing::debug!(job = id, "the lazy dump served every page"),
            Err(e) => tracing::warn!(job = id, "the lazy dump ended: {e}"),
        }
    });
    Ok(())
}

/// Source, rolling back: a lazy dump still waiting for the target ends
/// first; its CRIU holds the tasks (in the frozen cgroup) until then.
pub(super) fn end_dump(agent: &Agent, job: &Job) {
    if let Some(pid) = agent.transfers().take_lazy_dump(job.id) {
        tracing::info!(job = job.id, "ending the lazy dump before the thaw");
        crate::driver::end_process_tree(pid);
    }
}

/// Source: the target's `LazyPages` stream, spliced to the lazy dump's
/// page server (once: the server takes one connection).
pub async fn serve(agent: &Agent, job: &Job, mut channel: Channel) {
    let Some(server) = agent.transfers().take_lazy(job.id) else {
        tracing::warn!(
            job = job.id,
            "refused a lazy page stream: no lazy dump serves here"
        );
        let _ = channel.0.write_all(&[REFUSED]).await;
        let _ = channel.0.finish();
        return;
    };
    let result = async {
        channel
            .0
            .write_all(&[SERVING])
            .await
            .map_err(|e| format!("cannot answer the lazy page stream: {e}"))?;
        let criu = TcpStream::connect(server)
            .await
            .map_err(|e| format!("cannot reach the lazy dump's page server: {e}"))?;
        relay::splice(criu, channel, Tap::default(), Tap::default())
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    match result {
        Ok((_, sent)) => tracing::debug!(job = job.id, bytes = sent.bytes, "lazy pages served"),
        Err(e) => tracing::warn!(job = job.id, "the lazy page stream failed: {e}"),
    }
}

/// Target, Switched: the lazy-pages daemon, fed by a stream from the
/// source, then the held restore whose pages it fetches.
pub(super) async fn restore(
    agent: &Agent,
    job: &Job,
    name: &InstanceName,
    spec: &ferry_raft::InstanceSpec,
) -> Result<(), MoveError> {
    let driver = agent.driver();
    let daemon = driver.lazy_pages_daemon(name).await?;
    let mut channel = source::open(agent, job, job.source, TransferPart::LazyPages).await?;
    served(&mut channel).await?;
    let counter = agent.transfers().stage(job.id, "memory pages (lazy)");
    let fetch = async move {
        let tap = Tap::counted(&counter);
        let spliced = relay::splice(daemon.socket, channel, tap, Tap::default());
        let (spliced, done) = tokio::join!(spliced, daemon.done);
        done.map_err(|e| e.to_string())?;
        let (got, _) = spliced.map_err(|e| format!("the lazy page stream failed: {e}"))?;
        Ok(got.bytes)
    };
    let task = super::pages::AbortOnDrop(tokio::spawn(fetch));
    // Shared, so a retried thaw awaits the same end; dropped with the
    // job's transfer records, it ends the daemon.
    let fetch: LazyFetch = async move {
        let mut task = task;
        (&mut task.0)
            .await
            .unwrap_or_else(|e| Err(format!("the page fetch ended: {e}")))
    }
    .boxed()
    .shared();
    driver.restore_held_lazily(name, spec).await?;
    agent.transfers().fetching_lazily(job.id, fetch);
    Ok(())
}

/// The source's first byte on a `LazyPages` stream: its lazy dump serves
/// (then the pages' protocol follows), or there is none (it restarted).
const SERVING: u8 = 1;
const REFUSED: u8 = 0;

/// How long the source may take to answer a `LazyPages` stream.
const ANSWER: Duration = Duration::from_secs(10);

/// Whether the source's lazy dump serves this stream: a restore that
/// waited on one that does not would hang until its timeout.
async fn served(channel: &mut Channel) -> Result<(), MoveError> {
    let mut answer = [REFUSED];
    let read = tokio::time::timeout(ANSWER, channel.1.read_exact(&mut answer)).await;
    match read {
        Ok(Ok(())) if answer == [SERVING] => Ok(()),
        Ok(Ok(())) => Err(MoveError::Local(
            "the source has no lazy dump serving the pages (its agent restarted?)".into(),
        )),
        Ok(Err(e)) => Err(MoveError::Local(format!(
            "the lazy page stream failed: {e}"
        ))),
        Err(_) => Err(MoveError::Local(format!(
            "the source did not answer the lazy page stream within {ANSWER:?}"
        ))),
    }
}

/// Longest wait, after the thaw, for the last pages.
const FETCH: Duration = Duration::from_secs(600);

/// Target, thawed: the page fetch's end. A fetch this agent no longer
/// knows of (it restarted since the restore) cannot have finished.
pub(super) async fn fetched(agent: &Agent, job: &Job) -> Result<u64, String> {
    let Some(fetch) = agent.transfers().lazy_fetch(job.id) else {
        return Err("this agent lost the page fetch (it restarted since the restore)".into());
    };
    tokio::time::timeout(FETCH, fetch)
        .await
        .unwrap_or_else(|_| Err(format!("the pages did not all come within {FETCH:?}")))
}

/// The job's error when the fetch failed after the target ran.
pub(super) fn failed_after_running(target: &str, why: &str) -> String {
    format!(
        "the lazy move's page fetch failed after the copy on '{target}' began to run ({why}); that copy was killed at once (it ran on memory it lacked) and its rootfs kept, the source's frozen copy is gone: the memory state is lost, and the instance starts afresh from its rootfs there"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_raft::{LiveSettings, TransferMode};

    fn options(stateful: bool, mode: TransferMode) -> MoveOptions {
        MoveOptions {
            stateful,
            mode,
            live: LiveSettings {
                postcopy: true,
                ..LiveSettings::default()
            },
        }
    }

    #[test]
    fn a_lazy_move_is_stateful_and_pulled_or_relayed() {
        let container = Some(InstanceKind::Container);
        assert_eq!(refused(container, &options(true, TransferMode::Pull)), None);
        let relay = TransferMode::Relay { via: 3 };
        assert_eq!(refused(container, &options(true, relay)), None);
        let push = refused(container, &options(true, TransferMode::Push)).unwrap_or_default();
        assert!(push.contains("--mode push"), "{push}");
        let stateless = refused(container, &options(false, TransferMode::Pull)).unwrap_or_default();
        assert!(stateless.contains("stateful"), "{stateless}");
        // A VM's post-copy is QEMU's, in any mode.
        let vm = Some(InstanceKind::Vm);
        assert_eq!(refused(vm, &options(true, TransferMode::Push)), None);
    }
}
