//! `ferry`: the one binary. `ferry agent` runs the daemon; every other
//! command talks to the local agent over mutually authenticated QUIC.

mod hosts;
mod instances;
mod jobs;
mod monitor;
mod network;
mod output;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_agent::api::{ApiReply, ApiRequest};
use ferry_agent::client::Client;
use ferry_agent::AgentOptions;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Move running workloads between the hosts of a cluster"
)]
struct Cli {
    /// The agent's data directory (holds its address and admin credentials).
    #[arg(
        long,
        global = true,
        env = "FERRY_DATA_DIR",
        default_value = "/var/lib/ferry"
    )]
    data_dir: PathBuf,
    /// Talk to the agent at this address instead of the one in the data dir.
    #[arg(long, global = true, value_name = "ADDR")]
    agent: Option<String>,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run the ferry agent (the daemon of one host).
    Agent(AgentArgs),
    /// Members, join tokens and removal.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    #[command(flatten)]
    Instance(instances::InstanceCommand),
    /// Move an instance to another member (live by default when it runs).
    Move(jobs::MoveArgs),
    /// Migration jobs.
    #[command(subcommand)]
    Job(jobs::JobCommand),
    /// The cluster network.
    #[command(subcommand)]
    Network(network::NetworkCommand),
    /// Follow what happens in the cluster as it commits: members, instance
    /// states and owners, job phases with their figures. Each event shows
    /// its log index; `--after INDEX` resumes without missing one.
    Monitor(monitor::MonitorArgs),
    /// Print a shell completion script for ferry, e.g.
    /// `ferry completions bash > /etc/bash_completion.d/ferry`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// (Internal) the parent of one container: runs the runc command that
    /// starts it, keeps its console log and records how its process ended;
    /// started by the agent for each container.
    #[command(hide = true)]
    Shim(ShimArgs),
}

#[derive(Args)]
struct ShimArgs {
    #[arg(long)]
    console: PathBuf,
    #[arg(long)]
    console_max_bytes: u64,
    #[arg(long)]
    exit_file: PathBuf,
    #[arg(long)]
    pid_file: PathBuf,
    #[arg(long)]
    timeout_ms: u64,
    /// The runc command line.
    #[arg(last = true, required = true)]
    runc: Vec<std::ffi::OsString>,
}

#[derive(Args)]
struct AgentArgs {
    /// Address to serve on (QUIC, UDP); port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// This member's name (lowercase letters, digits and '-').
    #[arg(long)]
    name: Option<String>,
    /// Create a new cluster with this agent as its first member (no-op once done).
    #[arg(long, conflicts_with = "join")]
    bootstrap: bool,
    /// Join an existing cluster with a token from 'ferry cluster token create'.
    #[arg(long, value_name = "TOKEN")]
    join: Option<String>,
    /// How many voters the cluster keeps (set at bootstrap).
    #[arg(long, default_value_t = 3, value_parser = parse_voters)]
    voters: u8,
    /// The cluster network's range (e.g. 10.88.0.0/16), set at bootstrap:
    /// every instance launched with '--network cluster' gets an address in
    /// it that follows it between members. Without it instances have no
    /// network but their own loopback.
    #[arg(long, value_name = "CIDR", requires = "bootstrap", value_parser = ferry_raft::subnet::Subnet::parse)]
    cluster_subnet: Option<ferry_raft::subnet::Subnet>,
    /// Finished moves the cluster keeps (set at bootstrap); the oldest go
    /// first, so the replicated state does not grow with every move ever
    /// made. Evacuations keep their moves until they finish.
    #[arg(long, value_name = "N", default_value_t = ferry_raft::DEFAULT_JOB_HISTORY, requires = "bootstrap", value_parser = clap::value_parser!(u32).range(1..))]
    job_history: u32,
    /// Take a Raft snapshot (and purge the log behind it) every N applied entries.
    #[arg(long, value_name = "N", default_value_t = ferry_raft::DEFAULT_SNAPSHOT_EVERY)]
    snapshot_every: u64,
    /// Gossip: each agent probes one random member this often (e.g. 1s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = output::parse_duration)]
    gossip_probe_period: Duration,
    /// Gossip: the shortest time a suspect member has to answer before it is
    /// declared dead (once others confirm the suspicion; three times this
    /// without confirmations).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = output::parse_duration)]
    gossip_suspicion: Duration,
    /// Replace a voter that gossip has seen dead this long by promoting a live
    /// learner (members are never removed automatically).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = output::parse_duration)]
    heal_after: Duration,
    /// Roll back (or switch back) a migration job whose phase has not moved
    /// for this long; the leader's setting applies.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = output::parse_duration)]
    job_phase_timeout: Duration,
    /// What each container's console.log keeps at most before it rotates
    /// to console.log.1, e.g. 8M.
    #[arg(long, value_name = "SIZE", default_value = "8M", value_parser = instances::parse_size)]
    console_log_max: u64,
    /// Every runc and CRIU call (start, checkpoint, restore, exec, ...)
    /// must end within this, or it is killed and the operation fails.
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = output::parse_duration)]
    runtime_timeout: Duration,
    /// Disk space on the data dir's filesystem that instance data
    /// (launches, incoming moves) may not use, so the Raft log always has
    /// room, e.g. 1G.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = instances::parse_size)]
    disk_reserve: u64,
    /// On SIGTERM or Ctrl-C (the host shutting down), evacuate this member
    /// first: its instances move to other members (placement picks), and
    /// what has not moved within --stop-timeout is stopped with its state
    /// kept.
    #[arg(long)]
    evacuate_on_stop: bool,
    /// How long --evacuate-on-stop may take; keep the service manager's
    /// own stop timeout (systemd's TimeoutStopSec) above it.
    #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = output::parse_duration)]
    stop_timeout: Duration,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics,
    /// e.g. 127.0.0.1:9478. Plain HTTP without authentication: keep it on
    /// loopback or a management network.
    #[arg(long, value_name = "ADDR", env = "FERRY_METRICS")]
    metrics: Option<SocketAddr>,
    /// Log level: error, warn, info, debug, trace (or a tracing filter).
    #[arg(long, default_value = "info")]
    log_level: String,
}

