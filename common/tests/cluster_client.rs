//! The producer `Client` on a real Redis Cluster (3 masters, a replica each, a password):
//! submits land in their partition's slot on the master serving it, a hand-written outcome
//! (what the coordinator writes: the record, then `XADD rtx:outcomes:{P} id <id> state <state>`)
//! wakes a waiter on every partition, hence every master, status reads work, and all of it
//! still does after a partition's slot moved and another's master failed over, and while a
//! slot is half-way to another master (`ASK`). Waiters re-read
//! records only every two minutes here, so every wake-up seen comes from the outcome readers.

use redis::AsyncCommands;
use redtx_common::cluster_server::{ClusterOptions, RedisCluster};
use redtx_common::conn::{RedisConn, RedisTarget};
use redtx_common::machine::{Timing, Txn};
use redtx_common::protocol::Message;
use redtx_common::record::{create_fields, TxnState};
use redtx_common::spec::{Branch, Op, TxnSpec};
use redtx_common::{keys, Client, Error};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PW: &str = "clu-Pw-8d21";
const PARTITIONS: u32 = 8;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// An id of partition `p`.
fn id_in(p: u32, prefix: &str) -> String {
    (0..).map(|n| format!("{prefix}-{n}")).find(|id| keys::partition(id, PARTITIONS) == p).unwrap()
}

fn spec(id: &str) -> TxnSpec {
    let mut s = TxnSpec::new(vec![
        Branch::kv("bank-a", vec![Op::incrby("acct:a", -1)]),
        Branch::kv("bank-b", vec![Op::incrby("acct:b", 1)]),
    ]);
    s.id = id.to_string();
    s
}

/// Writes what the owner of the partition writes when `id` commits: its record, then its outcome.
async fn commit_by_hand(conn: &mut RedisConn, id: &str) {
    let p = keys::partition(id, PARTITIONS);
    let (mut txn, _) = Txn::create(spec(id), Timing { now_ms: redtx_common::now_ms(), resend_every_ms: 1000 });
    txn.progress.state = TxnState::Committed;
    txn.progress.finished_ms = Some(redtx_common::now_ms());
    let _: () = conn.hset_multiple(keys::txn_record(p, id), &create_fields(&txn)).await.unwrap();
    let _: String = conn
        .xadd_maxlen(
            keys::outcomes_stream(p),
            redis::streams::StreamMaxlen::Approx(100_000),
            "*",
            &[("id", id), ("state", "committed")],
        )
        .await
        .unwrap();
}

