//! The key-value resource's Lua scripts on a real Redis, driven through the runtime's
//! `settle` (what the key-value business does; the barrier rules themselves are checked by the
//! conformance suite, tests/conformance.rs).

mod support;

use redis::AsyncCommands;
use redtx_common::conn::RedisUrl;
use redtx_common::kv::{encode_ops, DelOp, ExpectOp, HdelOp, HincrbyOp, HsetOp, IncrbyOp, Op};
use redtx_common::protocol::{Outcome, StepKind, StepStatus};
use redtx_common::{keys, now_ms};
use redtx_participant::{Answer, KvResource, Request};
use std::time::Duration;
use support::*;

fn yes() -> Answer {
    Answer::Vote { yes: true, reason: None }
}

fn no(reason: &str) -> Answer {
    Answer::Vote { yes: false, reason: Some(reason.into()) }
}

fn acked(outcome: Outcome) -> Answer {
    Answer::Ack(outcome)
}

fn step(step: StepKind, status: StepStatus, reason: Option<&str>) -> Answer {
    Answer::Step { step, status, reason: reason.map(Into::into) }
}

fn incrby(key: &str, by: i64, min: Option<i64>, max: Option<i64>) -> Op {
    Op::Incrby(IncrbyOp { key: key.into(), by, min, max })
}

fn hset(key: &str, field: &str, value: &str) -> Op {
    Op::Hset(HsetOp { key: key.into(), field: field.into(), value: value.into() })
}

fn hincrby(key: &str, field: &str, by: i64, min: Option<i64>) -> Op {
    Op::Hincrby(HincrbyOp { key: key.into(), field: field.into(), by, min, max: None })
}

fn expect(key: &str, value: Option<&str>) -> Op {
    Op::Expect(ExpectOp { key: key.into(), value: value.map(str::to_string) })
}

#[tokio::test]
async fn prepare_stages_and_locks_commit_applies_and_releases() {
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let _: () = c.set("acct:alice", 100).await.unwrap();
    let _: () = c.hset("h", "gone", "x").await.unwrap();
    let p = prepare(
        "t1",
        vec![
            incrby("acct:alice", -30, Some(0), None),
            Op::set("x", "v"),
            hset("h", "f", "v"),
            hincrby("h", "n", 5, Some(0)),
            Op::Hdel(HdelOp { key: "h".into(), field: "gone".into() }),
            incrby("acct:alice", -10, Some(0), None),
        ],
    );
    assert_eq!(ask(&mut r, Request::Prepare(p.clone())).await.unwrap(), yes());
    // Staged only: plain readers see the old values; the keys are locked by this branch.
    assert_eq!(get(&mut c, "acct:alice").await.as_deref(), Some("100"));
    assert_eq!(get(&mut c, "x").await, None);
    assert_eq!(hget(&mut c, "h", "f").await, None);
    let bar = keys::barrier(NAME, "t1");
    for k in ["acct:alice", "x", "h"] {
        assert_eq!(get(&mut c, &keys::lock(k)).await.as_deref(), Some("bank-a t1"));
    }
    assert_eq!(hget(&mut c, &bar, "state").await.as_deref(), Some("prepared"));
    assert_eq!(hget(&mut c, &bar, "deadline").await, Some(p.deadline_ms.to_string()));
    let ttl: i64 = c.pttl(&bar).await.unwrap();
    assert_eq!(ttl, -1, "a prepared barrier never expires");

    assert_eq!(ask(&mut r, Request::Commit(resolve("t1"))).await.unwrap(), acked(Outcome::Committed));
    assert_eq!(get(&mut c, "acct:alice").await.as_deref(), Some("60"));
    assert_eq!(get(&mut c, "x").await.as_deref(), Some("v"));
    let h: std::collections::HashMap<String, String> = c.hgetall("h").await.unwrap();
    assert_eq!(h, [("f".to_string(), "v".to_string()), ("n".to_string(), "5".to_string())].into());
    let locks: Vec<String> = c.keys("rtx:lock:*").await.unwrap();
    assert!(locks.is_empty(), "{locks:?}");
    assert_eq!(hget(&mut c, &bar, "state").await.as_deref(), Some("committed"));
    assert_eq!(hget(&mut c, &bar, "ops").await.as_deref(), Some(""), "staging emptied");
    let ttl: i64 = c.pttl(&bar).await.unwrap();
    assert!(ttl > 0 && ttl <= RETENTION.as_millis() as i64, "{ttl}");
}

