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

use crate::conn::RedisUrl;
use crate::protocol::{Message, Submit};
use crate::record::TxnRecord;
use crate::spec::TxnSpec;
use crate::{keys, Error, Result};
use redis::aio::ConnectionManager;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OnceCell};

/// A producer's handle on redtx. Cheap to clone; clones share one connection and one waiter.
#[derive(Clone)]
pub struct Client {
    url: RedisUrl,
    partitions: u32,
    /// Reconnects by itself, so a long-lived producer survives a Redis restart.
    conn: ConnectionManager,
    waiters: Arc<Waiters>,
}

#[derive(Default)]
struct Waiters {
    by_txn: Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>,
    reader: OnceCell<tokio::task::AbortHandle>,
}

impl Drop for Waiters {
    fn drop(&mut self) {
        if let Some(h) = self.reader.get() {
            h.abort();
        }
    }
}

impl Client {
    /// Connects to the Redis holding the streams. Errors carry the URL without its password.
    pub async fn connect(url: &str) -> Result<Self> {
        let url = RedisUrl::parse(url)?;
        let mut conn = url.connect_managed(Duration::from_secs(10)).await?;
        let _: () = redis::cmd("PING").query_async(&mut conn).await.map_err(|e| Error::redis(&url, e))?;
        Ok(Client { url, partitions: keys::DEFAULT_PARTITIONS, conn, waiters: Arc::default() })
    }

    /// Uses `partitions` (the deployment's `--partitions`) instead of the default.
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions.clamp(1, keys::MAX_PARTITIONS);
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

    /// The URL this client talks to.
    pub fn url(&self) -> &RedisUrl {
        &self.url
    }

    /// Validates `spec` and enqueues it; returns its id. Nothing is enqueued if it is invalid.
    /// Submitting an id that exists already does not create a second transaction.
    pub async fn submit(&self, spec: &TxnSpec) -> Result<String> {
        spec.validate()?;
        let msg = Message::Submit(Submit { spec: spec.clone(), submitted_ms: crate::now_ms() });
        let stream = keys::coord_stream(self.partition(&spec.id));
        let fields = msg.fields();
        // A connection that just dropped (a Redis restart) is re-opened by the manager on the
        // next call: retry a few times. A submit that did land and is sent again is harmless.
        let mut backoff = crate::consumer::Backoff::default();
        for attempt in 1.. {
            let mut conn = self.conn.clone();
            let r: redis::RedisResult<String> = conn.xadd(&stream, "*", &fields).await;
            match r.map_err(|e| Error::redis(&self.url, e)) {
                Ok(_) => break,
                Err(e) if e.is_transient() && attempt < 4 => tokio::time::sleep(backoff.next()).await,
                Err(e) => return Err(e),
            }
        }
        Ok(spec.id.clone())
    }

    /// The participants of `spec` that have never connected to this Redis (no consumer group on
    /// their stream yet): likely typos, or workers not started. Such a transaction aborts at its
    /// deadline and stays `aborting` until the participant applies the abort.
    pub async fn missing_participants(&self, spec: &TxnSpec) -> Result<Vec<String>> {
        let mut p = redis::pipe();
        p.ignore_errors();
        for b in &spec.branches {
            p.cmd("XINFO").arg("GROUPS").arg(keys::participant_stream(&b.participant, self.partition(&spec.id)));
        }
        let mut conn = self.conn.clone();
        let replies: Vec<redis::RedisResult<redis::streams::StreamInfoGroupsReply>> =
            p.query_async(&mut conn).await.map_err(|e| Error::redis(&self.url, e))?;
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
        let mut conn = self.conn.clone();
        let h: HashMap<String, Vec<u8>> =
            conn.hgetall(keys::txn_record(self.partition(id), id)).await.map_err(|e| Error::redis(&self.url, e))?;
        TxnRecord::from_hash(id, &h).map_err(|detail| Error::ScriptReply { script: "record", detail })
    }

    /// Waits until `id` is settled ([`TxnState::is_settled`](crate::record::TxnState::is_settled):
    /// committed, aborted or aborting, completed, compensated, stuck, or rejected: the
    /// coordinator refused the submit, the record's reason says why) and returns its record.
    /// "Committed" and "completed" mean every participant has applied the change. A lost
    /// connection is retried until `timeout`; then it gives up with [`Error::WaitTimeout`]
    /// (the transaction goes on).
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<TxnRecord> {
        self.wait_inner(id, timeout, None).await
    }

