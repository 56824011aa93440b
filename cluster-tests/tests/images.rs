//! `ferry launch --image` on real runc + CRIU: an OCI image layout and a
//! docker archive written by the test from a busybox tree and an app layer
//! (a whiteout, a user of its own), the image config's process, and a live
//! move of an instance launched from an image.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use cluster_tests::image::{config, docker_archive, layer_tar, oci_layout};
use cluster_tests::{busybox_rootfs, require_container_runtime, wait_for, Cluster};

const CONVERGE: Duration = Duration::from_secs(30);
const APP_UID: u32 = 1001;

/// The app layer: /srv owned by the image's user `app`, its passwd entry,
/// and a whiteout of the busybox layer's /bin/vi.
fn app_layer(dir: &Path) -> Result<Vec<u8>> {
    let app = dir.join("app-layer");
    std::fs::create_dir_all(app.join("srv"))?;
    std::fs::create_dir_all(app.join("etc"))?;
    std::fs::create_dir_all(app.join("bin"))?;
    std::os::unix::fs::chown(app.join("srv"), Some(APP_UID), Some(APP_UID))?;
    // Open to root too, which runs without CAP_DAC_OVERRIDE in a container.
    std::fs::set_permissions(
        app.join("srv"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )?;
    std::fs::write(
        app.join("etc/passwd"),
        format!("root:x:0:0::/:/bin/sh\napp:x:{APP_UID}:{APP_UID}::/srv:/bin/sh\n"),
    )?;
    std::fs::write(app.join("bin/.wh.vi"), "")?;
    layer_tar(&app)
}

/// What the image runs: its environment, working dir and uid into `info`,
/// then a counter in `counter` (both in /srv, the working dir); as `user`
/// when given.
fn process(user: Option<&str>) -> serde_json::Value {
    let script = "echo \"$MODE $(pwd) $(id -u)\" > info; i=0; \
                  while true; do i=$((i+1)); echo $i > counter; sleep 0.1; done";
    let mut process = serde_json::json!({
        "Env": ["MODE=from-image"], "WorkingDir": "/srv", "Cmd": ["sh", "-c", script]
    });
    if let Some(user) = user {
        process["User"] = user.into();
    }
    process
}

fn two_members() -> Result<Cluster> {
    let mut cluster = Cluster::new();
    cluster.bootstrap("n1", 3)?;
    cluster.join("n2", 0)?;
    cluster.wait_converged(&["n1", "n2"], CONVERGE)?;
    Ok(cluster)
}

/// An OCI layout under `root` of `layers`, running as root (see
/// [`process`]).
fn layout_of(root: &Path, layers: &[Vec<u8>]) -> Result<String> {
    let layout = oci_layout(&root.join("layout"), layers, &config(layers, process(None)))?;
    Ok(layout.to_string_lossy().into_owned())
}

fn read(cluster: &Cluster, instance: &str, file: &str) -> Result<String> {
    wait_for(&format!("{instance}'s {file}"), CONVERGE, || {
        let text = cluster.ferry_ok(0, &["exec", instance, "--", "cat", file])?;
        match text.trim() {
            "" => bail!("{file} is empty"),
            t => Ok(t.to_string()),
        }
    })
}

fn counter(cluster: &Cluster, instance: &str) -> Result<u64> {
    Ok(read(cluster, instance, "/srv/counter")?.parse()?)
}

#[test]
fn an_image_runs_its_own_process_and_moves_live() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let cluster = two_members()?;
    let root = cluster.root().to_path_buf();
    let layers = vec![layer_tar(&busybox_rootfs(&root)?)?, app_layer(&root)?];
    // Root in the image that moves: CRIU cannot dump a process of another
    // uid on a host whose root lacks CAP_SYS_RESOURCE, as here (prlimit of
    // another user's task is refused).
    let layout = layout_of(&root, &layers)?;

    // From the layout, with the image's own process, on n2 through n1.
    cluster.ferry_ok(0, &["launch", "img1", "--image", &layout, "--target", "n2"])?;
    let info = read(&cluster, "img1", "/srv/info").map_err(|e| {
        let console = cluster.agents[1]
            .data_dir
            .join("instances/img1/console.log");
        let said = std::fs::read_to_string(&console).unwrap_or_default();
        e.context(format!("img1's console: {said}"))
    })?;
    assert_eq!(info, "from-image /srv 0");
    let vi = cluster.ferry_ok(
        0,
        &[
            "exec",
            "img1",
            "--",
            "sh",
            "-c",
            "test -e /bin/vi || echo gone",
        ],
    )?;
    assert_eq!(
        vi.trim(),
        "gone",
        "the app layer's whiteout removes /bin/vi"
    );
    let show = cluster.ferry_json(0, &["show", "img1"])?;
    let source = show["rootfs_source"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(source.contains("(image sha256:"), "{show}");
    assert_eq!(
        (show["cwd"].as_str(), show["user"].as_str()),
        (Some("/srv"), Some("0:0"))
    );
    assert_eq!(
        show["env"],
        serde_json::json!(["MODE=from-image"]),
        "{show}"
    );

    // A live move keeps the process counting, as the image's user.
    let before = counter(&cluster, "img1")?;
    cluster.ferry_ok(0, &["move", "img1", "--target", "n1"])?;
    let after = counter(&cluster, "img1")?;
    assert!(
        after >= before,
        "counter went back from {before} to {after}"
    );
    assert_eq!(read(&cluster, "img1", "/srv/info")?, "from-image /srv 0");
    assert_eq!(cluster.running_copies("img1"), 1);

    // From a docker archive of the same layers whose config names the
    // image's own user; the command after '--' replaces the image's Cmd,
    // and the rest of its process stays.
    let config = config(&layers, process(Some("app")));
    let archive = docker_archive(&root.join("image.tar"), &layers, &config)?;
    let archive = archive.to_string_lossy().into_owned();
    let script = "echo \"$MODE $(pwd) $(id -u)\" > override; exec sleep 600";
    cluster.ferry_ok(
        0,
        &[
            "launch", "img2", "--image", &archive, "--target", "n1", "--", "sh", "-c", script,
        ],
    )?;
    let said = read(&cluster, "img2", "/srv/override")?;
    assert_eq!(said, format!("from-image /srv {APP_UID}"));
    let uid = cluster.ferry_ok(0, &["exec", "img2", "--", "id", "-u"])?;
    assert_eq!(
        uid.trim(),
        APP_UID.to_string(),
        "exec runs as the image's user"
    );
    let show = cluster.ferry_json(0, &["show", "img2"])?;
    // Launched on the member that unpacked it (the tree is moved in, not
    // copied): nothing of the launch is left in its tmp dir.
    let tmp = cluster.agents[0].data_dir.join("tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", tmp.display());
    assert_eq!(show["user"], format!("{APP_UID}:{APP_UID}"), "{show}");

    // A live move of a process of another user needs CAP_SYS_RESOURCE for
    // CRIU on both sides: refused up front where the agents lack it (the
    // facts say so), carried out where they have it.
    let show = cluster.ferry_json(0, &["cluster", "show", "n1"])?;
    let runtimes = &show["facts"]["runtimes"];
    match runtimes["criu_other_users"].as_bool() {
        Some(false) => {
            let err = cluster.ferry_err(0, &["move", "img2", "--target", "n2"])?;
            assert!(
                err.contains("criu-users") && err.contains("CAP_SYS_RESOURCE"),
                "{err}"
            );
            assert_eq!(cluster.running_copies("img2"), 1);
        }
        Some(true) => {
            cluster.ferry_ok(0, &["move", "img2", "--target", "n2"])?;
            let uid = cluster.ferry_ok(0, &["exec", "img2", "--", "id", "-u"])?;
            assert_eq!(uid.trim(), APP_UID.to_string());
        }
        None => bail!("no criu_other_users in the facts: {show}"),
    }

    // Not an image: refused before anything is reserved, saying what it
    // expected.
    let err = cluster.ferry_err(0, &["launch", "bad", "--image", &root.to_string_lossy()])?;
    assert!(err.contains("is not an image"), "{err}");
    let list = cluster.ferry_json(0, &["list"])?;
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    Ok(())
}

/// A layer of one file of `bytes` pseudo-random bytes (incompressible, so
/// a transfer's byte count shows whether the image went).
fn bulk_layer(dir: &Path, bytes: usize) -> Result<Vec<u8>> {
    let bulk = dir.join("bulk-layer");
    std::fs::create_dir_all(bulk.join("opt"))?;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let data: Vec<u8> = (0..bytes / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    std::fs::write(bulk.join("opt/bulk"), data)?;
    layer_tar(&bulk)
}

/// The images in an agent's store.
fn stored_images(cluster: &Cluster, agent: usize) -> Vec<String> {
    let dir = cluster.agents[agent].data_dir.join("images");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Whether an overlayfs is mounted at `instance`'s rootfs on `agent`.
fn layered_mount(cluster: &Cluster, agent: usize, instance: &str) -> bool {
    let at = cluster.agents[agent]
        .data_dir
        .join(format!("instances/{instance}/bundle/rootfs"));
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let at = at.to_string_lossy();
    mounts.lines().any(|l| {
        let mut fields = l.split_whitespace();
        (fields.next(), fields.next(), fields.next())
            == (Some("overlay"), Some(&*at), Some("overlay"))
    })
}

/// One image in `agent`'s store, and each of `instances` an overlay on it.
fn assert_layered(cluster: &Cluster, agent: usize, instances: &[&str]) {
    let member = &cluster.agents[agent].name;
    let stored = stored_images(cluster, agent);
    assert_eq!(
        stored.len(),
        1,
        "one copy of the image on {member}: {stored:?}"
    );
    for name in instances {
        let layered = layered_mount(cluster, agent, name);
        assert!(layered, "{name}'s rootfs is an overlay on {member}");
    }
}

fn last_move_bytes(cluster: &Cluster, instance: &str) -> Result<u64> {
    let jobs = cluster.ferry_json(0, &["job", "list"])?;
    let job = jobs
        .as_array()
        .and_then(|jobs| {
            jobs.iter()
                .filter(|j| j["instance"] == instance)
                .max_by_key(|j| j["id"].as_u64())
        })
        .cloned();
    match job {
        Some(job) if job["phase"] == "Done" => Ok(job["bytes"].as_u64().unwrap_or(0)),
        other => bail!("no finished move of {instance}: {other:?}"),
    }
}

#[test]
fn an_image_is_unpacked_once_per_member_and_a_move_sends_only_the_changes() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    const BULK: usize = 8 << 20;
    let cluster = two_members()?;
    let root = cluster.root().to_path_buf();
    let layers = vec![
        layer_tar(&busybox_rootfs(&root)?)?,
        app_layer(&root)?,
        bulk_layer(&root, BULK)?,
    ];
    let layout = layout_of(&root, &layers)?;

    // Two instances of one image on n1: one unpacked tree, each its own
    // overlay of it, each its own changes.
    for name in ["a1", "a2"] {
        cluster.ferry_ok(0, &["launch", name, "--image", &layout, "--target", "n1"])?;
    }
    for name in ["a1", "a2"] {
        counter(&cluster, name)?; // Running: its rootfs is mounted at start.
    }
    assert_layered(&cluster, 0, &["a1", "a2"]);
    for name in ["a1", "a2"] {
        let show = cluster.ferry_json(0, &["show", name])?;
        assert!(
            show["layered_on"]
                .as_str()
                .is_some_and(|i| i.starts_with("sha256:")),
            "{show}"
        );
    }
    cluster.ferry_ok(0, &["exec", "a1", "--", "sh", "-c", "echo mine > /srv/own"])?;
    let absent = cluster.ferry_ok(
        0,
        &[
            "exec",
            "a2",
            "--",
            "sh",
            "-c",
            "test -e /srv/own || echo absent",
        ],
    )?;
    assert_eq!(absent.trim(), "absent", "a1's change is a1's alone");

    // The first move to n2 takes the image along (pushed); the second
    // (pulled) finds it there and sends only its own changes and memory.
    // A restore that fails on the target (stale runc state for the id)
    // switches back and leaves n2 nothing: no instance dir, no mount, no
    // image (it came with the move and nothing there uses it).
    let stale = cluster.agents[1].data_dir.join("runc/a1");
    std::fs::create_dir_all(&stale)?;
    let err = cluster.ferry_err(0, &["move", "a1", "--target", "n2"])?;
    assert!(err.contains("restore on the target failed"), "{err}");
    std::fs::remove_dir_all(&stale)?;
    wait_for("a1 back on n1", CONVERGE, || {
        match cluster.running_copies("a1") {
            1 => Ok(()),
            n => bail!("{n} copies of a1 run"),
        }
    })?;
    assert!(!cluster.agents[1].data_dir.join("instances/a1").exists());
    assert!(!layered_mount(&cluster, 1, "a1"));
    assert_eq!(stored_images(&cluster, 1), Vec::<String>::new());

    let before = counter(&cluster, "a1")?;
    cluster.ferry_ok(0, &["move", "a1", "--target", "n2", "--mode", "push"])?;
    let first = last_move_bytes(&cluster, "a1")?;
    assert!(
        first > BULK as u64,
        "the first move sent {first} bytes, the image is larger"
    );
    assert!(counter(&cluster, "a1")? >= before, "a1 restarted");
    let own = cluster.ferry_ok(0, &["exec", "a1", "--", "cat", "/srv/own"])?;
    assert_eq!(own.trim(), "mine");
    cluster.ferry_ok(0, &["move", "a2", "--target", "n2"])?;
    let second = last_move_bytes(&cluster, "a2")?;
    assert!(
        second < BULK as u64 / 2,
        "the second move sent {second} bytes: the image again?"
    );
    assert_layered(&cluster, 1, &["a1", "a2"]);
    for name in ["a1", "a2"] {
        assert_eq!(cluster.running_copies(name), 1);
    }

    // A snapshot of a layered instance holds its own changes; restoring
    // it puts them back over the same image.
    cluster.ferry_ok(0, &["snapshot", "create", "a1", "s1"])?;
    let snapshot = cluster.agents[1]
        .data_dir
        .join("instances/a1/snapshots/s1/rootfs");
    assert!(snapshot.join("srv/own").exists() && !snapshot.join("opt/bulk").exists());
    cluster.ferry_ok(
        0,
        &["exec", "a1", "--", "sh", "-c", "rm /srv/own; rm /opt/bulk"],
    )?;
    cluster.ferry_ok(0, &["snapshot", "restore", "a1", "s1"])?;
    let back = cluster.ferry_ok(
        0,
        &[
            "exec",
            "a1",
            "--",
            "sh",
            "-c",
            "cat /srv/own; test -s /opt/bulk && echo bulk",
        ],
    )?;
    assert_eq!(
        back.split_whitespace().collect::<Vec<_>>(),
        ["mine", "bulk"]
    );
    assert!(layered_mount(&cluster, 1, "a1"));

    // The store keeps an image while an instance here lies on it.
    wait_for("n1's store emptied", CONVERGE, || {
        match stored_images(&cluster, 0) {
            left if left.is_empty() => Ok(()),
            left => bail!("n1 still stores {left:?}"),
        }
    })?;
    // Launched through n1 onto n2, which has the image: n1 unpacks it to
    // read its process, n2 takes no tree and lays a3 on its own copy.
    cluster.ferry_ok(0, &["launch", "a3", "--image", &layout, "--target", "n2"])?;
    counter(&cluster, "a3")?;
    assert_layered(&cluster, 1, &["a1", "a2", "a3"]);
    for name in ["a1", "a3"] {
        cluster.ferry_ok(0, &["delete", name, "--force"])?;
    }
    assert_eq!(stored_images(&cluster, 1).len(), 1, "a2 still uses it");
    cluster.ferry_ok(0, &["delete", "a2", "--force"])?;
    wait_for("n2's store emptied", CONVERGE, || {
        match stored_images(&cluster, 1) {
            left if left.is_empty() => Ok(()),
            left => bail!("n2 still stores {left:?}"),
        }
    })?;
    Ok(())
}
