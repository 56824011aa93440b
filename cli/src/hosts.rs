//! `ferry cluster cordon|uncordon|evacuate|restore` and the host jobs they
//! start: a plan for `--dry-run`, progress while children run, a one-line
//! summary at the end.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use ferry_agent::api::hosts::{CandidateView, EvacuateRequest, HostJobView, PlannedItem};
use ferry_agent::api::{ApiReply, ApiRequest};
use ferry_agent::client::Client;
use ferry_raft::EvacuateMode;

use crate::output::{print_json, print_table};
use crate::Format;

#[derive(Clone, Copy, Default, ValueEnum)]
pub enum Mode {
    /// Live where it runs and a compatible member exists, else stop it
    /// with its state kept.
    #[default]
    Auto,
    /// Live, else stop it with its state kept.
    Live,
    /// Stop, copy, start elsewhere.
    Stateless,
    /// Stop every instance where it is, its state kept.
    Stop,
}

#[derive(Args)]
pub struct EvacuateArgs {
    /// The member to empty.
    name: String,
    /// What to do with instances whose own policy (`launch --evacuate`) is auto.
    #[arg(long, value_enum, default_value_t)]
    mode: Mode,
    /// Moves running at once.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    parallel: u32,
    #[command(flatten)]
    start: StartArgs,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The member to bring its instances back to (and uncordon).
    name: String,
    #[command(flatten)]
    start: StartArgs,
}

/// How a host job is started and followed.
#[derive(Args)]
pub struct StartArgs {
    /// Print what would happen, and do nothing.
    #[arg(long)]
    dry_run: bool,
    /// Return once the job is created instead of following it.
    #[arg(long)]
    detach: bool,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

#[derive(Args)]
pub struct UpgradeArgs {
    /// The command that upgrades a member, run there by its agent with
    /// `sh` (it may restart the agent or reboot the host); FERRY_MEMBER,
    /// FERRY_DATA_DIR and FERRY_AGENT_PID are set for it.
    #[arg(long, value_name = "CMD", required_unless_present = "resume")]
    hook: Option<String>,
    /// Run on the member after the hook; it must exit 0.
    #[arg(long, value_name = "CMD")]
    verify: Option<String>,
    /// The members to upgrade, in this order (default: all).
    #[arg(
        long,
        value_name = "A,B",
        value_delimiter = ',',
        conflicts_with = "all"
    )]
    members: Vec<String>,
    /// Upgrade every member (the default).
    #[arg(long)]
    all: bool,
    /// Members down for their upgrade at once, at most.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    max_unavailable: u32,
    /// Continue the stopped upgrade JOB: its failed member retries the
    /// stage it failed in.
    #[arg(long, value_name = "JOB", conflicts_with = "hook")]
    resume: Option<u64>,
    #[command(flatten)]
    start: StartArgs,
}

pub async fn upgrade(client: &Client, args: UpgradeArgs) -> Result<()> {
    let request = match (args.resume, args.hook) {
        (Some(id), _) => ApiRequest::ResumeUpgrade { id },
        (None, Some(hook)) => ApiRequest::Upgrade(ferry_agent::api::hosts::UpgradeRequest {
            hook,
            verify: args.verify,
            members: args.members,
            max_unavailable: args.max_unavailable,
            dry_run: args.start.dry_run,
        }),
        (None, None) => bail!("give --hook CMD, or --resume JOB"),
    };
    started(client, request, &args.start).await
}

pub async fn cordon(client: &Client, name: String, cordoned: bool) -> Result<()> {
    let request = ApiRequest::Cordon {
        name: name.clone(),
        cordoned,
    };
    client.call(request).await?;
    match cordoned {
        true => println!("cordoned '{name}': it gets no new instances"),
        false => println!("uncordoned '{name}'"),
    }
    Ok(())
}

pub async fn evacuate(client: &Client, args: EvacuateArgs) -> Result<()> {
    let request = ApiRequest::Evacuate(EvacuateRequest {
        member: args.name,
        mode: match args.mode {
            Mode::Auto => EvacuateMode::Auto,
            Mode::Live => EvacuateMode::Live,
            Mode::Stateless => EvacuateMode::Stateless,
            Mode::Stop => EvacuateMode::Stop,
        },
        parallel: args.parallel,
        dry_run: args.start.dry_run,
    });
    started(client, request, &args.start).await
}

pub async fn restore(client: &Client, args: RestoreArgs) -> Result<()> {
    let request = ApiRequest::Restore {
        member: args.name,
        dry_run: args.start.dry_run,
    };
    started(client, request, &args.start).await
}

async fn started(client: &Client, request: ApiRequest, start: &StartArgs) -> Result<()> {
    match client.call(request).await? {
        ApiReply::HostPlan(plan) => match start.format {
            Format::Json => print_json(&plan),
            Format::Table => {
                print_plan(&plan);
                Ok(())
            }
        },
        ApiReply::HostJob(view) if start.detach => match start.format {
            Format::Json => print_json(&view),
            Format::Table => {
                println!("job {} started ({} instances)", view.id, view.items.len());
                Ok(())
            }
        },
        ApiReply::HostJob(view) => follow(client, view.id).await,
        _ => bail!("the agent answered with an unexpected reply"),
    }
}

fn print_plan(plan: &[PlannedItem]) {
    if plan.is_empty() {
        println!("nothing to do: no instance is concerned");
        return;
    }
    let rows = plan
        .iter()
        .map(|p| vec![p.instance.clone(), p.action.clone()])
        .collect();
    print_table(&["NAME", "WOULD"], rows);
}

