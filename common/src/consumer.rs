//! The participants' stream worker runtime (the coordinator, which owns partitions, has its own
//! loop in `coordinator/src/owner.rs` and shares the helpers at the end of this file).
//!
//! A [`Consumer`] reads a list of streams (typically one per partition, `rtx:part:<name>:{P}`)
//! through one consumer group, in batches: one `XREADGROUP COUNT .. STREAMS s0 s1 .. > > ..`
//! for all of them. It hands each batch of decoded messages to a [`Handler`] (each
//! [`Delivery`] says which stream and partition it came from), and writes the handler's results,
//! the dead letters and the `XACK`s of the batch in one `MULTI`/`EXEC`, so an entry is acked
//! exactly when what it caused is written. Entries left pending by a dead worker are taken over
//! with `XAUTOCLAIM` (per stream) once idle for `claim_idle`. An entry that cannot be decoded,
//! or that the handler refuses, goes to the dead-letter stream of its partition
//! (`rtx:dead:{P}`, counted in `rtx:dead:count:{P}`) with the reason, and is acked: a worker
//! never crash-loops on one entry. Redis errors are logged and retried with a backoff; the
//! affected entries stay pending and are claimed again.
//!
//! On a Redis Cluster ([`Consumer::connect_target`] with a cluster [`RedisTarget`]) every
//! partition is one slot, so: each stream is read by its own blocking `XREADGROUP`
//! ([`StreamReaders`]), and a batch is committed as one `MULTI`/`EXEC` per partition (the
//! handler's writes for partition `P`, its dead letters `rtx:dead:{P}` and the `XACK`s of
//! `rtx:...:{P}`: one slot), the partitions' transactions sent at once. Each is all or nothing
//! for its partition; a batch that spans partitions may be committed for some and not others
//! (the rest stays pending and is retried, as after any failure).

use crate::conn::{RedisConn, RedisTarget, RedisUrl};
use crate::outage::Outages;
use crate::protocol::{is_batch_entry, items_of_entry, Message};
use crate::shutdown::Shutdown;
use crate::slots::{Pinned, SlotOwners};
use crate::stats::{ConsumerCounts, Publisher};
use crate::{keys, Error, Result};
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoGroupsReply, StreamPendingReply, StreamReadOptions, StreamReadReply,
};
use redis::AsyncCommands;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most `XAUTOCLAIM` calls per tick.
const MAX_CLAIM_ROUNDS: usize = 16;

/// How a consumer reads.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Streams to read, all through the same group (e.g. one per partition). Each stream's
    /// partition is [`keys::partition_of_stream`] of its name (0 if it has none).
    pub streams: Vec<String>,
    /// Consumer group (created at id 0 if missing, so nothing added before is skipped).
    pub group: String,
    /// This consumer's name, unique per process.
    pub consumer: String,
    /// Most entries per `XREADGROUP`/`XAUTOCLAIM`.
    pub batch: usize,
    /// How long one `XREADGROUP` blocks.
    pub block: Duration,
    /// Pending entries idle this long are taken over from their (presumably dead) consumer.
    pub claim_idle: Duration,
    /// How often to look for such entries.
    pub tick_every: Duration,
    /// Entries younger than this are never trimmed, even when every group is done with them
    /// (history for inspection and replay).
    pub keep: Duration,
    /// How often to trim the stream (`None`: never).
    pub trim_every: Option<Duration>,
    /// Replicas of the stream Redis that must hold what was read before it is handled (`WAIT`
    /// on the connection that read it; 0: none). A failover to a replica then cannot lose a
    /// message (a decision) this consumer has acted on. On a Redis Cluster, each stream is read
    /// (and claimed) on a connection pinned to its slot's master, and `WAIT` goes on that one
    /// ([`StreamReaders::replicated`]).
    pub wait_replicas: u32,
}

/// How long one `WAIT` for [`ConsumerConfig::wait_replicas`] lasts before the entries are left
/// pending (taken up again by the idle-entry claim).
pub const WAIT_REPLICAS_TIMEOUT: Duration = Duration::from_secs(1);

/// Response timeout of a connection pinned to a slot's node for claims (`XAUTOCLAIM`, then a
/// `WAIT` of up to [`WAIT_REPLICAS_TIMEOUT`]): a node that does not answer costs no more.
pub const CLAIM_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

impl ConsumerConfig {
    /// Sane defaults for `streams`/`group`: batches of 256, 1 s block, claim after 5 s idle.
    pub fn new(streams: Vec<String>, group: String) -> Self {
        ConsumerConfig {
            streams,
            group,
            consumer: unique_consumer_name(),
            batch: 256,
            block: Duration::from_millis(1000),
            claim_idle: Duration::from_secs(5),
            tick_every: Duration::from_millis(250),
            keep: Duration::from_secs(3600),
            trim_every: Some(Duration::from_secs(10)),
            wait_replicas: 0,
        }
    }
}

/// `<host>-<pid>-<random>`: unique across processes and restarts.
pub fn unique_consumer_name() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "host".into());
    format!("{host}-{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A decoded entry handed to the handler.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The stream it was read from.
    pub stream: String,
    /// That stream's partition (where replies and dead letters go).
    pub partition: u32,
    /// Stream entry id.
    pub id: String,
    /// The message.
    pub msg: Message,
}

/// What to do with an entry once the handler looked at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done (its effects and replies are written): `XACK`.
    Ack,
    /// Not processable, ever (wrong participant, protocol violation): dead-letter with the reason
    /// and `XACK`.
    DeadLetter(String),
    /// Could not be done now (e.g. Redis unreachable): leave pending; it is claimed again after
    /// `claim_idle`.
    Retry,
}

/// What a handler did with a batch.
#[derive(Debug, Default)]
pub struct Handled {
    /// One per delivery, in order.
    pub dispositions: Vec<Disposition>,
    /// Commands on the stream Redis that carry the batch's results (replies, effects), each
    /// with the partition whose keys it touches (a reply to `rtx:coord:{P}`: `P`). The runtime
    /// runs them together with the `XACK` of the batch in one `MULTI`/`EXEC` (on a cluster, one
    /// per partition, with that partition's acks): an entry is acked exactly when its results
    /// are written, in one round trip.
    pub writes: Vec<(u32, redis::Cmd)>,
}

