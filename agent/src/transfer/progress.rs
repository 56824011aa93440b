//! Live figures of the transfers an agent receives, for `job show`, and
//! the totals the target reports when a move is done.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_raft::JobId;

use crate::api::jobs::TransferProgress;
use crate::clock::now_ms;
use crate::transfer::relay::Passed;
use crate::transfer::tree::Stamps;

/// Live figures of the transfers this agent receives, for `job show`, and
/// the ones the target reports when the job is done.
#[derive(Default)]
pub struct Transfers {
    jobs: Mutex<HashMap<JobId, Stages>>,
    /// When the source froze (wall clock ms, as the target saw it), for the
    /// downtime figure.
    froze_at: Mutex<HashMap<JobId, u64>>,
    /// When the target's copy first ran (the end of the downtime).
    thawed_at: Mutex<HashMap<JobId, u64>>,
    /// Bytes received in all.
    bytes: Mutex<HashMap<JobId, u64>>,
    /// On the source: what the first pass of each job's rootfs saw, for
    /// its final pass.
    stamps: Mutex<HashMap<JobId, Stamps>>,
    /// On the target: the id of the first pass each job's staged rootfs
    /// holds, untouched since (a final pass takes it).
    rootfs_passes: Mutex<HashMap<JobId, u128>>,
    /// Either side: the jobs whose first rootfs pass went by btrfs send,
    /// its snapshot (source) or received subvolume (target) kept for an
    /// incremental final pass.
    btrfs_passes: Mutex<std::collections::HashSet<JobId>>,
    /// On the target: how each job's last page stream ended (its stream
    /// id, what passed to the page server or why it failed), for the
    /// final pass to wait on.
    pages: Mutex<HashMap<(JobId, u64), PagesOutcome>>,
    pages_ended: tokio::sync::Notify,
    /// On the target: the jobs whose final pass runs (it waits for their
    /// page streams; a page stream of any other job is refused).
    final_passes: Mutex<HashMap<JobId, usize>>,
    /// On the source of a lazy move: where its lazy dump serves the
    /// pages, until the target's stream takes it.
    lazy_servers: Mutex<HashMap<JobId, std::net::SocketAddr>>,
    /// On the source of a lazy move: the dump's process, until it ends.
    lazy_dumps: Mutex<HashMap<JobId, (u32, Arc<std::sync::atomic::AtomicBool>)>>,
    /// On the target of a lazy move: the page fetch, until it ends.
    lazy_fetches: Mutex<HashMap<JobId, LazyFetch>>,
    /// The lazy moves whose fetched pages count in their bytes already.
    lazy_counted: Mutex<std::collections::HashSet<JobId>>,
}

/// A lazy move's page fetch on the target (the bytes it got), awaited by
/// every thaw attempt.
pub type LazyFetch =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<u64, String>>>;

/// What a page stream passed to the target's page server, or why not.
pub type PagesOutcome = Result<Passed, String>;

impl Transfers {
    /// Count bytes for `job` under `stage` (from now the current one).
    pub fn stage(&self, job: JobId, stage: &'static str) -> Arc<AtomicU64> {
        let mut jobs = lock(&self.jobs);
        let stages = jobs.entry(job).or_default();
        stages.current = stage;
        stages
            .counters
            .entry(stage)
            .or_insert_with(|| Arc::new(AtomicU64::new(0)))
            .clone()
    }

    pub fn end(&self, job: JobId) {
        lock(&self.jobs).remove(&job);
    }

    pub fn froze(&self, job: JobId) {
        self.froze_for(job, 0);
    }

    /// The source froze `ago_ms` before now.
    pub fn froze_for(&self, job: JobId, ago_ms: u64) {
        lock(&self.froze_at).insert(job, now_ms().saturating_sub(ago_ms));
    }

    pub fn received(&self, job: JobId, bytes: u64) {
        lock(&self.bytes).insert(job, bytes);
    }

    pub fn received_so_far(&self, job: JobId) -> u64 {
        lock(&self.bytes).get(&job).copied().unwrap_or(0)
    }

    /// The copy of `job` runs from now (the first call counts).
    pub fn thawed(&self, job: JobId) {
        lock(&self.thawed_at).entry(job).or_insert_with(now_ms);
    }

    /// (downtime ms, bytes) for `job`, the downtime ending at the first
    /// [`Transfers::thawed`] or, without one, the first call (`now`, when
    /// the copy runs): a `Done` proposed again after a lost one reports
    /// the same figures.
    pub fn figures(&self, job: JobId, now: u64) -> (u64, u64) {
        let thawed = *lock(&self.thawed_at).entry(job).or_insert(now);
        let froze = lock(&self.froze_at).get(&job).copied();
        let bytes = lock(&self.bytes).get(&job).copied().unwrap_or(0);
        (froze.map_or(0, |t| thawed.saturating_sub(t)), bytes)
    }

