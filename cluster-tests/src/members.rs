//! The cluster's members as a member sees them: `cluster list`,
//! convergence, gossip liveness, voters and roles.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::{wait_for, Cluster};

impl Cluster {
    /// `cluster list` as seen by member `index`.
    pub fn members(&self, index: usize) -> Result<Vec<serde_json::Value>> {
        match self.ferry_json(index, &["cluster", "list"])? {
            serde_json::Value::Array(members) => Ok(members),
            other => bail!("cluster list is not an array: {other}"),
        }
    }

    /// Wait until every running agent lists exactly `names`, all alive, with
    /// one agreed leader among them; returns the leader's name.
    pub fn wait_converged(&self, names: &[&str], timeout: Duration) -> Result<String> {
        let mut expected: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        expected.sort();
        wait_for("the members to agree", timeout, || {
            let mut leaders = std::collections::BTreeSet::new();
            for (i, agent) in self.agents.iter().enumerate() {
                if !agent.is_running() {
                    continue;
                }
                let members = self.members(i)?;
                let mut seen: Vec<String> = members
                    .iter()
                    .filter_map(|m| m["name"].as_str().map(str::to_string))
                    .collect();
                seen.sort();
                if seen != expected {
                    bail!("{} sees {seen:?}", agent.name);
                }
                let leader: Vec<&str> = members
                    .iter()
                    .filter(|m| m["leader"] == true)
                    .filter_map(|m| m["name"].as_str())
                    .collect();
                if leader.len() != 1 {
                    bail!("{} sees leaders {leader:?}", agent.name);
                }
                leaders.insert(leader[0].to_string());
                if let Some(m) = members.iter().find(|m| m["liveness"] != "alive") {
                    bail!("{} sees {} not alive", agent.name, m["name"]);
                }
            }
            match leaders.len() {
                1 => Ok(leaders.into_iter().next().unwrap_or_default()),
                _ => bail!("agents disagree on the leader: {leaders:?}"),
            }
        })
    }

    /// Gossip liveness of member `name` as member `index` sees it.
    pub fn liveness(&self, index: usize, name: &str) -> Result<String> {
        let members = self.members(index)?;
        members
            .iter()
            .find(|m| m["name"] == name)
            .and_then(|m| m["liveness"].as_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{} does not list {name}", self.agents[index].name))
    }

    /// Wait until every running agent other than `name` itself reports
    /// `name` as `want`; returns how long that took.
    pub fn wait_liveness(&self, name: &str, want: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        wait_for(&format!("{name} {want} everywhere"), timeout, || {
            for (i, agent) in self.agents.iter().enumerate() {
                if !agent.is_running() || agent.name == name {
                    continue;
                }
                let seen = self.liveness(i, name)?;
                if seen != want {
                    bail!("{} sees {name} {seen}", agent.name);
                }
            }
            Ok(())
        })?;
        Ok(start.elapsed())
    }

    /// Names of the voters as member `index` sees them.
    pub fn voters(&self, index: usize) -> Result<Vec<String>> {
        Ok(self
            .roles(index)?
            .into_iter()
            .filter(|(_, role)| role == "voter")
            .map(|(name, _)| name)
            .collect())
    }

    /// Wait until member `index` sees `count` voters.
    pub fn wait_voters(
        &self,
        index: usize,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        wait_for(&format!("{count} voters"), timeout, || {
            let voters = self.voters(index)?;
            if voters.len() == count {
                Ok(voters)
            } else {
                bail!("voters {voters:?}")
            }
        })
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.agents.iter().position(|a| a.name == name)
    }

    /// Roles by member name as member `index` sees them.
    pub fn roles(&self, index: usize) -> Result<std::collections::BTreeMap<String, String>> {
        Ok(self
            .members(index)?
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_string(),
                    m["role"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }
}
