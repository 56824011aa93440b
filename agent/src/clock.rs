//! Wall-clock time for commands: apply is deterministic, so every time in
//! the replicated state comes from the proposer, through here. Nothing
//! that decides safety compares two hosts' clocks: the leader measures
//! phase deadlines on its own monotonic clock (`migration/engine.rs`).

use std::time::{SystemTime, UNIX_EPOCH};

/// A test build (cargo feature `test-hooks`) shifts this agent's clock by
/// this many milliseconds (signed), to stand for a host whose clock is off.
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
pub const CLOCK_OFFSET_ENV: &str = "FERRY_TEST_CLOCK_OFFSET_MS";

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    real.saturating_add_signed(offset_ms())
}

#[cfg(feature = "test-hooks")]
fn offset_ms() -> i64 {
    static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| {
        let offset = std::env::var(CLOCK_OFFSET_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if offset != 0 {
            tracing::warn!(
                offset_ms = offset,
                "test build: this agent's clock is shifted"
            );
        }
        offset
    })
}

#[cfg(not(feature = "test-hooks"))]
fn offset_ms() -> i64 {
    0
}
