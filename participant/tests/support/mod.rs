//! Shared helpers of the participant's integration tests (real Redis servers only).
#![allow(dead_code)]

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use redtx_common::conn::RedisUrl;
use redtx_common::kv::{encode_ops, Op};
use redtx_common::protocol::{Execute, Message, Prepare, Resolve};
use redtx_common::server::RedisServer;
use redtx_participant::{worker, Answer, KvResource, Request};
use std::time::{Duration, Instant};

pub const NAME: &str = "bank-a";
pub const RETENTION: Duration = Duration::from_secs(3600);

pub fn server() -> RedisServer {
    RedisServer::start().expect("redis-server starts")
}

pub async fn conn(s: &RedisServer) -> MultiplexedConnection {
    RedisUrl::parse(&s.url()).unwrap().connect().await.unwrap()
}

pub fn kv(s: &RedisServer) -> KvResource {
    kv_named(s, NAME)
}

pub fn kv_named(s: &RedisServer, name: &str) -> KvResource {
    KvResource::new(RedisUrl::parse(&s.url()).unwrap(), name, RETENTION)
}

pub fn prepare(txn: &str, ops: Vec<Op>) -> Prepare {
    Prepare {
        txn: txn.into(),
        branch: 0,
        participant: NAME.into(),
        deadline_ms: redtx_common::now_ms() + 60_000,
        payload: encode_ops(&ops),
    }
}

pub fn resolve(txn: &str) -> Resolve {
    Resolve { txn: txn.into(), branch: 0, participant: NAME.into() }
}

pub fn execute(txn: &str, ops: Vec<Op>) -> Execute {
    Execute { txn: txn.into(), branch: 0, participant: NAME.into(), attempt: 1, payload: encode_ops(&ops) }
}

/// Settles one request through the runtime; `Err` if it stayed pending.
pub async fn ask(r: &mut KvResource, req: Request) -> Result<Answer, String> {
    worker::settle(r, &[req], redtx_common::now_ms()).await.map_err(|e| e.to_string())?.pop().unwrap()
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

/// Sends `msg` to its participant's stream of partition `p`.
pub async fn send_to(c: &mut MultiplexedConnection, p: u32, msg: &Message) {
    let participant = msg.participant().unwrap_or(NAME).to_string();
    xadd(c, &redtx_common::keys::participant_stream(&participant, p), &msg.fields()[..]).await;
}

/// Sends `msg` to partition 0.
pub async fn send(c: &mut MultiplexedConnection, msg: &Message) {
    send_to(c, 0, msg).await
}

/// Every message on the coordinator stream of partition `p` so far.
pub async fn coord_messages_of(c: &mut MultiplexedConnection, p: u32) -> Vec<Message> {
    let r: redis::streams::StreamRangeReply = c.xrange_all(redtx_common::keys::coord_stream(p)).await.unwrap();
    r.ids
        .iter()
        .flat_map(|e| redtx_common::protocol::items_of_entry(&e.map).unwrap())
        .map(|item| item.msg.unwrap())
        .collect()
}

/// Every message on the coordinator stream of partition 0 so far.
pub async fn coord_messages(c: &mut MultiplexedConnection) -> Vec<Message> {
    coord_messages_of(c, 0).await
}

/// Waits until the coordinator stream of partition `p` holds at least `n` messages; returns them.
pub async fn wait_messages_of(c: &mut MultiplexedConnection, p: u32, n: usize) -> Vec<Message> {
    let started = Instant::now();
    loop {
        let m = coord_messages_of(c, p).await;
        if m.len() >= n {
            return m;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "waited for {n} replies on partition {p}, got {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the coordinator stream of partition 0 holds at least `n` messages; returns them.
pub async fn wait_messages(c: &mut MultiplexedConnection, n: usize) -> Vec<Message> {
    wait_messages_of(c, 0, n).await
}

/// Polls `check` until it returns true (10 s at most).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(10), "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `CONFIG SET maxmemory <bytes>` with `noeviction` (0: no limit).
pub async fn maxmemory(c: &mut MultiplexedConnection, bytes: u64) {
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query_async(c).await.unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(bytes).query_async(c).await.unwrap();
}

/// The conformance suite's fixture for the key-value resource, over any connection to its data
/// (one server or a Redis Cluster): items are counters `conf:<item>`; the refused payload
/// decrements a counter below its min.
pub struct CounterFixture<C> {
    pub conn: C,
}

impl<C: redis::aio::ConnectionLike + Send + Sync> redtx_participant::conformance::Fixture for CounterFixture<C> {
    fn participant(&self) -> &str {
        NAME
    }

    fn add(&self, item: &str) -> Vec<u8> {
        encode_ops(&[Op::incrby(format!("conf:{item}"), 1)])
    }

    fn remove(&self, item: &str) -> Vec<u8> {
        encode_ops(&[Op::incrby(format!("conf:{item}"), -1)])
    }

    fn refused(&self) -> Vec<u8> {
        encode_ops(&[Op::Incrby(redtx_common::kv::IncrbyOp {
            key: "conf:empty".into(),
            by: -1,
            min: Some(0),
            max: None,
        })])
    }

    async fn count(&mut self, item: &str) -> redtx_common::Result<i64> {
        let v: Option<i64> = self.conn.get(format!("conf:{item}")).await.unwrap();
        Ok(v.unwrap_or(0))
    }
}
