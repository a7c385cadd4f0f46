//! The coordinator and the participants with `--cluster`: the streams and records on a real
//! 3-master Redis Cluster (the partitions' slots spread over all three masters), the banks' and
//! the shop's data on single servers. Concurrent 2PC transfers conserve money and leave nothing
//! locked; a saga whose step fails is compensated; moving a partition's slot to another master
//! while transfers run loses nothing, also with participants that wait for a replica of the
//! new master (`--wait-replicas`); failing a master over to its replica (`CLUSTER FAILOVER`)
//! while transfers run loses nothing either; nor does killing a master (SIGKILL) and restarting
//! it from its AOF, the setup recommended where a master may die; nor does killing a master
//! under `--wait-replicas` and letting the cluster elect its replica.

use rand::Rng;
use redtx_common::cluster_server::RedisCluster;
use redtx_common::record::{TxnRecord, TxnState};
use redtx_tests::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ACCOUNTS_PER_BANK: usize = 8;
const START: i64 = 100;

/// A 3-master cluster whose masters each serve at least one of the [`PARTITIONS`] partitions.
fn cluster() -> RedisCluster {
    cluster_with_replicas(0)
}

/// [`cluster`] with `replicas` replicas per master.
fn cluster_with_replicas(replicas: usize) -> RedisCluster {
    cluster_with(replicas, Default::default())
}

/// [`cluster_with_replicas`] with the nodes' options.
fn cluster_with(replicas: usize, opts: redtx_common::cluster_server::ClusterOptions) -> RedisCluster {
    let c = RedisCluster::start_with(3, replicas, opts).expect("start the cluster");
    let masters: BTreeSet<usize> =
        (0..PARTITIONS).map(|p| c.master_of_slot(keys::partition_slot(p)).expect("slot owner")).collect();
    assert_eq!(masters.len(), 3, "the partitions' slots are on every master");
    c
}

/// Fast takeover settings, `bank-b` served by two instances.
fn opts() -> ClusterOptions {
    ClusterOptions::default().instances("bank-b", 2)
}

/// One transfer as the producer saw it end.
struct Done {
    /// When the producer first submitted it (its clock, ms).
    submitted_ms: u64,
    from: usize,
    to: usize,
    amount: i64,
    record: TxnRecord,
}

/// How a producer waits for a transfer.
#[derive(Clone, Copy)]
enum Patience {
    /// One submit, and up to 45 s for its outcome: no acknowledged submit may be lost.
    Once,
    /// Up to 15 s, then the same id submitted again, three times: what a producer does when a
    /// submit acknowledged by a master may be lost with it (an unplanned failover), as
    /// `docs/protocol.md` says ("submitting the same id again is safe").
    Resubmit,
}

/// One random transfer between `accounts` under `id` (one in ten asks for more than there is:
/// refused), awaited.
async fn random_transfer(client: &redtx_common::Client, accounts: &[(Side, String)], id: String) -> Done {
    random_transfer_with(client, accounts, id, Patience::Once).await
}

async fn random_transfer_with(
    client: &redtx_common::Client,
    accounts: &[(Side, String)],
    id: String,
    patience: Patience,
) -> Done {
    let (from, to) = random_pair(accounts.len());
    let amount = if rand::rng().random_ratio(1, 10) { 1_000_000 } else { rand::rng().random_range(1..=40) };
    let (fa, ta) = (&accounts[from], &accounts[to]);
    let spec = transfer((fa.0, &fa.1), (ta.0, &ta.1), amount).with_id(id).with_timeout(Duration::from_secs(10));
    let submitted_ms = redtx_common::now_ms();
    let (tries, each) = match patience {
        Patience::Once => (1, Duration::from_secs(45)),
        Patience::Resubmit => (3, Duration::from_secs(15)),
    };
    for attempt in 1.. {
        match client.submit_and_wait(&spec, each).await {
            Ok(record) => return Done { submitted_ms, from, to, amount, record },
            Err(redtx_common::Error::WaitTimeout { .. }) if attempt < tries => {
                eprintln!("{}: no outcome in {each:?}; submitting it again", spec.id);
            }
            Err(e) => panic!("{}: {e}", spec.id),
        }
    }
    unreachable!()
}

/// `producers` tasks each run `per_producer` random transfers between `accounts` (one in ten
/// asks for more than there is: refused), each awaited; `during` runs meanwhile.
fn transfers(
    bank: &Bank,
    accounts: &[(Side, String)],
    producers: usize,
    per_producer: usize,
    during: impl FnOnce(),
) -> Vec<Done> {
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let client = bank.client().clone();
            let accounts = accounts.to_vec();
            bank.rt.spawn(async move {
                let mut done = Vec::with_capacity(per_producer);
                for n in 0..per_producer {
                    done.push(random_transfer(&client, &accounts, format!("t-{p}-{n}")).await);
                }
                done
            })
        })
        .collect();
    during();
    tasks.into_iter().flat_map(|t| bank.rt.block_on(t).expect("producer")).collect()
}

