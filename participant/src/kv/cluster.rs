//! The key-value resource with its data on a Redis Cluster.
//!
//! A script may only touch keys of one slot, and a branch's keys may lie in many. So a branch is
//! split into **slot groups** (its ops grouped by the slot of their key, in first-use order),
//! each carried out by the usual script (`prepare`, `commit`, `abort`, `execute`, `compensate`,
//! `mark`) in its own slot, atomically there; and one **home barrier** decides for the branch.
//!
//! # Keys
//!
//! | key | slot | what |
//! |---|---|---|
//! | `rtx:bar:{P}:<participant>:<txn>` | of `{P}`, the transaction's partition | the home barrier: the branch's state as the runtime sees it (`state`, `reason`, `deadline`, `keys`, `at`); found from the transaction alone, so a commit or abort (no keys) finds it |
//! | `rtx:grp:{<tag>}:<participant>:<txn>` | the group's | a 2PC group's barrier (prepared, with its staged ops), or a saga action's |
//! | `rtx:undo:{<tag>}:<participant>:<txn>` | the group's | a saga compensation's barrier |
//! | `rtx:lock:{<tag>}:<key>` | the key's | the lock of user key `<key>` |
//!
//! `<tag>` is [`keys::slot_tag`] of the slot: a short decimal whose slot it is. A name's hash tag
//! is its first `{...}`, which is ours, so these keys are in the group's slot whatever the user
//! key holds (`{`, `}`, a hash tag of its own).
//!
//! # 2PC: groups first, the home barrier decides
//!
//! - **Prepare** (the home barrier expected absent): every group is prepared (locked, checked,
//!   staged) in one round. All prepared: the home barrier goes `prepared`, with the branch's
//!   keys, and the branch votes yes. A group refused: the groups this branch prepared are aborted
//!   (their locks released, nothing applied), then the home barrier goes `refused` with the
//!   group's reason, and the branch votes no. A group call that fails (a redirect still answered
//!   after the client's retries, a lost connection, `OOM`) leaves the request pending: the rerun
//!   finds the groups already prepared (the group barrier says so) and goes on.
//! - **Commit** / **abort** (home expected `prepared`): every group is committed (or aborted),
//!   then the home barrier. A rerun after a crash finds the groups done and finishes the home
//!   barrier; a home barrier `committed` therefore means every group is.
//! - **Release rule**: a prepare that finds the home barrier `refused` or `aborted` (an abort
//!   came first and left a tombstone; or a rerun after a refusal) makes sure none of its groups
//!   is left prepared or empty: prepared ones are aborted, empty ones get an `aborted` tombstone,
//!   so that a slower worker still preparing a group finds it taken. A prepare past its deadline
//!   marks the home barrier `refused` first and then releases the same way. So nothing stays
//!   locked once the branch is refused or aborted, and no group is ever committed unless the
//!   home barrier was `prepared`.
//!
//! # Sagas: one slot per step, the home barrier first
//!
//! A saga step applies at once (no staging), so its keys (the action's, and the compensation's)
//! must share one slot; an action that spans slots fails (nothing applied) and a compensation
//! that does is refused (retried, then `stuck`), each with a reason naming the keys and their
//! slots and suggesting a hash tag.
//!
//! - **Action**: the home barrier goes `running` with the action's keys (a compare-and-set from
//!   none), then the action runs in its slot (`execute`, barrier `rtx:grp:...`: done, or failed
//!   with nothing applied), then the home barrier records the result. A rerun resumes from
//!   `running` (the action's own barrier makes it apply once). A key locked by a 2PC branch
//!   answers busy and leaves `running` for the retry.
//! - **Null compensation**: a compensation that finds no home barrier marks it `compensated`,
//!   so a late action is refused by its first step. One that finds it `running` settles the
//!   action first: it leaves a `compensated` tombstone on the action's barrier if the action has
//!   not run (so it never will), or takes the action's result if it has; the home barrier
//!   records either.
//! - **Compensation** (home `done`): the compensation runs in its slot (`compensate`, barrier
//!   `rtx:undo:...`, applied once), then the home barrier goes `compensated`. A compensation the
//!   business refuses changes nothing and is retried.
//!
//! # Lock-step rounds
//!
//! Each transition of a batch is a small async flow (below) that awaits only
//! `Io::round`: the script calls of its next step. The driver polls every flow until each
//! has asked for its round or finished, sends all the calls of the round at once (one call per
//! script and slot, `lua/lib/batch.lua`, each to the master serving its slot), hands each flow
//! its replies, and polls again. A batch of prepares costs two rounds (groups, then home
//! barriers); a commit two; a saga action three.

