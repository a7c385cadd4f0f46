//! The built-in key-value resource: the Lua scripts of `lua/prepare.lua`, `lua/commit.lua` and
//! `lua/abort.lua` run on the participant's data Redis, one pipeline per batch.
//!
//! Building the calls and reading the replies are pure functions ([`prepare_call`],
//! [`resolve_call`], [`read_reply`]); [`KvResource`] adds the connection.

use crate::resource::{Request, Resource, Response};
use redis::aio::MultiplexedConnection;
use redis::Value;
use redtx_common::conn::RedisUrl;
use redtx_common::protocol::{Outcome, Prepare, Resolve};
use redtx_common::scripts::{self, Call, LuaScript};
use redtx_common::spec::{self, Branch, Mode, Op, TxnSpec};
use redtx_common::{keys, Error, Result};
use std::time::Duration;

/// `lua/prepare.lua`.
pub static PREPARE: LuaScript = LuaScript::new("prepare", include_str!("../../lua/prepare.lua"));
/// `lua/commit.lua` (after `lua/lib/barrier.lua`).
pub static COMMIT: LuaScript =
    LuaScript::new("commit", concat!(include_str!("../../lua/lib/barrier.lua"), include_str!("../../lua/commit.lua")));
/// `lua/abort.lua` (after `lua/lib/barrier.lua`).
pub static ABORT: LuaScript =
    LuaScript::new("abort", concat!(include_str!("../../lua/lib/barrier.lua"), include_str!("../../lua/abort.lua")));

/// KEYS shared by the three scripts: the barrier, then (user key, lock key) per distinct key.
fn with_keys(call: Call, name: &str, txn: &str, keys: &[String]) -> Call {
    let mut call = call.key(keys::barrier(name, txn));
    for k in keys {
        call = call.key(k.as_str()).key(keys::lock(k));
    }
    call
}

/// Checks a prepare as the producer's validation would (ids, key names and sizes, bounds), so
/// that a hand-made message cannot touch redtx's own keys. `Err` is the reason to vote no.
pub fn check_prepare(p: &Prepare) -> std::result::Result<(), String> {
    let spec = TxnSpec {
        id: p.txn.clone(),
        mode: Mode::TwoPhase,
        timeout_ms: spec::DEFAULT_TIMEOUT.as_millis() as u64,
        branches: vec![Branch { participant: p.participant.clone(), ops: p.ops.clone() }],
    };
    spec.validate().map_err(|e| {
        let e = e.to_string().replace("branches[0].", "").replace("id: ", "txn: ");
        format!("{}: invalid prepare: {e}", p.participant)
    })
}

/// A coordinator sets a deadline at most the longest timeout ahead; one further out is a
/// hand-made (or corrupt) message, and would make the barrier's lifetime arithmetic overflow.
pub fn check_deadline(p: &Prepare, now_ms: u64) -> std::result::Result<(), String> {
    let furthest = now_ms + (spec::MAX_TIMEOUT + Duration::from_secs(60)).as_millis() as u64;
    if p.deadline_ms > furthest {
        return Err(format!(
            "{}: invalid prepare: deadline {} is further ahead than the longest timeout ({})",
            p.participant,
            p.deadline_ms,
            humantime::format_duration(spec::MAX_TIMEOUT)
        ));
    }
    Ok(())
}

/// Checks a commit/abort's transaction id and keys. `Err` is the reason to dead-letter it.
pub fn check_resolve(r: &Resolve) -> std::result::Result<(), String> {
    spec::check_id("txn", &r.txn).map_err(|e| format!("invalid {}: {e}", "commit/abort"))?;
    if let Some(k) = r.keys.iter().find(|k| k.is_empty() || k.starts_with(spec::RESERVED_PREFIX)) {
        return Err(format!("invalid commit/abort: key {k:?} is empty or reserved"));
    }
    Ok(())
}

