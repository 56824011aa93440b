//! Host facts: what the compatibility check before a stateful transfer
//! compares (architecture, CPU model and flags, kernel release, implemented
//! syscalls, filesystem types, memory and disk totals, runtime versions).
//!
//! The parsers are pure functions over the text of the files and command
//! outputs they read, so they are tested on literal samples. [`probe`] reads
//! the live host; no error escapes it: an unreadable file yields an empty
//! value and a `tracing::warn` naming the file, a missing runtime binary
//! yields `None` / `false`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_raft::{HostFacts, Runtimes};
use sysinfo::{DiskRefreshKind, Disks, MemoryRefreshKind, System};

/// How long each runtime command (`runc --version`, `criu --version`,
/// `criu check`) may run before it is killed and counted as failed.
pub const RUNTIME_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// **Only for tests.** Names the environment variable holding a
/// comma-separated list of facts to remove from the report after probing,
/// so that tests can make a host look like it lacks something:
/// `cpu:FLAG`, `syscall:NAME`, `fs:TYPE`, `runtime:criu`, `vmcpu:FEATURE` (e.g.
/// `FERRY_TEST_HIDE_FACTS=cpu:avx512f,syscall:openat2,fs:btrfs`).
/// Items that do not parse are ignored with a warning. Never set it on a
/// production host: the facts reported would be false.
pub const HIDE_FACTS_ENV: &str = "FERRY_TEST_HIDE_FACTS";

const CPUINFO: &str = "/proc/cpuinfo";
const KALLSYMS: &str = "/proc/kallsyms";
const FILESYSTEMS: &str = "/proc/filesystems";
const OSRELEASE: &str = "/proc/sys/kernel/osrelease";

/// Collects this host's facts. `data_dir` is the agent's data directory:
/// `disk_total_bytes` is the size of the filesystem holding it.
///
/// All blocking work (file reads, runtime commands) runs in
/// `tokio::task::spawn_blocking`. Nothing fails: see the module docs.
///
/// Syscalls come from the `__x64_sys_*` (x86_64) / `__arm64_sys_*`
/// (aarch64) symbol names in `/proc/kallsyms`. When that yields nothing
/// (file unreadable, kallsyms disabled, other architecture), `syscalls` is
/// left empty and nothing else is set: consumers fall back on comparing
/// `kernel` releases.
///
/// After probing, the items named in [`HIDE_FACTS_ENV`] (tests only) are
/// removed from the report.
pub async fn probe(data_dir: &Path, runtimes: Runtimes) -> HostFacts {
    let dir = data_dir.to_path_buf();
    let mut facts = match tokio::task::spawn_blocking(move || probe_blocking(&dir, runtimes)).await
    {
        Ok(facts) => facts,
        Err(e) => {
            tracing::warn!(error = %e, "host facts probe task failed; reporting only the architecture");
            HostFacts {
                arch: std::env::consts::ARCH.to_string(),
                ..HostFacts::default()
            }
        }
    };
    hide_for_tests(&mut facts);
    crate::hooks::fake_upgrade(data_dir, &mut facts);
    facts
}

/// A test build (cargo feature `test-hooks`) leaves out the items named in
/// [`HIDE_FACTS_ENV`]; the binary users run never reads the variable, so
/// it cannot make a host look compatible with what it is not.
#[cfg(feature = "test-hooks")]
fn hide_for_tests(facts: &mut HostFacts) {
    match std::env::var(HIDE_FACTS_ENV) {
        Ok(spec) => {
            tracing::warn!(var = HIDE_FACTS_ENV, %spec, "test build: hiding host facts");
            apply_hidden_facts(facts, &parse_hide_facts(&spec))
        }
        Err(std::env::VarError::NotPresent) => {}
        Err(e) => tracing::warn!(var = HIDE_FACTS_ENV, error = %e, "ignoring unreadable variable"),
    }
}

#[cfg(not(feature = "test-hooks"))]
fn hide_for_tests(_facts: &mut HostFacts) {}

