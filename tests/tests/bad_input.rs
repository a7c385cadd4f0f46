//! The `redtx` CLI refuses bad input with exit code 2 and a message naming the field, enqueues
//! nothing, never prints a password, and gives up waiting with exit code 3.

use redis::Commands;
use redtx_common::server::{free_port, RedisServer, ServerOptions};
use redtx_tests::*;
use std::time::Duration;

const OP: &str = r#"{"op":"incrby","key":"acct:alice","by":-10,"min":0}"#;

fn spec_with_ops(ops: &str) -> String {
    format!(r#"{{"mode":"2pc","timeout":"5s","branches":[{{"participant":"bank-a","ops":[{ops}]}}]}}"#)
}

/// Submits `input` on stdin; asserts exit 2, that stderr names every one of `needles`, and that
/// nothing reached any coordinator stream. With `--json`: the same, as one object with
/// `enqueued: false`.
fn refused(server: &RedisServer, what: &str, input: &[u8], needles: &[&str]) {
    let out = redtx("submit", &server.url(), &["-"], Some(input));
    assert_eq!(out.code, Some(2), "{what}: expected exit 2, got {out:?}");
    for n in needles {
        assert!(out.stderr.contains(n), "{what}: stderr should contain {n:?}: {:?}", out.stderr);
    }
    assert!(out.stdout.trim().is_empty(), "{what}: nothing on stdout expected, got {:?}", out.stdout);
    let out = redtx("submit", &server.url(), &["--json", "-"], Some(input));
    assert_eq!(out.code, Some(2), "{what} (--json): expected exit 2, got {out:?}");
    let v = out.json();
    assert_eq!(v["state"], "invalid", "{what}: {v}");
    assert_eq!(v["enqueued"], false, "{what}: {v}");
    assert_eq!(nothing_enqueued(server), 0, "{what}: something was enqueued");
}

/// Entries in every coordinator stream.
fn nothing_enqueued(server: &RedisServer) -> u64 {
    xlen_sum(&mut redis_conn(&server.url()), &coord_streams())
}

#[test]
fn invalid_specs_exit_2_naming_the_field_and_enqueue_nothing() {
    let server = RedisServer::start().unwrap();
    refused(&server, "invalid JSON", b"{\"branches\": [", &["EOF"]);
    refused(&server, "not JSON at all", b"hello", &[]);
    refused(
        &server,
        "unknown op",
        spec_with_ops(r#"{"op":"frob","key":"k"}"#).as_bytes(),
        &["branches[0].ops[0].op", "frob"],
    );
    refused(
        &server,
        "missing field",
        spec_with_ops(r#"{"op":"incrby","key":"k"}"#).as_bytes(),
        &["branches[0].ops[0]", "by"],
    );
    refused(
        &server,
        "wrong-typed field",
        spec_with_ops(r#"{"op":"incrby","key":"k","by":"ten"}"#).as_bytes(),
        &["branches[0].ops[0].by"],
    );
    refused(&server, "missing participant", br#"{"branches":[{"ops":[{"op":"del","key":"k"}]}]}"#, &["participant"]);
    refused(&server, "no branches", br#"{"branches":[]}"#, &["branches"]);
    refused(&server, "branches missing", br#"{"mode":"2pc"}"#, &["branches"]);
    refused(
        &server,
        "saga with branches",
        format!(r#"{{"mode":"saga","branches":[{{"participant":"bank-a","action":[{OP}],"compensation":[{OP}]}}]}}"#)
            .as_bytes(),
        &["branches", "steps"],
    );
    refused(
        &server,
        "saga step without compensation",
        format!(r#"{{"mode":"saga","steps":[{{"participant":"bank-a","action":[{OP}]}}]}}"#).as_bytes(),
        &["steps[0]", "compensation"],
    );
    refused(
        &server,
        "saga step with ops",
        format!(r#"{{"mode":"saga","steps":[{{"participant":"bank-a","ops":[{OP}]}}]}}"#).as_bytes(),
        &["steps[0].ops"],
    );
    refused(
        &server,
        "bad op in a compensation",
        format!(
            r#"{{"mode":"saga","steps":[{{"participant":"bank-a","action":[{OP}],"compensation":[{{"op":"incrby","key":"k","by":"x"}}]}}]}}"#
        )
        .as_bytes(),
        &["steps[0].compensation[0].by"],
    );
    refused(
        &server,
        "retry in a 2pc spec",
        format!(r#"{{"retry":{{"limit":3}},"branches":[{{"participant":"bank-a","ops":[{OP}]}}]}}"#).as_bytes(),
        &["retry"],
    );
    refused(
        &server,
        "2pc with steps",
        format!(r#"{{"steps":[{{"participant":"bank-a","ops":[{OP}]}}]}}"#).as_bytes(),
        &["steps"],
    );
    refused(
        &server,
        "two branches for one participant",
        format!(r#"{{"branches":[{{"participant":"bank-a","ops":[{OP}]}},{{"participant":"bank-a","ops":[{OP}]}}]}}"#)
            .as_bytes(),
        &["branches[1].participant"],
    );
    refused(&server, "empty ops", br#"{"branches":[{"participant":"bank-a","ops":[]}]}"#, &["branches[0].ops"]);
    refused(
        &server,
        "bad timeout",
        format!(r#"{{"timeout":"soon","branches":[{{"participant":"bank-a","ops":[{OP}]}}]}}"#).as_bytes(),
        &["timeout"],
    );
    refused(
        &server,
        "timeout out of range",
        format!(r#"{{"timeout":"2h","branches":[{{"participant":"bank-a","ops":[{OP}]}}]}}"#).as_bytes(),
        &["timeout"],
    );
    refused(
        &server,
        "unknown mode",
        format!(r#"{{"mode":"3pc","branches":[{{"participant":"bank-a","ops":[{OP}]}}]}}"#).as_bytes(),
        &["mode"],
    );
    refused(
        &server,
        "reserved key",
        spec_with_ops(r#"{"op":"del","key":"rtx:lock:x"}"#).as_bytes(),
        &["branches[0].ops[0].key"],
    );
    refused(
        &server,
        "bad id",
        format!(r#"{{"id":"has space","branches":[{{"participant":"bank-a","ops":[{OP}]}}]}}"#).as_bytes(),
        &["id"],
    );
    refused(
        &server,
        "unknown top-level field",
        format!(r#"{{"colour":"red","branches":[{{"participant":"bank-a","ops":[{OP}]}}]}}"#).as_bytes(),
        &["colour"],
    );
    // Oversized: a value over 64 KiB, and a whole spec over 1 MiB.
    let big = "x".repeat(64 * 1024 + 1);
    refused(
        &server,
        "oversized value",
        spec_with_ops(&format!(r#"{{"op":"set","key":"k","value":"{big}"}}"#)).as_bytes(),
        &["branches[0].ops[0].value"],
    );
    let mut huge = spec_with_ops(OP).into_bytes();
    huge.extend(std::iter::repeat_n(b' ', 1024 * 1024));
    refused(&server, "oversized spec", &huge, &["limit"]);
}

#[test]
fn a_spec_file_that_does_not_exist_is_a_usage_error() {
    let server = RedisServer::start().unwrap();
    let out = redtx("submit", &server.url(), &["/nonexistent/redtx-spec.json"], None);
    assert!(matches!(out.code, Some(2) | Some(4)), "{out:?}");
    assert!(out.stderr.contains("/nonexistent/redtx-spec.json"), "{out:?}");
    assert_eq!(nothing_enqueued(&server), 0);
    // A partition count out of range is a usage error too, before anything is enqueued.
    let json = transfer_json(None, (Side::A, "acct:alice"), (Side::B, "acct:bob"), 1);
    let out = cli(&["submit", "--redis", &server.url(), "--partitions", "0", "-"], Some(json.as_bytes()));
    assert_eq!(out.code, Some(2), "{out:?}");
    assert_eq!(nothing_enqueued(&server), 0);
    // Unknown flags and missing arguments are usage errors too.
    assert_eq!(cli(&["submit", "--frobnicate", "-"], None).code, Some(2));
    assert_eq!(cli(&["status"], None).code, Some(2));
}

#[test]
fn unreachable_redis_exits_4_without_leaking_the_password() {
    let port = free_port().unwrap();
    let json = transfer_json(None, (Side::A, "acct:alice"), (Side::B, "acct:bob"), 1);
    for url in
        [format!("redis://:hunter2secret@127.0.0.1:{port}"), format!("redis://ops:hunter2secret@127.0.0.1:{port}/0")]
    {
        let out = redtx("submit", &url, &["-"], Some(json.as_bytes()));
        assert!(out.code.is_some_and(|c| c >= 4), "{url}: {out:?}");
        assert!(!out.all().contains("hunter2secret"), "password leaked: {out:?}");
        assert!(out.stderr.contains(&port.to_string()), "the message should name the server: {out:?}");
        let out = redtx("status", &url, &["some-id"], None);
        assert!(out.code.is_some_and(|c| c >= 4), "{url}: {out:?}");
        assert!(!out.all().contains("hunter2secret"), "password leaked: {out:?}");
    }
    // A reachable server with a wrong password: refused, password not printed.
    let server =
        RedisServer::start_with(ServerOptions { password: Some("right-one".into()), ..Default::default() }).unwrap();
    let url = format!("redis://:wrong-hunter2@127.0.0.1:{}", server.port());
    let out = redtx("submit", &url, &["-"], Some(json.as_bytes()));
    assert!(out.code.is_some_and(|c| c >= 4), "{out:?}");
    assert!(!out.all().contains("wrong-hunter2"), "password leaked: {out:?}");
}

#[test]
fn waiting_without_a_coordinator_gives_up_with_exit_3() {
    let server = RedisServer::start().unwrap();
    let json = transfer_json(Some("t-nobody"), (Side::A, "acct:alice"), (Side::B, "acct:bob"), 1);
    let started = std::time::Instant::now();
    let out = redtx("submit", &server.url(), &["--wait", "--timeout", "200ms", "-"], Some(json.as_bytes()));
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(15), "gave up too late: {:?}", started.elapsed());
    assert!(out.all().contains("t-nobody"), "the message should name the transaction: {out:?}");
    // The transaction was enqueued, in its partition (it goes on once a coordinator runs).
    let len: u64 = redis_conn(&server.url()).xlen(keys::coord_stream(partition("t-nobody"))).unwrap();
    assert_eq!(len, 1);
    assert_eq!(nothing_enqueued(&server), 1);
}
