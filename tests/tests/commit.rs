//! Happy paths and guards: money moves between two Redis servers all-or-nothing, guards abort
//! with a reason that names participant, key and guard, and a key held by a prepared transaction
//! makes another one vote no (`conflict`) until the first one ends and releases its lock, and two
//! participants sharing a data Redis cannot both write one key in one transaction (it aborts,
//! saying why).

use redtx_common::machine::Phase;
use redtx_common::record::TxnState;
use redtx_common::server::ServerOptions;
use redtx_common::spec::{Branch, DelOp, ExpectOp, HdelOp, HincrbyOp, HsetOp, Op, TxnSpec};
use redtx_tests::*;
use std::time::Duration;

#[test]
fn transfer_across_two_servers_commits_and_is_visible_right_after_wait() {
    let bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    bank.seed(Side::B, "acct:bob", 5);
    let url = bank.url();

    let json = transfer_json(Some("t-commit-1"), (Side::A, "acct:alice"), (Side::B, "acct:bob"), 30);
    let out = redtx("submit", &url, &["--wait", "--json", "-"], Some(json.as_bytes()));
    assert_eq!(out.code, Some(0), "{out:?}");
    // Read right after `--wait` returned: both servers already show the change.
    assert_eq!(bank.balance(Side::A, "acct:alice"), 70);
    assert_eq!(bank.balance(Side::B, "acct:bob"), 35);
    let v = out.json();
    assert_eq!(v["id"], "t-commit-1", "{v}");
    assert_eq!(v["state"], "committed", "{v}");
    assert_eq!(v["enqueued"], true, "{v}");

    let st = redtx("status", &url, &["--json", "t-commit-1"], None);
    assert_eq!(st.code, Some(0), "{st:?}");
    assert_eq!(st.json()["state"], "committed", "{st:?}");
    let plain = redtx("status", &url, &["t-commit-1"], None);
    assert!(plain.stdout.contains("committed"), "{plain:?}");

    // Without --wait, submit prints the id and exits 0 at once.
    let json = transfer_json(Some("t-commit-2"), (Side::B, "acct:bob"), (Side::A, "acct:alice"), 5);
    let out = redtx("submit", &url, &["-"], Some(json.as_bytes()));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim(), "t-commit-2", "{out:?}");
    let rec = bank.wait("t-commit-2");
    assert_eq!(rec.state, TxnState::Committed);

    // The library path: submit_and_wait.
    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 15));
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert!(rec.branches.iter().all(|b| b.phase == Phase::Committed), "{rec:?}");
    // The two ids of this test went to their own partitions' streams and records.
    let mut s = bank.stream_conn();
    for id in ["t-commit-1", "t-commit-2", rec.id.as_str()] {
        let mine: u64 = redis::cmd("EXISTS").arg(record_key(id)).query(&mut s).unwrap();
        assert_eq!(mine, 1, "no record of {id} at {}", record_key(id));
    }
    assert_eq!(bank.balance(Side::A, "acct:alice"), 60);
    assert_eq!(bank.balance(Side::B, "acct:bob"), 45);
    bank.assert_clean();
}