/// The `prepare.lua` call for `p` (see the script's header for the layout).
pub fn prepare_call(name: &str, p: &Prepare, now_ms: u64, retention: Duration) -> Call {
    let branch_keys = Branch { participant: p.participant.clone(), ops: p.ops.clone() }.keys();
    let mut call = with_keys(PREPARE.call(), name, &p.txn, &branch_keys)
        .arg(name)
        .arg(now_ms)
        .arg(retention.as_millis() as u64)
        .arg(p.deadline_ms);
    let bound = |b: Option<i64>| b.map(|b| b.to_string()).unwrap_or_default();
    for op in &p.ops {
        let index = branch_keys.iter().position(|k| k == op.key()).expect("every op key is a branch key") + 1;
        let (verb, field, value, min, max) = match op {
            Op::Set(o) => ("set", "", o.value.clone(), None, None),
            Op::Del(_) => ("del", "", String::new(), None, None),
            Op::Incrby(o) => ("incrby", "", o.by.to_string(), o.min, o.max),
            Op::Hset(o) => ("hset", o.field.as_str(), o.value.clone(), None, None),
            Op::Hdel(o) => ("hdel", o.field.as_str(), String::new(), None, None),
            Op::Hincrby(o) => ("hincrby", o.field.as_str(), o.by.to_string(), o.min, o.max),
            Op::Expect(o) => match &o.value {
                Some(v) => ("expect", "", v.clone(), None, None),
                None => ("absent", "", String::new(), None, None),
            },
        };
        call = call.arg(verb).arg(index).arg(field).arg(value).arg(bound(min)).arg(bound(max));
    }
    call
}

/// The `commit.lua` or `abort.lua` call for `r`.
pub fn resolve_call(script: &'static LuaScript, name: &str, r: &Resolve, now_ms: u64, retention: Duration) -> Call {
    let call = with_keys(script.call(), name, &r.txn, &r.keys).arg(name).arg(now_ms).arg(retention.as_millis() as u64);
    if std::ptr::eq(script, &ABORT) {
        // A tombstone does not know its transaction's deadline: it lives at least this long.
        call.arg(spec::MAX_TIMEOUT.as_millis() as u64)
    } else {
        call
    }
}

/// The call for a request, or the answer given without running a script (an invalid message).
pub fn call_for(name: &str, req: &Request, now_ms: u64, retention: Duration) -> std::result::Result<Call, Response> {
    match req {
        Request::Prepare(p) => match check_prepare(p).and_then(|()| check_deadline(p, now_ms)) {
            Ok(()) => Ok(prepare_call(name, p, now_ms, retention)),
            Err(reason) => Err(Response::Vote { yes: false, reason: Some(reason), repeat: false }),
        },
        Request::Commit(r) | Request::Abort(r) => {
            check_resolve(r).map_err(Response::Violation)?;
            let script = if matches!(req, Request::Commit(_)) { &COMMIT } else { &ABORT };
            Ok(resolve_call(script, name, r, now_ms, retention))
        }
    }
}

/// Reads a script's `{code, detail}` reply into a [`Response`] (the codes are documented in
/// each script's header).
pub fn read_reply(req: &Request, reply: &Value) -> Result<Response> {
    let script = match req {
        Request::Prepare(_) => PREPARE.name,
        Request::Commit(_) => COMMIT.name,
        Request::Abort(_) => ABORT.name,
    };
    let items = scripts::reply_strings(script, reply)?;
    let bad = || Error::ScriptReply { script, detail: format!("{items:?}") };
    let [code, detail] = <[String; 2]>::try_from(items.clone()).map_err(|_| bad())?;
    let code: i64 = code.parse().map_err(|_| bad())?;
    let txn = req.txn();
    Ok(match (req, code) {
        (Request::Prepare(_), 1 | 2) => Response::Vote { yes: true, reason: None, repeat: code == 2 },
        (Request::Prepare(_), 0 | 3) => Response::Vote { yes: false, reason: Some(detail), repeat: code == 3 },
        (Request::Commit(_), 1 | 2) => Response::Done {
            outcome: Outcome::Committed,
            repeat: code == 2,
            warning: (!detail.is_empty()).then(|| format!("committed writes failed: {detail}")),
        },
        (Request::Commit(_), -1) => {
            Response::Violation(format!("commit of txn {txn}, which was never prepared here (barrier {detail})"))
        }
        (Request::Abort(_), 1..=3) => Response::Done { outcome: Outcome::Aborted, repeat: code == 2, warning: None },
        (Request::Abort(_), -1) => Response::Violation(format!("abort of txn {txn}, which is already committed here")),
        (Request::Commit(_) | Request::Abort(_), -2) => {
            Response::Violation(format!("{} of txn {txn} names other keys than its prepare: {detail}", req.kind()))
        }
        _ => return Err(bad()),
    })
}

