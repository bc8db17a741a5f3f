use std::collections::BTreeMap;

use super::*;
use crate::model::{Node, NodeName, NodeRole, PodPhase, Resources};

fn cfg() -> StepConfig {
    StepConfig {
        label: "io.cilium.migration/cilium-default".into(),
        node_config: "cilium-default".into(),
        drain_timeout: Duration::from_secs(600),
        step_timeout: Duration::from_secs(300),
        delete_emptydir_data: true,
        evict_unmanaged_pods: false,
        rollback_not_ready_limit: Duration::from_secs(300),
    }
}

fn node(unschedulable: bool, labelled: bool) -> Node {
    let mut labels = BTreeMap::new();
    if labelled {
        labels.insert(cfg().label, "true".into());
    }
    Node {
        name: NodeName::new("w1").unwrap(),
        roles: vec![NodeRole::Worker],
        zone: None,
        labels,
        taints: vec![],
        unschedulable,
        ready: true,
        internal_ips: vec![],
        allocatable: Resources::default(),
        requested: Resources::default(),
    }
}

fn pod(name: &str, owner: OwnerKind, network: PodNetwork) -> Pod {
    Pod {
        pod: PodRef {
            namespace: "app".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        },
        labels: Default::default(),
        owner,
        node: Some(NodeName::new("w1").unwrap()),
        ip: None,
        network,
        phase: PodPhase::Running,
        ready: true,
        terminating: false,
        host_network: network == PodNetwork::Host,
        host_port: false,
        empty_dir: false,
        mirror: false,
        tolerates_unschedulable: false,
        created: None,
        requests: Resources::default(),
    }
}

fn agent(uid: &str, ready: bool, cfg_name: Option<&str>) -> AgentObservation {
    AgentObservation {
        pod_uid: uid.into(),
        ready,
        node_config: cfg_name.map(str::to_string),
    }
}

fn run(
    rec: &NodeRecord,
    view: &NodeView,
    agent: Option<&AgentObservation>,
    cni: CniDirState,
    now: u64,
) -> Decision {
    decide(rec, &Observation { view, agent, cni }, &cfg(), Time(now))
}

