//! An instance's place on its owner: the OCI bundle (config.json written
//! with oci-spec, rootfs), console and runc logs, checkpoint images.

use std::path::{Path, PathBuf};

use crate::api::names::{InstanceName, SnapshotName};
use oci_spec::runtime::{
    LinuxMemoryBuilder, LinuxResourcesBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

/// The environment of a process whose image gives none.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{op} {path}: {reason}")]
    Io {
        op: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot write config.json: {0}")]
    Spec(String),
    #[error("rootfs {path} is neither a directory nor a readable tar archive; pass a directory or a .tar file to --rootfs")]
    BadRootfs { path: PathBuf },
}

/// Files of one instance under `<data-dir>/instances/<name>`.
#[derive(Clone, Debug)]
pub struct InstanceDir {
    root: PathBuf,
}

impl InstanceDir {
    pub fn new(data_dir: &Path, name: &InstanceName) -> Self {
        InstanceDir {
            root: data_dir.join("instances").join(name.as_str()),
        }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn bundle(&self) -> PathBuf {
        self.root.join("bundle")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.bundle().join("rootfs")
    }
    pub fn runc_log(&self) -> PathBuf {
        self.root.join("runc.log")
    }
    /// Images of the last stateful stop.
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint")
    }
    pub fn criu_work(&self) -> PathBuf {
        self.root.join("criu-work")
    }
    /// Where a migration keeps CRIU images and work files.
    pub fn migration(&self) -> PathBuf {
        self.root.join("migration")
    }
    /// Present while a migrated-in copy is restored with its tasks held.
    pub fn held_marker(&self) -> PathBuf {
        self.root.join("held")
    }
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    pub fn snapshot(&self, snap: &SnapshotName) -> PathBuf {
        self.snapshots().join(snap.as_str())
    }
    /// Present when the rootfs lies on an image: the image's id.
    pub fn image_marker(&self) -> PathBuf {
        self.root.join("image")
    }
    /// A layered instance's own changes (overlayfs upper dir).
    pub fn upper(&self) -> PathBuf {
        self.root.join("upper")
    }
    /// overlayfs's work dir, beside the upper dir (same filesystem).
    pub fn overlay_work(&self) -> PathBuf {
        self.root.join("overlay-work")
    }
}

fn io_err(op: &'static str, path: &Path, e: impl ToString) -> BundleError {
    BundleError::Io {
        op,
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// What config.json says: the command, limits, and where the container
/// sits in the cgroup tree (per agent, so agents on one host never share).
pub struct BundleConfig<'a> {
    pub name: &'a str,
    pub command: &'a [String],
    /// `NAME=value`; empty: a `PATH` alone.
    pub env: &'a [String],
    /// Empty: `/`.
    pub cwd: &'a str,
    /// uid and gid; `None`: root.
    pub user: Option<(u32, u32)>,
    pub memory_bytes: Option<u64>,
    pub cgroup_parent: &'a str,
    /// A CRIU configuration file runc hands to CRIU on restore (used with
    /// `leave-stopped` to restore a migrated instance held stopped).
    pub criu_config: Option<&'a Path>,
    /// Without the default seccomp filter (`--security-profile unconfined`).
    pub unconfined: bool,
    /// A network namespace made by the agent (the cluster network) rather
    /// than a new empty one made by runc.
    pub netns: Option<&'a Path>,
}

pub fn spec(config: &BundleConfig<'_>) -> Result<Spec, BundleError> {
    let mut spec = Spec::default();
    let mut env = config.env.to_vec();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    let (uid, gid) = config.user.unwrap_or((0, 0));
    let user = UserBuilder::default()
        .uid(uid)
        .gid(gid)
        .build()
        .map_err(|e| BundleError::Spec(e.to_string()))?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .args(config.command.to_vec())
        .env(env)
        .cwd(if config.cwd.is_empty() {
            "/"
        } else {
            config.cwd
        })
        .user(user)
        .build()
        .map_err(|e| BundleError::Spec(e.to_string()))?;
    spec.set_process(Some(process));
    spec.set_hostname(Some(config.name.to_string()));
    if let Some(criu) = config.criu_config {
        let mut annotations = std::collections::HashMap::new();
        annotations.insert(
            "org.criu.config".to_string(),
            criu.to_string_lossy().into_owned(),
        );
        spec.set_annotations(Some(annotations));
    }
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(false)
            .build()
            .map_err(|e| BundleError::Spec(e.to_string()))?,
    ));
    if let Some(linux) = spec.linux_mut() {
        linux.set_cgroups_path(Some(PathBuf::from(format!(
            "/{}/{}",
            config.cgroup_parent, config.name
        ))));
        let mut resources = LinuxResourcesBuilder::default();
        resources = resources.pids(super::confine::pids_limit().map_err(BundleError::Spec)?);
        if let Some(limit) = config.memory_bytes {
            let memory = LinuxMemoryBuilder::default()
                .limit(limit as i64)
                .build()
                .map_err(|e| BundleError::Spec(e.to_string()))?;
            resources = resources.memory(memory);
        }
        let resources = resources
            .build()
            .map_err(|e| BundleError::Spec(e.to_string()))?;
        linux.set_resources(Some(resources));
        if let (Some(path), Some(namespaces)) = (config.netns, linux.namespaces_mut()) {
            for ns in namespaces.iter_mut() {
                if ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network {
                    ns.set_path(Some(path.to_path_buf()));
                }
            }
        }
        if !config.unconfined {
            let seccomp = super::confine::default_seccomp().map_err(BundleError::Spec)?;
            linux.set_seccomp(Some(seccomp));
        }
    }
    Ok(spec)
}

