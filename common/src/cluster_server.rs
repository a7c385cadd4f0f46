//! A private Redis Cluster of `redis-server` processes on free loopback ports, for the tests.
//!
//! [`RedisCluster::start`] starts `masters × (1 + replicas_per_master)` nodes (each a
//! [`RedisServer`] with `cluster-enabled yes`, in its own temporary directory, binary from `PATH`
//! or `$REDTX_REDIS_SERVER`), gives the masters the 16384 slots in even ranges
//! (`CLUSTER ADDSLOTSRANGE`; [`ClusterOptions::spread_partitions`] deals the partitions' slots out
//! round robin instead) and each node a config epoch of its own (`CLUSTER SET-CONFIG-EPOCH`),
//! joins them (`CLUSTER MEET`), makes the replicas replicate (`CLUSTER REPLICATE`) and returns
//! once every node says `cluster_state:ok`, every node reports the same slot map, and no two
//! masters share a config epoch. Then, while clients keep writing:
//!
//! - [`move_slot`](RedisCluster::move_slot) moves a slot the way `redis-cli --cluster reshard`
//!   does: `SETSLOT IMPORTING` on the target, `SETSLOT MIGRATING` on the source, `MIGRATE` of the
//!   slot's keys in batches, then `SETSLOT NODE` on the target, the source and every other master
//!   ([`begin_move`](RedisCluster::begin_move) stops half-way, for `ASK` tests);
//! - [`failover`](RedisCluster::failover) runs `CLUSTER FAILOVER` on a replica of a master (a
//!   coordinated switch: no acknowledged write is lost);
//! - [`kill`](RedisCluster::kill) and [`restart`](RedisCluster::restart) a node (same port,
//!   directory and `nodes.conf`, so it rejoins).
//!
//! Nodes are named by their index (`0..len()`), fixed for the cluster's life; which of them are
//! masters changes with failovers ([`masters`](RedisCluster::masters)). Every process is killed
//! when the [`RedisCluster`] is dropped. A node's cluster bus is its port + 10000: ports are
//! picked so that both are free.
//!
//! The admin commands here are synchronous (no runtime needed), like [`RedisServer`].

use crate::server::{free_port, RedisServer, ServerOptions};
use crate::{keys, Error, Result};
use redis::Value;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// Slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// Offset of a node's cluster bus port from its client port (Redis's default).
const BUS_OFFSET: u16 = 10000;

/// Keys moved per `MIGRATE` while moving a slot.
const MIGRATE_BATCH: usize = 100;

/// Options of a private cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// AOF on every node (`appendfsync always`): a restarted node keeps what it acked.
    pub aof: bool,
    /// `requirepass` of every node's default user (and `masterauth`, so replicas can sync).
    pub password: Option<String>,
    /// `cluster-node-timeout`: how long a node may be unreachable before the others count it
    /// failed (and a replica takes over). Short on a loaded machine means spurious failovers.
    pub node_timeout: Duration,
    /// How long [`RedisCluster::start`] and the helpers wait for the cluster to settle.
    pub settle: Duration,
    /// TLS: every node also listens with TLS on a port of its own ([`RedisCluster::tls_url`]),
    /// and the nodes talk to each other over TLS (`tls-cluster`, `tls-replication`). The plain
    /// port stays, for the harness (and clients on it see the plain ports).
    pub tls: Option<ClusterTls>,
    /// Extra `--name value` arguments for every node.
    pub extra: Vec<(String, String)>,
    /// `Some(n)`: the slot of partition `p` of `n` partitions (`{p}`) goes to master
    /// `p % masters`, so the masters serve as many partitions each as `n` allows (the even slot
    /// ranges alone put 2, 4 and 2 of 8 partitions on 3 masters). Assigned when the cluster
    /// starts: moving the slots afterwards would take a settle per slot.
    pub spread_partitions: Option<u32>,
}

