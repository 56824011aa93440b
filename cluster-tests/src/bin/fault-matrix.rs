//! The fault matrix of stateful moves (not a test; CI runs a subset in
//! `tests/faults.rs`): every moment of a move × every fault, each cell a
//! real three-agent cluster (see `cluster_tests::faults`). Prints the
//! table: how each cell ended, or why it failed.
//!
//! cargo build --bin ferry --features ferry-cli/test-hooks &&
//! FERRY_BIN=target/debug/ferry cargo run -p cluster-tests --bin fault-matrix [-- PHASE...]

use std::time::Instant;

use cluster_tests::faults::{run_cell, Fault, When};

fn main() {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let started = Instant::now();
    let mut failed = 0;
    println!("| moment | fault | outcome | took |");
    println!("| --- | --- | --- | --- |");
    for when in When::ALL {
        if !only.is_empty() && !only.iter().any(|o| o == when.name()) {
            continue;
        }
        for fault in Fault::ALL {
            if !fault.applies(when) {
                println!("| {} | {} | n/a | |", when.name(), fault.name());
                continue;
            }
            let cell = Instant::now();
            let outcome = match run_cell(when, fault) {
                Ok(o) => format!("{} on {}, at most {} copy", o.phase, o.owner, o.most_copies),
                Err(e) => {
                    failed += 1;
                    format!("FAILED: {}", e.to_string().replace('\n', " "))
                }
            };
            println!(
                "| {} | {} | {outcome} | {:.0}s |",
                when.name(),
                fault.name(),
                cell.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "{failed} failed; {:.0}s in all",
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