    /// Drop every figure of `job` (it ended).
    pub fn forget(&self, job: JobId) {
        lock(&self.jobs).remove(&job);
        lock(&self.froze_at).remove(&job);
        lock(&self.thawed_at).remove(&job);
        lock(&self.bytes).remove(&job);
        lock(&self.stamps).remove(&job);
        lock(&self.rootfs_passes).remove(&job);
        lock(&self.btrfs_passes).remove(&job);
        lock(&self.pages).retain(|(j, _), _| *j != job);
        lock(&self.lazy_servers).remove(&job);
        lock(&self.lazy_dumps).remove(&job);
        lock(&self.lazy_fetches).remove(&job);
        lock(&self.lazy_counted).remove(&job);
    }

    /// A lazy move's fetched pages, counted in its bytes once.
    pub fn count_lazy_pages(&self, job: JobId, bytes: u64) {
        if lock(&self.lazy_counted).insert(job) {
            let mut all = lock(&self.bytes);
            let total = all.entry(job).or_default();
            *total = total.saturating_add(bytes);
        }
    }

    /// `job`'s lazy dump serves on `server`, its process `pid` runs until
    /// the flag returned is set.
    pub fn serve_lazy(
        &self,
        job: JobId,
        server: std::net::SocketAddr,
        pid: Option<u32>,
    ) -> Arc<std::sync::atomic::AtomicBool> {
        lock(&self.lazy_servers).insert(job, server);
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(pid) = pid {
            lock(&self.lazy_dumps).insert(job, (pid, ended.clone()));
        }
        ended
    }

    /// The process of `job`'s lazy dump while it runs (once ended, its
    /// pid may be another process's).
    pub fn take_lazy_dump(&self, job: JobId) -> Option<u32> {
        let (pid, ended) = lock(&self.lazy_dumps).remove(&job)?;
        (!ended.load(Ordering::SeqCst)).then_some(pid)
    }

    /// Where `job`'s lazy dump serves, once: it takes one connection.
    pub fn take_lazy(&self, job: JobId) -> Option<std::net::SocketAddr> {
        lock(&self.lazy_servers).remove(&job)
    }

    pub fn fetching_lazily(&self, job: JobId, fetch: LazyFetch) {
        lock(&self.lazy_fetches).insert(job, fetch);
    }

    pub fn lazy_fetch(&self, job: JobId) -> Option<LazyFetch> {
        lock(&self.lazy_fetches).get(&job).cloned()
    }

    /// The source sent `job`'s rootfs once; its final pass compares with
    /// these.
    pub fn remember_stamps(&self, job: JobId, stamps: Stamps) {
        lock(&self.stamps).insert(job, stamps);
    }

    /// The first pass's stamps of `job`, taken out (none after a restart of
    /// the source: then every file counts as changed).
    pub fn take_stamps(&self, job: JobId) -> Option<Stamps> {
        lock(&self.stamps).remove(&job)
    }

    /// The target holds `job`'s rootfs as first pass `pass` wrote it.
    pub fn remember_rootfs_pass(&self, job: JobId, pass: u128) {
        lock(&self.rootfs_passes).insert(job, pass);
    }

    /// The first pass `job`'s staged rootfs holds, taken out: whatever
    /// writes to that rootfs next may change it.
    pub fn take_rootfs_pass(&self, job: JobId) -> Option<u128> {
        lock(&self.rootfs_passes).remove(&job)
    }

    /// `job`'s first rootfs pass went by btrfs send (see `btrfs_passes`).
    pub fn remember_btrfs_pass(&self, job: JobId) {
        lock(&self.btrfs_passes).insert(job);
    }

    /// Whether `job`'s first rootfs pass went by btrfs send, taken out.
    pub fn take_btrfs_pass(&self, job: JobId) -> bool {
        lock(&self.btrfs_passes).remove(&job)
    }