#[tokio::test]
async fn commit_and_abort_find_the_keys_in_the_barrier() {
    // Commit/abort messages carry no keys. A worker that did not run the prepare (another
    // process of the same participant, or a restart) reads them from the barrier.
    let s = server();
    let mut c = conn(&s).await;
    let mut first = kv(&s);
    for t in ["k1", "k2"] {
        let p = prepare(t, vec![Op::set(format!("{t}:a"), "v"), incrby(&format!("{t}:b"), 1, None, None)]);
        assert_eq!(ask(&mut first, Request::Prepare(p)).await.unwrap(), yes());
    }
    let mut second = kv(&s);
    let out = redtx_participant::worker::settle(
        &mut second,
        &[Request::Commit(resolve("k1")), Request::Abort(resolve("k2"))],
        now_ms(),
    )
    .await
    .unwrap();
    assert_eq!(out, vec![Ok(acked(Outcome::Committed)), Ok(acked(Outcome::Aborted))]);
    assert_eq!(get(&mut c, "k1:a").await.as_deref(), Some("v"));
    assert_eq!(get(&mut c, "k2:b").await, None);
    let locks: Vec<String> = c.keys("rtx:lock:*").await.unwrap();
    assert!(locks.is_empty(), "{locks:?}");
}

#[tokio::test]
async fn reading_the_keys_from_the_barrier_survives_a_dropped_connection() {
    // A worker whose data connection died (a Redis restart, a killed client) and whose first
    // call after that reads a branch's keys from its barrier (a commit or abort of a branch it
    // did not prepare: a refused one, or another process's) reads them on a fresh connection,
    // instead of failing on the dead one at every retry.
    let s = server();
    let mut c = conn(&s).await;
    let mut first = kv(&s);
    for t in ["d1", "d2"] {
        let p = prepare(t, vec![incrby(&format!("{t}:b"), 1, None, None)]);
        assert_eq!(ask(&mut first, Request::Prepare(p)).await.unwrap(), yes());
    }
    let mut second = kv(&s);
    let p = prepare("d3", vec![Op::set("d3:a", "v")]);
    assert_eq!(ask(&mut second, Request::Prepare(p)).await.unwrap(), yes(), "second's connection is open");
    let killed: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal").query_async(&mut c).await.unwrap();
    assert!(killed >= 2, "the workers' connections were killed ({killed})");
    let out = redtx_participant::worker::settle(
        &mut second,
        &[Request::Commit(resolve("d1")), Request::Abort(resolve("d2"))],
        now_ms(),
    )
    .await
    .expect("settled on a fresh connection");
    assert_eq!(out, vec![Ok(acked(Outcome::Committed)), Ok(acked(Outcome::Aborted))]);
    assert_eq!(get(&mut c, "d1:b").await.as_deref(), Some("1"));
    assert_eq!(get(&mut c, "d2:b").await, None);
}

#[tokio::test]
async fn guards_refuse_with_clear_reasons_and_change_nothing() {
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let _: () = c.set("acct:alice", 10).await.unwrap();
    let _: () = c.set("name", "ann").await.unwrap();
    let _: () = c.set("text", "abc").await.unwrap();
    let _: () = c.hset("hash", "f", "nope").await.unwrap();
    let cases: Vec<(Vec<Op>, &str)> = vec![
        (vec![incrby("acct:alice", -30, Some(0), None)], "bank-a: acct:alice would be -20, below min 0"),
        (vec![incrby("acct:alice", 5, None, Some(12))], "bank-a: acct:alice would be 15, above max 12"),
        (
            vec![incrby("acct:alice", 5, None, None), incrby("acct:alice", -16, Some(0), None)],
            "bank-a: acct:alice would be -1, below min 0",
        ),
        (vec![incrby("fresh", -1, Some(0), None)], "bank-a: fresh would be -1, below min 0"),
        (vec![incrby("text", 1, None, None)], "bank-a: text is \"abc\", not an integer"),
        (vec![expect("name", Some("bob"))], "bank-a: name is \"ann\", expected \"bob\""),
        (vec![expect("nobody", Some("x"))], "bank-a: nobody does not exist, expected \"x\""),
        (vec![expect("name", None)], "bank-a: name is \"ann\", expected it not to exist"),
        (vec![expect("hash", None)], "bank-a: hash exists (a hash), expected it not to exist"),
        (vec![Op::set("name", "z"), expect("name", Some("ann"))], "bank-a: name is \"z\", expected \"ann\""),
        (vec![hset("name", "f", "v")], "bank-a: name is a string, hset needs a hash"),
        (vec![incrby("hash", 1, None, None)], "bank-a: hash is a hash, incrby needs a string"),
        (vec![Op::set("hash", "v")], "bank-a: hash is a hash, set needs a string"),
        (vec![expect("hash", Some("v"))], "bank-a: hash is a hash, expect needs a string"),
        (vec![hincrby("hash", "f", 1, None)], "bank-a: hash field f is \"nope\", not an integer"),
        (vec![hincrby("hash", "g", -2, Some(-1))], "bank-a: hash field g would be -2, below min -1"),
        (vec![Op::set("name", "z"), hset("name", "f", "v")], "bank-a: name is a string, hset needs a hash"),
    ];
    for (i, (ops, reason)) in cases.into_iter().enumerate() {
        let txn = format!("g{i}");
        let p = prepare(&txn, ops);
        assert_eq!(ask(&mut r, Request::Prepare(p.clone())).await.unwrap(), no(reason), "case {i}");
        let bar = redtx_common::keys::barrier(NAME, &txn);
        assert_eq!(hget(&mut c, &bar, "state").await.as_deref(), Some("refused"));
        let ttl: i64 = c.pttl(&bar).await.unwrap();
        assert!(ttl > 0, "a refusal expires");
        // Same answer again, and no lock was taken.
        assert_eq!(ask(&mut r, Request::Prepare(p.clone())).await.unwrap(), no(reason), "case {i}");
        let locks: Vec<String> = c.keys("rtx:lock:*").await.unwrap();
        assert!(locks.is_empty(), "case {i}: {locks:?}");
        // The coordinator aborts a refused branch: fine and final.
        assert_eq!(ask(&mut r, Request::Abort(resolve(&txn))).await.unwrap(), acked(Outcome::Aborted));
    }
    assert_eq!(get(&mut c, "acct:alice").await.as_deref(), Some("10"));
    assert_eq!(get(&mut c, "name").await.as_deref(), Some("ann"));
    assert_eq!(get(&mut c, "fresh").await, None);
}

