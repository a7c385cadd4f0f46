//! Redis URLs and connections, to one server or to a Redis Cluster.
//!
//! [`RedisUrl`] keeps the URL as given (with its secrets, to connect) and shows only a redacted
//! form: `Display` and `Debug` never print the password. `redis://`, `rediss://` (TLS),
//! `redis://user:pass@host` (ACL users) and `?protocol=resp3` work as in the `redis` crate.
//!
//! [`RedisTarget`] is where the stream Redis is: one URL, or (`--cluster`) a list of seed nodes
//! of a Redis Cluster (`--redis a,b,c`; one seed is enough). [`RedisConn`] is a connection to
//! either, usable wherever a [`MultiplexedConnection`] is: it implements
//! [`redis::aio::ConnectionLike`] and `Clone`, so `AsyncCommands`, pipelines and scripts work on
//! both.
//!
//! # What a cluster connection does (redis 1.8), and the limits the workers must respect
//!
//! - A command is sent to the master of its key's slot (the first key; `XREAD`/`XREADGROUP`:
//!   the first stream). `MOVED` and `ASK` are followed (with `ASKING`), `TRYAGAIN` and
//!   `CLUSTERDOWN` retried with backoff, and the slot map refreshed, a few times before the
//!   error reaches the caller. A multi-key command whose keys are in different slots is refused
//!   by Redis (`CROSSSLOT`), **even when one node serves all of them**: one `XREAD` or
//!   `XREADGROUP` can only name streams of one partition.
//! - A **pipeline** (and a `MULTI`/`EXEC`) is sent whole to one node: the one of the first
//!   command that has a key. A pipeline whose keyed commands are in different slots is refused
//!   before anything is sent (a `CrossSlot` error from the client); keyless commands in it go
//!   along. It is not split per node. So: one pipeline (one `MULTI`) per partition. A redirect
//!   answered to any command of the pipeline re-sends the whole pipeline to the new node, so
//!   while a slot migrates (keys partly moved) a pipeline of several keys may fail after the
//!   retries (`ASK` applies to the next command only, except inside `MULTI`) or get
//!   `TRYAGAIN`: treat it like any transient error and retry.
//! - **Scripts** (`EVALSHA`, `redis::Script`, [`crate::scripts`]) go to the slot of their first
//!   key; every key of one call must be in that slot (Redis refuses other keys inside the
//!   script). `SCRIPT LOAD` goes to every node, so `NOSCRIPT` is answered by loading it
//!   everywhere, and a new master after a failover has it too.
//! - **Blocking reads** (`XREAD BLOCK`, `XREADGROUP BLOCK`) hold the node's shared multiplexed
//!   connection of the cluster connection: a second blocking read to the same node waits for
//!   the first, and so do the other commands to that node. Blocking reads need connections of
//!   their own, one per partition read at a time ([`crate::client`] does that for outcomes).
//!   A client blocked on a node that turns replica (a failover) gets `UNBLOCKED` at once; one
//!   blocked on a slot that moved away gets `MOVED` (Redis looks at blocked clients about once a
//!   second), at the latest when its block ends. While a slot migrates, a read blocked on the
//!   source is not told when its key leaves: its next read gets `ASK`.
//! - Commands without keys (`PING`, `INFO`, `SCRIPT LOAD`, `CLUSTER ...`) go to a random node
//!   or to every node, as the crate's routing table says; keys without a hash tag
//!   (`rtx:coordinators`, `rtx:protocol`, `rtx:deployment`) live in their own slots.
//!
//! So the coordinator and the participant runtime, on a cluster, do this (and on one server
//! exactly what they always did): one blocking `XREADGROUP` per partition, each on a cluster
//! connection of its own ([`crate::consumer::StreamReaders`]); one fenced script call per
//! partition per round, fenced by that partition's lease only (`coordinator/src/owner.rs`);
//! lease scripts one call per partition ([`crate::scripts::run_each`]); the participant's
//! replies, dead letters and `XACK`s in one `MULTI`/`EXEC` per partition
//! ([`crate::consumer`]); record reads and a takeover's reload pipelined per partition
//! ([`RedisConn::query_each`]); and every error of a redirect that survived the crate's retries
//! (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`) handled as transient ([`Error::is_transient`]):
//! the entries stay pending and are read again.

use crate::{Error, Result};
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, Value};
use std::time::Duration;

/// The URL used when neither `--redis` nor `$REDTX_REDIS_URL` is given.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";
/// Environment variable holding the default Redis URL.
pub const URL_ENV: &str = "REDTX_REDIS_URL";

/// A Redis URL whose printed form hides its password.
#[derive(Clone)]
pub struct RedisUrl {
    raw: String,
    redacted: String,
    client: redis::Client,
}

