//! Scale-out on one machine: two coordinators and two instances of each participant share eight
//! partitions under concurrent transfers, each doing part of the work (read from the leases and
//! from each process's stats hash). Mid-run one coordinator and one `bank-b` instance leave,
//! with SIGTERM (the first test) or `kill -9` (the second), and the survivors take their
//! partitions and pending entries; then a new coordinator and a new instance join and get their
//! share. Every transfer submitted ends, committed or aborted, exactly as the balances say; no
//! lock, nothing pending and no dead letter is left.
//!
//! Each step waits for what it expects (leases, stats hashes, pending lists, transfers ending),
//! never for a fixed time.

use redtx_tests::*;
use std::time::Instant;

/// Partitions of the deployment: four per coordinator, with room for a third.
const PARTITIONS_HERE: u32 = 8;
/// Producers, each with one transfer in flight at a time.
const PRODUCERS: usize = 6;
/// Accounts per bank and their opening balance: amounts go up to 60, so some transfers abort
/// for insufficient funds, and concurrent ones on an account conflict.
const ACCOUNTS: usize = 10;
const START: i64 = 100;
/// Transfers that must end between two steps to show the deployment goes on.
const PROGRESS: usize = 30;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Removal {
    /// SIGTERM: the coordinator gives its leases up, the instance finishes its batch; both log
    /// their counts.
    Term,
    /// SIGKILL: the leases lapse, pending entries are claimed by the survivors.
    Kill,
}

#[test]
fn coordinator_and_instance_stopped_mid_run_then_added() {
    scale_out_and_back(Removal::Term);
}

#[test]
fn coordinator_and_instance_killed_mid_run_then_added() {
    scale_out_and_back(Removal::Kill);
}

