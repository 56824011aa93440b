//! Real clusters of `ferry agent` processes on loopback, each with its own
//! data dir, for integration tests and benchmarks.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

mod agent_proc;
pub mod btrfs;
pub mod echo;
pub mod faults;
pub mod figures;
pub mod image;
mod members;
pub mod netns;
pub mod partition;
pub mod saturate;
pub mod vm;
mod workload;

pub use agent_proc::AgentProc;
pub use workload::{busybox_rootfs, dirtying_workload, pseudo_random, Sampler, COUNTER};

/// The `ferry` binary under test: `$FERRY_BIN`, else the one cargo built
/// next to this test executable.
pub fn ferry_bin() -> PathBuf {
    if let Ok(path) = std::env::var("FERRY_BIN") {
        return PathBuf::from(path);
    }
    // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let beside = dir.join("ferry");
    if beside.exists() || dir.file_name() != Some("deps".as_ref()) {
        return beside;
    }
    dir.parent().map(|p| p.join("ferry")).unwrap_or(beside)
}

/// Whether runc and CRIU (>= 4, `criu check` passing) are usable as root.
/// Under CI (`CI=true`) a missing prerequisite fails the test; elsewhere the
/// test is skipped with the reason printed.
pub fn require_container_runtime() -> bool {
    require("container tests", container_runtime_missing())
}

/// Whether real partitions can be made: root and a working iptables.
/// Same CI rule as [`require_container_runtime`].
pub fn require_partition_tools() -> bool {
    let missing = if !is_root() {
        Some("root".to_string())
    } else if !Command::new("iptables")
        .args(["-w", "-S", "INPUT"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        Some("a working iptables".to_string())
    } else {
        None
    };
    require("partition tests", missing)
}

/// Whether `tool` runs (`tool --version` succeeds). Same CI rule as
/// [`require_container_runtime`].
pub fn require_tool(what: &str, tool: &str) -> bool {
    let runs = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    require(what, (!runs).then(|| tool.to_string()))
}

fn require(what: &str, missing: Option<String>) -> bool {
    match missing {
        None => true,
        Some(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{what} need {reason} (run scripts/install-deps.sh as root)")
        }
        Some(reason) => {
            eprintln!("SKIPPED: {what} need {reason} (run scripts/install-deps.sh as root)");
            false
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn container_runtime_missing() -> Option<String> {
    let run = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    if !is_root() {
        return Some("root".into());
    }
    if run("runc", &["--version"]).is_none() {
        return Some("runc".into());
    }
    let criu = run("criu", &["--version"]).unwrap_or_default();
    let major = criu
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok())
        .unwrap_or(0);
    if major < 4 {
        return Some("CRIU >= 4".into());
    }
    if run("criu", &["check"]).is_none() {
        return Some("a passing 'criu check'".into());
    }
    None
}

/// Whether `pid` is dying: SIGKILL pending (such a process never runs user
/// code again; runc thaws a frozen container to let it die), already
/// exiting, or gone since runc listed it.
fn kill_pending(pid: u64) -> bool {
    // Gone since runc listed it (it died just now): not running.
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    let pending = status
        .lines()
        .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .any(|mask| mask & (1 << 8) != 0);
    pending || exiting(pid)
}

/// Copy every agent's log to /tmp/ferry-sampler-<pid>/ (the cluster's own
/// directory goes when the test ends).
fn keep_logs(dirs: &[PathBuf]) {
    let keep = std::env::temp_dir().join(format!("ferry-sampler-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&keep);
    for dir in dirs {
        let log = dir.with_extension("log");
        if let Some(name) = log.file_name() {
            let _ = std::fs::copy(&log, keep.join(name));
        }
    }
    eprintln!("sampler: agent logs kept in {}", keep.display());
}

/// What a sampler says of one running copy: where, its pid, and the
/// kernel's view of that task (state, pending signals, parent).
fn copy_detail(data_dir: &Path, instance: &str) -> String {
    let agent = AgentProc {
        name: String::new(),
        data_dir: data_dir.to_path_buf(),
        child: None,
    };
    let pid = agent.container_pid(instance).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let keys = ["State:", "SigPnd:", "ShdPnd:", "PPid:"];
    let wanted: Vec<&str> = status
        .lines()
        .filter(|l| keys.iter().any(|k| l.starts_with(k)))
        .collect();
    let held = data_dir
        .join("instances")
        .join(instance)
        .join("held")
        .exists();
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!(
        "{} pid {pid} held-marker {held} at {at} ms: {}",
        data_dir.display(),
        wanted.join(", ")
    )
}

/// Whether `pid` is on its way out (the kernel's PF_EXITING flag): it took
/// its SIGKILL and runs no more user code, though runc still calls it
/// running until it is a zombie.
fn exiting(pid: u64) -> bool {
    const PF_EXITING: u64 = 0x4;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After "pid (comm)": state is field 3, flags field 9.
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    after_comm
        .split_whitespace()
        .nth(6)
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_EXITING != 0)
}

/// Run a host tool the harness needs (iptables, mount); its stderr in the
/// error when it fails.
pub fn run_tool(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program} (install it with scripts/install-deps.sh)"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The cluster CA with its key, from the data dir of a voter (a test that
/// mints certificates plays a member gone rogue).
pub fn voter_ca(data_dir: &Path) -> Result<ferry_transport::pki::ClusterCa> {
    let (cert, key) = ferry_agent::datadir::DataDir::new(data_dir).load_ca()?;
    let key = key.with_context(|| format!("{} holds no CA key", data_dir.display()))?;
    Ok(ferry_transport::pki::ClusterCa::from_pem(&cert, &key)?)
}

/// Poll `check` until it yields a value or `timeout` passes; the error
/// names what was awaited and the last reason it was not there yet.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => {
                bail!("timed out after {timeout:?} waiting for {what}: {e:#}")
            }
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(250));
            }
        }
    }
}

