//! The key-value resource with its data on a real 3-master Redis Cluster, driven through the
//! runtime's `settle`: the conformance suite; where the locks and barriers of tricky keys land
//! (checked against the cluster's own `CLUSTER KEYSLOT`); a branch over several slots that
//! commits, or votes no when one group is refused, leaving nothing locked; a branch interrupted
//! between its groups and its home barrier (an ACL that refuses the home barrier, as a crash
//! would leave it) finished by the rerun; an abort that overtakes a half-done prepare; saga
//! steps (one slot each; a step over several slots fails, naming them); a step left `running`
//! settled by its compensation; batching per script and slot; a slot half-way through a move.

mod support;

use redis::cluster_async::ClusterConnection;
use redis::AsyncCommands;
use redtx_common::cluster_server::RedisCluster;
use redtx_common::conn::RedisTarget;
use redtx_common::keys;
use redtx_common::kv::{IncrbyOp, Op};
use redtx_common::protocol::{Outcome, StepKind, StepStatus};
use redtx_participant::conformance;
use redtx_participant::{Answer, KvResource, Request};
use std::collections::BTreeSet;
use support::*;

/// The deployment's partition count in these tests (places the home barriers).
const PARTITIONS: u32 = 8;
const PW: &str = "app-Pw-31d7";

fn cluster() -> RedisCluster {
    RedisCluster::start(3, 0).expect("start the cluster")
}

fn kv_on(c: &RedisCluster) -> KvResource {
    KvResource::on(RedisTarget::parse(&c.seeds(), true).unwrap(), NAME, RETENTION, PARTITIONS)
}

/// The ACL user `app` (password [`PW`]) on every node, allowed the key patterns `keys`.
fn acl(c: &RedisCluster, keys: &[&str]) {
    for i in 0..c.len() {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg("app").arg("on").arg(format!(">{PW}")).arg("resetkeys").arg("&*").arg("+@all");
        for k in keys {
            cmd.arg(format!("~{k}"));
        }
        let _: () = cmd.query(&mut sync_conn(&c.url(i))).unwrap();
    }
}

/// A resource connecting as the ACL user `app`.
fn kv_as_app(c: &RedisCluster) -> KvResource {
    let seeds: Vec<String> = (0..c.len()).map(|i| format!("redis://app:{PW}@127.0.0.1:{}", c.port(i))).collect();
    KvResource::on(RedisTarget::parse(&seeds.join(","), true).unwrap(), NAME, RETENTION, PARTITIONS)
}