/// The role-specific part of a worker.
pub trait Handler: Send {
    /// Processes a batch: does the work that is not on the stream Redis (scripts), and returns
    /// one disposition per delivery plus the writes that carry the results. An `Err` means none
    /// of the batch is known done: all of it stays pending.
    fn handle(&mut self, batch: Vec<Delivery>) -> impl Future<Output = Result<Handled>> + Send;
}

/// The partition of `stream` (0 for a stream without one).
fn partition_of(stream: &str) -> u32 {
    keys::partition_of_stream(stream).unwrap_or(0)
}

/// A worker reading a list of streams through one consumer group.
pub struct Consumer {
    url: RedisTarget,
    cfg: ConsumerConfig,
    /// Dedicated to blocking reads, so they never delay other commands (one server).
    read_conn: RedisConn,
    /// A cluster: one reader per stream (keyed by its index in `cfg.streams`).
    readers: Option<StreamReaders>,
    conn: RedisConn,
    /// Per stream (index in `cfg.streams`): where the next `XAUTOCLAIM` scan starts.
    claim_from: Vec<String>,
    /// A cluster with [`ConsumerConfig::wait_replicas`]: per stream, the connection its claims
    /// go on (pinned to its node).
    claimers: Option<Vec<Pinned>>,
    /// What this instance handled, published with `stats` and in its last log line.
    counts: ConsumerCounts,
    stats: Publisher,
    /// A cluster: partitions whose master stopped answering, not claimed from until it does.
    outages: Option<Outages>,
    /// A cluster: changes when a partition comes back in ([`Outages::comebacks`]); a wait for
    /// the readers' answers ends then, so the partition is read again at once, not after the
    /// block (or after a read stuck on a silent master times out).
    comebacks: Option<tokio::sync::watch::Receiver<u64>>,
    /// A cluster with [`ConsumerConfig::wait_replicas`]: where the pinned connections look
    /// slots up.
    slots: Option<Arc<SlotOwners>>,
}

impl Consumer {
    /// Connects and creates the group on every stream if needed.
    pub async fn connect(url: &RedisUrl, cfg: ConsumerConfig) -> Result<Self> {
        Self::connect_target(&RedisTarget::single(url.clone()), cfg).await
    }

