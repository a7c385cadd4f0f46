//! `redtx bench`: how fast is a transaction, compared with the Redis work underneath it.
//!
//! Sets up like the demo (two private `redis-server`s with AOF off, or everything on `--redis`; a
//! coordinator and the participants `bank-a` and `bank-b` in this process), then runs:
//!
//! 1. **Baseline**, on the stream Redis, before the workers start: `EVALSHA` of a trivial script
//!    (`INCRBY`) from `--concurrency` tasks over one multiplexed connection (as `Client` uses),
//!    (a) each call awaited, (b) pipelined in batches of 64. Figures are calls/s.
//!    Concurrent awaited calls on one multiplexed connection still share its socket writes, so
//!    (a) is not one network round trip per call; (b) adds explicit batching on top.
//! 2. **Closed loop**: `--concurrency` producers, each `submit_and_wait`ing transfers of a
//!    random amount between bank-a and bank-b, for `--duration`.
//! 3. **Half load**: an open loop submitting on a fixed schedule at half the closed-loop
//!    throughput, for `--duration`; each latency is measured from the transaction's scheduled
//!    submit time, so a schedule that falls behind counts against it.
//!
//! Transfers have no guard that can fail (no `min`), and cannot conflict: in the closed loop each
//! producer draws its accounts from its own stripe (`i % concurrency == producer`); in the open
//! loop transaction `n` uses account `n % accounts`, which conflicts only if more than
//! `--accounts` transactions are in flight. So the figures measure the protocol, not lock
//! contention, and `aborted` must be 0.
//!
//! Throughput and latency are reported with ratios against the baseline of the same run, and
//! the Redis commands per committed transaction (the `INFO commandstats` delta of every server
//! over the closed loop, split into commands sent over the network and commands run inside the
//! Lua scripts). At the end the total money must be unchanged and no lock left behind (exit 5
//! otherwise).

use crate::cluster::{Book, Cluster};
use crate::Exit;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use redis::aio::MultiplexedConnection;
use redtx_common::conn::RedisUrl;
use redtx_common::record::TxnState;
use redtx_common::spec::{Branch, Op, TxnSpec};
use redtx_common::{Client, Error};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Use this Redis for the streams and both banks instead of starting two private servers.
    /// The run's participants and keys get names of their own there, so it never mixes with a
    /// deployment on the same Redis. ($REDTX_REDIS_URL is deliberately not used here.)
    #[arg(long)]
    redis: Option<String>,
    /// How long the closed loop and the half-load run each.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How many producers submit at once in the closed loop (and tasks in the baseline).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Accounts per bank (at least --concurrency).
    #[arg(long, default_value_t = 10000)]
    accounts: usize,
    /// How long each of the two baseline measurements runs [default: --duration, at most 3s]
    #[arg(long, value_parser = humantime::parse_duration)]
    baseline: Option<Duration>,
    /// Print one JSON object with all figures instead of the table.
    #[arg(long)]
    json: bool,
}

/// The baseline script: the least a Lua call can do.
const BASELINE_SCRIPT: &str = "return redis.call('INCRBY', KEYS[1], ARGV[1])";
/// Calls per pipeline in the pipelined baseline.
const PIPELINE: usize = 64;
/// Opening balance of every account (no guard can fail, so it may go negative).
const BALANCE: i64 = 1000;
/// How long a producer waits for an outcome before counting the transaction as given up.
const WAIT: Duration = Duration::from_secs(30);

pub async fn run(args: BenchArgs) -> Exit {
    match bench(args).await {
        Ok(code) => code,
        Err(e) => crate::fail(&e),
    }
}

/// Latencies of one phase, sorted.
struct Latencies(Vec<Duration>);

impl Latencies {
    fn new(mut v: Vec<Duration>) -> Self {
        v.sort_unstable();
        Latencies(v)
    }

    /// Nearest-rank percentile, in milliseconds (0 when empty).
    fn ms(&self, p: f64) -> f64 {
        let i = ((self.0.len() as f64 * p).ceil() as usize).saturating_sub(1);
        self.0.get(i).copied().unwrap_or_default().as_secs_f64() * 1000.0
    }

    fn json(&self) -> serde_json::Value {
        json!({"p50_ms": self.ms(0.50), "p90_ms": self.ms(0.90), "p99_ms": self.ms(0.99), "max_ms": self.ms(1.0)})
    }
}

/// One baseline measurement.
struct Baseline {
    calls: u64,
    elapsed: Duration,
    /// Per call when awaited; per pipeline when pipelined.
    lat: Latencies,
}

