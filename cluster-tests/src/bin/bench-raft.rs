//! Raft benchmark (not a test): commit latency and throughput of a small
//! command through the API on 3 voters over loopback with fsync on, and
//! the time from a leader's kill -9 to the next committed write.
//!
//! cargo build --release --bin ferry && cargo run --release -p cluster-tests --bin bench-raft [-- COMMITS TRIALS]

use std::time::{Duration, Instant};

use anyhow::Result;
use cluster_tests::Cluster;
use ferry_agent::api::ApiRequest;
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
    let commits: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let trials: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);
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
    // Sequential commits through one follower-or-leader agent's API.
    let client = Client::connect(&cluster.agents[0].data_dir, None)?;
    let mut latencies = Vec::with_capacity(commits);
    let started = Instant::now();
    runtime.block_on(async {
        for i in 0..commits {
            let t = Instant::now();
            client
                .call(ApiRequest::TokenCreate {
                    name: format!("bench-{i}"),
                    ttl_secs: 60,
                })
                .await?;
            latencies.push(t.elapsed());
        }
        anyhow::Ok(())
    })?;
    let elapsed = started.elapsed();
    latencies.sort();
    println!(
        "commit latency over {commits} sequential commits: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.0} commits/s",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap_or(&Duration::ZERO)),
        commits as f64 / elapsed.as_secs_f64()
    );

    // Concurrent commits: 16 in flight.
    let concurrent = commits;
    let started = Instant::now();
    runtime.block_on(async {
        let client = std::sync::Arc::new(client);
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..16 {
            let client = client.clone();
            tasks.spawn(async move {
                for i in (worker..concurrent).step_by(16) {
                    client
                        .call(ApiRequest::TokenCreate {
                            name: format!("par-{i}"),
                            ttl_secs: 60,
                        })
                        .await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        anyhow::Ok(())
    })?;
    println!(
        "throughput with 16 concurrent clients: {:.0} commits/s",
        concurrent as f64 / started.elapsed().as_secs_f64()
    );

    // Leader kill -9 to next committed write.
    let mut failovers = Vec::new();
    for trial in 0..trials {
        let leader = cluster.wait_converged(&["n1", "n2", "n3"], Duration::from_secs(60))?;
        let dead = cluster.index_of(&leader).unwrap_or(0);
        let survivor = (dead + 1) % 3;
        let client = Client::connect(&cluster.agents[survivor].data_dir, None)?;
        cluster.kill(dead);
        let t = Instant::now();
        runtime.block_on(async {
            loop {
                let request = ApiRequest::TokenCreate {
                    name: format!("failover-{trial}"),
                    ttl_secs: 60,
                };
                if client.call(request).await.is_ok() {
                    break;
                }
            }
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
        println!(
            "leader kill -9 to next commit over {trials} trials: median {:.0} ms, min {:.0} ms, max {:.0} ms",
            ms(percentile(&failovers, 0.5)),
            ms(failovers[0]),
            ms(*failovers.last().unwrap_or(&Duration::ZERO))
        );
    }
    Ok(())
}
