//! Raft benchmark (not a test): commit latency and throughput of a small
//! command through the API on 3 voters over loopback with fsync on, the
//! time from a leader's kill -9 to the next committed write, and whether
//! a voter whose CPU is saturated (a follower, then the leader, each for
//! SATURATE_SECS) causes elections.
//!
//! With FILL_INSTANCES and FILL_JOBS (a test build of ferry, FERRY_BIN:
//! `cargo build --release --bin ferry --features ferry-cli/test-hooks`),
//! the commits are measured again once the state holds that many
//! instances and finished moves.
//!
//! cargo build --release --bin ferry && cargo run --release -p cluster-tests --bin bench-raft [-- COMMITS TRIALS SATURATE_SECS [FILL_INSTANCES FILL_JOBS]]

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cluster_tests::saturate::saturate;
use cluster_tests::{figures, Cluster};
use ferry_agent::api::{ApiReply, ApiRequest};
use ferry_agent::client::Client;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut number =
        || -> Result<Option<usize>> { Ok(args.next().map(|a| a.parse()).transpose()?) };
    let commits = number()?.unwrap_or(1000);
    let trials = number()?.unwrap_or(10);
    let saturate_secs = number()?.unwrap_or(60) as u64;
    let fill = number()?.zip(number()?);
    let _ = rustls::crypto::ring::default_provider().install_default();

    let mut cluster = Cluster::new();
    cluster.bootstrap("n1", 3)?;
    cluster.join("n2", 0)?;
    cluster.join("n3", 0)?;
    cluster.wait_converged(&["n1", "n2", "n3"], Duration::from_secs(60))?;
    cluster.wait_voters(0, 3, Duration::from_secs(60))?;

    let runtime = tokio::runtime::Runtime::new()?;
    // QUIC endpoints bind inside a runtime.
    let _entered = runtime.enter();
    // Through one agent's API (the bootstrap member, most likely leading).
    let client = std::sync::Arc::new(Client::connect(&cluster.agents[0].data_dir, None)?);
    let floor = runtime.block_on(read_floor(&client, commits))?;
    let floor = format!("API read p50 {floor:.2} ms");
    let empty = runtime.block_on(commit_figures(&client, commits, "empty", &floor))?;
    if let Some((instances, jobs)) = fill {
        fill_state(&cluster, instances, jobs)?;
        let label = format!("{instances} instances, {jobs} finished moves");
        let full = runtime.block_on(commit_figures(&client, commits, &label, &floor))?;
        figures::report(
            &format!("commit p50, {label}"),
            &format!("{full:.2} ms = {:.2}x", full / empty),
            &format!("empty state {empty:.2} ms"),
            "<= 1.2x",
        );
    }
    failover(&mut cluster, &runtime, trials)?;
    if saturate_secs > 0 {
        for role in [Role::Follower, Role::Leader] {
            flapping(&cluster, &runtime, role, saturate_secs)?;
        }
    }
    Ok(())
}

/// The API's own round trip (a read that commits nothing): the floor
/// under every commit latency below.
async fn read_floor(client: &Client, reads: usize) -> Result<f64> {
    let mut latencies = Vec::with_capacity(reads);
    for _ in 0..reads {
        let t = Instant::now();
        client.call(ApiRequest::ClusterList).await?;
        latencies.push(t.elapsed());
    }
    latencies.sort();
    println!(
        "API round trip (a read) over {reads} calls: p50 {:.2} ms, p99 {:.2} ms",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
    );
    Ok(ms(percentile(&latencies, 0.5)))
}

