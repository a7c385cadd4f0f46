//! The setup shared by `redtx demo` and `redtx bench`: participants on private `redis-server`s
//! (one each; the first also holds the streams), or everything on one `--redis`; a coordinator
//! and the participants in this process; accounts; the end-of-run checks (sums of keys, locks
//! left behind).
//!
//! Dropping the [`Cluster`] kills the servers it started.
//!
//! `bench` may run the workers as processes of their own instead ([`Cluster::spawn_processes`]):
//! the real `redtx-coordinator` and `redtx-participant` binaries with the settings of
//! [`Cluster::start_workers`], so the CPU each role uses can be read from `/proc`.
//!
//! `bench --cluster` puts the streams and records on a private Redis Cluster instead
//! ([`Cluster::start_on_redis_cluster`]); every participant's data is then on a private server of
//! its own, and the worker processes run with `--cluster`.

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use redtx_common::cluster_server::RedisCluster;
use redtx_common::conn::{RedisConn, RedisTarget, RedisUrl, URL_ENV};
use redtx_common::server::{RedisServer, ServerOptions};
use redtx_common::shutdown::Shutdown;
use redtx_common::{keys, Error};

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
    /// Redis holding the streams (and the first member's data, unless the streams are apart);
    /// on a Redis Cluster, its seed nodes, comma-separated.
    pub stream_url: String,
    /// The private Redis Cluster holding the streams and records, when there is one
    /// ([`Cluster::start_on_redis_cluster`]).
    pub streams: Option<RedisCluster>,
    /// Partitions of the run (coordinator, participants and the client must agree).
    pub partitions: u32,
    /// The participants, in the order given to [`Cluster::start`].
    pub members: Vec<Member>,
    /// Keeps the private servers alive until the cluster is dropped (the members', in order).
    servers: Vec<RedisServer>,
    /// The private server holding only the streams and records ([`Cluster::start`] with
    /// `streams_apart`).
    stream_server: Option<RedisServer>,
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
    /// the participants are named `<label>-<run id>-<name>` so runs never mix. The streams are
    /// on the first participant's server, or, with `streams_apart` (private servers only), on
    /// one more private server of their own. No workers yet.
    pub fn start(
        redis: Option<&str>,
        label: &str,
        names: &[&str],
        partitions: u32,
        streams_apart: bool,
    ) -> Result<Cluster, Error> {
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
        let mut stream_url = members.first().map(|m| m.url.expose().to_string()).unwrap_or_default();
        let mut stream_server = None;
        if redis.is_none() && streams_apart {
            let s = RedisServer::start_with(ServerOptions { aof: false, ..Default::default() })?;
            stream_url = s.url();
            stream_server = Some(s);
        }
        Ok(Cluster {
            stream_url,
            streams: None,
            partitions,
            members,
            servers,
            stream_server,
            shutdown: Shutdown::new(),
            workers: tokio::task::JoinSet::new(),
        })
    }

    /// Starts a private Redis Cluster of `masters` masters (no replicas, AOF off) for the streams
    /// and records, and one private server (AOF off) per participant in `names` for its data.
    /// Partition `p` is on master `p % masters`: the masters serve as many partitions each as
    /// the count allows (the cluster's even slot ranges alone put 2, 4 and 2 of 8 partitions
    /// on 3 masters).
    pub fn start_on_redis_cluster(names: &[&str], partitions: u32, masters: usize) -> Result<Cluster, Error> {
        let opts =
            redtx_common::cluster_server::ClusterOptions { spread_partitions: Some(partitions), ..Default::default() };
        let streams = RedisCluster::start_with(masters, 0, opts)?;
        let opts = ServerOptions { aof: false, ..Default::default() };
        let mut servers = Vec::new();
        let mut members = Vec::new();
        for n in names {
            let s = RedisServer::start_with(opts.clone())?;
            members.push(Member { name: n.to_string(), url: RedisUrl::parse(&s.url())?, prefix: String::new() });
            servers.push(s);
        }
        Ok(Cluster {
            stream_url: streams.seeds(),
            streams: Some(streams),
            partitions,
            members,
            servers,
            stream_server: None,
            shutdown: Shutdown::new(),
            workers: tokio::task::JoinSet::new(),
        })
    }

    /// Where the streams are: the stream Redis, or the Redis Cluster's seeds.
    pub fn stream_target(&self) -> Result<RedisTarget, Error> {
        RedisTarget::parse(&self.stream_url, self.streams.is_some())
    }

    /// The servers holding the streams and records: the stream Redis, or each master of the
    /// Redis Cluster (in node order) with its process and the partitions it serves.
    pub fn stream_nodes(&self) -> Result<Vec<StreamNode>, Error> {
        let Some(streams) = &self.streams else {
            let pid = match &self.stream_server {
                Some(s) => s.pid(),
                None if self.shared() => None,
                None => self.server_pid(0),
            };
            return Ok(vec![StreamNode {
                url: RedisUrl::parse(&self.stream_url)?,
                pid,
                partitions: (0..self.partitions).collect(),
            }]);
        };
        let mut out = Vec::new();
        let of: Vec<usize> =
            (0..self.partitions).map(|p| streams.master_of_slot(keys::partition_slot(p))).collect::<Result<_, _>>()?;
        for m in streams.masters()? {
            out.push(StreamNode {
                url: RedisUrl::parse(&streams.url(m))?,
                pid: streams.pid(m),
                partitions: (0..self.partitions).filter(|p| of[*p as usize] == m).collect(),
            });
        }
        Ok(out)
    }

    /// A producer client for the run's streams (one server, or the Redis Cluster).
    pub async fn client(&self) -> Result<redtx_common::Client, Error> {
        let client = match &self.streams {
            Some(c) => {
                let seeds = c.seed_urls();
                let seeds: Vec<&str> = seeds.iter().map(String::as_str).collect();
                redtx_common::Client::connect_cluster(&seeds).await?
            }
            None => redtx_common::Client::connect(&self.stream_url).await?,
        };
        Ok(client.with_partitions(self.partitions))
    }

    /// Every worker's stats hash (`rtx:stats:*`), read from each server holding the streams
    /// (on a Redis Cluster each hash is on the master of its slot).
    pub async fn worker_stats(&self) -> Result<Vec<redtx_common::stats::WorkerStats>, Error> {
        let mut out = Vec::new();
        for node in self.stream_nodes()? {
            let mut conn = node.url.connect().await?;
            out.extend(redtx_common::stats::read_all(&mut conn).await.map_err(|e| Error::redis(&node.url, e))?);
        }
        Ok(out)
    }

    /// The process id of member `m`'s private server (`None` on a shared `--redis`).
    pub fn server_pid(&self, m: usize) -> Option<u32> {
        self.servers.get(m).and_then(RedisServer::pid)
    }

    /// True when the streams and every participant are on one Redis (`--redis`).
    pub fn shared(&self) -> bool {
        self.servers.is_empty()
    }

    /// Spawns a coordinator and every participant in this process (in cluster mode when the
    /// streams are on a Redis Cluster).
    pub fn start_workers(&mut self) {
        let mut coordinator = redtx_coordinator::CoordinatorConfig::new(self.stream_url.clone());
        coordinator.partitions = self.partitions;
        coordinator.cluster = self.streams.is_some();
        self.workers.spawn(redtx_coordinator::run(coordinator, self.shutdown.clone()));
        for m in &self.members {
            let mut cfg = redtx_participant::ParticipantConfig::new(self.stream_url.clone(), m.name.clone());
            cfg.data = Some(m.url.expose().to_string());
            cfg.partitions = self.partitions;
            cfg.cluster = self.streams.is_some();
            self.workers.spawn(redtx_participant::run(cfg, self.shutdown.clone()));
        }
    }

    /// Starts `coordinators` coordinators and `instances` instances of every participant as
    /// child processes: the `redtx-coordinator` and `redtx-participant` binaries next to this
    /// one, with the partitions and settings of [`Cluster::start_workers`] (the binaries'
    /// defaults are the configs' defaults). Their log level is `error` unless `RUST_LOG` says
    /// otherwise. Wait for them with [`Processes::wait_ready`]; dropping the [`Processes`] kills
    /// them. Each is labelled by its role (`coordinator`, `participant bank-a`), numbered (`#1`,
    /// `#2`, ...) when there are several.
    pub fn spawn_processes(&self, coordinators: usize, instances: usize) -> Result<Processes, Error> {
        let (coordinator_bin, participant_bin) = worker_binaries()?;
        let mut procs = Processes { children: Vec::new() };
        let numbered = |role: String, i: usize, of: usize| if of > 1 { format!("{role} #{}", i + 1) } else { role };
        // URLs go in the environment, or as the default `--data` (the stream Redis), never on
        // the command line, where `ps` would show a password.
        for i in 0..coordinators {
            let mut coordinator = std::process::Command::new(&coordinator_bin);
            coordinator.env(URL_ENV, &self.stream_url).arg("--partitions").arg(self.partitions.to_string());
            if self.streams.is_some() {
                coordinator.arg("--cluster");
            }
            procs.spawn(numbered("coordinator".into(), i, coordinators), None, coordinator)?;
        }
        for m in &self.members {
            for i in 0..instances {
                let mut participant = std::process::Command::new(&participant_bin);
                participant
                    .env(URL_ENV, &self.stream_url)
                    .arg("--name")
                    .arg(&m.name)
                    .arg("--partitions")
                    .arg(self.partitions.to_string());
                if m.url.expose() != self.stream_url {
                    // A private server: no password.
                    participant.arg("--data").arg(m.url.expose());
                }
                if self.streams.is_some() {
                    participant.arg("--cluster");
                }
                let role = numbered(format!("participant {}", m.name), i, instances);
                procs.spawn(role, Some(m.name.clone()), participant)?;
            }
        }
        Ok(procs)
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

/// The `redtx-coordinator` and `redtx-participant` binaries next to the running executable, or
/// an error saying how to build them.
pub fn worker_binaries() -> Result<(std::path::PathBuf, std::path::PathBuf), Error> {
    Ok((worker_binary("redtx-coordinator")?, worker_binary("redtx-participant")?))
}

fn worker_binary(name: &str) -> Result<std::path::PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if path.is_file() {
        return Ok(path);
    }
    Err(Error::Io(std::io::Error::other(format!(
        "{} not found (it runs next to {}): build the workspace with `cargo build --release` (or pass --inline \
         to run the workers in this process)",
        path.display(),
        exe.display()
    ))))
}

