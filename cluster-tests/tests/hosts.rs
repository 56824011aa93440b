//! Host workflows with real agents and containers: cordon, evacuate a
//! member (children are live moves, a few at a time), restore it, and an
//! evacuation that outlives a leader kill and the evacuated agent's
//! restart. A sampler fails a test if two copies of an instance ever run.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use anyhow::{bail, Result};
use cluster_tests::vm::{boots, launch_vm, require_qemu, ticks};
use cluster_tests::{busybox_rootfs, require_container_runtime, wait_for, Cluster};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(30);
/// An evacuation of a handful of small containers ends well within this.
const EVACUATION: Duration = Duration::from_secs(180);

/// Counters c1..cN on `member`.
fn counters_on(cluster: &Cluster, member: &str, n: usize) -> Result<Vec<String>> {
    let rootfs = busybox_rootfs(cluster.root())?;
    let names: Vec<String> = (1..=n).map(|i| format!("c{i}")).collect();
    for name in &names {
        cluster.launch_counter(name, member, &rootfs)?;
    }
    Ok(names)
}

fn owner_of(cluster: &Cluster, via: usize, name: &str) -> Result<String> {
    let show = cluster.ferry_json(via, &["show", name])?;
    Ok(show["node"].as_str().unwrap_or_default().to_string())
}

fn member_state(cluster: &Cluster, via: usize, name: &str) -> Result<String> {
    let members = cluster.members(via)?;
    let member = members.iter().find(|m| m["name"] == name);
    Ok(member
        .and_then(|m| m["state"].as_str())
        .unwrap_or_default()
        .to_string())
}

/// The host job `id` once it is done, as member `via` sees it.
fn wait_host_job(cluster: &Cluster, via: usize, id: u64) -> Result<Value> {
    wait_for(&format!("host job {id} to finish"), EVACUATION, || {
        let job = cluster.ferry_json(via, &["job", "show", &id.to_string()])?;
        if job["state"] == "done" {
            Ok(job)
        } else {
            bail!("{job}")
        }
    })
}

