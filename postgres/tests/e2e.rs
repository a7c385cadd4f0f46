//! One transaction across a Redis key and a PostgreSQL row, through the real binaries: commit,
//! abort on each kind of PostgreSQL failure, `kill -9` after prepare and after the decision, a
//! concurrent transfer load with a participant killed, and a saga that compensates on
//! PostgreSQL.

use redtx_common::failpoint::FAILPOINT_ENV;
use redtx_common::pg_server::PgServer;
use redtx_common::record::{TxnRecord, TxnState};
use redtx_common::server::ServerOptions;
use redtx_common::spec::{Branch, TxnSpec};
use redtx_participant::{AFTER_COMMIT, AFTER_PREPARE};
use redtx_postgres::{payload, Statement};
use redtx_tests::*;
use serde_json::json;
use std::time::Duration;

/// The Redis account (at `bank-a`) and the PostgreSQL account (at `ledger`).
const ALICE: &str = "acct:alice";
const CAROL: &str = "carol";

/// A deployment: Redis servers, a coordinator, `bank-a` (Redis) and `ledger` (PostgreSQL).
struct Mixed {
    c: Cluster,
    pg: PgServer,
    sql: tokio_postgres::Client,
    ledger: Vec<Proc>,
}

impl Mixed {
    fn start(failpoint: Option<&str>) -> Mixed {
        let c = Cluster::start(2, ServerOptions::default(), &[("bank-a", 1)], ClusterOptions::default());
        let pg = PgServer::start().expect("PostgreSQL starts (scripts/test.sh installs it)");
        let sql = connect(&c, &pg);
        let mut m = Mixed { c, pg, sql, ledger: Vec::new() };
        m.exec(
            "CREATE TABLE accounts (id text PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));
             INSERT INTO accounts VALUES ('carol', 1000)",
        );
        m.c.bank_seed(ALICE, 1000);
        m.start_ledger(failpoint);
        m
    }

    fn start_ledger(&mut self, failpoint: Option<&str>) -> &mut Proc {
        let p = spawn_ledger(&self.c, &self.pg, self.ledger.len() + 1, failpoint);
        self.ledger.push(p);
        self.ledger.last_mut().unwrap()
    }

    /// A new SQL connection (after a PostgreSQL restart).
    fn reconnect(&mut self) {
        self.sql = connect(&self.c, &self.pg);
    }

    fn exec(&self, q: &str) {
        self.c.rt.block_on(self.sql.batch_execute(q)).unwrap_or_else(|e| panic!("{q}: {e}"));
    }

    fn carol(&self) -> i64 {
        let row =
            self.c.rt.block_on(self.sql.query_one("SELECT balance FROM accounts WHERE id = $1", &[&CAROL])).unwrap();
        row.get(0)
    }

    fn alice(&self) -> i64 {
        self.c.bank_int(ALICE)
    }

    fn prepared(&self) -> Vec<String> {
        let rows = self.c.rt.block_on(self.sql.query("SELECT gid FROM pg_prepared_xacts", &[])).unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Waits for `id`, then checks nothing is left locked or prepared anywhere.
    fn finish(&self, id: &str) -> TxnRecord {
        let rec = self.c.wait(id);
        self.c.wait_clean();
        assert!(self.prepared().is_empty(), "prepared transactions left: {:?}", self.prepared());
        rec
    }
}

/// Starts instance `n` of the `ledger` participant (`redtx-postgres`) and waits until it works.
fn spawn_ledger(c: &Cluster, pg: &PgServer, n: usize, failpoint: Option<&str>) -> Proc {
    spawn_ledger_with(c, pg, n, failpoint, &[])
}

fn spawn_ledger_with(c: &Cluster, pg: &PgServer, n: usize, failpoint: Option<&str>, extra: &[&str]) -> Proc {
    let mut args: Vec<String> =
        ["--redis", &c.url(), "--name", "ledger", "--postgres", &pg.url()].iter().map(|s| s.to_string()).collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(partitions_args());
    args.extend(FAST_PART.iter().map(|s| s.to_string()));
    let envs: Vec<(&str, &str)> = failpoint.map(|f| vec![(FAILPOINT_ENV, f)]).unwrap_or_default();
    let mut p = Proc::spawn(&format!("ledger#{n}"), &bin("redtx-postgres"), &args, &envs);
    p.wait_for_line("applying branches to this PostgreSQL", LONG);
    p
}

fn connect(c: &Cluster, pg: &PgServer) -> tokio_postgres::Client {
    let url = pg.url();
    c.rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    })
}