/// The certificate files of a TLS cluster (PEM): one server certificate for every node (valid for
/// 127.0.0.1, the address nodes announce) and the CA that signed it. Clients are not asked for
/// certificates.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            aof: false,
            password: None,
            node_timeout: Duration::from_secs(5),
            settle: Duration::from_secs(30),
            tls: None,
            extra: Vec::new(),
            spread_partitions: None,
        }
    }
}

impl ClusterOptions {
    /// The defaults with `cluster-require-full-coverage no`: while a master is down with no
    /// replica to take over, the other masters keep serving their slots.
    pub fn partial_coverage() -> Self {
        ClusterOptions { extra: vec![("cluster-require-full-coverage".into(), "no".into())], ..Default::default() }
    }
}

struct Node {
    server: RedisServer,
    /// The cluster node id (`CLUSTER MYID`), kept across restarts by `nodes.conf`.
    id: String,
    /// The TLS port, in a TLS cluster.
    tls_port: Option<u16>,
    /// Stopped (SIGSTOP) by [`RedisCluster::freeze_and_fail_over`]: asked nothing until thawed.
    frozen: bool,
}

/// A running private Redis Cluster.
pub struct RedisCluster {
    nodes: Vec<Node>,
    opts: ClusterOptions,
}

/// Every node's master (`-` for a master), by node id, as one node sees it.
type Roles = BTreeMap<String, String>;

/// One slot range of `CLUSTER SLOTS`: `(first, last, master port, replica ports sorted)`.
type SlotRange = (u16, u16, u16, Vec<u16>);

impl RedisCluster {
    /// Starts `masters` masters with `replicas_per_master` replicas each (default options: no
    /// AOF, 5 s node timeout) and waits until the cluster is settled.
    pub fn start(masters: usize, replicas_per_master: usize) -> Result<Self> {
        Self::start_with(masters, replicas_per_master, ClusterOptions::default())
    }

