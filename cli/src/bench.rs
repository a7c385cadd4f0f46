//! `redtx bench`: how fast is a transaction, compared with the Redis work underneath it, and
//! what it costs each process.
//!
//! Sets up private `redis-server`s with AOF off, one for the streams and records and one per
//! participant for its data (the demo puts the streams on the first participant's server), or
//! everything on `--redis`. The coordinator and the participants run as child processes of the
//! real binaries (`redtx-coordinator`, `redtx-participant`, next to `redtx`) with the settings
//! the demo's in-process workers use, so the CPU of each role can be told apart; `--inline` runs
//! them in this process as the demo does. Then it runs:
//!
//! 1. **Baseline**, on the stream Redis, before the workers start: `EVALSHA` of a trivial script
//!    (`INCRBY`) from `--concurrency` tasks over one multiplexed connection (as `Client` uses),
//!    (a) each call awaited, (b) pipelined in batches of 64. Figures are calls/s.
//!    Concurrent awaited calls on one multiplexed connection still share its socket writes, so
//!    (a) is not one network round trip per call; (b) adds explicit batching on top.
//! 2. **Closed loop**: `--concurrency` producers, each `submit_and_wait_outcome`-ing transfers of a
//!    random amount for `--duration`, over `--participants` banks (`bank-a`, `bank-b`, ...; 2 by
//!    default for `--mode 2pc`, 3 for `--mode saga`), each on its own private Redis: bank-a pays
//!    `(N - 1) x` per op and every other bank receives `x` per op, `--ops` ops (distinct
//!    accounts) per branch or step; a saga step's compensation is its opposite.
//! 3. **Half load**: an open loop submitting on a fixed schedule at half the closed-loop
//!    throughput, for `--duration`; each latency is measured from the transaction's scheduled
//!    submit time, so a schedule that falls behind counts against it.
//!
//! Transfers have no guard that can fail (no `min`), and do not conflict (2PC locks): in the
//! closed loop each producer draws its accounts from its own stripe (`i % concurrency ==
//! producer`); in the open loop transaction `n` uses accounts `n * ops ..`, which conflict only
//! if more than `--accounts / --ops` transactions are in flight. So by default the figures
//! measure the protocol, not lock contention, and `aborted` must be 0. `--contention F` (2PC)
//! makes a share `F` of the transactions also touch one hot account at every bank: those
//! conflict on its lock and some abort; the aborts are counted, not an error.
//!
//! Throughput and latency are reported with ratios against the baseline of the same run, and
//! the Redis commands per committed (or completed) transaction, in total and per server: the
//! `INFO commandstats` delta of each server over the closed loop. Redis counts the commands a
//! Lua script runs like any other, so the split into commands sent over the network and commands
//! run inside scripts comes from a short `MONITOR` sample after the closed loop (MONITOR tags a
//! script's commands `[lua]`), applied per server and command to the delta.
//!
//! CPU per committed transaction of each process over the closed loop (`utime + stime` of
//! `/proc/<pid>/stat`): every private `redis-server`, the coordinator, each participant and this
//! process (the load; with `--inline` also the workers), with each one's share of a core and the
//! total against the machine's cores. It shows what bounds the throughput: a `redis-server` runs
//! its commands on one thread, so one near 100 % of a core is the limit; on a shared `--redis` only
//! the processes this run started are measured.
//!
//! Scale-out: `--coordinators N` starts N coordinator processes sharing the partitions, and
//! `--instances M` runs M processes of each participant in its consumer group. Each worker counts
//! what it handles (`redtx_common::stats`) and writes its final counts when it stops; the bench
//! reports each process's share of the work over the whole run (a coordinator's entries among
//! every coordinator's, with the partitions it owned at the end; an instance's requests among its
//! participant's), next to its CPU line.
//!
//! Redis Cluster: `--cluster` first runs the single-node deployment above as the reference
//! (unless `--no-reference`), tears it down, then starts a private Redis Cluster of `--masters`
//! masters (3) for the streams and records, partition `p` on master `p % masters`, every bank's
//! data on a private server of its own, the workers with `--cluster` and the load through
//! `Client::connect_cluster`, and measures it the same way. The baseline is run on each master
//! alone (with keys of a partition it serves; the mean is the ratios' denominator) and on all of
//! them at once; commands and CPU are reported per master. Both runs are printed (`--json`: the
//! cluster's figures, the reference's under `reference`), then the cluster against the
//! reference (`vs_reference`): closed-loop rate, CPU and commands per transaction, capacity.
//!
//! At the end the total money must be unchanged, every decided abort applied and no lock left
//! behind (exit 5 otherwise; with `--cluster`, in both runs).

use crate::cluster::{Book, Cluster, Processes};
use crate::demo::Latencies;
use crate::stages::{Follow, Stages};
use crate::{Exit, Mode};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use redis::aio::MultiplexedConnection;
use redtx_common::conn::RedisUrl;
use redtx_common::keys;
use redtx_common::spec::{Branch, Op, TxnSpec};
use redtx_common::stats::WorkerStats;
use redtx_common::{Client, Error};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Use this Redis for the streams and every bank instead of starting private servers.
    /// The run's participants and keys get names of their own there, so it never mixes with a
    /// deployment on the same Redis. ($REDTX_REDIS_URL is deliberately not used here.)
    #[arg(long)]
    redis: Option<String>,
    /// 2pc: transfers in one 2PC transaction over --participants banks; saga: sagas of
    /// --participants steps.
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
    /// Accounts per bank (at least --concurrency x --ops).
    #[arg(long, default_value_t = 10000)]
    accounts: usize,
    /// Banks per transaction (bank-a, bank-b, ...), each on its own private Redis: 2pc branches,
    /// saga steps, 2 to 26 [default: 2 for 2pc, 3 for saga]
    #[arg(long, value_name = "N")]
    participants: Option<usize>,
    /// Ops per branch or step, on distinct accounts of the producer's own.
    #[arg(long, value_name = "N", default_value_t = 1)]
    ops: usize,
    /// Share of transactions (0 to 1) that also touch one hot account at every bank, so they
    /// conflict on its 2PC lock and some abort (2pc only).
    #[arg(long, value_name = "F", default_value_t = 0.0, allow_negative_numbers = true)]
    contention: f64,
    /// Run the coordinator and the participants in this process, as the demo does, instead of
    /// as redtx-coordinator and redtx-participant child processes (CPU is then reported for the
    /// Redis servers and this process only).
    #[arg(long)]
    inline: bool,
    /// Coordinator processes sharing the partitions (at most --partitions; not with --inline)
    #[arg(long, value_name = "N", default_value_t = 1)]
    coordinators: usize,
    /// Processes of each participant, sharing its consumer group (not with --inline)
    #[arg(long, value_name = "M", default_value_t = 1)]
    instances: usize,
    /// How long each of the two baseline measurements runs [default: --duration, at most 3s]
    #[arg(long, value_parser = humantime::parse_duration)]
    baseline: Option<Duration>,
    /// Print one JSON object with all figures instead of the table.
    #[arg(long)]
    json: bool,
    /// Put the streams and records on a private Redis Cluster of --masters masters (every
    /// bank's data on a private server of its own; the workers run with --cluster), after a
    /// run of the single-node deployment with the same settings, as the reference.
    #[arg(long)]
    cluster: bool,
    /// Masters of the --cluster run's Redis Cluster (at most --partitions).
    #[arg(long, value_name = "N", default_value_t = 3, requires = "cluster")]
    masters: usize,
    /// With --cluster: skip the single-node reference run.
    #[arg(long, requires = "cluster")]
    no_reference: bool,
}

