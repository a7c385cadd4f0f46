//! Connections pinned to the node that serves one slot of a Redis Cluster.
//!
//! The cluster client routes a keyed command to the slot's master and follows `MOVED` and `ASK`
//! by itself, but it does not say which node answered, and a command that names no key (`WAIT`)
//! may go to any node when the client cannot route it at that moment. Where a second command
//! must reach the very node (and connection) that served the first, a [`Pinned`] connection is
//! used instead: a plain connection to the node [`SlotOwners`] says serves the slot, moved along
//! by `MOVED` and `ASK` answers and by lookups (`CLUSTER SLOTS`) after an error. Used by the
//! producer's outcome readers (a blocking `XREAD` per partition), and by participants with
//! `--wait-replicas` (an `XREADGROUP` or `XAUTOCLAIM`, then `WAIT` on the same connection).

use crate::conn::{RedisConn, RedisTarget, RedisUrl};
use crate::{Error, Result};
use redis::aio::MultiplexedConnection;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Where each slot is served, as last learnt (`host:port` of its master), shared by the
/// [`Pinned`] connections of a process: from `CLUSTER SLOTS` (through the cluster connection,
/// which itself follows the cluster) and from `MOVED` answers.
pub struct SlotOwners {
    target: RedisTarget,
    /// Replaced by [`SlotOwners::set_conn`] when the cluster's topology changed unseen.
    conn: std::sync::Mutex<RedisConn>,
    map: tokio::sync::Mutex<SlotMap>,
    /// Set by [`SlotOwners::set_conn`]: the next lookup asks the cluster again (the map may
    /// still name a master that stopped answering and was replaced).
    stale: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct SlotMap {
    /// `CLUSTER SLOTS`: `(first, last, node)`.
    ranges: Vec<(u16, u16, Node)>,
    /// Learnt from `MOVED` since.
    moved: HashMap<u16, Node>,
}

/// A node's `(host, port)`.
pub(crate) type Node = (String, u16);

impl SlotOwners {
    pub fn new(target: RedisTarget, conn: RedisConn) -> Self {
        SlotOwners {
            target,
            conn: std::sync::Mutex::new(conn),
            map: tokio::sync::Mutex::default(),
            stale: Default::default(),
        }
    }

    /// Looks slots up on `conn` from now on (a fresh cluster connection: the old one's slot
    /// map may still point at a master that stopped answering and was replaced).
    pub fn set_conn(&self, conn: RedisConn) {
        *self.conn.lock().expect("slot owners lock") = conn;
        self.stale.store(true, std::sync::atomic::Ordering::Release);
    }

    /// The node serving `slot`; `refresh` asks the cluster again first.
    pub async fn owner(&self, slot: u16, refresh: bool) -> Result<Node> {
        let find = |m: &SlotMap| {
            m.moved
                .get(&slot)
                .or_else(|| m.ranges.iter().find(|(a, b, _)| (*a..=*b).contains(&slot)).map(|r| &r.2))
                .cloned()
        };
        let stale = self.stale.load(std::sync::atomic::Ordering::Acquire)
            && self.stale.swap(false, std::sync::atomic::Ordering::AcqRel);
        if !refresh && !stale {
            if let Some(found) = find(&*self.map.lock().await) {
                return Ok(found);
            }
        }
        // Asked of the slot's own master as the cluster connection knows it, not of a node at
        // random: a node that does not answer then holds up only the lookups of its own slots.
        // Not under the lock, for the same reason.
        let slots = redis::cmd("CLUSTER").arg("SLOTS").clone();
        let mut conn = self.conn.lock().expect("slot owners lock").clone();
        let reply: Vec<redis::Value> = conn
            .query_at_slot(&slots, slot)
            .await
            .and_then(|v| redis::from_redis_value(v).map_err(Into::into))
            .map_err(|e| Error::redis(&self.target, e))?;
        let mut map = self.map.lock().await;
        // A node that does not know its own address (a lone master never met another node)
        // is listed with an empty, `?` or nil host, which means "where you asked": that lone
        // master, which is the seed (the first).
        let seed_host = match self.target.url().client().get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(host, _) | redis::ConnectionAddr::TcpTls { host, .. } => host.clone(),
            _ => String::new(),
        };
        map.ranges = reply
            .into_iter()
            .filter_map(|r| redis::from_redis_value::<(u16, u16, (Option<String>, u16))>(first_three(r)?).ok())
            .map(|(first, last, (host, port))| {
                let host = host.filter(|h| !h.is_empty() && h != "?").unwrap_or_else(|| seed_host.clone());
                (first, last, (host, port))
            })
            .collect();
        map.moved.clear();
        find(&map).ok_or_else(|| Error::Redis {
            url: self.target.redacted().to_string(),
            source: redis::RedisError::from((redis::ErrorKind::ClusterConnectionNotFound, "no node serves the slot")),
        })
    }

