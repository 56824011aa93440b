//! What an operator installs besides the binary: the systemd unit and
//! the shell completions.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use cluster_tests::{ferry_bin, require_tool};

fn unit_text() -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/ferry.service");
    std::fs::read_to_string(&path).with_context(|| path.display().to_string())
}

#[test]
fn the_service_unit_verifies_and_keeps_instances_running_across_agent_restarts() -> Result<()> {
    if !require_tool("the service unit check", "systemd-analyze") {
        return Ok(());
    }
    let text = unit_text()?;
    // Stopping or restarting the agent must signal the agent only: its
    // containers and VMs run on in process groups of their own.
    assert!(text.contains("\nKillMode=process\n"), "{text}");
    assert!(text.contains("--evacuate-on-stop"), "{text}");
    assert!(text.contains("\nRestart=on-failure\n"), "{text}");
    // The binary under test stands in for /usr/bin/ferry (verify checks
    // that ExecStart's program exists and runs).
    let dir = tempfile::tempdir()?;
    let unit = dir.path().join("ferry.service");
    let bin = ferry_bin();
    std::fs::write(
        &unit,
        text.replace("/usr/bin/ferry", &bin.to_string_lossy()),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    Ok(())
}

#[test]
fn completions_are_generated_for_every_shell_and_name_the_commands() -> Result<()> {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Command::new(ferry_bin())
            .args(["completions", shell])
            .output()?;
        ensure!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout)?;
        // Flags without their dashes: fish spells them `-l target`.
        for word in ["move", "evacuate", "target", "evacuate-on-stop"] {
            ensure!(script.contains(word), "{shell} completions lack {word}");
        }
        if shell == "bash" {
            let dir = tempfile::tempdir()?;
            let file = dir.path().join("ferry.bash");
            std::fs::write(&file, &script)?;
            let check = Command::new("bash").arg("-n").arg(&file).output()?;
            ensure!(
                check.status.success(),
                "bash -n: {}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
    let out = Command::new(ferry_bin())
        .args(["completions", "tcsh"])
        .output()?;
    ensure!(!out.status.success(), "an unknown shell is refused");
    Ok(())
}

fn dpkg_deb(args: &[&str]) -> Result<String> {
    let out = Command::new("dpkg-deb").args(args).output()?;
    ensure!(
        out.status.success(),
        "dpkg-deb {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn the_deb_installs_the_binary_unit_defaults_and_completions_and_names_its_dependencies(
) -> Result<()> {
    if !require_tool("the .deb build", "dpkg-deb") || !require_tool("the .deb build", "objdump") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/build-deb.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--binary")
        .arg(ferry_bin())
        .arg("--out")
        .arg(dir.path())
        .output()?;
    ensure!(
        out.status.success(),
        "build-deb.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = String::from_utf8(out.stdout)?.trim().to_string();
    ensure!(deb.ends_with(".deb"), "printed {deb}");
    let depends = dpkg_deb(&["--field", &deb, "Depends"])?;
    for package in ["libc6 (>= 2.", "runc", "iptables", "iproute2"] {
        ensure!(depends.contains(package), "Depends: {depends}");
    }
    let contents = dpkg_deb(&["--contents", &deb])?;
    for path in [
        "./usr/bin/ferry",
        "./lib/systemd/system/ferry.service",
        "./etc/default/ferry",
        "./usr/share/bash-completion/completions/ferry",
        "./usr/share/zsh/vendor-completions/_ferry",
        "./usr/share/fish/vendor_completions.d/ferry.fish",
    ] {
        ensure!(contents.contains(path), "{path} missing from {contents}");
    }
    ensure!(contents.contains("root/root"), "owned by root: {contents}");
    // The operator's arguments survive an upgrade.
    let control = dir.path().join("control");
    dpkg_deb(&["--control", &deb, &control.to_string_lossy()])?;
    let conffiles = std::fs::read_to_string(control.join("conffiles"))?;
    ensure!(conffiles.trim() == "/etc/default/ferry", "{conffiles}");
    // What it unpacks runs, and the unit it ships is the one verified above.
    let unpacked = dir.path().join("root");
    dpkg_deb(&["--extract", &deb, &unpacked.to_string_lossy()])?;
    let version = Command::new(unpacked.join("usr/bin/ferry"))
        .arg("--version")
        .output()?;
    ensure!(version.status.success(), "ferry --version failed");
    let shipped = std::fs::read_to_string(unpacked.join("lib/systemd/system/ferry.service"))?;
    ensure!(shipped == unit_text()?, "the shipped unit differs");
    Ok(())
}
