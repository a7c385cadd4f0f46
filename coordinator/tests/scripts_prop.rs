//! Property test of the record scripts on a real Redis: random sequences of votes (including
//! duplicates and changed minds), acks (matching or not) and deadline scans, in any order, never
//! break the 2PC invariants.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use redis::AsyncCommands;
use redtx_common::protocol::{Ack, Outcome, Vote};
use redtx_common::record::{TxnRecord, TxnState};
use redtx_common::server::RedisServer;
use redtx_common::spec::{Branch, Op, TxnSpec};
use redtx_common::{conn::RedisUrl, keys};
use redtx_coordinator::machine::{Acked, Voted};
use redtx_coordinator::scripts;
use std::collections::HashMap;

#[derive(Debug, Clone)]
enum Event {
    Vote {
        branch: u32,
        yes: bool,
    },
    Ack {
        branch: u32,
        committed: bool,
    },
    /// A deadline scan, before (`false`) or after (`true`) the vote deadline.
    Expire {
        late: bool,
    },
}

fn event(n: u32) -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => (0..n, proptest::bool::weighted(0.8)).prop_map(|(branch, yes)| Event::Vote { branch, yes }),
        3 => (0..n, proptest::bool::weighted(0.6)).prop_map(|(branch, committed)| Event::Ack { branch, committed }),
        1 => any::<bool>().prop_map(|late| Event::Expire { late }),
    ]
}

fn case() -> impl Strategy<Value = (u32, Vec<Event>)> {
    (1u32..=3).prop_flat_map(|n| (Just(n), proptest::collection::vec(event(n), 0..24)))
}

const CREATED: u64 = 1_000_000;
const TIMEOUT: u64 = 100;

#[test]
fn random_event_sequences_keep_the_invariants() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let server = RedisServer::start().unwrap();
    let url = RedisUrl::parse(&server.url()).unwrap();
    let conn = rt.block_on(url.connect()).unwrap();
    let mut runner = TestRunner::new(Config { cases: 200, ..Config::default() });
    let seq = std::cell::Cell::new(0u64);
    runner
        .run(&case(), |(n, events)| {
            seq.set(seq.get() + 1);
            let id = format!("p{}", seq.get());
            rt.block_on(check(&url, conn.clone(), &id, n, &events))
        })
        .unwrap();
}

fn participant(i: u32) -> String {
    format!("p{i}")
}

async fn record(conn: &mut redis::aio::MultiplexedConnection, id: &str) -> TxnRecord {
    let h: HashMap<String, Vec<u8>> = conn.hgetall(keys::txn_record(id)).await.unwrap();
    TxnRecord::from_hash(id, &h).unwrap().expect("record exists")
}

async fn check(
    url: &RedisUrl,
    mut conn: redis::aio::MultiplexedConnection,
    id: &str,
    n: u32,
    events: &[Event],
) -> Result<(), TestCaseError> {
    let spec = TxnSpec::new(
        (0..n).map(|i| Branch { participant: participant(i), ops: vec![Op::incrby(format!("k{i}"), 1)] }).collect(),
    )
    .with_id(id)
    .with_timeout(std::time::Duration::from_millis(TIMEOUT));
    let created = scripts::parse_created(&scripts::create(&spec, CREATED).run(&mut conn, url).await.unwrap()).unwrap();
    prop_assert!(created.created);
    let again =
        scripts::parse_created(&scripts::create(&spec, CREATED + 5).run(&mut conn, url).await.unwrap()).unwrap();
    prop_assert!(!again.created);
    prop_assert_eq!(again.stored_spec.as_ref(), Some(&spec));

    let mut prev = record(&mut conn, id).await;
    let mut first_votes: Vec<Option<bool>> = vec![None; n as usize];
    for (k, e) in events.iter().enumerate() {
        let now = CREATED + 10 + k as u64;
        match *e {
            Event::Vote { branch, yes } => {
                let v = Vote { txn: id.into(), branch, participant: participant(branch), yes, reason: None };
                let r = scripts::parse_voted(&scripts::vote(&v, now).run(&mut conn, url).await.unwrap()).unwrap();
                let counted = matches!(r, Voted::Counted { .. });
                prop_assert!(counted, "{:?}", r);
                if prev.state == TxnState::Preparing && first_votes[branch as usize].is_none() {
                    first_votes[branch as usize] = Some(yes);
                }
            }
            Event::Ack { branch, committed } => {
                let outcome = if committed { Outcome::Committed } else { Outcome::Aborted };
                let a = Ack { txn: id.into(), branch, participant: participant(branch), outcome };
                let r =
                    scripts::parse_acked(&scripts::ack(&a, now, 60_000).run(&mut conn, url).await.unwrap()).unwrap();
                let matches_decision = match prev.state {
                    TxnState::Committing | TxnState::Committed => committed,
                    TxnState::Aborting | TxnState::Aborted => !committed,
                    TxnState::Preparing => false,
                };
                prop_assert_eq!(matches!(r, Acked::Counted { .. }), matches_decision, "{:?} in {}", r, prev.state);
            }
            Event::Expire { late } => {
                let at = if late { CREATED + TIMEOUT + 1000 + k as u64 } else { now };
                scripts::parse_expired(&scripts::expire(id, at).run(&mut conn, url).await.unwrap()).unwrap();
            }
        }
        let rec = record(&mut conn, id).await;
        // Only legal moves; a decision never changes.
        prop_assert!(rec.state == prev.state || prev.state.can_move_to(rec.state), "{} -> {}", prev.state, rec.state);
        if prev.decided_ms.is_some() {
            prop_assert_eq!(rec.decided_ms, prev.decided_ms);
            prop_assert_eq!(&rec.reason, &prev.reason);
        }
        // First vote wins, and only votes seen while preparing count.
        let votes: Vec<Option<bool>> = rec.branches.iter().map(|b| b.vote).collect();
        prop_assert_eq!(&votes, &first_votes);
        // Never committing without n yes votes; aborting only after a no or the deadline.
        if matches!(rec.state, TxnState::Committing | TxnState::Committed) {
            prop_assert!(votes.iter().all(|v| *v == Some(true)));
        }
        if matches!(rec.state, TxnState::Aborting | TxnState::Aborted) {
            let reason = rec.reason.clone().unwrap_or_default();
            prop_assert!(votes.contains(&Some(false)) || reason.starts_with("timeout: "), "{}", reason);
        }
        if rec.state == TxnState::Preparing {
            prop_assert!(rec.decided_ms.is_none() && !votes.contains(&Some(false)));
            prop_assert!(rec.branches.iter().all(|b| b.ack.is_none()));
        }
        // Acks only match the decision; terminal exactly when all n acked.
        let expected_ack = match rec.state {
            TxnState::Committing | TxnState::Committed => Some("committed"),
            TxnState::Aborting | TxnState::Aborted => Some("aborted"),
            TxnState::Preparing => None,
        };
        prop_assert!(rec.branches.iter().all(|b| b.ack.is_none() || b.ack.as_deref() == expected_ack));
        let all_acked = rec.branches.iter().all(|b| b.ack.is_some());
        prop_assert_eq!(rec.state.is_terminal(), all_acked && rec.state != TxnState::Preparing);
        if rec.state.is_terminal() {
            prop_assert!(rec.finished_ms.is_some());
            let ttl: i64 = conn.pttl(keys::txn_record(id)).await.unwrap();
            prop_assert!(ttl > 0 && ttl <= 60_000, "ttl {}", ttl);
        }
        prev = rec;
    }
    Ok(())
}
