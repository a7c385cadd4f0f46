//! The producer library: submit a transaction, read its record, wait for its outcome.
//!
//! ```no_run
//! # async fn demo() -> redtx_common::Result<()> {
//! use redtx_common::{Client, spec::{Branch, IncrbyOp, Op, TxnSpec}};
//! let client = Client::connect("redis://127.0.0.1:6379").await?.with_partitions(8);
//! let spec = TxnSpec::new(vec![
//!     Branch::kv("bank-a", vec![Op::Incrby(IncrbyOp { key: "acct:alice".into(), by: -10, min: Some(0), max: None })]),
//!     Branch::kv("bank-b", vec![Op::incrby("acct:bob", 10)]),
//! ]);
//! let record = client.submit_and_wait(&spec, std::time::Duration::from_secs(30)).await?;
//! println!("{} is {}", record.id, record.state);
//! # Ok(()) }
//! ```
//!
//! A transaction goes to partition `crc32(id) % partitions` ([`keys::partition`]); the
//! `Client` must use the deployment's partition count ([`Client::with_partitions`]).
//!
//! Waiting does not poll: one background task per `Client` reads every partition's outcomes
//! stream (`rtx:outcomes:{P}`) in one blocking `XREAD` and wakes the waiters of each transaction
//! that settles. The record is checked after registering, so an outcome that came before the
//! wait is not missed. A lost connection, a Redis restart or `LOADING` are waited out until
//! the caller's time limit: submitting the same id again is safe.
//!
//! # On a Redis Cluster
//!
//! [`Client::connect_cluster`] (or [`Client::connect_target`] with a cluster
//! [`RedisTarget`]): submits, status reads and the participant check go through one cluster
//! connection (each touches one partition, hence one slot). One `XREAD` cannot name streams of
//! several slots (`CROSSSLOT`, even on one node), and a blocking read holds its connection, so
//! the waiter runs one reader per partition, each blocking on its own connection to the node
//! serving that partition: a `Client` costs `partitions` reader connections plus two per node
//! (its cluster connection, and the one that probes a partition whose master stopped
//! answering), however many transactions it waits for, and still never polls. A
//! reader follows `MOVED` (a slot moved, a failover) and `ASK` (a slot migrating) and, when its
//! node goes away, asks the cluster where the slot is now; meanwhile the waiters' periodic
//! record check covers it.

use crate::conn::{RedisConn, RedisTarget, RedisUrl};
use crate::outage::Outages;
use crate::protocol::{Message, Submit};
use crate::record::{TxnRecord, TxnState};
use crate::slots::{Pinned, SlotOwners};
use crate::spec::TxnSpec;
use crate::{keys, Error, Result};
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OnceCell};

/// A producer's handle on redtx. Cheap to clone; clones share one connection and one waiter.
#[derive(Clone)]
pub struct Client {
    target: RedisTarget,
    partitions: u32,
    /// How often a waiter reads the record again in case its outcome was missed.
    recheck: Duration,
    /// Reconnects by itself (a connection manager, or a cluster connection), so a long-lived
    /// producer survives a Redis restart or a failover; on a cluster it is also replaced after
    /// calls keep going unanswered ([`Link`]).
    link: Arc<Link>,
    waiters: Arc<Waiters>,
}

