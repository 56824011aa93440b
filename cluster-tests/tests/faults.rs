//! A fixed subset of the fault matrix (`cargo run -p cluster-tests --bin
//! fault-matrix` runs all of it): every fault and every moment of a
//! stateful move at least once, on real agents, runc and CRIU.

use anyhow::Result;
use cluster_tests::faults::{run_cell, Fault, When};
use cluster_tests::{require_container_runtime, require_partition_tools};

fn cell(when: When, fault: Fault) -> Result<()> {
    if !require_container_runtime() || !require_partition_tools() {
        return Ok(());
    }
    let outcome = run_cell(when, fault)?;
    eprintln!(
        "{} × {}: {} on {} in {:?}",
        when.name(),
        fault.name(),
        outcome.phase,
        outcome.owner,
        outcome.took
    );
    Ok(())
}

#[test]
fn kill_9_of_the_source_while_preparing() -> Result<()> {
    cell(When::Preparing, Fault::KillSource)
}

#[test]
fn kill_9_of_the_target_during_the_transfer() -> Result<()> {
    cell(When::Transfer, Fault::KillTarget)
}

#[test]
fn kill_9_of_the_leader_while_frozen() -> Result<()> {
    cell(When::Frozen, Fault::KillLeader)
}

#[test]
fn partition_of_the_target_once_switched() -> Result<()> {
    cell(When::Switched, Fault::PartitionTarget)
}

#[test]
fn partition_of_the_source_once_restored() -> Result<()> {
    cell(When::Restored, Fault::PartitionSource)
}

#[test]
fn the_target_disk_filling_at_the_thaw() -> Result<()> {
    cell(When::Thaw, Fault::TargetDiskFull)
}

#[test]
fn criu_failing_the_dump_during_the_transfer() -> Result<()> {
    cell(When::Transfer, Fault::CriuDump)
}

#[test]
fn criu_failing_the_restore_while_frozen() -> Result<()> {
    cell(When::Frozen, Fault::CriuRestore)
}
