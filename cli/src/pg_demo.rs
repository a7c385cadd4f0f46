//! `redtx demo --postgres`: money transfers between a Redis bank (`bank-a`, the built-in
//! key-value participant) and a PostgreSQL ledger (`ledger`, the `redtx-postgres` participant):
//! each transfer is one 2PC transaction that changes a Redis key and a PostgreSQL row, or
//! neither. Starts a private PostgreSQL server unless given a URL (and says how to install
//! PostgreSQL when it is missing), runs concurrent transfers both ways, then checks that the
//! total is unchanged and that no lock or prepared transaction is left.

use crate::cluster::{self, Cluster};
use crate::demo::{progress_bar, DemoArgs, Latencies};
use crate::Exit;
use rand::Rng;
use redtx_common::pg_server::PgServer;
use redtx_common::record::TxnState;
use redtx_common::spec::{Branch, IncrbyOp, Op, TxnSpec};
use redtx_common::{Client, Error};
use redtx_postgres::{payload, Statement};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The demo's table in PostgreSQL.
const TABLE: &str = "redtx_demo_accounts";

fn pg_error(e: tokio_postgres::Error) -> Error {
    Error::Resource { resource: "PostgreSQL".into(), detail: redtx_postgres::resource::describe(&e) }
}

pub async fn run(args: DemoArgs) -> Result<Exit, Error> {
    if args.accounts == 0 || args.concurrency == 0 {
        eprintln!("error: --accounts and --concurrency must be at least 1");
        return Ok(Exit::Invalid);
    }
    let given = args.postgres.clone().filter(|u| !u.is_empty());
    // Dropping the server stops it: keep it until the end.
    let private = match given {
        Some(_) => None,
        None => match tokio::task::spawn_blocking(PgServer::start).await.expect("start task") {
            Ok(s) => Some(s),
            Err(e @ Error::PostgresMissing { .. }) => {
                eprintln!("error: {e}");
                eprintln!("(or give a database: redtx demo --postgres postgres://user:pass@host/db; the Redis-only demo is `redtx demo`)");
                return Ok(Exit::Failed);
            }
            Err(e) => return Err(e),
        },
    };
    let pg_url = given.unwrap_or_else(|| private.as_ref().expect("started").url());
    let shown = redtx_postgres::redact(&pg_url)?;
    let mut cluster = Cluster::start(args.redis.as_deref(), "demo", &["bank-a"], args.partitions, false)?;
    let bank = cluster.members[0].name.clone();
    let ledger = bank.replace("bank-a", "ledger");
    let run = if cluster.shared() { format!("{}:", &bank[..bank.len() - "-bank-a".len()]) } else { String::new() };
    println!(
        "redtx demo (2pc, Redis + PostgreSQL): {} transfers, {} at a time, between {bank} ({}) and {ledger} ({shown}), {} accounts each, {} partitions",
        args.transfers, args.concurrency, cluster.members[0].url, args.accounts, args.partitions
    );

    // Accounts: keys acct:a<i> at the bank, rows <run>p<i> in the ledger.
    let (sql, conn) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls).await.map_err(pg_error)?;
    tokio::spawn(conn);
    sql.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0))"
    ))
    .await
    .map_err(pg_error)?;
    let rows: Vec<String> = (0..args.accounts).map(|i| format!("{run}p{i}")).collect();
    sql.execute(
        &format!("INSERT INTO {TABLE} SELECT unnest($1::text[]), $2 ON CONFLICT (id) DO UPDATE SET balance = excluded.balance"),
        &[&rows, &args.balance],
    )
    .await
    .map_err(pg_error)?;
    let book = cluster.book(1, args.accounts);
    let mut conns = cluster.connect_all().await?;
    cluster.open_accounts(&mut conns, &book, args.balance).await?;
    let before = cluster.total(&mut conns, &book).await? + ledger_total(&sql, &rows).await?;

    // Workers, in this process: the coordinator, the bank and the ledger.
    cluster.start_workers();
    let mut cfg = redtx_participant::ParticipantConfig::new(cluster.stream_url.clone(), ledger.clone());
    cfg.partitions = args.partitions;
    let url = pg_url.clone();
    cluster.spawn_worker(move |stop| redtx_postgres::run(cfg, redtx_postgres::PgSettings::new(url), stop));

    let example = transfer(&bank, &ledger, &book[0][0], &rows[0], 25, true);
    println!(
        "  each transfer is one transaction, e.g. 25 from a Redis key to a ledger row:\n    {}",
        describe(&example)
    );

    // Transfers.
    let client = Client::connect(&cluster.stream_url).await?.with_partitions(args.partitions);
    let (committed, aborted, gave_up) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let aborting = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let bar = progress_bar(args.transfers, "transfers");
    let started = Instant::now();
    let (keys, rows) = (Arc::new(book[0].clone()), Arc::new(rows));
    let mut producers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, next, bar, keys, rows) = (client.clone(), next.clone(), bar.clone(), keys.clone(), rows.clone());
        let (committed, aborted, gave_up, latencies, aborting) =
            (committed.clone(), aborted.clone(), gave_up.clone(), latencies.clone(), aborting.clone());
        let (n, balance, bank, ledger) = (args.transfers, args.balance, bank.clone(), ledger.clone());
        producers.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let spec = {
                    let mut rng = rand::rng();
                    let i = rng.random_range(0..keys.len());
                    let j = rng.random_range(0..rows.len());
                    let amount = rng.random_range(1..=(balance * 3 / 4).max(1));
                    transfer(&bank, &ledger, &keys[i], &rows[j], amount, rng.random_bool(0.5))
                };
                let t0 = Instant::now();
                match client.submit_and_wait(&spec, Duration::from_secs(30)).await {
                    Ok(r) => {
                        latencies.lock().unwrap().push(t0.elapsed());
                        match r.state {
                            TxnState::Committed => committed.fetch_add(1, Ordering::Relaxed),
                            TxnState::Aborting => {
                                aborting.lock().unwrap().push(r.id.clone());
                                aborted.fetch_add(1, Ordering::Relaxed)
                            }
                            _ => aborted.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    Err(Error::WaitTimeout { .. }) => {
                        gave_up.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
                bar.inc(1);
                bar.set_message(format!("{} committed", committed.load(Ordering::Relaxed)));
            }
            Ok(())
        });
    }
    cluster.join_producers(producers).await?;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let aborting = std::mem::take(&mut *aborting.lock().unwrap());
    let settled = cluster::settle(&client, &aborting, Duration::from_secs(30)).await?;
    let unsettled = settled.iter().filter(|r| !r.as_ref().is_some_and(|r| r.state.is_terminal())).count();
    cluster.stop_workers().await;

    let after = cluster.total(&mut conns, &book).await? + ledger_total(&sql, &rows).await?;
    let locks = cluster.locks_left(&mut conns).await?;
    let prepared: i64 = sql
        .query_one("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE $1", &[&format!("redtx:%:{ledger}:%")])
        .await
        .map_err(pg_error)?
        .get(0);
    if cluster.shared() {
        cluster.delete(&mut conns, 0, &book[0]).await?;
    }
    if private.is_none() {
        sql.execute(&format!("DELETE FROM {TABLE} WHERE id = ANY($1)"), &[&*rows]).await.map_err(pg_error)?;
    }
    let lat = Latencies::new(std::mem::take(&mut *latencies.lock().unwrap()));
    let (c, a, g) =
        (committed.load(Ordering::Relaxed), aborted.load(Ordering::Relaxed), gave_up.load(Ordering::Relaxed));
    println!("  committed:  {c}");
    println!("  aborted:    {a}  (insufficient funds, or an account held by another transfer)");
    if g + unsettled > 0 {
        println!("  unfinished: {g} gave up waiting, {unsettled} aborts not applied everywhere");
    }
    println!(
        "  throughput: {:.0} transactions/s over {:.2}s, {} producers",
        lat.0.len() as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        args.concurrency
    );
    println!("  latency:    p50 {:.2} ms, p99 {:.2} ms (submit to outcome)", lat.ms(0.50), lat.ms(0.99));
    println!("  money:      {before} before, {after} after (Redis keys + PostgreSQL rows)");
    println!("  left:       {locks} Redis locks, {prepared} PostgreSQL prepared transactions");
    drop(cluster);
    if before != after || locks != 0 || prepared != 0 || g + unsettled > 0 {
        println!("FAILED: money not conserved, locks or prepared transactions left, or transactions unfinished");
        return Ok(Exit::Broken);
    }
    println!("OK: every transfer changed a Redis key and a PostgreSQL row, or neither; total money unchanged");
    Ok(Exit::Ok)
}

