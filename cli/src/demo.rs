//! `redtx demo`: money transfers between two banks, each on its own Redis, all-or-nothing.
//!
//! Starts two private `redis-server`s (or uses `--redis` for everything), a coordinator and the
//! participants `bank-a` and `bank-b` in this process, opens accounts, runs concurrent random
//! transfers (some must abort: insufficient funds, conflicts on hot accounts), shows progress,
//! then prints the counts, throughput and latency, and checks that no money was created or lost
//! and that no lock is left behind. It stops everything it started.

use crate::Exit;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use redis::AsyncCommands;
use redtx_common::record::TxnState;
use redtx_common::server::{RedisServer, ServerOptions};
use redtx_common::shutdown::Shutdown;
use redtx_common::spec::{Branch, IncrbyOp, Op, TxnSpec};
use redtx_common::{conn::RedisUrl, Client, Error};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Use this Redis for the streams and both banks instead of starting two private servers
    /// [default: $REDTX_REDIS_URL if set]
    #[arg(long, env = "REDTX_REDIS_URL")]
    redis: Option<String>,
    /// How many transfers to run.
    #[arg(long, default_value_t = 2000)]
    transfers: usize,
    /// How many producers submit at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Accounts per bank.
    #[arg(long, default_value_t = 50)]
    accounts: usize,
    /// Opening balance of every account.
    #[arg(long, default_value_t = 1000)]
    balance: i64,
}

/// Where the two banks keep their accounts.
struct Bank {
    name: &'static str,
    url: RedisUrl,
    prefix: String,
}

impl Bank {
    fn key(&self, i: usize) -> String {
        format!("{}acct:{}{i}", self.prefix, &self.name[5..])
    }
}

#[derive(Default)]
struct Tally {
    committed: AtomicUsize,
    insufficient: AtomicUsize,
    conflict: AtomicUsize,
    other_abort: AtomicUsize,
    gave_up: AtomicUsize,
    latencies: Mutex<Vec<Duration>>,
}

pub async fn run(args: DemoArgs) -> Exit {
    match demo(args).await {
        Ok(code) => code,
        Err(e) => crate::fail(&e),
    }
}

