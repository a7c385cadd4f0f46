//! The key-value participant with its data on a real 3-master Redis Cluster (`--data-cluster`,
//! or the streams' own cluster with `--cluster` and no `--data`), the real binaries end to end:
//! concurrent transfers over accounts spread across every master (transfers within a bank touch
//! two slots in one branch) conserve money with nothing left locked or prepared on any master; a
//! branch whose one slot group is refused aborts the whole transaction, no group applied; a
//! participant killed with `-9` mid-load, and one killed between a batch's group round and its
//! home-barrier round, lose and half-apply nothing; sagas on cluster data complete, compensate,
//! and refuse a step that spans slots.

use redtx_common::cluster_server::RedisCluster;
use redtx_common::record::TxnState;
use redtx_common::server::ServerOptions;
use redtx_common::spec::{Branch, IncrbyOp, Op, TxnSpec};
use redtx_tests::*;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

const START: i64 = 100;

fn data_cluster() -> RedisCluster {
    RedisCluster::start(3, 0).expect("start the cluster")
}

/// Both banks' data on the cluster, `per_bank` accounts each; checks they are spread over
/// every master and that some pairs within a bank are in two slots.
fn open(bank: &Bank, per_bank: usize) -> Vec<(Side, String)> {
    let accounts = bank.open_accounts(per_bank, START);
    let c = bank.data_cluster().expect("a data cluster");
    let masters: BTreeSet<usize> = accounts.iter().map(|(_, k)| c.master_of_slot(keys::slot(k)).unwrap()).collect();
    assert_eq!(masters.len(), 3, "the accounts are on every master");
    let slots: BTreeSet<u16> = accounts.iter().map(|(_, k)| keys::slot(k)).collect();
    assert!(slots.len() > accounts.len() / 2, "the accounts are spread over slots");
    accounts
}

/// Whether a transfer's branch at one bank touches two slots.
fn two_slots(t: &Transfer) -> bool {
    t.from.0 == t.to.0 && keys::slot(&t.from.1) != keys::slot(&t.to.1)
}

/// Transfers ended as the check says, with some committed ones over two slots in one branch;
/// nothing left on any master; the group barriers are on the masters of their slots.
fn check(bank: &Bank, accounts: &[(Side, String)], done: &mut [Transfer]) -> (usize, usize) {
    let (committed, aborted) = bank.check_transfers(accounts, START, done);
    bank.wait_clean();
    let wide = done.iter().filter(|t| t.record.state == TxnState::Committed && two_slots(t)).count();
    assert!(wide > 0, "some committed branches touched two slots");
    (committed, aborted)
}

fn incrby(key: &str, by: i64, min: Option<i64>) -> Op {
    Op::Incrby(IncrbyOp { key: key.into(), by, min, max: None })
}

#[test]
fn concurrent_transfers_with_both_banks_on_a_data_cluster_conserve_money() {
    let started = Instant::now();
    let opts = ClusterOptions::default().data_on_cluster("bank-a").data_on_cluster("bank-b").instances("bank-b", 2);
    let bank = Bank::start_with_data(None, Some(data_cluster()), opts);
    let accounts = open(&bank, 10);
    let load = bank.start_load(&accounts, 6);
    load.wait_progress(150);
    let mut done = load.finish(&bank.rt);
    let (committed, aborted) = check(&bank, &accounts, &mut done);
    assert!(committed >= done.len() / 4, "committed {committed} of {}", done.len());
    // The participants ran on the cluster: group barriers of committed branches are there.
    let groups = bank.data_scan("bank-a", "rtx:grp:*").len() + bank.data_scan("bank-b", "rtx:grp:*").len();
    assert!(groups > 0);
    eprintln!("{} transfers ({committed} committed, {aborted} aborted) in {:?}", done.len(), started.elapsed());
}

