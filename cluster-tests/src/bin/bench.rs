//! Every benchmark in one run, its figures in one table with the floor or
//! peer each is measured against and its target: bench-raft, bench-move
//! and bench-gossip run one after another (their own output goes to
//! stderr as it comes), then the table goes to stdout. bench-move runs a
//! second time on a rootfs of 10,000 more files, by entries and by btrfs,
//! and a third time with 256 MiB stop-and-copy beside lazily.
//!
//! cargo build --release --bin ferry -p ferry-cli && cargo build --release -p cluster-tests --bins
//! target/release/bench [--quick] [--fill]
//!
//! `--quick`: fewer commits, trials and seconds (a look, not a figure to
//! quote). `--fill`: Raft commits again with 10,000 instances and 100,000
//! finished moves in the state; needs FERRY_BIN to be a test build
//! (`--features ferry-cli/test-hooks`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use cluster_tests::figures::{self, Figure};

struct Run {
    bench: &'static str,
    args: Vec<&'static str>,
    env: Vec<(&'static str, &'static str)>,
}

fn runs(quick: bool, fill: bool) -> Vec<Run> {
    let mut raft = match quick {
        true => vec!["200", "3", "20"],
        false => vec!["1000", "10", "120"],
    };
    if fill {
        raft.extend(["10000", "100000"]);
    }
    let (moves, gossip) = match quick {
        true => (vec!["64"], vec!["3", "30"]),
        false => (vec!["64", "256"], vec!["5", "600"]),
    };
    vec![
        Run {
            bench: "bench-raft",
            args: raft,
            env: vec![],
        },
        Run {
            bench: "bench-move",
            args: moves,
            env: vec![],
        },
        // The final rootfs pass of a large tree, by entries and by btrfs.
        Run {
            bench: "bench-move",
            args: vec!["64"],
            env: vec![
                ("FERRY_BENCH_BTRFS", "compare"),
                ("FERRY_BENCH_ROOTFS_FILES", "10000"),
            ],
        },
        // The same container moved lazily beside stop-and-copy.
        Run {
            bench: "bench-move",
            args: vec!["256"],
            env: vec![("FERRY_BENCH_LAZY", "compare")],
        },
        Run {
            bench: "bench-gossip",
            args: gossip,
            env: vec![],
        },
    ]
}

/// Run one bench beside this binary; its figures (its lines pass on to
/// stderr as they come).
fn run(dir: &std::path::Path, run: &Run) -> Result<Vec<Figure>> {
    let exe: PathBuf = dir.join(run.bench);
    let env: Vec<String> = run.env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    eprintln!("== {}{} {}", env.concat(), run.bench, run.args.join(" "));
    let mut child = Command::new(&exe)
        .args(&run.args)
        .envs(run.env.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "cannot run {} (cargo build --release -p cluster-tests --bins)",
                exe.display()
            )
        })?;
    let mut found = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            match figures::parse(&line) {
                Some(figure) => found.push(figure),
                None => eprintln!("{line}"),
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{} {} failed: {status}", run.bench, run.args.join(" "));
    }
    Ok(found)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let known = ["--quick", "--fill"];
    if let Some(other) = args.iter().find(|a| !known.contains(&a.as_str())) {
        bail!("unknown argument {other}; usage: bench [--quick] [--fill]");
    }
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("where this binary lives")?;
    let mut all = Vec::new();
    let mut failed = Vec::new();
    for r in runs(has("--quick"), has("--fill")) {
        match run(dir, &r) {
            Ok(found) => all.extend(found),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    print!("{}", figures::table(&all));
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}