use super::{base, with_ops, KvResource, ABORT, COMMIT, COMPENSATE, EXECUTE, MARK, PREPARE};
use crate::barrier::{null_compensation, Barrier, BarrierState, Request, Work};
use crate::resource::{Applied, Transition};
use redis::Value;
use redtx_common::kv::{decode_ops, keys_of, Op};
use redtx_common::outage::Outages;
use redtx_common::scripts::{Call, LuaScript};
use redtx_common::{failpoint, keys, Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

/// Fail point: on a data cluster, a round of a batch's calls ran (e.g. every group prepared or
/// committed) and the next (their home barriers) is not sent yet.
pub const BETWEEN_ROUNDS: &str = "participant-between-rounds";

/// What one transition's flow ends with.
type Res = std::result::Result<Applied, String>;
/// One round's script calls of a flow, each with the slot of its keys.
type Ask = Vec<(u16, Call)>;
/// Their replies, in order.
type Replies = Vec<redis::RedisResult<Value>>;
/// A transition's flow.
type Flow<'f> = Pin<Box<dyn Future<Output = Res> + Send + 'f>>;

/// A branch's keys (and ops) that lie in one slot, in first-use order.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Group {
    /// The slot.
    pub slot: u16,
    /// The keys, in first-use order.
    pub keys: Vec<String>,
    /// The ops on them, in order (none when the group was rebuilt from keys alone).
    pub ops: Vec<Op>,
}

/// `ops` grouped by the slot of their key, the groups in the order of their first op.
pub(super) fn groups_of_ops(ops: &[Op]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for op in ops {
        let slot = keys::slot(op.key());
        let at = match groups.iter().position(|g| g.slot == slot) {
            Some(at) => at,
            None => {
                groups.push(Group { slot, keys: Vec::new(), ops: Vec::new() });
                groups.len() - 1
            }
        };
        groups[at].ops.push(op.clone());
    }
    for g in &mut groups {
        g.keys = keys_of(&g.ops);
    }
    groups
}

/// A branch's `keys` (in first-use order, as its home barrier records them) grouped by slot:
/// the same groups, with the same keys in the same order, as [`groups_of_ops`] of its ops.
pub(super) fn groups_of_keys(keys: &[String]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for k in keys {
        let slot = keys::slot(k);
        match groups.iter_mut().find(|g| g.slot == slot) {
            Some(g) => g.keys.push(k.clone()),
            None => groups.push(Group { slot, keys: vec![k.clone()], ops: Vec::new() }),
        }
    }
    groups
}

/// A script's reply as a flow reads it. Unlike [`Applied`], a state here may be `running`,
/// which only a home barrier holds and the runtime never sees.
#[derive(Debug, Clone, PartialEq)]
enum Reply {
    /// The transition happened: the barrier is now `state`.
    Done { state: String, reason: Option<String> },
    /// The barrier is `state` ("" = none), not as expected; nothing changed.
    Moved { state: String, reason: Option<String>, deadline: Option<u64>, keys: Vec<String> },
    /// A key is locked by a 2PC branch (saga steps); nothing changed.
    Busy(String),
}

impl Reply {
    /// The barrier's state after the call, whatever the code.
    fn state(&self) -> &str {
        match self {
            Reply::Done { state, .. } | Reply::Moved { state, .. } => state,
            Reply::Busy(_) => "",
        }
    }

    fn reason(&self) -> Option<String> {
        match self {
            Reply::Done { reason, .. } | Reply::Moved { reason, .. } => reason.clone(),
            Reply::Busy(why) => Some(why.clone()),
        }
    }
}

/// Reads reply `r` of a call of `script`; `Err` names the failure (a Redis error, the script
/// refusing the transition, a reply it should not give).
fn read(script: &LuaScript, at: &str, r: redis::RedisResult<Value>) -> std::result::Result<Reply, String> {
    let v = r.map_err(|e| Error::redis(at, e).to_string())?;
    let bad = || Error::ScriptReply { script: script.name, detail: format!("{v:?}") }.to_string();
    let Value::Array(items) = &v else { return Err(bad()) };
    let bytes = |i: usize| -> Option<Vec<u8>> {
        match items.get(i)? {
            Value::BulkString(b) => Some(b.clone()),
            Value::SimpleString(s) => Some(s.clone().into_bytes()),
            Value::Int(n) => Some(n.to_string().into_bytes()),
            _ => None,
        }
    };
    let text = |i: usize| bytes(i).map(|b| String::from_utf8_lossy(&b).into_owned()).filter(|s| !s.is_empty());
    let code = text(0).and_then(|c| c.parse::<i64>().ok()).and_then(super::ScriptCode::from_i64).ok_or_else(bad)?;
    Ok(match code {
        super::ScriptCode::Done => Reply::Done { state: text(1).ok_or_else(bad)?, reason: text(2) },
        super::ScriptCode::Moved => Reply::Moved {
            state: text(1).unwrap_or_default(),
            reason: text(2),
            deadline: text(3).map(|d| d.parse().map_err(|_| bad())).transpose()?,
            keys: bytes(4).filter(|b| !b.is_empty()).and_then(|b| rmp_serde::from_slice(&b).ok()).unwrap_or_default(),
        },
        super::ScriptCode::Busy => Reply::Busy(text(1).ok_or_else(bad)?),
        super::ScriptCode::Failed => {
            return Err(Error::ScriptFailed { script: script.name, detail: text(1).unwrap_or_default() }.to_string())
        }
    })
}