#[test]
fn a_frozen_data_master_holds_up_only_the_transfers_that_touch_it() {
    // Both banks' data on a cluster with a replica per master. The master of some accounts is
    // frozen (SIGSTOP) while transfers run, until the cluster elects its replica; then it goes
    // on and turns replica. Four producers move money between any accounts, two between
    // accounts on the other masters only, in transactions whose home barriers are there too.
    // Each participant pays the frozen master's timeout
    // once, then fails its slots' transitions at once (they stay pending) until a probe hears
    // from them; without that, every batch holding one of them waited out the timeout (1.5 s),
    // and the transfers that never touch the frozen master crawled with them.
    let started = Instant::now();
    let opts = ClusterOptions::default().data_on_cluster("bank-a").data_on_cluster("bank-b");
    let cluster = RedisCluster::start(3, 1).expect("start the cluster");
    let mut bank = Bank::start_with_data(None, Some(cluster), opts);
    let accounts = open(&bank, 10);
    let mut data = bank.0.data.take().expect("a data cluster");
    let frozen = data.master_of_slot(keys::slot(&accounts[0].1)).unwrap();
    let apart: Vec<(Side, String)> =
        accounts.iter().filter(|(_, k)| data.master_of_slot(keys::slot(k)).unwrap() != frozen).cloned().collect();
    // Nor may their transactions keep their home barriers there (in the slot of `{P}`).
    let homes_apart: Vec<bool> =
        (0..PARTITIONS).map(|p| data.master_of_slot(keys::partition_slot(p)).unwrap() != frozen).collect();
    assert!(homes_apart.iter().any(|a| *a), "some partition's home is on another master");
    let any = bank.start_load(&accounts, 4);
    let others = bank.start_load_where(&apart, 2, move |id| homes_apart[keys::partition(id, PARTITIONS) as usize]);
    any.wait_progress(40);
    let at = redtx_common::now_ms();
    eprintln!("SIGSTOP of data node {frozen} at {:?}", started.elapsed());
    let elected_node = data.freeze_and_fail_over(frozen).expect("the cluster fails the master over");
    let elected = redtx_common::now_ms();
    eprintln!("data node {elected_node} is master at {:?}", started.elapsed());
    data.thaw(frozen).expect("the frozen node goes on");
    bank.0.data = Some(data);
    others.wait_progress(40);
    any.wait_progress(40);
    let mut done = any.finish(&bank.rt);
    let apart_done = others.finish(&bank.rt);
    // Created once the participants have met the frozen master (a timeout, 1.5 s), finished
    // before the election: the cluster refuses every slot for a moment before it.
    let meanwhile = apart_done
        .iter()
        .filter(|t| t.record.created_ms > at + 2000 && t.record.finished_ms.is_some_and(|f| f < elected))
        .count();
    assert!(
        meanwhile >= 20,
        "only {meanwhile} transfers between the other masters' accounts ended while data node {frozen} was frozen ({} ms)",
        elected - at
    );
    done.extend(apart_done);
    let (committed, aborted) = check(&bank, &accounts, &mut done);
    eprintln!(
        "{} transfers ({committed} committed, {aborted} aborted; {meanwhile} apart from the frozen master in {} ms of it) in {:?}",
        done.len(),
        elected - at,
        started.elapsed()
    );
}