    /// A final pass of `job` runs here until the guard goes.
    pub fn final_pass(&self, job: JobId) -> FinalPass<'_> {
        *lock(&self.final_passes).entry(job).or_default() += 1;
        FinalPass {
            transfers: self,
            job,
        }
    }

    /// Whether a final pass of `job` runs here (and takes page streams).
    pub fn expects_pages(&self, job: JobId) -> bool {
        lock(&self.final_passes).contains_key(&job)
    }

    /// Page stream `stream` of `job` ended so.
    pub fn pages_ended(&self, job: JobId, stream: u64, outcome: PagesOutcome) {
        lock(&self.pages).insert((job, stream), outcome);
        self.pages_ended.notify_waiters();
    }

    /// How page stream `stream` of `job` ended, waiting for it at most
    /// `within`; `None` if it did not end by then.
    pub async fn pages_of(
        &self,
        job: JobId,
        stream: u64,
        within: Duration,
    ) -> Option<PagesOutcome> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let ended = self.pages_ended.notified();
            tokio::pin!(ended);
            // Registered before the look, so an end in between wakes it.
            ended.as_mut().enable();
            if let Some(outcome) = self.take_pages(job, stream) {
                return Some(outcome);
            }
            tokio::time::timeout_at(deadline, ended).await.ok()?;
        }
    }

    fn take_pages(&self, job: JobId, stream: u64) -> Option<PagesOutcome> {
        lock(&self.pages).remove(&(job, stream))
    }

    pub fn get(&self, job: JobId) -> Option<TransferProgress> {
        let jobs = lock(&self.jobs);
        let stages = jobs.get(&job)?;
        let parts: Vec<(String, u64)> = stages
            .counters
            .iter()
            .map(|(stage, bytes)| (stage.to_string(), bytes.load(Ordering::Relaxed)))
            .collect();
        Some(TransferProgress {
            stage: stages.current.to_string(),
            bytes: parts.iter().map(|(_, n)| n).sum(),
            parts,
        })
    }
}

/// A final pass running (see [`Transfers::final_pass`]).
pub struct FinalPass<'a> {
    transfers: &'a Transfers,
    job: JobId,
}

impl Drop for FinalPass<'_> {
    fn drop(&mut self) {
        let mut passes = lock(&self.transfers.final_passes);
        let Some(n) = passes.get_mut(&self.job) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            passes.remove(&self.job);
            drop(passes);
            // Its page streams' outcomes go with the last pass.
            lock(&self.transfers.pages).retain(|(j, _), _| *j != self.job);
        }
    }
}

/// One job's byte counters, one per stage (a VM's disk and memory streams
/// run at once).
#[derive(Default)]
struct Stages {
    current: &'static str,
    counters: BTreeMap<&'static str, Arc<AtomicU64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_downtime_ends_when_the_copy_runs_not_when_done_is_proposed() {
        let transfers = Transfers::default();
        transfers.froze_for(3, 1_000);
        transfers.thawed(3);
        // Done proposed an hour later (after the rootfs sync, say).
        let later = now_ms() + 3_600_000;
        let (downtime, _) = transfers.figures(3, later);
        assert!((1_000..1_500).contains(&downtime), "{downtime}");
        assert_eq!(transfers.figures(3, later + 5).0, downtime);
    }

    #[tokio::test]
    async fn the_final_pass_waits_for_its_own_page_stream_only() {
        let transfers = Arc::new(Transfers::default());
        let passed = Passed {
            bytes: 9,
            checksum: Some(0xab),
        };
        // An earlier attempt's stream does not answer for this one.
        transfers.pages_ended(4, 1, Err("cut".into()));
        let short = Duration::from_millis(20);
        assert_eq!(transfers.pages_of(4, 2, short).await, None);
        let waiter = transfers.clone();
        let wait =
            tokio::spawn(async move { waiter.pages_of(4, 2, Duration::from_secs(10)).await });
        transfers.pages_ended(4, 2, Ok(passed.clone()));
        assert_eq!(wait.await.unwrap(), Some(Ok(passed)));
    }

    #[test]
    fn page_streams_are_taken_only_while_a_final_pass_runs() {
        let transfers = Transfers::default();
        assert!(!transfers.expects_pages(5));
        let pass = transfers.final_pass(5);
        let retry = transfers.final_pass(5);
        assert!(transfers.expects_pages(5));
        drop(retry);
        assert!(transfers.expects_pages(5), "one pass still runs");
        transfers.pages_ended(5, 1, Err("late".into()));
        drop(pass);
        assert!(!transfers.expects_pages(5));
        assert!(
            transfers.take_pages(5, 1).is_none(),
            "an outcome outlived its pass"
        );
    }

    #[test]
    fn each_stage_counts_apart_and_the_bytes_add_up() {
        let transfers = Transfers::default();
        let disk = transfers.stage(7, "disk");
        disk.fetch_add(300, Ordering::Relaxed);
        let memory = transfers.stage(7, "memory");
        memory.fetch_add(20, Ordering::Relaxed);
        // The disk stream goes on while the memory one runs.
        disk.fetch_add(5, Ordering::Relaxed);
        let progress = transfers.get(7).expect("progress");
        assert_eq!(progress.stage, "memory");
        assert_eq!(progress.bytes, 325);
        assert_eq!(
            progress.parts,
            vec![("disk".to_string(), 305), ("memory".to_string(), 20)]
        );
        assert!(transfers.get(8).is_none());
    }
}
