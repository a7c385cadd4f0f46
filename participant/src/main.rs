//! `redtx-participant`: the built-in key-value participant as a process.

use clap::Parser;
use redtx_common::conn::{default_url, RedisUrl, URL_ENV};
use redtx_common::shutdown::Shutdown;
use redtx_participant::{run, ParticipantConfig};
use std::process::ExitCode;
use std::time::Duration;

/// mimalloc: much cheaper than the system allocator for the many small buffers of a stream worker.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Applies redtx 2PC branches and saga steps to a Redis: reads rtx:part:<NAME>:{P} of every
/// partition P, answers (vote, ack, result) on rtx:coord:{P}.
#[derive(Parser, Debug)]
#[command(name = "redtx-participant", version)]
struct Args {
    /// Stream Redis URL [default: $REDTX_REDIS_URL, else redis://127.0.0.1:6379]
    #[arg(long, env = URL_ENV, hide_env_values = true)]
    redis: Option<String>,
    /// Participant name (its stream and consumer group): letters, digits, - _ .
    #[arg(long, value_parser = parse_name)]
    name: String,
    /// Data Redis URL the branches apply to [default: the stream Redis]
    #[arg(long)]
    data: Option<String>,
    /// Number of partitions of the deployment (the same for every process)
    #[arg(long, env = "REDTX_PARTITIONS", default_value_t = redtx_common::keys::DEFAULT_PARTITIONS, value_parser = clap::value_parser!(u32).range(1..=redtx_common::keys::MAX_PARTITIONS as i64))]
    partitions: u32,
    /// Most entries read (and scripts pipelined) at once
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    batch: u64,
    /// Take over entries left pending this long by a dead worker
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    claim_idle: Duration,
    /// How long finished barriers are kept (repeats within it are recognised)
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// Stream history kept after every consumer group is done with it (for inspection)
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    keep_history: Duration,
}

fn parse_name(s: &str) -> Result<String, String> {
    redtx_common::spec::check_participant("name", s).map_err(|e| e.problem)?;
    Ok(s.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    redtx_common::init_logging("info");
    let redis = default_url(args.redis.as_deref());
    for url in std::iter::once(&redis).chain(args.data.as_ref()) {
        if let Err(e) = RedisUrl::parse(url) {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let cfg = ParticipantConfig {
        redis,
        data: args.data,
        name: args.name,
        partitions: args.partitions,
        batch: args.batch as usize,
        claim_idle: args.claim_idle,
        retention: args.retention,
        keep_history: args.keep_history,
    };
    match run(cfg, Shutdown::on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
