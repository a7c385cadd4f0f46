use super::*;
use crate::spec::{Branch, Op, Retry};

const T0: u64 = 1_000_000;

fn t(now_ms: u64) -> Timing {
    Timing { now_ms, resend_every_ms: 1000 }
}

fn two_pc() -> TxnSpec {
    TxnSpec::new(vec![Branch::kv("a", vec![Op::incrby("k1", -1)]), Branch::kv("b", vec![Op::set("k2", "v")])])
        .with_id("t1")
}

fn saga(n: usize) -> TxnSpec {
    let steps =
        (0..n).map(|i| Branch::kv_step(format!("p{i}"), vec![Op::incrby("k", 1)], vec![Op::incrby("k", -1)])).collect();
    let mut s = TxnSpec::saga(steps).with_id("s1");
    s.retry = Retry { limit: 3, backoff_ms: 100, step_timeout_ms: 1000 };
    s
}

fn vote(branch: u32, yes: bool) -> Event {
    Event::Vote(Vote { txn: "t1".into(), branch, participant: ["a", "b"][branch as usize].into(), yes, reason: None })
}

fn ack(branch: u32, outcome: Outcome) -> Event {
    Event::Ack(Ack { txn: "t1".into(), branch, participant: ["a", "b"][branch as usize].into(), outcome })
}

fn result(branch: u32, step: StepKind, status: StepStatus) -> Event {
    Event::Result(StepResult {
        txn: "s1".into(),
        branch,
        participant: format!("p{branch}"),
        step,
        status,
        reason: Some("why".into()),
    })
}

