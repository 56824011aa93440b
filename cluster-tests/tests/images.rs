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
    let mut cluster = Cluster::new();
    cluster.bootstrap("n1", 3)?;
    cluster.join("n2", 0)?;
    cluster.wait_converged(&["n1", "n2"], CONVERGE)?;
    let root = cluster.root().to_path_buf();
    let layers = vec![layer_tar(&busybox_rootfs(&root)?)?, app_layer(&root)?];
    // Root in the image that moves: CRIU cannot dump a process of another
    // uid on a host whose root lacks CAP_SYS_RESOURCE, as here (prlimit of
    // another user's task is refused).
    let layout = oci_layout(
        &root.join("layout"),
        &layers,
        &config(&layers, process(None)),
    )?;
    let layout = layout.to_string_lossy().into_owned();

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
