//! The setup shared by `redtx demo` and `redtx bench`: participants on private `redis-server`s
//! (one each; the first also holds the streams), or everything on one `--redis`; a coordinator
//! and the participants in this process; accounts; the end-of-run checks (sums of keys, locks
//! left behind).
//!
//! Dropping the [`Cluster`] kills the servers it started.

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use redtx_common::server::{RedisServer, ServerOptions};
use redtx_common::shutdown::Shutdown;
use redtx_common::{conn::RedisUrl, keys, Error};

/// A participant of the run and where it keeps its data.
pub struct Member {
    /// The participant's name: e.g. `bank-a`, or `<label>-<run>-bank-a` on a shared `--redis`, so
    /// a run never joins (and feeds its data to) the consumer group of real participants.
    pub name: String,
    /// Its data Redis.
    pub url: RedisUrl,
    /// Prefix of every key of the run: empty on private servers, `<label>:<run>:` on `--redis`.
    pub prefix: String,
}

impl Member {
    /// The run's name for `key` (`stock:3`, or `demo:1a2b3c4d:stock:3` on a shared `--redis`).
    pub fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// Accounts per member (`book[m][i]`) and the participants owning them (`book.names[m]`).
pub struct Book {
    pub names: Vec<String>,
    pub keys: Vec<Vec<String>>,
}

impl std::ops::Index<usize> for Book {
    type Output = Vec<String>;
    fn index(&self, member: usize) -> &Vec<String> {
        &self.keys[member]
    }
}

/// The servers, the participants and the in-process workers.
pub struct Cluster {
    /// Redis holding the streams (and the first member's data).
    pub stream_url: String,
    /// Partitions of the run (coordinator, participants and the client must agree).
    pub partitions: u32,
    /// The participants, in the order given to [`Cluster::start`].
    pub members: Vec<Member>,
    /// Keeps the private servers alive until the cluster is dropped.
    servers: Vec<RedisServer>,
    shutdown: Shutdown,
    workers: tokio::task::JoinSet<redtx_common::Result<()>>,
}

impl Cluster {
    /// Waits for every producer task; on the first failure, stops the workers and returns it.
    pub async fn join_producers(
        &mut self,
        mut producers: tokio::task::JoinSet<Result<(), Error>>,
    ) -> Result<(), Error> {
        let mut failure = None;
        while let Some(r) = producers.join_next().await {
            if let Ok(Err(e)) = r {
                failure.get_or_insert(e);
            }
        }
        if let Some(e) = failure {
            self.stop_workers().await;
            return Err(e);
        }
        Ok(())
    }

    /// Starts one private server (AOF off) per participant in `names`, or uses `redis` for the
    /// streams and every participant; on a shared Redis the keys carry `<label>:<run id>:` and
    /// the participants are named `<label>-<run id>-<name>` so runs never mix. No workers yet.
    pub fn start(redis: Option<&str>, label: &str, names: &[&str], partitions: u32) -> Result<Cluster, Error> {
        let run = &redtx_common::spec::new_txn_id()[..8];
        let mut servers = Vec::new();
        let members = match redis {
            Some(u) => {
                let url = RedisUrl::parse(u)?;
                let prefix = format!("{label}:{run}:");
                names
                    .iter()
                    .map(|n| Member { name: format!("{label}-{run}-{n}"), url: url.clone(), prefix: prefix.clone() })
                    .collect::<Vec<_>>()
            }
            None => {
                let opts = ServerOptions { aof: false, ..Default::default() };
                let mut members = Vec::new();
                for n in names {
                    let s = RedisServer::start_with(opts.clone())?;
                    members.push(Member {
                        name: n.to_string(),
                        url: RedisUrl::parse(&s.url())?,
                        prefix: String::new(),
                    });
                    servers.push(s);
                }
                members
            }
        };
        let stream_url = members.first().map(|m| m.url.expose().to_string()).unwrap_or_default();
        Ok(Cluster {
            stream_url,
            partitions,
            members,
            servers,
            shutdown: Shutdown::new(),
            workers: tokio::task::JoinSet::new(),
        })
    }