#[tokio::test]
async fn guards_see_earlier_ops_of_the_branch() {
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let _: () = c.set("s", "old").await.unwrap();
    let _: () = c.hset("h", "only", "1").await.unwrap();
    let p = prepare(
        "seq",
        vec![
            // del then hset on a string key: the key is gone by then.
            Op::Del(DelOp { key: "s".into() }),
            hset("s", "f", "v"),
            // removing a hash's last field deletes it.
            Op::Hdel(HdelOp { key: "h".into(), field: "only".into() }),
            expect("h", None),
            Op::set("h", "now-a-string"),
            expect("h", Some("now-a-string")),
            incrby("n", 10, None, None),
            incrby("n", -10, Some(0), None),
            expect("n", Some("0")),
        ],
    );
    assert_eq!(ask(&mut r, Request::Prepare(p.clone())).await.unwrap(), yes());
    assert_eq!(ask(&mut r, Request::Commit(resolve(&p.txn))).await.unwrap(), acked(Outcome::Committed));
    assert_eq!(hget(&mut c, "s", "f").await.as_deref(), Some("v"));
    assert_eq!(get(&mut c, "h").await.as_deref(), Some("now-a-string"));
    assert_eq!(get(&mut c, "n").await.as_deref(), Some("0"));
}

#[tokio::test]
async fn counters_are_exact_over_the_whole_i64_range() {
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    // 2^53 + 1: a double would round it to 2^53.
    let _: () = c.set("big", "9007199254740993").await.unwrap();
    let p = prepare("b1", vec![incrby("big", -1, Some(9007199254740993), None)]);
    assert_eq!(
        ask(&mut r, Request::Prepare(p)).await.unwrap(),
        no("bank-a: big would be 9007199254740992, below min 9007199254740993")
    );
    let p = prepare("b2", vec![incrby("big", 2, None, Some(9007199254740995))]);
    assert_eq!(ask(&mut r, Request::Prepare(p.clone())).await.unwrap(), yes());
    assert_eq!(ask(&mut r, Request::Commit(resolve(&p.txn))).await.unwrap(), acked(Outcome::Committed));
    assert_eq!(get(&mut c, "big").await.as_deref(), Some("9007199254740995"));

    let _: () = c.set("max", i64::MAX - 7).await.unwrap();
    let p = prepare("b3", vec![incrby("max", 8, None, None)]);
    assert_eq!(
        ask(&mut r, Request::Prepare(p)).await.unwrap(),
        no("bank-a: max would be 9223372036854775808, outside the 64-bit integer range")
    );
    let p = prepare("b4", vec![incrby("max", 7, None, None)]);
    assert_eq!(ask(&mut r, Request::Prepare(p.clone())).await.unwrap(), yes());
    assert_eq!(ask(&mut r, Request::Commit(resolve(&p.txn))).await.unwrap(), acked(Outcome::Committed));
    assert_eq!(get(&mut c, "max").await, Some(i64::MAX.to_string()));

    let p = prepare("b5", vec![incrby("min", i64::MIN, None, None), incrby("min", -1, None, None)]);
    assert_eq!(
        ask(&mut r, Request::Prepare(p)).await.unwrap(),
        no("bank-a: min would be -9223372036854775809, outside the 64-bit integer range")
    );
    let p = prepare("b6", vec![hincrby("hh", "f", i64::MIN, Some(i64::MIN)), hincrby("hh", "f", i64::MAX, None)]);
    assert_eq!(ask(&mut r, Request::Prepare(p.clone())).await.unwrap(), yes());
    assert_eq!(ask(&mut r, Request::Commit(resolve(&p.txn))).await.unwrap(), acked(Outcome::Committed));
    assert_eq!(hget(&mut c, "hh", "f").await.as_deref(), Some("-1"));
    // Redis's own integer syntax: no leading zeros or '+'.
    let _: () = c.set("odd", "007").await.unwrap();
    let p = prepare("b7", vec![incrby("odd", 1, None, None)]);
    assert_eq!(ask(&mut r, Request::Prepare(p)).await.unwrap(), no("bank-a: odd is \"007\", not an integer"));
}

