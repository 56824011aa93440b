//! Applying instance commands to the cluster state: pure and
//! deterministic; only the owner of the current epoch may report what runs
//! (DESIGN.md rule 1).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::ids::NodeId;
use crate::instances::*;
use crate::model::{ClusterState, CommandResult};

impl Instance {
    /// A new instance: epoch 1, nothing observed yet.
    fn new(
        name: &str,
        kind: InstanceKind,
        spec: InstanceSpec,
        owner: NodeId,
        desired: DesiredState,
        now_ms: u64,
    ) -> Self {
        Instance {
            name: name.to_string(),
            kind,
            spec,
            owner,
            epoch: 1,
            desired,
            observed: ObservedState::Pending,
            detail: None,
            checkpointed: false,
            baseline: None,
            snapshots: Vec::new(),
            created_ms: now_ms,
            job: None,
            restarts: 0,
            last_restart: None,
            origin: None,
        }
    }
}

impl ClusterState {
    /// The address a new instance holds: the one it asked for if it is
    /// free and in the range, else the lowest free one. Apply runs in log
    /// order on every member, so two launches never get the same one.
    fn lease(&self, spec: &InstanceSpec) -> Result<Option<Ipv4Addr>, InstanceRejection> {
        if spec.network == NetworkMode::None {
            return match spec.address {
                Some(_) => Err(InstanceRejection::AddressWithoutNetwork),
                None => Ok(None),
            };
        }
        let subnet = self
            .config
            .subnet
            .ok_or(InstanceRejection::NoClusterNetwork)?;
        let held: BTreeSet<Ipv4Addr> = self
            .instances
            .values()
            .filter_map(|i| i.spec.address)
            .collect();
        let Some(wanted) = spec.address else {
            return subnet
                .first_free(&held)
                .map(Some)
                .ok_or_else(|| InstanceRejection::SubnetFull(subnet.to_string()));
        };
        if !subnet.is_leasable(wanted) {
            return Err(InstanceRejection::AddressOutside {
                address: wanted.to_string(),
                subnet: subnet.to_string(),
            });
        }
        if let Some(holder) = self
            .instances
            .values()
            .find(|i| i.spec.address == Some(wanted))
        {
            return Err(InstanceRejection::AddressTaken {
                address: wanted.to_string(),
                holder: holder.name.clone(),
            });
        }
        Ok(Some(wanted))
    }

    /// A new name, with its address leased.
    fn create_instance(&mut self, instance: &mut Instance) -> Result<(), InstanceRejection> {
        let name = &instance.name;
        // Every path under a data dir is built from this name.
        crate::names::InstanceName::parse(name)
            .map_err(|e| InstanceRejection::BadName(e.to_string()))?;
        if self.instances.contains_key(name) {
            return Err(InstanceRejection::Exists(name.clone()));
        }
        let is_vm = instance.kind == InstanceKind::Vm;
        if is_vm != instance.spec.vm.is_some() {
            return Err(InstanceRejection::KindMismatch);
        }
        instance.spec.address = self.lease(&instance.spec)?;
        self.instances.insert(name.clone(), instance.clone());
        Ok(())
    }