fn probe_blocking(data_dir: &Path, runtimes: Runtimes) -> HostFacts {
    let arch = std::env::consts::ARCH.to_string();
    let (cpu_model, cpu_flags) = parse_cpuinfo(&read_or_warn(CPUINFO));
    let kernel = read_or_warn(OSRELEASE).trim().to_string();
    let syscalls = parse_kallsyms_syscalls(&read_or_warn(KALLSYMS), &arch);
    if syscalls.is_empty() {
        tracing::warn!(
            file = KALLSYMS,
            arch = %arch,
            "no syscall symbols found; reporting no syscalls (the kernel release is the fallback)"
        );
    }
    let filesystems = parse_filesystems(&read_or_warn(FILESYSTEMS));
    HostFacts {
        arch,
        cpu_model,
        cpu_flags,
        kernel,
        syscalls,
        filesystems,
        memory_total_bytes: memory_total_bytes(),
        disk_total_bytes: disk_total_bytes(data_dir),
        runtimes,
    }
}

fn read_or_warn(path: &str) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => {
            tracing::warn!(file = path, error = %e, "cannot read host facts file; reporting it empty");
            String::new()
        }
    }
}

/// Parses `/proc/cpuinfo` into (CPU model, sorted deduplicated flags).
///
/// x86: "model name" and "flags". arm64: "Features" for the flags; the
/// model is "model name" when present, else built from "CPU implementer" /
/// "CPU part" (e.g. `implementer 0x41 part 0xd0c`). Flags of every
/// processor block are merged.
pub fn parse_cpuinfo(text: &str) -> (String, Vec<String>) {
    let mut model: Option<String> = None;
    let mut implementer: Option<String> = None;
    let mut part: Option<String> = None;
    let mut flags = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "model name" if model.is_none() && !value.is_empty() => model = Some(value.to_string()),
            "CPU implementer" if implementer.is_none() => implementer = Some(value.to_string()),
            "CPU part" if part.is_none() => part = Some(value.to_string()),
            "flags" | "Features" => flags.extend(value.split_whitespace().map(str::to_string)),
            _ => {}
        }
    }
    let model = model.unwrap_or_else(|| match (implementer, part) {
        (Some(i), Some(p)) => format!("implementer {i} part {p}"),
        (None, Some(p)) => format!("part {p}"),
        _ => String::new(),
    });
    flags.sort();
    flags.dedup();
    (model, flags)
}