/// Every transfer ended committed or aborted (as stored too), every account holds what the
/// committed ones say, and nothing is left locked or prepared. Returns (committed, aborted).
fn check(bank: &Bank, accounts: &[(Side, String)], done: &mut [Done]) -> (usize, usize) {
    for d in done.iter_mut().filter(|d| d.record.state == TxnState::Aborting) {
        d.record = bank.wait(&d.record.id);
    }
    let mut expected: BTreeMap<(Side, String), i64> = accounts.iter().map(|a| (a.clone(), START)).collect();
    let (mut committed, mut aborted) = (0, 0);
    for d in done.iter() {
        let stored = bank.record(&d.record.id).expect("record");
        assert_eq!(stored.state, d.record.state, "{}", d.record.id);
        match d.record.state {
            TxnState::Committed => {
                committed += 1;
                *expected.get_mut(&accounts[d.from]).unwrap() -= d.amount;
                *expected.get_mut(&accounts[d.to]).unwrap() += d.amount;
            }
            TxnState::Aborted => aborted += 1,
            s => panic!("{} ended {s}: {:?}", d.record.id, d.record),
        }
    }
    bank.wait_clean();
    assert_eq!(bank.balances(), expected, "every account holds what the committed transfers say");
    assert_eq!(bank.total(), START * accounts.len() as i64, "money is conserved");
    (committed, aborted)
}

fn seeded(bank: &Bank) -> Vec<(Side, String)> {
    bank.seed_accounts(ACCOUNTS_PER_BANK, START)
}

/// A bank (with `opts`) whose streams are on a cluster with a replica per master, its accounts
/// seeded and its client connected; the cluster, taken out of the fixture so that a test can
/// fail over, kill or freeze its nodes (the client and the workers have their seeds already:
/// put it back in `bank.0.streams` for the checks); and the master serving partition 0.
fn partition_0_on_replicated_cluster(opts: ClusterOptions) -> (Bank, Vec<(Side, String)>, RedisCluster, usize) {
    let (bank, accounts, streams, master, _) = master_on_replicated_cluster(opts, Lost::Partition0);
    (bank, accounts, streams, master)
}

/// Which master a test loses.
#[derive(Clone, Copy, Debug)]
enum Lost {
    /// Partition 0's.
    Partition0,
    /// The one serving the coordinators' membership (`rtx:coordinators`, a slot of its own):
    /// the coordinators' survey of their peers meets it, besides its partitions.
    Membership,
}

/// [`partition_0_on_replicated_cluster`] for the master `lost` names; also returns a partition
/// that master serves.
fn master_on_replicated_cluster(
    opts: ClusterOptions,
    lost: Lost,
) -> (Bank, Vec<(Side, String)>, RedisCluster, usize, u32) {
    let mut bank = Bank::start_on_cluster(cluster_with_replicas(1), opts);
    let accounts = seeded(&bank);
    bank.client();
    let streams = bank.0.streams.take().expect("a cluster");
    let master = match lost {
        Lost::Partition0 => streams.master_of_slot(keys::partition_slot(0)).unwrap(),
        Lost::Membership => streams.master_of_slot(keys::slot(&keys::coordinators())).unwrap(),
    };
    let p = (0..PARTITIONS)
        .find(|p| streams.master_of_slot(keys::partition_slot(*p)).unwrap() == master)
        .expect("every master serves some partition");
    (bank, accounts, streams, master, p)
}

#[test]
fn concurrent_transfers_on_a_cluster_conserve_money() {
    let started = Instant::now();
    let mut bank = Bank::start_on_cluster(cluster(), opts());
    let accounts = seeded(&bank);
    let mut done = transfers(&bank, &accounts, 6, 40, || {});
    let (committed, aborted) = check(&bank, &accounts, &mut done);
    assert!(committed > 0 && aborted > 0, "committed {committed}, aborted {aborted}");
    // Every partition was written on the master serving its slot.
    let streams = bank.streams.as_ref().unwrap();
    for p in 0..PARTITIONS {
        let mut master = redis_conn(&streams.master_url_of_slot(keys::partition_slot(p)).unwrap());
        let n: u64 = redis::Commands::xlen(&mut master, keys::coord_stream(p)).unwrap();
        assert!(n > 0, "partition {p} has coordinator traffic on its master");
    }
    bank.assert_running(&["coordinator#1", "bank-a#1", "bank-b#1", "bank-b#2"]);
    eprintln!("{} transfers ({committed} committed, {aborted} aborted) in {:?}", done.len(), started.elapsed());
}

#[test]
fn a_saga_on_a_cluster_completes_or_is_compensated() {
    let shop = Shop::start_on_cluster(cluster(), ClusterOptions::default());
    shop.seed_stock("widget", 10);
    shop.seed_customer("ann", 100);
    let ok = Order::new("c-ok", "ann", "widget", 2, 10);
    let rec_ok = shop.run(&ok.saga());
    assert_eq!(rec_ok.state, TxnState::Completed, "{rec_ok:?}");
    // Payment fails (ann has 80 left): stock and orders are compensated.
    let poor = Order::new("c-poor", "ann", "widget", 3, 50);
    let rec_poor = shop.run(&poor.saga());
    assert_eq!(rec_poor.state, TxnState::Compensated, "{rec_poor:?}");
    assert_eq!(rec_poor.failed_step, Some(2), "{rec_poor:?}");
    assert_eq!(shop.marker("orders", &poor), (1, 1));
    assert_eq!(shop.marker("stock", &poor), (1, 1));
    assert_eq!(shop.marker("payment", &poor), (0, 0));
    // A handful at once, over every partition.
    let orders: Vec<Order> =
        (0..12).map(|i| Order::new(&format!("c-{i}"), "ann", "widget", 1 + i % 3, 5 + i % 4)).collect();
    let ids: Vec<String> = orders.iter().map(|o| shop.submit(&o.saga())).collect();
    let mut results = vec![(ok, rec_ok), (poor, rec_poor)];
    for (o, id) in orders.into_iter().zip(ids) {
        let rec = shop.wait(&id);
        results.push((o, rec));
    }
    let sum = shop.check(&results);
    assert!(sum.completed >= 1 && sum.compensated >= 1, "{sum:?}");
}

