//! Poison messages: entries that cannot be decoded or that their reader refuses are copied to the
//! dead-letter stream of their partition (`rtx:dead:{P}`) with a reason, counted
//! (`rtx:dead:count:{P}`), acked, and the worker goes on: a real transaction submitted afterwards
//! still commits.

use redis::Commands;
use redtx_common::protocol::{Ack, Message, Outcome, Prepare, Resolve, Submit, Vote};
use redtx_common::record::TxnState;
use redtx_common::spec::{Branch, Op};
use redtx_tests::*;
use std::collections::{BTreeMap, HashMap};

/// `{"v": 3}` in MessagePack: an envelope from a future protocol version.
const V3: &[u8] = &[0x81, 0xa1, b'v', 0x03];
/// 0xc1 is the one byte MessagePack never uses.
const NEVER_USED: &[u8] = &[0xc1];

fn add(conn: &mut redis::Connection, stream: &str, fields: &[(&str, &[u8])]) -> String {
    conn.xadd(stream, "*", fields).unwrap()
}

/// Dead letters by (source stream, original entry id). Entry ids of different streams may be
/// equal.
fn by_source(bank: &Bank) -> HashMap<(String, String), DeadLetter> {
    bank.dead_letters().into_iter().map(|d| ((d.get("stream").to_string(), d.get("id").to_string()), d)).collect()
}

#[test]
fn garbage_is_dead_lettered_per_partition_counted_acked_and_work_goes_on() {
    let bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    // Workers are up (their groups exist) once a first transaction went through.
    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 1));
    assert_eq!(rec.state, TxnState::Committed);

    let mut s = bank.stream_conn();
    // Poison goes to one partition of each kind of stream; its dead letters must land in that
    // partition's dead-letter stream.
    let (pp, pc) = (1, 2);
    let part = keys::participant_stream("bank-a", pp);
    let coord = keys::coord_stream(pc);
    let valid_prepare_for_b = Message::Prepare(Prepare {
        txn: "t-misrouted".into(),
        branch: 0,
        participant: "bank-b".into(),
        deadline_ms: redtx_common::now_ms() + 60_000,
        payload: redtx_common::kv::encode_ops(&[Op::incrby("acct:alice", 1_000_000)]),
    })
    .encode();
    let valid_ack =
        Message::Ack(Ack { txn: "x".into(), branch: 0, participant: "bank-a".into(), outcome: Outcome::Committed })
            .encode();
    let valid_vote =
        Message::Vote(Vote { txn: "x".into(), branch: 0, participant: "bank-a".into(), yes: true, reason: None })
            .encode();
    // A valid submit on the wrong partition's stream: a producer with another --partitions.
    let mut stray = (0..).map(|i| format!("t-wrong-{i}")).find(|id| partition(id) != pc).unwrap();
    let wrong_home = Message::Submit(Submit {
        spec: transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 1).with_id(std::mem::take(&mut stray)),
        submitted_ms: redtx_common::now_ms(),
    })
    .encode();

    let mut expected: BTreeMap<(String, String), (&str, &str)> = BTreeMap::new();
    let mut expect = |id: String, which: &'static str, what: &'static str| {
        let stream = if which == "part" { part.clone() } else { coord.clone() };
        expected.insert((stream, id), (which, what));
    };
    // Participant stream.
    expect(add(&mut s, &part, &[("t", b"prepare"), ("m", NEVER_USED)]), "part", "bad msgpack");
    expect(add(&mut s, &part, &[("t", b"prepare")]), "part", "missing m");
    expect(add(&mut s, &part, &[("m", &valid_ack)]), "part", "missing t");
    expect(add(&mut s, &part, &[("t", b"frobnicate"), ("m", &valid_ack)]), "part", "unknown t");
    expect(add(&mut s, &part, &[("t", b"prepare"), ("m", V3)]), "part", "wrong version");
    expect(
        add(&mut s, &part, &[("t", b"prepare"), ("m", &valid_prepare_for_b)]),
        "part",
        "prepare for another participant",
    );
    // Coordinator stream.
    expect(add(&mut s, &coord, &[("t", b"submit"), ("m", NEVER_USED)]), "coord", "bad msgpack");
    expect(add(&mut s, &coord, &[("t", b"vote")]), "coord", "missing m");
    expect(add(&mut s, &coord, &[("m", &valid_vote)]), "coord", "missing t");
    expect(add(&mut s, &coord, &[("t", b"bogus"), ("m", &valid_vote)]), "coord", "unknown t");
    expect(add(&mut s, &coord, &[("t", b"ack"), ("m", V3)]), "coord", "wrong version");
    expect(add(&mut s, &coord, &[("t", b"vote"), ("m", NEVER_USED)]), "coord", "bad msgpack vote");
    expect(add(&mut s, &coord, &[("t", b"submit"), ("m", &wrong_home)]), "coord", "wrong partition");

    // Every one of them shows up in its partition's dead-letter stream with its reason.
    let dead = poll("every poison entry dead-lettered", LONG, || {
        let d = by_source(&bank);
        expected.keys().all(|id| d.contains_key(id)).then_some(d)
    });
    for (id, (which, what)) in &expected {
        let d = &dead[id];
        let p = if *which == "part" { pp } else { pc };
        assert_eq!(d.dead_stream, keys::dead_letter_stream(p), "{what}: dead letter in the wrong partition");
        assert!(!d.get("reason").trim().is_empty(), "{what}: dead letter without a reason");
    }
    let reason = |which: &str, what: &str| {
        let key = expected.iter().find(|(_, (s, w))| *s == which && *w == what).unwrap().0;
        dead[key].get("reason").to_lowercase()
    };
    for which in ["part", "coord"] {
        assert!(reason(which, "wrong version").contains("version 3"), "{}", reason(which, "wrong version"));
        assert!(reason(which, "missing m").contains("\"m\""), "{}", reason(which, "missing m"));
        assert!(reason(which, "missing t").contains("\"t\""), "{}", reason(which, "missing t"));
    }
    assert!(reason("part", "unknown t").contains("frobnicate"), "{}", reason("part", "unknown t"));
    assert!(reason("coord", "unknown t").contains("bogus"), "{}", reason("coord", "unknown t"));
    assert!(reason("part", "prepare for another participant").contains("bank-b"));
    assert!(reason("coord", "wrong partition").contains("partition"), "{}", reason("coord", "wrong partition"));
    // The original fields are kept.
    assert!(dead.values().any(|d| d.get("orig.t") == "frobnicate"), "{dead:?}");

    // Counted per source stream in the partition's counter, and acked (nothing pending).
    let counts: HashMap<String, u64> = s.hgetall(keys::dead_letter_counts(pp)).unwrap();
    assert_eq!(counts.get(&part).copied(), Some(6), "{counts:?}");
    let counts: HashMap<String, u64> = s.hgetall(keys::dead_letter_counts(pc)).unwrap();
    assert_eq!(counts.get(&coord).copied(), Some(7), "{counts:?}");
    for stream in [&part, &coord] {
        poll(&format!("{stream} drained"), LONG, || drained(&mut s, stream).then_some(()));
    }
    // The misrouted prepare changed nothing at bank-a, and no other partition got dead letters.
    assert_eq!(bank.side_barrier(Side::A, "t-misrouted"), None);
    let others: Vec<DeadLetter> = bank
        .dead_letters()
        .into_iter()
        .filter(|d| d.dead_stream != keys::dead_letter_stream(pp) && d.dead_stream != keys::dead_letter_stream(pc))
        .collect();
    assert!(others.is_empty(), "{others:?}");

    // The workers are alive and a real transaction still commits.
    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10));
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert_eq!(bank.balance(Side::A, "acct:alice"), 89);
    assert_eq!(bank.balance(Side::B, "acct:bob"), 11);
    let mut bank = bank;
    bank.assert_running(&["coordinator#1", "bank-a#1", "bank-b#1"]);
    bank.assert_clean();
}