    /// [`connect`](Self::connect) to one server or to a Redis Cluster.
    pub async fn connect_target(url: &RedisTarget, cfg: ConsumerConfig) -> Result<Self> {
        assert!(!cfg.streams.is_empty(), "a consumer reads at least one stream");
        // On a cluster a write to a partition whose master is down gives up within about a
        // second, not the crate's ten and more: the step fails, that partition's entries stay
        // pending, and the others' go on at the next step.
        let url = &url.clone().with_cluster_retries(crate::conn::ClusterRetries::QUICK);
        let read_conn = url.connect_with(cfg.block + Duration::from_secs(10)).await?;
        let mut conn = url.connect().await?;
        let outages = match url.is_cluster() {
            true => Some(Outages::connect(url, "partition").await?),
            false => None,
        };
        let (mut made, mut unmade) = (0, None);
        for stream in &cfg.streams {
            match ensure_group(&mut conn, url, stream, &cfg.group).await {
                Ok(()) => made += 1,
                // A cluster: a stream whose master does not answer does not hold up the others.
                // Its partition is out until a probe hears from it; then the first step that
                // meets its missing group (the claim of idle entries) fails, and the failure
                // makes sure of every group (`ensure_groups`).
                Err(e) if e.is_transient() && outages.is_some() => {
                    tracing::warn!(%stream, error = %e, "could not make sure of a stream's group; its partition waits until its master answers");
                    if let Some(o) = &outages {
                        o.mark(partition_of(stream), stream.clone());
                    }
                    unmade = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        // Not one stream answered: the start fails (and is retried) as on one server.
        if let (0, Some(e)) = (made, unmade) {
            return Err(e);
        }
        let claim_from = vec!["0-0".to_string(); cfg.streams.len()];
        // On a cluster with `wait_replicas`, reads and claims go on connections pinned to their
        // stream's node (a `WAIT` must reach the node that served the read or the claim), all
        // placed by one slot map.
        let slots =
            (url.is_cluster() && cfg.wait_replicas > 0).then(|| Arc::new(SlotOwners::new(url.clone(), conn.clone())));
        let readers = url.is_cluster().then(|| {
            let readers = StreamReaders::new(url.clone(), cfg.block);
            match &slots {
                Some(slots) => readers.replicated(slots.clone(), cfg.wait_replicas),
                None => readers,
            }
        });
        let claimers = slots.clone().map(|slots| {
            cfg.streams.iter().map(|s| Pinned::new(keys::slot(s), slots.clone(), CLAIM_RESPONSE_TIMEOUT)).collect()
        });
        let stats = Publisher::participant(&cfg.group, &cfg.consumer);
        let counts = ConsumerCounts::default();
        Ok(Consumer {
            url: url.clone(),
            cfg,
            read_conn,
            readers,
            claimers,
            conn,
            claim_from,
            counts,
            stats,
            comebacks: outages.as_ref().map(Outages::comebacks),
            outages,
            slots,
        })
    }

    /// Runs until `shutdown`: read, handle, ack; claim idle entries and tick on the way.
    pub async fn run<H: Handler>(mut self, handler: &mut H, shutdown: Shutdown) -> Result<()> {
        let mut last_tick = Instant::now() - self.cfg.tick_every;
        let mut last_trim = Instant::now();
        let mut backoff = Backoff::default();
        tracing::info!(streams = ?self.cfg.streams, group = %self.cfg.group, consumer = %self.cfg.consumer, redis = %self.url, "participant started");
        while !shutdown.is_triggered() {
            let step = async {
                self.follow_topology().await;
                if last_tick.elapsed() >= self.cfg.tick_every {
                    last_tick = Instant::now();
                    self.claim_idle(handler).await?;
                    // Sent by a task of its own: this loop does not wait for it.
                    self.stats.publish_if_due(&self.conn, || self.counts.fields());
                }
                if self.cfg.trim_every.is_some_and(|every| last_trim.elapsed() >= every) {
                    last_trim = Instant::now();
                    self.trim().await?;
                }
                // The read is not cancelled on shutdown: an entry Redis delivers to it would sit
                // pending until claimed. It returns within `block`; its batch is then finished.
                let entries = self.read().await?;
                // On a cluster the readers waited already, each on its own node.
                if !entries.is_empty() && self.readers.is_none() {
                    let mut conn = self.read_conn.clone();
                    self.replicated(&mut conn, &entries).await?;
                }
                self.process(handler, entries).await
            };
            match step.await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    let pause = backoff.next();
                    tracing::warn!(error = %e, retry_in = ?pause, "worker step failed; entries stay pending");
                    tokio::select! { _ = tokio::time::sleep(pause) => {}, _ = shutdown.wait() => {} }
                    // A multiplexed connection never recovers from a dropped socket (e.g. a Redis
                    // restart): open fresh ones before the next step. A cluster connection
                    // reconnects by itself, and a new one would first wait for every node, a
                    // frozen one too: only the groups are made sure of.
                    if self.conn.is_cluster() {
                        self.follow_topology().await;
                        self.ensure_groups().await;
                    } else if let Err(e) = self.reconnect().await {
                        tracing::debug!(error = %e, "reconnect failed; retrying after the next pause");
                    }
                }
            }
        }
        self.stats.publish_stopped(&mut self.conn, self.counts.fields()).await;
        let (handled, dead) = (self.counts.handled, self.counts.dead);
        tracing::info!(participant = %self.cfg.group, consumer = %self.cfg.consumer, handled, dead, "participant stopped");
        Ok(())
    }

    /// Replaces both connections with fresh ones and makes sure the groups exist (a Redis that
    /// lost its data also lost the groups).
    async fn reconnect(&mut self) -> Result<()> {
        let read_conn = self.url.connect_with(self.cfg.block + Duration::from_secs(10)).await?;
        let mut conn = self.url.connect().await?;
        for stream in &self.cfg.streams {
            ensure_group(&mut conn, &self.url, stream, &self.cfg.group).await?;
        }
        self.read_conn = read_conn;
        self.conn = conn;
        Ok(())
    }

    /// A cluster: when a master that stopped answering was replaced meanwhile (a probe heard
    /// from its partition only on a fresh connection), replaces the cluster connection too: one
    /// that met only timeouts from the old master still routes its calls there.
    async fn follow_topology(&mut self) {
        let moved = self.outages.as_ref().map(Outages::take_moved).unwrap_or_default();
        if moved.is_empty() {
            return;
        }
        // A read of theirs may still wait on the silent master (sent before the partition was
        // found out, or while it was): given up, it is sent again where the stream is now.
        if let Some(readers) = self.readers.as_mut() {
            for (i, stream) in self.cfg.streams.iter().enumerate() {
                if moved.contains(&partition_of(stream)) {
                    readers.give_up(i);
                }
            }
        }
        match self.url.connect().await {
            Ok(conn) => {
                tracing::info!("a master was replaced while it did not answer: using a fresh cluster connection");
                if let Some(slots) = &self.slots {
                    slots.set_conn(conn.clone());
                }
                self.conn = conn;
            }
            Err(e) => tracing::warn!(error = %e, "could not open a fresh cluster connection; keeping the old one"),
        }
    }

    /// A cluster, after a failed step: makes sure of the group of each stream whose master
    /// answers (a master restarted without its data lost them); a stream whose master does not
    /// is left to the next failure.
    async fn ensure_groups(&mut self) {
        for stream in &self.cfg.streams {
            if self.outages.as_ref().is_some_and(|o| o.is_out(partition_of(stream))) {
                continue;
            }
            if let Err(e) = ensure_group(&mut self.conn, &self.url, stream, &self.cfg.group).await {
                tracing::debug!(%stream, error = %e, "could not make sure of the group; tried again later");
            }
        }
    }

    /// One `XREADGROUP` over every stream; entries tagged with the stream they came from.
    async fn read(&mut self) -> Result<Vec<(usize, StreamId)>> {
        if let Some(readers) = self.readers.as_mut() {
            // A cluster: one read per stream; what arrived within `block` (a reader still
            // blocked answers in a later call).
            for (i, stream) in self.cfg.streams.iter().enumerate() {
                // Not from a partition whose master stopped answering: its answers could not
                // be written.
                if self.outages.as_ref().is_some_and(|o| o.is_out(partition_of(stream))) {
                    readers.give_up(i);
                    continue;
                }
                readers.ask(i, stream, &self.cfg.group, &self.cfg.consumer, self.cfg.batch);
            }
            let mut out = Vec::new();
            let (mut failed, mut failures) = (None, 0);
            let wait = self.cfg.block + Duration::from_millis(50);
            let answers = match self.comebacks.as_mut() {
                // Cancel-safe: an answer is taken whole, or stays queued for the next call.
                Some(back) => tokio::select! {
                    a = readers.answers(wait) => a,
                    _ = back.changed() => Vec::new(),
                },
                None => readers.answers(wait).await,
            };
            for (i, r) in answers {
                match r {
                    Ok(reply) => out.extend(reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).map(|e| (i, e))),
                    Err(e) => {
                        failed = Some(e);
                        failures += 1;
                    }
                }
            }
            return match failed {
                // Every stream failed: the step fails (and pauses).
                Some(e) if failures == self.cfg.streams.len() => Err(e),
                // One partition's master down (a cluster) holds back none of the others: what
                // they read is handled, and the failed stream is read again next round (its
                // reader pauses first).
                Some(e) => {
                    tracing::warn!(error = %e, "a stream read failed; retried next round");
                    Ok(out)
                }
                None => Ok(out),
            };
        }
        let opts = StreamReadOptions::default()
            .group(&self.cfg.group, &self.cfg.consumer)
            .count(self.cfg.batch)
            .block(self.cfg.block.as_millis() as usize);
        let ids = vec![">"; self.cfg.streams.len()];
        let reply: Option<StreamReadReply> = self
            .read_conn
            .xread_options(&self.cfg.streams, &ids, &opts)
            .await
            .map_err(|e| Error::redis(&self.url, e))?;
        let mut out = Vec::new();
        for k in reply.map(|r| r.keys).unwrap_or_default() {
            // Redis answers with the names it was given.
            let Some(i) = self.cfg.streams.iter().position(|s| *s == k.key) else {
                tracing::error!(stream = %k.key, "XREADGROUP answered for a stream it was not asked for");
                continue;
            };
            out.extend(k.ids.into_iter().map(|e| (i, e)));
        }
        Ok(out)
    }