/// The baseline script: the least a Lua call can do.
const BASELINE_SCRIPT: &str = "return redis.call('INCRBY', KEYS[1], ARGV[1])";
/// Calls per pipeline in the pipelined baseline.
const PIPELINE: usize = 64;
/// Opening balance of every account (no guard can fail, so it may go negative).
const BALANCE: i64 = 1000;
/// How long a producer waits for an outcome before counting the transaction as given up.
const WAIT: Duration = Duration::from_secs(30);
impl BenchArgs {
    /// Whether the load may run on one thread: the workers are processes of their own (not
    /// `--inline`), so this process only submits and waits, which one thread does with less CPU
    /// than two (no wake-ups across threads).
    pub fn single_threaded(&self) -> bool {
        !self.inline
    }
}

/// Most banks: `bank-a` to `bank-z`.
const MAX_PARTICIPANTS: usize = 26;

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

/// The banks of a run: `bank-a`, `bank-b`, ...
fn bank_names(n: usize) -> Vec<String> {
    (0..n).map(|m| format!("bank-{}", (b'a' + m as u8) as char)).collect()
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

/// The first problem with the arguments, if any.
fn check(args: &BenchArgs, participants: usize) -> Option<String> {
    if args.concurrency == 0 || args.duration.is_zero() {
        return Some("--concurrency must be at least 1, --duration above 0".into());
    }
    if !(2..=MAX_PARTICIPANTS).contains(&participants) {
        return Some(format!("--participants must be from 2 to {MAX_PARTICIPANTS} (bank-a to bank-z)"));
    }
    if args.ops == 0 {
        return Some("--ops must be at least 1".into());
    }
    if !matches!(args.concurrency.checked_mul(args.ops), Some(n) if args.accounts >= n) {
        return Some(format!(
            "--accounts must be at least --concurrency x --ops ({} x {}): each producer draws the accounts of a \
             transaction from its own share",
            args.concurrency, args.ops
        ));
    }
    if !(0.0..=1.0).contains(&args.contention) {
        return Some("--contention must be a share from 0 to 1".into());
    }
    if args.contention > 0.0 && args.mode == Mode::Saga {
        return Some("--contention is for --mode 2pc: saga steps take no locks, so nothing would conflict".into());
    }
    if args.coordinators == 0 || args.instances == 0 {
        return Some("--coordinators and --instances must be at least 1".into());
    }
    if args.inline && (args.coordinators > 1 || args.instances > 1) {
        return Some(
            "--coordinators and --instances start more worker processes, but --inline runs one coordinator and one \
             instance of each participant inside redtx bench: drop --inline, or these"
                .into(),
        );
    }
    if args.cluster && (args.redis.is_some() || args.inline) {
        return Some(
            "--cluster starts a private Redis Cluster and runs the workers as processes: drop --redis and --inline"
                .into(),
        );
    }
    if args.cluster && !(1..=args.partitions as usize).contains(&args.masters) {
        return Some(format!(
            "--masters must be from 1 to --partitions ({}): a partition is one slot, so a master beyond that would \
             serve nothing",
            args.partitions
        ));
    }
    if args.coordinators > args.partitions as usize {
        return Some(format!(
            "--coordinators {} is more than --partitions {}: a partition has one owner at a time, so the extra \
             coordinators would own nothing",
            args.coordinators, args.partitions
        ));
    }
    None
}

async fn bench(args: BenchArgs) -> Result<Exit, Error> {
    let participants = args.participants.unwrap_or(match args.mode {
        Mode::TwoPhase => 2,
        Mode::Saga => 3,
    });
    if let Some(problem) = check(&args, participants) {
        eprintln!("error: {problem}");
        return Ok(Exit::Invalid);
    }
    if !args.inline {
        // Before anything starts: a missing binary is a build step away.
        crate::cluster::worker_binaries()?;
    }
    if !args.cluster {
        let run = measure(&args, participants, Streams::Single).await?;
        if args.json {
            println!("{}", run_json(&args, &run));
        } else {
            print_run(&args, &run);
        }
        return Ok(if run.ok(&args) { Exit::Ok } else { Exit::Broken });
    }
    // The single-node deployment first, as the reference, then the cluster: each torn down
    // before the next starts, so they never share the machine.
    let reference = match args.no_reference {
        true => None,
        false => Some(measure(&args, participants, Streams::Single).await?),
    };
    if let (Some(r), false) = (&reference, args.json) {
        print_run(&args, r);
        println!();
    }
    let run = measure(&args, participants, Streams::RedisCluster(args.masters)).await?;
    let ok = run.ok(&args) && reference.as_ref().is_none_or(|r| r.ok(&args));
    if args.json {
        let mut out = run_json(&args, &run);
        if let Some(r) = &reference {
            out["reference"] = run_json(&args, r);
            out["vs_reference"] = vs_reference(&run, r).json();
            out["broken"] = json!(!ok);
        }
        println!("{out}");
    } else {
        print_run(&args, &run);
        if let Some(r) = &reference {
            vs_reference(&run, r).print(args.masters);
        }
    }
    Ok(if ok { Exit::Ok } else { Exit::Broken })
}

/// Where a run keeps its streams and records.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Streams {
    /// One Redis (private, also holding bank-a's data; or `--redis`).
    Single,
    /// A private Redis Cluster of this many masters; every bank's data on a server of its own.
    RedisCluster(usize),
}

/// The pipelined baseline of a Redis Cluster's masters.
struct MasterBaselines {
    /// Each master alone (calls/s), in the order of the run's stream servers.
    alone: Vec<f64>,
    /// Every master at once, summed (calls/s).
    together: f64,
}

