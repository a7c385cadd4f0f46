//! The conformance suite: every barrier rule of [`crate::barrier`], run against any
//! [`Resource`] through the runtime's real decision path ([`settle`]).
//!
//! A resource's own test calls [`run`] with the resource and a [`Fixture`], which supplies the
//! business side: payloads that add (or remove) one unit of an item, one the business refuses,
//! and a way to count an item's units. Items are named afresh on every run, so the suite can run
//! against a store that holds other data (or earlier runs). The first rule that does not hold
//! is returned as a [`Failure`] naming it.
//!
//! ```ignore
//! let mut kv = KvResource::new(url, "bank-a", Duration::from_secs(3600));
//! redtx_participant::conformance::run(&mut kv, &mut my_fixture).await.unwrap();
//! ```

use crate::barrier::{Answer, Barrier, BarrierState, Request, Work};
use crate::resource::{Applied, Resource, Transition};
use crate::worker::settle;
use redtx_common::protocol::{Execute, Outcome, Prepare, Resolve, StepKind, StepStatus};
use redtx_common::Result;
use std::future::Future;

/// The business side of a resource under test.
pub trait Fixture: Send {
    /// The participant the resource serves (every request of the suite is addressed to it).
    fn participant(&self) -> &str;
    /// A payload adding one unit to `item` (the business accepts it, any number of times).
    fn add(&self, item: &str) -> Vec<u8>;
    /// A payload removing one unit from `item`: the compensation of [`Fixture::add`].
    fn remove(&self, item: &str) -> Vec<u8>;
    /// A payload the business refuses (e.g. a guard that fails); it changes nothing.
    fn refused(&self) -> Vec<u8>;
    /// How many units `item` holds now (0 for an item never touched).
    fn count(&mut self, item: &str) -> impl Future<Output = Result<i64>> + Send;
}

/// A rule that does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The rule, as listed in [`RULES`].
    pub rule: &'static str,
    /// What happened instead.
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "conformance rule `{}` does not hold: {}", self.rule, self.detail)
    }
}

impl std::error::Error for Failure {}

/// The rules, in the order they run.
pub const RULES: &[&str] = &[
    "2pc: prepare stages; commit applies once; repeats answer the same",
    "2pc: abort of a prepared branch drops it; a later prepare votes no; commit is a violation",
    "2pc: a prepare the business refuses votes no with the reason, again on a repeat",
    "2pc: an abort before the prepare leaves a tombstone that refuses the prepare",
    "2pc: a prepare past its deadline votes no and locks nothing",
    "2pc: a prepare with a deadline beyond the longest timeout votes no and writes nothing",
    "2pc: commit of a branch never prepared is a violation",
    "2pc: abort of a committed branch is a violation",
    "2pc: a finished barrier of an earlier transaction with the same id refuses a new prepare",
    "2pc: requests of one branch in one batch are settled in order",
    "saga: an action applies once; repeats answer done",
    "saga: an action the business refuses fails, again on a repeat; its compensation does nothing",
    "saga: a compensation undoes once; the action is not applied again",
    "saga: a compensation before its action is a null compensation; the late action is refused",
    "saga and 2pc requests do not mix on one barrier",
    "resource: a transition on a barrier that moved changes nothing and reports the barrier",
];

struct Suite<'a, R, F> {
    resource: &'a mut R,
    fx: &'a mut F,
    run: String,
    next: u32,
    rule: usize,
}

fn yes() -> Answer {
    Answer::Vote { yes: true, reason: None }
}

fn ack(o: Outcome) -> Answer {
    Answer::Ack(o)
}

fn step(step: StepKind, status: StepStatus) -> Answer {
    Answer::Step { step, status, reason: None }
}

