//! Partition ownership: leases with fencing tokens, membership, and how partitions are spread.
//!
//! A partition has at most one owner: the coordinator holding `rtx:lease:{P}`, a string
//! `<token>:<owner>` with a time to live (`--lease`). Acquiring takes the next token from
//! `rtx:epoch:{P}`, so a lease is never handed out twice with the same value. The owner renews it
//! every third of its life; every write it makes presents the value to `fenced.lua`, which
//! refuses the write once the lease has lapsed or moved. An owner frozen past its lease
//! (`SIGSTOP`, a long GC-like pause, a partition of the network) therefore writes nothing when
//! it wakes up, and steps down.
//!
//! Spreading: each coordinator refreshes its membership in `rtx:coordinators` (a sorted set
//! scored by when the membership lapses) and aims to own `ceil(partitions / live coordinators)`.
//! It acquires free partitions while it owns fewer, gives one up per round while it owns more,
//! and takes a free partition beyond its share only when it stayed free for a whole round (so
//! partitions of a dead owner never wait for the membership to lapse). [`plan`] is that rule,
//! pure.
//!
//! On a Redis Cluster every partition's lease and epoch are in the partition's slot
//! (`{P}`) and `rtx:coordinators` in a slot of its own: each lease script call names one
//! partition and is sent on its own ([`scripts::run_each`]), and [`survey`] asks about the
//! membership and each lease in separate commands, all at once.

use redtx_common::conn::{RedisConn, RedisTarget};
use redtx_common::scripts::{self, LuaScript};
use redtx_common::{keys, Error, Result};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// `lua/coordinator/lease_acquire.lua`.
pub static ACQUIRE: LuaScript =
    LuaScript::new("lease_acquire", include_str!("../../lua/coordinator/lease_acquire.lua"));
/// `lua/coordinator/lease_renew.lua`.
pub static RENEW: LuaScript = LuaScript::new("lease_renew", include_str!("../../lua/coordinator/lease_renew.lua"));
/// `lua/coordinator/lease_release.lua`.
pub static RELEASE: LuaScript =
    LuaScript::new("lease_release", include_str!("../../lua/coordinator/lease_release.lua"));

/// How long a partition must stay free before a coordinator at or above its share takes it.
pub const GRACE: std::time::Duration = std::time::Duration::from_millis(1000);

/// The fencing token of a lease value `<token>:<owner>`.
pub fn token(value: &str) -> Option<u64> {
    value.split_once(':')?.0.parse().ok()
}

/// Whether a lease acquired with token `now` shows that Redis lost the partition's keys: its
/// fencing counter never expires and only counts up, so a token not above one this process
/// held before (`held`) means the counter was lost (the keys of a slot deleted when its
/// ownership went back and forth, a `FLUSHALL`, a restart without persistence), and the
/// partition's records and streams with it.
pub fn counter_went_back(held: Option<u64>, now: u64) -> bool {
    held.is_some_and(|h| now <= h)
}

/// What one round of [`plan`] decides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Free partitions to try to acquire.
    pub acquire: Vec<u32>,
    /// Owned partitions to give up.
    pub release: Vec<u32>,
}

/// The spreading rule. `owned`: partitions this coordinator holds; `free`: partitions nobody
/// holds now; `free_long`: those free for at least [`GRACE`]; `live`: live coordinators (at
/// least 1, this one).
pub fn plan(
    partitions: u32,
    live: usize,
    owned: &BTreeSet<u32>,
    free: &BTreeSet<u32>,
    free_long: &BTreeSet<u32>,
) -> Plan {
    let share = (partitions as usize).div_ceil(live.max(1));
    let mut p = Plan::default();
    if owned.len() < share {
        p.acquire.extend(free.iter().take(share - owned.len()));
    }
    // Partitions left free for a while (their owner died and the others are full): take them
    // anyway; availability first, the share evens out later.
    for f in free.intersection(free_long) {
        if !p.acquire.contains(f) {
            p.acquire.push(*f);
        }
    }
    if owned.len() > share && free.is_empty() && live > 1 {
        p.release.extend(owned.iter().next_back());
    }
    p
}

/// A reply `{code, value}` of the lease scripts: `(code == 1, value)`.
fn reply(script: &'static str, v: &redis::Value) -> Result<(bool, String)> {
    let items = scripts::reply_strings(script, v)?;
    match items.as_slice() {
        [code, value] => Ok((code == "1", value.clone())),
        _ => Err(Error::ScriptReply { script, detail: format!("{items:?}") }),
    }
}

