//! The compatibility check before a move: can the target run what the
//! instance's processes already depend on? Pure: facts in, report out.
//! Every failed item names what is missing.

use ferry_raft::{Baseline, CheckResult, ClusterState, HostFacts};

use crate::api::{ApiError, ErrorKind};

fn not_found(message: String) -> ApiError {
    ApiError::new(ErrorKind::NotFound, message)
}

/// What the move needs of the target besides matching the baseline.
#[derive(Clone, Debug, Default)]
pub struct Needs {
    pub stateful: bool,
    /// A VM: QEMU on the target instead of the host CPU, syscalls and
    /// CRIU (a guest depends on its QEMU, not on the host's kernel).
    pub vm: bool,
    /// A VM's named CPU model: the target's QEMU must run it.
    pub cpu_model: Option<String>,
    /// On the cluster network: its sockets must be dumped and restored.
    pub networked: bool,
    /// The uid its process runs as, when not root (an image's `User`).
    pub uid: Option<u32>,
    /// The image it lies on (layered): the target must layer too.
    pub image: Option<String>,
    /// Memory the instance may use (its limit), if known.
    pub memory_bytes: Option<u64>,
    /// Free memory on the target, if known (gossip load facts).
    pub target_free_memory_bytes: Option<u64>,
    /// Bytes the rootfs (and dump) will take on the target.
    pub disk_bytes: u64,
    /// Free disk on the target's data dir above its `--disk-reserve`, if
    /// known (gossip).
    pub target_free_disk_bytes: Option<u64>,
}

/// The uid an instance's process runs as, when it is not root.
pub fn uid_of(spec: &ferry_raft::InstanceSpec) -> Option<u32> {
    spec.user.map(|(uid, _)| uid).filter(|uid| *uid != 0)
}

fn item(check: &str, ok: bool, detail: String) -> CheckResult {
    CheckResult {
        check: check.into(),
        ok,
        detail,
    }
}

/// Items of `need` that `have` lacks; both sorted or not, small sets.
fn missing<'a>(need: &'a [String], have: &[String]) -> Vec<&'a str> {
    let have: std::collections::BTreeSet<&str> = have.iter().map(String::as_str).collect();
    need.iter()
        .map(String::as_str)
        .filter(|n| !have.contains(n))
        .collect()
}

fn superset(check: &str, what: &str, need: &[String], have: &[String]) -> CheckResult {
    let gone = missing(need, have);
    if gone.is_empty() {
        item(check, true, format!("all {} {what} present", need.len()))
    } else {
        item(
            check,
            false,
            format!("target lacks {} {what}: {}", gone.len(), gone.join(" ")),
        )
    }
}

/// "4.1.1" → [4, 1, 1]; non-numeric parts end the version.
fn version(text: &str) -> Vec<u64> {
    text.split(['.', '-', '+', '~'])
        .map_while(|p| p.parse().ok())
        .collect()
}

/// Run every check; the move may go on only if all pass.
pub fn check(
    baseline: &Baseline,
    source: &HostFacts,
    target: &HostFacts,
    needs: &Needs,
) -> Vec<CheckResult> {
    let mut report = vec![item(
        "architecture",
        baseline.arch == target.arch,
        if baseline.arch == target.arch {
            format!("both {}", target.arch)
        } else {
            format!(
                "instance runs on {}, target is {}",
                baseline.arch, target.arch
            )
        },
    )];
    if needs.vm {
        report.push(qemu_item(source, target, needs.stateful));
    }
    if let Some(model) = &needs.cpu_model {
        report.push(cpu_model_item(model, target));
    }
    let processes = needs.stateful && !needs.vm;
    if processes {
        report.push(superset(
            "cpu",
            "CPU flags",
            &baseline.cpu_flags,
            &target.cpu_flags,
        ));
        report.push(superset(
            "syscalls",
            "syscalls",
            &baseline.syscalls,
            &target.syscalls,
        ));
    }
    report.push(superset(
        "filesystems",
        "filesystem types",
        &baseline.filesystems,
        &target.filesystems,
    ));
    if processes {
        report.push(criu_item(source, target));
    }
    if needs.stateful && needs.networked {
        report.push(sockets_item(source, target));
    }
    if let (true, Some(uid)) = (processes, needs.uid) {
        report.push(users_item(source, target, uid));
    }
    if let Some(image) = &needs.image {
        report.push(layers_item(target, image));
    }
    report.push(memory_item(target, needs));
    report.push(disk_item(target, needs));
    report
}