#[test]
fn happy_path_step_by_step() {
    let a0 = agent("a0", true, None);
    let rs = pod("web-1", OwnerKind::ReplicaSet, PodNetwork::Calico);
    let ds = pod("logs-x", OwnerKind::DaemonSet, PodNetwork::Calico);
    let host = pod("exporter", OwnerKind::DaemonSet, PodNetwork::Host);
    let mut view = NodeView {
        node: node(false, false),
        pods: vec![rs.clone(), ds.clone(), host.clone()],
    };
    let mut rec = NodeRecord::new(Time(0));

    let d = run(&rec, &view, Some(&a0), CniDirState::CALICO, 0);
    assert_eq!(d.action, Action::Cordon);
    assert_eq!(d.record.pre_cordoned, Some(false));
    rec = d.record;

    view.node.unschedulable = true;
    let d = run(&rec, &view, Some(&a0), CniDirState::CALICO, 1000);
    assert_eq!(d.record.phase, Phase::Cordoned);
    assert_eq!(
        d.action,
        Action::Evict(vec![rs.pod.clone()]),
        "only the ReplicaSet pod is drained"
    );
    rec = d.record;

    view.pods[0].terminating = true;
    let d = run(&rec, &view, Some(&a0), CniDirState::CALICO, 2000);
    assert!(
        matches!(d.action, Action::Wait(_)),
        "waits for the evicted pod to go"
    );
    rec = d.record;

    view.pods.remove(0);
    let d = run(&rec, &view, Some(&a0), CniDirState::CALICO, 3000);
    assert_eq!(d.record.phase, Phase::Drained);
    assert_eq!(d.action, Action::Label);
    rec = d.record;

    view.node.labels.insert(cfg().label, "true".into());
    let d = run(&rec, &view, Some(&a0), CniDirState::CALICO, 4000);
    assert_eq!(d.record.phase, Phase::Labelled);
    assert_eq!(d.action, Action::RestartAgent("a0".into()));
    assert_eq!(
        d.record.agent_restarted_from.as_deref(),
        Some("a0"),
        "persisted before acting"
    );
    rec = d.record;

    // The agent pod is gone and not yet back.
    let d = run(&rec, &view, None, CniDirState::CALICO, 5000);
    assert!(matches!(d.action, Action::Wait(_)));
    rec = d.record;

    let a1 = agent("a1", false, Some("cilium-default"));
    let d = run(&rec, &view, Some(&a1), CniDirState::CALICO, 6000);
    assert_eq!(d.record.phase, Phase::AgentRestarted);
    assert!(matches!(d.action, Action::Wait(_)), "not ready yet");
    rec = d.record;

    // The agent is Ready: the node's pods still on Calico move while it is still cordoned.
    let a1 = agent("a1", true, Some("cilium-default"));
    let d = run(&rec, &view, Some(&a1), CniDirState::CILIUM, 7000);
    assert_eq!(d.record.phase, Phase::AgentReady);
    assert_eq!(
        d.action,
        Action::Recycle {
            evict: vec![],
            delete: vec![ds.pod.clone()]
        }
    );
    assert_eq!(
        d.record.since,
        Time(4000),
        "timed from the restart request, as the restart"
    );
    rec = d.record;

    view.pods[0].network = PodNetwork::Cilium;
    view.pods[0].pod.uid = "uid-logs-y".into();
    let d = run(&rec, &view, Some(&a1), CniDirState::CILIUM, 9000);
    assert_eq!(d.record.phase, Phase::PodsRestarted);
    assert_eq!(d.action, Action::Verify);
    assert!(view.node.unschedulable, "verified before it takes pods");
    rec = d.record;

    let r = on_verification(
        &rec,
        &Verification::Unhealthy(vec!["x".into()]),
        &cfg(),
        Time(9500),
    );
    assert_eq!(r.phase, Phase::PodsRestarted, "retried within the window");
    let r = on_verification(&r, &Verification::Healthy, &cfg(), Time(10_000));
    assert_eq!(r.phase, Phase::Verified);
    let d = run(&r, &view, Some(&a1), CniDirState::CILIUM, 10_000);
    assert_eq!(d.record.phase, Phase::Verified);
    assert_eq!(d.action, Action::Uncordon, "uncordoned once verified");
    // A store that writes the uncordon with the record writes the node's last record then.
    let done = uncordoned_record(&d.record, Time(10_000)).unwrap();
    assert_eq!(done.phase, Phase::Done);
    assert_eq!(uncordoned_record(&rec, Time(10_000)), None, "not before");
    // Otherwise the next look finds it uncordoned and the node is done.
    view.node.unschedulable = false;
    let d = run(&d.record, &view, Some(&a1), CniDirState::CILIUM, 11_000);
    assert_eq!(d.record.phase, Phase::Done);
    assert_eq!(d.entered, vec![Phase::Uncordoned, Phase::Done]);
    assert_eq!(d.action, Action::Finished);
}

#[test]
fn an_agent_that_stops_being_ready_after_the_verification_is_verified_again() {
    let view = NodeView {
        node: node(true, true),
        pods: vec![],
    };
    let mut rec = NodeRecord::new(Time(0));
    rec.pre_cordoned = Some(false);
    rec.agent_restarted_from = Some("a0".into());
    rec.phase = Phase::Verified;
    rec.since = Time(1_000);
    let down = agent("a1", false, Some("cilium-default"));
    let d = run(&rec, &view, Some(&down), CniDirState::CILIUM, 2_000);
    assert_eq!(d.record.phase, Phase::PodsRestarted);
    assert!(matches!(d.action, Action::Wait(_)), "{:?}", d.action);
    assert_eq!(d.record.since, Time(1_000), "still timed from the restart");
    // Past the verification's limit (3 × 300 s from the restart) the node rolls back.
    let d = run(&d.record, &view, Some(&down), CniDirState::CILIUM, 902_000);
    assert_eq!(d.record.phase, Phase::RollingBack);
    let cause = &d.record.rollback.as_ref().unwrap().cause;
    assert!(cause.contains("step Verify"), "{cause}");
}

