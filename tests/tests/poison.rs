//! Poison messages: entries that cannot be decoded or that their reader refuses are copied to the
//! dead-letter stream with a reason, counted, acked, and the worker goes on: a real transaction
//! submitted afterwards still commits.

use redis::Commands;
use redtx_common::protocol::{Ack, Message, Outcome, Prepare, Vote};
use redtx_common::record::TxnState;
use redtx_common::spec::Op;
use redtx_tests::*;
use std::collections::{BTreeMap, HashMap};

/// `{"v": 2}` in MessagePack: an envelope from a future protocol version.
const V2: &[u8] = &[0x81, 0xa1, b'v', 0x02];
/// 0xc1 is the one byte MessagePack never uses.
const NEVER_USED: &[u8] = &[0xc1];

fn add(conn: &mut redis::Connection, stream: &str, fields: &[(&str, &[u8])]) -> String {
    conn.xadd(stream, "*", fields).unwrap()
}

/// Dead letters by (source stream, original entry id): (stream, reason, orig.t). Entry ids of
/// different streams may be equal.
fn dead_letters(conn: &mut redis::Connection) -> HashMap<(String, String), (String, String, Option<String>)> {
    xrange(conn, &keys::dead_letter_stream())
        .into_iter()
        .map(|(_, f)| {
            let get = |k: &str| f.get(k).map(|v| lossy(v));
            (
                (get("stream").unwrap_or_default(), get("id").unwrap_or_default()),
                (get("stream").unwrap_or_default(), get("reason").unwrap_or_default(), get("orig.t")),
            )
        })
        .collect()
}

#[test]
fn garbage_is_dead_lettered_counted_acked_and_work_goes_on() {
    let bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    // Workers are up (their groups exist) once a first transaction went through.
    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 1));
    assert_eq!(rec.state, TxnState::Committed);

    let mut s = bank.stream_conn();
    let part = keys::participant_stream("bank-a");
    let coord = keys::coord_stream();
    let valid_prepare_for_b = Message::Prepare(Prepare {
        txn: "t-misrouted".into(),
        branch: 0,
        participant: "bank-b".into(),
        deadline_ms: redtx_common::now_ms() + 60_000,
        ops: vec![Op::incrby("acct:alice", 1_000_000)],
    })
    .encode();
    let valid_ack =
        Message::Ack(Ack { txn: "x".into(), branch: 0, participant: "bank-a".into(), outcome: Outcome::Committed })
            .encode();
    let valid_vote =
        Message::Vote(Vote { txn: "x".into(), branch: 0, participant: "bank-a".into(), yes: true, reason: None })
            .encode();

    let mut expected: BTreeMap<(String, String), (&str, &str)> = BTreeMap::new();
    let mut expect = |id: String, which: &'static str, what: &'static str| {
        let stream = if which == "part" { keys::participant_stream("bank-a") } else { keys::coord_stream() };
        expected.insert((stream, id), (which, what));
    };
    // Participant stream.
    expect(add(&mut s, &part, &[("t", b"prepare"), ("m", NEVER_USED)]), "part", "bad msgpack");
    expect(add(&mut s, &part, &[("t", b"prepare")]), "part", "missing m");
    expect(add(&mut s, &part, &[("m", &valid_ack)]), "part", "missing t");
    expect(add(&mut s, &part, &[("t", b"frobnicate"), ("m", &valid_ack)]), "part", "unknown t");
    expect(add(&mut s, &part, &[("t", b"prepare"), ("m", V2)]), "part", "wrong version");
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
    expect(add(&mut s, &coord, &[("t", b"ack"), ("m", V2)]), "coord", "wrong version");
    expect(add(&mut s, &coord, &[("t", b"vote"), ("m", NEVER_USED)]), "coord", "bad msgpack vote");

    // Every one of them shows up in the dead-letter stream with its reason.
    let dead = poll("every poison entry dead-lettered", LONG, || {
        let d = dead_letters(&mut s);
        expected.keys().all(|id| d.contains_key(id)).then_some(d)
    });
    for (id, (which, what)) in &expected {
        let (stream, reason, _) = &dead[id];
        let want = if *which == "part" { &part } else { &coord };
        assert_eq!(stream, want, "{what}: dead letter names the wrong stream");
        assert!(!reason.trim().is_empty(), "{what}: dead letter without a reason");
    }
    let reason = |which: &str, what: &str| {
        let key = expected.iter().find(|(_, (s, w))| *s == which && *w == what).unwrap().0;
        dead[key].1.to_lowercase()
    };
    for which in ["part", "coord"] {
        assert!(reason(which, "wrong version").contains("version 2"), "{}", reason(which, "wrong version"));
        assert!(reason(which, "missing m").contains("\"m\""), "{}", reason(which, "missing m"));
        assert!(reason(which, "missing t").contains("\"t\""), "{}", reason(which, "missing t"));
    }
    assert!(reason("part", "unknown t").contains("frobnicate"), "{}", reason("part", "unknown t"));
    assert!(reason("coord", "unknown t").contains("bogus"), "{}", reason("coord", "unknown t"));
    assert!(reason("part", "prepare for another participant").contains("bank-b"));
    // The original fields are kept.
    let orig_t = dead.values().filter_map(|(_, _, t)| t.clone()).collect::<Vec<_>>();
    assert!(orig_t.iter().any(|t| t == "frobnicate"), "{orig_t:?}");

    // Counted per source stream, and acked (nothing pending).
    let counts: HashMap<String, u64> = s.hgetall(keys::dead_letter_counts()).unwrap();
    assert_eq!(counts.get(&part).copied(), Some(6), "{counts:?}");
    assert_eq!(counts.get(&coord).copied(), Some(6), "{counts:?}");
    for stream in [&part, &coord] {
        poll(&format!("{stream} drained"), LONG, || drained(&mut s, stream).then_some(()));
    }
    // The misrouted prepare changed nothing at bank-a.
    assert_eq!(bank.barrier_state(Side::A, "t-misrouted"), None);

    // The workers are alive and a real transaction still commits.
    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10));
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert_eq!(bank.balance(Side::A, "acct:alice"), 89);
    assert_eq!(bank.balance(Side::B, "acct:bob"), 11);
    let mut bank = bank;
    for p in bank.coordinators.iter_mut().chain(bank.bank_a.iter_mut()).chain(bank.bank_b.iter_mut()) {
        assert!(p.is_running(), "{} died", p.label);
    }
    bank.assert_clean();
}

#[test]
fn a_submit_with_an_invalid_spec_is_dead_lettered() {
    // A producer in another language skipped validation: an empty branch list, a reserved key.
    let bank = Bank::start();
    let mut s = bank.stream_conn();
    let mut bad = redtx_tests::transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 1).with_id("t-invalid");
    bad.branches[0].ops[0] = Op::incrby("rtx:lock:acct:alice", 1);
    let m = Message::Submit(redtx_common::protocol::Submit { spec: bad, submitted_ms: redtx_common::now_ms() });
    let id: String = s.xadd(keys::coord_stream(), "*", &m.fields()).unwrap();
    let dead = poll("invalid submit dead-lettered", LONG, || {
        let d = dead_letters(&mut s);
        d.get(&(keys::coord_stream(), id.clone())).cloned()
    });
    assert!(!dead.1.is_empty());
    assert_eq!(bank.record("t-invalid"), None, "an invalid spec must not become a transaction");
    let lock: Option<String> =
        redis::cmd("GET").arg("rtx:lock:rtx:lock:acct:alice").query(&mut bank.data_conn(Side::A)).unwrap();
    assert_eq!(lock, None);
    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 0));
    assert!(rec.state.is_terminal());
}