/// A layered instance's rootfs is its changes over a shared image, which
/// only a target that mounts overlayfs on its data dir can run.
fn layers_item(target: &HostFacts, image: &str) -> CheckResult {
    let short = image.get(..19).unwrap_or(image);
    match target.runtimes.image_layers {
        true => item("image-layers", true, format!("the target lays containers on images ({short})")),
        false => item(
            "image-layers",
            false,
            format!("it lies on image {short}, and the target cannot mount overlayfs on its data dir (a filesystem overlayfs takes as upper: ext4, xfs, btrfs, tmpfs), so it cannot run it there"),
        ),
    }
}

/// QEMU on the target; for a live move also a version at least the
/// source's (QEMU reads older migration streams, not newer ones) and the
/// same accelerator.
fn qemu_item(source: &HostFacts, target: &HostFacts, stateful: bool) -> CheckResult {
    let (have, had) = (&target.runtimes, &source.runtimes);
    let Some(installed) = &have.qemu else {
        let fix = "install QEMU on it (scripts/install-deps.sh)";
        return item("qemu", false, format!("target has no QEMU; {fix}"));
    };
    if !stateful {
        return item("qemu", true, format!("target has QEMU {installed}"));
    }
    let source = had.qemu.as_deref().unwrap_or("?");
    if had
        .qemu
        .as_ref()
        .is_some_and(|s| version(installed) < version(s))
    {
        let detail = format!("target's QEMU {installed} is older than the source's {source}; upgrade it, or move --stateless");
        return item("qemu", false, detail);
    }
    if have.vm_accel != had.vm_accel {
        let name = |a: &Option<String>| a.clone().unwrap_or_else(|| "none".into());
        let detail = format!(
            "the source runs VMs under {}, the target under {}; a running VM cannot change accelerator: move it --stateless",
            name(&had.vm_accel),
            name(&have.vm_accel)
        );
        return item("qemu", false, detail);
    }
    item(
        "qemu",
        true,
        format!("target has QEMU {installed} (source {source})"),
    )
}

/// QEMU's own answer on the target: can it run `model`, and if not,
/// which features it lacks.
fn cpu_model_item(model: &str, target: &HostFacts) -> CheckResult {
    let check = "cpu-model";
    match target.runtimes.vm_cpu_models.get(model) {
        None => item(
            check,
            false,
            format!("the target's QEMU has no CPU model {model}"),
        ),
        Some(missing) if missing.is_empty() => {
            item(check, true, format!("the target runs CPU model {model}"))
        }
        Some(missing) => item(
            check,
            false,
            format!(
                "the target cannot run CPU model {model}: it lacks {}",
                missing.join(" ")
            ),
        ),
    }
}

/// "source", "target" or both: the sides whose runtimes lack `can`.
fn sides_lacking<'a>(
    source: &HostFacts,
    target: &HostFacts,
    can: impl Fn(&ferry_raft::Runtimes) -> bool,
) -> Vec<&'a str> {
    [("source", source), ("target", target)]
        .into_iter()
        .filter(|(_, facts)| !can(&facts.runtimes))
        .map(|(side, _)| side)
        .collect()
}

fn sockets_item(source: &HostFacts, target: &HostFacts) -> CheckResult {
    let cannot = sides_lacking(source, target, |r| r.criu_inet);
    if cannot.is_empty() {
        return item(
            "criu-sockets",
            true,
            "CRIU dumps internet sockets on both".into(),
        );
    }
    let detail = format!(
        "CRIU on the {} cannot dump internet sockets (install CRIU >= 4.2 with scripts/install-deps.sh, or move it --stateless)",
        cannot.join(" and ")
    );
    item("criu-sockets", false, detail)
}