/// Everything one deployment measured.
struct Run {
    streams: Streams,
    names: Vec<String>,
    baseline_for: Duration,
    awaited: Baseline,
    /// Pipelined `EVALSHA` calls/s: on one server; on a Redis Cluster, the mean of its masters
    /// each alone (what one Redis core sustains, as on one server).
    pipelined: f64,
    masters: Option<MasterBaselines>,
    closed: Phase,
    target: f64,
    half: Phase,
    /// Where the half load's time went.
    stages: Stages,
    servers: Vec<Server>,
    per_txn: CommandCount,
    split_sample: Option<Duration>,
    cpu: Option<Cpu>,
    work: Option<Vec<Share>>,
    before: i64,
    after: i64,
    locks: usize,
    unsettled: usize,
    shared: bool,
}

impl Run {
    fn gave_up(&self) -> u64 {
        self.closed.gave_up + self.half.gave_up
    }

    fn aborted(&self) -> u64 {
        self.closed.aborted + self.half.aborted
    }

    /// Without contention nothing can conflict: an abort means the measurement is not what it
    /// claims to be.
    fn aborts_ok(&self, args: &BenchArgs) -> bool {
        args.contention > 0.0 || self.aborted() == 0
    }

    fn ok(&self, args: &BenchArgs) -> bool {
        self.before == self.after
            && self.locks == 0
            && self.gave_up() == 0
            && self.unsettled == 0
            && self.aborts_ok(args)
    }

    fn ratio_awaited(&self) -> f64 {
        self.closed.rate() / self.awaited.rate()
    }

    fn ratio_pipelined(&self) -> f64 {
        self.closed.rate() / self.pipelined
    }

    fn latency_ratio(&self) -> f64 {
        self.closed.lat.ms(0.5) / self.awaited.lat.ms(0.5)
    }
}

/// Sets a deployment up, measures it (baseline, closed loop, half load), checks it and tears it
/// down.
async fn measure(args: &BenchArgs, participants: usize, streams: Streams) -> Result<Run, Error> {
    let baseline_for = args.baseline.unwrap_or(args.duration.min(Duration::from_secs(3)));
    let names = bank_names(participants);
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut cluster = match streams {
        Streams::Single => Cluster::start(args.redis.as_deref(), "bench", &name_refs, args.partitions, true)?,
        Streams::RedisCluster(masters) => Cluster::start_on_redis_cluster(&name_refs, args.partitions, masters)?,
    };
    let shared = cluster.shared();
    let nodes = cluster.stream_nodes()?;
    let banks = &cluster.members;
    let where_ = match streams {
        Streams::Single if shared => format!("streams and every bank on {}", banks[0].url),
        Streams::Single => {
            let on: Vec<String> = banks.iter().map(|b| format!("{} on {}", b.name, b.url)).collect();
            format!("streams on {}, {}", nodes[0].url, on.join(", "))
        }
        Streams::RedisCluster(masters) => {
            let parts: Vec<String> =
                nodes.iter().map(|n| n.partitions.iter().map(u32::to_string).collect::<Vec<_>>().join(",")).collect();
            let on: Vec<String> = banks.iter().map(|b| format!("{} on {}", b.name, b.url)).collect();
            format!(
                "streams on a private Redis Cluster of {masters} masters (partitions {} by master), {}",
                parts.join(" | "),
                on.join(", ")
            )
        }
    };
    let branch_word = match args.mode {
        Mode::TwoPhase => "branches",
        Mode::Saga => "steps",
    };
    let header = format!(
        "redtx bench ({}{}): {where_}; {} accounts per bank, {} producers, {} per phase, {} partitions; \
         {participants} {branch_word} of {} op{}, contention {}; workers {}",
        mode_name(args.mode),
        if streams == Streams::Single { "" } else { ", --cluster" },
        args.accounts,
        args.concurrency,
        humantime::format_duration(args.duration),
        args.partitions,
        args.ops,
        if args.ops == 1 { "" } else { "s" },
        args.contention,
        if args.inline {
            "in this process".to_string()
        } else {
            format!(
                "as processes ({} coordinator{}, {} instance{} per participant)",
                args.coordinators,
                if args.coordinators == 1 { "" } else { "s" },
                args.instances,
                if args.instances == 1 { "" } else { "s" }
            )
        },
    );
    if !args.json {
        println!("{header}");
    }

    // 1. Baseline, before the workers run, on the stream Redis (each master of a cluster, with
    // keys of a partition it serves).
    let prefix = banks[0].prefix.clone();
    let (awaited, pipelined, masters) = match streams {
        Streams::Single => {
            let url = &nodes[0].url;
            let awaited = baseline(url, &prefix, None, args.concurrency, baseline_for, false, true).await?;
            let pipelined = baseline(url, &prefix, None, args.concurrency, baseline_for, true, true).await?;
            (awaited, pipelined.rate(), None)
        }
        Streams::RedisCluster(_) => {
            let tag = |n: &crate::cluster::StreamNode| n.partitions.first().copied();
            let awaited =
                baseline(&nodes[0].url, &prefix, tag(&nodes[0]), args.concurrency, baseline_for, false, true).await?;
            let mut alone = Vec::new();
            for n in &nodes {
                alone.push(baseline(&n.url, &prefix, tag(n), args.concurrency, baseline_for, true, true).await?.rate());
            }
            let mut all = tokio::task::JoinSet::new();
            for n in &nodes {
                let (url, prefix, tag, concurrency) = (n.url.clone(), prefix.clone(), tag(n), args.concurrency);
                // One progress bar would be drawn over another: none.
                all.spawn(async move { baseline(&url, &prefix, tag, concurrency, baseline_for, true, false).await });
            }
            let mut together = 0.0;
            while let Some(r) = all.join_next().await {
                together += r.expect("baseline task")?.rate();
            }
            let mean = alone.iter().sum::<f64>() / alone.len().max(1) as f64;
            (awaited, mean, Some(MasterBaselines { alone, together }))
        }
    };

    // Workers and accounts. Dropping `workers` (an error on the way) kills the processes.
    let mut workers = None;
    if args.inline {
        cluster.start_workers();
    } else {
        let mut procs = cluster.spawn_processes(args.coordinators, args.instances)?;
        procs.wait_ready(&cluster).await?;
        workers = Some(procs);
    }
    let mut book = cluster.book(participants, args.accounts);
    if args.contention > 0.0 {
        // The hot account of each bank, after the striped ones: index `args.accounts`.
        for (m, keys) in book.keys.iter_mut().enumerate() {
            keys.push(cluster.members[m].key(&format!("acct:{}hot", (b'a' + m as u8) as char)));
        }
    }
    let keys: Arc<Book> = Arc::new(book);
    let mut conns = cluster.connect_all().await?;
    cluster.open_accounts(&mut conns, &keys, BALANCE).await?;
    let before = cluster.total(&mut conns, &keys).await?;
    let client = cluster.client().await?;
    let load = Load {
        client: client.clone(),
        keys: keys.clone(),
        mode: args.mode,
        accounts: args.accounts,
        ops: args.ops,
        contention: args.contention,
        aborting: Arc::default(),
    };
    // Warm up: scripts loaded, outcome reader running.
    let first: Vec<usize> = (0..args.ops).collect();
    client.submit_and_wait(&load.transfer(&first, false, true, 1), WAIT).await?;

    // 2. Closed loop, with the commands and the CPU it cost, then a short sample of which of
    // the commands ran inside Lua scripts.
    let servers = servers(&cluster, &names)?;
    let urls: Vec<RedisUrl> = servers.iter().map(|s| s.url.clone()).collect();
    let procs = processes(&servers, workers.as_ref());
    let stats_before = commandstats(&urls).await?;
    let cpu_before = CpuSample::take(&procs);
    let closed = closed_loop(&load, "closed loop", args.concurrency, args.duration).await?;
    let cpu = CpuSample::take(&procs).since(&cpu_before, &procs, closed.committed);
    let stats_after = commandstats(&urls).await?;
    if let Some(w) = workers.as_mut() {
        w.check_running()?;
    }
    let sample_for = (args.duration / 5).clamp(Duration::from_millis(200), Duration::from_secs(1));
    let split = match lua_share(&urls, &load, args.concurrency, sample_for).await {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("warning: no network/Lua split of the Redis commands (MONITOR sample failed: {e})");
            None
        }
    };
    let per_txn = CommandCount::delta(&stats_before, &stats_after, closed.committed, split.as_ref());

    // 3. Half load.
    let target = closed.rate() / 2.0;
    let follow = Arc::new(Follow::new((target * args.duration.as_secs_f64()) as u64));
    let half = open_loop(&load, target, args.duration, &follow).await?;
    let stages = follow.stages(&client).await?;

    // A decided abort is answered before every bank released its locks: let them finish.
    let aborting = std::mem::take(&mut *load.aborting.lock().expect("aborting"));
    let settled = crate::cluster::settle(&client, &aborting, WAIT).await?;
    let unsettled = settled.iter().filter(|r| !r.as_ref().is_some_and(|r| r.state.is_terminal())).count();
    // Who owns which partition, read before the workers stop (a stopping coordinator gives its
    // partitions up, and another may take them on its way out); what each handled, from the
    // final counts each writes when it stops.
    let owners = match &workers {
        Some(_) => {
            let target = cluster.stream_target()?;
            crate::cluster::lease_owners(&target.connect().await?, &target, args.partitions).await?
        }
        None => Vec::new(),
    };
    if let Some(w) = workers.as_mut() {
        w.stop().await;
    }
    let work = match &workers {
        Some(w) => Some(work_shares(&cluster, w, &owners).await?),
        None => None,
    };
    cluster.stop_workers().await;
    let after = cluster.total(&mut conns, &keys).await?;
    let locks = cluster.locks_left(&mut conns).await?;
    if shared {
        for (m, k) in keys.keys.iter().enumerate() {
            cluster.delete(&mut conns, m, k).await?;
        }
    }
    drop(client);
    drop(load);
    drop(workers);
    drop(cluster);
    Ok(Run {
        streams,
        names,
        baseline_for,
        awaited,
        pipelined,
        masters,
        closed,
        target,
        half,
        stages,
        servers,
        per_txn,
        split_sample: split.as_ref().map(|_| sample_for),
        cpu,
        work,
        before,
        after,
        locks,
        unsettled,
        shared,
    })
}

