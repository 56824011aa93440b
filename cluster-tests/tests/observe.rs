//! What an operator watches, around one live move of a real container:
//! `ferry agent --metrics ADDR` (every agent's endpoint parses as
//! OpenMetrics with a strict parser, its gauges agree with the cluster,
//! the move changes the counters of the agent whose proposal ended it) and
//! `ferry monitor` (follows the move's phases as they commit; resumes
//! from an index with exactly what came after it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cluster_tests::{busybox_rootfs, require_container_runtime, wait_for, Cluster};
use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One HTTP/1.1 request; the status line and the body.
fn get(port: u16, path: &str) -> Result<(String, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").context("no HTTP head")?;
    let status = head.lines().next().unwrap_or_default().to_string();
    ensure!(
        !status.contains("200") || head.contains("application/openmetrics-text"),
        "{head}"
    );
    Ok((status, body.to_string()))
}

fn scrape(port: u16) -> Result<Exposition> {
    let (status, body) = get(port, "/metrics")?;
    ensure!(status.contains("200"), "{status}: {body}");
    openmetrics_parser::openmetrics::parse_openmetrics(&body)
        .map_err(|e| anyhow::anyhow!("not OpenMetrics: {e:?}\n{body}"))
}

/// The value of family `name`'s sample whose label `label` (if given) is
/// `value`: a counter's total, a gauge's value, a histogram's count.
fn value(metrics: &Exposition, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    let family = metrics.families.get(name)?;
    let sample = family.iter_samples().find(|s| match label {
        None => true,
        Some((k, v)) => s
            .get_labelset()
            .is_ok_and(|set| set.get_label_value(k) == Some(v)),
    })?;
    match &sample.value {
        OpenMetricsValue::Gauge(n) | OpenMetricsValue::Unknown(n) => Some(n.as_f64()),
        OpenMetricsValue::Counter(c) => Some(c.value.as_f64()),
        OpenMetricsValue::Histogram(h) => h.count.map(|c| c as f64),
        _ => None,
    }
}

/// `name` summed over every agent's scrape (0 where an agent lacks it).
fn total(scrapes: &[Exposition], name: &str, label: Option<(&str, &str)>) -> f64 {
    scrapes
        .iter()
        .map(|m| value(m, name, label).unwrap_or(0.0))
        .sum()
}

fn scrape_all(ports: &[u16]) -> Result<Vec<Exposition>> {
    ports.iter().map(|p| scrape(*p)).collect()
}

/// The events member 0 keeps after `after`, as `ferry monitor --once`
/// prints them.
fn kept_after(cluster: &Cluster, after: u64) -> Result<Vec<serde_json::Value>> {
    let after = after.to_string();
    let args = ["monitor", "--once", "--format", "json", "--after", &after];
    let out = cluster.ferry_ok(0, &args)?;
    Ok(out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

/// `ferry monitor --format json` on member 0 after the last event it
/// keeps now, its events (one JSON object a line) sent to the returned
/// channel.
fn follow(cluster: &Cluster) -> Result<(Child, mpsc::Receiver<serde_json::Value>)> {
    let last = kept_after(cluster, 0)?
        .last()
        .and_then(|e| e["index"].as_u64())
        .unwrap_or(0);
    let data_dir = &cluster.agents[0].data_dir;
    let mut child = std::process::Command::new(cluster_tests::ferry_bin())
        .arg("--data-dir")
        .arg(data_dir)
        .args(["monitor", "--format", "json", "--after", &last.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(cluster.root().join("monitor.err"))?)
        .spawn()?;
    let stdout = child.stdout.take().context("monitor stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(event) = serde_json::from_str(&line) {
                let _ = tx.send(event);
            }
        }
    });
    Ok((child, rx))
}

/// Events from `rx` until one's text contains `says`, within `within`.
fn events_until(
    rx: &mpsc::Receiver<serde_json::Value>,
    says: &str,
    within: Duration,
) -> Result<Vec<serde_json::Value>> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(event) = rx.recv_timeout(left) else {
            break;
        };
        let last = event["text"].as_str().is_some_and(|t| t.contains(says));
        seen.push(event);
        if last {
            return Ok(seen);
        }
    }
    bail!("no event saying '{says}' within {within:?}: {seen:#?}")
}

fn texts(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{} {}: {}", e["kind"], e["subject"], e["text"]))
        .collect()
}

