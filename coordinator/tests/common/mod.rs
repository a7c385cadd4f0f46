//! Test support: a private Redis, in-process coordinators, and hand-played participants.
#![allow(dead_code)]

use redis::aio::MultiplexedConnection;
use redis::streams::StreamRangeReply;
use redis::AsyncCommands;
use redtx_common::protocol::{Ack, Message, Outcome, Vote};
use redtx_common::record::TxnRecord;
use redtx_common::server::RedisServer;
use redtx_common::shutdown::Shutdown;
use redtx_common::spec::{Branch, Op, TxnSpec};
use redtx_common::{keys, Client};
use redtx_coordinator::CoordinatorConfig;
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub struct Env {
    pub server: RedisServer,
    pub conn: MultiplexedConnection,
    pub client: Client,
    coordinators: Vec<(Shutdown, tokio::task::JoinHandle<redtx_common::Result<()>>)>,
}

impl Env {
    pub async fn start() -> Env {
        let server = RedisServer::start().expect("redis-server");
        let client = Client::connect(&server.url()).await.unwrap();
        let conn = redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        Env { server, conn, client, coordinators: Vec::new() }
    }

    pub fn config(&self) -> CoordinatorConfig {
        let mut cfg = CoordinatorConfig::new(self.server.url());
        cfg.claim_idle = Duration::from_millis(500);
        cfg.resend_every = Duration::from_millis(200);
        cfg
    }

    pub fn spawn(&mut self, cfg: CoordinatorConfig) {
        let shutdown = Shutdown::new();
        let h = tokio::spawn(redtx_coordinator::run(cfg, shutdown.clone()));
        self.coordinators.push((shutdown, h));
    }

    pub async fn stop(&mut self) {
        for (s, h) in self.coordinators.drain(..) {
            s.trigger();
            h.await.unwrap().unwrap();
        }
    }

    pub async fn xadd(&self, stream: &str, fields: &[(&str, Vec<u8>)]) {
        let mut c = self.conn.clone();
        let _: String = c.xadd(stream, "*", fields).await.unwrap();
    }

    pub async fn send(&self, m: Message) {
        let fields = m.fields();
        self.xadd(&keys::coord_stream(), &fields.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>()).await;
    }

    pub async fn vote(&self, txn: &str, branch: u32, participant: &str, yes: bool, reason: Option<&str>) {
        self.send(Message::Vote(Vote {
            txn: txn.into(),
            branch,
            participant: participant.into(),
            yes,
            reason: reason.map(str::to_string),
        }))
        .await
    }

    pub async fn ack(&self, txn: &str, branch: u32, participant: &str, outcome: Outcome) {
        self.send(Message::Ack(Ack { txn: txn.into(), branch, participant: participant.into(), outcome })).await
    }

    /// Every message in participant `name`'s stream, oldest first.
    pub async fn inbox(&self, name: &str) -> Vec<Message> {
        let mut c = self.conn.clone();
        let r: StreamRangeReply = c.xrange_all(keys::participant_stream(name)).await.unwrap();
        r.ids.iter().map(|e| Message::from_entry(&e.map).unwrap()).collect()
    }

    /// `(kind, txn)` of the messages in `name`'s stream.
    pub async fn inbox_kinds(&self, name: &str, txn: &str) -> Vec<&'static str> {
        self.inbox(name).await.into_iter().filter(|m| m.txn() == txn).map(|m| m.kind()).collect()
    }

    pub async fn record(&self, id: &str) -> Option<TxnRecord> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(keys::txn_record(id)).await.unwrap();
        TxnRecord::from_hash(id, &h).unwrap()
    }

    /// Entries of a stream as field maps (text values).
    pub async fn entries(&self, stream: &str) -> Vec<HashMap<String, String>> {
        let mut c = self.conn.clone();
        let r: StreamRangeReply = c.xrange_all(stream).await.unwrap();
        r.ids
            .iter()
            .map(|e| {
                e.map
                    .iter()
                    .map(|(k, v)| {
                        let s = match v {
                            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                            other => format!("{other:?}"),
                        };
                        (k.clone(), s)
                    })
                    .collect()
            })
            .collect()
    }

    /// Polls `f` until it returns `Some` (10 s at most).
    pub async fn until<T, F, Fut>(&self, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let started = Instant::now();
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `name`'s stream holds `kinds` for `txn` (exactly, in order).
    pub async fn until_inbox(&self, name: &str, txn: &str, kinds: &[&str]) {
        self.until(&format!("{name} to receive {kinds:?}"), || async {
            (self.inbox_kinds(name, txn).await == kinds).then_some(())
        })
        .await
    }

    pub async fn until_state(&self, id: &str, state: &str) -> TxnRecord {
        self.until(&format!("{id} to be {state}"), || async {
            self.record(id).await.filter(|r| r.state.as_str() == state)
        })
        .await
    }
}

/// A two-branch transfer: `a` pays 10 to `b`.
pub fn transfer(id: &str) -> TxnSpec {
    TxnSpec::new(vec![
        Branch { participant: "a".into(), ops: vec![Op::incrby("acct:x", -10)] },
        Branch { participant: "b".into(), ops: vec![Op::incrby("acct:y", 10), Op::set("note", "hi")] },
    ])
    .with_id(id)
}
