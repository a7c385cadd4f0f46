//! The participant's decisions, free of I/O: which entries it handles at all, and what each
//! resource answer turns into (a reply to the coordinator and what happens to the entry).

use crate::resource::{Request, Response};
use redtx_common::consumer::Disposition;
use redtx_common::protocol::{Ack, Message, Vote};

/// Turns a delivered message into a request for participant `name`, or into the reason it is
/// dead-lettered (addressed to another participant, or a type participants never handle).
pub fn request(name: &str, msg: Message) -> Result<Request, String> {
    let (participant, req) = match msg {
        Message::Prepare(p) => (p.participant.clone(), Request::Prepare(p)),
        Message::Commit(r) => (r.participant.clone(), Request::Commit(r)),
        Message::Abort(r) => (r.participant.clone(), Request::Abort(r)),
        other => {
            return Err(format!("participant {name} does not handle `{}` messages (txn {})", other.kind(), other.txn()))
        }
    };
    if participant != name {
        return Err(format!(
            "{} for participant {participant:?} delivered to participant {name:?} (txn {})",
            req.kind(),
            req.txn()
        ));
    }
    Ok(req)
}

/// The effect of one answered request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The message to send to the coordinator, if any.
    pub reply: Option<Message>,
    /// What to do with the entry once `reply` is written.
    pub disposition: Disposition,
}

/// Maps a resource's answer (or per-request failure) to the reply and the entry's fate.
pub fn respond(name: &str, req: &Request, answer: Result<Response, String>) -> Step {
    let (txn, branch, participant) = (req.txn().to_string(), req.branch(), name.to_string());
    let send = |m: Message| Step { reply: Some(m), disposition: Disposition::Ack };
    match (req, answer) {
        (_, Err(_)) => Step { reply: None, disposition: Disposition::Retry },
        (_, Ok(Response::Violation(reason))) => Step { reply: None, disposition: Disposition::DeadLetter(reason) },
        (Request::Prepare(_), Ok(Response::Vote { yes, reason, .. })) => {
            send(Message::Vote(Vote { txn, branch, participant, yes, reason: if yes { None } else { reason } }))
        }
        (Request::Commit(_) | Request::Abort(_), Ok(Response::Done { outcome, .. })) => {
            let expected = if matches!(req, Request::Commit(_)) {
                redtx_common::protocol::Outcome::Committed
            } else {
                redtx_common::protocol::Outcome::Aborted
            };
            if outcome != expected {
                return Step {
                    reply: None,
                    disposition: Disposition::DeadLetter(format!(
                        "resource answered {} to a {}",
                        outcome.as_str(),
                        req.kind()
                    )),
                };
            }
            send(Message::Ack(Ack { txn, branch, participant, outcome }))
        }
        (_, Ok(other)) => Step {
            reply: None,
            disposition: Disposition::DeadLetter(format!("resource answered {other:?} to a {}", req.kind())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redtx_common::protocol::{Outcome, Prepare, Resolve, Submit};
    use redtx_common::spec::{Branch, Op, TxnSpec};

    fn prepare(p: &str) -> Prepare {
        Prepare { txn: "t1".into(), branch: 1, participant: p.into(), deadline_ms: 0, ops: vec![Op::incrby("k", 1)] }
    }

    fn resolve(p: &str) -> Resolve {
        Resolve { txn: "t1".into(), branch: 1, participant: p.into(), keys: vec!["k".into()] }
    }

    #[test]
    fn only_own_prepare_commit_abort_are_requests() {
        assert!(matches!(request("a", Message::Prepare(prepare("a"))), Ok(Request::Prepare(_))));
        assert!(matches!(request("a", Message::Commit(resolve("a"))), Ok(Request::Commit(_))));
        assert!(matches!(request("a", Message::Abort(resolve("a"))), Ok(Request::Abort(_))));
        let e = request("a", Message::Prepare(prepare("b"))).unwrap_err();
        assert!(e.contains("\"b\"") && e.contains("\"a\""), "{e}");
        let spec = TxnSpec::new(vec![Branch { participant: "a".into(), ops: vec![Op::incrby("k", 1)] }]);
        let e = request("a", Message::Submit(Submit { spec, submitted_ms: 0 })).unwrap_err();
        assert!(e.contains("`submit`"), "{e}");
        let ack = Ack { txn: "t".into(), branch: 0, participant: "a".into(), outcome: Outcome::Committed };
        assert!(request("a", Message::Ack(ack)).unwrap_err().contains("`ack`"));
    }

    #[test]
    fn votes_and_acks() {
        let p = Request::Prepare(prepare("a"));
        let s = respond("a", &p, Ok(Response::Vote { yes: true, reason: None, repeat: false }));
        assert_eq!(s.disposition, Disposition::Ack);
        assert_eq!(
            s.reply,
            Some(Message::Vote(Vote { txn: "t1".into(), branch: 1, participant: "a".into(), yes: true, reason: None }))
        );
        let s = respond("a", &p, Ok(Response::Vote { yes: false, reason: Some("a: conflict".into()), repeat: true }));
        assert!(
            matches!(s.reply, Some(Message::Vote(Vote { yes: false, reason: Some(ref r), .. })) if r == "a: conflict")
        );

        let c = Request::Commit(resolve("a"));
        let s = respond("a", &c, Ok(Response::Done { outcome: Outcome::Committed, repeat: true, warning: None }));
        assert_eq!(s.disposition, Disposition::Ack);
        assert!(matches!(s.reply, Some(Message::Ack(Ack { outcome: Outcome::Committed, branch: 1, .. }))));
        let a = Request::Abort(resolve("a"));
        let s = respond("a", &a, Ok(Response::Done { outcome: Outcome::Aborted, repeat: false, warning: None }));
        assert!(matches!(s.reply, Some(Message::Ack(Ack { outcome: Outcome::Aborted, .. }))));
    }

    #[test]
    fn failures_retry_and_violations_dead_letter() {
        let c = Request::Commit(resolve("a"));
        let s = respond("a", &c, Err("connection reset".into()));
        assert_eq!(s, Step { reply: None, disposition: Disposition::Retry });
        let s = respond("a", &c, Ok(Response::Violation("never prepared".into())));
        assert_eq!(s, Step { reply: None, disposition: Disposition::DeadLetter("never prepared".into()) });
        // Mismatched answers are bugs of the resource: never acked with a wrong outcome.
        let s = respond("a", &c, Ok(Response::Done { outcome: Outcome::Aborted, repeat: false, warning: None }));
        assert!(matches!(s.disposition, Disposition::DeadLetter(_)) && s.reply.is_none());
        let s = respond("a", &c, Ok(Response::Vote { yes: true, reason: None, repeat: false }));
        assert!(matches!(s.disposition, Disposition::DeadLetter(_)) && s.reply.is_none());
        let p = Request::Prepare(prepare("a"));
        let s = respond("a", &p, Ok(Response::Done { outcome: Outcome::Committed, repeat: false, warning: None }));
        assert!(matches!(s.disposition, Disposition::DeadLetter(_)) && s.reply.is_none());
    }
}
