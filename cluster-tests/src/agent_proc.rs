//! One agent process of a test cluster: its data dir, its runc
//! containers as that agent's runc sees them, its address.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{anyhow, Context, Result};

use crate::kill_pending;

/// An agent process the harness started (or one that has exited).
pub struct AgentProc {
    pub name: String,
    pub data_dir: PathBuf,
    pub(crate) child: Option<Child>,
}

impl AgentProc {
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Containers this agent's runc knows, with their status; a migrated-in
    /// copy restored with every task held stopped counts as "held".
    pub fn containers(&self) -> Vec<(String, String)> {
        let held = |id: &str| {
            self.data_dir
                .join("instances")
                .join(id)
                .join("held")
                .exists()
        };
        let out = Command::new("runc")
            .arg("--root")
            .arg(self.data_dir.join("runc"))
            .args(["list", "--format", "json"])
            .output();
        let Ok(out) = out else { return Vec::new() };
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        list.iter()
            .map(|c| {
                let id = c["id"].as_str().unwrap_or_default().to_string();
                let pid = c["pid"].as_u64().unwrap_or(0);
                let status = match c["status"].as_str().unwrap_or_default() {
                    "running" if held(&id) => "held".to_string(),
                    "running" if kill_pending(pid) => "dying".to_string(),
                    other => other.to_string(),
                };
                (id, status)
            })
            .collect()
    }

    /// The host pid of container `id`'s first process, while it runs.
    pub fn container_pid(&self, id: &str) -> Option<u32> {
        let out = Command::new("runc")
            .arg("--root")
            .arg(self.data_dir.join("runc"))
            .args(["state", id])
            .output()
            .ok()?;
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let pid = u32::try_from(state["pid"].as_u64()?).ok()?;
        (state["status"] == "running" && pid > 0).then_some(pid)
    }

    /// This agent's staging area of a move of container `id`, if it has
    /// one: in memory (`/dev/shm/<cgroup parent>/<id>`, the parent named
    /// as the agent names it) or on disk (`instances/<id>/migration`).
    pub fn staging(&self, id: &str) -> Option<PathBuf> {
        let dir = std::fs::canonicalize(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone());
        let digest = ferry_transport::pki::sha256_hex(dir.to_string_lossy().as_bytes());
        let parent = format!("ferry-{}-{}", self.name, &digest[..8]);
        let memory = Path::new("/dev/shm").join(parent).join(id);
        let disk = self.data_dir.join("instances").join(id).join("migration");
        [memory, disk].into_iter().find(|d| d.exists())
    }

    /// runc's status of container `id` on this agent ("paused" while frozen).
    pub fn container_status(&self, id: &str) -> Option<String> {
        self.containers()
            .into_iter()
            .find(|(c, _)| c == id)
            .map(|(_, status)| status)
    }

    pub fn log_path(&self) -> PathBuf {
        self.data_dir.with_extension("log")
    }

    /// The address the agent serves on, from its data dir.
    pub fn addr(&self) -> Result<String> {
        let text = std::fs::read_to_string(self.data_dir.join("api.json"))
            .with_context(|| format!("agent {} has no api.json", self.name))?;
        let value: serde_json::Value = serde_json::from_str(&text)?;
        value["address"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("api.json of {} has no address", self.name))
    }

    /// The UDP port every QUIC byte of this agent goes through.
    pub fn port(&self) -> Result<u16> {
        let addr: std::net::SocketAddr = self.addr()?.parse()?;
        Ok(addr.port())
    }
}
