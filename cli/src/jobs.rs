//! `ferry move` and `ferry job ...`: start a migration, follow it with a
//! progress display, and end with a one-line summary.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use ferry_agent::api::jobs::{JobView, MoveMode, MoveRequest};
use ferry_agent::api::{ApiReply, ApiRequest};
use ferry_agent::client::Client;
use ferry_raft::CheckResult;

use crate::output::{print_json, print_table};
use crate::Format;

#[derive(Clone, Copy, ValueEnum)]
pub enum Mode {
    /// The target connects to the source.
    Pull,
    /// The source connects to the target.
    Push,
    /// Both connect to the agent this command talks to, which bridges
    /// them: for a source and target that cannot reach each other.
    Relay,
}

#[derive(Args)]
pub struct MoveArgs {
    /// The instance to move.
    name: String,
    /// The member to move it to (default: the one placement picks; with
    /// --dry-run, every member's verdict).
    #[arg(long, value_name = "NODE")]
    target: Option<String>,
    /// Move memory state too (default for a running instance).
    #[arg(long, conflicts_with = "stateless")]
    stateful: bool,
    /// Stop, copy, start (default for a stopped instance).
    #[arg(long)]
    stateless: bool,
    /// Who opens the transfer connections: the target (pull), the source
    /// (push), or both to the agent this command talks to, which relays
    /// between them (relay; that agent must be a third member).
    #[arg(long, value_enum, default_value = "pull")]
    mode: Mode,
    /// A VM: the longest pause QEMU aims for at the switchover, in ms.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    downtime_limit: u64,
    /// A VM: at most this many bytes per second, e.g. 100M (default: as
    /// fast as the link goes; QEMU's own default cap of 128 MiB/s is lifted).
    #[arg(long, value_name = "SIZE", value_parser = crate::instances::parse_size)]
    bandwidth: Option<u64>,
    /// A VM: send the memory over N parallel connections (QEMU's multifd),
    /// each its own stream on the move's connection; helps where one
    /// connection's copy is bound by a CPU and cores are spare.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=16))]
    multifd: Option<u8>,
    /// Post-copy (lazy): the target runs from the switchover and fetches
    /// the memory it lacks from the source, so the pause stays short
    /// however much memory there is or how fast it is dirtied. A VM:
    /// QEMU's post-copy. A container: CRIU lazy pages (pull or relay mode;
    /// the source needs fs.pipe-max-size >= 4194304 or CAP_SYS_RESOURCE).
    /// Once the target runs, there is NO WAY BACK: a failure of the target,
    /// the source or the link after that loses the memory state (a
    /// container's copy is killed and starts afresh from its rootfs; a VM's
    /// stopped source copy stays).
    #[arg(long, visible_alias = "lazy", conflicts_with = "multifd")]
    postcopy: bool,
    /// Only run the compatibility checks and print the report.
    #[arg(long)]
    dry_run: bool,
    /// Return once the job is created instead of following it.
    #[arg(long)]
    detach: bool,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

#[derive(Subcommand)]
pub enum JobCommand {
    /// List jobs.
    List {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Show one job with its compatibility report and figures.
    Show {
        id: u64,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Follow a job until it ends; exit status non-zero unless it is Done.
    Wait { id: u64 },
    /// Ask a job to roll back (only before its switch point).
    Abort { id: u64 },
}

fn print_report(report: &[CheckResult]) {
    let rows = report
        .iter()
        .map(|r| {
            vec![
                r.check.clone(),
                if r.ok { "ok" } else { "FAIL" }.to_string(),
                r.detail.clone(),
            ]
        })
        .collect();
    print_table(&["CHECK", "RESULT", "DETAIL"], rows);
}

fn print_job(job: &JobView) {
    println!("job:       {}", job.id);
    println!("instance:  {}", job.instance);
    println!("from:      {} to {}", job.source, job.target);
    println!(
        "kind:      {}",
        if job.stateful {
            "stateful"
        } else {
            "stateless"
        }
    );
    if !job.mode.is_empty() {
        println!("mode:      {}", job.mode);
    }
    println!("phase:     {}", job.phase);
    if let Some(e) = &job.error {
        println!("error:     {e}");
    }
    for note in &job.notes {
        println!("note:      {note}");
    }
    if let (Some(down), Some(total), Some(bytes)) = (job.downtime_ms, job.total_ms, job.bytes) {
        println!("figures:   downtime {down} ms, total {total} ms, {bytes} bytes");
    }
    if !job.report.is_empty() {
        print_report(&job.report);
    }
}

fn summary(job: &JobView) -> String {
    match (job.succeeded, job.downtime_ms, job.total_ms, job.bytes) {
        (true, Some(down), Some(total), Some(bytes)) => format!(
            "moved {} from {} to {}: downtime {down} ms, total {total} ms, {:.1} MiB",
            job.instance,
            job.source,
            job.target,
            mib(bytes)
        ),
        (true, ..) => format!(
            "moved {} from {} to {}",
            job.instance, job.source, job.target
        ),
        (false, ..) => format!(
            "move of {} to {} ended in {}: {}",
            job.instance,
            job.target,
            job.phase,
            job.error.as_deref().unwrap_or("no error recorded")
        ),
    }
}

async fn job(client: &Client, id: u64) -> Result<JobView> {
    match client.call(ApiRequest::JobShow { id }).await? {
        ApiReply::Job(job) => Ok(*job),
        _ => bail!("the agent answered with an unexpected reply"),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Transfer rate from successive samples of the byte count, smoothed.
#[derive(Default)]
struct Rate {
    last: Option<(std::time::Instant, u64)>,
    bytes_per_sec: f64,
}

impl Rate {
    fn sample(&mut self, bytes: u64) -> f64 {
        let now = std::time::Instant::now();
        if let Some((at, before)) = self.last {
            let secs = now.duration_since(at).as_secs_f64();
            if secs > 0.0 && bytes >= before {
                let current = (bytes - before) as f64 / secs;
                self.bytes_per_sec = 0.5 * self.bytes_per_sec + 0.5 * current;
            }
        }
        self.last = Some((now, bytes));
        self.bytes_per_sec
    }
}

/// "job 3: Preparing, memory images, 42.1 MiB at 35.2 MiB/s", with each
/// stage's bytes when several ran ("(disk 256.0 MiB, memory 44.0 MiB)").
fn progress_line(id: u64, view: &JobView, rate: &mut Rate) -> String {
    match &view.progress {
        Some(p) => {
            let per_sec = rate.sample(p.bytes);
            let parts: Vec<String> = p
                .parts
                .iter()
                .map(|(stage, bytes)| format!("{stage} {:.1} MiB", mib(*bytes)))
                .collect();
            let parts = match parts.len() {
                0 | 1 => String::new(),
                _ => format!(" ({})", parts.join(", ")),
            };
            format!(
                "job {id}: {}, {}, {:.1} MiB at {:.1} MiB/s{parts}",
                view.phase,
                p.stage,
                mib(p.bytes),
                per_sec / (1u64 << 20) as f64
            )
        }
        None => format!("job {id}: {}", view.phase),
    }
}

/// Follow a job to its end, showing each phase; Ok only if it is Done.
async fn follow(client: &Client, id: u64) -> Result<()> {
    let bar = std::io::stdout().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let mut last_phase = String::new();
    let mut rate = Rate::default();
    let view = loop {
        let view = job(client, id).await?;
        match &bar {
            Some(bar) => bar.set_message(progress_line(id, &view, &mut rate)),
            None if view.phase != last_phase => println!("job {id}: {}", view.phase),
            None => {}
        }
        last_phase = view.phase.clone();
        if view.done {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let line = summary(&view);
    if view.succeeded {
        println!("{line}");
        Ok(())
    } else {
        if !view.report.iter().all(|r| r.ok) {
            print_report(&view.report);
        }
        bail!("{line}")
    }
}

pub async fn run_move(client: &Client, args: MoveArgs) -> Result<()> {
    let request = MoveRequest {
        instance: args.name.clone(),
        target: args.target.clone(),
        stateful: match (args.stateful, args.stateless) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        mode: match args.mode {
            Mode::Pull => MoveMode::Pull,
            Mode::Push => MoveMode::Push,
            Mode::Relay => MoveMode::Relay,
        },
        live: ferry_raft::LiveSettings {
            downtime_limit_ms: args.downtime_limit,
            bandwidth: args.bandwidth.unwrap_or(0),
            multifd_channels: args.multifd.unwrap_or(0),
            postcopy: args.postcopy,
        },
        dry_run: args.dry_run,
    };
    if args.dry_run && args.target.is_none() {
        let ApiReply::Placement(candidates) = client
            .call(ApiRequest::Placement {
                instance: Some(args.name.clone()),
                stateful: request.stateful,
            })
            .await?
        else {
            bail!("the agent answered with an unexpected reply");
        };
        return match args.format {
            Format::Json => print_json(&candidates),
            Format::Table => {
                crate::hosts::print_candidates(&candidates);
                Ok(())
            }
        };
    }
    match client.call(ApiRequest::Move(request)).await? {
        ApiReply::Report(report) => {
            match args.format {
                Format::Json => print_json(&report)?,
                Format::Table => print_report(&report),
            }
            if report.iter().all(|r| r.ok) {
                Ok(())
            } else {
                bail!(
                    "{} cannot take '{}': {}",
                    args.target.as_deref().unwrap_or_default(),
                    args.name,
                    report
                        .iter()
                        .filter(|r| !r.ok)
                        .map(|r| format!("{}: {}", r.check, r.detail))
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            }
        }
        ApiReply::Job(view) if args.detach => {
            match args.format {
                Format::Json => print_json(&view)?,
                Format::Table => println!("job {} started", view.id),
            }
            Ok(())
        }
        ApiReply::Job(view) => follow(client, view.id).await,
        _ => bail!("the agent answered with an unexpected reply"),
    }
}

pub async fn run_job(client: &Client, command: JobCommand) -> Result<()> {
    match command {
        JobCommand::List { format } => {
            let ApiReply::Jobs(jobs) = client.call(ApiRequest::JobList).await? else {
                bail!("the agent answered with an unexpected reply");
            };
            let ApiReply::HostJobs(hosts) = client.call(ApiRequest::HostJobList).await? else {
                bail!("the agent answered with an unexpected reply");
            };
            match format {
                Format::Json => {
                    // One array of every job; `kind` tells them apart.
                    let mut all = serde_json::to_value(&jobs)?;
                    if let (Some(all), serde_json::Value::Array(hosts)) =
                        (all.as_array_mut(), serde_json::to_value(&hosts)?)
                    {
                        all.extend(hosts);
                    }
                    print_json(&all)
                }
                Format::Table => {
                    crate::hosts::print_host_jobs(&hosts);
                    let rows = jobs
                        .iter()
                        .map(|j| {
                            vec![
                                j.id.to_string(),
                                j.instance.clone(),
                                j.source.clone(),
                                j.target.clone(),
                                j.phase.clone(),
                                j.parent.map(|p| p.to_string()).unwrap_or_default(),
                                j.error.clone().unwrap_or_default(),
                            ]
                        })
                        .collect();
                    print_table(
                        &[
                            "ID", "INSTANCE", "SOURCE", "TARGET", "PHASE", "PARENT", "ERROR",
                        ],
                        rows,
                    );
                    Ok(())
                }
            }
        }
        JobCommand::Show { id, format } => {
            if let Some(host) = crate::hosts::host_job(client, id).await? {
                return match format {
                    Format::Json => print_json(&host),
                    Format::Table => {
                        crate::hosts::print_host_job(&host);
                        Ok(())
                    }
                };
            }
            let view = job(client, id).await?;
            match format {
                Format::Json => print_json(&view),
                Format::Table => {
                    print_job(&view);
                    Ok(())
                }
            }
        }
        JobCommand::Wait { id } => match crate::hosts::host_job(client, id).await? {
            Some(_) => crate::hosts::follow(client, id).await,
            None => follow(client, id).await,
        },
        JobCommand::Abort { id } => match client.call(ApiRequest::JobAbort { id }).await? {
            ApiReply::Job(view) => {
                println!("abort requested for job {} (phase {})", view.id, view.phase);
                Ok(())
            }
            ApiReply::HostJob(view) => {
                println!(
                    "abort requested for job {}: no new moves start; running ones finish or roll back",
                    view.id
                );
                Ok(())
            }
            _ => bail!("the agent answered with an unexpected reply"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_names_phase_stage_bytes_and_a_rate() {
        let mut view: JobView = serde_json::from_value(serde_json::json!({
            "id": 3, "kind": "migrate", "instance": "c1", "source": "n1", "target": "n2",
            "phase": "Preparing", "done": false, "succeeded": false, "stateful": true,
            "error": null, "report": [], "notes": [], "abort_requested": false,
            "created_ms": 0, "downtime_ms": null, "total_ms": null, "bytes": null,
            "iterations": null,
            "progress": {"stage": "rootfs", "bytes": 0}
        }))
        .unwrap();
        let mut rate = Rate::default();
        assert_eq!(
            progress_line(3, &view, &mut rate),
            "job 3: Preparing, rootfs, 0.0 MiB at 0.0 MiB/s"
        );
        std::thread::sleep(Duration::from_millis(20));
        view.progress = Some(ferry_agent::api::jobs::TransferProgress {
            stage: "memory images".into(),
            bytes: 10 << 20,
            parts: vec![("rootfs".into(), 0), ("memory images".into(), 10 << 20)],
        });
        let line = progress_line(3, &view, &mut rate);
        assert!(
            line.starts_with("job 3: Preparing, memory images, 10.0 MiB at "),
            "{line}"
        );
        assert!(!line.contains(" at 0.0 MiB/s"), "{line}");
        assert!(
            line.ends_with("(rootfs 0.0 MiB, memory images 10.0 MiB)"),
            "{line}"
        );
        view.progress = None;
        assert_eq!(progress_line(3, &view, &mut rate), "job 3: Preparing");
    }
}