impl<R: Resource, F: Fixture> Suite<'_, R, F> {
    fn fail(&self, detail: impl Into<String>) -> Failure {
        Failure { rule: RULES[self.rule], detail: detail.into() }
    }

    fn start(&mut self, rule: usize) {
        self.rule = rule;
        tracing::debug!(rule = RULES[rule], "conformance");
    }

    /// A fresh transaction id and item name.
    fn fresh(&mut self) -> (String, String) {
        self.next += 1;
        (format!("conf-{}-{}", self.run, self.next), format!("{}-{}", self.run, self.next))
    }

    fn participant(&self) -> String {
        self.fx.participant().to_string()
    }

    fn prepare(&self, txn: &str, payload: Vec<u8>, deadline_ms: u64) -> Request {
        Request::Prepare(Prepare { txn: txn.into(), branch: 0, participant: self.participant(), deadline_ms, payload })
    }

    fn commit(&self, txn: &str) -> Request {
        Request::Commit(Resolve { txn: txn.into(), branch: 0, participant: self.participant() })
    }

    fn abort(&self, txn: &str) -> Request {
        Request::Abort(Resolve { txn: txn.into(), branch: 0, participant: self.participant() })
    }

    fn execute(&self, txn: &str, payload: Vec<u8>) -> Request {
        Request::Execute(Execute { txn: txn.into(), branch: 0, participant: self.participant(), attempt: 1, payload })
    }

    fn compensate(&self, txn: &str, payload: Vec<u8>) -> Request {
        Request::Compensate(Execute {
            txn: txn.into(),
            branch: 0,
            participant: self.participant(),
            attempt: 1,
            payload,
        })
    }

    /// Settles `requests` as one batch through the runtime.
    async fn ask(&mut self, requests: Vec<Request>) -> std::result::Result<Vec<Answer>, Failure> {
        let answers = settle(self.resource, &requests, redtx_common::now_ms())
            .await
            .map_err(|e| self.fail(format!("the resource failed: {e}")))?;
        answers
            .into_iter()
            .zip(&requests)
            .map(|(a, r)| a.map_err(|e| self.fail(format!("{} of {} stayed pending: {e}", r.kind(), r.txn()))))
            .collect()
    }

    async fn one(&mut self, req: Request) -> std::result::Result<Answer, Failure> {
        Ok(self.ask(vec![req]).await?.remove(0))
    }

    /// Settles `req` and checks its answer.
    async fn expect(&mut self, req: Request, want: Answer, what: &str) -> std::result::Result<(), Failure> {
        let got = self.one(req).await?;
        // A skipped compensation carries why there was nothing to undo; its wording is the
        // resource's.
        let same = match (&got, &want) {
            (
                Answer::Step { step: a, status: StepStatus::Skipped, reason: Some(_) },
                Answer::Step { step: b, status: StepStatus::Skipped, .. },
            ) => a == b,
            _ => got == want,
        };
        if !same {
            return Err(self.fail(format!("{what}: expected {want:?}, got {got:?}")));
        }
        Ok(())
    }

    /// Settles `req` and checks it is refused (a no vote, or a failed step) with a reason that
    /// contains `needle`; returns the reason.
    async fn expect_refusal(&mut self, req: Request, needle: &str, what: &str) -> std::result::Result<String, Failure> {
        let got = self.one(req).await?;
        let reason = match &got {
            Answer::Vote { yes: false, reason: Some(r) } => r.clone(),
            Answer::Step { status: StepStatus::Failed, reason: Some(r), .. } => r.clone(),
            _ => return Err(self.fail(format!("{what}: expected a refusal with a reason, got {got:?}"))),
        };
        if !reason.contains(needle) {
            return Err(self.fail(format!("{what}: the reason {reason:?} does not mention {needle:?}")));
        }
        Ok(reason)
    }

    async fn expect_violation(&mut self, req: Request, what: &str) -> std::result::Result<(), Failure> {
        match self.one(req).await? {
            Answer::Violation(_) => Ok(()),
            got => Err(self.fail(format!("{what}: expected a violation (dead letter), got {got:?}"))),
        }
    }

    async fn expect_count(&mut self, item: &str, want: i64, what: &str) -> std::result::Result<(), Failure> {
        let got = self.fx.count(item).await.map_err(|e| self.fail(format!("counting {item}: {e}")))?;
        if got != want {
            return Err(self.fail(format!("{what}: {item} holds {got} units, expected {want}")));
        }
        Ok(())
    }

    /// Runs one transition directly on the resource.
    async fn raw(
        &mut self,
        req: &Request,
        expect: Option<BarrierState>,
        work: Work,
    ) -> std::result::Result<Applied, Failure> {
        let t = Transition { request: req, expect, work, now_ms: redtx_common::now_ms() };
        let mut out = self.resource.apply(&[t]).await.map_err(|e| self.fail(format!("the resource failed: {e}")))?;
        if out.len() != 1 {
            return Err(self.fail(format!("{} results for one transition", out.len())));
        }
        out.remove(0).map_err(|e| self.fail(format!("the transition failed: {e}")))
    }
}

/// A deadline comfortably ahead.
fn soon() -> u64 {
    redtx_common::now_ms() + 30_000
}