    /// [`start`](Self::start) with options.
    pub fn start_with(masters: usize, replicas_per_master: usize, opts: ClusterOptions) -> Result<Self> {
        if masters == 0 || masters > usize::from(SLOTS) {
            return Err(Error::ServerStart(format!("a cluster needs 1 to {SLOTS} masters, not {masters}")));
        }
        let total = masters * (1 + replicas_per_master);
        let mut server_opts = ServerOptions {
            aof: opts.aof,
            password: opts.password.clone(),
            extra: vec![
                ("cluster-enabled".into(), "yes".into()),
                ("cluster-config-file".into(), "nodes.conf".into()),
                ("cluster-node-timeout".into(), opts.node_timeout.as_millis().to_string()),
                // Nothing in the tests wants a replica to refuse failover for being stale.
                ("cluster-replica-validity-factor".into(), "0".into()),
                // A replica's first sync starts at once (the default waits 5 s for others).
                ("repl-diskless-sync-delay".into(), "0".into()),
            ],
        };
        if let Some(p) = &opts.password {
            server_opts.extra.push(("masterauth".into(), p.clone()));
        }
        server_opts.extra.extend(opts.extra.iter().cloned());
        let mut nodes = Vec::with_capacity(total);
        for _ in 0..total {
            let mut node_opts = server_opts.clone();
            // The cluster bus is on the client port + 10000; with `tls-cluster`, on the TLS
            // port's. That one is chosen with a free bus port.
            let tls_port = match &opts.tls {
                None => None,
                Some(tls) => {
                    let port = port_with_free_bus()?;
                    let path = |p: &std::path::Path| p.display().to_string();
                    node_opts.extra.extend([
                        ("tls-port".to_string(), port.to_string()),
                        ("tls-cert-file".into(), path(&tls.cert)),
                        ("tls-key-file".into(), path(&tls.key)),
                        ("tls-ca-cert-file".into(), path(&tls.ca)),
                        ("tls-auth-clients".into(), "no".into()),
                        ("tls-cluster".into(), "yes".into()),
                        ("tls-replication".into(), "yes".into()),
                    ]);
                    Some(port)
                }
            };
            let server = match tls_port {
                None => RedisServer::start_picking(node_opts, port_with_free_bus)?,
                Some(_) => RedisServer::start_picking(node_opts, free_port)?,
            };
            nodes.push(Node { server, id: String::new(), tls_port, frozen: false });
        }
        let mut cluster = RedisCluster { nodes, opts };
        for i in 0..total {
            let id: String = cluster.query(i, redis::cmd("CLUSTER").arg("MYID"))?;
            cluster.nodes[i].id = id;
            // A config epoch of its own for every node, as `redis-cli --cluster create` gives
            // them. Left at 0, equal epochs are told apart only later, by gossip, one bump at a
            // time; a slot handed over meanwhile can go back to its old master on a bump, and
            // a master that loses a slot deletes the keys it holds in it.
            let _: () = cluster.query(i, redis::cmd("CLUSTER").arg("SET-CONFIG-EPOCH").arg(i + 1))?;
        }
        // Slots: master m gets [m * 16384 / masters, (m + 1) * 16384 / masters - 1], but for the
        // partitions' slots when they are spread.
        let mut owner: Vec<usize> = vec![0; usize::from(SLOTS)];
        for m in 0..masters {
            let (first, last) = (m * usize::from(SLOTS) / masters, (m + 1) * usize::from(SLOTS) / masters - 1);
            owner[first..=last].fill(m);
        }
        for p in 0..cluster.opts.spread_partitions.unwrap_or(0) {
            owner[usize::from(keys::partition_slot(p))] = p as usize % masters;
        }
        let mut first = 0;
        for slot in 1..=owner.len() {
            if slot == owner.len() || owner[slot] != owner[first] {
                let range = redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(first).arg(slot - 1).clone();
                let _: () = cluster.query(owner[first], &range)?;
                first = slot;
            }
        }
        for i in 1..total {
            let (port, bus) = (cluster.port(i), cluster.bus_port(i));
            let _: () = cluster.query(0, redis::cmd("CLUSTER").arg("MEET").arg("127.0.0.1").arg(port).arg(bus))?;
        }
        // A replica can only replicate a master it knows.
        cluster.wait_until("every node knows every other", |c| {
            for i in 0..total {
                let known = c.nodes_view(i)?;
                if known.len() != total || known.iter().any(|n| n.flags.contains("handshake")) {
                    return Ok(Some(format!("node {i} knows {} of {total} nodes", known.len())));
                }
            }
            Ok(None)
        })?;
        for r in masters..total {
            let master = (r - masters) % masters;
            let id = cluster.nodes[master].id.clone();
            let _: () = cluster.query(r, redis::cmd("CLUSTER").arg("REPLICATE").arg(id))?;
        }
        cluster.wait_settled()?;
        Ok(cluster)
    }

    /// Number of nodes (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never: [`start`](Self::start) refuses that).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Client port of node `node`.
    pub fn port(&self, node: usize) -> u16 {
        self.nodes[node].server.port()
    }

    /// `redis://[:password@]127.0.0.1:<port>` of node `node` (its plain port).
    pub fn url(&self, node: usize) -> String {
        self.nodes[node].server.url()
    }

    /// `rediss://[:password@]127.0.0.1:<TLS port>` of node `node`, in a TLS cluster.
    pub fn tls_url(&self, node: usize) -> Option<String> {
        let port = self.nodes[node].tls_port?;
        Some(match &self.opts.password {
            Some(p) => format!("rediss://:{p}@127.0.0.1:{port}"),
            None => format!("rediss://127.0.0.1:{port}"),
        })
    }

    /// The TLS port of `node`, or its plain port: where `MIGRATE` reaches it (Redis migrates
    /// over TLS when the cluster bus is TLS).
    fn migrate_port(&self, node: usize) -> u16 {
        self.nodes[node].tls_port.unwrap_or_else(|| self.port(node))
    }

