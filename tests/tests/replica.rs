//! `redtx-participant --wait-replicas N`: a participant applies nothing it read from the stream
//! Redis until N replicas hold it (`WAIT`), so a failover to a replica cannot lose a decision it
//! has applied. Here the replica is frozen (SIGSTOP) while a transfer runs: the participants
//! read its prepare, say they wait for the replica, and change nothing; once the replica goes on,
//! the transfer commits, exactly once. The same on a Redis Cluster, with the replica of the
//! master serving the transfer's partition frozen. And `redtx-coordinator --wait-replicas N`:
//! the coordinator acts on nothing it read (here a submit) until a replica holds it.

use redtx_common::cluster_server::RedisCluster;
use redtx_common::record::TxnState;
use redtx_common::server::{RedisServer, ServerOptions};
use redtx_tests::*;
use std::process::Command;

fn signal(server: &RedisServer, sig: &str) {
    signal_pid(server.pid().expect("the replica runs"), sig);
}

fn signal_pid(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().expect("kill").success();
    assert!(ok, "kill -{sig} {pid}");
}

/// How many times `name`'s participant has said it waits for a replica so far.
fn waits(bank: &mut Bank, name: &str) -> usize {
    bank.procs(name)[0].output().matches("replicas asked for").count()
}

/// Both participants said they wait for a replica again (more often than `before`: the counts
/// of [`waits`] when the replica was frozen), and neither has a barrier for `id`: nothing of it
/// was applied.
fn waiting_and_nothing_applied(bank: &mut Bank, id: &str, before: (usize, usize)) {
    poll("both participants waiting for the replica", LONG, || {
        (waits(bank, "bank-a") > before.0 && waits(bank, "bank-b") > before.1).then_some(())
    });
    for side in [Side::A, Side::B] {
        let bar: u64 =
            bank.data_query(side.name(), redis::cmd("EXISTS").arg(redtx_common::keys::barrier(side.name(), id)));
        assert_eq!(bar, 0, "{} applied a prepare its replica does not hold", side.name());
    }
}

/// Seeds alice (100) and bob (0), and runs a first transfer of 10: it commits.
fn first_transfer(bank: &Bank) {
    bank.seed(Side::A, "acct:alice", 100);
    bank.seed(Side::B, "acct:bob", 0);
    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10));
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
}

/// `id`, the second transfer (5), commits, once: the balances are 85 and 15, nothing is left.
fn committed_once(bank: &Bank, id: &str) {
    let rec = bank.wait(id);
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert_eq!((bank.balance(Side::A, "acct:alice"), bank.balance(Side::B, "acct:bob")), (85, 15));
    bank.assert_clean();
}

/// A replica of `bank`'s stream Redis (server A), started and linked (its first sync done).
fn linked_replica(bank: &Bank) -> RedisServer {
    let replica = RedisServer::start_with(ServerOptions { aof: false, ..Default::default() }).expect("replica");
    // The first sync at once, not after the default 5 s wait for more replicas.
    let () =
        redis::cmd("CONFIG").arg("SET").arg("repl-diskless-sync-delay").arg(0).query(&mut bank.stream_conn()).unwrap();
    let mut r = redis::Client::open(replica.url()).unwrap().get_connection().unwrap();
    let () = redis::cmd("REPLICAOF").arg("127.0.0.1").arg(bank.servers[0].port()).query(&mut r).unwrap();
    poll("the replica linked to the stream Redis", LONG, || {
        let info: String = redis::cmd("INFO").arg("replication").query(&mut r).ok()?;
        info.contains("master_link_status:up").then_some(())
    });
    replica
}

/// The pid of the replica of the master serving `id`'s partition, on `bank`'s stream cluster.
fn replica_serving(bank: &Bank, id: &str) -> u32 {
    let slot = keys::partition_slot(keys::partition(id, PARTITIONS));
    let streams = bank.streams.as_ref().expect("a cluster");
    let master = streams.master_of_slot(slot).unwrap();
    streams.pid(streams.replicas_of(master).unwrap()[0]).expect("the replica runs")
}

