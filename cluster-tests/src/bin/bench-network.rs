//! Network move benchmark (not a test): three agents, each in a network
//! namespace of its own (see `cluster_tests::netns`); an echo server on n1
//! with N clients on n3, each on one TCP connection sending a value every
//! 200 ms; the server moved live n1 → n2 → n1 `ROUNDS` times. Prints each
//! move's downtime and the longest gap any client saw, for every N, and
//! checks every connection carried on unbroken. busybox's server forks
//! one process per connection, so `Np` (N idle processes beside the
//! server, no connection) tells what the processes alone cost.
//!
//! cargo build --bin ferry && cargo run -p cluster-tests --bin bench-network [-- 0,100p,100 ROUNDS]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cluster_tests::echo::{clients, downtime_ms, echoes, unbroken_gap_ms, ECHO_SERVER};
use cluster_tests::netns::TEST_CLUSTER_SUBNET;
use cluster_tests::{busybox_rootfs, wait_for, Cluster};

struct Figures {
    case: String,
    downtimes: Vec<u64>,
    longest_gap: u64,
}

fn logs(cluster: &Cluster, client: &str, connections: usize) -> Vec<PathBuf> {
    let root = cluster.agents[2]
        .data_dir
        .join(format!("instances/{client}/bundle/rootfs"));
    (1..=connections)
        .map(|k| root.join(format!("log{k}")))
        .collect()
}

/// Every client has echoed more than `at_least` values.
fn wait_all(logs: &[PathBuf], at_least: &[usize]) -> Result<()> {
    wait_for("every client's echoes", Duration::from_secs(60), || {
        for (log, seen) in logs.iter().zip(at_least) {
            if echoes(log).len() <= *seen + 2 {
                bail!("{} has {} echoes", log.display(), echoes(log).len());
            }
        }
        Ok(())
    })
}

fn run(cluster: &Cluster, rootfs: &str, case: &str, rounds: usize) -> Result<Figures> {
    let (idle, connections) = match case.strip_suffix('p') {
        Some(n) => (n.parse::<usize>()?, 0),
        None => (0, case.parse::<usize>()?),
    };
    let (server, client) = (format!("s{case}"), format!("c{case}"));
    let with_idle = format!(
        "for k in $(seq 1 {idle}); do sleep 100000 & done; exec {}",
        ECHO_SERVER.join(" ")
    );
    let launch = [
        "launch", &server, "--rootfs", rootfs, "--target", "n1", "--", "sh", "-c", &with_idle,
    ];
    cluster.ferry_ok(0, &launch)?;
    let list = cluster.ferry_json(0, &["list"])?;
    let addr = list
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == server.as_str())
        .and_then(|i| i["address"].as_str())
        .context("the server has no address")?
        .to_string();
    let logs = logs(cluster, &client, connections);
    if connections > 0 {
        let script = clients(&addr, connections, 200, 3000);
        let args = [
            "launch", &client, "--rootfs", rootfs, "--target", "n3", "--", "sh", "-c", &script,
        ];
        cluster.ferry_ok(0, &args)?;
        wait_all(&logs, &vec![0; connections])?;
    }
    let mut downtimes = Vec::new();
    for _ in 0..rounds {
        for target in ["n2", "n1"] {
            let out = cluster.ferry_ok(0, &["move", &server, "--target", target])?;
            downtimes.push(downtime_ms(&out).with_context(|| format!("no downtime in {out}"))?);
            let seen: Vec<usize> = logs.iter().map(|l| echoes(l).len()).collect();
            wait_all(&logs, &seen)?;
        }
    }
    let mut longest_gap = 0;
    for log in &logs {
        longest_gap = longest_gap.max(unbroken_gap_ms(log)?);
    }
    for name in [&client, &server] {
        let _ = cluster.ferry(0, &["delete", name, "--force"]);
    }
    Ok(Figures {
        case: case.to_string(),
        downtimes,
        longest_gap,
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cases: Vec<&str> = args
        .first()
        .map_or("0,100p,100", String::as_str)
        .split(',')
        .collect();
    let rounds: usize = args.get(1).map_or(Ok(2), |a| a.parse())?;
    let mut cluster = Cluster::with_underlay(3)?;
    cluster.start_three_with(&["--cluster-subnet", TEST_CLUSTER_SUBNET])?;
    let rootfs = busybox_rootfs(cluster.root())?
        .to_string_lossy()
        .into_owned();
    println!("connections  moves  downtime median  downtime max  longest client gap");
    for case in cases {
        let mut f = run(&cluster, &rootfs, case, rounds)?;
        f.downtimes.sort_unstable();
        let median = f.downtimes[f.downtimes.len() / 2];
        let max = f.downtimes.last().copied().unwrap_or(0);
        let gap = match f.longest_gap {
            0 => "-".to_string(),
            _ => format!("{} ms", f.longest_gap),
        };
        println!(
            "{:>11}  {:>5}  {:>12} ms  {:>9} ms  {:>18}",
            f.case,
            f.downtimes.len(),
            median,
            max,
            gap
        );
    }
    Ok(())
}