#[test]
fn a_node_cordoned_before_the_run_stays_cordoned() {
    let a = agent("a1", true, Some("cilium-default"));
    let view = NodeView {
        node: node(true, true),
        pods: vec![],
    };
    let rec = NodeRecord::new(Time(0));
    let d = run(&rec, &view, Some(&a), CniDirState::CILIUM, 0);
    assert_eq!(d.record.pre_cordoned, Some(true));
    let mut rec = d.record;
    rec.phase = Phase::Verified;
    let d = run(&rec, &view, Some(&a), CniDirState::CILIUM, 1);
    assert_ne!(d.action, Action::Uncordon);
    assert_eq!(d.record.phase, Phase::Done);
    assert_eq!(
        d.entered,
        vec![Phase::Uncordoned, Phase::Done],
        "every phase passed is reported"
    );
}

#[test]
fn resume_after_restart_does_not_restart_the_agent_again() {
    let view = NodeView {
        node: node(true, true),
        pods: vec![],
    };
    let mut rec = NodeRecord::new(Time(0));
    rec.phase = Phase::Labelled;
    rec.pre_cordoned = Some(false);
    rec.agent_restarted_from = Some("a0".into());
    // A new agent already exists: the restart happened before the crash.
    let a1 = agent("a1", false, Some("cilium-default"));
    let d = run(&rec, &view, Some(&a1), CniDirState::CALICO, 10);
    assert_eq!(d.record.phase, Phase::AgentRestarted);
    assert!(!matches!(d.action, Action::RestartAgent(_)));
    // The old agent is still there: the delete may not have happened; deleting it again is safe.
    let a0 = agent("a0", true, None);
    let d = run(&rec, &view, Some(&a0), CniDirState::CALICO, 10);
    assert_eq!(d.action, Action::RestartAgent("a0".into()));
}

#[test]
fn a_blocked_drain_times_out_into_rollback_naming_the_budget() {
    let mut view = NodeView {
        node: node(true, false),
        pods: vec![pod("db-0", OwnerKind::StatefulSet, PodNetwork::Calico)],
    };
    let mut rec = NodeRecord::new(Time(0));
    rec.phase = Phase::Cordoned;
    rec.pre_cordoned = Some(false);
    rec = with_problem(
        &rec,
        "eviction of app/db-0 blocked by PodDisruptionBudget app/db".into(),
    );
    let a = agent("a0", true, None);
    let d = run(&rec, &view, Some(&a), CniDirState::CALICO, 601_000);
    assert_eq!(d.record.phase, Phase::RollingBack);
    let rb = d.record.rollback.clone().unwrap();
    assert_eq!(rb.failed_after, Phase::Cordoned);
    assert!(rb.cause.contains("app/db"), "{}", rb.cause);
    // The node was never labelled and its pods are on Calico: the rollback only uncordons.
    assert_eq!(d.action, Action::Uncordon);
    view.node.unschedulable = false;
    let d = run(&d.record, &view, Some(&a), CniDirState::CALICO, 602_000);
    assert_eq!(d.record.phase, Phase::RolledBack);
    assert_eq!(d.action, Action::Finished);
}