/// The client's connection, shared by its clones; on a Redis Cluster, with the partitions
/// whose master stopped answering, and replaceable.
///
/// A master that stops answering (frozen, its host gone, the network cut) makes every call to
/// it wait out its timeout, and each timed-out call may make the cluster connection refresh its
/// slot map, which holds every other call on it meanwhile: one silent master would slow the
/// client's calls to every partition. So the first unanswered call of a partition marks it
/// *out* ([`Outages`]): the client's calls to it then fail at once with a transient error (the
/// caller's retry paces them, and is woken when a partition comes back) until a probe of its
/// own hears from the partition again, from the old master or the elected one.
///
/// A master silent for good never answers `MOVED` once its replica is elected, and the cluster
/// connection would keep sending its slots to it. When a probe is answered only on a fresh
/// connection, the next call takes that connection up as the client's own (for the outcome
/// readers' slot look-ups too) before it is made: it routes the partition to its new master.
/// Nothing is lost: a call that failed is retried by its caller (a submit sent again is
/// harmless).
struct Link {
    conn: std::sync::RwLock<RedisConn>,
    /// A cluster: the outcome readers' slot look-ups.
    slots: Option<Arc<SlotOwners>>,
    /// A cluster: the partitions whose master does not answer.
    outages: Option<Outages>,
}

impl Link {
    fn new(target: &RedisTarget, conn: RedisConn, outages: Option<Outages>) -> Self {
        Link {
            slots: target.is_cluster().then(|| Arc::new(SlotOwners::new(target.clone(), conn.clone()))),
            conn: std::sync::RwLock::new(conn),
            outages,
        }
    }

    fn conn(&self) -> RedisConn {
        self.conn.read().expect("client connection lock").clone()
    }

    /// A cluster: when a probe was answered only on a fresh connection (its master was
    /// replaced while it was silent), takes that connection up as the client's own and the slot
    /// look-ups', before the next call is made: it routes the partition to its new master.
    fn follow(&self, target: &RedisTarget) {
        let Some(outages) = &self.outages else { return };
        if !outages.moved() {
            return;
        }
        // Taken and replaced under the lock: a call that finds the change taken already waits
        // for the fresh connection instead of going out on the old one.
        let mut conn = self.conn.write().expect("client connection lock");
        if !outages.take_topology_changed() {
            return;
        }
        tracing::info!(
            redis = %target.redacted(),
            "a master was replaced while it did not answer: the client takes up the fresh cluster connection that reached its successor"
        );
        let fresh = outages.conn();
        if let Some(slots) = &self.slots {
            slots.set_conn(fresh.clone());
        }
        *conn = fresh;
    }
}

/// How often, by default, a waiter reads its record again although nothing woke it
/// ([`Client::with_recheck`]).
pub const RECHECK: Duration = Duration::from_secs(10);

/// How a transaction settled ([`TxnState::is_settled`]), as a producer learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The transaction's id.
    pub id: String,
    /// Its settled state.
    pub state: TxnState,
    /// Why it aborted, compensated, got stuck or was rejected.
    pub reason: Option<String>,
}

impl From<TxnRecord> for Outcome {
    fn from(r: TxnRecord) -> Outcome {
        Outcome { id: r.id, state: r.state, reason: r.reason }
    }
}

#[derive(Default)]
struct Waiters {
    by_txn: Mutex<HashMap<String, Vec<oneshot::Sender<Option<Outcome>>>>>,
    /// One server: the one reader of every partition's outcomes.
    readers: OnceCell<Vec<tokio::task::AbortHandle>>,
    /// A cluster: each partition's reader, started by the first wait on that partition (a
    /// master that does not answer holds up only the start of its own partitions' readers).
    partition_readers: Mutex<HashMap<u32, Arc<OnceCell<tokio::task::AbortHandle>>>>,
    /// Told by an outcome reader whose read failed: outcomes may have gone by unseen (a
    /// restart that lost them, a connection lost while they were trimmed), so every waiter
    /// reads its record again.
    reread: tokio::sync::Notify,
}

impl Drop for Waiters {
    fn drop(&mut self) {
        for h in self.readers.get().into_iter().flatten() {
            h.abort();
        }
        for cell in self.partition_readers.get_mut().unwrap().values() {
            if let Some(h) = cell.get() {
                h.abort();
            }
        }
    }
}