/// One run's figures as JSON (the shape `redtx bench --json` prints).
fn run_json(args: &BenchArgs, run: &Run) -> serde_json::Value {
    let per_txn = &run.per_txn;
    let by_command: BTreeMap<&str, f64> = per_txn.by_command.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let by_server: Vec<serde_json::Value> = run
        .servers
        .iter()
        .zip(&per_txn.servers)
        .map(|(s, c)| {
            let by_command: BTreeMap<&str, f64> = c.by_command.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            json!({"server": s.role, "partitions": s.partitions, "total": c.total, "network": c.network,
                   "in_lua": c.in_lua, "by_command": by_command})
        })
        .collect();
    let cluster = match (run.streams, &run.masters) {
        (Streams::RedisCluster(masters), Some(b)) => {
            let nodes: Vec<serde_json::Value> = run
                .servers
                .iter()
                .filter(|s| s.partitions.is_some())
                .zip(&b.alone)
                .map(|(s, rate)| json!({"server": s.role, "partitions": s.partitions, "evalsha_pipelined_per_s": rate}))
                .collect();
            json!({
                "masters": masters, "nodes": nodes,
                "evalsha_pipelined_all_masters_per_s": b.together,
                "closed_tx_per_evalsha_pipelined_all_masters": run.closed.rate() / b.together,
            })
        }
        _ => serde_json::Value::Null,
    };
    json!({
        "config": {
            "duration_s": args.duration.as_secs_f64(), "baseline_s": run.baseline_for.as_secs_f64(),
            "concurrency": args.concurrency, "accounts": args.accounts, "private_servers": !run.shared,
            "mode": mode_name(args.mode), "partitions": args.partitions, "participants": run.names,
            "ops": args.ops, "contention": args.contention,
            "workers": if args.inline { "inline" } else { "processes" },
            "coordinators": args.coordinators, "instances": args.instances,
            "streams": match run.streams { Streams::Single => "single", Streams::RedisCluster(_) => "cluster" },
        },
        "cluster": cluster,
        "baseline": {
            "evalsha_awaited_per_s": run.awaited.rate(), "evalsha_awaited_latency": latency_json(&run.awaited.lat),
            "evalsha_pipelined_per_s": run.pipelined, "pipeline": PIPELINE,
        },
        "closed_loop": run.closed.json(),
        "half_load": { "target_tx_per_s": run.target, "submitted": run.half.committed + run.half.aborted + run.half.gave_up, "result": run.half.json(), "where_the_time_went": run.stages.json() },
        "ratios": {
            "closed_tx_per_evalsha_awaited": run.ratio_awaited(),
            "closed_tx_per_evalsha_pipelined": run.ratio_pipelined(),
            "closed_p50_per_evalsha_p50": run.latency_ratio(),
        },
        "redis_commands_per_txn": {
            "total": per_txn.total, "network": per_txn.network, "in_lua": per_txn.in_lua, "by_command": by_command,
            "split_sample_s": run.split_sample.map(|d| d.as_secs_f64()),
            "by_server": by_server,
        },
        "cpu": run.cpu.as_ref().map(Cpu::json),
        "work": run.work.as_ref().map(|w| w.iter().map(Share::json).collect::<Vec<_>>()),
        "money": { "before": run.before, "after": run.after, "conserved": run.before == run.after },
        "locks_left": run.locks,
        "aborted": run.aborted(),
        "aborts_unsettled": run.unsettled,
        "gave_up": run.gave_up(),
        "broken": !run.ok(args),
    })
}

