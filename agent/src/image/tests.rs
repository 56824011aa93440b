use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::*;

/// A layer entry: a file with content, a directory, a symlink.
enum E<'a> {
    File(&'a str, &'a str),
    Dir(&'a str),
    Link(&'a str, &'a str),
}

fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_uid(1000);
        header.set_gid(1000);
        header.set_mtime(1_700_000_000);
        match entry {
            E::File(path, body) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o640);
                header.set_size(body.len() as u64);
                builder
                    .append_data(&mut header, path, body.as_bytes())
                    .unwrap();
            }
            E::Dir(path) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                builder.append_data(&mut header, path, &[][..]).unwrap();
            }
            E::Link(path, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                builder.append_link(&mut header, path, target).unwrap();
            }
        }
    }
    builder.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// Write `bytes` as a blob of the layout at `dir`; its descriptor.
fn blob(dir: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let d = digest_of(bytes);
    let path = dir.join("blobs/sha256").join(&d["sha256:".len()..]);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    serde_json::json!({ "mediaType": media_type, "digest": d, "size": bytes.len() })
}

fn config_json(layers: &[Vec<u8>]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| digest_of(l)).collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {
            "Entrypoint": ["/bin/app"], "Cmd": ["--serve"],
            "Env": ["PATH=/bin", "MODE=image"], "WorkingDir": "/srv", "User": "app:staff"
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids }
    }))
    .unwrap()
}

/// An OCI layout of `layers` (the first gzipped, the others zstd), its
/// index naming a platform.
fn layout(dir: &Path, layers: &[Vec<u8>]) {
    let config = blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        &config_json(layers),
    );
    let layer_descs: Vec<_> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| match i {
            0 => blob(dir, "application/vnd.oci.image.layer.v1.tar+gzip", &gzip(l)),
            _ => blob(
                dir,
                "application/vnd.oci.image.layer.v1.tar+zstd",
                &zstd::encode_all(&l[..], 1).unwrap(),
            ),
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": layer_descs
    });
    let mut desc = blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    let arch = source::host_arch();
    desc["platform"] = serde_json::json!({ "architecture": arch, "os": "linux" });
    let other = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{}", "0".repeat(64)), "size": 2,
        "platform": { "architecture": "s390x", "os": "linux" }
    });
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [other, desc] });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// Unpack without a disk reserve.
fn unpack_free(path: &Path, rootfs: &Path, scratch: &Path) -> Result<Unpacked, ImageError> {
    unpack(path, rootfs, scratch, None)
}

fn base_layers() -> Vec<Vec<u8>> {
    let lower = tar_of(&[
        E::Dir("bin"),
        E::File("bin/app", "v1"),
        E::File("bin/old", "gone"),
        E::Dir("etc"),
        E::File(
            "etc/passwd",
            "root:x:0:0::/:/bin/sh\napp:x:1001:1001::/:/bin/sh\n",
        ),
        E::File("etc/group", "root:x:0:\nstaff:x:50:\n"),
        E::Dir("var/cache"),
        E::File("var/cache/a", "a"),
        E::Dir("var/cache/sub"),
        E::File("var/cache/sub/b", "b"),
        E::Dir("data"),
        E::File("data/x", "x"),
    ]);
    let upper = tar_of(&[
        E::File("bin/app", "v2"),
        E::File("bin/.wh.old", ""),
        E::Dir("var/cache"),
        E::File("var/cache/new", "n"),
        E::File("var/cache/.wh..wh..opq", ""),
        // A directory replaced by a file, a file by a symlink.
        E::File("data", "now a file"),
        E::Link("etc/motd", "/etc/issue"),
    ]);
    vec![lower, upper]
}

#[test]
fn layers_apply_in_order_with_whiteouts_and_the_config_gives_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    layout(&image, &base_layers());
    let rootfs = dir.path().join("rootfs");
    let unpacked = unpack_free(&image, &rootfs, &dir.path().join("scratch")).unwrap();
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap();
    assert_eq!(read("bin/app"), "v2", "the upper layer's file wins");
    assert!(!rootfs.join("bin/old").exists(), ".wh.old removes old");
    assert_eq!(read("var/cache/new"), "n", "this layer's own entry stays");
    assert!(
        !rootfs.join("var/cache/a").exists(),
        "opaque hides lower files"
    );
    assert!(!rootfs.join("var/cache/sub").exists(), "and lower dirs");
    assert_eq!(read("data"), "now a file");
    let meta = std::fs::metadata(rootfs.join("bin/app")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (1000, 1000, 0o640)
    );
    assert_eq!(unpacked.layers, 2);
    assert!(unpacked.id.starts_with("sha256:"), "{}", unpacked.id);
    let process = unpacked.process;
    assert_eq!(process.command(&[]), ["/bin/app", "--serve"]);
    assert_eq!(process.command(&["-v".into()]), ["/bin/app", "-v"]);
    assert_eq!(process.env, ["PATH=/bin", "MODE=image"]);
    assert_eq!(process.cwd, "/srv");
    let user = process.user.unwrap();
    assert_eq!(resolve_user(&user, &rootfs), Ok((1001, 50)));
    assert_eq!(resolve_user("7", &rootfs), Ok((7, 0)));
    assert!(resolve_user("nobody", &rootfs)
        .unwrap_err()
        .contains("nobody"));
}