    pub(crate) fn apply_instance(
        &mut self,
        cmd: &InstanceCommand,
    ) -> Result<CommandResult, InstanceRejection> {
        match cmd {
            InstanceCommand::Create {
                name,
                kind,
                spec,
                owner,
                desired,
                now_ms,
            } => {
                let mut instance =
                    Instance::new(name, *kind, spec.clone(), *owner, *desired, *now_ms);
                self.create_instance(&mut instance)?;
            }
            InstanceCommand::SetDesired { name, desired } => {
                let instance = self.idle_instance_mut(name)?;
                instance.desired = *desired;
            }
            InstanceCommand::Observe {
                name,
                node,
                epoch,
                observed,
                detail,
                checkpointed,
            } => {
                let instance = self.owned_instance_mut(name, *node, *epoch)?;
                instance.observed = *observed;
                instance.detail = detail.clone();
                instance.checkpointed = *checkpointed;
            }
            InstanceCommand::RecordBaseline {
                name,
                node,
                epoch,
                baseline,
            } => {
                let instance = self.owned_instance_mut(name, *node, *epoch)?;
                instance.baseline = Some(baseline.clone());
            }
            InstanceCommand::AddSnapshot { name, snapshot } => {
                crate::names::SnapshotName::parse(&snapshot.name)
                    .map_err(|e| InstanceRejection::BadName(e.to_string()))?;
                let instance = self.idle_instance_mut(name)?;
                if instance.snapshots.iter().any(|s| s.name == snapshot.name) {
                    return Err(InstanceRejection::SnapshotExists {
                        name: name.clone(),
                        snapshot: snapshot.name.clone(),
                    });
                }
                instance.snapshots.push(snapshot.clone());
            }
            InstanceCommand::RemoveSnapshot { name, snapshot } => {
                let instance = self.idle_instance_mut(name)?;
                let before = instance.snapshots.len();
                instance.snapshots.retain(|s| &s.name != snapshot);
                if instance.snapshots.len() == before {
                    return Err(InstanceRejection::NoSnapshot {
                        name: name.clone(),
                        snapshot: snapshot.clone(),
                    });
                }
            }
            InstanceCommand::Delete { name } => {
                self.idle_instance_mut(name)?;
                self.instances.remove(name);
            }
            InstanceCommand::Restarted {
                name,
                node,
                epoch,
                reason,
            } => self.record_restart(name, *node, *epoch, reason)?,
        }
        Ok(CommandResult::Done)
    }

    fn record_restart(
        &mut self,
        name: &str,
        node: NodeId,
        epoch: u64,
        reason: &str,
    ) -> Result<(), InstanceRejection> {
        let instance = self.owned_instance_mut(name, node, epoch)?;
        instance.restarts = instance.restarts.saturating_add(1);
        instance.last_restart = Some(reason.to_string());
        Ok(())
    }

    fn instance_mut(&mut self, name: &str) -> Result<&mut Instance, InstanceRejection> {
        self.instances
            .get_mut(name)
            .ok_or_else(|| InstanceRejection::NoInstance(name.to_string()))
    }

    /// An instance no job holds: only such may be started, stopped,
    /// snapshotted or deleted by the user.
    fn idle_instance_mut(&mut self, name: &str) -> Result<&mut Instance, InstanceRejection> {
        let instance = self.instance_mut(name)?;
        match instance.job {
            Some(job) => Err(InstanceRejection::Busy {
                name: name.to_string(),
                job,
            }),
            None => Ok(instance),
        }
    }