#[test]
fn moving_a_partitions_slot_during_transfers_loses_nothing() {
    let mut bank = Bank::start_on_cluster(cluster(), opts());
    let accounts = seeded(&bank);
    let streams = bank.streams.as_ref().unwrap();
    let p = 0;
    let slot = keys::partition_slot(p);
    let from = streams.master_of_slot(slot).unwrap();
    let to = streams.masters().unwrap().into_iter().find(|m| *m != from).unwrap();
    let mut done = transfers(&bank, &accounts, 4, 40, || {
        // Let some transfers run, then move partition 0 (its streams, records, lease) away.
        std::thread::sleep(Duration::from_millis(700));
        streams.move_slot(slot, to).expect("move the slot");
    });
    assert_eq!(streams.master_of_slot(slot).unwrap(), to);
    let (committed, _) = check(&bank, &accounts, &mut done);
    assert!(committed > 0);
    assert!(
        done.iter().any(|d| keys::partition(&d.record.id, PARTITIONS) == p),
        "some transfers were in the moved partition"
    );
    bank.assert_running(&["coordinator#1", "bank-a#1", "bank-b#1", "bank-b#2"]);
}

#[test]
fn moving_a_slot_under_wait_replicas_loses_nothing() {
    // The participants apply nothing before a replica holds it (`--wait-replicas 1`): each
    // partition's stream is read on a connection pinned to its slot's master, and `WAIT`ed on
    // there. Partition 0's slot moves to another master while transfers run: the pinned readers
    // follow `ASK` and `MOVED`, and go on waiting on the new master.
    let started = Instant::now();
    let cluster = cluster_with_replicas(1);
    let mut bank = Bank::start_on_cluster(cluster, opts().part_args(&["--wait-replicas", "1"]));
    let accounts = seeded(&bank);
    let streams = bank.streams.as_ref().unwrap();
    let p = 0;
    let slot = keys::partition_slot(p);
    let from = streams.master_of_slot(slot).unwrap();
    let to = streams.masters().unwrap().into_iter().find(|m| *m != from).unwrap();
    let (mut done, at, after, ()) = transfers_around(&bank, &accounts, "the move", || {
        eprintln!("moving slot {slot} from node {from} to node {to} at {:?}", started.elapsed());
        let keys = streams.move_slot(slot, to).expect("move the slot");
        eprintln!("{keys} keys moved at {:?}", started.elapsed());
    });
    assert_eq!(streams.master_of_slot(slot).unwrap(), to, "the slot was moved");
    let in_p = |d: &&Done| keys::partition(&d.record.id, PARTITIONS) == p;
    let across = under_way(&done, p, at, after);
    assert!(across > 0, "some transfers of partition {p} were under way while its slot moved");
    assert!(done.iter().filter(in_p).any(|d| d.record.created_ms >= after), "partition {p} had transfers after");

    // Everything read and answered; then only partition 0 busy, one transfer at a time: each is
    // read (its prepare at least) by a participant on the new master, which waits there, and
    // nothing is read, so nothing waited for, on the old one. A participant ignoring
    // `--wait-replicas`, or still waiting on the old master, would fail one of these.
    bank.wait_drained();
    let (waits_before, old_before) = (waits_on(streams, to), waits_on(streams, from));
    let n = 10;
    let ids = (0..).map(|i| format!("w-{i}")).filter(|id| keys::partition(id, PARTITIONS) == p).take(n);
    for id in ids {
        done.push(bank.rt.block_on(random_transfer(bank.client(), &accounts, id)));
    }
    let waits = waits_on(streams, to) - waits_before;
    assert!(waits >= n as u64, "{waits} WAITs on node {to} for {n} transfers of partition {p}");
    let old = waits_on(streams, from) - old_before;
    assert_eq!(old, 0, "WAITs on node {from}, which no longer serves partition {p}");

    let (committed, aborted) = check(&bank, &accounts, &mut done);
    assert!(committed > 0, "committed {committed}, aborted {aborted}");
    drained_and_running(&mut bank);
    eprintln!(
        "{} transfers ({committed} committed, {aborted} aborted; {across} of partition {p} under way while \
         its slot moved), {waits} WAITs on the new master for the last {n}, in {:?}",
        done.len(),
        started.elapsed()
    );
}

