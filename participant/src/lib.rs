//! The redtx participant: applies 2PC branches to a data Redis, driven by messages on its stream.
//!
//! A participant named `<name>` reads `rtx:part:<name>:{0}` through consumer group `<name>`
//! (add processes with the same name to scale it), runs each batch of `prepare`/`commit`/`abort`
//! messages as one pipeline of Lua scripts on its data Redis, then writes the `vote`/`ack` replies
//! to `rtx:coord:{0}` and acks the entries in one transaction on the stream Redis.
//!
//! # Layout
//! - [`resource`]: the [`Resource`] trait (prepare/commit/abort over a batch) and its
//!   [`Request`]/[`Response`] types; custom participants implement it.
//! - [`kv`]: [`KvResource`], the built-in key-value resource: the Lua scripts of `lua/`, how
//!   calls are built and how replies are read.
//! - [`machine`]: the pure decisions: which entries a participant handles, and what each answer
//!   turns into (reply and ack/retry/dead-letter).
//! - [`worker`]: the [`Handler`](redtx_common::consumer::Handler) gluing it together, and the
//!   fail points.
//!
//! ```no_run
//! # async fn demo() -> redtx_common::Result<()> {
//! use redtx_participant::{run, ParticipantConfig};
//! let cfg = ParticipantConfig::new("redis://127.0.0.1:6379", "bank-a");
//! run(cfg, redtx_common::shutdown::Shutdown::on_signals()).await
//! # }
//! ```

pub mod kv;
pub mod machine;
pub mod resource;
pub mod worker;

pub use kv::KvResource;
pub use resource::{Request, Resource, Response};
pub use worker::{Participant, AFTER_COMMIT, AFTER_PREPARE};

use redtx_common::conn::RedisUrl;
use redtx_common::consumer::{Backoff, Consumer, ConsumerConfig};
use redtx_common::shutdown::Shutdown;
use redtx_common::{keys, spec, Result};
use std::time::Duration;

/// How a participant runs.
#[derive(Debug, Clone)]
pub struct ParticipantConfig {
    /// URL of the stream Redis (where `rtx:part:<name>:{0}` and `rtx:coord:{0}` live).
    pub redis: String,
    /// URL of the data Redis the branches apply to; `None`: the stream Redis.
    pub data: Option<String>,
    /// Participant name: its stream and consumer group.
    pub name: String,
    /// Most entries per read (and per script pipeline).
    pub batch: usize,
    /// Pending entries idle this long are taken over from a (presumably dead) worker.
    pub claim_idle: Duration,
    /// How long commit/abort/refusal barriers are kept (a repeat within it is recognised).
    pub retention: Duration,
    /// Stream history kept even when every group is done with it (trimming never goes younger).
    pub keep_history: Duration,
}

impl ParticipantConfig {
    /// Defaults: data on the stream Redis, batches of 256, claim after 5 s, retention 24 h.
    pub fn new(redis: impl Into<String>, name: impl Into<String>) -> Self {
        ParticipantConfig {
            redis: redis.into(),
            data: None,
            name: name.into(),
            batch: 256,
            claim_idle: Duration::from_secs(5),
            retention: Duration::from_secs(24 * 3600),
            keep_history: Duration::from_secs(3600),
        }
    }
}

/// Runs the built-in key-value participant until `shutdown`: stops reading, finishes the batch
/// it holds, acks nothing unprocessed, returns `Ok`. A Redis that is unreachable is waited for
/// (with backoff and warnings); an invalid name or URL is an error at once.
pub async fn run(cfg: ParticipantConfig, shutdown: Shutdown) -> Result<()> {
    spec::check_participant("name", &cfg.name)?;
    let data = RedisUrl::parse(cfg.data.as_deref().unwrap_or(&cfg.redis))?;
    tracing::info!(participant = %cfg.name, data = %data, "applying branches to this data Redis");
    let resource = KvResource::new(data, cfg.name.clone(), cfg.retention);
    run_with(cfg, resource, shutdown).await
}

/// Runs a participant over any [`Resource`] (`cfg.data` is ignored: the resource owns its data).
pub async fn run_with<R: Resource>(cfg: ParticipantConfig, resource: R, shutdown: Shutdown) -> Result<()> {
    spec::check_participant("name", &cfg.name)?;
    let url = RedisUrl::parse(&cfg.redis)?;
    let mut ccfg = ConsumerConfig::new(keys::participant_stream(&cfg.name), cfg.name.clone());
    ccfg.batch = cfg.batch.max(1);
    ccfg.claim_idle = cfg.claim_idle;
    ccfg.keep = cfg.keep_history;
    let mut backoff = Backoff::default();
    let consumer = loop {
        if shutdown.is_triggered() {
            return Ok(());
        }
        match Consumer::connect(&url, ccfg.clone()).await {
            Ok(c) => break c,
            Err(e) => {
                let pause = backoff.next();
                tracing::warn!(participant = %cfg.name, redis = %url, error = %e, retry_in = ?pause, "cannot reach Redis; retrying");
                tokio::select! { _ = tokio::time::sleep(pause) => {}, _ = shutdown.wait() => return Ok(()) }
            }
        }
    };
    let mut handler = Participant::new(cfg.name.clone(), resource);
    consumer.run(&mut handler, shutdown).await
}
