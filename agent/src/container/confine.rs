//! The default confinement of a container: a seccomp filter that refuses
//! (EPERM) what a container must never do to its host, and a limit on its
//! processes. Everything else is allowed, so ordinary programs and CRIU
//! (which dumps and restores the filter with the tasks) work unchanged.
//! `--security-profile unconfined` drops the filter.

use oci_spec::runtime::{
    Arch, LinuxPidsBuilder, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompBuilder,
    LinuxSyscallBuilder,
};

/// Processes (and threads) one container may have at once.
pub const PIDS_LIMIT: i64 = 4096;

/// Syscalls a confined container is refused.
pub const DENIED: &[&str] = &[
    // Kernel modules and replacing the kernel.
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    // The host's power, swap, clock and accounting.
    "reboot",
    "swapon",
    "swapoff",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "acct",
    // New mounts (of host filesystems, or over the container's own).
    "mount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsmount",
    "move_mount",
    "open_tree",
    // Kernel keyrings, BPF, perf, raw I/O ports, handles past mounts.
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "iopl",
    "ioperm",
    "open_by_handle_at",
    "lookup_dcookie",
    "quotactl",
    "nfsservctl",
];

fn native_arches() -> Vec<Arch> {
    match std::env::consts::ARCH {
        "aarch64" => vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm],
        _ => vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
    }
}

/// The default filter: allow, except [`DENIED`], which fails with EPERM.
pub fn default_seccomp() -> Result<LinuxSeccomp, String> {
    let denied = LinuxSyscallBuilder::default()
        .names(DENIED.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(1u32)
        .build()
        .map_err(|e| e.to_string())?;
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(native_arches())
        .syscalls(vec![denied])
        .build()
        .map_err(|e| e.to_string())
}

pub fn pids_limit() -> Result<oci_spec::runtime::LinuxPids, String> {
    LinuxPidsBuilder::default()
        .limit(PIDS_LIMIT)
        .build()
        .map_err(|e| e.to_string())
}