    /// With [`ConsumerConfig::wait_replicas`]: waits (`WAIT`, up to [`WAIT_REPLICAS_TIMEOUT`])
    /// until that many replicas hold everything `conn` has seen, which includes the entries it
    /// just read (`read`: per stream, the ids; see [`retake`]) or claimed. Fewer: an error, and
    /// the entries stay pending.
    async fn replicated(&self, conn: &mut RedisConn, read: &[(usize, StreamId)]) -> Result<()> {
        let wanted = self.cfg.wait_replicas;
        if wanted == 0 {
            return Ok(());
        }
        let taken: Vec<(&str, Vec<&str>)> = (self.cfg.streams.iter().enumerate())
            .map(|(i, stream)| {
                (stream.as_str(), read.iter().filter(|(j, _)| *j == i).map(|(_, e)| e.id.as_str()).collect())
            })
            .collect();
        retake_and_wait(conn, &self.url, &self.cfg.group, &self.cfg.consumer, &taken, wanted).await
    }

    /// Trims every stream (see [`Consumer::trim_stream`]).
    pub async fn trim(&mut self) -> Result<()> {
        for i in 0..self.cfg.streams.len() {
            let stream = self.cfg.streams[i].clone();
            // On a cluster a stream whose master does not answer is trimmed another time; the
            // others go on.
            if self.outages.as_ref().is_some_and(|o| o.is_out(partition_of(&stream))) {
                continue;
            }
            let r = self.trim_stream(&stream).await.map(drop);
            self.unless_slot_outage(i, r, "trimming")?;
        }
        Ok(())
    }

    /// Trims `stream` below the oldest entry some consumer group may still need: the oldest
    /// pending entry and the last delivered one of every group (all groups, not only ours),
    /// and nothing younger than `keep`. Approximate (`MINID ~`), so Redis frees whole nodes.
    /// Returns the `MINID` used, if any.
    pub async fn trim_stream(&mut self, stream: &str) -> Result<Option<String>> {
        trim_stream(&mut self.conn, &self.url, stream, self.cfg.keep).await
    }

    /// `r`, what `what` did on stream `i`, except a slot outage on a cluster: that is logged,
    /// the stream's partition marked out when its master did not answer ([`Outages`]), and the
    /// other streams go on.
    fn unless_slot_outage(&self, i: usize, r: Result<()>, what: &str) -> Result<()> {
        match r {
            Err(e) if self.conn.is_cluster() && e.is_slot_outage() => {
                let stream = &self.cfg.streams[i];
                tracing::warn!(%stream, error = %e, "{what} failed; tried again later");
                if e.is_transient() {
                    if let Some(o) = &self.outages {
                        o.mark(partition_of(stream), stream.clone());
                    }
                }
                Ok(())
            }
            r => r,
        }
    }

    /// Takes over entries idle longer than `claim_idle` (from dead consumers, or our own failed
    /// batches) on every stream and processes them.
    async fn claim_idle<H: Handler>(&mut self, handler: &mut H) -> Result<()> {
        for i in 0..self.cfg.streams.len() {
            let stream = &self.cfg.streams[i];
            let p = partition_of(stream);
            if self.outages.as_ref().is_some_and(|o| o.is_out(p)) {
                continue;
            }
            let r = self.claim_idle_on(handler, i).await;
            self.unless_slot_outage(i, r, "claiming idle entries")?;
        }
        Ok(())
    }

    async fn claim_idle_on<H: Handler>(&mut self, handler: &mut H, i: usize) -> Result<()> {
        // Resume where the previous tick stopped, so a long pending list is covered in turn.
        let mut start = std::mem::replace(&mut self.claim_from[i], "0-0".to_string());
        let mut rounds = 0;
        loop {
            let claim = redis::cmd("XAUTOCLAIM")
                .arg(&self.cfg.streams[i])
                .arg(&self.cfg.group)
                .arg(&self.cfg.consumer)
                .arg(self.cfg.claim_idle.as_millis() as u64)
                .arg(&start)
                .arg("COUNT")
                .arg(self.cfg.batch)
                .clone();
            let reply: StreamAutoClaimReply = match self.claimers.as_mut() {
                Some(pinned) => pinned[i].query(&claim).await?,
                None => claim.query_async(&mut self.conn).await.map_err(|e| Error::redis(&self.url, e))?,
            };
            let n = reply.claimed.len();
            if n > 0 {
                tracing::info!(stream = %self.cfg.streams[i], claimed = n, "took over idle pending entries");
                // `XAUTOCLAIM` is a write of this connection's own: no retake needed.
                match self.claimers.as_mut() {
                    Some(pinned) => replicated(&mut pinned[i], None, self.cfg.wait_replicas).await?,
                    None => {
                        let mut conn = self.conn.clone();
                        self.replicated(&mut conn, &[]).await?;
                    }
                }
                self.process(handler, reply.claimed.into_iter().map(|e| (i, e)).collect()).await?;
            }
            // Redis looks at no more than 10 x COUNT pending entries per call, so a short answer
            // does not mean the end; go on up to a bound per tick, and resume next tick.
            rounds += 1;
            if reply.next_stream_id == "0-0" {
                return Ok(());
            }
            if rounds >= MAX_CLAIM_ROUNDS {
                self.claim_from[i] = reply.next_stream_id;
                return Ok(());
            }
            start = reply.next_stream_id;
        }
    }

