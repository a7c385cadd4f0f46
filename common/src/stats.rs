//! What each worker process has handled, counted in its loop and readable while it runs.
//!
//! A coordinator counts the stream entries it handled and the transactions it created, decided
//! and finished ([`CoordinatorCounts`]); a participant instance the requests it answered and the
//! entries it dead-lettered ([`ConsumerCounts`]). The counters are plain integers owned by the
//! worker's single loop task: no atomics, no lock, no Redis command of their own per batch.
//!
//! They are reported two ways:
//! - in the worker's last log line (`coordinator stopped` / `participant stopped`, with
//!   `handled=...`), for whoever reads the logs;
//! - as a small hash on the stream Redis, [`keys::coordinator_stats`] or
//!   [`keys::participant_stats`], written every [`PUBLISH_EVERY`] with a time to live of
//!   [`STATS_TTL`], and once more, marked `stopped`, at a clean shutdown.
//!
//! Why a hash written on the side: a shutdown line alone says nothing while the process runs,
//! and nothing at all after a `kill -9`; a metrics endpoint would need a port per process and a
//! scraper, where a `SCAN rtx:stats:*` on the Redis every worker already shares finds them all.
//! The write is one `HSET` + `PEXPIRE` pipeline every two seconds, sent on the worker's
//! multiplexed connection by a task of its own ([`Publisher::publish_if_due`]): the loop never
//! waits for it, and a slow or failed write only delays the figures. Against the thousands of
//! commands per second a busy worker sends, it is noise. The TTL makes the hash of a process
//! killed with `-9` vanish by itself; its `at_ms` says how fresh the figures are.

use crate::keys;
use redis::aio::MultiplexedConnection;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// How often a running worker rewrites its stats hash.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(2);

/// How long a stats hash outlives its last write (a process killed with `-9` leaves its last
/// figures this long).
pub const STATS_TTL: Duration = Duration::from_secs(60);

/// The longest a stopping worker waits to write its final figures (Redis may be gone).
const FINAL_WRITE_LIMIT: Duration = Duration::from_secs(2);

/// What a coordinator handled since it started. Counted when the fenced write carrying a
/// batch's effects was applied (or the batch had nothing to write), so a batch refused by the
/// fence or lost with a failed write is not counted here but by whoever handles it again.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CoordinatorCounts {
    /// Stream entries handled (submits, votes, acks, step results; dead-lettered ones too).
    pub handled: u64,
    /// Transactions created (a record written for a new id; a refused submit's `rejected` one
    /// included).
    pub created: u64,
    /// Decisions made: a 2PC commit or abort, or the start of a saga's compensation (a saga
    /// that completes is counted in `finished` only).
    pub decided: u64,
    /// Transactions that became terminal here.
    pub finished: u64,
}

impl CoordinatorCounts {
    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &CoordinatorCounts) {
        self.handled += other.handled;
        self.created += other.created;
        self.decided += other.decided;
        self.finished += other.finished;
    }

    /// The hash fields: the counters, and the partitions owned now (`0,2,5`, empty: none).
    pub fn fields(&self, owned: impl IntoIterator<Item = u32>) -> Vec<(&'static str, String)> {
        let owned: Vec<String> = owned.into_iter().map(|p| p.to_string()).collect();
        vec![
            ("handled", self.handled.to_string()),
            ("created", self.created.to_string()),
            ("decided", self.decided.to_string()),
            ("finished", self.finished.to_string()),
            ("partitions", owned.join(",")),
        ]
    }
}

impl std::fmt::Display for CoordinatorCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "handled={} created={} decided={} finished={}",
            self.handled, self.created, self.decided, self.finished
        )
    }
}

/// What a stream worker (a participant instance) handled since it started, counted when the
/// `MULTI`/`EXEC` carrying the replies and the `XACK`s succeeded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerCounts {
    /// Entries answered and acked (for a participant: requests answered).
    pub handled: u64,
    /// Entries dead-lettered.
    pub dead: u64,
}

impl ConsumerCounts {
    /// The hash fields.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![("handled", self.handled.to_string()), ("dead", self.dead.to_string())]
    }
}

impl std::fmt::Display for ConsumerCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "handled={} dead={}", self.handled, self.dead)
    }
}