#[test]
fn a_refused_slot_group_aborts_the_whole_transaction() {
    let opts = ClusterOptions::default().data_on_cluster("bank-a").data_on_cluster("bank-b");
    let bank = Bank::start_with_data(None, Some(data_cluster()), opts);
    let c = bank.data_cluster().unwrap();
    // bank-a's branch: a debit guarded by min 0 that fails, and a credit in another slot (on
    // another master) that could apply; bank-b's branch could apply too.
    let (poor, rich, other) = ("acct:a:{poor}", "acct:a:{rich}", "acct:b:{x}");
    assert_ne!(c.master_of_slot(keys::slot(poor)).unwrap(), c.master_of_slot(keys::slot(rich)).unwrap());
    bank.seed(Side::A, poor, 5);
    bank.seed(Side::A, rich, 100);
    bank.seed(Side::B, other, 100);
    let spec = TxnSpec::new(vec![
        Branch::kv("bank-a", vec![Op::incrby(rich, 10), incrby(poor, -10, Some(0))]),
        Branch::kv("bank-b", vec![Op::incrby(other, -10)]),
    ])
    .with_timeout(Duration::from_secs(10));
    let rec = bank.run(&spec);
    assert_eq!(rec.state, TxnState::Aborted, "{rec:?}");
    let reason = rec.reason.clone().unwrap_or_default();
    assert!(reason.contains(&format!("{poor} would be -5, below min 0")), "{reason}");
    assert_eq!((bank.balance(Side::A, poor), bank.balance(Side::A, rich), bank.balance(Side::B, other)), (5, 100, 100));
    bank.wait_clean();
    // The group that could apply was released, not left prepared; the refused one says why.
    let group = |k: &str| keys::group_barrier(keys::slot(k), "bank-a", &rec.id);
    let state =
        |k: &str| -> Option<String> { bank.data_query("bank-a", redis::cmd("HGET").arg(group(k)).arg("state")) };
    assert_eq!(state(rich).as_deref(), Some("aborted"));
    assert_eq!(state(poor).as_deref(), Some("refused"));
    assert_eq!(bank.barrier_state("bank-a", &rec.id).as_deref(), Some("aborted"), "{}", bank.dump(&rec.id));
    // The keys are free: the same transfer with enough money commits.
    bank.seed(Side::A, poor, 50);
    let rec = bank.run(&spec.with_id(format!("{}-again", rec.id)));
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert_eq!((bank.balance(Side::A, poor), bank.balance(Side::A, rich), bank.balance(Side::B, other)), (40, 110, 90));
    bank.assert_clean();
}

#[test]
fn participants_killed_mid_load_and_between_rounds_lose_and_half_apply_nothing() {
    let started = Instant::now();
    let fp = "participant-between-rounds";
    // Streams and data on one cluster: the participants run with --cluster and no --data.
    let opts = ClusterOptions::default()
        .data_on_cluster("bank-a")
        .data_on_cluster("bank-b")
        .instances("bank-a", 2)
        .instances("bank-b", 2)
        .failpoint("bank-a", fp);
    let mut bank = Bank::start_with_data(Some(data_cluster()), None, opts);
    let accounts = open(&bank, 10);
    let load = bank.start_load(&accounts, 6);
    // bank-a#1 freezes after a round of group calls (prepared or committed groups, home
    // barriers not yet written) and is killed there; bank-a#2 claims its entries.
    bank.bank(Side::A)[0].wait_for_line(&format!("failpoint {fp} reached"), LONG);
    bank.bank(Side::A)[0].kill9();
    load.wait_progress(40);
    // bank-b#1 killed under load; bank-b#2 claims its entries.
    bank.bank(Side::B)[0].kill9();
    load.wait_progress(60);
    let mut done = load.finish(&bank.rt);
    let (committed, aborted) = check(&bank, &accounts, &mut done);
    bank.assert_running(&["coordinator#1", "bank-a#2", "bank-b#2"]);
    // bank-a#1 died holding a batch: bank-a#2 takes it over (bank-b#1 may have held none),
    // if the coordinator's re-sent decisions did not finish those branches first; either way
    // nothing is left.
    bank.bank(Side::A)[1].wait_for_line("took over idle pending entries", LONG);
    bank.wait_clean();
    eprintln!("{} transfers ({committed} committed, {aborted} aborted) in {:?}", done.len(), started.elapsed());
}

/// Stock (`{<sku>}:stock`, `{<sku>}:sold`) and payment (`{<cust>}:bal`, `{<cust>}:spent`) on the
/// data cluster; a saga reserves then charges.
fn order(id: &str, sku: &str, cust: &str, qty: i64, amount: i64) -> TxnSpec {
    let (stock, sold) = (format!("{{{sku}}}:stock"), format!("{{{sku}}}:sold"));
    let (bal, spent) = (format!("{{{cust}}}:bal"), format!("{{{cust}}}:spent"));
    TxnSpec::saga(vec![
        Branch::kv_step(
            "stock",
            vec![incrby(&stock, -qty, Some(0)), Op::incrby(&sold, qty)],
            vec![Op::incrby(&stock, qty), Op::incrby(&sold, -qty)],
        ),
        Branch::kv_step(
            "pay",
            vec![incrby(&bal, -amount, Some(0)), Op::incrby(&spent, amount)],
            vec![Op::incrby(&bal, amount), Op::incrby(&spent, -amount)],
        ),
    ])
    .with_id(id)
    .with_timeout(Duration::from_secs(20))
}

