//! Fault-injection points for the fault matrix (`cluster-tests`), present
//! only in a test build (cargo feature `test-hooks`); in the binary users
//! run every function here does nothing, so no production check can be
//! weakened through them.
//!
//! - `FERRY_TEST_HOLD_AT=PHASE`: before acting on a job in that phase, the
//!   engine waits while the file `hold` exists in the agent's data dir;
//!   also `live-mirror` (a VM's disk mirror ready, memory not started)
//!   and `live-memory` (its memory migration started), on the source.
//! - the file `fail-dump` (`fail-restore`, `fail-thaw`) in the data dir
//!   makes a move's CRIU dump (restore, a container's thaw) fail, as a
//!   failing runtime would.

use std::path::Path;

/// The variable naming the phase a test build holds jobs at.
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
pub const HOLD_AT_ENV: &str = "FERRY_TEST_HOLD_AT";

/// Wait, at most five minutes, while this phase is held (test builds).
#[cfg(feature = "test-hooks")]
pub async fn hold_at(data_dir: &Path, phase: &str) {
    if std::env::var(HOLD_AT_ENV).ok().as_deref() != Some(phase) {
        return;
    }
    let hold = data_dir.join("hold");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(300);
    if hold.exists() {
        tracing::warn!(phase, "test build: holding the job here");
    }
    while hold.exists() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[cfg(not(feature = "test-hooks"))]
pub async fn hold_at(_data_dir: &Path, _phase: &str) {}

/// Whether a test asked the runtime's `op` ("dump", "restore", "thaw") to
/// fail here.
#[cfg(feature = "test-hooks")]
pub fn criu_fails(data_dir: &Path, op: &str) -> bool {
    let asked = data_dir.join(format!("fail-{op}")).exists();
    if asked {
        tracing::warn!(op, "test build: failing CRIU on request");
    }
    asked
}

#[cfg(not(feature = "test-hooks"))]
pub fn criu_fails(_data_dir: &Path, _op: &str) -> bool {
    false
}

/// The syscall a test build adds to a host "upgraded" by a test's hook.
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
pub const UPGRADED_SYSCALL: &str = "ferry_test_upgraded";

/// A test's upgrade hook writes the file `test-kernel` (a kernel release)
/// into the data dir: a test build then reports that kernel and one more
/// syscall, standing for a host booted into a newer kernel.
#[cfg(feature = "test-hooks")]
pub fn fake_upgrade(data_dir: &Path, facts: &mut ferry_raft::HostFacts) {
    let Ok(kernel) = std::fs::read_to_string(data_dir.join("test-kernel")) else {
        return;
    };
    tracing::warn!(
        kernel = kernel.trim(),
        "test build: reporting an upgraded kernel"
    );
    facts.kernel = kernel.trim().to_string();
    facts.syscalls.push(UPGRADED_SYSCALL.to_string());
    facts.syscalls.sort();
}

#[cfg(not(feature = "test-hooks"))]
pub fn fake_upgrade(_data_dir: &Path, _facts: &mut ferry_raft::HostFacts) {}
