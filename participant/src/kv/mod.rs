//! The built-in key-value resource: each [`Transition`] is carried out by Lua scripts on the
//! participant's data Redis, one server or a Redis Cluster; a batch is one call per script (per
//! slot, on a cluster: `lua/lib/batch.lua`).
//!
//! One script per work (`lua/`): `prepare` (Try), `commit` (Confirm), `abort` (Cancel),
//! `execute` (Action), `compensate` (Compensation), `mark` (Mark). Each opens with the KEYS, ARGV
//! and reply of one transition; the layout they share and its helpers are in
//! `lua/lib/barrier.lua`, the simulated checks of the ops in `lua/lib/ops.lua`, the exact 64-bit
//! arithmetic in `lua/lib/i64.lua`, the batch loop in `lua/lib/batch.lua` (prepended at compile
//! time). Replies are read through [`ScriptCode`]. A batch call that fails as a whole (a
//! transition raised an error) is run again one transition per call, so that one bad
//! transition fails alone.
//!
//! **One server**: a transition is one script call. The barrier is the hash
//! `rtx:bar:<participant>:<txn>` (`state`, `reason`, `deadline`, `keys`, `ops` while prepared
//! and then "", `at`, `done`); a key's lock is `rtx:lock:<key>`, holding [`lock_owner`]. Commit
//! and abort messages carry no keys: the keys of a prepared branch come from a small in-memory
//! cache filled at prepare, or else from the barrier (`HGET keys`, one pipeline per batch), so
//! that KEYS lists every key a script touches.
//!
//! **A Redis Cluster** ([`KvResource::on`] with a cluster target): a script may only touch keys of
//! one slot, so a branch's keys are grouped by slot and each group is carried out by the same
//! scripts in its own slot, under a home barrier that decides for the branch: see [`cluster`]
//! for the key names and the protocol.

pub mod cluster;

use crate::barrier::{Barrier, BarrierState, Request, Work, SKEW};
use crate::resource::{Applied, Resource, Transition};
use redis::Value;
use redtx_common::conn::{ClusterRetries, RedisConn, RedisTarget, RedisUrl};
use redtx_common::kv::{decode_ops, keys_of, Op};
use redtx_common::outage::Outages;
use redtx_common::scripts::{self, Call, LuaScript};
use redtx_common::slots::SlotOwners;
use redtx_common::{keys, spec, Error, Result};
use std::collections::HashMap;
use std::time::Duration;

macro_rules! lua {
    ($($file:literal),*) => { concat!($(include_str!(concat!("../../../lua/", $file))),*) };
}

/// `lua/prepare.lua`: Try.
pub static PREPARE: LuaScript =
    LuaScript::new("prepare", lua!("lib/barrier.lua", "lib/i64.lua", "lib/ops.lua", "lib/batch.lua", "prepare.lua"));
/// `lua/commit.lua`: Confirm.
pub static COMMIT: LuaScript =
    LuaScript::new("commit", lua!("lib/barrier.lua", "lib/i64.lua", "lib/ops.lua", "lib/batch.lua", "commit.lua"));
/// `lua/abort.lua`: Cancel.
pub static ABORT: LuaScript = LuaScript::new("abort", lua!("lib/barrier.lua", "lib/batch.lua", "abort.lua"));
/// `lua/execute.lua`: Action.
pub static EXECUTE: LuaScript =
    LuaScript::new("execute", lua!("lib/barrier.lua", "lib/i64.lua", "lib/ops.lua", "lib/batch.lua", "execute.lua"));
/// `lua/compensate.lua`: Compensation.
pub static COMPENSATE: LuaScript = LuaScript::new(
    "compensate",
    lua!("lib/barrier.lua", "lib/i64.lua", "lib/ops.lua", "lib/batch.lua", "compensate.lua"),
);
/// `lua/mark.lua`: Mark (and, on a cluster, every change of a home barrier).
pub static MARK: LuaScript = LuaScript::new("mark", lua!("lib/barrier.lua", "lib/batch.lua", "mark.lua"));