#[test]
fn a_participant_applies_nothing_until_a_replica_holds_what_it_read() {
    let mut opts = ClusterOptions::default().part_args(&["--wait-replicas", "1"]);
    opts.instances = [("bank-a".to_string(), 0), ("bank-b".to_string(), 0)].into();
    let mut bank = Bank::start_with(opts);
    // A replica of the stream Redis, linked before the participants start.
    let replica = linked_replica(&bank);
    bank.start_worker("bank-a", None);
    bank.start_worker("bank-b", None);
    first_transfer(&bank);

    // The replica frozen: the next transfer's prepares are read, not applied.
    let before = (waits(&mut bank, "bank-a"), waits(&mut bank, "bank-b"));
    signal(&replica, "STOP");
    let id = bank.submit(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 5).with_id("r-wait"));
    waiting_and_nothing_applied(&mut bank, &id, before);
    assert_eq!((bank.balance(Side::A, "acct:alice"), bank.balance(Side::B, "acct:bob")), (90, 10));

    // The replica goes on: the transfer commits, once.
    signal(&replica, "CONT");
    committed_once(&bank, &id);
}

#[test]
fn a_coordinator_acts_on_nothing_until_a_replica_holds_what_it_read() {
    // `redtx-coordinator --wait-replicas 1`, the participants without: what is checked here is
    // the coordinator's own wait. With the replica frozen it reads the submit and creates nothing
    // (no record, no prepare) until the replica holds the submit; so an end it records (a
    // saga's `completed` after a `done` result) never rests on an answer a failover can lose.
    let mut opts = ClusterOptions::default().coord_args(&["--wait-replicas", "1"]);
    opts.coordinators = 0;
    let mut bank = Bank::start_with(opts);
    let replica = linked_replica(&bank);
    bank.start_coordinator(None);
    first_transfer(&bank);

    let said = |bank: &mut Bank| bank.coordinators[0].output().matches("replicas asked for").count();
    let before = said(&mut bank);
    signal(&replica, "STOP");
    let id = bank.submit(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 5).with_id("c-wait"));
    poll("the coordinator waiting for the replica", LONG, || (said(&mut bank) > before).then_some(()));
    assert_eq!(bank.state(&id), None, "a record was created from a submit its replica does not hold");
    assert!(bank.sent_to("bank-a", &id).is_empty(), "a prepare was sent");

    signal(&replica, "CONT");
    committed_once(&bank, &id);
}

#[test]
fn on_a_cluster_a_participant_applies_nothing_until_the_streams_master_has_a_replica_holding_it() {
    // The streams on a 3-master cluster, a replica per master; each participant reads every
    // partition's stream on a connection to that partition's master, and waits there.
    let cluster = RedisCluster::start(3, 1).expect("start the cluster");
    let mut bank = Bank::start_on_cluster(cluster, ClusterOptions::default().part_args(&["--wait-replicas", "1"]));
    first_transfer(&bank);

    // The replica of the master serving the next transfer's partition frozen: its prepares are
    // read there, not applied.
    let id = "rc-wait";
    let pid = replica_serving(&bank, id);
    let before = (waits(&mut bank, "bank-a"), waits(&mut bank, "bank-b"));
    signal_pid(pid, "STOP");
    bank.submit(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 5).with_id(id));
    waiting_and_nothing_applied(&mut bank, id, before);
    assert_eq!((bank.balance(Side::A, "acct:alice"), bank.balance(Side::B, "acct:bob")), (90, 10));

    // The replica goes on: the transfer commits, once.
    signal_pid(pid, "CONT");
    committed_once(&bank, id);
}

#[test]
fn on_a_cluster_a_coordinator_acts_on_nothing_until_the_partitions_master_has_a_replica_holding_it() {
    // The coordinator reads (and claims) each partition's stream on a connection pinned to
    // that partition's master, and waits there; the participants do not wait.
    let cluster = RedisCluster::start(3, 1).expect("start the cluster");
    let mut bank = Bank::start_on_cluster(cluster, ClusterOptions::default().coord_args(&["--wait-replicas", "1"]));
    first_transfer(&bank);

    let id = "cc-wait";
    let pid = replica_serving(&bank, id);
    let said = |bank: &mut Bank| bank.coordinators[0].output().matches("replicas asked for").count();
    let before = said(&mut bank);
    signal_pid(pid, "STOP");
    bank.submit(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 5).with_id(id));
    poll("the coordinator waiting for the replica", LONG, || (said(&mut bank) > before).then_some(()));
    let rec = bank.record(id);
    assert!(rec.is_none(), "a record was created from a submit its replica does not hold: {rec:?}");

    signal_pid(pid, "CONT");
    committed_once(&bank, id);
}