/// One transaction per partition of `parts`: submitted, checked in its slot's stream on the master
/// serving it, waited for, committed by hand, and read back.
async fn round(client: &Client, conn: &mut RedisConn, cluster: &Arc<Mutex<RedisCluster>>, prefix: &str, parts: &[u32]) {
    let ids: Vec<String> = parts.iter().map(|&p| id_in(p, prefix)).collect();
    for id in &ids {
        assert_eq!(client.submit(&spec(id)).await.unwrap(), *id);
    }
    // Each submit is in `rtx:coord:{P}` on the master of P's slot, read there directly.
    let c = cluster.clone();
    let found: Vec<Vec<String>> = blocking({
        let ids = ids.clone();
        move || {
            let c = c.lock().unwrap();
            ids.iter()
                .map(|id| {
                    let p = keys::partition(id, PARTITIONS);
                    let url = c.master_url_of_slot(keys::partition_slot(p)).unwrap();
                    let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
                    let entries: redis::streams::StreamRangeReply =
                        redis::Commands::xrange_all(&mut con, keys::coord_stream(p)).unwrap();
                    entries.ids.iter().map(|e| Message::from_entry(&e.map).unwrap().txn().to_string()).collect()
                })
                .collect()
        }
    })
    .await;
    for (id, in_stream) in ids.iter().zip(&found) {
        assert!(in_stream.contains(id), "{id} is not in its partition's stream on its master: {in_stream:?}");
    }

    let waits: Vec<_> = ids
        .iter()
        .map(|id| {
            let (client, id) = (client.clone(), id.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let r = client.wait(&id, Duration::from_secs(40)).await;
                (r, started.elapsed())
            })
        })
        .collect();
    // Let every waiter read the (absent) record and block; then commit them all.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = Instant::now();
    for id in &ids {
        commit_by_hand(conn, id).await;
    }
    for (id, w) in ids.iter().zip(waits) {
        let (r, waited) = w.await.unwrap();
        let r = r.unwrap_or_else(|e| panic!("{prefix}: waiting for {id}: {e}"));
        assert_eq!((r.id.as_str(), r.state), (id.as_str(), TxnState::Committed));
        eprintln!(
            "{prefix}: {id} (partition {}) woken {:?} after the outcome",
            keys::partition(id, PARTITIONS),
            waited.saturating_sub(Duration::from_millis(500))
        );
        let status = client.status(id).await.unwrap().expect("a record");
        assert_eq!(status.state, TxnState::Committed);
    }
    eprintln!("{prefix}: all woken within {:?} of the outcomes", written.elapsed());
    assert!(client.status(&format!("{prefix}-none")).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_client_submits_waits_and_reads_through_a_slot_move_and_a_failover() {
    let started = Instant::now();
    let opts = ClusterOptions { password: Some(PW.into()), ..Default::default() };
    let cluster = Arc::new(Mutex::new(blocking(move || RedisCluster::start_with(3, 1, opts)).await.unwrap()));
    let seeds = cluster.lock().unwrap().seed_urls();
    eprintln!("cluster settled in {:?}", started.elapsed());

    // One seed is enough; the client finds the others.
    let client = Client::connect_cluster(&[seeds[1].as_str()])
        .await
        .unwrap()
        .with_partitions(PARTITIONS)
        .with_recheck(Duration::from_secs(120));
    assert!(client.target().is_cluster());
    assert!(!format!("{} {:?}", client.target(), client.target()).contains(PW));
    let mut conn = RedisTarget::parse(&seeds.join(","), true).unwrap().connect().await.unwrap();

    // The partitions' slots are spread over every master.
    let c = cluster.clone();
    let owners: HashMap<u32, usize> = blocking(move || {
        (0..PARTITIONS).map(|p| (p, c.lock().unwrap().master_of_slot(keys::partition_slot(p)).unwrap())).collect()
    })
    .await;
    let mut masters: Vec<usize> = owners.values().copied().collect();
    masters.sort_unstable();
    masters.dedup();
    assert_eq!(masters.len(), 3, "{owners:?}");

    let all: Vec<u32> = (0..PARTITIONS).collect();
    let t = Instant::now();
    round(&client, &mut conn, &cluster, "before", &all).await;
    eprintln!("round before: {:?}", t.elapsed());

    // Partition 0's slot moves to another master; partition 1's master fails over.
    let c = cluster.clone();
    let (o0, o1) = (owners[&0], owners[&1]);
    blocking(move || {
        let mut c = c.lock().unwrap();
        let to = (0..3).find(|m| *m != o0).unwrap();
        c.move_slot(keys::partition_slot(0), to).unwrap();
        let new = c.failover(o1).unwrap();
        eprintln!("partition 0: node {o0} -> {to}; partition 1: master {o1} failed over to {new}");
    })
    .await;
    let t = Instant::now();
    round(&client, &mut conn, &cluster, "after", &all).await;
    eprintln!("round after: {:?}", t.elapsed());

    // Partition 2's slot half-way to another master, its outcomes stream moved already (its
    // coordinator stream not): the source answers ASK, and the reader follows it.
    let c = cluster.clone();
    let half = blocking(move || {
        let c = c.lock().unwrap();
        let slot = keys::partition_slot(2);
        let from = c.master_of_slot(slot).unwrap();
        let to = c.masters().unwrap().into_iter().find(|&m| m != from).unwrap();
        let mut m = c.begin_move(slot, to).unwrap().expect("another master");
        m.migrate(&c, &[keys::outcomes_stream(2).into_bytes()]).unwrap();
        m
    })
    .await;
    let t = Instant::now();
    round(&client, &mut conn, &cluster, "asking", &[2]).await;
    eprintln!("round asking: {:?}", t.elapsed());
    let c = cluster.clone();
    let moved = blocking(move || half.finish(&c.lock().unwrap()).unwrap()).await;
    assert!(moved >= 2, "the records and the coordinator stream moved too: {moved}");
    round(&client, &mut conn, &cluster, "moved", &[2]).await;

    // A client created now, with the old seeds (one of them a replica now), works as well.
    let again = Client::connect_cluster(&seeds.iter().map(String::as_str).collect::<Vec<_>>())
        .await
        .unwrap()
        .with_partitions(PARTITIONS);
    let id = id_in(1, "before");
    assert_eq!(again.status(&id).await.unwrap().map(|r| r.state), Some(TxnState::Committed));
    eprintln!("total {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_master_cluster_wakes_its_waiters_too() {
    // A lone master never met another node, so it does not know its own address: `CLUSTER
    // SLOTS` lists it with an empty host, meaning "where you asked". The outcome readers must
    // still find it (the waiters here re-read records only every two minutes).
    let cluster = Arc::new(Mutex::new(blocking(|| RedisCluster::start(1, 0)).await.unwrap()));
    let seeds = cluster.lock().unwrap().seed_urls();
    let client = Client::connect_cluster(&[seeds[0].as_str()])
        .await
        .unwrap()
        .with_partitions(PARTITIONS)
        .with_recheck(Duration::from_secs(120));
    let mut conn = RedisTarget::parse(&seeds[0], true).unwrap().connect().await.unwrap();
    round(&client, &mut conn, &cluster, "lone", &(0..PARTITIONS).collect::<Vec<_>>()).await;
}

#[tokio::test]
async fn cluster_and_single_server_are_not_mixed_up() {
    // A plain server given as a cluster seed: said so.
    let plain = redtx_common::server::RedisServer::start_with(redtx_common::server::ServerOptions {
        aof: false,
        ..Default::default()
    })
    .unwrap();
    let e = Client::connect_cluster(&[plain.url().as_str()]).await.err().expect("not a cluster");
    assert!(matches!(e, Error::NotACluster { .. }), "{e}");
    assert!(e.to_string().contains("not a Redis Cluster node"), "{e}");

    // A cluster node given as a single server: said so.
    let cluster = blocking(|| RedisCluster::start(1, 0)).await.unwrap();
    let e = Client::connect(&cluster.url(0)).await.err().expect("a cluster node");
    assert!(matches!(e, Error::IsACluster { .. }), "{e}");

    // A list of seeds without --cluster is refused before connecting.
    let e = RedisTarget::parse("redis://a:1,redis://b:2", false).unwrap_err();
    assert!(e.to_string().contains("--cluster"), "{e}");
    // Seeds with different passwords: refused, without printing either.
    let e =
        RedisTarget::parse("redis://:pw-one@127.0.0.1:1,redis://:pw-two@127.0.0.1:2", true).unwrap_err().to_string();
    assert!(!e.contains("pw-one") && !e.contains("pw-two"), "{e}");
    let t = RedisTarget::parse("redis://:pw-one@127.0.0.1:1, redis://:pw-one@127.0.0.1:2", true).unwrap();
    assert_eq!(t.seeds().len(), 2);
    assert_eq!(t.to_string(), "redis://:***@127.0.0.1:1,redis://:***@127.0.0.1:2 (cluster)");
    drop(cluster);
}
