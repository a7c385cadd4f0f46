//! `redtx-postgres`: a redtx participant that applies branches to PostgreSQL, built on the
//! participant SDK's [`Resource`](redtx_participant::Resource) trait and runtime.
//!
//! A branch's payload is a list of SQL statements with bound parameters and optional row-count
//! guards ([`payload`]). 2PC uses PostgreSQL's own `PREPARE TRANSACTION` / `COMMIT PREPARED` /
//! `ROLLBACK PREPARED`; a saga step is one local transaction. Either way the barrier is a row of
//! `redtx_barrier` written in the same transaction as the business change ([`resource`]), so a
//! redelivered request never applies twice.
//!
//! # Layout
//! - [`payload`]: the statements of a branch, and how JSON parameters bind to PostgreSQL types.
//! - [`resource`]: [`PgResource`], the barrier transitions on PostgreSQL.
//! - [`run`]: the participant process (the `redtx-postgres` binary calls it).

pub mod payload;
pub mod resource;

pub use payload::Statement;
pub use resource::{Lane, PgOptions, PgResource};

use redtx_common::conn::RedisUrl;
use redtx_common::consumer::Backoff;
use redtx_common::shutdown::Shutdown;
use redtx_common::{keys, Error, Result};
use redtx_participant::ParticipantConfig;
use std::time::Duration;

/// The URL without its password, for logs: `postgres://user@host:port/db`.
pub fn redact(url: &str) -> Result<String> {
    let cfg: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| Error::Resource {
        resource: "PostgreSQL URL".into(),
        detail: format!("cannot parse it: {e}; write postgres://user:password@host:port/database"),
    })?;
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    Ok(format!("postgres://{user}{host}:{port}/{}", cfg.get_dbname().unwrap_or("")))
}

/// The deployment id kept in the stream Redis (`rtx:deployment`): set once, at random, by the
/// first process that asks.
pub async fn deployment(redis: &RedisUrl) -> Result<String> {
    let mut conn = redis.connect().await?;
    let fresh = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let (id,): (String,) = redis::pipe()
        .cmd("SET")
        .arg(keys::deployment())
        .arg(&fresh)
        .arg("NX")
        .ignore()
        .get(keys::deployment())
        .query_async(&mut conn)
        .await
        .map_err(|e| Error::redis(redis, e))?;
    // It goes into gids, the one value written into SQL text: letters, digits, - and _ only.
    if id.is_empty() || id.len() > 32 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(Error::Resource {
            resource: keys::deployment(),
            detail: format!(
                "{id:?} is not a deployment id (1 to 32 letters, digits, - or _); delete the key to get a new one"
            ),
        });
    }
    Ok(id)
}

/// How the PostgreSQL participant uses its database.
#[derive(Clone)]
pub struct PgSettings {
    /// The PostgreSQL URL; never logged.
    pub postgres: String,
    /// See [`PgOptions::connections`].
    pub connections: usize,
    /// See [`PgOptions::lock_timeout`].
    pub lock_timeout: Duration,
    /// See [`PgOptions::orphan_after`].
    pub orphan_after: Duration,
}

impl PgSettings {
    /// Defaults: 4 connections, a lock timeout of 5 ms; orphans after the longest timeout plus the skew margin.
    pub fn new(postgres: impl Into<String>) -> Self {
        PgSettings {
            postgres: postgres.into(),
            connections: 4,
            lock_timeout: Duration::from_millis(5),
            orphan_after: redtx_common::spec::MAX_TIMEOUT + redtx_participant::barrier::SKEW,
        }
    }
}

/// Runs participant `cfg.name` on PostgreSQL until `shutdown`. Unreachable servers are waited
/// for (with warnings); a bad URL or name is an error at once.
pub async fn run(cfg: ParticipantConfig, pg: PgSettings, shutdown: Shutdown) -> Result<()> {
    redtx_common::spec::check_participant("name", &cfg.name)?;
    let shown = redact(&pg.postgres)?;
    let stream = RedisUrl::parse(&cfg.redis)?;
    let mut backoff = Backoff::default();
    let deployment = loop {
        match deployment(&stream).await {
            Ok(d) => break d,
            Err(e @ Error::Resource { .. }) => return Err(e),
            Err(e) => {
                let pause = backoff.next();
                tracing::warn!(redis = %stream, error = %e, retry_in = ?pause, "cannot reach the stream Redis; retrying");
                tokio::select! { _ = tokio::time::sleep(pause) => {}, _ = shutdown.wait() => return Ok(()) }
            }
        }
    };
    let opts = PgOptions {
        url: pg.postgres,
        participant: cfg.name.clone(),
        deployment,
        connections: pg.connections,
        lock_timeout: pg.lock_timeout,
        retention: cfg.retention,
        records: Some((stream.clone(), cfg.partitions)),
        orphan_after: pg.orphan_after,
    };
    let mut resource = PgResource::new(opts.clone());
    backoff.reset();
    loop {
        match resource.connect().await {
            Ok(prepared) => {
                tracing::info!(participant = %cfg.name, postgres = %shown, "applying branches to this PostgreSQL");
                if !prepared.is_empty() {
                    tracing::info!(count = prepared.len(), gids = ?prepared, "prepared transactions of this participant found; each finishes when its decision arrives");
                }
                break;
            }
            Err(e) => {
                let pause = backoff.next();
                tracing::warn!(postgres = %shown, error = %e, retry_in = ?pause, "cannot use PostgreSQL; retrying");
                tokio::select! { _ = tokio::time::sleep(pause) => {}, _ = shutdown.wait() => return Ok(()) }
            }
        }
    }
    // The sweep of prepared transactions whose decision cannot arrive any more, on its own
    // connection, whether or not messages come.
    let mut sweeper = Lane::new(opts);
    let stop = shutdown.clone();
    let sweeping = tokio::spawn(async move {
        loop {
            if let Err(e) = sweeper.sweep().await {
                tracing::warn!(error = %e, "could not check prepared transactions against their records");
            }
            tokio::select! { _ = tokio::time::sleep(sweeper.sweep_every()) => {}, _ = stop.wait() => return }
        }
    });
    let r = redtx_participant::run_with(cfg, resource, shutdown).await;
    sweeping.abort();
    r
}
