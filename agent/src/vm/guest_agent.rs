//! `ferry exec` into a VM: the QEMU guest agent (qemu-ga, run by the
//! guest) on the VM's virtio port `org.qemu.guest_agent.0`, which QEMU
//! serves on a unix socket in the instance's dir. Spoken through the
//! `qapi` crate. The guest is not trusted: every call has a timeout and
//! what one connection may read is capped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qapi::futures::QgaStreamTokio;
use qapi::qga;
use tokio::io::{AsyncReadExt, ReadHalf, WriteHalf};
use tokio::net::UnixStream;

use crate::driver::ExecOutput;

/// qemu-ga keeps at most 16 MiB of each output stream; base64 and JSON
/// make that about 22 MiB each. Reading stops past this.
const MAX_READ: u64 = 48 << 20;
/// A guest that runs qemu-ga answers a sync at once; one that does not
/// never answers.
const SYNC_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum GuestAgentError {
    #[error("cannot reach the VM's guest agent port {}: {reason} (is the VM running?)", path.display())]
    Connect { path: PathBuf, reason: String },
    #[error("the guest does not answer on its guest agent port: ferry exec into a VM needs the QEMU guest agent running in the guest (Debian: apt install qemu-guest-agent)")]
    NoAgent,
    #[error("the guest agent refused or failed '{command}': {reason}")]
    Command {
        command: &'static str,
        reason: String,
    },
    #[error("the command did not end within {0:?} in the guest (it runs on there)")]
    TimedOut(Duration),
}

/// Run `argv` in the guest, wait for it to end (at most `timeout`) and
/// return its exit code and output.
pub async fn exec(
    socket: &Path,
    argv: &[String],
    timeout: Duration,
) -> Result<ExecOutput, GuestAgentError> {
    let (path, args) = argv.split_first().ok_or(GuestAgentError::Command {
        command: "guest-exec",
        reason: "no command given".into(),
    })?;
    let mut agent = connect_synced(socket).await?;
    let started = agent.execute(qga::guest_exec {
        path: path.clone(),
        arg: Some(args.to_vec()),
        env: None,
        input_data: None,
        capture_output: Some(qga::GuestExecCaptureOutput::flag(true)),
    });
    let pid = within(timeout, "guest-exec", started).await?.pid;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let status = agent.execute(qga::guest_exec_status { pid });
        let status = within(left, "guest-exec-status", status).await?;
        if status.exited {
            return Ok(output(status));
        }
        if tokio::time::Instant::now() + POLL >= deadline {
            return Err(GuestAgentError::TimedOut(timeout));
        }
        tokio::time::sleep(POLL).await;
    }
}

type Agent = qapi::futures::QapiStream<
    QgaStreamTokio<tokio::io::Take<ReadHalf<UnixStream>>>,
    QgaStreamTokio<WriteHalf<UnixStream>>,
>;

/// A connection whose first exchange, a sync with an id of this call's,
/// came back right. A reply an earlier client left in flight answers the
/// sync wrongly; then the connection is dropped (QEMU drops what the guest
/// writes while no client is connected) and made again.
async fn connect_synced(socket: &Path) -> Result<Agent, GuestAgentError> {
    let seed = i64::from(std::process::id()) << 24 ^ (crate::clock::now_ms() as i64 & 0xff_ffff);
    for id in seed..seed + 3 {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| GuestAgentError::Connect {
                path: socket.to_path_buf(),
                reason: e.to_string(),
            })?;
        let (read, write) = tokio::io::split(stream);
        let mut agent = QgaStreamTokio::open_split(read.take(MAX_READ), write);
        let sync = agent.execute(qga::guest_sync { id });
        match tokio::time::timeout(SYNC_TIMEOUT, sync).await {
            Err(_) => return Err(GuestAgentError::NoAgent),
            Ok(Ok(answer)) if answer == id => return Ok(agent),
            Ok(_) => tokio::time::sleep(POLL).await,
        }
    }
    Err(GuestAgentError::NoAgent)
}

async fn within<T>(
    timeout: Duration,
    command: &'static str,
    call: impl std::future::Future<Output = Result<T, qapi::ExecuteError>>,
) -> Result<T, GuestAgentError> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(GuestAgentError::TimedOut(timeout)),
        Ok(Err(e)) => Err(GuestAgentError::Command {
            command,
            reason: e.to_string(),
        }),
        Ok(Ok(answer)) => Ok(answer),
    }
}

/// A signal's death is reported as the shell does: 128 + signal.
fn output(status: qga::GuestExecStatus) -> ExecOutput {
    let code = match (status.exitcode, status.signal) {
        (Some(code), _) => code as i32,
        (None, Some(signal)) => 128 + signal as i32,
        (None, None) => -1,
    };
    ExecOutput {
        code,
        stdout: status.out_data.unwrap_or_default(),
        stderr: status.err_data.unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_without_an_agent_gets_an_error_naming_what_to_install() {
        assert!(GuestAgentError::NoAgent
            .to_string()
            .contains("apt install qemu-guest-agent"));
    }

    #[test]
    fn a_killed_command_reports_128_plus_its_signal() {
        let status = qga::GuestExecStatus {
            err_data: None,
            err_truncated: None,
            exitcode: None,
            out_data: Some(b"partial".to_vec()),
            out_truncated: None,
            signal: Some(9),
            exited: true,
        };
        let out = output(status);
        assert_eq!((out.code, out.stdout.as_slice()), (137, &b"partial"[..]));
    }

    #[tokio::test]
    async fn a_port_nobody_answers_on_is_a_guest_without_an_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        // What QEMU does when the guest runs no agent: accept, never answer.
        let held = tokio::spawn(async move { listener.accept().await });
        let err = exec(&socket, &["true".into()], Duration::from_secs(10))
            .await
            .expect_err("no agent");
        assert!(matches!(err, GuestAgentError::NoAgent), "{err}");
        held.abort();
    }

    #[tokio::test]
    async fn no_socket_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("qga.sock");
        let err = exec(&socket, &["true".into()], Duration::from_secs(1))
            .await
            .expect_err("no socket");
        assert!(err.to_string().contains("qga.sock"), "{err}");
    }
}