#[derive(Clone, Copy, ValueEnum, Default)]
pub(crate) enum Format {
    #[default]
    Table,
    Json,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// List the members.
    List {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Show one member with its host facts.
    Show {
        name: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Remove a member from the cluster and revoke its certificate.
    Remove {
        name: String,
        /// Remove it even if it cannot be reached or still owns instances
        /// (they are marked lost; 'ferry delete' drops their records).
        #[arg(long)]
        force: bool,
    },
    /// Give a member no new instances (placement skips it).
    Cordon { name: String },
    /// Let placement use a cordoned member again.
    Uncordon { name: String },
    /// Move every instance off a member (cordoning it), a few at a time,
    /// each to a member placement picks; what cannot move is stopped with
    /// its state kept.
    Evacuate(hosts::EvacuateArgs),
    /// Uncordon a member and bring back what an evacuation took from it.
    Restore(hosts::RestoreArgs),
    /// Roll an upgrade across members, one at a time: evacuate it, run the
    /// hook there, wait for its agent, verify, restore; stop at the first
    /// failure.
    Upgrade(hosts::UpgradeArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a single-use join token for a new member NAME; prints the token.
    Create {
        name: String,
        /// Lifetime, e.g. 30m, 1h, 2d.
        #[arg(long, default_value = "1h", value_parser = output::parse_duration_secs)]
        ttl: u64,
    },
    /// List join tokens.
    List {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Revoke the join token for NAME.
    Revoke { name: String },
}

fn parse_voters(text: &str) -> Result<u8, String> {
    match text {
        "3" => Ok(3),
        "5" => Ok(5),
        _ => Err(format!("'{text}': a cluster keeps 3 or 5 voters")),
    }
}

/// The error and its causes on one line, skipping a cause whose text the
/// message before it already carries.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Parse the command line; a bad value is one line on stderr (the field's
/// convention), while help, version and usage mistakes print as clap does.
fn parse_args() -> Result<Cli, ExitCode> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if e.kind() == clap::error::ErrorKind::ValueValidation => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("error: bad argument");
            eprintln!("{first}");
            Err(ExitCode::from(2))
        }
        Err(e) => {
            let _ = e.print();
            Err(ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2)))
        }
    }
}

fn main() -> ExitCode {
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let Commands::Completions { shell } = cli.command {
        // Nothing to connect to: clap knows every command and flag.
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "ferry", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    if let Commands::Shim(args) = cli.command {
        // Plain blocking work, no runtime: it waits for processes and
        // copies the console to a file.
        let console = args.console.clone();
        let shim = ferry_agent::ShimArgs {
            console: args.console,
            console_max_bytes: args.console_max_bytes,
            exit_file: args.exit_file,
            pid_file: args.pid_file,
            timeout: Duration::from_millis(args.timeout_ms),
            runc: args.runc,
        };
        return match ferry_agent::run_shim(shim) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: container shim for {}: {e}", console.display());
                ExitCode::FAILURE
            }
        };
    }
    // One crypto provider for the whole process; the transport also passes
    // it explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Commands::Agent(args) => run_agent(cli.data_dir, args).await,
        Commands::Cluster(command) => {
            cluster(&connect(&cli.data_dir, cli.agent.as_deref())?, command).await
        }
        Commands::Instance(command) => {
            let code =
                instances::run(&connect(&cli.data_dir, cli.agent.as_deref())?, command).await?;
            if code != 0 {
                // `ferry exec` passes the command's exit status on.
                std::process::exit(code);
            }
            Ok(())
        }
        Commands::Move(args) => {
            jobs::run_move(&connect(&cli.data_dir, cli.agent.as_deref())?, args).await
        }
        Commands::Job(command) => {
            jobs::run_job(&connect(&cli.data_dir, cli.agent.as_deref())?, command).await
        }
        Commands::Network(command) => {
            network::run(&connect(&cli.data_dir, cli.agent.as_deref())?, command).await
        }
        Commands::Monitor(args) => {
            monitor::run(&connect(&cli.data_dir, cli.agent.as_deref())?, args).await
        }
        Commands::Shim(_) | Commands::Completions { .. } => Ok(()),
    }
}