/// One run's figures as a table.
fn print_run(args: &BenchArgs, run: &Run) {
    let (ok_word, ko_word) = match args.mode {
        Mode::TwoPhase => ("committed", "aborted"),
        Mode::Saga => ("completed", "compensated"),
    };
    let (awaited, closed, half, per_txn) = (&run.awaited, &run.closed, &run.half, &run.per_txn);
    let row = |name: &str, rate: String, lat: Option<&Latencies>| {
        let l = |p: f64| lat.map(|l| format!("{:.2} ms", l.ms(p))).unwrap_or_else(|| "-".into());
        println!("  {name:<34} {rate:>14} {:>10} {:>10} {:>10} {:>10}", l(0.5), l(0.9), l(0.99), l(1.0));
    };
    println!();
    println!("  {:<34} {:>14} {:>10} {:>10} {:>10} {:>10}", "phase", "rate", "p50", "p90", "p99", "max");
    let t = humantime::format_duration(run.baseline_for);
    row(&format!("baseline EVALSHA awaited ({t})"), format!("{:.0} calls/s", awaited.rate()), Some(&awaited.lat));
    match &run.masters {
        None => row(&format!("baseline EVALSHA pipelined x{PIPELINE}"), format!("{:.0} calls/s", run.pipelined), None),
        Some(b) => {
            // The mean of the masters alone is what the ratios below divide by.
            row("baseline EVALSHA pipelined, mean", format!("{:.0} calls/s", run.pipelined), None);
            for (i, rate) in b.alone.iter().enumerate() {
                row(&format!("  master {} alone", i + 1), format!("{rate:.0} calls/s"), None);
            }
            row("  all masters at once", format!("{:.0} calls/s", b.together), None);
        }
    }
    row("closed loop", format!("{:.0} tx/s", closed.rate()), Some(&closed.lat));
    row(&format!("half load (open, target {:.0}/s)", run.target), format!("{:.0} tx/s", half.rate()), Some(&half.lat));
    println!();
    println!(
        "  closed loop: {} {ok_word}, {} {ko_word}; half load: {} {ok_word}, {} {ko_word}",
        closed.committed, closed.aborted, half.committed, half.aborted
    );
    if run.stages.len() > 0 {
        let rows: Vec<String> =
            run.stages.rows().iter().map(|(name, p50, p99)| format!("{name} {p50}/{p99}")).collect();
        println!(
            "  half load, where the time went (p50/p99 ms, {} {ok_word} followed): {}",
            run.stages.len(),
            rows.join(", ")
        );
    }
    if args.contention > 0.0 {
        let share = |p: &Phase| 100.0 * p.aborted as f64 / (p.committed + p.aborted).max(1) as f64;
        println!(
            "  contention {}: {:.1} % of the closed loop and {:.1} % of the half load aborted",
            args.contention,
            share(closed),
            share(half)
        );
    }
    if run.gave_up() > 0 || run.unsettled > 0 {
        println!("  gave up waiting: {}; aborts not applied everywhere: {}", run.gave_up(), run.unsettled);
    }
    println!("  closed-loop tx/s ÷ EVALSHA/s awaited:    {:.4}", run.ratio_awaited());
    println!("  closed-loop tx/s ÷ EVALSHA/s pipelined:  {:.4}", run.ratio_pipelined());
    if let Some(b) = &run.masters {
        println!("  closed-loop tx/s ÷ EVALSHA/s pipelined on all masters at once:  {:.4}", closed.rate() / b.together);
    }
    println!("  closed-loop p50 ÷ EVALSHA p50 awaited:   {:.1}", run.latency_ratio());
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
    if run.servers.len() > 1 {
        let width = run.servers.iter().map(|s| s.role.len()).max().unwrap_or(0);
        for (s, c) in run.servers.iter().zip(&per_txn.servers) {
            let parts = match &s.partitions {
                Some(p) => format!(", partitions {}", p.iter().map(u32::to_string).collect::<Vec<_>>().join(",")),
                None => String::new(),
            };
            match (c.network, c.in_lua) {
                (Some(net), Some(lua)) => println!(
                    "    {:<width$}  {:>6.1} ({net:.1} over the network, {lua:.1} inside Lua{parts})",
                    s.role, c.total
                ),
                _ if parts.is_empty() => println!("    {:<width$}  {:>6.1}", s.role, c.total),
                _ => println!("    {:<width$}  {:>6.1} ({})", s.role, c.total, &parts[2..]),
            }
        }
    }
    match &run.cpu {
        Some(cpu) => cpu.print(ok_word, run.shared),
        None => println!("  CPU: not measured (no /proc/<pid>/stat here)"),
    }
    if let Some(work) = &run.work {
        print_shares(work);
    }
    println!("  money: {} before, {} after; locks left: {}", run.before, run.after, run.locks);
    if run.ok(args) {
        println!("OK: money conserved, no lock left");
    } else if !run.aborts_ok(args) {
        println!("FAILED: {} aborted with no contention (nothing should conflict)", run.aborted());
    } else {
        println!("FAILED: money not conserved, locks left behind, or transactions unfinished");
    }
}

/// A Redis Cluster run against the single-node run of the same invocation.
struct VsReference {
    /// Closed-loop tx/s, cluster ÷ single node.
    closed: f64,
    /// Each run's closed loop ÷ its pipelined `EVALSHA` (one server; a master alone, mean).
    cluster_per_pipelined: f64,
    single_per_pipelined: f64,
    /// Pipelined `EVALSHA` on every master at once ÷ on the single-node run's stream Redis.
    capacity: Option<f64>,
    /// CPU of all the run's processes per committed transaction, cluster ÷ single node.
    cpu: Option<f64>,
    /// Redis commands per committed transaction, cluster ÷ single node.
    commands: f64,
}

fn vs_reference(run: &Run, reference: &Run) -> VsReference {
    let cpu_per_tx = |r: &Run| r.cpu.as_ref().map(|c| c.per_1000(c.total()));
    VsReference {
        closed: run.closed.rate() / reference.closed.rate(),
        cluster_per_pipelined: run.ratio_pipelined(),
        single_per_pipelined: reference.ratio_pipelined(),
        capacity: run.masters.as_ref().map(|b| b.together / reference.pipelined),
        cpu: cpu_per_tx(run).zip(cpu_per_tx(reference)).map(|(a, b)| a / b),
        commands: run.per_txn.total / reference.per_txn.total,
    }
}