fn item_states(job: &Value) -> Vec<String> {
    job["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| i["state"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn evacuating_a_member_moves_every_instance_live_and_restore_brings_them_back() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    cluster.start_three()?;
    let names = counters_on(&cluster, "n2", 6)?;
    let before: Vec<u64> = names
        .iter()
        .map(|n| cluster.counter(0, n))
        .collect::<Result<_>>()?;
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let sampler = cluster.sampler_of(&refs);

    let plan = cluster.ferry_ok(0, &["cluster", "evacuate", "n2", "--dry-run"])?;
    assert_eq!(plan.matches("live move to").count(), 6, "{plan}");
    assert_eq!(
        member_state(&cluster, 0, "n2")?,
        "online",
        "a dry run changes nothing"
    );

    let out = cluster.ferry_ok(0, &["cluster", "evacuate", "n2", "--parallel", "2"])?;
    assert!(out.contains("moved 6, stopped 0"), "{out}");
    assert!(out.contains("worst downtime"), "{out}");
    assert_eq!(member_state(&cluster, 0, "n2")?, "evacuated");
    for (name, before) in names.iter().zip(&before) {
        assert_ne!(owner_of(&cluster, 0, name)?, "n2", "{name} still on n2");
        // A restarted counter would start again from 1.
        let now = cluster.counter(0, name)?;
        assert!(
            now >= *before,
            "{name}: counter went back from {before} to {now}"
        );
        let show = cluster.ferry_json(0, &["show", name])?;
        assert_eq!(show["origin"], "n2", "{show}");
    }
    let jobs = cluster.ferry_json(0, &["job", "list"])?;
    let jobs = jobs.as_array().unwrap();
    let parent = jobs.iter().find(|j| j["kind"] == "evacuate").unwrap()["id"]
        .as_u64()
        .unwrap();
    let children: Vec<&Value> = jobs.iter().filter(|j| j["kind"] == "migrate").collect();
    assert_eq!(children.len(), 6, "{jobs:?}");
    assert!(children
        .iter()
        .all(|c| c["parent"] == parent && c["phase"] == "Done"));
    // A cordoned member gets no new instance from placement.
    let placed = cluster.ferry_ok(
        0,
        &["launch", "--dry-run", "--rootfs", "/", "new", "--", "true"],
    )?;
    assert!(placed.contains("cordoned"), "{placed}");

    let out = cluster.ferry_ok(0, &["cluster", "restore", "n2"])?;
    assert!(out.contains("moved 6"), "{out}");
    assert_eq!(member_state(&cluster, 0, "n2")?, "online");
    for name in &names {
        assert_eq!(owner_of(&cluster, 0, name)?, "n2");
        assert_eq!(
            cluster.ferry_json(0, &["show", name])?["origin"],
            Value::Null
        );
    }
    let most = sampler.finish();
    assert_eq!(most, 1, "at some moment {most} copies of one instance ran");
    Ok(())
}

#[test]
fn an_evacuation_outlives_a_leader_kill_and_the_evacuated_agent_s_restart() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    cluster.start_three()?;
    let names = counters_on(&cluster, "n2", 4)?;
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let sampler = cluster.sampler_of(&refs);
    let started = cluster.ferry_json(
        0,
        &["cluster", "evacuate", "n2", "--parallel", "1", "--detach"],
    )?;
    let id = started["id"].as_u64().unwrap();
    // The leader (n1, the bootstrap member) dies once the first child runs.
    wait_for("a first child move", CONVERGE, || {
        let job = cluster.ferry_json(0, &["job", "show", &id.to_string()])?;
        match item_states(&job).iter().any(|s| s != "waiting") {
            true => Ok(()),
            false => bail!("{job}"),
        }
    })?;
    cluster.kill(0);
    // A new leader carries on: another item gets under way.
    wait_for("the job to go on under a new leader", EVACUATION, || {
        let job = cluster.ferry_json(2, &["job", "show", &id.to_string()])?;
        let done = item_states(&job)
            .iter()
            .filter(|s| *s != "waiting" && *s != "moving")
            .count();
        match done >= 2 {
            true => Ok(()),
            false => bail!("{job}"),
        }
    })?;
    cluster.restart(0)?;
    cluster.wait_converged(&["n1", "n2", "n3"], CONVERGE)?;
    // The evacuated member's agent dies and comes back mid-job.
    cluster.kill(1);
    cluster.restart(1)?;
    let job = wait_host_job(&cluster, 2, id)?;
    for (item, state) in job["items"]
        .as_array()
        .unwrap()
        .iter()
        .zip(item_states(&job))
    {
        assert!(state == "moved" || state == "stopped", "{item}");
    }
    for name in &names {
        wait_for(&format!("{name} settled"), CONVERGE, || {
            let show = cluster.ferry_json(2, &["show", name])?;
            match show["job"].is_null() {
                true => Ok(()),
                false => bail!("{show}"),
            }
        })?;
        let copies = cluster.running_copies(name);
        let stopped = cluster.ferry_json(2, &["show", name])?["state"] == "stopped";
        assert_eq!(
            copies,
            usize::from(!stopped),
            "{name}: {copies} running copies"
        );
    }
    let most = sampler.finish();
    assert_eq!(most, 1, "at some moment {most} copies of one instance ran");
    Ok(())
}

#[test]
fn an_instance_no_member_can_take_is_stopped_with_its_state_and_restore_resumes_it() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let flag = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        .unwrap_or_else(|| "fpu".into());
    let mut cluster = Cluster::new();
    for other in ["n1", "n3"] {
        let hide = vec![("FERRY_TEST_HIDE_FACTS".into(), format!("cpu:{flag}"))];
        cluster.env_for.insert(other.into(), hide);
    }
    cluster.start_three()?;
    counters_on(&cluster, "n2", 1)?;
    let before = cluster.counter(0, "c1")?;
    let out = cluster.ferry_ok(0, &["cluster", "evacuate", "n2"])?;
    assert!(out.contains("moved 0, stopped 1"), "{out}");
    assert!(
        out.contains(&flag),
        "the reason names the missing flag: {out}"
    );
    let show = cluster.ferry_json(0, &["show", "c1"])?;
    assert_eq!(show["state"], "stopped", "{show}");
    assert_eq!(show["checkpointed"], true, "{show}");
    assert_eq!(cluster.running_copies("c1"), 0);
    // Restore starts it again where it is, from its memory state.
    let out = cluster.ferry_ok(0, &["cluster", "restore", "n2"])?;
    assert!(out.contains("started 1"), "{out}");
    cluster.wait_running(Some("n2"))?;
    let now = cluster.counter(0, "c1")?;
    assert!(now >= before, "counter went back from {before} to {now}");
    Ok(())
}

