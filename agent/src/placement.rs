//! Placement (layer 0, pure): which member should take an instance. Every
//! member is first filtered (alive, not cordoned, facts known, runtime
//! present, and for an existing instance the same compatibility check a
//! move runs: architecture, CPU flags, syscalls, filesystems, CRIU, free
//! memory, free disk), then the survivors are weighed. Every rejected
//! member keeps its reason, which `--dry-run` prints.

use std::collections::BTreeMap;

use ferry_raft::{Baseline, ClusterState, HostFacts, Instance, InstanceSpec, NodeId};

use crate::migration::compat;

/// What placement knows of one member.
#[derive(Clone, Debug)]
pub struct Member {
    pub id: NodeId,
    pub name: String,
    pub alive: bool,
    pub cordoned: bool,
    pub facts: Option<HostFacts>,
    /// From gossip, when it reported.
    pub free_memory_bytes: Option<u64>,
    pub disk_room_bytes: Option<u64>,
    pub load_1m: Option<f32>,
    /// Instances it owns (replicated state).
    pub instances: u32,
    /// Already upgraded in the running rolling upgrade: an instance placed
    /// there will not have to move again, and one started on a newer
    /// kernel may need what older members lack.
    pub upgraded: bool,
}

/// What is being placed.
#[derive(Clone, Debug, Default)]
pub struct Ask {
    /// The member it is on now (never a candidate), if it exists.
    pub source: Option<NodeId>,
    /// The source's facts and the instance's baseline: for an existing
    /// instance the target must pass the move's compatibility check.
    pub existing: Option<(HostFacts, Option<Baseline>)>,
    pub spec: InstanceSpec,
    /// A live move (memory state): CPU, syscalls and CRIU count.
    pub stateful: bool,
    pub disk_bytes: u64,
    /// Preferred (a restore's home), when it passes the filters.
    pub prefer: Option<NodeId>,
    /// Only these members may take it, when set.
    pub only: Option<Vec<NodeId>>,
    /// Instances already headed to each member in this round.
    pub planned: BTreeMap<NodeId, u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Rejected(String),
    /// Higher is better.
    Score(i64),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: NodeId,
    pub name: String,
    pub verdict: Verdict,
}

impl Ask {
    /// Placing `inst`, which exists: its owner is the source, and a target
    /// must pass the move's compatibility check against its baseline.
    pub fn existing(s: &ClusterState, inst: &Instance, stateful: bool) -> Ask {
        let source = s.members.get(&inst.owner).and_then(|m| m.facts.clone());
        Ask {
            source: Some(inst.owner),
            existing: source.map(|f| (f, inst.baseline.clone())),
            spec: inst.spec.clone(),
            stateful,
            ..Default::default()
        }
    }
}

/// Every member with its verdict, the best first, rejected ones last.
pub fn rank(members: &[Member], ask: &Ask) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = members
        .iter()
        .map(|m| Candidate {
            id: m.id,
            name: m.name.clone(),
            verdict: match reject(m, ask) {
                Some(why) => Verdict::Rejected(why),
                None => Verdict::Score(score(m, ask)),
            },
        })
        .collect();
    out.sort_by_key(|c| match c.verdict {
        Verdict::Score(s) => (0, -s, c.id),
        Verdict::Rejected(_) => (1, 0, c.id),
    });
    out
}

/// The best member, or every member's reason for refusing.
pub fn choose(members: &[Member], ask: &Ask) -> Result<NodeId, String> {
    let ranked = rank(members, ask);
    if let Some(best) = ranked
        .iter()
        .find(|c| matches!(c.verdict, Verdict::Score(_)))
    {
        return Ok(best.id);
    }
    if ranked.is_empty() {
        return Err("no member can take it".into());
    }
    let reasons: Vec<String> = ranked
        .iter()
        .map(|c| match &c.verdict {
            Verdict::Rejected(why) => format!("{}: {why}", c.name),
            Verdict::Score(_) => String::new(),
        })
        .collect();
    Err(format!("no member can take it ({})", reasons.join("; ")))
}

