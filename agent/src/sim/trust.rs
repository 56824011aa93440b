//! Only voters hold the CA key: a learner has none, a join that reaches a
//! learner is signed by a voter, promotion brings the key and demotion
//! takes it away, and a voter hands it to voters only.

use std::collections::BTreeSet;

use openraft::ChangeMembers;

use super::cluster::{wait_for, Sim};
use crate::identity::duty::{role_in, Role};
use crate::identity::hand_over_ca_key;
use crate::node::Agent;
use crate::token::JoinToken;

fn role(agent: &Agent) -> Role {
    let metrics = agent.raft().metrics();
    let m = metrics.borrow();
    let membership = m.membership_config.membership();
    role_in(
        agent.id(),
        &membership.voter_ids().collect(),
        &membership.learner_ids().collect(),
    )
}

/// Whether the agent holds the key, in memory and on disk alike (`None`
/// while the two differ, as they do for a moment when the key changes).
fn key_held(agent: &Agent) -> Option<bool> {
    let on_disk = agent.data_dir().root().join("tls/ca.key").exists();
    (on_disk == agent.keyring().holds_key()).then_some(on_disk)
}

fn holds_key(agent: &Agent) -> bool {
    key_held(agent) == Some(true)
}

fn holds_no_key(agent: &Agent) -> bool {
    key_held(agent) == Some(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_holds_no_ca_key_and_a_join_through_it_is_signed_by_a_voter() {
    let mut sim = Sim::start_with(2, 1).await;
    let n2 = sim.agent("n2").clone();
    wait_for(20, "n2 a learner", || role(&n2) == Role::Learner).await;
    assert!(holds_key(sim.agent("n1")));
    assert!(holds_no_key(&n2), "a learner holds the CA key");

    // A token that names only the learner's address.
    let mut token = JoinToken::decode(&sim.token("n3").await).expect("token");
    token.addrs = vec![n2.addr().to_string()];
    let n3 = sim.add("n3", Some(token.encode()), 1).await;
    sim.settled().await;
    wait_for(20, "n3 a learner", || role(&n3) == Role::Learner).await;
    assert!(holds_no_key(&n3), "a joiner got the CA key");

    let admin = n3.data_dir().load_credentials("admin").expect("admin");
    let serial = ferry_transport::pki::serial_of_pem(&admin.cert_pem).expect("serial");
    let n1 = sim.agent("n1").clone();
    let recorded = n1.state().read(|s| {
        s.members
            .get(&n3.id())
            .is_some_and(|m| m.admin_serials.contains(&serial))
    });
    assert!(
        recorded,
        "the joiner's admin certificate is recorded with it"
    );

    let refused = hand_over_ca_key(&n1, "n2").expect_err("a learner asked for the key");
    assert!(refused.message.contains("not a voter"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_key_follows_promotion_and_demotion() {
    let sim = Sim::start_with(3, 2).await;
    let (n1, n2, n3) = (
        sim.agent("n1").clone(),
        sim.agent("n2").clone(),
        sim.agent("n3").clone(),
    );
    wait_for(20, "n2 promoted, with the key", || {
        role(&n2) == Role::Voter && holds_key(&n2)
    })
    .await;
    wait_for(20, "n3 a learner", || role(&n3) == Role::Learner).await;
    assert!(holds_no_key(&n3));

    let leader = sim
        .agents
        .iter()
        .find(|a| a.raft().metrics().borrow().current_leader == Some(a.id()))
        .expect("a leader")
        .clone();
    let voters = BTreeSet::from([n1.id(), n3.id()]);
    leader
        .raft()
        .change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
        .await
        .expect("swap n2 for n3");

    wait_for(20, "n3 promoted, with the key", || {
        role(&n3) == Role::Voter && holds_key(&n3)
    })
    .await;
    wait_for(20, "n2 demoted, without the key", || {
        role(&n2) == Role::Learner && holds_no_key(&n2)
    })
    .await;
    let refused = hand_over_ca_key(&n1, "n2").expect_err("a demoted member asked for the key");
    assert!(refused.message.contains("not a voter"), "{refused}");
    assert!(hand_over_ca_key(&n1, "n3").is_ok());
}
