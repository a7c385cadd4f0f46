//! The command-line flags every participant process shares ([`WorkerArgs`], flattened into a
//! binary's own `clap` arguments), and how they become a [`ParticipantConfig`].

use crate::ParticipantConfig;
use redtx_common::conn::{default_url, RedisTarget, URL_ENV};
use redtx_common::keys::{DEFAULT_PARTITIONS, MAX_PARTITIONS};
use std::time::Duration;

/// Flags of a participant process: where the streams are, its name, partitions, takeover and
/// retention. A binary adds its own (`--data`, `--postgres`, `--batch`, ...).
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Stream Redis URL; with --cluster, one or more nodes of the Redis Cluster, comma-separated
    /// [default: $REDTX_REDIS_URL, else redis://127.0.0.1:6379]
    #[arg(long, env = URL_ENV, hide_env_values = true)]
    pub redis: Option<String>,
    /// The streams are on a Redis Cluster: --redis lists seed nodes (one is enough)
    #[arg(long, env = "REDTX_CLUSTER")]
    pub cluster: bool,
    /// Participant name (its stream and consumer group): letters, digits, - _ .
    #[arg(long, value_parser = parse_name)]
    pub name: String,
    /// Number of partitions of the deployment (the same for every process)
    #[arg(long, env = "REDTX_PARTITIONS", default_value_t = DEFAULT_PARTITIONS, value_parser = clap::value_parser!(u32).range(1..=MAX_PARTITIONS as i64))]
    pub partitions: u32,
    /// Take over entries left pending this long by a dead worker
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub claim_idle: Duration,
    /// How long finished barriers are kept (repeats within it are recognised)
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// Stream history kept after every consumer group is done with it (for inspection)
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub keep_history: Duration,
    /// Apply nothing read from the stream Redis until this many of its replicas hold it (WAIT),
    /// so that a failover to a replica cannot lose a decision this participant applied. With
    /// --cluster, replicas of the master serving each stream
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub wait_replicas: u32,
}

fn parse_name(s: &str) -> Result<String, String> {
    redtx_common::spec::check_participant("name", s).map_err(|e| e.problem)?;
    Ok(s.to_string())
}

impl WorkerArgs {
    /// The configuration these flags describe, with `batch` and `data` given by the binary.
    /// A stream Redis URL that does not parse is an error that names it (without its password).
    pub fn config(self, batch: usize, data: Option<String>) -> redtx_common::Result<ParticipantConfig> {
        let redis = default_url(self.redis.as_deref());
        RedisTarget::parse(&redis, self.cluster)?;
        Ok(ParticipantConfig {
            redis,
            cluster: self.cluster,
            data,
            data_cluster: false,
            name: self.name,
            partitions: self.partitions,
            batch,
            claim_idle: self.claim_idle,
            retention: self.retention,
            keep_history: self.keep_history,
            wait_replicas: self.wait_replicas,
        })
    }
}