    /// Expands each entry into its messages (a [`BATCH`](crate::protocol::BATCH) entry carries
    /// several), hands them to the handler, and writes the results, dead letters and acks. An
    /// entry is acked once every message in it is done or dead-lettered; one message left to
    /// retry keeps its whole entry pending, and the others are answered again when it comes
    /// back (handlers are idempotent). A message that does not decode is dead-lettered alone,
    /// as an entry of its own fields, under its entry's id.
    async fn process<H: Handler>(&mut self, handler: &mut H, entries: Vec<(usize, StreamId)>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut batch = Vec::with_capacity(entries.len());
        // Per delivery: its entry (index in `entries`), and its own fields when it is one
        // message of a batch entry (for its dead letter).
        let mut origin: Vec<(usize, Option<HashMap<String, redis::Value>>)> = Vec::with_capacity(entries.len());
        let mut dead: Vec<(usize, StreamId, String)> = Vec::new();
        // Per entry: whether something in it stays pending.
        let mut keep = vec![false; entries.len()];
        for (n, (i, e)) in entries.iter().enumerate() {
            let items = match items_of_entry(&e.map) {
                Ok(items) => items,
                Err(err) => {
                    dead.push((*i, e.clone(), err.to_string()));
                    continue;
                }
            };
            let single = items.len() == 1 && !is_batch_entry(&e.map);
            let stream = &self.cfg.streams[*i];
            for (k, item) in items.into_iter().enumerate() {
                let own = (!single).then(|| item.fields());
                match item.msg {
                    Ok(msg) => {
                        batch.push(Delivery {
                            partition: partition_of(stream),
                            stream: stream.clone(),
                            id: e.id.clone(),
                            msg,
                        });
                        origin.push((n, own));
                    }
                    Err(err) => match own {
                        None => dead.push((*i, e.clone(), err.to_string())),
                        Some(map) => {
                            let alone = StreamId { id: e.id.clone(), map, ..Default::default() };
                            dead.push((*i, alone, format!("batch message {k}: {err}")))
                        }
                    },
                }
            }
        }
        let mut writes = Vec::new();
        // Messages answered, per partition (counted once their answers are written).
        let mut answered: HashMap<u32, u64> = HashMap::new();
        if !batch.is_empty() {
            let handled = match handler.handle(batch).await {
                Ok(h) => h,
                Err(e) => {
                    // Dead letters found above are still written: they do not depend on the batch.
                    self.commit(Vec::new(), dead, Vec::new(), &Default::default()).await?;
                    return Err(e);
                }
            };
            let dispositions = handled.dispositions;
            assert_eq!(dispositions.len(), origin.len(), "handler must return one disposition per delivery");
            for ((n, own), d) in origin.into_iter().zip(dispositions) {
                let (i, entry) = &entries[n];
                match d {
                    Disposition::Ack => *answered.entry(partition_of(&self.cfg.streams[*i])).or_default() += 1,
                    Disposition::DeadLetter(reason) => match own {
                        None => dead.push((*i, entry.clone(), reason)),
                        Some(map) => {
                            dead.push((*i, StreamId { id: entry.id.clone(), map, ..Default::default() }, reason))
                        }
                    },
                    Disposition::Retry => keep[n] = true,
                }
            }
            writes = handled.writes;
        }
        // Every entry not kept is acked (with its dead letters, if any). A kept entry's
        // dead-lettered messages are written now and again when it comes back; its id must not
        // be acked with them.
        let ack: Vec<(usize, String)> =
            entries.iter().zip(&keep).filter(|(_, kept)| !**kept).map(|((i, e), _)| (*i, e.id.clone())).collect();
        let kept: std::collections::HashSet<(usize, String)> =
            entries.iter().zip(&keep).filter(|(_, k)| **k).map(|((i, e), _)| (*i, e.id.clone())).collect();
        let unwritten = self.commit(writes, dead, ack, &kept).await?;
        self.counts.handled += answered.iter().filter(|(p, _)| !unwritten.contains(p)).map(|(_, n)| n).sum::<u64>();
        Ok(())
    }