/// A barrier state the runtime knows, or an error for `running` (a saga step's action under
/// way: the request stays pending and comes back once it settled) or anything else.
fn known(state: &str) -> std::result::Result<BarrierState, String> {
    BarrierState::parse(state).ok_or_else(|| match state {
        "running" => "the branch's saga action is under way; retried".to_string(),
        other => format!("unexpected barrier state {other:?}"),
    })
}

/// What the runtime is told about a home barrier's reply.
fn settled(home: Reply) -> Res {
    Ok(match home {
        Reply::Done { state, reason } => Applied::Done { state: known(&state)?, reason },
        Reply::Moved { state, .. } if state.is_empty() => Applied::Moved(None),
        Reply::Moved { state, reason, deadline, .. } => {
            Applied::Moved(Some(Barrier { state: known(&state)?, reason, deadline_ms: deadline }))
        }
        Reply::Busy(why) => Applied::Busy(why),
    })
}

/// A home barrier as read before a flow starts (`HMGET state reason deadline keys`).
#[derive(Debug, Clone, Default)]
struct HomeRead {
    state: String,
    reason: Option<String>,
    deadline: Option<u64>,
    keys: Vec<String>,
}

impl HomeRead {
    fn moved(self) -> Reply {
        Reply::Moved { state: self.state, reason: self.reason, deadline: self.deadline, keys: self.keys }
    }
}

/// The lock-step rounds of one batch (see the module doc).
#[derive(Default)]
struct Rounds {
    /// Asked for the coming round, by flow.
    asks: Mutex<Vec<(usize, Ask)>>,
    /// Answered, by flow, until the flow takes them.
    answers: Mutex<HashMap<usize, Replies>>,
}

/// A flow's handle on the rounds.
#[derive(Clone, Copy)]
struct Io<'r> {
    rounds: &'r Rounds,
    flow: usize,
}

impl<'r> Io<'r> {
    /// Sends `calls` in the next round; their replies, in order.
    fn round(self, calls: Ask) -> RoundFuture<'r> {
        RoundFuture { io: self, calls: Some(calls) }
    }
}

/// Resolves once the driver answered the flow's round.
struct RoundFuture<'r> {
    io: Io<'r>,
    calls: Option<Ask>,
}

impl Future for RoundFuture<'_> {
    type Output = Replies;

    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Replies> {
        if let Some(calls) = self.calls.take() {
            if calls.is_empty() {
                return Poll::Ready(Vec::new());
            }
            self.io.rounds.asks.lock().expect("rounds").push((self.io.flow, calls));
            return Poll::Pending;
        }
        match self.io.rounds.answers.lock().expect("rounds").remove(&self.io.flow) {
            Some(replies) => Poll::Ready(replies),
            None => Poll::Pending,
        }
    }
}

/// The driver polls the flows itself after every round: wakeups are not needed.
struct NoWake;

impl Wake for NoWake {
    fn wake(self: Arc<Self>) {}
}

/// What every flow of a batch shares: who we are and where the data is.
struct Ctx {
    name: String,
    /// The data cluster, redacted, for error messages.
    shown: String,
    retention: Duration,
    partitions: u32,
}

/// How a group stands, as far as a 2PC flow knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// No barrier.
    Empty,
    /// Prepared by this branch.
    Prepared,
    /// Finished (refused, aborted, committed) or not ours to touch.
    Final,
    /// Not known.
    Unknown,
}

/// How many rounds [`Ctx::release`] tries before it leaves the request pending.
const RELEASE_ROUNDS: usize = 3;

impl Ctx {
    fn expected<'t>(t: &'t Transition<'_>) -> &'t str {
        t.expect.map(BarrierState::as_str).unwrap_or("")
    }

    /// The slot and key of `t`'s home barrier.
    fn home(&self, t: &Transition<'_>) -> (u16, String) {
        let txn = t.request.txn();
        let p = keys::partition(txn, self.partitions);
        (keys::partition_slot(p), keys::home_barrier(p, &self.name, txn))
    }

    /// `mark.lua` on `t`'s home barrier: from `expected` to `to`, recording `reason`,
    /// `deadline` and the branch's `keys` when given.
    fn mark_home(
        &self,
        t: &Transition<'_>,
        expected: &str,
        to: &str,
        reason: &str,
        deadline: &str,
        keys: Option<&[String]>,
    ) -> (u16, Call) {
        let (slot, bar) = self.home(t);
        let blob = keys.map(|k| rmp_serde::to_vec(k).expect("keys encode")).unwrap_or_default();
        let call = self.base(&MARK, bar, t, &[], expected).arg(to).arg(reason).arg(deadline).arg(blob);
        (slot, call)
    }

    /// `mark.lua` on a group's barrier `bar` (no keys): a tombstone from none to `to`.
    fn mark_group(&self, t: &Transition<'_>, slot: u16, bar: String, to: &str, reason: &str) -> (u16, Call) {
        (slot, self.base(&MARK, bar, t, &[], "").arg(to).arg(reason).arg("").arg(""))
    }

    fn base(
        &self,
        script: &'static LuaScript,
        bar: String,
        t: &Transition<'_>,
        keys: &[String],
        expected: &str,
    ) -> Call {
        let txn = t.request.txn();
        base(script, bar, keys::cluster_lock, &self.name, txn, keys, expected, t.now_ms, self.retention)
    }

