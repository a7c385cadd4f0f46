//! The redtx participant: applies 2PC branches and saga steps to a resource, driven by messages
//! on its streams.
//!
//! A participant named `<name>` reads the streams of every partition, `rtx:part:<name>:{P}`
//! for `P` in `0..partitions`, in one `XREADGROUP` through consumer group `<name>` (add
//! processes with the same name to scale it). It settles each batch of
//! `prepare`/`commit`/`abort`/`execute`/`compensate` requests against its [`Resource`] (for the
//! built-in key-value resource, one pipeline of Lua scripts on its data Redis), then writes each
//! `vote`/`ack`/`result` to `rtx:coord:{P}` of the partition the request came from, and acks the
//! entries, in one transaction on the stream Redis.
//!
//! The barrier rules (prepare once, abort-before-prepare tombstone, deadline refusal, null
//! compensation, no hanging action, ...) are written once, here, in Rust; a resource supplies
//! only the atomic "barrier transition + business change".
//!
//! # Layout
//! - [`barrier`]: the rules, pure: [`BarrierState`], [`Barrier`], [`Request`], and
//!   [`decide`](barrier::decide) (the state/request table is in its doc).
//! - [`resource`]: the [`Resource`] trait (carry out a batch of [`Transition`]s, each a
//!   compare-and-set on the barrier plus the business change) and its [`Applied`] answers.
//! - [`worker`]: the runtime: which entries a participant handles, [`settle`](worker::settle)
//!   (decide on a likely barrier, apply, decide again when it moved), the
//!   [`Handler`](redtx_common::consumer::Handler) and the fail points.
//! - [`kv`]: [`KvResource`], the built-in key-value resource: one Lua script per work in `lua/`,
//!   on one data server or a Redis Cluster ([`kv::cluster`]: slot groups under a home barrier),
//!   how calls are built and replies read.
//! - [`conformance`]: the suite that checks every barrier rule against any resource.
//! - [`args`]: [`WorkerArgs`], the command-line flags every participant process shares.
//! - [`sdk`]: participants of your own: a [`Service`](sdk::Service) with business logic only
//!   (try/confirm/cancel, action/compensation) on a state of its own, run by [`sdk::serve`].
//!
//! ```no_run
//! # async fn demo() -> redtx_common::Result<()> {
//! use redtx_participant::{run, ParticipantConfig};
//! let cfg = ParticipantConfig::new("redis://127.0.0.1:6379", "bank-a");
//! run(cfg, redtx_common::shutdown::Shutdown::on_signals()).await
//! # }
//! ```

pub mod args;
pub mod barrier;
pub mod conformance;
pub mod kv;
pub mod resource;
pub mod sdk;
pub mod worker;

pub use args::WorkerArgs;
pub use barrier::{Answer, Barrier, BarrierState, Decision, Request, Work};
pub use kv::cluster::BETWEEN_ROUNDS;
pub use kv::KvResource;
pub use resource::{Applied, Resource, Transition};
pub use worker::{Participant, AFTER_COMMIT, AFTER_EXECUTE, AFTER_PREPARE};

use redtx_common::conn::{RedisTarget, RedisUrl};
use redtx_common::consumer::{Backoff, Consumer, ConsumerConfig};
use redtx_common::shutdown::Shutdown;
use redtx_common::{keys, spec, Error, Result};
use std::time::Duration;

/// How a participant runs.
#[derive(Debug, Clone)]
pub struct ParticipantConfig {
    /// URL of the stream Redis (where `rtx:part:<name>:{P}` and `rtx:coord:{P}` live); with
    /// `cluster`, comma-separated seed nodes of a Redis Cluster.
    pub redis: String,
    /// The streams are on a Redis Cluster: each partition's stream is read on its own and each
    /// partition's replies and acks are one `MULTI` (see [`redtx_common::consumer`]). Without
    /// `data`, the key-value data is on that cluster too.
    pub cluster: bool,
    /// URL of the data Redis the branches apply to; with `data_cluster`, comma-separated seed
    /// nodes of a Redis Cluster; `None`: the stream Redis (a cluster with `cluster`).
    pub data: Option<String>,
    /// `data` lists seed nodes of a Redis Cluster: a branch's keys are grouped by slot, each
    /// group applied atomically in its slot under the branch's home barrier (see
    /// [`kv::cluster`]).
    pub data_cluster: bool,
    /// Participant name: its streams and consumer group.
    pub name: String,
    /// Number of partitions of the deployment (the same everywhere): the streams read are
    /// those of partitions `0..partitions`.
    pub partitions: u32,
    /// Most entries per read (and per script pipeline).
    pub batch: usize,
    /// Pending entries idle this long are taken over from a (presumably dead) worker.
    pub claim_idle: Duration,
    /// How long finished barriers are kept (a repeat within it is recognised).
    pub retention: Duration,
    /// Stream history kept even when every group is done with it (trimming never goes younger).
    pub keep_history: Duration,
    /// Replicas of the stream Redis that must hold what was read before it is applied
    /// ([`ConsumerConfig::wait_replicas`]); 0: none. On a cluster, of the node serving each
    /// stream.
    pub wait_replicas: u32,
}

impl ParticipantConfig {
    /// Defaults: data on the stream Redis, [`keys::DEFAULT_PARTITIONS`] partitions, batches of
    /// 256, claim after 5 s, retention 24 h, history 1 h.
    pub fn new(redis: impl Into<String>, name: impl Into<String>) -> Self {
        ParticipantConfig {
            redis: redis.into(),
            cluster: false,
            data: None,
            data_cluster: false,
            name: name.into(),
            partitions: keys::DEFAULT_PARTITIONS,
            batch: 256,
            claim_idle: Duration::from_secs(5),
            retention: Duration::from_secs(24 * 3600),
            keep_history: Duration::from_secs(3600),
            wait_replicas: 0,
        }
    }

