//! `redtx-participant`: the built-in key-value participant as a process.

use clap::Parser;
use redtx_common::shutdown::Shutdown;
use redtx_participant::{run, WorkerArgs};
use std::process::ExitCode;

/// mimalloc: much cheaper than the system allocator for the many small buffers of a stream worker.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Applies redtx 2PC branches and saga steps to a Redis: reads rtx:part:<NAME>:{P} of every
/// partition P, answers (vote, ack, result) on rtx:coord:{P}.
#[derive(Parser, Debug)]
#[command(name = "redtx-participant", version)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
    /// Data Redis URL the branches apply to; with --data-cluster, one or more nodes of a Redis
    /// Cluster, comma-separated [default: the stream Redis, a cluster with --cluster]
    #[arg(long)]
    data: Option<String>,
    /// The data is on a Redis Cluster: --data lists seed nodes (one is enough). A branch's keys
    /// are grouped by hash slot, each group applied atomically in its slot
    #[arg(long, env = "REDTX_DATA_CLUSTER")]
    data_cluster: bool,
    /// Most entries read (and scripts pipelined) at once
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    batch: u64,
}

// One thread: the worker is one loop, and cross-thread wake-ups cost more than they give on
// a few cores.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    redtx_common::init_logging("info");
    let mut cfg = match args.worker.config(args.batch as usize, args.data) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    cfg.data_cluster = args.data_cluster;
    if let Err(e) = redtx_participant::check_data(&cfg) {
        // A usage error, like a bad URL: refused before anything starts.
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match run(cfg, Shutdown::on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        // The data Redis is not what the flags say (found when first reached): a usage error.
        Err(e @ redtx_common::Error::BadUrl { .. }) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
