//! The producer library: submit a transaction, read its record, wait for its outcome.
//!
//! ```no_run
//! # async fn demo() -> redtx_common::Result<()> {
//! use redtx_common::{Client, spec::{Branch, IncrbyOp, Op, TxnSpec}};
//! let client = Client::connect("redis://127.0.0.1:6379").await?;
//! let spec = TxnSpec::new(vec![
//!     Branch { participant: "bank-a".into(), ops: vec![Op::Incrby(IncrbyOp { key: "acct:alice".into(), by: -10, min: Some(0), max: None })] },
//!     Branch { participant: "bank-b".into(), ops: vec![Op::incrby("acct:bob", 10)] },
//! ]);
//! let record = client.submit_and_wait(&spec, std::time::Duration::from_secs(30)).await?;
//! println!("{} is {}", record.id, record.state);
//! # Ok(()) }
//! ```
//!
//! Waiting does not poll: one background task per `Client` reads the outcomes stream
//! (`rtx:outcomes:{0}`) and wakes the waiters of each transaction that ends. The record is
//! checked after registering, so an outcome that came before the wait is not missed.

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
        Ok(Client { url, conn, waiters: Arc::default() })
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
        let mut conn = self.conn.clone();
        let _: String =
            conn.xadd(keys::coord_stream(), "*", &msg.fields()).await.map_err(|e| Error::redis(&self.url, e))?;
        Ok(spec.id.clone())
    }

    /// The participants of `spec` that have never connected to this Redis (no consumer group on
    /// their stream yet): likely typos, or workers not started. Such a transaction aborts at its
    /// deadline and stays `aborting` until the participant applies the abort.
    pub async fn missing_participants(&self, spec: &TxnSpec) -> Result<Vec<String>> {
        let mut p = redis::pipe();
        p.ignore_errors();
        for b in &spec.branches {
            p.cmd("XINFO").arg("GROUPS").arg(keys::participant_stream(&b.participant));
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
            conn.hgetall(keys::txn_record(id)).await.map_err(|e| Error::redis(&self.url, e))?;
        TxnRecord::from_hash(id, &h).map_err(|detail| Error::ScriptReply { script: "record", detail })
    }

    /// Waits until `id` is committed or aborted (every participant has applied the outcome) and
    /// returns its record. After `timeout`, gives up with [`Error::WaitTimeout`]; the transaction
    /// goes on.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<TxnRecord> {
        self.start_reader().await?;
        let started = Instant::now();
        loop {
            let (tx, rx) = oneshot::channel();
            self.waiters.by_txn.lock().unwrap().entry(id.to_string()).or_default().push(tx);
            if let Some(r) = self.status(id).await? {
                if r.state.is_terminal() {
                    self.forget(id);
                    return Ok(r);
                }
            }
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                self.forget(id);
                return Err(Error::WaitTimeout { id: id.to_string(), waited: started.elapsed() });
            }
            // The periodic re-check covers a reader that lost its connection.
            let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), rx).await;
        }
    }

    /// [`submit`](Self::submit) then [`wait`](Self::wait).
    pub async fn submit_and_wait(&self, spec: &TxnSpec, timeout: Duration) -> Result<TxnRecord> {
        self.start_reader().await?;
        let id = self.submit(spec).await?;
        self.wait(&id, timeout).await
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
                // Start after the newest outcome now present: older ones are visible in records.
                let last: Vec<(String, HashMap<String, redis::Value>)> = redis::cmd("XREVRANGE")
                    .arg(keys::outcomes_stream())
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| Error::redis(&self.url, e))?;
                let from = last.into_iter().next().map(|(id, _)| id).unwrap_or_else(|| "0-0".into());
                let task = tokio::spawn(read_outcomes(conn, Arc::downgrade(&self.waiters), from));
                Ok::<_, Error>(task.abort_handle())
            })
            .await?;
        Ok(())
    }
}

async fn read_outcomes(mut conn: ConnectionManager, waiters: Weak<Waiters>, mut from: String) {
    let stream = keys::outcomes_stream();
    let opts = StreamReadOptions::default().count(1024).block(5000);
    loop {
        let r: redis::RedisResult<Option<StreamReadReply>> = conn.xread_options(&[&stream], &[&from], &opts).await;
        let Some(waiters) = waiters.upgrade() else { return };
        match r {
            Ok(Some(reply)) => {
                let mut m = waiters.by_txn.lock().unwrap();
                for e in reply.keys.into_iter().flat_map(|k| k.ids) {
                    if let Some(redis::Value::BulkString(id)) = e.map.get("id") {
                        if let Some(senders) = m.remove(String::from_utf8_lossy(id).as_ref()) {
                            for s in senders {
                                let _ = s.send(());
                            }
                        }
                    }
                    from = e.id;
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