/// The built-in key-value resource on a data Redis. Connects lazily and reconnects after a
/// connection failure, so it outlives a Redis restart.
pub struct KvResource {
    name: String,
    url: RedisUrl,
    retention: Duration,
    conn: Option<MultiplexedConnection>,
}

impl KvResource {
    /// A resource for participant `name` on the data Redis at `url`; outcome barriers are kept
    /// for `retention`.
    pub fn new(url: RedisUrl, name: impl Into<String>, retention: Duration) -> Self {
        KvResource { name: name.into(), url, retention, conn: None }
    }

    /// The participant name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The connection, opened (and the scripts loaded) if needed. Loading up front matters:
    /// `scripts::run` re-sends a call answered `NOSCRIPT` after the rest of its pipeline, which
    /// would reorder a batch. Every order is safe (the scripts are written for messages arriving
    /// in any order), but in-order is what operators and tests expect.
    async fn conn(&mut self) -> Result<&mut MultiplexedConnection> {
        if self.conn.is_none() {
            let mut conn = self.url.connect().await?;
            for script in [&PREPARE, &COMMIT, &ABORT] {
                script.load(&mut conn).await.map_err(|e| Error::redis(&self.url, e))?;
            }
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }
}

impl Resource for KvResource {
    async fn apply(&mut self, batch: &[Request]) -> Result<Vec<Result<Response, String>>> {
        let now = redtx_common::now_ms();
        let mut out: Vec<Option<Result<Response, String>>> = vec![None; batch.len()];
        let mut calls = Vec::with_capacity(batch.len());
        let mut at = Vec::with_capacity(batch.len());
        for (i, req) in batch.iter().enumerate() {
            match call_for(&self.name, req, now, self.retention) {
                Ok(call) => {
                    calls.push(call);
                    at.push(i);
                }
                Err(answer) => out[i] = Some(Ok(answer)),
            }
        }
        if !calls.is_empty() {
            let url = self.url.clone();
            let replies = match scripts::run(self.conn().await?, &url, &calls).await {
                Ok(r) => r,
                Err(e) => {
                    // Maybe a connection that died with a Redis restart: the scripts are
                    // idempotent, so run them again at once on a fresh connection.
                    tracing::debug!(error = %e, "data Redis pipeline failed; retrying on a new connection");
                    self.conn = None;
                    let r = scripts::run(self.conn().await?, &url, &calls).await;
                    r.inspect_err(|_| self.conn = None)?
                }
            };
            for (i, reply) in at.into_iter().zip(replies) {
                out[i] = Some(match reply {
                    Ok(v) => read_reply(&batch[i], &v).map_err(|e| e.to_string()),
                    Err(e) => Err(Error::redis(&url, e).to_string()),
                });
            }
        }
        Ok(out.into_iter().map(|r| r.expect("every request answered")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redtx_common::spec::{ExpectOp, HincrbyOp, IncrbyOp};

    fn prep(ops: Vec<Op>) -> Prepare {
        Prepare { txn: "t1".into(), branch: 0, participant: "bank-a".into(), deadline_ms: 99, ops }
    }

    #[test]
    fn a_deadline_beyond_the_longest_timeout_votes_no_without_a_script() {
        let mut p = prep(vec![Op::set("k", "v")]);
        p.deadline_ms = u64::MAX;
        let Err(Response::Vote { yes: false, reason: Some(r), .. }) =
            call_for("bank-a", &Request::Prepare(p.clone()), 1_000, Duration::from_secs(1))
        else {
            panic!("expected a no vote");
        };
        assert!(r.contains("further ahead than the longest timeout"), "{r}");
        p.deadline_ms = 1_000 + 3_600_000;
        assert!(call_for("bank-a", &Request::Prepare(p), 1_000, Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn invalid_prepares_vote_no_without_a_script() {
        let p = prep(vec![Op::set("rtx:lock:x", "v")]);
        let Err(Response::Vote { yes: false, reason: Some(r), .. }) =
            call_for("bank-a", &Request::Prepare(p), 1, Duration::from_secs(1))
        else {
            panic!("expected a refusal")
        };
        assert!(r.starts_with("bank-a: invalid prepare: ops[0].key"), "{r}");
        let mut p = prep(vec![Op::set("k", "v")]);
        p.txn = "bad id".into();
        assert!(call_for("bank-a", &Request::Prepare(p), 1, Duration::from_secs(1)).is_err());
        let r = Resolve { txn: "t".into(), branch: 0, participant: "bank-a".into(), keys: vec!["rtx:x".into()] };
        assert!(matches!(
            call_for("bank-a", &Request::Commit(r), 1, Duration::from_secs(1)),
            Err(Response::Violation(_))
        ));
    }

    #[test]
    fn prepare_layout() {
        let p = prep(vec![
            Op::Incrby(IncrbyOp { key: "a".into(), by: -5, min: Some(0), max: None }),
            Op::Hincrby(HincrbyOp { key: "h".into(), field: "f".into(), by: 2, min: None, max: Some(9) }),
            Op::Expect(ExpectOp { key: "a".into(), value: None }),
        ]);
        assert!(prepare_call("bank-a", &p, 7, Duration::from_millis(1000)).script().name == "prepare");
        // The layout itself is exercised against Redis in tests/scripts.rs.
    }

    #[test]
    fn replies_map_to_responses() {
        let v = |code: i64, d: &str| Value::Array(vec![Value::Int(code), Value::BulkString(d.as_bytes().to_vec())]);
        let p = Request::Prepare(prep(vec![Op::set("k", "v")]));
        let r = Resolve { txn: "t1".into(), branch: 0, participant: "bank-a".into(), keys: vec!["k".into()] };
        let (c, a) = (Request::Commit(r.clone()), Request::Abort(r));
        assert_eq!(read_reply(&p, &v(1, "")).unwrap(), Response::Vote { yes: true, reason: None, repeat: false });
        assert_eq!(read_reply(&p, &v(2, "")).unwrap(), Response::Vote { yes: true, reason: None, repeat: true });
        assert_eq!(
            read_reply(&p, &v(3, "no")).unwrap(),
            Response::Vote { yes: false, reason: Some("no".into()), repeat: true }
        );
        assert!(matches!(
            read_reply(&c, &v(1, "")).unwrap(),
            Response::Done { outcome: Outcome::Committed, warning: None, .. }
        ));
        assert!(matches!(read_reply(&c, &v(1, "x")).unwrap(), Response::Done { warning: Some(_), .. }));
        assert!(
            matches!(read_reply(&c, &v(-1, "refused")).unwrap(), Response::Violation(m) if m.contains("never prepared"))
        );
        assert!(matches!(read_reply(&a, &v(-2, "k")).unwrap(), Response::Violation(m) if m.contains("other keys")));
        assert!(matches!(read_reply(&a, &v(3, "")).unwrap(), Response::Done { outcome: Outcome::Aborted, .. }));
        assert!(matches!(read_reply(&a, &v(-1, "")).unwrap(), Response::Violation(m) if m.contains("committed")));
        assert!(read_reply(&a, &v(9, "")).is_err());
        assert!(read_reply(&a, &Value::Int(1)).is_err());
    }
}
