//! What this host's QEMU offers, for the host facts: its version and the
//! CPU models it can run under the host's accelerator (QEMU's own answer,
//! `query-cpu-definitions`, from a QEMU with no machine talking QMP on
//! its stdin). Blocking; every run ends within the timeout.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::qemu::Accel;

/// The most missing features kept per CPU model (enough to name why).
const MISSING_KEPT: usize = 6;

/// The accelerator this host's VMs use: KVM where the CPU has hardware
/// virtualisation and /dev/kvm opens; TCG otherwise (this machine kind's
/// KVM is PVM, which runs no ordinary guest, and its CPU shows neither
/// vmx nor svm).
pub fn host_accel() -> Accel {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hardware = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if hardware && kvm {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// "QEMU emulator version 10.0.2 (Debian ...)" → "10.0.2".
pub fn qemu_version(text: &str) -> Option<String> {
    let rest = text.split("version ").nth(1)?;
    rest.split_whitespace().next().map(str::to_string)
}

/// Every CPU model `binary` knows under `accel`, with its unavailable
/// features; empty when QEMU cannot be run.
pub fn cpu_models(binary: &str, accel: Accel, timeout: Duration) -> BTreeMap<String, Vec<String>> {
    let child = Command::new(binary)
        .args(["-machine", "none", "-accel", accel.as_str(), "-nodefaults"])
        .args(["-display", "none", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return BTreeMap::new();
    };
    if let Some(mut stdin) = child.stdin.take() {
        let script = concat!(
            r#"{"execute":"qmp_capabilities"}"#,
            "\n",
            r#"{"execute":"query-cpu-definitions"}"#,
            "\n",
            r#"{"execute":"quit"}"#,
            "\n"
        );
        let _ = stdin.write_all(script.as_bytes());
    }
    let deadline = Instant::now() + timeout;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            tracing::warn!("QEMU did not list its CPU models within {timeout:?}");
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child
        .wait_with_output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    parse_definitions(&String::from_utf8_lossy(&output))
}

/// The `query-cpu-definitions` answer among QMP's output lines.
fn parse_definitions(output: &str) -> BTreeMap<String, Vec<String>> {
    let mut models = BTreeMap::new();
    for line in output.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(definitions) = message["return"].as_array() else {
            continue;
        };
        for definition in definitions {
            let Some(name) = definition["name"].as_str() else {
                continue;
            };
            let missing: Vec<String> = definition["unavailable-features"]
                .as_array()
                .map(|f| {
                    f.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            models.insert(
                name.to_string(),
                missing.into_iter().take(MISSING_KEPT).collect(),
            );
        }
    }
    models
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_and_the_cpu_models_are_read_from_qemu_s_own_words() {
        let banner = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)\nCopyright";
        assert_eq!(qemu_version(banner).as_deref(), Some("10.0.2"));
        assert_eq!(qemu_version("nonsense"), None);
        let output = concat!(
            r#"{"QMP": {"version": {}}}"#,
            "\n",
            r#"{"return": {}}"#,
            "\n",
            r#"{"return": [{"name": "qemu64", "unavailable-features": []},"#,
            r#" {"name": "Skylake-Client", "unavailable-features": ["avx2", "bmi2"]}]}"#,
            "\n"
        );
        let models = parse_definitions(output);
        assert_eq!(models["qemu64"], Vec::<String>::new());
        assert_eq!(models["Skylake-Client"], ["avx2", "bmi2"]);
    }
}
