//! `redtx-coordinator`: drives every transaction, 2PC and saga, to its end.
//!
//! Transactions are spread over partitions (`--partitions`, a hash of the id). One coordinator
//! owns a partition at a time through a lease with a fencing token; it keeps the partition's
//! live transactions in memory, runs the pure state machine of
//! [`redtx_common::machine`] on every event, and writes each batch's records, messages and
//! `XACK`s in one fenced, atomic call. Start more coordinators and the partitions spread over
//! them; kill one and its partitions move once its lease lapses.
//!
//! # Layout
//! - [`lease`]: leases, fencing tokens, membership, and the pure spreading rule.
//! - [`owner`]: the Redis layer: partition reload, reads, the fenced write, deadlines.
//! - [`writer`]: sends the fenced writes in order while the loop goes on.
//! - this file: [`CoordinatorConfig`] and [`run`], the entry point used by the binary, the demo
//!   and the bench.

pub mod lease;
pub mod owner;
pub mod writer;

use redtx_common::consumer::Backoff;
use redtx_common::shutdown::Shutdown;
use redtx_common::{conn::RedisTarget, keys, Result};
use std::time::Duration;

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// URL of the Redis holding the streams and records; with `cluster`, comma-separated seed
    /// nodes of a Redis Cluster.
    pub redis: String,
    /// The streams and records are on a Redis Cluster (see [`owner`] for what changes).
    pub cluster: bool,
    /// Number of partitions of the deployment (the same everywhere).
    pub partitions: u32,
    /// Time to live of a partition lease: how long a dead owner's partitions wait.
    pub lease: Duration,
    /// Most entries per read.
    pub batch: usize,
    /// Longest blocking read.
    pub block: Duration,
    /// Entries pending this long are taken over (a fenced former owner may have read them).
    pub claim_idle: Duration,
    /// First pause before a decision is re-sent to a branch that has not acked (grows with
    /// the decision's age, up to 30 s).
    pub resend_every: Duration,
    /// How long a finished record is kept.
    pub retention: Duration,
    /// Stream history kept even when every group is done with it (trimming never goes younger).
    pub keep_history: Duration,
    /// How many fenced writes may be unanswered while the loop reads and steps the next batch
    /// (0: wait for each write).
    pub writes_in_flight: usize,
    /// Before acting on the entries it read or claimed (votes, acks, results, submits), wait
    /// until this many replicas of the stream Redis hold them (`WAIT`, on the connection that
    /// read them; on a cluster, connections pinned to each partition's master; 0: do not wait).
    pub wait_replicas: u32,
}

impl CoordinatorConfig {
    /// Defaults: 8 partitions, 5 s leases, batch 256, claim after 5 s idle, re-send after 1 s,
    /// keep records 24 h.
    pub fn new(redis: impl Into<String>) -> Self {
        CoordinatorConfig {
            redis: redis.into(),
            cluster: false,
            partitions: keys::DEFAULT_PARTITIONS,
            lease: Duration::from_secs(5),
            batch: 256,
            block: Duration::from_millis(250),
            claim_idle: Duration::from_secs(5),
            resend_every: Duration::from_secs(1),
            retention: Duration::from_secs(24 * 3600),
            keep_history: Duration::from_secs(3600),
            writes_in_flight: 1,
            wait_replicas: 0,
        }
    }
}

/// Runs a coordinator until `shutdown`: then it gives its partitions up and returns `Ok(())`.
/// Fails at once only on a bad URL; Redis being unreachable is logged and retried.
pub async fn run(cfg: CoordinatorConfig, shutdown: Shutdown) -> Result<()> {
    let url = RedisTarget::parse(&cfg.redis, cfg.cluster)?;
    let mut backoff = Backoff::default();
    let owner = loop {
        match owner::Owner::connect(cfg.clone(), url.clone()).await {
            Ok(o) => break o,
            Err(e) => {
                let pause = backoff.next();
                tracing::warn!(error = %e, retry_in = ?pause, "cannot start the coordinator yet");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.wait() => return Ok(()),
                }
            }
        }
    };
    owner.run(shutdown).await
}