/// `amount` from alice (Redis, guarded at 0) to carol (PostgreSQL, exactly one row).
fn to_carol(amount: i64) -> TxnSpec {
    redis_to_pg(ALICE, CAROL, amount)
}

/// `amount` from carol (guarded by the SQL and the row count) to alice.
fn to_alice(amount: i64) -> TxnSpec {
    pg_to_redis(CAROL, ALICE, amount)
}

fn redis_to_pg(from: &str, to: &str, amount: i64) -> TxnSpec {
    TxnSpec::new(vec![
        Branch::kv("bank-a", vec![incrby(from, -amount, Some(0), None)]),
        ledger(vec![Statement::new(
            "UPDATE accounts SET balance = balance + $1 WHERE id = $2",
            vec![json!(amount), json!(to)],
        )
        .rows(1)]),
    ])
}

fn pg_to_redis(from: &str, to: &str, amount: i64) -> TxnSpec {
    TxnSpec::new(vec![
        ledger(vec![Statement::new(
            "UPDATE accounts SET balance = balance - $1 WHERE id = $2 AND balance >= $1",
            vec![json!(amount), json!(from)],
        )
        .rows(1)]),
        Branch::kv("bank-a", vec![incrby(to, amount, None, None)]),
    ])
}

fn ledger(statements: Vec<Statement>) -> Branch {
    Branch { participant: "ledger".into(), payload: payload::encode(&statements), compensation: None, after: None }
}

trait BankA {
    fn bank_seed(&self, key: &str, n: i64);
    fn bank_int(&self, key: &str) -> i64;
}

impl BankA for Cluster {
    fn bank_seed(&self, key: &str, n: i64) {
        redis::cmd("SET").arg(key).arg(n).query::<()>(&mut self.data_conn("bank-a")).unwrap();
    }
    fn bank_int(&self, key: &str) -> i64 {
        redis::cmd("GET").arg(key).query::<Option<i64>>(&mut self.data_conn("bank-a")).unwrap().unwrap_or(0)
    }
}

#[test]
fn one_transaction_changes_a_redis_key_and_a_postgres_row() {
    let m = Mixed::start(None);
    let rec = m.finish(&m.c.submit(&to_carol(30)));
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert_eq!((m.alice(), m.carol()), (970, 1030));
    let rec = m.finish(&m.c.submit(&to_alice(50)));
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert_eq!((m.alice(), m.carol()), (1020, 980));
    // The barrier rows say what happened.
    let rows =
        m.c.rt.block_on(m.sql.query("SELECT state FROM redtx_barrier WHERE participant = 'ledger'", &[])).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.get::<_, String>(0) == "committed"));
}

#[test]
fn every_kind_of_postgres_failure_aborts_with_its_message() {
    let m = Mixed::start(None);
    let bad = |sql: &str, params: Vec<serde_json::Value>, rows: Option<u64>| {
        TxnSpec::new(vec![
            Branch::kv("bank-a", vec![incrby(ALICE, -10, Some(0), None)]),
            ledger(vec![Statement { sql: sql.into(), params, rows }]),
        ])
    };
    let cases = [
        (
            bad("UPDATE acounts SET balance = balance + 10", vec![], None),
            r#"relation "acounts" does not exist (SQLSTATE 42P01)"#,
        ),
        (
            bad("UPDATE accounts SET balance = balance - $1 WHERE id = $2", vec![json!(5000), json!(CAROL)], None),
            "violates check constraint",
        ),
        (
            bad("UPDATE accounts SET balance = balance + 10 WHERE id = $1", vec![json!("nobody")], Some(1)),
            "statement 0 changed 0 rows, expected 1",
        ),
        (
            bad("UPDATE accounts SET balance = balance + $1 WHERE id = $2", vec![json!("ten"), json!(CAROL)], None),
            "parameter $1 is int8: expected a whole number",
        ),
    ];
    for (spec, message) in cases {
        let rec = m.finish(&m.c.submit(&spec));
        assert_eq!(rec.state, TxnState::Aborted, "{rec:?}");
        let reason = rec.reason.clone().unwrap_or_default();
        assert!(reason.contains("ledger: ") && reason.contains(message), "{reason:?} should carry {message:?}");
    }
    // A payload that is not a list of statements.
    let mut spec = to_carol(10);
    spec.branches[1].payload = rmp_serde::to_vec_named(&json!({"sql": "SELECT 1"})).unwrap();
    let rec = m.finish(&m.c.submit(&spec));
    assert!(rec.reason.as_deref().unwrap_or("").contains("not a list of statements"), "{rec:?}");
    assert_eq!((m.alice(), m.carol()), (1000, 1000), "nothing applied on either side");
}