/// A cluster of agent processes in one temp dir; every process is killed
/// when it is dropped.
pub struct Cluster {
    root: tempfile::TempDir,
    pub agents: Vec<AgentProc>,
    /// Extra `ferry agent` flags for every start of every agent.
    pub agent_flags: Vec<String>,
    /// Extra environment for every agent.
    pub agent_env: Vec<(String, String)>,
    /// Extra environment for the agent of this name only.
    pub env_for: std::collections::HashMap<String, Vec<(String, String)>>,
    /// When set, agent i (and the CLI run against it) runs in member i's
    /// network namespace and serves on its underlay address.
    pub underlay: Option<netns::Underlay>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Cluster {
    pub fn new() -> Self {
        let bin = ferry_bin();
        assert!(
            bin.exists(),
            "{} not found: build it first with 'cargo build --bin ferry' (or set FERRY_BIN)",
            bin.display()
        );
        Cluster {
            root: tempfile::Builder::new()
                .prefix("ferry-cluster-")
                .tempdir()
                .expect("create temp dir"),
            agents: Vec::new(),
            agent_flags: Vec::new(),
            agent_env: Vec::new(),
            env_for: std::collections::HashMap::new(),
            underlay: None,
        }
    }

    /// A cluster whose first `members` agents each stand for a host of
    /// their own (see `netns`).
    pub fn with_underlay(members: usize) -> Result<Self> {
        let mut cluster = Cluster::new();
        cluster.underlay = Some(netns::Underlay::new(members)?);
        Ok(cluster)
    }

    /// Where the next agent serves.
    fn listen_for(&self, index: usize) -> String {
        match &self.underlay {
            Some(u) if index < u.len() => format!("{}:0", u.address(index)),
            _ => "127.0.0.1:0".into(),
        }
    }

    /// `program` for agent `index`: in its namespace when it has one.
    pub fn command_for(&self, index: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.underlay {
            Some(u) if index < u.len() => u.command(index, program),
            _ => Command::new(program),
        }
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// n1 (bootstrapped, the leader), n2 and n3 joined through it, every
    /// member's facts and gossip load figures in, so moves can be checked.
    pub fn start_three(&mut self) -> Result<()> {
        self.start_three_with(&[])
    }

    /// As [`Cluster::start_three`], with extra bootstrap flags (e.g.
    /// `--cluster-subnet`).
    pub fn start_three_with(&mut self, bootstrap_flags: &[&str]) -> Result<()> {
        let converge = Duration::from_secs(30);
        self.bootstrap_with("n1", 3, bootstrap_flags)?;
        self.join("n2", 0)?;
        self.join("n3", 0)?;
        self.wait_converged(&["n1", "n2", "n3"], converge)?;
        for name in ["n1", "n2", "n3"] {
            wait_for(&format!("facts of {name}"), converge, || {
                let show = self.ferry_json(0, &["cluster", "show", name])?;
                if show["facts"].is_null() || show["load"].is_null() {
                    bail!("no facts yet")
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Start the first member; returns its index.
    pub fn bootstrap(&mut self, name: &str, voters: u8) -> Result<usize> {
        self.bootstrap_with(name, voters, &[])
    }

    pub fn bootstrap_with(&mut self, name: &str, voters: u8, extra: &[&str]) -> Result<usize> {
        let data_dir = self.root.path().join(name);
        let voters = voters.to_string();
        let listen = self.listen_for(self.agents.len());
        let mut args = vec![
            "--listen",
            &listen,
            "--name",
            name,
            "--bootstrap",
            "--voters",
            &voters,
        ];
        args.extend(extra);
        self.spawn_new(name, data_dir, &args)
    }

    /// Create a token on member `via` and start a new member with it.
    pub fn join(&mut self, name: &str, via: usize) -> Result<usize> {
        let token = self.token(via, name, "1h")?;
        self.join_with_token(name, &token)
    }

    pub fn join_with_token(&mut self, name: &str, token: &str) -> Result<usize> {
        let data_dir = self.root.path().join(name);
        let listen = self.listen_for(self.agents.len());
        self.spawn_new(
            name,
            data_dir,
            &["--listen", &listen, "--name", name, "--join", token],
        )
    }

    pub fn token(&self, via: usize, name: &str, ttl: &str) -> Result<String> {
        let out = self.ferry_ok(via, &["cluster", "token", "create", name, "--ttl", ttl])?;
        Ok(out.trim().to_string())
    }

    fn spawn_new(&mut self, name: &str, data_dir: PathBuf, args: &[&str]) -> Result<usize> {
        let agent = AgentProc {
            name: name.to_string(),
            data_dir,
            child: None,
        };
        self.agents.push(agent);
        let index = self.agents.len() - 1;
        self.spawn(index, args)?;
        Ok(index)
    }

    /// Run `ferry agent` for member `index` and wait for its ready line.
    fn spawn(&mut self, index: usize, extra: &[&str]) -> Result<()> {
        let agent = &self.agents[index];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(agent.log_path())?;
        let mut child = self
            .command_for(index, ferry_bin())
            .arg("--data-dir")
            .arg(&agent.data_dir)
            .arg("agent")
            // FERRY_TEST_LOG (e.g. "info,openraft=debug") to look closer.
            .arg("--log-level")
            .arg(std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .args(&self.agent_flags)
            .args(extra)
            .envs(self.agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(
                self.env_for
                    .get(&agent.name)
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawn ferry agent")?;
        let stdout = child.stdout.take().context("agent stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(" ready on ") {
                    let _ = tx.send(());
                }
            }
        });
        let name = agent.name.clone();
        // A joiner waits up to 45 s for its join (three write deadlines).
        let ready = rx.recv_timeout(Duration::from_secs(60));
        if ready.is_err() {
            let status = child.try_wait().ok().flatten();
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "agent {name} did not get ready (exit: {status:?}); log:\n{}",
                self.log_tail(index)
            );
        }
        self.agents[index].child = Some(child);
        Ok(())
    }

    /// Start an agent again from its data dir alone.
    pub fn restart(&mut self, index: usize) -> Result<()> {
        if self.agents[index].is_running() {
            bail!("agent {} is still running", self.agents[index].name);
        }
        self.spawn(index, &[])
    }

    /// Start again every agent that exited on its own (as a service
    /// manager would, e.g. after an upgrade hook stopped it); returns
    /// their indexes.
    pub fn restart_exited(&mut self) -> Result<Vec<usize>> {
        let mut restarted = Vec::new();
        for index in 0..self.agents.len() {
            let exited = match self.agents[index].child.as_mut() {
                Some(child) => child.try_wait()?.is_some(),
                None => false,
            };
            if exited {
                self.agents[index].child = None;
                self.spawn(index, &[])?;
                restarted.push(index);
            }
        }
        Ok(restarted)
    }

    /// `kill -9`.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.agents[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Wait for an agent to exit on its own; returns its exit code.
    pub fn wait_exit(&mut self, index: usize, timeout: Duration) -> Result<Option<i32>> {
        let name = self.agents[index].name.clone();
        let child = self.agents[index]
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("agent {name} is not running"))?;
        let status = wait_for(&format!("agent {name} to exit"), timeout, || {
            child.try_wait()?.ok_or_else(|| anyhow!("still running"))
        })?;
        self.agents[index].child = None;
        Ok(status.code())
    }

    pub fn log_tail(&self, index: usize) -> String {
        let text = std::fs::read_to_string(self.agents[index].log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Run the CLI against member `index`.
    pub fn ferry(&self, index: usize, args: &[&str]) -> Output {
        self.command_for(index, ferry_bin())
            .arg("--data-dir")
            .arg(&self.agents[index].data_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ferry")
    }

    /// Run the CLI and require success; returns stdout.
    pub fn ferry_ok(&self, index: usize, args: &[&str]) -> Result<String> {
        let out = self.ferry(index, args);
        if !out.status.success() {
            bail!(
                "ferry {} on {} failed: {}",
                args.join(" "),
                self.agents[index].name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Run the CLI, require failure, return its stderr.
    pub fn ferry_err(&self, index: usize, args: &[&str]) -> Result<String> {
        let out = self.ferry(index, args);
        if out.status.success() {
            bail!(
                "ferry {} on {} succeeded but should have failed",
                args.join(" "),
                self.agents[index].name
            );
        }
        Ok(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }

    pub fn ferry_json(&self, index: usize, args: &[&str]) -> Result<serde_json::Value> {
        let mut args = args.to_vec();
        args.extend(["--format", "json"]);
        let text = self.ferry_ok(index, &args)?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Mount points under `root`, deepest first (from /proc/mounts, whose
/// octal escapes of spaces a test's paths never hold).
fn mounts_under(root: &Path) -> Vec<String> {
    let root = root.to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut under: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|at| at.starts_with(&format!("{root}/")))
        .map(str::to_string)
        .collect();
    under.sort_by_key(|at| std::cmp::Reverse(at.len()));
    under
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.agents.len() {
            self.kill(i);
        }
        // No container outlives its test.
        let remove_empty_parents = || {
            let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else {
                return;
            };
            for controller in controllers.flatten() {
                let Ok(groups) = std::fs::read_dir(controller.path()) else {
                    continue;
                };
                for group in groups.flatten() {
                    if group.file_name().to_string_lossy().starts_with("ferry-") {
                        // Fails, harmlessly, for a cgroup still in use.
                        let _ = std::fs::remove_dir(group.path());
                    }
                }
            }
        };
        for agent in &self.agents {
            vm::kill_vms(&agent.data_dir);
            for (id, _) in agent.containers() {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(agent.data_dir.join("runc"))
                    .args(["delete", "--force", &id])
                    .output();
            }
        }
        remove_empty_parents();
        // Instance network namespaces (bind mounts) and layered rootfs
        // (overlayfs) are mounted under the data dirs.
        for at in mounts_under(self.root.path()) {
            let _ = Command::new("umount").arg("-l").arg(at).output();
        }
        if std::env::var_os("FERRY_KEEP_TEST_DIRS").is_some() {
            let root = self.root.path().to_path_buf();
            let kept = std::mem::replace(
                &mut self.root,
                tempfile::tempdir().expect("create temp dir"),
            );
            let _ = kept.keep();
            eprintln!("kept test dir {}", root.display());
        }
        if std::thread::panicking() {
            for (i, agent) in self.agents.iter().enumerate() {
                eprintln!("---- log of {} ----\n{}", agent.name, self.log_tail(i));
            }
        }
    }
}
