//! `Outages` probes on a real Redis: what counts as an answer.

use redtx_common::conn::{RedisTarget, RedisUrl};
use redtx_common::outage::Outages;
use redtx_common::server::{RedisServer, ServerOptions};
use std::time::{Duration, Instant};

/// A probe refused by the server (an ACL user without `EXISTS`, as a least-privilege producer
/// may be) has been answered: the node is there, so the partition is taken back in. Were only a
/// successful `EXISTS` an answer, it would stay out for good.
#[tokio::test]
async fn a_probe_refused_by_an_acl_counts_as_an_answer() {
    let server = RedisServer::start_with(ServerOptions { aof: false, ..Default::default() }).expect("redis-server");
    let mut admin = RedisUrl::parse(&server.url()).unwrap().connect().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "producer", "on", ">secret", "~*", "+@all", "-exists"][..])
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://producer:secret@127.0.0.1:{}", server.port());
    let outages = Outages::connect(&RedisTarget::single(RedisUrl::parse(&url).unwrap()), "partition").await.unwrap();
    outages.mark(3, "rtx:coord:{3}");
    assert!(outages.is_out(3));
    let started = Instant::now();
    while outages.is_out(3) {
        assert!(started.elapsed() < Duration::from_secs(5), "partition 3 stayed out although its probe was answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!outages.take_topology_changed(), "answered on the probes' own connection");
}
