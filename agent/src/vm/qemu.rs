//! QEMU's command line for one VM, built from what the instance needs
//! (pure). Never `-cpu host`: a VM that depends on every flag of its host
//! cannot move; the model is named, and checked against the target.

use std::ffi::OsString;
use std::path::PathBuf;

/// How QEMU runs guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    /// Software emulation: slower, but runs where KVM cannot run an
    /// ordinary guest (this machine kind's KVM is PVM, see the recipe).
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Everything one QEMU process of an instance is started with.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub accel: Accel,
    /// A named CPU model (`qemu64`, `Skylake-Client`, ...).
    pub cpu_model: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Direct kernel boot: kernel, initrd and command line.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// The instance's qcow2 disk (block node `disk0`, virtio-blk).
    pub disk: Option<PathBuf>,
    /// On the cluster network: a tap QEMU makes and a virtio NIC.
    pub nic: Option<super::net::Nic>,
    /// The serial console goes to this file.
    pub serial_log: PathBuf,
    /// QMP listens here (the agent's operations).
    pub qmp_socket: PathBuf,
    /// A second QMP monitor, for status queries while an operation holds
    /// the first (a QMP socket serves one client at a time).
    pub status_socket: Option<PathBuf>,
    /// The QEMU guest agent's port (`org.qemu.guest_agent.0`), served on
    /// this socket: `ferry exec` when the guest runs qemu-ga.
    pub guest_agent_socket: PathBuf,
    /// QEMU writes its pid here (it runs on when the agent restarts).
    pub pid_file: PathBuf,
    /// Wait for an incoming migration (`-incoming defer`), paused (`-S`).
    pub incoming: bool,
    /// Detach once QEMU is up (`-daemonize`), so the VM outlives the agent.
    pub daemonize: bool,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum QemuConfigError {
    #[error("CPU model '{0}' would tie the VM to its host (it could never move); name a model, e.g. --cpu-model qemu64")]
    HostCpu(String),
    #[error("a VM needs at least one CPU and 16 MiB of memory")]
    TooSmall,
}

/// The block node every VM's disk is; migration mirrors it by this name.
pub const DISK_NODE: &str = "disk0";

fn path_arg(prefix: &str, path: &std::path::Path) -> OsString {
    let mut arg = OsString::from(prefix);
    arg.push(path);
    arg
}

impl QemuConfig {
    /// Direct kernel boot: kernel, initrd, and the command line with the
    /// guest's cluster network address added.
    fn boot_args(&self) -> Vec<OsString> {
        let mut argv = Vec::new();
        for (flag, file) in [("-kernel", &self.kernel), ("-initrd", &self.initrd)] {
            if let Some(file) = file {
                argv.extend([OsString::from(flag), file.into()]);
            }
        }
        if self.kernel.is_some() {
            let nic_args = self.nic.as_ref().map(super::net::Nic::kernel_args);
            let append: Vec<String> = self.append.iter().cloned().chain(nic_args).collect();
            if !append.is_empty() {
                argv.extend(["-append".into(), append.join(" ").into()]);
            }
        }
        argv
    }

