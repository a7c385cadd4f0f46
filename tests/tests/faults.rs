//! Crashes at every protocol step, with real `kill -9`: a worker frozen at a fail point is killed
//! and a fresh one (without the fail point) finishes the transaction exactly once. A participant
//! that never answers makes the transaction abort at its deadline, naming it. The Redis holding
//! the streams restarts under load (AOF) and every transaction still ends, money conserved; a
//! producer (the library, and `redtx submit --wait`) rides out that restart too. A coordinator
//! whose partitions' keys Redis lost says so.

use rand::Rng;
use redtx_common::machine::Phase;
use redtx_common::record::TxnState;
use redtx_tests::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn reached(fp: &str) -> String {
    format!("failpoint {fp} reached")
}

/// Bank with fail points armed as `opts` says, alice=100 at A, bob=0 at B, and a 20 s transfer of
/// 10 from alice to bob submitted.
fn start_transfer(opts: ClusterOptions) -> (Bank, String) {
    let bank = Bank::start_with(opts);
    bank.seed(Side::A, "acct:alice", 100);
    bank.seed(Side::B, "acct:bob", 0);
    let spec = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10).with_timeout(Duration::from_secs(20));
    let id = bank.submit(&spec);
    (bank, id)
}

/// The transfer ends committed, the money moved exactly once, and nothing is left locked.
fn assert_committed_once(bank: &Bank, id: &str) {
    let rec = bank.wait(id);
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert!(rec.branches.iter().all(|b| b.phase == Phase::Committed), "{rec:?}");
    assert_eq!(bank.balance(Side::A, "acct:alice"), 90, "alice");
    assert_eq!(bank.balance(Side::B, "acct:bob"), 10, "bob");
    bank.assert_clean();
}

#[test]
fn participant_killed_after_prepare_commits_once_after_restart() {
    let fp = "participant-after-prepare";
    let (mut bank, id) = start_transfer(ClusterOptions::default().failpoint("bank-b", fp));
    bank.bank(Side::B)[0].wait_for_line(&reached(fp), LONG);
    // The prepare is applied (lock taken) but the vote was never sent.
    assert_eq!(bank.side_barrier(Side::B, &id).as_deref(), Some("prepared"), "{}", bank.dump(&id));
    assert!(bank.lock("bank-b", "acct:bob").is_some_and(|l| l.contains(&id)), "{}", bank.dump(&id));
    assert_eq!(bank.state(&id).as_deref(), Some("preparing"));
    bank.bank(Side::B)[0].kill9();

    bank.start_participant(Side::B, None);
    assert_committed_once(&bank, &id);
}

#[test]
fn participant_killed_after_commit_acks_after_restart_and_money_moves_once() {
    let fp = "participant-after-commit";
    let (mut bank, id) = start_transfer(ClusterOptions::default().failpoint("bank-b", fp));
    bank.bank(Side::B)[0].wait_for_line(&reached(fp), LONG);
    // The commit is applied at bank-b, its ack was never sent.
    assert_eq!(bank.balance(Side::B, "acct:bob"), 10);
    assert_eq!(bank.side_barrier(Side::B, &id).as_deref(), Some("committed"));
    assert_eq!(bank.state(&id).as_deref(), Some("committing"));
    bank.bank(Side::B)[0].kill9();

    bank.start_participant(Side::B, None);
    assert_committed_once(&bank, &id);
}

#[test]
fn coordinator_killed_after_decision_is_finished_by_a_new_one() {
    let fp = "coordinator-after-decision";
    let (mut bank, id) = start_transfer(ClusterOptions::default().coord_failpoint(fp));
    bank.coordinators[0].wait_for_line(&reached(fp), LONG);
    // Decision written (with the commits, in one fenced write), nothing acked yet. The commits
    // may already be applied: the participants do not wait for the coordinator.
    assert_eq!(bank.state(&id).as_deref(), Some("committing"), "{}", bank.dump(&id));
    bank.coordinators[0].kill9();

    // The new coordinator takes the partition over once the lease lapses and finishes from the
    // record (the acks are pending in its stream).
    bank.start_coordinator(None);
    assert_committed_once(&bank, &id);
}