    /// The cluster bus port of `node`.
    fn bus_port(&self, node: usize) -> u16 {
        self.migrate_port(node) + BUS_OFFSET
    }

    /// The cluster node id of `node`.
    pub fn node_id(&self, node: usize) -> &str {
        &self.nodes[node].id
    }

    /// The process id of `node` while it runs.
    pub fn pid(&self, node: usize) -> Option<u32> {
        self.nodes[node].server.pid()
    }

    /// The URLs of every node not killed: seeds for a cluster client.
    pub fn seed_urls(&self) -> Vec<String> {
        (0..self.len()).filter(|&i| self.started(i)).map(|i| self.url(i)).collect()
    }

    /// The TLS URLs of every node not killed, in a TLS cluster (empty otherwise).
    pub fn tls_seed_urls(&self) -> Vec<String> {
        (0..self.len()).filter(|&i| self.started(i)).filter_map(|i| self.tls_url(i)).collect()
    }

    /// [`seed_urls`](Self::seed_urls) joined by commas, as `--cluster --redis` takes them.
    pub fn seeds(&self) -> String {
        self.seed_urls().join(",")
    }

    /// Whether `node`'s process is alive.
    pub fn is_running(&mut self, node: usize) -> bool {
        self.nodes[node].server.is_running()
    }

