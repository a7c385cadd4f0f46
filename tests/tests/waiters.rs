//! Producers waiting for outcomes do not poll: an outcome entry wakes each waiter, and a waiter
//! reads its record about once. Here `bank-b` has no instance running, so every transfer waits
//! for its whole 4 s vote deadline, then aborts; while 100 producers wait, the stream Redis sees
//! about two record reads (`HGETALL`) per transfer (the coordinator's look-up of the new id, and
//! the producer's read once woken), not one per waiter every second.

use redtx_common::record::TxnState;
use redtx_tests::*;
use std::time::Duration;

/// `calls` of `cmdstat_<cmd>` in `INFO commandstats` (0 when never called).
fn calls(conn: &mut redis::Connection, cmd: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    let prefix = format!("cmdstat_{cmd}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn waiting_producers_read_each_record_about_once_instead_of_polling() {
    let bank = Bank::start_with(ClusterOptions::default().instances("bank-b", 0));
    let n = 100;
    for i in 0..n {
        bank.seed(Side::A, &format!("acct:{i}"), 10);
    }
    let client = bank.client().clone();
    let before = calls(&mut bank.stream_conn(), "hgetall");
    let records = bank.rt.block_on(async {
        let waits: Vec<_> = (0..n)
            .map(|i| {
                let client = client.clone();
                let spec = transfer((Side::A, &format!("acct:{i}")), (Side::B, "acct:bob"), 1)
                    .with_id(format!("w-{i}"))
                    .with_timeout(Duration::from_secs(4));
                tokio::spawn(async move { client.submit_and_wait(&spec, LONG).await })
            })
            .collect();
        let mut records = Vec::new();
        for w in waits {
            records.push(w.await.expect("producer").expect("an outcome"));
        }
        records
    });
    for r in &records {
        assert!(matches!(r.state, TxnState::Aborting | TxnState::Aborted), "{r:?}");
        assert!(r.reason.as_deref().unwrap_or_default().contains("bank-b"), "{r:?}");
    }
    let reads = calls(&mut bank.stream_conn(), "hgetall") - before;
    // Re-reading every record once a second while waiting would be about 4 more per transfer.
    assert!(reads <= 3 * n, "{reads} record reads for {n} transfers that each took 4 s");
    eprintln!("{reads} record reads for {n} transfers");
}
