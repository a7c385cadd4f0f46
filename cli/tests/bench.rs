//! `redtx bench` end to end: the real binary, its own two private `redis-server`s (needs
//! `redis-server` on PATH or `$REDTX_REDIS_SERVER`), a short run, the `--json` figures; with
//! `--cluster`, a private 3-master Redis Cluster for the streams after the single-node reference.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_short_bench_reports_throughput_baseline_and_nothing_broken() {
    check_bench(&[]);
}

#[test]
fn a_short_saga_bench_on_two_partitions_reports_the_same_figures() {
    let v = check_bench(&["--mode", "saga", "--partitions", "2"]);
    assert_eq!(v["config"]["mode"], "saga", "{v}");
    assert_eq!(v["config"]["partitions"], 2, "{v}");
}

#[test]
fn a_short_cluster_bench_reports_each_master_and_the_single_node_reference() {
    let started = Instant::now();
    let v = check_bench(&["--cluster", "--baseline", "300ms"]);
    let num = |ptr: &str| v.pointer(ptr).and_then(|x| x.as_f64()).unwrap_or_else(|| panic!("no number at {ptr}: {v}"));
    assert_eq!(v["config"]["streams"], "cluster", "{v}");
    // Every master serves partitions (8 over 3: 3, 3 and 2), has its baseline, and ran commands.
    let nodes = v["cluster"]["nodes"].as_array().unwrap_or_else(|| panic!("no nodes: {v}"));
    assert_eq!(nodes.len(), 3, "{v}");
    let mut served: Vec<u64> = Vec::new();
    for n in nodes {
        assert!(n["evalsha_pipelined_per_s"].as_f64().is_some_and(|r| r > 0.0), "{n}");
        served.extend(n["partitions"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()));
    }
    let mut counts: Vec<usize> = nodes.iter().map(|n| n["partitions"].as_array().unwrap().len()).collect();
    counts.sort_unstable();
    assert_eq!(counts, [2, 3, 3], "partitions dealt out round robin: {v}");
    served.sort_unstable();
    assert_eq!(served, (0..8).collect::<Vec<u64>>(), "each partition on one master: {v}");
    assert!(num("/cluster/evalsha_pipelined_all_masters_per_s") > 0.0, "{v}");
    let by_server = v["redis_commands_per_txn"]["by_server"].as_array().unwrap();
    let masters: Vec<&serde_json::Value> = by_server.iter().filter(|s| s["partitions"].is_array()).collect();
    assert_eq!(masters.len(), 3, "{v}");
    assert!(masters.iter().all(|m| m["total"].as_f64().is_some_and(|t| t > 0.0)), "{v}");
    // CPU of each master, each worker and the load.
    let procs: Vec<&str> =
        v["cpu"]["processes"].as_array().unwrap().iter().map(|p| p["process"].as_str().unwrap()).collect();
    for m in 1..=3 {
        assert!(procs.contains(&format!("redis streams master {m}").as_str()), "{procs:?}");
    }
    assert!(procs.contains(&"coordinator"), "{procs:?}");
    // The single-node reference of the same invocation, and the ratios against it.
    assert_eq!(v["reference"]["config"]["streams"], "single", "{v}");
    assert!(num("/reference/closed_loop/committed") >= 1.0, "{v}");
    assert_eq!(v["reference"]["broken"], false, "{v}");
    assert!(num("/vs_reference/closed_tx_per_reference_closed_tx") > 0.0, "{v}");
    assert!(num("/vs_reference/redis_commands_per_tx_per_reference") > 0.0, "{v}");
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}

fn check_bench(extra: &[&str]) -> serde_json::Value {
    let started = Instant::now();
    let cluster = extra.contains(&"--cluster");
    let out = Command::new(env!("CARGO_BIN_EXE_redtx"))
        .args(["bench", "--duration", "1s", "--concurrency", "4", "--accounts", "100", "--json"])
        .args(extra)
        .env_remove("REDTX_REDIS_URL")
        .output()
        .expect("redtx runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "exit {:?}\nstdout: {stdout}\nstderr: {stderr}", out.status.code());
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let num = |ptr: &str| v.pointer(ptr).and_then(|x| x.as_f64()).unwrap_or_else(|| panic!("no number at {ptr}: {v}"));

    for ptr in [
        "/baseline/evalsha_awaited_per_s",
        "/baseline/evalsha_pipelined_per_s",
        "/closed_loop/tx_per_s",
        "/closed_loop/latency/p50_ms",
        "/half_load/result/tx_per_s",
        "/ratios/closed_tx_per_evalsha_awaited",
        "/ratios/closed_tx_per_evalsha_pipelined",
        "/redis_commands_per_txn/total",
        "/redis_commands_per_txn/network",
        "/redis_commands_per_txn/in_lua",
    ] {
        assert!(num(ptr) > 0.0, "{ptr} is not positive: {v}");
    }
    assert!(num("/closed_loop/committed") >= 1.0, "{v}");
    assert!(num("/redis_commands_per_txn/by_command/evalsha") > 0.0, "{v}");
    assert_eq!(num("/aborted"), 0.0, "{v}");
    assert_eq!(num("/gave_up"), 0.0, "{v}");
    assert_eq!(num("/locks_left"), 0.0, "{v}");
    assert_eq!(v["broken"], false, "{v}");
    assert_eq!(v["money"]["conserved"], true, "{v}");
    if !cluster {
        assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    }
    v
}