/// Every script, for loading them up front.
pub static SCRIPTS: [&LuaScript; 6] = [&PREPARE, &COMMIT, &ABORT, &EXECUTE, &COMPENSATE, &MARK];

/// Most branches whose keys are remembered between prepare and commit/abort; beyond it the
/// cache starts afresh (a miss costs one pipelined `HGET`).
const KEY_CACHE_MAX: usize = 65_536;

/// The first element of every script's reply (`lua/lib/barrier.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i64)]
pub enum ScriptCode {
    /// `{0, message}`: this transition failed (the verb returned an error); nothing of it was
    /// written. It stays pending and is retried.
    Failed = 0,
    /// `{1, state, reason}`: the transition happened; the barrier is now `state`.
    Done = 1,
    /// `{2, state, reason, deadline, keys}`: the barrier was not in the expected state (`state`
    /// "" = none), or KEYS were not the branch's keys; nothing changed.
    Moved = 2,
    /// `{3, reason}`: a saga step's key is locked by a 2PC branch; nothing changed.
    Busy = 3,
}

impl ScriptCode {
    /// The code `n`, if it is one.
    pub fn from_i64(n: i64) -> Option<ScriptCode> {
        [ScriptCode::Failed, ScriptCode::Done, ScriptCode::Moved, ScriptCode::Busy].into_iter().find(|c| *c as i64 == n)
    }
}

/// The value of a lock taken by `participant`'s branch of `txn`: `<participant> <txn>` (neither
/// contains a space), so a script that finds the lock held can tell which branch holds it.
pub fn lock_owner(participant: &str, txn: &str) -> String {
    format!("{participant} {txn}")
}

/// The script, the shared input and the common KEYS/ARGV (`lua/lib/barrier.lua`) of one transition on barrier
/// `bar` over the user `keys`, each followed by its lock (named by `lock`), expecting the
/// barrier in state `expected` ("" = none).
#[allow(clippy::too_many_arguments)]
fn base(
    script: &'static LuaScript,
    bar: String,
    lock: fn(&str) -> String,
    name: &str,
    txn: &str,
    keys: &[String],
    expected: &str,
    now_ms: u64,
    retention: Duration,
) -> Call {
    let mut call = script.call().key(bar);
    for k in keys {
        call = call.key(k.as_str()).key(lock(k));
    }
    call.shared(name)
        .shared(now_ms)
        .shared(retention.as_millis() as u64)
        .shared(SKEW.as_millis() as u64)
        .shared(spec::MAX_TIMEOUT.as_millis() as u64)
        .arg(lock_owner(name, txn))
        .arg(expected)
}