/// How many `WAIT`s `node` of `cluster` has served (`INFO commandstats`): only participants with
/// `--wait-replicas` send them.
fn waits_on(cluster: &RedisCluster, node: usize) -> u64 {
    let stats: String = redis::cmd("INFO").arg("commandstats").query(&mut redis_conn(&cluster.url(node))).unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_wait:calls="))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

/// `producers` tasks each run random transfers between `accounts` (as [`transfers`]), one after
/// another, until `stop` is set; `control` runs meanwhile, given how many have ended so far, and
/// sets `stop` when it is done.
fn transfers_until(
    bank: &Bank,
    accounts: &[(Side, String)],
    producers: usize,
    patience: Patience,
    control: impl FnOnce(&AtomicUsize),
    stop: &Arc<AtomicBool>,
) -> Vec<Done> {
    let ended = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let (client, accounts, stop, ended) =
                (bank.client().clone(), accounts.to_vec(), stop.clone(), ended.clone());
            bank.rt.spawn(async move {
                let mut done = Vec::new();
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    done.push(random_transfer_with(&client, &accounts, format!("f-{p}-{n}"), patience).await);
                    ended.fetch_add(1, Ordering::Relaxed);
                }
                done
            })
        })
        .collect();
    control(&ended);
    stop.store(true, Ordering::Relaxed);
    tasks.into_iter().flat_map(|t| bank.rt.block_on(t).expect("producer")).collect()
}

/// Six producers run transfers; once 20 have ended, `event` runs, and then 100 more must end.
/// Returns every transfer that ended, the time (ms) just before `event` and just after it, and
/// what `event` returned.
fn transfers_around<T>(
    bank: &Bank,
    accounts: &[(Side, String)],
    what: &str,
    event: impl FnOnce() -> T,
) -> (Vec<Done>, u64, u64, T) {
    transfers_around_with(bank, accounts, what, Patience::Once, event)
}

/// [`transfers_around`], the producers waiting with `patience`.
fn transfers_around_with<T>(
    bank: &Bank,
    accounts: &[(Side, String)],
    what: &str,
    patience: Patience,
    event: impl FnOnce() -> T,
) -> (Vec<Done>, u64, u64, T) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut out = None;
    let done = transfers_until(
        bank,
        accounts,
        6,
        patience,
        |ended| {
            poll("20 transfers ended", LONG, || (ended.load(Ordering::Relaxed) >= 20).then_some(()));
            let at = redtx_common::now_ms();
            let r = event();
            let after = redtx_common::now_ms();
            let before = ended.load(Ordering::Relaxed);
            poll(&format!("100 more transfers ended after {what}"), 3 * LONG, || {
                (ended.load(Ordering::Relaxed) >= before + 100).then_some(())
            });
            out = Some((at, after, r));
        },
        &stop,
    );
    let (at, after, r) = out.expect("the event ran");
    (done, at, after, r)
}

/// How many transfers of partition `p` were created at or after `ms`.
fn created_since(done: &[Done], p: u32, ms: u64) -> usize {
    done.iter().filter(|d| keys::partition(&d.record.id, PARTITIONS) == p && d.record.created_ms >= ms).count()
}

/// How many transfers of partition `p` were under way between `at` and `after`: created
/// before `after`, finished after `at`.
fn under_way(done: &[Done], p: u32, at: u64, after: u64) -> usize {
    done.iter()
        .filter(|d| keys::partition(&d.record.id, PARTITIONS) == p)
        .filter(|d| d.record.created_ms < after && d.record.finished_ms.is_some_and(|f| f > at))
        .count()
}

#[test]
fn failing_a_master_over_to_its_replica_during_transfers_loses_nothing() {
    let started = Instant::now();
    let (mut bank, accounts, mut streams, master) = partition_0_on_replicated_cluster(opts());
    let p = 0;
    // Transfers run before the failover and go on after it.
    let (mut done, at, after, new_master) = transfers_around(&bank, &accounts, "the failover", || {
        eprintln!("failover of node {master} at {:?}", started.elapsed());
        let new_master = streams.failover(master).expect("fail the master over");
        eprintln!("node {new_master} is master at {:?}", started.elapsed());
        new_master
    });
    assert_ne!(new_master, master);
    assert_eq!(streams.master_of_slot(keys::partition_slot(p)).unwrap(), new_master, "the replica serves it now");
    bank.0.streams = Some(streams);
    let (committed, aborted) = check(&bank, &accounts, &mut done);
    assert!(committed > 0, "committed {committed}, aborted {aborted}");
    assert!(
        created_since(&done, p, 0) > created_since(&done, p, at),
        "partition {p} had transfers before the failover"
    );
    assert!(created_since(&done, p, after) > 0, "partition {p} had transfers after the failover");
    assert!(under_way(&done, p, at, after) > 0, "some transfers of partition {p} were under way while it failed over");
    drained_and_running(&mut bank);
    eprintln!(
        "{} transfers ({committed} committed, {aborted} aborted) across a failover, in {:?}",
        done.len(),
        started.elapsed()
    );
}

#[test]
fn killing_a_master_under_wait_replicas_and_failing_over_loses_nothing() {
    // An unplanned failover: partition 0's master is killed (SIGKILL) while transfers run, and
    // the cluster elects its replica by itself. The killed node stays down 8 s more, then is
    // restarted, empty: it rejoins as a replica of the new master and syncs.
    a_master_lost_under_wait_replicas(
        "kill -9",
        Lost::Partition0,
        |streams, master| streams.kill_and_fail_over(master).expect("the cluster fails the master over"),
        |streams, master| streams.restart(master).expect("the killed node back"),
    );
}

