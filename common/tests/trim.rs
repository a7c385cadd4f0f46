//! Stream trimming by the worker runtime: only entries every consumer group is done with, and
//! never younger than `keep`.

use redis::Commands;
use redtx_common::conn::RedisUrl;
use redtx_common::consumer::{Consumer, ConsumerConfig};
use redtx_common::protocol::{Ack, Message, Outcome};
use redtx_common::server::RedisServer;
use std::time::Duration;

const STREAM: &str = "rtx:part:bank-a:{0}";
const GROUP: &str = "bank-a";

fn fill(con: &mut redis::Connection, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let m = Message::Ack(Ack {
                txn: format!("t{i}"),
                branch: 0,
                participant: "p".into(),
                outcome: Outcome::Committed,
            });
            con.xadd(STREAM, "*", &m.fields()).unwrap()
        })
        .collect()
}

async fn consumer(url: &RedisUrl, keep: Duration) -> Consumer {
    let mut cfg = ConsumerConfig::new(vec![STREAM.into()], GROUP.into());
    cfg.keep = keep;
    Consumer::connect(url, cfg).await.unwrap()
}

fn exists(con: &mut redis::Connection, id: &str) -> bool {
    let r: redis::streams::StreamRangeReply = con.xrange(STREAM, id, id).unwrap();
    !r.ids.is_empty()
}

#[tokio::test]
async fn trims_only_what_every_group_has_acked() {
    let server = RedisServer::start().unwrap();
    let url = RedisUrl::parse(&server.url()).unwrap();
    let mut con = redis::Client::open(server.url()).unwrap().get_connection().unwrap();
    let ids = fill(&mut con, 1000);
    let mut c = consumer(&url, Duration::ZERO).await;

    // Nothing delivered yet: nothing may go.
    assert_eq!(c.trim_stream(STREAM).await.unwrap(), None);
    assert_eq!(con.xlen::<_, usize>(STREAM).unwrap(), 1000);

    // All delivered, the first 600 acked: everything before the oldest pending entry may go.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("x")
        .arg("COUNT")
        .arg(1000)
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query(&mut con)
        .unwrap();
    let _: usize = con.xack(STREAM, GROUP, &ids[..600]).unwrap();
    assert_eq!(c.trim_stream(STREAM).await.unwrap().as_deref(), Some(ids[600].as_str()));
    let len: usize = con.xlen(STREAM).unwrap();
    assert!((400..1000).contains(&len), "approximate trim left {len} entries");
    assert!(exists(&mut con, &ids[600]), "the oldest pending entry must stay");
    assert!(exists(&mut con, &ids[999]));

    // A second group that has read nothing holds everything that is left.
    let _: () = con.xgroup_create(STREAM, "audit", "0").unwrap();
    let _: usize = con.xack(STREAM, GROUP, &ids[600..]).unwrap();
    assert_eq!(c.trim_stream(STREAM).await.unwrap(), None);
    assert_eq!(con.xlen::<_, usize>(STREAM).unwrap(), len);
}

#[tokio::test]
async fn keeps_history_younger_than_keep() {
    let server = RedisServer::start().unwrap();
    let url = RedisUrl::parse(&server.url()).unwrap();
    let mut con = redis::Client::open(server.url()).unwrap().get_connection().unwrap();
    let ids = fill(&mut con, 500);
    let mut c = consumer(&url, Duration::from_secs(3600)).await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("x")
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query(&mut con)
        .unwrap();
    let _: usize = con.xack(STREAM, GROUP, &ids).unwrap();
    let minid = c.trim_stream(STREAM).await.unwrap().expect("a floor");
    assert!(minid.as_str() < ids[0].as_str(), "{minid} must be older than every entry");
    assert_eq!(con.xlen::<_, usize>(STREAM).unwrap(), 500);
}