    /// The streams this participant reads: one per partition.
    pub fn streams(&self) -> Vec<String> {
        (0..self.partitions).map(|p| keys::participant_stream(&self.name, p)).collect()
    }

    fn check(&self) -> Result<()> {
        spec::check_participant("name", &self.name)?;
        if self.partitions == 0 || self.partitions > keys::MAX_PARTITIONS {
            return Err(Error::Spec(spec::SpecError::new(
                "partitions",
                format!("must be between 1 and {}, got {}", keys::MAX_PARTITIONS, self.partitions),
            )));
        }
        Ok(())
    }
}

/// Runs the built-in key-value participant until `shutdown`: stops reading, finishes the batch
/// it holds, acks nothing unprocessed, returns `Ok`. A Redis that is unreachable is waited for
/// (with backoff and warnings); an invalid name or URL is an error at once.
pub async fn run(cfg: ParticipantConfig, shutdown: Shutdown) -> Result<()> {
    cfg.check()?;
    let data = check_data(&cfg)?;
    probe_data(&data).await?;
    tracing::info!(participant = %cfg.name, data = %data, "applying branches to this data Redis");
    let resource = KvResource::on(data, cfg.name.clone(), cfg.retention, cfg.partitions);
    run_with(cfg, resource, shutdown).await
}

/// Runs a participant over any [`Resource`] (`cfg.data` and `cfg.retention` are ignored: the
/// resource owns its data).
pub async fn run_with<R: Resource>(cfg: ParticipantConfig, resource: R, shutdown: Shutdown) -> Result<()> {
    cfg.check()?;
    let url = RedisTarget::parse(&cfg.redis, cfg.cluster)?;
    let mut ccfg = ConsumerConfig::new(cfg.streams(), cfg.name.clone());
    ccfg.batch = cfg.batch.max(1);
    ccfg.claim_idle = cfg.claim_idle;
    ccfg.keep = cfg.keep_history;
    ccfg.wait_replicas = cfg.wait_replicas;
    let mut backoff = Backoff::default();
    let consumer = loop {
        if shutdown.is_triggered() {
            return Ok(());
        }
        match Consumer::connect_target(&url, ccfg.clone()).await {
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

/// The data Redis of the key-value participant given as one server (`--data` without
/// `--data-cluster`): one URL; a list of URLs is refused, naming `--data-cluster`.
pub fn parse_data_url(raw: &str) -> Result<RedisUrl> {
    let parts: Vec<&str> = raw.split(',').collect();
    if parts.len() > 1 && parts.iter().all(|p| p.contains("://")) {
        return Err(Error::BadUrl {
            url: redact_list(raw),
            reason: "--data takes one Redis URL; for a Redis Cluster, list its nodes with --data-cluster".into(),
        });
    }
    RedisUrl::parse(raw)
}

/// Where the key-value participant's data is: `--data` (one server, or with `--data-cluster`
/// the seed nodes of a Redis Cluster), else the stream Redis (with `--cluster`, its cluster).
pub fn check_data(cfg: &ParticipantConfig) -> Result<RedisTarget> {
    match (&cfg.data, cfg.data_cluster, cfg.cluster) {
        (Some(d), true, _) => RedisTarget::parse(d, true),
        (Some(d), false, _) => Ok(RedisTarget::single(parse_data_url(d)?)),
        (None, _, true) => RedisTarget::parse(&cfg.redis, true),
        (None, false, false) => Ok(RedisTarget::single(RedisUrl::parse(&cfg.redis)?)),
        (None, true, false) => Err(Error::BadUrl {
            url: redact_list(&cfg.redis),
            reason: "--data-cluster says --data lists the nodes of a Redis Cluster, but --data is not given \
                     (and the streams, where the data would default to, are not on a cluster)"
                .into(),
        }),
    }
}

/// Checks once that the data Redis is what `data` says: a cluster node given as one server, or
/// a plain server given as a cluster node, is refused (the flags are wrong, and every script
/// would fail). A Redis that cannot be reached now is only warned about: the resource connects
/// when it first needs to, and retries.
pub async fn probe_data(data: &RedisTarget) -> Result<()> {
    let mut conn = match data.connect().await {
        Ok(c) => c,
        Err(Error::NotACluster { seed }) => {
            return Err(Error::BadUrl {
                url: seed,
                reason: "not a Redis Cluster node (cluster support is disabled there): give it without \
                         --data-cluster to use it as one server"
                    .into(),
            })
        }
        Err(e) => {
            tracing::warn!(data = %data, error = %e, "the data Redis cannot be reached yet; connecting when needed");
            return Ok(());
        }
    };
    if !data.is_cluster() {
        let info: redis::RedisResult<String> = redis::cmd("INFO").arg("cluster").query_async(&mut conn).await;
        if info.is_ok_and(|i| i.lines().any(|l| l.trim() == "cluster_enabled:1")) {
            return Err(Error::BadUrl {
                url: data.redacted().to_string(),
                reason: "a Redis Cluster node: give the data as a cluster with --data-cluster (one or more of \
                         its nodes as --data)"
                    .into(),
            });
        }
    }
    Ok(())
}

/// [`redact`](redtx_common::conn::redact) of each comma-separated part.
fn redact_list(raw: &str) -> String {
    raw.split(',').map(|p| redtx_common::conn::redact(p.trim())).collect::<Vec<_>>().join(",")
}
