//! At-least-once delivery: the same id submitted twice is one transaction, and every message
//! delivered a second time (re-added to its stream) changes nothing: balances, records, barriers
//! and locks stay as they were. A stray `prepare` (hand-written, no record behind it) is answered
//! with an abort, so it cannot leave a key locked.

use redis::Commands;
use redtx_common::machine::Phase;
use redtx_common::protocol::{Ack, Message, Outcome, Prepare, Submit, Vote};
use redtx_common::record::TxnState;
use redtx_common::spec::{Branch, Op, TxnSpec};
use redtx_tests::*;
use std::collections::BTreeMap;
use std::time::Duration;

#[test]
fn the_same_id_submitted_twice_is_one_transaction() {
    let bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    let spec = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10).with_id("t-twice");
    // Twice before any of it is processed...
    bank.submit(&spec);
    bank.submit(&spec);
    let rec = bank.wait("t-twice");
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    // ...and once more after it committed, through the library and through the CLI.
    bank.submit(&spec);
    let json = transfer_json(Some("t-twice"), (Side::A, "acct:alice"), (Side::B, "acct:bob"), 10);
    let out = redtx("submit", &bank.url(), &["--wait", "--json", "-"], Some(json.as_bytes()));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.json()["state"], "committed");
    let mut s = bank.stream_conn();
    let coord = keys::coord_stream(partition("t-twice"));
    poll("coordinator stream drained", LONG, || drained(&mut s, &coord).then_some(()));

    assert_eq!(bank.balance(Side::A, "acct:alice"), 90, "money moved more than once");
    assert_eq!(bank.balance(Side::B, "acct:bob"), 10, "money moved more than once");
    assert_eq!(bank.record("t-twice").unwrap().state, TxnState::Committed);
    let records = scan(&mut s, "rtx:txn:*");
    assert_eq!(records, vec![record_key("t-twice")]);
    bank.assert_clean();
}

/// Everything that must not change when old messages are delivered again.
#[derive(Debug, PartialEq)]
struct Snapshot {
    balances: BTreeMap<(Side, String), i64>,
    records: BTreeMap<String, BTreeMap<String, String>>,
    barriers: BTreeMap<String, Option<String>>,
    locks: Vec<String>,
}

fn snapshot(bank: &Bank, ids: &[&str]) -> Snapshot {
    let mut records = BTreeMap::new();
    for id in ids {
        records.insert(id.to_string(), bank.raw_record(id).into_iter().map(|(k, v)| (k, lossy(&v))).collect());
    }
    let mut barriers = BTreeMap::new();
    let mut locks = Vec::new();
    for side in [Side::A, Side::B] {
        let mut c = bank.side_conn(side);
        for id in ids {
            let k = keys::barrier(side.name(), id);
            let st: Option<String> = c.hget(&k, "state").unwrap();
            barriers.insert(format!("{side:?} {k}"), st);
        }
        locks.extend(scan(&mut c, "rtx:lock:*").into_iter().map(|k| format!("{side:?} {k}")));
    }
    Snapshot { balances: bank.balances(), records, barriers, locks }
}

fn streams() -> Vec<String> {
    [coord_streams(), participant_streams("bank-a"), participant_streams("bank-b")].concat()
}

/// Waits until every stream is drained and no stream grew meanwhile (replies caused by
/// replies are processed too).
fn wait_drained(bank: &Bank) {
    let mut s = bank.stream_conn();
    let lens = |s: &mut redis::Connection| -> Vec<u64> { streams().iter().map(|k| s.xlen(k).unwrap()).collect() };
    poll("all streams drained and quiet", LONG, || {
        let before = lens(&mut s);
        for stream in streams() {
            if !drained(&mut s, &stream) {
                return None;
            }
        }
        (lens(&mut s) == before).then_some(())
    });
}