#[test]
fn pods_arriving_after_the_cordon_are_not_chased_and_move_after_the_agent_restart() {
    let created = |name: &str, at: Option<u64>| {
        let mut p = pod(name, OwnerKind::ReplicaSet, PodNetwork::Calico);
        p.created = at.map(Time);
        p.tolerates_unschedulable = true;
        p
    };
    let before = created("web-old", Some(500));
    let unknown = created("web-unknown", None);
    let late = created("web-late", Some(1_500));
    let mut view = NodeView {
        node: node(true, false),
        pods: vec![before.clone(), unknown.clone(), late.clone()],
    };
    // Cordoned at 1 s: the pods there then (and one whose age is unknown) are evicted, not the
    // replacement that arrived on the cordoned node at 1.5 s.
    let mut rec = NodeRecord::new(Time(0));
    rec.phase = Phase::Cordoned;
    rec.since = Time(1_000);
    rec.pre_cordoned = Some(false);
    let a0 = agent("a0", true, None);
    let d = run(&rec, &view, Some(&a0), CniDirState::CALICO, 2_000);
    assert_eq!(
        d.action,
        Action::Evict(vec![before.pod.clone(), unknown.pod.clone()])
    );
    // Their replacements arrive too (tolerating the cordon): the drain ends once the pods
    // present at the cordon are gone.
    view.pods = vec![late.clone(), created("web-later", Some(2_500))];
    let d = run(&d.record, &view, Some(&a0), CniDirState::CALICO, 3_000);
    assert_eq!(d.record.phase, Phase::Drained);
    assert_eq!(d.action, Action::Label);
    // After the agent restart the late pods, still on Calico, are moved like any other.
    let mut rec = d.record;
    rec.phase = Phase::AgentReady;
    view.node.labels.insert(cfg().label, "true".into());
    let a1 = agent("a1", true, Some("cilium-default"));
    let d = run(&rec, &view, Some(&a1), CniDirState::CILIUM, 4_000);
    assert_eq!(d.record.phase, Phase::AgentReady);
    let Action::Recycle { evict, .. } = &d.action else {
        panic!("{:?}", d.action);
    };
    assert_eq!(evict.len(), 2, "{evict:?}");
    assert!(evict.contains(&late.pod), "{evict:?}");
}

#[test]
fn a_rollback_drain_does_not_chase_pods_arriving_after_it_began() {
    let on_cilium = |name: &str, at: u64| {
        let mut p = pod(name, OwnerKind::ReplicaSet, PodNetwork::Cilium);
        p.created = Some(Time(at));
        p
    };
    let old = on_cilium("web-old", 500);
    let late = on_cilium("web-late", 1_500);
    let mut view = NodeView {
        node: node(true, true),
        pods: vec![old.clone(), late.clone()],
    };
    let mut rec = NodeRecord::new(Time(0));
    rec.phase = Phase::RollingBack;
    rec.pre_cordoned = Some(false);
    rec.rollback = Some(Rollback {
        failed_after: Phase::PodsRestarted,
        cause: "verification failed".into(),
        step: RollbackStep::DrainCilium,
        step_since: Time(1_000),
        agent_restarted_from: None,
        not_ready_since: None,
    });
    let a = agent("a1", true, Some("cilium-default"));
    let d = run(&rec, &view, Some(&a), CniDirState::CILIUM, 2_000);
    assert_eq!(d.action, Action::Evict(vec![old.pod.clone()]));
    view.pods = vec![late];
    let d = run(&d.record, &view, Some(&a), CniDirState::CILIUM, 3_000);
    assert_eq!(
        d.action,
        Action::RestoreCni,
        "the late pod is left for Recycle"
    );
}

#[test]
fn emptydir_and_unmanaged_pods_follow_the_drain_options() {
    let mut p = pod("scratch", OwnerKind::ReplicaSet, PodNetwork::Calico);
    p.empty_dir = true;
    let view = NodeView {
        node: node(true, false),
        pods: vec![p],
    };
    let mut rec = NodeRecord::new(Time(0));
    rec.phase = Phase::Cordoned;
    let mut c = cfg();
    c.delete_emptydir_data = false;
    let d = decide(
        &rec,
        &Observation {
            view: &view,
            agent: None,
            cni: CniDirState::CALICO,
        },
        &c,
        Time(1),
    );
    assert_eq!(d.record.phase, Phase::RollingBack);
    let bare = pod("bare", OwnerKind::None, PodNetwork::Calico);
    let view = NodeView {
        node: node(true, false),
        pods: vec![bare],
    };
    let d = run(&rec, &view, None, CniDirState::CALICO, 1);
    assert_eq!(d.record.phase, Phase::RollingBack);
    assert!(d.record.rollback.unwrap().cause.contains("no controller"));
}

