//! A consumer on a real Redis Cluster whose master of one stream is frozen (SIGSTOP) when the
//! consumer starts: it starts on the streams that answer (before, its start failed as a whole
//! and was retried until the master answered), and once the master is back it makes the group
//! that could not be made at the start and reads that stream too.

use redtx_common::cluster_server::{ClusterOptions, RedisCluster};
use redtx_common::conn::{RedisConn, RedisTarget, RedisUrl};
use redtx_common::consumer::{Consumer, ConsumerConfig, Delivery, Disposition, Handled, Handler};
use redtx_common::keys;
use redtx_common::protocol::{Ack, Message, Outcome};
use redtx_common::shutdown::Shutdown;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Collect(Arc<Mutex<Vec<String>>>);

impl Handler for Collect {
    async fn handle(&mut self, batch: Vec<Delivery>) -> redtx_common::Result<Handled> {
        self.0.lock().unwrap().extend(batch.iter().map(|d| d.msg.txn().to_string()));
        Ok(Handled { dispositions: vec![Disposition::Ack; batch.len()], writes: Vec::new() })
    }
}

/// Adds an entry for transaction `txn` to `stream`, retrying while the cluster settles.
async fn add(conn: &mut RedisConn, stream: &str, txn: &str) {
    let m = Message::Ack(Ack { txn: txn.into(), branch: 0, participant: "p".into(), outcome: Outcome::Aborted });
    let started = Instant::now();
    loop {
        let r: redis::RedisResult<String> =
            redis::cmd("XADD").arg(stream).arg("*").arg(&m.fields()).query_async(conn).await;
        match r {
            Ok(_) => return,
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(30), "XADD to {stream}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Waits until `txn` was handled.
async fn seen(seen: &Arc<Mutex<Vec<String>>>, txn: &str, what: &str) {
    let started = Instant::now();
    while !seen.lock().unwrap().iter().any(|t| t == txn) {
        assert!(started.elapsed() < Duration::from_secs(30), "{what}: {txn} was not handled within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_started_while_a_master_is_frozen_reads_the_other_streams_then_that_one() {
    // No replica; the other masters keep serving their slots while one is silent.
    let opts = ClusterOptions::partial_coverage();
    let mut cluster =
        tokio::task::spawn_blocking(move || RedisCluster::start_with(3, 0, opts).expect("a cluster")).await.unwrap();
    let master_of = |p: u32| cluster.master_of_slot(keys::partition_slot(p)).unwrap();
    let frozen_part = 0;
    let frozen = master_of(frozen_part);
    let other_part = (1..keys::MAX_PARTITIONS).find(|p| master_of(*p) != frozen).expect("a partition elsewhere");
    let streams = vec![keys::coord_stream(frozen_part), keys::coord_stream(other_part)];
    let seeds: Vec<RedisUrl> = cluster.seed_urls().iter().map(|u| RedisUrl::parse(u).unwrap()).collect();
    let target = RedisTarget::cluster(seeds).unwrap();
    let mut conn = target.connect().await.unwrap();

    cluster.freeze(frozen).unwrap();
    let mut cfg = ConsumerConfig::new(streams.clone(), "g".into());
    cfg.block = Duration::from_millis(100);
    // Before, the start retried as a whole until the frozen master answered.
    let consumer = tokio::time::timeout(Duration::from_secs(30), Consumer::connect_target(&target, cfg))
        .await
        .expect("the consumer starts while a master is frozen")
        .expect("the consumer starts on the streams that answer");
    let handled = Arc::new(Mutex::new(Vec::new()));
    let shutdown = Shutdown::new();
    let run = {
        let (handled, shutdown) = (handled.clone(), shutdown.clone());
        tokio::spawn(async move { consumer.run(&mut Collect(handled), shutdown).await })
    };
    add(&mut conn, &streams[1], "elsewhere").await;
    seen(&handled, "elsewhere", "the stream whose master answers").await;

    tokio::task::block_in_place(|| cluster.thaw(frozen)).unwrap();
    let thawed = Instant::now();
    add(&mut conn, &streams[0], "back").await;
    seen(&handled, "back", "the stream whose master was frozen at the start").await;
    eprintln!("the stream whose master was frozen at the start was read {:?} after the thaw", thawed.elapsed());

    shutdown.trigger();
    run.await.unwrap().unwrap();
}

/// A consumer whose blocking read of a stream went to that stream's master just before the
/// master froze gives that read up once a probe hears from the stream's partition on a fresh
/// connection (the elected replica), and reads the stream there. Left to itself, the read would
/// hold the stream until its timeout: its block (10 s here) plus 10 s after the freeze. With the
/// give-up, the stream is read after the block (when the loop's claim meets the silent master and
/// marks the partition out: about 11.5 s after the freeze) plus one probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_stuck_on_a_frozen_master_is_given_up_and_the_elected_replica_is_read() {
    let mut cluster = tokio::task::spawn_blocking(move || RedisCluster::start(3, 1).expect("a cluster")).await.unwrap();
    let p = 0;
    let stream = keys::coord_stream(p);
    let seeds: Vec<RedisUrl> = cluster.seed_urls().iter().map(|u| RedisUrl::parse(u).unwrap()).collect();
    let target = RedisTarget::cluster(seeds).unwrap();
    let mut cfg = ConsumerConfig::new(vec![stream.clone()], "g".into());
    cfg.block = Duration::from_secs(10);
    let consumer = Consumer::connect_target(&target, cfg).await.expect("the consumer starts");
    let handled = Arc::new(Mutex::new(Vec::new()));
    let shutdown = Shutdown::new();
    let run = {
        let (handled, shutdown) = (handled.clone(), shutdown.clone());
        tokio::spawn(async move { consumer.run(&mut Collect(handled), shutdown).await })
    };
    let mut conn = target.connect().await.unwrap();
    add(&mut conn, &stream, "before").await;
    seen(&handled, "before", "the stream before the freeze").await;

    // The consumer's next read is blocked on the master now; freeze it and elect its replica.
    let master = cluster.master_of_slot(keys::partition_slot(p)).unwrap();
    let frozen = Instant::now();
    let elected = tokio::task::block_in_place(|| cluster.freeze_and_fail_over(master)).expect("a failover");
    let election = Instant::now();
    let mut conn = target.connect().await.unwrap();
    add(&mut conn, &stream, "after").await;
    seen(&handled, "after", "the stream on the elected replica").await;
    let (after_election, after_freeze) = (election.elapsed(), frozen.elapsed());
    eprintln!("read on node {elected} {after_election:?} after the election, {after_freeze:?} after the freeze");
    assert!(
        after_freeze < Duration::from_secs(16),
        "the stream was read {after_election:?} after the election ({after_freeze:?} after the freeze): the read \
         stuck on the frozen master was waited out"
    );

    tokio::task::block_in_place(|| cluster.thaw(master)).unwrap();
    shutdown.trigger();
    run.await.unwrap().unwrap();
}