/// Syscall names implemented by the running kernel, from `/proc/kallsyms`:
/// the `__x64_sys_*` symbols on `x86_64`, `__arm64_sys_*` on `aarch64`, with
/// that prefix stripped; sorted, deduplicated. `arch` is a Rust arch name
/// (`std::env::consts::ARCH`); other architectures yield an empty list.
///
/// Addresses are ignored, so this works when `kptr_restrict` shows them as
/// zeros. Compiler-made variants (`.cold`, `.isra.0`, ...) and the
/// `ni_syscall` stub (meaning "not implemented") are skipped.
pub fn parse_kallsyms_syscalls(text: &str, arch: &str) -> Vec<String> {
    let prefix = match arch {
        "x86_64" => "__x64_sys_",
        "aarch64" => "__arm64_sys_",
        _ => return Vec::new(),
    };
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        .filter_map(|sym| sym.strip_prefix(prefix))
        .filter(|name| {
            !name.is_empty()
                && *name != "ni_syscall"
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Filesystem type names from `/proc/filesystems` ("nodev\tproc",
/// "\text4"): the second column when the first is "nodev", else the first;
/// sorted, deduplicated.
pub fn parse_filesystems(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            match cols.next()? {
                "nodev" => cols.next(),
                name => Some(name),
            }
        })
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The version from `runc --version` output ("runc version 1.1.15" on its
/// first line): `Some("1.1.15")`.
pub fn parse_runc_version(output: &str) -> Option<String> {
    output.lines().find_map(|line| {
        line.trim()
            .strip_prefix("runc version")
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
    })
}

/// The version from `criu --version` output ("Version: 4.1.1"):
/// `Some("4.1.1")`.
pub fn parse_criu_version(output: &str) -> Option<String> {
    output.lines().find_map(|line| {
        line.trim()
            .strip_prefix("Version:")
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
    })
}

/// One item of [`HIDE_FACTS_ENV`] (tests only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HiddenFact {
    /// `cpu:FLAG`
    CpuFlag(String),
    /// `syscall:NAME`
    Syscall(String),
    /// `fs:TYPE`
    Filesystem(String),
    /// `runtime:criu`: report criu as missing.
    Criu,
    /// `vmcpu:FEATURE`: QEMU here lacks this CPU feature (every CPU model
    /// it knows reports it unavailable).
    VmCpuFeature(String),
}

/// Parses the value of [`HIDE_FACTS_ENV`] (tests only): comma-separated
/// `cpu:FLAG`, `syscall:NAME`, `fs:TYPE` items, whitespace around items
/// ignored. Empty items are skipped; any other item that does not parse is
/// ignored with a `tracing::warn`.
pub fn parse_hide_facts(spec: &str) -> Vec<HiddenFact> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let parsed = item.split_once(':').and_then(|(kind, name)| {
            let name = name.trim();
            if name.is_empty() {
                return None;
            }
            let name = name.to_string();
            match kind.trim() {
                "cpu" => Some(HiddenFact::CpuFlag(name)),
                "syscall" => Some(HiddenFact::Syscall(name)),
                "fs" => Some(HiddenFact::Filesystem(name)),
                "runtime" if name == "criu" => Some(HiddenFact::Criu),
                "vmcpu" => Some(HiddenFact::VmCpuFeature(name)),
                _ => None,
            }
        });
        match parsed {
            Some(fact) => out.push(fact),
            None => tracing::warn!(
                var = HIDE_FACTS_ENV,
                item,
                "ignoring item: expected cpu:FLAG, syscall:NAME or fs:TYPE"
            ),
        }
    }
    out
}

/// Removes the given items from `facts` (tests only; see [`HIDE_FACTS_ENV`]).
pub fn apply_hidden_facts(facts: &mut HostFacts, hidden: &[HiddenFact]) {
    for fact in hidden {
        let (list, name) = match fact {
            HiddenFact::CpuFlag(n) => (&mut facts.cpu_flags, n),
            HiddenFact::Syscall(n) => (&mut facts.syscalls, n),
            HiddenFact::Filesystem(n) => (&mut facts.filesystems, n),
            HiddenFact::Criu => {
                facts.runtimes.criu = None;
                facts.runtimes.criu_check = false;
                continue;
            }
            HiddenFact::VmCpuFeature(feature) => {
                for missing in facts.runtimes.vm_cpu_models.values_mut() {
                    missing.push(feature.clone());
                }
                continue;
            }
        };
        list.retain(|x| x != name);
    }
}

fn memory_total_bytes() -> u64 {
    match System::new() {
        Ok(mut sys) => {
            sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
            sys.total_memory()
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read memory total; reporting 0");
            0
        }
    }
}

/// Total bytes of the filesystem holding `path`: the sysinfo disk whose
/// mount point is the longest prefix of the path (resolved through
/// symlinks; a path that does not exist yet is resolved through its nearest
/// existing ancestor). 0 with a warning when none matches. sysinfo does not
/// list pseudo filesystems (tmpfs among them), so a path on a tmpfs is
/// attributed to the disk mounted above it.
fn disk_total_bytes(path: &Path) -> u64 {
    let disks =
        match Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage()) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list disks; reporting disk total 0");
                return 0;
            }
        };
    let resolved = resolve_existing(path);
    let mounts = disks.iter().map(|d| (d.mount_point(), d.total_space()));
    match total_of_longest_mount(mounts, &resolved) {
        Some(total) => total,
        None => {
            tracing::warn!(path = %resolved.display(), "no disk holds the data dir; reporting disk total 0");
            0
        }
    }
}

