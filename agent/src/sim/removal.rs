//! Removing a member that still owns instances is refused, naming them;
//! forced, they are marked lost, visibly, and only their record is left.
//! Leftovers do not block operations: a paused copy is thawed by start.

use ferry_raft::ObservedState;

use super::cluster::Sim;
use crate::api::instances::InstanceOp;
use crate::membership::handlers::remove_member;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_owns_instances_is_removed_only_by_force_and_they_show_as_lost() {
    let sim = Sim::start(2).await;
    sim.launch("kept", "n2").await;
    let n1 = sim.agent("n1").clone();
    let refused = remove_member(&n1, "n2", false).await.expect_err("refused");
    assert!(refused.message.contains("still owns kept"), "{refused}");
    assert_eq!(n1.state().read(|s| s.members.len()), 2, "nothing removed");

    remove_member(&n1, "n2", true)
        .await
        .expect("forced removal");
    let (observed, detail) = n1
        .state()
        .read(|s| {
            s.instances
                .get("kept")
                .map(|i| (i.observed, i.detail.clone()))
        })
        .expect("the record stays");
    assert_eq!(observed, ObservedState::Lost);
    assert!(detail.unwrap_or_default().contains("n2 was removed"));
    let listed = match crate::instances::list(&n1) {
        crate::api::ApiReply::Instances(list) => list,
        other => panic!("{other:?}"),
    };
    assert_eq!(listed[0].state, "lost");
    let start = crate::instances::ops::operate(&n1, "kept", InstanceOp::Start, false).await;
    assert!(start
        .expect_err("a lost instance cannot start")
        .message
        .contains("lost"));
    crate::instances::ops::operate(&n1, "kept", InstanceOp::Delete { force: false }, false)
        .await
        .expect("delete drops the record");
    assert!(n1.state().read(|s| s.instances.is_empty()));
}

/// A copy left paused on its owner (a move could neither thaw it nor keep
/// its final dump) does not block `start`: start thaws it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_thaws_a_paused_leftover() {
    use super::fake_driver::Copy;
    use crate::api::names::InstanceName;
    let sim = Sim::start(2).await;
    sim.launch("stuck", "n2").await;
    let n2 = sim.agent("n2").clone();
    let name = InstanceName::parse("stuck").expect("name");
    n2.driver().freeze(&name).await.expect("freeze");
    assert_eq!(sim.world.copy("n2", "stuck"), Some(Copy::Paused));
    let n1 = sim.agent("n1").clone();
    crate::instances::ops::operate(&n1, "stuck", InstanceOp::Start, false)
        .await
        .expect("start thaws it");
    assert_eq!(sim.world.copy("n2", "stuck"), Some(Copy::Running));
    let again = crate::instances::ops::operate(&n1, "stuck", InstanceOp::Start, false).await;
    assert!(again
        .expect_err("now it runs")
        .message
        .contains("already running"));
}
