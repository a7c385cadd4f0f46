//! The Lua scripts, driven through `KvResource` against a real Redis.

mod support;

use redis::AsyncCommands;
use redtx_common::conn::RedisUrl;
use redtx_common::protocol::Outcome;
use redtx_common::spec::{DelOp, ExpectOp, HdelOp, HincrbyOp, HsetOp, IncrbyOp, Op};
use redtx_participant::{KvResource, Request, Resource, Response};
use std::time::Duration;
use support::*;

const RETENTION: Duration = Duration::from_secs(3600);

fn kv(s: &redtx_common::server::RedisServer) -> KvResource {
    KvResource::new(RedisUrl::parse(&s.url()).unwrap(), NAME, RETENTION)
}

async fn one(r: &mut KvResource, req: Request) -> Response {
    r.apply(&[req]).await.unwrap().pop().unwrap().unwrap()
}

fn yes(repeat: bool) -> Response {
    Response::Vote { yes: true, reason: None, repeat }
}

fn no(reason: &str) -> Response {
    Response::Vote { yes: false, reason: Some(reason.into()), repeat: false }
}

fn done(outcome: Outcome, repeat: bool) -> Response {
    Response::Done { outcome, repeat, warning: None }
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
async fn prepare_stages_commit_applies_and_repeats_are_harmless() {
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
    assert_eq!(one(&mut r, Request::Prepare(p.clone())).await, yes(false));
    // Staged only: plain readers see the old values; the keys are locked by the barrier.
    assert_eq!(get(&mut c, "acct:alice").await.as_deref(), Some("100"));
    assert_eq!(get(&mut c, "x").await, None);
    assert_eq!(hget(&mut c, "h", "f").await, None);
    let bar = redtx_common::keys::barrier(NAME, "t1");
    for k in ["acct:alice", "x", "h"] {
        assert_eq!(get(&mut c, &redtx_common::keys::lock(k)).await.as_deref(), Some(bar.as_str()));
    }
    assert_eq!(hget(&mut c, &bar, "state").await.as_deref(), Some("prepared"));
    let ttl: i64 = c.pttl(&bar).await.unwrap();
    assert_eq!(ttl, -1, "a prepared barrier never expires");

    assert_eq!(one(&mut r, Request::Prepare(p.clone())).await, yes(true));
    assert_eq!(one(&mut r, Request::Commit(resolve(&p))).await, done(Outcome::Committed, false));
    assert_eq!(get(&mut c, "acct:alice").await.as_deref(), Some("60"));
    assert_eq!(get(&mut c, "x").await.as_deref(), Some("v"));
    let h: std::collections::HashMap<String, String> = c.hgetall("h").await.unwrap();
    assert_eq!(h, [("f".to_string(), "v".to_string()), ("n".to_string(), "5".to_string())].into());
    for k in ["acct:alice", "x", "h"] {
        assert_eq!(get(&mut c, &redtx_common::keys::lock(k)).await, None);
    }
    assert_eq!(hget(&mut c, &bar, "state").await.as_deref(), Some("committed"));
    assert_eq!(hget(&mut c, &bar, "ops").await, None, "staging dropped");
    let ttl: i64 = c.pttl(&bar).await.unwrap();
    assert!(ttl > 0 && ttl <= RETENTION.as_millis() as i64, "{ttl}");

    // Repeats: nothing applied twice; a late duplicate prepare still says yes and locks nothing.
    assert_eq!(one(&mut r, Request::Commit(resolve(&p))).await, done(Outcome::Committed, true));
    assert_eq!(one(&mut r, Request::Prepare(p.clone())).await, yes(true));
    assert_eq!(get(&mut c, "acct:alice").await.as_deref(), Some("60"));
    assert_eq!(get(&mut c, &redtx_common::keys::lock("x")).await, None);
    // Abort after commit contradicts the decision.
    assert!(
        matches!(one(&mut r, Request::Abort(resolve(&p))).await, Response::Violation(m) if m.contains("committed"))
    );
}

#[tokio::test]
async fn abort_releases_locks_and_drops_staging() {
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let _: () = c.set("k", 5).await.unwrap();
    let p = prepare("t2", vec![incrby("k", 1, None, None), Op::Del(DelOp { key: "d".into() })]);
    assert_eq!(one(&mut r, Request::Prepare(p.clone())).await, yes(false));
    assert_eq!(one(&mut r, Request::Abort(resolve(&p))).await, done(Outcome::Aborted, false));
    assert_eq!(get(&mut c, "k").await.as_deref(), Some("5"));
    assert_eq!(get(&mut c, &redtx_common::keys::lock("k")).await, None);
    assert_eq!(get(&mut c, &redtx_common::keys::lock("d")).await, None);
    let bar = redtx_common::keys::barrier(NAME, "t2");
    assert_eq!(hget(&mut c, &bar, "state").await.as_deref(), Some("aborted"));
    let ttl: i64 = c.pttl(&bar).await.unwrap();
    assert!(ttl > 0);
    assert_eq!(one(&mut r, Request::Abort(resolve(&p))).await, done(Outcome::Aborted, true));
    // A redelivered prepare after the abort votes no and takes nothing.
    let Response::Vote { yes: false, reason: Some(reason), repeat: true } =
        one(&mut r, Request::Prepare(p.clone())).await
    else {
        panic!("expected a repeated no")
    };
    assert!(reason.contains("aborted"), "{reason}");
    assert_eq!(get(&mut c, &redtx_common::keys::lock("k")).await, None);
    // Commit after abort is a protocol violation and applies nothing.
    assert!(
        matches!(one(&mut r, Request::Commit(resolve(&p))).await, Response::Violation(m) if m.contains("never prepared"))
    );
    assert_eq!(get(&mut c, "k").await.as_deref(), Some("5"));
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
        assert_eq!(one(&mut r, Request::Prepare(p.clone())).await, no(reason), "case {i}");
        let bar = redtx_common::keys::barrier(NAME, &txn);
        assert_eq!(hget(&mut c, &bar, "state").await.as_deref(), Some("refused"));
        let ttl: i64 = c.pttl(&bar).await.unwrap();
        assert!(ttl > 0, "a refusal expires");
        // Same answer again, and no lock was taken.
        assert_eq!(
            one(&mut r, Request::Prepare(p.clone())).await,
            Response::Vote { yes: false, reason: Some(reason.into()), repeat: true }
        );
        for k in resolve(&p).keys {
            assert_eq!(get(&mut c, &redtx_common::keys::lock(&k)).await, None, "case {i}: {k}");
        }
        // The coordinator aborts a refused branch: fine and final.
        assert_eq!(one(&mut r, Request::Abort(resolve(&p))).await, done(Outcome::Aborted, false));
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
    assert_eq!(one(&mut r, Request::Prepare(p.clone())).await, yes(false));
    assert_eq!(one(&mut r, Request::Commit(resolve(&p))).await, done(Outcome::Committed, false));
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
        one(&mut r, Request::Prepare(p)).await,
        no("bank-a: big would be 9007199254740992, below min 9007199254740993")
    );
    let p = prepare("b2", vec![incrby("big", 2, None, Some(9007199254740995))]);
    assert_eq!(one(&mut r, Request::Prepare(p.clone())).await, yes(false));
    assert_eq!(one(&mut r, Request::Commit(resolve(&p))).await, done(Outcome::Committed, false));
    assert_eq!(get(&mut c, "big").await.as_deref(), Some("9007199254740995"));

    let _: () = c.set("max", i64::MAX - 7).await.unwrap();
    let p = prepare("b3", vec![incrby("max", 8, None, None)]);
    assert_eq!(
        one(&mut r, Request::Prepare(p)).await,
        no("bank-a: max would be 9223372036854775808, outside the 64-bit integer range")
    );
    let p = prepare("b4", vec![incrby("max", 7, None, None)]);
    assert_eq!(one(&mut r, Request::Prepare(p.clone())).await, yes(false));
    assert_eq!(one(&mut r, Request::Commit(resolve(&p))).await, done(Outcome::Committed, false));
    assert_eq!(get(&mut c, "max").await, Some(i64::MAX.to_string()));

    let p = prepare("b5", vec![incrby("min", i64::MIN, None, None), incrby("min", -1, None, None)]);
    assert_eq!(
        one(&mut r, Request::Prepare(p)).await,
        no("bank-a: min would be -9223372036854775809, outside the 64-bit integer range")
    );
    let p = prepare("b6", vec![hincrby("hh", "f", i64::MIN, Some(i64::MIN)), hincrby("hh", "f", i64::MAX, None)]);
    assert_eq!(one(&mut r, Request::Prepare(p.clone())).await, yes(false));
    assert_eq!(one(&mut r, Request::Commit(resolve(&p))).await, done(Outcome::Committed, false));
    assert_eq!(hget(&mut c, "hh", "f").await.as_deref(), Some("-1"));
    // Redis's own integer syntax: no leading zeros or '+'.
    let _: () = c.set("odd", "007").await.unwrap();
    let p = prepare("b7", vec![incrby("odd", 1, None, None)]);
    assert_eq!(one(&mut r, Request::Prepare(p)).await, no("bank-a: odd is \"007\", not an integer"));
}