async fn demo(args: DemoArgs) -> Result<Exit, Error> {
    if args.accounts == 0 || args.concurrency == 0 {
        eprintln!("error: --accounts and --concurrency must be at least 1");
        return Ok(Exit::Invalid);
    }
    // Keep the servers alive until the end: dropping them kills them.
    let mut servers = Vec::new();
    let (stream_url, a_url, b_url, prefix) = match &args.redis {
        Some(u) => {
            let run = &uuid_short();
            (u.clone(), u.clone(), u.clone(), format!("demo:{run}:"))
        }
        None => {
            let opts = ServerOptions { aof: false, ..Default::default() };
            let a = RedisServer::start_with(opts.clone())?;
            let b = RedisServer::start_with(opts)?;
            let urls = (a.url(), a.url(), b.url(), String::new());
            servers.push(a);
            servers.push(b);
            urls
        }
    };
    let banks = [
        Bank { name: "bank-a", url: RedisUrl::parse(&a_url)?, prefix: prefix.clone() },
        Bank { name: "bank-b", url: RedisUrl::parse(&b_url)?, prefix },
    ];
    println!(
        "redtx demo: {} transfers, {} at a time, between bank-a ({}) and bank-b ({}), {} accounts each",
        args.transfers, args.concurrency, banks[0].url, banks[1].url, args.accounts
    );

    // Workers, in this process.
    let shutdown = Shutdown::new();
    let mut workers = tokio::task::JoinSet::new();
    let coordinator = redtx_coordinator::CoordinatorConfig::new(stream_url.clone());
    workers.spawn(redtx_coordinator::run(coordinator, shutdown.clone()));
    for bank in &banks {
        let mut cfg = redtx_participant::ParticipantConfig::new(stream_url.clone(), bank.name);
        cfg.data = Some(bank.url.expose().to_string());
        workers.spawn(redtx_participant::run(cfg, shutdown.clone()));
    }

    // Accounts.
    let mut conns = Vec::new();
    for bank in &banks {
        let mut c = bank.url.connect().await?;
        for i in 0..args.accounts {
            let _: () = c.set(bank.key(i), args.balance).await.map_err(|e| Error::redis(&bank.url, e))?;
        }
        conns.push(c);
    }
    let before = total(&banks, &mut conns, args.accounts).await?;

    // Transfers.
    let client = Client::connect(&stream_url).await?;
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let bar = ProgressBar::new(args.transfers as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:40}] {pos}/{len} transfers  {per_sec}  {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    let keys: Arc<[Vec<String>; 2]> =
        Arc::new([0, 1].map(|b| (0..args.accounts).map(|i| banks[b].key(i)).collect::<Vec<_>>()));
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, tally, next, bar, keys) = (client.clone(), tally.clone(), next.clone(), bar.clone(), keys.clone());
        let (n, balance) = (args.transfers, args.balance);
        producers.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let spec = random_transfer(&keys, balance);
                let t0 = Instant::now();
                match client.submit_and_wait(&spec, Duration::from_secs(30)).await {
                    Ok(r) => {
                        tally.latencies.lock().unwrap().push(t0.elapsed());
                        let reason = r.reason.unwrap_or_default();
                        let counter = match r.state {
                            TxnState::Committed => &tally.committed,
                            _ if reason.contains("below min") => &tally.insufficient,
                            _ if reason.contains("conflict") => &tally.conflict,
                            _ => &tally.other_abort,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Error::WaitTimeout { .. }) => {
                        tally.gave_up.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
                bar.inc(1);
                bar.set_message(format!("{} committed", tally.committed.load(Ordering::Relaxed)));
            }
            Ok(())
        });
    }
    let mut failure = None;
    while let Some(r) = producers.join_next().await {
        if let Ok(Err(e)) = r {
            failure.get_or_insert(e);
        }
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();

    // Stop the workers: they finish what they hold.
    shutdown.trigger();
    while workers.join_next().await.is_some() {}
    if let Some(e) = failure {
        return Err(e);
    }

    let after = total(&banks, &mut conns, args.accounts).await?;
    let mut leftovers = 0;
    for (bank, c) in banks.iter().zip(conns.iter_mut()) {
        leftovers += count_locks(c, bank).await?;
    }
    let mut lat = std::mem::take(&mut *tally.latencies.lock().unwrap());
    lat.sort();
    let pct = |p: f64| lat.get(((lat.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or_default();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let done = lat.len();
    let (c, i, k, o, g) = (
        tally.committed.load(Ordering::Relaxed),
        tally.insufficient.load(Ordering::Relaxed),
        tally.conflict.load(Ordering::Relaxed),
        tally.other_abort.load(Ordering::Relaxed),
        tally.gave_up.load(Ordering::Relaxed),
    );
    println!("  committed:  {c}");
    println!("  aborted:    {}  (insufficient funds {i}, conflict {k}, other {o})", i + k + o);
    if g > 0 {
        println!("  gave up waiting: {g}");
    }
    println!(
        "  throughput: {:.0} transactions/s over {:.2}s, {} producers",
        done as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        args.concurrency
    );
    println!(
        "  latency:    p50 {:.2} ms, p99 {:.2} ms (submit to every participant applied)",
        ms(pct(0.50)),
        ms(pct(0.99))
    );
    println!("  money:      {before} before, {after} after");
    println!("  locks left: {leftovers}");
    drop(servers);
    if before != after || leftovers != 0 || g > 0 {
        println!("FAILED: money not conserved, locks left behind, or transactions unfinished");
        return Ok(Exit::Broken);
    }
    println!("OK: every transfer was all-or-nothing; total money unchanged");
    Ok(Exit::Ok)
}

fn uuid_short() -> String {
    redtx_common::spec::new_txn_id()[..8].to_string()
}

/// A transfer of a random amount from a random account of one bank to one of the other. About
/// one in ten touches the hot account 0 on both sides, to provoke conflicts; amounts up to three
/// quarters of an opening balance make some transfers run out of funds.
fn random_transfer(keys: &[Vec<String>; 2], balance: i64) -> TxnSpec {
    let mut rng = rand::rng();
    let from = rng.random_range(0..2usize);
    let to = 1 - from;
    let hot = rng.random_bool(0.1);
    let pick = |rng: &mut rand::rngs::ThreadRng, b: usize| {
        if hot {
            keys[b][0].clone()
        } else {
            keys[b][rng.random_range(0..keys[b].len())].clone()
        }
    };
    let (debit, credit) = (pick(&mut rng, from), pick(&mut rng, to));
    let amount = rng.random_range(1..=(balance * 3 / 4).max(1));
    let names = ["bank-a", "bank-b"];
    TxnSpec::new(vec![
        Branch {
            participant: names[from].into(),
            ops: vec![Op::Incrby(IncrbyOp { key: debit, by: -amount, min: Some(0), max: None })],
        },
        Branch { participant: names[to].into(), ops: vec![Op::incrby(credit, amount)] },
    ])
    .with_timeout(Duration::from_secs(5))
}

async fn total(
    banks: &[Bank; 2],
    conns: &mut [redis::aio::MultiplexedConnection],
    accounts: usize,
) -> Result<i64, Error> {
    let mut sum = 0;
    for (bank, c) in banks.iter().zip(conns.iter_mut()) {
        let keys: Vec<String> = (0..accounts).map(|i| bank.key(i)).collect();
        let vals: Vec<Option<i64>> = c.mget(&keys).await.map_err(|e| Error::redis(&bank.url, e))?;
        sum += vals.into_iter().map(|v| v.unwrap_or(0)).sum::<i64>();
    }
    Ok(sum)
}

/// Locks on this bank's accounts still held (there must be none once everything finished).
async fn count_locks(c: &mut redis::aio::MultiplexedConnection, bank: &Bank) -> Result<usize, Error> {
    let pattern = format!("{}{}*", redtx_common::keys::lock(""), bank.prefix);
    let mut iter: redis::AsyncIter<String> = c.scan_match(&pattern).await.map_err(|e| Error::redis(&bank.url, e))?;
    let mut n = 0;
    while let Some(k) = iter.next_item().await {
        let _ = k.map_err(|e| Error::redis(&bank.url, e))?;
        n += 1;
    }
    Ok(n)
}
