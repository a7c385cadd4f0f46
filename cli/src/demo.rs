//! `redtx demo`: money transfers between two banks, each on its own Redis, all-or-nothing.
//!
//! Starts two private `redis-server`s (or uses `--redis` for everything), a coordinator and the
//! participants `bank-a` and `bank-b` in this process, opens accounts, runs concurrent random
//! transfers (some must abort: insufficient funds, conflicts on hot accounts), shows progress,
//! then prints the counts, throughput and latency, and checks that no money was created or lost
//! and that no lock is left behind. It stops everything it started.

use crate::cluster::{Book, Cluster};
use crate::Exit;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use redtx_common::record::TxnState;
use redtx_common::spec::{Branch, IncrbyOp, Op, TxnSpec};
use redtx_common::{Client, Error};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Use this Redis for the streams and both banks instead of starting two private servers.
    /// The run's participants and keys get names of their own there, so it never mixes with a
    /// deployment on the same Redis. ($REDTX_REDIS_URL is deliberately not used here.)
    #[arg(long)]
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
    // Dropping the cluster kills the servers it started: keep it until the end.
    let mut cluster = Cluster::start(args.redis.as_deref(), "demo")?;
    let banks = &cluster.banks;
    println!(
        "redtx demo: {} transfers, {} at a time, between bank-a ({}) and bank-b ({}), {} accounts each",
        args.transfers, args.concurrency, banks[0].url, banks[1].url, args.accounts
    );

    // Workers, in this process.
    cluster.start_workers();

    // Accounts.
    let mut conns = cluster.open_accounts(args.accounts, args.balance).await?;
    let before = cluster.total(&mut conns, args.accounts).await?;

    // Transfers.
    let client = Client::connect(&cluster.stream_url).await?;
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let bar = ProgressBar::new(args.transfers as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:40}] {pos}/{len} transfers  {per_sec}  {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    let keys: Arc<Book> = Arc::new(cluster.book(args.accounts));
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
    cluster.stop_workers().await;
    if let Some(e) = failure {
        return Err(e);
    }

    let after = cluster.total(&mut conns, args.accounts).await?;
    let leftovers = cluster.locks_left(&mut conns).await?;
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
    drop(cluster);
    if before != after || leftovers != 0 || g > 0 {
        println!("FAILED: money not conserved, locks left behind, or transactions unfinished");
        return Ok(Exit::Broken);
    }
    println!("OK: every transfer was all-or-nothing; total money unchanged");
    Ok(Exit::Ok)
}

/// A transfer of a random amount from a random account of one bank to one of the other. About
/// one in ten touches the hot account 0 on both sides, to provoke conflicts; amounts up to three
/// quarters of an opening balance make some transfers run out of funds.
fn random_transfer(keys: &Book, balance: i64) -> TxnSpec {
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
    TxnSpec::new(vec![
        Branch {
            participant: keys.names[from].clone(),
            ops: vec![Op::Incrby(IncrbyOp { key: debit, by: -amount, min: Some(0), max: None })],
        },
        Branch { participant: keys.names[to].clone(), ops: vec![Op::incrby(credit, amount)] },
    ])
    .with_timeout(Duration::from_secs(5))
}