impl RedisUrl {
    /// Parses and checks a URL (no connection yet).
    pub fn parse(raw: &str) -> Result<Self> {
        let redacted = redact(raw);
        let client =
            redis::Client::open(raw).map_err(|e| Error::BadUrl { url: redacted.clone(), reason: e.to_string() })?;
        Ok(RedisUrl { raw: raw.to_string(), redacted, client })
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The `redis` crate client for this URL.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Opens a multiplexed connection; replies may take up to `response_timeout` (give blocking
    /// reads enough).
    pub async fn connect_with(&self, response_timeout: Duration) -> Result<MultiplexedConnection> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(response_timeout));
        self.client.get_multiplexed_async_connection_with_config(&cfg).await.map_err(|e| Error::redis(self, e))
    }

    /// Opens a connection that reconnects by itself after the server went away (a command that
    /// fails on the broken connection still fails; the next one uses a fresh connection).
    pub async fn connect_managed(&self, response_timeout: Duration) -> Result<redis::aio::ConnectionManager> {
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2));
        self.client.get_connection_manager_with_config(cfg).await.map_err(|e| Error::redis(self, e))
    }

    /// Opens a multiplexed connection with a 10 s response timeout.
    pub async fn connect(&self) -> Result<MultiplexedConnection> {
        self.connect_with(Duration::from_secs(10)).await
    }

    /// The raw URL, secrets included. Only for handing to a child process.
    pub fn expose(&self) -> &str {
        &self.raw
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisUrl({})", self.redacted)
    }
}

/// Where the stream Redis is: one server (a [`RedisUrl`]) or a Redis Cluster (its seed nodes).
/// `Display` and `Debug` show the URLs redacted, like [`RedisUrl`].
#[derive(Clone)]
pub struct RedisTarget {
    seeds: Vec<RedisUrl>,
    cluster: bool,
    redacted: String,
    /// A cluster connection's retries of a redirect, `TRYAGAIN` or `CLUSTERDOWN`; `None`: the
    /// `redis` crate's (16, waiting at least 1.28 s each).
    retries: Option<ClusterRetries>,
}

/// How often, and how patiently, a cluster connection retries a command that met `TRYAGAIN`
/// (a slot half-way through a move, keys on both sides), `CLUSTERDOWN` or a redirect before
/// its error reaches the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterRetries {
    /// Retries after the first try.
    pub retries: u32,
    /// The shortest wait between two tries.
    pub min_wait: Duration,
    /// The longest wait between two tries (each wait is random, below a bound that doubles
    /// from 10 ms with every retry).
    pub max_wait: Duration,
    /// How long a call may take in all (tries, waits, redirects, reconnects) beyond its
    /// connection's response timeout, before it fails with a timeout.
    pub overall_extra: Duration,
    /// The response timeout of [`RedisTarget::connect`] on a cluster (blocking reads ask for
    /// theirs with [`RedisTarget::connect_with`]).
    pub call_timeout: Duration,
    /// How long connecting to a node may take. The crate holds **every** call of a cluster
    /// connection while it refreshes its slot map, which connects to each node it lists, a
    /// node that does not answer included: this bounds that stall too.
    pub connect_timeout: Duration,
}

impl ClusterRetries {
    /// Give up within about a second, or a second and a half for a master that does not
    /// answer at all: for work that stays pending and is retried anyway (the workers' streams,
    /// the key-value participant's data), so one slot on the move, or one frozen master, does
    /// not hold a whole batch or every partition ([`crate::outage`]).
    pub const QUICK: ClusterRetries = ClusterRetries {
        retries: 4,
        min_wait: Duration::from_millis(10),
        max_wait: Duration::from_millis(400),
        overall_extra: Duration::from_millis(500),
        call_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_millis(250),
    };
}

impl RedisTarget {
    /// Parses `--redis` (with `--cluster` or not). Without `cluster`, one URL; with it, a
    /// comma-separated list of seed nodes of one cluster (one is enough: the others are found
    /// from it). Seeds must share the user, password, database and TLS mode, and cannot be
    /// Unix sockets (a cluster announces its nodes by address).
    ///
    /// A comma inside a seed's password must be written `%2C`.
    pub fn parse(raw: &str, cluster: bool) -> Result<Self> {
        if !cluster {
            let parts: Vec<&str> = raw.split(',').collect();
            if parts.len() > 1 && parts.iter().all(|p| p.contains("://")) {
                return Err(Error::BadUrl {
                    url: redact_list(raw),
                    reason: "a comma-separated list of seed nodes needs --cluster".into(),
                });
            }
            return Ok(Self::single(RedisUrl::parse(raw)?));
        }
        let seeds = raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(RedisUrl::parse);
        Self::cluster(seeds.collect::<Result<Vec<_>>>()?)
    }

    /// One server.
    pub fn single(url: RedisUrl) -> Self {
        RedisTarget { redacted: url.redacted().to_string(), seeds: vec![url], cluster: false, retries: None }
    }