#[tokio::test]
async fn conflicts_refuse_without_waiting_or_locking() {
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let p1 = prepare("c1", vec![incrby("k", 1, None, None)]);
    assert_eq!(one(&mut r, Request::Prepare(p1.clone())).await, yes(false));
    let p2 = prepare("c2", vec![Op::set("other", "x"), incrby("k", 1, None, None)]);
    assert_eq!(one(&mut r, Request::Prepare(p2)).await, no("bank-a: conflict: k is held by another transaction"));
    assert_eq!(get(&mut c, &redtx_common::keys::lock("other")).await, None);
    assert_eq!(one(&mut r, Request::Commit(resolve(&p1))).await, done(Outcome::Committed, false));
    let p3 = prepare("c3", vec![incrby("k", 1, None, None)]);
    assert_eq!(one(&mut r, Request::Prepare(p3.clone())).await, yes(false));
    // One pipeline per batch, run in order: the commit frees `k` for the next prepare, which
    // then wins over the prepare after it.
    let p4 = prepare("c4", vec![incrby("k", 1, None, None)]);
    let p5 = prepare("c5", vec![incrby("k", 1, None, None)]);
    let out =
        r.apply(&[Request::Commit(resolve(&p3)), Request::Prepare(p4.clone()), Request::Prepare(p5)]).await.unwrap();
    assert_eq!(out[0], Ok(done(Outcome::Committed, false)));
    assert_eq!(out[1], Ok(yes(false)));
    assert_eq!(out[2], Ok(no("bank-a: conflict: k is held by another transaction")));
    assert_eq!(get(&mut c, "k").await.as_deref(), Some("2"));
}