/// The sum of the ledger's `rows`.
async fn ledger_total(sql: &tokio_postgres::Client, rows: &[String]) -> Result<i64, Error> {
    let q = format!("SELECT coalesce(sum(balance), 0)::bigint FROM {TABLE} WHERE id = ANY($1)");
    sql.query_one(&q, &[&rows]).await.map(|r| r.get::<_, i64>(0)).map_err(pg_error)
}

/// `amount` between Redis key `key` at `bank` and row `row` of the ledger; `to_ledger` says
/// which way. Each debit is guarded: `min: 0` in Redis, `balance >= amount` and exactly one row
/// in PostgreSQL.
fn transfer(bank: &str, ledger: &str, key: &str, row: &str, amount: i64, to_ledger: bool) -> TxnSpec {
    let (by, sql) = if to_ledger {
        (-amount, format!("UPDATE {TABLE} SET balance = balance + $1 WHERE id = $2"))
    } else {
        (amount, format!("UPDATE {TABLE} SET balance = balance - $1 WHERE id = $2 AND balance >= $1"))
    };
    let min = to_ledger.then_some(0);
    let redis = Branch::kv(bank, vec![Op::Incrby(IncrbyOp { key: key.into(), by, min, max: None })]);
    let statements = [Statement::new(sql, vec![json!(amount), json!(row)]).rows(1)];
    let pg =
        Branch { participant: ledger.into(), payload: payload::encode(&statements), compensation: None, after: None };
    TxnSpec::new(vec![redis, pg]).with_timeout(Duration::from_secs(5))
}

/// The JSON a producer would submit for `spec` (two branches: key-value ops, SQL statements).
fn describe(spec: &TxnSpec) -> String {
    let ops = spec.branches[0].ops().unwrap_or_default();
    let statements = payload::decode(&spec.branches[1].payload).unwrap_or_default();
    json!({"branches": [
        {"participant": spec.branches[0].participant, "ops": ops},
        {"participant": spec.branches[1].participant, "payload": statements},
    ]})
    .to_string()
}