    pub fn argv(&self) -> Result<Vec<OsString>, QemuConfigError> {
        if matches!(self.cpu_model.as_str(), "host" | "max") {
            return Err(QemuConfigError::HostCpu(self.cpu_model.clone()));
        }
        if self.cpus == 0 || self.memory_mib < 16 {
            return Err(QemuConfigError::TooSmall);
        }
        let mut argv: Vec<OsString> = [
            "-accel",
            self.accel.as_str(),
            "-machine",
            "q35",
            "-cpu",
            &self.cpu_model,
            "-smp",
            &self.cpus.to_string(),
            "-m",
            &format!("{}M", self.memory_mib),
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        argv.extend(self.boot_args());
        if let Some(nic) = &self.nic {
            let tap = format!(
                "tap,id=net0,ifname={},script=no,downscript=no",
                nic.ifname()
            );
            let device = format!("virtio-net-pci,netdev=net0,mac={},id=vnet0", nic.mac());
            argv.extend(["-netdev".into(), tap.into()]);
            argv.extend(["-device".into(), device.into()]);
        }
        argv.extend([
            "-chardev".into(),
            path_arg("file,id=serial0,append=on,path=", &self.serial_log),
        ]);
        argv.extend(["-serial".into(), "chardev:serial0".into()]);
        if let Some(disk) = &self.disk {
            let file = path_arg("driver=file,node-name=file0,filename=", disk);
            argv.extend(["-blockdev".into(), file]);
            let qcow2 = format!("driver=qcow2,file=file0,node-name={DISK_NODE}");
            argv.extend(["-blockdev".into(), qcow2.into()]);
            let device = format!("virtio-blk-pci,drive={DISK_NODE},id=vblk0");
            argv.extend(["-device".into(), device.into()]);
        }
        for socket in std::iter::once(&self.qmp_socket).chain(&self.status_socket) {
            let mut qmp = path_arg("unix:", socket);
            qmp.push(",server=on,wait=off");
            argv.extend(["-qmp".into(), qmp]);
        }
        let agent = path_arg(
            "socket,id=qga0,server=on,wait=off,path=",
            &self.guest_agent_socket,
        );
        argv.extend([
            "-device".into(),
            "virtio-serial-pci,id=vser0".into(),
            "-chardev".into(),
            agent,
            "-device".into(),
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0".into(),
        ]);
        argv.extend(["-pidfile".into(), self.pid_file.clone().into()]);
        if self.incoming {
            argv.extend(["-incoming".into(), "defer".into(), "-S".into()]);
        }
        if self.daemonize {
            argv.push("-daemonize".into());
        }
        Ok(argv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> QemuConfig {
        QemuConfig {
            accel: Accel::Tcg,
            cpu_model: "qemu64".into(),
            cpus: 1,
            memory_mib: 256,
            kernel: Some("/i/vmlinuz".into()),
            initrd: None,
            append: Some("console=ttyS0".into()),
            disk: Some("/i/disk.qcow2".into()),
            serial_log: "/i/console.log".into(),
            qmp_socket: "/i/qmp.sock".into(),
            status_socket: None,
            guest_agent_socket: "/i/qga.sock".into(),
            pid_file: "/i/qemu.pid".into(),
            incoming: false,
            daemonize: false,
            nic: None,
        }
    }

    fn joined(c: &QemuConfig) -> String {
        let argv = c.argv().expect("argv");
        argv.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_command_line_names_the_model_the_disk_node_and_the_control_socket() {
        let line = joined(&config());
        for part in [
            "-accel tcg",
            "-cpu qemu64",
            "-m 256M",
            "-kernel /i/vmlinuz",
            "-append console=ttyS0",
            "node-name=disk0",
            "virtio-blk-pci,drive=disk0",
            "-qmp unix:/i/qmp.sock,server=on,wait=off",
            "path=/i/console.log",
            "socket,id=qga0,server=on,wait=off,path=/i/qga.sock",
            "name=org.qemu.guest_agent.0",
        ] {
            assert!(line.contains(part), "{part} missing in {line}");
        }
        assert!(
            !line.contains("-initrd") && !line.contains("-incoming"),
            "{line}"
        );
        let incoming = QemuConfig {
            incoming: true,
            ..config()
        };
        assert!(joined(&incoming).ends_with("-incoming defer -S"));
    }

    #[test]
    fn on_the_cluster_network_the_guest_gets_a_tap_nic_and_its_address_on_its_command_line() {
        let nic = crate::vm::net::Nic {
            address: "198.19.0.5".parse().unwrap(),
            gateway: "198.19.0.1".parse().unwrap(),
        };
        let line = joined(&QemuConfig {
            nic: Some(nic),
            ..config()
        });
        let tap = format!("-netdev tap,id=net0,ifname={},script=no", nic.ifname());
        for part in [
            "-append console=ttyS0 ferry.ip=198.19.0.5 ferry.gateway=198.19.0.1",
            &tap,
            "virtio-net-pci,netdev=net0,mac=06:fe:c6:13:00:05",
        ] {
            assert!(line.contains(part), "{part} missing in {line}");
        }
        assert!(!joined(&config()).contains("-netdev"));
    }

    #[test]
    fn a_host_cpu_model_is_refused_because_it_could_never_move() {
        for model in ["host", "max"] {
            let c = QemuConfig {
                cpu_model: model.into(),
                ..config()
            };
            assert_eq!(c.argv(), Err(QemuConfigError::HostCpu(model.into())));
        }
        let c = QemuConfig {
            cpus: 0,
            ..config()
        };
        assert_eq!(c.argv(), Err(QemuConfigError::TooSmall));
    }
}
