//! Crashes at every protocol step, with real `kill -9`: a worker frozen at a fail point is killed
//! and a fresh one (without the fail point) finishes the transaction exactly once. A participant
//! that never answers makes the transaction abort at its deadline, naming it. The Redis holding
//! the streams restarts under load (AOF) and every transaction still ends, money conserved.

use rand::Rng;
use redtx_common::record::TxnState;
use redtx_common::Client;
use redtx_tests::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn reached(fp: &str) -> String {
    format!("failpoint {fp} reached")
}

/// Bank with `fp` armed where `opts` says, alice=100 at A, bob=0 at B, and a 20 s transfer of 10
/// from alice to bob submitted.
fn start_transfer(opts: BankOptions) -> (Bank, String) {
    let bank = Bank::start_with(opts);
    bank.seed(Side::A, "acct:alice", 100);
    bank.seed(Side::B, "acct:bob", 0);
    let spec = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10).with_timeout(Duration::from_secs(20));
    let id = bank.submit(&spec);
    (bank, id)
}

fn assert_moved_once(bank: &Bank) {
    assert_eq!(bank.balance(Side::A, "acct:alice"), 90, "alice");
    assert_eq!(bank.balance(Side::B, "acct:bob"), 10, "bob");
}

/// The transfer ends committed, the money moved exactly once, and nothing is left locked.
fn assert_committed_once(bank: &Bank, id: &str) {
    let rec = bank.wait(id);
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert_moved_once(bank);
    bank.assert_clean();
}

#[test]
fn participant_killed_after_prepare_commits_once_after_restart() {
    let fp = "participant-after-prepare";
    let (mut bank, id) = start_transfer(BankOptions { b_failpoint: Some(fp.into()), ..Default::default() });
    bank.bank_b[0].wait_for_line(&reached(fp), LONG);
    // The prepare is applied (lock taken) but the vote was never sent.
    assert_eq!(bank.barrier_state(Side::B, &id).as_deref(), Some("prepared"), "{}", bank.dump(&id));
    assert_eq!(bank.state(&id).as_deref(), Some("preparing"));
    bank.bank_b[0].kill9();

    bank.start_participant(Side::B, None);
    assert_committed_once(&bank, &id);
}

#[test]
fn participant_killed_after_commit_acks_after_restart_and_money_moves_once() {
    let fp = "participant-after-commit";
    let (mut bank, id) = start_transfer(BankOptions { b_failpoint: Some(fp.into()), ..Default::default() });
    bank.bank_b[0].wait_for_line(&reached(fp), LONG);
    // The commit is applied at bank-b, its ack was never sent.
    assert_eq!(bank.balance(Side::B, "acct:bob"), 10);
    assert_eq!(bank.state(&id).as_deref(), Some("committing"));
    bank.bank_b[0].kill9();

    bank.start_participant(Side::B, None);
    assert_committed_once(&bank, &id);
}

#[test]
fn coordinator_killed_after_decision_is_finished_by_a_new_one() {
    let fp = "coordinator-after-decision";
    let (mut bank, id) = start_transfer(BankOptions { coord_failpoint: Some(fp.into()), ..Default::default() });
    bank.coordinators[0].wait_for_line(&reached(fp), LONG);
    // Decision written ahead, no commit sent: nothing applied yet, both branches still prepared.
    assert_eq!(bank.state(&id).as_deref(), Some("committing"), "{}", bank.dump(&id));
    assert_eq!(bank.balance(Side::A, "acct:alice"), 100);
    assert_eq!(bank.balance(Side::B, "acct:bob"), 0);
    assert_eq!(bank.barrier_state(Side::A, &id).as_deref(), Some("prepared"));
    assert_eq!(bank.barrier_state(Side::B, &id).as_deref(), Some("prepared"));
    bank.coordinators[0].kill9();

    bank.start_coordinator(None);
    assert_committed_once(&bank, &id);
}