impl Waiters {
    /// Wakes the waiters of the transaction an outcome entry names.
    /// Each gets the outcome the entry carries, if it carries a whole one (a settled state and
    /// its reason), else `None` (read the record).
    fn wake(&self, entry: &redis::streams::StreamId) {
        let field = |k: &str| match entry.map.get(k) {
            Some(redis::Value::BulkString(v)) => Some(String::from_utf8_lossy(v).into_owned()),
            _ => None,
        };
        let Some(id) = field("id") else { return };
        let senders = self.by_txn.lock().unwrap().remove(&id);
        let Some(senders) = senders else { return };
        let outcome = match (field("state").as_deref().and_then(TxnState::parse), field("reason")) {
            (Some(state), Some(reason)) if state.is_settled() => {
                Some(Outcome { id, state, reason: Some(reason).filter(|r| !r.is_empty()) })
            }
            _ => None,
        };
        for s in senders {
            let _ = s.send(outcome.clone());
        }
    }
}

impl Client {
    /// Connects to the Redis holding the streams (one server). Errors carry the URL without its
    /// password.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_target(RedisTarget::single(RedisUrl::parse(url)?)).await
    }

    /// Connects to a Redis Cluster holding the streams, known by one or more of its nodes.
    pub async fn connect_cluster(seeds: &[&str]) -> Result<Self> {
        let seeds = seeds.iter().map(|s| RedisUrl::parse(s)).collect::<Result<Vec<_>>>()?;
        Self::connect_target(RedisTarget::cluster(seeds)?).await
    }

    /// Connects to `target`: one server, or a cluster. A single server that turns out to be a
    /// cluster node is refused ([`Error::IsACluster`]): most of its keys would be elsewhere.
    pub async fn connect_target(target: RedisTarget) -> Result<Self> {
        // On a cluster, a call to a master that does not answer gives up within about a second
        // and a half (and is retried, as any transient failure): the partitions of the other
        // masters, which share this connection, are not held up behind it for long.
        let target = target.with_cluster_retries(crate::conn::ClusterRetries::QUICK);
        let mut conn = match target.is_cluster() {
            true => target.connect().await?,
            false => target.connect_managed(Duration::from_secs(10)).await?,
        };
        if !target.is_cluster() {
            // Also the check that the server answers; a user not allowed `INFO` gets a `PING`.
            let info: redis::RedisResult<String> = redis::cmd("INFO").arg("cluster").query_async(&mut conn).await;
            match info {
                Ok(info) if info.lines().any(|l| l.trim() == "cluster_enabled:1") => {
                    return Err(Error::IsACluster { url: target.redacted().to_string() })
                }
                Ok(_) => {}
                Err(e) if e.code() == Some("NOPERM") => {
                    let _: () =
                        redis::cmd("PING").query_async(&mut conn).await.map_err(|e| Error::redis(&target, e))?;
                }
                Err(e) => return Err(Error::redis(&target, e)),
            }
        }
        let outages = match target.is_cluster() {
            true => Some(Outages::connect(&target, "partition").await?),
            false => None,
        };
        Ok(Client {
            link: Arc::new(Link::new(&target, conn, outages)),
            target,
            partitions: keys::DEFAULT_PARTITIONS,
            recheck: RECHECK,
            waiters: Arc::default(),
        })
    }

    /// Uses `partitions` (the deployment's `--partitions`) instead of the default.
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions.clamp(1, keys::MAX_PARTITIONS);
        self
    }

    /// How often a waiter reads the record again although no outcome woke it (default
    /// [`RECHECK`]). Waiters do not poll: an outcome entry wakes them, and a failed outcome read
    /// makes every waiter read its record once. This is the last safety net, for an outcome the
    /// reader skipped without failing (its stream trimmed past it: 100,000 outcomes behind).
    /// Tests make it long to see the reader alone at work.
    pub fn with_recheck(mut self, every: Duration) -> Self {
        self.recheck = every.max(Duration::from_millis(10));
        self
    }

    /// The partition count this client hashes ids over.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partition of transaction `id`.
    pub fn partition(&self, id: &str) -> u32 {
        keys::partition(id, self.partitions)
    }

    /// Where this client talks to: one server or a cluster (`Display` hides passwords).
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// The URL this client talks to (a cluster's first seed).
    pub fn url(&self) -> &RedisUrl {
        self.target.url()
    }

    /// Validates `spec` and enqueues it; returns its id. Nothing is enqueued if it is invalid.
    /// Submitting an id that exists already does not create a second transaction. A transient
    /// failure (a lost connection, a Redis restarting) is tried again a few times, then
    /// returned: on a Redis Cluster, a partition whose master stopped answering fails at once
    /// until the client hears from it again ([`Error::is_transient`]: submit again, with the same
    /// id; [`submit_and_wait`](Self::submit_and_wait) does, until its timeout).
    pub async fn submit(&self, spec: &TxnSpec) -> Result<String> {
        spec.validate()?;
        let msg = Message::Submit(Submit { spec: spec.clone(), submitted_ms: crate::now_ms() });
        let p = self.partition(&spec.id);
        let stream = keys::coord_stream(p);
        let fields = msg.fields();
        // A connection that just dropped (a Redis restart) is re-opened by the manager on the
        // next call: retry a few times. A submit that did land and is sent again is harmless.
        let mut backoff = crate::consumer::Backoff::default();
        for attempt in 1.. {
            let r = match self.open(p) {
                // A partition whose master does not answer: an attempt too (its probe may hear
                // from it meanwhile).
                Err(e) => Err(e),
                Ok(()) => {
                    let mut conn = self.link.conn();
                    let r: redis::RedisResult<String> = conn.xadd(&stream, "*", &fields).await;
                    self.answered(p, &r);
                    r.map_err(|e| Error::redis(&self.target, e))
                }
            };
            match r {
                Ok(_) => break,
                Err(e) if e.is_transient() && attempt < 4 => self.pause(p, backoff.next()).await,
                Err(e) => return Err(e),
            }
        }
        Ok(spec.id.clone())
    }

    /// The participants of `spec` that have never connected to this Redis (no consumer group on
    /// their stream yet): likely typos, or workers not started. Such a transaction aborts at its
    /// deadline and stays `aborting` until the participant applies the abort.
    pub async fn missing_participants(&self, spec: &TxnSpec) -> Result<Vec<String>> {
        let part = self.partition(&spec.id);
        self.open(part)?;
        let mut p = redis::pipe();
        p.ignore_errors();
        for b in &spec.branches {
            p.cmd("XINFO").arg("GROUPS").arg(keys::participant_stream(&b.participant, part));
        }
        let mut conn = self.link.conn();
        let replies: redis::RedisResult<Vec<redis::RedisResult<redis::streams::StreamInfoGroupsReply>>> =
            p.query_async(&mut conn).await;
        self.answered(part, &replies);
        let replies = replies.map_err(|e| Error::redis(&self.target, e))?;
        let mut missing = Vec::new();
        for (b, r) in spec.branches.iter().zip(replies) {
            // No stream ("no such key") or no group of that name: nobody ever read it.
            let known = r.map(|g| g.groups.iter().any(|g| g.name == b.participant)).unwrap_or(false);
            if !known {
                missing.push(b.participant.clone());
            }
        }
        Ok(missing)
    }

    /// Reads the record of `id`; `None` if there is none (never submitted, not yet picked up
    /// by a coordinator, or expired after its retention window).
    pub async fn status(&self, id: &str) -> Result<Option<TxnRecord>> {
        let p = self.partition(id);
        self.open(p)?;
        let mut conn = self.link.conn();
        let h: redis::RedisResult<HashMap<String, Vec<u8>>> = conn.hgetall(keys::txn_record(p, id)).await;
        self.answered(p, &h);
        let h = h.map_err(|e| Error::redis(&self.target, e))?;
        TxnRecord::from_hash(id, &h).map_err(|detail| Error::ScriptReply { script: "record", detail })
    }

    /// Waits until `id` is settled ([`TxnState::is_settled`](crate::record::TxnState::is_settled):
    /// committed, aborted or aborting, completed, compensated, stuck, or rejected: the
    /// coordinator refused the submit, the record's reason says why) and returns its record.
    /// "Committed" and "completed" mean every participant has applied the change. A lost
    /// connection is retried until `timeout`; then it gives up with [`Error::WaitTimeout`]
    /// (the transaction goes on).
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<TxnRecord> {
        self.wait_inner(id, timeout, None, TxnState::is_settled).await
    }

    /// [`wait`](Self::wait), but past `aborting`: until `id` ends (committed, aborted, completed,
    /// compensated or rejected), or is `stuck`. `aborting` is told at the moment of the
    /// decision; `aborted` once every participant has undone its part and released its locks,
    /// so a read right after sees them free. The price: an abort whose participant is gone is
    /// reported only once it is back.
    pub async fn wait_final(&self, id: &str, timeout: Duration) -> Result<TxnRecord> {
        self.wait_inner(id, timeout, None, |s| s.is_terminal() || s == TxnState::Stuck).await
    }

    /// `wait`, where `woken` (if given) is a waiter registered before the transaction was
    /// submitted: every outcome of it comes after, so the first record read can wait for it.
    async fn wait_inner(
        &self,
        id: &str,
        timeout: Duration,
        mut woken: Option<oneshot::Receiver<Option<Outcome>>>,
        done: fn(TxnState) -> bool,
    ) -> Result<TxnRecord> {
        let started = Instant::now();
        let mut backoff = crate::consumer::Backoff::default();
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            let attempt = async {
                if let Some(rx) = woken.take() {
                    self.woken_or_reread(rx, left).await;
                }
                self.start_reader(self.partition(id)).await?;
                let rx = self.register(id);
                // Listening before the record is read: a reader back from failed reads after
                // that read is not missed.
                let reread = self.waiters.reread.notified();
                tokio::pin!(reread);
                reread.as_mut().enable();
                if let Some(r) = self.status(id).await? {
                    if done(r.state) {
                        return Ok(Some(r));
                    }
                }
                self.woken_or(rx, left, reread).await;
                Ok::<_, Error>(None)
            };
            match attempt.await {
                Ok(Some(r)) => {
                    self.forget(id);
                    return Ok(r);
                }
                Ok(None) => backoff.reset(),
                Err(e) if e.is_transient() && !left.is_zero() => {
                    tracing::debug!(error = %e, "waiting for an outcome: Redis unavailable; retrying");
                    self.pause(self.partition(id), backoff.next().min(left)).await;
                }
                Err(e) => {
                    self.forget(id);
                    return Err(e);
                }
            }
            if started.elapsed() >= timeout {
                self.forget(id);
                return Err(Error::WaitTimeout { id: id.to_string(), waited: started.elapsed() });
            }
        }
    }

    /// Waits until `rx` is woken (its outcome, or its reader gone), an outcome reader's read
    /// failed (outcomes may have gone by unseen: read the record again), the re-check time
    /// passed, or `left` is over; returns the outcome `rx` got, if it got a whole one.
    async fn woken_or_reread(&self, rx: oneshot::Receiver<Option<Outcome>>, left: Duration) -> Option<Outcome> {
        let reread = self.waiters.reread.notified();
        tokio::pin!(reread);
        self.woken_or(rx, left, reread).await
    }

    /// [`woken_or_reread`](Self::woken_or_reread) with the reader's signal listened to already.
    async fn woken_or(
        &self,
        rx: oneshot::Receiver<Option<Outcome>>,
        left: Duration,
        reread: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    ) -> Option<Outcome> {
        tokio::select! {
            r = tokio::time::timeout(left.min(self.recheck), rx) => r.ok().and_then(Result::ok).flatten(),
            () = reread => None,
        }
    }

    /// Registers a waiter for `id`'s next outcome.
    fn register(&self, id: &str) -> oneshot::Receiver<Option<Outcome>> {
        let (tx, rx) = oneshot::channel();
        self.waiters.by_txn.lock().unwrap().entry(id.to_string()).or_default().push(tx);
        rx
    }

    /// [`submit`](Self::submit) then [`wait`](Self::wait). A submit that fails for a transient
    /// reason (lost connection, Redis restarting) is retried with the same id until `timeout`:
    /// a second submit never creates a second transaction.
    pub async fn submit_and_wait(&self, spec: &TxnSpec, timeout: Duration) -> Result<TxnRecord> {
        let started = Instant::now();
        let (id, woken) = self.register_and_submit(spec, started, timeout).await?;
        self.wait_inner(&id, timeout.saturating_sub(started.elapsed()), woken, TxnState::is_settled).await
    }

    /// [`submit_and_wait`](Self::submit_and_wait) for a producer that needs only how the
    /// transaction settled, and why: usually answered by the outcomes stream's entry alone (it
    /// carries the state and the reason), with no record read; else from the record.
    pub async fn submit_and_wait_outcome(&self, spec: &TxnSpec, timeout: Duration) -> Result<Outcome> {
        let started = Instant::now();
        let (id, woken) = self.register_and_submit(spec, started, timeout).await?;
        if let Some(rx) = woken {
            let left = timeout.saturating_sub(started.elapsed());
            match self.woken_or_reread(rx, left).await {
                Some(outcome) => return Ok(outcome),
                // Woken without a whole outcome, or not yet: the record says.
                None => self.forget(&id),
            }
        }
        let record =
            self.wait_inner(&id, timeout.saturating_sub(started.elapsed()), None, TxnState::is_settled).await?;
        Ok(Outcome::from(record))
    }

    /// Registers a waiter for `spec` (when the outcome reader runs), then submits it, retrying
    /// a transient failure with the same id until `timeout` after `started`. Registered before
    /// the submit: the outcome can only come after it, so no record read is needed before it
    /// does (one round trip less per transaction).
    async fn register_and_submit(
        &self,
        spec: &TxnSpec,
        started: Instant,
        timeout: Duration,
    ) -> Result<(String, Option<oneshot::Receiver<Option<Outcome>>>)> {
        let woken = match self.start_reader(self.partition(&spec.id)).await {
            Ok(()) => Some(self.register(&spec.id)),
            Err(_) => None,
        };
        let mut backoff = crate::consumer::Backoff::default();
        loop {
            match self.submit(spec).await {
                Ok(id) => return Ok((id, woken)),
                Err(e) if e.is_transient() && started.elapsed() < timeout => {
                    tracing::debug!(error = %e, "submit: Redis unavailable; retrying");
                    self.pause(self.partition(&spec.id), backoff.next()).await;
                }
                Err(e) => {
                    self.forget(&spec.id);
                    return Err(e);
                }
            }
        }
    }

    fn forget(&self, id: &str) {
        let mut m = self.waiters.by_txn.lock().unwrap();
        if let Some(v) = m.get_mut(id) {
            v.retain(|s| !s.is_closed());
            if v.is_empty() {
                m.remove(id);
            }
        }
    }

    /// Starts the reader of partition `p`'s outcomes if it does not run yet: one reader of every
    /// partition on one server, one reader per partition on a cluster. Each starts after the
    /// newest outcome present when it starts (older ones are visible in records), and is
    /// started before anything it waits for is submitted.
    async fn start_reader(&self, p: u32) -> Result<()> {
        if !self.target.is_cluster() {
            self.waiters
                .readers
                .get_or_try_init(|| async {
                    let from = self.last_outcomes().await?;
                    let conn = self.target.connect_managed(Duration::from_secs(15)).await?;
                    let streams: Vec<String> = (0..self.partitions).map(keys::outcomes_stream).collect();
                    let waiters = Arc::downgrade(&self.waiters);
                    Ok::<_, Error>(vec![tokio::spawn(read_outcomes(conn, waiters, streams, from)).abort_handle()])
                })
                .await?;
            return Ok(());
        }
        let cell = self.waiters.partition_readers.lock().unwrap().entry(p).or_default().clone();
        cell.get_or_try_init(|| async {
            let from = self.last_outcome(p).await?;
            let reader = PartitionReader::new(p, from, self.link.clone(), self.target.clone());
            Ok::<_, Error>(tokio::spawn(reader.run(Arc::downgrade(&self.waiters))).abort_handle())
        })
        .await?;
        Ok(())
    }

    /// Whether partition `p` may be called now: not while its master does not answer (a
    /// transient error at once, with no call made; [`Link`]). Also takes up the probe's fresh
    /// connection when a probe was answered only on a fresh one ([`Link::follow`]).
    fn open(&self, p: u32) -> Result<()> {
        let Some(outages) = &self.link.outages else { return Ok(()) };
        // Out first: a probe that marks a partition back in has made its connection the one to
        // take up before it does.
        let out = outages.is_out(p);
        self.link.follow(&self.target);
        if !out {
            return Ok(());
        }
        let e = std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the master of partition {p} does not answer; calls to it wait until a probe hears from it"),
        );
        Err(Error::redis(&self.target, redis::RedisError::from(e)))
    }

    /// Pauses a retry of a call to partition `p` for `at_most`; on a cluster, while `p` is
    /// out, only until its master is heard from again.
    async fn pause(&self, p: u32, at_most: Duration) {
        match &self.link.outages {
            Some(outages) if outages.is_out(p) => outages.wait_in(p, at_most).await,
            _ => tokio::time::sleep(at_most).await,
        }
    }

    /// Notes how a call to partition `p` went: on a Redis Cluster, a call no node answered
    /// (after the cluster connection's retries: a timeout, a connection lost or refused) marks
    /// the partition out until a probe hears from it ([`Link`]).
    fn answered<T>(&self, p: u32, r: &redis::RedisResult<T>) {
        let Some(outages) = &self.link.outages else { return };
        if let Err(e) = r {
            if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
                outages.mark(p, keys::coord_stream(p));
            }
        }
    }

    /// The id of the newest entry of every partition's outcomes stream (`0-0`: none), on one
    /// server: one pipeline.
    async fn last_outcomes(&self) -> Result<Vec<String>> {
        let mut p = redis::pipe();
        for part in 0..self.partitions {
            p.add_command(newest_outcome(part));
        }
        let mut conn = self.link.conn();
        let lasts: Vec<Entries> = p.query_async(&mut conn).await.map_err(|e| Error::redis(&self.target, e))?;
        Ok(lasts.into_iter().map(first_id).collect())
    }

    /// The id of the newest entry of partition `p`'s outcomes stream (`0-0`: none), on a
    /// cluster: at once a transient error while `p`'s master does not answer ([`Link`]).
    async fn last_outcome(&self, p: u32) -> Result<String> {
        self.open(p)?;
        let r = newest_outcome(p).query_async::<Entries>(&mut self.link.conn()).await;
        self.answered(p, &r);
        Ok(first_id(r.map_err(|e| Error::redis(&self.target, e))?))
    }
}