#[test]
fn freezing_a_master_under_wait_replicas_and_failing_over_loses_nothing() {
    // The same with partition 0's master frozen (SIGSTOP): its connections stay open and
    // unanswered, so every call to it waits for a timeout instead of failing at once. The
    // cluster elects its replica; 8 s later the frozen node goes on (SIGCONT), finds itself
    // replaced and becomes the new master's replica. Each worker pays the timeout once per
    // partition (then skips it until its probe hears from it: `common::outage`), renews its
    // leases off its loop (`lease::Keeper`), and asks where a slot is of that slot's master,
    // not of a node at random. This test failed until all three were in.
    a_master_frozen_under_wait_replicas(Lost::Partition0);
}

#[test]
fn freezing_the_membership_master_holds_up_only_its_own_partitions() {
    // The master frozen is the one serving the coordinators' membership (`rtx:coordinators`):
    // each round the coordinator's survey of its peers meets it too. The survey skips it while
    // it does not answer and counts the coordinators as last seen, so the partitions on the
    // other masters go on, the coordinator never fails a whole round, and nothing is lost.
    a_master_frozen_under_wait_replicas(Lost::Membership);
}

/// [`a_master_lost_under_wait_replicas`] by `SIGSTOP`, then `SIGCONT`.
fn a_master_frozen_under_wait_replicas(lost: Lost) {
    a_master_lost_under_wait_replicas(
        "SIGSTOP",
        lost,
        |streams, master| streams.freeze_and_fail_over(master).expect("the cluster fails the master over"),
        |streams, master| streams.thaw(master).expect("the frozen node goes on"),
    );
}

/// The master `lost` names (partition `p` among those it serves) is lost (`lose`, which returns
/// once the cluster elected a replica of it) while transfers run, stays lost 8 s more (the new
/// master has no replica), then comes back (`recover`) as the new master's replica. The
/// coordinator and the participants act on nothing a replica does not hold (`--wait-replicas
/// 1`), so nothing they acted on is lost with the master, and nothing of its partitions goes on
/// while the new master has no replica. A submit the master acknowledged but did not pass on is
/// lost with it: the producers submit again after 15 s without an outcome. Meanwhile the other
/// partitions go on: a seventh producer, whose transfers avoid every partition of the lost
/// master, has transfers created and finished while that master is lost, and while its
/// replacement has no replica; and the coordinator never fails a whole round.
fn a_master_lost_under_wait_replicas(
    how: &str,
    lost: Lost,
    lose: impl FnOnce(&mut RedisCluster, usize) -> usize,
    recover: impl FnOnce(&mut RedisCluster, usize),
) {
    let started = Instant::now();
    let wait = ["--wait-replicas", "1"];
    let (mut bank, accounts, mut streams, master, p) =
        master_on_replicated_cluster(opts().coord_args(&wait).part_args(&wait), lost);
    // Every partition the lost master serves (their transfers wait for the election).
    let held: BTreeSet<u32> =
        (0..PARTITIONS).filter(|q| streams.master_of_slot(keys::partition_slot(*q)).unwrap() == master).collect();
    eprintln!("losing the master of {lost:?}: node {master}, serving partitions {held:?}");
    let others_stop = Arc::new(AtomicBool::new(false));
    let others = {
        let (client, accounts, stop) = (bank.client().clone(), accounts.clone(), others_stop.clone());
        let held = held.clone();
        bank.rt.spawn(async move {
            let mut done = Vec::new();
            let ids =
                (0..).map(|i| format!("o-{i}")).filter(move |id| !held.contains(&keys::partition(id, PARTITIONS)));
            for id in ids {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                done.push(random_transfer_with(&client, &accounts, id, Patience::Once).await);
            }
            done
        })
    };
    let (mut done, at, after, (new_master, elected, restarting)) =
        transfers_around_with(&bank, &accounts, "the failover", Patience::Resubmit, || {
            eprintln!("{how} of node {master} at {:?}", started.elapsed());
            let new_master = lose(&mut streams, master);
            let elected = redtx_common::now_ms();
            eprintln!("node {new_master} is master at {:?}", started.elapsed());
            // Down for a while yet (the fault itself, not a check): the new master has no replica.
            std::thread::sleep(Duration::from_secs(8));
            let restarting = redtx_common::now_ms();
            recover(&mut streams, master);
            eprintln!("node {master} back, a replica, at {:?}", started.elapsed());
            (new_master, elected, restarting)
        });
    others_stop.store(true, Ordering::Relaxed);
    let others = bank.rt.block_on(others).expect("the seventh producer");
    assert_ne!(new_master, master);
    assert_eq!(streams.master_of_slot(keys::partition_slot(p)).unwrap(), new_master, "the replica serves it now");
    assert_eq!(streams.replicas_of(new_master).unwrap(), vec![master], "the lost node replicates the new master");
    // Created a second after the kill (the coordinator has met the dead master by then) and
    // finished before the election; and the same while the new master has no replica.
    let within = |from: u64, to: u64| {
        others.iter().filter(|d| d.record.created_ms > from && d.record.finished_ms.is_some_and(|f| f < to)).count()
    };
    let (meanwhile, unreplicated) = (within(at + 1000, elected), within(elected + 1000, restarting));
    assert!(meanwhile > 0, "other partitions finished transfers while partition {p}'s master was down");
    assert!(unreplicated > 0, "other partitions finished transfers while partition {p}'s new master had no replica");
    let out = bank.coordinators[0].output();
    let failed: Vec<&str> = out.lines().filter(|l| l.contains("coordinator step failed")).collect();
    assert!(failed.is_empty(), "the coordinator failed whole rounds: {failed:#?}");
    done.extend(others);
    bank.0.streams = Some(streams);
    let (committed, aborted) = check(&bank, &accounts, &mut done);
    assert!(committed > 0, "committed {committed}, aborted {aborted}");
    // The outage met work: producers waited on partition 0 while its master was down (any of
    // them that drew one of its transfers then).
    let across = done
        .iter()
        .filter(|d| keys::partition(&d.record.id, PARTITIONS) == p && d.submitted_ms < after)
        .filter(|d| d.record.finished_ms.is_some_and(|f| f > at))
        .count();
    assert!(across > 0, "some transfers of partition {p} were under way while its master was down");
    assert!(created_since(&done, p, after) > 0, "partition {p} had transfers after the failover");
    drained_and_running(&mut bank);
    eprintln!(
        "{} transfers ({committed} committed, {aborted} aborted; {across} of partition {p} under way; of the others \
         {meanwhile} in {} ms of outage, {unreplicated} in {} ms without a replica) across a {how} of a master and \
         its replica's election, in {:?}",
        done.len(),
        elected - at,
        restarting - elected,
        started.elapsed()
    );
}