#[tokio::test]
async fn conflicts_refuse_without_waiting_or_locking() {
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let p1 = prepare("c1", vec![incrby("k", 1, None, None)]);
    assert_eq!(ask(&mut r, Request::Prepare(p1)).await.unwrap(), yes());
    let p2 = prepare("c2", vec![Op::set("other", "x"), incrby("k", 1, None, None)]);
    assert_eq!(
        ask(&mut r, Request::Prepare(p2)).await.unwrap(),
        no("bank-a: conflict: k is held by another transaction")
    );
    assert_eq!(get(&mut c, &keys::lock("other")).await, None);
    // A saga step never writes under a 2PC lock: `error`, retried by the coordinator.
    let e = execute("c-saga", vec![incrby("k", 5, None, None)]);
    assert_eq!(
        ask(&mut r, Request::Execute(e.clone())).await.unwrap(),
        step(StepKind::Action, StepStatus::Error, Some("bank-a: k is locked by a 2PC transaction; retry later"))
    );
    assert_eq!(get(&mut c, &keys::barrier(NAME, "c-saga")).await, None, "nothing recorded");
    assert_eq!(ask(&mut r, Request::Commit(resolve("c1"))).await.unwrap(), acked(Outcome::Committed));
    assert_eq!(ask(&mut r, Request::Execute(e)).await.unwrap(), step(StepKind::Action, StepStatus::Done, None));
    assert_eq!(get(&mut c, "k").await.as_deref(), Some("6"));
}

#[tokio::test]
async fn two_participants_on_one_data_redis_cannot_write_one_key_in_one_transaction() {
    let s = server();
    let mut c = conn(&s).await;
    let mut a = kv(&s);
    let mut b = kv_named(&s, "bank-b");
    let pa = prepare("shared", vec![incrby("acct:x", 1, None, None)]);
    assert_eq!(ask(&mut a, Request::Prepare(pa)).await.unwrap(), yes());
    let mut pb = prepare("shared", vec![incrby("acct:x", 2, None, None)]);
    pb.participant = "bank-b".into();
    assert_eq!(
        ask(&mut b, Request::Prepare(pb)).await.unwrap(),
        no("bank-b: acct:x is also written by participant bank-a in this transaction (they share a data Redis); \
            put those ops in one branch")
    );
    assert_eq!(get(&mut c, &keys::lock("acct:x")).await.as_deref(), Some("bank-a shared"));
    // Another transaction is an ordinary conflict.
    let mut pc = prepare("later", vec![incrby("acct:x", 2, None, None)]);
    pc.participant = "bank-b".into();
    assert_eq!(
        ask(&mut b, Request::Prepare(pc)).await.unwrap(),
        no("bank-b: conflict: acct:x is held by another transaction")
    );
}

#[tokio::test]
async fn a_bad_payload_is_refused_naming_the_field() {
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let mut p = prepare("bad", vec![]);
    p.payload = encode_ops(&[Op::set("ok", "v"), Op::set("rtx:lock:x", "v")]);
    let Answer::Vote { yes: false, reason: Some(reason) } = ask(&mut r, Request::Prepare(p.clone())).await.unwrap()
    else {
        panic!("expected a no")
    };
    assert!(reason.starts_with("bank-a: invalid payload: payload[1].key: "), "{reason}");
    assert_eq!(hget(&mut c, &keys::barrier(NAME, "bad"), "state").await.as_deref(), Some("refused"));
    assert_eq!(ask(&mut r, Request::Prepare(p)).await.unwrap(), no(&reason), "a repeat says the same");
    let mut e = execute("bad-step", vec![]);
    e.payload = vec![0xc1];
    let Answer::Step { status: StepStatus::Failed, reason: Some(reason), .. } =
        ask(&mut r, Request::Execute(e)).await.unwrap()
    else {
        panic!("expected a failed step")
    };
    assert!(reason.starts_with("bank-a: invalid payload: payload: not a list of key-value ops"), "{reason}");
    // A compensation that does not decode fails, and leaves the action applied (to retry).
    let e = execute("comp", vec![incrby("n", 1, None, None)]);
    assert_eq!(ask(&mut r, Request::Execute(e.clone())).await.unwrap(), step(StepKind::Action, StepStatus::Done, None));
    let mut comp = e.clone();
    comp.payload = encode_ops(&[]);
    let Answer::Step { step: StepKind::Compensation, status: StepStatus::Failed, reason: Some(reason) } =
        ask(&mut r, Request::Compensate(comp)).await.unwrap()
    else {
        panic!("expected a failed compensation")
    };
    assert!(reason.contains("invalid compensation payload"), "{reason}");
    assert_eq!(hget(&mut c, &keys::barrier(NAME, "comp"), "state").await.as_deref(), Some("done"));
    let mut comp = e;
    comp.payload = encode_ops(&[incrby("n", -1, None, None)]);
    assert_eq!(
        ask(&mut r, Request::Compensate(comp)).await.unwrap(),
        step(StepKind::Compensation, StepStatus::Done, None)
    );
    assert_eq!(get(&mut c, "n").await.as_deref(), Some("0"));
}