impl Baseline {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }
}

/// One transaction phase (closed loop or half load).
struct Phase {
    committed: u64,
    aborted: u64,
    gave_up: u64,
    elapsed: Duration,
    lat: Latencies,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.committed as f64 / self.elapsed.as_secs_f64()
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "committed": self.committed, "aborted": self.aborted, "gave_up": self.gave_up,
            "seconds": self.elapsed.as_secs_f64(), "tx_per_s": self.rate(), "latency": self.lat.json(),
        })
    }
}

async fn bench(args: BenchArgs) -> Result<Exit, Error> {
    if args.concurrency == 0 || args.accounts < args.concurrency || args.duration.is_zero() {
        eprintln!("error: --concurrency must be at least 1, --accounts at least --concurrency, --duration above 0");
        return Ok(Exit::Invalid);
    }
    let baseline_for = args.baseline.unwrap_or(args.duration.min(Duration::from_secs(3)));
    let mut cluster = Cluster::start(args.redis.as_deref(), "bench")?;
    let banks = &cluster.banks;
    let header = format!(
        "redtx bench: streams and bank-a on {}, bank-b on {}; {} accounts per bank, {} producers, {} per phase",
        banks[0].url,
        banks[1].url,
        args.accounts,
        args.concurrency,
        humantime::format_duration(args.duration)
    );
    if !args.json {
        println!("{header}");
    }

    // 1. Baseline, before the workers run, on the stream Redis.
    let stream = RedisUrl::parse(&cluster.stream_url)?;
    let prefix = banks[0].prefix.clone();
    let awaited = baseline(&stream, &prefix, args.concurrency, baseline_for, false).await?;
    let pipelined = baseline(&stream, &prefix, args.concurrency, baseline_for, true).await?;

    // Workers and accounts.
    cluster.start_workers();
    let mut conns = cluster.open_accounts(args.accounts, BALANCE).await?;
    let before = cluster.total(&mut conns, args.accounts).await?;
    let keys: Arc<Book> = Arc::new(cluster.book(args.accounts));
    let client = Client::connect(&cluster.stream_url).await?;
    // Warm up: scripts loaded, outcome reader running.
    client.submit_and_wait(&transfer(&keys, 0, true, 1), WAIT).await?;

    // 2. Closed loop, with the commands it cost.
    let servers = distinct_servers(&cluster)?;
    let stats_before = commandstats(&servers).await?;
    let closed = closed_loop(&client, &keys, args.concurrency, args.duration).await?;
    let stats_after = commandstats(&servers).await?;
    let per_txn = CommandCount::delta(&stats_before, &stats_after, closed.committed);

    // 3. Half load.
    let target = closed.rate() / 2.0;
    let half = open_loop(&client, &keys, target, args.duration).await?;

    cluster.stop_workers().await;
    let after = cluster.total(&mut conns, args.accounts).await?;
    let locks = cluster.locks_left(&mut conns).await?;
    if cluster.shared() {
        cleanup(&cluster, &mut conns, &keys).await?;
    }
    drop(cluster);

    let gave_up = closed.gave_up + half.gave_up;
    let ok = before == after && locks == 0 && gave_up == 0;
    let ratio_awaited = closed.rate() / awaited.rate();
    let ratio_pipelined = closed.rate() / pipelined.rate();
    let latency_ratio = closed.lat.ms(0.5) / awaited.lat.ms(0.5);
    if args.json {
        let by_command: BTreeMap<&str, f64> = per_txn.by_command.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let out = json!({
            "config": {
                "duration_s": args.duration.as_secs_f64(), "baseline_s": baseline_for.as_secs_f64(),
                "concurrency": args.concurrency, "accounts": args.accounts, "private_servers": servers.len() > 1,
            },
            "baseline": {
                "evalsha_awaited_per_s": awaited.rate(), "evalsha_awaited_latency": awaited.lat.json(),
                "evalsha_pipelined_per_s": pipelined.rate(), "pipeline": PIPELINE,
            },
            "closed_loop": closed.json(),
            "half_load": { "target_tx_per_s": target, "submitted": half.committed + half.aborted + half.gave_up, "result": half.json() },
            "ratios": {
                "closed_tx_per_evalsha_awaited": ratio_awaited,
                "closed_tx_per_evalsha_pipelined": ratio_pipelined,
                "closed_p50_per_evalsha_p50": latency_ratio,
            },
            "redis_commands_per_txn": {
                "total": per_txn.total, "network": per_txn.network, "in_lua": per_txn.in_lua, "by_command": by_command,
            },
            "money": { "before": before, "after": after, "conserved": before == after },
            "locks_left": locks,
            "aborted": closed.aborted + half.aborted,
            "gave_up": gave_up,
            "broken": !ok,
        });
        println!("{out}");
    } else {
        let row = |name: &str, rate: String, lat: Option<&Latencies>| {
            let l = |p: f64| lat.map(|l| format!("{:.2} ms", l.ms(p))).unwrap_or_else(|| "-".into());
            println!("  {name:<34} {rate:>14} {:>10} {:>10} {:>10} {:>10}", l(0.5), l(0.9), l(0.99), l(1.0));
        };
        println!();
        println!("  {:<34} {:>14} {:>10} {:>10} {:>10} {:>10}", "phase", "rate", "p50", "p90", "p99", "max");
        let t = humantime::format_duration(baseline_for);
        row(&format!("baseline EVALSHA awaited ({t})"), format!("{:.0} calls/s", awaited.rate()), Some(&awaited.lat));
        row(&format!("baseline EVALSHA pipelined x{PIPELINE}"), format!("{:.0} calls/s", pipelined.rate()), None);
        row("closed loop", format!("{:.0} tx/s", closed.rate()), Some(&closed.lat));
        row(&format!("half load (open, target {target:.0}/s)"), format!("{:.0} tx/s", half.rate()), Some(&half.lat));
        println!();
        println!(
            "  closed loop: {} committed, {} aborted; half load: {} committed, {} aborted",
            closed.committed, closed.aborted, half.committed, half.aborted
        );
        if gave_up > 0 {
            println!("  gave up waiting: {gave_up}");
        }
        println!("  closed-loop tx/s ÷ EVALSHA/s awaited:    {ratio_awaited:.4}");
        println!("  closed-loop tx/s ÷ EVALSHA/s pipelined:  {ratio_pipelined:.4}");
        println!("  closed-loop p50 ÷ EVALSHA p50 awaited:   {latency_ratio:.1}");
        println!(
            "  redis commands per committed tx:         {:.1} ({:.1} sent over the network, {:.1} inside Lua scripts)",
            per_txn.total, per_txn.network, per_txn.in_lua
        );
        let mut top: Vec<_> = per_txn.by_command.iter().filter(|(_, v)| **v >= 0.05).collect();
        top.sort_by(|a, b| b.1.total_cmp(a.1));
        let list: Vec<String> = top.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
        println!("    {}", list.join(", "));
        println!("  money: {before} before, {after} after; locks left: {locks}");
        if ok {
            println!("OK: money conserved, no lock left");
        } else {
            println!("FAILED: money not conserved, locks left behind, or transactions unfinished");
        }
    }
    Ok(if ok { Exit::Ok } else { Exit::Broken })
}