/// `label: share` of each process's handled entries among `procs` (`(label, pid)`), one line.
fn shares(bank: &Bank, procs: &[(String, u32)]) -> String {
    let stats = bank.worker_stats();
    let handled: Vec<u64> =
        procs.iter().map(|(_, pid)| stats.iter().find(|s| s.pid == Some(*pid)).map_or(0, |s| s.handled())).collect();
    let total = handled.iter().sum::<u64>().max(1);
    procs
        .iter()
        .zip(&handled)
        .map(|((label, _), n)| format!("{label} {n} ({:.0} %)", 100.0 * *n as f64 / total as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits for `p` to exit after a SIGTERM, with success.
fn stopped_cleanly(p: &mut Proc) {
    let status = p.wait_exit(LONG).unwrap_or_else(|| panic!("{} did not stop on SIGTERM", p.label));
    assert!(status.success(), "{} exited with {status} on SIGTERM:\n{}", p.label, p.output());
}

fn labelled(procs: &[Proc]) -> Vec<(String, u32)> {
    procs.iter().map(|p| (p.label.clone(), p.pid())).collect()
}

fn scale_out_and_back(removal: Removal) {
    let started = Instant::now();
    let opts = ClusterOptions::default()
        .partitions(PARTITIONS_HERE)
        .coordinators(2)
        .instances("bank-a", 2)
        .instances("bank-b", 2);
    let mut bank = Bank::start_with(opts);
    let accounts = bank.open_accounts(ACCOUNTS, START);
    let load = bank.start_load(&accounts, PRODUCERS);

    // 1. Before any change: the partitions are spread over both coordinators, and every
    // process has handled some of the work.
    let coords: Vec<u32> = bank.coordinators.iter().map(Proc::pid).collect();
    let spread = bank.wait_spread(&coords);
    let a = labelled(bank.bank(Side::A));
    let b = labelled(bank.bank(Side::B));
    for (label, pid) in labelled(&bank.coordinators).iter().chain(&a).chain(&b) {
        bank.wait_stats(*pid, &format!("{label} handled some entries"), |s| s.handled() > 0);
    }
    eprintln!(
        "before: partitions {spread:?}; coordinators: {}; bank-a: {}; bank-b: {}",
        shares(&bank, &labelled(&bank.coordinators)),
        shares(&bank, &a),
        shares(&bank, &b)
    );

    // 2. Remove coordinator #1 and bank-b #1.
    let (gone_coord, gone_part) = (coords[0], b[0].1);
    let gone_coord_id = bank.stats_of(gone_coord).expect("stats of coordinator #1").id;
    let gone_part_id = bank.stats_of(gone_part).expect("stats of bank-b #1").id;
    let (survivor, survivor_part) = (coords[1], b[1].1);
    match removal {
        Removal::Term => {
            bank.coordinators[0].term();
            bank.bank(Side::B)[0].term();
            stopped_cleanly(&mut bank.coordinators[0]);
            stopped_cleanly(&mut bank.bank(Side::B)[0]);
            // Both say what they did in their last line, and left the same figures in their
            // stats hash, marked stopped.
            let coord_handled = bank.coordinators[0].logged_count("coordinator stopped", "handled");
            let part_handled = bank.bank(Side::B)[0].logged_count("participant stopped", "handled");
            for (pid, logged, label) in
                [(gone_coord, coord_handled, "coordinator #1"), (gone_part, part_handled, "bank-b #1")]
            {
                let logged = logged.unwrap_or_else(|| panic!("{label} logged no handled= count when it stopped"));
                assert!(logged > 0, "{label} stopped having handled nothing");
                let last = bank.stats_of(pid).unwrap_or_else(|| panic!("{label} left no stats hash"));
                assert!(last.stopped, "{label}'s stats hash is not marked stopped: {last:?}");
                assert_eq!(last.handled(), logged, "{label}: the stats hash and the log line disagree");
            }
        }
        Removal::Kill => {
            bank.coordinators[0].kill9();
            bank.bank(Side::B)[0].kill9();
        }
    }
    let (coord_before, part_before) = (
        bank.stats_of(survivor).expect("stats of coordinator #2").handled(),
        bank.stats_of(survivor_part).expect("stats of bank-b #2").handled(),
    );
    // The survivor owns every partition (at once after SIGTERM, after the lease lapsed after
    // kill -9); nothing is left pending at the removed ones: the survivors took it over.
    bank.wait_spread(&[survivor]);
    let coord_streams: Vec<String> = (0..PARTITIONS_HERE).map(keys::coord_stream).collect();
    let b_streams: Vec<String> = (0..PARTITIONS_HERE).map(|p| keys::participant_stream("bank-b", p)).collect();
    poll("nothing pending at the removed coordinator", LONG, || {
        (bank.pending_at(&coord_streams, keys::COORD_GROUP, &gone_coord_id) == 0).then_some(())
    });
    poll("nothing pending at the removed bank-b instance", LONG, || {
        (bank.pending_at(&b_streams, "bank-b", &gone_part_id) == 0).then_some(())
    });
    load.wait_progress(PROGRESS);
    bank.wait_stats(survivor, "coordinator #2 handled more", |s| s.handled() > coord_before);
    bank.wait_stats(survivor_part, "bank-b #2 handled more", |s| s.handled() > part_before);
    eprintln!("after the removal ({removal:?}) at {:?}: every partition at coordinator #2", started.elapsed());

    // 3. Add a coordinator and a bank-b instance: the partitions spread again, and both new
    // processes take part of the work.
    let added = bank.start_coordinator(None).pid();
    let added_part = bank.start_participant(Side::B, None).pid();
    let spread = bank.wait_spread(&[survivor, added]);
    bank.wait_stats(added, "the added coordinator handled some entries", |s| s.handled() > 0);
    bank.wait_stats(added_part, "the added bank-b instance answered some requests", |s| s.handled() > 0);
    load.wait_progress(PROGRESS);

    // 4. Stop the load; everything submitted ended and adds up.
    let live_coords: Vec<(String, u32)> =
        labelled(&bank.coordinators).into_iter().filter(|(_, pid)| *pid != gone_coord).collect();
    let live_b: Vec<(String, u32)> =
        labelled(bank.bank(Side::B)).into_iter().filter(|(_, pid)| *pid != gone_part).collect();
    eprintln!(
        "after adding: partitions {spread:?}; coordinators: {}; bank-a: {}; bank-b: {}",
        shares(&bank, &live_coords),
        shares(&bank, &a),
        shares(&bank, &live_b)
    );
    let mut done = load.finish(&bank.rt);
    let (committed, aborted) = bank.check_transfers(&accounts, START, &mut done);
    assert!(committed > 0, "nothing committed");
    bank.wait_clean();
    bank.wait_drained();
    let dead = bank.dead_letters();
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    eprintln!(
        "{} transfers ({committed} committed, {aborted} aborted) with a removal ({removal:?}) and an addition in {:?}",
        done.len(),
        started.elapsed()
    );
}