#[test]
fn every_message_delivered_twice_is_harmless() {
    let bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    bank.seed(Side::B, "acct:bob", 50);
    let ok = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 30).with_id("t-ok"));
    assert_eq!(ok.state, TxnState::Committed, "{ok:?}");
    // bank-b prepares (and locks acct:bob), bank-a refuses: an abort goes to both.
    let no = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 1000).with_id("t-no"));
    assert_eq!(no.state, TxnState::Aborted, "{no:?}");
    // A second committed one entirely at bank-b, so its stream sees a one-branch txn too.
    let same = bank.run(&transfer((Side::B, "acct:bob"), (Side::B, "acct:carol"), 5).with_id("t-local"));
    assert_eq!(same.state, TxnState::Committed, "{same:?}");
    wait_drained(&bank);
    let ids = ["t-ok", "t-no", "t-local"];
    let before = snapshot(&bank, &ids);
    assert_eq!(before.balances.values().sum::<i64>(), 150);

    // Re-deliver every message: copy each entry's `t` and `m` to a new entry of its stream.
    let mut s = bank.stream_conn();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for stream in streams() {
        for (_, fields) in xrange(&mut s, &stream) {
            let t = fields.get("t").cloned().unwrap_or_default();
            let m = fields.get("m").cloned().unwrap_or_default();
            *kinds.entry(format!("{stream} {}", lossy(&t))).or_default() += 1;
            let _: String = s.xadd(&stream, "*", &[("t", t), ("m", m)]).unwrap();
        }
    }
    for k in ["submit", "vote", "ack"] {
        assert!(kinds.keys().any(|x| x.starts_with("rtx:coord") && x.ends_with(k)), "no {k} re-sent: {kinds:?}");
    }
    for k in ["prepare", "commit", "abort"] {
        assert!(kinds.keys().any(|x| x.starts_with("rtx:part") && x.ends_with(k)), "no {k} re-sent: {kinds:?}");
    }
    wait_drained(&bank);
    // A coordinator's periodic work (deadlines, re-sends) gets a chance to misbehave too: wait
    // until a later transaction passed its 600 ms deadline (a participant that does not exist
    // never votes), so the timers of everything before it have fired.
    let probe = TxnSpec::new(vec![
        Branch::kv("bank-a", vec![Op::incrby("probe", 1)]),
        Branch::kv("nobody", vec![Op::incrby("probe", 1)]),
    ])
    .with_id("t-probe")
    .with_timeout(Duration::from_millis(600));
    let rec = bank.submit(&probe);
    let rec = bank.wait_settled(&rec);
    assert_eq!(rec.state, TxnState::Aborting, "{rec:?}");
    bank.wait_barrier("bank-a", "t-probe", "aborted");
    wait_drained(&bank);

    let after = snapshot(&bank, &ids);
    assert_eq!(after.balances, before.balances, "balances changed");
    assert_eq!(after.locks, before.locks, "locks changed");
    assert_eq!(after.barriers, before.barriers, "barriers changed");
    for id in ids {
        let (b, a) = (&before.records[id], &after.records[id]);
        let changed: Vec<String> = b
            .keys()
            .chain(a.keys())
            .filter(|k| *k != "spec" && b.get(*k) != a.get(*k))
            .map(|k| format!("{k}: {:?} -> {:?}", b.get(k), a.get(k)))
            .collect();
        assert!(changed.is_empty(), "record of {id} changed: {changed:?}");
    }
    let dead = bank.dead_letters();
    assert!(dead.is_empty(), "a duplicate is not a poison message; dead letters: {dead:?}");
    bank.assert_clean();

    // Still working afterwards.
    let rec = bank.run(&transfer((Side::B, "acct:bob"), (Side::A, "acct:alice"), 1));
    assert_eq!(rec.state, TxnState::Committed);
    assert_eq!(bank.total(), 150);
}