    /// `wait`, where `woken` (if given) is a waiter registered before the transaction was
    /// submitted: every outcome of it comes after, so the first record read can wait for it.
    async fn wait_inner(
        &self,
        id: &str,
        timeout: Duration,
        mut woken: Option<oneshot::Receiver<()>>,
    ) -> Result<TxnRecord> {
        let started = Instant::now();
        let mut backoff = crate::consumer::Backoff::default();
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            let attempt = async {
                if let Some(rx) = woken.take() {
                    let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), rx).await;
                }
                self.start_reader().await?;
                let rx = self.register(id);
                if let Some(r) = self.status(id).await? {
                    if r.state.is_settled() {
                        return Ok(Some(r));
                    }
                }
                // The periodic re-check covers a reader that lost its connection.
                let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), rx).await;
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
                    tokio::time::sleep(backoff.next().min(left)).await;
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

    /// Registers a waiter for `id`'s next outcome.
    fn register(&self, id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.waiters.by_txn.lock().unwrap().entry(id.to_string()).or_default().push(tx);
        rx
    }

    /// [`submit`](Self::submit) then [`wait`](Self::wait). A submit that fails for a transient
    /// reason (lost connection, Redis restarting) is retried with the same id until `timeout`:
    /// a second submit never creates a second transaction.
    pub async fn submit_and_wait(&self, spec: &TxnSpec, timeout: Duration) -> Result<TxnRecord> {
        let started = Instant::now();
        let mut backoff = crate::consumer::Backoff::default();
        // Registered before the submit: the outcome can only come after it, so no record read
        // is needed before it does (one round trip less per transaction).
        let woken = match self.start_reader().await {
            Ok(()) => Some(self.register(&spec.id)),
            Err(_) => None,
        };
        let id = loop {
            match self.submit(spec).await {
                Ok(id) => break id,
                Err(e) if e.is_transient() && started.elapsed() < timeout => {
                    tracing::debug!(error = %e, "submit: Redis unavailable; retrying");
                    tokio::time::sleep(backoff.next()).await;
                }
                Err(e) => {
                    self.forget(&spec.id);
                    return Err(e);
                }
            }
        };
        self.wait_inner(&id, timeout.saturating_sub(started.elapsed()), woken).await
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

    async fn start_reader(&self) -> Result<()> {
        self.waiters
            .reader
            .get_or_try_init(|| async {
                let mut conn = self.url.connect_managed(Duration::from_secs(15)).await?;
                // Start after the newest outcome now present in each partition: older ones are
                // visible in records.
                let streams: Vec<String> = (0..self.partitions).map(keys::outcomes_stream).collect();
                let mut p = redis::pipe();
                for s in &streams {
                    p.cmd("XREVRANGE").arg(s).arg("+").arg("-").arg("COUNT").arg(1);
                }
                let lasts: Vec<Vec<(String, HashMap<String, redis::Value>)>> =
                    p.query_async(&mut conn).await.map_err(|e| Error::redis(&self.url, e))?;
                let from = lasts
                    .into_iter()
                    .map(|l| l.into_iter().next().map(|(id, _)| id).unwrap_or_else(|| "0-0".into()))
                    .collect();
                let task = tokio::spawn(read_outcomes(conn, Arc::downgrade(&self.waiters), streams, from));
                Ok::<_, Error>(task.abort_handle())
            })
            .await?;
        Ok(())
    }
}

async fn read_outcomes(
    mut conn: ConnectionManager,
    waiters: Weak<Waiters>,
    streams: Vec<String>,
    mut from: Vec<String>,
) {
    let opts = StreamReadOptions::default().count(1024).block(5000);
    loop {
        let r: redis::RedisResult<Option<StreamReadReply>> = conn.xread_options(&streams, &from, &opts).await;
        let Some(waiters) = waiters.upgrade() else { return };
        match r {
            Ok(Some(reply)) => {
                let mut m = waiters.by_txn.lock().unwrap();
                for k in reply.keys {
                    let Some(i) = streams.iter().position(|s| *s == k.key) else { continue };
                    for e in k.ids {
                        if let Some(redis::Value::BulkString(id)) = e.map.get("id") {
                            if let Some(senders) = m.remove(String::from_utf8_lossy(id).as_ref()) {
                                for s in senders {
                                    let _ = s.send(());
                                }
                            }
                        }
                        from[i] = e.id;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "outcome reader: retrying");
                drop(waiters);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