    /// The nodes that are masters now, as a running node sees it (sorted).
    pub fn masters(&self) -> Result<Vec<usize>> {
        let view = self.nodes_view(self.any_running()?)?;
        let mut out: Vec<usize> = view
            .iter()
            .filter(|n| n.flags.contains("master") && !n.flags.contains("fail"))
            .filter_map(|n| self.index_of(&n.id))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// The replicas of `master` now, as a running node sees it.
    pub fn replicas_of(&self, master: usize) -> Result<Vec<usize>> {
        let view = self.nodes_view(self.any_running()?)?;
        let id = self.node_id(master);
        Ok(view.iter().filter(|n| n.master_id == id).filter_map(|n| self.index_of(&n.id)).collect())
    }

    /// The node serving `slot` now, as a running node sees it.
    pub fn master_of_slot(&self, slot: u16) -> Result<usize> {
        let map = self.slot_map(self.any_running()?)?;
        let port = map
            .iter()
            .find(|(first, last, ..)| (*first..=*last).contains(&slot))
            .map(|r| r.2)
            .ok_or_else(|| setup(format!("no node serves slot {slot}")))?;
        (0..self.len())
            .find(|&i| self.port(i) == port || self.nodes[i].tls_port == Some(port))
            .ok_or_else(|| setup(format!("port {port} is not ours")))
    }

    /// The URL of the node serving `slot`.
    pub fn master_url_of_slot(&self, slot: u16) -> Result<String> {
        Ok(self.url(self.master_of_slot(slot)?))
    }

    /// The URL of the node serving `key`'s slot.
    pub fn master_url_of_key(&self, key: &str) -> Result<String> {
        self.master_url_of_slot(keys::slot(key))
    }

    /// Moves `slot` (and its keys) to master `to`, while clients go on using it: they get `ASK`
    /// for keys already moved, and `MOVED` once it is done. Returns the number of keys moved.
    /// Moving a slot to the master that has it does nothing. The same as
    /// [`begin_move`](Self::begin_move), then [`SlotMove::finish`].
    pub fn move_slot(&self, slot: u16, to: usize) -> Result<usize> {
        match self.begin_move(slot, to)? {
            Some(m) => m.finish(self),
            None => Ok(0),
        }
    }

    /// Starts moving `slot` to master `to` (`SETSLOT IMPORTING` on it, `SETSLOT MIGRATING` on
    /// the slot's master) and leaves the slot half-way, its keys still on the source, until
    /// [`SlotMove::finish`]: meanwhile the source answers `ASK` for keys it does not have, and
    /// [`SlotMove::migrate`] moves chosen keys. `None` if `to` serves the slot already.
    pub fn begin_move(&self, slot: u16, to: usize) -> Result<Option<SlotMove>> {
        let from = self.master_of_slot(slot)?;
        if from == to {
            return Ok(None);
        }
        let m = SlotMove { slot, from, to, moved: 0 };
        m.setslot(self, to, "IMPORTING", from)?;
        m.setslot(self, from, "MIGRATING", to)?;
        Ok(Some(m))
    }

    /// Fails `master` over to one of its replicas with `CLUSTER FAILOVER` (coordinated: the
    /// master stops taking writes, the replica catches up, then takes over) and waits until the
    /// replica is master and the cluster is settled. Returns the new master.
    pub fn failover(&mut self, master: usize) -> Result<usize> {
        let replica = self
            .replicas_of(master)?
            .into_iter()
            .find(|&r| self.is_running(r))
            .ok_or_else(|| setup(format!("node {master} has no running replica to fail over to")))?;
        // A manual failover the master does not answer in time is dropped by the replica:
        // ask again every few seconds until it is master.
        let mut asked: Option<Instant> = None;
        self.wait_until(&format!("node {replica} to become master"), |c| {
            let me = c.nodes_view(replica)?;
            if me.iter().any(|n| n.flags.contains("myself") && n.flags.contains("master")) {
                return Ok(None);
            }
            if asked.is_none_or(|t| t.elapsed() > Duration::from_secs(6)) {
                let _: () = c.query(replica, redis::cmd("CLUSTER").arg("FAILOVER"))?;
                asked = Some(Instant::now());
            }
            Ok(Some("still a replica".to_string()))
        })?;
        self.wait_settled()?;
        Ok(replica)
    }

    /// Kills `master` with SIGKILL and waits until the cluster has failed it over by itself to
    /// one of its replicas (after the node timeout), and is settled; returns the new master.
    /// The killed node stays down: [`restart`](Self::restart) brings it back, as a replica of
    /// the new master.
    pub fn kill_and_fail_over(&mut self, master: usize) -> Result<usize> {
        let replicas = self.replicas_of(master)?;
        if replicas.is_empty() {
            return Err(setup(format!("node {master} has no replica to take over")));
        }
        self.kill(master);
        self.elected_instead_of(master, &replicas)
    }

    /// Freezes `master` (SIGSTOP: its connections stay open and nothing is answered) and waits
    /// until the cluster has failed it over by itself to one of its replicas (after the node
    /// timeout), and is settled; returns the new master. [`thaw`](Self::thaw) lets it go on: it
    /// finds itself replaced and becomes a replica of the new master.
    pub fn freeze_and_fail_over(&mut self, master: usize) -> Result<usize> {
        let replicas = self.replicas_of(master)?;
        if replicas.is_empty() {
            return Err(setup(format!("node {master} has no replica to take over")));
        }
        self.signal(master, "STOP")?;
        self.nodes[master].frozen = true;
        self.elected_instead_of(master, &replicas)
    }

    /// Freezes `node` (SIGSTOP) and returns at once: with a replica the cluster fails it over
    /// after the node timeout; without one its slots go unanswered (and, unless
    /// `cluster-require-full-coverage` is `no`, the cluster refuses every slot) until
    /// [`thaw`](Self::thaw).
    pub fn freeze(&mut self, node: usize) -> Result<()> {
        self.signal(node, "STOP")?;
        self.nodes[node].frozen = true;
        Ok(())
    }

    /// Lets a node frozen by [`freeze`](Self::freeze) or [`freeze_and_fail_over`](Self::freeze_and_fail_over) go on, and
    /// waits until the cluster is settled again.
    pub fn thaw(&mut self, node: usize) -> Result<()> {
        self.signal(node, "CONT")?;
        self.nodes[node].frozen = false;
        self.wait_settled()
    }

    fn signal(&self, node: usize, sig: &str) -> Result<()> {
        let pid = self.pid(node).ok_or_else(|| setup(format!("node {node} is not running")))?;
        let ok = std::process::Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .map_err(|e| setup(format!("kill -{sig} {pid}: {e}")))?
            .success();
        if !ok {
            return Err(setup(format!("kill -{sig} {pid} failed")));
        }
        Ok(())
    }

    /// Waits until one of `replicas` of the lost `master` is master, and the cluster (but the
    /// lost node) is settled; returns it.
    fn elected_instead_of(&self, master: usize, replicas: &[usize]) -> Result<usize> {
        let mut new_master = None;
        self.wait_until(&format!("a replica of node {master} to be elected master"), |c| {
            for &r in replicas {
                let me = c.nodes_view(r)?;
                if me.iter().any(|n| n.flags.contains("myself") && n.flags.contains("master")) {
                    new_master = Some(r);
                    return Ok(None);
                }
            }
            Ok(Some("no replica is master yet".to_string()))
        })?;
        self.wait_settled()?;
        new_master.ok_or_else(|| setup("no new master".into()))
    }

    /// Kills `node` with SIGKILL. Without a replica to take over, its slots are down (and the
    /// cluster `fail` once the others notice) until it is restarted.
    pub fn kill(&mut self, node: usize) {
        self.nodes[node].server.kill();
    }

    /// Restarts `node` (after [`kill`](Self::kill), or killing it now) on the same port and
    /// directory, and waits until the cluster is settled again.
    pub fn restart(&mut self, node: usize) -> Result<()> {
        self.nodes[node].server.restart()?;
        self.wait_settled()
    }

    /// Waits until every running node says `cluster_state:ok`, all 16384 slots are assigned,
    /// and every running node reports the same slot map (masters and replicas).
    pub fn wait_settled(&self) -> Result<()> {
        self.wait_until("the cluster to settle", |c| c.unsettled())
    }

    /// Why the cluster is not settled, or `None` if it is.
    fn unsettled(&self) -> Result<Option<String>> {
        let mut first: Option<(usize, Vec<SlotRange>, Roles)> = None;
        for i in 0..self.len() {
            if !self.started(i) {
                continue;
            }
            let info: String = self.query(i, redis::cmd("CLUSTER").arg("INFO"))?;
            if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                return Ok(Some(format!("node {i} is not ok")));
            }
            if !info.lines().any(|l| l.trim() == format!("cluster_slots_assigned:{SLOTS}")) {
                return Ok(Some(format!("node {i} does not see every slot assigned")));
            }
            let replication: String = self.query(i, redis::cmd("INFO").arg("replication"))?;
            if replication.lines().any(|l| l.trim() == "role:slave")
                && !replication.lines().any(|l| l.trim() == "master_link_status:up")
            {
                return Ok(Some(format!("replica {i} is not in sync with its master")));
            }
            let map = self.slot_map(i)?;
            // `CLUSTER SLOTS` may list a replica before every node's `CLUSTER NODES` does.
            let view = self.nodes_view(i)?;
            // Masters on equal config epochs would settle that later, by bumping one: a slot
            // moved meanwhile could go back (see `start`).
            let mut epochs: Vec<u64> = view.iter().filter(|n| n.is_master()).map(|n| n.config_epoch).collect();
            epochs.sort_unstable();
            if epochs.windows(2).any(|w| w[0] == w[1]) {
                return Ok(Some(format!("node {i} sees masters on equal config epochs: {epochs:?}")));
            }
            let roles: Roles = view.into_iter().map(|n| (n.id, n.master_id)).collect();
            if roles.len() != self.len() {
                return Ok(Some(format!("node {i} knows {} of {} nodes", roles.len(), self.len())));
            }
            match &first {
                None => first = Some((i, map, roles)),
                Some((j, m, _)) if *m != map => {
                    return Ok(Some(format!("nodes {j} and {i} disagree on the slot map: {m:?} / {map:?}")))
                }
                Some((j, _, r)) if *r != roles => {
                    return Ok(Some(format!("nodes {j} and {i} disagree on who replicates whom")))
                }
                Some(_) => {}
            }
        }
        Ok(None)
    }