/// Runs every rule of [`RULES`] against `resource`, in order. Returns how many rules held (all
/// of them), or the first that did not.
pub async fn run<R: Resource, F: Fixture>(resource: &mut R, fixture: &mut F) -> std::result::Result<usize, Failure> {
    let run = format!("{}-{}", redtx_common::now_ms(), std::process::id());
    let mut s = Suite { resource, fx: fixture, run, next: 0, rule: 0 };
    use Outcome::{Aborted, Committed};
    use StepKind::{Action, Compensation};

    s.start(0);
    {
        let (t, item) = s.fresh();
        let d = soon();
        let p = s.prepare(&t, s.fx.add(&item), d);
        s.expect(p.clone(), yes(), "prepare").await?;
        s.expect_count(&item, 0, "a prepared branch is staged, not applied").await?;
        s.expect(p.clone(), yes(), "a repeated prepare").await?;
        s.expect(s.commit(&t), ack(Committed), "commit").await?;
        s.expect_count(&item, 1, "after commit").await?;
        s.expect(s.commit(&t), ack(Committed), "a repeated commit").await?;
        s.expect(p, yes(), "a prepare repeated after the commit").await?;
        s.expect_count(&item, 1, "after the repeats").await?;
    }

    s.start(1);
    {
        let (t, item) = s.fresh();
        let d = soon();
        let p = s.prepare(&t, s.fx.add(&item), d);
        s.expect(p.clone(), yes(), "prepare").await?;
        s.expect(s.abort(&t), ack(Aborted), "abort").await?;
        s.expect(s.abort(&t), ack(Aborted), "a repeated abort").await?;
        s.expect_refusal(p, "", "a prepare repeated after the abort").await?;
        s.expect_violation(s.commit(&t), "commit after abort").await?;
        s.expect_count(&item, 0, "after the abort").await?;
        // The abort released what the prepare held: another transaction can prepare the item.
        let (t2, _) = s.fresh();
        s.expect(s.prepare(&t2, s.fx.add(&item), soon()), yes(), "another transaction on the item").await?;
        s.expect(s.commit(&t2), ack(Committed), "its commit").await?;
        s.expect_count(&item, 1, "after the other transaction").await?;
    }

    s.start(2);
    {
        let (t, _) = s.fresh();
        let p = s.prepare(&t, s.fx.refused(), soon());
        let reason = s.expect_refusal(p.clone(), "", "a refused prepare").await?;
        let again = s.expect_refusal(p.clone(), "", "a repeated refused prepare").await?;
        if again != reason {
            return Err(s.fail(format!("the repeat gave another reason: {again:?} vs {reason:?}")));
        }
        s.expect(s.abort(&t), ack(Aborted), "abort of the refused branch").await?;
        s.expect_refusal(p, &reason, "a prepare after the abort of the refused branch").await?;
    }

    s.start(3);
    {
        let (t, item) = s.fresh();
        s.expect(s.abort(&t), ack(Aborted), "abort before prepare").await?;
        s.expect(s.abort(&t), ack(Aborted), "a repeated abort").await?;
        s.expect_refusal(s.prepare(&t, s.fx.add(&item), soon()), "", "the late prepare").await?;
        s.expect_violation(s.commit(&t), "commit after the tombstone").await?;
        s.expect_count(&item, 0, "after the late prepare").await?;
    }

    s.start(4);
    {
        let (t, item) = s.fresh();
        let late = s.prepare(&t, s.fx.add(&item), redtx_common::now_ms() - 1_000);
        s.expect_refusal(late.clone(), "after the deadline", "a late prepare").await?;
        s.expect_refusal(late, "after the deadline", "a repeated late prepare").await?;
        // Nothing is locked: another transaction prepares the same item.
        let (t2, _) = s.fresh();
        s.expect(s.prepare(&t2, s.fx.add(&item), soon()), yes(), "another transaction on the item").await?;
        s.expect(s.abort(&t2), ack(Aborted), "its abort").await?;
        s.expect(s.abort(&t), ack(Aborted), "abort of the late branch").await?;
        s.expect_count(&item, 0, "after the late prepare").await?;
    }

    s.start(5);
    {
        let (t, item) = s.fresh();
        let far = redtx_common::now_ms() + 10 * 24 * 3600 * 1000;
        s.expect_refusal(s.prepare(&t, s.fx.add(&item), far), "deadline", "a far deadline").await?;
        // Nothing was written: the branch is still unknown, so a prepare in time goes ahead.
        s.expect(s.prepare(&t, s.fx.add(&item), soon()), yes(), "a prepare with a sane deadline").await?;
        s.expect(s.abort(&t), ack(Aborted), "its abort").await?;
    }

    s.start(6);
    {
        let (t, _) = s.fresh();
        s.expect_violation(s.commit(&t), "commit of an unknown branch").await?;
        let (t2, _) = s.fresh();
        s.expect_refusal(s.prepare(&t2, s.fx.refused(), soon()), "", "a refused prepare").await?;
        s.expect_violation(s.commit(&t2), "commit of a refused branch").await?;
    }

    s.start(7);
    {
        let (t, item) = s.fresh();
        s.expect(s.prepare(&t, s.fx.add(&item), soon()), yes(), "prepare").await?;
        s.expect(s.commit(&t), ack(Committed), "commit").await?;
        s.expect_violation(s.abort(&t), "abort after commit").await?;
        s.expect_count(&item, 1, "after the refused abort").await?;
    }

    s.start(8);
    {
        let (t, item) = s.fresh();
        let d = soon();
        s.expect(s.prepare(&t, s.fx.add(&item), d), yes(), "prepare").await?;
        s.expect(s.commit(&t), ack(Committed), "commit").await?;
        s.expect_refusal(s.prepare(&t, s.fx.add(&item), d + 1), "earlier transaction", "the same id, another deadline")
            .await?;
        s.expect(s.prepare(&t, s.fx.add(&item), d), yes(), "the first transaction's duplicate").await?;
        s.expect_count(&item, 1, "after the second transaction").await?;
    }

    s.start(9);
    {
        let (t, item) = s.fresh();
        let p = s.prepare(&t, s.fx.add(&item), soon());
        let got = s.ask(vec![p.clone(), s.commit(&t), p]).await?;
        if got != [yes(), ack(Committed), yes()] {
            return Err(s.fail(format!("prepare, commit, prepare in one batch: got {got:?}")));
        }
        s.expect_count(&item, 1, "after the batch").await?;
        let (t2, item2) = s.fresh();
        let got = s.ask(vec![s.abort(&t2), s.prepare(&t2, s.fx.add(&item2), soon())]).await?;
        if !matches!(got.as_slice(), [Answer::Ack(Aborted), Answer::Vote { yes: false, .. }]) {
            return Err(s.fail(format!("abort, prepare in one batch: got {got:?}")));
        }
        let (t3, item3) = s.fresh();
        let got = s.ask(vec![s.execute(&t3, s.fx.add(&item3)), s.compensate(&t3, s.fx.remove(&item3))]).await?;
        if got != [step(Action, StepStatus::Done), step(Compensation, StepStatus::Done)] {
            return Err(s.fail(format!("execute, compensate in one batch: got {got:?}")));
        }
        s.expect_count(&item3, 0, "after execute and compensate").await?;
    }

    s.start(10);
    {
        let (t, item) = s.fresh();
        let e = s.execute(&t, s.fx.add(&item));
        s.expect(e.clone(), step(Action, StepStatus::Done), "execute").await?;
        s.expect_count(&item, 1, "after the action").await?;
        s.expect(e, step(Action, StepStatus::Done), "a repeated execute").await?;
        s.expect_count(&item, 1, "after the repeat").await?;
    }

    s.start(11);
    {
        let (t, item) = s.fresh();
        let e = s.execute(&t, s.fx.refused());
        let reason = s.expect_refusal(e.clone(), "", "a refused action").await?;
        let again = s.expect_refusal(e.clone(), "", "a repeated refused action").await?;
        if again != reason {
            return Err(s.fail(format!("the repeat gave another reason: {again:?} vs {reason:?}")));
        }
        s.expect(s.compensate(&t, s.fx.remove(&item)), step(Compensation, StepStatus::Skipped), "compensate").await?;
        s.expect_count(&item, 0, "nothing to undo: the compensation must not run").await?;
        s.expect_refusal(e, "", "the action after its compensation").await?;
    }

    s.start(12);
    {
        let (t, item) = s.fresh();
        let e = s.execute(&t, s.fx.add(&item));
        let c = s.compensate(&t, s.fx.remove(&item));
        s.expect(e.clone(), step(Action, StepStatus::Done), "execute").await?;
        s.expect(c.clone(), step(Compensation, StepStatus::Done), "compensate").await?;
        s.expect_count(&item, 0, "after the compensation").await?;
        s.expect(c, step(Compensation, StepStatus::Done), "a repeated compensate").await?;
        s.expect_count(&item, 0, "after the repeated compensation").await?;
        s.expect_refusal(e, "compensated", "the action repeated after its compensation").await?;
        s.expect_count(&item, 0, "after the repeated action").await?;
    }

    s.start(13);
    {
        let (t, item) = s.fresh();
        let c = s.compensate(&t, s.fx.remove(&item));
        s.expect(c.clone(), step(Compensation, StepStatus::Skipped), "a compensation before its action").await?;
        s.expect_count(&item, 0, "a null compensation changes nothing").await?;
        s.expect(c, step(Compensation, StepStatus::Skipped), "a repeated null compensation").await?;
        s.expect_refusal(s.execute(&t, s.fx.add(&item)), "compensated", "the late action").await?;
        s.expect_count(&item, 0, "the late action must not run").await?;
    }

    s.start(14);
    {
        let (t, item) = s.fresh();
        s.expect(s.prepare(&t, s.fx.add(&item), soon()), yes(), "prepare").await?;
        s.expect_violation(s.execute(&t, s.fx.add(&item)), "execute of a prepared branch").await?;
        s.expect_violation(s.compensate(&t, s.fx.remove(&item)), "compensate of a prepared branch").await?;
        s.expect(s.abort(&t), ack(Aborted), "abort").await?;
        let (t2, item2) = s.fresh();
        s.expect(s.execute(&t2, s.fx.add(&item2)), step(Action, StepStatus::Done), "execute").await?;
        s.expect_violation(s.prepare(&t2, s.fx.add(&item2), soon()), "prepare of a saga step").await?;
        s.expect_violation(s.commit(&t2), "commit of a saga step").await?;
        s.expect_violation(s.abort(&t2), "abort of a saga step").await?;
        s.expect_count(&item2, 1, "after the violations").await?;
    }

    s.start(15);
    {
        let (t, item) = s.fresh();
        let d = soon();
        let p = s.prepare(&t, s.fx.add(&item), d);
        let c = s.commit(&t);
        let got = s.raw(&c, Some(BarrierState::Prepared), Work::Confirm).await?;
        if got != Applied::Moved(None) {
            return Err(s.fail(format!("Confirm on no barrier: expected Moved(None), got {got:?}")));
        }
        let got = s.raw(&p, None, Work::Try).await?;
        if got != (Applied::Done { state: BarrierState::Prepared, reason: None }) {
            return Err(s.fail(format!("Try: expected Done(prepared), got {got:?}")));
        }
        // A prepared barrier may or may not report its deadline (the rules read the deadline
        // of finished barriers only); if it does, it must be the prepare's.
        let prepared =
            |deadline_ms| Applied::Moved(Some(Barrier { state: BarrierState::Prepared, reason: None, deadline_ms }));
        let got = s.raw(&p, None, Work::Try).await?;
        let want = match &got {
            Applied::Moved(Some(Barrier { deadline_ms: None, .. })) => prepared(None),
            _ => prepared(Some(d)),
        };
        if got != want {
            return Err(s.fail(format!("Try again: expected {want:?}, got {got:?}")));
        }
        let a = s.abort(&t);
        let mark = Work::Mark { to: BarrierState::Aborted, reason: Some("x".into()) };
        let got = s.raw(&a, None, mark).await?;
        if got != want {
            return Err(s.fail(format!("Mark expecting no barrier: expected {want:?}, got {got:?}")));
        }
        let got = s.raw(&c, Some(BarrierState::Refused), Work::Confirm).await?;
        if got != want {
            return Err(s.fail(format!("Confirm expecting refused: expected {want:?}, got {got:?}")));
        }
        s.expect_count(&item, 0, "after the moved transitions").await?;
        s.expect(c, ack(Committed), "commit").await?;
        s.expect_count(&item, 1, "after the commit").await?;
    }

    Ok(RULES.len())
}

