//! Launch uploads against hostile or racing requests: names are checked
//! where they are decoded, and two launches of one name never touch each
//! other's files.

use std::time::Duration;

use ferry_transport::endpoint::Expect;
use ferry_transport::frame::{read_frame, MAX_FRAME};
use serde::Serialize;

use super::cluster::Sim;
use crate::api::instances::LaunchRequest;
use crate::api::names::InstanceName;
use crate::api::Response;

/// `Request` as a peer without the typed name would encode it: the same
/// variants in the same order, the upload's name a plain string.
#[derive(Serialize)]
#[allow(dead_code)]
enum RawRequest {
    Raft(()),
    Join(()),
    Ping,
    Api(()),
    Upload(RawUpload),
}

#[derive(Serialize)]
struct RawUpload {
    name: String,
    command: Vec<String>,
    memory_bytes: Option<u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_named_outside_the_instances_dir_is_refused_and_deletes_nothing() {
    let sim = Sim::start(2).await;
    let (n1, n2) = (sim.agent("n1"), sim.agent("n2"));
    let fake_host = n2.data_dir().root().join("fake-host");
    let victim = fake_host.join("..").join("victim");
    std::fs::create_dir_all(&victim).expect("victim dir");
    std::fs::write(victim.join("keep"), b"precious").expect("victim file");
    let request = RawRequest::Upload(RawUpload {
        name: "../victim".into(),
        command: vec!["true".into()],
        memory_bytes: None,
    });
    let (_send, mut recv) = n1
        .pool()
        .open_stream(
            n2.addr(),
            &Expect::Node("n2".into()),
            &request,
            Duration::from_secs(5),
        )
        .await
        .expect("channel to n2");
    let reply: Response = read_frame(&mut recv, MAX_FRAME).await.expect("an answer");
    match reply {
        Response::Error(e) => assert!(e.message.contains("invalid instance name"), "{e}"),
        other => panic!("accepted: {other:?}"),
    }
    assert_eq!(
        std::fs::read(victim.join("keep")).ok().as_deref(),
        Some(&b"precious"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_launches_of_one_name_one_is_refused_and_the_files_are_the_winners() {
    let sim = Sim::start(2).await;
    let n1 = sim.agent("n1").clone();
    let mut launches = Vec::new();
    for side in ["a", "b"] {
        let rootfs = tempfile::tempdir().expect("rootfs");
        std::fs::write(rootfs.path().join("side"), side).expect("marker");
        std::fs::write(rootfs.path().join("bulk"), vec![1u8; 2_000_000]).expect("bulk");
        let request = LaunchRequest {
            name: InstanceName::parse("twin").expect("name"),
            rootfs: rootfs.path().display().to_string(),
            target: Some("n2".into()),
            memory_bytes: None,
            command: vec!["sleep".into(), "1000".into()],
            unconfined: false,
            restart: Default::default(),
            evacuate: Default::default(),
            network: None,
            ip: None,
            vm: None,
            image: None,
        };
        let agent = n1.clone();
        launches.push(tokio::spawn(async move {
            let result = crate::instances::launch::launch(&agent, request).await;
            (side, result, rootfs)
        }));
    }
    let mut won = Vec::new();
    for launch in launches {
        let (side, result, _rootfs) = launch.await.expect("launch task");
        match result {
            Ok(_) => won.push(side),
            Err(e) => assert!(e.message.contains("already exists"), "{side}: {e}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one launch wins: {won:?}");
    let name = InstanceName::parse("twin").expect("name");
    let marker = sim.agent("n2").driver().rootfs(&name).join("side");
    assert_eq!(
        std::fs::read_to_string(marker).ok().as_deref(),
        Some(won[0])
    );
}