#[test]
fn a_docker_archive_unpacks_and_its_layers_are_checked_against_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let layers = base_layers();
    let config = config_json(&layers);
    let archive_dir = dir.path().join("archive");
    std::fs::create_dir_all(archive_dir.join("l0")).unwrap();
    std::fs::create_dir_all(archive_dir.join("l1")).unwrap();
    std::fs::write(archive_dir.join("l0/layer.tar"), &layers[0]).unwrap();
    std::fs::write(archive_dir.join("l1/layer.tar"), &layers[1]).unwrap();
    std::fs::write(archive_dir.join("cfg.json"), &config).unwrap();
    let manifest =
        r#"[{"Config":"cfg.json","RepoTags":["app:1"],"Layers":["l0/layer.tar","l1/layer.tar"]}]"#;
    std::fs::write(archive_dir.join("manifest.json"), manifest).unwrap();
    let archive = dir.path().join("app.tar");
    let mut builder = tar::Builder::new(std::fs::File::create(&archive).unwrap());
    builder.append_dir_all(".", &archive_dir).unwrap();
    builder.into_inner().unwrap();

    let rootfs = dir.path().join("rootfs");
    let unpacked = unpack_free(&archive, &rootfs, &dir.path().join("scratch")).unwrap();
    assert_eq!(
        std::fs::read_to_string(rootfs.join("bin/app")).unwrap(),
        "v2"
    );
    assert_eq!(unpacked.id, digest_of(&config));

    // A layer that is not what the config says is refused.
    std::fs::write(archive_dir.join("l1/layer.tar"), &layers[0]).unwrap();
    let err =
        unpack_free(&archive_dir, &dir.path().join("r2"), &dir.path().join("s2")).unwrap_err();
    assert!(matches!(err, ImageError::Digest { .. }), "{err}");
    assert!(err.to_string().contains("layer 1"), "{err}");
}

#[test]
fn a_damaged_blob_is_refused_with_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    layout(&image, &base_layers());
    let layer = std::fs::read_dir(image.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read(p).unwrap().starts_with(&[0x1f, 0x8b]))
        .unwrap();
    let mut bytes = std::fs::read(&layer).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&layer, bytes).unwrap();
    let err = unpack_free(&image, &dir.path().join("rootfs"), &dir.path().join("s")).unwrap_err();
    assert!(
        err.to_string().contains("does not match its digest"),
        "{err}"
    );
}

#[test]
fn nothing_is_written_or_removed_outside_the_rootfs() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep"), "host file").unwrap();
    let escape = outside.to_str().unwrap();
    let lower = tar_of(&[E::Link("out", escape), E::Dir("ok")]);
    let upper = tar_of(&[
        E::File("out/.wh.keep", ""),
        E::File("out/.wh..wh..opq", ""),
        E::File("out/planted", "x"),
        E::File("ok/.wh...", ""),
        E::File("ok/file", "stays"),
    ]);
    let image = dir.path().join("image");
    layout(&image, &[lower, upper]);
    let rootfs = dir.path().join("rootfs");
    let result = unpack_free(&image, &rootfs, &dir.path().join("s"));
    assert_eq!(
        std::fs::read_to_string(outside.join("keep")).unwrap(),
        "host file"
    );
    assert!(!outside.join("planted").exists(), "{result:?}");
    if result.is_ok() {
        assert!(rootfs.join("ok/file").exists());
    }
}

#[test]
fn an_image_for_another_platform_only_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    layout(&image, &base_layers());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("index.json")).unwrap()).unwrap();
    let mut only_other = index.clone();
    only_other["manifests"] = serde_json::json!([index["manifests"][0]]);
    std::fs::write(image.join("index.json"), only_other.to_string()).unwrap();
    let err = unpack_free(&image, &dir.path().join("r"), &dir.path().join("s")).unwrap_err();
    assert!(
        err.to_string().contains("holds no image for linux/"),
        "{err}"
    );
    let err = unpack_free(dir.path(), &dir.path().join("r"), &dir.path().join("s")).unwrap_err();
    assert!(matches!(err, ImageError::NotAnImage { .. }), "{err}");
}

#[test]
fn a_disk_at_its_reserve_stops_the_unpacking_before_a_layer() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    layout(&image, &base_layers());
    let all = Reserve::new(dir.path(), u64::MAX / 2);
    let rootfs = dir.path().join("rootfs");
    let err = unpack(&image, &rootfs, &dir.path().join("s"), Some(&all)).unwrap_err();
    assert!(matches!(err, ImageError::Space { index: 0, .. }), "{err}");
    assert!(err.to_string().contains("--disk-reserve"), "{err}");
    let none = Reserve::new(dir.path(), 0);
    assert!(unpack(&image, &rootfs, &dir.path().join("s"), Some(&none)).is_ok());
}