fn resolve_existing(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut candidate = absolute.as_path();
    loop {
        if let Ok(real) = candidate.canonicalize() {
            // Re-append the part that does not exist yet.
            let rest = absolute.strip_prefix(candidate).unwrap_or(Path::new(""));
            return real.join(rest);
        }
        match candidate.parent() {
            Some(parent) => candidate = parent,
            None => return absolute,
        }
    }
}

/// Among (mount point, total bytes) pairs, the total of the mount point that
/// is the longest (component-wise) prefix of `path`.
fn total_of_longest_mount<'a>(
    mounts: impl IntoIterator<Item = (&'a Path, u64)>,
    path: &Path,
) -> Option<u64> {
    mounts
        .into_iter()
        .filter(|(mount, _)| path.starts_with(mount))
        .max_by_key(|(mount, _)| mount.components().count())
        .map(|(_, total)| total)
}

/// Versions of runc and CRIU and whether `criu check` passes (the
/// container driver's part of the host facts).
pub fn probe_runtimes(timeout: Duration) -> Runtimes {
    let runc = run_with_timeout("runc", &["--version"], timeout)
        .and_then(|out| parse_runc_version(&out.stdout));
    let criu = run_with_timeout("criu", &["--version"], timeout)
        .and_then(|out| parse_criu_version(&out.stdout));
    let criu_check = criu.is_some()
        && match run_with_timeout("criu", &["check"], timeout) {
            Some(out) if out.success => true,
            Some(out) => {
                tracing::warn!(stderr = %out.stderr.trim(), "`criu check` failed");
                false
            }
            None => false,
        };
    Runtimes {
        runc,
        criu,
        criu_check,
        criu_other_users: holds_capability(&read_or_warn("/proc/self/status"), CAP_SYS_RESOURCE),
        ..Runtimes::default()
    }
}

/// Bit of CAP_SYS_RESOURCE in a capability set.
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether the effective set in a `/proc/PID/status` text holds `cap`.
fn holds_capability(status: &str, cap: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|set| set & (1 << cap) != 0)
}

