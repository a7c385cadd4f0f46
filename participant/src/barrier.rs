//! The barrier rules: what a participant does with each request, given what its barrier for the
//! branch records. Pure (no I/O, no clock of its own): the runtime ([`crate::worker`]) calls
//! [`decide`], a [`Resource`](crate::resource::Resource) carries out the transition atomically,
//! and [`answer_after`] turns the new state into the reply.
//!
//! One barrier per (participant, transaction): a 2PC branch or a saga step. Its state is `None`
//! (never seen) or a [`BarrierState`]. "answer" means: reply without writing anything;
//! "→ X" means: a transition (compare-and-set on the current state) whose work is X;
//! "dead-letter" means: a protocol violation, nothing written, nothing sent.
//!
//! **2PC** (`prepare`, `commit`, `abort`):
//!
//! | barrier \ request      | prepare                                   | commit                    | abort                         |
//! |------------------------|-------------------------------------------|---------------------------|-------------------------------|
//! | none                   | → Try (lock, check, stage: `prepared` or `refused`); past its deadline: → Mark `refused` (nothing locked) | dead-letter (never prepared) | → Mark `aborted`: a tombstone, so a late prepare is refused |
//! | `prepared`             | answer yes (repeat)                       | → Confirm (`committed`)   | → Cancel (`aborted`)          |
//! | `refused`              | answer no, the recorded reason (repeat)   | dead-letter               | → Mark `aborted` (keeps the reason) |
//! | `committed`            | answer yes (repeat)                       | answer ack (repeat)       | dead-letter (already committed) |
//! | `aborted`              | answer no, the recorded reason            | dead-letter               | answer ack (repeat)           |
//! | `done`/`failed`/`compensated` | dead-letter (a saga step)          | dead-letter               | dead-letter                   |
//!
//! Before looking at the barrier, a prepare whose deadline lies further ahead than
//! [`spec::MAX_TIMEOUT`] + [`SKEW`] is answered no (a hand-made or corrupt message). A
//! *finished* barrier (`committed`, `refused`, `aborted`) recorded with another deadline than the
//! prepare's belongs to an earlier transaction with the same id (its record expired and the id
//! was submitted again): the prepare is answered no and nothing is written, so the old outcome
//! stays for its own duplicates. (A tombstone has no deadline: it refuses anyway.)
//!
//! **Saga** (`execute` an action, `compensate` it):
//!
//! | barrier \ request      | execute                                               | compensate                                 |
//! |------------------------|-------------------------------------------------------|--------------------------------------------|
//! | none                   | → Action (check and apply: `done`, or `failed` with the reason) | → Mark `compensated`: null compensation (nothing to undo), result `skipped`; a late action is refused |
//! | `done`                 | answer done (repeat)                                  | → Compensation (undo: `compensated`)       |
//! | `failed`               | answer failed, the recorded reason (repeat)           | → Mark `compensated` (nothing was applied), result `skipped` |
//! | `compensated`          | answer failed: compensated first (no hanging action)  | answer done, or `skipped` if it was marked (repeat) |
//! | 2PC states             | dead-letter                                           | dead-letter                                |

use redtx_common::protocol::{Execute, Outcome, Prepare, Resolve, StepKind, StepStatus};
use redtx_common::spec;
use std::time::Duration;

/// Margin for the skew between clocks (a worker's and Redis's, or two workers'): added to a
/// deadline before a barrier that must outlive it may expire, and to the longest timeout when
/// judging whether a prepare's deadline is plausible.
pub const SKEW: Duration = Duration::from_secs(60);

/// What a barrier records about a branch (2PC) or a step (saga).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarrierState {
    /// 2PC: locked, checked and staged; voted yes. Next: committed or aborted.
    Prepared,
    /// 2PC: refused at prepare (a guard, a conflict, the deadline); voted no. Next: aborted.
    Refused,
    /// 2PC: the staged change is applied. Final.
    Committed,
    /// 2PC: the staging is dropped, or (a tombstone) the abort came before any prepare. Final.
    Aborted,
    /// Saga: the action is applied. Next: compensated.
    Done,
    /// Saga: the action was refused for a business reason; nothing applied. Next: compensated.
    Failed,
    /// Saga: the action is undone, or there was nothing to undo (it failed, or never ran: a null
    /// compensation, after which the action is refused). Final.
    Compensated,
}

