//! `redtx demo`: all-or-nothing changes across several Redis servers, end to end.
//!
//! `--mode 2pc` (the default): money transfers between two banks, each on its own Redis. Starts
//! two private `redis-server`s (or uses `--redis` for everything), a coordinator and the
//! participants `bank-a` and `bank-b` in this process, opens accounts, runs concurrent random
//! transfers (some must abort: insufficient funds, conflicts on hot accounts), shows progress,
//! then prints the counts, throughput and latency, and checks that no money was created or lost
//! and that no lock is left behind. `--mode saga`: the order flow of [`crate::saga_demo`].
//! Either stops everything it started.

use crate::cluster::{self, Book, Cluster};
use crate::{Exit, Mode};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use redtx_common::keys;
use redtx_common::record::TxnState;
use redtx_common::spec::{Branch, IncrbyOp, Op, TxnSpec};
use redtx_common::{Client, Error};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Use this Redis for the streams and every participant instead of starting private servers.
    /// The run's participants and keys get names of their own there, so it never mixes with a
    /// deployment on the same Redis. ($REDTX_REDIS_URL is deliberately not used here.)
    #[arg(long)]
    pub redis: Option<String>,
    /// 2pc: transfers between two banks; saga: orders over `orders`, `stock` and `payment`.
    #[arg(long, value_enum, default_value = "2pc")]
    pub mode: Mode,
    /// Number of partitions (with --redis: the deployment's).
    #[arg(long, default_value_t = keys::DEFAULT_PARTITIONS, value_parser = crate::partitions)]
    pub partitions: u32,
    /// How many producers submit at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// 2pc: how many transfers to run.
    #[arg(long, default_value_t = 2000)]
    pub transfers: usize,
    /// 2pc: accounts per bank.
    #[arg(long, default_value_t = 50)]
    pub accounts: usize,
    /// Opening balance of every account (2pc) or user (saga).
    #[arg(long, default_value_t = 1000)]
    pub balance: i64,
    /// saga: how many orders to place.
    #[arg(long, default_value_t = 2000)]
    pub orders: usize,
    /// saga: how many products.
    #[arg(long, default_value_t = 20)]
    pub skus: usize,
    /// saga: opening stock of every product.
    #[arg(long, default_value_t = 150)]
    pub stock: i64,
    /// saga: how many users place orders.
    #[arg(long, default_value_t = 50)]
    pub users: usize,
    /// 2pc: transfers between a Redis bank and a PostgreSQL ledger instead: one transaction
    /// changes a Redis key and a PostgreSQL row. Without a URL, a private PostgreSQL server is
    /// started (it needs PostgreSQL installed); with one, the demo uses that database (it
    /// needs max_prepared_transactions > 0, and creates the table redtx_demo_accounts).
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
    pub postgres: Option<String>,
    /// Put the streams and records on a private Redis Cluster of --masters masters (the
    /// partitions dealt out over them), each participant's data on a private server of its own;
    /// the coordinator and the participants run in cluster mode. Not with --redis or --postgres.
    #[arg(long)]
    pub cluster: bool,
    /// Masters of the --cluster run's Redis Cluster.
    #[arg(long, default_value_t = 3)]
    pub masters: usize,
}

/// Sorted latencies; nearest-rank percentiles.
pub struct Latencies(pub Vec<Duration>);

impl Latencies {
    pub fn new(mut v: Vec<Duration>) -> Self {
        v.sort_unstable();
        Latencies(v)
    }

    /// Percentile `p` (0..=1) in milliseconds (0 when empty).
    pub fn ms(&self, p: f64) -> f64 {
        let i = ((self.0.len() as f64 * p).ceil() as usize).saturating_sub(1);
        self.0.get(i).copied().unwrap_or_default().as_secs_f64() * 1000.0
    }
}

/// The demo's progress bar over `n` transactions.
pub fn progress_bar(n: usize, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!("{{spinner}} [{{bar:40}}] {{pos}}/{{len}} {unit}  {{per_sec}}  {{msg}}"))
            .expect("template")
            .progress_chars("=> "),
    );
    bar
}

#[derive(Default)]
pub struct Tally {
    committed: AtomicUsize,
    insufficient: AtomicUsize,
    conflict: AtomicUsize,
    other_abort: AtomicUsize,
    gave_up: AtomicUsize,
    latencies: Mutex<Vec<Duration>>,
    /// Transactions whose abort was decided but not yet applied everywhere when the producer
    /// got its answer: settled before the checks.
    aborting: Mutex<Vec<String>>,
}