/// Tries to acquire the lease of each partition in `parts`; returns the acquired ones with their
/// lease values.
pub async fn acquire(
    conn: &mut RedisConn,
    url: &RedisTarget,
    me: &str,
    ttl_ms: u64,
    parts: &[u32],
) -> Result<Vec<(u32, String)>> {
    let calls: Vec<_> =
        parts.iter().map(|&p| ACQUIRE.call().key(keys::lease(p)).key(keys::epoch(p)).arg(me).arg(ttl_ms)).collect();
    let replies = scripts::run_each(conn, url, &calls).await?;
    let mut got = Vec::new();
    for (&p, r) in parts.iter().zip(replies) {
        let r = match r.map_err(|e| Error::redis(url, e)) {
            Ok(r) => r,
            // On a cluster, a partition whose master is unreachable is tried again next round.
            Err(e) if conn.is_cluster() && e.is_transient() => {
                tracing::debug!(partition = p, error = %e, "could not acquire the lease");
                continue;
            }
            Err(e) => return Err(e),
        };
        let (ok, value) = reply(ACQUIRE.name, &r)?;
        if ok {
            got.push((p, value));
        }
    }
    Ok(got)
}

/// Renews the given leases; returns, per partition, `Ok(None)` (renewed), `Ok(Some(holder))`
/// (lost: `holder` has it, "" for nobody) or the error of its call (on a cluster each
/// partition's call may fail alone).
pub async fn renew(
    conn: &mut RedisConn,
    url: &RedisTarget,
    ttl_ms: u64,
    held: &[(u32, String)],
) -> Result<Vec<(u32, Result<Option<String>>)>> {
    let calls: Vec<_> =
        held.iter().map(|(p, v)| RENEW.call().key(keys::lease(*p)).arg(v.as_str()).arg(ttl_ms)).collect();
    let replies = scripts::run_each(conn, url, &calls).await?;
    let mut out = Vec::with_capacity(held.len());
    for ((p, _), r) in held.iter().zip(replies) {
        let renewed = r
            .map_err(|e| Error::redis(url, e))
            .and_then(|v| reply(RENEW.name, &v))
            .map(|(ok, holder)| (!ok).then_some(holder));
        out.push((*p, renewed));
    }
    Ok(out)
}

/// Keeps this coordinator's leases renewed from a task of its own, on a connection of its own,
/// so that a loop held up by one partition (a call waiting out a master that does not answer,
/// a cluster connection refreshing its slot map) does not let the others' leases lapse.
///
/// The loop tells the keeper that it is alive ([`Keeper::beat`], once per pass) and what it
/// holds ([`Keeper::sync`], once its ownership round has acquired and released). The keeper renews every third of the lease's life, but only while the loop passed
/// within the last half of it: a loop that stopped making progress lets its leases lapse, and
/// its partitions move, about one and a half leases after its last pass at most. Safety does
/// not rest on this: every write is fenced by the lease value it presents. A lease found lost
/// is reported to the loop ([`Keeper::lost`]), which steps down.
pub struct Keeper {
    state: Arc<Mutex<KeeperState>>,
}

/// The partition number [`survey`] reports for the membership key (`rtx:coordinators`, in a
/// slot of its own) when its master does not answer.
pub const MEMBERSHIP: u32 = u32::MAX;

struct KeeperState {
    /// Partition -> lease value held.
    held: BTreeMap<u32, String>,
    /// When the loop last passed: the monotonic clock, so that a step of the wall clock
    /// (an NTP correction, a suspended VM) neither skips a renewal nor renews for a loop that
    /// stopped.
    beat: tokio::time::Instant,
    /// Leases found lost since the loop last asked: (partition, value held, holder now).
    lost: Vec<(u32, String, String)>,
    /// Partitions whose renewal is under way.
    renewing: BTreeSet<u32>,
    /// A fresh connection to renew on from now on ([`Keeper::replace_conn`]).
    new_conn: Option<RedisConn>,
}

impl Keeper {
    /// Starts the renewing task on `conn` (one that reconnects by itself). It ends when the
    /// keeper is dropped.
    pub fn start(conn: RedisConn, url: RedisTarget, ttl_ms: u64) -> Keeper {
        let state = Arc::new(Mutex::new(KeeperState {
            held: BTreeMap::new(),
            beat: tokio::time::Instant::now(),
            lost: Vec::new(),
            renewing: BTreeSet::new(),
            new_conn: None,
        }));
        tokio::spawn(keep(conn, url, ttl_ms, Arc::downgrade(&state)));
        Keeper { state }
    }