pub fn print_candidates(candidates: &[CandidateView]) {
    let rows = candidates
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.score.map_or("-".into(), |s| s.to_string()),
                c.rejected.clone().unwrap_or_else(|| "ok".into()),
            ]
        })
        .collect();
    print_table(&["MEMBER", "SCORE", "VERDICT"], rows);
}

pub async fn host_job(client: &Client, id: u64) -> Result<Option<HostJobView>> {
    match client.call(ApiRequest::JobShow { id }).await? {
        ApiReply::HostJob(job) => Ok(Some(*job)),
        _ => Ok(None),
    }
}

/// Host jobs as a table (nothing when there are none), then a blank line.
pub fn print_host_jobs(hosts: &[HostJobView]) {
    if hosts.is_empty() {
        return;
    }
    let rows = hosts
        .iter()
        .map(|h| {
            vec![
                h.id.to_string(),
                h.kind.clone(),
                h.member.clone(),
                h.state.clone(),
                progress_line(h),
            ]
        })
        .collect();
    print_table(&["ID", "KIND", "MEMBER", "STATE", "PROGRESS"], rows);
    println!();
}

pub fn print_host_job(job: &HostJobView) {
    println!("job:       {} ({} {})", job.id, job.kind, job.member);
    println!("state:     {}", job.state);
    println!("mode:      {}, {} at a time", job.mode, job.parallel);
    let rows = job
        .items
        .iter()
        .map(|i| {
            vec![
                i.instance.clone(),
                i.state.clone(),
                i.target.clone().unwrap_or_default(),
                i.child
                    .map(|c| format!("{c} {}", i.child_phase.clone().unwrap_or_default()))
                    .unwrap_or_default(),
                i.detail.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(&["INSTANCE", "STATE", "TARGET", "MOVE", "DETAIL"], rows);
}

/// "evacuate n2: 3/6 done; moving c4 → n3 (Frozen), c5 → n1 (Preparing)",
/// or for an upgrade "upgrade: n1 done, n2 hook, n3 waiting".
pub fn progress_line(job: &HostJobView) -> String {
    if let Some(upgrade) = &job.upgrade {
        let members: Vec<String> = upgrade
            .members
            .iter()
            .map(|m| format!("{} {}", m.name, m.stage))
            .collect();
        return format!("upgrade: {}", members.join(", "));
    }
    let done = job
        .items
        .iter()
        .filter(|i| !matches!(i.state.as_str(), "waiting" | "moving"))
        .count();
    let moving: Vec<String> = job
        .items
        .iter()
        .filter(|i| i.state == "moving")
        .map(|i| {
            format!(
                "{} → {} ({})",
                i.instance,
                i.target.clone().unwrap_or_default(),
                i.child_phase.clone().unwrap_or_default()
            )
        })
        .collect();
    let mut line = format!(
        "{} {}: {done}/{} done",
        job.kind,
        job.member,
        job.items.len()
    );
    if !moving.is_empty() {
        line.push_str(&format!("; moving {}", moving.join(", ")));
    }
    line
}

/// "moved 4, stopped 1, stayed 1, failed 0 in 12.3 s; worst downtime 812 ms"
pub fn summary(job: &HostJobView, took: Duration) -> String {
    if let Some(upgrade) = &job.upgrade {
        let done = upgrade.members.iter().filter(|m| m.stage == "done").count();
        let failed: Vec<&str> = upgrade
            .members
            .iter()
            .filter(|m| m.stage == "failed")
            .map(|m| m.name.as_str())
            .collect();
        let mut line = format!(
            "upgrade: {done} of {} members upgraded in {:.1} s",
            upgrade.members.len(),
            took.as_secs_f64()
        );
        if !failed.is_empty() {
            line.push_str(&format!(
                "; stopped at {} ('ferry cluster upgrade --resume {}' continues)",
                failed.join(", "),
                job.id
            ));
        }
        return line;
    }
    let count = |state: &str| job.items.iter().filter(|i| i.state == state).count();
    let worst = job.items.iter().filter_map(|i| i.downtime_ms).max();
    let mut line = format!(
        "{} {}: moved {}, stopped {}, started {}, stayed {}, failed {} in {:.1} s",
        job.kind,
        job.member,
        count("moved"),
        count("stopped"),
        count("started"),
        count("stayed"),
        count("failed"),
        took.as_secs_f64()
    );
    if let Some(worst) = worst {
        line.push_str(&format!("; worst downtime {worst} ms"));
    }
    line
}

/// Follow a host job to its end; Ok unless an item failed.
pub async fn follow(client: &Client, id: u64) -> Result<()> {
    let started = Instant::now();
    let bar = std::io::stdout().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let mut last = String::new();
    let view = loop {
        let Some(view) = host_job(client, id).await? else {
            bail!("job {id} is not an evacuation or restore");
        };
        let line = progress_line(&view);
        match &bar {
            Some(bar) => bar.set_message(line.clone()),
            None if line != last => println!("{line}"),
            None => {}
        }
        last = line;
        if view.state == "done" {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let upgrade_members = view.upgrade.iter().flat_map(|u| &u.members);
    for m in upgrade_members.clone() {
        let diff = match m.diff.is_empty() {
            true => "no facts changed".to_string(),
            false => m.diff.join("; "),
        };
        let detail = m.detail.clone().unwrap_or_default();
        println!("{}: {} ({detail}; {diff})", m.name, m.stage);
    }
    for item in view.items.iter().filter(|i| i.state != "moved") {
        println!(
            "{}: {} ({})",
            item.instance,
            item.state,
            item.detail.clone().unwrap_or_default()
        );
    }
    let line = summary(&view, started.elapsed());
    let failed = upgrade_members.clone().any(|m| m.stage == "failed");
    if failed || view.items.iter().any(|i| i.state == "failed") {
        bail!("{line}")
    }
    println!("{line}");
    Ok(())
}
