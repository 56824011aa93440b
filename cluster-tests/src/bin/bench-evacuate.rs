//! Evacuation benchmark (not a test): N containers, each dirtying M MiB,
//! on one member; first moved one by one (the baseline: the sum of single
//! moves), then evacuated with each `--parallel` value and restored
//! between runs. Prints total time and per-instance downtime (median and
//! max) for each.
//!
//! cargo build --release --bin ferry && cargo run --release -p cluster-tests --bin bench-evacuate [-- 10 32 1,2,4]

use std::time::{Duration, Instant};

use anyhow::Result;
use cluster_tests::{busybox_rootfs, dirtying_workload, Cluster};
use serde_json::Value;

fn downtimes_ms(jobs: &[Value]) -> Vec<u64> {
    let mut d: Vec<u64> = jobs
        .iter()
        .filter_map(|j| j["downtime_ms"].as_u64())
        .collect();
    d.sort_unstable();
    d
}

fn line(what: &str, wall: Duration, downtimes: &[u64]) -> String {
    let median = downtimes.get(downtimes.len() / 2).copied().unwrap_or(0);
    let max = downtimes.last().copied().unwrap_or(0);
    format!(
        "{what}: total {:.1} s, downtime median {median} ms, max {max} ms ({} moves)",
        wall.as_secs_f64(),
        downtimes.len()
    )
}

/// Move jobs created after job id `after`.
fn moves_since(cluster: &Cluster, after: u64) -> Result<Vec<Value>> {
    let jobs = cluster.ferry_json(0, &["job", "list"])?;
    Ok(jobs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|j| j["kind"] == "migrate")
        .filter(|j| j["id"].as_u64().is_some_and(|id| id > after))
        .cloned()
        .collect())
}

fn last_job_id(cluster: &Cluster) -> Result<u64> {
    let jobs = cluster.ferry_json(0, &["job", "list"])?;
    let ids = jobs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["id"].as_u64());
    Ok(ids.max().unwrap_or(0))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count: usize = args.first().map_or(Ok(10), |a| a.parse())?;
    let mib: usize = args.get(1).map_or(Ok(32), |a| a.parse())?;
    let parallels: Vec<u32> = match args.get(2) {
        Some(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![1, 2, 4],
    };
    let mut cluster = Cluster::new();
    cluster.start_three()?;
    let rootfs = busybox_rootfs(cluster.root())?
        .to_string_lossy()
        .into_owned();
    let names: Vec<String> = (1..=count).map(|i| format!("w{i}")).collect();
    let script = dirtying_workload(mib);
    for name in &names {
        let args = [
            "launch", name, "--rootfs", &rootfs, "--target", "n2", "--", "sh", "-c", &script,
        ];
        cluster.ferry_ok(0, &args)?;
        cluster.wait_workload_ready(1, name)?;
    }
    println!("{count} containers dirtying {mib} MiB each, on n2 of 3 members");
    let before = last_job_id(&cluster)?;
    let started = Instant::now();
    for name in &names {
        cluster.ferry_ok(0, &["move", name, "--target", "n3"])?;
    }
    let single = started.elapsed();
    println!(
        "{}",
        line(
            "single moves, one after another",
            single,
            &downtimes_ms(&moves_since(&cluster, before)?)
        )
    );
    for name in &names {
        cluster.ferry_ok(0, &["move", name, "--target", "n2"])?;
    }
    for parallel in parallels {
        let before = last_job_id(&cluster)?;
        let started = Instant::now();
        cluster.ferry_ok(
            0,
            &[
                "cluster",
                "evacuate",
                "n2",
                "--parallel",
                &parallel.to_string(),
            ],
        )?;
        let wall = started.elapsed();
        let what = format!("evacuate --parallel {parallel}");
        println!(
            "{} ({:.2}x the single moves)",
            line(&what, wall, &downtimes_ms(&moves_since(&cluster, before)?)),
            wall.as_secs_f64() / single.as_secs_f64()
        );
        cluster.ferry_ok(0, &["cluster", "restore", "n2"])?;
    }
    Ok(())
}