/// Stream entries as `XRANGE` returns them.
type Entries = Vec<(String, HashMap<String, redis::Value>)>;

/// `XREVRANGE` of the newest entry of partition `p`'s outcomes stream.
fn newest_outcome(p: u32) -> redis::Cmd {
    let mut c = redis::cmd("XREVRANGE");
    c.arg(keys::outcomes_stream(p)).arg("+").arg("-").arg("COUNT").arg(1);
    c
}

/// The id of the first of `entries`, `0-0` if there is none.
fn first_id(entries: Entries) -> String {
    entries.into_iter().next().map(|(id, _)| id).unwrap_or_else(|| "0-0".into())
}

/// One server: every partition's outcomes stream in one blocking `XREAD`.
async fn read_outcomes(mut conn: RedisConn, waiters: Weak<Waiters>, streams: Vec<String>, mut from: Vec<String>) {
    let opts = StreamReadOptions::default().count(1024).block(5000);
    let mut failed = false;
    loop {
        let r: redis::RedisResult<Option<StreamReadReply>> = conn.xread_options(&streams, &from, &opts).await;
        let Some(waiters) = waiters.upgrade() else { return };
        if r.is_ok() && std::mem::take(&mut failed) {
            // Back after failed reads: outcomes may have gone by unseen.
            waiters.reread.notify_waiters();
        }
        match r {
            Ok(Some(reply)) => {
                for k in reply.keys {
                    let Some(i) = streams.iter().position(|s| *s == k.key) else { continue };
                    for e in k.ids {
                        waiters.wake(&e);
                        from[i] = e.id;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "outcome reader: retrying");
                failed = true;
                drop(waiters);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A cluster: the blocking reader of one partition's outcomes stream, on a connection of its
/// own to the node serving the partition's slot.
///
/// A read sent to a master that then stopped answering would wait out its whole timeout, long
/// after the replica was elected. So whenever a partition comes back in ([`Outages`]), the
/// reader gives up the read in flight (an `XREAD` from an id: nothing is lost), takes up the
/// client's fresh connection if there is one ([`Link::follow`]), and reads again where the slot
/// is served now.
struct PartitionReader {
    stream: String,
    from: String,
    conn: Pinned,
    link: Arc<Link>,
    target: RedisTarget,
}

/// How long one blocking read waits, and how long a reply may take beyond that.
const READ_BLOCK: Duration = Duration::from_secs(5);
const READ_SLACK: Duration = Duration::from_secs(10);

impl PartitionReader {
    fn new(partition: u32, from: String, link: Arc<Link>, target: RedisTarget) -> Self {
        let slots = link.slots.clone().expect("a cluster client has slot look-ups");
        let conn = Pinned::new(keys::partition_slot(partition), slots, READ_BLOCK + READ_SLACK);
        PartitionReader { stream: keys::outcomes_stream(partition), from, conn, link, target }
    }

    async fn run(mut self, waiters: Weak<Waiters>) {
        let opts = StreamReadOptions::default().count(1024).block(READ_BLOCK.as_millis() as usize);
        let mut comebacks = self.link.outages.as_ref().map(Outages::comebacks);
        let mut failed = false;
        loop {
            if waiters.strong_count() == 0 {
                return;
            }
            let mut read = redis::cmd("XREAD");
            read.arg(&opts).arg("STREAMS").arg(&self.stream).arg(&self.from);
            let r: Result<Option<StreamReadReply>> = match comebacks.as_mut() {
                None => self.conn.query(&read).await,
                Some(back) => tokio::select! {
                    r = self.conn.query(&read) => r,
                    changed = back.changed() => {
                        if changed.is_err() {
                            comebacks = None;
                        }
                        self.link.follow(&self.target);
                        self.conn.forget();
                        continue;
                    }
                },
            };
            let Some(waiters) = waiters.upgrade() else { return };
            if r.is_ok() && std::mem::take(&mut failed) {
                // Back after failed reads: outcomes may have gone by unseen.
                waiters.reread.notify_waiters();
            }
            match r {
                Ok(reply) => {
                    for e in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                        waiters.wake(&e);
                        self.from = e.id;
                    }
                }
                Err(_) if self.conn.redirected() => {}
                Err(e) => {
                    tracing::debug!(error = %e, stream = %self.stream, "outcome reader: retrying");
                    failed = true;
                    drop(waiters);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}