#[tokio::test]
async fn saga_steps_check_guards_and_compensations_can_be_refused() {
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let _: () = c.set("stock", 1).await.unwrap();
    let take = |t: &str| execute(t, vec![incrby("stock", -1, Some(0), None)]);
    assert_eq!(
        ask(&mut r, Request::Execute(take("s1"))).await.unwrap(),
        step(StepKind::Action, StepStatus::Done, None)
    );
    assert_eq!(
        ask(&mut r, Request::Execute(take("s2"))).await.unwrap(),
        step(StepKind::Action, StepStatus::Failed, Some("bank-a: stock would be -1, below min 0"))
    );
    let bar = keys::barrier(NAME, "s1");
    let ttl: i64 = c.pttl(&bar).await.unwrap();
    assert!(ttl > 0, "saga barriers expire after the retention");
    // A compensation whose guard fails changes nothing and can be retried.
    let refund = execute("s1", vec![incrby("stock", 1, None, Some(1)), Op::set("log", "refunded")]);
    let _: () = c.set("stock", 1).await.unwrap();
    assert_eq!(
        ask(&mut r, Request::Compensate(refund.clone())).await.unwrap(),
        step(StepKind::Compensation, StepStatus::Failed, Some("bank-a: stock would be 2, above max 1"))
    );
    assert_eq!(get(&mut c, "log").await, None);
    let _: () = c.set("stock", 0).await.unwrap();
    assert_eq!(
        ask(&mut r, Request::Compensate(refund)).await.unwrap(),
        step(StepKind::Compensation, StepStatus::Done, None)
    );
    assert_eq!(get(&mut c, "stock").await.as_deref(), Some("1"));
    assert_eq!(get(&mut c, "log").await.as_deref(), Some("refunded"));
}

/// Every key and its `DUMP`, sorted: equal snapshots mean nothing changed.
async fn snapshot(c: &redis::aio::MultiplexedConnection) -> Vec<(String, Option<Vec<u8>>)> {
    let mut c = c.clone();
    let mut out = Vec::new();
    let mut ks: Vec<String> = c.keys("*").await.unwrap();
    ks.sort();
    for k in ks {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP").arg(&k).query_async(&mut c).await.unwrap();
        out.push((k, dump));
    }
    out
}

/// Each verb on a Redis at its memory limit: the script fails before changing anything, the
/// request stays pending; once memory is back, it applies exactly once.
#[tokio::test]
async fn a_full_redis_fails_every_verb_cleanly_and_the_retry_applies_once() {
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let _: () = c.set("acct", 10).await.unwrap();
    // prepare
    let p = prepare("m1", vec![incrby("acct", -3, Some(0), None), Op::set("note", "x")]);
    maxmemory(&mut c, 1).await;
    let before = snapshot(&c).await;
    let e = ask(&mut r, Request::Prepare(p.clone())).await.unwrap_err();
    assert!(e.contains("OOM"), "{e}");
    assert_eq!(snapshot(&c).await, before, "a refused prepare changed something");
    maxmemory(&mut c, 0).await;
    assert_eq!(ask(&mut r, Request::Prepare(p)).await.unwrap(), yes());

    // commit
    maxmemory(&mut c, 1).await;
    let before = snapshot(&c).await;
    let e = ask(&mut r, Request::Commit(resolve("m1"))).await.unwrap_err();
    assert!(e.contains("OOM"), "{e}");
    assert_eq!(snapshot(&c).await, before, "a refused commit changed something");
    assert_eq!(hget(&mut c, &keys::barrier(NAME, "m1"), "state").await.as_deref(), Some("prepared"));
    assert_eq!(get(&mut c, &keys::lock("acct")).await.as_deref(), Some("bank-a m1"), "locks held");
    maxmemory(&mut c, 0).await;
    assert_eq!(ask(&mut r, Request::Commit(resolve("m1"))).await.unwrap(), acked(Outcome::Committed));
    assert_eq!(ask(&mut r, Request::Commit(resolve("m1"))).await.unwrap(), acked(Outcome::Committed));
    assert_eq!(get(&mut c, "acct").await.as_deref(), Some("7"), "applied once");

    // abort (of a prepared branch, and before any prepare)
    let p = prepare("m2", vec![incrby("acct", -1, None, None)]);
    assert_eq!(ask(&mut r, Request::Prepare(p)).await.unwrap(), yes());
    maxmemory(&mut c, 1).await;
    let before = snapshot(&c).await;
    assert!(ask(&mut r, Request::Abort(resolve("m2"))).await.unwrap_err().contains("OOM"));
    assert!(ask(&mut r, Request::Abort(resolve("m3"))).await.unwrap_err().contains("OOM"));
    assert_eq!(snapshot(&c).await, before, "a refused abort changed something");
    maxmemory(&mut c, 0).await;
    assert_eq!(ask(&mut r, Request::Abort(resolve("m2"))).await.unwrap(), acked(Outcome::Aborted));
    assert_eq!(ask(&mut r, Request::Abort(resolve("m3"))).await.unwrap(), acked(Outcome::Aborted));
    assert_eq!(get(&mut c, &keys::lock("acct")).await, None);

    // execute and compensate
    let e = execute("m4", vec![incrby("acct", -2, Some(0), None)]);
    maxmemory(&mut c, 1).await;
    let before = snapshot(&c).await;
    assert!(ask(&mut r, Request::Execute(e.clone())).await.unwrap_err().contains("OOM"));
    assert_eq!(snapshot(&c).await, before, "a refused execute changed something");
    maxmemory(&mut c, 0).await;
    assert_eq!(ask(&mut r, Request::Execute(e.clone())).await.unwrap(), step(StepKind::Action, StepStatus::Done, None));
    assert_eq!(ask(&mut r, Request::Execute(e)).await.unwrap(), step(StepKind::Action, StepStatus::Done, None));
    assert_eq!(get(&mut c, "acct").await.as_deref(), Some("5"), "applied once");
    let comp = execute("m4", vec![incrby("acct", 2, None, None)]);
    maxmemory(&mut c, 1).await;
    let before = snapshot(&c).await;
    assert!(ask(&mut r, Request::Compensate(comp.clone())).await.unwrap_err().contains("OOM"));
    assert_eq!(snapshot(&c).await, before, "a refused compensate changed something");
    maxmemory(&mut c, 0).await;
    for _ in 0..2 {
        assert_eq!(
            ask(&mut r, Request::Compensate(comp.clone())).await.unwrap(),
            step(StepKind::Compensation, StepStatus::Done, None)
        );
    }
    assert_eq!(get(&mut c, "acct").await.as_deref(), Some("7"), "compensated once");
}

