//! `redtx`: the producer and operator command line.
//!
//! # Layout
//! - `main.rs`: arguments, dispatch, exit codes.
//! - [`submit`]: read a JSON spec, enqueue it, optionally wait for the outcome.
//! - [`status`]: show a transaction's record.
//! - [`demo`]: a self-contained run of money transfers between two banks on two Redis servers.
//! - [`bench`]: throughput and latency of transactions, as ratios against raw Redis calls.
//! - [`cluster`]: the servers, banks and in-process workers shared by `demo` and `bench`.
//! - [`output`]: how records are printed (text and JSON).
//!
//! Exit codes: 0 committed / done, 1 aborted (or no such transaction for `status`), 2 invalid
//! input or usage, 3 gave up waiting (the transaction goes on), 4 other errors (Redis
//! unreachable, ...), 5 the demo or bench found an invariant broken.

mod bench;
mod cluster;
/// mimalloc: much cheaper than the system allocator for the many small buffers of the
/// in-process workers of `demo` and `bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod demo;
mod output;
mod status;
mod submit;

use clap::{Parser, Subcommand};
use redtx_common::Error;
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
        /// Redis holding the streams [default: $REDTX_REDIS_URL, then redis://127.0.0.1:6379]
        #[arg(long)]
        redis: Option<String>,
        /// Wait until every participant has applied the outcome.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits (the transaction's own timeout is in the spec).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// The spec file, or `-` for stdin.
        file: String,
    },
    /// Show a transaction: state, reason, each branch's vote and ack, timestamps.
    Status {
        /// Redis holding the streams [default: $REDTX_REDIS_URL, then redis://127.0.0.1:6379]
        #[arg(long)]
        redis: Option<String>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// The transaction id.
        id: String,
    },
    /// Run money transfers between two banks on two private Redis servers and check that no
    /// money is created or lost.
    Demo(demo::DemoArgs),
    /// Measure transactions per second and latency against a baseline of raw Redis script calls
    /// on the same Redis, in the same run.
    Bench(bench::BenchArgs),
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
}

impl Exit {
    /// The exit code an error deserves.
    pub fn of(e: &Error) -> Exit {
        match e {
            Error::Spec(_) | Error::BadUrl { .. } => Exit::Invalid,
            Error::WaitTimeout { .. } => Exit::GaveUp,
            _ => Exit::Failed,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Demo(_) | Command::Bench(_)) { "error" } else { "warn" };
    redtx_common::init_logging(default_level);
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let code = rt.block_on(async {
        match cli.command {
            Command::Submit { redis, wait, timeout, json, file } => {
                submit::run(&redtx_common::conn::default_url(redis.as_deref()), wait, timeout, json, &file).await
            }
            Command::Status { redis, json, id } => {
                status::run(&redtx_common::conn::default_url(redis.as_deref()), json, &id).await
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