#[test]
fn a_client_and_a_participant_that_start_while_a_master_is_frozen_serve_the_other_partitions() {
    // A producer's `Client`, opened before the freeze, has not waited for anything yet: its
    // outcome readers start with its first wait. Partition 0's master is frozen (SIGSTOP) and
    // stays so, with no replica to take over (the other masters keep serving their slots:
    // `cluster-require-full-coverage no`). The client's transfers on the other masters'
    // partitions must end meanwhile: the reader of a partition starts on that partition alone.
    // Before, the first wait looked up every partition's stream first, met the frozen master,
    // and no wait of the client ended until it was back. Then a participant instance is started
    // while the master is still frozen: it must start on the other partitions.
    let started = Instant::now();
    let nodes = redtx_common::cluster_server::ClusterOptions::partial_coverage();
    let mut bank = Bank::start_on_cluster(cluster_with(0, nodes), opts());
    let accounts = seeded(&bank);
    bank.client();
    let mut streams = bank.0.streams.take().expect("a cluster");
    let master = streams.master_of_slot(keys::partition_slot(0)).unwrap();
    let held: BTreeSet<u32> =
        (0..PARTITIONS).filter(|q| streams.master_of_slot(keys::partition_slot(*q)).unwrap() == master).collect();
    // The workers under way first (their start is not what this test is about), through the
    // deployment's own client.
    let warm: Vec<Done> =
        (0..12).map(|i| bank.rt.block_on(random_transfer(bank.client(), &accounts, format!("w-{i}")))).collect();
    let seeds = streams.seed_urls();
    let fresh = bank
        .rt
        .block_on(redtx_common::Client::connect_cluster(&seeds.iter().map(String::as_str).collect::<Vec<_>>()))
        .expect("a client connects")
        .with_partitions(PARTITIONS);
    streams.freeze(master).expect("the master is frozen");
    let frozen_at = redtx_common::now_ms();
    eprintln!("SIGSTOP of node {master} (partitions {held:?}) at {:?}", started.elapsed());
    // Each transfer is waited for up to 45 s (and panics then): the master stays frozen all along.
    let done: Vec<(Done, u64)> = bank.rt.block_on(async {
        let ids = (0..).map(|i| format!("f-{i}")).filter(|id| !held.contains(&keys::partition(id, PARTITIONS)));
        let mut done = Vec::new();
        for id in ids.take(20) {
            let d = random_transfer_with(&fresh, &accounts, id, Patience::Once).await;
            done.push((d, redtx_common::now_ms() - frozen_at));
        }
        done
    });
    let (first, last) = (done[0].1, done[done.len() - 1].1);
    // A submit to partition 0 itself fails with a transient error; once the client has met the
    // silent master (the first submit's calls went unanswered), the next one fails without
    // calling it, naming the partition. (A refused transfer: if the first submit reached the
    // frozen master's socket and is applied after the thaw, it moves no money.)
    let id0 = (0..).map(|i| format!("p0-{i}")).find(|id| keys::partition(id, PARTITIONS) == 0).unwrap();
    let spec0 = transfer((accounts[0].0, &accounts[0].1), (accounts[1].0, &accounts[1].1), 1_000_000_000).with_id(&id0);
    let first_submit = bank.rt.block_on(fresh.submit(&spec0)).expect_err("partition 0's master is frozen");
    assert!(first_submit.is_transient(), "{first_submit}");
    let again = bank.rt.block_on(fresh.submit(&spec0)).expect_err("partition 0's master is frozen");
    assert!(again.is_transient() && again.to_string().contains("master of partition 0 does not answer"), "{again}");
    // A participant instance started while the master is frozen: bank-a's only one is killed
    // (kill -9) and a new one started. It starts on the partitions whose masters answer (before,
    // it retried its whole start until the frozen master answered), and transfers of those
    // partitions that need bank-a commit through it.
    bank.bank(Side::A)[0].kill9();
    let restarted = Instant::now();
    // (The fixture starts workers on the cluster it holds.)
    bank.0.streams = Some(streams);
    bank.start_participant(Side::A, None).wait_for_line("participant started", Duration::from_secs(30));
    let started_in = restarted.elapsed();
    let mut streams = bank.0.streams.take().expect("a cluster");
    let later: Vec<Done> = bank.rt.block_on(async {
        let ids = (0..).map(|i| format!("g-{i}")).filter(|id| !held.contains(&keys::partition(id, PARTITIONS)));
        let mut later = Vec::new();
        for id in ids.take(10) {
            later.push(random_transfer_with(&fresh, &accounts, id, Patience::Once).await);
        }
        later
    });
    let through_a = |d: &&Done| accounts[d.from].0 == Side::A || accounts[d.to].0 == Side::A;
    let committed_through_a = later.iter().filter(through_a).filter(|d| d.record.state == TxnState::Committed).count();
    assert!(
        committed_through_a > 0,
        "transfers needing bank-a committed through the instance started while the master was frozen: {:?}",
        later.iter().map(|d| (&d.record.id, d.record.state, accounts[d.from].0, accounts[d.to].0)).collect::<Vec<_>>()
    );
    assert!(streams.pid(master).is_some_and(stopped), "the master was frozen all along");
    streams.thaw(master).expect("the frozen node goes on");
    bank.0.streams = Some(streams);
    let mut done: Vec<Done> = done.into_iter().map(|(d, _)| d).collect();
    let fresh_ones = done.len();
    done.extend(warm);
    done.extend(later);
    let (committed, aborted) = check(&bank, &accounts, &mut done);
    drained_and_running_as(&mut bank, &["coordinator#1", "bank-a#2", "bank-b#1", "bank-b#2"]);
    eprintln!(
        "{fresh_ones} transfers of a client that first waited while a master was frozen ({committed} committed, {aborted} \
         aborted, with the 12 before and the 10 after): the first ended {first} ms after the freeze, the last {last} ms \
         after; a bank-a instance started meanwhile was under way in {started_in:?}, {committed_through_a} of its \
         transfers committed; in {:?}",
        started.elapsed()
    );
}

