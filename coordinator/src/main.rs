//! `redtx-coordinator`: runs one 2PC coordinator until SIGINT/SIGTERM.

use clap::Parser;
use redtx_common::conn::{default_url, RedisTarget, URL_ENV};
use redtx_common::shutdown::Shutdown;
use redtx_coordinator::CoordinatorConfig;
use std::process::ExitCode;
use std::time::Duration;

/// mimalloc: much cheaper than the system allocator for the many small buffers of a stream worker.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The redtx coordinator: owns partitions of transactions (leases with fencing tokens), reads
/// their submits, votes, acks and step results from `rtx:coord:{P}` and drives every 2PC
/// transaction and saga to its end. Run as many as you like: partitions spread over them.
#[derive(Parser, Debug)]
#[command(name = "redtx-coordinator", version, about)]
struct Args {
    /// Redis holding the streams and records; with --cluster, one or more nodes of the Redis
    /// Cluster, comma-separated [default: $REDTX_REDIS_URL, else redis://127.0.0.1:6379]
    #[arg(long, env = URL_ENV, hide_env_values = true)]
    redis: Option<String>,
    /// The streams and records are on a Redis Cluster: --redis lists seed nodes (one is enough).
    #[arg(long, env = "REDTX_CLUSTER")]
    cluster: bool,
    /// Number of partitions; the same for the whole deployment (producers, participants).
    #[arg(long, env = "REDTX_PARTITIONS", default_value_t = redtx_common::keys::DEFAULT_PARTITIONS, value_parser = clap::value_parser!(u32).range(1..=redtx_common::keys::MAX_PARTITIONS as i64))]
    partitions: u32,
    /// Time to live of a partition lease: a dead coordinator's partitions move after this.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Most entries read per batch.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    batch: u64,
    /// Take over entries pending this long at another (presumably dead) coordinator.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    claim_idle: Duration,
    /// First pause before a decision is re-sent to a participant that has not acked.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    resend_every: Duration,
    /// How long a finished transaction's record is kept.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// Stream history kept after every consumer group is done with it (for inspection)
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    keep_history: Duration,
    /// How many batch writes may be unanswered while the next batch is read and stepped (0:
    /// wait for each). Each write is applied only if the one before it was.
    #[arg(long, env = "REDTX_WRITES_IN_FLIGHT", default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=64))]
    writes_in_flight: u64,
    /// Act on nothing read from the stream Redis (votes, acks, saga results) until N replicas
    /// hold it (WAIT), so that what a producer is told survives a failover to a replica (a
    /// saga's `completed` included; docs/scaling.md). With --cluster, replicas of the master
    /// serving each partition.
    #[arg(long, value_name = "N", default_value_t = 0)]
    wait_replicas: u32,
}

// One thread: the worker is one loop, and cross-thread wake-ups cost more than they give on
// a few cores.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    redtx_common::init_logging("info");
    let redis = default_url(args.redis.as_deref());
    if let Err(e) = RedisTarget::parse(&redis, args.cluster) {
        eprintln!("redtx-coordinator: {e}");
        return ExitCode::from(2);
    }
    let cfg = CoordinatorConfig {
        partitions: args.partitions,
        lease: args.lease,
        batch: args.batch as usize,
        claim_idle: args.claim_idle,
        resend_every: args.resend_every,
        retention: args.retention,
        keep_history: args.keep_history,
        writes_in_flight: args.writes_in_flight as usize,
        cluster: args.cluster,
        wait_replicas: args.wait_replicas,
        ..CoordinatorConfig::new(redis)
    };
    match redtx_coordinator::run(cfg, Shutdown::on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "coordinator failed");
            ExitCode::FAILURE
        }
    }
}