#[test]
fn a_submit_with_an_invalid_spec_is_rejected_and_bad_ops_are_refused_by_the_participant() {
    // A producer in another language skipped validation. What the coordinator can check (the
    // spec's shape) makes it reject the submit (a `rejected` record, and a dead letter for
    // operators); a branch's ops are opaque to it, so a
    // reserved key is refused by the participant (a no vote naming the field), and the
    // transaction aborts without locking anything.
    let bank = Bank::start();
    let mut s = bank.stream_conn();
    let mut empty = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 1).with_id("t-invalid");
    empty.branches.clear();
    let m = Message::Submit(Submit { spec: empty, submitted_ms: redtx_common::now_ms() });
    let coord = keys::coord_stream(partition("t-invalid"));
    let id: String = s.xadd(&coord, "*", &m.fields()).unwrap();
    let dead = poll("invalid submit dead-lettered", LONG, || by_source(&bank).remove(&(coord.clone(), id.clone())));
    assert!(dead.get("reason").contains("branches"), "{dead:?}");
    assert_eq!(dead.dead_stream, keys::dead_letter_stream(partition("t-invalid")));
    // It never becomes a transaction, but its producer learns why.
    let rec = bank.wait("t-invalid");
    assert_eq!(rec.state, TxnState::Rejected, "{rec:?}");
    assert!(rec.reason.as_deref().is_some_and(|r| r.starts_with("invalid spec: branches")), "{rec:?}");
    assert!(bank.sent_to("bank-a", "t-invalid").is_empty() && bank.sent_to("bank-b", "t-invalid").is_empty());

    let mut reserved = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 1).with_id("t-reserved");
    reserved.branches[0] = Branch::kv("bank-a", vec![Op::incrby("rtx:lock:acct:alice", 1)]);
    let m = Message::Submit(Submit { spec: reserved, submitted_ms: redtx_common::now_ms() });
    let _: String = s.xadd(keys::coord_stream(partition("t-reserved")), "*", &m.fields()).unwrap();
    let rec = bank.wait("t-reserved");
    assert_eq!(rec.state, TxnState::Aborted, "{rec:?}");
    let reason = rec.reason.unwrap_or_default();
    assert!(reason.contains("bank-a") && reason.contains("rtx:"), "{reason}");
    assert_eq!(bank.lock("bank-a", "rtx:lock:acct:alice"), None);
    let raw: Option<String> = bank.side_conn(Side::A).get("rtx:lock:acct:alice").unwrap();
    assert_eq!(raw, None, "the reserved key was written");
    bank.assert_clean();
    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 0));
    assert!(rec.state.is_terminal());
}