    /// Writes the batch's results, its dead letters (copied with the reason, counted, in the
    /// partition of the stream they came from) and the `XACK`s of the handled and dead-lettered
    /// entries as one `MULTI`/`EXEC`: all or nothing, so an entry is never acked without what
    /// it caused (a Redis refusing writes, e.g. at its memory limit, aborts the whole
    /// transaction and the entries stay pending). On a cluster, one partition's transaction may
    /// fail alone on a slot outage: its partitions are returned (their entries stay pending).
    async fn commit(
        &mut self,
        writes: Vec<(u32, redis::Cmd)>,
        dead: Vec<(usize, StreamId, String)>,
        mut ack: Vec<(usize, String)>,
        kept: &std::collections::HashSet<(usize, String)>,
    ) -> Result<Vec<u32>> {
        let mut unwritten = Vec::new();
        if writes.is_empty() && dead.is_empty() && ack.is_empty() {
            return Ok(unwritten);
        }
        // One transaction on one server; on a cluster one per partition (each is one slot).
        let cluster = self.conn.is_cluster();
        let mut pipes: std::collections::BTreeMap<u32, redis::Pipeline> = std::collections::BTreeMap::new();
        fn pipe_of(
            pipes: &mut std::collections::BTreeMap<u32, redis::Pipeline>,
            cluster: bool,
            partition: u32,
        ) -> &mut redis::Pipeline {
            pipes.entry(if cluster { partition } else { 0 }).or_insert_with(|| {
                let mut p = redis::pipe();
                p.atomic();
                p
            })
        }
        for (partition, c) in writes {
            pipe_of(&mut pipes, cluster, partition).add_command(c).ignore();
        }
        let now = crate::now_ms();
        for (i, entry, reason) in &dead {
            let stream = &self.cfg.streams[*i];
            tracing::warn!(%stream, id = %entry.id, %reason, "dead-lettering entry");
            let fields = dead_letter_fields(stream, &self.cfg.group, &entry.id, reason, now, &entry.map);
            let partition = partition_of(stream);
            let p = pipe_of(&mut pipes, cluster, partition);
            p.xadd(keys::dead_letter_stream(partition), "*", &fields).ignore();
            p.hincr(keys::dead_letter_counts(partition), stream, 1).ignore();
        }
        ack.extend(dead.iter().map(|(i, e, _)| (*i, e.id.clone())).filter(|k| !kept.contains(k)));
        ack.sort();
        ack.dedup();
        // One XACK per stream.
        let mut by_stream: HashMap<usize, Vec<String>> = HashMap::new();
        for (i, id) in ack {
            by_stream.entry(i).or_default().push(id);
        }
        for (i, ids) in &by_stream {
            let stream = &self.cfg.streams[*i];
            pipe_of(&mut pipes, cluster, partition_of(stream)).xack(stream, &self.cfg.group, ids).ignore();
        }
        if !cluster {
            let p = pipes.into_values().next().expect("something to write");
            p.query_async::<()>(&mut self.conn).await.map_err(|e| Error::redis(&self.url, e))?;
        } else {
            let parts: Vec<u32> = pipes.keys().copied().collect();
            for (p, r) in parts.into_iter().zip(self.conn.query_each::<()>(pipes.into_values().collect()).await) {
                match r.map_err(|e| Error::redis(&self.url, e)) {
                    // One partition's master down or not answering: its entries stay pending
                    // (claimed again once it is back) and the others' writes stand. Its
                    // partition is not read from or claimed from until it answers.
                    Err(e) if e.is_transient() => {
                        tracing::warn!(partition = p, error = %e, "writing a partition's answers failed; its entries stay pending");
                        if let Some(o) = &self.outages {
                            o.mark(p, keys::coord_stream(p));
                        }
                        unwritten.push(p);
                    }
                    r => r?,
                }
            }
        }
        let written =
            |(i, _, _): &&(usize, StreamId, String)| !unwritten.contains(&partition_of(&self.cfg.streams[*i]));
        self.counts.dead += dead.iter().filter(written).count() as u64;
        Ok(unwritten)
    }
}

/// The fields of a dead letter (`XADD rtx:dead:{P} * <fields>`): where the entry came from
/// (`stream`, `group`, `id`), why (`reason`), when (`at`, ms), and its original fields as
/// `orig.<field>` (bulk strings only), so an operator can inspect or re-drive it.
pub fn dead_letter_fields(
    stream: &str,
    group: &str,
    id: &str,
    reason: &str,
    at_ms: u64,
    original: &HashMap<String, redis::Value>,
) -> Vec<(String, Vec<u8>)> {
    let mut fields: Vec<(String, Vec<u8>)> = vec![
        ("stream".into(), stream.as_bytes().to_vec()),
        ("group".into(), group.as_bytes().to_vec()),
        ("id".into(), id.as_bytes().to_vec()),
        ("reason".into(), reason.as_bytes().to_vec()),
        ("at".into(), at_ms.to_string().into_bytes()),
    ];
    let mut orig: Vec<(&String, &Vec<u8>)> = original
        .iter()
        .filter_map(|(k, v)| match v {
            redis::Value::BulkString(b) => Some((k, b)),
            _ => None,
        })
        .collect();
    orig.sort();
    fields.extend(orig.into_iter().map(|(k, v)| (format!("orig.{k}"), v.clone())));
    fields
}

/// Trims `stream` below the oldest entry some consumer group may still need: the oldest
/// pending entry and the last delivered one of every group (all groups, not only the caller's),
/// and nothing younger than `keep`. Approximate (`MINID ~`), so Redis frees whole nodes.
/// Returns the `MINID` used, if any. Shared by participants and coordinators.
pub async fn trim_stream(
    conn: &mut (impl redis::aio::ConnectionLike + Send + Sync),
    url: &(impl std::fmt::Display + Sync),
    stream: &str,
    keep: Duration,
) -> Result<Option<String>> {
    let groups: StreamInfoGroupsReply = conn.xinfo_groups(stream).await.map_err(|e| Error::redis(url, e))?;
    let keep_from = crate::now_ms().saturating_sub(keep.as_millis() as u64);
    let mut floor = (keep_from, 0);
    for g in &groups.groups {
        floor = floor.min(parse_id(&g.last_delivered_id).unwrap_or((0, 0)));
        if g.pending > 0 {
            let p: StreamPendingReply = conn.xpending(stream, &g.name).await.map_err(|e| Error::redis(url, e))?;
            if let StreamPendingReply::Data(d) = p {
                floor = floor.min(parse_id(&d.start_id).unwrap_or((0, 0)));
            }
        }
    }
    if floor == (0, 0) {
        return Ok(None);
    }
    let minid = format!("{}-{}", floor.0, floor.1);
    let trimmed: u64 = redis::cmd("XTRIM")
        .arg(stream)
        .arg("MINID")
        .arg("~")
        .arg(&minid)
        .query_async(conn)
        .await
        .map_err(|e| Error::redis(url, e))?;
    if trimmed > 0 {
        tracing::debug!(%stream, trimmed, %minid, "trimmed stream");
    }
    Ok(Some(minid))
}

/// A stream entry id `ms-seq` as a pair, for ordering.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// `XGROUP CREATE stream group 0 MKSTREAM`, tolerating an existing group.
pub async fn ensure_group(
    conn: &mut (impl redis::aio::ConnectionLike + Send + Sync),
    url: &(impl std::fmt::Display + Sync),
    stream: &str,
    group: &str,
) -> Result<()> {
    let r: redis::RedisResult<()> = conn.xgroup_create_mkstream(stream, group, "0").await;
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(Error::redis(url, e)),
    }
}