#[cfg(test)]
mod tests {
    //! The suite against an in-memory reference resource (it must pass), and against broken
    //! variants of it (the suite must name the rule they break).
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// Payloads: `add:<item>`, `remove:<item>`, `refuse`.
    #[derive(Default)]
    struct Mem {
        barriers: HashMap<String, Barrier>,
        staged: HashMap<String, Vec<u8>>,
        counts: Arc<Mutex<HashMap<String, i64>>>,
        /// Broken: carries out transitions whatever the barrier holds.
        ignore_cas: bool,
        /// Broken: a Mark records nothing.
        forget_marks: bool,
    }

    impl Mem {
        /// Applies a payload; `Err`: the business refuses.
        fn business(&self, payload: &[u8]) -> std::result::Result<(), String> {
            let text = std::str::from_utf8(payload).map_err(|e| e.to_string())?;
            let (delta, item) = match text.split_once(':') {
                Some(("add", item)) => (1, item),
                Some(("remove", item)) => (-1, item),
                _ => return Err("mem: refused".into()),
            };
            *self.counts.lock().unwrap().entry(item.to_string()).or_default() += delta;
            Ok(())
        }

        fn transition(&mut self, t: &Transition<'_>) -> Applied {
            let txn = t.request.txn().to_string();
            let current = self.barriers.get(&txn).cloned();
            if !self.ignore_cas && current.as_ref().map(|b| b.state) != t.expect {
                return Applied::Moved(current);
            }
            let deadline_ms = match t.request {
                Request::Prepare(p) => Some(p.deadline_ms),
                _ => current.as_ref().and_then(|b| b.deadline_ms),
            };
            let (state, reason) = match &t.work {
                Work::Try if t.request.payload() == b"refuse" => (BarrierState::Refused, Some("mem: refused".into())),
                Work::Try => {
                    self.staged.insert(txn.clone(), t.request.payload().to_vec());
                    (BarrierState::Prepared, None)
                }
                Work::Confirm => {
                    let staged = self.staged.get(&txn).cloned().unwrap_or_default();
                    self.business(&staged).expect("staged payloads were checked");
                    (BarrierState::Committed, None)
                }
                Work::Cancel => {
                    self.staged.remove(&txn);
                    (BarrierState::Aborted, Some("mem: aborted".into()))
                }
                Work::Action => match self.business(t.request.payload()) {
                    Ok(()) => (BarrierState::Done, None),
                    Err(r) => (BarrierState::Failed, Some(r)),
                },
                Work::Compensation => match self.business(t.request.payload()) {
                    Ok(()) => (BarrierState::Compensated, None),
                    Err(r) => return Applied::Done { state: BarrierState::Done, reason: Some(r) },
                },
                Work::Mark { to, reason } => {
                    if self.forget_marks {
                        return Applied::Done { state: *to, reason: reason.clone() };
                    }
                    (*to, reason.clone())
                }
            };
            self.barriers.insert(txn, Barrier { state, reason: reason.clone(), deadline_ms });
            Applied::Done { state, reason }
        }
    }

