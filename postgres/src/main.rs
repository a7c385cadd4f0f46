//! `redtx-postgres`: the PostgreSQL participant as a process.

use clap::Parser;
use redtx_common::shutdown::Shutdown;
use redtx_participant::WorkerArgs;
use std::process::ExitCode;
use std::time::Duration;

/// Applies redtx 2PC branches and saga steps to PostgreSQL: reads rtx:part:<NAME>:{P} of every
/// partition P, answers (vote, ack, result) on rtx:coord:{P}. A branch's payload is a list of
/// SQL statements: [{"sql": "...", "params": [...], "rows": 1}].
#[derive(Parser, Debug)]
#[command(name = "redtx-postgres", version)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
    /// PostgreSQL URL, e.g. postgres://app:secret@127.0.0.1:5432/shop (needs
    /// max_prepared_transactions > 0 for 2PC)
    #[arg(long, env = "REDTX_POSTGRES_URL", hide_env_values = true)]
    postgres: String,
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
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    redtx_common::init_logging("info");
    let checked = redtx_postgres::redact(&args.postgres).and_then(|_| args.worker.config(args.batch as usize, None));
    let cfg = match checked {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
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