#[test]
fn kill9_after_prepare_then_restart_finishes_the_prepared_transaction() {
    let mut m = Mixed::start(Some(AFTER_PREPARE));
    let id = m.c.submit(&to_carol(25).with_timeout(Duration::from_secs(60)));
    m.ledger[0].wait_for_line(&format!("failpoint {AFTER_PREPARE} reached"), LONG);
    m.ledger[0].kill9();
    // PostgreSQL holds the branch prepared: its locks stay, its change is invisible.
    let gids = m.prepared();
    assert_eq!(gids.len(), 1, "{gids:?}");
    assert!(gids[0].starts_with("redtx:") && gids[0].ends_with(&format!(":ledger:{id}")), "{gids:?}");
    assert_eq!(m.carol(), 1000);
    // A second kill, of PostgreSQL itself: the prepared transaction survives its recovery.
    m.pg.kill();
    m.pg.restart().unwrap();
    m.reconnect();
    assert_eq!(m.prepared(), gids);
    m.start_ledger(None);
    let rec = m.finish(&id);
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert_eq!((m.alice(), m.carol()), (975, 1025));
}

#[test]
fn kill9_after_the_decision_then_restart_applies_it_once() {
    let mut m = Mixed::start(Some(AFTER_COMMIT));
    let id = m.c.submit(&to_carol(40));
    m.ledger[0].wait_for_line(&format!("failpoint {AFTER_COMMIT} reached"), LONG);
    m.ledger[0].kill9();
    // Committed in PostgreSQL, not acknowledged: the restarted worker finds the barrier.
    assert!(m.prepared().is_empty());
    assert_eq!(m.carol(), 1040);
    m.start_ledger(None);
    let rec = m.finish(&id);
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert_eq!((m.alice(), m.carol()), (960, 1040), "applied once");
}

