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
    /// `--cluster` was given, but a seed is a Redis server with cluster support disabled.
    #[error("{seed} is not a Redis Cluster node (cluster support is disabled there); without --cluster it is used as a single server")]
    NotACluster { seed: String },
    /// A single server was given, but it is a Redis Cluster node: its keys are spread over
    /// several nodes.
    #[error("{url} is a Redis Cluster node: pass --cluster (with one or more of its nodes as --redis)")]
    IsACluster { url: String },
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
    /// A private Redis Cluster (the test harness) did not reach the state it was asked for.
    #[error("Redis Cluster harness: {0}")]
    ClusterSetup(String),
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
    /// Entries read from the stream Redis are not yet on as many of its replicas as asked
    /// (`WAIT`): they are not applied, stay pending, and are taken up again.
    #[error("entries read at {url} are on {got} of the {wanted} replicas asked for after {:.1}s; not applied yet (they stay pending and are taken up again)", waited.as_secs_f64())]
    NotReplicated { url: String, wanted: u32, got: i64, waited: std::time::Duration },
    /// Local I/O failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// On a Redis Cluster, a failure of one slot alone that stops only the work of that slot
    /// (its partition) while the others go on: a [transient](Self::is_transient) one (its
    /// master down, the slot on the move), or too few replicas of its master for
    /// `--wait-replicas` (a master just elected has none until one joins it).
    pub fn is_slot_outage(&self) -> bool {
        self.is_transient() || matches!(self, Error::NotReplicated { .. })
    }

    /// A failure that may go away by itself: a lost or refused connection, a timeout, Redis
    /// loading its data (`LOADING`), a failover (`TRYAGAIN`, `CLUSTERDOWN`, `READONLY`,
    /// `UNBLOCKED`, ...), a cluster slot on the move (`MOVED`, `ASK` still answered after the
    /// cluster connection's own retries), or a busy script. Worth retrying (with the same
    /// transaction id).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Redis { source, .. } => {
                source.is_io_error()
                    || source.is_connection_dropped()
                    // A cluster connection with no connection to the slot's node (yet), or a
                    // redirect still answered after the crate's retries (a slot migrating).
                    || source.kind() == redis::ErrorKind::ClusterConnectionNotFound
                    || source.redirect_node().is_some()
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
                                | "MOVED"
                                | "ASK"
                                // A blocking read cut short by a failover.
                                | "UNBLOCKED"
                        )
                    )
            }
            _ => false,
        }
    }

    /// Wraps a Redis error with where it came from, redacted: a [`RedisUrl`](crate::conn::RedisUrl)
    /// or a [`RedisTarget`](crate::conn::RedisTarget) (whose `Display` hide passwords).
    pub fn redis(at: &(impl std::fmt::Display + ?Sized), source: redis::RedisError) -> Self {
        Error::Redis { url: at.to_string(), source }
    }
}
