//! A move's final dump of a paused container into its staged images (its
//! memory pages to the target's page server when the move streams them),
//! the dump kept as a checkpoint when the source cannot thaw, and the
//! target's page server: `criu page-server` writing the pages into its
//! staged images while the source's dump sends them. The page server is
//! fed through one end of a socket pair (its stdin, `--ps-socket 0`), so
//! it listens on no port that anything else on the host could reach.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;

use futures::FutureExt;

use super::super::runc::Dump;
use super::{create_dirs, staging, Host};
use crate::api::names::InstanceName;
use crate::driver::{Driver, DriverError, PageServer, RunState};

impl Host {
    pub(super) async fn final_dump(
        &self,
        name: &InstanceName,
        page_server: Option<SocketAddr>,
    ) -> Result<(), DriverError> {
        if crate::hooks::criu_fails(&self.data_dir, "dump") {
            return Err(DriverError::Runtime("CRIU dump failed (test hook)".into()));
        }
        let dir = self.dir(name);
        // Streamed pages leave only the small images here.
        let bytes = match page_server {
            Some(_) => 0,
            None => self.cgroup_memory(name).unwrap_or(u64::MAX),
        };
        let staging = self.fresh_staging(name, bytes).await?;
        let (images, work) = (staging.join("images"), staging.join("work"));
        create_dirs(&[images.clone(), work.clone()]).await?;
        // The images are the instance only if nothing ran since the freeze
        // and nothing runs after it: paused before the dump and still
        // paused after it, or the move must not go on.
        self.expect_paused(name, "before its final dump").await?;
        let keep = Dump {
            page_server,
            ..Dump::leaving_running(self.net.keeps_connections(name))
        };
        self.runc
            .checkpoint(name.as_str(), &images, &work, keep, &dir.runc_log())
            .await?;
        self.expect_paused(name, "after its final dump").await
    }

    /// A source that could not thaw: still paused (nothing ran since the
    /// freeze), it is dumped again into its own images, since the final
    /// dump's pages may have gone to the target; one no longer there (the
    /// host restarted) keeps the final dump it has.
    pub(super) async fn keep_dump(&self, name: &InstanceName) -> Result<(), DriverError> {
        let dir = self.dir(name);
        let state = self.status(name).await?.map(|s| s.state);
        if state == Some(RunState::Paused) {
            self.final_dump(name, None).await?;
        }
        let images = self.images(name);
        if !staging::holds_pages(&images) {
            return Err(DriverError::Runtime(format!(
                "no final dump of '{name}' in {}",
                images.display()
            )));
        }
        self.stop_container(name, true).await?;
        self.keep_images(&images, &dir.checkpoint()).await?;
        self.clear_staging(name).await;
        Ok(())
    }

    pub(super) async fn start_page_server(
        &self,
        name: &InstanceName,
        bytes: u64,
    ) -> Result<PageServer, DriverError> {
        let staging = self.fresh_staging(name, bytes).await?;
        let (images, work) = (staging.join("images"), staging.join("work"));
        create_dirs(&[images.clone(), work.clone()]).await?;
        criu_fed(&["page-server"], (&images, &work), LOG, self.timeout)
    }
}

/// `criu <sub>` on `images` fed through one end of a socket pair (its
/// stdin, `--ps-socket 0`); `done` ends with its exit, and a failure
/// names the reasons in its `log` (in `work`).
pub(super) fn criu_fed(
    sub: &[&'static str],
    (images, work): (&Path, &Path),
    log: &'static str,
    timeout: std::time::Duration,
) -> Result<PageServer, DriverError> {
    let what = sub.first().copied().unwrap_or("criu");
    let unavailable =
        move |e: std::io::Error| DriverError::Runtime(format!("cannot start CRIU's {what}: {e}"));
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(unavailable)?;
    let mut child = tokio::process::Command::new("criu")
        .args(sub)
        .arg("--images-dir")
        .arg(images)
        .arg("--work-dir")
        .arg(work)
        .args(["--ps-socket", "0", "--log-file", log])
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // A move that gives up drops it: then it must end.
        .kill_on_drop(true)
        .spawn()
        .map_err(unavailable)?;
    ours.set_nonblocking(true).map_err(unavailable)?;
    let socket = tokio::net::UnixStream::from_std(ours).map_err(unavailable)?;
    let log = work.join(log);
    let done = async move {
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(DriverError::Runtime(format!(
                "CRIU's {what} failed ({status}): {}",
                reasons(&log).await
            ))),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(DriverError::Runtime(format!(
                "CRIU's {what} did not finish within {timeout:?}; killed ({})",
                reasons(&log).await
            ))),
        }
    };
    Ok(PageServer {
        socket,
        done: done.boxed(),
    })
}

/// The page server's log, in its work dir.
const LOG: &str = "page-server.log";

async fn reasons(log: &Path) -> String {
    let text = tokio::fs::read_to_string(log).await.unwrap_or_default();
    let errors = super::super::runc::criu_errors(&text);
    match errors.is_empty() {
        true => format!("no reason logged in {}", log.display()),
        false => errors.join("; "),
    }
}