#[tokio::test]
async fn abort_before_prepare_and_late_prepares_vote_no() {
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let p = prepare("a1", vec![Op::set("k", "v")]);
    assert_eq!(one(&mut r, Request::Abort(resolve(&p))).await, done(Outcome::Aborted, false));
    let bar = redtx_common::keys::barrier(NAME, "a1");
    let ttl: i64 = c.pttl(&bar).await.unwrap();
    assert!(ttl > 0, "the tombstone expires");
    assert_eq!(
        one(&mut r, Request::Prepare(p.clone())).await,
        Response::Vote { yes: false, reason: Some("bank-a: aborted before prepare".into()), repeat: true }
    );
    assert_eq!(get(&mut c, &redtx_common::keys::lock("k")).await, None);
    assert_eq!(one(&mut r, Request::Abort(resolve(&p))).await, done(Outcome::Aborted, true));

    let mut late = prepare("a2", vec![Op::set("k", "v")]);
    late.deadline_ms = redtx_common::now_ms() - 1000;
    let Response::Vote { yes: false, reason: Some(reason), repeat: false } = one(&mut r, Request::Prepare(late)).await
    else {
        panic!("expected a no")
    };
    assert!(reason.starts_with("bank-a: prepare arrived ") && reason.ends_with(" ms after the deadline"), "{reason}");
    assert_eq!(get(&mut c, &redtx_common::keys::lock("k")).await, None);
    assert_eq!(get(&mut c, "k").await, None);
}