    /// Every slot served by the node that serves `slot`, as last learnt (no lookup; `None`
    /// before the first). A node that stops answering stops answering for all of them.
    pub async fn served_with(&self, slot: u16) -> Option<Vec<u16>> {
        let map = self.map.lock().await;
        let node = &map.ranges.iter().find(|(a, b, _)| (*a..=*b).contains(&slot))?.2;
        Some(map.ranges.iter().filter(|r| &r.2 == node).flat_map(|(a, b, _)| *a..=*b).collect())
    }

    /// Records that `slot` is now served by `node` (a `MOVED` answer).
    pub(crate) async fn moved(&self, slot: u16, node: Node) {
        self.map.lock().await.moved.insert(slot, node);
    }

    /// A connection of its own to `node`, with the seeds' credentials and TLS mode.
    pub(crate) async fn connect(&self, node: &Node, response_timeout: Duration) -> Result<MultiplexedConnection> {
        let bad = |reason: String| Error::BadUrl { url: format!("{}:{}", node.0, node.1), reason };
        let mut url = url::Url::parse(self.target.url().expose()).map_err(|e| bad(e.to_string()))?;
        let host = if node.0.contains(':') { format!("[{}]", node.0) } else { node.0.clone() };
        url.set_host(Some(&host)).map_err(|e| bad(e.to_string()))?;
        url.set_port(Some(node.1)).map_err(|()| bad("not a node address".into()))?;
        RedisUrl::parse(url.as_str())?.connect_with(response_timeout).await
    }
}

/// The first three items of a `CLUSTER SLOTS` range (first slot, last slot, master), the master
/// cut to its address and port.
fn first_three(range: redis::Value) -> Option<redis::Value> {
    let redis::Value::Array(mut items) = range else { return None };
    items.truncate(3);
    if let Some(redis::Value::Array(master)) = items.get_mut(2) {
        master.truncate(2);
    }
    Some(redis::Value::Array(items))
}

/// A connection to whichever node serves one slot (see the module doc).
pub struct Pinned {
    slot: u16,
    slots: Arc<SlotOwners>,
    response_timeout: Duration,
    /// The node the last command went to, and its connection.
    node: Option<(Node, MultiplexedConnection)>,
    /// Where the next command goes, learnt from a redirect (`true`: after `ASKING`).
    next: Option<(Node, bool)>,
    /// Look the slot up again before the next command.
    refresh: bool,
    /// The last command went to a node importing the slot, after `ASKING`: so must the `WAIT`
    /// pipeline's command that follows it.
    asked: bool,
    /// The last `WAIT` fell short: the next one first asks the node how many replicas it has
    /// (`ROLE`), and does not wait a whole timeout for replicas it does not have (a master just
    /// elected has none until one joins it, and a loop waiting for it would stand still).
    short: bool,
}

/// How many replicas a `ROLE` reply says are connected: a master's lists them third; anything
/// else (a replica, an unexpected reply) has none.
fn connected_replicas(role: &redis::Value) -> i64 {
    match role {
        redis::Value::Array(items) => match (items.first(), items.get(2)) {
            (Some(redis::Value::BulkString(kind)), Some(redis::Value::Array(replicas))) if kind == b"master" => {
                replicas.len() as i64
            }
            _ => 0,
        },
        _ => 0,
    }
}

impl Pinned {
    /// A connection for `slot`, opened at the first command; replies may take up to
    /// `response_timeout` (give blocking reads enough).
    pub fn new(slot: u16, slots: Arc<SlotOwners>, response_timeout: Duration) -> Self {
        Pinned { slot, slots, response_timeout, node: None, next: None, refresh: false, asked: false, short: false }
    }

