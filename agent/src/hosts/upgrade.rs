//! Rolling upgrades, the effects: the leader takes `rolling::next`'s
//! steps (preflight included); each member's agent runs the hook when its
//! stage is `Hook`, detached so it may restart the agent or reboot the
//! host, and reports when it is back: facts re-probed and their diff
//! recorded, CRIU and `--verify` checked.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_raft::{Command, HostJob, HostJobCommand, NodeId, Stage, Upgrade, UpgradeMember};

use super::rolling;
use crate::api::{ApiError, ErrorKind};
use crate::clock::now_ms;
use crate::node::Agent;
use crate::placement;

/// `--verify` must end within this.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(300);
/// Lines of a hook's or verification's output kept in the job.
const OUTPUT_LINES: usize = 5;

/// The leader's part: the steps of the running upgrade.
pub async fn lead(agent: &Agent, job: &HostJob, upgrade: &Upgrade) -> Result<(), ApiError> {
    let steps = agent.state().read(|s| {
        let mut preflight = |member| preflight(agent, member);
        rolling::next(job, upgrade, s, &mut preflight, &|m| agent.member_alive(m))
    });
    for step in steps {
        let cmd = step.command(job.id, now_ms());
        super::commit(agent, cmd).await?;
    }
    Ok(())
}

/// A member may go down only if the cluster keeps its quorum without it
/// and every instance there that should move has a member to go to.
pub fn preflight(agent: &Agent, member: NodeId) -> Result<(), String> {
    let name = agent
        .member_name(member)
        .unwrap_or_else(|| format!("node-{member}"));
    super::keeps_quorum(agent, member, &name).map_err(|e| e.to_string())?;
    let members = agent.placement_members();
    agent.state().read(|s| {
        for inst in s.instances.values().filter(|i| i.owner == member) {
            let moves = inst.desired == ferry_raft::DesiredState::Running
                && !matches!(
                    inst.spec.evacuate,
                    ferry_raft::EvacuatePolicy::Stop | ferry_raft::EvacuatePolicy::Stay
                );
            if !moves {
                continue;
            }
            let running = inst.observed == ferry_raft::ObservedState::Running;
            let ask = placement::Ask::existing(s, inst, running);
            placement::choose(&members, &ask).map_err(|why| format!("{}: {why}", inst.name))?;
        }
        Ok(())
    })
}

/// Where this agent keeps what it knows of its hook run for one attempt.
fn hook_dir(agent: &Agent, job: u64, attempt: u32) -> PathBuf {
    agent
        .data_dir()
        .root()
        .join("upgrade")
        .join(format!("job-{job}-{attempt}"))
}

/// The member's part: run the hook, or report how it went.
pub async fn take_part(agent: &Agent, job: &HostJob, upgrade: &Upgrade) -> Result<(), ApiError> {
    let Some(me) = upgrade
        .member(agent.id())
        .filter(|m| m.stage == Stage::Hook)
    else {
        return Ok(());
    };
    let dir = hook_dir(agent, job.id, me.attempt);
    let status = std::fs::read_to_string(dir.join("status")).ok();
    let outcome = match status.as_deref().map(str::trim) {
        Some("0") => Ok(()),
        Some(code) => Err(format!(
            "the hook exited with code {code}: {}",
            tail(&dir.join("hook.log"))
        )),
        None if !dir.join("started").exists() => {
            return start_hook(agent, job, upgrade, &dir).await
        }
        None => match hook_gone(&dir) {
            Some(rebooted) if rebooted => Ok(()),
            Some(_) => Err("the hook ended without recording its exit status".into()),
            None => return Ok(()),
        },
    };
    let (to, detail, diff) = match outcome {
        Ok(()) => match verify(agent, me, upgrade).await {
            Ok((detail, diff)) => (Stage::Verified, detail, Some(diff)),
            Err(why) => (Stage::Failed, why, None),
        },
        Err(why) => (Stage::Failed, why, None),
    };
    let cmd = HostJobCommand::UpgradeStage {
        id: job.id,
        member: agent.id(),
        from: Stage::Hook,
        to,
        detail: Some(detail),
        diff,
        now_ms: now_ms(),
    };
    super::commit(agent, cmd).await.map(|_| ())
}

/// Start the hook detached (its own process group: it outlives this agent
/// if it restarts it); its output and exit status go to files in `dir`.
async fn start_hook(
    agent: &Agent,
    job: &HostJob,
    upgrade: &Upgrade,
    dir: &Path,
) -> Result<(), ApiError> {
    let io = |e: std::io::Error| {
        ApiError::new(
            ErrorKind::Internal,
            format!("cannot run the upgrade hook in {}: {e}", dir.display()),
        )
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let script = dir.join("hook.sh");
    std::fs::write(&script, &upgrade.hook).map_err(io)?;
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(r#"sh "$1" >"$2" 2>&1; echo $? >"$3.tmp"; mv "$3.tmp" "$3""#)
        .arg("ferry-upgrade-hook")
        .arg(&script)
        .arg(dir.join("hook.log"))
        .arg(dir.join("status"))
        .env("FERRY_UPGRADE_JOB", job.id.to_string())
        .env("FERRY_MEMBER", agent.name())
        .env("FERRY_DATA_DIR", agent.data_dir().root())
        .env("FERRY_AGENT_PID", std::process::id().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(io)?;
    let pid = child.id().unwrap_or(0);
    std::fs::write(dir.join("started"), format!("{}\n{pid}\n", boot_id())).map_err(io)?;
    tracing::info!(job = job.id, pid, "running the upgrade hook");
    Ok(())
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `None` while the hook still runs; else whether the host rebooted under
/// it (which is how a rebooting hook ends).
fn hook_gone(dir: &Path) -> Option<bool> {
    let started = std::fs::read_to_string(dir.join("started")).unwrap_or_default();
    let mut lines = started.lines();
    let (boot, pid) = (
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
    );
    if boot != boot_id() {
        return Some(true);
    }
    let alive = !pid.is_empty() && Path::new("/proc").join(pid).exists();
    (!alive).then_some(false)
}

/// The last lines of `path`.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(OUTPUT_LINES).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// After a good hook: publish fresh facts, record their diff, check that
/// CRIU still works and run `--verify`.
async fn verify(
    agent: &Agent,
    me: &UpgradeMember,
    upgrade: &Upgrade,
) -> Result<(String, Vec<String>), String> {
    let facts = agent.probe_facts().await;
    let publish = Command::UpdateFacts {
        id: agent.id(),
        facts: facts.clone(),
    };
    agent
        .write(publish)
        .await
        .map_err(|e| format!("cannot publish the new facts: {e}"))?;
    let diff = me
        .facts_before
        .as_ref()
        .map(|before| rolling::facts_diff(before, &facts))
        .unwrap_or_default();
    if facts.runtimes.criu.is_some() && !facts.runtimes.criu_check {
        return Err("'criu check' fails after the hook".into());
    }
    let Some(command) = &upgrade.verify else {
        return Ok(("the hook ended well".into(), diff));
    };
    let run = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(VERIFY_TIMEOUT, run).await {
        Ok(Ok(out)) if out.status.success() => {
            Ok(("the hook ended well; --verify passed".into(), diff))
        }
        Ok(Ok(out)) => {
            let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
            Err(format!("--verify failed ({}): {text}", out.status))
        }
        Ok(Err(e)) => Err(format!("cannot run --verify: {e}")),
        Err(_) => Err(format!(
            "--verify did not end within {}s",
            VERIFY_TIMEOUT.as_secs()
        )),
    }
}