    fn owned_instance_mut(
        &mut self,
        name: &str,
        node: NodeId,
        epoch: u64,
    ) -> Result<&mut Instance, InstanceRejection> {
        let instance = self.instance_mut(name)?;
        if instance.owner != node {
            return Err(InstanceRejection::NotOwner {
                name: name.to_string(),
                node,
                owner: instance.owner,
            });
        }
        if instance.epoch != epoch {
            return Err(InstanceRejection::StaleEpoch {
                name: name.to_string(),
                epoch,
                current: instance.epoch,
            });
        }
        Ok(instance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Command, Rejection};

    fn create(name: &str, owner: NodeId) -> Command {
        Command::Instance(InstanceCommand::Create {
            name: name.into(),
            kind: InstanceKind::Container,
            spec: InstanceSpec::default(),
            owner,
            desired: DesiredState::Running,
            now_ms: 5,
        })
    }

    fn observe(node: NodeId, epoch: u64, observed: ObservedState) -> Command {
        Command::Instance(InstanceCommand::Observe {
            name: "c1".into(),
            node,
            epoch,
            observed,
            detail: None,
            checkpointed: false,
        })
    }

    fn rejected(s: &mut ClusterState, cmd: &Command) -> InstanceRejection {
        let before = s.clone();
        let result = s.apply(cmd);
        assert_eq!(*s, before, "a rejected command changed the state");
        match result {
            CommandResult::Rejected(Rejection::Instance(r)) => r,
            other => panic!("expected an instance rejection, got {other:?}"),
        }
    }

    fn networked(name: &str, address: Option<Ipv4Addr>) -> Command {
        let mut cmd = create(name, 1);
        if let Command::Instance(InstanceCommand::Create { spec, .. }) = &mut cmd {
            spec.network = NetworkMode::Cluster;
            spec.address = address;
        }
        cmd
    }

    fn address_of(s: &ClusterState, name: &str) -> Option<Ipv4Addr> {
        s.instances[name].spec.address
    }

    #[test]
    fn leases_are_unique_in_the_range_and_freed_with_the_instance() {
        let mut s = ClusterState::default();
        assert_eq!(
            rejected(&mut s, &networked("a", None)),
            InstanceRejection::NoClusterNetwork
        );
        s.config.subnet = Some(crate::subnet::Subnet::parse("198.18.100.0/30").expect("subnet"));
        let only = Ipv4Addr::new(198, 18, 100, 2);
        s.apply(&networked("a", None));
        assert_eq!(address_of(&s, "a"), Some(only));
        // The range is full, and an address held or outside it is refused.
        assert!(matches!(
            rejected(&mut s, &networked("b", None)),
            InstanceRejection::SubnetFull(_)
        ));
        assert!(matches!(
            rejected(&mut s, &networked("b", Some(only))),
            InstanceRejection::AddressTaken { holder, .. } if holder == "a"
        ));
        let gateway = Ipv4Addr::new(198, 18, 100, 1);
        assert!(matches!(
            rejected(&mut s, &networked("b", Some(gateway))),
            InstanceRejection::AddressOutside { .. }
        ));
        let mut plain = create("b", 1);
        if let Command::Instance(InstanceCommand::Create { spec, .. }) = &mut plain {
            spec.address = Some(only);
        }
        assert_eq!(
            rejected(&mut s, &plain),
            InstanceRejection::AddressWithoutNetwork
        );
        // Deleting the holder frees it.
        s.apply(&Command::Instance(InstanceCommand::Delete {
            name: "a".into(),
        }));
        s.apply(&networked("b", Some(only)));
        assert_eq!(address_of(&s, "b"), Some(only));
    }

    #[test]
    fn a_vm_has_its_machine_and_only_a_vm_has_one_and_it_may_lease_an_address() {
        let mut s = ClusterState::default();
        s.config.subnet = Some(crate::subnet::Subnet::parse("198.18.100.0/24").expect("subnet"));
        let with = |kind, vm: Option<VmSpec>, network| {
            let mut cmd = create("v", 1);
            if let Command::Instance(InstanceCommand::Create { kind: k, spec, .. }) = &mut cmd {
                *k = kind;
                spec.vm = vm;
                spec.network = network;
            }
            cmd
        };
        let machine = Some(VmSpec::default());
        let none = NetworkMode::None;
        let cases = [
            (
                InstanceKind::Vm,
                None,
                none,
                InstanceRejection::KindMismatch,
            ),
            (
                InstanceKind::Container,
                machine.clone(),
                none,
                InstanceRejection::KindMismatch,
            ),
        ];
        for (kind, vm, network, why) in cases {
            assert_eq!(rejected(&mut s, &with(kind, vm, network)), why);
        }
        s.apply(&with(InstanceKind::Vm, machine, NetworkMode::Cluster));
        assert_eq!(s.instances["v"].kind, InstanceKind::Vm);
        assert!(s.instances["v"].spec.address.is_some(), "no address leased");
    }

    #[test]
    fn an_instance_or_snapshot_name_that_is_not_a_plain_name_is_refused() {
        let mut s = ClusterState::default();
        for bad in ["../..", "a/b", "", "Upper"] {
            assert!(
                matches!(
                    rejected(&mut s, &create(bad, 1)),
                    InstanceRejection::BadName(_)
                ),
                "{bad}"
            );
        }
        assert!(s.instances.is_empty());
        s.apply(&create("c1", 1));
        let snapshot = Command::Instance(InstanceCommand::AddSnapshot {
            name: "c1".into(),
            snapshot: SnapshotRecord {
                name: "../s".into(),
                stateful: false,
                created_ms: 1,
            },
        });
        assert!(matches!(
            rejected(&mut s, &snapshot),
            InstanceRejection::BadName(_)
        ));
    }

    #[test]
    fn only_the_owner_records_a_restart_and_the_count_grows() {
        let mut s = ClusterState::default();
        s.apply(&create("c1", 2));
        let restarted = |node| {
            Command::Instance(InstanceCommand::Restarted {
                name: "c1".into(),
                node,
                epoch: 1,
                reason: "it exited".into(),
            })
        };
        assert!(matches!(
            rejected(&mut s, &restarted(3)),
            InstanceRejection::NotOwner { .. }
        ));
        assert_eq!(s.apply(&restarted(2)), CommandResult::Done);
        assert_eq!(s.apply(&restarted(2)), CommandResult::Done);
        let i = &s.instances["c1"];
        assert_eq!(
            (i.restarts, i.last_restart.as_deref()),
            (2, Some("it exited"))
        );
    }

    #[test]
    fn created_instance_starts_at_epoch_one_pending() {
        let mut s = ClusterState::default();
        assert_eq!(s.apply(&create("c1", 2)), CommandResult::Done);
        let i = &s.instances["c1"];
        assert_eq!(
            (i.owner, i.epoch, i.observed),
            (2, 1, ObservedState::Pending)
        );
        assert!(matches!(
            rejected(&mut s, &create("c1", 3)),
            InstanceRejection::Exists(_)
        ));
    }

    #[test]
    fn only_the_owner_at_the_current_epoch_may_report() {
        let mut s = ClusterState::default();
        s.apply(&create("c1", 2));
        assert!(matches!(
            rejected(&mut s, &observe(3, 1, ObservedState::Running)),
            InstanceRejection::NotOwner { .. }
        ));
        assert!(matches!(
            rejected(&mut s, &observe(2, 0, ObservedState::Running)),
            InstanceRejection::StaleEpoch { .. }
        ));
        assert_eq!(
            s.apply(&observe(2, 1, ObservedState::Running)),
            CommandResult::Done
        );
        assert_eq!(s.instances["c1"].observed, ObservedState::Running);
    }

    #[test]
    fn an_instance_held_by_a_job_cannot_be_changed_by_the_user() {
        let mut s = ClusterState::default();
        s.apply(&create("c1", 2));
        if let Some(i) = s.instances.get_mut("c1") {
            i.job = Some(7);
        }
        for cmd in [
            InstanceCommand::Delete { name: "c1".into() },
            InstanceCommand::SetDesired {
                name: "c1".into(),
                desired: DesiredState::Stopped,
            },
        ] {
            assert!(matches!(
                rejected(&mut s, &Command::Instance(cmd)),
                InstanceRejection::Busy { job: 7, .. }
            ));
        }
    }

    #[test]
    fn snapshots_are_unique_by_name_and_removable() {
        let mut s = ClusterState::default();
        s.apply(&create("c1", 2));
        let add = Command::Instance(InstanceCommand::AddSnapshot {
            name: "c1".into(),
            snapshot: SnapshotRecord {
                name: "s1".into(),
                stateful: true,
                created_ms: 9,
            },
        });
        assert_eq!(s.apply(&add), CommandResult::Done);
        assert!(matches!(
            rejected(&mut s, &add),
            InstanceRejection::SnapshotExists { .. }
        ));
        let remove = Command::Instance(InstanceCommand::RemoveSnapshot {
            name: "c1".into(),
            snapshot: "s1".into(),
        });
        assert_eq!(s.apply(&remove), CommandResult::Done);
        assert!(matches!(
            rejected(&mut s, &remove),
            InstanceRejection::NoSnapshot { .. }
        ));
    }

    #[test]
    fn delete_removes_the_instance() {
        let mut s = ClusterState::default();
        s.apply(&create("c1", 2));
        let delete = Command::Instance(InstanceCommand::Delete { name: "c1".into() });
        assert_eq!(s.apply(&delete), CommandResult::Done);
        assert!(s.instances.is_empty());
        assert!(matches!(
            rejected(&mut s, &delete),
            InstanceRejection::NoInstance(_)
        ));
    }
}