/// A server holding (some of) the streams and records.
pub struct StreamNode {
    /// Its own URL (a master's, on a Redis Cluster).
    pub url: RedisUrl,
    /// Its process, when this run started it.
    pub pid: Option<u32>,
    /// The partitions whose keys it holds.
    pub partitions: Vec<u32>,
}

/// A worker running as a child process.
pub struct WorkerProcess {
    /// `coordinator` or `participant <name>` (`coordinator #2`, ... when there are several).
    pub role: String,
    /// The participant's name (its consumer group); `None` for a coordinator.
    pub participant: Option<String>,
    child: std::process::Child,
}

impl WorkerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The workers started by [`Cluster::spawn_processes`]; killed (`SIGKILL`) when dropped, stopped
/// gracefully by [`Processes::stop`].
pub struct Processes {
    pub children: Vec<WorkerProcess>,
}

/// How long the workers get to come up, and to stop before they are killed.
const PROCESS_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

impl Processes {
    fn spawn(
        &mut self,
        role: String,
        participant: Option<String>,
        mut cmd: std::process::Command,
    ) -> Result<(), Error> {
        if std::env::var_os("RUST_LOG").is_none() {
            // Like the in-process workers under `demo` and `bench`: only errors.
            cmd.env("RUST_LOG", "error");
        }
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| Error::Io(std::io::Error::other(format!("{role}: {:?}: {e}", cmd.get_program()))))?;
        self.children.push(WorkerProcess { role, participant, child });
        Ok(())
    }

    /// An error if a worker has exited.
    pub fn check_running(&mut self) -> Result<(), Error> {
        for w in &mut self.children {
            if let Ok(Some(status)) = w.child.try_wait() {
                return Err(Error::Io(std::io::Error::other(format!("{} exited ({status})", w.role))));
            }
        }
        Ok(())
    }

    /// Waits until every worker works: each participant has its consumer group on every
    /// partition stream of its own, and each participant instance has started its loop (its
    /// stats hash is written); every partition is leased, on private servers by one of these
    /// coordinators, each owning some (on a shared `--redis` a deployment's coordinators may
    /// hold some).
    pub async fn wait_ready(&mut self, cluster: &Cluster) -> Result<(), Error> {
        let url = cluster.stream_target()?;
        let mut conn = url.connect().await?;
        let end = std::time::Instant::now() + PROCESS_WAIT;
        loop {
            self.check_running()?;
            let mut waiting = None;
            let owners = lease_owners(&conn, &url, cluster.partitions).await?;
            let stats = cluster.worker_stats().await?;
            for w in &self.children {
                if !self.is_ready(w, cluster, &mut conn, &owners, &stats).await {
                    waiting = Some(w.role.clone());
                    break;
                }
            }
            let Some(role) = waiting else { return Ok(()) };
            if std::time::Instant::now() >= end {
                return Err(Error::Io(std::io::Error::other(format!(
                    "{role} not ready after {}s",
                    PROCESS_WAIT.as_secs()
                ))));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    async fn is_ready(
        &self,
        w: &WorkerProcess,
        cluster: &Cluster,
        conn: &mut RedisConn,
        owners: &[Option<String>],
        stats: &[redtx_common::stats::WorkerStats],
    ) -> bool {
        let pid = w.pid();
        if w.participant.is_some() && !stats.iter().any(|s| s.pid == Some(pid) && s.role == "participant") {
            return false;
        }
        if w.participant.is_none() && !cluster.shared() && !owners.iter().flatten().any(|o| of_process(o, pid)) {
            // Each coordinator owns some partitions once they are spread.
            return false;
        }
        let ours: Vec<u32> = self.children.iter().filter(|c| c.participant.is_none()).map(WorkerProcess::pid).collect();
        for p in 0..cluster.partitions {
            let ready = match &w.participant {
                Some(name) => {
                    // The participant creates its group on each stream before it reads, and a
                    // group keeps what arrives until it is read: enough to submit. (A consumer
                    // shows in `XINFO CONSUMERS` only once something was delivered to it.)
                    let groups: redis::RedisResult<Vec<std::collections::HashMap<String, redis::Value>>> =
                        redis::cmd("XINFO")
                            .arg("GROUPS")
                            .arg(keys::participant_stream(name, p))
                            .query_async(conn)
                            .await;
                    groups.is_ok_and(|gs| {
                        gs.iter()
                            .any(|g| matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == name.as_bytes()))
                    })
                }
                None => match &owners[p as usize] {
                    Some(owner) => cluster.shared() || ours.iter().any(|pid| of_process(owner, *pid)),
                    None => false,
                },
            };
            if !ready {
                return false;
            }
        }
        true
    }

    /// Stops every worker with `SIGTERM` (they finish what they hold, a coordinator gives its
    /// leases up), waiting for each a while before killing it.
    pub async fn stop(&mut self) {
        for w in &self.children {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(w.pid().to_string())
                .stderr(std::process::Stdio::null())
                .status();
        }
        let end = std::time::Instant::now() + PROCESS_WAIT;
        for w in &mut self.children {
            while matches!(w.child.try_wait(), Ok(None)) && std::time::Instant::now() < end {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        self.kill();
    }

    fn kill(&mut self) {
        for w in &mut self.children {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a coordinator id (`<host>-<pid>-<random>`, see
/// `redtx_common::consumer::unique_consumer_name`) belongs to process `pid`.
pub fn of_process(id: &str, pid: u32) -> bool {
    redtx_common::stats::pid_of_worker(id) == Some(pid)
}

/// The owner (coordinator id) of the lease of each partition `0..partitions`, `None` where free.
/// One `GET` per partition, all at once (on a Redis Cluster each lease is in its partition's
/// slot; a single command follows a moved slot, which a pipeline does not).
pub async fn lease_owners(conn: &RedisConn, url: &RedisTarget, partitions: u32) -> Result<Vec<Option<String>>, Error> {
    let mut tasks = Vec::with_capacity(partitions as usize);
    for p in 0..partitions {
        let mut conn = conn.clone();
        tasks.push(tokio::spawn(async move { conn.get::<_, Option<String>>(keys::lease(p)).await }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        let value = t.await.map_err(|e| Error::Io(std::io::Error::other(e)))?.map_err(|e| Error::redis(url, e))?;
        // `<token>:<owner>`.
        out.push(value.and_then(|v| v.split_once(':').map(|(_, o)| o.to_string())));
    }
    Ok(out)
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
