//! Real network partitions for tests: iptables rules that drop every UDP
//! datagram to or from one agent's port on loopback, or between two
//! agents' ports. Every agent byte (Raft, gossip, transfers, the CLI's API
//! calls) is QUIC on that one UDP port, so the agent is cut off
//! completely. Loopback traffic passes INPUT once, so one rule per
//! direction in INPUT covers both ways.

use std::process::Command;

use anyhow::Result;

/// Chains of this test process are named `PREFIX<pid>-<port>`.
const PREFIX: &str = "FERRY-T-";

/// An agent's port cut off until `heal` or drop (drop runs when the test
/// panics too, so no rule outlives its test).
pub struct Partition {
    chain: String,
    healed: bool,
}

fn iptables(args: &[&str]) -> Result<()> {
    let mut all = vec!["-w"];
    all.extend_from_slice(args);
    crate::run_tool("iptables", &all)
}

fn remove_chain(chain: &str) {
    // Each step may fail when an earlier run got halfway; the rest still runs.
    let _ = iptables(&["-D", "INPUT", "-j", chain]);
    let _ = iptables(&["-F", chain]);
    let _ = iptables(&["-X", chain]);
}

/// Chains left by test processes that died without unwinding (kill -9).
fn remove_stale_chains() {
    let Ok(out) = Command::new("iptables").args(["-w", "-S"]).output() else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let Some(chain) = line.strip_prefix("-N ") else {
            continue;
        };
        let Some(rest) = chain.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !std::path::Path::new("/proc").join(pid).exists() {
            remove_chain(chain);
        }
    }
}

impl Partition {
    /// Drop every datagram to and from `port` on loopback.
    pub fn isolate(port: u16) -> Result<Self> {
        let port = port.to_string();
        Self::dropping(&port, &[&["--dport", &port][..], &["--sport", &port][..]])
    }

    /// Drop every datagram between `a` and `b` on loopback, both ways:
    /// the two agents cannot reach each other, every other agent reaches
    /// both.
    pub fn between(a: u16, b: u16) -> Result<Self> {
        let (a, b) = (a.to_string(), b.to_string());
        Self::dropping(
            &format!("{a}-{b}"),
            &[
                &["--sport", &a, "--dport", &b][..],
                &["--sport", &b, "--dport", &a][..],
            ],
        )
    }

    /// A chain of this process named by `tag`, dropping loopback UDP that
    /// matches each of `matches`, jumped to from INPUT.
    fn dropping(tag: &str, matches: &[&[&str]]) -> Result<Self> {
        remove_stale_chains();
        let chain = format!("{PREFIX}{}-{tag}", std::process::id());
        iptables(&["-N", &chain])?;
        let partition = Partition {
            chain: chain.clone(),
            healed: false,
        };
        for matching in matches {
            let mut rule = vec!["-A", chain.as_str(), "-i", "lo", "-p", "udp"];
            rule.extend_from_slice(matching);
            rule.extend_from_slice(&["-j", "DROP"]);
            iptables(&rule)?;
        }
        iptables(&["-I", "INPUT", "-j", &chain])?;
        Ok(partition)
    }

    pub fn heal(mut self) {
        remove_chain(&self.chain);
        self.healed = true;
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if !self.healed {
            remove_chain(&self.chain);
        }
    }
}
