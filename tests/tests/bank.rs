//! The invariant test: many concurrent producers move money at random between 40 accounts on two
//! Redis servers (`bank-b` served by two participant instances in one consumer group). Some
//! transfers must abort (insufficient funds, conflicts on a hot account). Afterwards: every
//! transaction is terminal, the counts add up, every account holds exactly what the committed
//! transfers say (so money is conserved and nothing applied twice or half-way), and no lock or
//! prepared barrier is left.

use rand::Rng;
use redtx_common::record::{TxnRecord, TxnState};
use redtx_tests::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const PRODUCERS: usize = 8;
const PER_PRODUCER: usize = 128;
// Enough accounts that random transfers mostly commit even when slow (debug build, busy machine):
// every in-flight transfer holds two locks until its commit, and a prepare that meets one aborts.
// The hot-account bursts below still make conflicts certain.
const ACCOUNTS_PER_BANK: usize = 20;
const START: i64 = 100;

#[derive(Debug, Clone)]
struct Done {
    from: usize,
    to: usize,
    amount: i64,
    record: TxnRecord,
}

#[test]
fn concurrent_transfers_conserve_money_and_leave_nothing_locked() {
    let started = Instant::now();
    let opts = ClusterOptions {
        coord_args: ["--claim-idle", "2s", "--resend-every", "1s"].iter().map(|s| s.to_string()).collect(),
        part_args: ["--claim-idle", "2s"].iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
    .instances("bank-b", 2);
    let bank = Bank::start_with(opts);
    let accounts = bank.seed_accounts(ACCOUNTS_PER_BANK, START);
    let total = bank.total();
    assert_eq!(total, START * accounts.len() as i64);

    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let url = bank.url();
        let accounts = accounts.clone();
        tasks.push(bank.rt.spawn(async move {
            let client = connect_client(&url).await.expect("connect");
            let mut done: Vec<Done> = Vec::new();
            let mut n = 0;
            while n < PER_PRODUCER {
                // Every 16th round: a burst of 4 concurrent debits of the hot account acct:0 at
                // bank-a, so that some prepares find it locked (conflict).
                let burst = if n % 16 == 0 && n + 4 <= PER_PRODUCER { 4 } else { 1 };
                let picks: Vec<(usize, usize, i64)> = {
                    let mut rng = rand::rng();
                    (0..burst)
                        .map(|_| {
                            let from = if burst > 1 { 0 } else { rng.random_range(0..accounts.len()) };
                            let mut to = rng.random_range(0..accounts.len() - 1);
                            if to >= from {
                                to += 1;
                            }
                            // 1 in 20 asks for more than all the money there is: always refused.
                            let amount = if rng.random_ratio(1, 20) { 1_000_000 } else { rng.random_range(1..=60) };
                            (from, to, amount)
                        })
                        .collect()
                };
                let futs = picks.iter().map(|&(from, to, amount)| {
                    let (fa, ta) = (&accounts[from], &accounts[to]);
                    let spec = transfer((fa.0, &fa.1), (ta.0, &ta.1), amount).with_timeout(Duration::from_secs(10));
                    let client = client.clone();
                    async move {
                        let r = client.submit_and_wait(&spec, Duration::from_secs(45)).await;
                        (spec.id, r)
                    }
                });
                let results = futures_join_all(futs.collect()).await;
                for ((from, to, amount), (id, r)) in picks.into_iter().zip(results) {
                    let record = r.unwrap_or_else(|e| panic!("producer {p}: {id}: {e}"));
                    done.push(Done { from, to, amount, record });
                }
                n += burst;
            }
            done
        }));
    }
    let mut done: Vec<Done> = tasks.into_iter().flat_map(|t| bank.rt.block_on(t).expect("producer task")).collect();
    let load_time = started.elapsed();
    // A producer's answer is `aborting` as soon as the abort is decided; the acks follow.
    for d in done.iter_mut().filter(|d| d.record.state == TxnState::Aborting) {
        d.record = bank.wait(&d.record.id);
    }
    assert_eq!(done.len(), PRODUCERS * PER_PRODUCER);

    // Every transaction is terminal, and the stored record agrees with what the producer saw.
    let mut committed = 0;
    let mut aborted = 0;
    let mut conflicts = 0;
    let mut funds = 0;
    let mut expected: BTreeMap<(Side, String), i64> = accounts.iter().map(|a| (a.clone(), START)).collect();
    for d in &done {
        assert!(d.record.state.is_terminal(), "{:?}", d.record);
        let stored = bank.record(&d.record.id).expect("record");
        assert_eq!(stored.state, d.record.state, "{}", d.record.id);
        match d.record.state {
            TxnState::Committed => {
                committed += 1;
                *expected.get_mut(&accounts[d.from]).unwrap() -= d.amount;
                *expected.get_mut(&accounts[d.to]).unwrap() += d.amount;
            }
            TxnState::Aborted => {
                aborted += 1;
                let reason = d.record.reason.clone().unwrap_or_default();
                if reason.contains("conflict") {
                    conflicts += 1;
                } else if reason.contains("below min 0") {
                    funds += 1;
                }
                assert!(!reason.is_empty(), "abort without a reason: {:?}", d.record);
            }
            _ => unreachable!(),
        }
        if d.amount >= 1_000_000 {
            assert_eq!(d.record.state, TxnState::Aborted, "{:?}", d.record);
        }
    }
    assert_eq!(committed + aborted, done.len());
    eprintln!(
        "{} transfers in {load_time:?}: {committed} committed, {aborted} aborted ({funds} insufficient funds, {conflicts} conflicts)",
        done.len()
    );
    assert!(committed > done.len() / 4, "too few commits: {committed} of {}", done.len());
    assert!(funds > 0, "no transfer was refused for insufficient funds");
    assert!(conflicts > 0, "no conflict happened");

    assert_eq!(bank.total(), total, "money was created or destroyed");
    let actual = bank.balances();
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(k, v)| actual.get(*k) != Some(v))
        .map(|(k, v)| format!("{k:?}: expected {v}, found {:?}", actual.get(k)))
        .collect();
    assert!(wrong.is_empty(), "balances differ from the committed transfers:\n{}", wrong.join("\n"));
    assert!(actual.values().all(|v| *v >= 0), "a min 0 guard let a balance go negative: {actual:?}");
    bank.assert_clean();
    let mut s = bank.stream_conn();
    let dead = bank.dead_letters();
    assert!(dead.is_empty(), "dead letters under normal load: {dead:?}");
    // Every partition was used, and both bank-b instances did work (one consumer group, two
    // consumers).
    for stream in coord_streams() {
        assert!(drained(&mut s, &stream), "{stream} unused or not drained");
    }
    let consumers: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(keys::participant_stream("bank-b", 0))
        .arg("bank-b")
        .query(&mut s)
        .unwrap();
    assert!(consumers.len() >= 2, "bank-b should have two consumers: {consumers:?}");
    eprintln!("bank test total time {:?}", started.elapsed());
}