    /// The loop passed.
    pub fn beat(&self) {
        self.state.lock().expect("keeper lock").beat = tokio::time::Instant::now();
    }

    /// The loop passed and holds `held` (partition, lease value).
    pub fn sync(&self, held: impl IntoIterator<Item = (u32, String)>) {
        let mut s = self.state.lock().expect("keeper lock");
        s.held = held.into_iter().collect();
        s.beat = tokio::time::Instant::now();
    }

    /// Renews on `conn` from now on (a fresh cluster connection: the old one may still route a
    /// partition to a master that stopped answering and was replaced).
    pub fn replace_conn(&self, conn: RedisConn) {
        self.state.lock().expect("keeper lock").new_conn = Some(conn);
    }

    /// The leases found lost since the last call: (partition, value held, holder now, "" when
    /// it lapsed).
    pub fn lost(&self) -> Vec<(u32, String, String)> {
        std::mem::take(&mut self.state.lock().expect("keeper lock").lost)
    }
}

async fn keep(mut conn: RedisConn, url: RedisTarget, ttl_ms: u64, state: Weak<Mutex<KeeperState>>) {
    let every = Duration::from_millis((ttl_ms / 3).max(1));
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = state.upgrade() else { return };
        let mut s = shared.lock().expect("keeper lock");
        if let Some(c) = s.new_conn.take() {
            conn = c;
        }
        let idle = s.beat.elapsed().as_millis() as u64;
        if idle > ttl_ms / 2 {
            tracing::warn!(
                idle_ms = idle,
                "the coordinator's loop has not passed for half a lease: leases not renewed"
            );
            continue;
        }
        // Each partition on its own: one whose master does not answer holds up no other.
        let due: Vec<(u32, String)> =
            s.held.iter().filter(|(p, _)| !s.renewing.contains(p)).map(|(p, v)| (*p, v.clone())).collect();
        for (p, value) in due {
            s.renewing.insert(p);
            tokio::spawn(renew_one(conn.clone(), url.clone(), ttl_ms, p, value, state.clone()));
        }
    }
}

async fn renew_one(
    mut conn: RedisConn,
    url: RedisTarget,
    ttl_ms: u64,
    p: u32,
    value: String,
    state: Weak<Mutex<KeeperState>>,
) {
    let r = renew(&mut conn, &url, ttl_ms, &[(p, value.clone())]).await.and_then(|mut r| r.pop().expect("one reply").1);
    let Some(shared) = state.upgrade() else { return };
    let mut s = shared.lock().expect("keeper lock");
    s.renewing.remove(&p);
    match r {
        Ok(None) => {}
        Ok(Some(holder)) => s.lost.push((p, value, holder)),
        Err(e) => {
            tracing::warn!(partition = p, error = %e, "could not renew the lease of a partition; if it lapses, the fence refuses the partition's next write")
        }
    }
}

/// Gives up the lease of `p` if still held with `value`.
pub async fn release(conn: &mut RedisConn, url: &RedisTarget, p: u32, value: &str) -> Result<bool> {
    let v = RELEASE.call().key(keys::lease(p)).arg(value).run(conn, url).await?;
    Ok(reply(RELEASE.name, &v)?.0)
}

/// What [`survey`] found.
#[derive(Debug, Default)]
pub struct Survey {
    /// Live coordinators (at least 1); `None` when the membership's master did not answer (a
    /// cluster).
    pub live: Option<usize>,
    /// Partitions nobody holds.
    pub free: BTreeSet<u32>,
    /// Partitions whose master did not answer (a cluster): not counted free; and
    /// [`MEMBERSHIP`] when the membership's master did not.
    pub unreachable: Vec<u32>,
}

