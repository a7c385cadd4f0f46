//! Taking over pending entries: idle entries far down a long pending list are reached, even
//! when the entries in front of them are not idle yet.

use redis::Commands;
use redtx_common::conn::RedisUrl;
use redtx_common::consumer::{Consumer, ConsumerConfig, Delivery, Disposition, Handled, Handler};
use redtx_common::protocol::{Ack, Message, Outcome};
use redtx_common::server::RedisServer;
use redtx_common::shutdown::Shutdown;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const STREAM: &str = "rtx:coord:{0}";
const GROUP: &str = "g";

struct Collect(Arc<Mutex<Vec<String>>>);

impl Handler for Collect {
    async fn handle(&mut self, batch: Vec<Delivery>) -> redtx_common::Result<Handled> {
        let mut seen = self.0.lock().unwrap();
        seen.extend(batch.iter().map(|d| d.msg.txn().to_string()));
        Ok(Handled { dispositions: vec![Disposition::Ack; batch.len()], writes: Vec::new() })
    }
}

#[tokio::test]
async fn idle_entries_behind_fresh_ones_are_taken_over() {
    let server = RedisServer::start().unwrap();
    let url = RedisUrl::parse(&server.url()).unwrap();
    let mut con = redis::Client::open(server.url()).unwrap().get_connection().unwrap();
    let _: () = con.xgroup_create_mkstream(STREAM, GROUP, "0").unwrap();
    let ids: Vec<String> = (0..100)
        .map(|i| {
            let m = Message::Ack(Ack {
                txn: format!("t{i}"),
                branch: 0,
                participant: "p".into(),
                outcome: Outcome::Aborted,
            });
            con.xadd(STREAM, "*", &m.fields()).unwrap()
        })
        .collect();
    // A dead consumer holds all 100: the first 50 were delivered just now, the last 50 long ago.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("ghost")
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query(&mut con)
        .unwrap();
    let claim = |con: &mut redis::Connection, ids: &[String], idle_ms: u64| {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(STREAM)
            .arg(GROUP)
            .arg("ghost")
            .arg(0)
            .arg(ids)
            .arg("IDLE")
            .arg(idle_ms)
            .arg("JUSTID")
            .query(con)
            .unwrap();
    };
    claim(&mut con, &ids[..50], 0);
    claim(&mut con, &ids[50..], 600_000);

    let mut cfg = ConsumerConfig::new(vec![STREAM.into()], GROUP.into());
    cfg.batch = 2;
    cfg.claim_idle = Duration::from_secs(60);
    cfg.block = Duration::from_millis(100);
    let consumer = Consumer::connect(&url, cfg).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let shutdown = Shutdown::new();
    let run = {
        let (seen, shutdown) = (seen.clone(), shutdown.clone());
        tokio::spawn(async move { consumer.run(&mut Collect(seen), shutdown).await })
    };
    let started = Instant::now();
    while seen.lock().unwrap().len() < 50 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.trigger();
    run.await.unwrap().unwrap();
    let mut got = seen.lock().unwrap().clone();
    got.sort_by_key(|t| t[1..].parse::<u32>().unwrap());
    let expected: Vec<String> = (50..100).map(|i| format!("t{i}")).collect();
    assert_eq!(got, expected, "exactly the idle entries are taken over");
}
