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
    /// Data Redis URL the branches apply to [default: the stream Redis]
    #[arg(long)]
    data: Option<String>,
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
    if let Some(Err(e)) = args.data.as_deref().map(redtx_participant::parse_data_url) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let cfg = match args.worker.config(args.batch as usize, args.data) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = redtx_participant::check_data(&cfg) {
        // A usage error, like a bad URL: refused before anything starts.
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match run(cfg, Shutdown::on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
