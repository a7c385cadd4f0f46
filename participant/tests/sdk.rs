//! The participant SDK's in-memory store ([`Local`]) on a real Redis: the conformance suite,
//! two instances on one image, a refusal or a panic that changes nothing, a payload that does
//! not decode, and a restart that finds the saved image.

mod support;

use redtx_common::conn::RedisUrl;
use redtx_common::protocol::{Execute, Prepare};
use redtx_participant::conformance::{self, Fixture};
use redtx_participant::sdk::{saved_state, Ctx, Local, Service};
use redtx_participant::worker::settle;
use redtx_participant::{Answer, Request};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use support::*;

/// Counters; a delta that would take one below zero is refused.
#[derive(Clone, Default, Serialize, Deserialize)]
struct Counters {
    items: BTreeMap<String, i64>,
}

#[derive(Serialize, Deserialize)]
struct Delta {
    item: String,
    delta: i64,
}

impl Counters {
    fn check(&self, d: &Delta) -> Result<i64, String> {
        let now = self.items.get(&d.item).copied().unwrap_or(0) + d.delta;
        if now < 0 {
            return Err(format!("{} would be {now}", d.item));
        }
        Ok(now)
    }

    fn add(&mut self, d: Delta) -> Result<(), String> {
        let now = self.check(&d)?;
        self.items.insert(d.item, now);
        Ok(())
    }
}

impl Service for Counters {
    type Payload = Delta;
    fn prepare(&mut self, _: &Ctx<'_>, d: Delta) -> Result<(), String> {
        if d.item == "panic" {
            panic!("asked to panic");
        }
        self.check(&d).map(drop)
    }
    fn commit(&mut self, _: &Ctx<'_>, d: Delta) {
        self.add(d).expect("checked at prepare");
    }
    fn execute(&mut self, _: &Ctx<'_>, d: Delta) -> Result<(), String> {
        // Changes first, then refuses: the runtime must roll the change back.
        let n = self.items.entry(d.item.clone()).or_default();
        *n += d.delta;
        if *n < 0 {
            return Err(format!("{} would be {n}", d.item));
        }
        Ok(())
    }
    fn compensate(&mut self, _: &Ctx<'_>, d: Delta) -> Result<(), String> {
        self.add(d)
    }
}

fn payload(item: &str, delta: i64) -> Vec<u8> {
    rmp_serde::to_vec_named(&Delta { item: item.into(), delta }).unwrap()
}

struct CounterFixture {
    conn: redis::aio::MultiplexedConnection,
}

impl Fixture for CounterFixture {
    fn participant(&self) -> &str {
        NAME
    }
    fn add(&self, item: &str) -> Vec<u8> {
        payload(item, 1)
    }
    fn remove(&self, item: &str) -> Vec<u8> {
        payload(item, -1)
    }
    fn refused(&self) -> Vec<u8> {
        payload("empty", -1)
    }
    async fn count(&mut self, item: &str) -> redtx_common::Result<i64> {
        let state: Option<Counters> = saved_state(&mut self.conn, NAME).await?;
        Ok(state.and_then(|s| s.items.get(item).copied()).unwrap_or(0))
    }
}

fn local(s: &redtx_common::server::RedisServer) -> Local<Counters> {
    Local::new(RedisUrl::parse(&s.url()).unwrap(), NAME, Counters::default(), RETENTION)
}

#[tokio::test]
async fn sdk_store_passes_the_conformance_suite() {
    let s = server();
    let mut fixture = CounterFixture { conn: conn(&s).await };
    let mut a = local(&s);
    let n = conformance::run(&mut a, &mut fixture).await.unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(n, conformance::RULES.len());
    // A second instance on the same image, then the first again (its copy is stale now: the
    // compare-and-set makes it reload).
    let mut b = local(&s);
    conformance::run(&mut b, &mut fixture).await.unwrap_or_else(|f| panic!("{f}"));
    conformance::run(&mut a, &mut fixture).await.unwrap_or_else(|f| panic!("{f}"));
    let state: Counters = saved_state(&mut fixture.conn, NAME).await.unwrap().unwrap();
    assert!(state.items.values().all(|&n| n >= 0), "a refused action's change was rolled back: {:?}", state.items);
}

fn execute(txn: &str, p: Vec<u8>) -> Request {
    Request::Execute(Execute { txn: txn.into(), branch: 0, participant: NAME.into(), attempt: 1, payload: p })
}