impl BarrierState {
    /// Every state.
    pub const ALL: [BarrierState; 7] = [
        BarrierState::Prepared,
        BarrierState::Refused,
        BarrierState::Committed,
        BarrierState::Aborted,
        BarrierState::Done,
        BarrierState::Failed,
        BarrierState::Compensated,
    ];

    /// The name stored in barriers (e.g. the `state` field of the key-value resource's hash).
    pub fn as_str(self) -> &'static str {
        match self {
            BarrierState::Prepared => "prepared",
            BarrierState::Refused => "refused",
            BarrierState::Committed => "committed",
            BarrierState::Aborted => "aborted",
            BarrierState::Done => "done",
            BarrierState::Failed => "failed",
            BarrierState::Compensated => "compensated",
        }
    }

    /// The state named `s` (see [`BarrierState::as_str`]).
    pub fn parse(s: &str) -> Option<BarrierState> {
        BarrierState::ALL.into_iter().find(|b| b.as_str() == s)
    }

    /// Whether this is a saga state.
    pub fn is_saga(self) -> bool {
        matches!(self, BarrierState::Done | BarrierState::Failed | BarrierState::Compensated)
    }
}

impl std::fmt::Display for BarrierState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A branch's barrier as a resource stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Barrier {
    /// Where the branch stands.
    pub state: BarrierState,
    /// Why it was refused, failed or aborted (or what a mark recorded).
    pub reason: Option<String>,
    /// 2PC: the deadline of the prepare that created it (none for a tombstone or a saga step).
    pub deadline_ms: Option<u64>,
}

impl Barrier {
    /// A barrier in `state` with no reason and no deadline.
    pub fn new(state: BarrierState) -> Self {
        Barrier { state, reason: None, deadline_ms: None }
    }
}

/// One request to a participant, already checked to be addressed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// 2PC phase one: lock, check and stage; answer with a vote.
    Prepare(Prepare),
    /// 2PC phase two: apply the staged branch; answer with an ack.
    Commit(Resolve),
    /// 2PC phase two: drop the staged branch (or leave a tombstone); answer with an ack.
    Abort(Resolve),
    /// Saga: apply the step's action; answer with a result.
    Execute(Execute),
    /// Saga: undo the step's action; answer with a result.
    Compensate(Execute),
}

impl Request {
    /// The transaction id.
    pub fn txn(&self) -> &str {
        match self {
            Request::Prepare(p) => &p.txn,
            Request::Commit(r) | Request::Abort(r) => &r.txn,
            Request::Execute(e) | Request::Compensate(e) => &e.txn,
        }
    }

    /// The branch (step) index.
    pub fn branch(&self) -> u32 {
        match self {
            Request::Prepare(p) => p.branch,
            Request::Commit(r) | Request::Abort(r) => r.branch,
            Request::Execute(e) | Request::Compensate(e) => e.branch,
        }
    }

    /// The participant it is addressed to.
    pub fn participant(&self) -> &str {
        match self {
            Request::Prepare(p) => &p.participant,
            Request::Commit(r) | Request::Abort(r) => &r.participant,
            Request::Execute(e) | Request::Compensate(e) => &e.participant,
        }
    }

    /// The payload the work needs (the branch's, the action's or the compensation's); empty for
    /// commit and abort.
    pub fn payload(&self) -> &[u8] {
        match self {
            Request::Prepare(p) => &p.payload,
            Request::Commit(_) | Request::Abort(_) => &[],
            Request::Execute(e) | Request::Compensate(e) => &e.payload,
        }
    }

