//! Partitions (or data slots) whose Redis Cluster master stopped answering, watched off the
//! caller's loop.
//!
//! A master can stop answering without refusing connections: frozen (`SIGSTOP`), its host
//! gone, the network cut. Every call to it then waits out its timeout before it fails. A worker
//! that serves many partitions in one loop (a coordinator, a participant) must not pay that
//! again and again, or the other partitions stand still behind it, and a coordinator's leases
//! of healthy partitions lapse.
//!
//! So the first call of a partition that fails with a slot outage marks the partition *out*
//! ([`Outages::mark`]); the loop skips partitions that are out ([`Outages::is_out`]); and a probe
//! task of its own asks the partition's slot (`EXISTS <key>`, routed to the slot's master by the
//! cluster connection, so it finds a newly elected master too) every [`PROBE_EVERY`] until it
//! answers, and marks the partition back in. The loop then handles it again (a coordinator
//! reloads it first). The loop pays one timeout per outage, not one per round. The key-value
//! participant does the same for the slots of its data ([`Outages::connect`] with the label `data
//! slot`).
//!
//! A probe only says the slot answers: whatever made the partition's calls fail (too few
//! replicas, a write refused) is met again by the loop's next call, and paced by the loop's own
//! back-off.

use crate::conn::{RedisConn, RedisTarget};
use crate::Result;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// How often a probe asks a partition that is out.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// A probe that was refused this many times in a row (`CLUSTERDOWN`, a redirect) asks on a
/// fresh connection. One that went unanswered (a timeout, a connection lost or refused) asks on
/// a fresh connection next, at most one every [`FRESH_EVERY`]: a cluster connection whose calls
/// only time out keeps sending them to the same node, and never learns that its replica was
/// elected meanwhile, so the first probe after the election must not be spent on it.
const FRESH_AFTER: u32 = 4;

/// The least time between two fresh connections of one probe after unanswered probes: a master
/// that refuses connections (its process gone) fails a probe at once, and a fresh cluster
/// connection connects to every node.
const FRESH_EVERY: Duration = Duration::from_secs(1);

/// The partitions out of reach (see the module doc). Clones share them.
#[derive(Clone)]
pub struct Outages {
    target: RedisTarget,
    /// The probes' connection; replaced by a probe answered only on a fresh one, so that the
    /// next probes do not start on a connection that still routes to the silent master.
    conn: Arc<std::sync::RwLock<(RedisConn, tokio::time::Instant)>>,
    /// The runtime these outages were made on: probes run there, whoever marks a partition.
    runtime: tokio::runtime::Handle,
    out: Arc<Mutex<HashSet<u32>>>,
    /// Set when a probe was answered only on a fresh connection: the caller's own cluster
    /// connections may still point at the silent master, and should be replaced
    /// ([`Outages::take_topology_changed`]).
    moved: Arc<AtomicBool>,
    /// The partitions whose probe was answered only on a fresh connection since the last
    /// [`Outages::take_moved`] (with `moved`).
    moved_parts: Arc<Mutex<Vec<u32>>>,
    /// How many times a partition came back in ([`Outages::wait_in`], [`Outages::comebacks`]).
    back: Arc<tokio::sync::watch::Sender<u64>>,
    /// What the numbers are, for the logs: `partition`, `data slot`.
    label: &'static str,
}

impl Outages {
    /// Probes go on a cluster connection of their own to `target` (whose calls should give up
    /// quickly: [`crate::conn::ClusterRetries::QUICK`]), not the caller's: each failed probe
    /// may make the connection refresh its slot map, which holds every call on it meanwhile
    /// (probes after the first of an outage go on fresh connections; a caller may take up the
    /// one that was answered, [`Outages::conn`]).
    /// `label` says what the numbers are, in the logs (`partition`, `data slot`).
    pub async fn connect(target: &RedisTarget, label: &'static str) -> Result<Self> {
        Ok(Outages {
            target: target.clone(),
            conn: Arc::new(std::sync::RwLock::new((target.connect().await?, tokio::time::Instant::now()))),
            runtime: tokio::runtime::Handle::current(),
            out: Arc::new(Mutex::new(HashSet::new())),
            moved: Arc::new(AtomicBool::new(false)),
            moved_parts: Arc::new(Mutex::new(Vec::new())),
            back: Arc::new(tokio::sync::watch::Sender::new(0)),
            label,
        })
    }

