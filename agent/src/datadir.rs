//! The agent's data directory: identity, credentials, Raft storage and the
//! file the CLI reads to find its agent. Every file is written atomically
//! (temp file, fsync, rename) so a crash never leaves half a file.

use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_raft::NodeId;
use ferry_transport::pki::{ClusterCa, Credentials};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {reason}")]
pub struct DataDirError {
    pub op: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

/// Who this agent is; written once the agent has an identity in a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    pub id: NodeId,
    pub name: String,
    /// The address other members reach this agent on.
    pub addr: String,
    /// This agent created the cluster (it initialises Raft once).
    pub bootstrap: bool,
    /// Voter count requested at bootstrap.
    pub voters: u8,
    /// Hex serial of this member's node certificate.
    pub cert_serial: String,
}

/// What the CLI needs to reach the agent of this data dir.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiInfo {
    pub address: String,
    pub name: String,
}

#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where moves keep the btrfs snapshots (source) and received
    /// subvolumes (target) of their rootfs passes, one directory per job,
    /// on the instances' filesystem (a snapshot cannot leave it).
    pub fn btrfs_moves(&self) -> PathBuf {
        self.root.join("btrfs-moves")
    }

    pub fn raft_db(&self) -> PathBuf {
        self.root.join("raft.redb")
    }

    fn tls(&self, file: &str) -> PathBuf {
        self.root.join("tls").join(file)
    }

    pub fn create(&self) -> Result<(), DataDirError> {
        std::fs::create_dir_all(self.root.join("tls")).map_err(|e| err("create", &self.root, e))
    }

    pub fn node_config(&self) -> Result<Option<NodeConfig>, DataDirError> {
        read_json_opt(&self.root.join("node.json"))
    }

    pub fn save_node_config(&self, config: &NodeConfig) -> Result<(), DataDirError> {
        write_json(&self.root.join("node.json"), config, false)
    }

    pub fn api_info(&self) -> Result<Option<ApiInfo>, DataDirError> {
        read_json_opt(&self.root.join("api.json"))
    }

    pub fn save_api_info(&self, info: &ApiInfo) -> Result<(), DataDirError> {
        write_json(&self.root.join("api.json"), info, false)
    }

    pub fn save_ca(&self, ca: &ClusterCa) -> Result<(), DataDirError> {
        self.save_ca_cert(ca.cert_pem())?;
        self.save_ca_key(ca.key_pem())
    }

    /// The CA certificate (every member) and its key, which only voters
    /// keep (`None` when this member holds none).
    pub fn load_ca(&self) -> Result<(String, Option<String>), DataDirError> {
        let cert = read_string(&self.tls("ca.pem"))?;
        let key_path = self.tls("ca.key");
        match std::fs::read_to_string(&key_path) {
            Ok(key) => Ok((cert, Some(key))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((cert, None)),
            Err(e) => Err(err("read", &key_path, e)),
        }
    }

    pub fn save_ca_cert(&self, cert_pem: &str) -> Result<(), DataDirError> {
        write_file(&self.tls("ca.pem"), cert_pem.as_bytes(), false)
    }

    pub fn save_ca_key(&self, key_pem: &str) -> Result<(), DataDirError> {
        write_file(&self.tls("ca.key"), key_pem.as_bytes(), true)
    }

    /// Forget the CA key (this member is no longer a voter); absent is fine.
    pub fn remove_ca_key(&self) -> Result<(), DataDirError> {
        let path = self.tls("ca.key");
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err("remove", &path, e)),
        }
    }

    /// `which` is "node" or "admin".
    pub fn save_credentials(&self, which: &str, creds: &Credentials) -> Result<(), DataDirError> {
        write_file(
            &self.tls(&format!("{which}.pem")),
            creds.cert_pem.as_bytes(),
            false,
        )?;
        write_file(
            &self.tls(&format!("{which}.key")),
            creds.key_pem.as_bytes(),
            true,
        )
    }

    pub fn load_credentials(&self, which: &str) -> Result<Credentials, DataDirError> {
        Ok(Credentials {
            cert_pem: read_string(&self.tls(&format!("{which}.pem")))?,
            key_pem: read_string(&self.tls(&format!("{which}.key")))?,
            ca_pem: read_string(&self.tls("ca.pem"))?,
        })
    }
}

fn err(op: &'static str, path: &Path, reason: impl ToString) -> DataDirError {
    DataDirError {
        op,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_string(path: &Path) -> Result<String, DataDirError> {
    std::fs::read_to_string(path).map_err(|e| err("read", path, e))
}

fn read_json_opt<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, DataDirError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| err("parse", path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err("read", path, e)),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T, secret: bool) -> Result<(), DataDirError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| err("encode", path, e))?;
    write_file(path, &bytes, secret)
}

/// Atomic, durable write; `secret` files are readable by the owner only.
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), DataDirError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| err("create", dir, e))?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(|e| err("create", &tmp, e))?;
    file.write_all(bytes).map_err(|e| err("write", &tmp, e))?;
    file.sync_all().map_err(|e| err("sync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| err("rename", path, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_config_survives_a_round_trip_and_absence_is_not_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        assert_eq!(dir.node_config().unwrap(), None);
        let config = NodeConfig {
            id: 3,
            name: "n3".into(),
            addr: "127.0.0.1:7003".into(),
            bootstrap: false,
            voters: 3,
            cert_serial: "0a".into(),
        };
        dir.save_node_config(&config).unwrap();
        assert_eq!(dir.node_config().unwrap(), Some(config));
    }
}