/// Whether process `pid` is stopped (`T` in `/proc/<pid>/stat`).
fn stopped(pid: u32) -> bool {
    redtx_common::server::proc_stat(pid).is_some_and(|f| f.first().is_some_and(|state| state == "T"))
}

/// Nothing pending or unread in any stream, nothing dead-lettered (no acknowledged write was
/// lost), and every worker still running.
fn drained_and_running(bank: &mut Bank) {
    drained_and_running_as(bank, &["coordinator#1", "bank-a#1", "bank-b#1", "bank-b#2"]);
}

/// [`drained_and_running`], the workers running being those `labels` names.
fn drained_and_running_as(bank: &mut Bank, labels: &[&str]) {
    bank.wait_drained();
    let mut c = bank.stream_cluster_conn();
    for q in 0..PARTITIONS {
        let n: u64 = redis::Commands::xlen(&mut c, keys::dead_letter_stream(q)).unwrap();
        assert_eq!(n, 0, "dead letters in partition {q}");
    }
    bank.assert_running(labels);
}

#[test]
fn killing_a_master_and_restarting_it_under_transfers_loses_nothing() {
    // The setup recommended where a master may die (docs/scaling.md): AOF with `appendfsync
    // always`, and no replica to take over writes it never saw. Partition 0's master is killed
    // with SIGKILL while transfers run, and restarted from its AOF a moment later.
    let started = Instant::now();
    let aof = redtx_common::cluster_server::ClusterOptions { aof: true, ..Default::default() };
    let mut bank = Bank::start_on_cluster(cluster_with(0, aof), opts());
    let accounts = seeded(&bank);
    bank.client();
    let mut streams = bank.0.streams.take().expect("a cluster");
    let p = 0;
    let master = streams.master_of_slot(keys::partition_slot(p)).unwrap();
    let (mut done, _, restarted_at, ()) = transfers_around(&bank, &accounts, "the restart", || {
        eprintln!("kill -9 of node {master} at {:?}", started.elapsed());
        streams.kill(master);
        // Down for a while (the fault itself, not a check): transfers of its partitions wait.
        std::thread::sleep(Duration::from_secs(1));
        streams.restart(master).expect("restart the master from its AOF");
        eprintln!("node {master} back at {:?}", started.elapsed());
    });
    assert_eq!(streams.master_of_slot(keys::partition_slot(p)).unwrap(), master, "the same node serves it again");
    bank.0.streams = Some(streams);
    let (committed, aborted) = check(&bank, &accounts, &mut done);
    assert!(committed > 0, "committed {committed}, aborted {aborted}");
    assert!(created_since(&done, p, restarted_at) > 0, "partition {p} had transfers after the restart");
    drained_and_running(&mut bank);
    eprintln!(
        "{} transfers ({committed} committed, {aborted} aborted) across a kill -9 of a master, in {:?}",
        done.len(),
        started.elapsed()
    );
}

