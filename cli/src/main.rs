//! `redtx`: the producer and operator command line.
//!
//! # Layout
//! - `main.rs`: arguments, dispatch, exit codes.
//! - [`submit`]: read a JSON spec, enqueue it, optionally wait for the outcome.
//! - [`status`]: show a transaction's record.
//! - [`demo`]: self-contained runs on private Redis servers: money transfers between two banks
//!   (2PC), or an order flow over three participants (saga).
//! - [`mod@bench`]: throughput and latency of transactions (2PC or saga), as ratios against raw
//!   Redis calls, with Redis commands per server and CPU per process (the workers run as child
//!   processes of the real binaries: `--coordinators N`, `--instances M` per participant, each
//!   one's share of the work reported; `--cluster`: the streams on a private Redis Cluster,
//!   against the single-node deployment).
//! - [`saga_demo`]: the order flow of `redtx demo --mode saga` and its checks.
//! - [`pg_demo`]: `redtx demo --postgres`: transfers between a Redis bank and a PostgreSQL ledger.
//! - [`cluster`]: the servers and workers (in-process, or child processes) shared by `demo` and
//!   `bench`.
//! - [`output`]: how records and outcomes are printed (text and JSON).
//!
//! Exit codes: 0 committed / completed (or done), 1 aborted, aborting (abort decided) or
//! compensated (or no such transaction for `status`), 2 invalid input or usage (or a submit the
//! coordinator rejected: another `--partitions`, say), 3 gave up
//! waiting (the transaction goes on), 4 other errors (Redis unreachable without `--wait`, ...),
//! 5 the demo or bench found an invariant broken, 6 stuck (a saga compensation keeps failing;
//! it is still retried, an operator should look).

mod bench;
mod cluster;
mod demo;
mod output;
mod pg_demo;
mod saga_demo;
mod stages;
mod status;
mod submit;

/// mimalloc: much cheaper than the system allocator for the many small buffers of the
/// in-process workers of `demo` and `bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use redtx_common::record::TxnState;
use redtx_common::{keys, Error};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "redtx", version, about = "All-or-nothing transactions across Redis servers, over Redis Streams")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enqueue a transaction spec (JSON, from FILE or `-` for stdin) and print its id.
    Submit {
        /// Redis holding the streams; with --cluster, one or more nodes of the Redis Cluster,
        /// comma-separated [default: $REDTX_REDIS_URL, then redis://127.0.0.1:6379]
        #[arg(long)]
        redis: Option<String>,
        /// The streams are on a Redis Cluster: --redis lists seed nodes (one is enough).
        #[arg(long, env = "REDTX_CLUSTER")]
        cluster: bool,
        /// Number of partitions of the deployment (as given to the coordinators and participants).
        #[arg(long, env = "REDTX_PARTITIONS", default_value_t = keys::DEFAULT_PARTITIONS, value_parser = partitions)]
        partitions: u32,
        /// Wait for the outcome: until every participant applied it (committed, completed,
        /// aborted, compensated), the abort is decided, or a compensation is stuck. A lost
        /// connection or a restarting Redis is waited out until --timeout.
        #[arg(long)]
        wait: bool,
        /// With --wait: wait past `aborting` (the abort decided) until every participant undid
        /// its part and released its locks (`aborted`).
        #[arg(long = "final", requires = "wait")]
        final_only: bool,
        /// How long --wait waits (the transaction's own timeout is in the spec).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// The spec file, or `-` for stdin.
        file: String,
    },
    /// Show a transaction: state, reason, failed step, each branch's or step's phase, attempts
    /// and reason, timestamps.
    Status {
        /// Redis holding the streams; with --cluster, one or more nodes of the Redis Cluster,
        /// comma-separated [default: $REDTX_REDIS_URL, then redis://127.0.0.1:6379]
        #[arg(long)]
        redis: Option<String>,
        /// The streams are on a Redis Cluster: --redis lists seed nodes (one is enough).
        #[arg(long, env = "REDTX_CLUSTER")]
        cluster: bool,
        /// Number of partitions of the deployment (as given to the coordinators and participants).
        #[arg(long, env = "REDTX_PARTITIONS", default_value_t = keys::DEFAULT_PARTITIONS, value_parser = partitions)]
        partitions: u32,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// The transaction id.
        id: String,
    },
    /// Run money transfers between two banks (2PC), or orders over three participants (saga), on
    /// private Redis servers, and check that nothing is created, lost or half-done.
    Demo(demo::DemoArgs),
    /// Measure transactions per second and latency against a baseline of raw Redis script calls
    /// on the same Redis, in the same run, with Redis commands and CPU per transaction of each
    /// process.
    Bench(bench::BenchArgs),
}

/// How `demo` and `bench` run their transactions.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Two-phase commit.
    #[value(name = "2pc")]
    TwoPhase,
    /// Saga: steps commit one by one; a failed step compensates the ones that ran.
    Saga,
}

/// Parses `--partitions` (1 to [`keys::MAX_PARTITIONS`]).
pub fn partitions(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=keys::MAX_PARTITIONS).contains(&n) => Ok(n),
        _ => Err(format!("expected a number from 1 to {}", keys::MAX_PARTITIONS)),
    }
}

/// Process exit codes (see the crate doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Aborted = 1,
    Invalid = 2,
    GaveUp = 3,
    Failed = 4,
    Broken = 5,
    Stuck = 6,
}

impl Exit {
    /// The exit code an error deserves.
    pub fn of(e: &Error) -> Exit {
        match e {
            Error::Spec(_) | Error::BadUrl { .. } | Error::NotACluster { .. } | Error::IsACluster { .. } => {
                Exit::Invalid
            }
            Error::WaitTimeout { .. } => Exit::GaveUp,
            _ => Exit::Failed,
        }
    }

    /// The exit code of a settled transaction.
    pub fn of_state(state: TxnState) -> Exit {
        match state {
            TxnState::Committed | TxnState::Completed => Exit::Ok,
            TxnState::Aborted | TxnState::Aborting | TxnState::Compensated => Exit::Aborted,
            TxnState::Stuck => Exit::Stuck,
            TxnState::Rejected => Exit::Invalid,
            _ => Exit::GaveUp,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Demo(_) | Command::Bench(_)) { "error" } else { "warn" };
    redtx_common::init_logging(default_level);
    let rt = match &cli.command {
        Command::Bench(args) if args.single_threaded() => {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        }
        _ => tokio::runtime::Runtime::new(),
    }
    .expect("tokio runtime");
    let code = rt.block_on(async {
        match cli.command {
            Command::Submit { redis, cluster, partitions, wait, final_only, timeout, json, file } => {
                let url = redtx_common::conn::default_url(redis.as_deref());
                submit::run(submit::Args {
                    url: &url,
                    cluster,
                    partitions,
                    wait,
                    final_only,
                    timeout,
                    json,
                    file: &file,
                })
                .await
            }
            Command::Status { redis, cluster, partitions, json, id } => {
                status::run(&redtx_common::conn::default_url(redis.as_deref()), cluster, partitions, json, &id).await
            }
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => bench::run(args).await,
        }
    });
    ExitCode::from(code as u8)
}

/// Prints `error: <e>` on stderr and returns its exit code.
pub fn fail(e: &Error) -> Exit {
    eprintln!("error: {e}");
    Exit::of(e)
}