    /// Whether a probe was answered only on a fresh connection since the last call: the
    /// master it asked was replaced while it was silent, and a cluster connection that only
    /// met timeouts from it still routes there. The caller replaces its cluster connections.
    pub fn take_topology_changed(&self) -> bool {
        !self.take_moved().is_empty()
    }

    /// Whether a probe was answered only on a fresh connection and that was not taken yet: a
    /// look that takes nothing ([`take_topology_changed`](Self::take_topology_changed) takes).
    pub fn moved(&self) -> bool {
        self.moved.load(Ordering::Acquire)
    }

    /// [`take_topology_changed`](Self::take_topology_changed), saying which partitions were
    /// heard from only on a fresh connection (empty: none since the last call). A blocking read
    /// of theirs may still wait on the silent master: the caller gives it up.
    pub fn take_moved(&self) -> Vec<u32> {
        // Read first: asked at every call, and almost always false (no write to share).
        if !(self.moved.load(Ordering::Acquire) && self.moved.swap(false, Ordering::AcqRel)) {
            return Vec::new();
        }
        std::mem::take(&mut *self.moved_parts.lock().expect("outages lock"))
    }

    /// The probes' connection: after [`take_topology_changed`](Self::take_topology_changed)
    /// said yes, the fresh one that was answered, which routes the partition to its new master.
    /// A caller may take it up as its own instead of opening another.
    pub fn conn(&self) -> RedisConn {
        self.conn.read().expect("outages connection lock").0.clone()
    }

