//! The coordinator's write pipeline: fenced calls are sent in the order they were made, without
//! the loop waiting for them, so the next batch is read and stepped while Redis applies the last
//! one's writes.
//!
//! A task of its own owns the sending: it takes every call queued since its last send and
//! sends them as one pipeline (on a Redis Cluster: one pipeline per partition, each in order),
//! then answers each [`Writer::send`] with its replies. Calls of one partition therefore reach
//! Redis in the order the loop made them.
//!
//! Order alone does not make a later write safe when an earlier one was not applied (refused
//! under `OOM`, lost with its connection, answered `NOSCRIPT`): the later one was stepped on top
//! of the earlier one's effects. `fenced.lua` closes that gap with a per-partition write
//! sequence (`rtx:wseq:{P}`): each call names the sequence number it follows, and a call whose
//! predecessor was not applied is refused whole. The loop then reloads the partition.

use redis::{RedisResult, Value};
use redtx_common::conn::{RedisConn, RedisTarget};
use redtx_common::scripts::{self, Call};
use redtx_common::{Error, Result};
use tokio::sync::{mpsc, oneshot};

/// The replies of one [`Writer::send`], one per call, in order; or why none is known.
pub type Replies = std::result::Result<Vec<RedisResult<Value>>, String>;

struct Job {
    /// Each call with the partition it writes (its order key on a cluster).
    calls: Vec<(u32, Call)>,
    reply: oneshot::Sender<Replies>,
}

/// Sends fenced calls in order (see the module doc).
pub struct Writer {
    tx: mpsc::UnboundedSender<Job>,
}

impl Writer {
    /// Starts the sending task on `conn`. It ends once the `Writer` is dropped and everything
    /// queued is sent.
    pub fn start(conn: RedisConn, url: RedisTarget) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(send_loop(rx, conn, url));
        Writer { tx }
    }

    /// Queues `calls` (each with the partition it writes) behind every call queued before.
    /// The receiver gets one reply per call.
    pub fn send(&self, calls: Vec<(u32, Call)>) -> oneshot::Receiver<Replies> {
        let (reply, rx) = oneshot::channel();
        // The task lives as long as the sender: a failed send only drops `reply`, which the
        // receiver sees as "no reply".
        let _ = self.tx.send(Job { calls, reply });
        rx
    }
}

async fn send_loop(mut rx: mpsc::UnboundedReceiver<Job>, conn: RedisConn, url: RedisTarget) {
    let cluster = conn.is_cluster();
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while let Ok(j) = rx.try_recv() {
            jobs.push(j);
        }
        let sizes: Vec<usize> = jobs.iter().map(|j| j.calls.len()).collect();
        let mut calls = Vec::with_capacity(sizes.iter().sum());
        let mut replies_to = Vec::with_capacity(jobs.len());
        for j in jobs {
            calls.extend(j.calls);
            replies_to.push(j.reply);
        }
        let replies =
            if cluster { per_partition(&conn, &url, calls).await } else { one_pipeline(&conn, &url, calls).await };
        match replies {
            Ok(mut all) => {
                for (reply, n) in replies_to.into_iter().zip(sizes).rev() {
                    let mine = all.split_off(all.len() - n);
                    let _ = reply.send(Ok(mine));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for reply in replies_to {
                    let _ = reply.send(Err(msg.clone()));
                }
            }
        }
    }
}

/// One server: every call in one pipeline, in order.
async fn one_pipeline(conn: &RedisConn, url: &RedisTarget, calls: Vec<(u32, Call)>) -> Result<Vec<RedisResult<Value>>> {
    let calls: Vec<Call> = calls.into_iter().map(|(_, c)| c).collect();
    scripts::run(&mut conn.clone(), url, &calls).await
}

/// A cluster: one pipeline per partition (a pipeline goes whole to one node), each keeping its
/// calls' order, all sent at once. Replies in the calls' order; a partition's pipeline that
/// failed whole gives each of its calls that error.
async fn per_partition(
    conn: &RedisConn,
    url: &RedisTarget,
    calls: Vec<(u32, Call)>,
) -> Result<Vec<RedisResult<Value>>> {
    let n = calls.len();
    let mut groups: Vec<(u32, Vec<usize>, Vec<Call>)> = Vec::new();
    for (i, (p, call)) in calls.into_iter().enumerate() {
        match groups.iter_mut().find(|g| g.0 == p) {
            Some(g) => {
                g.1.push(i);
                g.2.push(call);
            }
            None => groups.push((p, vec![i], vec![call])),
        }
    }
    let tasks: Vec<_> = groups
        .into_iter()
        .map(|(_, at, calls)| {
            let (mut conn, url) = (conn.clone(), url.clone());
            (at, tokio::spawn(async move { scripts::run(&mut conn, &url, &calls).await }))
        })
        .collect();
    let mut out: Vec<Option<RedisResult<Value>>> = (0..n).map(|_| None).collect();
    for (at, task) in tasks {
        match task.await.map_err(|e| Error::Io(std::io::Error::other(e)))? {
            Ok(replies) => {
                for (i, r) in at.into_iter().zip(replies) {
                    out[i] = Some(r);
                }
            }
            // A partition whose node could not be reached (its master down): each of its calls
            // gets the error, and the other partitions' replies stand.
            Err(Error::Redis { source, .. }) => {
                for i in at {
                    out[i] = Some(Err(source.clone()));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out.into_iter().map(|r| r.expect("one reply per call")).collect())
}