#[test]
fn failed_guard_aborts_with_reason_and_changes_nothing() {
    let bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 10);
    bank.seed(Side::B, "acct:bob", 0);
    let url = bank.url();

    let json = transfer_json(Some("t-guard"), (Side::A, "acct:alice"), (Side::B, "acct:bob"), 30);
    let out = redtx("submit", &url, &["--wait", "--json", "-"], Some(json.as_bytes()));
    assert_eq!(out.code, Some(1), "{out:?}");
    let v = out.json();
    assert!(v["state"] == "aborted" || v["state"] == "aborting", "{v}");
    let reason = v["reason"].as_str().unwrap_or_default().to_string();
    for part in ["bank-a", "acct:alice", "-20", "min 0"] {
        assert!(reason.contains(part), "reason {reason:?} should contain {part:?}");
    }
    assert_eq!(bank.balance(Side::A, "acct:alice"), 10);
    assert_eq!(bank.balance(Side::B, "acct:bob"), 0);
    let rec = bank.wait("t-guard");
    assert_eq!(rec.state, TxnState::Aborted, "{rec:?}");
    assert!(rec.branches.iter().all(|b| b.phase == Phase::Aborted), "{rec:?}");
    // bank-b may have prepared (locking acct:bob): the abort released it.
    bank.assert_clean();

    // A guard failure in the second op of a branch: the first op (which passed) is not applied.
    bank.seed(Side::B, "acct:carol", 3);
    let spec = TxnSpec::new(vec![
        Branch::kv("bank-a", vec![Op::incrby("acct:alice", 1)]),
        Branch::kv("bank-b", vec![Op::incrby("acct:bob", 100), incrby("acct:carol", -4, Some(0), None)]),
    ]);
    let rec = bank.run(&spec);
    assert_eq!(rec.state, TxnState::Aborted);
    let reason = rec.reason.unwrap_or_default();
    assert!(reason.contains("bank-b") && reason.contains("acct:carol"), "{reason}");
    assert_eq!(bank.balance(Side::A, "acct:alice"), 10);
    assert_eq!(bank.balance(Side::B, "acct:bob"), 0);
    assert_eq!(bank.balance(Side::B, "acct:carol"), 3);

    // A max guard.
    let spec = TxnSpec::new(vec![Branch::kv("bank-a", vec![incrby("acct:alice", 5, None, Some(12))])]);
    let rec = bank.run(&spec);
    assert_eq!(rec.state, TxnState::Aborted);
    let reason = rec.reason.unwrap_or_default();
    assert!(reason.contains("acct:alice") && reason.contains("max 12"), "{reason}");
    assert_eq!(bank.balance(Side::A, "acct:alice"), 10);
    bank.assert_clean();
}

#[test]
fn expect_guard_and_every_op_kind() {
    let bank = Bank::start();
    let mut b = bank.side_conn(Side::B);
    let _: () = redis::cmd("SET").arg("cfg:mode").arg("open").query(&mut b).unwrap();

    // expect fails: nothing happens, the reason names the key.
    let spec = TxnSpec::new(vec![
        Branch::kv("bank-a", vec![Op::set("flag", "x")]),
        Branch::kv(
            "bank-b",
            vec![
                Op::Expect(ExpectOp { key: "cfg:mode".into(), value: Some("closed".into()) }),
                Op::set("cfg:mode", "locked"),
            ],
        ),
    ]);
    let rec = bank.run(&spec);
    assert_eq!(rec.state, TxnState::Aborted, "{rec:?}");
    let reason = rec.reason.clone().unwrap_or_default();
    assert!(reason.contains("bank-b") && reason.contains("cfg:mode"), "{reason}");
    let flag: Option<String> = redis::cmd("GET").arg("flag").query(&mut bank.side_conn(Side::A)).unwrap();
    assert_eq!(flag, None);

    // expect "must not exist" on an existing key fails too.
    let spec = TxnSpec::new(vec![Branch::kv(
        "bank-b",
        vec![Op::Expect(ExpectOp { key: "cfg:mode".into(), value: None }), Op::set("cfg:mode", "x")],
    )]);
    assert_eq!(bank.run(&spec).state, TxnState::Aborted);

    // expect holds: every op kind applies, on both servers.
    let _: () = redis::cmd("HSET").arg("h").arg("gone").arg("1").arg("n").arg("5").query(&mut b).unwrap();
    let _: () = redis::cmd("SET").arg("old").arg("1").query(&mut bank.side_conn(Side::A)).unwrap();
    let spec = TxnSpec::new(vec![
        Branch::kv(
            "bank-a",
            vec![
                Op::Expect(ExpectOp { key: "flag".into(), value: None }),
                Op::set("flag", "up"),
                Op::Del(DelOp { key: "old".into() }),
            ],
        ),
        Branch::kv(
            "bank-b",
            vec![
                Op::Expect(ExpectOp { key: "cfg:mode".into(), value: Some("open".into()) }),
                Op::set("cfg:mode", "closed"),
                Op::Hset(HsetOp { key: "h".into(), field: "f".into(), value: "v".into() }),
                Op::Hdel(HdelOp { key: "h".into(), field: "gone".into() }),
                Op::Hincrby(HincrbyOp { key: "h".into(), field: "n".into(), by: -5, min: Some(0), max: None }),
            ],
        ),
    ]);
    let rec = bank.run(&spec);
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    let mut a = bank.side_conn(Side::A);
    let flag: Option<String> = redis::cmd("GET").arg("flag").query(&mut a).unwrap();
    assert_eq!(flag.as_deref(), Some("up"));
    let old: Option<String> = redis::cmd("GET").arg("old").query(&mut a).unwrap();
    assert_eq!(old, None);
    let mode: Option<String> = redis::cmd("GET").arg("cfg:mode").query(&mut b).unwrap();
    assert_eq!(mode.as_deref(), Some("closed"));
    let h: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL").arg("h").query(&mut b).unwrap();
    assert_eq!(h, [("f".to_string(), "v".to_string()), ("n".to_string(), "0".to_string())].into_iter().collect());

    // hincrby guard below min.
    let spec = TxnSpec::new(vec![Branch::kv(
        "bank-b",
        vec![Op::Hincrby(HincrbyOp { key: "h".into(), field: "n".into(), by: -1, min: Some(0), max: None })],
    )]);
    let rec = bank.run(&spec);
    assert_eq!(rec.state, TxnState::Aborted);
    assert!(rec.reason.unwrap_or_default().contains('h'));
    bank.assert_clean();
}

