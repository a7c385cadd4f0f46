//! `redtx-coordinator`: the 2PC coordinator of redtx.
//!
//! Coordinators are stateless between messages: the transaction record `rtx:txn:{<id>}` is the
//! truth, changed only by atomic Lua scripts (`lua/txn_*.lua`). Any number of coordinators share
//! the consumer group `coordinators` on `rtx:coord:{0}`; any of them can finish any transaction.
//!
//! # Layout
//! - [`machine`]: the decision logic as a pure state machine: a script's typed reply for an
//!   event in, the effects (messages to send, deadline to move, outcome to publish) out.
//! - [`scripts`]: the Lua scripts, their call builders, and the one place that maps their
//!   replies to the typed replies of [`machine`].
//! - [`handler`]: the Redis layer: one pipeline of script calls per batch, one pipeline of
//!   effects, then the ack; the deadline scan on every tick.
//! - this file: [`CoordinatorConfig`] and [`run`], the entry point used by the binary and by
//!   `redtx demo`.

pub mod handler;
pub mod machine;
pub mod scripts;

use redtx_common::consumer::{Backoff, Consumer, ConsumerConfig};
use redtx_common::shutdown::Shutdown;
use redtx_common::{conn::RedisUrl, keys, Result};
use std::time::Duration;

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// URL of the Redis holding the streams and records.
    pub redis: String,
    /// Most entries per read.
    pub batch: usize,
    /// Entries pending this long at a (presumably dead) coordinator are taken over.
    pub claim_idle: Duration,
    /// Base interval between re-sends of a decision to a branch that has not acked (grows with
    /// the decision's age, up to 30 s).
    pub resend_every: Duration,
    /// How long a finished record is kept.
    pub retention: Duration,
    /// Stream history kept even when every group is done with it (trimming never goes younger).
    pub keep_history: Duration,
}

impl CoordinatorConfig {
    /// Defaults: batch 256, claim after 5 s idle, re-send every 1 s, keep records 24 h.
    pub fn new(redis: impl Into<String>) -> Self {
        CoordinatorConfig {
            redis: redis.into(),
            batch: 256,
            claim_idle: Duration::from_secs(5),
            resend_every: Duration::from_secs(1),
            retention: Duration::from_secs(24 * 3600),
            keep_history: Duration::from_secs(3600),
        }
    }
}

/// Runs a coordinator until `shutdown`: then it stops reading, finishes the batch it holds and
/// returns `Ok(())`. Fails at once only on a bad URL; Redis being unreachable is logged and
/// retried with a backoff.
pub async fn run(cfg: CoordinatorConfig, shutdown: Shutdown) -> Result<()> {
    let url = RedisUrl::parse(&cfg.redis)?;
    let mut consumer_cfg = ConsumerConfig::new(keys::coord_stream(), keys::COORD_GROUP.to_string());
    consumer_cfg.batch = cfg.batch.max(1);
    consumer_cfg.claim_idle = cfg.claim_idle;
    consumer_cfg.keep = cfg.keep_history;
    let mut backoff = Backoff::default();
    let consumer = loop {
        match Consumer::connect(&url, consumer_cfg.clone()).await {
            Ok(c) => break c,
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
    let mut handler = handler::Coordinator::new(url, &cfg);
    consumer.run(&mut handler, shutdown).await
}
