//! Micro-benchmarks of redtx's hot pure code: what the coordinator and the participants run for
//! every transaction and every stream entry, without Redis or any I/O.
//!
//! - `machine/`: the state machine ([`Txn::create`] of a 2-branch 2PC transfer and of a 3-step
//!   saga; a whole life through [`Txn::step`]: 2PC create, two `yes` votes, two `committed`
//!   acks; saga create and each step's action `done`). Figures are per transaction.
//! - `codec/`: every hot message's encode ([`Message::fields`], the `XADD` fields) and decode
//!   ([`Message::from_entry`], from an `XREADGROUP` field map): `prepare` (one `incrby` op as
//!   its key-value payload), `vote`, `commit`, `ack`, `execute`, `result`, `submit` (the
//!   2-branch transfer). Figures are per message.
//! - `record/`: the transaction record's [`create_fields`] and [`progress_fields`] (what every
//!   change writes) and [`txn_from_hash`] (what a new partition owner reloads), for a 2PC
//!   transfer after its first vote and a saga after its first step.
//! - `spec/`: [`TxnSpec::from_json`] of the README's transfer, and [`kv::encode_ops`] /
//!   [`kv::decode_ops`] of one `incrby` op.
//!
//! Run: `cargo bench -p redtx-common --bench hot` (a filter narrows it, e.g. `-- codec/`;
//! `-- --quick` for a fast, rougher pass).
//!
//! Compare figures only as ratios: between benchmarks of one run, or against a baseline saved
//! on the same machine (`-- --save-baseline before`, change the code, `-- --baseline before`).
//! Never quote or compare bare times across machines or runs: they say more about the machine
//! and its load than about the code.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use redtx_common::kv::{self, IncrbyOp, Op};
use redtx_common::machine::{Event, Output, Timing, Txn};
use redtx_common::protocol::{
    Ack, Execute, Message, Outcome, Prepare, Resolve, StepKind, StepResult, StepStatus, Submit, Vote,
};
use redtx_common::record::{create_fields, progress_fields, txn_from_hash, TxnState};
use redtx_common::spec::{Branch, TxnSpec};
use std::collections::HashMap;
use std::hint::black_box;

/// The README's transfer, as a producer writes it.
const TRANSFER_JSON: &[u8] = br#"{"id": "transfer-42", "mode": "2pc", "timeout": "5s",
 "branches": [
   {"participant": "bank-a", "ops": [{"op": "incrby", "key": "acct:alice", "by": -10, "min": 0}]},
   {"participant": "bank-b", "ops": [{"op": "incrby", "key": "acct:bob", "by": 10}]}]}"#;

/// A realistic clock: now, and the coordinator's default re-send pause (1 s).
const NOW_MS: u64 = 1_750_000_000_000;
const RESEND_EVERY_MS: u64 = 1_000;

/// The clock `dt_ms` after [`NOW_MS`]: each event of a life arrives a little later.
fn at(dt_ms: u64) -> Timing {
    Timing { now_ms: NOW_MS + dt_ms, resend_every_ms: RESEND_EVERY_MS }
}

fn debit() -> Op {
    Op::Incrby(IncrbyOp { key: "acct:alice".into(), by: -10, min: Some(0), max: None })
}

/// The 2-branch 2PC transfer (the README's).
fn transfer() -> TxnSpec {
    TxnSpec::from_json(TRANSFER_JSON).expect("the README's transfer is valid")
}

/// A 3-step order saga, as `redtx demo --mode saga` runs: place the order, take stock, take
/// payment, each undone by its compensation.
fn order_saga() -> TxnSpec {
    let spec = TxnSpec::saga(vec![
        Branch::kv_step("orders", vec![Op::set("order:42", "placed")], vec![Op::set("order:42", "cancelled")]),
        Branch::kv_step(
            "stock",
            vec![Op::Incrby(IncrbyOp { key: "stock:widget".into(), by: -1, min: Some(0), max: None })],
            vec![Op::incrby("stock:widget", 1)],
        ),
        Branch::kv_step(
            "payment",
            vec![Op::Incrby(IncrbyOp { key: "balance:alice".into(), by: -25, min: Some(0), max: None })],
            vec![Op::incrby("balance:alice", 25)],
        ),
    ])
    .with_id("order-42");
    spec.validate().expect("the order saga is valid");
    spec
}

