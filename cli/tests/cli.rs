//! The `redtx` binary's own argument handling, without Redis: usage errors and spec validation
//! happen before any connection. (End-to-end behaviour is tested in the workspace's `tests/`.)

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn redtx(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_redtx"))
        .args(args)
        .env_remove("REDTX_REDIS_URL")
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
fn usage_errors_exit_2() {
    assert_eq!(redtx(&["submit", "--timeout", "soon", "-"], "").status.code(), Some(2));
    assert_eq!(redtx(&["status"], "").status.code(), Some(2));
    assert_eq!(redtx(&["status", "--redis", "redis://127.0.0.1:1", "not an id"], "").status.code(), Some(2));
    assert_eq!(redtx(&["frobnicate"], "").status.code(), Some(2));
}
