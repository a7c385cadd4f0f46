//! What `redtx submit` tells a user beyond the outcome: one JSON object on every exit with
//! `--json` (saying whether anything was enqueued), a warning for participants that never
//! connected and a quick, definite answer for a transaction naming one (a typo), whose stream
//! then stops growing, and a warning when an existing id had another spec.

use redtx_common::record::TxnState;
use redtx_common::spec::{Branch, Op, TxnSpec};
use redtx_tests::*;
use std::time::{Duration, Instant};

#[test]
fn json_prints_one_object_on_every_exit() {
    let out = cli(&["submit", "--json", "--redis", "redis://127.0.0.1:1", "-"], Some(b"{\"branches\": []}"));
    assert_eq!(out.code, Some(2), "{out:?}");
    assert_eq!(out.json()["state"], "invalid", "{out:?}");
    assert_eq!(out.json()["enqueued"], false, "{out:?}");
    assert!(out.json()["reason"].as_str().unwrap().contains("branches"), "{out:?}");

    let spec = transfer_json(Some("j1"), (Side::A, "a"), (Side::B, "b"), 1);
    let out = cli(&["submit", "--json", "--redis", "redis://:sekrit@127.0.0.1:1", "-"], Some(spec.as_bytes()));
    assert_eq!(out.code, Some(4), "{out:?}");
    assert_eq!(out.json()["state"], "error", "{out:?}");
    assert_eq!(out.json()["id"], "j1", "{out:?}");
    assert_eq!(out.json()["enqueued"], false, "{out:?}");
    assert!(!out.all().contains("sekrit"), "{out:?}");
}

#[test]
fn a_typo_participant_gets_a_quick_definite_answer_and_its_stream_stops_growing() {
    let bank = Bank::start();
    let url = bank.url();
    bank.seed(Side::A, "acct:alice", 100);
    // Everyone is up (their consumer groups exist) once a first transaction went through.
    assert_eq!(bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 1)).state, TxnState::Committed);

    // "bank-c" has no workers: nobody will ever vote. The answer must come at the deadline
    // (1 s), not when the wait gives up (20 s): `aborting` is decided, nothing is applied.
    let spec = r#"{"id": "typo", "timeout": "1s", "branches": [
        {"participant": "bank-a", "ops": [{"op": "incrby", "key": "acct:alice", "by": 5}]},
        {"participant": "bank-c", "ops": [{"op": "incrby", "key": "acct:bob", "by": 5}]}]}"#;
    let started = Instant::now();
    let out = redtx("submit", &url, &["--wait", "--timeout", "20s", "-"], Some(spec.as_bytes()));
    let took = started.elapsed();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(took < Duration::from_secs(7), "answered {took:?} after submit; the timeout is 1s: {out:?}");
    assert!(out.stderr.contains("warning") && out.stderr.contains("\"bank-c\""), "{out:?}");
    assert!(!out.stderr.contains("\"bank-a\""), "bank-a is connected: {out:?}");
    assert!(out.all().contains("abort"), "{out:?}");
    assert!(out.all().contains("bank-c did not vote within 1s"), "the reason should name bank-c: {out:?}");
    let rec = bank.record("typo").unwrap();
    assert!(matches!(rec.state, TxnState::Aborting | TxnState::Aborted), "{rec:?}");
    bank.wait_barrier("bank-a", "typo", "aborted");
    assert_eq!(bank.balance(Side::A, "acct:alice"), 99);

    // The decision is re-sent to unacked branches on a backing-off timer (200 ms, 400 ms,
    // 800 ms, 1.6 s, ...), but not to a stream nobody reads: bank-c's stream holds the prepare
    // and the decision, and stays that way.
    let stream = keys::participant_stream("bank-c", partition("typo"));
    let len = bank.xlen(&stream);
    eprintln!("bank-c's stream holds {len} entries after the decision");
    assert!(len <= 2, "bank-c's stream holds {len} entries right after the decision");
    // A later, unrelated transaction reaches its own 3 s deadline (another typo): by then the
    // coordinator has run the typo's re-send timer at least four times.
    let later = TxnSpec::new(vec![
        Branch::kv("bank-a", vec![Op::incrby("acct:carol", 1)]),
        Branch::kv("bank-d", vec![Op::incrby("x", 1)]),
    ])
    .with_id("typo-later")
    .with_timeout(Duration::from_secs(3));
    let id = bank.submit(&later);
    let rec = bank.wait_settled(&id);
    assert_eq!(rec.state, TxnState::Aborting, "{rec:?}");
    assert_eq!(bank.xlen(&stream), len, "re-sends went to a stream nobody reads");
    assert_eq!(bank.record("typo").unwrap().state, TxnState::Aborting, "nobody acked for bank-c");
}

#[test]
fn an_existing_id_with_another_spec_is_flagged() {
    let bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    let url = bank.url();
    let first = transfer_json(Some("same"), (Side::A, "acct:alice"), (Side::B, "acct:bob"), 10);
    let out = redtx("submit", &url, &["--wait", "-"], Some(first.as_bytes()));
    assert_eq!(out.code, Some(0), "{out:?}");
    // (A "never connected" warning may show if the participants are still starting up.)
    assert!(!out.stderr.contains("different spec"), "{out:?}");
    let second = transfer_json(Some("same"), (Side::A, "acct:alice"), (Side::B, "acct:bob"), 20);
    let out = redtx("submit", &url, &["--wait", "-"], Some(second.as_bytes()));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("with a different spec"), "{out:?}");
    assert_eq!(bank.balance(Side::A, "acct:alice"), 90, "the second spec must not run");
}