    /// The message type: `prepare`, `commit`, `abort`, `execute` or `compensate`.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Prepare(_) => "prepare",
            Request::Commit(_) => "commit",
            Request::Abort(_) => "abort",
            Request::Execute(_) => "execute",
            Request::Compensate(_) => "compensate",
        }
    }

    /// The barrier state the runtime guesses first, so that the common case is one round trip:
    /// none for prepare and execute, `prepared` for commit and abort, `done` for compensate.
    pub fn likely(&self) -> Option<Barrier> {
        match self {
            Request::Prepare(_) | Request::Execute(_) => None,
            Request::Commit(_) | Request::Abort(_) => Some(Barrier::new(BarrierState::Prepared)),
            Request::Compensate(_) => Some(Barrier::new(BarrierState::Done)),
        }
    }
}

/// The business (or barrier-only) work of a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// 2PC prepare: lock, check and stage the payload. Ends `prepared`, or `refused` with the
    /// reason (a guard, a conflict, a bad payload), recorded atomically.
    Try,
    /// 2PC commit: apply what was staged, release the locks. Ends `committed`.
    Confirm,
    /// 2PC abort of a prepared branch: release the locks, drop the staging. Ends `aborted`.
    Cancel,
    /// Saga action: check and apply the payload. Ends `done`, or `failed` with the reason.
    Action,
    /// Saga compensation: undo, by applying the compensation payload. Ends `compensated`; a
    /// compensation the business refuses leaves the barrier `done` (nothing recorded) and
    /// reports the reason.
    Compensation,
    /// Barrier only, no business change: record `to` with `reason` (a tombstone, a null
    /// compensation, a late prepare's refusal, the abort of a refused branch).
    Mark { to: BarrierState, reason: Option<String> },
}

impl Work {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Work::Try => "try",
            Work::Confirm => "confirm",
            Work::Cancel => "cancel",
            Work::Action => "action",
            Work::Compensation => "compensation",
            Work::Mark { .. } => "mark",
        }
    }
}

/// What the participant answers to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// To a prepare.
    Vote { yes: bool, reason: Option<String> },
    /// To a commit or abort.
    Ack(Outcome),
    /// To an execute (`step` = action) or compensate (`step` = compensation).
    Step { step: StepKind, status: StepStatus, reason: Option<String> },
    /// The request contradicts the barrier (e.g. commit of a branch never prepared): nothing is
    /// written or sent, the entry is dead-lettered with this reason.
    Violation(String),
}

/// What to do with a request, given its barrier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer at once, writing nothing (a repeat, a refusal that needs no record, a violation).
    Answer(Answer),
    /// Change the barrier: only if it is still in state `expect` (`None`: there is none), and
    /// together with `work`, atomically.
    Transition { expect: Option<BarrierState>, work: Work },
}

fn vote(yes: bool, reason: Option<String>) -> Decision {
    Decision::Answer(Answer::Vote { yes, reason })
}

fn step(step: StepKind, status: StepStatus, reason: Option<String>) -> Decision {
    Decision::Answer(Answer::Step { step, status, reason })
}

fn go(expect: Option<BarrierState>, work: Work) -> Decision {
    Decision::Transition { expect, work }
}

fn violation(req: &Request, b: Option<&Barrier>, why: &str) -> Decision {
    let state = b.map(|b| b.state.as_str()).unwrap_or("none");
    Decision::Answer(Answer::Violation(format!(
        "{} of txn {} branch {} at participant {}: {why} (barrier: {state})",
        req.kind(),
        req.txn(),
        req.branch(),
        req.participant()
    )))
}

/// The reason recorded or answered, with the participant's name in front.
fn reason(p: &str, why: impl std::fmt::Display) -> Option<String> {
    Some(format!("{p}: {why}"))
}

/// The reason recorded by a null compensation at participant `p` (a compensation that came
/// before its action: nothing to undo, and the late action is refused).
pub fn null_compensation(p: &str) -> String {
    format!("{p}: compensated before its action ran (null compensation)")
}