#[test]
fn sagas_on_a_data_cluster_complete_compensate_and_refuse_a_step_over_two_slots() {
    let opts = ClusterOptions::default().data_on_cluster("stock").data_on_cluster("pay");
    let server = ServerOptions { aof: false, ..ServerOptions::default() };
    let shop = Cluster::start_with_data(None, Some(data_cluster()), 1, server, &[("stock", 0), ("pay", 0)], opts);
    let int = |name: &str, key: &str| -> i64 {
        let v: Option<i64> = shop.data_query(name, redis::cmd("GET").arg(key));
        v.unwrap_or(0)
    };
    let _: () = shop.data_query("stock", redis::cmd("SET").arg("{w}:stock").arg(10));
    let _: () = shop.data_query("pay", redis::cmd("SET").arg("{ann}:bal").arg(100));

    let rec = shop.run(&order("o-1", "w", "ann", 2, 30));
    assert_eq!(rec.state, TxnState::Completed, "{rec:?}");
    assert_eq!((int("stock", "{w}:stock"), int("stock", "{w}:sold")), (8, 2));
    assert_eq!((int("pay", "{ann}:bal"), int("pay", "{ann}:spent")), (70, 30));

    // ann cannot pay 80: the stock step is compensated.
    let rec = shop.run(&order("o-2", "w", "ann", 3, 80));
    assert_eq!(rec.state, TxnState::Compensated, "{rec:?}");
    assert_eq!(rec.failed_step, Some(1), "{rec:?}");
    assert_eq!((int("stock", "{w}:stock"), int("stock", "{w}:sold")), (8, 2));
    assert_eq!((int("pay", "{ann}:bal"), int("pay", "{ann}:spent")), (70, 30));

    // A step whose keys span two slots fails, naming them; the saga compensates.
    let wide = TxnSpec::saga(vec![
        Branch::kv_step("stock", vec![Op::incrby("{w}:stock", -1)], vec![Op::incrby("{w}:stock", 1)]),
        Branch::kv_step(
            "pay",
            vec![Op::incrby("bal:bob", -1), Op::incrby("spent:bob", 1)],
            vec![Op::incrby("bal:bob", 1)],
        ),
    ])
    .with_id("o-3")
    .with_timeout(Duration::from_secs(20));
    assert_ne!(keys::slot("bal:bob"), keys::slot("spent:bob"));
    let rec = shop.run(&wide);
    assert_eq!(rec.state, TxnState::Compensated, "{rec:?}");
    let reason = rec.reason.clone().unwrap_or_default();
    assert!(reason.contains("bal:bob") && reason.contains("spent:bob") && reason.contains("hash tag"), "{reason}");
    assert_eq!(int("stock", "{w}:stock"), 8, "the first step was compensated");
    assert_eq!((int("pay", "bal:bob"), int("pay", "spent:bob")), (0, 0));

    // A handful at once, over every partition (enough stock for all of them at once).
    let _: () = shop.data_query("stock", redis::cmd("INCRBY").arg("{w}:stock").arg(100));
    let ids: Vec<String> = (0..10)
        .map(|i| shop.submit(&order(&format!("o-m{i}"), "w", "ann", 1, if i % 3 == 0 { 500 } else { 5 })))
        .collect();
    let mut ended: HashMap<TxnState, usize> = HashMap::new();
    for id in &ids {
        *ended.entry(shop.wait(id).state).or_default() += 1;
    }
    let completed = ended.get(&TxnState::Completed).copied().unwrap_or(0) as i64;
    assert_eq!(ended.get(&TxnState::Compensated).copied().unwrap_or(0), 4, "{ended:?}");
    assert_eq!((int("stock", "{w}:stock"), int("stock", "{w}:sold")), (108 - completed, 2 + completed));
    assert_eq!((int("pay", "{ann}:bal"), int("pay", "{ann}:spent")), (70 - 5 * completed, 30 + 5 * completed));
    shop.assert_clean();
}