    /// True when the streams and every participant are on one Redis (`--redis`).
    pub fn shared(&self) -> bool {
        self.servers.is_empty()
    }

    /// Spawns a coordinator and every participant in this process.
    pub fn start_workers(&mut self) {
        let mut coordinator = redtx_coordinator::CoordinatorConfig::new(self.stream_url.clone());
        coordinator.partitions = self.partitions;
        self.workers.spawn(redtx_coordinator::run(coordinator, self.shutdown.clone()));
        for m in &self.members {
            let mut cfg = redtx_participant::ParticipantConfig::new(self.stream_url.clone(), m.name.clone());
            cfg.data = Some(m.url.expose().to_string());
            cfg.partitions = self.partitions;
            self.workers.spawn(redtx_participant::run(cfg, self.shutdown.clone()));
        }
    }

    /// Runs one more worker in this process, stopped with the others.
    pub fn spawn_worker<F>(&mut self, worker: impl FnOnce(Shutdown) -> F)
    where
        F: std::future::Future<Output = redtx_common::Result<()>> + Send + 'static,
    {
        self.workers.spawn(worker(self.shutdown.clone()));
    }

    /// Stops the workers; they finish what they hold. On a shared `--redis`, the run's own
    /// participant streams and barriers are deleted then (nobody else reads them).
    pub async fn stop_workers(&mut self) {
        self.shutdown.trigger();
        while self.workers.join_next().await.is_some() {}
        if self.shared() {
            let streams: Vec<String> = self
                .members
                .iter()
                .flat_map(|m| (0..self.partitions).map(|p| keys::participant_stream(&m.name, p)))
                .collect();
            if let Ok(mut c) = self.members[0].url.connect().await {
                let _: redis::RedisResult<()> = c.del(&streams).await;
                // The run's participants' barriers (their records expire by themselves).
                for m in &self.members {
                    let found: Vec<String> = match c.scan_match::<_, String>(keys::barrier(&m.name, "*")).await {
                        Ok(mut iter) => {
                            let mut v = Vec::new();
                            while let Some(Ok(k)) = iter.next_item().await {
                                v.push(k);
                            }
                            v
                        }
                        Err(_) => continue,
                    };
                    for chunk in found.chunks(1000) {
                        let _: redis::RedisResult<()> = c.del(chunk).await;
                    }
                }
            }
        }
    }

    /// The keys of `accounts` accounts (`acct:a0`, `acct:b0`, ...) at each of the first
    /// `members` participants, and their names.
    pub fn book(&self, members: usize, accounts: usize) -> Book {
        let members = &self.members[..members];
        Book {
            names: members.iter().map(|m| m.name.clone()).collect(),
            keys: members
                .iter()
                .enumerate()
                .map(|(b, m)| (0..accounts).map(|i| m.key(&format!("acct:{}{i}", (b'a' + b as u8) as char))).collect())
                .collect(),
        }
    }

    /// One connection per participant's data Redis, in member order.
    pub async fn connect_all(&self) -> Result<Vec<MultiplexedConnection>, Error> {
        let mut conns = Vec::new();
        for m in &self.members {
            conns.push(m.url.connect().await?);
        }
        Ok(conns)
    }

    /// Sets every key of `book[m]` to `value` at member `m`.
    pub async fn open_accounts(
        &self,
        conns: &mut [MultiplexedConnection],
        book: &Book,
        value: i64,
    ) -> Result<(), Error> {
        for (m, keys) in book.keys.iter().enumerate() {
            let pairs: Vec<(&String, i64)> = keys.iter().map(|k| (k, value)).collect();
            self.set(conns, m, &pairs).await?;
        }
        Ok(())
    }

