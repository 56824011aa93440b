//! `ferry launch | list | show | start | stop | delete | exec`.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_agent::api::instances::{InstanceDetail, InstanceOp, LaunchRequest, VmLaunch};
use ferry_agent::api::names::{InstanceName, SnapshotName};
use ferry_agent::api::{ApiReply, ApiRequest};
use ferry_agent::client::Client;

use crate::output::{print_json, print_table};
use crate::Format;

#[derive(Args)]
pub struct LaunchArgs {
    /// Name of the new instance (a-z, 0-9 and '-', at most 63).
    name: InstanceName,
    /// Root filesystem: a directory or a tar archive.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["vm", "image"])]
    rootfs: Option<std::path::PathBuf>,
    /// An OCI image as the rootfs: a layout directory (`skopeo copy IMAGE
    /// oci:DIR`) or an archive (`podman save`, `docker save`, `skopeo copy
    /// IMAGE oci-archive:FILE`). Its layers are unpacked in order; its
    /// Entrypoint, Cmd, Env, WorkingDir and User make the process, and a
    /// command after '--' replaces its Cmd (the Entrypoint stays).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["rootfs", "vm"])]
    image: Option<std::path::PathBuf>,
    /// A QEMU virtual machine instead of a container: needs --disk and
    /// --memory (its RAM); boots the disk, or --kernel with --initrd.
    #[arg(long, requires_all = ["disk", "memory"], conflicts_with = "rootfs")]
    vm: bool,
    /// The VM's disk: any image qemu-img reads, copied in as qcow2.
    #[arg(long, value_name = "IMAGE", requires = "vm")]
    disk: Option<std::path::PathBuf>,
    /// Boot the VM from this kernel (kept with its disk).
    #[arg(long, value_name = "FILE", requires = "vm")]
    kernel: Option<std::path::PathBuf>,
    /// The initrd for --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<std::path::PathBuf>,
    /// The kernel command line for --kernel (its serial console is ttyS0).
    #[arg(long, value_name = "ARGS", requires = "kernel")]
    append: Option<String>,
    /// The VM's virtual CPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// The VM's QEMU CPU model, named so it can move (never 'host').
    /// Default: the most capable one every member's QEMU runs.
    #[arg(long, value_name = "NAME", requires = "vm")]
    cpu_model: Option<String>,
    /// Member to run it on (default: the one with the most memory).
    #[arg(long, value_name = "NODE")]
    target: Option<String>,
    /// Memory limit, e.g. 64M, 1G (a VM's RAM).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<u64>,
    /// Return without waiting for the instance to run.
    #[arg(long)]
    detach: bool,
    /// `default`: a seccomp filter refusing module loading, kexec, reboot,
    /// swap, mounts, keyrings, BPF, perf and the like, and a limit of 4096
    /// processes; `unconfined`: no seccomp filter.
    #[arg(long, value_enum, default_value_t = SecurityProfile::Default)]
    security_profile: SecurityProfile,
    /// When the process ends on its own (exit, crash, host restart):
    /// `always` starts it again (waiting 1 s, doubling to 60 s between
    /// quick restarts), `on-failure` does so unless it exited with code 0,
    /// `never` leaves it stopped.
    #[arg(long, value_enum, default_value_t = Restart::Always)]
    restart: Restart,
    /// What evacuating its member does with it: `auto` follows the
    /// evacuation's --mode; `live`, `stateless`, `stop` (in place, state
    /// kept) or `stay` (left running there).
    #[arg(long, value_enum, default_value_t = Evacuate::Auto)]
    evacuate: Evacuate,
    /// `cluster`: an address on the cluster network (reachable from every
    /// member and instance, kept through moves); `none`: only its own
    /// loopback. Default: `cluster` when the cluster has a network
    /// (bootstrapped with --cluster-subnet).
    #[arg(long, value_enum)]
    network: Option<Network>,
    /// Its address on the cluster network (default: the lowest free one).
    #[arg(long, value_name = "ADDR")]
    ip: Option<std::net::Ipv4Addr>,
    /// Print every member's placement verdict for it, and launch nothing.
    #[arg(long)]
    dry_run: bool,
    /// The command to run, after '--' (not for a VM; with --image, the
    /// arguments after the image's Entrypoint instead of its Cmd).
    #[arg(
        last = true,
        required_unless_present_any = ["vm", "image"],
        conflicts_with = "vm",
        value_name = "CMD"
    )]
    command: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Restart {
    /// Start it again whenever its process ends (with a growing delay).
    Always,
    /// Start it again unless its process exited with code 0.
    OnFailure,
    /// Leave it stopped.
    Never,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Evacuate {
    Auto,
    Live,
    Stateless,
    Stop,
    Stay,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Network {
    Cluster,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SecurityProfile {
    Default,
    Unconfined,
}

#[derive(Subcommand)]
pub enum InstanceCommand {
    /// Create and start a container (or, with --vm, a QEMU VM) instance.
    Launch(Box<LaunchArgs>),
    /// List instances.
    List {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Show one instance with its baseline and snapshots.
    Show {
        name: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Start a stopped instance (restoring its memory after a stateful stop).
    Start { name: String },
    /// Stop an instance.
    Stop {
        name: String,
        /// Checkpoint memory with CRIU so that start continues where it was.
        #[arg(long, conflicts_with = "force")]
        stateful: bool,
        /// Kill at once instead of SIGTERM then SIGKILL after 5 s.
        #[arg(long)]
        force: bool,
    },
    /// Delete an instance and its files.
    Delete {
        name: String,
        /// Delete even if it runs.
        #[arg(long)]
        force: bool,
    },
    /// Snapshots of an instance.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Run a command inside a running instance; exits with its status.
    Exec {
        name: String,
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot the rootfs (and with --stateful the memory) of an instance.
    Create {
        name: String,
        snapshot: SnapshotName,
        /// Also checkpoint memory with CRIU (the instance keeps running).
        #[arg(long)]
        stateful: bool,
    },
    /// List the snapshots of an instance.
    List {
        name: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Bring an instance back to a snapshot.
    Restore {
        name: String,
        snapshot: SnapshotName,
    },
    /// Delete a snapshot.
    Delete {
        name: String,
        snapshot: SnapshotName,
    },
}

/// "64M", "1G", "512K", or plain bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (number, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size like 64M or 1G"))?;
    let scale: u64 = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return Err(format!("'{text}': unit must be K, M or G")),
    };
    n.checked_mul(scale)
        .filter(|b| *b >= 4 << 20)
        .ok_or_else(|| format!("'{text}': a memory limit must be at least 4M"))
}

fn unexpected() -> anyhow::Error {
    anyhow::anyhow!("the agent answered with an unexpected reply")
}

async fn detail(client: &Client, name: &str) -> Result<InstanceDetail> {
    match client
        .call(ApiRequest::InstanceShow { name: name.into() })
        .await?
    {
        ApiReply::Instance(d) => Ok(*d),
        _ => Err(unexpected()),
    }
}

fn detail_json(d: &InstanceDetail) -> serde_json::Value {
    let mut value = serde_json::to_value(&d.view).unwrap_or_default();
    if let (Some(object), Ok(serde_json::Value::Object(rest))) =
        (value.as_object_mut(), serde_json::to_value(d))
    {
        for (k, v) in rest {
            if k != "view" {
                object.insert(k, v);
            }
        }
    }
    value
}

fn print_detail(d: &InstanceDetail) {
    println!("name:      {}", d.view.name);
    println!("kind:      {}", d.view.kind);
    println!("node:      {} (epoch {})", d.view.node, d.view.epoch);
    println!("state:     {} (desired {})", d.view.state, d.desired);
    if let Some(address) = &d.view.address {
        println!("address:   {address}");
    }
    if let Some(detail) = &d.detail {
        println!("detail:    {detail}");
    }
    match &d.vm {
        Some(vm) => {
            let boot = if vm.kernel { "its kernel" } else { "its disk" };
            println!(
                "machine:   {} CPU(s) {}, {} MiB, boots {boot}",
                vm.cpus, vm.cpu_model, vm.memory_mib
            );
            println!("disk:      from {}", d.rootfs_source);
        }
        None => {
            println!("command:   {}", d.command.join(" "));
            if d.cwd != "/" || d.user != "0:0" {
                println!("process:   in {} as {}", d.cwd, d.user);
            }
            if !d.env.is_empty() {
                println!("env:       {}", d.env.join(" "));
            }
            if let Some(m) = d.memory_bytes {
                println!("memory:    {} MiB", m >> 20);
            }
            println!("rootfs:    {}", d.rootfs_source);
            if let Some(image) = &d.layered_on {
                println!("layers:    its own changes over image {image} (shared)");
            }
        }
    }
    println!("security:  {}", d.security_profile);
    match (&d.last_restart, d.restarts) {
        (Some(why), n) => println!("restart:   {} ({n} restarts; last: {why})", d.restart),
        (None, _) => println!("restart:   {}", d.restart),
    }
    println!("evacuate:  {}", d.evacuate);
    if let Some(origin) = &d.origin {
        println!("origin:    {origin}; 'ferry cluster restore' brings it back");
    }
    if d.checkpointed {
        println!("memory state kept by a stateful stop; 'ferry start' restores it");
    }
    match &d.baseline {
        Some(b) => {
            println!(
                "baseline:  recorded on node {}: {} {}, {} CPU flags, {} syscalls",
                b.node,
                b.arch,
                b.kernel,
                b.cpu_flags.len(),
                b.syscalls.len()
            );
            println!("fs inside: {}", b.filesystems.join(" "));
        }
        None => println!("baseline:  none yet (recorded when it starts)"),
    }
    if let Some(job) = d.job {
        println!("job:       {job} (moving)");
    }
}

/// Wait until a launched or started instance runs, or report its error.
async fn wait_running(client: &Client, name: &str) -> Result<InstanceDetail> {
    for _ in 0..300 {
        let d = detail(client, name).await?;
        match d.view.state.as_str() {
            "running" => return Ok(d),
            "error" => bail!(
                "instance '{name}' failed to start: {}",
                d.detail.as_deref().unwrap_or("no detail")
            ),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    bail!("instance '{name}' did not start within 30 s; 'ferry show {name}' tells more")
}

async fn op(client: &Client, name: &str, op: InstanceOp) -> Result<ApiReply> {
    Ok(client
        .call(ApiRequest::Instance {
            name: name.into(),
            op,
            forwarded: false,
        })
        .await?)
}

fn absolute(path: &std::path::Path) -> Result<String> {
    let path = std::path::absolute(path).with_context(|| format!("bad path {}", path.display()))?;
    Ok(path.to_string_lossy().into_owned())
}

/// The machine of `launch --vm`, paths made absolute (the agent reads them).
fn vm_launch(args: &LaunchArgs) -> Result<Option<VmLaunch>> {
    let (true, Some(disk), Some(memory)) = (args.vm, &args.disk, args.memory) else {
        return Ok(None);
    };
    let optional = |p: &Option<std::path::PathBuf>| p.as_deref().map(absolute).transpose();
    Ok(Some(VmLaunch {
        disk: absolute(disk)?,
        kernel: optional(&args.kernel)?,
        initrd: optional(&args.initrd)?,
        append: args.append.clone(),
        cpus: args.cpus,
        memory_mib: memory >> 20,
        cpu_model: args.cpu_model.clone(),
    }))
}

async fn launch(client: &Client, args: LaunchArgs) -> Result<()> {
    if args.dry_run {
        let request = ApiRequest::Placement {
            instance: None,
            stateful: None,
        };
        let ApiReply::Placement(candidates) = client.call(request).await? else {
            return Err(unexpected());
        };
        crate::hosts::print_candidates(&candidates);
        return Ok(());
    }
    let rootfs = match &args.rootfs {
        Some(path) => absolute(path)?,
        None => String::new(),
    };
    let vm = vm_launch(&args)?;
    let image = args.image.as_deref().map(absolute).transpose()?;
    let request = LaunchRequest {
        vm,
        image,
        name: args.name.clone(),
        rootfs,
        target: args.target,
        memory_bytes: args.memory,
        command: args.command,
        unconfined: args.security_profile == SecurityProfile::Unconfined,
        restart: match args.restart {
            Restart::Always => ferry_raft::RestartPolicy::Always,
            Restart::Never => ferry_raft::RestartPolicy::Never,
            Restart::OnFailure => ferry_raft::RestartPolicy::OnFailure,
        },
        evacuate: match args.evacuate {
            Evacuate::Auto => ferry_raft::EvacuatePolicy::Auto,
            Evacuate::Live => ferry_raft::EvacuatePolicy::Live,
            Evacuate::Stateless => ferry_raft::EvacuatePolicy::Stateless,
            Evacuate::Stop => ferry_raft::EvacuatePolicy::Stop,
            Evacuate::Stay => ferry_raft::EvacuatePolicy::Stay,
        },
        network: args.network.map(|n| match n {
            Network::Cluster => ferry_raft::NetworkMode::Cluster,
            Network::None => ferry_raft::NetworkMode::None,
        }),
        ip: args.ip,
    };
    let ApiReply::Instance(d) = client.call(ApiRequest::Launch(request)).await? else {
        return Err(unexpected());
    };
    if args.detach {
        println!("launched {} on {}", d.view.name, d.view.node);
    } else {
        let d = wait_running(client, args.name.as_str()).await?;
        println!("launched {} on {}, running", d.view.name, d.view.node);
    }
    Ok(())
}

async fn list(client: &Client, format: Format) -> Result<()> {
    let ApiReply::Instances(list) = client.call(ApiRequest::InstanceList).await? else {
        return Err(unexpected());
    };
    match format {
        Format::Json => print_json(&list)?,
        Format::Table => print_table(
            &["NAME", "KIND", "NODE", "STATE", "EPOCH", "ADDRESS"],
            list.iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        i.kind.clone(),
                        i.node.clone(),
                        i.state.clone(),
                        i.epoch.to_string(),
                        i.address.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect(),
        ),
    }
    Ok(())
}

async fn snapshot(client: &Client, command: SnapshotCommand) -> Result<()> {
    match command {
        SnapshotCommand::Create {
            name,
            snapshot,
            stateful,
        } => {
            op(
                client,
                &name,
                InstanceOp::SnapshotCreate {
                    snapshot: snapshot.clone(),
                    stateful,
                },
            )
            .await?;
            println!("created snapshot {snapshot} of {name}");
        }
        SnapshotCommand::List { name, format } => {
            let d = detail(client, &name).await?;
            match format {
                Format::Json => print_json(&d.snapshots)?,
                Format::Table => print_table(
                    &["SNAPSHOT", "STATEFUL", "CREATED (ms)"],
                    d.snapshots
                        .iter()
                        .map(|s| {
                            vec![
                                s.name.clone(),
                                s.stateful.to_string(),
                                s.created_ms.to_string(),
                            ]
                        })
                        .collect(),
                ),
            }
        }
        SnapshotCommand::Restore { name, snapshot } => {
            op(
                client,
                &name,
                InstanceOp::SnapshotRestore {
                    snapshot: snapshot.clone(),
                },
            )
            .await?;
            println!("restored {name} to snapshot {snapshot}");
        }
        SnapshotCommand::Delete { name, snapshot } => {
            op(
                client,
                &name,
                InstanceOp::SnapshotDelete {
                    snapshot: snapshot.clone(),
                },
            )
            .await?;
            println!("deleted snapshot {snapshot} of {name}");
        }
    }
    Ok(())
}

pub async fn run(client: &Client, command: InstanceCommand) -> Result<i32> {
    match command {
        InstanceCommand::Launch(args) => launch(client, *args).await?,
        InstanceCommand::List { format } => list(client, format).await?,
        InstanceCommand::Show { name, format } => {
            let d = detail(client, &name).await?;
            match format {
                Format::Json => print_json(&detail_json(&d))?,
                Format::Table => print_detail(&d),
            }
        }
        InstanceCommand::Start { name } => {
            op(client, &name, InstanceOp::Start).await?;
            let d = wait_running(client, &name).await?;
            println!("started {name} on {}", d.view.node);
        }
        InstanceCommand::Stop {
            name,
            stateful,
            force,
        } => {
            op(client, &name, InstanceOp::Stop { stateful, force }).await?;
            println!(
                "stopped {name}{}",
                if stateful { " (memory state kept)" } else { "" }
            );
        }
        InstanceCommand::Delete { name, force } => {
            op(client, &name, InstanceOp::Delete { force }).await?;
            println!("deleted {name}");
        }
        InstanceCommand::Snapshot(command) => snapshot(client, command).await?,
        InstanceCommand::Exec { name, command } => {
            let ApiReply::Exec {
                code,
                stdout,
                stderr,
            } = op(client, &name, InstanceOp::Exec { argv: command }).await?
            else {
                return Err(unexpected());
            };
            std::io::stdout().write_all(&stdout)?;
            std::io::stderr().write_all(&stderr)?;
            return Ok(code);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units_and_reject_nonsense() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert!(parse_size("1K").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
    }
}