/// (kind, branch) of every message sent.
fn sent(o: &Output) -> Vec<(&'static str, u32)> {
    o.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { msg, .. } => Some((
                msg.kind(),
                match msg {
                    Message::Prepare(p) => p.branch,
                    Message::Commit(r) | Message::Abort(r) => r.branch,
                    Message::Execute(e) | Message::Compensate(e) => e.branch,
                    _ => u32::MAX,
                },
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn two_pc_commits_after_every_yes_and_ends_after_every_ack() {
    let (mut x, o) = Txn::create(two_pc(), t(T0));
    assert_eq!(sent(&o), vec![("prepare", 0), ("prepare", 1)]);
    assert_eq!(x.wake_ms(), Some(T0 + 5000));
    let o = x.step(vote(0, true), t(T0 + 1));
    assert!(o.changed && sent(&o).is_empty() && x.state() == TxnState::Preparing);
    assert!(!x.step(vote(0, true), t(T0 + 2)).changed, "a repeated vote changes nothing");
    let o = x.step(vote(1, true), t(T0 + 3));
    assert_eq!(x.state(), TxnState::Committing);
    assert!(o.decided);
    assert_eq!(sent(&o), vec![("commit", 0), ("commit", 1)]);
    assert!(!o.effects.contains(&Effect::Announce(TxnState::Committing)));
    assert!(x.step(ack(0, Outcome::Aborted), t(T0 + 4)).reject.is_some(), "an ack against the decision");
    x.step(ack(0, Outcome::Committed), t(T0 + 4));
    let o = x.step(ack(1, Outcome::Committed), t(T0 + 5));
    assert_eq!(x.state(), TxnState::Committed);
    assert_eq!(o.effects, vec![Effect::Announce(TxnState::Committed), Effect::Finish]);
    assert_eq!(x.wake_ms(), None);
}

#[test]
fn a_no_vote_aborts_every_branch_and_names_the_participant() {
    let (mut x, _) = Txn::create(two_pc(), t(T0));
    let o = x.step(vote(1, false), t(T0 + 1));
    assert_eq!(x.state(), TxnState::Aborting);
    assert_eq!(sent(&o), vec![("abort", 0), ("abort", 1)]);
    assert!(o.effects.contains(&Effect::Announce(TxnState::Aborting)), "producers hear of an abort at once");
    assert_eq!(x.progress.reason.as_deref(), Some("b voted no"));
    // A late yes from the other branch gets the decision again.
    assert_eq!(sent(&x.step(vote(0, true), t(T0 + 2))), vec![("abort", 0)]);
    x.step(ack(0, Outcome::Aborted), t(T0 + 3));
    x.step(ack(1, Outcome::Aborted), t(T0 + 3));
    assert_eq!(x.state(), TxnState::Aborted);
}

#[test]
fn the_deadline_aborts_naming_the_silent_and_decisions_are_resent_with_backoff() {
    let (mut x, _) = Txn::create(two_pc(), t(T0));
    x.step(vote(0, true), t(T0 + 1));
    assert!(x.step(Event::Tick, t(T0 + 4999)).effects.is_empty(), "not yet due");
    let o = x.step(Event::Tick, t(T0 + 5000));
    assert_eq!(x.state(), TxnState::Aborting);
    assert_eq!(x.progress.reason.as_deref(), Some("timeout: b did not vote within 5s"));
    assert_eq!(sent(&o).len(), 2);
    x.step(ack(0, Outcome::Aborted), t(T0 + 5001));
    let due = x.wake_ms().unwrap();
    assert_eq!(due, T0 + 6000);
    let o = x.step(Event::Tick, t(due));
    assert_eq!(sent(&o), vec![("abort", 1)], "only the unacked branch");
    assert!(matches!(o.effects[0], Effect::Send { resend: true, .. }));
    let next = x.wake_ms().unwrap();
    assert!(next > due + 1000 - 1 && next <= due + MAX_RESEND_DELAY_MS);
}

#[test]
fn acks_before_the_decision_and_strangers_are_refused() {
    let (mut x, _) = Txn::create(two_pc(), t(T0));
    assert!(x.step(ack(0, Outcome::Committed), t(T0)).reject.is_some());
    let stranger = Event::Vote(Vote { txn: "t1".into(), branch: 0, participant: "zz".into(), yes: true, reason: None });
    assert!(x.step(stranger, t(T0)).reject.unwrap().contains("belongs to"));
    let out_of_range =
        Event::Vote(Vote { txn: "t1".into(), branch: 7, participant: "a".into(), yes: true, reason: None });
    assert!(x.step(out_of_range, t(T0)).reject.is_some());
    assert!(x.step(result(0, StepKind::Action, StepStatus::Done), t(T0)).reject.is_some(), "a saga result in 2pc");
}

#[test]
fn a_rejected_submit_is_terminal_at_once_announced_and_sends_nothing() {
    let (mut txn, out) = Txn::rejected("t9", Some(Mode::Saga), "invalid spec: steps: empty".into(), t(T0));
    assert_eq!(txn.state(), TxnState::Rejected);
    assert!(txn.state().is_terminal() && txn.state().is_settled() && !txn.state().is_success());
    assert_eq!(out.effects, vec![Effect::Announce(TxnState::Rejected), Effect::Finish]);
    assert!(out.changed && out.reject.is_none());
    assert_eq!((txn.spec.id.as_str(), txn.spec.mode), ("t9", Mode::Saga));
    assert_eq!(txn.progress.reason.as_deref(), Some("invalid spec: steps: empty"));
    assert_eq!(txn.progress.finished_ms, Some(T0));
    assert_eq!(txn.wake_ms(), None);
    // Nothing moves it any more.
    let out = txn.step(Event::Submit, t(T0 + 1));
    assert!(out.effects.is_empty() && !out.changed);
    assert_eq!(txn.step(Event::Tick, t(T0 + 2)), Output::default());
}

#[test]
fn orphans_get_an_abort_for_a_yes() {
    assert_eq!(sent(&orphan(&vote(1, true))), vec![("abort", 1)]);
    assert!(orphan(&vote(1, false)).effects.is_empty());
}

#[test]
fn a_saga_runs_steps_in_order_and_completes() {
    let (mut x, o) = Txn::create(saga(3), t(T0));
    assert_eq!(sent(&o), vec![("execute", 0)]);
    assert_eq!(sent(&x.step(result(0, StepKind::Action, StepStatus::Done), t(T0 + 1))), vec![("execute", 1)]);
    assert_eq!(sent(&x.step(result(1, StepKind::Action, StepStatus::Done), t(T0 + 2))), vec![("execute", 2)]);
    let o = x.step(result(2, StepKind::Action, StepStatus::Done), t(T0 + 3));
    assert_eq!(x.state(), TxnState::Completed);
    assert_eq!(o.effects, vec![Effect::Announce(TxnState::Completed), Effect::Finish]);
}

#[test]
fn independent_steps_run_in_parallel() {
    let mut s = saga(3);
    s.branches[1].after = Some(vec![]);
    s.branches[2].after = Some(vec![0, 1]);
    let (mut x, o) = Txn::create(s, t(T0));
    assert_eq!(sent(&o), vec![("execute", 0), ("execute", 1)]);
    assert!(sent(&x.step(result(1, StepKind::Action, StepStatus::Done), t(T0 + 1))).is_empty());
    assert_eq!(sent(&x.step(result(0, StepKind::Action, StepStatus::Done), t(T0 + 2))), vec![("execute", 2)]);
}

#[test]
fn a_business_failure_compensates_what_ran_in_reverse_order() {
    let (mut x, _) = Txn::create(saga(3), t(T0));
    x.step(result(0, StepKind::Action, StepStatus::Done), t(T0 + 1));
    x.step(result(1, StepKind::Action, StepStatus::Done), t(T0 + 2));
    let o = x.step(result(2, StepKind::Action, StepStatus::Failed), t(T0 + 3));
    assert_eq!(x.state(), TxnState::Compensating);
    assert_eq!(x.progress.failed_step, Some(2));
    assert_eq!(x.progress.reason.as_deref(), Some("p2: why"));
    assert_eq!(sent(&o), vec![("compensate", 1)], "the failed step applied nothing");
    assert_eq!(sent(&x.step(result(1, StepKind::Compensation, StepStatus::Done), t(T0 + 4))), vec![("compensate", 0)]);
    assert!(sent(&x.step(result(1, StepKind::Compensation, StepStatus::Done), t(T0 + 4))).is_empty(), "a repeat");
    let o = x.step(result(0, StepKind::Compensation, StepStatus::Done), t(T0 + 5));
    assert_eq!(x.state(), TxnState::Compensated);
    assert!(o.effects.contains(&Effect::Finish));
}

#[test]
fn transient_errors_are_retried_with_backoff_then_compensate() {
    let (mut x, _) = Txn::create(saga(2), t(T0));
    x.step(result(0, StepKind::Action, StepStatus::Done), t(T0));
    let o = x.step(result(1, StepKind::Action, StepStatus::Error), t(T0 + 10));
    assert!(sent(&o).is_empty());
    assert_eq!(x.wake_ms(), Some(T0 + 110));
    let o = x.step(Event::Tick, t(T0 + 110));
    assert_eq!(sent(&o), vec![("execute", 1)]);
    let Effect::Send { msg: Message::Execute(e), resend: true } = &o.effects[0] else { panic!("{o:?}") };
    assert_eq!(e.attempt, 2);
    // The second attempt gets no answer within the step timeout: a third, after 200 ms.
    assert!(sent(&x.step(Event::Tick, t(T0 + 1109))).is_empty());
    x.step(Event::Tick, t(T0 + 1110));
    assert_eq!(x.wake_ms(), Some(T0 + 1310));
    assert_eq!(sent(&x.step(Event::Tick, t(T0 + 1310))), vec![("execute", 1)]);
    // The third (the limit) fails too: compensate both (step 1 may have applied).
    let o = x.step(result(1, StepKind::Action, StepStatus::Error), t(T0 + 1400));
    assert_eq!(x.state(), TxnState::Compensating);
    assert_eq!(sent(&o), vec![("compensate", 1)]);
    assert!(x.progress.reason.as_deref().unwrap().contains("gave up after 3 attempts"));
}

#[test]
fn a_transient_error_then_success_completes() {
    let (mut x, _) = Txn::create(saga(1), t(T0));
    x.step(result(0, StepKind::Action, StepStatus::Error), t(T0));
    x.step(Event::Tick, t(T0 + 100));
    x.step(result(0, StepKind::Action, StepStatus::Done), t(T0 + 101));
    assert_eq!(x.state(), TxnState::Completed);
}

#[test]
fn a_compensation_that_keeps_failing_is_stuck_then_recovers() {
    let (mut x, _) = Txn::create(saga(2), t(T0));
    x.step(result(0, StepKind::Action, StepStatus::Done), t(T0));
    x.step(result(1, StepKind::Action, StepStatus::Failed), t(T0));
    let mut now = T0;
    for attempt in 1..=3 {
        let o = x.step(result(0, StepKind::Compensation, StepStatus::Error), t(now));
        if attempt == 3 {
            assert_eq!(x.state(), TxnState::Stuck);
            assert!(o.effects.contains(&Effect::Announce(TxnState::Stuck)));
        }
        now = x.wake_ms().unwrap();
        assert_eq!(sent(&x.step(Event::Tick, t(now))), vec![("compensate", 0)], "never dropped");
    }
    assert_eq!(x.progress.branches[0].attempts, 4);
    x.step(result(0, StepKind::Compensation, StepStatus::Done), t(now + 1));
    assert_eq!(x.state(), TxnState::Compensated);
}

#[test]
fn the_saga_deadline_compensates_steps_in_flight() {
    let (mut x, _) = Txn::create(saga(2), t(T0));
    x.step(result(0, StepKind::Action, StepStatus::Done), t(T0));
    let due = T0 + x.spec.timeout_ms;
    // Keep step 1's attempts alive until the deadline.
    let o = x.step(Event::Tick, t(due));
    assert_eq!(x.state(), TxnState::Compensating);
    assert_eq!(sent(&o), vec![("compensate", 1)], "step 1 may have applied: compensate it first");
    assert!(x.progress.reason.as_deref().unwrap().starts_with("timeout: step 1 (p1)"));
}

#[test]
fn progress_round_trips_through_the_record() {
    let (mut x, _) = Txn::create(saga(2), t(T0));
    x.step(result(0, StepKind::Action, StepStatus::Done), t(T0));
    let fields: std::collections::HashMap<String, Vec<u8>> =
        crate::record::create_fields(&x).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let back = crate::record::txn_from_hash("s1", &fields).unwrap().unwrap();
    assert_eq!(back, x);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Ev {
        Vote(u32, bool),
        Ack(u32, bool),
        Result(u32, bool, u8),
        Tick(u64),
        Submit,
    }

    fn ev(n: u32) -> impl Strategy<Value = Ev> {
        prop_oneof![
            (0..n, any::<bool>()).prop_map(|(b, y)| Ev::Vote(b, y)),
            (0..n, any::<bool>()).prop_map(|(b, c)| Ev::Ack(b, c)),
            (0..n, any::<bool>(), 0..4u8).prop_map(|(b, a, s)| Ev::Result(b, a, s)),
            (0..40_000u64).prop_map(Ev::Tick),
            Just(Ev::Submit),
        ]
    }

    fn to_event(spec: &TxnSpec, e: &Ev) -> Event {
        let p = |b: u32| spec.branches[b as usize].participant.clone();
        let txn = spec.id.clone();
        match *e {
            Ev::Vote(b, yes) => Event::Vote(Vote { txn, branch: b, participant: p(b), yes, reason: None }),
            Ev::Ack(b, c) => Event::Ack(Ack {
                txn,
                branch: b,
                participant: p(b),
                outcome: if c { Outcome::Committed } else { Outcome::Aborted },
            }),
            Ev::Result(b, action, s) => Event::Result(StepResult {
                txn,
                branch: b,
                participant: p(b),
                step: if action { StepKind::Action } else { StepKind::Compensation },
                status: [StepStatus::Done, StepStatus::Failed, StepStatus::Error, StepStatus::Skipped][s as usize],
                reason: None,
            }),
            Ev::Tick(_) => Event::Tick,
            Ev::Submit => Event::Submit,
        }
    }

    proptest! {
        /// Whatever arrives in whatever order: 2PC never sends both commit and abort, commits
        /// only after every branch voted yes, and a terminal state never changes.
        #[test]
        fn two_pc_is_consistent(events in proptest::collection::vec(ev(2), 0..40)) {
            let spec = two_pc();
            let (mut x, _) = Txn::create(spec.clone(), t(T0));
            let (mut commits, mut aborts) = (false, false);
            let mut now = T0;
            let mut terminal: Option<TxnState> = None;
            for e in &events {
                if let Ev::Tick(d) = e { now += d; }
                let yes_before = x.progress.branches.iter().filter(|b| b.phase == Phase::VotedYes).count();
                let o = x.step(to_event(&spec, e), t(now));
                for s in sent(&o) {
                    match s.0 {
                        "commit" => { commits = true; prop_assert!(yes_before + 1 >= 2 || x.progress.branches.iter().all(|b| b.phase != Phase::Pending && b.phase != Phase::VotedNo)); }
                        "abort" => aborts = true,
                        _ => {}
                    }
                }
                prop_assert!(!(commits && aborts), "both commit and abort sent");
                if let Some(s) = terminal { prop_assert_eq!(x.state(), s); }
                if x.state().is_terminal() { terminal = Some(x.state()); }
                if x.state() == TxnState::Committed {
                    prop_assert!(x.progress.branches.iter().all(|b| b.phase == Phase::Committed));
                }
            }
        }

        /// A saga compensates only steps that were sent, never compensates a step before every
        /// later step that ran is compensated, and completes only when every action is done.
        #[test]
        fn saga_compensates_in_reverse_and_only_what_ran(events in proptest::collection::vec(ev(3), 0..60)) {
            let spec = saga(3);
            let (mut x, o) = Txn::create(spec.clone(), t(T0));
            let mut executed = [false; 3];
            for (_, b) in sent(&o) { executed[b as usize] = true; }
            let mut compensated_from: Option<u32> = None;
            let mut now = T0;
            for e in &events {
                if let Ev::Tick(d) = e { now += d; }
                let o = x.step(to_event(&spec, e), t(now));
                for (k, b) in sent(&o) {
                    match k {
                        "execute" => {
                            prop_assert!(x.state() == TxnState::Running, "no action after the compensation began");
                            executed[b as usize] = true;
                        }
                        "compensate" => {
                            prop_assert!(executed[b as usize], "compensating step {} that was never sent", b);
                            if let Some(prev) = compensated_from { prop_assert!(b <= prev, "compensations out of order"); }
                            compensated_from = Some(b);
                        }
                        _ => {}
                    }
                }
                if x.state() == TxnState::Completed {
                    prop_assert!(x.progress.branches.iter().all(|b| b.phase == Phase::Done));
                }
                if x.state() == TxnState::Compensated {
                    prop_assert!(x.progress.branches.iter().all(|b| !matches!(b.phase, Phase::Done | Phase::Running | Phase::Compensating)));
                }
            }
        }
    }
}

#[test]
fn a_compensation_that_finds_nothing_of_an_applied_action_is_not_success() {
    let (mut x, _) = Txn::create(saga(2), t(T0));
    x.step(result(0, StepKind::Action, StepStatus::Done), t(T0));
    x.step(result(1, StepKind::Action, StepStatus::Failed), t(T0));
    // Step 0 reported its action applied: a `skipped` compensation of it is a lost trace.
    let o = x.step(result(0, StepKind::Compensation, StepStatus::Skipped), t(T0 + 1));
    assert_eq!(x.state(), TxnState::Compensating, "{o:?}");
    assert_eq!(x.progress.branches[0].phase, Phase::Compensating);
    assert!(x.progress.branches[0].reason.as_deref().unwrap().contains("no trace of the action"));
    // A step whose action never reported back may be skipped: nothing ran there.
    let (mut y, _) = Txn::create(saga(2), t(T0));
    y.step(result(0, StepKind::Action, StepStatus::Done), t(T0));
    y.step(Event::Tick, t(T0 + y.spec.timeout_ms)); // deadline: step 1 never answered
    y.step(result(1, StepKind::Compensation, StepStatus::Skipped), t(T0 + 30_001));
    y.step(result(0, StepKind::Compensation, StepStatus::Done), t(T0 + 30_002));
    assert_eq!(y.state(), TxnState::Compensated);
}