    /// Sends `cmd` to the node serving the slot (after `ASKING` when the last answer was
    /// `ASK`). An error is learnt from (`MOVED`: where the slot went; `ASK`: where to ask next;
    /// anything else: the connection is dropped and the slot looked up again) and returned: the
    /// caller tries again, after a pause unless `redirected`.
    pub async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T> {
        let target = self.slots.target.clone();
        let (addr, ask) = match self.next.take() {
            Some(n) => n,
            None => match self.slots.owner(self.slot, std::mem::take(&mut self.refresh)).await {
                Ok(addr) => (addr, false),
                Err(e) => {
                    self.refresh = true;
                    return Err(e);
                }
            },
        };
        if self.node.as_ref().is_none_or(|(a, _)| *a != addr) {
            self.node = None;
            match self.slots.connect(&addr, self.response_timeout).await {
                Ok(c) => self.node = Some((addr, c)),
                Err(e) => {
                    self.refresh = true;
                    return Err(e);
                }
            }
        }
        let Some((_, conn)) = self.node.as_mut() else { unreachable!("connected above") };
        self.asked = ask;
        let r: redis::RedisResult<T> = if ask {
            let mut p = redis::pipe();
            p.cmd("ASKING").ignore().add_command(cmd.clone());
            p.query_async::<(T,)>(conn).await.map(|(r,)| r)
        } else {
            cmd.query_async(conn).await
        };
        let e = match r {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        // `MOVED <slot> <host>:<port>` / `ASK ...`: the node (the slot is ours).
        let redirect = e.redirect_node().and_then(|(node, _slot)| {
            let (host, port) = node.rsplit_once(':')?;
            Some((host.trim_start_matches('[').trim_end_matches(']').to_string(), port.parse().ok()?))
        });
        match (e.code(), redirect) {
            (Some("MOVED"), Some(to)) => {
                self.slots.moved(self.slot, to.clone()).await;
                self.next = Some((to, false));
            }
            (Some("ASK"), Some(to)) => self.next = Some((to, true)),
            // A node gone, failed over or unsure of the slot: ask again where the slot is, on
            // a fresh connection.
            _ => {
                self.node = None;
                self.refresh = true;
            }
        }
        Err(Error::redis(&target, e))
    }

    /// Drops the connection and looks the slot up again before the next command (a command
    /// given up on: its node may no longer serve the slot).
    pub(crate) fn forget(&mut self) {
        self.node = None;
        self.next = None;
        self.refresh = true;
    }

    /// `host:port` of the node the last command went to (for messages; no credentials).
    pub(crate) fn node_name(&self) -> String {
        match &self.node {
            Some(((host, port), _)) => format!("{host}:{port}"),
            None => format!("the node of slot {}", self.slot),
        }
    }

    /// Whether the last error was a redirect: the next command goes where it said, at once.
    pub(crate) fn redirected(&self) -> bool {
        self.next.is_some()
    }

    /// `before` (if any), then `WAIT replicas timeout`, on the connection the last command went
    /// to, in one round trip: how many replicas of that node hold everything this connection
    /// has written. An error if there is no such connection.
    pub(crate) async fn wait(&mut self, before: Option<&redis::Cmd>, replicas: u32, timeout: Duration) -> Result<i64> {
        let target = self.slots.target.clone();
        let Some((_, conn)) = self.node.as_mut() else {
            let e = redis::RedisError::from((redis::ErrorKind::Io, "WAIT: the connection that read is gone"));
            return Err(Error::redis(&target, e));
        };
        if self.short {
            match redis::cmd("ROLE").query_async::<redis::Value>(conn).await {
                Ok(role) => {
                    let have = connected_replicas(&role);
                    if have < i64::from(replicas) {
                        return Ok(have);
                    }
                }
                Err(e) => {
                    self.node = None;
                    self.refresh = true;
                    return Err(Error::redis(&target, e));
                }
            }
        }
        let mut pipe = redis::pipe();
        if let Some(c) = before {
            if self.asked {
                pipe.cmd("ASKING").ignore();
            }
            pipe.add_command(c.clone()).ignore();
        }
        pipe.cmd("WAIT").arg(replicas).arg(timeout.as_millis() as u64);
        match pipe.query_async::<(i64,)>(conn).await {
            Ok((got,)) => {
                self.short = got < i64::from(replicas);
                Ok(got)
            }
            Err(e) => {
                self.node = None;
                self.refresh = true;
                Err(Error::redis(&target, e))
            }
        }
    }
}