/// The furthest deadline a genuine prepare can carry, seen at `now_ms`.
pub fn furthest_deadline(now_ms: u64) -> u64 {
    now_ms.saturating_add((spec::MAX_TIMEOUT + SKEW).as_millis() as u64)
}

/// The barrier rules (see the module doc for the table): what to do with `req` when its barrier
/// is `current`, at `now_ms`.
pub fn decide(current: Option<&Barrier>, req: &Request, now_ms: u64) -> Decision {
    use BarrierState::*;
    let p = req.participant();
    let state = current.map(|b| b.state);
    let recorded = |default: &str| current.and_then(|b| b.reason.clone()).or_else(|| reason(p, default));
    match req {
        Request::Prepare(prep) => {
            if prep.deadline_ms > furthest_deadline(now_ms) {
                return vote(
                    false,
                    reason(
                        p,
                        format_args!(
                            "invalid prepare: deadline {} is further ahead than the longest timeout ({})",
                            prep.deadline_ms,
                            humantime::format_duration(spec::MAX_TIMEOUT)
                        ),
                    ),
                );
            }
            if let Some(b) = current.filter(|b| matches!(b.state, Committed | Refused | Aborted)) {
                if b.deadline_ms.is_some_and(|d| d != prep.deadline_ms) {
                    return vote(
                        false,
                        reason(
                            p,
                            "an earlier transaction with this id finished here and is still remembered; \
                             submit the new one under a new id",
                        ),
                    );
                }
            }
            match state {
                None if now_ms > prep.deadline_ms => go(
                    None,
                    Work::Mark {
                        to: Refused,
                        reason: reason(
                            p,
                            format_args!("prepare arrived {} ms after the deadline", now_ms - prep.deadline_ms),
                        ),
                    },
                ),
                None => go(None, Work::Try),
                Some(Prepared | Committed) => vote(true, None),
                Some(Refused | Aborted) => vote(false, recorded("transaction was aborted")),
                Some(Done | Failed | Compensated) => violation(req, current, "a saga step cannot be prepared"),
            }
        }
        Request::Commit(_) => match state {
            Some(Prepared) => go(Some(Prepared), Work::Confirm),
            Some(Committed) => Decision::Answer(Answer::Ack(Outcome::Committed)),
            None | Some(Refused | Aborted) => violation(req, current, "the branch was never prepared here"),
            Some(Done | Failed | Compensated) => violation(req, current, "a saga step cannot be committed"),
        },
        Request::Abort(_) => match state {
            None => go(None, Work::Mark { to: Aborted, reason: reason(p, "aborted before prepare") }),
            Some(Prepared) => go(Some(Prepared), Work::Cancel),
            Some(Refused) => go(Some(Refused), Work::Mark { to: Aborted, reason: recorded("transaction was aborted") }),
            Some(Aborted) => Decision::Answer(Answer::Ack(Outcome::Aborted)),
            Some(Committed) => violation(req, current, "the branch is already committed"),
            Some(Done | Failed | Compensated) => violation(req, current, "a saga step cannot be aborted"),
        },
        Request::Execute(_) => match state {
            None => go(None, Work::Action),
            Some(Done) => step(StepKind::Action, StepStatus::Done, None),
            Some(Failed) => step(StepKind::Action, StepStatus::Failed, recorded("the action failed")),
            Some(Compensated) => step(
                StepKind::Action,
                StepStatus::Failed,
                reason(p, "the step was compensated before this action arrived; not applied"),
            ),
            Some(Prepared | Refused | Committed | Aborted) => {
                violation(req, current, "a 2PC branch cannot be executed")
            }
        },
        Request::Compensate(_) => match state {
            None => go(None, Work::Mark { to: Compensated, reason: Some(null_compensation(p)) }),
            Some(Done) => go(Some(Done), Work::Compensation),
            Some(Failed) => go(
                Some(Failed),
                Work::Mark {
                    to: Compensated,
                    reason: recorded("the action failed").map(|r| format!("nothing to undo: {r}")),
                },
            ),
            // A barrier compensated with a reason was a null compensation (nothing undone).
            Some(Compensated) => match current.and_then(|b| b.reason.clone()) {
                Some(why) => step(StepKind::Compensation, StepStatus::Skipped, Some(why)),
                None => step(StepKind::Compensation, StepStatus::Done, None),
            },
            Some(Prepared | Refused | Committed | Aborted) => {
                violation(req, current, "a 2PC branch cannot be compensated")
            }
        },
    }
}