#[tokio::test]
async fn a_commit_whose_staged_writes_no_longer_apply_fails_and_changes_nothing() {
    // A plain writer changed a locked key's type: the commit cannot apply the staged INCRBY.
    // It fails before any write (the branch stays prepared, its entry pending and logged) instead
    // of applying half of it, or marking it committed without the write.
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let p = prepare("w1", vec![Op::set("a", "1"), incrby("b", 1, None, None)]);
    assert_eq!(ask(&mut r, Request::Prepare(p)).await.unwrap(), yes());
    let _: () = c.hset("b", "f", "v").await.unwrap();
    let e = ask(&mut r, Request::Commit(resolve("w1"))).await.unwrap_err();
    assert!(e.contains("no longer apply") && e.contains("b is a hash, incrby needs a string"), "{e}");
    assert_eq!(get(&mut c, "a").await, None);
    assert_eq!(hget(&mut c, &keys::barrier(NAME, "w1"), "state").await.as_deref(), Some("prepared"));
    // Repaired: the commit goes through.
    let _: () = c.del("b").await.unwrap();
    assert_eq!(ask(&mut r, Request::Commit(resolve("w1"))).await.unwrap(), acked(Outcome::Committed));
    assert_eq!(get(&mut c, "a").await.as_deref(), Some("1"));
    assert_eq!(get(&mut c, "b").await.as_deref(), Some("1"));
}

#[tokio::test]
async fn scripts_survive_a_flushed_script_cache() {
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let p = prepare("f1", vec![Op::set("k", "v")]);
    assert_eq!(ask(&mut r, Request::Prepare(p)).await.unwrap(), yes());
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await.unwrap();
    assert_eq!(ask(&mut r, Request::Commit(resolve("f1"))).await.unwrap(), acked(Outcome::Committed));
}

