//! The participant runtime: which entries a participant handles, how a batch of requests is
//! settled against a [`Resource`] ([`settle`]), and the [`Handler`] that hands the replies to
//! the shared stream runtime, which writes them to `rtx:coord:{P}` (the partition the request
//! came from) and acks the entries in one transaction.

use crate::barrier::{answer_after, decide, Answer, BarrierState, Decision, Request, Work};
use crate::resource::{Applied, Resource, Transition};
use redtx_common::consumer::{Delivery, Disposition, Handled, Handler};
use redtx_common::protocol::{entry_fields, Ack, Message, StepKind, StepResult, StepStatus, Vote};
use redtx_common::{failpoint, keys, spec, Error, Result};
use std::collections::{BTreeMap, HashSet};

/// Fail point: the prepares of a batch ran, its votes are not sent yet.
pub const AFTER_PREPARE: &str = "participant-after-prepare";
/// Fail point: the commits/aborts of a batch ran, its acks are not sent yet.
pub const AFTER_COMMIT: &str = "participant-after-commit";
/// Fail point: the executes/compensates of a batch ran, its results are not sent yet.
pub const AFTER_EXECUTE: &str = "participant-after-execute";

/// How many times one request's transition is tried in one batch when its barrier keeps moving
/// (another worker changing it meanwhile); after that it stays pending and comes back later.
pub const MAX_ATTEMPTS: u32 = 3;

/// Turns a delivered message into a request for participant `name`, or into the reason it is
/// dead-lettered (addressed to another participant, a type participants never handle, an
/// invalid transaction id).
pub fn request(name: &str, msg: Message) -> std::result::Result<Request, String> {
    let req = match msg {
        Message::Prepare(p) => Request::Prepare(p),
        Message::Commit(r) => Request::Commit(r),
        Message::Abort(r) => Request::Abort(r),
        Message::Execute(e) => Request::Execute(e),
        Message::Compensate(e) => Request::Compensate(e),
        other => {
            return Err(format!("participant {name} does not handle `{}` messages (txn {})", other.kind(), other.txn()))
        }
    };
    if req.participant() != name {
        return Err(format!(
            "{} for participant {:?} delivered to participant {name:?} (txn {})",
            req.kind(),
            req.participant(),
            req.txn()
        ));
    }
    spec::check_id("txn", req.txn()).map_err(|e| format!("invalid {}: {e}", req.kind()))?;
    Ok(req)
}

/// The message that carries `answer` to the coordinator (`None` for a violation).
pub fn reply(req: &Request, answer: &Answer) -> Option<Message> {
    let (txn, branch, participant) = (req.txn().to_string(), req.branch(), req.participant().to_string());
    Some(match answer.clone() {
        Answer::Vote { yes, reason } => Message::Vote(Vote { txn, branch, participant, yes, reason }),
        Answer::Ack(outcome) => Message::Ack(Ack { txn, branch, participant, outcome }),
        Answer::Step { step, status, reason } => {
            Message::Result(StepResult { txn, branch, participant, step, status, reason })
        }
        Answer::Violation(_) => return None,
    })
}