/// `join_all` without the `futures` crate: spawn each and await them in order.
async fn futures_join_all<F, T>(futs: Vec<F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[test]
fn transfers_survive_kill9_and_sigterm_of_workers_mid_load() {
    // Two coordinators and two bank-b instances; mid-load one of each is killed with SIGKILL,
    // one bank-a instance is stopped with SIGTERM and replaced, and a fresh coordinator joins.
    // Their pending entries are taken over by the survivors (XAUTOCLAIM after --claim-idle).
    const N: usize = 300;
    let started = Instant::now();
    let mut bank = Bank::start_with(ClusterOptions::default().instances("bank-b", 2));
    bank.start_coordinator(None);
    let accounts: Vec<(Side, String)> =
        [Side::A, Side::B].iter().flat_map(|s| (0..4).map(move |i| (*s, format!("acct:{i}")))).collect();
    for (s, k) in &accounts {
        bank.seed(*s, k, START);
    }
    let total = bank.total();

    let url = bank.url();
    let load = {
        let accounts = accounts.clone();
        bank.rt.spawn(async move {
            let client = connect_client(&url).await.expect("connect");
            let mut submitted = Vec::new();
            for n in 0..N {
                let (from, to) = random_pair(accounts.len());
                let amount = rand::rng().random_range(1..=50);
                let (fa, ta) = (&accounts[from], &accounts[to]);
                let spec = transfer((fa.0, &fa.1), (ta.0, &ta.1), amount)
                    .with_id(format!("k-{n}"))
                    .with_timeout(Duration::from_secs(20));
                client.submit(&spec).await.expect("submit");
                submitted.push((spec.id, from, to, amount));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            submitted
        })
    };
    let mut s = bank.stream_conn();
    poll("load under way", LONG, || (scan(&mut s, "rtx:txn:*").len() >= N / 5).then_some(()));
    bank.coordinators[0].kill9();
    bank.bank(Side::B)[0].kill9();
    poll("more load", LONG, || (scan(&mut s, "rtx:txn:*").len() >= N / 2).then_some(()));
    bank.bank(Side::A)[0].term();
    let status = bank.bank(Side::A)[0].wait_exit(LONG).expect("bank-a did not stop on SIGTERM");
    assert!(status.success(), "bank-a exited with {status} on SIGTERM");
    bank.start_participant(Side::A, None);
    bank.start_coordinator(None);
    let submitted = bank.rt.block_on(load).expect("load task");

    let client = bank.client().clone();
    let mut expected: BTreeMap<(Side, String), i64> = accounts.iter().map(|a| (a.clone(), START)).collect();
    let (mut committed, mut aborted) = (0, 0);
    for (id, from, to, amount) in &submitted {
        let rec = bank
            .rt
            .block_on(client.wait(id, Duration::from_secs(60)))
            .unwrap_or_else(|e| panic!("{id}: {e}\n{}", bank.dump(id)));
        match rec.state {
            TxnState::Committed => {
                committed += 1;
                *expected.get_mut(&accounts[*from]).unwrap() -= amount;
                *expected.get_mut(&accounts[*to]).unwrap() += amount;
            }
            TxnState::Aborted => aborted += 1,
            TxnState::Aborting => {
                // Settled: nothing is applied anywhere; the abort acks are still coming.
                assert_eq!(bank.wait(id).state, TxnState::Aborted, "{id}");
                aborted += 1
            }
            s => panic!("{id} not terminal: {s}"),
        }
    }
    eprintln!("{N} transfers with kills in {:?}: {committed} committed, {aborted} aborted", started.elapsed());
    assert_eq!(committed + aborted, N);
    assert!(committed > 0);
    assert_eq!(bank.total(), total, "money was created or destroyed");
    assert_eq!(bank.balances(), expected, "balances differ from the committed transfers");
    bank.assert_clean();
}