/// What a stream reader of [`StreamReaders`] answers: the caller's key of the stream, and what
/// its `XREADGROUP` returned.
pub type ReadAnswer = (usize, Result<Option<StreamReadReply>>);

/// Blocking reads of several streams on a Redis Cluster, one `XREADGROUP` per stream: one task
/// per stream, each reading on a cluster connection of its own, once per [`ask`](Self::ask).
/// The coordinator reads its owned partitions' streams with it, a participant its partitions'.
///
/// Why this shape: one `XREADGROUP` cannot name streams of several slots (`CROSSSLOT`), and a
/// blocking read holds its connection to the node (a second read or any command to that node
/// would wait behind it), so each stream needs its own read on its own connection. Blocking
/// reads keep the latency of a new entry at one round trip and cost no CPU while idle;
/// non-blocking reads of 8 partitions would have to poll, trading latency against CPU. A
/// stream's reader is asked again only once its answer was taken: at most one read per
/// stream is in flight, and the caller handles its entries in order, as with one read on one
/// server. An idle reader costs its connections (one socket per node) and nothing else.
pub struct StreamReaders {
    target: RedisTarget,
    block: Duration,
    /// With [`replicated`](Self::replicated): each read goes on a connection pinned to its
    /// slot's node, and is followed by `WAIT` for this many replicas on it.
    wait: Option<(Arc<SlotOwners>, u32)>,
    readers: HashMap<usize, StreamReader>,
    done_tx: tokio::sync::mpsc::UnboundedSender<ReadAnswer>,
    done_rx: tokio::sync::mpsc::UnboundedReceiver<ReadAnswer>,
}

struct StreamReader {
    ask: tokio::sync::mpsc::UnboundedSender<()>,
    busy: bool,
    task: tokio::task::AbortHandle,
}

impl StreamReaders {
    /// Readers on `target` whose reads block up to `block`.
    pub fn new(target: RedisTarget, block: Duration) -> Self {
        let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
        StreamReaders { target, block, wait: None, readers: HashMap::new(), done_tx, done_rx }
    }

    /// Readers that answer with entries only once `replicas` replicas of the node that served
    /// the read hold what it read (see [`ConsumerConfig::wait_replicas`]): each read goes on a
    /// connection pinned to its stream's node ([`Pinned`]), then `WAIT` on that connection; fewer
    /// replicas, and the answer is [`Error::NotReplicated`] (the entries stay pending).
    /// `slots`: where the cluster's slots are served (shared with the caller's other pinned
    /// connections).
    pub fn replicated(mut self, slots: Arc<SlotOwners>, replicas: u32) -> Self {
        if replicas > 0 {
            self.wait = Some((slots, replicas));
        }
        self
    }

    /// Has the reader of `stream` (the caller's `key` for it) read up to `count` new entries
    /// through `group` as `consumer`, unless it is reading already; starts it if needed.
    pub fn ask(&mut self, key: usize, stream: &str, group: &str, consumer: &str, count: usize) {
        let reader = self.readers.entry(key).or_insert_with(|| {
            let (ask, asked) = tokio::sync::mpsc::unbounded_channel();
            let opts = StreamReadOptions::default()
                .group(group, consumer)
                .count(count)
                .block(self.block.as_millis().max(1) as usize);
            let task = match &self.wait {
                None => tokio::spawn(read_stream(
                    self.target.clone(),
                    self.block,
                    key,
                    stream.to_string(),
                    opts,
                    asked,
                    self.done_tx.clone(),
                )),
                Some((slots, replicas)) => {
                    let conn = Pinned::new(keys::slot(stream), slots.clone(), self.block + Duration::from_secs(10));
                    let (stream, group, consumer) = (stream.to_string(), group.to_string(), consumer.to_string());
                    let read = PinnedRead { conn, stream, group, consumer, opts, replicas: *replicas };
                    tokio::spawn(read.run(key, asked, self.done_tx.clone()))
                }
            };
            StreamReader { ask, busy: false, task: task.abort_handle() }
        });
        if !reader.busy && reader.ask.send(()).is_ok() {
            reader.busy = true;
        }
    }

    /// Gives up the reader of the caller's `key` (a stream whose master stopped answering: its
    /// read in flight went there, and would hold the stream until its timeout, long after a
    /// replica was elected). The next [`ask`](Self::ask) starts a new one, which looks up where
    /// the stream is served. Entries the given-up read took stay pending and are claimed.
    pub fn give_up(&mut self, key: usize) {
        if let Some(r) = self.readers.remove(&key) {
            r.task.abort();
        }
    }

    /// The answers there are after waiting up to `wait` for the first. A reader still
    /// blocked goes on; its answer comes with a later call.
    pub async fn answers(&mut self, wait: Duration) -> Vec<ReadAnswer> {
        let mut out = Vec::new();
        if let Ok(Some(a)) = tokio::time::timeout(wait, self.done_rx.recv()).await {
            out.push(a);
            while let Ok(a) = self.done_rx.try_recv() {
                out.push(a);
            }
        }
        for (key, _) in &out {
            if let Some(r) = self.readers.get_mut(key) {
                r.busy = false;
            }
        }
        out
    }
}

impl Drop for StreamReaders {
    fn drop(&mut self) {
        for r in self.readers.values() {
            r.task.abort();
        }
    }
}