#[test]
fn rollback_of_a_migrated_node_restores_calico_in_order() {
    let cil = pod("web-2", OwnerKind::ReplicaSet, PodNetwork::Cilium);
    let ds = pod("logs-y", OwnerKind::DaemonSet, PodNetwork::Cilium);
    let mut view = NodeView {
        node: node(false, true),
        pods: vec![cil.clone(), ds.clone()],
    };
    let a1 = agent("a1", true, Some("cilium-default"));
    let mut rec = NodeRecord::new(Time(0));
    rec.phase = Phase::PodsRestarted;
    rec.pre_cordoned = Some(false);
    rec = on_verification(
        &rec,
        &Verification::Unhealthy(vec!["pod x cannot reach y".into()]),
        &cfg(),
        Time(1_000_000),
    );
    assert_eq!(rec.phase, Phase::RollingBack);
    assert!(
        rec.rollback
            .as_ref()
            .unwrap()
            .cause
            .contains("cannot reach")
    );

    let mut cni = CniDirState::CILIUM;
    let mut agent_now = a1.clone();
    let mut actions = Vec::new();
    for t in 0..20u64 {
        let d = run(&rec, &view, Some(&agent_now), cni, 1_000_000 + t * 1000);
        rec = d.record;
        actions.push(d.action.clone());
        match d.action {
            Action::Cordon => view.node.unschedulable = true,
            Action::Uncordon => view.node.unschedulable = false,
            Action::Evict(p) => view.pods.retain(|x| !p.contains(&x.pod)),
            Action::RestoreCni => cni = CniDirState::CALICO,
            Action::Unlabel => {
                view.node.labels.remove(&cfg().label);
            }
            Action::RestartAgent(_) => agent_now = agent("a2", false, None),
            Action::Recycle { delete, .. } => {
                for p in view.pods.iter_mut().filter(|x| delete.contains(&x.pod)) {
                    p.network = PodNetwork::Calico;
                    p.pod.uid.push('2');
                }
            }
            Action::Finished => break,
            Action::Label | Action::Verify | Action::Wait(_) => {}
        }
    }
    let kinds: Vec<&str> = actions
        .iter()
        .map(|a| match a {
            Action::Cordon => "cordon",
            Action::Evict(_) => "evict",
            Action::RestoreCni => "restore",
            Action::Unlabel => "unlabel",
            Action::RestartAgent(_) => "restart",
            Action::Recycle { .. } => "recycle",
            Action::Uncordon => "uncordon",
            Action::Finished => "finished",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "cordon", "evict", "restore", "unlabel", "restart", "recycle", "uncordon", "finished"
        ]
    );
    assert_eq!(rec.phase, Phase::RolledBack);
}

#[test]
fn records_round_trip_through_the_annotation_and_garbage_is_named() {
    let mut rec = NodeRecord::new(Time(42));
    rec.phase = Phase::Labelled;
    rec.agent_restarted_from = Some("abc".into());
    let s = rec.to_annotation();
    assert_eq!(NodeRecord::from_annotation(&s).unwrap(), rec);
    let e = NodeRecord::from_annotation("{phase: nope").unwrap_err();
    assert!(e.to_string().contains(STATE_ANNOTATION));
}

#[test]
fn a_stuck_rollback_ends_failed_for_a_person() {
    let view = NodeView {
        node: node(false, true),
        pods: vec![],
    };
    let mut rec = NodeRecord::new(Time(0));
    rec.phase = Phase::AgentRestarted;
    let rec = start_rollback(&rec, "operator asked".into(), Time(0));
    // RestoreCni never takes effect.
    let d = run(&rec, &view, None, CniDirState::CILIUM, 1000);
    assert_eq!(d.action, Action::Cordon);
    let mut view2 = view.clone();
    view2.node.unschedulable = true;
    let d = run(&d.record, &view2, None, CniDirState::CILIUM, 2000);
    assert_eq!(d.action, Action::RestoreCni);
    // Still trying after the drain timeout: a rollback step gets a drain plus a step.
    let d = run(&d.record, &view2, None, CniDirState::CILIUM, 2000 + 601_000);
    assert_eq!(d.action, Action::RestoreCni);
    let d = run(&d.record, &view2, None, CniDirState::CILIUM, 2000 + 901_000);
    assert_eq!(d.record.phase, Phase::Failed);
    assert!(d.record.rollback.unwrap().cause.contains("RestoreCni"));
}