    /// `MSET`s `pairs` at member `m`, in chunks.
    pub async fn set<V: redis::ToRedisArgs + Send + Sync>(
        &self,
        conns: &mut [MultiplexedConnection],
        m: usize,
        pairs: &[(&String, V)],
    ) -> Result<(), Error> {
        for chunk in pairs.chunks(1000) {
            let _: () = conns[m].mset(chunk).await.map_err(|e| Error::redis(&self.members[m].url, e))?;
        }
        Ok(())
    }

    /// The values of `keys` at member `m` (`None`: missing).
    pub async fn get<V: redis::FromRedisValue>(
        &self,
        conns: &mut [MultiplexedConnection],
        m: usize,
        keys: &[String],
    ) -> Result<Vec<Option<V>>, Error> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(1000) {
            let vals: Vec<Option<V>> = conns[m].mget(chunk).await.map_err(|e| Error::redis(&self.members[m].url, e))?;
            out.extend(vals);
        }
        Ok(out)
    }

    /// The sum of every account of `book`.
    pub async fn total(&self, conns: &mut [MultiplexedConnection], book: &Book) -> Result<i64, Error> {
        let mut sum = 0;
        for (m, keys) in book.keys.iter().enumerate() {
            sum += self.get::<i64>(conns, m, keys).await?.into_iter().flatten().sum::<i64>();
        }
        Ok(sum)
    }

    /// Locks on the run's keys still held (there must be none once everything finished): keys
    /// named [`keys::lock`] of a key with the run's prefix, in every data Redis.
    pub async fn locks_left(&self, conns: &mut [MultiplexedConnection]) -> Result<usize, Error> {
        let mut n = 0;
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for (m, c) in self.members.iter().zip(conns.iter_mut()) {
            // On a shared --redis every member has the same server and prefix: count once.
            if seen.contains(&(m.url.expose(), m.prefix.as_str())) {
                continue;
            }
            seen.push((m.url.expose(), m.prefix.as_str()));
            n += count_locks(c, m).await?;
        }
        Ok(n)
    }

    /// On a shared `--redis`, deletes `keys` of member `m` (the run's own data).
    pub async fn delete(&self, conns: &mut [MultiplexedConnection], m: usize, keys: &[String]) -> Result<(), Error> {
        for chunk in keys.chunks(1000) {
            let _: () = conns[m].del(chunk).await.map_err(|e| Error::redis(&self.members[m].url, e))?;
        }
        Ok(())
    }
}

async fn count_locks(c: &mut MultiplexedConnection, m: &Member) -> Result<usize, Error> {
    let pattern = keys::lock(&format!("{}*", m.prefix));
    let mut iter: redis::AsyncIter<String> = c.scan_match(&pattern).await.map_err(|e| Error::redis(&m.url, e))?;
    let mut n = 0;
    while let Some(k) = iter.next_item().await {
        let _ = k.map_err(|e| Error::redis(&m.url, e))?;
        n += 1;
    }
    Ok(n)
}

/// Waits until every transaction of `ids` is terminal (`aborting` and `stuck` are settled for a
/// producer, but a participant may still be applying the abort or the compensation), polling
/// their records, for at most `limit`. Returns the final records, `None` where there is none.
pub async fn settle(
    client: &redtx_common::Client,
    ids: &[String],
    limit: std::time::Duration,
) -> Result<Vec<Option<redtx_common::record::TxnRecord>>, Error> {
    let end = std::time::Instant::now() + limit;
    let mut out: Vec<Option<redtx_common::record::TxnRecord>> = vec![None; ids.len()];
    let mut open: Vec<usize> = (0..ids.len()).collect();
    loop {
        let mut still = Vec::new();
        for i in open {
            let r = client.status(&ids[i]).await?;
            if !r.as_ref().is_some_and(|r| r.state.is_terminal()) {
                still.push(i);
            }
            out[i] = r;
        }
        open = still;
        if open.is_empty() || std::time::Instant::now() >= end {
            return Ok(out);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
