//! TCP traffic through instances on the cluster network, all busybox: an
//! echo server, and clients that send a counter over one connection each
//! and log every echo with the container's uptime (10 ms steps). A log
//! whose values run 0, 1, 2, ... without a hole is one connection that
//! never broke.

use std::path::Path;

use anyhow::{bail, Result};

/// An echo server on port 7000 (a child per connection).
pub const ECHO_SERVER: &[&str] = &["nc", "-ll", "-p", "7000", "-e", "/bin/cat"];

/// `connections` clients of `server`:7000, each sending `count` values
/// every `interval_ms` and logging echoes to `/log1`, `/log2`, ... (bounded:
/// each ends after `count` values); they connect 20 ms apart, as the echo
/// server accepts one at a time.
pub fn clients(server: &str, connections: usize, interval_ms: u64, count: u64) -> String {
    format!(
        "for k in $(seq 1 {connections}); do \
         (i=0; while [ $i -lt {count} ]; do echo $i; i=$((i+1)); usleep {}; done \
         | nc {server} 7000 | while read n; do read up rest < /proc/uptime; echo \"$n $up\"; done > /log$k) & \
         usleep 20000; done; wait",
        interval_ms * 1000
    )
}

/// (value, uptime in s) per echo.
pub fn echoes(log: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (n, t) = l.split_once(' ')?;
            Some((n.parse().ok()?, t.parse().ok()?))
        })
        .collect()
}

/// Every value in order, none missing or repeated (one connection, no
/// reconnect); returns the longest gap between two echoes, in ms.
pub fn unbroken_gap_ms(log: &Path) -> Result<u64> {
    let echoes = echoes(log);
    for (i, (n, _)) in echoes.iter().enumerate() {
        if *n != i as u64 {
            bail!("{}: echo {i} is {n}: the stream broke", log.display());
        }
    }
    let gap = echoes
        .windows(2)
        .map(|w| ((w[1].1 - w[0].1) * 1000.0).round() as u64)
        .max()
        .unwrap_or(0);
    Ok(gap)
}

/// The downtime `ferry move` printed ("... downtime 812 ms ...").
pub fn downtime_ms(move_output: &str) -> Option<u64> {
    let after = move_output.split("downtime").nth(1)?;
    let digits: String = after
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}