#[test]
fn cordon_keeps_new_instances_off_and_evacuation_is_refused_if_it_costs_quorum() -> Result<()> {
    let mut cluster = Cluster::new();
    cluster.start_three()?;
    cluster.ferry_ok(0, &["cluster", "cordon", "n1"])?;
    let members = cluster.members(0)?;
    let n1 = members.iter().find(|m| m["name"] == "n1").unwrap();
    assert_eq!(
        (&n1["state"], &n1["cordoned"]),
        (&Value::from("online"), &Value::from(true))
    );
    let placed = cluster.ferry_ok(
        0,
        &["launch", "--dry-run", "--rootfs", "/", "x", "--", "true"],
    )?;
    let n1 = placed
        .lines()
        .find(|l| l.starts_with("n1"))
        .unwrap_or_default();
    assert!(n1.contains("cordoned"), "{placed}");
    cluster.ferry_ok(0, &["cluster", "uncordon", "n1"])?;
    assert_eq!(member_state(&cluster, 0, "n1")?, "online");

    // Evacuating the leader (n1) moves the leadership away from it.
    cluster.ferry_ok(0, &["cluster", "evacuate", "n1"])?;
    assert_eq!(member_state(&cluster, 0, "n1")?, "evacuated");
    wait_for("another leader", CONVERGE, || {
        let members = cluster.members(1)?;
        let leader = members.iter().find(|m| m["leader"] == true);
        match leader.and_then(|m| m["name"].as_str()) {
            Some(name) if name != "n1" => Ok(()),
            other => bail!("leader {other:?}"),
        }
    })?;
    cluster.ferry_ok(1, &["cluster", "restore", "n1"])?;
    assert_eq!(member_state(&cluster, 1, "n1")?, "online");

    cluster.kill(2);
    cluster.wait_liveness("n3", "dead", CONVERGE)?;
    let err = cluster.ferry_err(0, &["cluster", "evacuate", "n2"])?;
    assert!(err.contains("would leave 1 of 3 voters"), "{err}");
    assert!(err.contains("bring back n3"), "{err}");
    assert_eq!(member_state(&cluster, 0, "n2")?, "online");
    Ok(())
}

#[test]
fn an_agent_stopped_with_evacuate_on_stop_hands_its_instances_off_first() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    cluster.agent_flags = vec![
        "--evacuate-on-stop".into(),
        "--stop-timeout".into(),
        "120s".into(),
    ];
    cluster.start_three()?;
    let names = counters_on(&cluster, "n2", 3)?;
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let sampler = cluster.sampler_of(&refs);
    let pid = cluster.agents[1].pid().unwrap();
    cluster_tests::run_tool("kill", &["-TERM", &pid.to_string()])?;
    let code = cluster.wait_exit(1, EVACUATION)?;
    assert_eq!(code, Some(0), "the agent's exit after evacuating");
    for name in &names {
        assert_ne!(owner_of(&cluster, 0, name)?, "n2", "{name} still on n2");
        assert_eq!(cluster.running_copies(name), 1, "{name}");
    }
    assert_eq!(member_state(&cluster, 0, "n2")?, "evacuated");
    let most = sampler.finish();
    assert_eq!(most, 1, "at some moment {most} copies of one instance ran");
    Ok(())
}

/// Follow upgrade job `id` through any live member, starting again every
/// agent its hook stopped, until it is done; also the agents restarted.
fn supervise_upgrade(cluster: &mut Cluster, id: u64) -> Result<(Value, Vec<usize>)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let mut restarted = Vec::new();
    loop {
        restarted.extend(cluster.restart_exited()?);
        let via = (0..cluster.agents.len()).find(|i| cluster.agents[*i].is_running());
        let job = via.and_then(|i| {
            cluster
                .ferry_json(i, &["job", "show", &id.to_string()])
                .ok()
        });
        if let Some(job) = job.clone().filter(|j| j["state"] == "done") {
            return Ok((job, restarted));
        }
        if std::time::Instant::now() > deadline {
            bail!("upgrade job {id} did not finish: {job:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn stages(job: &Value) -> Vec<(String, String)> {
    job["upgrade"]["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().into(),
                m["stage"].as_str().unwrap_or_default().into(),
            )
        })
        .collect()
}

