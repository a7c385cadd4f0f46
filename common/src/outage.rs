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
//! participant does the same for the slots of its data ([`Outages::new`] with the label `data
//! slot`).
//!
//! A probe only says the slot answers: whatever made the partition's calls fail (too few
//! replicas, a write refused) is met again by the loop's next call, and paced by the loop's own
//! back-off.

use crate::conn::RedisConn;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// How often a probe asks a partition that is out.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// The partitions out of reach (see the module doc). Clones share them.
#[derive(Clone)]
pub struct Outages {
    conn: RedisConn,
    out: Arc<Mutex<HashSet<u32>>>,
    /// What the numbers are, for the logs: `partition`, `data slot`.
    label: &'static str,
}

impl Outages {
    /// Probes go on `conn`: a cluster connection of their own, whose calls give up quickly
    /// ([`crate::conn::ClusterRetries::QUICK`]). Not the caller's: each failed probe may make
    /// the connection refresh its slot map, which holds every call on it meanwhile.
    /// `label` says what the numbers are, in the logs (`partition`, `data slot`).
    pub fn new(conn: RedisConn, label: &'static str) -> Self {
        Outages { conn, out: Arc::new(Mutex::new(HashSet::new())), label }
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
        let (conn, out) = (self.conn.clone(), Arc::downgrade(&self.out));
        tokio::spawn(probe(conn, out, p, new, probe_key.into(), what));
    }
}

async fn probe(
    mut conn: RedisConn,
    out: Weak<Mutex<HashSet<u32>>>,
    p: u32,
    all: Vec<u32>,
    key: Vec<u8>,
    what: &'static str,
) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let answered = redis::cmd("EXISTS").arg(&key).query_async::<i64>(&mut conn).await.is_ok();
        let Some(out) = out.upgrade() else { return };
        if answered {
            let mut out = out.lock().expect("outages lock");
            for q in &all {
                out.remove(q);
            }
            tracing::info!("{what} {p} answers again");
            return;
        }
    }
}
