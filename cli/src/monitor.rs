//! `ferry monitor`: the cluster's changes as they commit (members, instance
//! states and owners, job phases with their figures), like `lxc monitor`.
//! Each event carries the log index of its entry; `--after INDEX` resumes
//! after the last one seen, and a lost agent is asked again from there.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use ferry_agent::api::events::{EventView, EventsView};
use ferry_agent::api::{ApiReply, ApiRequest};
use ferry_agent::client::Client;

use crate::Format;

/// How long one request waits for an event at the agent.
const WAIT_MS: u64 = 10_000;
/// Pause before asking a lost agent again.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Args)]
pub struct MonitorArgs {
    /// Start after this log index (the index of the last event you saw)
    /// and miss nothing the agent still keeps; without it, only what
    /// happens from now on.
    #[arg(long, value_name = "INDEX")]
    after: Option<u64>,
    /// Print the events the agent keeps after --after, then exit.
    #[arg(long)]
    once: bool,
    /// table: one line per event; json: one JSON object per line.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

pub async fn run(client: &Client, args: MonitorArgs) -> Result<()> {
    // u64::MAX asks where "now" is.
    let mut after = args.after.unwrap_or(u64::MAX);
    loop {
        let wait_ms = if args.once || after == u64::MAX {
            0
        } else {
            WAIT_MS
        };
        let page = match ask(client, after, wait_ms).await {
            Ok(page) => page,
            Err(e) if !args.once => {
                eprintln!("ferry monitor: {e:#}; asking again after index {after}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if after != u64::MAX && page.kept_from > after + 1 {
            eprintln!(
                "warning: events of entries {} to {} are not kept by this agent (it keeps the latest ones since it started); they are missing here",
                after + 1,
                page.kept_from - 1
            );
        }
        for event in &page.events {
            print_event(event, args.format)?;
        }
        if args.once && page.events.is_empty() {
            return Ok(());
        }
        after = page.next_after;
    }
}

async fn ask(client: &Client, after: u64, wait_ms: u64) -> Result<EventsView> {
    match client.call(ApiRequest::Events { after, wait_ms }).await? {
        ApiReply::Events(page) => Ok(page),
        _ => bail!("the agent sent an unexpected reply"),
    }
}

fn print_event(event: &EventView, format: Format) -> Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string(event)?),
        Format::Table => println!(
            "{:>7}  {}  {} {}: {}",
            event.index,
            clock(event.at_ms),
            event.kind,
            event.subject,
            event.text
        ),
    }
    Ok(())
}

/// The time of day (UTC) of a Unix time in ms.
fn clock(at_ms: u64) -> String {
    let ms = at_ms % 86_400_000;
    let (h, m, s) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}Z", ms % 1000)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clock_reads_utc_time_of_day() {
        // 2026-12-02T21:32:53.910Z
        assert_eq!(super::clock(1_796_247_173_910), "21:32:53.910Z");
    }
}