#[tokio::test]
async fn barriers_outlive_the_deadline_whatever_the_retention() {
    // A duplicate prepare arriving before the deadline must find the barrier (else it would
    // lock keys for a transaction that finished long ago): a short retention is extended.
    let s = server();
    let mut c = conn(&s).await;
    let mut r = KvResource::new(RedisUrl::parse(&s.url()).unwrap(), NAME, Duration::from_millis(100));
    let pttl = |c: &redis::aio::MultiplexedConnection, txn: &str| {
        let key = keys::barrier(NAME, txn);
        let mut c = c.clone();
        async move { c.pttl::<_, i64>(key).await.unwrap() }
    };
    let mut p = prepare("e1", vec![Op::set("k", "v")]);
    p.deadline_ms = now_ms() + 600_000;
    assert_eq!(ask(&mut r, Request::Prepare(p)).await.unwrap(), yes());
    assert_eq!(ask(&mut r, Request::Commit(resolve("e1"))).await.unwrap(), acked(Outcome::Committed));
    assert!(pttl(&c, "e1").await > 600_000, "committed barrier kept past the deadline");

    let mut p = prepare("e2", vec![Op::set("k", "v")]);
    p.deadline_ms = now_ms() + 600_000;
    assert_eq!(ask(&mut r, Request::Prepare(p)).await.unwrap(), yes());
    assert_eq!(ask(&mut r, Request::Abort(resolve("e2"))).await.unwrap(), acked(Outcome::Aborted));
    assert!(pttl(&c, "e2").await > 600_000, "aborted barrier kept past the deadline");

    let mut p = prepare("e3", vec![Op::set("k", "v")]);
    p.deadline_ms = now_ms() + 600_000;
    let _: () = c.set(keys::lock("k"), "other x").await.unwrap();
    assert!(matches!(ask(&mut r, Request::Prepare(p)).await.unwrap(), Answer::Vote { yes: false, .. }));
    assert!(pttl(&c, "e3").await > 600_000, "refusal kept past the deadline");

    assert_eq!(ask(&mut r, Request::Abort(resolve("e4"))).await.unwrap(), acked(Outcome::Aborted));
    let longest = redtx_common::spec::MAX_TIMEOUT.as_millis() as i64;
    assert!(pttl(&c, "e4").await > longest, "a tombstone outlives any deadline");

    // Past the deadline, the plain retention applies.
    let mut p = prepare("e5", vec![Op::set("j", "v")]);
    p.deadline_ms = now_ms() - 120_000;
    assert!(matches!(ask(&mut r, Request::Prepare(p)).await.unwrap(), Answer::Vote { yes: false, .. }));
    let t = pttl(&c, "e5").await;
    assert!(t > 0 && t <= 100, "{t}");
}

#[tokio::test]
async fn a_lone_self_checked_write_commits_unsimulated_and_a_refusal_changes_nothing() {
    // A branch of one INCRBY commits without re-reading the key (lua/lib/ops.lua `unchecked`):
    // the write goes first. Refused by the memory limit, or by a key a plain writer turned into
    // a hash, it changes nothing: the barrier stays prepared, the lock held, and the commit is
    // retried until it applies, exactly once.
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let _: () = c.set("n", "10").await.unwrap();
    assert_eq!(ask(&mut r, Request::Prepare(prepare("l1", vec![incrby("n", 5, Some(0), None)]))).await.unwrap(), yes());
    let bar = keys::barrier(NAME, "l1");
    maxmemory(&mut c, 1).await;
    let before = snapshot(&c).await;
    let e = ask(&mut r, Request::Commit(resolve("l1"))).await.unwrap_err();
    assert!(e.contains("OOM"), "{e}");
    assert_eq!(snapshot(&c).await, before, "a refused commit changed something");
    maxmemory(&mut c, 0).await;
    let _: () = c.del("n").await.unwrap();
    let _: () = c.hset("n", "f", "v").await.unwrap();
    let e = ask(&mut r, Request::Commit(resolve("l1"))).await.unwrap_err();
    assert!(e.contains("no longer apply") && e.contains("n is a hash, incrby needs a string"), "{e}");
    assert_eq!(hget(&mut c, &bar, "state").await.as_deref(), Some("prepared"));
    assert_eq!(get(&mut c, &keys::lock("n")).await.as_deref(), Some("bank-a l1"));
    let _: () = c.del("n").await.unwrap();
    let _: () = c.set("n", "10").await.unwrap();
    for _ in 0..2 {
        assert_eq!(ask(&mut r, Request::Commit(resolve("l1"))).await.unwrap(), acked(Outcome::Committed));
    }
    assert_eq!(get(&mut c, "n").await.as_deref(), Some("15"), "applied once");
    assert_eq!(get(&mut c, &keys::lock("n")).await, None);
}

#[tokio::test]
async fn a_batch_applies_each_transition_on_its_own() {
    // One call per verb carries the whole batch (lua/lib/batch.lua). A transition that fails
    // (here a commit whose staged write no longer applies) fails alone and changes nothing; the
    // others in the same call go through, each exactly once.
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let ids: Vec<String> = (0..6).map(|i| format!("b{i}")).collect();
    let prepares: Vec<Request> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Request::Prepare(prepare(id, vec![incrby(&format!("k{i}"), 5, None, None)])))
        .collect();
    let answers = redtx_participant::worker::settle(&mut r, &prepares, redtx_common::now_ms()).await.unwrap();
    assert!(answers.iter().all(|a| a.as_ref() == Ok(&yes())), "{answers:?}");
    let _: () = c.hset("k2", "f", "v").await.unwrap();
    let commits: Vec<Request> = ids.iter().map(|id| Request::Commit(resolve(id))).collect();
    let answers = redtx_participant::worker::settle(&mut r, &commits, redtx_common::now_ms()).await.unwrap();
    for (i, a) in answers.iter().enumerate() {
        if i == 2 {
            let e = a.as_ref().unwrap_err();
            assert!(e.contains("no longer apply") && e.contains("k2 is a hash"), "{e}");
        } else {
            assert_eq!(a.as_ref(), Ok(&acked(Outcome::Committed)), "transition {i}");
            assert_eq!(get(&mut c, &format!("k{i}")).await.as_deref(), Some("5"), "k{i} applied once");
        }
    }
    assert_eq!(hget(&mut c, &keys::barrier(NAME, "b2"), "state").await.as_deref(), Some("prepared"));
    // The same batch again: the committed ones answer from their barrier, nothing twice.
    let answers = redtx_participant::worker::settle(&mut r, &commits, redtx_common::now_ms()).await.unwrap();
    assert!(answers[2].is_err());
    for i in [0, 1, 3, 4, 5] {
        assert_eq!(answers[i].as_ref(), Ok(&acked(Outcome::Committed)));
        assert_eq!(get(&mut c, &format!("k{i}")).await.as_deref(), Some("5"));
    }
    // Repaired, the last one commits.
    let _: () = c.del("k2").await.unwrap();
    assert_eq!(ask(&mut r, Request::Commit(resolve("b2"))).await.unwrap(), acked(Outcome::Committed));
    assert_eq!(get(&mut c, "k2").await.as_deref(), Some("5"));
}