    fn group_barrier(&self, t: &Transition<'_>, g: &Group) -> String {
        keys::group_barrier(g.slot, &self.name, t.request.txn())
    }

    /// The ops of `t`'s payload, or the refusal naming what is wrong with it.
    fn decode(&self, t: &Transition<'_>, what: &str) -> std::result::Result<Vec<Op>, String> {
        decode_ops(t.request.payload(), "payload").map_err(|e| format!("{}: invalid {what}: {e}", self.name))
    }

    /// One call in a round of its own; its reply.
    async fn one(&self, io: Io<'_>, (slot, call): (u16, Call)) -> std::result::Result<Reply, String> {
        let script = call.script();
        let r = io.round(vec![(slot, call)]).await.pop().expect("one reply per call");
        read(script, &self.shown, r)
    }

    /// Why a saga step whose keys span `groups` cannot run on this cluster.
    fn spans_slots(&self, what: &str, groups: &[Group]) -> String {
        let shown: Vec<String> = groups
            .iter()
            .take(4)
            .map(|g| {
                let more = if g.keys.len() > 2 { format!(" and {} more", g.keys.len() - 2) } else { String::new() };
                format!("{}{more} in slot {}", g.keys.iter().take(2).cloned().collect::<Vec<_>>().join(", "), g.slot)
            })
            .collect();
        format!(
            "{}: this saga step's {what} writes keys in {} slots of the data's Redis Cluster ({}), and a step \
             is applied atomically in one slot: give its keys one hash tag, e.g. {{order-7}}:stock and \
             {{order-7}}:sold",
            self.name,
            groups.len(),
            shown.join("; ")
        )
    }

    // ---------------------------------------------------------------------------------------
    // 2PC

    /// Try: every group prepared, then the home barrier decides (see the module doc).
    async fn prepare(&self, io: Io<'_>, t: &Transition<'_>, deadline_ms: u64) -> Res {
        let deadline = deadline_ms.to_string();
        let expected = Self::expected(t);
        let ops = match self.decode(t, "payload") {
            Ok(ops) => ops,
            Err(refusal) => {
                return settled(self.one(io, self.mark_home(t, expected, "refused", &refusal, &deadline, None)).await?)
            }
        };
        let groups = groups_of_ops(&ops);
        let calls = groups
            .iter()
            .map(|g| {
                let call = self.base(&PREPARE, self.group_barrier(t, g), t, &g.keys, "").arg(&deadline).arg("");
                (g.slot, with_ops(call, &g.keys, &g.ops))
            })
            .collect();
        let replies = io.round(calls).await;
        let mut seen = Vec::with_capacity(groups.len());
        let mut refusal: Option<String> = None;
        let mut failed: Option<String> = None;
        for (g, r) in groups.iter().zip(replies) {
            let reply = match read(&PREPARE, &self.shown, r) {
                Ok(reply) => reply,
                Err(e) => {
                    failed.get_or_insert(format!("slot {}: {e}", g.slot));
                    seen.push(Seen::Unknown);
                    continue;
                }
            };
            seen.push(match &reply {
                Reply::Done { state, .. } if state == "prepared" => Seen::Prepared,
                Reply::Moved { state, deadline, .. } if state == "prepared" => {
                    if *deadline == Some(deadline_ms) {
                        Seen::Prepared
                    } else {
                        refusal.get_or_insert(format!(
                            "{}: an earlier transaction with this id still holds {}",
                            self.name,
                            g.keys.join(", ")
                        ));
                        Seen::Final
                    }
                }
                // Committed: the branch was prepared and its commit ran here; the home barrier
                // is `prepared` or `committed` (it is written after the groups) and answers.
                Reply::Moved { state, .. } if state == "committed" => Seen::Final,
                other => {
                    let why = other.reason().unwrap_or_else(|| format!("{}: transaction was aborted", self.name));
                    refusal.get_or_insert(why);
                    Seen::Final
                }
            });
        }
        if let Some(e) = failed {
            // Unknown groups: the request stays pending, and the rerun takes it from here.
            return Err(e);
        }
        let home = match &refusal {
            None => self.mark_home(t, expected, "prepared", "", &deadline, Some(&keys_of(&ops))),
            Some(why) => {
                self.release(io, t, &groups, seen.clone()).await?;
                seen = vec![Seen::Final; groups.len()];
                self.mark_home(t, expected, "refused", why, &deadline, None)
            }
        };
        let home = self.one(io, home).await?;
        if matches!(home.state(), "refused" | "aborted") {
            self.release(io, t, &groups, seen).await?;
        }
        settled(home)
    }