pub fn write_config(dir: &InstanceDir, config: &BundleConfig<'_>) -> Result<(), BundleError> {
    let bundle = dir.bundle();
    std::fs::create_dir_all(&bundle).map_err(|e| io_err("create", &bundle, e))?;
    let path = bundle.join("config.json");
    spec(config)?
        .save(&path)
        .map_err(|e| BundleError::Spec(e.to_string()))?;
    // On disk before the phase that relies on it (a restore, a switch)
    // commits: the file and its name in the directory.
    for synced in [&path, &bundle] {
        std::fs::File::open(synced)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err("sync", synced, e))?;
    }
    Ok(())
}

/// Run `cmd` (blocking) until it ends or `timeout` passes; then it is
/// killed and the error says so.
fn run_bounded(
    mut cmd: std::process::Command,
    source: &Path,
    timeout: std::time::Duration,
) -> Result<std::process::ExitStatus, BundleError> {
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| io_err("copy", source, e))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| io_err("copy", source, e))? {
            return Ok(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let why = format!(
                "not done within {}s and stopped; raise --runtime-timeout for large trees",
                timeout.as_secs()
            );
            return Err(io_err("copy", source, why));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Make `dest` an exact copy of the directory `source` (blocking), within
/// `timeout`. An existing `dest` is emptied, not replaced: a rootfs that
/// is a btrfs subvolume stays one.
pub fn copy_tree(
    source: &Path,
    dest: &Path,
    timeout: std::time::Duration,
) -> Result<(), BundleError> {
    let kind = std::fs::symlink_metadata(dest).map(|m| m.file_type());
    if kind.as_ref().is_ok_and(|k| k.is_dir()) {
        for child in std::fs::read_dir(dest).map_err(|e| io_err("read", dest, e))? {
            let child = child.map_err(|e| io_err("read", dest, e))?;
            let is_dir = child.file_type().is_ok_and(|k| k.is_dir());
            let child = child.path();
            let removed = match is_dir {
                true => std::fs::remove_dir_all(&child),
                false => std::fs::remove_file(&child),
            };
            removed.map_err(|e| io_err("remove", &child, e))?;
        }
    } else if kind.is_ok() {
        std::fs::remove_file(dest).map_err(|e| io_err("remove", dest, e))?;
    }
    std::fs::create_dir_all(dest).map_err(|e| io_err("create", dest, e))?;
    let mut cp = std::process::Command::new("cp");
    cp.arg("-a")
        .arg(format!("{}/.", source.display()))
        .arg(dest);
    if run_bounded(cp, source, timeout)?.success() {
        Ok(())
    } else {
        Err(io_err("copy", source, "cp -a failed"))
    }
}

/// Copy a rootfs directory, or unpack a tar archive, into `dest` (blocking;
/// call from spawn_blocking), within `timeout`. `cp -a` and `tar` keep
/// owners, modes, links and special files exactly.
pub fn import_rootfs(
    source: &Path,
    dest: &Path,
    timeout: std::time::Duration,
) -> Result<(), BundleError> {
    let meta = std::fs::metadata(source).map_err(|e| io_err("read", source, e))?;
    std::fs::create_dir_all(dest).map_err(|e| io_err("create", dest, e))?;
    let cmd = if meta.is_dir() {
        let mut cp = std::process::Command::new("cp");
        // Reflinks where the filesystem shares extents (btrfs, XFS): an
        // unpacked image copied into a rootfs subvolume costs no data.
        cp.arg("-a")
            .arg("--reflink=auto")
            .arg(format!("{}/.", source.display()))
            .arg(dest);
        cp
    } else {
        let mut tar = std::process::Command::new("tar");
        tar.arg("-xf").arg(source).arg("-C").arg(dest);
        tar
    };
    let status = run_bounded(cmd, source, timeout);
    if status.as_ref().is_err() {
        let _ = std::fs::remove_dir_all(dest);
    }
    if status?.success() {
        Ok(())
    } else {
        let _ = std::fs::remove_dir_all(dest);
        Err(BundleError::BadRootfs {
            path: source.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_over_an_existing_tree_keeps_its_directory_and_nothing_stale() {
        use std::os::unix::fs::MetadataExt;
        let (src, dest) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::create_dir(src.path().join("d")).unwrap();
        std::fs::write(src.path().join("d/new"), "new").unwrap();
        std::fs::create_dir(dest.path().join("stale")).unwrap();
        std::fs::write(dest.path().join("stale/old"), "old").unwrap();
        std::os::unix::fs::symlink("/", dest.path().join("link")).unwrap();
        let inode = std::fs::metadata(dest.path()).unwrap().ino();
        let timeout = std::time::Duration::from_secs(30);
        copy_tree(src.path(), dest.path(), timeout).unwrap();
        assert_eq!(std::fs::metadata(dest.path()).unwrap().ino(), inode);
        let mut names: Vec<_> = std::fs::read_dir(dest.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["d"]);
        assert_eq!(
            std::fs::read_to_string(dest.path().join("d/new")).unwrap(),
            "new"
        );
    }

    #[test]
    fn a_copy_that_does_not_end_in_time_is_killed_and_says_so() {
        let mut hung = std::process::Command::new("sleep");
        hung.arg("30");
        let started = std::time::Instant::now();
        let err = run_bounded(
            hung,
            Path::new("/src"),
            std::time::Duration::from_millis(200),
        )
        .unwrap_err()
        .to_string();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(err.contains("not done within 0s"), "{err}");
        assert!(err.contains("--runtime-timeout"), "{err}");
    }

    fn config(unconfined: bool) -> serde_json::Value {
        let command = vec!["true".to_string()];
        let spec = spec(&BundleConfig {
            name: "c1",
            command: &command,
            env: &[],
            cwd: "",
            user: None,
            memory_bytes: None,
            cgroup_parent: "ferry-n1",
            criu_config: None,
            unconfined,
            netns: None,
        })
        .unwrap();
        serde_json::to_value(&spec).unwrap()
    }

    #[test]
    fn an_image_process_keeps_its_env_dir_and_user_and_gets_a_path_only_when_it_has_none() {
        let command = vec!["app".to_string()];
        let process = |env: &[String]| {
            let spec = spec(&BundleConfig {
                name: "c1",
                command: &command,
                env,
                cwd: "/srv",
                user: Some((1001, 50)),
                memory_bytes: None,
                cgroup_parent: "ferry-n1",
                criu_config: None,
                unconfined: false,
                netns: None,
            })
            .unwrap();
            serde_json::to_value(spec.process()).unwrap()
        };
        let own = process(&["PATH=/app/bin".into(), "MODE=x".into()]);
        assert_eq!(own["env"], serde_json::json!(["PATH=/app/bin", "MODE=x"]));
        assert_eq!(own["cwd"], "/srv");
        assert_eq!(
            (own["user"]["uid"].as_u64(), own["user"]["gid"].as_u64()),
            (Some(1001), Some(50))
        );
        let without = process(&["MODE=x".into()]);
        assert_eq!(without["env"][0], DEFAULT_PATH);
        assert_eq!(without["env"][1], "MODE=x");
        assert_eq!(config(false)["process"]["cwd"], "/", "no image: /");
    }

    #[test]
    fn a_container_is_confined_by_default_and_unconfined_only_on_request() {
        let json = config(false);
        let seccomp = &json["linux"]["seccomp"];
        assert_eq!(seccomp["defaultAction"], "SCMP_ACT_ALLOW");
        let denied: Vec<&str> = seccomp["syscalls"][0]["names"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n.as_str())
            .collect();
        for must in [
            "init_module",
            "kexec_load",
            "reboot",
            "swapon",
            "mount",
            "keyctl",
            "bpf",
            "perf_event_open",
        ] {
            assert!(denied.contains(&must), "{must} not denied");
        }
        assert_eq!(seccomp["syscalls"][0]["action"], "SCMP_ACT_ERRNO");
        assert_eq!(
            json["linux"]["resources"]["pids"]["limit"],
            super::super::confine::PIDS_LIMIT
        );
        let json = config(true);
        assert!(json["linux"]["seccomp"].is_null());
        assert_eq!(
            json["linux"]["resources"]["pids"]["limit"],
            super::super::confine::PIDS_LIMIT
        );
    }

    #[test]
    fn config_has_the_command_limits_namespaces_and_own_cgroup() {
        let command = vec!["sh".to_string(), "-c".to_string(), "true".to_string()];
        let spec = spec(&BundleConfig {
            name: "c1",
            command: &command,
            env: &[],
            cwd: "",
            user: None,
            memory_bytes: Some(64 << 20),
            cgroup_parent: "ferry-n1",
            criu_config: None,
            unconfined: false,
            netns: Some(Path::new("/data/netns/c1")),
        })
        .unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["process"]["args"][2], "true");
        assert_eq!(json["process"]["terminal"], false);
        assert_eq!(json["root"]["readonly"], false);
        assert_eq!(json["linux"]["cgroupsPath"], "/ferry-n1/c1");
        assert_eq!(json["linux"]["resources"]["memory"]["limit"], 64 << 20);
        let namespaces: Vec<&str> = json["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["type"].as_str())
            .collect();
        for ns in ["pid", "network", "ipc", "uts", "mount"] {
            assert!(namespaces.contains(&ns), "{ns} missing");
        }
        // On the cluster network it joins the namespace the agent made.
        let network = json["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["type"] == "network")
            .unwrap();
        assert_eq!(network["path"], "/data/netns/c1");
        assert_eq!(json_of_plain()["linux"]["namespaces"][1].get("path"), None);
    }

    fn json_of_plain() -> serde_json::Value {
        config(false)
    }
}