/// The reader of one stream (see [`StreamReaders`]): one `XREADGROUP` per request, on a cluster
/// connection of its own (which follows `MOVED`/`ASK` and failovers by itself); after an error
/// it starts from a fresh connection, after a short pause so that a node that is down is not
/// hammered.
async fn read_stream(
    target: RedisTarget,
    block: Duration,
    key: usize,
    stream: String,
    opts: StreamReadOptions,
    mut asked: tokio::sync::mpsc::UnboundedReceiver<()>,
    done: tokio::sync::mpsc::UnboundedSender<ReadAnswer>,
) {
    let mut conn: Option<RedisConn> = None;
    while asked.recv().await.is_some() {
        if conn.is_none() {
            match target.connect_with(block + Duration::from_secs(10)).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::debug!(%stream, error = %e, "stream reader cannot connect");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if done.send((key, Err(e))).is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let r: redis::RedisResult<Option<StreamReadReply>> = c.xread_options(&[&stream], &[">"], &opts).await;
        if r.is_err() {
            conn = None;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if done.send((key, r.map_err(|e| Error::redis(&target, e)))).is_err() {
            return;
        }
    }
}

/// The reader of one stream for [`StreamReaders::replicated`]: `XREADGROUP` on a connection
/// pinned to the stream's node, then, if it delivered entries, `WAIT` on that connection.
struct PinnedRead {
    conn: Pinned,
    stream: String,
    group: String,
    consumer: String,
    opts: StreamReadOptions,
    replicas: u32,
}

impl PinnedRead {
    async fn run(
        mut self,
        key: usize,
        mut asked: tokio::sync::mpsc::UnboundedReceiver<()>,
        done: tokio::sync::mpsc::UnboundedSender<ReadAnswer>,
    ) {
        while asked.recv().await.is_some() {
            // A redirect (`MOVED`, `ASK`: a slot on the move) is followed at once, a few times,
            // as the cluster client would; other errors are answered after a pause.
            let mut r = self.read().await;
            for _ in 0..3 {
                if !(r.is_err() && self.conn.redirected()) {
                    break;
                }
                r = self.read().await;
            }
            if r.is_err() && !self.conn.redirected() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if done.send((key, r)).is_err() {
                return;
            }
        }
    }

    async fn read(&mut self) -> Result<Option<StreamReadReply>> {
        let mut read = redis::cmd("XREADGROUP");
        read.arg(&self.opts).arg("STREAMS").arg(&self.stream).arg(">");
        let reply: Option<StreamReadReply> = self.conn.query(&read).await?;
        let ids: Vec<&str> = reply.iter().flat_map(|r| &r.keys).flat_map(|k| &k.ids).map(|e| e.id.as_str()).collect();
        if !ids.is_empty() {
            let (group, consumer) = (&self.group, &self.consumer);
            replicated(&mut self.conn, Some(&retake(&self.stream, group, consumer, &ids)), self.replicas).await?;
        }
        Ok(reply)
    }
}

/// `XCLAIM <stream> <group> <consumer> 0 <ids> JUSTID`: takes entries this consumer was just
/// given again. A no-op for the group, but a write this connection makes itself, which is what a
/// `WAIT` after it waits for. A `WAIT` right after a read alone is not enough: Redis 7.0 does not
/// count what a blocked `XREADGROUP` did once it is served (nor the `XADD` that woke it) as the
/// reading connection's writes, so `WAIT` then answers for that connection's earlier writes and
/// may count a replica that is missing the entries (seen with a frozen replica: about one read
/// in four served from blocking got `WAIT` 1).
fn retake(stream: &str, group: &str, consumer: &str, ids: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd("XCLAIM");
    c.arg(stream).arg(group).arg(consumer).arg(0).arg(ids).arg("JUSTID");
    c
}

/// On one server: takes the entries `conn` just read or claimed again (`taken`: per stream, the
/// ids; `retake`), then `WAIT`s on `conn`, in one round trip, until `replicas` replicas hold
/// them; fewer within [`WAIT_REPLICAS_TIMEOUT`]: [`Error::NotReplicated`] (the entries stay
/// pending). Used by participants and coordinators with `--wait-replicas`.
pub async fn retake_and_wait(
    conn: &mut RedisConn,
    url: &(impl std::fmt::Display + ?Sized),
    group: &str,
    consumer: &str,
    taken: &[(&str, Vec<&str>)],
    replicas: u32,
) -> Result<()> {
    let started = Instant::now();
    let mut pipe = redis::pipe();
    for (stream, ids) in taken {
        if !ids.is_empty() {
            pipe.add_command(retake(stream, group, consumer, ids)).ignore();
        }
    }
    pipe.cmd("WAIT").arg(replicas).arg(WAIT_REPLICAS_TIMEOUT.as_millis() as u64);
    let (got,): (i64,) = pipe.query_async(conn).await.map_err(|e| Error::redis(url, e))?;
    if got < i64::from(replicas) {
        return Err(Error::NotReplicated { url: url.to_string(), wanted: replicas, got, waited: started.elapsed() });
    }
    Ok(())
}

/// `WAIT` on `conn` (after `before`, `retake`) until `replicas` replicas hold what it read or
/// claimed; fewer within [`WAIT_REPLICAS_TIMEOUT`]: [`Error::NotReplicated`] (the entries stay
/// pending).
pub async fn replicated(conn: &mut Pinned, before: Option<&redis::Cmd>, replicas: u32) -> Result<()> {
    let started = Instant::now();
    let got = conn.wait(before, replicas, WAIT_REPLICAS_TIMEOUT).await?;
    if got < i64::from(replicas) {
        let url = conn.node_name();
        return Err(Error::NotReplicated { url, wanted: replicas, got, waited: started.elapsed() });
    }
    Ok(())
}

/// Exponential backoff between retries, with named presets.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    current: Option<Duration>,
}

impl Default for Backoff {
    /// 50 ms doubling to 2 s: for a worker waiting out a Redis restart.
    fn default() -> Self {
        Backoff { first: Duration::from_millis(50), max: Duration::from_secs(2), current: None }
    }
}

impl Backoff {
    /// 1 ms doubling to 50 ms: for a producer polling a result.
    pub fn fast() -> Self {
        Backoff { first: Duration::from_millis(1), max: Duration::from_millis(50), current: None }
    }

    /// The next pause.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Duration {
        let d = match self.current {
            None => self.first,
            Some(d) => (d * 2).min(self.max),
        };
        self.current = Some(d);
        d
    }

    /// Back to the first pause.
    pub fn reset(&mut self) {
        self.current = None;
    }
}