/// Appends the ops in six slots each (`lua/lib/ops.lua`); `keys` is [`keys_of`] the ops.
fn with_ops(mut call: Call, keys: &[String], ops: &[Op]) -> Call {
    let bound = |b: Option<i64>| b.map(|b| b.to_string()).unwrap_or_default();
    for op in ops {
        let index = keys.iter().position(|k| k == op.key()).expect("every op key is a branch key") + 1;
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

/// How one transition is carried out: a script call, and the branch's keys (remembered if it
/// ends prepared).
#[derive(Clone)]
pub struct Plan {
    /// The call.
    pub call: Call,
    /// The keys of its ops.
    pub keys: Vec<String>,
}

/// The plan for transition `t` of participant `name` on one data server. `prepared_keys`: for
/// Confirm/Cancel, the keys the branch was prepared with, if known (unknown: the script answers
/// MOVED unless the barrier is no longer prepared, and the runtime asks again).
pub fn plan(name: &str, t: &Transition<'_>, prepared_keys: Option<&[String]>, retention: Duration) -> Plan {
    let req = t.request;
    let txn = req.txn();
    let expected = t.expect.map(BarrierState::as_str).unwrap_or("");
    let base = |script, keys: &[String]| {
        base(script, keys::barrier(name, txn), keys::lock, name, txn, keys, expected, t.now_ms, retention)
    };
    // A payload that does not decode is a business refusal that names the field.
    let decoded = |what: &str| decode_ops(req.payload(), "payload").map_err(|e| format!("{name}: invalid {what}: {e}"));
    let ops_call = |script, what: &str, pre: &dyn Fn(Call) -> Call| match decoded(what) {
        Ok(ops) => {
            let keys = keys_of(&ops);
            let call = with_ops(pre(base(script, &keys)).arg(""), &keys, &ops);
            Plan { call, keys }
        }
        Err(refusal) => Plan { call: pre(base(script, &[])).arg(refusal), keys: Vec::new() },
    };
    match &t.work {
        Work::Try => {
            let deadline = if let Request::Prepare(p) = req { p.deadline_ms } else { 0 };
            ops_call(&PREPARE, "payload", &|c: Call| c.arg(deadline))
        }
        Work::Action => ops_call(&EXECUTE, "payload", &|c: Call| c),
        Work::Compensation => ops_call(&COMPENSATE, "compensation payload", &|c: Call| c),
        Work::Confirm | Work::Cancel => {
            let script = if t.work == Work::Confirm { &COMMIT } else { &ABORT };
            Plan { call: base(script, prepared_keys.unwrap_or(&[])), keys: Vec::new() }
        }
        Work::Mark { to, reason } => {
            let deadline = match req {
                Request::Prepare(p) if *to == BarrierState::Refused => p.deadline_ms.to_string(),
                _ => String::new(),
            };
            let call = base(&MARK, &[]).arg(to.as_str()).arg(reason.as_deref().unwrap_or("")).arg(deadline).arg("");
            Plan { call, keys: Vec::new() }
        }
    }
}

/// Reads a script's reply (see [`ScriptCode`]).
pub fn read_reply(script: &'static str, reply: &Value) -> Result<Applied> {
    let items = scripts::reply_strings(script, reply)?;
    let bad = || Error::ScriptReply { script, detail: format!("{items:?}") };
    let code = items.first().and_then(|c| c.parse().ok()).and_then(ScriptCode::from_i64).ok_or_else(bad)?;
    let text = |i: usize| items.get(i).filter(|s| !s.is_empty()).cloned();
    let state = |s: &str| BarrierState::parse(s).ok_or_else(bad);
    Ok(match code {
        ScriptCode::Done => Applied::Done { state: state(items.get(1).ok_or_else(bad)?)?, reason: text(2) },
        ScriptCode::Moved => match items.get(1).map(String::as_str) {
            None => return Err(bad()),
            Some("") => Applied::Moved(None),
            Some(s) => Applied::Moved(Some(Barrier {
                state: state(s)?,
                reason: text(2),
                deadline_ms: text(3).map(|d| d.parse().map_err(|_| bad())).transpose()?,
            })),
        },
        ScriptCode::Busy => Applied::Busy(text(1).ok_or_else(bad)?),
        ScriptCode::Failed => {
            return Err(Error::ScriptFailed { script, detail: text(1).unwrap_or_else(|| "no message".into()) })
        }
    })
}

/// Whether a call's error says it did not reach a server that would run it: a lost connection
/// or a timeout, or a slot that is elsewhere or on the move (`MOVED`, `ASK`, `TRYAGAIN`,
/// `CLUSTERDOWN` still answered after the cluster connection's retries).
fn unreached(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.redirect_node().is_some()
        || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
        || matches!(e.code(), Some("MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN"))
}

/// The built-in key-value resource on a data Redis: one server, or a Redis Cluster. Connects
/// lazily and reconnects after a connection failure, so it outlives a Redis restart.
pub struct KvResource {
    name: String,
    target: RedisTarget,
    /// The deployment's partition count: on a cluster, the home barrier of a branch of a
    /// transaction of partition `P` is in the slot of `{P}`.
    partitions: u32,
    retention: Duration,
    conn: Option<RedisConn>,
    /// A cluster: slots whose master stopped answering; their transitions fail at once (and
    /// stay pending) until it answers again ([`redtx_common::outage`]).
    outages: Option<Outages>,
    /// A cluster: which slots each master serves (learnt with each new connection), so that a master
    /// found not answering for one slot is skipped for all of its slots at once.
    slot_map: Option<std::sync::Arc<SlotOwners>>,
    /// Keys of branches this process saw prepared (txn -> keys), for their commit/abort.
    prepared_keys: HashMap<String, Vec<String>>,
}

impl KvResource {
    /// A resource for participant `name` on the data Redis at `url` (one server); finished
    /// barriers are kept for `retention`.
    pub fn new(url: RedisUrl, name: impl Into<String>, retention: Duration) -> Self {
        Self::on(RedisTarget::single(url), name, retention, keys::DEFAULT_PARTITIONS)
    }

    /// A resource for participant `name` on `target`: one server, or a Redis Cluster (see
    /// [`cluster`]). `partitions` is the deployment's partition count (it places home barriers
    /// on a cluster; on one server it is not used).
    pub fn on(target: RedisTarget, name: impl Into<String>, retention: Duration, partitions: u32) -> Self {
        KvResource {
            name: name.into(),
            // A slot on the move fails a group's call within a second: it stays pending and is
            // retried, instead of holding the whole batch.
            target: target.with_cluster_retries(ClusterRetries::QUICK),
            partitions: partitions.max(1),
            retention,
            conn: None,
            outages: None,
            slot_map: None,
            prepared_keys: HashMap::new(),
        }
    }

    /// The participant name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the data is on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.target.is_cluster()
    }

    /// The connection, opened (and the scripts loaded, on every node of a cluster) if needed.
    /// Loading up front matters: `scripts::run` re-sends a call answered `NOSCRIPT` after the
    /// rest of its pipeline, which would reorder a batch.
    async fn conn(&mut self) -> Result<&mut RedisConn> {
        // A master was replaced while it did not answer: a connection that met only timeouts
        // from it still routes there. A fresh one, with a fresh slot map.
        if self.outages.as_ref().is_some_and(Outages::take_topology_changed) {
            tracing::info!("a data master was replaced while it did not answer: using a fresh cluster connection");
            self.conn = None;
        }
        if self.conn.is_none() {
            let mut conn = self.target.connect().await?;
            for script in SCRIPTS {
                script.load(&mut conn).await.map_err(|e| Error::redis(&self.target, e))?;
            }
            if self.target.is_cluster() {
                if self.outages.is_none() {
                    self.outages = Some(Outages::connect(&self.target, "data slot").await?);
                }
                let map = SlotOwners::new(self.target.clone(), conn.clone());
                // Best effort: without it, a silent master's slots are found one by one.
                if let Err(e) = map.owner(0, true).await {
                    tracing::debug!(error = %e, "could not learn the data cluster's slots");
                }
                self.slot_map = Some(std::sync::Arc::new(map));
            }
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// The prepared keys of `txns` read from their barriers, in one pipeline (one server). Like
    /// [`run`](Self::run), a failure is tried again at once on a fresh connection (the old one
    /// may have died with a Redis restart), and a second failure drops the connection too.
    async fn fetch_keys(&mut self, txns: &[&str]) -> Result<Vec<Vec<String>>> {
        let mut p = redis::pipe();
        for txn in txns {
            p.hget(keys::barrier(&self.name, txn), "keys");
        }
        let target = self.target.clone();
        let raw: Vec<Option<Vec<u8>>> = match p.query_async(self.conn().await?).await {
            Ok(raw) => raw,
            Err(e) => {
                tracing::debug!(error = %e, "reading barrier keys failed; retrying on a new connection");
                self.conn = None;
                let r = p.query_async(self.conn().await?).await;
                r.map_err(|e| {
                    self.conn = None;
                    Error::redis(&target, e)
                })?
            }
        };
        Ok(raw.into_iter().map(|r| r.and_then(|b| rmp_serde::from_slice(&b).ok()).unwrap_or_default()).collect())
    }

    /// Runs `calls` (one per transition, each with the slot of its keys; all 0 on one server)
    /// as one call per script and slot, and returns one reply per call, in order. A batch call
    /// that failed as a whole is run again one call per transition, so each failure is that
    /// transition's own.
    ///
    /// On a cluster, a slot whose master did not answer a call in time is skipped (its
    /// transitions fail at once, and stay pending) until a probe hears from it: a frozen
    /// master costs one timeout per outage, not one per batch, and holds up no other slot's
    /// transitions.
    async fn run_batched(&mut self, calls: &[(u16, Call)]) -> Result<Vec<redis::RedisResult<Value>>> {
        let out_slots = self.outages.as_ref().map(Outages::out).unwrap_or_default();
        let mut out: Vec<Option<redis::RedisResult<Value>>> = vec![None; calls.len()];
        let mut groups: Vec<((&'static str, u16), Vec<usize>)> = Vec::new();
        for (i, (slot, c)) in calls.iter().enumerate() {
            if out_slots.contains(&u32::from(*slot)) {
                out[i] = Some(Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the master of slot {slot} does not answer; retried once it does"),
                ))));
                continue;
            }
            let key = (c.script().name, *slot);
            match groups.iter_mut().find(|(k, at)| *k == key && calls[at[0]].1.batches_with(c)) {
                Some((_, at)) => at.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        let batched: Vec<Call> =
            groups.iter().map(|(_, at)| Call::batch(&at.iter().map(|&i| &calls[i].1).collect::<Vec<_>>())).collect();
        let replies = self.run(&batched).await?;
        let mut alone = Vec::new();
        for (((_, slot), at), reply) in groups.iter().zip(replies) {
            if let Err(e) = &reply {
                if e.is_timeout() {
                    if let Some(key) = calls[at[0]].1.first_key() {
                        self.out_of_reach(*slot, key).await;
                    }
                }
            }
            match reply {
                Ok(Value::Array(items)) if items.len() == at.len() => {
                    for (&i, v) in at.iter().zip(items) {
                        out[i] = Some(Ok(v));
                    }
                }
                Ok(other) => {
                    let detail = format!("a batch of {} answered {other:?}", at.len());
                    for &i in at {
                        out[i] = Some(Err(redis::RedisError::from((
                            redis::ErrorKind::Client,
                            "bad batch reply",
                            detail.clone(),
                        ))));
                    }
                }
                // The call never ran (the connection, a slot on the move): each of its
                // transitions fails alike, and would alone too.
                Err(e) if unreached(&e) => {
                    for &i in at {
                        out[i] = Some(Err(e.clone()));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, transitions = at.len(), "a batch call failed; running its transitions one by one");
                    alone.extend(at.iter().copied());
                }
            }
        }
        if !alone.is_empty() {
            let singles: Vec<Call> = alone.iter().map(|&i| Call::batch(&[&calls[i].1])).collect();
            for (i, reply) in alone.into_iter().zip(self.run(&singles).await?) {
                out[i] = Some(reply.and_then(|v| match v {
                    Value::Array(mut items) if items.len() == 1 => Ok(items.remove(0)),
                    other => Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "bad batch reply",
                        format!("{other:?}"),
                    ))),
                }));
            }
        }
        Ok(out.into_iter().map(|r| r.expect("every call answered")).collect())
    }

    /// Runs `calls`: one pipeline on one server; on a cluster each call on its own, all at
    /// once, each sent to the master serving its slot (redirects followed by the cluster
    /// connection).
    async fn run(&mut self, calls: &[Call]) -> Result<Vec<redis::RedisResult<Value>>> {
        let target = self.target.clone();
        match scripts::run_each(self.conn().await?, &target, calls).await {
            Ok(r) => Ok(r),
            Err(e) => {
                // Maybe a connection that died with a Redis restart: run the calls again at once
                // on a fresh connection (a transition that did run answers MOVED the second time).
                tracing::debug!(error = %e, "data Redis pipeline failed; retrying on a new connection");
                self.conn = None;
                let r = scripts::run_each(self.conn().await?, &target, calls).await;
                r.inspect_err(|_| self.conn = None)
            }
        }
    }

    /// A call to `slot` timed out: its master does not answer. Every slot of that master is
    /// skipped until `key` (a key of `slot`) answers again.
    pub(super) async fn out_of_reach(&self, slot: u16, key: Vec<u8>) {
        let Some(o) = &self.outages else { return };
        let with = match &self.slot_map {
            Some(map) => map.served_with(slot).await.unwrap_or_default(),
            None => Vec::new(),
        };
        o.mark_all(u32::from(slot), with.into_iter().map(u32::from).collect(), key);
    }

    /// Remembers (or forgets) the keys of a branch after a transition ended as `applied`.
    fn remember(&mut self, t: &Transition<'_>, keys: Vec<String>, applied: &std::result::Result<Applied, String>) {
        let txn = t.request.txn();
        match (&t.work, applied) {
            (Work::Try, Ok(Applied::Done { state: BarrierState::Prepared, .. })) => {
                if self.prepared_keys.len() >= KEY_CACHE_MAX {
                    self.prepared_keys.clear();
                }
                self.prepared_keys.insert(txn.to_string(), keys);
            }
            // Finished, or failed: a rerun reads the keys with the barrier's state.
            (Work::Confirm | Work::Cancel, _) => {
                self.prepared_keys.remove(txn);
            }
            _ => {}
        }
    }

    /// [`Resource::apply`] on one server: one script call per transition, batched.
    async fn apply_single(&mut self, batch: &[Transition<'_>]) -> Result<Vec<std::result::Result<Applied, String>>> {
        let needs_keys = |t: &Transition<'_>| matches!(t.work, Work::Confirm | Work::Cancel);
        let misses: Vec<&str> = batch
            .iter()
            .filter(|t| needs_keys(t) && !self.prepared_keys.contains_key(t.request.txn()))
            .map(|t| t.request.txn())
            .collect();
        let mut fetched: HashMap<&str, Vec<String>> = HashMap::new();
        if !misses.is_empty() {
            let keys = self.fetch_keys(&misses).await?;
            fetched = misses.into_iter().zip(keys).collect();
        }
        let mut out: Vec<Option<std::result::Result<Applied, String>>> = vec![None; batch.len()];
        let mut calls = Vec::with_capacity(batch.len());
        let mut at = Vec::with_capacity(batch.len());
        for (i, t) in batch.iter().enumerate() {
            if let Some(e) = self.misaddressed(t) {
                out[i] = Some(Err(e));
                continue;
            }
            let txn = t.request.txn();
            let known = fetched.get(txn).or_else(|| self.prepared_keys.get(txn)).map(Vec::as_slice);
            let Plan { call, keys } = plan(&self.name, t, known, self.retention);
            calls.push((0, call));
            at.push((i, keys));
        }
        if !calls.is_empty() {
            let replies = self.run_batched(&calls).await?;
            for ((i, keys), ((_, call), reply)) in at.into_iter().zip(calls.iter().zip(replies)) {
                let applied = match reply {
                    Ok(v) => read_reply(call.script().name, &v).map_err(|e| e.to_string()),
                    Err(e) => Err(Error::redis(&self.target, e).to_string()),
                };
                self.remember(&batch[i], keys, &applied);
                out[i] = Some(applied);
            }
        }
        Ok(out.into_iter().map(|r| r.expect("every transition answered")).collect())
    }

    /// Why `t` is not this resource's to carry out, if it is not.
    fn misaddressed(&self, t: &Transition<'_>) -> Option<String> {
        (t.request.participant() != self.name).then(|| {
            format!("request for participant {:?} given to the resource of {:?}", t.request.participant(), self.name)
        })
    }
}

impl Resource for KvResource {
    async fn apply(&mut self, batch: &[Transition<'_>]) -> Result<Vec<std::result::Result<Applied, String>>> {
        if self.is_cluster() {
            self.apply_cluster(batch).await
        } else {
            self.apply_single(batch).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redtx_common::kv::encode_ops;
    use redtx_common::protocol::{Execute, Prepare, Resolve};

    fn prep(payload: Vec<u8>) -> Request {
        Request::Prepare(Prepare {
            txn: "t1".into(),
            branch: 0,
            participant: "bank-a".into(),
            deadline_ms: 99,
            payload,
        })
    }

    fn t(req: &Request, expect: Option<BarrierState>, work: Work) -> Transition<'_> {
        Transition { request: req, expect, work, now_ms: 7 }
    }

    #[test]
    fn codes_round_trip() {
        for c in [ScriptCode::Failed, ScriptCode::Done, ScriptCode::Moved, ScriptCode::Busy] {
            assert_eq!(ScriptCode::from_i64(c as i64), Some(c));
        }
        assert_eq!(ScriptCode::from_i64(4), None);
    }

    #[test]
    fn an_undecodable_payload_is_a_refusal_naming_the_field() {
        let bad = prep(encode_ops(&[Op::set("rtx:lock:x", "v")]));
        let Plan { call, keys } = plan("bank-a", &t(&bad, None, Work::Try), None, Duration::from_secs(1));
        assert_eq!(call.script().name, "prepare");
        assert!(keys.is_empty());
        let good = prep(encode_ops(&[Op::incrby("a", 1), Op::set("b", "v"), Op::incrby("a", 2)]));
        let Plan { keys, .. } = plan("bank-a", &t(&good, None, Work::Try), None, Duration::from_secs(1));
        assert_eq!(keys, ["a", "b"]);
        let e = Request::Compensate(Execute {
            txn: "t1".into(),
            branch: 0,
            participant: "bank-a".into(),
            attempt: 1,
            payload: vec![0xc1],
        });
        let Plan { call, .. } =
            plan("bank-a", &t(&e, Some(BarrierState::Done), Work::Compensation), None, Duration::from_secs(1));
        assert_eq!(call.script().name, "compensate");
        let r = Request::Commit(Resolve { txn: "t1".into(), branch: 0, participant: "bank-a".into() });
        let Plan { call, .. } =
            plan("bank-a", &t(&r, Some(BarrierState::Prepared), Work::Confirm), None, Duration::from_secs(1));
        assert_eq!(call.script().name, "commit");
    }

    #[test]
    fn replies_map_to_applied() {
        let v = |items: &[&str]| {
            let mut out = vec![Value::Int(items[0].parse().unwrap())];
            out.extend(items[1..].iter().map(|s| Value::BulkString(s.as_bytes().to_vec())));
            Value::Array(out)
        };
        assert_eq!(
            read_reply("prepare", &v(&["1", "prepared", ""])).unwrap(),
            Applied::Done { state: BarrierState::Prepared, reason: None }
        );
        assert_eq!(
            read_reply("prepare", &v(&["1", "refused", "bank-a: conflict"])).unwrap(),
            Applied::Done { state: BarrierState::Refused, reason: Some("bank-a: conflict".into()) }
        );
        assert_eq!(read_reply("commit", &v(&["2", "", "", ""])).unwrap(), Applied::Moved(None));
        assert_eq!(
            read_reply("commit", &v(&["2", "committed", "", "123"])).unwrap(),
            Applied::Moved(Some(Barrier { state: BarrierState::Committed, reason: None, deadline_ms: Some(123) }))
        );
        assert_eq!(read_reply("execute", &v(&["3", "locked"])).unwrap(), Applied::Busy("locked".into()));
        assert!(read_reply("execute", &v(&["1", "nonsense", ""])).is_err());
        assert!(read_reply("execute", &v(&["9", "done", ""])).is_err());
        let e = read_reply("commit", &v(&["0", "commit: the staged writes no longer apply"])).unwrap_err();
        assert!(matches!(e, Error::ScriptFailed { script: "commit", .. }), "{e}");
        assert!(read_reply("execute", &Value::Int(1)).is_err());
        assert!(read_reply("commit", &v(&["2", "prepared", "", "soon"])).is_err());
    }
}
