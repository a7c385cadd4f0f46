//! `redtx bench`: how fast is a transaction, compared with the Redis work underneath it.
//!
//! Sets up like the demo (private `redis-server`s with AOF off, one per participant, or
//! everything on `--redis`; a coordinator and the participants in this process), then runs:
//!
//! 1. **Baseline**, on the stream Redis, before the workers start: `EVALSHA` of a trivial script
//!    (`INCRBY`) from `--concurrency` tasks over one multiplexed connection (as `Client` uses),
//!    (a) each call awaited, (b) pipelined in batches of 64. Figures are calls/s.
//!    Concurrent awaited calls on one multiplexed connection still share its socket writes, so
//!    (a) is not one network round trip per call; (b) adds explicit batching on top.
//! 2. **Closed loop**: `--concurrency` producers, each `submit_and_wait`ing transfers of a
//!    random amount for `--duration`. `--mode 2pc`: two-branch transfers between `bank-a` and
//!    `bank-b`. `--mode saga`: three-step sagas over `bank-a`, `bank-b` and `bank-c` (take
//!    `2x` from one, give `x` to each of the others; each step's compensation gives it back).
//! 3. **Half load**: an open loop submitting on a fixed schedule at half the closed-loop
//!    throughput, for `--duration`; each latency is measured from the transaction's scheduled
//!    submit time, so a schedule that falls behind counts against it.
//!
//! Transfers have no guard that can fail (no `min`), and cannot conflict (2PC locks): in the closed loop each
//! producer draws its accounts from its own stripe (`i % concurrency == producer`); in the open
//! loop transaction `n` uses account `n % accounts`, which conflicts only if more than
//! `--accounts` transactions are in flight. So the figures measure the protocol, not lock
//! contention, and `aborted` (or `compensated`) must be 0.
//!
//! Throughput and latency are reported with ratios against the baseline of the same run, and
//! the Redis commands per committed (or completed) transaction: the `INFO commandstats` delta of
//! every server over the closed loop. Redis counts the commands a Lua script runs like any other,
//! so the split into commands sent over the network and commands run inside scripts comes from
//! a short `MONITOR` sample after the closed loop (MONITOR tags a script's commands `[lua]`),
//! applied per command to the delta. At the end the total money must be unchanged and no lock
//! left behind (exit 5 otherwise).

use crate::cluster::{Book, Cluster};
use crate::demo::Latencies;
use crate::{Exit, Mode};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use redis::aio::MultiplexedConnection;
use redtx_common::conn::RedisUrl;
use redtx_common::keys;
use redtx_common::spec::{Branch, Op, TxnSpec};
use redtx_common::{Client, Error};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Use this Redis for the streams and every bank instead of starting private servers.
    /// The run's participants and keys get names of their own there, so it never mixes with a
    /// deployment on the same Redis. ($REDTX_REDIS_URL is deliberately not used here.)
    #[arg(long)]
    redis: Option<String>,
    /// 2pc: two-branch transfers; saga: three-step sagas over three participants.
    #[arg(long, value_enum, default_value = "2pc")]
    mode: Mode,
    /// Number of partitions (with --redis: the deployment's).
    #[arg(long, default_value_t = keys::DEFAULT_PARTITIONS, value_parser = crate::partitions)]
    partitions: u32,
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

/// Percentiles of a phase as JSON.
fn latency_json(l: &Latencies) -> serde_json::Value {
    json!({"p50_ms": l.ms(0.50), "p90_ms": l.ms(0.90), "p99_ms": l.ms(0.99), "max_ms": l.ms(1.0)})
}

/// The participants of a mode.
fn participants(mode: Mode) -> &'static [&'static str] {
    match mode {
        Mode::TwoPhase => &["bank-a", "bank-b"],
        Mode::Saga => &["bank-a", "bank-b", "bank-c"],
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
            "seconds": self.elapsed.as_secs_f64(), "tx_per_s": self.rate(), "latency": latency_json(&self.lat),
        })
    }
}