#[test]
fn a_prepare_redelivered_after_its_barrier_expired_takes_no_lock() {
    // A participant keeps a branch's outcome marker (committed/aborted barrier) for --retention.
    // Found by this test (fixed in 4024061): when that was shorter than the time left to the
    // transaction's deadline, a duplicate prepare delivered after the marker expired (but before
    // the deadline) found no barrier and no deadline refusal, so it locked the keys and staged the
    // writes of a transaction that had committed long ago. The coordinator ignores votes for
    // terminal transactions, so the lock on acct:bob was held forever.
    //
    // Expected: no lock, no prepared barrier after the duplicate, whatever --retention says.
    let bank = Bank::start_with(ClusterOptions::default().part_args(&["--retention", "300ms"]));
    bank.seed(Side::A, "acct:alice", 100);
    let spec = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10)
        .with_id("t-late")
        .with_timeout(Duration::from_secs(3600));
    assert_eq!(bank.run(&spec).state, TxnState::Committed);
    // Let the retention window pass (whether or not the barrier now outlives it).
    let committed_at = std::time::Instant::now();
    poll("3x the retention window passed", LONG, || {
        (committed_at.elapsed() > Duration::from_millis(900)).then_some(())
    });

    // Deliver bank-b's prepare once more (as XAUTOCLAIM or a producer-side retry could).
    let mut s = bank.stream_conn();
    let stream = keys::participant_stream("bank-b", partition("t-late"));
    let prepare = xrange(&mut s, &stream)
        .into_iter()
        .find(|(_, f)| f.get("t").map(Vec::as_slice) == Some(b"prepare".as_slice()))
        .expect("the original prepare")
        .1;
    let _: String = s.xadd(&stream, "*", &[("t", prepare["t"].clone()), ("m", prepare["m"].clone())]).unwrap();
    wait_drained(&bank);

    assert_eq!(bank.balance(Side::B, "acct:bob"), 10);
    assert_eq!(bank.record("t-late").unwrap().state, TxnState::Committed);
    bank.assert_clean();
}

#[test]
fn an_id_submitted_again_after_its_record_expired_is_never_committed_without_its_writes() {
    // docs/protocol.md: "An id whose record expired can be submitted again as a new
    // transaction." The participants' outcome barriers of the first one may outlive the record
    // (they are kept at least until the deadline plus a margin, whatever --retention says). Found
    // by this test: the second transaction's prepare was taken for a repeat of the first's and
    // voted yes without staging anything, so the second transaction was reported committed but
    // never applied (with other branches, half-applied).
    //
    // Expected: whatever the outcome, the record and the data agree; no lock is left.
    let bank = Bank::start_with(
        ClusterOptions::default().coord_args(&["--retention", "300ms"]).part_args(&["--retention", "300ms"]),
    );
    bank.seed(Side::A, "acct:alice", 100);
    let spec = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10)
        .with_id("t-reused")
        .with_timeout(Duration::from_secs(60));
    assert_eq!(bank.run(&spec).state, TxnState::Committed);
    poll("the record expired", LONG, || bank.record("t-reused").is_none().then_some(()));

    let again = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 5)
        .with_id("t-reused")
        .with_timeout(Duration::from_secs(60));
    bank.submit(&again);
    let decided = [TxnState::Committing, TxnState::Committed, TxnState::Aborting, TxnState::Aborted];
    bank.wait_settled("t-reused");
    let rec = bank.wait_state("t-reused", &decided, LONG);
    if matches!(rec.state, TxnState::Committing | TxnState::Committed) {
        let rec = bank.wait("t-reused");
        assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
        assert_eq!(
            (bank.balance(Side::A, "acct:alice"), bank.balance(Side::B, "acct:bob")),
            (85, 15),
            "the second transaction is committed: its writes must be applied"
        );
    } else {
        assert_eq!((bank.balance(Side::A, "acct:alice"), bank.balance(Side::B, "acct:bob")), (90, 10));
    }
    bank.wait_clean();
}