#[test]
fn coordinator_killed_after_create_is_finished_by_a_new_one() {
    let fp = "coordinator-after-create";
    let (mut bank, id) = start_transfer(BankOptions { coord_failpoint: Some(fp.into()), ..Default::default() });
    bank.coordinators[0].wait_for_line(&reached(fp), LONG);
    assert_eq!(bank.state(&id).as_deref(), Some("preparing"), "{}", bank.dump(&id));
    bank.coordinators[0].kill9();

    // The submit is still pending in the dead coordinator's name: the new one takes it over and
    // sends the prepares, well within the 20 s timeout, so the transfer commits.
    bank.start_coordinator(None);
    assert_committed_once(&bank, &id);
}

#[test]
fn a_participant_that_never_comes_back_makes_the_txn_abort_at_its_deadline() {
    let fp = "participant-after-prepare";
    let mut bank = Bank::start_with(BankOptions { b_failpoint: Some(fp.into()), ..Default::default() });
    bank.seed(Side::A, "acct:alice", 100);
    let spec = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10).with_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let id = bank.submit(&spec);
    bank.bank_b[0].wait_for_line(&reached(fp), LONG);
    bank.bank_b[0].kill9();

    // Deadline passes: abort decided, the reason names the silent participant; bank-a (alive)
    // applies the abort and releases its lock. bank-b cannot ack, so the record stays `aborting`.
    let rec = bank.wait_state(&id, &[TxnState::Aborting, TxnState::Aborted], LONG);
    assert!(started.elapsed() >= Duration::from_millis(1900), "aborted before its deadline: {:?}", started.elapsed());
    let reason = rec.reason.clone().unwrap_or_default();
    assert!(reason.contains("bank-b"), "reason should name bank-b: {rec:?}");
    assert_eq!(rec.branches[1].vote, None, "{rec:?}");
    poll("bank-a applies the abort", LONG, || {
        (bank.barrier_state(Side::A, &id).as_deref() == Some("aborted")).then_some(())
    });
    let lock: Option<String> =
        redis::cmd("GET").arg("rtx:lock:acct:alice").query(&mut bank.data_conn(Side::A)).unwrap();
    assert_eq!(lock, None, "bank-a still locks acct:alice");
    assert_eq!(bank.balance(Side::A, "acct:alice"), 100);
    assert_eq!(bank.balance(Side::B, "acct:bob"), 0);
    // Re-sends keep going out, but nothing is decided twice.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(bank.record(&id).unwrap().state, TxnState::Aborting);

    // If it does come back after all, it applies the abort and everything is released.
    bank.start_participant(Side::B, None);
    let rec = bank.wait(&id);
    assert_eq!(rec.state, TxnState::Aborted, "{rec:?}");
    assert_eq!(bank.balance(Side::B, "acct:bob"), 0);
    bank.assert_clean();
}