/// Writes one worker's stats hash.
pub struct Publisher {
    key: String,
    /// Fields that never change: role, id, participant, pid, started_ms.
    head: Vec<(&'static str, String)>,
    last: Option<Instant>,
    /// The write under way: a new one is not started before it ends.
    inflight: Option<tokio::task::JoinHandle<()>>,
}

impl Publisher {
    /// For the coordinator `id` (its lease owner name).
    pub fn coordinator(id: &str) -> Publisher {
        Publisher::new(keys::coordinator_stats(id), vec![("role", "coordinator".into()), ("id", id.into())])
    }

    /// For the instance `consumer` of the worker reading through consumer group `group` (a
    /// participant's name).
    pub fn participant(group: &str, consumer: &str) -> Publisher {
        Publisher::new(
            keys::participant_stats(group, consumer),
            vec![("role", "participant".into()), ("participant", group.into()), ("id", consumer.into())],
        )
    }

    fn new(key: String, mut head: Vec<(&'static str, String)>) -> Publisher {
        head.push(("pid", std::process::id().to_string()));
        head.push(("started_ms", crate::now_ms().to_string()));
        Publisher { key, head, last: None, inflight: None }
    }

    /// The key written.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// When [`PUBLISH_EVERY`] has passed since the last write (or none was made yet), starts a
    /// write of `fields` on a clone of `conn` and returns at once: the caller's loop never waits
    /// for it. Skipped while the previous write is still under way.
    pub fn publish_if_due<C>(&mut self, conn: &C, fields: impl FnOnce() -> Vec<(&'static str, String)>)
    where
        C: redis::aio::ConnectionLike + Clone + Send + 'static,
    {
        if self.last.is_some_and(|t| t.elapsed() < PUBLISH_EVERY)
            || self.inflight.as_ref().is_some_and(|h| !h.is_finished())
        {
            return;
        }
        self.last = Some(Instant::now());
        let pipe = self.pipeline("running", fields());
        let mut conn = conn.clone();
        self.inflight = Some(tokio::spawn(async move {
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                tracing::debug!(error = %e, "could not write the stats hash; the next one will");
            }
        }));
    }

    /// Writes `fields` marked `stopped` and waits for it (at most two seconds: a stopping worker
    /// does not hang on a Redis that is gone).
    pub async fn publish_stopped<C: redis::aio::ConnectionLike + Send>(
        &mut self,
        conn: &mut C,
        fields: Vec<(&'static str, String)>,
    ) {
        if let Some(h) = self.inflight.take() {
            h.abort();
        }
        let pipe = self.pipeline("stopped", fields);
        match tokio::time::timeout(FINAL_WRITE_LIMIT, pipe.query_async::<()>(conn)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "could not write the final stats hash"),
            Err(_) => tracing::debug!("the final stats hash was not written in time"),
        }
    }

    fn pipeline(&self, state: &str, fields: Vec<(&'static str, String)>) -> redis::Pipeline {
        let mut args: Vec<(&str, String)> = self.head.iter().map(|(k, v)| (*k, v.clone())).collect();
        args.push(("state", state.into()));
        args.push(("at_ms", crate::now_ms().to_string()));
        args.extend(fields);
        let mut p = redis::pipe();
        p.hset_multiple(&self.key, &args).ignore();
        p.pexpire(&self.key, STATS_TTL.as_millis() as i64).ignore();
        p
    }
}

/// One worker's stats hash, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStats {
    /// `coordinator` or `participant`.
    pub role: String,
    /// The coordinator's id, or the participant instance's consumer name.
    pub id: String,
    /// The participant's name (`None` for a coordinator).
    pub participant: Option<String>,
    /// The process.
    pub pid: Option<u32>,
    /// When the worker started and last wrote the hash (ms since the epoch).
    pub started_ms: u64,
    /// When the hash was last written.
    pub at_ms: u64,
    /// The worker stopped cleanly (these are its final figures).
    pub stopped: bool,
    /// The partitions a coordinator owned when it wrote the hash.
    pub partitions: Vec<u32>,
    /// Every counter (`handled`, `created`, `decided`, `finished`; `dead`).
    pub counts: BTreeMap<String, u64>,
}

impl WorkerStats {
    /// Reads a stats hash's fields; `None` when it lacks `role` or `id`.
    pub fn from_hash(h: &HashMap<String, String>) -> Option<WorkerStats> {
        let num = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        const NOT_COUNTS: [&str; 8] =
            ["role", "id", "participant", "pid", "started_ms", "at_ms", "state", "partitions"];
        Some(WorkerStats {
            role: h.get("role")?.clone(),
            id: h.get("id")?.clone(),
            participant: h.get("participant").cloned(),
            pid: h.get("pid").and_then(|v| v.parse().ok()),
            started_ms: num("started_ms"),
            at_ms: num("at_ms"),
            stopped: h.get("state").is_some_and(|s| s == "stopped"),
            partitions: h
                .get("partitions")
                .map(|s| s.split(',').filter_map(|p| p.parse().ok()).collect())
                .unwrap_or_default(),
            counts: h
                .iter()
                .filter(|(k, _)| !NOT_COUNTS.contains(&k.as_str()))
                .filter_map(|(k, v)| Some((k.clone(), v.parse().ok()?)))
                .collect(),
        })
    }

    /// A counter (0 when absent).
    pub fn count(&self, name: &str) -> u64 {
        self.counts.get(name).copied().unwrap_or(0)
    }

    /// Entries handled: what the share of the work is measured in.
    pub fn handled(&self) -> u64 {
        self.count("handled")
    }
}

/// Every worker's stats hash on the stream Redis (`SCAN` for [`keys::STATS_PATTERN`], then one
/// pipeline of `HGETALL`), in key order. Hashes that lapsed in between are left out.
pub async fn read_all(conn: &mut MultiplexedConnection) -> redis::RedisResult<Vec<WorkerStats>> {
    let mut found: Vec<String> = Vec::new();
    {
        let mut iter: redis::AsyncIter<String> = redis::AsyncCommands::scan_match(conn, keys::STATS_PATTERN).await?;
        while let Some(k) = iter.next_item().await {
            found.push(k?);
        }
    }
    found.sort();
    found.dedup();
    if found.is_empty() {
        // An empty pipeline is an error to the client.
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for k in &found {
        pipe.hgetall(k);
    }
    let hashes: Vec<HashMap<String, String>> = pipe.query_async(conn).await?;
    Ok(hashes.iter().filter_map(WorkerStats::from_hash).collect())
}

/// The process id in a worker id made by
/// [`unique_consumer_name`](crate::consumer::unique_consumer_name) (`<host>-<pid>-<random>`),
/// e.g. a lease's owner: which process owns a partition.
pub fn pid_of_worker(id: &str) -> Option<u32> {
    let (rest, _random) = id.rsplit_once('-')?;
    rest.rsplit_once('-')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_reads_back() {
        let p = Publisher::coordinator("host-42-abcd");
        let mut h: HashMap<String, String> = p.head.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let counts = CoordinatorCounts { handled: 10, created: 3, decided: 2, finished: 1 };
        h.extend(counts.fields([0, 5]).into_iter().map(|(k, v)| (k.to_string(), v)));
        h.insert("state".into(), "stopped".into());
        let s = WorkerStats::from_hash(&h).unwrap();
        assert_eq!((s.role.as_str(), s.id.as_str(), s.stopped), ("coordinator", "host-42-abcd", true));
        assert_eq!(s.partitions, vec![0, 5]);
        assert_eq!(s.pid, Some(std::process::id()));
        assert_eq!((s.handled(), s.count("created"), s.count("decided"), s.count("finished")), (10, 3, 2, 1));
        assert!(!s.counts.contains_key("pid"), "{:?}", s.counts);
        assert_eq!(counts.to_string(), "handled=10 created=3 decided=2 finished=1");
        h.insert("partitions".into(), String::new());
        assert!(WorkerStats::from_hash(&h).unwrap().partitions.is_empty());
    }

    #[test]
    fn worker_ids_name_their_process() {
        let id = crate::consumer::unique_consumer_name();
        assert_eq!(pid_of_worker(&id), Some(std::process::id()));
        assert_eq!(pid_of_worker("my-host-17-0a1b2c3d"), Some(17));
        assert_eq!(pid_of_worker("nonsense"), None);
    }
}