    /// Polls `check` (every 50 ms) until it returns `None` or the settle time is over.
    fn wait_until(&self, what: &str, mut check: impl FnMut(&Self) -> Result<Option<String>>) -> Result<()> {
        let started = Instant::now();
        loop {
            let why = match check(self) {
                Ok(None) => return Ok(()),
                Ok(Some(why)) => why,
                Err(e) => e.to_string(),
            };
            if started.elapsed() > self.opts.settle {
                return Err(setup(format!("waited {:?} for {what}: {why}", self.opts.settle)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `node` was started and not killed nor frozen (its process may still have died).
    fn started(&self, node: usize) -> bool {
        self.nodes[node].server.pid().is_some() && !self.nodes[node].frozen
    }

    fn any_running(&self) -> Result<usize> {
        (0..self.len()).find(|&i| self.started(i)).ok_or_else(|| setup("no node is running".into()))
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// `CLUSTER SLOTS` of `node`, by port, sorted.
    fn slot_map(&self, node: usize) -> Result<Vec<SlotRange>> {
        let v: Value = self.query(node, redis::cmd("CLUSTER").arg("SLOTS"))?;
        let bad = || setup(format!("node {node}: unexpected CLUSTER SLOTS reply"));
        let Value::Array(ranges) = v else { return Err(bad()) };
        let int = |v: &Value| match v {
            Value::Int(n) => u16::try_from(*n).ok(),
            _ => None,
        };
        let mut out = Vec::new();
        for r in ranges {
            let Value::Array(items) = r else { return Err(bad()) };
            let (first, last) =
                (items.first().and_then(int).ok_or_else(bad)?, items.get(1).and_then(int).ok_or_else(bad)?);
            let mut ports = Vec::new();
            for n in &items[2..] {
                let Value::Array(node) = n else { return Err(bad()) };
                ports.push(node.get(1).and_then(int).ok_or_else(bad)?);
            }
            let master = *ports.first().ok_or_else(bad)?;
            let mut replicas = ports[1..].to_vec();
            replicas.sort_unstable();
            out.push((first, last, master, replicas));
        }
        out.sort_unstable();
        Ok(out)
    }

    /// `CLUSTER NODES` of `node`.
    fn nodes_view(&self, node: usize) -> Result<Vec<NodeLine>> {
        let text: String = self.query(node, redis::cmd("CLUSTER").arg("NODES"))?;
        Ok(text.lines().filter_map(NodeLine::parse).collect())
    }

    /// Runs one admin command on `node` over a fresh synchronous connection.
    fn query<T: redis::FromRedisValue>(&self, node: usize, cmd: &redis::Cmd) -> Result<T> {
        let url = self.url(node);
        let on = |e: redis::RedisError| setup(format!("node {node} (port {}): {e}", self.port(node)));
        let client = redis::Client::open(url.as_str()).map_err(on)?;
        let mut con = client.get_connection_with_timeout(Duration::from_secs(2)).map_err(on)?;
        con.set_read_timeout(Some(Duration::from_secs(10))).map_err(on)?;
        cmd.query(&mut con).map_err(on)
    }
}

/// A slot being moved ([`RedisCluster::begin_move`]).
#[derive(Debug)]
pub struct SlotMove {
    slot: u16,
    from: usize,
    to: usize,
    moved: usize,
}

impl SlotMove {
    /// The source master.
    pub fn from(&self) -> usize {
        self.from
    }

    /// `MIGRATE`s `keys` (of the slot) from the source to the target now.
    pub fn migrate(&mut self, cluster: &RedisCluster, keys: &[Vec<u8>]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut migrate = redis::cmd("MIGRATE");
        migrate.arg("127.0.0.1").arg(cluster.migrate_port(self.to)).arg("").arg(0).arg(5000);
        if let Some(p) = &cluster.opts.password {
            migrate.arg("AUTH").arg(p);
        }
        migrate.arg("KEYS").arg(keys);
        let _: Value = cluster.query(self.from, &migrate)?;
        self.moved += keys.len();
        Ok(())
    }

    /// Moves the slot's remaining keys in batches, gives the slot to the target
    /// (`SETSLOT NODE` on the target, the source, then every other master) and waits until the
    /// cluster is settled. Returns the number of keys moved in all.
    pub fn finish(mut self, cluster: &RedisCluster) -> Result<usize> {
        let (slot, from, to) = (self.slot, self.from, self.to);
        loop {
            let batch: Vec<Vec<u8>> =
                cluster.query(from, redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(MIGRATE_BATCH))?;
            if batch.is_empty() {
                break;
            }
            self.migrate(cluster, &batch)?;
        }
        self.assign(cluster)?;
        // The target's `SETSLOT NODE` gives it the greatest config epoch (the masters' epochs are
        // distinct, see `start`), so no claim of the source's can win it back: the rest of the
        // cluster learns of the move by gossip.
        cluster.wait_until(&format!("slot {slot} served by node {to} everywhere"), |c| {
            Ok((c.master_of_slot(slot)? != to).then(|| format!("slot {slot} not yet on node {to}")))
        })?;
        cluster.wait_settled()?;
        Ok(self.moved)
    }

    /// Gives the slot to the target: `SETSLOT NODE` on the target first (it starts answering for
    /// the slot), then the source (it stops asking), then the other masters; gossip spreads the
    /// rest.
    fn assign(&self, cluster: &RedisCluster) -> Result<()> {
        let (from, to) = (self.from, self.to);
        self.setslot(cluster, to, "NODE", to)?;
        self.setslot(cluster, from, "NODE", to)?;
        for m in cluster.masters()? {
            if m != to && m != from {
                self.setslot(cluster, m, "NODE", to)?;
            }
        }
        Ok(())
    }

    /// `CLUSTER SETSLOT <slot> <how> <id of node named>` on `node`.
    fn setslot(&self, cluster: &RedisCluster, node: usize, how: &str, named: usize) -> Result<()> {
        let id = cluster.node_id(named).to_string();
        cluster.query(node, redis::cmd("CLUSTER").arg("SETSLOT").arg(self.slot).arg(how).arg(id))
    }
}

/// One line of `CLUSTER NODES`:
/// `<id> <ip:port@bus> <flags> <master id or -> <ping sent> <pong received> <config epoch> ...`.
struct NodeLine {
    id: String,
    flags: String,
    master_id: String,
    config_epoch: u64,
}

impl NodeLine {
    fn parse(line: &str) -> Option<NodeLine> {
        let mut f = line.split_whitespace();
        let id = f.next()?.to_string();
        let _addr = f.next()?;
        let flags = f.next()?.to_string();
        let master_id = f.next()?.to_string();
        let config_epoch = f.nth(2)?.parse().ok()?;
        Some(NodeLine { id, flags, master_id, config_epoch })
    }

    fn is_master(&self) -> bool {
        self.flags.split(',').any(|f| f == "master")
    }
}

fn setup(detail: String) -> Error {
    Error::ClusterSetup(detail)
}

/// A free port whose cluster bus port (+10000) is free too.
fn port_with_free_bus() -> Result<u16> {
    for _ in 0..100 {
        let port = free_port()?;
        let Some(bus) = port.checked_add(BUS_OFFSET) else { continue };
        if TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return Ok(port);
        }
    }
    Err(Error::ServerStart("no free port p with p + 10000 free as well".into()))
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ports: BTreeMap<usize, u16> = (0..self.len()).map(|i| (i, self.port(i))).collect();
        f.debug_struct("RedisCluster").field("ports", &ports).finish()
    }
}