fn connect(data_dir: &std::path::Path, agent: Option<&str>) -> Result<Client> {
    Ok(Client::connect(data_dir, agent)?)
}

async fn run_agent(data_dir: PathBuf, args: AgentArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(format!(
        // netlink-packet-route warns on every link it reads from a kernel
        // newer than it knows (more IPv6 settings than it expects).
        "{0},quinn=warn,openraft={0},netlink_packet_route=error",
        args.log_level
    ))
    .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log_level))
    .with_context(|| format!("bad --log-level '{}'", args.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    ferry_agent::run(AgentOptions {
        data_dir,
        listen: args.listen,
        name: args.name,
        bootstrap: args.bootstrap,
        join: args.join,
        voters: args.voters,
        cluster_subnet: args.cluster_subnet,
        job_history: args.job_history,
        snapshot_every: args.snapshot_every,
        gossip: ferry_agent::GossipConfig {
            probe_period: args.gossip_probe_period,
            suspicion: args.gossip_suspicion,
            ..Default::default()
        },
        heal_after: args.heal_after,
        job_phase_timeout: args.job_phase_timeout,
        console_log_max_bytes: args.console_log_max,
        runtime_timeout: args.runtime_timeout,
        disk_reserve_bytes: args.disk_reserve,
        evacuate_on_stop: args.evacuate_on_stop,
        stop_timeout: args.stop_timeout,
        metrics: args.metrics,
    })
    .await?;
    Ok(())
}

async fn cluster(client: &Client, command: ClusterCommand) -> Result<()> {
    match command {
        ClusterCommand::List { format } => {
            let ApiReply::Members(members) = client.call(ApiRequest::ClusterList).await? else {
                anyhow::bail!("the agent answered with an unexpected reply");
            };
            match format {
                Format::Json => output::print_json(&members),
                Format::Table => output::print_members(&members),
            }
        }
        ClusterCommand::Show { name, format } => {
            let ApiReply::Member(detail) = client.call(ApiRequest::ClusterShow { name }).await?
            else {
                anyhow::bail!("the agent answered with an unexpected reply");
            };
            match format {
                Format::Json => output::print_json(&output::member_json(&detail)),
                Format::Table => output::print_member_detail(&detail),
            }
        }
        ClusterCommand::Token(TokenCommand::Create { name, ttl }) => {
            let ApiReply::Token { token } = client
                .call(ApiRequest::TokenCreate {
                    name,
                    ttl_secs: ttl,
                })
                .await?
            else {
                anyhow::bail!("the agent answered with an unexpected reply");
            };
            println!("{token}");
            Ok(())
        }
        ClusterCommand::Token(TokenCommand::List { format }) => {
            let ApiReply::Tokens(tokens) = client.call(ApiRequest::TokenList).await? else {
                anyhow::bail!("the agent answered with an unexpected reply");
            };
            match format {
                Format::Json => output::print_json(&tokens),
                Format::Table => output::print_tokens(&tokens),
            }
        }
        ClusterCommand::Token(TokenCommand::Revoke { name }) => {
            client
                .call(ApiRequest::TokenRevoke { name: name.clone() })
                .await?;
            println!("revoked the join token for '{name}'");
            Ok(())
        }
        ClusterCommand::Remove { name, force } => {
            client
                .call(ApiRequest::Remove {
                    name: name.clone(),
                    force,
                })
                .await?;
            println!("removed member '{name}'");
            Ok(())
        }
        ClusterCommand::Cordon { name } => hosts::cordon(client, name, true).await,
        ClusterCommand::Uncordon { name } => hosts::cordon(client, name, false).await,
        ClusterCommand::Evacuate(args) => hosts::evacuate(client, args).await,
        ClusterCommand::Restore(args) => hosts::restore(client, args).await,
        ClusterCommand::Upgrade(args) => hosts::upgrade(client, args).await,
    }
}