async fn bench(args: BenchArgs) -> Result<Exit, Error> {
    if args.concurrency == 0 || args.accounts < args.concurrency || args.duration.is_zero() {
        eprintln!("error: --concurrency must be at least 1, --accounts at least --concurrency, --duration above 0");
        return Ok(Exit::Invalid);
    }
    let baseline_for = args.baseline.unwrap_or(args.duration.min(Duration::from_secs(3)));
    let names = participants(args.mode);
    let mut cluster = Cluster::start(args.redis.as_deref(), "bench", names, args.partitions)?;
    let banks = &cluster.members;
    let on: Vec<String> = banks.iter().skip(1).map(|b| format!("{} on {}", b.name, b.url)).collect();
    let header = format!(
        "redtx bench ({}): streams and {} on {}, {}; {} accounts per bank, {} producers, {} per phase, {} partitions",
        mode_name(args.mode),
        banks[0].name,
        banks[0].url,
        on.join(", "),
        args.accounts,
        args.concurrency,
        humantime::format_duration(args.duration),
        args.partitions
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
    let keys: Arc<Book> = Arc::new(cluster.book(names.len(), args.accounts));
    let mut conns = cluster.connect_all().await?;
    cluster.open_accounts(&mut conns, &keys, BALANCE).await?;
    let before = cluster.total(&mut conns, &keys).await?;
    let client = Client::connect(&cluster.stream_url).await?.with_partitions(args.partitions);
    let load = Load { client: client.clone(), keys: keys.clone(), mode: args.mode };
    // Warm up: scripts loaded, outcome reader running.
    client.submit_and_wait(&load.transfer(0, true, 1), WAIT).await?;

    // 2. Closed loop, with the commands it cost, then a short sample of which of them ran
    // inside Lua scripts.
    let servers = distinct_servers(&cluster)?;
    let stats_before = commandstats(&servers).await?;
    let closed = closed_loop(&load, "closed loop", args.concurrency, args.duration).await?;
    let stats_after = commandstats(&servers).await?;
    let sample_for = (args.duration / 5).clamp(Duration::from_millis(200), Duration::from_secs(1));
    let split = match lua_share(&servers, &load, args.concurrency, sample_for).await {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("warning: no network/Lua split of the Redis commands (MONITOR sample failed: {e})");
            None
        }
    };
    let per_txn = CommandCount::delta(&stats_before, &stats_after, closed.committed, split.as_ref());

    // 3. Half load.
    let target = closed.rate() / 2.0;
    let half = open_loop(&load, target, args.duration).await?;

    cluster.stop_workers().await;
    let after = cluster.total(&mut conns, &keys).await?;
    let locks = cluster.locks_left(&mut conns).await?;
    if cluster.shared() {
        for (m, k) in keys.keys.iter().enumerate() {
            cluster.delete(&mut conns, m, k).await?;
        }
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
                "mode": mode_name(args.mode), "partitions": args.partitions, "participants": names,
            },
            "baseline": {
                "evalsha_awaited_per_s": awaited.rate(), "evalsha_awaited_latency": latency_json(&awaited.lat),
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
                "split_sample_s": split.as_ref().map(|_| sample_for.as_secs_f64()),
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
        let (ok_word, ko_word) = match args.mode {
            Mode::TwoPhase => ("committed", "aborted"),
            Mode::Saga => ("completed", "compensated"),
        };
        println!(
            "  closed loop: {} {ok_word}, {} {ko_word}; half load: {} {ok_word}, {} {ko_word}",
            closed.committed, closed.aborted, half.committed, half.aborted
        );
        if gave_up > 0 {
            println!("  gave up waiting: {gave_up}");
        }
        println!("  closed-loop tx/s ÷ EVALSHA/s awaited:    {ratio_awaited:.4}");
        println!("  closed-loop tx/s ÷ EVALSHA/s pipelined:  {ratio_pipelined:.4}");
        println!("  closed-loop p50 ÷ EVALSHA p50 awaited:   {latency_ratio:.1}");
        match (per_txn.network, per_txn.in_lua) {
            (Some(net), Some(lua)) => println!(
                "  redis commands per {ok_word} tx:         {:.1} ({net:.1} sent over the network, {lua:.1} inside Lua scripts)",
                per_txn.total
            ),
            _ => println!("  redis commands per {ok_word} tx:         {:.1}", per_txn.total),
        }
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

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::TwoPhase => "2pc",
        Mode::Saga => "saga",
    }
}