/// Settles a batch of requests against `resource`: decides each on its likely barrier
/// ([`Request::likely`]), sends the transitions in one [`Resource::apply`], and decides again
/// (on the real barrier) those whose barrier had moved, until every request has an answer or
/// has tried [`MAX_ATTEMPTS`] times. Requests of the same barrier go in successive rounds, in
/// batch order. One result per request: `Err(detail)` means it stays pending (retried later).
/// The outer `Err` means nothing is known (the resource failed as a whole).
pub async fn settle<R: Resource>(
    resource: &mut R,
    requests: &[Request],
    now_ms: u64,
) -> Result<Vec<std::result::Result<Answer, String>>> {
    let mut out: Vec<Option<std::result::Result<Answer, String>>> = vec![None; requests.len()];
    let mut attempts = vec![0u32; requests.len()];
    let mut pending: Vec<(usize, Option<BarrierState>, Work)> = Vec::new();
    for (i, req) in requests.iter().enumerate() {
        match decide(req.likely().as_ref(), req, now_ms) {
            Decision::Answer(a) => out[i] = Some(Ok(a)),
            Decision::Transition { expect, work } => pending.push((i, expect, work)),
        }
    }
    while !pending.is_empty() {
        // One transition per barrier per round; the others wait, in order.
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        let (round, mut later): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(|(i, ..)| seen.insert((requests[*i].participant(), requests[*i].txn())));
        let transitions: Vec<Transition<'_>> = round
            .iter()
            .map(|(i, expect, work)| Transition { request: &requests[*i], expect: *expect, work: work.clone(), now_ms })
            .collect();
        let results = resource.apply(&transitions).await?;
        if results.len() != transitions.len() {
            return Err(Error::ScriptReply {
                script: "resource",
                detail: format!("{} results for {} transitions", results.len(), transitions.len()),
            });
        }
        for ((i, _, work), result) in round.into_iter().zip(results) {
            let req = &requests[i];
            attempts[i] += 1;
            out[i] = Some(match result {
                Ok(Applied::Done { state, reason }) => answer_after(req, state, reason).ok_or_else(|| {
                    format!(
                        "resource ended {} of a {} in state {state}, which does not answer it",
                        work.name(),
                        req.kind()
                    )
                }),
                Ok(Applied::Moved(current)) => match decide(current.as_ref(), req, now_ms) {
                    Decision::Answer(a) => Ok(a),
                    Decision::Transition { .. } if attempts[i] >= MAX_ATTEMPTS => Err(format!(
                        "the barrier kept changing under {} attempts (now {:?}); retrying later",
                        attempts[i],
                        current.map(|b| b.state)
                    )),
                    Decision::Transition { expect, work } => {
                        later.push((i, expect, work));
                        continue;
                    }
                },
                Ok(Applied::Busy(why)) => match req {
                    Request::Execute(_) => {
                        Ok(Answer::Step { step: StepKind::Action, status: StepStatus::Error, reason: Some(why) })
                    }
                    Request::Compensate(_) => {
                        Ok(Answer::Step { step: StepKind::Compensation, status: StepStatus::Error, reason: Some(why) })
                    }
                    _ => Err(why),
                },
                Err(detail) => Err(detail),
            });
        }
        later.sort_by_key(|(i, ..)| *i);
        pending = later;
    }
    Ok(out.into_iter().map(|a| a.expect("every request settled")).collect())
}

/// The participant's [`Handler`].
pub struct Participant<R> {
    name: String,
    resource: R,
}

impl<R: Resource> Participant<R> {
    /// A handler for participant `name`; its replies go to the coordinator stream of each
    /// request's partition, written by the runtime together with the acks.
    pub fn new(name: impl Into<String>, resource: R) -> Self {
        Participant { name: name.into(), resource }
    }
}

impl<R: Resource> Handler for Participant<R> {
    async fn handle(&mut self, batch: Vec<Delivery>) -> Result<Handled> {
        let mut out: Vec<Option<Disposition>> = vec![None; batch.len()];
        let mut requests = Vec::with_capacity(batch.len());
        let mut at = Vec::with_capacity(batch.len());
        // Only the partition of each entry is needed afterwards: the messages move (payloads
        // are not copied).
        let partitions: Vec<u32> = batch.iter().map(|d| d.partition).collect();
        for (i, d) in batch.into_iter().enumerate() {
            match request(&self.name, d.msg) {
                Ok(r) => {
                    requests.push(r);
                    at.push(i);
                }
                Err(reason) => out[i] = Some(Disposition::DeadLetter(reason)),
            }
        }
        let answers = settle(&mut self.resource, &requests, redtx_common::now_ms()).await?;
        if requests.iter().any(|r| matches!(r, Request::Prepare(_))) {
            failpoint::hit(AFTER_PREPARE).await;
        }
        if requests.iter().any(|r| matches!(r, Request::Commit(_) | Request::Abort(_))) {
            failpoint::hit(AFTER_COMMIT).await;
        }
        if requests.iter().any(|r| matches!(r, Request::Execute(_) | Request::Compensate(_))) {
            failpoint::hit(AFTER_EXECUTE).await;
        }
        // The replies of each partition go in one entry of its coordinator stream.
        let mut replies: BTreeMap<u32, Vec<Message>> = BTreeMap::new();
        for ((i, req), answer) in at.into_iter().zip(&requests).zip(answers) {
            log(&self.name, req, &answer);
            out[i] = Some(match answer {
                Ok(Answer::Violation(reason)) => Disposition::DeadLetter(reason),
                Ok(a) => {
                    let msg = reply(req, &a).expect("only violations have no reply");
                    replies.entry(partitions[i]).or_default().push(msg);
                    Disposition::Ack
                }
                Err(_) => Disposition::Retry,
            });
        }
        let writes = replies
            .into_iter()
            .map(|(p, msgs)| {
                let msgs: Vec<&Message> = msgs.iter().collect();
                (p, redis::cmd("XADD").arg(keys::coord_stream(p)).arg("*").arg(&entry_fields(&msgs)[..]).clone())
            })
            .collect();
        Ok(Handled { dispositions: out.into_iter().map(|d| d.expect("every entry decided")).collect(), writes })
    }
}

