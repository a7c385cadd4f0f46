//! `redtx-postgres`: the PostgreSQL participant as a process.

use clap::Parser;
use redtx_common::conn::{default_url, RedisUrl, URL_ENV};
use redtx_common::shutdown::Shutdown;
use redtx_participant::ParticipantConfig;
use std::process::ExitCode;
use std::time::Duration;

/// Applies redtx 2PC branches and saga steps to PostgreSQL: reads rtx:part:<NAME>:{P} of every
/// partition P, answers (vote, ack, result) on rtx:coord:{P}. A branch's payload is a list of
/// SQL statements: [{"sql": "...", "params": [...], "rows": 1}].
#[derive(Parser, Debug)]
#[command(name = "redtx-postgres", version)]
struct Args {
    /// Stream Redis URL [default: $REDTX_REDIS_URL, else redis://127.0.0.1:6379]
    #[arg(long, env = URL_ENV, hide_env_values = true)]
    redis: Option<String>,
    /// Participant name (its stream and consumer group): letters, digits, - _ .
    #[arg(long)]
    name: String,
    /// PostgreSQL URL, e.g. postgres://app:secret@127.0.0.1:5432/shop (needs
    /// max_prepared_transactions > 0 for 2PC)
    #[arg(long, env = "REDTX_POSTGRES_URL", hide_env_values = true)]
    postgres: String,
    /// Number of partitions of the deployment (the same for every process)
    #[arg(long, env = "REDTX_PARTITIONS", default_value_t = redtx_common::keys::DEFAULT_PARTITIONS, value_parser = clap::value_parser!(u32).range(1..=redtx_common::keys::MAX_PARTITIONS as i64))]
    partitions: u32,
    /// Most entries read at once (dealt over the connections; each connection applies its share
    /// one after the other, and the batch is answered when all are done)
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch: u64,
    /// A row locked longer than this refuses a prepare (vote no), or makes a saga step answer
    /// `error` (retried). Short: a row held by another transaction's prepared branch stays
    /// held until that transaction's decision, so waiting rarely helps
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    lock_timeout: Duration,
    /// Connections to PostgreSQL: a batch's branches are applied over them concurrently
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    connections: u64,
    /// Roll back a prepared transaction of this participant this old whose transaction has no
    /// record (its decision can never come) [default: the longest timeout + 1m]. Transactions
    /// whose id is too long for a readable gid are left to their messages
    #[arg(long, value_parser = humantime::parse_duration)]
    orphan_after: Option<Duration>,
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

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    redtx_common::init_logging("info");
    let redis = default_url(args.redis.as_deref());
    if let Err(e) = RedisUrl::parse(&redis)
        .map(drop)
        .and_then(|_| redtx_common::spec::check_participant("--name", &args.name).map_err(Into::into))
        .and_then(|_| redtx_postgres::redact(&args.postgres).map(drop))
    {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let cfg = ParticipantConfig {
        redis,
        data: None,
        name: args.name,
        partitions: args.partitions,
        batch: args.batch as usize,
        claim_idle: args.claim_idle,
        retention: args.retention,
        keep_history: args.keep_history,
    };
    let mut pg = redtx_postgres::PgSettings::new(args.postgres);
    pg.lock_timeout = args.lock_timeout;
    pg.connections = args.connections as usize;
    if let Some(after) = args.orphan_after {
        pg.orphan_after = after;
    }
    match redtx_postgres::run(cfg, pg, Shutdown::on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