/// What the load phases submit, and through which client.
#[derive(Clone)]
struct Load {
    client: Client,
    keys: Arc<Book>,
    mode: Mode,
}

impl Load {
    /// A transfer of `amount` at account `i` of every bank, one way or the other. 2PC: from
    /// bank-a to bank-b (or back). Saga: `2 * amount` from bank-a, `amount` to bank-b and to
    /// bank-c (or back), each step compensated by its opposite.
    fn transfer(&self, i: usize, forward: bool, amount: i64) -> TxnSpec {
        let (keys, sign) = (&self.keys, if forward { 1 } else { -1 });
        match self.mode {
            Mode::TwoPhase => TxnSpec::new(vec![
                Branch::kv(keys.names[0].clone(), vec![Op::incrby(keys[0][i].clone(), -amount * sign)]),
                Branch::kv(keys.names[1].clone(), vec![Op::incrby(keys[1][i].clone(), amount * sign)]),
            ])
            .with_timeout(Duration::from_secs(5)),
            Mode::Saga => {
                let step = |m: usize, by: i64| {
                    Branch::kv_step(
                        keys.names[m].clone(),
                        vec![Op::incrby(keys[m][i].clone(), by)],
                        vec![Op::incrby(keys[m][i].clone(), -by)],
                    )
                };
                TxnSpec::saga(vec![step(0, -2 * amount * sign), step(1, amount * sign), step(2, amount * sign)])
            }
        }
    }
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
    /// Committed and completed count as committed; every other outcome as aborted.
    fn record(&self, r: Result<redtx_common::record::TxnRecord, Error>) -> Result<bool, Error> {
        match r {
            Ok(rec) if rec.state.is_success() => self.committed.fetch_add(1, Ordering::Relaxed),
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
async fn closed_loop(load: &Load, name: &str, concurrency: usize, length: Duration) -> Result<Phase, Error> {
    let counts = Arc::new(Counts::default());
    let done = Arc::new(AtomicU64::new(0));
    let _progress = Progress::start(name, length, done.clone(), "transactions");
    let started = Instant::now();
    let end = started + length;
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..concurrency {
        let (load, counts, done) = (load.clone(), counts.clone(), done.clone());
        producers.spawn(async move {
            // This producer's own accounts: no other producer touches them.
            let stripe = (load.keys[0].len() - p).div_ceil(concurrency);
            let mut lat = Vec::new();
            while Instant::now() < end {
                let (i, a_to_b, amount) = {
                    let mut rng = rand::rng();
                    (p + concurrency * rng.random_range(0..stripe), rng.random_bool(0.5), rng.random_range(1..=100))
                };
                let t0 = Instant::now();
                if counts.record(load.client.submit_and_wait(&load.transfer(i, a_to_b, amount), WAIT).await)? {
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
async fn open_loop(load: &Load, rate: f64, length: Duration) -> Result<Phase, Error> {
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
            let (load, counts, done) = (load.clone(), counts.clone(), done.clone());
            let (a_to_b, amount) = {
                let mut rng = rand::rng();
                (rng.random_bool(0.5), rng.random_range(1..=100))
            };
            let i = n as usize % load.keys[0].len();
            tasks.spawn(async move {
                let r = load.client.submit_and_wait(&load.transfer(i, a_to_b, amount), WAIT).await;
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
    for m in &cluster.members {
        if !urls.iter().any(|u| u == m.url.expose()) {
            urls.push(m.url.expose().to_string());
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

/// Share of each command's calls made inside Lua scripts (by lowercase command name, e.g.
/// `xadd`), per server, as seen by `MONITOR` while a closed loop runs for `length`.
type LuaShare = Vec<HashMap<String, f64>>;

/// Echoed on the stream Redis to tell a monitor thread to stop.
const MONITOR_STOP: &str = "redtx-bench-monitor-stop";

async fn lua_share(servers: &[RedisUrl], load: &Load, concurrency: usize, length: Duration) -> Result<LuaShare, Error> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut monitors = Vec::new();
    for url in servers {
        let (url, stop) = (url.clone(), stop.clone());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        monitors.push(std::thread::spawn(move || monitor(&url, &stop, ready_tx)));
        ready_rx.await.map_err(|_| Error::Io(std::io::Error::other("MONITOR thread ended")))??;
    }
    let sampled = closed_loop(load, "MONITOR sample", concurrency, length).await;
    stop.store(true, Ordering::Relaxed);
    // The ECHO itself shows on each monitor and wakes its thread up.
    for url in servers {
        let mut c = url.connect().await?;
        let _: String =
            redis::cmd("ECHO").arg(MONITOR_STOP).query_async(&mut c).await.map_err(|e| Error::redis(url, e))?;
    }
    sampled?;
    let mut out = Vec::new();
    for m in monitors {
        let counts = m.join().map_err(|_| Error::Io(std::io::Error::other("MONITOR thread panicked")))??;
        out.push(counts.into_iter().map(|(cmd, (net, lua))| (cmd, lua as f64 / (net + lua).max(1) as f64)).collect());
    }
    Ok(out)
}

/// Runs `MONITOR` on `url` until `stop` is set and a command arrives; counts per lowercase
/// command name the calls sent by clients and those run by scripts (`[0 lua]`).
fn monitor(
    url: &RedisUrl,
    stop: &AtomicBool,
    ready: tokio::sync::oneshot::Sender<Result<(), Error>>,
) -> Result<HashMap<String, (u64, u64)>, Error> {
    let err = |e| Error::redis(url, e);
    let started = (|| {
        let mut con = url.client().get_connection_with_timeout(Duration::from_secs(5)).map_err(err)?;
        con.send_packed_command(&redis::cmd("MONITOR").get_packed_command()).map_err(err)?;
        con.recv_response().map_err(err)?;
        Ok::<_, Error>(con)
    })();
    let mut con = match started {
        Ok(c) => {
            let _ = ready.send(Ok(()));
            c
        }
        Err(e) => {
            let msg = e.to_string();
            let _ = ready.send(Err(e));
            return Err(Error::Io(std::io::Error::other(msg)));
        }
    };
    let mut counts: HashMap<String, (u64, u64)> = HashMap::new();
    loop {
        let line = match con.recv_response().map_err(err)? {
            redis::Value::SimpleString(l) => l,
            _ => continue,
        };
        if stop.load(Ordering::Relaxed) {
            return Ok(counts);
        }
        // `1700000000.123456 [0 127.0.0.1:50000] "XADD" "rtx:..." ...`, `[0 lua]` inside scripts.
        let Some((client, rest)) = line.split_once('[').and_then(|(_, r)| r.split_once("] \"")) else { continue };
        let Some((cmd, _)) = rest.split_once('"') else { continue };
        let c = counts.entry(cmd.to_ascii_lowercase()).or_default();
        if client.ends_with(" lua") {
            c.1 += 1;
        } else {
            c.0 += 1;
        }
    }
}

/// Redis commands per committed transaction; the network/Lua split when a sample gave one.
struct CommandCount {
    total: f64,
    network: Option<f64>,
    in_lua: Option<f64>,
    by_command: HashMap<String, f64>,
}

impl CommandCount {
    fn delta(
        before: &[HashMap<String, u64>],
        after: &[HashMap<String, u64>],
        txns: u64,
        split: Option<&LuaShare>,
    ) -> Self {
        let mut by_command: HashMap<String, f64> = HashMap::new();
        let mut in_lua = 0.0;
        for (server, (b, a)) in before.iter().zip(after).enumerate() {
            for (name, calls) in a {
                let d = calls.saturating_sub(b.get(name).copied().unwrap_or(0)) as f64 / txns.max(1) as f64;
                *by_command.entry(name.clone()).or_default() += d;
                // `xinfo|groups` is `XINFO` to MONITOR.
                let base = name.split('|').next().unwrap_or(name);
                in_lua += d * split.and_then(|s| s[server].get(base)).copied().unwrap_or(0.0);
            }
        }
        by_command.retain(|_, v| *v > 0.0);
        let total: f64 = by_command.values().sum();
        let (network, in_lua) = match split {
            Some(_) => (Some(total - in_lua), Some(in_lua)),
            None => (None, None),
        };
        CommandCount { total, network, in_lua, by_command }
    }
}