/// Sequential commit latency, then throughput with 16 clients; the p50.
async fn commit_figures(
    client: &std::sync::Arc<Client>,
    commits: usize,
    label: &str,
    floor: &str,
) -> Result<f64> {
    let mut latencies = Vec::with_capacity(commits);
    let started = Instant::now();
    for i in 0..commits {
        let t = Instant::now();
        client.call(token(&format!("seq-{label}-{i}"))).await?;
        latencies.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    println!(
        "[{label}] commit latency over {commits} sequential commits: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.0} commits/s",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap_or(&Duration::ZERO)),
        commits as f64 / elapsed.as_secs_f64()
    );
    let (p50, p99) = (
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
    );
    if label == "empty" {
        figures::report(
            "commit p50, 3 voters, fsync",
            &format!("{p50:.2} ms"),
            floor,
            "<= 1.5 ms",
        );
        figures::report("commit p99", &format!("{p99:.2} ms"), floor, "<= 5 ms");
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let client = client.clone();
        let label = label.to_string();
        tasks.spawn(async move {
            for i in (worker..commits).step_by(16) {
                client.call(token(&format!("par-{label}-{i}"))).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let rate = commits as f64 / started.elapsed().as_secs_f64();
    println!("[{label}] throughput with 16 concurrent clients: {rate:.0} commits/s");
    if label == "empty" {
        let sequential = format!("sequential {:.0}/s", commits as f64 / elapsed.as_secs_f64());
        figures::report(
            "commits/s, 16 clients",
            &format!("{rate:.0}"),
            &sequential,
            ">= 2000",
        );
    }
    Ok(p50)
}

fn token(name: &str) -> ApiRequest {
    ApiRequest::TokenCreate {
        name: name.replace([' ', ','], "-"),
        ttl_secs: 60,
    }
}

/// Ask the test build's fill hook (`ferry_agent::run`) and wait for it.
fn fill_state(cluster: &Cluster, instances: usize, jobs: usize) -> Result<()> {
    let dir = &cluster.agents[0].data_dir;
    let _ = std::fs::remove_file(dir.join("filled"));
    std::fs::write(dir.join("fill"), format!("{instances} {jobs}"))?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !dir.join("filled").exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the state was not filled in 5 minutes: FERRY_BIN must be a test build \
             (cargo build --release --bin ferry --features ferry-cli/test-hooks)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "state filled: {}",
        std::fs::read_to_string(dir.join("filled"))?
    );
    Ok(())
}

/// Leader kill -9 to the next committed write, `trials` times.
fn failover(cluster: &mut Cluster, runtime: &tokio::runtime::Runtime, trials: usize) -> Result<()> {
    let mut failovers = Vec::new();
    for trial in 0..trials {
        let leader = cluster.wait_converged(&["n1", "n2", "n3"], Duration::from_secs(60))?;
        let dead = cluster.index_of(&leader).unwrap_or(0);
        let survivor = (dead + 1) % 3;
        let client = Client::connect(&cluster.agents[survivor].data_dir, None)?;
        cluster.kill(dead);
        let t = Instant::now();
        runtime.block_on(async {
            while client
                .call(token(&format!("failover-{trial}")))
                .await
                .is_err()
            {}
        });
        let took = t.elapsed();
        println!(
            "trial {trial}: leader {leader} killed, next commit after {:.0} ms",
            ms(took)
        );
        failovers.push(took);
        cluster.restart(dead)?;
    }
    failovers.sort();
    if !failovers.is_empty() {
        let (median, min, max) = (
            ms(percentile(&failovers, 0.5)),
            ms(failovers[0]),
            ms(*failovers.last().unwrap_or(&Duration::ZERO)),
        );
        println!(
            "leader kill -9 to next commit over {trials} trials: median {median:.0} ms, min {min:.0} ms, max {max:.0} ms"
        );
        figures::report(
            &format!("leader kill -9 to next commit, median of {trials}"),
            &format!("{median:.0} ms"),
            &format!("min {min:.0}, max {max:.0} ms"),
            "<= 1000 ms",
        );
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
enum Role {
    Follower,
    Leader,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::Leader => "leader",
        }
    }
}

/// Each voter's Raft term, as it says itself.
async fn terms(cluster: &Cluster, clients: &[Client]) -> Result<Vec<u64>> {
    let mut terms = Vec::new();
    for (agent, client) in cluster.agents.iter().zip(clients) {
        let name = agent.name.clone();
        match client.call(ApiRequest::ClusterShow { name }).await? {
            ApiReply::Member(detail) => terms.push(detail.raft.map_or(0, |r| r.term)),
            other => bail!("{}: unexpected reply {other:?}", agent.name),
        }
    }
    Ok(terms)
}

/// One voter in `role` shares CPU 1 with two busy loops for `secs`; a
/// write is committed every 200 ms through another voter. Any term that
/// moves meanwhile is an election (or a vote asked for): flapping.
fn flapping(
    cluster: &Cluster,
    runtime: &tokio::runtime::Runtime,
    role: Role,
    secs: u64,
) -> Result<()> {
    let leader = cluster.wait_converged(&["n1", "n2", "n3"], Duration::from_secs(60))?;
    let leading = cluster.index_of(&leader).unwrap_or(0);
    let busy = match role {
        Role::Leader => leading,
        Role::Follower => (leading + 1) % 3,
    };
    let clients = (0..3)
        .map(|i| Client::connect(&cluster.agents[i].data_dir, None))
        .collect::<Result<Vec<_>, _>>()?;
    let writer = &clients[(busy + 2) % 3];
    let before = runtime.block_on(terms(cluster, &clients))?;
    let pid = cluster.agents[busy].pid().context("the busy voter's pid")?;
    let saturated = saturate(pid, Duration::from_secs(secs + 10))?;
    let start = Instant::now();
    let (mut writes, mut failed, mut slowest) = (0u64, 0u64, Duration::ZERO);
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        let name = format!("busy-{}-{writes}-{failed}", role.name());
        match runtime.block_on(writer.call(token(&name))) {
            Ok(_) => writes += 1,
            Err(_) => failed += 1,
        }
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = runtime.block_on(terms(cluster, &clients))?;
    drop(saturated);
    let elections = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.saturating_sub(*b))
        .max()
        .unwrap_or(0);
    let busy_name = &cluster.agents[busy].name;
    println!(
        "the {} {busy_name} CPU-saturated {secs} s: terms {before:?} -> {after:?}; {writes} commits, {failed} failed, slowest {:.0} ms",
        role.name(),
        ms(slowest)
    );
    figures::report(
        &format!("elections, the {} CPU-saturated {secs} s", role.name()),
        &elections.to_string(),
        &format!(
            "{writes} commits, {failed} failed, slowest {:.0} ms",
            ms(slowest)
        ),
        "0",
    );
    Ok(())
}