/// Refreshes this coordinator's membership, drops lapsed members, and reads which partitions
/// are free. On a cluster, the partitions in `skip` (known out of reach) are not asked and not
/// counted free, and neither is a partition whose master does not answer; with [`MEMBERSHIP`]
/// in `skip`, the membership is not asked either (the live coordinators are then unknown).
pub async fn survey(
    conn: &mut RedisConn,
    url: &RedisTarget,
    me: &str,
    now_ms: u64,
    ttl_ms: u64,
    partitions: u32,
    skip: &HashSet<u32>,
) -> Result<Survey> {
    let members = keys::coordinators();
    let mut p = redis::pipe();
    p.cmd("ZADD").arg(&members).arg(now_ms + ttl_ms).arg(me).ignore();
    p.cmd("ZREMRANGEBYSCORE").arg(&members).arg("-inf").arg(now_ms).ignore();
    p.cmd("ZCARD").arg(&members);
    if conn.is_cluster() {
        // Each lease is in its partition's slot, the membership in another: one pipeline per
        // slot, all sent at once.
        let asked: Vec<u32> = (0..partitions).filter(|part| !skip.contains(part)).collect();
        let members_asked = !skip.contains(&MEMBERSHIP);
        let mut pipes = vec![p];
        for part in &asked {
            let mut e = redis::pipe();
            e.cmd("EXISTS").arg(keys::lease(*part));
            pipes.push(e);
        }
        if !members_asked {
            pipes.remove(0);
        }
        let first = usize::from(!members_asked);
        let mut out = Survey::default();
        for (i, r) in conn.query_each::<Vec<u64>>(pipes).await.into_iter().enumerate() {
            let i = i + first;
            let r = match r.map_err(|e| Error::redis(url, e)) {
                Ok(r) => r,
                Err(e) if e.is_transient() => {
                    tracing::debug!(error = %e, "survey: a slot's master is unreachable");
                    out.unreachable.push(if i > 0 { asked[i - 1] } else { MEMBERSHIP });
                    continue;
                }
                Err(e) => return Err(e),
            };
            match (i, r.first()) {
                (0, Some(&n)) => out.live = Some((n as usize).max(1)),
                (i, Some(0)) if i > 0 => {
                    out.free.insert(asked[i - 1]);
                }
                _ => {}
            }
        }
        return Ok(out);
    }
    for part in 0..partitions {
        p.cmd("EXISTS").arg(keys::lease(part));
    }
    let out: Vec<u64> = p.query_async(conn).await.map_err(|e| Error::redis(url, e))?;
    let live = out[0] as usize;
    let free = out[1..].iter().enumerate().filter(|(_, &e)| e == 0).map(|(i, _)| i as u32).collect();
    Ok(Survey { live: Some(live.max(1)), free, unreachable: Vec::new() })
}

/// Leaves the membership (on a clean shutdown).
pub async fn leave(conn: &mut RedisConn, url: &RedisTarget, me: &str) -> Result<()> {
    let _: () = redis::cmd("ZREM")
        .arg(keys::coordinators())
        .arg(me)
        .query_async(conn)
        .await
        .map_err(|e| Error::redis(url, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_not_above_one_held_means_the_counter_went_back() {
        assert_eq!(token("7:host-1-ab"), Some(7));
        assert_eq!(token("x:host"), None);
        assert_eq!(token("7"), None);
        assert!(!counter_went_back(None, 1), "a first lease says nothing");
        assert!(!counter_went_back(Some(3), 4));
        assert!(counter_went_back(Some(3), 3));
        assert!(counter_went_back(Some(3), 1));
    }

    fn set(v: &[u32]) -> BTreeSet<u32> {
        v.iter().copied().collect()
    }

    #[test]
    fn a_lone_coordinator_takes_everything() {
        let p = plan(8, 1, &set(&[]), &set(&[0, 1, 2, 3, 4, 5, 6, 7]), &set(&[]));
        assert_eq!(p.acquire, vec![0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn a_newcomer_gets_its_share_from_a_full_owner() {
        // The old owner gives one up per round while above its share...
        let p = plan(8, 2, &set(&[0, 1, 2, 3, 4, 5, 6, 7]), &set(&[]), &set(&[]));
        assert_eq!(p.release, vec![7]);
        // ...and does not take it back at once, while the newcomer (below its share) does.
        let old = plan(8, 2, &set(&[0, 1, 2, 3, 4, 5, 6]), &set(&[7]), &set(&[]));
        assert!(old.acquire.is_empty());
        let new = plan(8, 2, &set(&[]), &set(&[7]), &set(&[]));
        assert_eq!(new.acquire, vec![7]);
    }

    #[test]
    fn partitions_left_free_for_a_while_are_taken_beyond_the_share() {
        let p = plan(8, 3, &set(&[0, 1, 2]), &set(&[6, 7]), &set(&[6, 7]));
        assert_eq!(p.acquire, vec![6, 7]);
        assert!(p.release.is_empty(), "never give up while some are free");
    }
}