fn log(name: &str, req: &Request, answer: &std::result::Result<Answer, String>) {
    let (txn, branch, kind) = (req.txn(), req.branch(), req.kind());
    match answer {
        Ok(Answer::Violation(reason)) => {
            tracing::error!(participant = name, txn, branch, kind, %reason, "protocol violation")
        }
        Ok(a) => tracing::debug!(participant = name, txn, branch, kind, answer = ?a, "answered"),
        Err(e) => {
            tracing::warn!(participant = name, txn, branch, kind, error = %e, "request failed; it stays pending and is retried")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::barrier::Barrier;
    use redtx_common::protocol::{Execute, Outcome, Prepare, Resolve, Submit};
    use redtx_common::spec::{Branch, Op, TxnSpec};

    fn prepare(p: &str) -> Prepare {
        Prepare {
            txn: "t1".into(),
            branch: 1,
            participant: p.into(),
            deadline_ms: 0,
            payload: redtx_common::kv::encode_ops(&[Op::incrby("k", 1)]),
        }
    }

    fn resolve(p: &str) -> Resolve {
        Resolve { txn: "t1".into(), branch: 1, participant: p.into() }
    }

    #[test]
    fn only_own_requests_with_valid_ids_are_handled() {
        assert!(matches!(request("a", Message::Prepare(prepare("a"))), Ok(Request::Prepare(_))));
        assert!(matches!(request("a", Message::Commit(resolve("a"))), Ok(Request::Commit(_))));
        assert!(matches!(request("a", Message::Abort(resolve("a"))), Ok(Request::Abort(_))));
        let e = request("a", Message::Prepare(prepare("b"))).unwrap_err();
        assert!(e.contains("\"b\"") && e.contains("\"a\""), "{e}");
        let spec = TxnSpec::new(vec![Branch::kv("a", vec![Op::incrby("k", 1)])]);
        let e = request("a", Message::Submit(Submit { spec, submitted_ms: 0 })).unwrap_err();
        assert!(e.contains("`submit`"), "{e}");
        let ack = Ack { txn: "t".into(), branch: 0, participant: "a".into(), outcome: Outcome::Committed };
        assert!(request("a", Message::Ack(ack)).unwrap_err().contains("`ack`"));
        let mut bad = resolve("a");
        bad.txn = "no spaces".into();
        assert!(request("a", Message::Commit(bad)).unwrap_err().contains("invalid commit"));
    }

    #[test]
    fn replies() {
        let p = Request::Prepare(prepare("a"));
        assert_eq!(
            reply(&p, &Answer::Vote { yes: false, reason: Some("r".into()) }),
            Some(Message::Vote(Vote {
                txn: "t1".into(),
                branch: 1,
                participant: "a".into(),
                yes: false,
                reason: Some("r".into())
            }))
        );
        assert_eq!(reply(&p, &Answer::Violation("x".into())), None);
        let c = Request::Commit(resolve("a"));
        assert!(matches!(reply(&c, &Answer::Ack(Outcome::Committed)), Some(Message::Ack(Ack { branch: 1, .. }))));
    }

    /// A resource answering by a rule, recording every batch it gets.
    struct Scripted<F: FnMut(&Transition<'_>) -> std::result::Result<Applied, String> + Send> {
        answer: F,
        batches: Vec<Vec<(String, Option<BarrierState>, Work)>>,
    }

    impl<F: FnMut(&Transition<'_>) -> std::result::Result<Applied, String> + Send> Resource for Scripted<F> {
        async fn apply(&mut self, batch: &[Transition<'_>]) -> Result<Vec<std::result::Result<Applied, String>>> {
            self.batches.push(batch.iter().map(|t| (t.request.txn().to_string(), t.expect, t.work.clone())).collect());
            Ok(batch.iter().map(&mut self.answer).collect())
        }
    }

    fn scripted<F: FnMut(&Transition<'_>) -> std::result::Result<Applied, String> + Send>(answer: F) -> Scripted<F> {
        Scripted { answer, batches: Vec::new() }
    }

    fn prep(txn: &str) -> Request {
        let mut p = prepare("a");
        p.txn = txn.into();
        p.deadline_ms = NOW + 5_000;
        Request::Prepare(p)
    }

    fn commit(txn: &str) -> Request {
        let mut r = resolve("a");
        r.txn = txn.into();
        Request::Commit(r)
    }

    fn ends_as_expected(t: &Transition<'_>) -> std::result::Result<Applied, String> {
        let state = match &t.work {
            Work::Try => BarrierState::Prepared,
            Work::Confirm => BarrierState::Committed,
            Work::Cancel => BarrierState::Aborted,
            Work::Action => BarrierState::Done,
            Work::Compensation => BarrierState::Compensated,
            Work::Mark { to, .. } => *to,
        };
        Ok(Applied::Done { state, reason: None })
    }

    const NOW: u64 = 1_000;

    #[tokio::test]
    async fn the_common_case_is_one_round_trip() {
        let mut r = scripted(ends_as_expected);
        let reqs = [prep("t1"), commit("t2"), prep("t3")];
        let out = settle(&mut r, &reqs, NOW).await.unwrap();
        assert_eq!(
            out,
            vec![
                Ok(Answer::Vote { yes: true, reason: None }),
                Ok(Answer::Ack(Outcome::Committed)),
                Ok(Answer::Vote { yes: true, reason: None })
            ]
        );
        assert_eq!(r.batches.len(), 1);
        assert_eq!(r.batches[0][1], ("t2".into(), Some(BarrierState::Prepared), Work::Confirm));
    }

    #[tokio::test]
    async fn requests_of_one_barrier_go_in_successive_rounds_in_order() {
        let mut r = scripted(ends_as_expected);
        let reqs = [prep("t1"), commit("t1"), prep("t2")];
        let out = settle(&mut r, &reqs, NOW).await.unwrap();
        assert!(out.iter().all(Result::is_ok), "{out:?}");
        assert_eq!(r.batches.len(), 2);
        assert_eq!(r.batches[0].iter().map(|b| b.0.as_str()).collect::<Vec<_>>(), ["t1", "t2"]);
        assert_eq!(r.batches[1], vec![("t1".into(), Some(BarrierState::Prepared), Work::Confirm)]);
    }

    #[tokio::test]
    async fn a_moved_barrier_is_decided_again() {
        // Commit guessed `prepared`, but the barrier is already committed: ack, no second write.
        let mut r = scripted(|_: &Transition<'_>| Ok(Applied::Moved(Some(Barrier::new(BarrierState::Committed)))));
        let out = settle(&mut r, &[commit("t1")], NOW).await.unwrap();
        assert_eq!(out, vec![Ok(Answer::Ack(Outcome::Committed))]);
        assert_eq!(r.batches.len(), 1);
        // Abort guessed `prepared`, but there is no barrier: a tombstone, in a second round.
        let mut r = scripted(|t: &Transition<'_>| match t.expect {
            Some(_) => Ok(Applied::Moved(None)),
            None => ends_as_expected(t),
        });
        let mut a = resolve("a");
        a.txn = "t1".into();
        let out = settle(&mut r, &[Request::Abort(a)], NOW).await.unwrap();
        assert_eq!(out, vec![Ok(Answer::Ack(Outcome::Aborted))]);
        assert!(matches!(&r.batches[1][0], (_, None, Work::Mark { to: BarrierState::Aborted, .. })), "{:?}", r.batches);
    }

    #[tokio::test]
    async fn a_barrier_that_keeps_moving_leaves_the_request_pending() {
        let mut flip = false;
        let mut r = scripted(move |_: &Transition<'_>| {
            flip = !flip;
            let state = if flip { BarrierState::Prepared } else { BarrierState::Refused };
            Ok(Applied::Moved(Some(Barrier::new(state))))
        });
        let mut a = resolve("a");
        a.txn = "t1".into();
        let out = settle(&mut r, &[Request::Abort(a)], NOW).await.unwrap();
        assert!(matches!(&out[0], Err(e) if e.contains("kept changing")), "{out:?}");
        assert_eq!(r.batches.len(), MAX_ATTEMPTS as usize);
    }

    #[tokio::test]
    async fn busy_saga_steps_answer_error_and_failures_stay_pending() {
        let mut r = scripted(|t: &Transition<'_>| match t.request {
            Request::Prepare(_) => Err("connection reset".into()),
            _ => Ok(Applied::Busy("k is locked".into())),
        });
        let e = Execute { txn: "t2".into(), branch: 0, participant: "a".into(), attempt: 1, payload: vec![] };
        let out = settle(&mut r, &[prep("t1"), Request::Execute(e)], NOW).await.unwrap();
        assert_eq!(out[0], Err("connection reset".into()));
        assert_eq!(
            out[1],
            Ok(Answer::Step { step: StepKind::Action, status: StepStatus::Error, reason: Some("k is locked".into()) })
        );
        // A state that does not answer the request is a resource bug: pending, not a reply.
        let mut r = scripted(|_: &Transition<'_>| Ok(Applied::Done { state: BarrierState::Done, reason: None }));
        let out = settle(&mut r, &[prep("t1")], NOW).await.unwrap();
        assert!(matches!(&out[0], Err(e) if e.contains("does not answer")), "{out:?}");
    }

    #[tokio::test]
    async fn a_resource_answering_the_wrong_number_of_results_fails_the_batch() {
        struct Short;
        impl Resource for Short {
            async fn apply(&mut self, _: &[Transition<'_>]) -> Result<Vec<std::result::Result<Applied, String>>> {
                Ok(Vec::new())
            }
        }
        assert!(settle(&mut Short, &[prep("t1")], NOW).await.is_err());
    }
}