/// The events of a committed 2PC life after its create: both votes `yes`, both acks.
fn events_2pc(spec: &TxnSpec) -> Vec<Event> {
    let id = &spec.id;
    let mut ev = Vec::new();
    for (i, b) in spec.branches.iter().enumerate() {
        ev.push(Event::Vote(Vote {
            txn: id.clone(),
            branch: i as u32,
            participant: b.participant.clone(),
            yes: true,
            reason: None,
        }));
    }
    for (i, b) in spec.branches.iter().enumerate() {
        ev.push(Event::Ack(Ack {
            txn: id.clone(),
            branch: i as u32,
            participant: b.participant.clone(),
            outcome: Outcome::Committed,
        }));
    }
    ev
}

/// The events of a completed saga life after its create: each step's action `done`.
fn events_saga(spec: &TxnSpec) -> Vec<Event> {
    spec.branches
        .iter()
        .enumerate()
        .map(|(i, b)| {
            Event::Result(StepResult {
                txn: spec.id.clone(),
                branch: i as u32,
                participant: b.participant.clone(),
                step: StepKind::Action,
                status: StepStatus::Done,
                reason: None,
            })
        })
        .collect()
}

/// A whole life: create, then every event one millisecond after the one before. Returns the
/// transaction and the number of effects produced (so nothing is optimised away).
fn live(spec: TxnSpec, events: Vec<Event>) -> (Txn, usize) {
    let (mut txn, out) = Txn::create(spec, at(0));
    let mut effects = out.effects.len();
    for (k, ev) in events.into_iter().enumerate() {
        let out: Output = txn.step(ev, at(1 + k as u64));
        effects += out.effects.len();
    }
    (txn, effects)
}

fn machine(c: &mut Criterion) {
    let transfer = transfer();
    let saga = order_saga();
    let (ev_2pc, ev_saga) = (events_2pc(&transfer), events_saga(&saga));
    // The lives benchmarked below are the happy ones.
    assert_eq!(live(transfer.clone(), ev_2pc.clone()).0.state(), TxnState::Committed);
    assert_eq!(live(saga.clone(), ev_saga.clone()).0.state(), TxnState::Completed);

    let mut g = c.benchmark_group("machine");
    g.throughput(Throughput::Elements(1));
    // The spec is moved into the transaction (as from a decoded submit): cloned outside the
    // timed part.
    g.bench_function("create/2pc", |b| {
        b.iter_batched(|| transfer.clone(), |s| Txn::create(s, black_box(at(0))), BatchSize::SmallInput)
    });
    g.bench_function("create/saga", |b| {
        b.iter_batched(|| saga.clone(), |s| Txn::create(s, black_box(at(0))), BatchSize::SmallInput)
    });
    g.bench_function("life/2pc", |b| {
        b.iter_batched(|| (transfer.clone(), ev_2pc.clone()), |(s, e)| live(s, e), BatchSize::SmallInput)
    });
    g.bench_function("life/saga", |b| {
        b.iter_batched(|| (saga.clone(), ev_saga.clone()), |(s, e)| live(s, e), BatchSize::SmallInput)
    });
    g.finish();
}

