//! The error enum of `redtx-common`.

use crate::spec::SpecError;

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the shared layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transaction spec is invalid; nothing was enqueued.
    #[error("invalid transaction spec: {0}")]
    Spec(#[from] SpecError),
    /// A Redis URL could not be parsed. The message never contains the password.
    #[error("invalid Redis URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    /// Redis could not be reached or answered with an error. `url` has its password removed.
    #[error("Redis at {url}: {source}")]
    Redis {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    /// A stream entry or record could not be decoded.
    #[error("undecodable message: {0}")]
    Decode(#[from] crate::protocol::DecodeError),
    /// A Lua script answered something the caller does not understand (a bug or a version skew).
    #[error("unexpected reply from script {script}: {detail}")]
    ScriptReply { script: &'static str, detail: String },
    /// A Lua script refused one transition of a batch (nothing of it was written).
    #[error("script {script} failed: {detail}")]
    ScriptFailed { script: &'static str, detail: String },
    /// Waiting for an outcome gave up; the transaction goes on and its outcome is still unknown.
    #[error("gave up waiting for transaction {id} after {:.1}s; it goes on, `redtx status {id}` tells its outcome later", waited.as_secs_f64())]
    WaitTimeout { id: String, waited: std::time::Duration },
    /// `redis-server` is not installed (needed by `redtx demo` and the tests).
    #[error("redis-server was not found ({binary}); install it, e.g. `apt-get install -y redis-server` or `brew install redis`, or pass --redis URL")]
    RedisServerMissing { binary: String },
    /// A private `redis-server` could not be started.
    #[error("could not start redis-server: {0}")]
    ServerStart(String),
    /// PostgreSQL (`initdb` and `postgres`) is not installed (needed by the tests that start a
    /// private PostgreSQL server).
    #[error("PostgreSQL is not installed: {binary} was not found; install it, e.g. `apt-get install postgresql`, `dnf install postgresql-server` or `brew install postgresql`, or set REDTX_PG_BIN to the directory holding initdb and postgres")]
    PostgresMissing { binary: String },
    /// A private PostgreSQL server could not be started.
    #[error("could not start PostgreSQL: {0}")]
    PgServerStart(String),
    /// A participant's own resource (a database, a service's state) failed as a whole; nothing
    /// is known about the batch it was given, which stays pending and is retried.
    #[error("{resource}: {detail}")]
    Resource { resource: String, detail: String },
    /// Local I/O failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A failure that may go away by itself: a lost or refused connection, a timeout, Redis
    /// loading its data (`LOADING`), a failover (`TRYAGAIN`, `CLUSTERDOWN`, `READONLY`, ...),
    /// or a busy script. Worth retrying (with the same transaction id).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Redis { source, .. } => {
                source.is_io_error()
                    || source.is_connection_dropped()
                    || source.is_connection_refusal()
                    || source.is_timeout()
                    || matches!(
                        source.code(),
                        Some(
                            "LOADING"
                                | "BUSYLOADING"
                                | "TRYAGAIN"
                                | "CLUSTERDOWN"
                                | "READONLY"
                                | "MASTERDOWN"
                                | "BUSY"
                                | "OOM"
                        )
                    )
            }
            _ => false,
        }
    }

    /// Wraps a Redis error with the (redacted) URL of the server it came from.
    pub fn redis(url: &crate::conn::RedisUrl, source: redis::RedisError) -> Self {
        Error::Redis { url: url.redacted().to_string(), source }
    }
}