    /// Waits until `p` is in (at once if it is), or `at_most` passed: a caller that met `p`
    /// out retries as soon as it answers again, not after a long back-off.
    pub async fn wait_in(&self, p: u32, at_most: Duration) {
        let mut back = self.back.subscribe();
        let _ = tokio::time::timeout(at_most, async {
            // Subscribed before looking: a comeback in between is not missed.
            while self.is_out(p) {
                if back.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// Changes each time a partition comes back in: a caller blocked on a call that may have
    /// gone to a silent master (a blocking read) gives it up and calls again, on a connection
    /// that follows the slot to its new master.
    pub fn comebacks(&self) -> tokio::sync::watch::Receiver<u64> {
        self.back.subscribe()
    }

    /// Whether `p` is out: skip it until its probe hears from it.
    pub fn is_out(&self, p: u32) -> bool {
        self.out.lock().expect("outages lock").contains(&p)
    }

    /// The partitions out now.
    pub fn out(&self) -> HashSet<u32> {
        self.out.lock().expect("outages lock").clone()
    }

    /// Marks `p` out, unless it is already, and starts its probe: `EXISTS probe_key` (a key of
    /// `p`'s slot) every [`PROBE_EVERY`] until an answer comes. The probe ends when
    /// it is answered or when every clone of these outages is dropped.
    pub fn mark(&self, p: u32, probe_key: impl Into<Vec<u8>>) {
        self.mark_all(p, vec![p], probe_key)
    }

    /// Marks `p` and `with` (served by the same master) out, those not out already, with one
    /// probe for all of them: `EXISTS probe_key`, a key of `p`'s slot.
    pub fn mark_all(&self, p: u32, with: Vec<u32>, probe_key: impl Into<Vec<u8>>) {
        let new: Vec<u32> = {
            let mut out = self.out.lock().expect("outages lock");
            with.into_iter().chain([p]).filter(|q| out.insert(*q)).collect()
        };
        if new.is_empty() {
            return;
        }
        let what = self.label;
        match new.len() {
            1 => tracing::warn!("{what} {p} out of reach; skipped until its master answers"),
            n => tracing::warn!("{what} {p} out of reach, and {} more of its master; skipped until it answers", n - 1),
        }
        let (conn, opened_at) = self.conn.read().expect("outages connection lock").clone();
        let probe = Probe {
            target: self.target.clone(),
            conn,
            opened_at,
            shared: self.conn.clone(),
            out: Arc::downgrade(&self.out),
            moved: self.moved.clone(),
            moved_parts: self.moved_parts.clone(),
            back: self.back.clone(),
            p,
            all: new,
            key: probe_key.into(),
            what,
        };
        self.runtime.spawn(probe.run());
    }
}

struct Probe {
    target: RedisTarget,
    conn: RedisConn,
    /// When `conn` was opened.
    opened_at: tokio::time::Instant,
    shared: Arc<std::sync::RwLock<(RedisConn, tokio::time::Instant)>>,
    out: Weak<Mutex<HashSet<u32>>>,
    moved: Arc<AtomicBool>,
    moved_parts: Arc<Mutex<Vec<u32>>>,
    back: Arc<tokio::sync::watch::Sender<u64>>,
    p: u32,
    all: Vec<u32>,
    key: Vec<u8>,
    what: &'static str,
}

impl Probe {
    async fn run(mut self) {
        let (mut failed, mut fresh, mut opened) = (0u32, false, None::<tokio::time::Instant>);
        // On a cluster, the first probe too goes on a fresh connection: the call that marked
        // the partition out went unanswered, and the shared connection most likely routes the
        // slot where that call went. A partition first called after its replica was elected
        // is then heard from one probe later, not after a probe's whole timeout.
        if self.target.is_cluster() {
            let now = tokio::time::Instant::now();
            opened = Some(now);
            if let Ok(c) = self.target.connect().await {
                (self.conn, self.opened_at, fresh) = (c, now, true);
            }
        }
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            let reply = redis::cmd("EXISTS").arg(&self.key).query_async::<i64>(&mut self.conn).await;
            // Any reply of the node says it answers (an ACL refusal too), except those that say
            // the slot is not served yet, and a redirect left to us: another node names the
            // slot's master, which the cluster connection could not reach.
            let answered = match &reply {
                Ok(_) => true,
                Err(e) if e.redirect_node().is_some() => false,
                Err(e) => e.code().is_some_and(|c| !matches!(c, "CLUSTERDOWN" | "TRYAGAIN" | "LOADING" | "MASTERDOWN")),
            };
            let Some(out) = self.out.upgrade() else { return };
            if answered {
                if fresh {
                    // Not over a connection opened later by another probe (it knows a newer
                    // slot map).
                    let mut shared = self.shared.write().expect("outages connection lock");
                    if shared.1 < self.opened_at {
                        *shared = (self.conn.clone(), self.opened_at);
                    }
                    drop(shared);
                    self.moved_parts.lock().expect("outages lock").extend(&self.all);
                    self.moved.store(true, Ordering::Release);
                }
                let mut out = out.lock().expect("outages lock");
                for q in &self.all {
                    out.remove(q);
                }
                drop(out);
                self.back.send_modify(|n| *n += 1);
                let (what, p) = (self.what, self.p);
                tracing::info!("{what} {p} answers again");
                return;
            }
            failed += 1;
            let unanswered = reply.as_ref().err().is_some_and(|e| {
                e.is_timeout() || e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()
            });
            let due = opened.is_none_or(|t| t.elapsed() >= FRESH_EVERY);
            if (unanswered && due) || failed % FRESH_AFTER == 0 {
                let now = tokio::time::Instant::now();
                opened = Some(now);
                if let Ok(c) = self.target.connect().await {
                    (self.conn, self.opened_at, fresh) = (c, now, true);
                }
            }
        }
    }
}