#[test]
fn a_decision_lost_with_its_coordinator_is_made_deadline_first_by_the_next() {
    // The coordinator has both yes votes in hand and freezes before writing the commit; it is
    // killed, and the transaction's deadline passes before the next one loads the partition.
    // The votes are still pending, but the new owner decides the deadline first: abort. (An
    // owner before may have decided and told that very abort in a write that a failover to a
    // replica lost; replaying the votes first would commit it: docs/scaling.md.)
    let fp = "coordinator-before-decision";
    let mut bank = Bank::start_with(ClusterOptions::default().coord_failpoint(fp));
    bank.seed(Side::A, "acct:alice", 100);
    bank.seed(Side::B, "acct:bob", 0);
    let spec = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10).with_timeout(Duration::from_secs(2));
    let id = bank.submit(&spec);
    bank.coordinators[0].wait_for_line(&reached(fp), LONG);
    assert_eq!(bank.state(&id).as_deref(), Some("preparing"), "{}", bank.dump(&id));
    for side in [Side::A, Side::B] {
        assert_eq!(bank.side_barrier(side, &id).as_deref(), Some("prepared"), "{}", bank.dump(&id));
    }
    bank.coordinators[0].kill9();
    let deadline = bank.record(&id).expect("a record").deadline_ms;
    std::thread::sleep(Duration::from_millis(deadline.saturating_sub(redtx_common::now_ms()) + 100));

    bank.start_coordinator(None);
    let rec = bank.wait(&id);
    assert_eq!(rec.state, TxnState::Aborted, "{rec:?}");
    assert_eq!((bank.balance(Side::A, "acct:alice"), bank.balance(Side::B, "acct:bob")), (100, 0));
    bank.assert_clean();
}

#[test]
fn coordinator_killed_after_create_is_finished_by_a_new_one() {
    let fp = "coordinator-after-create";
    let (mut bank, id) = start_transfer(ClusterOptions::default().coord_failpoint(fp));
    bank.coordinators[0].wait_for_line(&reached(fp), LONG);
    // Nothing of the batch is written: no record, no prepare sent.
    assert_eq!(bank.state(&id), None, "{}", bank.dump(&id));
    assert!(bank.sent_to("bank-a", &id).is_empty());
    bank.coordinators[0].kill9();

    // The submit is still pending in the dead coordinator's name: the new one takes the
    // partition over once the lease lapses, handles the submit again and sends the prepares,
    // well within the 20 s timeout, so the transfer commits.
    bank.start_coordinator(None);
    assert_committed_once(&bank, &id);
}

#[test]
fn a_participant_that_never_comes_back_makes_the_txn_abort_at_its_deadline() {
    let fp = "participant-after-prepare";
    let mut bank = Bank::start_with(ClusterOptions::default().failpoint("bank-b", fp));
    bank.seed(Side::A, "acct:alice", 100);
    let spec = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10).with_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let id = bank.submit(&spec);
    // A producer that waits for the end, not for the decision (`aborting`).
    let final_wait = {
        let (client, id) = (bank.client().clone(), id.clone());
        bank.rt.spawn(async move { client.wait_final(&id, 3 * LONG).await })
    };
    bank.bank(Side::B)[0].wait_for_line(&reached(fp), LONG);
    bank.bank(Side::B)[0].kill9();

    // Deadline passes: abort decided, the reason names the silent participant; bank-a (alive)
    // applies the abort and releases its lock. bank-b cannot ack, so the record stays `aborting`
    // (already the producer's answer).
    let rec = bank.wait_settled(&id);
    assert_eq!(rec.state, TxnState::Aborting, "{rec:?}");
    assert!(started.elapsed() >= Duration::from_millis(1900), "aborted before its deadline: {:?}", started.elapsed());
    let reason = rec.reason.clone().unwrap_or_default();
    assert!(reason.contains("bank-b"), "reason should name bank-b: {rec:?}");
    assert_eq!(rec.branches[1].phase, Phase::Pending, "{rec:?}");
    bank.wait_barrier("bank-a", &id, "aborted");
    assert_eq!(bank.lock("bank-a", "acct:alice"), None, "bank-a still locks acct:alice");
    assert_eq!(bank.balance(Side::A, "acct:alice"), 100);
    assert_eq!(bank.balance(Side::B, "acct:bob"), 0);
    let rec = bank.wait_record(&id, "bank-a's abort acked", LONG, |r| r.branches[0].phase == Phase::Aborted);
    assert_eq!(rec.state, TxnState::Aborting, "{rec:?}");
    // Its `aborting` outcome went by (the plain wait above got it) and so did bank-a's ack: the
    // final wait is still waiting.
    assert!(!final_wait.is_finished(), "wait_final returned before the transaction ended");
    // The same through the CLI (the id submitted again, which is safe): `--wait` answers the
    // decision, `--wait --final` waits for the end and, bank-b still gone, gives up.
    let json = transfer_json(Some(&id), (Side::A, "acct:alice"), (Side::B, "acct:bob"), 10);
    let out = redtx("submit", &bank.url(), &["--wait", "--json", "-"], Some(json.as_bytes()));
    assert_eq!((out.code, out.json()["state"].as_str()), (Some(1), Some("aborting")), "{out:?}");
    let out =
        redtx("submit", &bank.url(), &["--wait", "--final", "--timeout", "2s", "--json", "-"], Some(json.as_bytes()));
    assert_eq!((out.code, out.json()["state"].as_str()), (Some(3), Some("aborting")), "{out:?}");

    // If it does come back after all, it applies the abort (its prepared branch is dropped) and
    // everything is released.
    bank.start_participant(Side::B, None);
    let rec = bank.wait(&id);
    assert_eq!(rec.state, TxnState::Aborted, "{rec:?}");
    assert_eq!(bank.balance(Side::B, "acct:bob"), 0);
    let told = bank.rt.block_on(final_wait).expect("the wait task").expect("wait_final");
    assert_eq!(told.state, TxnState::Aborted, "wait_final: {told:?}");
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
                    let r = match connect_client(&url).await {
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
    bank.a().restart().expect("restart redis A");
    let submitted: Vec<(String, usize, usize, i64)> =
        tasks.into_iter().flat_map(|t| bank.rt.block_on(t).expect("producer task")).collect();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(submitted.len(), TXNS);

    // Every transaction ends; money is conserved and each account holds exactly what the
    // committed transfers say.
    let mut s = bank.stream_conn();
    let mut states: BTreeMap<String, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(45);
    for (id, ..) in &submitted {
        let st = loop {
            let st: Option<String> = redis::cmd("HGET").arg(record_key(id)).arg("state").query(&mut s).unwrap();
            if matches!(st.as_deref(), Some("committed" | "aborted")) {
                break st.unwrap();
            }
            if Instant::now() > deadline {
                panic!("{id} is not terminal ({st:?}) 45s after a Redis restart\n{}\n{}", bank.dump(id), bank.tails());
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
    bank.assert_running(&["coordinator#1", "bank-a#1", "bank-b#1"]);
}

#[test]
fn a_coordinator_says_so_when_redis_loses_its_partitions_keys() {
    // The stream Redis loses everything (here `FLUSHALL`; a restart without persistence, or a
    // slot's keys deleted by the cluster, does the same): the coordinator cannot bring the lost
    // transactions back, but it must not go on as if nothing happened. Its fencing counters
    // start again from 1, below the tokens it held: it says so, then goes on serving.
    let mut bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 1));
    assert_eq!(rec.state, TxnState::Committed);
    let _: () = redis::cmd("FLUSHALL").query(&mut bank.stream_conn()).unwrap();
    bank.coordinators[0].wait_for_line("fencing counter went back", LONG);
    bank.seed(Side::A, "acct:alice", 100);
    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 2));
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
}