#[test]
fn a_stray_prepare_without_a_record_is_aborted_and_leaves_no_lock() {
    // A `prepare` written by hand (or left over from a transaction whose record is gone) for a
    // transaction the coordinator never created: the participant prepares it (locks the key)
    // and votes yes; with no record there was never a decision, so the coordinator must answer
    // `abort`. Otherwise the key stays locked for ever and every later transaction on it votes
    // `conflict`.
    let bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    // The workers are up (their consumer groups exist) once a first transaction went through.
    assert_eq!(bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 1)).state, TxnState::Committed);

    let id = "t-stray";
    let prepare = Message::Prepare(Prepare {
        txn: id.into(),
        branch: 0,
        participant: "bank-a".into(),
        deadline_ms: redtx_common::now_ms() + 60_000,
        payload: redtx_common::kv::encode_ops(&[Op::incrby("acct:alice", 1_000)]),
    });
    let mut s = bank.stream_conn();
    let _: String = s.xadd(keys::participant_stream("bank-a", partition(id)), "*", &prepare.fields()).unwrap();

    // The participant prepares and votes yes; the coordinator answers abort; the barrier ends
    // aborted and the lock is released.
    bank.wait_barrier("bank-a", id, "aborted");
    let sent = bank.sent_to("bank-a", id);
    assert!(sent.iter().any(|m| matches!(m, Message::Abort(_))), "no abort sent: {sent:?}");
    assert_eq!(bank.lock("bank-a", "acct:alice"), None);
    assert_eq!(bank.record(id), None, "a stray message must not create a transaction");
    assert_eq!(bank.balance(Side::A, "acct:alice"), 99, "the stray branch must not apply");

    // The key is free: a later transaction on it commits.
    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 9));
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert_eq!(bank.balance(Side::A, "acct:alice"), 90);
    bank.assert_clean();
    assert!(bank.dead_letters().is_empty(), "{:?}", bank.dead_letters());
}

#[test]
fn a_finished_txn_submitted_again_with_its_votes_in_one_batch_gets_no_abort() {
    // Found by the saga duplicate test: the coordinator reads the records of the transactions a
    // batch names once, and a repeated `submit` of a finished transaction took that record out
    // of the batch's map, so a repeated `yes` vote later in the same batch looked like a vote for
    // a transaction without a record and got an `abort` (sent to a committed branch, which
    // dead-letters it). The repeats are written in one MULTI/EXEC, so that they arrive in one
    // batch.
    let bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    let spec = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10).with_id("t-batch");
    assert_eq!(bank.run(&spec).state, TxnState::Committed);
    let mut s = bank.stream_conn();
    let coord = keys::coord_stream(partition("t-batch"));
    let repeats: Vec<(String, BTreeMap<String, Vec<u8>>)> = xrange(&mut s, &coord)
        .into_iter()
        .filter(|(_, f)| matches!(f.get("t").map(Vec::as_slice), Some(b"submit" | b"vote")))
        .collect();
    assert!(repeats.len() >= 3, "{repeats:?}");
    // One MULTI/EXEC: a read blocked at the server is served with all of them at once.
    let mut tx = redis::pipe();
    tx.atomic();
    for (_, f) in &repeats {
        tx.xadd(&coord, "*", &[("t", f["t"].clone()), ("m", f["m"].clone())]).ignore();
    }
    let _: () = tx.query(&mut s).unwrap();
    poll("the repeats handled", LONG, || drained(&mut s, &coord).then_some(()));
    for name in ["bank-a", "bank-b"] {
        let stream = keys::participant_stream(name, partition("t-batch"));
        poll("the participants drained", LONG, || drained(&mut s, &stream).then_some(()));
        let aborts = bank.sent_to(name, "t-batch").into_iter().filter(|m| matches!(m, Message::Abort(_))).count();
        assert_eq!(aborts, 0, "an abort was sent to {name} for a committed transaction");
    }
    assert!(bank.dead_letters().is_empty(), "{:?}", bank.dead_letters());
    assert_eq!(bank.record("t-batch").unwrap().state, TxnState::Committed);
}