/// A batch entry (`t` = `batch`) carries several messages: a bad one among them is dead-lettered
/// alone, with its own fields and a reason naming its place, and the others are answered.
#[test]
fn a_bad_message_in_a_batch_entry_is_dead_lettered_alone_and_the_rest_answered() {
    let bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 1));
    assert_eq!(rec.state, TxnState::Committed);
    let mut s = bank.stream_conn();
    let batch = |items: Vec<(&str, Vec<u8>)>| {
        let m = rmp_serde::to_vec(&items).unwrap();
        vec![("t", b"batch".to_vec()), ("m", m)]
    };
    let resolve =
        |txn: &str, participant: &str| Resolve { txn: txn.into(), branch: 0, participant: participant.into() };

    // Participant side: an abort before any prepare (answered: a tombstone and an ack), a
    // message that does not decode, and a prepare for another participant (refused).
    let p = partition("t-batch-abort");
    let part = keys::participant_stream("bank-a", p);
    let for_b = Message::Commit(resolve("t-batch-other", "bank-b")).encode();
    let fields = batch(vec![
        ("abort", Message::Abort(resolve("t-batch-abort", "bank-a")).encode()),
        ("vote", NEVER_USED.to_vec()),
        ("commit", for_b),
    ]);
    let part_id: String = s.xadd(&part, "*", &fields).unwrap();
    // Coordinator side: a vote for a transaction without a record (answered with an abort) and
    // a message of an unknown type.
    let c = partition("t-batch-orphan");
    let coord = keys::coord_stream(c);
    let vote = Message::Vote(Vote {
        txn: "t-batch-orphan".into(),
        branch: 0,
        participant: "bank-a".into(),
        yes: true,
        reason: None,
    });
    let fields = batch(vec![("vote", vote.encode()), ("bogus", vote.encode())]);
    let coord_id: String = s.xadd(&coord, "*", &fields).unwrap();

    let dead = poll("the bad messages dead-lettered", LONG, || {
        let d: Vec<DeadLetter> = bank.dead_letters();
        (d.len() >= 3).then_some(d)
    });
    assert_eq!(dead.len(), 3, "{dead:?}");
    let find = |stream: &str, t: &str| {
        dead.iter().find(|d| d.get("stream") == stream && d.get("orig.t") == t).unwrap_or_else(|| panic!("{dead:?}"))
    };
    let d = find(&part, "vote");
    assert_eq!(d.get("id"), part_id);
    assert!(d.get("reason").starts_with("batch message 1:"), "{d:?}");
    let d = find(&part, "commit");
    assert_eq!(d.get("id"), part_id);
    assert!(d.get("reason").contains("bank-b"), "{d:?}");
    let d = find(&coord, "bogus");
    assert_eq!(d.get("id"), coord_id);
    assert!(d.get("reason").starts_with("batch message 1:") && d.get("reason").contains("bogus"), "{d:?}");

    // The good messages were answered: bank-a recorded the abort (a tombstone) and acked it;
    // the orphan vote got an abort.
    poll("the abort recorded at bank-a", LONG, || {
        bank.side_barrier(Side::A, "t-batch-abort").filter(|s| s == "aborted")
    });
    let acks = poll("bank-a's ack of the abort", LONG, || {
        let m = messages_of(&mut s, &keys::coord_stream(p), "t-batch-abort");
        (!m.is_empty()).then_some(m)
    });
    assert!(matches!(&acks[0], Message::Ack(a) if a.outcome == Outcome::Aborted), "{acks:?}");
    let aborts = poll("the orphan vote answered with an abort", LONG, || {
        let m = messages_of(&mut s, &keys::participant_stream("bank-a", c), "t-batch-orphan");
        (!m.is_empty()).then_some(m)
    });
    assert!(matches!(&aborts[0], Message::Abort(_)), "{aborts:?}");
    for stream in [&part, &coord] {
        poll(&format!("{stream} drained"), LONG, || drained(&mut s, stream).then_some(()));
    }
    let mut bank = bank;
    bank.assert_running(&["coordinator#1", "bank-a#1", "bank-b#1"]);
}