    /// A Redis Cluster known by `seeds` (checked as [`parse`](Self::parse) says; no connection
    /// yet).
    pub fn cluster(seeds: Vec<RedisUrl>) -> Result<Self> {
        let shown = seeds.iter().map(RedisUrl::redacted).collect::<Vec<_>>().join(",");
        let redacted = format!("{shown} (cluster)");
        if seeds.is_empty() {
            return Err(Error::BadUrl { url: redacted, reason: "--cluster needs at least one seed node".into() });
        }
        let target = RedisTarget { seeds, cluster: true, redacted, retries: None };
        // The crate's own checks: same credentials, TLS mode and database; no Unix socket.
        target.cluster_client(Duration::from_secs(1))?;
        Ok(target)
    }

    /// The same target whose cluster connections retry as `retries` says (one server: no
    /// effect).
    pub fn with_cluster_retries(mut self, retries: ClusterRetries) -> Self {
        self.retries = Some(retries);
        self
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The seed nodes (the one URL of a single server).
    pub fn seeds(&self) -> &[RedisUrl] {
        &self.seeds
    }

    /// The first seed (the URL of a single server).
    pub fn url(&self) -> &RedisUrl {
        &self.seeds[0]
    }

    /// The URLs with any password replaced by `***`, comma-separated, and ` (cluster)` after a
    /// cluster's.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The raw `--redis` value, secrets included (comma-separated seeds). Only for handing to a
    /// child process, with `--cluster` when [`is_cluster`](Self::is_cluster).
    pub fn expose(&self) -> String {
        self.seeds.iter().map(RedisUrl::expose).collect::<Vec<_>>().join(",")
    }

    /// Opens a connection: multiplexed to one server, or a cluster connection (which reconnects
    /// to nodes by itself and follows the slot map). Replies may take up to `response_timeout`.
    pub async fn connect_with(&self, response_timeout: Duration) -> Result<RedisConn> {
        match self.cluster {
            false => Ok(RedisConn::Single(self.url().connect_with(response_timeout).await?)),
            true => self.connect_cluster(response_timeout).await,
        }
    }

    /// [`connect_with`](Self::connect_with) with a 10 s response timeout (on a cluster with
    /// [`ClusterRetries`] set, their [`call_timeout`](ClusterRetries::call_timeout)).
    pub async fn connect(&self) -> Result<RedisConn> {
        let timeout = match (self.cluster, self.retries) {
            (true, Some(r)) => r.call_timeout,
            _ => Duration::from_secs(10),
        };
        self.connect_with(timeout).await
    }

    /// A connection that reconnects by itself: a `ConnectionManager` to one server, or a
    /// cluster connection.
    pub async fn connect_managed(&self, response_timeout: Duration) -> Result<RedisConn> {
        match self.cluster {
            false => Ok(RedisConn::Managed(self.url().connect_managed(response_timeout).await?)),
            true => self.connect_cluster(response_timeout).await,
        }
    }

    fn cluster_client(&self, response_timeout: Duration) -> Result<redis::cluster::ClusterClient> {
        let mut builder = redis::cluster::ClusterClient::builder(self.seeds.iter().map(|u| u.expose().to_string()))
            .connection_timeout(self.retries.map_or(Duration::from_secs(5), |r| r.connect_timeout))
            .response_timeout(response_timeout)
            // Redirects and retries within one call may take longer than one reply.
            .overall_response_timeout(Some(
                response_timeout + self.retries.map_or(Duration::from_secs(10), |r| r.overall_extra),
            ));
        if let Some(r) = self.retries {
            builder = builder
                .retries(r.retries)
                .min_retry_wait(r.min_wait.as_millis() as u64)
                .max_retry_wait(r.max_wait.as_millis() as u64);
        }
        builder.build().map_err(|e| Error::BadUrl { url: self.redacted.clone(), reason: e.to_string() })
    }

    async fn connect_cluster(&self, response_timeout: Duration) -> Result<RedisConn> {
        let client = self.cluster_client(response_timeout)?;
        match client.get_async_connection().await {
            Ok(c) => Ok(RedisConn::Cluster(c)),
            Err(e) => Err(self.explain_cluster_failure(e).await),
        }
    }

    /// The cluster connection failed: say which seed is not a cluster node, if one is.
    async fn explain_cluster_failure(&self, e: redis::RedisError) -> Error {
        for seed in &self.seeds {
            let Ok(mut c) = seed.connect_with(Duration::from_secs(5)).await else { continue };
            let info: redis::RedisResult<String> = redis::cmd("INFO").arg("cluster").query_async(&mut c).await;
            if let Ok(info) = info {
                if info.lines().any(|l| l.trim() == "cluster_enabled:0") {
                    return Error::NotACluster { seed: seed.redacted().to_string() };
                }
            }
        }
        Error::redis(self, e)
    }
}

impl std::fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisTarget({})", self.redacted)
    }
}