/// Why `m` cannot take it, if it cannot.
fn reject(m: &Member, ask: &Ask) -> Option<String> {
    if ask.source == Some(m.id) {
        return Some("it is there already".into());
    }
    if ask.only.as_ref().is_some_and(|only| !only.contains(&m.id)) {
        return Some("not asked for".into());
    }
    if !m.alive {
        return Some("dead by gossip".into());
    }
    if m.cordoned {
        return Some("cordoned".into());
    }
    let Some(facts) = &m.facts else {
        // A new instance may go to a member that just started (its own
        // start checks the runtime); a move needs facts to check against.
        return ask
            .existing
            .as_ref()
            .map(|_| "has not reported its host facts yet".into());
    };
    let vm = ask.spec.vm.is_some();
    if !vm && facts.runtimes.runc.is_none() {
        return Some("has no container runtime (runc)".into());
    }
    let needs = compat::Needs {
        stateful: ask.stateful && ask.existing.is_some(),
        vm,
        cpu_model: ask.spec.vm.as_ref().map(|vm| vm.cpu_model.clone()),
        networked: ask.spec.network == ferry_raft::NetworkMode::Cluster,
        uid: compat::uid_of(&ask.spec),
        image: ask.spec.image.clone(),
        memory_bytes: ask.spec.memory_bytes,
        target_free_memory_bytes: m.free_memory_bytes,
        disk_bytes: ask.disk_bytes,
        target_free_disk_bytes: m.disk_room_bytes,
    };
    let report = match &ask.existing {
        Some((source, baseline)) => {
            let baseline = compat::baseline_or_source(baseline.as_ref(), source);
            compat::check(&baseline, source, facts, &needs)
        }
        // A new instance: only room matters.
        None => {
            let itself = compat::baseline_or_source(None, facts);
            compat::check(&itself, facts, facts, &needs)
        }
    };
    report
        .into_iter()
        .find(|r| !r.ok)
        .map(|r| format!("{}: {}", r.check, r.detail))
}

/// Free memory in MiB, less for load and for instances there or headed
/// there; a large bonus for the preferred member.
fn score(m: &Member, ask: &Ask) -> i64 {
    let memory = m
        .free_memory_bytes
        .or(m.facts.as_ref().map(|f| f.memory_total_bytes))
        .unwrap_or(0);
    let planned = ask.planned.get(&m.id).copied().unwrap_or(0);
    let instances = i64::from(m.instances + planned);
    let load = (f64::from(m.load_1m.unwrap_or(0.0)) * 100.0) as i64;
    let home = if ask.prefer == Some(m.id) { 1 << 40 } else { 0 };
    let upgraded = if m.upgraded { 1 << 20 } else { 0 };
    (memory >> 20) as i64 - 256 * instances - load + home + upgraded
}

/// Named x86 CPU models, roughly the most capable first: the default of a
/// new VM is the first of them the most members' QEMU runs.
const CPU_MODELS_BEST_FIRST: &[&str] = &[
    "EPYC-Milan",
    "Icelake-Server",
    "Cooperlake",
    "Cascadelake-Server",
    "EPYC-Rome",
    "Skylake-Server",
    "EPYC",
    "Skylake-Client",
    "Broadwell",
    "Haswell",
    "IvyBridge",
    "SandyBridge",
    "Westmere",
    "Nehalem",
    "Penryn",
    "qemu64",
];