/// CRIU checkpoints and restores a process of another user than root
/// only where the agent holds CAP_SYS_RESOURCE.
fn users_item(source: &HostFacts, target: &HostFacts, uid: u32) -> CheckResult {
    let cannot = sides_lacking(source, target, |r| r.criu_other_users);
    if cannot.is_empty() {
        let detail = format!("CRIU checkpoints processes of uid {uid} on both");
        return item("criu-users", true, detail);
    }
    let detail = format!(
        "its process runs as uid {uid}, and the agent on the {} lacks CAP_SYS_RESOURCE, without which CRIU cannot checkpoint another user's process (run the agent with it, or move it --stateless)",
        cannot.join(" and ")
    );
    item("criu-users", false, detail)
}

fn memory_item(target: &HostFacts, needs: &Needs) -> CheckResult {
    match (needs.memory_bytes, needs.target_free_memory_bytes) {
        (Some(need), Some(free)) => item(
            "memory",
            free >= need,
            format!(
                "needs {} MiB, target has {} MiB free",
                need >> 20,
                free >> 20
            ),
        ),
        (Some(need), None) => item(
            "memory",
            target.memory_total_bytes >= need,
            format!(
                "needs {} MiB, target has {} MiB in total (free memory unknown)",
                need >> 20,
                target.memory_total_bytes >> 20
            ),
        ),
        (None, _) => item("memory", true, "no memory limit set".into()),
    }
}

fn disk_item(target: &HostFacts, needs: &Needs) -> CheckResult {
    match needs.target_free_disk_bytes {
        Some(free) => item(
            "disk",
            free >= needs.disk_bytes,
            format!(
                "needs {} MiB, target has {} MiB free above its --disk-reserve",
                needs.disk_bytes >> 20,
                free >> 20
            ),
        ),
        None => item(
            "disk",
            target.disk_total_bytes >= needs.disk_bytes,
            format!(
                "needs {} MiB, target disk is {} MiB (free space unknown)",
                needs.disk_bytes >> 20,
                target.disk_total_bytes >> 20
            ),
        ),
    }
}

fn criu_item(source: &HostFacts, target: &HostFacts) -> CheckResult {
    let Some(target_criu) = &target.runtimes.criu else {
        return item("criu", false, "target has no criu installed".into());
    };
    if !target.runtimes.criu_check {
        return item(
            "criu",
            false,
            format!("'criu check' fails on the target (criu {target_criu})"),
        );
    }
    match &source.runtimes.criu {
        Some(source_criu) if version(target_criu) < version(source_criu) => item(
            "criu",
            false,
            format!("target criu {target_criu} is older than source criu {source_criu}"),
        ),
        Some(source_criu) => item(
            "criu",
            true,
            format!("target criu {target_criu} >= source {source_criu}, 'criu check' passes"),
        ),
        None => item(
            "criu",
            true,
            format!("target criu {target_criu}, 'criu check' passes"),
        ),
    }
}

/// Whether every item passed.
pub fn passed(report: &[CheckResult]) -> bool {
    report.iter().all(|r| r.ok)
}

/// The baseline to hold a target to: the one recorded when the instance's
/// processes started, else (never started) the source host itself.
pub fn baseline_or_source(baseline: Option<&Baseline>, source: &HostFacts) -> Baseline {
    baseline.cloned().unwrap_or_else(|| Baseline {
        arch: source.arch.clone(),
        kernel: source.kernel.clone(),
        cpu_flags: source.cpu_flags.clone(),
        syscalls: source.syscalls.clone(),
        filesystems: source.filesystems.clone(),
        criu: source.runtimes.criu.clone(),
        ..Default::default()
    })
}