pub(crate) struct CommandOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args` with stdin closed; `None` when it cannot be started
/// (silently when the binary is missing) or does not finish within
/// `timeout` (then it is killed).
pub(crate) fn run_with_timeout(
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> Option<CommandOutput> {
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!(program, "not installed");
            return None;
        }
        Err(e) => {
            tracing::warn!(program, error = %e, "cannot run");
            return None;
        }
    };
    // Read both pipes on their own threads so a chatty child cannot block on
    // a full pipe while we wait for it.
    let stdout = spawn_reader(child.stdout.take());
    let stderr = spawn_reader(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                tracing::warn!(program, ?args, ?timeout, "timed out; killing it");
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                tracing::warn!(program, error = %e, "cannot wait for it");
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    // A grandchild may still hold the pipes open: do not wait past the deadline.
    let grace = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    Some(CommandOutput {
        success: status.success(),
        stdout: stdout.recv_timeout(grace).unwrap_or_default(),
        stderr: stderr.recv_timeout(grace).unwrap_or_default(),
    })
}

fn spawn_reader<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capability_is_read_from_the_effective_set() {
        let status = "Name:\tferry\nCapPrm:\t000001ffffffffff\nCapEff:\t000001fffeffffff\n";
        assert!(!holds_capability(status, CAP_SYS_RESOURCE), "bit 24 clear");
        assert!(holds_capability(status, 21), "CAP_SYS_ADMIN set");
        assert!(!holds_capability("no such line", 21));
    }

    const X86_CPUINFO: &str = "\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme sse2 avx2 aes avx512f
bugs\t\t: spectre_v1

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme sse2 avx2 aes avx512f sha_ni
";

    const ARM64_CPUINFO: &str = "\
processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd0c
CPU revision\t: 1

processor\t: 1
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics
CPU implementer\t: 0x41
CPU part\t: 0xd0c
";

    #[test]
    fn facts_cpuinfo_x86() {
        let (model, flags) = parse_cpuinfo(X86_CPUINFO);
        assert_eq!(model, "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz");
        assert_eq!(
            flags,
            ["aes", "avx2", "avx512f", "fpu", "sha_ni", "sse2", "vme"]
        );
    }

    #[test]
    fn facts_cpuinfo_arm64_falls_back_on_cpu_part() {
        let (model, flags) = parse_cpuinfo(ARM64_CPUINFO);
        assert_eq!(model, "implementer 0x41 part 0xd0c");
        assert_eq!(
            flags,
            ["aes", "asimd", "atomics", "crc32", "evtstrm", "fp", "pmull", "sha1", "sha2"]
        );
        let with_name = format!("model name\t: Neoverse-N1\n{ARM64_CPUINFO}");
        assert_eq!(parse_cpuinfo(&with_name).0, "Neoverse-N1");
        assert_eq!(parse_cpuinfo("CPU part\t: 0xd0c\n").0, "part 0xd0c");
    }

    #[test]
    fn facts_cpuinfo_empty() {
        assert_eq!(parse_cpuinfo(""), (String::new(), Vec::new()));
    }

    const KALLSYMS_SAMPLE: &str = "\
ffffffff81001000 T __pfx___x64_sys_openat
ffffffff81001010 T __x64_sys_openat
ffffffff81001020 T __ia32_sys_openat
ffffffff81001030 t __x64_sys_read
ffffffff81001040 T __x64_sys_clone3
ffffffff81001050 T __x64_sys_openat
ffffffff81001060 t __x64_sys_exit.cold
ffffffff81001070 T __x64_sys_ni_syscall
ffffffff81001080 T __x64_compat_sys_ioctl
ffffffff81001090 T __arm64_sys_write
ffffffffc0001000 t __x64_sys_fake\t[some_module]
ffffffff810010a0 T do_sys_open
";

    #[test]
    fn facts_kallsyms_x86_64() {
        assert_eq!(
            parse_kallsyms_syscalls(KALLSYMS_SAMPLE, "x86_64"),
            ["clone3", "fake", "openat", "read"]
        );
    }

    #[test]
    fn facts_kallsyms_aarch64_and_other_arch() {
        assert_eq!(
            parse_kallsyms_syscalls(KALLSYMS_SAMPLE, "aarch64"),
            ["write"]
        );
        assert!(parse_kallsyms_syscalls(KALLSYMS_SAMPLE, "riscv64").is_empty());
        assert!(parse_kallsyms_syscalls("", "x86_64").is_empty());
    }

    #[test]
    fn facts_kallsyms_with_kptr_restrict() {
        // kptr_restrict hides addresses as zeros; names are still there.
        let text = "\
0000000000000000 T __x64_sys_write
0000000000000000 T __x64_sys_pidfd_open
0000000000000000 T startup_64
";
        assert_eq!(
            parse_kallsyms_syscalls(text, "x86_64"),
            ["pidfd_open", "write"]
        );
    }

    #[test]
    fn facts_filesystems() {
        let text =
            "nodev\tsysfs\nnodev\ttmpfs\n\text4\nnodev\tproc\n\tbtrfs\n\n\text4\nnodev\toverlay\n";
        assert_eq!(
            parse_filesystems(text),
            ["btrfs", "ext4", "overlay", "proc", "sysfs", "tmpfs"]
        );
        assert!(parse_filesystems("").is_empty());
    }

    #[test]
    fn facts_runc_version() {
        let out = "runc version 1.1.15\ncommit: v1.1.15-0-gbc20cb44\nspec: 1.0.2-dev\ngo: go1.22.3\nlibseccomp: 2.5.5\n";
        assert_eq!(parse_runc_version(out).as_deref(), Some("1.1.15"));
        assert_eq!(
            parse_runc_version("runc version 1.1.5+ds1\nspec: 1.0.2-dev\n").as_deref(),
            Some("1.1.5+ds1")
        );
        assert_eq!(parse_runc_version(""), None);
        assert_eq!(parse_runc_version("something else\n"), None);
    }

    #[test]
    fn facts_criu_version() {
        assert_eq!(
            parse_criu_version("Version: 4.1.1\n").as_deref(),
            Some("4.1.1")
        );
        assert_eq!(
            parse_criu_version("Version: 3.17.1\nGitID: v3.17.1\n").as_deref(),
            Some("3.17.1")
        );
        assert_eq!(parse_criu_version(""), None);
        assert_eq!(parse_criu_version("Version:\n"), None);
    }

    #[test]
    fn facts_hide_spec_parses_and_skips_bad_items() {
        let hidden =
            parse_hide_facts(" cpu:avx2, syscall:openat2 ,fs:btrfs,,bogus,net:eth0,cpu:, :x");
        assert_eq!(
            hidden,
            [
                HiddenFact::CpuFlag("avx2".into()),
                HiddenFact::Syscall("openat2".into()),
                HiddenFact::Filesystem("btrfs".into()),
            ]
        );
        assert!(parse_hide_facts("").is_empty());
    }

    #[test]
    fn facts_hide_applies() {
        let mut facts = HostFacts {
            cpu_flags: vec!["aes".into(), "avx2".into()],
            syscalls: vec!["openat".into(), "openat2".into()],
            filesystems: vec!["btrfs".into(), "ext4".into()],
            ..HostFacts::default()
        };
        apply_hidden_facts(
            &mut facts,
            &parse_hide_facts("cpu:avx2,syscall:openat2,fs:btrfs,fs:zfs"),
        );
        assert_eq!(facts.cpu_flags, ["aes"]);
        assert_eq!(facts.syscalls, ["openat"]);
        assert_eq!(facts.filesystems, ["ext4"]);
    }

    #[test]
    fn facts_longest_mount_prefix() {
        let mounts = [
            (Path::new("/"), 100),
            (Path::new("/var"), 200),
            (Path::new("/var/lib/ferry"), 300),
            (Path::new("/var/li"), 400),
        ];
        let pick = |p: &str| total_of_longest_mount(mounts.iter().copied(), Path::new(p));
        assert_eq!(pick("/var/lib/ferry/data"), Some(300));
        assert_eq!(pick("/var/lib/other"), Some(200));
        assert_eq!(pick("/home/x"), Some(100));
        assert_eq!(total_of_longest_mount([], Path::new("/x")), None);
    }

    #[test]
    fn facts_resolve_existing_keeps_missing_tail() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        let missing = dir.path().join("not/yet");
        assert_eq!(resolve_existing(&missing), real.join("not/yet"));
    }

    #[test]
    fn facts_missing_binary_is_none() {
        assert!(run_with_timeout(
            "ferry-no-such-binary-for-tests",
            &["--version"],
            Duration::from_secs(1)
        )
        .is_none());
    }

    #[test]
    fn facts_command_timeout_kills() {
        let start = Instant::now();
        assert!(run_with_timeout("sleep", &["5"], Duration::from_millis(200)).is_none());
        assert!(start.elapsed() < Duration::from_secs(3));
        let out =
            run_with_timeout("sh", &["-c", "echo hi; exit 3"], Duration::from_secs(5)).unwrap();
        assert!(!out.success);
        assert_eq!(out.stdout, "hi\n");
    }

    #[tokio::test]
    async fn facts_probe_live_host() {
        let dir = tempfile::tempdir().unwrap();
        let facts = probe(dir.path(), probe_runtimes(RUNTIME_COMMAND_TIMEOUT)).await;
        assert_eq!(facts.arch, std::env::consts::ARCH);
        if cfg!(target_os = "linux") {
            assert!(!facts.kernel.is_empty());
            assert!(!facts.filesystems.is_empty());
            assert!(facts.memory_total_bytes > 0);
            assert!(facts.disk_total_bytes > 0);
        }
        let mut sorted = facts.cpu_flags.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, facts.cpu_flags);
    }
}
