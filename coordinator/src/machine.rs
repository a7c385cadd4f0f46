//! The coordinator's decision logic as a pure state machine: no I/O, no clock.
//!
//! The record's transitions (vote and ack counting, the decision) happen atomically in the Lua
//! scripts (`lua/txn_*.lua`); each script answers with a small reply, typed here
//! ([`Created`], [`Voted`], [`Acked`], [`Expired`]). The `on_*` functions turn one event and the
//! script's reply into a [`Step`]: the [`Effect`]s the Redis layer must carry out (messages to
//! send, deadline to move or drop, outcome to publish), or the reason to dead-letter the entry.
//!
//! # The state table (mirrored once in Lua)
//!
//! | state now    | event                          | next state  | effects                                         |
//! |--------------|--------------------------------|-------------|-------------------------------------------------|
//! | (none)       | submit                         | preparing   | schedule at deadline; prepare to every branch   |
//! | preparing    | submit (again)                 | preparing   | schedule at deadline; prepare to every branch   |
//! | preparing    | yes vote, not the last         | preparing   | —                                               |
//! | preparing    | n-th yes vote                  | committing  | schedule re-send; commit to every branch        |
//! | preparing    | no vote                        | aborting    | schedule re-send; abort to every branch         |
//! | preparing    | deadline passed                | aborting    | schedule re-send; abort to every branch         |
//! | preparing    | deadline scan, not yet due     | preparing   | schedule at deadline                            |
//! | committing/aborting | submit (again)          | same        | schedule re-send; decision to every branch      |
//! | committing/aborting | vote (any)              | same        | decision to that branch unless it acked; schedule re-send |
//! | committing/aborting | ack (matching), not last| same        | —                                               |
//! | committing/aborting | n-th ack                | committed/aborted | publish outcome; drop deadline            |
//! | committing/aborting | deadline scan           | same        | decision to unacked branches; schedule re-send (backoff) |
//! | any          | ack not matching the decision  | same        | dead-letter (protocol violation)                |
//! | committed/aborted | submit, vote             | same        | —                                               |
//! | committed/aborted | ack, deadline scan       | same        | publish outcome; drop deadline (idempotent)     |
//! | (none)       | vote, ack                      | (none)      | — (logged: expired or never created)            |
//! | (none)       | deadline scan                  | (none)      | drop deadline                                   |

use redtx_common::protocol::{Ack, Message, Prepare, Resolve, Vote};
use redtx_common::record::TxnState;
use redtx_common::spec::TxnSpec;

/// Longest pause between two re-sends of a decision to a branch that does not ack.
pub const MAX_RESEND_DELAY_MS: u64 = 30_000;

/// What `txn_create` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// This call created the record.
    pub created: bool,
    /// The record's state.
    pub state: TxnState,
    /// The record's vote deadline (ms).
    pub deadline_ms: u64,
    /// The stored spec when the record existed already (it wins over the submitted one).
    pub stored_spec: Option<TxnSpec>,
}

/// What `txn_vote` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Voted {
    /// No record: never created, or expired after its retention.
    Missing,
    /// The vote names a branch the record does not have, or the wrong participant.
    Bad(String),
    /// The vote was looked at (counted if it was the branch's first, during `preparing`).
    Counted {
        /// State after the vote.
        state: TxnState,
        /// This vote made the decision.
        decided_now: bool,
        /// The voting branch has acked the decision already.
        branch_acked: bool,
        /// The stored spec (present unless the state is `preparing`).
        spec: Option<TxnSpec>,
    },
}

/// What `txn_ack` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acked {
    /// No record.
    Missing,
    /// Unknown branch or wrong participant.
    Bad(String),
    /// An ack before the decision or not matching it.
    Violation(String),
    /// The ack was looked at (counted if it was the branch's first).
    Counted {
        /// State after the ack.
        state: TxnState,
        /// This ack made the transaction terminal.
        finished_now: bool,
    },
}

/// What `txn_expire` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expired {
    /// No record.
    Missing,
    /// The record, after the scan's own change (if any).
    Found {
        /// State after the call.
        state: TxnState,
        /// The call aborted the transaction because its deadline passed.
        decided_now: bool,
        /// The vote deadline (ms).
        deadline_ms: u64,
        /// When the decision was written (ms).
        decided_ms: Option<u64>,
        /// Per branch: acked the decision.
        acked: Vec<bool>,
        /// The stored spec (present if the state is `committing` or `aborting`).
        spec: Option<TxnSpec>,
    },
}

