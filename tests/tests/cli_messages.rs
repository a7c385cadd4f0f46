//! What `redtx submit` tells a user beyond the outcome: one JSON object on every exit with
//! `--json`, a warning for participants that never connected, who a transaction still waits for
//! when the wait gives up, and a warning when an existing id had another spec.

use redtx_common::server::RedisServer;
use redtx_tests::*;

#[test]
fn json_prints_one_object_on_every_exit() {
    let out = cli(&["submit", "--json", "--redis", "redis://127.0.0.1:1", "-"], Some(b"{\"branches\": []}"));
    assert_eq!(out.code, Some(2), "{out:?}");
    assert_eq!(out.json()["state"], "invalid", "{out:?}");
    assert!(out.json()["reason"].as_str().unwrap().contains("branches"), "{out:?}");

    let spec = transfer_json(Some("j1"), (Side::A, "a"), (Side::B, "b"), 1);
    let out = cli(&["submit", "--json", "--redis", "redis://:sekrit@127.0.0.1:1", "-"], Some(spec.as_bytes()));
    assert_eq!(out.code, Some(4), "{out:?}");
    assert_eq!(out.json()["state"], "error", "{out:?}");
    assert_eq!(out.json()["id"], "j1", "{out:?}");
    assert!(!out.all().contains("sekrit"), "{out:?}");
}

#[test]
fn a_participant_that_never_connected_is_named_up_front_and_when_giving_up() {
    let server = RedisServer::start().unwrap();
    let url = server.url();
    let _coordinator = coordinator(&url, &["--resend-every", "200ms"], &[]);
    let _bank_a = participant(&url, "bank-a", &url, &[], &[]);
    poll("bank-a connected", LONG, || {
        let groups: redis::RedisResult<redis::streams::StreamInfoGroupsReply> =
            redis::cmd("XINFO").arg("GROUPS").arg("rtx:part:bank-a:{0}").query(&mut redis_conn(&url));
        groups.ok().filter(|g| !g.groups.is_empty()).map(|_| ())
    });
    let spec = r#"{"id": "typo", "timeout": "300ms", "branches": [
        {"participant": "bank-a", "ops": [{"op": "incrby", "key": "acct:alice", "by": 5}]},
        {"participant": "bank-c", "ops": [{"op": "incrby", "key": "acct:bob", "by": 5}]}]}"#;
    let out = cli(&["submit", "--redis", &url, "--wait", "--timeout", "2s", "-"], Some(spec.as_bytes()));
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("warning: no participant named \"bank-c\""), "{out:?}");
    assert!(!out.stderr.contains("named \"bank-a\""), "bank-a is connected: {out:?}");
    assert!(out.stderr.contains("typo is aborting (timeout: bank-c did not vote within 300ms)"), "{out:?}");
    assert!(out.stderr.contains("waiting for an ack from bank-c"), "{out:?}");
}

#[test]
fn an_existing_id_with_another_spec_is_flagged() {
    let bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    let url = bank.url();
    let first = transfer_json(Some("same"), (Side::A, "acct:alice"), (Side::B, "acct:bob"), 10);
    let out = cli(&["submit", "--redis", &url, "--wait", "-"], Some(first.as_bytes()));
    assert_eq!(out.code, Some(0), "{out:?}");
    // (A "never connected" warning may show if the participants are still starting up.)
    assert!(!out.stderr.contains("different spec"), "{out:?}");
    let second = transfer_json(Some("same"), (Side::A, "acct:alice"), (Side::B, "acct:bob"), 20);
    let out = cli(&["submit", "--redis", &url, "--wait", "-"], Some(second.as_bytes()));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("already existed with a different spec"), "{out:?}");
    assert_eq!(bank.balance(Side::A, "acct:alice"), 90, "the second spec must not run");
}
