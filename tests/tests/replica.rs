//! `redtx-participant --wait-replicas N`: a participant applies nothing it read from the stream
//! Redis until N replicas hold it (`WAIT`), so a failover to a replica cannot lose a decision it
//! has applied. Here the replica is frozen (SIGSTOP) while a transfer runs: the participants
//! read its prepare, say they wait for the replica, and change nothing; once the replica goes on,
//! the transfer commits, exactly once.

use redtx_common::record::TxnState;
use redtx_common::server::{RedisServer, ServerOptions};
use redtx_tests::*;
use std::process::Command;

fn signal(server: &RedisServer, sig: &str) {
    let pid = server.pid().expect("the replica runs").to_string();
    let ok = Command::new("kill").args([&format!("-{sig}"), &pid]).status().expect("kill").success();
    assert!(ok, "kill -{sig} {pid}");
}

#[test]
fn a_participant_applies_nothing_until_a_replica_holds_what_it_read() {
    let mut opts = ClusterOptions::default().part_args(&["--wait-replicas", "1"]);
    opts.instances = [("bank-a".to_string(), 0), ("bank-b".to_string(), 0)].into();
    let mut bank = Bank::start_with(opts);
    // A replica of the stream Redis (server A), linked before the participants start.
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
    bank.start_worker("bank-a", None);
    bank.start_worker("bank-b", None);
    bank.seed(Side::A, "acct:alice", 100);
    bank.seed(Side::B, "acct:bob", 0);

    let rec = bank.run(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 10));
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");

    // The replica frozen: the next transfer's prepares are read, not applied.
    signal(&replica, "STOP");
    let id = bank.submit(&transfer((Side::A, "acct:alice"), (Side::B, "acct:bob"), 5).with_id("r-wait"));
    poll("both participants waiting for the replica", LONG, || {
        let mut waiting = |name: &str| bank.procs(name)[0].logged("replicas asked for", "error").is_some();
        (waiting("bank-a") && waiting("bank-b")).then_some(())
    });
    for side in [Side::A, Side::B] {
        let bar: u64 =
            bank.data_query(side.name(), redis::cmd("EXISTS").arg(redtx_common::keys::barrier(side.name(), &id)));
        assert_eq!(bar, 0, "{} applied a prepare its replica does not hold", side.name());
    }
    assert_eq!((bank.balance(Side::A, "acct:alice"), bank.balance(Side::B, "acct:bob")), (90, 10));

    // The replica goes on: the transfer commits, once.
    signal(&replica, "CONT");
    let rec = bank.wait(&id);
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert_eq!((bank.balance(Side::A, "acct:alice"), bank.balance(Side::B, "acct:bob")), (85, 15));
    bank.assert_clean();
}