/// One thing the Redis layer must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// `ZADD rtx:deadlines:{0} at_ms txn`: look at `txn` again at `at_ms`.
    Schedule { txn: String, at_ms: u64 },
    /// `XADD rtx:part:<participant>:{0}` of a `prepare`, `commit` or `abort`.
    Send(Message),
    /// `XADD rtx:outcomes:{0} MAXLEN ~ 100000 * id <txn> state <state>`.
    Publish { txn: String, state: TxnState },
    /// `ZREM rtx:deadlines:{0} txn`.
    Unschedule { txn: String },
}

/// The result of one event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// What to do, in order.
    pub effects: Vec<Effect>,
    /// `Some(reason)`: the entry can never be processed; dead-letter it.
    pub reject: Option<String>,
    /// This event wrote a decision (the `coordinator-after-decision` fail point applies).
    pub decided: bool,
    /// The event concerned a transaction without a record (worth a log line).
    pub missing: bool,
}

impl Step {
    fn reject(reason: impl Into<String>) -> Step {
        Step { reject: Some(reason.into()), ..Step::default() }
    }

    fn missing() -> Step {
        Step { missing: true, ..Step::default() }
    }
}

/// The clock and settings a step needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Now (ms since the epoch).
    pub now_ms: u64,
    /// Base interval between re-sends of a decision (ms).
    pub resend_every_ms: u64,
}

impl Timing {
    pub fn resend_at(&self, decided_ms: Option<u64>) -> u64 {
        let age = decided_ms.map(|d| self.now_ms.saturating_sub(d)).unwrap_or(0);
        self.now_ms + resend_delay(age, self.resend_every_ms)
    }
}

/// Pause before the next re-send of a decision made `age_ms` ago: `resend_every`, then growing
/// with the age (so the re-sends roughly double their spacing), capped at
/// [`MAX_RESEND_DELAY_MS`]. Needs no counter in the record.
pub fn resend_delay(age_ms: u64, resend_every_ms: u64) -> u64 {
    let base = resend_every_ms.max(1);
    age_ms.clamp(base, MAX_RESEND_DELAY_MS.max(base))
}

/// The message carrying `state`'s decision to branch `i` (`None` if `state` is not decided or
/// `i` is out of range).
pub fn decision(spec: &TxnSpec, state: TxnState, i: usize) -> Option<Message> {
    let b = spec.branches.get(i)?;
    let r = Resolve { txn: spec.id.clone(), branch: i as u32, participant: b.participant.clone(), keys: b.keys() };
    match state {
        TxnState::Committing | TxnState::Committed => Some(Message::Commit(r)),
        TxnState::Aborting | TxnState::Aborted => Some(Message::Abort(r)),
        TxnState::Preparing => None,
    }
}

/// The `prepare` of branch `i`.
pub fn prepare(spec: &TxnSpec, i: usize, deadline_ms: u64) -> Option<Message> {
    let b = spec.branches.get(i)?;
    Some(Message::Prepare(Prepare {
        txn: spec.id.clone(),
        branch: i as u32,
        participant: b.participant.clone(),
        deadline_ms,
        ops: b.ops.clone(),
    }))
}

fn decision_to_all(spec: &TxnSpec, state: TxnState) -> impl Iterator<Item = Effect> + '_ {
    (0..spec.branches.len()).filter_map(move |i| decision(spec, state, i).map(Effect::Send))
}

/// A (validated) `submit` of `submitted`, after `txn_create` answered `r`.
pub fn on_submit(submitted: &TxnSpec, r: &Created, t: Timing) -> Step {
    let spec = r.stored_spec.as_ref().unwrap_or(submitted);
    let txn = spec.id.clone();
    let mut effects = Vec::new();
    match r.state {
        TxnState::Preparing => {
            effects.push(Effect::Schedule { txn, at_ms: r.deadline_ms });
            effects.extend((0..spec.branches.len()).filter_map(|i| prepare(spec, i, r.deadline_ms).map(Effect::Send)));
        }
        TxnState::Committing | TxnState::Aborting => {
            effects.push(Effect::Schedule { txn, at_ms: t.resend_at(None) });
            effects.extend(decision_to_all(spec, r.state));
        }
        TxnState::Committed | TxnState::Aborted => {}
    }
    Step { effects, ..Step::default() }
}

/// A `vote`, after `txn_vote` answered `r`.
pub fn on_vote(vote: &Vote, r: &Voted, t: Timing) -> Step {
    let (state, decided_now, branch_acked, spec) = match r {
        Voted::Missing => return Step::missing(),
        Voted::Bad(why) => return Step::reject(why.clone()),
        Voted::Counted { state, decided_now, branch_acked, spec } => (*state, *decided_now, *branch_acked, spec),
    };
    if state == TxnState::Preparing || state.is_terminal() {
        return Step::default();
    }
    let Some(spec) = spec else {
        return Step::reject(format!("record of {} is {state} but holds no spec", vote.txn));
    };
    let mut effects = vec![Effect::Schedule { txn: vote.txn.clone(), at_ms: t.resend_at(None) }];
    if decided_now {
        effects.extend(decision_to_all(spec, state));
    } else if !branch_acked {
        // A repeated vote (re-delivered, or the decision was lost): tell that branch again; the
        // schedule makes the next deadline scan re-send to every other unacked branch too.
        effects.extend(decision(spec, state, vote.branch as usize).map(Effect::Send));
    } else {
        effects.clear();
    }
    Step { effects, decided: decided_now, ..Step::default() }
}