    impl Resource for Mem {
        async fn apply(&mut self, batch: &[Transition<'_>]) -> Result<Vec<std::result::Result<Applied, String>>> {
            Ok(batch.iter().map(|t| Ok(self.transition(t))).collect())
        }
    }

    struct MemFixture(Arc<Mutex<HashMap<String, i64>>>);

    impl Fixture for MemFixture {
        fn participant(&self) -> &str {
            "mem"
        }
        fn add(&self, item: &str) -> Vec<u8> {
            format!("add:{item}").into_bytes()
        }
        fn remove(&self, item: &str) -> Vec<u8> {
            format!("remove:{item}").into_bytes()
        }
        fn refused(&self) -> Vec<u8> {
            b"refuse".to_vec()
        }
        async fn count(&mut self, item: &str) -> Result<i64> {
            Ok(self.0.lock().unwrap().get(item).copied().unwrap_or(0))
        }
    }

    async fn run_on(mut mem: Mem) -> std::result::Result<usize, Failure> {
        let mut fx = MemFixture(mem.counts.clone());
        run(&mut mem, &mut fx).await
    }

    #[tokio::test]
    async fn the_reference_resource_passes() {
        assert_eq!(run_on(Mem::default()).await, Ok(RULES.len()));
    }

    #[tokio::test]
    async fn a_resource_without_compare_and_set_fails_the_first_rule() {
        let f = run_on(Mem { ignore_cas: true, ..Mem::default() }).await.unwrap_err();
        assert_eq!(f.rule, RULES[0], "{f}");
    }

    #[tokio::test]
    async fn a_resource_that_forgets_marks_fails_the_tombstone_rule() {
        let f = run_on(Mem { forget_marks: true, ..Mem::default() }).await.unwrap_err();
        assert_eq!(f.rule, RULES[3], "{f}");
        assert!(
            f.to_string().starts_with("conformance rule `2pc: an abort before the prepare leaves a tombstone"),
            "{f}"
        );
    }
}
