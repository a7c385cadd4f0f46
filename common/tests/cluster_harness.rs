//! The private Redis Cluster harness (`common::cluster_server`) and the cluster connection
//! (`conn::RedisConn`) on a real cluster: slots spread and agreed, a slot moved and a master
//! failed over while writers keep writing (no acknowledged write lost), a node killed and
//! restarted, and what pipelines, scripts and multi-key reads do in cluster mode; partitions'
//! slots dealt out round robin.

use redis::AsyncCommands;
use redtx_common::cluster_server::{ClusterOptions, RedisCluster};
use redtx_common::conn::{RedisConn, RedisTarget};
use redtx_common::keys;
use redtx_common::scripts::LuaScript;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs a blocking harness call off the runtime's workers (the writers keep running).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn connect(seeds: &str) -> RedisConn {
    let target = RedisTarget::parse(seeds, true).unwrap();
    assert!(target.is_cluster());
    let conn = target.connect().await.unwrap();
    assert!(conn.is_cluster());
    conn
}

/// Writers: `SET w:{tag}:<writer>:<n> <n>` over 64 hash tags (64 slots), one after the other;
/// each acknowledged key is recorded.
struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, u64)>>>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(conn: &RedisConn, writers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicUsize::new(0));
        let tasks = (0..writers)
            .map(|w| {
                let (mut conn, stop, acked, failed) = (conn.clone(), stop.clone(), acked.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let key = format!("w:{{{}}}:{w}:{n}", n % 64);
                        match conn.set::<_, _, ()>(&key, n).await {
                            Ok(()) => {
                                acked.lock().unwrap().push((key, n));
                                // Keep the check at the end short.
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            Err(e) => {
                                eprintln!("write {key} failed: {e}");
                                failed.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Writers { stop, acked, failed, tasks }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `more` writes beyond now are acknowledged.
    async fn wait_more(&self, more: usize) {
        let target = self.acked() + more;
        let started = Instant::now();
        while self.acked() < target {
            assert!(started.elapsed() < Duration::from_secs(30), "writers stalled at {}", self.acked());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) -> (Vec<(String, u64)>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        (acked, self.failed.load(Ordering::Relaxed))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moves_and_a_master_fails_over_under_writes_without_losing_any() {
    let started = Instant::now();
    let cluster = Arc::new(Mutex::new(blocking(|| RedisCluster::start(3, 1)).await.unwrap()));
    eprintln!("6 nodes up and settled in {:?}", started.elapsed());
    let c = cluster.clone();
    let (masters, replicas, slot_ok) = blocking(move || {
        let c = c.lock().unwrap();
        let masters = c.masters().unwrap();
        let replicas: Vec<Vec<usize>> = masters.iter().map(|&m| c.replicas_of(m).unwrap()).collect();
        // Slots spread evenly, and our slot function agrees with the server's.
        let owners: Vec<usize> =
            [0u16, 5460, 5461, 10921, 10922, 16383].iter().map(|&s| c.master_of_slot(s).unwrap()).collect();
        let mut con = redis::Client::open(c.url(0)).unwrap().get_connection().unwrap();
        let slot_ok = ["foo", "{3}", "rtx:outcomes:{3}", "a{b}c", "{}x", "x{}{y}", "{{a}}"].iter().all(|k| {
            let s: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(*k).query(&mut con).unwrap();
            s == keys::slot(k)
        });
        assert_eq!(owners, vec![0, 0, 1, 1, 2, 2]);
        (masters, replicas, slot_ok)
    })
    .await;
    assert_eq!(masters, vec![0, 1, 2]);
    assert!(replicas.iter().all(|r| r.len() == 1), "{replicas:?}");
    assert!(slot_ok, "keys::slot disagrees with CLUSTER KEYSLOT");

    let seeds = cluster.lock().unwrap().seeds();
    let mut conn = connect(&seeds).await;
    // Enough keys in the slot to be moved for several MIGRATE batches.
    let moving = keys::partition_slot(7);
    for i in 0..250 {
        let _: () = conn.set(format!("seed:{{7}}:{i}"), i).await.unwrap();
    }
    let writers = Writers::start(&conn, 3);
    writers.wait_more(300).await;

    // Move a slot the writers use to another master while they write.
    let t = Instant::now();
    let (from, to, moved) = {
        let c = cluster.clone();
        blocking(move || {
            let c = c.lock().unwrap();
            let from = c.master_of_slot(moving).unwrap();
            let to = (from + 1) % 3;
            let moved = c.move_slot(moving, to).unwrap();
            assert_eq!(c.master_of_slot(moving).unwrap(), to);
            (from, to, moved)
        })
        .await
    };
    eprintln!("slot {moving} moved {from} -> {to} with {moved} keys in {:?}", t.elapsed());
    assert!(moved > 250, "the moved slot had {moved} keys: the writers do not use it");
    writers.wait_more(200).await;

    // Fail over the master of another slot the writers use.
    let t = Instant::now();
    let slot3 = keys::partition_slot(3);
    let c = cluster.clone();
    let (old, new) = blocking(move || {
        let mut c = c.lock().unwrap();
        let old = c.master_of_slot(slot3).unwrap();
        let new = c.failover(old).unwrap();
        assert_eq!(c.master_of_slot(slot3).unwrap(), new);
        assert!(c.replicas_of(new).unwrap().contains(&old), "the old master replicates the new one");
        (old, new)
    })
    .await;
    eprintln!("node {old} failed over to {new} in {:?}", t.elapsed());
    writers.wait_more(200).await;
    let (acked, failed) = writers.stop().await;
    eprintln!("{} writes acknowledged, {failed} failed (retried by the writer)", acked.len());

    // Every acknowledged write is there, with its value: one MGET per hash tag (one slot).
    let mut lost = Vec::new();
    let mut by_tag: std::collections::BTreeMap<u64, Vec<&(String, u64)>> = Default::default();
    for w in &acked {
        by_tag.entry(w.1 % 64).or_default().push(w);
    }
    for writes in by_tag.values() {
        for chunk in writes.chunks(1000) {
            let keys: Vec<&str> = chunk.iter().map(|w| w.0.as_str()).collect();
            let got: Vec<Option<u64>> = conn.mget(&keys).await.unwrap();
            lost.extend(chunk.iter().zip(got).filter(|(w, v)| *v != Some(w.1)).map(|(w, v)| (w.0.clone(), w.1, v)));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    eprintln!("total {:?}", started.elapsed());
}

static INCR_BOTH: LuaScript = LuaScript::new(
    "incr-both",
    "return {redis.call('INCRBY', KEYS[1], ARGV[1]), redis.call('INCRBY', KEYS[2], ARGV[1])}",
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_scripts_and_reads_in_cluster_mode_and_a_node_restart() {
    let started = Instant::now();
    let opts = ClusterOptions { aof: true, password: Some("cl-Pw-4411".into()), ..Default::default() };
    let cluster = Arc::new(Mutex::new(blocking(move || RedisCluster::start_with(3, 0, opts)).await.unwrap()));
    eprintln!("3 nodes up and settled in {:?}", started.elapsed());
    let seeds = cluster.lock().unwrap().seeds();
    let target = RedisTarget::parse(&seeds, true).unwrap();
    assert!(!format!("{target} {target:?}").contains("cl-Pw-4411"), "{target:?}");
    let mut conn = target.connect().await.unwrap();

    // Partitions on every master.
    let c = cluster.clone();
    let owners: Vec<usize> =
        blocking(move || (0..8).map(|p| c.lock().unwrap().master_of_slot(keys::partition_slot(p)).unwrap()).collect())
            .await;
    let mut distinct = owners.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "8 partitions over 3 masters: {owners:?}");

    // A pipeline (and MULTI/EXEC) within one slot works, wherever the slot is.
    for p in 0..8u32 {
        let (a, b) = (format!("k:{{{p}}}:a"), format!("k:{{{p}}}:b"));
        let (x, y): (i64, i64) = redis::pipe().incr(&a, 1).incr(&b, 2).query_async(&mut conn).await.unwrap();
        assert_eq!((x, y), (1, 2));
        let (x, y): (i64, i64) = redis::pipe().atomic().incr(&a, 1).incr(&b, 2).query_async(&mut conn).await.unwrap();
        assert_eq!((x, y), (2, 4));
    }
    // Across slots: refused by the client before anything is sent (not split per node).
    let e = redis::pipe().incr("k:{0}:a", 1).incr("k:{1}:a", 1).query_async::<(i64, i64)>(&mut conn).await.unwrap_err();
    assert!(e.to_string().to_lowercase().contains("cross"), "{e}");
    let v: i64 = conn.get("k:{0}:a").await.unwrap();
    assert_eq!(v, 2, "nothing of the cross-slot pipeline ran");

    // Scripts: by SHA, loaded on NOSCRIPT (SCRIPT LOAD goes to every node), keys in one slot.
    for p in 0..8u32 {
        let call = INCR_BOTH.call().key(format!("s:{{{p}}}:a")).key(format!("s:{{{p}}}:b")).arg(5);
        let v = call.run(&mut conn, &target).await.unwrap();
        assert_eq!(v, redis::Value::Array(vec![redis::Value::Int(5), redis::Value::Int(5)]));
    }
    let e = INCR_BOTH.call().key("s:{0}:a").key("s:{1}:a").arg(1).run(&mut conn, &target).await.unwrap_err();
    assert!(e.to_string().contains("CROSSSLOT") || e.to_string().contains("slot"), "{e}");
    let script = redis::Script::new("return redis.call('GET', KEYS[1])");
    let got: i64 = script.key("s:{5}:a").invoke_async(&mut conn).await.unwrap();
    assert_eq!(got, 5);

    // XREAD over two partitions' streams is CROSSSLOT, even when one node serves both.
    let same_node: Vec<u32> = (0..8u32).filter(|&p| owners[p as usize] == owners[0]).collect();
    assert!(same_node.len() >= 2, "{owners:?}");
    let (p, q) = (same_node[0], same_node[1]);
    let _: String = conn.xadd(keys::outcomes_stream(p), "*", &[("id", "x")]).await.unwrap();
    let _: String = conn.xadd(keys::outcomes_stream(q), "*", &[("id", "y")]).await.unwrap();
    let e = conn
        .xread::<_, _, redis::streams::StreamReadReply>(
            &[keys::outcomes_stream(p), keys::outcomes_stream(q)],
            &["0-0", "0-0"],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("CROSSSLOT"), "{e}");

    // A master killed and restarted (AOF on) comes back with its data; the connection recovers.
    let victim = owners[0];
    let c = cluster.clone();
    let t = Instant::now();
    blocking(move || {
        let mut c = c.lock().unwrap();
        c.kill(victim);
        c.restart(victim).unwrap();
    })
    .await;
    eprintln!("node {victim} killed and back in {:?}", t.elapsed());
    let deadline = Instant::now() + Duration::from_secs(20);
    let v: i64 = loop {
        match conn.get::<_, i64>("k:{0}:a").await {
            Ok(v) => break v,
            Err(e) if Instant::now() < deadline => {
                eprintln!("after restart: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the connection did not recover: {e}"),
        }
    };
    assert_eq!(v, 2);
    eprintln!("total {:?}", started.elapsed());
}

#[test]
fn partitions_can_be_dealt_out_round_robin_over_the_masters() {
    // The even slot ranges alone put 2, 4 and 2 of 8 partitions on 3 masters.
    let opts = ClusterOptions { spread_partitions: Some(8), ..Default::default() };
    let c = RedisCluster::start_with(3, 0, opts).unwrap();
    let masters = c.masters().unwrap();
    for p in 0..8 {
        assert_eq!(c.master_of_slot(keys::partition_slot(p)).unwrap(), masters[p as usize % 3], "partition {p}");
    }
    // Every other slot stays in its even range.
    let owners: Vec<usize> =
        [0u16, 5460, 5461, 10921, 10922, 16383].iter().map(|&s| c.master_of_slot(s).unwrap()).collect();
    assert_eq!(owners, vec![0, 0, 1, 1, 2, 2]);
}