/// One of each hot message, as the transfer and the order saga send them.
fn messages() -> Vec<Message> {
    let transfer = transfer();
    let deadline_ms = NOW_MS + transfer.timeout_ms;
    let stock = order_saga().branches[1].payload.clone();
    let txn = || "transfer-42".to_string();
    vec![
        Message::Prepare(Prepare {
            txn: txn(),
            branch: 0,
            participant: "bank-a".into(),
            deadline_ms,
            payload: kv::encode_ops(&[debit()]),
        }),
        Message::Vote(Vote { txn: txn(), branch: 0, participant: "bank-a".into(), yes: true, reason: None }),
        Message::Commit(Resolve { txn: txn(), branch: 0, participant: "bank-a".into() }),
        Message::Ack(Ack { txn: txn(), branch: 0, participant: "bank-a".into(), outcome: Outcome::Committed }),
        Message::Execute(Execute {
            txn: "order-42".into(),
            branch: 1,
            participant: "stock".into(),
            attempt: 1,
            payload: stock,
        }),
        Message::Result(StepResult {
            txn: "order-42".into(),
            branch: 1,
            participant: "stock".into(),
            step: StepKind::Action,
            status: StepStatus::Done,
            reason: None,
        }),
        Message::Submit(Submit { spec: transfer, submitted_ms: NOW_MS }),
    ]
}

/// A stream entry's field map as `XREADGROUP` returns it.
fn entry(m: &Message) -> HashMap<String, redis::Value> {
    m.fields().into_iter().map(|(k, v)| (k.to_string(), redis::Value::BulkString(v))).collect()
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    for m in messages() {
        let map = entry(&m);
        assert_eq!(Message::from_entry(&map).as_ref(), Ok(&m), "{} round-trips", m.kind());
        g.bench_with_input(BenchmarkId::new("encode", m.kind()), &m, |b, m| b.iter(|| black_box(m).fields()));
        g.bench_with_input(BenchmarkId::new("decode", m.kind()), &map, |b, map| {
            b.iter(|| Message::from_entry(black_box(map)))
        });
    }
    g.finish();
}

/// The record's hash (`HGETALL`) of `txn` as written at its creation and after its progress.
fn hash_of(txn: &Txn) -> HashMap<String, Vec<u8>> {
    create_fields(txn).into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn record(c: &mut Criterion) {
    // Each transaction one event into its life, where records are written most: a 2PC transfer
    // with one vote in, a saga with its first step done.
    let transfer = transfer();
    let saga = order_saga();
    let mut ev_2pc = events_2pc(&transfer);
    let mut ev_saga = events_saga(&saga);
    ev_2pc.truncate(1);
    ev_saga.truncate(1);
    let cases = [("2pc", live(transfer, ev_2pc).0), ("saga", live(saga, ev_saga).0)];

    let mut g = c.benchmark_group("record");
    g.throughput(Throughput::Elements(1));
    for (name, txn) in &cases {
        let hash = hash_of(txn);
        assert_eq!(txn_from_hash(txn.id(), &hash).as_ref(), Ok(&Some(txn.clone())), "{name} reloads");
        g.bench_with_input(BenchmarkId::new("create_fields", name), txn, |b, t| b.iter(|| create_fields(black_box(t))));
        g.bench_with_input(BenchmarkId::new("progress_fields", name), txn, |b, t| {
            b.iter(|| progress_fields(black_box(t)))
        });
        g.bench_with_input(BenchmarkId::new("txn_from_hash", name), &hash, |b, h| {
            b.iter(|| txn_from_hash(black_box(txn.id()), black_box(h)))
        });
    }
    g.finish();
}

fn spec(c: &mut Criterion) {
    let ops = vec![debit()];
    let payload = kv::encode_ops(&ops);
    assert_eq!(kv::decode_ops(&payload, "ops"), Ok(ops.clone()));

    let mut g = c.benchmark_group("spec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("from_json/transfer", |b| b.iter(|| TxnSpec::from_json(black_box(TRANSFER_JSON))));
    g.bench_function("encode_ops/1", |b| b.iter(|| kv::encode_ops(black_box(&ops))));
    g.bench_function("decode_ops/1", |b| b.iter(|| kv::decode_ops(black_box(&payload), "ops")));
    g.finish();
}

criterion_group!(hot, machine, codec, record, spec);
criterion_main!(hot);