fn sync_conn(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

async fn cconn(c: &RedisCluster) -> ClusterConnection {
    redis::cluster::ClusterClient::new(c.seed_urls()).unwrap().get_async_connection().await.unwrap()
}

/// Every key matching `pattern` on every master.
fn scan_all(c: &RedisCluster, pattern: &str) -> Vec<String> {
    let mut out = Vec::new();
    for m in c.masters().unwrap() {
        let mut con = sync_conn(&c.url(m));
        out.extend(scan(&mut con, pattern));
    }
    out
}

/// Every key matching `pattern` on the server of `con`.
fn scan(con: &mut redis::Connection, pattern: &str) -> Vec<String> {
    let found = redis::Commands::scan_match::<_, String>(con, pattern).unwrap();
    found.map(|k| k.unwrap()).collect()
}

/// Locks, and barriers left `prepared` or `running`, on any master.
fn leftovers(c: &RedisCluster) -> Vec<String> {
    let mut out: Vec<String> = scan_all(c, "rtx:lock:*").into_iter().map(|k| format!("lock {k}")).collect();
    for m in c.masters().unwrap() {
        let mut con = sync_conn(&c.url(m));
        for k in scan(&mut con, "rtx:*") {
            if k.starts_with("rtx:lock:") {
                continue;
            }
            let st: Option<String> = redis::Commands::hget(&mut con, &k, "state").unwrap_or(None);
            if matches!(st.as_deref(), Some("prepared" | "running")) {
                out.push(format!("{k} is {st:?}"));
            }
        }
    }
    out
}

/// The slot Redis itself gives `key`.
async fn keyslot(con: &mut ClusterConnection, key: &str) -> u16 {
    redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(con).await.unwrap()
}

/// A hash field of `key`, read on the master that serves its slot.
fn field_on_master(c: &RedisCluster, key: &str, field: &str) -> Option<String> {
    let mut con = sync_conn(&c.master_url_of_key(key).unwrap());
    redis::Commands::hget(&mut con, key, field).unwrap()
}

fn home(txn: &str) -> String {
    keys::home_barrier(keys::partition(txn, PARTITIONS), NAME, txn)
}

fn group(key: &str, txn: &str) -> String {
    keys::group_barrier(keys::slot(key), NAME, txn)
}

fn incrby(key: &str, by: i64, min: Option<i64>) -> Op {
    Op::Incrby(IncrbyOp { key: key.into(), by, min, max: None })
}

fn yes() -> Answer {
    Answer::Vote { yes: true, reason: None }
}

#[tokio::test]
async fn kv_resource_on_a_cluster_passes_the_conformance_suite() {
    let c = cluster();
    let mut fixture = CounterFixture { conn: cconn(&c).await };
    let mut r = kv_on(&c);
    let n = conformance::run(&mut r, &mut fixture).await.unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(n, conformance::RULES.len());
    conformance::run(&mut r, &mut fixture).await.unwrap_or_else(|f| panic!("{f}"));
    // From a resource that did not see the prepares: keys read from the home barriers.
    let mut other = kv_on(&c);
    conformance::run(&mut other, &mut fixture).await.unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(leftovers(&c), Vec::<String>::new());
    // The home barriers are on the masters of their partitions' slots; nothing is under the
    // one-server names.
    assert!(scan_all(&c, "rtx:bar:bank-a:*").is_empty());
    for k in scan_all(&c, "rtx:bar:*") {
        assert!(k.starts_with("rtx:bar:{"), "{k}");
    }
}

#[tokio::test]
async fn locks_and_barriers_of_tricky_keys_land_in_their_groups_slot() {
    let c = cluster();
    let mut con = cconn(&c).await;
    let mut r = kv_on(&c);
    let tricky = ["a{b}c", "{}x", "x{", "}{", "{user1}.bal", "{user1}.spent", "{{x}}", "k{}{y}"];
    for k in &tricky {
        let _: () = con.set(*k, 10).await.unwrap();
    }
    let ops: Vec<Op> = tricky.iter().map(|k| Op::incrby(*k, 1)).collect();
    let slots: BTreeSet<u16> = tricky.iter().map(|k| keys::slot(k)).collect();
    assert!(slots.len() >= 6, "the keys spread over slots: {slots:?}");
    let masters: BTreeSet<usize> = slots.iter().map(|s| c.master_of_slot(*s).unwrap()).collect();
    assert!(masters.len() >= 2, "and over masters: {masters:?}");
    assert_eq!(ask(&mut r, Request::Prepare(prepare("t-tricky", ops))).await, Ok(yes()));
    for k in &tricky {
        let slot = keyslot(&mut con, k).await;
        assert_eq!(slot, keys::slot(k), "our slot of {k:?} is Redis's");
        let lock = keys::cluster_lock(k);
        assert_eq!(keyslot(&mut con, &lock).await, slot, "lock {lock:?}");
        let holder: Option<String> = con.get(&lock).await.unwrap();
        assert_eq!(holder.as_deref(), Some("bank-a t-tricky"), "{lock}");
        let bar = group(k, "t-tricky");
        assert_eq!(keyslot(&mut con, &bar).await, slot, "barrier {bar:?}");
        assert_eq!(field_on_master(&c, &bar, "state").as_deref(), Some("prepared"), "{bar}");
        let v: i64 = con.get(*k).await.unwrap();
        assert_eq!(v, 10, "staged, not applied: {k}");
    }
    let h = home("t-tricky");
    assert_eq!(keyslot(&mut con, &h).await, keys::partition_slot(keys::partition("t-tricky", PARTITIONS)));
    assert_eq!(field_on_master(&c, &h, "state").as_deref(), Some("prepared"));
    // Commit from a resource that did not prepare (the keys come from the home barrier).
    let mut other = kv_on(&c);
    assert_eq!(ask(&mut other, Request::Commit(resolve("t-tricky"))).await, Ok(Answer::Ack(Outcome::Committed)));
    for k in &tricky {
        let v: i64 = con.get(*k).await.unwrap();
        assert_eq!(v, 11, "{k}");
        assert_eq!(field_on_master(&c, &group(k, "t-tricky"), "state").as_deref(), Some("committed"));
    }
    assert_eq!(field_on_master(&c, &h, "state").as_deref(), Some("committed"));
    assert_eq!(leftovers(&c), Vec::<String>::new());
    // A repeat changes nothing.
    assert_eq!(ask(&mut r, Request::Commit(resolve("t-tricky"))).await, Ok(Answer::Ack(Outcome::Committed)));
    let v: i64 = con.get("a{b}c").await.unwrap();
    assert_eq!(v, 11);
}

#[tokio::test]
async fn a_refused_group_refuses_the_whole_branch_and_releases_the_others() {
    let c = cluster();
    let mut con = cconn(&c).await;
    let mut r = kv_on(&c);
    // Three groups; the debit of {b} would go below 0.
    let _: () = con.set("{a}acct", 100).await.unwrap();
    let _: () = con.set("{b}acct", 5).await.unwrap();
    let _: () = con.set("{c}acct", 100).await.unwrap();
    let ops = vec![incrby("{a}acct", -10, Some(0)), incrby("{b}acct", -10, Some(0)), Op::incrby("{c}acct", 20)];
    let p = Request::Prepare(prepare("t-no", ops));
    let answer = ask(&mut r, p.clone()).await.unwrap();
    match &answer {
        Answer::Vote { yes: false, reason: Some(why) } => {
            assert!(why.contains("{b}acct would be -5, below min 0"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    // Nothing applied, nothing locked; every group finished, the home barrier refused.
    for (k, v) in [("{a}acct", 100), ("{b}acct", 5), ("{c}acct", 100)] {
        let got: i64 = con.get(k).await.unwrap();
        assert_eq!(got, v, "{k}");
    }
    assert_eq!(leftovers(&c), Vec::<String>::new());
    assert_eq!(field_on_master(&c, &group("{b}acct", "t-no"), "state").as_deref(), Some("refused"));
    for k in ["{a}acct", "{c}acct"] {
        assert_eq!(field_on_master(&c, &group(k, "t-no"), "state").as_deref(), Some("aborted"), "{k}");
    }
    assert_eq!(field_on_master(&c, &home("t-no"), "state").as_deref(), Some("refused"));
    // A repeat votes no again; the abort is acknowledged; the keys are free for others.
    assert_eq!(ask(&mut r, p).await.unwrap(), answer);
    assert_eq!(ask(&mut r, Request::Abort(resolve("t-no"))).await, Ok(Answer::Ack(Outcome::Aborted)));
    assert_eq!(field_on_master(&c, &home("t-no"), "state").as_deref(), Some("aborted"));
    let ok = vec![incrby("{a}acct", -10, Some(0)), Op::incrby("{c}acct", 10)];
    assert_eq!(ask(&mut r, Request::Prepare(prepare("t-ok", ok))).await, Ok(yes()));
    assert_eq!(ask(&mut r, Request::Abort(resolve("t-ok"))).await, Ok(Answer::Ack(Outcome::Aborted)));
    assert_eq!(leftovers(&c), Vec::<String>::new());
}

#[tokio::test]
async fn a_branch_cut_between_its_groups_and_its_home_barrier_is_finished_by_the_rerun() {
    let c = cluster();
    let mut con = cconn(&c).await;
    let _: () = con.set("acct:{x}", 50).await.unwrap();
    let _: () = con.set("acct:{y}", 50).await.unwrap();
    let ops = vec![incrby("acct:{x}", -20, Some(0)), Op::incrby("acct:{y}", 20)];
    let all = ["*"];
    let no_home = ["rtx:grp:*", "rtx:lock:*", "acct*"];

    // Prepare: the groups are prepared, the home barrier is refused to us (as if we died).
    acl(&c, &no_home);
    let mut app = kv_as_app(&c);
    let p = Request::Prepare(prepare("t-cut", ops.clone()));
    let cut = ask(&mut app, p.clone()).await;
    assert!(matches!(&cut, Err(e) if e.contains("NOPERM") || e.contains("permission")), "{cut:?}");
    assert_eq!(field_on_master(&c, &group("acct:{x}", "t-cut"), "state").as_deref(), Some("prepared"));
    assert_eq!(field_on_master(&c, &home("t-cut"), "state"), None);
    // The rerun (any instance) finds the groups prepared and votes yes.
    acl(&c, &all);
    let mut r = kv_on(&c);
    assert_eq!(ask(&mut app, p).await, Ok(yes()));

    // Commit: the groups are committed, the home barrier is refused to us.
    acl(&c, &no_home);
    let cut = ask(&mut app, Request::Commit(resolve("t-cut"))).await;
    assert!(cut.is_err(), "{cut:?}");
    let x: i64 = con.get("acct:{x}").await.unwrap();
    assert_eq!(x, 30, "the groups committed");
    assert_eq!(field_on_master(&c, &home("t-cut"), "state").as_deref(), Some("prepared"));
    acl(&c, &all);
    assert_eq!(ask(&mut r, Request::Commit(resolve("t-cut"))).await, Ok(Answer::Ack(Outcome::Committed)));
    let (x, y): (i64, i64) = (con.get("acct:{x}").await.unwrap(), con.get("acct:{y}").await.unwrap());
    assert_eq!((x, y), (30, 70), "applied once");
    assert_eq!(leftovers(&c), Vec::<String>::new());

    // An abort that overtakes a prepare cut after its groups: the abort leaves a tombstone on
    // the home barrier; the prepare's rerun votes no and releases the groups it had locked.
    acl(&c, &no_home);
    let p = Request::Prepare(prepare("t-late", ops.clone()));
    let cut = ask(&mut app, p.clone()).await;
    assert!(cut.is_err(), "{cut:?}");
    let held: Option<String> = con.get(keys::cluster_lock("acct:{x}")).await.unwrap();
    assert_eq!(held.as_deref(), Some("bank-a t-late"));
    acl(&c, &all);
    assert_eq!(ask(&mut r, Request::Abort(resolve("t-late"))).await, Ok(Answer::Ack(Outcome::Aborted)));
    let rerun = ask(&mut r, p).await.unwrap();
    assert!(matches!(&rerun, Answer::Vote { yes: false, .. }), "{rerun:?}");
    assert_eq!(leftovers(&c), Vec::<String>::new());
    for k in ["acct:{x}", "acct:{y}"] {
        assert_eq!(field_on_master(&c, &group(k, "t-late"), "state").as_deref(), Some("aborted"), "{k}");
    }

    // A prepare past its deadline, after a cut: the home barrier refused, then the groups
    // released.
    acl(&c, &no_home);
    let mut late = prepare("t-slow", ops);
    late.deadline_ms = redtx_common::now_ms() + 300;
    assert!(ask(&mut app, Request::Prepare(late.clone())).await.is_err());
    acl(&c, &all);
    while redtx_common::now_ms() <= late.deadline_ms {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let answer = ask(&mut r, Request::Prepare(late)).await.unwrap();
    assert!(
        matches!(&answer, Answer::Vote { yes: false, reason: Some(w) } if w.contains("after the deadline")),
        "{answer:?}"
    );
    assert_eq!(leftovers(&c), Vec::<String>::new());
    let (x, y): (i64, i64) = (con.get("acct:{x}").await.unwrap(), con.get("acct:{y}").await.unwrap());
    assert_eq!((x, y), (30, 70));
}

#[tokio::test]
async fn saga_steps_run_in_one_slot_and_a_running_step_is_settled_by_its_compensation() {
    let c = cluster();
    let mut con = cconn(&c).await;
    let mut r = kv_on(&c);
    let _: () = con.set("{o7}stock", 10).await.unwrap();
    let action = vec![incrby("{o7}stock", -3, Some(0)), Op::incrby("{o7}sold", 3)];
    let undo = vec![Op::incrby("{o7}stock", 3), Op::incrby("{o7}sold", -3)];
    let done = Answer::Step { step: StepKind::Action, status: StepStatus::Done, reason: None };
    assert_eq!(ask(&mut r, Request::Execute(execute("s-1", action.clone()))).await, Ok(done.clone()));
    assert_eq!(ask(&mut r, Request::Execute(execute("s-1", action.clone()))).await, Ok(done), "a repeat");
    let (stock, sold): (i64, i64) = (con.get("{o7}stock").await.unwrap(), con.get("{o7}sold").await.unwrap());
    assert_eq!((stock, sold), (7, 3));
    let comp = Answer::Step { step: StepKind::Compensation, status: StepStatus::Done, reason: None };
    assert_eq!(ask(&mut r, Request::Compensate(execute("s-1", undo.clone()))).await, Ok(comp.clone()));
    assert_eq!(ask(&mut r, Request::Compensate(execute("s-1", undo.clone()))).await, Ok(comp), "a repeat");
    let (stock, sold): (i64, i64) = (con.get("{o7}stock").await.unwrap(), con.get("{o7}sold").await.unwrap());
    assert_eq!((stock, sold), (10, 0), "undone once");
    assert_eq!(field_on_master(&c, &home("s-1"), "state").as_deref(), Some("compensated"));

    // A step over two slots fails, naming its keys; nothing applied.
    let wide = vec![incrby("stock:a", -1, Some(0)), Op::incrby("sold:a", 1)];
    assert_ne!(keys::slot("stock:a"), keys::slot("sold:a"));
    let failed = ask(&mut r, Request::Execute(execute("s-2", wide))).await.unwrap();
    match &failed {
        Answer::Step { status: StepStatus::Failed, reason: Some(why), .. } => {
            assert!(why.contains("stock:a") && why.contains("sold:a") && why.contains("hash tag"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    let sold: Option<i64> = con.get("sold:a").await.unwrap();
    assert_eq!(sold, None);

    // A step left running (its home barrier written, its action refused to us, as if we died):
    // the compensation tombstones the action, the step is compensated with nothing to undo, and
    // the late action is refused.
    acl(&c, &["rtx:bar:*"]);
    let mut app = kv_as_app(&c);
    assert!(ask(&mut app, Request::Execute(execute("s-3", action.clone()))).await.is_err());
    assert_eq!(field_on_master(&c, &home("s-3"), "state").as_deref(), Some("running"));
    acl(&c, &["*"]);
    let skipped = ask(&mut r, Request::Compensate(execute("s-3", undo.clone()))).await.unwrap();
    assert!(matches!(&skipped, Answer::Step { status: StepStatus::Skipped, .. }), "{skipped:?}");
    let late = ask(&mut r, Request::Execute(execute("s-3", action.clone()))).await.unwrap();
    assert!(matches!(&late, Answer::Step { status: StepStatus::Failed, .. }), "{late:?}");
    let stock: i64 = con.get("{o7}stock").await.unwrap();
    assert_eq!(stock, 10, "the action never ran");

    // A step left running is resumed by the action's rerun.
    acl(&c, &["rtx:bar:*"]);
    assert!(ask(&mut app, Request::Execute(execute("s-4", action.clone()))).await.is_err());
    acl(&c, &["*"]);
    let resumed = ask(&mut r, Request::Execute(execute("s-4", action))).await;
    assert_eq!(resumed, Ok(Answer::Step { step: StepKind::Action, status: StepStatus::Done, reason: None }));
    let stock: i64 = con.get("{o7}stock").await.unwrap();
    assert_eq!(stock, 7);
    assert_eq!(leftovers(&c), Vec::<String>::new());
}

/// `EVALSHA` calls served by all masters so far.
fn evalsha_calls(c: &RedisCluster) -> u64 {
    c.masters()
        .unwrap()
        .into_iter()
        .map(|m| {
            let info: String = redis::cmd("INFO").arg("commandstats").query(&mut sync_conn(&c.url(m))).unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
                .and_then(|rest| rest.split(',').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        })
        .sum()
}

#[tokio::test]
async fn a_batch_is_one_call_per_script_and_slot() {
    let c = cluster();
    let mut r = kv_on(&c);
    // Warm up (connect, load the scripts).
    assert_eq!(ask(&mut r, Request::Prepare(prepare("warm", vec![Op::incrby("{w}k", 1)]))).await, Ok(yes()));
    // 40 branches of 40 transactions, all their keys in one slot: one prepare call for the
    // groups, then the home barriers, one call per partition slot.
    let reqs: Vec<Request> = (0..40)
        .map(|i| Request::Prepare(prepare(&format!("b-{i}"), vec![Op::incrby(format!("{{same}}k{i}"), 1)])))
        .collect();
    let before = evalsha_calls(&c);
    let answers = redtx_participant::worker::settle(&mut r, &reqs, redtx_common::now_ms()).await.unwrap();
    assert!(answers.iter().all(|a| *a == Ok(yes())), "{answers:?}");
    let calls = evalsha_calls(&c) - before;
    assert!(calls <= 1 + u64::from(PARTITIONS), "{calls} EVALSHA calls for 40 prepares");
    let reqs: Vec<Request> = (0..40).map(|i| Request::Commit(resolve(&format!("b-{i}")))).collect();
    let before = evalsha_calls(&c);
    let answers = redtx_participant::worker::settle(&mut r, &reqs, redtx_common::now_ms()).await.unwrap();
    assert!(answers.iter().all(|a| *a == Ok(Answer::Ack(Outcome::Committed))), "{answers:?}");
    let calls = evalsha_calls(&c) - before;
    assert!(calls <= 1 + u64::from(PARTITIONS), "{calls} EVALSHA calls for 40 commits");
}

#[tokio::test]
async fn a_group_in_a_slot_on_the_move_stays_pending_and_goes_through_after() {
    let c = cluster();
    let mut con = cconn(&c).await;
    let mut r = kv_on(&c);
    let key = "acct:{mv}";
    let _: () = con.set(key, 10).await.unwrap();
    let _: () = con.set("acct:{stay}", 10).await.unwrap();
    let slot = keys::slot(key);
    let from = c.master_of_slot(slot).unwrap();
    let to = c.masters().unwrap().into_iter().find(|m| *m != from).unwrap();
    // Half-way: the account moved, its lock and barrier (not yet written) would be created on
    // the source; a script needing both answers TRYAGAIN, so the branch stays pending.
    let mut mv = c.begin_move(slot, to).unwrap().expect("another master");
    mv.migrate(&c, &[key.as_bytes().to_vec()]).unwrap();
    let ops = vec![incrby(key, -5, Some(0)), Op::incrby("acct:{stay}", 5)];
    let p = Request::Prepare(prepare("t-mv", ops));
    let during = ask(&mut r, p.clone()).await;
    assert!(during.is_err(), "{during:?}");
    mv.finish(&c).unwrap();
    assert_eq!(c.master_of_slot(slot).unwrap(), to);
    assert_eq!(ask(&mut r, p).await, Ok(yes()));
    assert_eq!(ask(&mut r, Request::Commit(resolve("t-mv"))).await, Ok(Answer::Ack(Outcome::Committed)));
    let (a, b): (i64, i64) = (con.get(key).await.unwrap(), con.get("acct:{stay}").await.unwrap());
    assert_eq!((a, b), (5, 15));
    assert_eq!(leftovers(&c), Vec::<String>::new());
}

#[test]
fn data_flags_that_do_not_match_the_data_redis_exit_2() {
    const BIN: &str = env!("CARGO_BIN_EXE_redtx-participant");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN).args(["--name", NAME]).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let help = std::process::Command::new(BIN).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--data-cluster"));
    // A list of nodes without --data-cluster.
    let (code, err) = run(&["--data", "redis://:hunter2@127.0.0.1:1,redis://127.0.0.1:2"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--data-cluster") && !err.contains("hunter2"), "{err}");
    // --data-cluster with nothing to describe.
    let (code, err) = run(&["--redis", "redis://127.0.0.1:1", "--data-cluster"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--data-cluster"), "{err}");
    // A plain server given as a cluster, and a cluster node given as a plain server.
    let plain = server();
    let c = cluster();
    let (code, err) = run(&["--redis", &plain.url(), "--data", &plain.url(), "--data-cluster"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a Redis Cluster node"), "{err}");
    let (code, err) = run(&["--redis", &plain.url(), "--data", &c.url(0)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("a Redis Cluster node") && err.contains("--data-cluster"), "{err}");
}

/// `EVALSHA` calls served by the server at `url` so far.
fn evalsha_calls_at(url: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(&mut sync_conn(url)).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Prepares then commits `n` branches of `keys` keys each (random accounts) in batches of
/// `batch`; returns the seconds it took.
async fn prepare_commit(r: &mut KvResource, tag: &str, n: usize, batch: usize, keys: usize) -> f64 {
    let started = std::time::Instant::now();
    for b in 0..n / batch {
        let ids: Vec<String> = (0..batch).map(|i| format!("m-{tag}-{b}-{i}")).collect();
        let prepares: Vec<Request> = ids
            .iter()
            .map(|id| {
                let ops = (0..keys).map(|k| Op::incrby(format!("acct:{id}:{k}"), 1)).collect();
                Request::Prepare(prepare(id, ops))
            })
            .collect();
        let votes = redtx_participant::worker::settle(r, &prepares, redtx_common::now_ms()).await.unwrap();
        assert!(votes.iter().all(|v| *v == Ok(yes())), "{votes:?}");
        let commits: Vec<Request> = ids.iter().map(|id| Request::Commit(resolve(id))).collect();
        let acks = redtx_participant::worker::settle(r, &commits, redtx_common::now_ms()).await.unwrap();
        assert!(acks.iter().all(|a| *a == Ok(Answer::Ack(Outcome::Committed))), "{acks:?}");
    }
    started.elapsed().as_secs_f64()
}

/// Not a check: prints what a branch costs with its data on one server and on a 3-master
/// cluster, measured alternately in one run (`cargo test -p redtx-participant --test
/// cluster_data measure -- --ignored --nocapture`).
#[tokio::test]
#[ignore]
async fn measure_branches_on_one_server_and_on_a_cluster() {
    let (n, batch) = (4000, 200);
    let s = server();
    let c = cluster();
    let mut single = kv(&s);
    let mut on_cluster = kv_on(&c);
    for round in 0..3 {
        for keys in [1, 2] {
            let calls0 = evalsha_calls_at(&s.url());
            let t_single = prepare_commit(&mut single, &format!("s{round}k{keys}"), n, batch, keys).await;
            let calls_single = evalsha_calls_at(&s.url()) - calls0;
            let calls0 = evalsha_calls(&c);
            let t_cluster = prepare_commit(&mut on_cluster, &format!("c{round}k{keys}"), n, batch, keys).await;
            let calls_cluster = evalsha_calls(&c) - calls0;
            println!(
                "round {round}, {keys} key(s) per branch: cluster time / one-server time = {:.2}; \
                 EVALSHA per branch (prepare + commit): one server {:.3}, cluster {:.3}",
                t_cluster / t_single,
                calls_single as f64 / n as f64,
                calls_cluster as f64 / n as f64
            );
        }
    }
}
