//! The coordinator's Lua scripts (`lua/txn_*.lua`): how to call them, and the one place that
//! turns their replies into the typed replies of [`machine`](crate::machine).
//!
//! Every script touches only `KEYS[1]`, the record `rtx:txn:{<id>}`, so each call is one slot.

use crate::machine::{Acked, Created, Expired, Voted};
use redis::Value;
use redtx_common::protocol::{Ack, Vote};
use redtx_common::record::TxnState;
use redtx_common::scripts::{Call, LuaScript};
use redtx_common::spec::TxnSpec;
use redtx_common::{keys, Error, Result};

/// Creates the record if absent.
pub static TXN_CREATE: LuaScript = LuaScript::new("txn_create", include_str!("../../lua/txn_create.lua"));
/// Counts a vote, decides.
pub static TXN_VOTE: LuaScript = LuaScript::new(
    "txn_vote",
    concat!(include_str!("../../lua/lib/record.lua"), include_str!("../../lua/txn_vote.lua")),
);
/// Counts an ack, finishes.
pub static TXN_ACK: LuaScript =
    LuaScript::new("txn_ack", concat!(include_str!("../../lua/lib/record.lua"), include_str!("../../lua/txn_ack.lua")));
/// Deadline scan of one transaction.
pub static TXN_EXPIRE: LuaScript = LuaScript::new("txn_expire", include_str!("../../lua/txn_expire.lua"));

/// Every script of the coordinator.
pub static ALL: [&LuaScript; 4] = [&TXN_CREATE, &TXN_VOTE, &TXN_ACK, &TXN_EXPIRE];

/// `txn_create` for a validated `spec` submitted at `now_ms`.
pub fn create(spec: &TxnSpec, now_ms: u64) -> Call {
    let blob = rmp_serde::to_vec_named(spec).expect("a spec always serializes");
    let mut c = TXN_CREATE
        .call()
        .key(keys::txn_record(&spec.id))
        .arg(spec.mode.as_str())
        .arg(blob)
        .arg(now_ms)
        .arg(now_ms.saturating_add(spec.timeout_ms))
        .arg(spec.branches.len());
    for b in &spec.branches {
        c = c.arg(b.participant.as_str());
    }
    c
}

/// `txn_vote` for `vote`, counted at `now_ms`.
pub fn vote(vote: &Vote, now_ms: u64) -> Call {
    TXN_VOTE
        .call()
        .key(keys::txn_record(&vote.txn))
        .arg(vote.branch)
        .arg(vote.participant.as_str())
        .arg(if vote.yes { "yes" } else { "no" })
        .arg(vote.reason.as_deref().unwrap_or(""))
        .arg(now_ms)
}

/// `txn_ack` for `ack`, counted at `now_ms`; a finished record is kept `retention_ms`.
pub fn ack(ack: &Ack, now_ms: u64, retention_ms: u64) -> Call {
    TXN_ACK
        .call()
        .key(keys::txn_record(&ack.txn))
        .arg(ack.branch)
        .arg(ack.participant.as_str())
        .arg(ack.outcome.as_str())
        .arg(now_ms)
        .arg(retention_ms.max(1))
}

/// `txn_expire` of `txn` at `now_ms`.
pub fn expire(txn: &str, now_ms: u64) -> Call {
    TXN_EXPIRE.call().key(keys::txn_record(txn)).arg(now_ms)
}

/// The items of an array reply, as bytes (integers as decimal text, nil as empty).
fn items(script: &'static str, v: &Value) -> Result<Vec<Vec<u8>>> {
    let Value::Array(items) = v else {
        return Err(bad(script, format!("expected an array, got {v:?}")));
    };
    items
        .iter()
        .map(|i| match i {
            Value::BulkString(b) => Ok(b.clone()),
            Value::SimpleString(s) => Ok(s.clone().into_bytes()),
            Value::Int(n) => Ok(n.to_string().into_bytes()),
            Value::Nil => Ok(Vec::new()),
            other => Err(bad(script, format!("unexpected item {other:?}"))),
        })
        .collect()
}

fn bad(script: &'static str, detail: String) -> Error {
    Error::ScriptReply { script, detail }
}

/// Typed access to one reply's items.
struct Items {
    script: &'static str,
    items: Vec<Vec<u8>>,
}

impl Items {
    fn new(script: &'static str, v: &Value) -> Result<Self> {
        Ok(Items { script, items: items(script, v)? })
    }

    fn text(&self, i: usize) -> Result<String> {
        self.items
            .get(i)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(|| bad(self.script, format!("reply has no item {i}: {:?}", self.items.len())))
    }

    fn flag(&self, i: usize) -> Result<bool> {
        Ok(self.text(i)? == "1")
    }

    fn num(&self, i: usize) -> Result<u64> {
        let t = self.text(i)?;
        t.parse().map_err(|_| bad(self.script, format!("item {i} is not a number: {t:?}")))
    }

    fn state(&self, i: usize) -> Result<TxnState> {
        let t = self.text(i)?;
        TxnState::parse(&t).ok_or_else(|| bad(self.script, format!("unknown state {t:?}")))
    }

    fn spec(&self, i: usize) -> Result<Option<TxnSpec>> {
        match self.items.get(i) {
            None => Ok(None),
            Some(b) if b.is_empty() => Ok(None),
            Some(b) => rmp_serde::from_slice(b).map(Some).map_err(|e| bad(self.script, format!("stored spec: {e}"))),
        }
    }
}

/// Reads a `txn_create` reply.
pub fn parse_created(v: &Value) -> Result<Created> {
    let r = Items::new(TXN_CREATE.name, v)?;
    Ok(Created { created: r.flag(0)?, state: r.state(1)?, deadline_ms: r.num(2)?, stored_spec: r.spec(3)? })
}

/// Reads a `txn_vote` reply.
pub fn parse_voted(v: &Value) -> Result<Voted> {
    let r = Items::new(TXN_VOTE.name, v)?;
    Ok(match r.text(0)?.as_str() {
        "missing" => Voted::Missing,
        "bad" => Voted::Bad(r.text(1)?),
        "ok" => {
            Voted::Counted { state: r.state(1)?, decided_now: r.flag(2)?, branch_acked: r.flag(3)?, spec: r.spec(4)? }
        }
        other => return Err(bad(r.script, format!("unknown code {other:?}"))),
    })
}

/// Reads a `txn_ack` reply.
pub fn parse_acked(v: &Value) -> Result<Acked> {
    let r = Items::new(TXN_ACK.name, v)?;
    Ok(match r.text(0)?.as_str() {
        "missing" => Acked::Missing,
        "bad" => Acked::Bad(r.text(1)?),
        "violation" => Acked::Violation(format!("protocol violation: {}", r.text(1)?)),
        "ok" => Acked::Counted { state: r.state(1)?, finished_now: r.flag(2)? },
        other => return Err(bad(r.script, format!("unknown code {other:?}"))),
    })
}

/// Reads a `txn_expire` reply.
pub fn parse_expired(v: &Value) -> Result<Expired> {
    let r = Items::new(TXN_EXPIRE.name, v)?;
    Ok(match r.text(0)?.as_str() {
        "missing" => Expired::Missing,
        "ok" => Expired::Found {
            state: r.state(1)?,
            decided_now: r.flag(2)?,
            deadline_ms: r.num(3)?,
            decided_ms: r.text(4)?.parse().ok(),
            acked: r.text(5)?.bytes().map(|c| c == b'1').collect(),
            spec: r.spec(6)?,
        },
        other => return Err(bad(r.script, format!("unknown code {other:?}"))),
    })
}
