//! The driver the agent runs (layer 0): each call goes to the driver of
//! the instance's kind, the container driver or the VM driver. The kind
//! comes from the replicated state (it always holds an instance before
//! any of its files exist, on the owner and on a move's target); an
//! instance the state no longer has (a leftover being removed) is a VM
//! when its files say so.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use ferry_raft::{HostFacts, InstanceKind, InstanceSpec, LiveSettings, Runtimes};

use crate::api::names::{InstanceName, SnapshotName};
use crate::driver::{Driver, DriverError, ExecOutput, LazyDump, PageServer, ProcessExit, Status};

/// The kind of an instance by name, from the replicated state.
pub type KindOf = Box<dyn Fn(&InstanceName) -> Option<InstanceKind> + Send + Sync>;

pub struct Kinds {
    container: Box<dyn Driver>,
    vm: Box<dyn Driver>,
    kind_of: KindOf,
    instances: PathBuf,
}

impl Kinds {
    pub fn new(
        container: Box<dyn Driver>,
        vm: Box<dyn Driver>,
        data_dir: &Path,
        kind_of: KindOf,
    ) -> Self {
        Kinds {
            container,
            vm,
            kind_of,
            instances: data_dir.join("instances"),
        }
    }

    fn of(&self, name: &InstanceName) -> &dyn Driver {
        let kind = (self.kind_of)(name).unwrap_or_else(|| {
            let machine = self.instances.join(name.as_str()).join("machine.json");
            if machine.exists() {
                InstanceKind::Vm
            } else {
                InstanceKind::Container
            }
        });
        self.driver(kind)
    }

    fn driver(&self, kind: InstanceKind) -> &dyn Driver {
        match kind {
            InstanceKind::Container => self.container.as_ref(),
            InstanceKind::Vm => self.vm.as_ref(),
        }
    }

    fn of_spec(&self, spec: &InstanceSpec) -> &dyn Driver {
        match spec.vm {
            Some(_) => self.vm.as_ref(),
            None => self.container.as_ref(),
        }
    }
}

#[async_trait]
impl Driver for Kinds {
    async fn status(&self, name: &InstanceName) -> Result<Option<Status>, DriverError> {
        self.of(name).status(name).await
    }
    fn has_files(&self, name: &InstanceName) -> bool {
        self.of(name).has_files(name)
    }
    fn is_held(&self, name: &InstanceName) -> bool {
        self.of(name).is_held(name)
    }
    fn rootfs(&self, name: &InstanceName) -> PathBuf {
        self.of(name).rootfs(name)
    }
    fn images(&self, name: &InstanceName) -> PathBuf {
        self.of(name).images(name)
    }

