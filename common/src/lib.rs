//! Shared pieces of redtx: everything the coordinator, the participants and producers must agree on.
//!
//! # Layout
//! - [`spec`]: the transaction spec a producer submits (JSON on the CLI, the same types in Rust),
//!   its validation and its limits. A branch (2PC) or step (saga) carries an opaque payload.
//! - [`kv`]: the built-in key-value participant's payload: ops, their validation and encoding.
//! - [`machine`]: a transaction's whole life, 2PC and saga, as a pure state machine (events in,
//!   effects out); the table of states and events is in its doc.
//! - [`protocol`]: the typed messages exchanged over Redis Streams and their wire format
//!   (stream fields `t` and `m`, MessagePack in a versioned envelope).
//! - [`keys`]: the names of every Redis key and stream redtx uses, and a transaction's partition.
//! - [`record`]: the transaction record (`rtx:txn:{P}:<id>`) and the transaction states.
//! - [`scripts`]: the registry of Lua scripts (from `lua/`), called by SHA, pipelined, reloaded on
//!   `NOSCRIPT`.
//! - [`consumer`]: the stream worker runtime shared by coordinators and participants (batched
//!   `XREADGROUP`, `XAUTOCLAIM` take-over, dead-lettering, graceful shutdown).
//! - [`client`]: the producer library (`Client`): submit a transaction, read its status, wait for
//!   its outcome.
//! - [`conn`]: Redis URLs (with secrets redacted for display) and connections, to one server or
//!   to a Redis Cluster ([`conn::RedisTarget`], [`conn::RedisConn`]; what a cluster allows).
//! - [`slots`]: connections pinned to the master serving one slot of a Redis Cluster (following
//!   `MOVED` and `ASK`), for reads and `WAIT`s that must reach that very node.
//! - [`outage`]: partitions whose cluster master stopped answering, skipped by a worker's loop
//!   and probed off it until they answer.
//! - [`server`]: starts private `redis-server` processes on free ports (for `redtx demo` and tests).
//! - [`cluster_server`]: starts a private Redis Cluster (masters, replicas) on free ports, and
//!   moves slots, fails masters over, kills and restarts nodes under load (for tests).
//! - [`pg_server`]: starts private PostgreSQL servers on free ports (for tests), 2PC-ready
//!   (`max_prepared_transactions` set).
//! - [`shutdown`]: SIGINT/SIGTERM handling.
//! - [`stats`]: what each coordinator and participant process handled, counted in its loop,
//!   logged when it stops and published as a small hash while it runs.
//! - [`failpoint`]: named freeze points for kill-at-this-step tests.
//! - [`error`]: the crate's error enum.

pub mod client;
pub mod cluster_server;
pub mod conn;
pub mod consumer;
pub mod error;
pub mod failpoint;
pub mod keys;
pub mod kv;
pub mod machine;
pub mod outage;
pub mod pg_server;
pub mod protocol;
pub mod record;
pub mod scripts;
pub mod server;
pub mod shutdown;
pub mod slots;
pub mod spec;
pub mod stats;

pub use client::Client;
pub use error::{Error, Result};

/// Logs to stderr, filtered by `RUST_LOG` (default: `default_level`, e.g. `info`). Every binary
/// calls this first.
pub fn init_logging(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Milliseconds since the Unix epoch, the unit of every timestamp redtx stores.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