/// An `ack`, after `txn_ack` answered `r`.
pub fn on_ack(ack: &Ack, r: &Acked) -> Step {
    match r {
        Acked::Missing => Step::missing(),
        Acked::Bad(why) | Acked::Violation(why) => Step::reject(why.clone()),
        Acked::Counted { state, .. } if state.is_terminal() => Step {
            // Also on a repeated ack: a coordinator may have died between the script and the
            // publication; a second outcome entry is harmless to waiters.
            effects: vec![
                Effect::Publish { txn: ack.txn.clone(), state: *state },
                Effect::Unschedule { txn: ack.txn.clone() },
            ],
            ..Step::default()
        },
        Acked::Counted { .. } => Step::default(),
    }
}

/// The deadline scan found `txn` due, and `txn_expire` answered `r`.
pub fn on_expire(txn: &str, r: &Expired, t: Timing) -> Step {
    let Expired::Found { state, decided_now, deadline_ms, decided_ms, acked, spec } = r else {
        return Step { effects: vec![Effect::Unschedule { txn: txn.to_string() }], missing: true, ..Step::default() };
    };
    let txn = txn.to_string();
    match state {
        TxnState::Preparing => Step { effects: vec![Effect::Schedule { txn, at_ms: *deadline_ms }], ..Step::default() },
        TxnState::Committed | TxnState::Aborted => Step {
            effects: vec![Effect::Publish { txn: txn.clone(), state: *state }, Effect::Unschedule { txn }],
            ..Step::default()
        },
        TxnState::Committing | TxnState::Aborting => {
            let Some(spec) = spec else {
                return Step::reject(format!("record of {txn} is {state} but holds no spec"));
            };
            let mut effects = vec![Effect::Schedule { txn, at_ms: t.resend_at(*decided_ms) }];
            effects.extend(
                (0..spec.branches.len())
                    .filter(|&i| *decided_now || !acked.get(i).copied().unwrap_or(false))
                    .filter_map(|i| decision(spec, *state, i).map(Effect::Send)),
            );
            Step { effects, decided: *decided_now, ..Step::default() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redtx_common::protocol::Outcome;
    use redtx_common::spec::{Branch, Op};

    fn spec() -> TxnSpec {
        TxnSpec::new(vec![
            Branch { participant: "a".into(), ops: vec![Op::incrby("k1", -1), Op::incrby("k1", -1)] },
            Branch { participant: "b".into(), ops: vec![Op::set("k2", "v")] },
        ])
        .with_id("t1")
    }

    const T: Timing = Timing { now_ms: 1_000_000, resend_every_ms: 1000 };

    fn vote(branch: u32, yes: bool) -> Vote {
        Vote { txn: "t1".into(), branch, participant: ["a", "b"][branch as usize].into(), yes, reason: None }
    }

    fn sent(s: &Step) -> Vec<(&'static str, u32)> {
        s.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send(Message::Prepare(p)) => Some(("prepare", p.branch)),
                Effect::Send(Message::Commit(r)) => Some(("commit", r.branch)),
                Effect::Send(Message::Abort(r)) => Some(("abort", r.branch)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_new_submit_schedules_the_deadline_and_prepares_every_branch() {
        let r = Created { created: true, state: TxnState::Preparing, deadline_ms: 42, stored_spec: None };
        let s = on_submit(&spec(), &r, T);
        assert_eq!(s.effects[0], Effect::Schedule { txn: "t1".into(), at_ms: 42 });
        assert_eq!(sent(&s), vec![("prepare", 0), ("prepare", 1)]);
        let Effect::Send(Message::Prepare(p)) = &s.effects[1] else { panic!() };
        assert_eq!((p.deadline_ms, p.ops.len(), p.participant.as_str()), (42, 2, "a"));
    }

    #[test]
    fn a_resubmit_uses_the_stored_spec_and_state() {
        let mut stored = spec();
        stored.branches.truncate(1);
        let r = Created { created: false, state: TxnState::Aborting, deadline_ms: 42, stored_spec: Some(stored) };
        assert_eq!(sent(&on_submit(&spec(), &r, T)), vec![("abort", 0)]);
        let r = Created { created: false, state: TxnState::Committed, deadline_ms: 42, stored_spec: Some(spec()) };
        assert!(on_submit(&spec(), &r, T).effects.is_empty());
    }

    #[test]
    fn the_deciding_vote_sends_the_decision_to_every_branch() {
        let r =
            Voted::Counted { state: TxnState::Committing, decided_now: true, branch_acked: false, spec: Some(spec()) };
        let s = on_vote(&vote(1, true), &r, T);
        assert!(s.decided);
        assert_eq!(sent(&s), vec![("commit", 0), ("commit", 1)]);
        assert!(matches!(s.effects[0], Effect::Schedule { at_ms: 1_001_000, .. }));
        let Effect::Send(Message::Commit(c)) = &s.effects[1] else { panic!() };
        assert_eq!(c.keys, vec!["k1".to_string()]);
    }

    #[test]
    fn a_vote_after_the_decision_resends_it_to_that_branch_only() {
        let r =
            Voted::Counted { state: TxnState::Aborting, decided_now: false, branch_acked: false, spec: Some(spec()) };
        let s = on_vote(&vote(1, true), &r, T);
        assert!(!s.decided);
        assert_eq!(sent(&s), vec![("abort", 1)]);
        let r =
            Voted::Counted { state: TxnState::Aborting, decided_now: false, branch_acked: true, spec: Some(spec()) };
        assert!(on_vote(&vote(1, true), &r, T).effects.is_empty());
    }

    #[test]
    fn undecided_terminal_missing_and_bad_votes() {
        let r = Voted::Counted { state: TxnState::Preparing, decided_now: false, branch_acked: false, spec: None };
        assert_eq!(on_vote(&vote(0, true), &r, T), Step::default());
        let r =
            Voted::Counted { state: TxnState::Committed, decided_now: false, branch_acked: true, spec: Some(spec()) };
        assert_eq!(on_vote(&vote(0, true), &r, T), Step::default());
        assert!(on_vote(&vote(0, true), &Voted::Missing, T).missing);
        assert_eq!(on_vote(&vote(0, true), &Voted::Bad("x".into()), T).reject.as_deref(), Some("x"));
    }

    #[test]
    fn the_last_ack_publishes_and_unschedules() {
        let ack = Ack { txn: "t1".into(), branch: 0, participant: "a".into(), outcome: Outcome::Committed };
        let s = on_ack(&ack, &Acked::Counted { state: TxnState::Committed, finished_now: true });
        assert_eq!(
            s.effects,
            vec![
                Effect::Publish { txn: "t1".into(), state: TxnState::Committed },
                Effect::Unschedule { txn: "t1".into() }
            ]
        );
        assert!(on_ack(&ack, &Acked::Counted { state: TxnState::Committing, finished_now: false }).effects.is_empty());
        assert!(on_ack(&ack, &Acked::Violation("v".into())).reject.is_some());
    }

    #[test]
    fn the_deadline_scan() {
        let found = |state, decided_now, acked: Vec<bool>| Expired::Found {
            state,
            decided_now,
            deadline_ms: 5,
            decided_ms: Some(T.now_ms - 4000),
            acked,
            spec: Some(spec()),
        };
        let s = on_expire("t1", &found(TxnState::Aborting, true, vec![false, false]), T);
        assert!(s.decided);
        assert_eq!(sent(&s), vec![("abort", 0), ("abort", 1)]);
        let s = on_expire("t1", &found(TxnState::Committing, false, vec![true, false]), T);
        assert_eq!(sent(&s), vec![("commit", 1)]);
        assert_eq!(s.effects[0], Effect::Schedule { txn: "t1".into(), at_ms: T.now_ms + 4000 });
        let s = on_expire("t1", &found(TxnState::Preparing, false, vec![false, false]), T);
        assert_eq!(s.effects, vec![Effect::Schedule { txn: "t1".into(), at_ms: 5 }]);
        let s = on_expire("t1", &found(TxnState::Aborted, false, vec![true, true]), T);
        assert!(matches!(s.effects[..], [Effect::Publish { .. }, Effect::Unschedule { .. }]));
        assert_eq!(on_expire("t1", &Expired::Missing, T).effects, vec![Effect::Unschedule { txn: "t1".into() }]);
    }

    #[test]
    fn resend_backoff_grows_and_is_capped() {
        assert_eq!(resend_delay(0, 1000), 1000);
        assert_eq!(resend_delay(1500, 1000), 1500);
        assert_eq!(resend_delay(4000, 1000), 4000);
        assert_eq!(resend_delay(10_000_000, 1000), MAX_RESEND_DELAY_MS);
        assert_eq!(resend_delay(0, 60_000), 60_000);
    }
}