#[test]
fn a_key_held_by_a_prepared_txn_makes_others_vote_conflict_until_it_times_out() {
    // bank-b is not running: T1 prepares at bank-a (locking acct:alice) and waits for bank-b's vote.
    let bank = Bank::start_with(ClusterOptions::default().instances("bank-b", 0));
    bank.seed(Side::A, "acct:alice", 100);
    let t1 = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10)
        .with_id("t-holder")
        .with_timeout(Duration::from_secs(4));
    bank.submit(&t1);
    bank.wait_barrier("bank-a", "t-holder", "prepared");
    let lock = bank.lock("bank-a", "acct:alice");
    assert!(lock.is_some_and(|l| l.contains("t-holder")), "acct:alice should be locked by t-holder");

    // T2 touches the held key: bank-a votes no with `conflict`, T2 aborts, nothing changes.
    let t2 = TxnSpec::new(vec![Branch::kv(
        "bank-a",
        vec![incrby("acct:alice", -5, Some(0), None), Op::incrby("acct:carol", 5)],
    )])
    .with_id("t-blocked");
    let rec = bank.run(&t2);
    assert_eq!(rec.state, TxnState::Aborted, "{rec:?}");
    assert!(rec.reason.clone().unwrap_or_default().contains("conflict"), "{rec:?}");
    assert_eq!(bank.balance(Side::A, "acct:carol"), 0);
    // T2 took no lock (acct:carol is free again) and T1 still holds acct:alice.
    assert_eq!(bank.lock("bank-a", "acct:carol"), None);
    assert_eq!(bank.side_barrier(Side::A, "t-holder").as_deref(), Some("prepared"));

    // T1 reaches its deadline: decided abort; bank-a releases the lock even though bank-b never
    // answered (the record stays `aborting` until bank-b acks; `aborting` is already the answer).
    let rec = bank.wait_settled("t-holder");
    assert_eq!(rec.state, TxnState::Aborting, "{rec:?}");
    assert!(
        rec.reason.clone().unwrap_or_default().contains("bank-b"),
        "the reason should name the silent participant: {rec:?}"
    );
    bank.wait_barrier("bank-a", "t-holder", "aborted");
    assert_eq!(bank.lock("bank-a", "acct:alice"), None);
    assert_eq!(bank.balance(Side::A, "acct:alice"), 100);

    // The key is free again: a new transaction on it commits.
    let rec = bank.run(&t2.clone().with_id("t-after"));
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert_eq!(bank.balance(Side::A, "acct:alice"), 95);

    // bank-b comes up late: the late prepare votes no without locking, T1 ends aborted.
    let mut bank = bank;
    bank.start_participant(Side::B, None);
    let rec = bank.wait("t-holder");
    assert_eq!(rec.state, TxnState::Aborted, "{rec:?}");
    assert_eq!(bank.balance(Side::B, "acct:bob"), 0);
    bank.assert_clean();
}