/// The answer to `req` once a transition left its barrier in `state` (with `reason`), or `None`
/// if that state does not settle the request (a resource bug: the request stays pending).
pub fn answer_after(req: &Request, state: BarrierState, reason: Option<String>) -> Option<Answer> {
    use BarrierState::*;
    Some(match (req, state) {
        (Request::Prepare(_), Prepared) => Answer::Vote { yes: true, reason: None },
        (Request::Prepare(_), Refused | Aborted) => Answer::Vote { yes: false, reason },
        (Request::Commit(_), Committed) => Answer::Ack(Outcome::Committed),
        (Request::Abort(_), Aborted) => Answer::Ack(Outcome::Aborted),
        (Request::Execute(_), Done) => Answer::Step { step: StepKind::Action, status: StepStatus::Done, reason: None },
        (Request::Execute(_), Failed) => Answer::Step { step: StepKind::Action, status: StepStatus::Failed, reason },
        // Undone (no reason), or marked compensated with the reason there was nothing to undo.
        (Request::Compensate(_), Compensated) => match reason {
            None => Answer::Step { step: StepKind::Compensation, status: StepStatus::Done, reason: None },
            Some(why) => Answer::Step { step: StepKind::Compensation, status: StepStatus::Skipped, reason: Some(why) },
        },
        // The business refused the compensation: nothing recorded, the action stays applied.
        (Request::Compensate(_), Done) => {
            Answer::Step { step: StepKind::Compensation, status: StepStatus::Failed, reason }
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use BarrierState::*;

    const NOW: u64 = 1_000_000;
    const DEADLINE: u64 = NOW + 5_000;

    fn prepare(deadline_ms: u64) -> Request {
        Request::Prepare(Prepare {
            txn: "t1".into(),
            branch: 0,
            participant: "bank-a".into(),
            deadline_ms,
            payload: vec![1],
        })
    }

    fn resolve() -> Resolve {
        Resolve { txn: "t1".into(), branch: 0, participant: "bank-a".into() }
    }

    fn execute() -> Execute {
        Execute { txn: "t1".into(), branch: 0, participant: "bank-a".into(), attempt: 1, payload: vec![1] }
    }

    fn bar(state: BarrierState, reason: Option<&str>, deadline_ms: Option<u64>) -> Barrier {
        Barrier { state, reason: reason.map(Into::into), deadline_ms }
    }

    fn d(b: Option<Barrier>, req: &Request) -> Decision {
        decide(b.as_ref(), req, NOW)
    }

    fn yes() -> Decision {
        vote(true, None)
    }

    fn no(r: &str) -> Decision {
        vote(false, Some(r.into()))
    }

    fn is_violation(x: &Decision) -> bool {
        matches!(x, Decision::Answer(Answer::Violation(_)))
    }

    fn action(status: StepStatus, reason: Option<&str>) -> Decision {
        step(StepKind::Action, status, reason.map(Into::into))
    }

    // ---- 2PC: prepare ----

    #[test]
    fn prepare_on_nothing_tries() {
        assert_eq!(d(None, &prepare(DEADLINE)), go(None, Work::Try));
    }

    #[test]
    fn prepare_past_its_deadline_refuses_without_locking() {
        let Decision::Transition { expect: None, work: Work::Mark { to: Refused, reason: Some(r) } } =
            d(None, &prepare(NOW - 250))
        else {
            panic!("expected a refusal mark")
        };
        assert_eq!(r, "bank-a: prepare arrived 250 ms after the deadline");
        // Exactly at the deadline is still in time.
        assert_eq!(d(None, &prepare(NOW)), go(None, Work::Try));
    }

    #[test]
    fn prepare_with_an_implausible_deadline_votes_no_whatever_the_barrier() {
        let too_far = NOW + (spec::MAX_TIMEOUT + SKEW).as_millis() as u64 + 1;
        for b in [None, Some(bar(Prepared, None, Some(too_far)))] {
            let Decision::Answer(Answer::Vote { yes: false, reason: Some(r) }) = d(b, &prepare(too_far)) else {
                panic!("expected a no vote")
            };
            assert!(r.starts_with("bank-a: invalid prepare: deadline") && r.contains("longest timeout"), "{r}");
        }
        assert_eq!(d(None, &prepare(too_far - 1)), go(None, Work::Try));
    }

    #[test]
    fn prepare_repeats_on_prepared_and_committed_vote_yes() {
        assert_eq!(d(Some(bar(Prepared, None, Some(DEADLINE))), &prepare(DEADLINE)), yes());
        assert_eq!(d(Some(bar(Committed, None, Some(DEADLINE))), &prepare(DEADLINE)), yes());
        // Late repeats too: the branch is prepared, whatever the clock says now.
        assert_eq!(d(Some(bar(Prepared, None, Some(NOW - 1))), &prepare(NOW - 1)), yes());
    }

    #[test]
    fn prepare_repeats_on_refused_and_aborted_vote_no_with_the_recorded_reason() {
        let r = "bank-a: conflict: k is held by another transaction";
        assert_eq!(d(Some(bar(Refused, Some(r), Some(DEADLINE))), &prepare(DEADLINE)), no(r));
        assert_eq!(d(Some(bar(Aborted, Some(r), Some(DEADLINE))), &prepare(DEADLINE)), no(r));
        assert_eq!(
            d(Some(bar(Aborted, None, Some(DEADLINE))), &prepare(DEADLINE)),
            no("bank-a: transaction was aborted")
        );
    }

    #[test]
    fn prepare_after_an_abort_tombstone_votes_no() {
        let tomb = bar(Aborted, Some("bank-a: aborted before prepare"), None);
        assert_eq!(d(Some(tomb), &prepare(DEADLINE)), no("bank-a: aborted before prepare"));
    }

    #[test]
    fn prepare_on_a_finished_barrier_of_an_earlier_transaction_votes_no_and_writes_nothing() {
        for s in [Committed, Refused, Aborted] {
            let Decision::Answer(Answer::Vote { yes: false, reason: Some(r) }) =
                d(Some(bar(s, Some("old"), Some(DEADLINE - 1))), &prepare(DEADLINE))
            else {
                panic!("expected a no vote on {s}")
            };
            assert!(r.contains("an earlier transaction with this id"), "{r}");
        }
        // A prepared barrier is live: it is this transaction's (repeat).
        assert_eq!(d(Some(bar(Prepared, None, Some(DEADLINE - 1))), &prepare(DEADLINE)), yes());
    }

    #[test]
    fn prepare_of_a_saga_step_is_a_violation() {
        for s in [Done, Failed, Compensated] {
            assert!(is_violation(&d(Some(bar(s, None, None)), &prepare(DEADLINE))), "{s}");
        }
    }

    // ---- 2PC: commit ----

    #[test]
    fn commit_confirms_a_prepared_branch_and_repeats_ack() {
        let c = Request::Commit(resolve());
        assert_eq!(d(Some(bar(Prepared, None, Some(DEADLINE))), &c), go(Some(Prepared), Work::Confirm));
        assert_eq!(
            d(Some(bar(Committed, None, Some(DEADLINE))), &c),
            Decision::Answer(Answer::Ack(Outcome::Committed))
        );
    }

    #[test]
    fn commit_of_a_branch_never_prepared_is_a_violation() {
        let c = Request::Commit(resolve());
        for b in [None, Some(bar(Refused, None, None)), Some(bar(Aborted, None, None))] {
            let Decision::Answer(Answer::Violation(v)) = d(b.clone(), &c) else { panic!("{b:?}") };
            assert!(v.contains("never prepared") && v.contains("t1"), "{v}");
        }
        for s in [Done, Failed, Compensated] {
            assert!(is_violation(&d(Some(bar(s, None, None)), &c)), "{s}");
        }
    }

    // ---- 2PC: abort ----

    #[test]
    fn abort_before_prepare_leaves_a_tombstone() {
        assert_eq!(
            d(None, &Request::Abort(resolve())),
            go(None, Work::Mark { to: Aborted, reason: Some("bank-a: aborted before prepare".into()) })
        );
    }

    #[test]
    fn abort_cancels_prepared_marks_refused_and_repeats_ack() {
        let a = Request::Abort(resolve());
        assert_eq!(d(Some(bar(Prepared, None, None)), &a), go(Some(Prepared), Work::Cancel));
        assert_eq!(
            d(Some(bar(Refused, Some("bank-a: conflict"), None)), &a),
            go(Some(Refused), Work::Mark { to: Aborted, reason: Some("bank-a: conflict".into()) })
        );
        assert_eq!(d(Some(bar(Aborted, None, None)), &a), Decision::Answer(Answer::Ack(Outcome::Aborted)));
    }

    #[test]
    fn abort_of_a_committed_branch_is_a_violation() {
        let a = Request::Abort(resolve());
        let Decision::Answer(Answer::Violation(v)) = d(Some(bar(Committed, None, None)), &a) else { panic!() };
        assert!(v.contains("already committed"), "{v}");
        for s in [Done, Failed, Compensated] {
            assert!(is_violation(&d(Some(bar(s, None, None)), &a)), "{s}");
        }
    }

    // ---- saga: execute ----

    #[test]
    fn execute_applies_once() {
        let e = Request::Execute(execute());
        assert_eq!(d(None, &e), go(None, Work::Action));
        assert_eq!(d(Some(bar(Done, None, None)), &e), action(StepStatus::Done, None));
        assert_eq!(
            d(Some(bar(Failed, Some("bank-a: k would be -1, below min 0"), None)), &e),
            action(StepStatus::Failed, Some("bank-a: k would be -1, below min 0"))
        );
    }

    #[test]
    fn execute_after_its_compensation_is_refused() {
        let e = Request::Execute(execute());
        let Decision::Answer(Answer::Step { step: StepKind::Action, status: StepStatus::Failed, reason: Some(r) }) =
            d(Some(bar(Compensated, None, None)), &e)
        else {
            panic!("expected a failed result")
        };
        assert!(r.starts_with("bank-a: ") && r.contains("compensated before this action arrived"), "{r}");
    }

    #[test]
    fn execute_of_a_2pc_branch_is_a_violation() {
        for s in [Prepared, Refused, Committed, Aborted] {
            assert!(is_violation(&d(Some(bar(s, None, None)), &Request::Execute(execute()))), "{s}");
        }
    }

    // ---- saga: compensate ----

    #[test]
    fn compensate_without_its_action_is_a_null_compensation() {
        let Decision::Transition { expect: None, work: Work::Mark { to: Compensated, reason: Some(r) } } =
            d(None, &Request::Compensate(execute()))
        else {
            panic!()
        };
        assert!(r.contains("null compensation"), "{r}");
    }

    #[test]
    fn compensate_undoes_done_marks_failed_and_repeats_done() {
        let c = Request::Compensate(execute());
        assert_eq!(d(Some(bar(Done, None, None)), &c), go(Some(Done), Work::Compensation));
        assert_eq!(
            d(Some(bar(Failed, Some("bank-a: below min"), None)), &c),
            go(Some(Failed), Work::Mark { to: Compensated, reason: Some("nothing to undo: bank-a: below min".into()) })
        );
        assert_eq!(d(Some(bar(Compensated, None, None)), &c), step(StepKind::Compensation, StepStatus::Done, None));
    }

    #[test]
    fn compensate_of_a_2pc_branch_is_a_violation() {
        for s in [Prepared, Refused, Committed, Aborted] {
            assert!(is_violation(&d(Some(bar(s, None, None)), &Request::Compensate(execute()))), "{s}");
        }
    }

    // ---- every cell ----

    /// Every (barrier, request) cell decides, and every transition expects the barrier it was
    /// decided on: a compare-and-set never "expects" a state other than the one seen.
    #[test]
    fn every_cell_decides_and_transitions_expect_what_they_saw() {
        let requests = [
            prepare(DEADLINE),
            Request::Commit(resolve()),
            Request::Abort(resolve()),
            Request::Execute(execute()),
            Request::Compensate(execute()),
        ];
        let barriers = std::iter::once(None)
            .chain(BarrierState::ALL.into_iter().map(|s| Some(bar(s, None, Some(DEADLINE)))))
            .collect::<Vec<_>>();
        for req in &requests {
            for b in &barriers {
                if let Decision::Transition { expect, work } = d(b.clone(), req) {
                    assert_eq!(expect, b.as_ref().map(|b| b.state), "{req:?} on {b:?}");
                    // What the transition ends in settles the request.
                    let ends = match &work {
                        Work::Try => vec![Prepared, Refused],
                        Work::Confirm => vec![Committed],
                        Work::Cancel => vec![Aborted],
                        Work::Action => vec![Done, Failed],
                        Work::Compensation => vec![Compensated, Done],
                        Work::Mark { to, .. } => vec![*to],
                    };
                    for end in ends {
                        assert!(answer_after(req, end, None).is_some(), "{req:?} {work:?} -> {end}");
                    }
                }
            }
        }
    }

    #[test]
    fn answers_after_a_transition() {
        let p = prepare(DEADLINE);
        assert_eq!(answer_after(&p, Prepared, None), Some(Answer::Vote { yes: true, reason: None }));
        assert_eq!(
            answer_after(&p, Refused, Some("r".into())),
            Some(Answer::Vote { yes: false, reason: Some("r".into()) })
        );
        assert_eq!(answer_after(&p, Committed, None), None);
        assert_eq!(answer_after(&Request::Commit(resolve()), Committed, None), Some(Answer::Ack(Outcome::Committed)));
        assert_eq!(answer_after(&Request::Commit(resolve()), Aborted, None), None);
        assert_eq!(answer_after(&Request::Abort(resolve()), Aborted, None), Some(Answer::Ack(Outcome::Aborted)));
        let e = Request::Execute(execute());
        assert_eq!(
            answer_after(&e, Failed, Some("r".into())),
            Some(Answer::Step { step: StepKind::Action, status: StepStatus::Failed, reason: Some("r".into()) })
        );
        let c = Request::Compensate(execute());
        assert_eq!(
            answer_after(&c, Done, Some("r".into())),
            Some(Answer::Step { step: StepKind::Compensation, status: StepStatus::Failed, reason: Some("r".into()) })
        );
        assert_eq!(answer_after(&c, Failed, None), None);
    }

    #[test]
    fn states_round_trip_their_names() {
        for s in BarrierState::ALL {
            assert_eq!(BarrierState::parse(s.as_str()), Some(s));
        }
        assert_eq!(BarrierState::parse("nope"), None);
    }

    #[test]
    fn guesses() {
        assert_eq!(prepare(DEADLINE).likely(), None);
        assert_eq!(Request::Execute(execute()).likely(), None);
        assert_eq!(Request::Commit(resolve()).likely().map(|b| b.state), Some(Prepared));
        assert_eq!(Request::Abort(resolve()).likely().map(|b| b.state), Some(Prepared));
        assert_eq!(Request::Compensate(execute()).likely().map(|b| b.state), Some(Done));
    }
}