#[test]
fn a_repeated_vote_in_the_batch_that_finishes_its_txn_gets_no_abort() {
    // The same class as the previous test, other trigger: the batch holding a transaction's last
    // ack also holds a repeated `yes` vote of it (a redelivery). The ack finishes the
    // transaction (it leaves the partition's memory); the vote after it must be answered as a
    // vote for a finished, committed transaction (nothing to do), not as one for a transaction
    // without a record (`abort`, sent to a committed branch).
    let fp = "participant-after-commit";
    let mut bank = Bank::start_with(ClusterOptions::default().failpoint("bank-b", fp));
    bank.seed(Side::A, "acct:alice", 100);
    let id = bank.submit(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10).with_id("t-last-ack"));
    bank.bank(Side::B)[0].wait_for_line("failpoint participant-after-commit reached", LONG);
    bank.bank(Side::B)[0].kill9();
    let rec = bank.wait_record(&id, "bank-a acked", LONG, |r| r.branches[0].phase == Phase::Committed);
    assert_eq!(rec.state, TxnState::Committing, "{rec:?}");

    // bank-b's ack and a repeat of its vote, in one batch.
    let ack =
        Message::Ack(Ack { txn: id.clone(), branch: 1, participant: "bank-b".into(), outcome: Outcome::Committed });
    let vote =
        Message::Vote(Vote { txn: id.clone(), branch: 1, participant: "bank-b".into(), yes: true, reason: None });
    let coord = keys::coord_stream(partition(&id));
    let mut s = bank.stream_conn();
    let mut tx = redis::pipe();
    tx.atomic();
    tx.xadd(&coord, "*", &ack.fields()).ignore();
    tx.xadd(&coord, "*", &vote.fields()).ignore();
    let _: () = tx.query(&mut s).unwrap();
    assert_eq!(bank.wait(&id).state, TxnState::Committed);
    poll("the coordinator handled both", LONG, || drained(&mut s, &coord).then_some(()));
    let aborts = bank.sent_to("bank-b", &id).into_iter().filter(|m| matches!(m, Message::Abort(_))).count();
    assert_eq!(aborts, 0, "an abort was sent to bank-b for a committed transaction");

    bank.start_participant(Side::B, None);
    let stream = keys::participant_stream("bank-b", partition(&id));
    poll("bank-b drained", LONG, || drained(&mut s, &stream).then_some(()));
    assert!(bank.dead_letters().is_empty(), "{:?}", bank.dead_letters());
    assert_eq!(bank.balance(Side::B, "acct:bob"), 10);
    bank.assert_clean();
}

#[test]
fn a_submit_repeated_in_the_batch_that_finishes_its_txn_creates_nothing() {
    // The batch holding a transaction's last ack also holds a repeat of its submit (a producer
    // retrying): the submit must find the transaction that just finished, not create it again
    // (which would overwrite the committed record and send new prepares).
    let fp = "participant-after-commit";
    let mut bank = Bank::start_with(ClusterOptions::default().failpoint("bank-b", fp));
    bank.seed(Side::A, "acct:alice", 100);
    let spec = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10).with_id("t-last-submit");
    let id = bank.submit(&spec);
    bank.bank(Side::B)[0].wait_for_line("failpoint participant-after-commit reached", LONG);
    bank.bank(Side::B)[0].kill9();
    bank.wait_record(&id, "bank-a acked", LONG, |r| r.branches[0].phase == Phase::Committed);

    let ack =
        Message::Ack(Ack { txn: id.clone(), branch: 1, participant: "bank-b".into(), outcome: Outcome::Committed });
    let submit = Message::Submit(Submit { spec: spec.clone(), submitted_ms: 0 });
    let coord = keys::coord_stream(partition(&id));
    let mut s = bank.stream_conn();
    let mut tx = redis::pipe();
    tx.atomic();
    tx.xadd(&coord, "*", &ack.fields()).ignore();
    tx.xadd(&coord, "*", &submit.fields()).ignore();
    let _: () = tx.query(&mut s).unwrap();
    poll("the coordinator handled both", LONG, || drained(&mut s, &coord).then_some(()));
    let rec = bank.wait(&id);
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    let prepares = bank.sent_to("bank-a", &id).into_iter().filter(|m| matches!(m, Message::Prepare(_))).count();
    assert_eq!(prepares, 1, "the repeated submit sent new prepares");
    let live: Vec<String> = redis::cmd("ZRANGE").arg(keys::live(partition(&id))).arg(0).arg(-1).query(&mut s).unwrap();
    assert!(!live.contains(&id), "{live:?}");

    bank.start_participant(Side::B, None);
    let stream = keys::participant_stream("bank-b", partition(&id));
    poll("bank-b drained", LONG, || drained(&mut s, &stream).then_some(()));
    assert!(bank.dead_letters().is_empty(), "{:?}", bank.dead_letters());
    assert_eq!(bank.record(&id).unwrap().state, TxnState::Committed);
    bank.assert_clean();
}