#[test]
fn a_rollback_on_a_node_without_an_agent_pod_does_not_wait_for_one() {
    let view = NodeView {
        node: node(true, false),
        pods: vec![],
    };
    let mut rec = NodeRecord::new(Time(0));
    rec.phase = Phase::Labelled;
    rec.pre_cordoned = Some(false);
    // No agent pod was ever scheduled on the node: the restart times out into rollback.
    let d = run(&rec, &view, None, CniDirState::CALICO, 301_000);
    assert_eq!(d.record.phase, Phase::RollingBack);
    // Label already removed, CNI config Calico's, no agent: only the uncordon is left.
    assert_eq!(d.action, Action::Uncordon);
    assert_eq!(
        d.record.rollback.as_ref().map(|r| r.step),
        Some(RollbackStep::Uncordon)
    );
}

#[test]
fn a_cni_config_written_after_the_restore_step_is_restored_again() {
    let view = NodeView {
        node: node(true, false),
        pods: vec![],
    };
    let mut rec = NodeRecord::new(Time(0));
    rec.phase = Phase::AgentRestarted;
    rec.pre_cordoned = Some(true);
    // The agent with the node config is not Ready when the rollback starts: nothing to restore.
    let a = agent("a1", false, Some("cilium-default"));
    let d = run(&rec, &view, Some(&a), CniDirState::CALICO, 301_000);
    assert_eq!(d.record.phase, Phase::RollingBack);
    assert_eq!(d.action, Action::RestartAgent("a1".into()));
    // It turns Ready (writing 05-cilium.conflist) just before it is replaced.
    let fresh = agent("a2", false, None);
    let d = run(&d.record, &view, Some(&fresh), CniDirState::CILIUM, 303_000);
    assert_eq!(d.action, Action::RestoreCni);
    assert_ne!(d.record.phase, Phase::RolledBack);
    let d = run(&d.record, &view, Some(&fresh), CniDirState::CALICO, 310_000);
    assert_eq!(d.record.phase, Phase::RolledBack);
}

#[test]
fn a_rollback_on_a_node_that_stays_not_ready_ends_failed_naming_node_step_and_cause() {
    let mut view = NodeView {
        node: node(true, true),
        pods: vec![],
    };
    view.node.ready = false;
    let mut rec = NodeRecord::new(Time(0));
    rec.phase = Phase::AgentRestarted;
    rec.pre_cordoned = Some(false);
    let rec = start_rollback(&rec, "step AgentReady: agent a1 not Ready".into(), Time(0));
    // Cordoned already; the restore cannot happen on a NotReady node.
    let d = run(&rec, &view, None, CniDirState::CILIUM, 1000);
    assert_eq!(d.action, Action::RestoreCni);
    assert_eq!(
        d.record.rollback.as_ref().and_then(|r| r.not_ready_since),
        Some(Time(1000))
    );
    // Back Ready for a look: the clock starts again.
    view.node.ready = true;
    let d = run(&d.record, &view, None, CniDirState::CILIUM, 100_000);
    assert_eq!(d.record.rollback.as_ref().unwrap().not_ready_since, None);
    view.node.ready = false;
    let d = run(&d.record, &view, None, CniDirState::CILIUM, 200_000);
    let d = run(&d.record, &view, None, CniDirState::CILIUM, 500_000);
    assert_eq!(d.record.phase, Phase::RollingBack, "not over the limit yet");
    let d = run(&d.record, &view, None, CniDirState::CILIUM, 501_000);
    assert_eq!(d.record.phase, Phase::Failed);
    assert_eq!(d.action, Action::Finished);
    let cause = d.record.rollback.unwrap().cause;
    assert!(cause.contains("node w1 NotReady"), "{cause}");
    assert!(cause.contains("RestoreCni"), "{cause}");
    assert!(cause.contains("agent a1 not Ready"), "{cause}");
    assert!(!cause.contains('\n'));
}