#[tokio::test]
async fn protocol_violations_change_nothing() {
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let p = prepare("v1", vec![Op::set("k", "v"), Op::set("j", "w")]);
    assert!(matches!(one(&mut r, Request::Commit(resolve(&p))).await, Response::Violation(m) if m.contains("missing")));
    assert_eq!(one(&mut r, Request::Prepare(p.clone())).await, yes(false));
    let mut other = resolve(&p);
    other.keys = vec!["k".into()];
    assert!(
        matches!(one(&mut r, Request::Commit(other.clone())).await, Response::Violation(m) if m.contains("other keys"))
    );
    assert!(matches!(one(&mut r, Request::Abort(other)).await, Response::Violation(m) if m.contains("other keys")));
    assert_eq!(get(&mut c, "k").await, None);
    assert!(get(&mut c, &redtx_common::keys::lock("k")).await.is_some(), "still prepared and locked");
    assert_eq!(one(&mut r, Request::Commit(resolve(&p))).await, done(Outcome::Committed, false));
    assert_eq!(get(&mut c, "j").await.as_deref(), Some("w"));
}

#[tokio::test]
async fn scripts_survive_a_flushed_script_cache() {
    let s = server();
    let mut c = conn(&s).await;
    let mut r = kv(&s);
    let p = prepare("f1", vec![Op::set("k", "v")]);
    assert_eq!(one(&mut r, Request::Prepare(p.clone())).await, yes(false));
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await.unwrap();
    assert_eq!(one(&mut r, Request::Commit(resolve(&p))).await, done(Outcome::Committed, false));
}

#[tokio::test]
async fn barriers_outlive_the_deadline_whatever_the_retention() {
    // A duplicate prepare arriving before the deadline must find the barrier (else it would
    // lock keys for a transaction that finished long ago): a short retention is extended.
    let s = server();
    let mut c = conn(&s).await;
    let mut r = KvResource::new(RedisUrl::parse(&s.url()).unwrap(), NAME, Duration::from_millis(100));
    let pttl = |c: &mut redis::aio::MultiplexedConnection, txn: &str| {
        let key = redtx_common::keys::barrier(NAME, txn);
        let mut c = c.clone();
        async move { c.pttl::<_, i64>(key).await.unwrap() }
    };
    let mut p = prepare("e1", vec![Op::set("k", "v")]);
    p.deadline_ms = redtx_common::now_ms() + 600_000;
    assert_eq!(one(&mut r, Request::Prepare(p.clone())).await, yes(false));
    assert_eq!(one(&mut r, Request::Commit(resolve(&p))).await, done(Outcome::Committed, false));
    assert!(pttl(&mut c, "e1").await > 600_000, "committed barrier kept past the deadline");

    let mut p = prepare("e2", vec![Op::set("k", "v")]);
    p.deadline_ms = redtx_common::now_ms() + 600_000;
    assert_eq!(one(&mut r, Request::Prepare(p.clone())).await, yes(false));
    assert_eq!(one(&mut r, Request::Abort(resolve(&p))).await, done(Outcome::Aborted, false));
    assert!(pttl(&mut c, "e2").await > 600_000, "aborted barrier kept past the deadline");

    let mut p = prepare("e3", vec![Op::set("k", "v")]);
    p.deadline_ms = redtx_common::now_ms() + 600_000;
    let _: () = c.set(redtx_common::keys::lock("k"), "rtx:bar:other:x").await.unwrap();
    assert!(matches!(one(&mut r, Request::Prepare(p.clone())).await, Response::Vote { yes: false, .. }));
    assert!(pttl(&mut c, "e3").await > 600_000, "refusal kept past the deadline");

    let p = prepare("e4", vec![Op::set("k", "v")]);
    assert_eq!(one(&mut r, Request::Abort(resolve(&p))).await, done(Outcome::Aborted, false));
    let longest = redtx_common::spec::MAX_TIMEOUT.as_millis() as i64;
    assert!(pttl(&mut c, "e4").await > longest, "a tombstone outlives any deadline");

    // Past the deadline, the plain retention applies.
    let mut p = prepare("e5", vec![Op::set("j", "v")]);
    p.deadline_ms = redtx_common::now_ms() - 120_000;
    assert!(matches!(one(&mut r, Request::Prepare(p)).await, Response::Vote { yes: false, .. }));
    let t = pttl(&mut c, "e5").await;
    assert!(t > 0 && t <= 100, "{t}");
}