#[test]
fn concurrent_transfers_between_redis_and_postgres_conserve_money() {
    let mut m = Mixed::start(None);
    // Eight accounts on each side, 300 each; transfers both ways between random pairs.
    const N: usize = 8;
    for i in 0..N {
        m.c.bank_seed(&format!("acct:r{i}"), 300);
        m.exec(&format!("INSERT INTO accounts VALUES ('p{i}', 300)"));
    }
    let total = |m: &Mixed| -> i64 {
        let redis: i64 = (0..N).map(|i| m.c.bank_int(&format!("acct:r{i}"))).sum();
        let row =
            m.c.rt
                .block_on(m.sql.query_one("SELECT sum(balance)::bigint FROM accounts WHERE id LIKE 'p%'", &[]))
                .unwrap();
        redis + row.get::<_, i64>(0)
    };
    let before = total(&m);
    // Eight producers, each submitting 20 transfers one after the other (closed loop); a kill -9
    // of the PostgreSQL participant once 40 have ended, and a fresh one started.
    let done = std::sync::atomic::AtomicUsize::new(0);
    let (c, pg, ledger) = (&m.c, &m.pg, &mut m.ledger);
    let outcomes: Vec<TxnState> = std::thread::scope(|s| {
        let producers: Vec<_> = (0..8)
            .map(|t| {
                let done = &done;
                s.spawn(move || {
                    (0..20)
                        .map(|i| {
                            let (r, p) = random_pair(N);
                            let amount = 1 + ((t * 20 + i) as i64 * 37) % 150;
                            let (r, p) = (format!("acct:r{r}"), format!("p{p}"));
                            let spec =
                                if i % 2 == 0 { redis_to_pg(&r, &p, amount) } else { pg_to_redis(&p, &r, amount) };
                            let rec = c.wait(&c.submit(&spec));
                            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            rec.state
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        poll("40 transfers ended", LONG, || (done.load(std::sync::atomic::Ordering::SeqCst) >= 40).then_some(()));
        ledger[0].kill9();
        ledger.push(spawn_ledger(c, pg, 2, None));
        producers.into_iter().flat_map(|p| p.join().unwrap()).collect()
    });
    let committed = outcomes.iter().filter(|s| **s == TxnState::Committed).count();
    assert!(outcomes.iter().all(|s| matches!(s, TxnState::Committed | TxnState::Aborted)), "{outcomes:?}");
    m.c.wait_clean();
    assert!(m.prepared().is_empty(), "prepared transactions left: {:?}", m.prepared());
    assert_eq!(total(&m), before, "money conserved");
    // Conflicts (a key or row held by another transaction) vote no: about half commit here.
    assert!(committed >= outcomes.len() / 5, "only {committed} of {} committed", outcomes.len());
    eprintln!("{committed} of {} transfers committed", outcomes.len());
}

#[test]
fn a_saga_compensates_its_postgres_step() {
    let m = Mixed::start(None);
    let debit = |n: i64| {
        vec![Statement::new(
            "UPDATE accounts SET balance = balance - $1 WHERE id = $2 AND balance >= $1",
            vec![json!(n), json!(CAROL)],
        )
        .rows(1)]
    };
    let credit = |n: i64| {
        vec![Statement::new("UPDATE accounts SET balance = balance + $1 WHERE id = $2", vec![json!(n), json!(CAROL)])
            .rows(1)]
    };
    let saga = |n: i64, redis_min: i64| {
        TxnSpec::saga(vec![
            Branch {
                participant: "ledger".into(),
                payload: payload::encode(&debit(n)),
                compensation: Some(payload::encode(&credit(n))),
                after: None,
            },
            Branch::kv_step(
                "bank-a",
                vec![incrby(ALICE, n, None, Some(redis_min))],
                vec![incrby(ALICE, -n, None, None)],
            ),
        ])
    };
    let rec = m.finish(&m.c.submit(&saga(100, 5000)));
    assert_eq!(rec.state, TxnState::Completed, "{rec:?}");
    assert_eq!((m.alice(), m.carol()), (1100, 900));
    // The Redis step refuses (max 1000): the PostgreSQL step is compensated.
    let rec = m.finish(&m.c.submit(&saga(100, 1000)));
    assert_eq!(rec.state, TxnState::Compensated, "{rec:?}");
    assert_eq!((m.alice(), m.carol()), (1100, 900));
    let rows = m.c.rt.block_on(m.sql.query("SELECT state FROM redtx_barrier ORDER BY at_ms", &[])).unwrap();
    let states: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(states, ["done", "compensated"]);
}

#[test]
fn prepared_transactions_whose_decision_cannot_arrive_are_finished_from_their_records() {
    let mut m = Mixed::start(None);
    let dep: String = redis::cmd("GET").arg("rtx:deployment").query(&mut m.c.stream_conn()).unwrap();
    m.ledger[0].kill9();
    // Three transactions PostgreSQL holds prepared, with no decision message to come: one whose
    // record says committing, one with no record at all, and one of another deployment.
    m.exec(&format!(
        "BEGIN; INSERT INTO accounts VALUES ('dave', 7); PREPARE TRANSACTION 'redtx:{dep}:ledger:decided-1'"
    ));
    m.exec(&format!("BEGIN; UPDATE accounts SET balance = balance + 500 WHERE id = 'carol'; PREPARE TRANSACTION 'redtx:{dep}:ledger:orphan-1'"));
    m.exec("BEGIN; INSERT INTO accounts VALUES ('erin', 9); PREPARE TRANSACTION 'redtx:elsewhere:ledger:orphan-2'");
    redis::cmd("HSET")
        .arg(record_key("decided-1"))
        .arg("state")
        .arg("committing")
        .query::<()>(&mut m.c.stream_conn())
        .unwrap();
    let p = spawn_ledger_with(&m.c, &m.pg, 2, None, &["--orphan-after", "1s"]);
    m.ledger.push(p);
    // The rollback and its tombstone are two statements: wait for both.
    let tombstone = || {
        let rows = m.c.rt.block_on(m.sql.query("SELECT txn, state FROM redtx_barrier ORDER BY txn", &[])).unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect::<Vec<(String, String)>>()
    };
    poll("the sweep finishes this deployment's two", LONG, || {
        (m.prepared() == ["redtx:elsewhere:ledger:orphan-2"] && !tombstone().is_empty()).then_some(())
    });
    let dave = m.c.rt.block_on(m.sql.query_opt("SELECT balance FROM accounts WHERE id = 'dave'", &[])).unwrap();
    assert_eq!(dave.map(|r| r.get::<_, i64>(0)), Some(7), "the decided one committed");
    assert_eq!(m.carol(), 1000, "the orphan rolled back");
    assert_eq!(tombstone(), [("orphan-1".to_string(), "aborted".to_string())], "a tombstone for the orphan");
    // Logged once each is done (just after its tombstone).
    m.ledger[1].wait_for_line("finished a prepared transaction whose decision message had not arrived", LONG);
    m.exec("ROLLBACK PREPARED 'redtx:elsewhere:ledger:orphan-2'");
}

#[test]
fn a_postgres_step_without_a_compensation_is_stuck_visibly_not_silently_kept() {
    let m = Mixed::start(None);
    let debit = vec![Statement::new(
        "UPDATE accounts SET balance = balance - $1 WHERE id = $2 AND balance >= $1",
        vec![json!(100), json!(CAROL)],
    )
    .rows(1)];
    // The PostgreSQL step has no compensation (a JSON `null`); the Redis step then fails.
    let mut saga = TxnSpec::saga(vec![
        Branch {
            participant: "ledger".into(),
            payload: payload::encode(&debit),
            compensation: Some(vec![0xc0]),
            after: None,
        },
        Branch::kv_step("bank-a", vec![incrby(ALICE, 100, None, Some(10))], vec![incrby(ALICE, -100, None, None)]),
    ]);
    saga.retry.limit = 2;
    saga.retry.backoff_ms = 10;
    let id = m.c.submit(&saga);
    let rec = m.c.wait_state(&id, &[TxnState::Stuck], LONG);
    // The saga says which step failed; the stuck step says why it cannot be undone.
    assert!(rec.reason.as_deref().unwrap_or("").contains("above max 10"), "{rec:?}");
    let why = rec.branches[0].reason.clone().unwrap_or_default();
    assert!(why.starts_with("ledger: this step was given no compensation"), "{rec:?}");
    // The debit stays applied, and says so; nothing pretends it was undone.
    assert_eq!(m.carol(), 900);
    let state: String =
        m.c.rt.block_on(m.sql.query_one("SELECT state FROM redtx_barrier WHERE txn = $1", &[&id])).unwrap().get(0);
    assert_eq!(state, "done");
}

#[test]
fn a_postgres_restart_under_a_running_participant_loses_nothing() {
    let mut m = Mixed::start(None);
    let rec = m.finish(&m.c.submit(&to_carol(10)));
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    // PostgreSQL crashes and comes back while the participant runs: its connections are dead,
    // the next requests fail, stay pending, and are applied once it has reconnected.
    m.pg.kill();
    m.ledger[0].wait_for_line("PostgreSQL connection closed", LONG);
    let id = m.c.submit(&to_carol(20));
    m.pg.restart().unwrap();
    m.reconnect();
    let rec = m.finish(&id);
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    assert_eq!((m.alice(), m.carol()), (970, 1030), "each applied once");
    assert!(m.ledger[0].is_running());
}
