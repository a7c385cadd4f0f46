//! The `redtx` binary's own argument handling, without Redis: usage errors and spec validation
//! happen before any connection. (End-to-end behaviour is tested in the workspace's `tests/`.)

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn redtx(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_redtx"))
        .args(args)
        .env_remove("REDTX_REDIS_URL")
        .env_remove("REDTX_PARTITIONS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redtx runs");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn help_lists_the_commands() {
    let out = redtx(&["--help"], "");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["submit", "status", "demo", "bench"] {
        assert!(text.contains(cmd), "{cmd} missing from help:\n{text}");
    }
}

#[test]
fn an_invalid_spec_exits_2_before_connecting() {
    // Port 1 is never a Redis: the spec must be refused before any connection is tried.
    let out = redtx(
        &["submit", "--redis", "redis://:pw@127.0.0.1:1", "-"],
        r#"{"branches":[{"participant":"bank-a","ops":[{"op":"incrby","key":"k","by":"ten"}]}]}"#,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("branches[0].ops[0].by"), "{err}");
}

#[test]
fn a_saga_step_with_a_bad_op_exits_2_naming_it() {
    let out = redtx(
        &["submit", "--json", "--redis", "redis://127.0.0.1:1", "-"],
        r#"{"mode":"saga","steps":[{"participant":"stock",
            "action":[{"op":"incrby","key":"stock:1","by":"two"}],
            "compensation":[{"op":"incrby","key":"stock:1","by":2}]}]}"#,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("steps[0].action[0].by"), "{err}");
    // --json: one object, even for a refused spec.
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["enqueued"], false, "{v}");
    assert_eq!(v["state"], "invalid", "{v}");
}

#[test]
fn submit_without_wait_exits_4_when_redis_is_unreachable_with_a_json_object() {
    let out = redtx(
        &["submit", "--json", "--redis", "redis://127.0.0.1:1", "-"],
        r#"{"branches":[{"participant":"bank-a","ops":[{"op":"set","key":"k","value":"v"}]}]}"#,
    );
    assert_eq!(out.status.code(), Some(4));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["enqueued"], false, "{v}");
    assert_eq!(v["state"], "error", "{v}");
}

#[test]
fn submit_wait_retries_an_unreachable_redis_until_its_timeout_then_exits_3() {
    let started = std::time::Instant::now();
    let out = redtx(
        &["submit", "--wait", "--timeout", "1s", "--json", "--redis", "redis://127.0.0.1:1", "-"],
        r#"{"id":"t-1","branches":[{"participant":"bank-a","ops":[{"op":"set","key":"k","value":"v"}]}]}"#,
    );
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(started.elapsed() >= std::time::Duration::from_millis(900), "gave up after {:?}", started.elapsed());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["id"], "t-1", "{v}");
    assert_eq!(v["enqueued"], false, "{v}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(redtx(&["submit", "--timeout", "soon", "-"], "").status.code(), Some(2));
    assert_eq!(redtx(&["status"], "").status.code(), Some(2));
    assert_eq!(redtx(&["status", "--redis", "redis://127.0.0.1:1", "not an id"], "").status.code(), Some(2));
    assert_eq!(redtx(&["frobnicate"], "").status.code(), Some(2));
    assert_eq!(redtx(&["submit", "--partitions", "0", "-"], "").status.code(), Some(2));
    assert_eq!(redtx(&["status", "--partitions", "many", "x"], "").status.code(), Some(2));
    assert_eq!(redtx(&["demo", "--mode", "3pc"], "").status.code(), Some(2));
}
