//! Gossip benchmark (not a test), real agents on loopback with the default
//! LAN timings:
//! - dissemination of a join: from the joiner's ready line until every
//!   member lists it alive, for the join that makes 5, 10 and 20 members;
//! - crash detection: from kill -9 of a member until every other member
//!   lists it dead (median, max over trials), at 5, 10 and 20 members;
//! - false positives: a 5-member cluster where one agent shares its CPU with
//!   two busy loops for SECS seconds (bounded: the loops are `timeout`ed);
//!   every 200 ms all members are asked, any non-alive answer is counted.
//!
//! cargo build --release --bin ferry && cargo run --release -p cluster-tests --bin bench-gossip [-- TRIALS SATURATE_SECS]

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cluster_tests::saturate::saturate;
use cluster_tests::{figures, Cluster};
use ferry_agent::api::{ApiReply, ApiRequest};
use ferry_agent::client::Client;

const SIZES: [usize; 3] = [5, 10, 20];
const SWEEP_PAUSE: Duration = Duration::from_millis(20);
const GIVE_UP: Duration = Duration::from_secs(120);

struct Bench {
    cluster: Cluster,
    clients: Vec<Option<Client>>,
    runtime: tokio::runtime::Runtime,
}

impl Bench {
    fn client(&mut self, index: usize) -> Result<()> {
        let _entered = self.runtime.enter();
        let client = Client::connect(&self.cluster.agents[index].data_dir, None)?;
        if self.clients.len() <= index {
            self.clients.resize_with(index + 1, || None);
        }
        self.clients[index] = Some(client);
        Ok(())
    }

    /// Liveness of `name` as each running member other than `name` sees it.
    fn sweep(&self, name: &str) -> Vec<String> {
        let mut seen = Vec::new();
        for (i, agent) in self.cluster.agents.iter().enumerate() {
            if !agent.is_running() || agent.name == name {
                continue;
            }
            let Some(Some(client)) = self.clients.get(i) else {
                continue;
            };
            let reply = self.runtime.block_on(client.call(ApiRequest::ClusterList));
            let liveness = match reply {
                Ok(ApiReply::Members(members)) => members
                    .into_iter()
                    .find(|m| m.name == name)
                    .map(|m| m.liveness)
                    .unwrap_or_else(|| "unlisted".into()),
                _ => "unreachable".into(),
            };
            seen.push(liveness);
        }
        seen
    }

    /// Time until every other member sees `name` as `want`.
    fn wait_all(&self, name: &str, want: &str, since: Instant) -> Result<Duration> {
        loop {
            if self.sweep(name).iter().all(|l| l == want) {
                return Ok(since.elapsed());
            }
            if since.elapsed() > GIVE_UP {
                bail!("{name} not {want} everywhere after {GIVE_UP:?}");
            }
            std::thread::sleep(SWEEP_PAUSE);
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median_max(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let median = v.get(v.len() / 2).copied().unwrap_or_default();
    let max = v.last().copied().unwrap_or_default();
    (ms(median), ms(max))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let trials: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5);
    let saturate_secs: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(600);
    let _ = rustls::crypto::ring::default_provider().install_default();

    let mut bench = Bench {
        cluster: Cluster::new(),
        clients: Vec::new(),
        runtime: tokio::runtime::Runtime::new()?,
    };
    bench.cluster.bootstrap("n1", 3)?;
    bench.client(0)?;
    for size in SIZES {
        while bench.cluster.agents.len() < size {
            let n = bench.cluster.agents.len() + 1;
            let name = format!("n{n}");
            let via = bench.cluster.agents.len() - 1;
            bench.cluster.join(&name, via)?;
            let ready = Instant::now();
            bench.client(n - 1)?;
            let took = bench.wait_all(&name, "alive", ready)?;
            if n == size {
                println!(
                    "{size} members: join of {name} alive on all others after {:.0} ms",
                    ms(took)
                );
            }
        }
        let mut detect = Vec::new();
        for trial in 0..trials {
            // Learners only (members past the 3 voters), so no election or
            // healing mixes in; with 5 members that is n4 and n5.
            let victim = 3 + trial % (size - 3);
            let name = bench.cluster.agents[victim].name.clone();
            bench.cluster.kill(victim);
            let killed = Instant::now();
            detect.push(bench.wait_all(&name, "dead", killed)?);
            bench.cluster.restart(victim)?;
            bench.client(victim)?;
            bench.wait_all(&name, "alive", Instant::now())?;
        }
        let (median, max) = median_max(detect);
        println!(
            "{size} members: kill -9 to dead on all others over {trials} trials: median {median:.0} ms, max {max:.0} ms"
        );
        figures::report(
            &format!("gossip: kill -9 to dead on all, {size} members"),
            &format!("{median:.0} ms (median of {trials})"),
            &format!("max {max:.0} ms"),
            "<= 3000 ms",
        );
    }
    drop(bench);

    if saturate_secs > 0 {
        false_positives(saturate_secs)?;
    }
    Ok(())
}

fn false_positives(secs: u64) -> Result<()> {
    let mut bench = Bench {
        cluster: Cluster::new(),
        clients: Vec::new(),
        runtime: tokio::runtime::Runtime::new()?,
    };
    bench.cluster.bootstrap("n1", 3)?;
    for n in 2..=5 {
        bench.cluster.join(&format!("n{n}"), n - 2)?;
    }
    let names = ["n1", "n2", "n3", "n4", "n5"];
    bench
        .cluster
        .wait_converged(&names, Duration::from_secs(60))?;
    for i in 0..5 {
        bench.client(i)?;
    }
    let pid = bench.cluster.agents[4].pid().context("n5 pid")?;
    let saturated = saturate(pid, Duration::from_secs(secs))?;
    let start = Instant::now();
    let (mut samples, mut suspect, mut dead) = (0u64, 0u64, 0u64);
    while start.elapsed() < Duration::from_secs(secs) {
        for name in names {
            for liveness in bench.sweep(name) {
                samples += 1;
                match liveness.as_str() {
                    "alive" => {}
                    "suspect" => suspect += 1,
                    _ => dead += 1,
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(saturated);
    println!(
        "false positives over {secs} s, n5 sharing CPU 1 with two busy loops: {suspect} suspect and {dead} dead answers out of {samples} liveness answers"
    );
    figures::report(
        &format!("gossip: false suspicions, one member CPU-saturated {secs} s"),
        &format!("{} of {samples} answers", suspect + dead),
        "-",
        "0",
    );
    Ok(())
}
