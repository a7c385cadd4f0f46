//! A stream worker's counts are readable while it runs (its stats hash) and final when it stops.

use redis::Commands;
use redtx_common::conn::RedisUrl;
use redtx_common::consumer::{Consumer, ConsumerConfig, Delivery, Disposition, Handled, Handler};
use redtx_common::protocol::{Ack, Message, Outcome};
use redtx_common::server::RedisServer;
use redtx_common::shutdown::Shutdown;
use redtx_common::stats::{read_all, WorkerStats, STATS_TTL};
use std::time::{Duration, Instant};

const STREAM: &str = "rtx:part:p:{0}";
const GROUP: &str = "p";

/// Answers every entry.
struct AckAll;

impl Handler for AckAll {
    async fn handle(&mut self, batch: Vec<Delivery>) -> redtx_common::Result<Handled> {
        Ok(Handled { dispositions: vec![Disposition::Ack; batch.len()], writes: Vec::new() })
    }
}

fn add(con: &mut redis::Connection, n: usize) {
    for i in 0..n {
        let m =
            Message::Ack(Ack { txn: format!("t{i}"), branch: 0, participant: "p".into(), outcome: Outcome::Aborted });
        let _: String = con.xadd(STREAM, "*", &m.fields()).unwrap();
    }
}

/// Reads the stats hashes until one satisfies `ok`.
async fn wait_for(conn: &mut redis::aio::MultiplexedConnection, ok: impl Fn(&WorkerStats) -> bool) -> WorkerStats {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = read_all(conn).await.unwrap().into_iter().find(|s| ok(s)) {
            return s;
        }
        assert!(Instant::now() < end, "no stats hash as expected: {:?}", read_all(conn).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn counts_are_published_while_running_and_final_at_shutdown() {
    let server = RedisServer::start().unwrap();
    let url = RedisUrl::parse(&server.url()).unwrap();
    let mut con = redis::Client::open(server.url()).unwrap().get_connection().unwrap();
    let mut aconn = url.connect().await.unwrap();
    assert!(read_all(&mut aconn).await.unwrap().is_empty(), "no worker yet, no stats");

    let mut cfg = ConsumerConfig::new(vec![STREAM.into()], GROUP.into());
    cfg.block = Duration::from_millis(100);
    let consumer = Consumer::connect(&url, cfg).await.unwrap();
    let shutdown = Shutdown::new();
    let run = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { consumer.run(&mut AckAll, shutdown).await })
    };
    add(&mut con, 10);
    // While it runs: rewritten every two seconds, with a time to live.
    let running = wait_for(&mut aconn, |s| s.handled() == 10).await;
    assert_eq!((running.role.as_str(), running.participant.as_deref()), ("participant", Some(GROUP)));
    assert!(!running.stopped);
    assert_eq!(running.pid, Some(std::process::id()));
    let key = redtx_common::keys::participant_stats(GROUP, &running.id);
    let ttl: i64 = con.pttl(&key).unwrap();
    assert!(ttl > 0 && ttl <= STATS_TTL.as_millis() as i64, "ttl {ttl} of {key}");

    // At shutdown: the final figures, marked stopped.
    add(&mut con, 5);
    wait_for(&mut aconn, |s| s.handled() == 15).await;
    shutdown.trigger();
    run.await.unwrap().unwrap();
    let last = read_all(&mut aconn).await.unwrap();
    assert_eq!(last.len(), 1, "{last:?}");
    assert!(last[0].stopped, "{last:?}");
    assert_eq!((last[0].handled(), last[0].count("dead")), (15, 0));
}