#[test]
fn a_master_frozen_for_good_is_replaced_and_its_partition_goes_on() {
    // Partition 0's master is frozen (SIGSTOP) under transfers and stays frozen: the cluster
    // elects its replica. The workers' cluster connections met only timeouts from the old
    // master, which never answers MOVED to redirect them; once a probe on a fresh connection
    // hears from the partition, they replace their connections and run partition 0 on the new
    // master while the old one is still frozen. The producer's `Client`, opened before the
    // freeze, follows too: its calls to the old master go unanswered until it opens a fresh
    // connection, which routes partition 0 to the new master.
    let started = Instant::now();
    let (mut bank, accounts, mut streams, master) = partition_0_on_replicated_cluster(opts());
    let p = 0;
    let mut done: Vec<Done> = (0..20)
        .map(|i| bank.rt.block_on(random_transfer_with(bank.client(), &accounts, format!("a-{i}"), Patience::Once)))
        .collect();
    // The workers meet the frozen master meanwhile: the coordinator's survey and lease renewals,
    // the participants' claims of partition 0.
    eprintln!("SIGSTOP of node {master} at {:?}", started.elapsed());
    let new_master = streams.freeze_and_fail_over(master).expect("the cluster fails the master over");
    let elected = redtx_common::now_ms();
    eprintln!("node {new_master} is master at {:?}; node {master} stays frozen", started.elapsed());
    // Meanwhile another producer of the same client keeps the other partitions busy: their
    // answers must not hide that partition 0's calls go unanswered.
    let stop = Arc::new(AtomicBool::new(false));
    let others = {
        let (client, accounts, stop) = (bank.client().clone(), accounts.clone(), stop.clone());
        bank.rt.spawn(async move {
            let ids = (0..).map(|i| format!("o-{i}")).filter(|id| keys::partition(id, PARTITIONS) != p);
            let mut done = Vec::new();
            for id in ids {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                done.push(random_transfer_with(&client, &accounts, id, Patience::Once).await);
            }
            done
        })
    };
    let ids = (0..).map(|i| format!("z-{i}")).filter(|id| keys::partition(id, PARTITIONS) == p).take(10);
    for id in ids {
        done.push(bank.rt.block_on(random_transfer_with(bank.client(), &accounts, id, Patience::Once)));
    }
    // When the producer had the outcomes of all 10, after the election.
    let answered_after = redtx_common::now_ms().saturating_sub(elected);
    stop.store(true, Ordering::Relaxed);
    let others = bank.rt.block_on(others).expect("the other producer");
    let on_others = others.len();
    done.extend(others);
    // Each answered with its outcome (committed, or an abort decided) before the old master
    // was let go.
    let settled = [TxnState::Committed, TxnState::Aborting, TxnState::Aborted];
    let on_new_master =
        done.iter().filter(|d| d.record.id.starts_with("z-") && settled.contains(&d.record.state)).count();
    assert_eq!(
        on_new_master, 10,
        "partition {p}'s transfers ended on node {new_master} while node {master} was frozen"
    );
    // How long partition 0 took to come back: from the election to the end of its first
    // transfer (submitted at the election) on the new master.
    let back_after = done
        .iter()
        .filter(|d| d.record.id.starts_with("z-"))
        .filter_map(|d| d.record.finished_ms)
        .min()
        .map(|f| f.saturating_sub(elected));
    // The client's first call after the election still goes to the old master (it has not
    // heard of the election) and waits out its timeout (1.5 s); its probe then hears from the
    // new master on a fresh connection, which the client takes up, and the coordinator's read
    // stuck on the old master is given up. Were the reads and probes left to their timeouts,
    // this took 11 s.
    assert!(
        back_after.is_some_and(|ms| ms < 7_000),
        "partition {p} came back {back_after:?} ms after the election; expected within 7 s"
    );
    // The producer's outcome reader of partition 0 had a blocking read out to the old master
    // since the freeze: it gives it up when the partition comes back and reads the new master.
    // Left to its timeout (15 s after the freeze), the producer had them 6.2 s after the
    // election.
    assert!(
        answered_after < 5_000,
        "the producer had the 10 outcomes of partition {p} {answered_after} ms after the election; expected within 5 s"
    );
    streams.thaw(master).expect("the frozen node goes on");
    bank.0.streams = Some(streams);
    let (committed, aborted) = check(&bank, &accounts, &mut done);
    assert!(created_since(&done, p, elected) >= 10);
    drained_and_running(&mut bank);
    eprintln!(
        "{} transfers ({committed} committed, aborted {aborted}), 10 of partition {p} on the new master while the old \
         one was frozen (the first ended {back_after:?} ms after the election, the producer had all 10 outcomes \
         {answered_after} ms after it) and {on_others} of other partitions \
         through the same client meanwhile, in {:?}",
        done.len(),
        started.elapsed()
    );
}