    /// Makes sure no group of the branch is left prepared or empty: prepared ones are aborted,
    /// empty ones get an `aborted` tombstone.
    async fn release(
        &self,
        io: Io<'_>,
        t: &Transition<'_>,
        groups: &[Group],
        mut seen: Vec<Seen>,
    ) -> std::result::Result<(), String> {
        let reason = format!("{}: transaction was aborted", self.name);
        for _ in 0..RELEASE_ROUNDS {
            let todo: Vec<(usize, (u16, Call))> = groups
                .iter()
                .enumerate()
                .filter_map(|(i, g)| match seen[i] {
                    Seen::Prepared => {
                        Some((i, (g.slot, self.base(&ABORT, self.group_barrier(t, g), t, &g.keys, "prepared"))))
                    }
                    Seen::Empty | Seen::Unknown => {
                        Some((i, self.mark_group(t, g.slot, self.group_barrier(t, g), "aborted", &reason)))
                    }
                    Seen::Final => None,
                })
                .collect();
            if todo.is_empty() {
                return Ok(());
            }
            let (at, calls): (Vec<usize>, Ask) = todo.into_iter().unzip();
            let scripts: Vec<&'static LuaScript> = calls.iter().map(|(_, c)| c.script()).collect();
            let replies = io.round(calls).await;
            for ((i, script), r) in at.into_iter().zip(scripts).zip(replies) {
                seen[i] = match read(script, &self.shown, r)? {
                    Reply::Moved { state, .. } if state == "prepared" => Seen::Prepared,
                    Reply::Moved { state, .. } if state.is_empty() => Seen::Empty,
                    _ => Seen::Final,
                };
            }
        }
        Err(format!("{}: the branch's groups kept changing while being released; retrying later", self.name))
    }

    /// A prepare past its deadline (Mark `refused`): the home barrier first, then the groups
    /// released (see the module doc).
    async fn refuse_late(&self, io: Io<'_>, t: &Transition<'_>, deadline_ms: u64, reason: &str) -> Res {
        let deadline = deadline_ms.to_string();
        let home = self.one(io, self.mark_home(t, Self::expected(t), "refused", reason, &deadline, None)).await?;
        if matches!(home.state(), "refused" | "aborted") {
            if let Ok(ops) = self.decode(t, "payload") {
                let groups = groups_of_ops(&ops);
                self.release(io, t, &groups, vec![Seen::Unknown; groups.len()]).await?;
            }
        }
        settled(home)
    }

    /// Confirm or Cancel of a prepared branch: every group, then the home barrier. The keys
    /// are `keys` (cached: this process saw the branch prepared), else read with the home
    /// barrier in `home`, which must then be in the expected state (else nothing changes).
    async fn finish(&self, io: Io<'_>, t: &Transition<'_>, keys: Option<Vec<String>>, home: Option<HomeRead>) -> Res {
        let commit = t.work == Work::Confirm;
        let keys = match (home, keys) {
            (Some(h), _) if h.state != Self::expected(t) => return settled(h.moved()),
            (_, Some(keys)) => keys,
            (Some(h), None) if !h.keys.is_empty() => h.keys,
            (Some(_), None) => return Err(format!("{}: the prepared home barrier records no keys", self.name)),
            (None, None) => return Err("internal: the home barrier was not read".into()),
        };
        let (script, want) = if commit { (&COMMIT, "committed") } else { (&ABORT, "aborted") };
        let groups = groups_of_keys(&keys);
        let calls = groups
            .iter()
            .map(|g| (g.slot, self.base(script, self.group_barrier(t, g), t, &g.keys, "prepared")))
            .collect();
        let replies = io.round(calls).await;
        for (g, r) in groups.iter().zip(replies) {
            let reply = read(script, &self.shown, r).map_err(|e| format!("slot {}: {e}", g.slot))?;
            match reply {
                Reply::Done { .. } => {}
                Reply::Moved { ref state, .. } if state == want => {}
                other => {
                    return Err(format!(
                        "{}: the barrier of {} (slot {}) is {:?}, not prepared, while the branch is; \
                         was the data Redis's data lost?",
                        self.name,
                        g.keys.join(", "),
                        g.slot,
                        other.state()
                    ))
                }
            }
        }
        let reason = if commit { String::new() } else { format!("{}: transaction was aborted", self.name) };
        settled(self.one(io, self.mark_home(t, Self::expected(t), want, &reason, "", None)).await?)
    }