#[test]
fn metrics_and_events_follow_a_move() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    let mut ports = Vec::new();
    for name in ["n1", "n2", "n3"] {
        let port = free_port()?;
        ports.push(port);
        cluster.env_for.insert(
            name.to_string(),
            vec![("FERRY_METRICS".into(), format!("127.0.0.1:{port}"))],
        );
    }
    cluster.start_three()?;
    let rootfs = busybox_rootfs(cluster.root())?;
    cluster.launch_counter("c1", "n2", &rootfs)?;

    // One leader; every agent sees three members alive; n2 holds c1.
    let converged = Duration::from_secs(30);
    let before = wait_for("the gauges to agree", converged, || {
        let scrapes = scrape_all(&ports)?;
        let leaders = total(&scrapes, "ferry_raft_is_leader", None);
        let alive = total(
            &scrapes,
            "ferry_gossip_members",
            Some(("liveness", "alive")),
        );
        let running = value(&scrapes[1], "ferry_instances", Some(("state", "running")));
        if leaders != 1.0 || alive != 9.0 || running != Some(1.0) {
            bail!("leaders {leaders}, alive {alive}, running on n2 {running:?}");
        }
        Ok(scrapes)
    })?;
    ensure!(value(&before[0], "ferry_raft_term", None) >= Some(1.0));
    ensure!(total(&before, "ferry_raft_commit_seconds", None) > 0.0);
    ensure!(total(&before, "ferry_moves", Some(("outcome", "done"))) == 0.0);

    let (mut monitor, events) = follow(&cluster)?;
    let out = cluster.ferry_ok(0, &["move", "c1", "--target", "n3"])?;
    ensure!(out.contains("to n3"), "{out}");
    let followed = events_until(&events, "-> Done (", converged);
    let _ = monitor.kill();
    let _ = monitor.wait();
    let said = std::fs::read_to_string(cluster.root().join("monitor.err")).unwrap_or_default();
    let followed = followed.with_context(|| format!("the monitor said: {said}"))?;
    check_move_events(&cluster, &followed)?;
    let after = wait_for("the move in the counters", converged, || {
        let scrapes = scrape_all(&ports)?;
        let running = value(&scrapes[2], "ferry_instances", Some(("state", "running")));
        if running != Some(1.0) {
            bail!("running on n3: {running:?}");
        }
        Ok(scrapes)
    })?;
    // Counted once in the cluster, by whichever agent's proposal did it.
    let done = Some(("outcome", "done"));
    assert_eq!(total(&after, "ferry_moves", done), 1.0);
    assert_eq!(total(&after, "ferry_move_downtime_seconds", None), 1.0);
    assert_eq!(total(&after, "ferry_move_duration_seconds", None), 1.0);
    let frozen = Some(("phase", "frozen"));
    assert_eq!(total(&after, "ferry_job_phase_seconds", frozen), 1.0);
    let bytes = total(&after, "ferry_move_transferred_bytes", None);
    assert!(bytes > 1e5, "a container's move sent {bytes} bytes");
    assert_eq!(
        value(&after[1], "ferry_instances", Some(("state", "running"))),
        None,
        "n2 still counts c1"
    );

    // Only /metrics is served.
    let (status, _) = get(ports[0], "/")?;
    assert!(status.contains("404"), "{status}");
    Ok(())
}

/// The move's events in commit order, each phase once; `--after` the
/// switch gives exactly the events that followed it.
fn check_move_events(cluster: &Cluster, followed: &[serde_json::Value]) -> Result<()> {
    let said = texts(followed);
    let phases: Vec<&str> = followed
        .iter()
        .filter(|e| e["kind"] == "job")
        .filter_map(|e| e["change"]["JobPhase"]["to"].as_str())
        .collect();
    assert_eq!(
        phases,
        [
            "Checking",
            "Preparing",
            "Frozen",
            "Switched",
            "Restored",
            "Done"
        ],
        "{said:#?}"
    );
    let owner = followed
        .iter()
        .position(|e| e["text"].as_str() == Some("owner n2 -> n3 (epoch 2)"))
        .with_context(|| format!("no owner change: {said:#?}"))?;
    let indexes: Vec<u64> = followed
        .iter()
        .filter_map(|e| e["index"].as_u64())
        .collect();
    assert!(indexes.windows(2).all(|w| w[0] <= w[1]), "{indexes:?}");
    // Resume after the entry before the switch: the same events again.
    let after = indexes[owner] - 1;
    let resumed = kept_after(cluster, after)?;
    let tail = texts(&followed[owner..]);
    assert_eq!(texts(&resumed[..tail.len().min(resumed.len())]), tail);
    Ok(())
}