impl VsReference {
    fn json(&self) -> serde_json::Value {
        json!({
            "closed_tx_per_reference_closed_tx": self.closed,
            "closed_tx_per_evalsha_pipelined": self.cluster_per_pipelined,
            "reference_closed_tx_per_evalsha_pipelined": self.single_per_pipelined,
            "evalsha_pipelined_all_masters_per_reference_pipelined": self.capacity,
            "cpu_per_tx_per_reference": self.cpu,
            "redis_commands_per_tx_per_reference": self.commands,
        })
    }

    fn print(&self, masters: usize) {
        println!();
        println!("  the Redis Cluster run against the single-node run above (same invocation):");
        println!("    closed-loop tx/s:                         {:.2} x", self.closed);
        println!(
            "    closed-loop tx/s ÷ EVALSHA/s pipelined:   {:.4} (single node {:.4}: {:.2} x)",
            self.cluster_per_pipelined,
            self.single_per_pipelined,
            self.cluster_per_pipelined / self.single_per_pipelined
        );
        if let Some(c) = self.capacity {
            println!("    pipelined EVALSHA on the {masters} masters at once:  {c:.2} x one server alone");
        }
        if let Some(c) = self.cpu {
            println!("    CPU of all processes per tx:              {c:.2} x");
        }
        println!("    Redis commands per tx:                    {:.2} x", self.commands);
    }
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
/// On a Redis Cluster's master, `tag` is a partition it serves: the keys carry `{tag}`, so they
/// are in a slot of that master.
async fn baseline(
    url: &RedisUrl,
    prefix: &str,
    tag: Option<u32>,
    concurrency: usize,
    length: Duration,
    pipelined: bool,
    progress: bool,
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
    let _progress = progress.then(|| Progress::start(name, length, count.clone(), "calls"));
    let started = Instant::now();
    let end = started + length;
    let mut tasks = tokio::task::JoinSet::new();
    let tag = tag.map(|p| format!(":{{{p}}}")).unwrap_or_default();
    let keys: Vec<String> = (0..concurrency).map(|t| format!("{prefix}bench:baseline:{t}{tag}")).collect();
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
    // One slot per `DEL` (on a cluster's master the keys share the tag's slot; on one server,
    // any).
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
    /// Striped accounts per bank; the hot one (with `--contention`) is at this index.
    accounts: usize,
    ops: usize,
    contention: f64,
    /// Transactions whose abort was decided but maybe not applied everywhere yet: settled
    /// before the end-of-run checks.
    aborting: Arc<Mutex<Vec<String>>>,
}

impl Load {
    /// A transfer of `amount` per op at accounts `idx` (and the hot account if `hot`) of every
    /// bank, one way or the other: bank-a pays `(N - 1) * amount` per op, each of the N - 1
    /// others receives `amount` per op (or back). 2PC: one branch per bank. Saga: one step per
    /// bank, compensated by its opposite.
    fn transfer(&self, idx: &[usize], hot: bool, forward: bool, amount: i64) -> TxnSpec {
        let (keys, sign) = (&self.keys, if forward { 1 } else { -1 });
        let n = keys.names.len();
        let by = |m: usize| if m == 0 { -(n as i64 - 1) * amount * sign } else { amount * sign };
        let ops = |m: usize, by: i64| -> Vec<Op> {
            idx.iter()
                .copied()
                .chain(hot.then_some(self.accounts))
                .map(|i| Op::incrby(keys[m][i].clone(), by))
                .collect()
        };
        match self.mode {
            Mode::TwoPhase => TxnSpec::new((0..n).map(|m| Branch::kv(keys.names[m].clone(), ops(m, by(m)))).collect())
                .with_timeout(Duration::from_secs(5)),
            Mode::Saga => TxnSpec::saga(
                (0..n).map(|m| Branch::kv_step(keys.names[m].clone(), ops(m, by(m)), ops(m, -by(m)))).collect(),
            ),
        }
    }