    /// A barrier-only change of the home barrier (Mark); a compensation that finds the action
    /// `running` settles it first.
    async fn mark(&self, io: Io<'_>, t: &Transition<'_>, to: BarrierState, reason: Option<&str>) -> Res {
        let home = self.mark_home(t, Self::expected(t), to.as_str(), reason.unwrap_or(""), "", None);
        let home = self.one(io, home).await?;
        match home {
            Reply::Moved { state, keys, .. } if state == "running" && matches!(t.request, Request::Compensate(_)) => {
                Ok(Applied::Moved(Some(self.settle_running(io, t, &keys).await?)))
            }
            other => settled(other),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Sagas

    /// Action: the home barrier `running`, the action in its slot, the home barrier records the
    /// result (see the module doc).
    async fn action(&self, io: Io<'_>, t: &Transition<'_>) -> Res {
        let expected = Self::expected(t);
        let ops = match self.decode(t, "payload") {
            Ok(ops) => ops,
            Err(refusal) => {
                return settled(self.one(io, self.mark_home(t, expected, "failed", &refusal, "", None)).await?)
            }
        };
        let groups = groups_of_ops(&ops);
        let [g] = groups.as_slice() else {
            let why = self.spans_slots("action", &groups);
            return settled(self.one(io, self.mark_home(t, expected, "failed", &why, "", None)).await?);
        };
        let home = self.one(io, self.mark_home(t, expected, "running", "", "", Some(&g.keys))).await?;
        if home.state() != "running" {
            return settled(home);
        }
        let call = self.base(&EXECUTE, self.group_barrier(t, g), t, &g.keys, "").arg("");
        let step = self.one(io, (g.slot, with_ops(call, &g.keys, &g.ops))).await?;
        let (to, reason) = match &step {
            Reply::Busy(why) => return Ok(Applied::Busy(why.clone())),
            Reply::Done { state, reason } | Reply::Moved { state, reason, .. }
                if matches!(state.as_str(), "done" | "failed" | "compensated") =>
            {
                (state.clone(), reason.clone())
            }
            other => return Err(format!("{}: the action's barrier is {:?}", self.name, other.state())),
        };
        let home = self.one(io, self.mark_home(t, "running", &to, reason.as_deref().unwrap_or(""), "", None)).await?;
        match home {
            // A compensation settled the step first: the action did not run.
            Reply::Done { state, reason } if state == "compensated" => {
                Ok(Applied::Moved(Some(Barrier { state: BarrierState::Compensated, reason, deadline_ms: None })))
            }
            other => settled(other),
        }
    }

    /// A compensation found the home barrier `running` with the action's `keys`: settles the
    /// step (the action's tombstone if it has not run, else its result) and returns the home
    /// barrier as it ends.
    async fn settle_running(
        &self,
        io: Io<'_>,
        t: &Transition<'_>,
        keys: &[String],
    ) -> std::result::Result<Barrier, String> {
        let groups = groups_of_keys(keys);
        let [g] = groups.as_slice() else {
            return Err(format!("{}: a running step's home barrier names {} slots", self.name, groups.len()));
        };
        let null = null_compensation(&self.name);
        let step = self.one(io, self.mark_group(t, g.slot, self.group_barrier(t, g), "compensated", &null)).await?;
        let (to, reason) = match &step {
            Reply::Done { .. } => ("compensated".to_string(), Some(null)),
            Reply::Moved { state, reason, .. } if matches!(state.as_str(), "done" | "failed" | "compensated") => {
                (state.clone(), reason.clone())
            }
            other => return Err(format!("{}: the action's barrier is {:?}", self.name, other.state())),
        };
        let home = self.one(io, self.mark_home(t, "running", &to, reason.as_deref().unwrap_or(""), "", None)).await?;
        match home {
            Reply::Done { state, reason } | Reply::Moved { state, reason, .. } if !state.is_empty() => {
                Ok(Barrier { state: known(&state)?, reason, deadline_ms: None })
            }
            other => Err(format!("{}: the home barrier vanished while settling a running step: {other:?}", self.name)),
        }
    }

    /// Compensation of a `done` action (`home` read before): the compensation in its slot,
    /// then the home barrier `compensated`.
    async fn compensation(&self, io: Io<'_>, t: &Transition<'_>, home: Option<HomeRead>) -> Res {
        let Some(home) = home else { return Err("internal: the home barrier was not read".into()) };
        if home.state == "running" {
            return Ok(Applied::Moved(Some(self.settle_running(io, t, &home.keys).await?)));
        }
        if home.state != Self::expected(t) {
            return settled(home.moved());
        }
        let ops = match self.decode(t, "compensation payload") {
            Ok(ops) => ops,
            Err(refusal) => return Ok(Applied::Done { state: BarrierState::Done, reason: Some(refusal) }),
        };
        let groups = groups_of_ops(&ops);
        let [g] = groups.as_slice() else {
            let why = self.spans_slots("compensation", &groups);
            return Ok(Applied::Done { state: BarrierState::Done, reason: Some(why) });
        };
        let bar = keys::undo_barrier(g.slot, &self.name, t.request.txn());
        let call = self.base(&COMPENSATE, bar, t, &g.keys, "").arg("");
        match self.one(io, (g.slot, with_ops(call, &g.keys, &g.ops))).await? {
            Reply::Done { state, .. } | Reply::Moved { state, .. } if state == "compensated" => {}
            Reply::Done { state, reason } if state == "done" => {
                return Ok(Applied::Done { state: BarrierState::Done, reason })
            }
            Reply::Busy(why) => return Ok(Applied::Busy(why)),
            other => return Err(format!("{}: the compensation's barrier is {:?}", self.name, other.state())),
        }
        settled(self.one(io, self.mark_home(t, Self::expected(t), "compensated", "", "", None)).await?)
    }

    /// The flow of transition `t` (`keys`: its branch's cached keys; `home`: its home barrier,
    /// when read before).
    async fn flow(&self, io: Io<'_>, t: &Transition<'_>, keys: Option<Vec<String>>, home: Option<HomeRead>) -> Res {
        match (&t.work, t.request) {
            (Work::Try, Request::Prepare(p)) => self.prepare(io, t, p.deadline_ms).await,
            (Work::Mark { to: BarrierState::Refused, reason }, Request::Prepare(p)) => {
                self.refuse_late(io, t, p.deadline_ms, reason.as_deref().unwrap_or("")).await
            }
            (Work::Confirm | Work::Cancel, _) => self.finish(io, t, keys, home).await,
            (Work::Action, _) => self.action(io, t).await,
            (Work::Compensation, _) => self.compensation(io, t, home).await,
            (Work::Mark { to, reason }, _) => self.mark(io, t, *to, reason.as_deref()).await,
            (Work::Try, _) => Err(format!("a {} cannot be prepared", t.request.kind())),
        }
    }
}

impl KvResource {
    /// [`Resource::apply`](crate::resource::Resource::apply) on a Redis Cluster: one flow per
    /// transition, run in lock-step rounds (see the [module doc](self)).
    pub(super) async fn apply_cluster(&mut self, batch: &[Transition<'_>]) -> Result<Vec<Res>> {
        // Home barriers needed before a flow starts: the keys of a branch to commit or abort
        // that this process did not see prepared, and the state of a step to compensate.
        let reads: Vec<usize> = (0..batch.len())
            .filter(|&i| match batch[i].work {
                Work::Confirm | Work::Cancel => {
                    batch[i].expect != Some(BarrierState::Prepared)
                        || !self.prepared_keys.contains_key(batch[i].request.txn())
                }
                Work::Compensation => true,
                _ => false,
            })
            .collect();
        let (mut homes, mut unread) = self.read_homes(batch, &reads).await?;
        let ctx = Ctx {
            name: self.name.clone(),
            shown: self.target.redacted().to_string(),
            retention: self.retention,
            partitions: self.partitions,
        };
        let rounds = Rounds::default();
        let flows: Vec<Flow<'_>> = batch
            .iter()
            .enumerate()
            .map(|(i, t)| -> Flow<'_> {
                if let Some(e) = self.misaddressed(t) {
                    return Box::pin(std::future::ready(Err(e)));
                }
                // Its home barrier's slot did not answer: it fails alone, and stays pending.
                if let Some(e) = unread.remove(&i) {
                    return Box::pin(std::future::ready(Err(e)));
                }
                let keys = self.prepared_keys.get(t.request.txn()).cloned();
                let home = homes.remove(&i);
                let (ctx, io) = (&ctx, Io { rounds: &rounds, flow: i });
                Box::pin(async move { ctx.flow(io, t, keys, home).await })
            })
            .collect();
        let out = self.drive(&rounds, flows).await?;
        for (t, applied) in batch.iter().zip(&out) {
            let keys = match t.work {
                Work::Try => decode_ops(t.request.payload(), "payload").map(|ops| keys_of(&ops)).unwrap_or_default(),
                _ => Vec::new(),
            };
            self.remember(t, keys, applied);
        }
        Ok(out)
    }

    /// Runs `flows` in lock-step rounds until each has ended.
    async fn drive(&mut self, rounds: &Rounds, mut flows: Vec<Flow<'_>>) -> Result<Vec<Res>> {
        let waker = Waker::from(Arc::new(NoWake));
        let mut out: Vec<Option<Res>> = vec![None; flows.len()];
        for round in 0.. {
            {
                let mut cx = Context::from_waker(&waker);
                for (i, f) in flows.iter_mut().enumerate() {
                    if out[i].is_none() {
                        if let Poll::Ready(r) = f.as_mut().poll(&mut cx) {
                            out[i] = Some(r);
                        }
                    }
                }
            }
            let asks = std::mem::take(&mut *rounds.asks.lock().expect("rounds"));
            for (i, o) in out.iter_mut().enumerate() {
                if o.is_none() && !asks.iter().any(|(f, _)| *f == i) {
                    // A flow awaited something other than a round: a bug, never a hang.
                    *o = Some(Err("internal: a key-value flow stalled".into()));
                }
            }
            if asks.is_empty() {
                break;
            }
            if round > 0 {
                failpoint::hit(BETWEEN_ROUNDS).await;
            }
            let calls: Vec<(u16, Call)> = asks.iter().flat_map(|(_, a)| a.iter().cloned()).collect();
            let mut replies = self.run_batched(&calls).await?.into_iter();
            let mut answers = rounds.answers.lock().expect("rounds");
            for (flow, ask) in asks {
                answers.insert(flow, replies.by_ref().take(ask.len()).collect());
            }
        }
        Ok(out.into_iter().map(|o| o.expect("every flow ended")).collect())
    }

    /// The home barriers of transitions `at` of `batch`, read in one pipeline per slot; and,
    /// for the transitions whose slot did not answer (or is out of reach, see
    /// [`KvResource::run_batched`]), why: they fail alone and the others go on.
    async fn read_homes(
        &mut self,
        batch: &[Transition<'_>],
        at: &[usize],
    ) -> Result<(HashMap<usize, HomeRead>, HashMap<usize, String>)> {
        let mut unread = HashMap::new();
        if at.is_empty() {
            return Ok((HashMap::new(), unread));
        }
        let mut by_slot: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for &i in at {
            let p = keys::partition(batch[i].request.txn(), self.partitions);
            by_slot.entry(keys::partition_slot(p)).or_default().push(i);
        }
        let pipes: Vec<redis::Pipeline> = by_slot
            .values()
            .map(|list| {
                let mut pipe = redis::pipe();
                for &i in list {
                    let txn = batch[i].request.txn();
                    let p = keys::partition(txn, self.partitions);
                    pipe.cmd("HMGET")
                        .arg(keys::home_barrier(p, &self.name, txn))
                        .arg(&["state", "reason", "deadline", "keys"]);
                }
                pipe
            })
            .collect();
        let target = self.target.clone();
        let out_slots = self.outages.as_ref().map(Outages::out).unwrap_or_default();
        let (mut asked, mut pipes_asked) = (Vec::new(), Vec::new());
        for ((slot, list), pipe) in by_slot.iter().zip(pipes) {
            if out_slots.contains(&u32::from(*slot)) {
                for &i in list {
                    unread.insert(i, format!("slot {slot}: its master does not answer; retried once it does"));
                }
            } else {
                asked.push((*slot, list));
                pipes_asked.push(pipe);
            }
        }
        let replies = self.conn().await?.query_each::<Vec<Vec<Option<Vec<u8>>>>>(pipes_asked).await;
        let mut out = HashMap::new();
        for ((slot, list), reply) in asked.into_iter().zip(replies) {
            let rows = match reply {
                Ok(rows) => rows,
                // A slot that did not answer (its master down, frozen, or failing over): its
                // transitions fail alone, and it is skipped until it answers if it timed out.
                Err(e) if super::unreached(&e) => {
                    if e.is_timeout() {
                        let i = list[0];
                        let p = keys::partition(batch[i].request.txn(), self.partitions);
                        let key = keys::home_barrier(p, &self.name, batch[i].request.txn());
                        self.out_of_reach(slot, key.into_bytes()).await;
                    }
                    let why = Error::redis(&target, e).to_string();
                    for &i in list {
                        unread.insert(i, format!("slot {slot}: {why}"));
                    }
                    continue;
                }
                Err(e) => return Err(Error::redis(&target, e)),
            };
            for (&i, row) in list.iter().zip(rows) {
                let text = |j: usize| {
                    row.get(j)
                        .cloned()
                        .flatten()
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .filter(|s| !s.is_empty())
                };
                out.insert(
                    i,
                    HomeRead {
                        state: text(0).unwrap_or_default(),
                        reason: text(1),
                        deadline: text(2).and_then(|d| d.parse().ok()),
                        keys: row
                            .get(3)
                            .cloned()
                            .flatten()
                            .and_then(|b| rmp_serde::from_slice(&b).ok())
                            .unwrap_or_default(),
                    },
                );
            }
        }
        Ok((out, unread))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_slots_in_first_use_order() {
        let a = "{x}a".to_string();
        let b = "{y}b".to_string();
        let ops = vec![Op::incrby(&a, 1), Op::incrby(&b, 2), Op::incrby("{x}c", 3), Op::incrby(&a, 4)];
        let groups = groups_of_ops(&ops);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].slot, keys::slot("x"));
        assert_eq!(groups[0].keys, vec![a.clone(), "{x}c".to_string()]);
        assert_eq!(groups[0].ops.len(), 3);
        assert_eq!(groups[1].keys, vec![b.clone()]);
        // Rebuilt from the keys a home barrier records: the same groups, keys in the same order.
        let again = groups_of_keys(&keys_of(&ops));
        assert_eq!(
            again.iter().map(|g| (g.slot, g.keys.clone())).collect::<Vec<_>>(),
            groups.iter().map(|g| (g.slot, g.keys.clone())).collect::<Vec<_>>()
        );
    }

    #[test]
    fn replies_are_read_with_their_keys() {
        let keys = rmp_serde::to_vec(&vec!["a".to_string(), "b{c}".to_string()]).unwrap();
        let moved = Value::Array(vec![
            Value::Int(2),
            Value::BulkString(b"running".to_vec()),
            Value::BulkString(Vec::new()),
            Value::BulkString(b"12".to_vec()),
            Value::BulkString(keys),
        ]);
        let r = read(&MARK, "x", Ok(moved)).unwrap();
        assert_eq!(
            r,
            Reply::Moved {
                state: "running".into(),
                reason: None,
                deadline: Some(12),
                keys: vec!["a".into(), "b{c}".into()]
            }
        );
        assert!(settled(r).unwrap_err().contains("under way"));
        let done = Value::Array(vec![
            Value::Int(1),
            Value::BulkString(b"refused".to_vec()),
            Value::BulkString(b"why".to_vec()),
        ]);
        assert_eq!(
            settled(read(&PREPARE, "x", Ok(done)).unwrap()).unwrap(),
            Applied::Done { state: BarrierState::Refused, reason: Some("why".into()) }
        );
        let failed = Value::Array(vec![Value::Int(0), Value::BulkString(b"boom".to_vec())]);
        assert!(read(&COMMIT, "x", Ok(failed)).unwrap_err().contains("boom"));
        assert!(read(&COMMIT, "x", Ok(Value::Int(3))).is_err());
    }
}