/// The CPU model a new VM gets when none is named: one every member with
/// QEMU runs without unavailable features (so it can move anywhere), or
/// failing that the one the most of them run; `None` when none runs any.
pub fn default_cpu_model(members: &[Member]) -> Option<String> {
    let runs = |f: &HostFacts, model: &str| {
        f.runtimes
            .vm_cpu_models
            .get(model)
            .is_some_and(|missing| missing.is_empty())
    };
    let with_qemu: Vec<&HostFacts> = members
        .iter()
        .filter_map(|m| m.facts.as_ref())
        .filter(|f| f.runtimes.qemu.is_some())
        .collect();
    let mut best: Option<(&str, usize)> = None;
    for model in CPU_MODELS_BEST_FIRST {
        let count = with_qemu.iter().filter(|f| runs(f, model)).count();
        if count > 0 && best.is_none_or(|(_, most)| count > most) {
            best = Some((model, count));
        }
    }
    best.map(|(model, _)| model.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_raft::Runtimes;

    fn facts(flags: &[&str]) -> HostFacts {
        HostFacts {
            arch: "x86_64".into(),
            cpu_flags: flags.iter().map(|f| f.to_string()).collect(),
            memory_total_bytes: 8 << 30,
            disk_total_bytes: 100 << 30,
            runtimes: Runtimes {
                runc: Some("1.1.12".into()),
                criu: Some("4.1.1".into()),
                criu_check: true,
                criu_inet: true,
                criu_other_users: true,
                ..Runtimes::default()
            },
            ..Default::default()
        }
    }

    fn member(id: NodeId, free_gib: u64, instances: u32) -> Member {
        Member {
            id,
            name: format!("n{id}"),
            alive: true,
            cordoned: false,
            facts: Some(facts(&["sse4_2", "avx2"])),
            free_memory_bytes: Some(free_gib << 30),
            disk_room_bytes: Some(50 << 30),
            load_1m: Some(0.1),
            instances,
            upgraded: false,
        }
    }

    fn existing() -> Ask {
        Ask {
            source: Some(1),
            existing: Some((facts(&["sse4_2", "avx2"]), None)),
            stateful: true,
            ..Default::default()
        }
    }

    fn verdict(ranked: &[Candidate], id: NodeId) -> Verdict {
        ranked.iter().find(|c| c.id == id).unwrap().verdict.clone()
    }

    fn rejected_for(ranked: &[Candidate], id: NodeId, why: &str) -> bool {
        matches!(verdict(ranked, id), Verdict::Rejected(r) if r.contains(why))
    }

    #[test]
    fn every_filter_rejects_with_its_reason() {
        let mut members: Vec<Member> = (1..=8).map(|id| member(id, 4, 0)).collect();
        members[1].alive = false;
        members[2].cordoned = true;
        members[3].facts = None;
        members[4].facts.as_mut().unwrap().cpu_flags = vec!["sse4_2".into()];
        members[5].free_memory_bytes = Some(1 << 20);
        members[6].disk_room_bytes = Some(0);
        let mut ask = existing();
        ask.spec.memory_bytes = Some(512 << 20);
        ask.disk_bytes = 1 << 20;
        let ranked = rank(&members, &ask);
        assert!(rejected_for(&ranked, 1, "there already"));
        assert!(rejected_for(&ranked, 2, "dead"));
        assert!(rejected_for(&ranked, 3, "cordoned"));
        assert!(rejected_for(&ranked, 4, "host facts"));
        assert!(rejected_for(&ranked, 5, "avx2"));
        assert!(rejected_for(&ranked, 6, "memory"));
        assert!(rejected_for(&ranked, 7, "disk"));
        assert_eq!(choose(&members, &ask), Ok(8));
        // A stateless move does not need the CPU flags.
        ask.stateful = false;
        assert!(matches!(
            verdict(&rank(&members, &ask), 5),
            Verdict::Score(_)
        ));
    }

    #[test]
    fn syscalls_filesystems_architecture_and_runtime_filter_too() {
        let mut members: Vec<Member> = (1..=5).map(|id| member(id, 4, 0)).collect();
        let mut source = facts(&["sse4_2", "avx2"]);
        source.syscalls = vec!["openat".into(), "clone3".into()];
        for m in &mut members {
            m.facts.as_mut().unwrap().syscalls = source.syscalls.clone();
        }
        members[1].facts.as_mut().unwrap().syscalls = vec!["openat".into()];
        members[2].facts.as_mut().unwrap().arch = "aarch64".into();
        members[3].facts.as_mut().unwrap().runtimes.runc = None;
        let baseline = Baseline {
            filesystems: vec!["tmpfs".into()],
            ..compat::baseline_or_source(None, &source)
        };
        members[4].facts.as_mut().unwrap().filesystems = vec!["tmpfs".into()];
        let ask = Ask {
            existing: Some((source, Some(baseline))),
            ..existing()
        };
        let ranked = rank(&members, &ask);
        assert!(rejected_for(&ranked, 2, "clone3"));
        assert!(rejected_for(&ranked, 3, "architecture"));
        assert!(rejected_for(&ranked, 4, "runc"));
        assert_eq!(choose(&members, &ask), Ok(5));
    }

    #[test]
    fn weights_prefer_free_memory_few_instances_and_home() {
        let members = vec![
            member(1, 4, 0),
            member(2, 4, 3),
            member(3, 6, 0),
            member(4, 4, 0),
        ];
        let mut ask = existing();
        assert_eq!(choose(&members, &ask), Ok(3), "most free memory");
        // Instances already headed to n3 in this round count against it.
        ask.planned.insert(3, 12);
        assert_eq!(choose(&members, &ask), Ok(4), "fewer instances");
        let mut with_upgraded = members.clone();
        with_upgraded[0].upgraded = true;
        with_upgraded[1].upgraded = true;
        assert_eq!(choose(&with_upgraded, &ask), Ok(2), "already upgraded");
        ask.prefer = Some(2);
        assert_eq!(choose(&members, &ask), Ok(2), "its home");
        ask.only = Some(vec![2]);
        ask.prefer = None;
        assert_eq!(choose(&members, &ask), Ok(2));
    }

    #[test]
    fn no_member_at_all_says_why_for_each() {
        let mut members = vec![member(1, 4, 0), member(2, 4, 0)];
        members[1].cordoned = true;
        let err = choose(&members, &existing()).unwrap_err();
        assert!(err.contains("n1: it is there already"), "{err}");
        assert!(err.contains("n2: cordoned"), "{err}");
    }

    #[test]
    fn a_new_instance_needs_only_a_live_uncordoned_member_with_room() {
        let mut members = vec![member(1, 1, 0), member(2, 4, 0)];
        let ask = Ask::default();
        assert_eq!(choose(&members, &ask), Ok(2));
        members[1].cordoned = true;
        assert_eq!(choose(&members, &ask), Ok(1));
        // Right after bootstrap, before any facts: still placed.
        members[0].facts = None;
        assert_eq!(choose(&members, &ask), Ok(1));
    }

    fn with_models(id: NodeId, runnable: &[&str], lacking: &[&str]) -> Member {
        let mut m = member(id, 4, 0);
        let runtimes = &mut m.facts.as_mut().unwrap().runtimes;
        runtimes.qemu = Some("7.2.0".into());
        for model in runnable {
            runtimes.vm_cpu_models.insert(model.to_string(), vec![]);
        }
        for model in lacking {
            let missing = vec!["avx512f".to_string()];
            runtimes.vm_cpu_models.insert(model.to_string(), missing);
        }
        m
    }

    #[test]
    fn a_new_vm_gets_the_most_capable_cpu_model_every_member_runs() {
        let members = [
            with_models(1, &["Haswell", "Westmere", "qemu64"], &["Icelake-Server"]),
            with_models(2, &["Icelake-Server", "Haswell", "qemu64"], &[]),
            // No QEMU: does not count.
            member(3, 4, 0),
        ];
        assert_eq!(default_cpu_model(&members).as_deref(), Some("Haswell"));
    }

    #[test]
    fn without_a_common_cpu_model_the_one_most_members_run_is_chosen() {
        let members = [
            with_models(1, &["Westmere"], &["qemu64"]),
            with_models(2, &["Westmere"], &["qemu64"]),
            with_models(3, &["qemu64"], &["Westmere"]),
        ];
        assert_eq!(default_cpu_model(&members).as_deref(), Some("Westmere"));
        assert_eq!(default_cpu_model(&[member(1, 4, 0)]), None);
    }
}