pub async fn run(args: DemoArgs) -> Exit {
    if args.postgres.is_some() && args.mode == Mode::Saga {
        eprintln!("error: --postgres runs the 2pc demo (transfers between Redis and PostgreSQL); drop --mode saga");
        return Exit::Invalid;
    }
    if args.cluster && (args.redis.is_some() || args.postgres.is_some()) {
        eprintln!("error: --cluster runs the demo on a private Redis Cluster it starts: drop --redis and --postgres");
        return Exit::Invalid;
    }
    if args.cluster && !(1..=args.partitions as usize).contains(&args.masters) {
        eprintln!(
            "error: --masters must be from 1 to --partitions ({}): a partition is one slot, so a master beyond that \
             would serve nothing",
            args.partitions
        );
        return Exit::Invalid;
    }
    let r = match args.mode {
        Mode::TwoPhase if args.postgres.is_some() => crate::pg_demo::run(args).await,
        Mode::TwoPhase => demo(args).await,
        Mode::Saga => crate::saga_demo::run(args).await,
    };
    match r {
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
    let names = ["bank-a", "bank-b"];
    let mut cluster = match args.cluster {
        false => Cluster::start(args.redis.as_deref(), "demo", &names, args.partitions, false)?,
        true => Cluster::start_on_redis_cluster(&names, args.partitions, args.masters)?,
    };
    let banks = &cluster.members;
    let streams = match args.cluster {
        false => String::new(),
        true => format!(", streams on a private Redis Cluster of {} masters ({})", args.masters, cluster.stream_url),
    };
    println!(
        "redtx demo (2pc): {} transfers, {} at a time, between bank-a ({}) and bank-b ({}), {} accounts each, {} \
         partitions{streams}",
        args.transfers, args.concurrency, banks[0].url, banks[1].url, args.accounts, args.partitions
    );

    // Workers, in this process.
    cluster.start_workers();

    // Accounts.
    let book: Arc<Book> = Arc::new(cluster.book(2, args.accounts));
    let mut conns = cluster.connect_all().await?;
    cluster.open_accounts(&mut conns, &book, args.balance).await?;
    let before = cluster.total(&mut conns, &book).await?;

    // Transfers.
    let client = Client::connect_target(cluster.stream_target()?).await?.with_partitions(args.partitions);
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let bar = progress_bar(args.transfers, "transfers");
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, tally, next, bar, book) = (client.clone(), tally.clone(), next.clone(), bar.clone(), book.clone());
        let (n, balance) = (args.transfers, args.balance);
        producers.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let spec = random_transfer(&book, balance);
                let t0 = Instant::now();
                match client.submit_and_wait(&spec, Duration::from_secs(30)).await {
                    Ok(r) => {
                        tally.latencies.lock().unwrap().push(t0.elapsed());
                        if r.state == TxnState::Aborting {
                            tally.aborting.lock().unwrap().push(r.id.clone());
                        }
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
    cluster.join_producers(producers).await?;
    let elapsed = started.elapsed();
    bar.finish_and_clear();

    // Decided aborts are answered before every bank released its locks: let them finish.
    let aborting = std::mem::take(&mut *tally.aborting.lock().unwrap());
    let settled = cluster::settle(&client, &aborting, Duration::from_secs(30)).await?;
    let unsettled = settled.iter().filter(|r| !r.as_ref().is_some_and(|r| r.state.is_terminal())).count();

    // Stop the workers: they finish what they hold.
    cluster.stop_workers().await;

    let after = cluster.total(&mut conns, &book).await?;
    let leftovers = cluster.locks_left(&mut conns).await?;
    if cluster.shared() {
        for (m, keys) in book.keys.iter().enumerate() {
            cluster.delete(&mut conns, m, keys).await?;
        }
    }
    let lat = Latencies::new(std::mem::take(&mut *tally.latencies.lock().unwrap()));
    let done = lat.0.len();
    let (c, i, k, o, g) = (
        tally.committed.load(Ordering::Relaxed),
        tally.insufficient.load(Ordering::Relaxed),
        tally.conflict.load(Ordering::Relaxed),
        tally.other_abort.load(Ordering::Relaxed),
        tally.gave_up.load(Ordering::Relaxed),
    );
    println!("  committed:  {c}");
    println!("  aborted:    {}  (insufficient funds {i}, conflict {k}, other {o})", i + k + o);
    if g + unsettled > 0 {
        println!("  unfinished: {g} gave up waiting, {unsettled} aborts not applied everywhere");
    }
    println!(
        "  throughput: {:.0} transactions/s over {:.2}s, {} producers",
        done as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        args.concurrency
    );
    println!(
        "  latency:    p50 {:.2} ms, p99 {:.2} ms (submit to outcome: applied everywhere, or abort decided)",
        lat.ms(0.50),
        lat.ms(0.99)
    );
    println!("  money:      {before} before, {after} after");
    println!("  locks left: {leftovers}");
    drop(cluster);
    if before != after || leftovers != 0 || g + unsettled > 0 {
        println!("FAILED: money not conserved, locks left behind, or transactions unfinished");
        return Ok(Exit::Broken);
    }
    println!("OK: every transfer was all-or-nothing; total money unchanged");
    Ok(Exit::Ok)
}

/// A transfer of a random amount from a random account of one bank to one of the other. About
/// one in ten touches the hot account 0 on both sides, to provoke conflicts; amounts up to three
/// quarters of an opening balance make some transfers run out of funds.
fn random_transfer(book: &Book, balance: i64) -> TxnSpec {
    let mut rng = rand::rng();
    let from = rng.random_range(0..2usize);
    let to = 1 - from;
    let hot = rng.random_bool(0.1);
    let pick = |rng: &mut rand::rngs::ThreadRng, b: usize| {
        if hot {
            book[b][0].clone()
        } else {
            book[b][rng.random_range(0..book[b].len())].clone()
        }
    };
    let (debit, credit) = (pick(&mut rng, from), pick(&mut rng, to));
    let amount = rng.random_range(1..=(balance * 3 / 4).max(1));
    TxnSpec::new(vec![
        Branch::kv(
            book.names[from].clone(),
            vec![Op::Incrby(IncrbyOp { key: debit, by: -amount, min: Some(0), max: None })],
        ),
        Branch::kv(book.names[to].clone(), vec![Op::incrby(credit, amount)]),
    ])
    .with_timeout(Duration::from_secs(5))
}
