//! `Outages` probes on a real Redis Cluster whose master is frozen (SIGSTOP) with no replica to
//! take over: what does not count as an answer.

use redtx_common::cluster_server::{ClusterOptions, RedisCluster};
use redtx_common::conn::{ClusterRetries, RedisTarget, RedisUrl};
use redtx_common::keys;
use redtx_common::outage::Outages;
use std::time::{Duration, Instant};

/// How many `MOVED` replies the nodes other than `frozen` have given so far (`INFO errorstats`).
fn moved_replies(cluster: &RedisCluster, frozen: usize) -> u64 {
    let mut total = 0;
    for node in (0..cluster.len()).filter(|n| *n != frozen) {
        let client = redis::Client::open(cluster.url(node)).expect("node url");
        let mut con = client.get_connection_with_timeout(Duration::from_secs(2)).expect("a live node");
        let info: String = redis::cmd("INFO").arg("errorstats").query(&mut con).expect("INFO errorstats");
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("errorstat_MOVED:count="))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// A probe whose call is redirected (`MOVED`) by a live node to the frozen master, which the
/// cluster connection cannot reach, has not been answered: the partition stays out for as long
/// as the master is frozen, however many redirects its probes meet, and comes back in once the
/// master is thawed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_redirected_to_a_frozen_master_keeps_its_partition_out() {
    let opts = ClusterOptions::partial_coverage();
    let mut cluster =
        tokio::task::spawn_blocking(move || RedisCluster::start_with(3, 0, opts).expect("a cluster")).await.unwrap();
    let p = 0;
    let frozen = cluster.master_of_slot(keys::partition_slot(p)).unwrap();
    let seeds: Vec<RedisUrl> = cluster.seed_urls().iter().map(|u| RedisUrl::parse(u).unwrap()).collect();
    let target = RedisTarget::cluster(seeds).unwrap().with_cluster_retries(ClusterRetries::QUICK);
    let outages = Outages::connect(&target, "partition").await.unwrap();

    cluster.freeze(frozen).unwrap();
    let before = moved_replies(&cluster, frozen);
    outages.mark(p, keys::coord_stream(p));
    // Wait for the redirects the probes met: each is a probe that was not answered.
    let started = Instant::now();
    let mut moved = 0;
    while moved < 3 {
        assert!(started.elapsed() < Duration::from_secs(60), "the probes met {moved} redirects in 60 s, not 3");
        tokio::time::sleep(Duration::from_millis(200)).await;
        moved = moved_replies(&cluster, frozen) - before;
    }
    assert!(outages.is_out(p), "partition {p} was taken back in on one of {moved} redirects to its frozen master");

    cluster.thaw(frozen).unwrap();
    let thawed = Instant::now();
    while outages.is_out(p) {
        assert!(thawed.elapsed() < Duration::from_secs(30), "partition {p} stayed out after its master was thawed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