#[test]
fn the_steps_after_the_agent_restart_are_timed_together_from_its_request() {
    // The agent restart was asked for at 100 s (the record the label carried); the agent is
    // Ready and the last Calico pod gone at 250 s.
    let mut rec = NodeRecord::new(Time(0));
    rec.phase = Phase::Labelled;
    rec.since = Time(100_000);
    rec.pre_cordoned = Some(false);
    rec.agent_restarted_from = Some("a0".into());
    let view = NodeView {
        node: node(true, true),
        pods: vec![pod("web-1", OwnerKind::ReplicaSet, PodNetwork::Cilium)],
    };
    let a = agent("a1", true, Some("cilium-default"));
    let d = run(&rec, &view, Some(&a), CniDirState::CILIUM, 250_000);
    assert_eq!(
        d.entered,
        vec![
            Phase::AgentRestarted,
            Phase::AgentReady,
            Phase::PodsRestarted
        ]
    );
    assert_eq!(d.action, Action::Verify);
    assert_eq!(
        d.record.since,
        Time(100_000),
        "timed from the restart request, not from the look that found the pods back"
    );
    let sick = Verification::Unhealthy(vec!["pod web-1 has no IP yet".into()]);
    // Within three step limits (300 s each) of the request: retried.
    let r = on_verification(&d.record, &sick, &cfg(), Time(950_000));
    assert_eq!(r.phase, Phase::PodsRestarted);
    assert_eq!(r.last_problem.as_deref(), Some("pod web-1 has no IP yet"));
    // Past it: the node rolls back naming the problem.
    let r = on_verification(&d.record, &sick, &cfg(), Time(1_000_001));
    assert_eq!(r.phase, Phase::RollingBack);
    assert!(
        r.rollback
            .unwrap()
            .cause
            .starts_with("step Verify: pod web-1")
    );
    // The pods' restart has two step limits from the request.
    let mut calico = view.clone();
    calico.pods[0].network = PodNetwork::Calico;
    calico.pods[0].terminating = true;
    let d = run(&rec, &calico, Some(&a), CniDirState::CILIUM, 650_000);
    assert_eq!(d.record.phase, Phase::AgentReady);
    assert!(matches!(d.action, Action::Wait(_)), "{:?}", d.action);
    let d = run(&rec, &calico, Some(&a), CniDirState::CILIUM, 700_001);
    assert_eq!(d.record.phase, Phase::RollingBack);
    let cause = &d.record.rollback.as_ref().unwrap().cause;
    assert!(cause.starts_with("step RestartPods"), "{cause}");
}

#[test]
fn a_record_of_an_older_cnimig_uncordoned_before_its_pods_moved_ends_done() {
    let mut rec = NodeRecord::new(Time(0));
    rec.phase = Phase::Uncordoned;
    rec.since = Time(100_000);
    rec.pre_cordoned = Some(false);
    rec.agent_restarted_from = Some("a0".into());
    let mut view = NodeView {
        node: node(false, true),
        pods: vec![pod("logs-x", OwnerKind::DaemonSet, PodNetwork::Calico)],
    };
    let a = agent("a1", true, Some("cilium-default"));
    let d = run(&rec, &view, Some(&a), CniDirState::CILIUM, 150_000);
    assert!(matches!(d.action, Action::Recycle { .. }), "{:?}", d.action);
    view.pods[0].network = PodNetwork::Cilium;
    let d = run(&rec, &view, Some(&a), CniDirState::CILIUM, 160_000);
    assert_eq!(d.record.phase, Phase::Done);
}