/// A progress bar for a phase of known length on stderr, updated by a ticker until dropped.
struct Progress {
    bar: ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(name: &str, length: Duration, count: Arc<AtomicU64>, unit: &'static str) -> Self {
        let bar = ProgressBar::new(length.as_millis() as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:<24} [{bar:30}] {msg}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_prefix(name.to_string());
        let (b, started) = (bar.clone(), Instant::now());
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                b.set_position(started.elapsed().as_millis() as u64);
                b.set_message(format!("{} {unit}", count.load(Ordering::Relaxed)));
            }
        });
        Progress { bar, ticker }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// `concurrency` tasks calling the trivial script over one multiplexed connection for `length`.
async fn baseline(
    url: &RedisUrl,
    prefix: &str,
    concurrency: usize,
    length: Duration,
    pipelined: bool,
) -> Result<Baseline, Error> {
    let mut conn = url.connect().await?;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(BASELINE_SCRIPT)
        .query_async(&mut conn)
        .await
        .map_err(|e| Error::redis(url, e))?;
    let count = Arc::new(AtomicU64::new(0));
    let name = if pipelined { "baseline pipelined" } else { "baseline awaited" };
    let _progress = Progress::start(name, length, count.clone(), "calls");
    let started = Instant::now();
    let end = started + length;
    let mut tasks = tokio::task::JoinSet::new();
    let keys: Vec<String> = (0..concurrency).map(|t| format!("{prefix}bench:baseline:{t}")).collect();
    for key in keys.clone() {
        let (mut conn, sha, count, url) = (conn.clone(), sha.clone(), count.clone(), url.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut call = redis::cmd("EVALSHA");
            call.arg(&sha).arg(1).arg(&key).arg(1);
            let mut pipe = redis::pipe();
            for _ in 0..PIPELINE {
                pipe.add_command(call.clone());
            }
            while Instant::now() < end {
                let t0 = Instant::now();
                let n = if pipelined {
                    let _: Vec<i64> = pipe.query_async(&mut conn).await.map_err(|e| Error::redis(&url, e))?;
                    PIPELINE as u64
                } else {
                    let _: i64 = call.query_async(&mut conn).await.map_err(|e| Error::redis(&url, e))?;
                    1
                };
                lat.push(t0.elapsed());
                count.fetch_add(n, Ordering::Relaxed);
            }
            Ok::<_, Error>(lat)
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = tasks.join_next().await {
        lat.extend(r.expect("baseline task")?);
    }
    let elapsed = started.elapsed();
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.map_err(|e| Error::redis(url, e))?;
    Ok(Baseline { calls: count.load(Ordering::Relaxed), elapsed, lat: Latencies::new(lat) })
}

/// A transfer of `amount` between account `i` of bank-a and account `i` of bank-b, either way.
fn transfer(keys: &Book, i: usize, a_to_b: bool, amount: i64) -> TxnSpec {
    let (from, to) = if a_to_b { (0, 1) } else { (1, 0) };
    TxnSpec::new(vec![
        Branch { participant: keys.names[from].clone(), ops: vec![Op::incrby(keys[from][i].clone(), -amount)] },
        Branch { participant: keys.names[to].clone(), ops: vec![Op::incrby(keys[to][i].clone(), amount)] },
    ])
    .with_timeout(Duration::from_secs(5))
}

/// Counts an outcome; `Err` for anything but committed, aborted or gave up.
#[derive(Default)]
struct Counts {
    committed: AtomicU64,
    aborted: AtomicU64,
    gave_up: AtomicU64,
}

impl Counts {
    /// Records a `submit_and_wait` result; true if it produced an outcome (for its latency).
    fn record(&self, r: Result<redtx_common::record::TxnRecord, Error>) -> Result<bool, Error> {
        match r {
            Ok(rec) if rec.state == TxnState::Committed => self.committed.fetch_add(1, Ordering::Relaxed),
            Ok(_) => self.aborted.fetch_add(1, Ordering::Relaxed),
            Err(Error::WaitTimeout { .. }) => {
                self.gave_up.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        Ok(true)
    }

    fn phase(&self, elapsed: Duration, lat: Vec<Duration>) -> Phase {
        Phase {
            committed: self.committed.load(Ordering::Relaxed),
            aborted: self.aborted.load(Ordering::Relaxed),
            gave_up: self.gave_up.load(Ordering::Relaxed),
            elapsed,
            lat: Latencies::new(lat),
        }
    }
}

/// `concurrency` producers, each submitting and waiting for one transfer after another.
async fn closed_loop(client: &Client, keys: &Arc<Book>, concurrency: usize, length: Duration) -> Result<Phase, Error> {
    let counts = Arc::new(Counts::default());
    let done = Arc::new(AtomicU64::new(0));
    let _progress = Progress::start("closed loop", length, done.clone(), "transactions");
    let started = Instant::now();
    let end = started + length;
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..concurrency {
        let (client, keys, counts, done) = (client.clone(), keys.clone(), counts.clone(), done.clone());
        producers.spawn(async move {
            // This producer's own accounts: no other producer touches them.
            let stripe = (keys[0].len() - p).div_ceil(concurrency);
            let mut lat = Vec::new();
            while Instant::now() < end {
                let (i, a_to_b, amount) = {
                    let mut rng = rand::rng();
                    (p + concurrency * rng.random_range(0..stripe), rng.random_bool(0.5), rng.random_range(1..=100))
                };
                let t0 = Instant::now();
                if counts.record(client.submit_and_wait(&transfer(&keys, i, a_to_b, amount), WAIT).await)? {
                    lat.push(t0.elapsed());
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, Error>(lat)
        });
    }
    let lat = latencies(producers).await?;
    Ok(counts.phase(started.elapsed(), lat))
}

/// Submits transfers on a fixed schedule at `rate` per second for `length`, each in its own task;
/// a latency runs from the scheduled submit time to the outcome.
async fn open_loop(client: &Client, keys: &Arc<Book>, rate: f64, length: Duration) -> Result<Phase, Error> {
    let counts = Arc::new(Counts::default());
    let done = Arc::new(AtomicU64::new(0));
    let _progress = Progress::start("half load", length, done.clone(), "transactions");
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    if rate > 0.0 {
        let period = Duration::from_secs_f64(1.0 / rate);
        for n in 0.. {
            let at = started + period * n;
            if at >= started + length {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
            let (client, keys, counts, done) = (client.clone(), keys.clone(), counts.clone(), done.clone());
            let (a_to_b, amount) = {
                let mut rng = rand::rng();
                (rng.random_bool(0.5), rng.random_range(1..=100))
            };
            let i = n as usize % keys[0].len();
            tasks.spawn(async move {
                let r = client.submit_and_wait(&transfer(&keys, i, a_to_b, amount), WAIT).await;
                let took = at.elapsed();
                done.fetch_add(1, Ordering::Relaxed);
                Ok::<_, Error>(counts.record(r)?.then_some(took))
            });
        }
    }
    let lat = latencies(tasks).await?;
    Ok(counts.phase(started.elapsed(), lat))
}

/// Waits for every task and gathers their latencies; the first error wins (after all ended).
async fn latencies<T>(mut tasks: tokio::task::JoinSet<Result<T, Error>>) -> Result<Vec<Duration>, Error>
where
    T: IntoIterator<Item = Duration> + Send + 'static,
{
    let mut lat = Vec::new();
    let mut failure = None;
    while let Some(r) = tasks.join_next().await {
        match r.expect("load task") {
            Ok(l) => lat.extend(l),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    failure.map_or(Ok(lat), Err)
}

/// Every Redis involved, once each.
fn distinct_servers(cluster: &Cluster) -> Result<Vec<RedisUrl>, Error> {
    let mut urls: Vec<String> = vec![cluster.stream_url.clone()];
    for b in &cluster.banks {
        if !urls.iter().any(|u| u == b.url.expose()) {
            urls.push(b.url.expose().to_string());
        }
    }
    urls.iter().map(|u| RedisUrl::parse(u)).collect()
}

/// `INFO commandstats` of each server: calls per command (`INFO` itself left out).
async fn commandstats(servers: &[RedisUrl]) -> Result<Vec<HashMap<String, u64>>, Error> {
    let mut out = Vec::new();
    for url in servers {
        let mut c: MultiplexedConnection = url.connect().await?;
        let info: String =
            redis::cmd("INFO").arg("commandstats").query_async(&mut c).await.map_err(|e| Error::redis(url, e))?;
        let mut m = HashMap::new();
        for line in info.lines() {
            let Some((name, rest)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls=")).and_then(|n| n.parse().ok());
            if let (Some(calls), false) = (calls, name == "info") {
                m.insert(name.to_string(), calls);
            }
        }
        out.push(m);
    }
    Ok(out)
}

/// Redis commands per committed transaction.
struct CommandCount {
    total: f64,
    network: f64,
    in_lua: f64,
    by_command: HashMap<String, f64>,
}

impl CommandCount {
    fn delta(before: &[HashMap<String, u64>], after: &[HashMap<String, u64>], txns: u64) -> Self {
        let mut by_command: HashMap<String, f64> = HashMap::new();
        for (b, a) in before.iter().zip(after) {
            for (name, calls) in a {
                let d = calls.saturating_sub(b.get(name).copied().unwrap_or(0));
                *by_command.entry(name.clone()).or_default() += d as f64 / txns.max(1) as f64;
            }
        }
        by_command.retain(|_, v| *v > 0.0);
        let in_lua: f64 = by_command.iter().filter(|(k, _)| called_from_lua(k)).map(|(_, v)| v).sum();
        let total: f64 = by_command.values().sum();
        CommandCount { total, network: total - in_lua, in_lua, by_command }
    }
}

/// Whether redtx's Lua scripts call this command (then Redis counts those calls as well). The
/// Rust side only sends stream, sorted-set, script and `HGETALL` commands, which no script uses.
fn called_from_lua(command: &str) -> bool {
    let needle = format!("call('{}'", command.to_ascii_uppercase());
    redtx_coordinator::scripts::ALL
        .iter()
        .copied()
        .chain([&redtx_participant::kv::PREPARE, &redtx_participant::kv::COMMIT, &redtx_participant::kv::ABORT])
        .any(|s| s.source.contains(&needle))
}

/// On a shared `--redis`, removes the accounts this run opened.
async fn cleanup(cluster: &Cluster, conns: &mut [MultiplexedConnection], keys: &Book) -> Result<(), Error> {
    for ((bank, c), keys) in cluster.banks.iter().zip(conns.iter_mut()).zip(keys.keys.iter()) {
        for chunk in keys.chunks(1000) {
            let _: () = redis::cmd("DEL").arg(chunk).query_async(c).await.map_err(|e| Error::redis(&bank.url, e))?;
        }
    }
    Ok(())
}