#[tokio::test]
async fn a_batch_call_that_fails_as_a_whole_is_run_one_transition_per_call() {
    // A Redis at its memory limit refuses the batch call's first write: nothing is written, and
    // the runtime runs each transition alone, where each meets the same refusal, visibly.
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let reqs: Vec<Request> = (0..4)
        .map(|i| Request::Prepare(prepare(&format!("m{i}"), vec![incrby(&format!("q{i}"), 1, None, None)])))
        .collect();
    maxmemory(&mut c, 1).await;
    let answers = redtx_participant::worker::settle(&mut r, &reqs, redtx_common::now_ms()).await.unwrap();
    assert!(answers.iter().all(|a| a.as_ref().is_err_and(|e| e.contains("OOM"))), "{answers:?}");
    let locks: Vec<String> = c.keys("rtx:*").await.unwrap();
    assert!(locks.is_empty(), "a refused batch wrote {locks:?}");
    maxmemory(&mut c, 0).await;
    let answers = redtx_participant::worker::settle(&mut r, &reqs, redtx_common::now_ms()).await.unwrap();
    assert!(answers.iter().all(|a| a.as_ref() == Ok(&yes())), "{answers:?}");
}

#[tokio::test]
async fn a_batch_with_a_malformed_shared_input_is_refused_whole() {
    // The values every transition of a call shares (name, clock, retention, margins) come once
    // per call (lua/lib/batch.lua, lib/barrier.lua). A call whose shared input is not five values,
    // the last four integers, is refused as a whole with an error naming it, and writes nothing;
    // the same transition with a well-formed shared input prepares.
    use redtx_common::scripts::Call;
    use redtx_participant::kv::PREPARE;
    let s = server();
    let mut c = conn(&s).await;
    let now = now_ms().to_string();
    let deadline = (now_ms() + 60_000).to_string();
    let transition = |shared: &[&str]| {
        let mut call = PREPARE.call().key(keys::barrier(NAME, "z")).key("k").key(keys::lock("k"));
        for v in shared {
            call = call.shared(*v);
        }
        // owner, expected state, deadline, refusal, then one op (incrby k by 5, no bounds).
        call.arg("bank-a z").arg("").arg(&deadline).arg("").arg("incrby").arg(1).arg("").arg(5).arg("").arg("")
    };
    for bad in [vec![NAME, now.as_str(), "1000", "1000"], vec![NAME, "soon", "1000", "1000", "60000"], vec![]] {
        let e = Call::batch(&[&transition(&bad)]).run(&mut c, &s.url()).await.unwrap_err().to_string();
        assert!(e.contains("batch") && e.contains("the shared input must be name, now, retention"), "{bad:?}: {e}");
    }
    let written: Vec<String> = c.keys("*").await.unwrap();
    assert!(written.is_empty(), "a refused call wrote {written:?}");
    let ok = transition(&[NAME, &now, "1000", "1000", "60000"]);
    // Twice in one call: the second finds the first's barrier (MOVED, state prepared).
    let v = Call::batch(&[&ok, &ok]).run(&mut c, &s.url()).await.unwrap();
    let text = |r: &redis::Value| match r {
        redis::Value::Int(n) => n.to_string(),
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    };
    let replies: Vec<Vec<String>> = match &v {
        redis::Value::Array(rs) => rs
            .iter()
            .map(|r| if let redis::Value::Array(f) = r { f.iter().map(text).collect() } else { vec![text(r)] })
            .collect(),
        other => panic!("{other:?}"),
    };
    assert_eq!(replies[0], ["1", "prepared", ""]);
    assert_eq!(replies[1][..2], ["2", "prepared"]);
    assert_eq!(hget(&mut c, &keys::barrier(NAME, "z"), "state").await.as_deref(), Some("prepared"));
    assert_eq!(get(&mut c, &keys::lock("k")).await.as_deref(), Some("bank-a z"));
}