#[test]
fn a_producer_client_keeps_working_across_a_redis_restart() {
    // The library's Client (one managed connection and one outcome reader) is created before
    // the stream Redis restarts and used after it.
    let mut bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 1));
    assert_eq!(rec.state, TxnState::Committed);
    bank.a().restart().expect("restart redis A");
    let client = bank.client().clone();
    let spec = transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 2);
    let started = Instant::now();
    let rec = bank.rt.block_on(async {
        // submit_and_wait itself retries a submit that meets the dead connection (same id).
        client.submit_and_wait(&spec, LONG).await.unwrap_or_else(|e| panic!("the client did not recover: {e}"))
    });
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert_eq!(bank.balance(Side::A, "acct:alice"), 97);
    assert_eq!(bank.balance(Side::B, "acct:bob"), 3);
}

#[test]
fn submit_wait_rides_out_a_stream_redis_restart() {
    // `redtx submit --wait --timeout 60s` is waiting when the stream Redis restarts: it must not
    // fail with exit 4 ("error") for a transaction that goes on; it reconnects and reports the
    // outcome (0), or at worst gives up (3).
    let mut bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    // bank-b is frozen, so the transaction is still preparing when Redis restarts.
    bank.bank(Side::B)[0].stop();
    let json = serde_json::json!({
        "id": "t-restart", "mode": "2pc", "timeout": "40s",
        "branches": [
            {"participant": "bank-a", "ops": [{"op": "incrby", "key": "acct:alice", "by": -10, "min": 0}]},
            {"participant": "bank-b", "ops": [{"op": "incrby", "key": "acct:bob", "by": 10}]}]
    })
    .to_string();
    let mut submit =
        spawn_redtx("submit", &bank.url(), &["--wait", "--timeout", "60s", "--json", "-"], json.as_bytes());
    // The submit is in and the coordinator has it: the CLI is waiting now.
    bank.wait_barrier("bank-a", "t-restart", "prepared");
    assert!(submit.is_running(), "redtx submit ended early:\n{}", submit.output());

    bank.a().restart().expect("restart redis A");
    bank.bank(Side::B)[0].cont();

    let rec = bank.wait("t-restart");
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    let status = submit
        .wait_exit(LONG)
        .unwrap_or_else(|| panic!("redtx submit still waits {LONG:?} after the commit:\n{}", submit.output()));
    let code = status.code();
    eprintln!("redtx submit --wait across the restart exited {code:?}");
    assert!(
        matches!(code, Some(0) | Some(3)),
        "redtx submit exited {status} across a Redis restart:\n{}",
        submit.output()
    );
    if code == Some(0) {
        let out = submit.output();
        let json_line = out.lines().find(|l| l.trim_start().starts_with('{')).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(json_line).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v["state"], "committed", "{out}");
    }
    assert_eq!(bank.balance(Side::A, "acct:alice"), 90);
    assert_eq!(bank.balance(Side::B, "acct:bob"), 10);
    bank.assert_clean();
}