    /// Whether the next transaction also touches the hot accounts.
    fn hot(&self, rng: &mut impl Rng) -> bool {
        self.contention > 0.0 && rng.random_bool(self.contention)
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
    /// Records a `submit_and_wait_outcome` result; true if it produced an outcome (for its latency).
    /// Committed and completed count as committed; every other outcome as aborted, and the
    /// ones not yet applied everywhere go to `aborting`.
    fn record(
        &self,
        r: Result<redtx_common::client::Outcome, Error>,
        aborting: &Mutex<Vec<String>>,
    ) -> Result<bool, Error> {
        match r {
            Ok(rec) if rec.state.is_success() => self.committed.fetch_add(1, Ordering::Relaxed),
            Ok(rec) => {
                if !rec.state.is_terminal() {
                    aborting.lock().expect("aborting").push(rec.id);
                }
                self.aborted.fetch_add(1, Ordering::Relaxed)
            }
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
            // This producer's own accounts: no other producer touches them. A transaction takes
            // `ops` consecutive ones of the stripe (it holds at least `ops`: accounts >=
            // concurrency x ops), so they are distinct.
            let stripe = (load.accounts - p).div_ceil(concurrency);
            let mut lat = Vec::new();
            let mut idx = vec![0; load.ops];
            while Instant::now() < end {
                let (hot, a_to_b, amount) = {
                    let mut rng = rand::rng();
                    let k = rng.random_range(0..stripe);
                    for (j, i) in idx.iter_mut().enumerate() {
                        *i = p + concurrency * ((k + j) % stripe);
                    }
                    (load.hot(&mut rng), rng.random_bool(0.5), rng.random_range(1..=100))
                };
                let t0 = Instant::now();
                let r = load.client.submit_and_wait_outcome(&load.transfer(&idx, hot, a_to_b, amount), WAIT).await;
                if counts.record(r, &load.aborting)? {
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
/// About `stages::SAMPLE` of them are followed (`follow`), for where their time went.
async fn open_loop(load: &Load, rate: f64, length: Duration, follow: &Arc<Follow>) -> Result<Phase, Error> {
    let counts = Arc::new(Counts::default());
    let done = Arc::new(AtomicU64::new(0));
    let _progress = Progress::start("half load", length, done.clone(), "transactions");
    let (started, started_ms) = (Instant::now(), redtx_common::now_ms());
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
            // Wall-clock time of the scheduled submit, as the latency counts it.
            let follow =
                follow.follows(u64::from(n)).then(|| (follow.clone(), started_ms + (period * n).as_millis() as u64));
            let (hot, a_to_b, amount) = {
                let mut rng = rand::rng();
                (load.hot(&mut rng), rng.random_bool(0.5), rng.random_range(1..=100))
            };
            let idx: Vec<usize> = (0..load.ops).map(|j| (n as usize * load.ops + j) % load.accounts).collect();
            tasks.spawn(async move {
                let r = load.client.submit_and_wait_outcome(&load.transfer(&idx, hot, a_to_b, amount), WAIT).await;
                let took = at.elapsed();
                done.fetch_add(1, Ordering::Relaxed);
                if let (Some((follow, submitted_ms)), Ok(outcome)) = (follow, &r) {
                    follow.seen(outcome.id.clone(), submitted_ms);
                }
                Ok::<_, Error>(counts.record(r, &load.aborting)?.then_some(took))
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

/// One worker process's part of the run's work.
struct Share {
    /// `coordinator #1`, `participant bank-a #2`, ...
    process: String,
    pid: u32,
    /// The participant's name; `None` for a coordinator.
    participant: Option<String>,
    /// The partitions a coordinator owned at the end of the run.
    partitions: Vec<u32>,
    /// Its final counts (`None`: it wrote none, e.g. it died).
    stats: Option<WorkerStats>,
    /// Its entries handled over those of its kind: every coordinator, or every instance of the
    /// same participant.
    share: Option<f64>,
}

impl Share {
    fn json(&self) -> serde_json::Value {
        json!({
            "process": self.process, "pid": self.pid,
            "role": if self.participant.is_some() { "participant" } else { "coordinator" },
            "participant": self.participant,
            "partitions": self.participant.is_none().then_some(&self.partitions),
            "counts": self.stats.as_ref().map(|s| &s.counts),
            "share": self.share,
        })
    }
}

/// Each worker process's share of the work over the whole run, from the final counts it wrote
/// when it stopped (`rtx:stats:*`, see `redtx_common::stats`), and the partitions each
/// coordinator owned (`owners`, read before they stopped).
async fn work_shares(cluster: &Cluster, workers: &Processes, owners: &[Option<String>]) -> Result<Vec<Share>, Error> {
    let stats = cluster.worker_stats().await?;
    let mut out: Vec<Share> = workers
        .children
        .iter()
        .map(|w| {
            let pid = w.pid();
            let partitions = owners
                .iter()
                .enumerate()
                .filter(|(_, o)| o.as_deref().is_some_and(|o| crate::cluster::of_process(o, pid)))
                .map(|(p, _)| p as u32)
                .collect();
            // The latest hash of this process (a pid is not reused within a run).
            let stats = stats.iter().filter(|s| s.pid == Some(pid)).max_by_key(|s| s.at_ms).cloned();
            Share { process: w.role.clone(), pid, participant: w.participant.clone(), partitions, stats, share: None }
        })
        .collect();
    let handled = |s: &Share| s.stats.as_ref().map_or(0, WorkerStats::handled);
    let totals: Vec<u64> =
        out.iter().map(|s| out.iter().filter(|o| o.participant == s.participant).map(handled).sum()).collect();
    for (s, total) in out.iter_mut().zip(totals) {
        if s.stats.is_some() && total > 0 {
            s.share = Some(handled(s) as f64 / total as f64);
        }
    }
    Ok(out)
}

fn print_shares(work: &[Share]) {
    println!("  work per process, whole run (entries each handled, from its final counts):");
    let width = work.iter().map(|w| w.process.len()).max().unwrap_or(0);
    for w in work {
        let Some(stats) = &w.stats else {
            println!("    {:<width$}  no counts (it wrote none)", w.process);
            continue;
        };
        let share = w.share.map_or("-".to_string(), |s| format!("{:.1} %", 100.0 * s));
        match &w.participant {
            None => {
                let parts: Vec<String> = w.partitions.iter().map(u32::to_string).collect();
                println!(
                    "    {:<width$}  {share:>7} of the coordinators' entries ({} handled; created {}, decided {}), \
                     partitions {}",
                    w.process,
                    stats.handled(),
                    stats.count("created"),
                    stats.count("decided"),
                    if parts.is_empty() { "none".to_string() } else { parts.join(",") },
                )
            }
            Some(name) => {
                println!("    {:<width$}  {share:>7} of {name}'s requests ({} answered)", w.process, stats.handled())
            }
        }
    }
}

/// A Redis of the run.
struct Server {
    url: RedisUrl,
    /// What it holds: `streams+bank-a`, `bank-b`, ...; `streams master 1`, ... on a Redis Cluster.
    role: String,
    /// Its process, when this run started it.
    pid: Option<u32>,
    /// The partitions a Redis Cluster's master serves (`None` on a single stream Redis).
    partitions: Option<Vec<u32>>,
}

/// Every Redis involved, once each, the stream Redis (or the cluster's masters) first.
fn servers(cluster: &Cluster, names: &[String]) -> Result<Vec<Server>, Error> {
    let mut out: Vec<Server> = Vec::new();
    match &cluster.streams {
        None => out.push(Server {
            url: RedisUrl::parse(&cluster.stream_url)?,
            role: "streams".into(),
            // Its own process when the streams are apart (else the first bank's, below).
            pid: cluster.stream_nodes()?.first().and_then(|n| n.pid),
            partitions: None,
        }),
        Some(_) => {
            for (i, n) in cluster.stream_nodes()?.into_iter().enumerate() {
                let role = format!("streams master {}", i + 1);
                out.push(Server { url: n.url, role, pid: n.pid, partitions: Some(n.partitions) });
            }
        }
    }
    for (m, member) in cluster.members.iter().enumerate() {
        let pid = cluster.server_pid(m);
        match out.iter_mut().find(|s| s.url.expose() == member.url.expose()) {
            Some(s) => {
                s.role = format!("{}+{}", s.role, names[m]);
                s.pid = s.pid.or(pid);
            }
            None => out.push(Server { url: member.url.clone(), role: names[m].clone(), pid, partitions: None }),
        }
    }
    Ok(out)
}

/// The processes whose CPU is measured: the servers this run started, the worker processes and
/// this one.
fn processes(servers: &[Server], workers: Option<&Processes>) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> =
        servers.iter().filter_map(|s| Some((format!("redis {}", s.role), s.pid?))).collect();
    let this = match workers {
        Some(w) => {
            out.extend(w.children.iter().map(|c| (c.role.clone(), c.pid())));
            "redtx bench (load)"
        }
        None => "redtx bench (load + workers)",
    };
    out.push((this.to_string(), std::process::id()));
    out
}

/// CPU time used so far by each process, in clock ticks (`None`: unreadable), by the whole
/// machine (busy and all ticks, summed over its cores), and when.
struct CpuSample {
    ticks: Vec<Option<u64>>,
    machine: Option<(u64, u64)>,
    at: Instant,
}

impl CpuSample {
    fn take(procs: &[(String, u32)]) -> Self {
        CpuSample {
            ticks: procs.iter().map(|(_, pid)| redtx_common::server::cpu_ticks(*pid)).collect(),
            machine: machine_ticks(),
            at: Instant::now(),
        }
    }

    /// What each process used since `before`, per `txns` transactions; `None` when no process
    /// could be read (no `/proc`).
    fn since(&self, before: &CpuSample, procs: &[(String, u32)], txns: u64) -> Option<Cpu> {
        let hz = clock_ticks();
        let used: Vec<(String, u32, f64)> = procs
            .iter()
            .zip(before.ticks.iter().zip(&self.ticks))
            .filter_map(|((name, pid), (b, a))| Some((name.clone(), *pid, (*a)?.saturating_sub((*b)?) as f64 / hz)))
            .collect();
        if used.is_empty() {
            return None;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let busy = match (before.machine, self.machine) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => Some(b1.saturating_sub(b0) as f64 / (t1 - t0) as f64),
            _ => None,
        };
        Some(Cpu { used, wall: self.at - before.at, txns: txns.max(1), cores, hz, busy })
    }
}

/// Busy and all clock ticks of every core so far, from the `cpu` line of `/proc/stat`: what
/// tells how much of the machine other processes took during the run.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let t: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal (guest time is within user already).
    let idle = t.get(3)? + t.get(4).copied().unwrap_or(0);
    let busy: u64 = t.iter().take(8).sum::<u64>() - idle;
    Some((busy, busy + idle))
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`; 100 where that fails).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// CPU used over the closed loop.
struct Cpu {
    /// Process, pid, CPU seconds.
    used: Vec<(String, u32, f64)>,
    wall: Duration,
    txns: u64,
    cores: usize,
    hz: f64,
    /// Share of the machine's cores busy over the closed loop, whoever used them.
    busy: Option<f64>,
}

/// A `redis-server` at this share of a core or more is saturated: it runs commands on one thread.
const SATURATED: f64 = 0.9;

impl Cpu {
    /// CPU milliseconds per 1,000 transactions of `seconds` used.
    fn per_1000(&self, seconds: f64) -> f64 {
        seconds * 1e6 / self.txns as f64
    }

    fn share(&self, seconds: f64) -> f64 {
        seconds / self.wall.as_secs_f64()
    }

    fn total(&self) -> f64 {
        self.used.iter().map(|u| u.2).sum()
    }

    fn busiest(&self) -> &(String, u32, f64) {
        self.used.iter().max_by(|a, b| a.2.total_cmp(&b.2)).expect("at least one process")
    }

    fn json(&self) -> serde_json::Value {
        let processes: Vec<serde_json::Value> = self
            .used
            .iter()
            .map(|(name, pid, s)| {
                json!({"process": name, "pid": pid, "cpu_s": s, "ms_per_1000_tx": self.per_1000(*s), "core_share": self.share(*s)})
            })
            .collect();
        let total = self.total();
        json!({
            "seconds": self.wall.as_secs_f64(), "transactions": self.txns, "clock_ticks_per_s": self.hz, "cores": self.cores,
            "processes": processes,
            "total": {"cpu_s": total, "ms_per_1000_tx": self.per_1000(total), "core_share": self.share(total),
                      "machine_share": self.share(total) / self.cores as f64},
            "machine_busy_share": self.busy,
            "busiest": self.busiest().0,
        })
    }

    fn print(&self, ok_word: &str, shared: bool) {
        let whose = if shared { " (the processes this run started; not the --redis server)" } else { "" };
        println!("  CPU ms per 1,000 {ok_word} tx, closed loop ({:.1} s){whose}:", self.wall.as_secs_f64());
        let width = self.used.iter().map(|u| u.0.len()).max().unwrap_or(0).max(5);
        for (name, _, s) in &self.used {
            println!("    {name:<width$}  {:>8.1}  {:>4.0} % of a core", self.per_1000(*s), 100.0 * self.share(*s));
        }
        let total = self.total();
        let machine = self.share(total) / self.cores as f64;
        println!(
            "    {:<width$}  {:>8.1}  {:>4.0} % of a core, {:.0} % of the machine's {} cores",
            "total",
            self.per_1000(total),
            100.0 * self.share(total),
            100.0 * machine,
            self.cores
        );
        // Other processes on the machine take cores from the run: say so, they skew it.
        let busy = self.busy.unwrap_or(machine).max(machine);
        if busy - machine >= 0.05 {
            println!(
                "    the machine was {:.0} % busy: {:.0} % of it by processes not listed here",
                100.0 * busy,
                100.0 * (busy - machine)
            );
        }
        let (name, _, s) = self.busiest();
        let share = 100.0 * self.share(*s);
        if name.starts_with("redis ") && self.share(*s) >= SATURATED {
            println!("  bound: {name} at {share:.0} % of a core");
        } else if busy >= SATURATED {
            println!(
                "  bound: the machine's {} cores, {:.0} % busy; busiest: {name} at {share:.0} % of a core",
                self.cores,
                100.0 * busy
            );
        } else {
            println!("  busiest: {name} at {share:.0} % of a core (neither a Redis server nor the machine saturated)");
        }
    }
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
    /// The same for each server, in the order of the stats.
    servers: Vec<CommandCount>,
}

impl CommandCount {
    fn delta(
        before: &[HashMap<String, u64>],
        after: &[HashMap<String, u64>],
        txns: u64,
        split: Option<&LuaShare>,
    ) -> Self {
        let servers: Vec<CommandCount> = before
            .iter()
            .zip(after)
            .enumerate()
            .map(|(server, (b, a))| Self::of_server(b, a, txns, split.map(|s| &s[server])))
            .collect();
        let mut by_command: HashMap<String, f64> = HashMap::new();
        for s in &servers {
            for (name, n) in &s.by_command {
                *by_command.entry(name.clone()).or_default() += n;
            }
        }
        let sum = |f: fn(&CommandCount) -> Option<f64>| servers.iter().map(f).sum::<Option<f64>>();
        CommandCount {
            total: servers.iter().map(|s| s.total).sum(),
            network: sum(|s| s.network),
            in_lua: sum(|s| s.in_lua),
            by_command,
            servers,
        }
    }

    fn of_server(
        before: &HashMap<String, u64>,
        after: &HashMap<String, u64>,
        txns: u64,
        split: Option<&HashMap<String, f64>>,
    ) -> Self {
        let mut by_command: HashMap<String, f64> = HashMap::new();
        let mut in_lua = 0.0;
        for (name, calls) in after {
            let d = calls.saturating_sub(before.get(name).copied().unwrap_or(0)) as f64 / txns.max(1) as f64;
            if d > 0.0 {
                by_command.insert(name.clone(), d);
            }
            // `xinfo|groups` is `XINFO` to MONITOR.
            let base = name.split('|').next().unwrap_or(name);
            in_lua += d * split.and_then(|s| s.get(base)).copied().unwrap_or(0.0);
        }
        let total: f64 = by_command.values().sum();
        let (network, in_lua) = match split {
            Some(_) => (Some(total - in_lua), Some(in_lua)),
            None => (None, None),
        };
        CommandCount { total, network, in_lua, by_command, servers: Vec::new() }
    }
}
