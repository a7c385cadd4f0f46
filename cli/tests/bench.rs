//! `redtx bench` end to end: the real binary, its own two private `redis-server`s (needs
//! `redis-server` on PATH or `$REDTX_REDIS_SERVER`), a short run, the `--json` figures.

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

fn check_bench(extra: &[&str]) -> serde_json::Value {
    let started = Instant::now();
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
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    v
}
