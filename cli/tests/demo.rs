//! `redtx demo` end to end, as the README runs it: the real binary with no `--redis`, so it
//! starts its own private servers (needs `redis-server` on PATH or `$REDTX_REDIS_SERVER`; the
//! PostgreSQL demo needs PostgreSQL's `initdb`), a short run, and its verdict: the exit code and
//! the `OK` line that says money (or stock) was conserved and nothing was left locked.

use std::process::{Command, Output};

fn demo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_redtx"))
        .arg("demo")
        .args(args)
        .env_remove("REDTX_REDIS_URL")
        .env_remove("REDTX_PARTITIONS")
        .output()
        .expect("redtx runs")
}

/// The run exited 0 and said OK; returns its stdout.
fn ok(args: &[&str]) -> String {
    let out = demo(args);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "redtx demo {args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.lines().any(|l| l.starts_with("OK: ")), "{stdout}");
    stdout.into_owned()
}

/// The number after `label` on its line (`  committed:  265` gives 265).
fn count(stdout: &str, label: &str) -> u64 {
    let line =
        stdout.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("{label}: {stdout}"));
    line.trim_start()[label.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

#[test]
fn the_2pc_demo_moves_money_all_or_nothing() {
    let out = ok(&["--transfers", "300"]);
    assert_eq!(count(&out, "committed:") + count(&out, "aborted:"), 300, "{out}");
    assert!(count(&out, "committed:") > 0, "{out}");
    assert!(out.contains("locks left: 0"), "{out}");
}

#[test]
fn the_saga_demo_places_orders_all_or_nothing() {
    ok(&["--mode", "saga", "--orders", "300"]);
}

#[test]
fn the_2pc_demo_runs_on_a_private_redis_cluster() {
    let out = ok(&["--cluster", "--transfers", "300"]);
    assert!(out.contains("streams on a private Redis Cluster of 3 masters"), "{out}");
    assert_eq!(count(&out, "committed:") + count(&out, "aborted:"), 300, "{out}");
}

#[test]
fn the_saga_demo_runs_on_a_private_redis_cluster() {
    let out = ok(&["--cluster", "--mode", "saga", "--orders", "300"]);
    assert!(out.contains("streams on a private Redis Cluster of 3 masters"), "{out}");
}

#[test]
fn demo_refuses_cluster_with_what_it_cannot_combine() {
    for args in [&["--cluster", "--postgres"][..], &["--cluster", "--redis", "redis://127.0.0.1:1"]] {
        let out = demo(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--cluster"), "{args:?}");
    }
    let out = demo(&["--cluster", "--masters", "9", "--partitions", "8"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--masters"));
}