#[test]
fn stream_redis_restart_under_load_loses_nothing() {
    const ACCOUNTS: usize = 5;
    const TXNS: usize = 120;
    const PRODUCERS: usize = 4;
    let mut bank = Bank::start();
    let accounts: Vec<(Side, String)> =
        [Side::A, Side::B].iter().flat_map(|s| (0..ACCOUNTS).map(move |i| (*s, format!("acct:{i}")))).collect();
    for (s, k) in &accounts {
        bank.seed(*s, k, 100);
    }
    let total = bank.total();
    let url = bank.url();

    // Producers submit with explicit ids and retry a failed submit with the same id (a retry can
    // never create a second transaction); they do not wait for outcomes.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let accounts = accounts.clone();
        let url = url.clone();
        let stop = stop.clone();
        tasks.push(bank.rt.spawn(async move {
            let mut specs = Vec::new();
            for n in 0..TXNS / PRODUCERS {
                let (from, to) = random_pair(accounts.len());
                let amount = rand::rng().random_range(1..=40);
                let (fa, ta) = (&accounts[from], &accounts[to]);
                let spec = transfer((fa.0, &fa.1), (ta.0, &ta.1), amount)
                    .with_id(format!("p{p}-{n}"))
                    .with_timeout(Duration::from_secs(10));
                let started = Instant::now();
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return specs;
                    }
                    // A fresh client each try: a connection broken by the restart is not reused.
                    let r = match Client::connect(&url).await {
                        Ok(c) => c.submit(&spec).await,
                        Err(e) => Err(e),
                    };
                    match r {
                        Ok(_) => break,
                        Err(e) if started.elapsed() < Duration::from_secs(30) => {
                            tracing::debug!(error = %e, "submit failed; retrying");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("submit {} kept failing: {e}", spec.id),
                    }
                }
                specs.push((spec.id.clone(), from, to, amount));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            specs
        }));
    }
    // Restart the stream Redis (also bank-a's data Redis) once a part of the load is in.
    let mut s = bank.stream_conn();
    poll("a quarter of the transactions created", LONG, || (scan(&mut s, "rtx:txn:*").len() >= TXNS / 4).then_some(()));
    bank.a.restart().expect("restart redis A");
    let submitted: Vec<(String, usize, usize, i64)> =
        tasks.into_iter().flat_map(|t| bank.rt.block_on(t).expect("producer task")).collect();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(submitted.len(), TXNS);

    // Every transaction ends; money is conserved and each account holds exactly what the
    // committed transfers say.
    let mut s = bank.stream_conn();
    let mut states: BTreeMap<String, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (id, ..) in &submitted {
        let st = loop {
            let st: Option<String> = redis::cmd("HGET").arg(keys::txn_record(id)).arg("state").query(&mut s).unwrap();
            if matches!(st.as_deref(), Some("committed" | "aborted")) {
                break st.unwrap();
            }
            if Instant::now() > deadline {
                let workers: Vec<String> = bank
                    .coordinators
                    .iter()
                    .chain(&bank.bank_a)
                    .chain(&bank.bank_b)
                    .map(|p| {
                        format!("{}:\n{}", p.label, p.output().lines().rev().take(15).collect::<Vec<_>>().join("\n"))
                    })
                    .collect();
                panic!(
                    "{id} is not terminal ({st:?}) 60s after a Redis restart\n{}\n{}",
                    bank.dump(id),
                    workers.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        states.insert(id.clone(), st);
    }
    let mut expected: BTreeMap<(Side, String), i64> = accounts.iter().map(|a| (a.clone(), 100)).collect();
    for (id, from, to, amount) in &submitted {
        if states[id] == "committed" {
            *expected.get_mut(&accounts[*from]).unwrap() -= amount;
            *expected.get_mut(&accounts[*to]).unwrap() += amount;
        }
    }
    let committed = states.values().filter(|s| *s == "committed").count();
    assert!(committed > 0, "nothing committed");
    assert_eq!(bank.total(), total, "money not conserved");
    assert_eq!(bank.balances(), expected, "balances differ from the committed transfers");
    bank.wait_clean();
    for p in bank.coordinators.iter_mut().chain(bank.bank_a.iter_mut()).chain(bank.bank_b.iter_mut()) {
        assert!(p.is_running(), "{} died during the Redis restart:\n{}", p.label, p.output());
    }
}

#[test]
fn a_producer_client_keeps_working_across_a_redis_restart() {
    // The library's Client (one multiplexed connection and one outcome reader) is created before
    // the stream Redis restarts and used after it.
    //
    // BUG (common/src/client.rs, fails at the time of writing): `Client` keeps the
    // `MultiplexedConnection` it opened in `connect` for ever (`submit`/`status` clone it, the
    // outcome reader in `read_outcomes` retries on the same connection). After the server
    // restarts, every call fails with "broken pipe" and never recovers, so a long-lived producer
    // (and `wait`, whose 1 s re-check uses `status`) is dead until the process restarts. The
    // workers survive the same restart (the consumer runtime reconnects); the Client should too
    // (reconnect on an I/O error, e.g. `redis::aio::ConnectionManager` or a reconnect-and-retry
    // like `Consumer::reconnect`).
    let mut bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 1));
    assert_eq!(rec.state, TxnState::Committed);
    bank.a.restart().expect("restart redis A");
    let client = bank.client().clone();
    let spec = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 2);
    let started = Instant::now();
    let rec = bank.rt.block_on(async {
        // The first command may meet the dead connection; a retry must then succeed.
        let mut last = None;
        for _ in 0..50 {
            match client.submit_and_wait(&spec, LONG).await {
                Ok(r) => return r,
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the client never recovered after the restart: {last:?}");
    });
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert_eq!(bank.balance(Side::A, "acct:alice"), 97);
    assert_eq!(bank.balance(Side::B, "acct:bob"), 3);
}