#[test]
fn a_rolling_upgrade_takes_each_member_in_turn_and_brings_its_instances_home() -> Result<()> {
    if !require_container_runtime() || !require_qemu() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    cluster.start_three()?;
    let rootfs = busybox_rootfs(cluster.root())?;
    for (name, member) in [("c1", "n1"), ("c2", "n2"), ("c3", "n3")] {
        cluster.launch_counter(name, member, &rootfs)?;
    }
    // And a VM on n2: it leaves live with the containers and comes back.
    launch_vm(&cluster, "n2")?;
    let vm_console = cluster.agents[1].data_dir.join("instances/v1/console.log");
    wait_for(
        "the VM to count",
        Duration::from_secs(90),
        || match ticks(&vm_console).last() {
            Some(n) if *n >= 10 => Ok(()),
            _ => bail!("the VM on n2 has not counted to 10"),
        },
    )?;
    let vm_before = *ticks(&vm_console).last().unwrap();
    let before: Vec<u64> = ["c1", "c2", "c3"]
        .iter()
        .map(|n| cluster.counter(0, n))
        .collect::<Result<_>>()?;
    let sampler = cluster.sampler_of(&["c1", "c2", "c3"]);
    // The "new kernel": a test build reports it after the agent restarts.
    let hook = r#"echo 6.99.0-ferry > "$FERRY_DATA_DIR/test-kernel"; kill "$FERRY_AGENT_PID""#;
    let started = cluster.ferry_json(0, &["cluster", "upgrade", "--hook", hook, "--detach"])?;
    let id = started["id"].as_u64().unwrap();
    let (job, restarted) = supervise_upgrade(&mut cluster, id)?;
    assert_eq!(restarted, [0, 1, 2], "each hook stopped its agent, in turn");
    let want: Vec<(String, String)> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| (n.to_string(), "done".into()))
        .collect();
    assert_eq!(stages(&job), want, "{job}");
    for member in job["upgrade"]["members"].as_array().unwrap() {
        let diff = member["diff"].to_string();
        assert!(
            diff.contains("6.99.0-ferry") && diff.contains("+ferry_test_upgraded"),
            "{member}"
        );
    }
    cluster.wait_converged(&["n1", "n2", "n3"], CONVERGE)?;
    for (i, (name, home)) in [("c1", "n1"), ("c2", "n2"), ("c3", "n3")]
        .iter()
        .enumerate()
    {
        assert_eq!(
            owner_of(&cluster, 0, name)?,
            *home,
            "{name} is not back home; the upgrade: {job}"
        );
        let now = cluster.counter(0, name)?;
        assert!(
            now >= before[i],
            "{name}: counter went back from {} to {now}",
            before[i]
        );
    }
    assert_eq!(owner_of(&cluster, 0, "v1")?, "n2", "v1 is not back home");
    // Its counter went on from where it was (a reboot would start at 1).
    wait_for(
        "the VM to count on n2",
        Duration::from_secs(30),
        || match ticks(&vm_console).first() {
            Some(first) if *first > vm_before => Ok(()),
            first => bail!("the VM's first tick back on n2 is {first:?}, before {vm_before}"),
        },
    )?;
    assert_eq!(boots(&vm_console), 0, "the VM booted again");
    for member in ["n1", "n2", "n3"] {
        assert_eq!(member_state(&cluster, 0, member)?, "online");
    }
    let most = sampler.finish();
    assert_eq!(most, 1, "at some moment {most} copies of one instance ran");
    Ok(())
}

#[test]
fn a_hook_failing_on_the_second_member_stops_the_upgrade_there_and_resume_goes_on() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    cluster.start_three()?;
    counters_on(&cluster, "n2", 1)?;
    std::fs::write(cluster.agents[1].data_dir.join("broken"), "")?;
    let hook = r#"if [ -e "$FERRY_DATA_DIR/broken" ]; then echo "no space for the new kernel" >&2; exit 3; fi"#;
    let err = cluster.ferry_err(
        0,
        &[
            "cluster",
            "upgrade",
            "--hook",
            hook,
            "--members",
            "n1,n2,n3",
        ],
    )?;
    assert!(err.contains("stopped at n2"), "{err}");
    let jobs = cluster.ferry_json(0, &["job", "list"])?;
    let upgrade = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "upgrade")
        .cloned()
        .unwrap();
    let id = upgrade["id"].as_u64().unwrap();
    let want: Vec<(String, String)> = [("n1", "done"), ("n2", "failed"), ("n3", "waiting")]
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect();
    assert_eq!(stages(&upgrade), want, "{upgrade}");
    let detail = upgrade["upgrade"]["members"][1]["detail"].to_string();
    assert!(
        detail.contains("code 3") && detail.contains("no space"),
        "{detail}"
    );
    // Left as it is: n1 restored, n2 still evacuated, n3 untouched.
    assert_eq!(member_state(&cluster, 0, "n1")?, "online");
    assert_eq!(member_state(&cluster, 0, "n2")?, "evacuated");
    assert_eq!(member_state(&cluster, 0, "n3")?, "online");
    assert_ne!(owner_of(&cluster, 0, "c1")?, "n2");
    // Fixed, it goes on from where it stopped.
    std::fs::remove_file(cluster.agents[1].data_dir.join("broken"))?;
    let out = cluster.ferry_ok(0, &["cluster", "upgrade", "--resume", &id.to_string()])?;
    assert!(out.contains("3 of 3 members upgraded"), "{out}");
    assert_eq!(owner_of(&cluster, 0, "c1")?, "n2");
    Ok(())
}