#[tokio::test]
async fn concurrent_instances_apply_every_step_once() {
    let s = server();
    // Two instances take turns on interleaved batches of steps; each step adds 1.
    let mut a = local(&s);
    let mut b = local(&s);
    let mut expected = 0;
    for round in 0..20 {
        let batch: Vec<Request> = (0..5).map(|i| execute(&format!("t{round}-{i}"), payload("n", 1))).collect();
        let (first, second) = if round % 2 == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
        settle(first, &batch, redtx_common::now_ms()).await.unwrap();
        // The same batch again on the other instance: repeats, answered done, applied once.
        let again = settle(second, &batch, redtx_common::now_ms()).await.unwrap();
        assert!(again.iter().all(|a| matches!(a, Ok(Answer::Step { .. }))));
        expected += 5;
    }
    let state: Counters = saved_state(&mut conn(&s).await, NAME).await.unwrap().unwrap();
    assert_eq!(state.items["n"], expected);
}

#[tokio::test]
async fn a_panic_or_a_bad_payload_changes_nothing() {
    let s = server();
    let mut a = local(&s);
    let prep = |txn: &str, p: Vec<u8>| {
        Request::Prepare(Prepare {
            txn: txn.into(),
            branch: 0,
            participant: NAME.into(),
            deadline_ms: redtx_common::now_ms() + 30_000,
            payload: p,
        })
    };
    let out = settle(&mut a, &[prep("p1", payload("panic", 1))], redtx_common::now_ms()).await.unwrap();
    let err = out[0].clone().unwrap_err();
    assert!(err.contains("panicked: asked to panic"), "{err}");
    // Nothing saved (not even a barrier): the prepare comes back later and runs again.
    assert!(saved_state::<Counters>(&mut conn(&s).await, NAME).await.unwrap().is_none());

    let out = settle(&mut a, &[prep("p2", b"\x01not a map".to_vec())], redtx_common::now_ms()).await.unwrap();
    match &out[0] {
        Ok(Answer::Vote { yes: false, reason: Some(r) }) => {
            assert!(r.starts_with("bank-a: the payload is not a valid Delta"), "{r}")
        }
        other => panic!("expected a no vote, got {other:?}"),
    }
}

#[tokio::test]
async fn a_restarted_service_finds_its_image() {
    let s = server();
    let mut a = local(&s);
    settle(&mut a, &[execute("r1", payload("n", 7))], redtx_common::now_ms()).await.unwrap();
    drop(a);
    // A new process: the saved image wins over the initial state, and the barrier is there.
    let mut seeded = Counters::default();
    seeded.items.insert("n".into(), 1000);
    let mut b = Local::new(RedisUrl::parse(&s.url()).unwrap(), NAME, seeded, RETENTION);
    let out = settle(&mut b, &[execute("r1", payload("n", 7))], redtx_common::now_ms()).await.unwrap();
    assert!(matches!(out[0], Ok(Answer::Step { .. })));
    assert_eq!(b.state().unwrap().items["n"], 7);
}

#[tokio::test]
async fn a_redis_restart_between_batches_loses_nothing() {
    let mut s = server();
    let mut a = local(&s);
    settle(&mut a, &[execute("x1", payload("n", 2))], redtx_common::now_ms()).await.unwrap();
    s.restart().unwrap();
    // The first batch on the dead connection fails as a whole (nothing known, all pending);
    // the next one reconnects, reloads the saved image and applies the step once.
    let batch = [execute("x2", payload("n", 3))];
    let mut tries = 0;
    let out = loop {
        tries += 1;
        match settle(&mut a, &batch, redtx_common::now_ms()).await {
            Ok(out) => break out,
            Err(e) if tries < 5 => tracing::debug!(error = %e, "retrying"),
            Err(e) => panic!("still failing after a restart: {e}"),
        }
    };
    assert!(matches!(out[0], Ok(Answer::Step { .. })), "{out:?}");
    let state: Counters = saved_state(&mut conn(&s).await, NAME).await.unwrap().unwrap();
    assert_eq!(state.items["n"], 5);
    // A repeat of the first step is still recognised.
    settle(&mut a, &[execute("x1", payload("n", 2))], redtx_common::now_ms()).await.unwrap();
    let state: Counters = saved_state(&mut conn(&s).await, NAME).await.unwrap().unwrap();
    assert_eq!(state.items["n"], 5);
}