/// A connection to the stream Redis: one server or a Redis Cluster. A drop-in for
/// [`MultiplexedConnection`] (`ConnectionLike + Clone + Send + Sync`); clones share the
/// underlying connections. See the [module doc](self) for what a cluster connection does with
/// pipelines, scripts and blocking reads.
#[derive(Clone)]
pub enum RedisConn {
    /// One server, one multiplexed connection: a command fails once it is lost; open another.
    Single(MultiplexedConnection),
    /// One server, reconnecting by itself (the failed command still fails; the next reconnects).
    Managed(ConnectionManager),
    /// A Redis Cluster: one multiplexed connection per node, routed by slot, reconnecting and
    /// following the slot map by itself.
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// Runs each pipeline on its own, all at once (on a cluster, one pipeline per slot: the
    /// cluster connection sends each whole to its node, and those to one node share its
    /// connection). One reply per pipeline, in order.
    pub async fn query_each<T>(&self, pipes: Vec<Pipeline>) -> Vec<redis::RedisResult<T>>
    where
        T: redis::FromRedisValue + Send + 'static,
    {
        let tasks: Vec<_> = pipes
            .into_iter()
            .map(|p| {
                let mut conn = self.clone();
                tokio::spawn(async move { p.query_async::<T>(&mut conn).await })
            })
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.unwrap_or_else(|e| Err(redis::RedisError::from(std::io::Error::other(e)))));
        }
        out
    }
}

impl RedisConn {
    /// Runs `cmd` (one that names no key, e.g. `CLUSTER SLOTS`) on the master of `slot` as
    /// the cluster connection knows it; on one server, on that server.
    pub async fn query_at_slot(&mut self, cmd: &Cmd, slot: u16) -> redis::RedisResult<Value> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        match self {
            RedisConn::Cluster(c) => {
                let to =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master)));
                c.route_command(cmd.clone(), to).await
            }
            _ => cmd.query_async(self).await,
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Managed(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Managed(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// [`redact`] of each comma-separated part.
fn redact_list(raw: &str) -> String {
    raw.split(',').map(|s| redact(s.trim())).collect::<Vec<_>>().join(",")
}

/// The URL to use: the explicit one, else `$REDTX_REDIS_URL`, else [`DEFAULT_URL`].
pub fn default_url(explicit: Option<&str>) -> String {
    explicit
        .map(str::to_string)
        .or_else(|| std::env::var(URL_ENV).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| DEFAULT_URL.to_string())
}

/// `scheme://user:***@host/...` for any URL with a password, and `?pass=***` for a Unix socket
/// URL (whose credentials the `redis` crate reads from the query); unparsable input is hidden
/// whole past the scheme, since it may hold a secret we cannot locate.
pub fn redact(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            } else if !u.username().is_empty() && (u.scheme().starts_with("redis") || u.scheme().starts_with("valkey"))
            {
                // `redis://secret@host` puts the password in the user slot for Redis < 6 AUTH.
                let _ = u.set_username("***");
            }
            if u.query_pairs().any(|(k, _)| k == "pass") {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k == "pass" { "***".to_string() } else { v.into_owned() };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => match raw.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://***"),
            None => "***".to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_print() {
        assert_eq!(redact("redis://alice:s3cret@db:6380/2"), "redis://alice:***@db:6380/2");
        assert_eq!(redact("rediss://:s3cret@db"), "rediss://:***@db");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert!(!redact("redis://s3cret@db").contains("s3cret"));
        assert!(!redact("redis//s3cret@@@").contains("s3cret"));
        let u = RedisUrl::parse("redis://bob:hunter2@127.0.0.1:1").unwrap();
        assert!(!format!("{u} {u:?}").contains("hunter2"));
        let e = RedisUrl::parse("http://bob:hunter2@x").unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn unix_socket_and_valkey_passwords_never_print() {
        // The redis crate reads a Unix socket URL's credentials from its query (`?user=&pass=`),
        // and takes `valkey://` like `redis://`.
        for raw in [
            "redis+unix:///run/redis.sock?pass=hunter2",
            "unix:///run/redis.sock?db=1&user=bob&pass=hunter2",
            "valkey+unix:///run/valkey.sock?pass=hunter2&protocol=resp3",
            "valkey://hunter2@db:6379",
            "valkeys://hunter2@db:6379",
        ] {
            let u = RedisUrl::parse(raw).unwrap();
            let shown = format!("{u} {u:?} {}", u.redacted());
            assert!(!shown.contains("hunter2"), "{raw} shows as {shown}");
        }
        assert_eq!(redact("unix:///run/redis.sock?db=1&pass=hunter2"), "unix:///run/redis.sock?db=1&pass=***");
    }
}
