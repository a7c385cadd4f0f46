//! Test support: a private Redis, in-process coordinators, and hand-played participants.
#![allow(dead_code)]

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamRangeReply, StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use redtx_common::protocol::{items_of_entry, Ack, Message, Outcome, StepKind, StepResult, StepStatus, Vote};
use redtx_common::record::TxnRecord;
use redtx_common::server::RedisServer;
use redtx_common::shutdown::Shutdown;
use redtx_common::spec::{Branch, Op, TxnSpec};
use redtx_common::{keys, Client};
use redtx_coordinator::CoordinatorConfig;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Partitions of every test deployment: more than one, so routing is exercised.
pub const PARTITIONS: u32 = 4;

pub struct Env {
    pub server: RedisServer,
    pub conn: MultiplexedConnection,
    pub client: Client,
    coordinators: Vec<(Shutdown, tokio::task::JoinHandle<redtx_common::Result<()>>)>,
    /// What each hand-played participant has read so far (read through its consumer group, as
    /// a real participant would, so the coordinator sees it reading).
    inboxes: Mutex<HashMap<String, Vec<Message>>>,
}

impl Env {
    pub async fn start() -> Env {
        let server = RedisServer::start().expect("redis-server");
        let client = Client::connect(&server.url()).await.unwrap().with_partitions(PARTITIONS);
        let conn = redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let env = Env { server, conn, client, coordinators: Vec::new(), inboxes: Mutex::default() };
        for name in ["a", "b"] {
            env.join(name).await;
        }
        env
    }

    /// Creates participant `name`'s consumer groups, as a starting participant does.
    pub async fn join(&self, name: &str) {
        let mut c = self.conn.clone();
        for p in 0..PARTITIONS {
            let _: redis::RedisResult<()> =
                c.xgroup_create_mkstream(keys::participant_stream(name, p), name, "0").await;
        }
    }

    /// The partition of `txn`.
    pub fn part(&self, txn: &str) -> u32 {
        keys::partition(txn, PARTITIONS)
    }

    pub fn config(&self) -> CoordinatorConfig {
        let mut cfg = CoordinatorConfig::new(self.server.url());
        cfg.partitions = PARTITIONS;
        cfg.lease = Duration::from_secs(1);
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
        let stream = keys::coord_stream(self.part(m.txn()));
        self.xadd(&stream, &fields.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>()).await;
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

    pub async fn result(&self, txn: &str, branch: u32, participant: &str, step: StepKind, status: StepStatus) {
        self.send(Message::Result(StepResult {
            txn: txn.into(),
            branch,
            participant: participant.into(),
            step,
            status,
            reason: Some("why".into()),
        }))
        .await
    }

    /// The record's progress (the machine's state) of `id`.
    pub async fn progress(&self, id: &str) -> redtx_common::machine::Progress {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(keys::txn_record(self.part(id), id)).await.unwrap();
        redtx_common::record::txn_from_hash(id, &h).unwrap().expect("a record").progress
    }

    /// Who holds each partition's lease (the owner part of `<token>:<owner>`).
    pub async fn lease_owners(&self) -> Vec<Option<String>> {
        let mut c = self.conn.clone();
        let mut out = Vec::new();
        for p in 0..PARTITIONS {
            let v: Option<String> = c.get(keys::lease(p)).await.unwrap();
            out.push(v.map(|v| v.split_once(':').map(|(_, o)| o.to_string()).unwrap_or(v)));
        }
        out
    }

    /// Stops the first coordinator started (cleanly).
    pub async fn stop_one(&mut self) {
        let (s, h) = self.coordinators.remove(0);
        s.trigger();
        h.await.unwrap().unwrap();
    }

    pub async fn ack(&self, txn: &str, branch: u32, participant: &str, outcome: Outcome) {
        self.send(Message::Ack(Ack { txn: txn.into(), branch, participant: participant.into(), outcome })).await
    }

    /// Every message participant `name` received, oldest first (read through its group and
    /// acked, as a real participant would, so the coordinator sees it reading).
    pub async fn inbox(&self, name: &str) -> Vec<Message> {
        let mut c = self.conn.clone();
        let streams: Vec<String> = (0..PARTITIONS).map(|p| keys::participant_stream(name, p)).collect();
        let ids = vec![">"; streams.len()];
        let opts = StreamReadOptions::default().group(name, "hand").count(10_000);
        let r: Option<StreamReadReply> = c.xread_options(&streams, &ids, &opts).await.unwrap();
        let mut read = Vec::new();
        for k in r.map(|r| r.keys).unwrap_or_default() {
            for e in k.ids {
                read.extend(items_of_entry(&e.map).unwrap().into_iter().map(|item| item.msg.unwrap()));
                let _: u64 = c.xack(&k.key, name, &[&e.id]).await.unwrap();
            }
        }
        let mut inboxes = self.inboxes.lock().unwrap();
        let inbox = inboxes.entry(name.to_string()).or_default();
        inbox.extend(read);
        inbox.clone()
    }

    /// `(kind, txn)` of the messages in `name`'s stream.
    pub async fn inbox_kinds(&self, name: &str, txn: &str) -> Vec<&'static str> {
        self.inbox(name).await.into_iter().filter(|m| m.txn() == txn).map(|m| m.kind()).collect()
    }

    pub async fn record(&self, id: &str) -> Option<TxnRecord> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(keys::txn_record(self.part(id), id)).await.unwrap();
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
        Branch::kv("a", vec![Op::incrby("acct:x", -10)]),
        Branch::kv("b", vec![Op::incrby("acct:y", 10), Op::set("note", "hi")]),
    ])
    .with_id(id)
}
