//! Shared helpers of the participant's integration tests (real Redis servers only).
#![allow(dead_code)]

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use redtx_common::conn::RedisUrl;
use redtx_common::protocol::{Message, Prepare, Resolve};
use redtx_common::server::RedisServer;
use redtx_common::spec::{Branch, Op};
use std::time::{Duration, Instant};

pub const NAME: &str = "bank-a";

pub fn server() -> RedisServer {
    RedisServer::start().expect("redis-server starts")
}

pub async fn conn(s: &RedisServer) -> MultiplexedConnection {
    RedisUrl::parse(&s.url()).unwrap().connect().await.unwrap()
}

pub fn prepare(txn: &str, ops: Vec<Op>) -> Prepare {
    Prepare { txn: txn.into(), branch: 0, participant: NAME.into(), deadline_ms: redtx_common::now_ms() + 60_000, ops }
}

/// The commit/abort body matching `p` (its keys in `Branch::keys()` order).
pub fn resolve(p: &Prepare) -> Resolve {
    let keys = Branch { participant: p.participant.clone(), ops: p.ops.clone() }.keys();
    Resolve { txn: p.txn.clone(), branch: p.branch, participant: p.participant.clone(), keys }
}

pub async fn get(c: &mut MultiplexedConnection, key: &str) -> Option<String> {
    c.get(key).await.unwrap()
}

pub async fn hget(c: &mut MultiplexedConnection, key: &str, field: &str) -> Option<String> {
    c.hget(key, field).await.unwrap()
}

pub async fn xadd(c: &mut MultiplexedConnection, stream: &str, fields: &[(&str, Vec<u8>)]) {
    let _: String = c.xadd(stream, "*", fields).await.unwrap();
}

pub async fn send(c: &mut MultiplexedConnection, msg: &Message) {
    let participant = match msg {
        Message::Prepare(p) => p.participant.clone(),
        Message::Commit(r) | Message::Abort(r) => r.participant.clone(),
        _ => NAME.into(),
    };
    xadd(c, &redtx_common::keys::participant_stream(&participant), &msg.fields()[..]).await;
}

/// Every message on the coordinator stream so far.
pub async fn coord_messages(c: &mut MultiplexedConnection) -> Vec<Message> {
    let r: redis::streams::StreamRangeReply = c.xrange_all(redtx_common::keys::coord_stream()).await.unwrap();
    r.ids.iter().map(|e| Message::from_entry(&e.map).unwrap()).collect()
}

/// Waits until the coordinator stream holds at least `n` messages and returns them.
pub async fn wait_messages(c: &mut MultiplexedConnection, n: usize) -> Vec<Message> {
    let started = Instant::now();
    loop {
        let m = coord_messages(c).await;
        if m.len() >= n {
            return m;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "waited for {n} replies, got {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