#[test]
fn two_participants_sharing_a_data_redis_cannot_write_one_key_in_one_txn() {
    // bank-a and bank-b both keep their data on server A. A transaction whose two branches touch
    // the same key there must not deadlock on its own lock nor apply one branch over the other:
    // it aborts, and the reason names the key, both participants and why.
    let mut c = Cluster::start(1, ServerOptions::default(), &[("bank-a", 0), ("bank-b", 0)], ClusterOptions::default());
    let _: () = redis::cmd("SET").arg("acct:shared").arg(100).query(&mut c.data_conn("bank-a")).unwrap();
    let spec = TxnSpec::new(vec![
        Branch::kv("bank-a", vec![incrby("acct:shared", -10, Some(0), None)]),
        Branch::kv("bank-b", vec![Op::incrby("acct:shared", 10), Op::incrby("acct:other", 1)]),
    ])
    .with_id("t-shared");
    let rec = c.run(&spec);
    assert_eq!(rec.state, TxnState::Aborted, "{rec:?}");
    let reason = rec.reason.clone().unwrap_or_default();
    for part in ["acct:shared", "bank-a", "bank-b", "share"] {
        assert!(reason.contains(part), "reason {reason:?} should contain {part:?}");
    }
    let mut d = c.data_conn("bank-a");
    let (shared, other): (i64, Option<i64>) = redis::pipe().get("acct:shared").get("acct:other").query(&mut d).unwrap();
    assert_eq!((shared, other), (100, None), "nothing may be applied");
    c.assert_clean();

    // Ops on different keys of the shared Redis commit as usual.
    let spec = TxnSpec::new(vec![
        Branch::kv("bank-a", vec![incrby("acct:shared", -10, Some(0), None)]),
        Branch::kv("bank-b", vec![Op::incrby("acct:other", 10)]),
    ]);
    assert_eq!(c.run(&spec).state, TxnState::Committed);
    let (shared, other): (i64, i64) = redis::pipe().get("acct:shared").get("acct:other").query(&mut d).unwrap();
    assert_eq!((shared, other), (90, 10));
    c.assert_clean();
    c.assert_running(&["coordinator#1", "bank-a#1", "bank-b#1"]);
}

#[test]
fn a_producer_learns_the_outcome_and_its_reason_from_the_outcomes_stream() {
    // `submit_and_wait_outcome`: the outcome entry carries the state and the reason, so the
    // answer agrees with the record; an id submitted again after it finished is answered too
    // (that entry is answered from the record).
    let bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 10);
    bank.seed(Side::B, "acct:bob", 0);
    let client = bank.client().clone();
    let wait =
        |spec: &TxnSpec| bank.rt.block_on(client.submit_and_wait_outcome(spec, Duration::from_secs(30))).unwrap();

    let ok = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 4).with_id("o-commit");
    let out = wait(&ok);
    assert_eq!((out.id.as_str(), out.state, out.reason.as_deref()), ("o-commit", TxnState::Committed, None));
    assert_eq!(bank.balance(Side::B, "acct:bob"), 4, "committed means applied");

    let refused = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 50).with_id("o-abort");
    let out = wait(&refused);
    assert!(matches!(out.state, TxnState::Aborted | TxnState::Aborting), "{out:?}");
    let reason = out.reason.clone().unwrap_or_default();
    assert!(reason.contains("acct:alice") && reason.contains("min 0"), "{out:?}");
    assert_eq!(bank.wait("o-abort").reason.as_deref(), Some(reason.as_str()), "the record says the same");

    // Both again, finished: the same answers.
    assert_eq!(wait(&ok).state, TxnState::Committed);
    let again = wait(&refused);
    assert_eq!((again.state, again.reason.as_deref()), (TxnState::Aborted, Some(reason.as_str())));
    // The outcome entries: the first ones carry the reason field, empty for none.
    let mut s = bank.stream_conn();
    let stream =
        redtx_common::keys::outcomes_stream(redtx_common::keys::partition("o-abort", bank.client().partitions()));
    let entries: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(&stream).arg("-").arg("+").query(&mut s).unwrap();
    let mine: Vec<_> = entries
        .ids
        .iter()
        .filter(|e| {
            e.get::<String>("id").as_deref() == Some("o-abort")
                && e.get::<String>("state").as_deref() == Some("aborted")
        })
        .collect();
    assert!(!mine.is_empty(), "no outcome entry for o-abort");
    assert_eq!(mine[0].get::<String>("reason").as_deref(), Some(reason.as_str()));
    assert_eq!(bank.balance(Side::A, "acct:alice"), 6);
    bank.assert_clean();
}