/// The compatibility report for moving `instance` to `target`, from the
/// replicated facts. `disk_bytes` is what the source knows the move needs,
/// `target_room` the target's free disk above its reserve (from gossip).
pub fn report(
    s: &ClusterState,
    instance: &str,
    target: u64,
    stateful: bool,
    disk_bytes: u64,
    target_room: Option<u64>,
) -> Result<Vec<CheckResult>, ApiError> {
    {
        let inst = s
            .instances
            .get(instance)
            .ok_or_else(|| not_found(format!("no instance named '{instance}'")))?;
        let facts = |id: u64| {
            s.members
                .get(&id)
                .and_then(|m| m.facts.clone())
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorKind::Unavailable,
                        format!("member {id} has not reported its host facts yet; retry shortly"),
                    )
                })
        };
        let (source, target) = (facts(inst.owner)?, facts(target)?);
        let baseline = baseline_or_source(inst.baseline.as_ref(), &source);
        let needs = Needs {
            stateful,
            vm: inst.kind == ferry_raft::InstanceKind::Vm,
            cpu_model: inst.spec.vm.as_ref().map(|vm| vm.cpu_model.clone()),
            networked: inst.spec.network == ferry_raft::NetworkMode::Cluster,
            uid: uid_of(&inst.spec),
            image: inst.spec.image.clone(),
            memory_bytes: inst.spec.memory_bytes,
            target_free_memory_bytes: None,
            disk_bytes,
            target_free_disk_bytes: target_room,
        };
        Ok(check(&baseline, &source, &target, &needs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_raft::Runtimes;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn host(flags: &[&str], syscalls: &[&str], fs: &[&str], criu: &str) -> HostFacts {
        HostFacts {
            arch: "x86_64".into(),
            cpu_flags: strings(flags),
            syscalls: strings(syscalls),
            filesystems: strings(fs),
            memory_total_bytes: 8 << 30,
            disk_total_bytes: 100 << 30,
            runtimes: Runtimes {
                runc: Some("1.1.5".into()),
                criu: Some(criu.into()),
                criu_check: true,
                criu_inet: true,
                criu_other_users: true,
                image_layers: true,
                ..Runtimes::default()
            },
            ..Default::default()
        }
    }

    fn baseline() -> Baseline {
        Baseline {
            arch: "x86_64".into(),
            cpu_flags: strings(&["sse2", "avx2"]),
            syscalls: strings(&["openat", "clone3"]),
            filesystems: strings(&["ext4", "proc", "tmpfs"]),
            ..Default::default()
        }
    }

    fn stateful() -> Needs {
        Needs {
            stateful: true,
            disk_bytes: 1 << 20,
            ..Default::default()
        }
    }

    fn failed(report: &[CheckResult]) -> Vec<(&str, &str)> {
        report
            .iter()
            .filter(|r| !r.ok)
            .map(|r| (r.check.as_str(), r.detail.as_str()))
            .collect()
    }

    #[test]
    fn an_equal_host_passes_every_check() {
        let h = host(
            &["sse2", "avx2"],
            &["openat", "clone3"],
            &["ext4", "proc", "tmpfs"],
            "4.1.1",
        );
        let report = check(&baseline(), &h, &h, &stateful());
        assert!(passed(&report), "{report:?}");
        assert_eq!(report.len(), 7);
    }

    #[test]
    fn a_vm_needs_qemu_no_older_than_the_source_and_the_same_accelerator_not_criu() {
        let with_qemu = |version: Option<&str>, accel: &str| {
            let mut h = host(&["sse2"], &["openat"], &["ext4"], "4.1.1");
            h.runtimes.criu = None;
            h.runtimes.qemu = version.map(str::to_string);
            h.runtimes.vm_accel = Some(accel.into());
            h
        };
        let source = with_qemu(Some("10.0.2"), "tcg");
        let vm = Needs {
            vm: true,
            ..stateful()
        };
        let itself = baseline_or_source(None, &source);
        // No CRIU and fewer CPU flags on the target do not matter to a VM.
        let mut same = with_qemu(Some("10.0.2"), "tcg");
        same.cpu_flags.clear();
        let report = check(&itself, &source, &same, &vm);
        assert!(passed(&report), "{report:?}");
        for (target, why) in [
            (with_qemu(None, "tcg"), "no QEMU"),
            (
                with_qemu(Some("9.2.0"), "tcg"),
                "older than the source's 10.0.2",
            ),
            (
                with_qemu(Some("10.1.0"), "kvm"),
                "cannot change accelerator",
            ),
        ] {
            let report = check(&itself, &source, &target, &vm);
            let failed = failed(&report);
            assert!(
                failed.iter().any(|(c, d)| *c == "qemu" && d.contains(why)),
                "{why}: {report:?}"
            );
        }
        // The VM's CPU model: QEMU's answer on the target names what lacks.
        let modelled = Needs {
            cpu_model: Some("qemu64".into()),
            ..vm.clone()
        };
        let mut runs = with_qemu(Some("10.0.2"), "tcg");
        runs.runtimes.vm_cpu_models.insert("qemu64".into(), vec![]);
        let mut lacks = runs.clone();
        lacks
            .runtimes
            .vm_cpu_models
            .insert("qemu64".into(), vec!["sse2".into()]);
        assert!(passed(&check(&itself, &source, &runs, &modelled)));
        for (target, why) in [
            (&lacks, "it lacks sse2"),
            (&same, "has no CPU model qemu64"),
        ] {
            let report = check(&itself, &source, target, &modelled);
            assert!(
                failed(&report)
                    .iter()
                    .any(|(c, d)| *c == "cpu-model" && d.contains(why)),
                "{why}: {report:?}"
            );
        }
        // Stateless, only QEMU's presence counts.
        let stopped = Needs {
            stateful: false,
            ..vm
        };
        let report = check(&itself, &source, &with_qemu(Some("9.2.0"), "kvm"), &stopped);
        assert!(passed(&report), "{report:?}");
    }

    #[test]
    fn a_process_of_another_user_moves_live_only_where_criu_may_checkpoint_it() {
        let h = host(
            &["sse2", "avx2"],
            &["openat", "clone3"],
            &["ext4", "proc", "tmpfs"],
            "4.2.1",
        );
        let mut capless = h.clone();
        capless.runtimes.criu_other_users = false;
        let as_user = Needs {
            uid: Some(1001),
            ..stateful()
        };
        assert!(passed(&check(&baseline(), &h, &h, &as_user)));
        let report = check(&baseline(), &capless, &h, &as_user);
        let failed = failed(&report);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, "criu-users");
        assert!(failed[0].1.contains("uid 1001") && failed[0].1.contains("on the source"));
        // Root, or a stateless move, does not depend on it.
        let root = stateful();
        assert!(passed(&check(&baseline(), &capless, &capless, &root)));
        let stateless = Needs {
            stateful: false,
            ..as_user
        };
        assert!(passed(&check(&baseline(), &capless, &capless, &stateless)));
    }

    #[test]
    fn a_layered_instance_moves_only_where_containers_lie_on_images() {
        let h = host(
            &["sse2", "avx2"],
            &["openat", "clone3"],
            &["ext4", "proc", "tmpfs"],
            "4.2.1",
        );
        let mut flat = h.clone();
        flat.runtimes.image_layers = false;
        let layered = Needs {
            image: Some("sha256:0123456789abcdef0123".into()),
            ..stateful()
        };
        assert!(passed(&check(&baseline(), &flat, &h, &layered)));
        let failed_items = failed(&check(&baseline(), &h, &flat, &layered))
            .into_iter()
            .map(|(c, d)| (c.to_string(), d.to_string()))
            .collect::<Vec<_>>();
        assert_eq!(failed_items.len(), 1, "{failed_items:?}");
        assert_eq!(failed_items[0].0, "image-layers");
        assert!(failed_items[0].1.contains("overlayfs"));
        // An instance of its own tree goes anywhere, stateless too.
        for needs in [
            stateful(),
            Needs {
                stateful: false,
                ..stateful()
            },
        ] {
            assert!(passed(&check(&baseline(), &h, &flat, &needs)));
        }
    }

    #[test]
    fn a_networked_instance_needs_a_criu_that_dumps_sockets_on_both_sides() {
        let h = host(
            &["sse2", "avx2"],
            &["openat", "clone3"],
            &["ext4", "proc", "tmpfs"],
            "4.2.1",
        );
        let mut old = h.clone();
        old.runtimes.criu_inet = false;
        let networked = Needs {
            networked: true,
            ..stateful()
        };
        assert!(passed(&check(&baseline(), &h, &h, &networked)));
        let report = check(&baseline(), &h, &old, &networked);
        let failed = failed(&report);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, "criu-sockets");
        assert!(failed[0].1.contains("on the target cannot"), "{failed:?}");
        // Not networked, or stateless: sockets are not dumped.
        assert!(passed(&check(&baseline(), &h, &old, &stateful())));
        let stateless = Needs {
            stateful: false,
            ..networked
        };
        assert!(passed(&check(&baseline(), &h, &old, &stateless)));
    }

    #[test]
    fn a_missing_cpu_flag_syscall_and_filesystem_are_each_named() {
        let source = host(
            &["sse2", "avx2"],
            &["openat", "clone3"],
            &["ext4", "proc", "tmpfs"],
            "4.1.1",
        );
        let target = host(&["sse2"], &["openat"], &["ext4", "proc"], "4.1.1");
        let report = check(&baseline(), &source, &target, &stateful());
        let failed = failed(&report);
        assert_eq!(failed.len(), 3, "{failed:?}");
        assert!(failed[0].0 == "cpu" && failed[0].1.contains("avx2"));
        assert!(failed[1].0 == "syscalls" && failed[1].1.contains("clone3"));
        assert!(failed[2].0 == "filesystems" && failed[2].1.contains("tmpfs"));
    }

    #[test]
    fn an_older_or_failing_criu_on_the_target_fails_the_check() {
        let source = host(
            &["sse2", "avx2"],
            &["openat", "clone3"],
            &["ext4", "proc", "tmpfs"],
            "4.1.1",
        );
        let older = host(
            &["sse2", "avx2"],
            &["openat", "clone3"],
            &["ext4", "proc", "tmpfs"],
            "4.0",
        );
        assert_eq!(
            failed(&check(&baseline(), &source, &older, &stateful()))[0].0,
            "criu"
        );
        let mut broken = source.clone();
        broken.runtimes.criu_check = false;
        assert_eq!(
            failed(&check(&baseline(), &source, &broken, &stateful()))[0].0,
            "criu"
        );
        let newer = host(
            &["sse2", "avx2"],
            &["openat", "clone3"],
            &["ext4", "proc", "tmpfs"],
            "4.10",
        );
        assert!(passed(&check(&baseline(), &source, &newer, &stateful())));
    }

    #[test]
    fn a_stateless_move_ignores_cpu_syscalls_and_criu() {
        let source = host(&[], &[], &["ext4", "proc", "tmpfs"], "4.1.1");
        let mut target = host(&[], &[], &["ext4", "proc", "tmpfs"], "1.0");
        target.runtimes.criu_check = false;
        let needs = Needs {
            stateful: false,
            ..Default::default()
        };
        assert!(passed(&check(&baseline(), &source, &target, &needs)));
    }

    #[test]
    fn another_architecture_memory_or_disk_shortage_fails() {
        let h = host(
            &["sse2", "avx2"],
            &["openat", "clone3"],
            &["ext4", "proc", "tmpfs"],
            "4.1.1",
        );
        let mut arm = h.clone();
        arm.arch = "aarch64".into();
        assert_eq!(
            failed(&check(&baseline(), &h, &arm, &stateful()))[0].0,
            "architecture"
        );
        let needs = Needs {
            stateful: true,
            vm: false,
            cpu_model: None,
            networked: false,
            uid: None,
            image: None,
            memory_bytes: Some(4 << 30),
            target_free_memory_bytes: Some(1 << 30),
            disk_bytes: 10 << 20,
            target_free_disk_bytes: Some(1 << 20),
        };
        let report = check(&baseline(), &h, &h, &needs);
        let names: Vec<&str> = failed(&report).iter().map(|f| f.0).collect();
        assert_eq!(names, ["memory", "disk"]);
    }
}