    async fn stage_images(&self, name: &InstanceName, bytes: u64) -> Result<PathBuf, DriverError> {
        self.of(name).stage_images(name, bytes).await
    }
    fn kept_files(&self, name: &InstanceName) -> Option<PathBuf> {
        self.of(name).kept_files(name)
    }
    fn staging(&self, name: &InstanceName) -> PathBuf {
        self.of(name).staging(name)
    }
    fn has_checkpoint(&self, name: &InstanceName) -> bool {
        self.of(name).has_checkpoint(name)
    }
    fn last_exit(&self, name: &InstanceName) -> Option<ProcessExit> {
        self.of(name).last_exit(name)
    }
    async fn import_rootfs(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
        source: &Path,
        take: bool,
    ) -> Result<(), DriverError> {
        self.of_spec(spec)
            .import_rootfs(name, spec, source, take)
            .await
    }
    /// Images are a container's.
    async fn layer_on(&self, name: &InstanceName, image: &str) -> Result<bool, DriverError> {
        self.container.layer_on(name, image).await
    }
    async fn store_image(&self, image: &str, tree: &Path, take: bool) -> Result<(), DriverError> {
        self.container.store_image(image, tree, take).await
    }
    fn image_tree(&self, image: &str) -> Option<PathBuf> {
        self.container.image_tree(image)
    }
    fn lays_images(&self) -> bool {
        self.container.lays_images()
    }
    fn lease_image(&self, image: &str) -> Option<crate::driver::ImageLease> {
        self.container.lease_image(image)
    }
    /// Only a container's rootfs is staged (a VM's files are staged by
    /// `vm::stage`).
    async fn stage_rootfs(&self, source: &Path, dest: &Path) -> Result<(), DriverError> {
        self.container.stage_rootfs(source, dest).await
    }
    async fn configure(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
        held: bool,
    ) -> Result<(), DriverError> {
        self.of_spec(spec).configure(name, spec, held).await
    }
    async fn start(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.of(name).start(name).await
    }
    async fn restore(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.of(name).restore(name).await
    }
    async fn stop(&self, name: &InstanceName, force: bool) -> Result<(), DriverError> {
        self.of(name).stop(name, force).await
    }
    async fn checkpoint_stop(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.of(name).checkpoint_stop(name).await
    }
    async fn discard_checkpoint(&self, name: &InstanceName) {
        self.of(name).discard_checkpoint(name).await
    }
    async fn snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
        stateful: bool,
    ) -> Result<(), DriverError> {
        self.of(name).snapshot(name, snap, stateful).await
    }
    async fn restore_snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
        stateful: bool,
    ) -> Result<(), DriverError> {
        self.of(name).restore_snapshot(name, snap, stateful).await
    }
    async fn reset_to_snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
    ) -> Result<(), DriverError> {
        self.of(name).reset_to_snapshot(name, snap).await
    }
    async fn delete_snapshot(&self, name: &InstanceName, snap: &SnapshotName) {
        self.of(name).delete_snapshot(name, snap).await
    }
    async fn freeze(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.of(name).freeze(name).await
    }
    async fn thaw(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.of(name).thaw(name).await
    }
    async fn dump_frozen(
        &self,
        name: &InstanceName,
        page_server: Option<SocketAddr>,
    ) -> Result<(), DriverError> {
        self.of(name).dump_frozen(name, page_server).await
    }
    async fn keep_final_dump(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.of(name).keep_final_dump(name).await
    }
    async fn restore_held(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
    ) -> Result<(), DriverError> {
        self.of_spec(spec).restore_held(name, spec).await
    }
    async fn dump_lazy(&self, name: &InstanceName) -> Result<LazyDump, DriverError> {
        self.of(name).dump_lazy(name).await
    }
    fn end_leftovers(&self) {
        self.container.end_leftovers();
    }
    fn lazy_unavailable(&self, name: &InstanceName) -> Option<String> {
        self.of(name).lazy_unavailable(name)
    }
    async fn lazy_pages_daemon(&self, name: &InstanceName) -> Result<PageServer, DriverError> {
        self.of(name).lazy_pages_daemon(name).await
    }
    async fn restore_held_lazily(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
    ) -> Result<(), DriverError> {
        self.of_spec(spec).restore_held_lazily(name, spec).await
    }
    async fn release_held(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
    ) -> Result<(), DriverError> {
        self.of_spec(spec).release_held(name, spec).await
    }
    async fn remove(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.of(name).remove(name).await
    }
    async fn exec(&self, name: &InstanceName, argv: &[String]) -> Result<ExecOutput, DriverError> {
        self.of(name).exec(name, argv).await
    }
    async fn mounted_filesystems(&self, name: &InstanceName, pid: u32) -> Vec<String> {
        self.of(name).mounted_filesystems(name, pid).await
    }
    fn stateful_unavailable(
        &self,
        name: &InstanceName,
        facts: Option<&HostFacts>,
    ) -> Option<(String, String)> {
        self.of(name).stateful_unavailable(name, facts)
    }
    async fn precopy_unavailable(&self, name: &InstanceName) -> Option<String> {
        self.of(name).precopy_unavailable(name).await
    }
    fn streams_pages(&self, name: &InstanceName) -> bool {
        self.of(name).streams_pages(name)
    }
    fn memory_in_use(&self, name: &InstanceName) -> Option<u64> {
        self.of(name).memory_in_use(name)
    }
    async fn page_server(
        &self,
        name: &InstanceName,
        bytes: u64,
    ) -> Result<PageServer, DriverError> {
        self.of(name).page_server(name, bytes).await
    }
    fn moves_itself(&self, name: &InstanceName) -> bool {
        self.of(name).moves_itself(name)
    }
    fn live_streams(&self, name: &InstanceName) -> &'static [&'static str] {
        self.of(name).live_streams(name)
    }
    fn live_socket(&self, name: &InstanceName, purpose: &str) -> PathBuf {
        self.of(name).live_socket(name, purpose)
    }
    fn live_files(&self, name: &InstanceName) -> PathBuf {
        self.of(name).live_files(name)
    }
    async fn receive_live(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
        settings: &LiveSettings,
    ) -> Result<(), DriverError> {
        self.of_spec(spec).receive_live(name, spec, settings).await
    }
    async fn send_live(
        &self,
        name: &InstanceName,
        relay_dir: &Path,
        settings: &LiveSettings,
        go_on: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<crate::driver::LiveEnd, DriverError> {
        self.of(name)
            .send_live(name, relay_dir, settings, go_on)
            .await
    }
    async fn live_sent(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.of(name).live_sent(name).await
    }
    async fn live_received(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.of(name).live_received(name).await
    }
    /// The container runtimes' facts with QEMU's added.
    async fn runtimes(&self) -> Runtimes {
        let (containers, vms) = tokio::join!(self.container.runtimes(), self.vm.runtimes());
        Runtimes {
            qemu: vms.qemu,
            vm_accel: vms.vm_accel,
            vm_cpu_models: vms.vm_cpu_models,
            ..containers
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::fake_driver::{FakeDriver, World};

    fn name(s: &str) -> InstanceName {
        InstanceName::parse(s).expect("name")
    }

    #[tokio::test]
    async fn each_call_goes_to_the_driver_of_the_instance_kind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let world = World::default();
        let (c_root, v_root) = (dir.path().join("c"), dir.path().join("v"));
        for root in [&c_root, &v_root] {
            for n in ["c1", "v1"] {
                std::fs::create_dir_all(root.join(n)).expect("mkdir");
            }
        }
        let kinds = Kinds::new(
            Box::new(FakeDriver::new("c", &c_root, &world)),
            Box::new(FakeDriver::new("v", &v_root, &world)),
            dir.path(),
            Box::new(|n: &InstanceName| match n.as_str() {
                "v1" => Some(InstanceKind::Vm),
                "c1" => Some(InstanceKind::Container),
                _ => None,
            }),
        );
        let vm = InstanceSpec {
            vm: Some(ferry_raft::VmSpec::default()),
            ..InstanceSpec::default()
        };
        kinds.configure(&name("v1"), &vm, false).await.expect("vm");
        let plain = InstanceSpec::default();
        kinds
            .configure(&name("c1"), &plain, false)
            .await
            .expect("c");
        assert!(v_root.join("v1/config").exists() && !c_root.join("v1/config").exists());
        assert!(c_root.join("c1/config").exists() && !v_root.join("c1/config").exists());
        assert!(kinds.rootfs(&name("v1")).starts_with(&v_root));
        assert!(kinds.rootfs(&name("c1")).starts_with(&c_root));
        // A leftover the state no longer has: a VM by its machine file.
        assert!(kinds.rootfs(&name("gone")).starts_with(&c_root));
        let leftover = dir.path().join("instances/gone");
        std::fs::create_dir_all(&leftover).expect("mkdir");
        std::fs::write(leftover.join("machine.json"), "{}").expect("write");
        assert!(kinds.rootfs(&name("gone")).starts_with(&v_root));
    }
}
