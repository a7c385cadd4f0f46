//! The coordinator's Redis layer: owns partitions, keeps their live transactions in memory,
//! feeds every event to the pure [`machine`](redtx_common::machine), and writes each batch's
//! records, messages, outcomes, dead letters and `XACK`s in one fenced call per partition.
//!
//! One loop does everything, in this order, forever:
//! 1. every round (`TICK`): refresh membership and leases, acquire or release partitions
//!    ([`crate::lease`]); a newly acquired partition is reloaded: its live records
//!    (`rtx:live:{P}`) into memory, then every entry pending in its stream (whoever read it) is
//!    claimed and handled again (handlers are idempotent); entries idle past `--claim-idle` are
//!    claimed too (a fenced former owner may still have read some);
//! 2. transactions whose [`Txn::wake_ms`] is due get a tick (deadlines, re-sends, retries);
//! 3. one `XREADGROUP` over every owned partition's stream, blocking until the next due
//!    transaction at most; each partition's share of the batch is handled and written.
//!
//! On a Redis Cluster (`--cluster`) a partition is one slot, and one command, pipeline or script
//! call can only touch one slot. So the loop is the same, but: each owned partition is read by
//! its own `XREADGROUP` ([`StreamReaders`]: a blocking read per partition on a connection of
//! its own); each partition's batch is written by its own fenced call, checked against its own lease
//! only, the partitions' calls sent at once; the lease scripts run one call per partition; the
//! records of a batch and a takeover's reload are read in one pipeline per partition. On one
//! server the commands are exactly those described above.
//!
//! Writes are sent without waiting for their answer ([`crate::writer`], up to
//! `--writes-in-flight` unanswered); answers are settled in order at the start of each pass, and
//! all of them before leases move or a partition reloads. Each write names the partition's write
//! counter it follows, so one stepped on top of a write that was not applied is refused too.
//!
//! A write that fails (Redis unreachable, out of memory) leaves the batch's entries pending, and
//! the partition's memory is thrown away and reloaded from Redis: memory never runs ahead of
//! what was written. A write refused by the fence means the lease moved: the partition is
//! dropped at once (step down).

use crate::lease;
use crate::writer::{Replies, Writer};
use crate::CoordinatorConfig;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use redtx_common::conn::{ClusterRetries, RedisConn, RedisTarget};
use redtx_common::consumer::{
    dead_letter_fields, ensure_group, replicated, retake_and_wait, trim_stream, StreamReaders, CLAIM_RESPONSE_TIMEOUT,
};
use redtx_common::machine::{orphan, Effect, Event, Output, Timing, Txn};
use redtx_common::outage::Outages;
use redtx_common::protocol::{entry_fields, is_batch_entry, items_of_entry, submit_head, Message, PROTOCOL_VERSION};
use redtx_common::record::{create_fields, progress_fields, txn_from_hash, TxnState};
use redtx_common::scripts::{self, LuaScript};
use redtx_common::shutdown::Shutdown;
use redtx_common::slots::{Pinned, SlotOwners};
use redtx_common::spec::{check_id, Mode};
use redtx_common::stats::{CoordinatorCounts, Publisher};
use redtx_common::{failpoint, keys, now_ms, Error, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// `lua/coordinator/fenced.lua`.
pub static FENCED: LuaScript = LuaScript::new("fenced", include_str!("../../lua/coordinator/fenced.lua"));

/// Fail point: a batch created transactions; nothing of it is written yet.
pub const FP_AFTER_CREATE: &str = "coordinator-after-create";
/// Fail point: a batch's decisions (and the messages carrying them) are written; its
/// `XACK`s too. A new owner must finish from the records alone.
pub const FP_AFTER_DECISION: &str = "coordinator-after-decision";
/// Fail point: a batch decided transactions; nothing of it is written yet (the votes that
/// decided it stay pending).
pub const FP_BEFORE_DECISION: &str = "coordinator-before-decision";

/// Outcome stream cap (`MAXLEN ~`).
pub const OUTCOMES_MAXLEN: usize = 100_000;

/// Most entry ids in one `XACK` of a fenced write (Lua's `unpack` in `fenced.lua` takes a few
/// thousand arguments at most).
const MAX_ACKS_PER_COMMAND: usize = 1000;

/// Response timeout of the lease keeper's connection.
const KEEPER_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How often leases, membership and idle entries are looked at.
pub const TICK: Duration = Duration::from_millis(250);

/// How long a participant's "is it reading its stream" answer is reused.
const CONSUMING_TTL: Duration = Duration::from_secs(2);

/// Most `XAUTOCLAIM` rounds per partition per tick.
const MAX_CLAIM_ROUNDS: usize = 16;

/// The first and the longest pause before a partition that failed alone is tried again.
const PARTITION_PAUSE_MIN: Duration = Duration::from_millis(100);
const PARTITION_PAUSE_MAX: Duration = Duration::from_secs(2);

/// One owned partition.
struct Part {
    /// The lease value every write presents.
    lease: String,
    /// Live transactions.
    txns: HashMap<String, Txn>,
    /// (wake ms, id) of every live transaction with a wake time.
    timers: BTreeSet<(u64, String)>,
    /// Where the next idle-entry claim starts.
    claim_from: String,
    /// Memory is stale (a write failed): reload before handling more.
    stale: bool,
    /// Per transaction, entries whose effect is in memory but not yet in the record: acked
    /// with the transaction's next write.
    held: HashMap<String, BTreeSet<String>>,
    /// Per entry in `held`, how many transactions hold it: a batch entry carries messages of
    /// many transactions, and is acked once the last of them is written.
    holders: HashMap<String, usize>,
    /// The value of `rtx:wseq:{P}` the next write follows (read at reload, counted up per
    /// write sent).
    seq: u64,
    /// On a cluster, after a failure of this partition alone ([`Owner::partition_failed`]):
    /// not tried again before this time.
    retry_at: Option<Instant>,
    /// The pause before the next try after such a failure (doubles each time, up to
    /// [`PARTITION_PAUSE_MAX`]; zero after a successful reload).
    pause: Duration,
}

impl Part {
    fn new(lease: String) -> Part {
        Part {
            lease,
            txns: HashMap::new(),
            timers: BTreeSet::new(),
            claim_from: "0-0".into(),
            stale: true,
            held: HashMap::new(),
            holders: HashMap::new(),
            seq: 0,
            retry_at: None,
            pause: Duration::ZERO,
        }
    }

    /// Transaction `txn` holds entry `entry` (see `held`).
    fn hold(&mut self, txn: &str, entry: String) {
        if self.held.entry(txn.to_string()).or_default().insert(entry.clone()) {
            *self.holders.entry(entry).or_default() += 1;
        }
    }

    /// Transaction `txn` is written: the entries it held that no other transaction holds.
    fn release(&mut self, txn: &str, out: &mut Vec<String>) {
        for e in self.held.remove(txn).unwrap_or_default() {
            match self.holders.get_mut(&e) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    self.holders.remove(&e);
                    out.push(e);
                }
            }
        }
    }

    fn set_timer(&mut self, id: &str, old: Option<u64>, new: Option<u64>) {
        if old == new {
            return;
        }
        if let Some(o) = old {
            self.timers.remove(&(o, id.to_string()));
        }
        if let Some(n) = new {
            self.timers.insert((n, id.to_string()));
        }
    }
}

/// The commands of one fenced write, and the keys they touch.
#[derive(Default)]
struct Writes {
    /// `fenced.lua`'s ARGV after the lease values: each command as its argument count, then its
    /// arguments, in one contiguous buffer (no allocation per argument).
    cmds: redis::Cmd,
    keys: BTreeSet<String>,
}

impl Writes {
    fn push(&mut self, key: &str, args: &[&[u8]]) {
        if !self.keys.contains(key) {
            self.keys.insert(key.to_string());
        }
        self.cmds.arg(args.len());
        for a in args {
            self.cmds.arg(*a);
        }
    }

    /// How many arguments the list holds.
    fn len(&self) -> usize {
        self.cmds.args_iter().len()
    }
}

/// `HSET key` and the record's fields, for [`Writes::push`].
fn hset<'a>(key: &'a str, fields: &'a [(&'static str, Vec<u8>)]) -> Vec<&'a [u8]> {
    let mut args = Vec::with_capacity(2 + 2 * fields.len());
    args.extend([b"HSET".as_slice(), key.as_bytes()]);
    for (f, v) in fields {
        args.extend([f.as_bytes(), v.as_slice()]);
    }
    args
}

/// What the handling of one partition's batch produced, before it is written.
#[derive(Default)]
struct Batch {
    /// Transactions created by this batch (written whole).
    created: BTreeSet<String>,
    /// Transactions changed by this batch (their progress is written).
    dirty: BTreeSet<String>,
    /// Transactions that became terminal (left the live set).
    finished: BTreeSet<String>,
    /// Terminal transactions that are not in memory and changed (written from here).
    detached: HashMap<String, Txn>,
    sends: Vec<(Message, bool)>,
    announce: Vec<(String, &'static str)>,
    acks: Vec<String>,
    dead: Vec<(StreamId, String)>,
    /// Decisions made by this batch.
    decisions: u64,
    /// Messages handled by this batch (a batch entry counts its messages).
    entries: u64,
}

impl Batch {
    /// What this batch adds to the coordinator's counts once it is written.
    fn counts(&self) -> CoordinatorCounts {
        CoordinatorCounts {
            handled: self.entries,
            created: self.created.len() as u64,
            decided: self.decisions,
            finished: self.finished.len() as u64,
        }
    }
}

/// The coordinator process: its connections and partitions.
pub struct Owner {
    cfg: CoordinatorConfig,
    url: RedisTarget,
    me: String,
    /// One server: the connection of the blocking reads (all partitions in one `XREADGROUP`).
    read_conn: RedisConn,
    /// A cluster: the per-partition readers (keyed by partition).
    cluster_reads: Option<StreamReaders>,
    /// A cluster with `wait_replicas`: where each slot is served, for the pinned readers and
    /// claimers (a `WAIT` must reach the master that served the read or the claim).
    slots: Option<Arc<SlotOwners>>,
    /// A cluster with `wait_replicas`: each partition's claims, on a connection pinned to its
    /// master, where they are then waited for.
    claimers: HashMap<u32, Pinned>,
    conn: RedisConn,
    parts: BTreeMap<u32, Part>,
    /// Since when each partition has been seen free.
    free_since: HashMap<u32, Instant>,
    /// The live coordinators at the last survey that could count them.
    live: usize,
    last_round: Option<Instant>,
    /// Renews the leases off the loop ([`lease::Keeper`]).
    keeper: lease::Keeper,
    last_trim: Instant,
    last_claim: Instant,
    consuming: HashMap<(String, u32), (bool, Instant)>,
    /// Sends the fenced writes, in order, while the loop goes on ([`crate::writer`]).
    writer: Writer,
    /// Writes sent and not yet answered, oldest first.
    in_flight: VecDeque<InFlight>,
    /// What this coordinator handled, published with `stats` and in its last log line.
    counts: CoordinatorCounts,
    stats: Publisher,
    /// The last fencing token this process acquired per partition
    /// ([`lease::counter_went_back`]).
    tokens: HashMap<u32, u64>,
    /// A cluster: partitions whose master stopped answering, owned or not. The loop makes no
    /// call of theirs until their probe hears from them ([`redtx_common::outage`]).
    outages: Option<Outages>,
}

/// A fenced write sent and not yet answered.
struct InFlight {
    /// The partitions of each call.
    parts_of: Vec<Vec<u32>>,
    /// What each call adds to the counts once applied.
    counts: Vec<CoordinatorCounts>,
    /// It writes decisions (for the fail point after them).
    decided: bool,
    replies: oneshot::Receiver<Replies>,
}

impl Owner {
    /// Connects to the stream Redis.
    pub async fn connect(cfg: CoordinatorConfig, url: RedisTarget) -> Result<Owner> {
        // On a cluster a call to a slot whose master is down gives up within about a second
        // (the crate's default retries for over ten): that partition waits, the others go on
        // ([`Owner::partition_failed`]).
        let url = url.with_cluster_retries(ClusterRetries::QUICK);
        let read_conn = url.connect_with(cfg.block + Duration::from_secs(10)).await?;
        let mut conn = url.connect().await?;
        let slots =
            (url.is_cluster() && cfg.wait_replicas > 0).then(|| Arc::new(SlotOwners::new(url.clone(), conn.clone())));
        let cluster_reads = url.is_cluster().then(|| {
            let readers = StreamReaders::new(url.clone(), cfg.block);
            match &slots {
                Some(slots) => readers.replicated(slots.clone(), cfg.wait_replicas),
                None => readers,
            }
        });
        for s in [&FENCED, &lease::ACQUIRE, &lease::RENEW, &lease::RELEASE] {
            s.load(&mut conn).await.map_err(|e| Error::redis(&url, e))?;
        }
        publish_version(&mut conn, &url).await?;
        let me = redtx_common::consumer::unique_consumer_name();
        let outages = match url.is_cluster() {
            true => Some(Outages::connect(&url, "partition").await?),
            false => None,
        };
        let lease_ms = cfg.lease.as_millis().max(100) as u64;
        let keeper = lease::Keeper::start(url.connect_managed(KEEPER_RESPONSE_TIMEOUT).await?, url.clone(), lease_ms);
        Ok(Owner {
            outages,
            writer: Writer::start(conn.clone(), url.clone()),
            in_flight: VecDeque::new(),
            stats: Publisher::coordinator(&me),
            tokens: HashMap::new(),
            counts: CoordinatorCounts::default(),
            me,
            cfg,
            url,
            read_conn,
            cluster_reads,
            slots,
            claimers: HashMap::new(),
            conn,
            parts: BTreeMap::new(),
            free_since: HashMap::new(),
            live: 1,
            last_round: None,
            keeper,
            last_trim: Instant::now(),
            last_claim: Instant::now(),
            consuming: HashMap::new(),
        })
    }

    /// This coordinator's id (its consumer name and lease owner).
    pub fn id(&self) -> &str {
        &self.me
    }

    fn timing(&self) -> Timing {
        Timing { now_ms: now_ms(), resend_every_ms: self.cfg.resend_every.as_millis().max(1) as u64 }
    }

    fn lease_ms(&self) -> u64 {
        self.cfg.lease.as_millis().max(100) as u64
    }

    /// Whether an error of one partition's step stops that partition only: on a cluster, where
    /// each partition is a slot, [`Error::is_slot_outage`].
    fn tolerable(&self, e: &Error) -> bool {
        self.url.is_cluster() && e.is_slot_outage()
    }

    /// Whether partition `p`'s master stopped answering (a cluster): no call of it until it
    /// answers again.
    fn is_out(&self, p: u32) -> bool {
        self.outages.as_ref().is_some_and(|o| o.is_out(p))
    }

    /// A step of partitions `parts` alone failed with `e`. When [tolerable](Self::tolerable),
    /// they are marked stale (their memory is reloaded from Redis and their pending entries
    /// handled again once they answer) and tried again after a pause that doubles up to
    /// [`PARTITION_PAUSE_MAX`]; the other partitions go on. Otherwise the error is returned
    /// and the whole round fails, as on one server, where every partition has the same fate.
    fn partition_failed(&mut self, parts: &[u32], e: Error) -> Result<()> {
        if !self.tolerable(&e) {
            return Err(e);
        }
        // Not answering (rather than answering too few replicas): no call of these partitions
        // until their master answers again.
        if e.is_transient() {
            if let Some(o) = &self.outages {
                for p in parts {
                    o.mark(*p, keys::lease(*p));
                }
            }
        }
        for p in parts {
            if let Some(part) = self.parts.get_mut(p) {
                part.stale = true;
                part.pause = (part.pause * 2).clamp(PARTITION_PAUSE_MIN, PARTITION_PAUSE_MAX);
                part.retry_at = Some(Instant::now() + part.pause);
                tracing::warn!(
                    partition = p, error = %e, retry_in = ?part.pause,
                    "partition unreachable; its entries stay pending, the other partitions go on"
                );
            }
        }
        Ok(())
    }

    /// Runs until `shutdown`, then gives its partitions up (so another coordinator takes them at
    /// once) and leaves.
    pub async fn run(mut self, shutdown: Shutdown) -> Result<()> {
        tracing::info!(coordinator = %self.me, redis = %self.url, partitions = self.cfg.partitions, "coordinator started");
        let mut backoff = redtx_common::consumer::Backoff::default();
        while !shutdown.is_triggered() {
            match self.round().await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    let pause = backoff.next();
                    tracing::warn!(error = %e, retry_in = ?pause, "coordinator step failed; entries stay pending");
                    // What the writes still in flight did is learnt before anything is reloaded.
                    while let Err(e) = self.settle_all().await {
                        tracing::debug!(error = %e, "a write in flight failed too");
                    }
                    for p in self.parts.values_mut() {
                        p.stale = true;
                    }
                    tokio::select! { _ = tokio::time::sleep(pause) => {}, _ = shutdown.wait() => {} }
                    if let Err(e) = self.reconnect().await {
                        tracing::debug!(error = %e, "reconnect failed; retrying after the next pause");
                    }
                }
            }
        }
        while let Err(e) = self.settle_all().await {
            tracing::debug!(error = %e, "a write in flight at shutdown failed; its entries stay pending");
        }
        let owned: Vec<u32> = self.parts.keys().copied().collect();
        for (p, part) in std::mem::take(&mut self.parts) {
            if let Err(e) = lease::release(&mut self.conn, &self.url, p, &part.lease).await {
                tracing::debug!(partition = p, error = %e, "could not release the lease; it lapses");
            }
        }
        let _ = lease::leave(&mut self.conn, &self.url, &self.me).await;
        // The partitions it owned until now, with the final counts.
        self.stats.publish_stopped(&mut self.conn, self.counts.fields(owned.iter().copied())).await;
        let c = self.counts;
        let partitions = owned.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        tracing::info!(
            coordinator = %self.me, handled = c.handled, created = c.created, decided = c.decided,
            finished = c.finished, partitions = %partitions, "coordinator stopped"
        );
        Ok(())
    }

    /// A cluster, with no write in flight: when a master that stopped answering was replaced
    /// meanwhile (a probe heard from its partition only on a fresh connection), replaces the
    /// cluster connections too (the loop's and the writer's, the slot look-ups', the keeper's):
    /// one that met only timeouts from the old master still routes its calls there.
    async fn follow_topology(&mut self) {
        let moved = self.outages.as_ref().map(Outages::take_moved).unwrap_or_default();
        if moved.is_empty() {
            return;
        }
        // A read of theirs may still wait on the silent master: given up, it is sent again
        // where the partition is now.
        if let Some(reads) = self.cluster_reads.as_mut() {
            for p in &moved {
                reads.give_up(*p as usize);
            }
        }
        match (self.url.connect().await, self.url.connect_managed(KEEPER_RESPONSE_TIMEOUT).await) {
            (Ok(conn), Ok(keeper)) => {
                tracing::info!("a master was replaced while it did not answer: using fresh cluster connections");
                if let Some(slots) = &self.slots {
                    slots.set_conn(conn.clone());
                }
                self.writer = Writer::start(conn.clone(), self.url.clone());
                self.keeper.replace_conn(keeper);
                self.conn = conn;
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "could not open fresh cluster connections; keeping the old ones")
            }
        }
    }

    async fn reconnect(&mut self) -> Result<()> {
        // A cluster connection reconnects by itself, and a new one would first wait for every
        // node, one that does not answer too.
        if !self.url.is_cluster() {
            self.read_conn = self.url.connect_with(self.cfg.block + Duration::from_secs(10)).await?;
            self.conn = self.url.connect().await?;
            self.writer = Writer::start(self.conn.clone(), self.url.clone());
        }
        // A Redis that restarted without persistence lost it.
        publish_version(&mut self.conn, &self.url).await
    }

    /// One pass of the loop (see the module doc).
    async fn round(&mut self) -> Result<()> {
        self.keeper.beat();
        self.settle_ready().await?;
        if self.last_round.is_none_or(|t| t.elapsed() >= TICK) {
            self.last_round = Some(Instant::now());
            // Leases move and partitions reload with no write in flight.
            self.settle_all().await?;
            self.follow_topology().await;
            self.ownership().await?;
            // What the keeper renews changes only here (a lease lost or moved in a write is
            // renewed in vain until then: its value no longer matches).
            self.keeper.sync(self.parts.iter().map(|(p, x)| (*p, x.lease.clone())));
            let owned: Vec<u32> = self.parts.keys().copied().collect();
            // Idle entries are looked for twice per `--claim-idle`, not every round: each look
            // is a round trip per partition that delays the entries arriving meanwhile.
            let claim = self.last_claim.elapsed() >= self.cfg.claim_idle / 2;
            if claim {
                self.last_claim = Instant::now();
            }
            for p in owned {
                let Some(part) = self.parts.get(&p) else { continue };
                if part.retry_at.is_some_and(|t| t > Instant::now()) || self.is_out(p) {
                    continue;
                }
                if part.stale {
                    if let Err(e) = self.reload(p).await {
                        self.partition_failed(&[p], e)?;
                        continue;
                    }
                }
                if claim && self.parts.get(&p).is_some_and(|x| !x.stale) {
                    if let Err(e) = self.claim(p, self.cfg.claim_idle).await {
                        self.partition_failed(&[p], e)?;
                    }
                }
            }
            if self.last_trim.elapsed() >= Duration::from_secs(10) {
                self.last_trim = Instant::now();
                self.trim().await?;
            }
            // Sent by a task of its own: this loop does not wait for it.
            self.stats.publish_if_due(&self.conn, || self.counts.fields(self.parts.keys().copied()));
        }
        self.ticks().await?;
        self.read_and_handle().await
    }

    /// Steps down from leases found lost, refreshes membership, acquires and releases
    /// partitions.
    async fn ownership(&mut self) -> Result<()> {
        let ttl = self.lease_ms();
        // Renewed by the keeper, off this loop.
        for (p, value, holder) in self.keeper.lost() {
            if self.parts.get(&p).is_some_and(|x| x.lease == value) {
                tracing::warn!(partition = p, holder = %holder, "lost the lease of a partition; stepping down");
                self.parts.remove(&p);
            }
        }
        let out = self.outages.as_ref().map(Outages::out).unwrap_or_default();
        let survey =
            lease::survey(&mut self.conn, &self.url, &self.me, now_ms(), ttl, self.cfg.partitions, &out).await?;
        if let Some(o) = &self.outages {
            for p in &survey.unreachable {
                match *p {
                    lease::MEMBERSHIP => o.mark(*p, keys::coordinators()),
                    p => o.mark(p, keys::lease(p)),
                }
            }
        }
        let free = survey.free;
        // Unknown (the membership's master unreachable on a cluster): as last seen.
        let live = survey.live.unwrap_or(self.live);
        self.live = live;
        let owned: BTreeSet<u32> = self.parts.keys().copied().collect();
        self.free_since.retain(|p, _| free.contains(p));
        for p in &free {
            self.free_since.entry(*p).or_insert_with(Instant::now);
        }
        let free_long: BTreeSet<u32> =
            self.free_since.iter().filter(|(_, t)| t.elapsed() >= lease::GRACE).map(|(p, _)| *p).collect();
        let plan = lease::plan(self.cfg.partitions, live, &owned, &free, &free_long);
        if !plan.acquire.is_empty() {
            for (p, value) in lease::acquire(&mut self.conn, &self.url, &self.me, ttl, &plan.acquire).await? {
                tracing::info!(partition = p, lease = %value, "acquired partition");
                let token = lease::token(&value).unwrap_or(0);
                let held = self.tokens.get(&p).copied();
                if lease::counter_went_back(held, token) {
                    tracing::error!(
                        partition = p,
                        held = held.unwrap_or(0),
                        now = token,
                        "the partition's fencing counter went back: Redis lost its keys (a slot's keys deleted, \
                         a FLUSHALL, a restart without persistence); its transactions under way are lost with \
                         their records"
                    );
                }
                // The counter only counts up from here: reported once, not at every later lease.
                self.tokens.insert(p, token);
                // Loaded (and its group made sure of) in this round's reloads.
                self.parts.insert(p, Part::new(value));
            }
        }
        for p in plan.release {
            if let Some(part) = self.parts.remove(&p) {
                tracing::info!(partition = p, "giving a partition up to even out the load");
                match lease::release(&mut self.conn, &self.url, p, &part.lease).await {
                    // It lapses instead.
                    Err(e) if self.tolerable(&e) => {
                        tracing::warn!(partition = p, error = %e, "could not give the lease up")
                    }
                    r => {
                        r?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Rebuilds partition `p`'s memory from its records, then handles every entry still
    /// pending in its stream (from any reader) again.
    async fn reload(&mut self, p: u32) -> Result<()> {
        let started = Instant::now();
        // A partition just acquired may never have been read from (or its Redis lost it).
        ensure_group(&mut self.conn, &self.url, &keys::coord_stream(p), keys::COORD_GROUP).await?;
        // No write of `p` is in flight (they are settled first): the counter is final. Both keys
        // are in `p`'s slot: one pipeline.
        let (seq, ids): (Option<u64>, Vec<String>) = redis::pipe()
            .get(keys::write_seq(p))
            .zrange(keys::live(p), 0, -1)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| Error::redis(&self.url, e))?;
        let mut txns = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(512) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.hgetall(keys::txn_record(p, id));
            }
            let hashes: Vec<HashMap<String, Vec<u8>>> =
                pipe.query_async(&mut self.conn).await.map_err(|e| Error::redis(&self.url, e))?;
            for (id, h) in chunk.iter().zip(hashes) {
                match txn_from_hash(id, &h) {
                    Ok(Some(t)) if !t.state().is_terminal() => {
                        txns.insert(id.clone(), t);
                    }
                    Ok(_) => tracing::debug!(partition = p, txn = %id, "live set names a finished or missing record"),
                    Err(e) => tracing::error!(partition = p, txn = %id, error = %e, "cannot read a record; left alone"),
                }
            }
        }
        let Some(part) = self.parts.get_mut(&p) else { return Ok(()) };
        part.timers.clear();
        for (id, t) in &txns {
            if let Some(w) = t.wake_ms() {
                part.timers.insert((w, id.clone()));
            }
        }
        let n = txns.len();
        part.txns = txns;
        part.held.clear();
        part.holders.clear();
        part.seq = seq.unwrap_or(0);
        part.stale = false;
        part.retry_at = None;
        part.pause = Duration::ZERO;
        part.claim_from = "0-0".into();
        tracing::info!(partition = p, live = n, took = ?started.elapsed(), "partition loaded");
        self.overdue(p).await?;
        // Everything pending was read by an owner that may be gone: handle it again now.
        self.claim(p, Duration::ZERO).await
    }

    /// At a reload, before any pending entry is handled again: a 2PC transaction still
    /// `preparing` past its deadline is aborted now, whatever votes are pending. The owner
    /// before may have decided that very abort at the deadline, and told it (`aborting`), in a
    /// write a failover to a replica then lost; replaying the votes first could commit it
    /// instead (docs/scaling.md, "What the producers are told"). Deciding the deadline first
    /// decides it the same way again. Any decision lost with it was not acted on by a
    /// participant on `--wait-replicas`.
    async fn overdue(&mut self, p: u32) -> Result<()> {
        let now = now_ms();
        let t = self.timing();
        let Some(part) = self.parts.get_mut(&p) else { return Ok(()) };
        let due: Vec<String> = part
            .timers
            .iter()
            .take_while(|(w, _)| *w <= now)
            .filter(|(_, id)| part.txns.get(id).is_some_and(|x| x.state() == TxnState::Preparing))
            .map(|(_, id)| id.clone())
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::default();
        for id in due {
            step_live(part, &id, Event::Tick, t, &mut batch);
        }
        tracing::info!(partition = p, decided = batch.decisions, "past their deadline at the reload: deciding first");
        self.write(vec![(p, batch)]).await
    }

    /// Claims entries of partition `p` idle at least `idle` and handles them.
    async fn claim(&mut self, p: u32, idle: Duration) -> Result<()> {
        let stream = keys::coord_stream(p);
        let mut start = match self.parts.get_mut(&p) {
            Some(part) => std::mem::replace(&mut part.claim_from, "0-0".into()),
            None => return Ok(()),
        };
        for _ in 0..MAX_CLAIM_ROUNDS {
            let claim = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(keys::COORD_GROUP)
                .arg(&self.me)
                .arg(idle.as_millis() as u64)
                .arg(&start)
                .arg("COUNT")
                .arg(self.cfg.batch)
                .clone();
            let reply: StreamAutoClaimReply = match &self.slots {
                Some(slots) => {
                    let slot = keys::slot(&stream);
                    let pinned = self
                        .claimers
                        .entry(p)
                        .or_insert_with(|| Pinned::new(slot, slots.clone(), CLAIM_RESPONSE_TIMEOUT));
                    pinned.query(&claim).await?
                }
                None => claim.query_async(&mut self.conn).await.map_err(|e| Error::redis(&self.url, e))?,
            };
            // Entries held on purpose (their effect is in memory, recorded with the
            // transaction's next write) need no second look.
            let claimed: Vec<StreamId> = match self.parts.get(&p) {
                Some(part) => reply.claimed.into_iter().filter(|e| !part.holders.contains_key(&e.id)).collect(),
                None => Vec::new(),
            };
            if !claimed.is_empty() && self.cfg.wait_replicas > 0 {
                let replicas = self.cfg.wait_replicas;
                match self.claimers.get_mut(&p) {
                    // `XAUTOCLAIM` is a write of the pinned connection's own: `WAIT` covers it.
                    Some(pinned) => replicated(pinned, None, replicas).await?,
                    None => {
                        let taken = [(stream.as_str(), claimed.iter().map(|e| e.id.as_str()).collect())];
                        let group = keys::COORD_GROUP;
                        retake_and_wait(&mut self.conn, &self.url, group, &self.me, &taken, replicas).await?;
                    }
                }
            }
            if !claimed.is_empty() {
                tracing::info!(partition = p, claimed = claimed.len(), "took over pending entries");
                self.handle(vec![(p, claimed)]).await?;
            }
            // A write of this partition failed meanwhile: what is left is claimed at its reload.
            if self.parts.get(&p).is_none_or(|x| x.stale) {
                return Ok(());
            }
            if reply.next_stream_id == "0-0" {
                return Ok(());
            }
            start = reply.next_stream_id;
        }
        if let Some(part) = self.parts.get_mut(&p) {
            part.claim_from = start;
        }
        Ok(())
    }

    async fn trim(&mut self) -> Result<()> {
        let owned: Vec<u32> = self.parts.keys().copied().filter(|p| !self.is_out(*p)).collect();
        for p in owned {
            match trim_stream(&mut self.conn, &self.url, &keys::coord_stream(p), self.cfg.keep_history).await {
                Err(e) if !self.tolerable(&e) => return Err(e),
                Err(e) => tracing::debug!(partition = p, error = %e, "trim failed; trimmed next time"),
                Ok(_) => {}
            }
        }
        Ok(())
    }

    /// Ticks every due transaction of every partition; all partitions' writes go in one
    /// pipeline.
    async fn ticks(&mut self) -> Result<()> {
        let now = now_ms();
        let t = self.timing();
        let mut batches = Vec::new();
        for (&p, part) in self.parts.iter_mut() {
            if part.stale {
                continue;
            }
            let due: Vec<String> =
                part.timers.iter().take_while(|(w, _)| *w <= now).take(4096).map(|(_, id)| id.clone()).collect();
            if due.is_empty() {
                continue;
            }
            let mut batch = Batch::default();
            for id in due {
                step_live(part, &id, Event::Tick, t, &mut batch);
            }
            if batch.decisions > 0 {
                tracing::info!(partition = p, "deadline passed: deciding");
            }
            batches.push((p, batch));
        }
        self.write(batches).await
    }

    /// One `XREADGROUP` over every owned partition, then each partition's share is handled.
    async fn read_and_handle(&mut self) -> Result<()> {
        let owned: Vec<u32> = self.parts.iter().filter(|(_, x)| !x.stale).map(|(p, _)| *p).collect();
        let until_round = TICK.saturating_sub(self.last_round.map(|t| t.elapsed()).unwrap_or_default());
        let next_wake = self
            .parts
            .values()
            .filter(|x| !x.stale)
            .filter_map(|x| x.timers.first().map(|(w, _)| *w))
            .min()
            .map(|w| Duration::from_millis(w.saturating_sub(now_ms())));
        let block = until_round.min(next_wake.unwrap_or(until_round)).min(self.cfg.block).max(Duration::from_millis(1));
        if owned.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(());
        }
        if self.cluster_reads.is_some() {
            return self.read_cluster(owned, block).await;
        }
        let streams: Vec<String> = owned.iter().map(|p| keys::coord_stream(*p)).collect();
        let ids: Vec<&str> = vec![">"; streams.len()];
        let opts = StreamReadOptions::default()
            .group(keys::COORD_GROUP, &self.me)
            .count(self.cfg.batch)
            .block(block.as_millis().max(1) as usize);
        let reply: Option<StreamReadReply> =
            self.read_conn.xread_options(&streams, &ids, &opts).await.map_err(|e| Error::redis(&self.url, e))?;
        let Some(reply) = reply else { return Ok(()) };
        if self.cfg.wait_replicas > 0 {
            let taken: Vec<(&str, Vec<&str>)> =
                reply.keys.iter().map(|k| (k.key.as_str(), k.ids.iter().map(|e| e.id.as_str()).collect())).collect();
            let (group, replicas) = (keys::COORD_GROUP, self.cfg.wait_replicas);
            retake_and_wait(&mut self.read_conn, &self.url, group, &self.me, &taken, replicas).await?;
        }
        let work = reply
            .keys
            .into_iter()
            .filter_map(|k| keys::partition_of_stream(&k.key).map(|p| (p, k.ids)))
            .filter(|(p, _)| self.parts.contains_key(p))
            .collect();
        self.handle(work).await
    }

    /// A cluster: asks the reader of every owned partition that is not reading yet to read,
    /// waits up to `block` for the first answer, and handles every answer there is by then. A
    /// reader still blocked goes on; its answer is handled in a later round.
    async fn read_cluster(&mut self, owned: Vec<u32>, block: Duration) -> Result<()> {
        let reads = self.cluster_reads.as_mut().expect("a cluster");
        // A partition out of reach: its read in flight went to a master that stopped answering.
        let out = self.outages.as_ref().map(Outages::out).unwrap_or_default();
        for &p in &out {
            reads.give_up(p as usize);
        }
        for p in owned.into_iter().filter(|p| !out.contains(p)) {
            reads.ask(p as usize, &keys::coord_stream(p), keys::COORD_GROUP, &self.me, self.cfg.batch);
        }
        let answers = reads.answers(block).await;
        let mut work = Vec::new();
        let mut failed = None;
        for (p, r) in answers {
            let p = p as u32;
            match r {
                // Entries of a partition now stale or given up stay pending: the reload (ours
                // or the new owner's) claims and handles them.
                Ok(reply) => match self.parts.get(&p) {
                    Some(part) if !part.stale => {
                        work.extend(reply.into_iter().flat_map(|r| r.keys).map(|k| (p, k.ids)));
                    }
                    _ => tracing::debug!(partition = p, "read for a partition no longer owned or stale; left pending"),
                },
                Err(e) => {
                    if let Err(e) = self.partition_failed(&[p], e) {
                        failed = Some(e);
                    }
                }
            }
        }
        self.handle(work).await?;
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Handles the entries read from each partition: the records of transactions not in
    /// memory are read in one pipeline for all partitions (one per partition on a cluster),
    /// and the partitions' writes go in one fenced call (one per partition on a cluster).
    async fn handle(&mut self, work: Vec<(u32, Vec<StreamId>)>) -> Result<()> {
        // A stale partition's entries stay pending: its reload handles them again.
        let work: Vec<(u32, Vec<StreamId>)> =
            work.into_iter().filter(|(p, e)| !e.is_empty() && self.parts.get(p).is_some_and(|x| !x.stale)).collect();
        if work.is_empty() {
            return Ok(());
        }
        let mut decoded = Vec::with_capacity(work.len());
        // Transactions not in memory: finished ones, new ones, or strangers.
        let mut unknown: Vec<(u32, String)> = Vec::new();
        for (p, entries) in work {
            let mut batch = Batch::default();
            let mut msgs = Vec::with_capacity(entries.len());
            for e in entries {
                let items = match items_of_entry(&e.map) {
                    Ok(items) => items,
                    Err(err) => {
                        batch.dead.push((e, err.to_string()));
                        continue;
                    }
                };
                // A batch entry's messages are handled (and dead-lettered) one by one, each as
                // an entry of its own fields under the batch entry's id.
                let single = items.len() == 1 && !is_batch_entry(&e.map);
                let mut whole = Some(e);
                let id = whole.as_ref().map(|e| e.id.clone()).unwrap_or_default();
                for (k, item) in items.into_iter().enumerate() {
                    let src = match whole.take().filter(|_| single) {
                        Some(e) => e,
                        None => StreamId { id: id.clone(), map: item.fields(), ..Default::default() },
                    };
                    let what = if single { String::new() } else { format!("batch message {k}: ") };
                    match item.msg {
                        Ok(m) => msgs.push((src, Incoming::Msg(m))),
                        Err(err) => match submit_head(&src.map).filter(|(id, _)| check_id("id", id).is_ok()) {
                            Some((id, mode)) => {
                                msgs.push((src, Incoming::BadSubmit { id, mode, reason: err.to_string() }))
                            }
                            None => batch.dead.push((src, format!("{what}{err}"))),
                        },
                    }
                }
            }
            batch.entries = (msgs.len() + batch.dead.len()) as u64;
            let part = &self.parts[&p];
            let mut seen = HashSet::new();
            for (_, m) in &msgs {
                let id = m.txn();
                if !part.txns.contains_key(id) && seen.insert(id.to_string()) {
                    unknown.push((p, id.to_string()));
                }
            }
            decoded.push((p, msgs, batch));
        }
        let mut records: HashMap<(u32, String), std::result::Result<Option<Txn>, String>> = HashMap::new();
        if !unknown.is_empty() {
            // `unknown` is in partition order: one pipeline per partition on a cluster.
            let groups: Vec<&[(u32, String)]> =
                if self.conn.is_cluster() { unknown.chunk_by(|a, b| a.0 == b.0).collect() } else { vec![&unknown[..]] };
            let pipes = groups
                .iter()
                .map(|g| {
                    let mut pipe = redis::pipe();
                    for (p, id) in g.iter() {
                        pipe.hgetall(keys::txn_record(*p, id));
                    }
                    pipe
                })
                .collect();
            let results = self.conn.query_each::<Vec<HashMap<String, Vec<u8>>>>(pipes).await;
            let mut unreachable = BTreeSet::new();
            for (g, r) in groups.iter().zip(results) {
                match r {
                    Ok(hashes) => {
                        for ((p, id), h) in g.iter().zip(hashes) {
                            records.insert((*p, id.clone()), txn_from_hash(id, &h));
                        }
                    }
                    Err(e) => {
                        let parts: Vec<u32> = g.iter().map(|(p, _)| *p).collect::<BTreeSet<_>>().into_iter().collect();
                        self.partition_failed(&parts, Error::redis(&self.url, e))?;
                        unreachable.extend(parts);
                    }
                }
            }
            // Their entries stay pending: handled again at the partition's reload.
            decoded.retain(|(p, _, _)| !unreachable.contains(p));
        }
        let t = self.timing();
        let partitions = self.cfg.partitions;
        let mut batches = Vec::with_capacity(decoded.len());
        let mut created = false;
        for (p, msgs, mut batch) in decoded {
            let part = self.parts.get_mut(&p).expect("owned");
            step_entries(part, p, partitions, msgs, &records, t, &mut batch);
            created |= !batch.created.is_empty();
            batches.push((p, batch));
        }
        if created {
            failpoint::hit(FP_AFTER_CREATE).await;
        }
        self.write(batches).await
    }

    /// Whether participant `name` reads its stream of partition `p` (its group exists and has
    /// nothing undelivered): re-sends to one that does not would only pile up.
    async fn consuming(&mut self, name: &str, p: u32) -> bool {
        if self.is_out(p) {
            return false;
        }
        let key = (name.to_string(), p);
        if let Some((yes, at)) = self.consuming.get(&key) {
            if at.elapsed() < CONSUMING_TTL {
                return *yes;
            }
        }
        let r: redis::RedisResult<Vec<HashMap<String, redis::Value>>> =
            redis::cmd("XINFO").arg("GROUPS").arg(keys::participant_stream(name, p)).query_async(&mut self.conn).await;
        let yes = match r {
            Ok(groups) => groups.iter().any(|g| {
                let named = matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == name.as_bytes());
                let lag_zero = !matches!(g.get("lag"), Some(redis::Value::Int(l)) if *l > 0);
                named && lag_zero
            }),
            Err(_) => false,
        };
        self.consuming.insert(key, (yes, Instant::now()));
        yes
    }

    /// Writes the batches of several partitions in ONE fenced call, checked against every
    /// lease it writes under: all of it or none of it is applied. On a cluster, one fenced call
    /// per partition (a call touches one slot), each checked against that partition's lease
    /// only, all sent at once: each partition's batch is applied whole or not at all. A
    /// partition whose lease moved is dropped (step down) and the others of its call are marked
    /// stale (reloaded before they handle more; their entries stay pending); a call that failed
    /// marks its partitions stale and the error is returned, unless it is one partition's own
    /// on a cluster ([`Owner::partition_failed`]).
    async fn write(&mut self, batches: Vec<(u32, Batch)>) -> Result<()> {
        let cluster = self.conn.is_cluster();
        // Per call: its partitions, its commands, and what it adds to the counts once applied.
        let mut groups: Vec<(Vec<u32>, Writes, CoordinatorCounts)> = Vec::new();
        let mut decided = false;
        // What batches with nothing to write add: counted at once.
        let mut unwritten = CoordinatorCounts::default();
        if batches.iter().any(|(_, b)| b.decisions > 0) {
            failpoint::hit(FP_BEFORE_DECISION).await;
        }
        for (p, batch) in batches {
            decided |= batch.decisions > 0;
            let counts = batch.counts();
            // One server: every partition's commands go into the one call's list as they are
            // built; a cluster: a call per partition.
            if groups.last().is_none_or(|(parts, _, _)| cluster && !parts.is_empty()) {
                groups.push((Vec::new(), Writes::default(), CoordinatorCounts::default()));
            }
            let (parts, w, group_counts) = groups.last_mut().expect("a group");
            if self.partition_writes(p, batch, w).await {
                parts.push(p);
                group_counts.add(&counts);
            } else {
                unwritten.add(&counts);
            }
        }
        self.counts.add(&unwritten);
        groups.retain(|(parts, _, _)| !parts.is_empty());
        if groups.is_empty() {
            return Ok(());
        }
        let mut calls = Vec::with_capacity(groups.len());
        let mut parts_of = Vec::with_capacity(groups.len());
        let mut counts = Vec::with_capacity(groups.len());
        for (parts, w, c) in groups {
            counts.push(c);
            let mut call = FENCED.call();
            for p in &parts {
                call = call.key(keys::lease(*p));
            }
            for p in &parts {
                call = call.key(keys::write_seq(*p));
            }
            for k in &w.keys {
                call = call.key(k.as_str());
            }
            call = call.arg(parts.len());
            for p in &parts {
                call = call.arg(self.parts[p].lease.as_str());
            }
            for p in &parts {
                let part = self.parts.get_mut(p).expect("owned");
                call = call.arg(part.seq);
                part.seq += 1;
            }
            call = call.args_of(&w.cmds);
            calls.push((parts[0], call));
            parts_of.push(parts);
        }
        let replies = self.writer.send(calls);
        self.in_flight.push_back(InFlight { parts_of, counts, decided, replies });
        while self.in_flight.len() > self.cfg.writes_in_flight {
            self.settle_next().await?;
        }
        Ok(())
    }

    /// Settles the writes already answered, oldest first.
    async fn settle_ready(&mut self) -> Result<()> {
        while let Some(w) = self.in_flight.front_mut() {
            let replies = match w.replies.try_recv() {
                Ok(r) => r,
                Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                Err(oneshot::error::TryRecvError::Closed) => Err("the write task ended".to_string()),
            };
            let w = self.in_flight.pop_front().expect("a front");
            self.settle(w, replies).await?;
        }
        Ok(())
    }

    /// Waits for every write in flight and settles it; the first failure is returned (the
    /// writes after it stay in flight).
    async fn settle_all(&mut self) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.settle_next().await?;
        }
        Ok(())
    }

    /// Waits for the oldest write in flight and settles it.
    async fn settle_next(&mut self) -> Result<()> {
        let Some(mut w) = self.in_flight.pop_front() else { return Ok(()) };
        let replies = (&mut w.replies).await.unwrap_or_else(|_| Err("the write task ended".to_string()));
        self.settle(w, replies).await
    }

    /// Learns how a write went. A partition whose lease moved is dropped (step down) and the
    /// others of its call are marked stale (reloaded before they handle more; their entries
    /// stay pending); a write out of sequence (one before it was not applied) or one that failed
    /// marks its partitions stale, and a failure is returned (on a cluster, a call's own failure
    /// pauses its partition instead: [`Owner::partition_failed`]). Each applied call is counted.
    async fn settle(&mut self, w: InFlight, replies: Replies) -> Result<()> {
        let InFlight { parts_of, counts, decided, .. } = w;
        let stale = |owner: &mut Owner, parts: &[u32]| {
            for p in parts {
                if let Some(part) = owner.parts.get_mut(p) {
                    part.stale = true;
                }
            }
        };
        let replies = match replies {
            Ok(r) => r,
            Err(e) => {
                // Nothing known about these writes: memory may be ahead of Redis. Reload.
                for parts in &parts_of {
                    stale(self, parts);
                }
                return Err(Error::Io(std::io::Error::other(e)));
            }
        };
        let mut failed = None;
        let mut refused = false;
        for ((parts, reply), counts) in parts_of.iter().zip(replies).zip(counts) {
            let reply =
                reply.map_err(|e| Error::redis(&self.url, e)).and_then(|v| scripts::reply_strings(FENCED.name, &v));
            match reply {
                // Counted only when applied (a refused or failed call is handled again).
                Ok(r) if r.first().map(String::as_str) == Some("1") => self.counts.add(&counts),
                Ok(r) if r.first().map(String::as_str) == Some("2") => {
                    // Stepped on top of a write that was not applied: reload.
                    refused = true;
                    tracing::info!(partitions = ?parts, counter = %r.get(2).map(String::as_str).unwrap_or(""), "write out of sequence (an earlier one was not applied); reloading");
                    stale(self, parts);
                }
                Ok(r) => {
                    // Nothing of this call was written. The partition that lost its lease is
                    // dropped; the others go on after a reload.
                    refused = true;
                    let lost =
                        r.get(1).and_then(|i| i.parse::<usize>().ok()).and_then(|i| parts.get(i.wrapping_sub(1)));
                    let holder = r.get(2).cloned().unwrap_or_default();
                    stale(self, parts);
                    if let Some(&p) = lost {
                        if self.parts.remove(&p).is_some() {
                            tracing::warn!(partition = p, holder = %holder, "write refused by the fence: the lease moved; stepping down");
                        }
                    }
                }
                Err(e) => {
                    // Nothing known about this write: memory may be ahead of Redis. Reload.
                    refused = true;
                    stale(self, parts);
                    if let Err(e) = self.partition_failed(parts, e) {
                        failed = Some(e);
                    }
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if decided && !refused {
            failpoint::hit(FP_AFTER_DECISION).await;
        }
        Ok(())
    }

    /// The commands that write one partition's batch, if it writes anything.
    async fn partition_writes(&mut self, p: u32, batch: Batch, w: &mut Writes) -> bool {
        let before = w.len();
        let t_ms = now_ms();
        let retention = (self.cfg.retention.as_millis().max(1) as u64).to_string();
        // The reason of each announced transaction, when its record is at hand ("" for none).
        let mut reasons: Vec<Option<String>> = Vec::with_capacity(batch.announce.len());
        {
            let Some(part) = self.parts.get(&p) else { return false };
            let txn_of = |id: &str| part.txns.get(id).or_else(|| batch.detached.get(id));
            for (id, _) in &batch.announce {
                reasons.push(txn_of(id).map(|t| t.progress.reason.clone().unwrap_or_default()));
            }
            for id in &batch.created {
                if let Some(txn) = txn_of(id) {
                    let key = keys::txn_record(p, id);
                    w.push(&key, &hset(&key, &create_fields(txn)));
                    if !batch.finished.contains(id) {
                        let live = keys::live(p);
                        let created = txn.progress.created_ms.to_string();
                        w.push(&live, &[b"ZADD", live.as_bytes(), created.as_bytes(), id.as_bytes()]);
                    }
                }
            }
            for id in batch.dirty.difference(&batch.created) {
                if let Some(txn) = txn_of(id) {
                    let key = keys::txn_record(p, id);
                    w.push(&key, &hset(&key, &progress_fields(txn)));
                }
            }
            for id in &batch.finished {
                let key = keys::txn_record(p, id);
                w.push(&key, &[b"PEXPIRE", key.as_bytes(), retention.as_bytes()]);
                let live = keys::live(p);
                w.push(&live, &[b"ZREM", live.as_bytes(), id.as_bytes()]);
            }
        }
        let mut skipped = 0;
        // One entry per participant stream: a batch entry when it carries several messages.
        let mut to: BTreeMap<&str, Vec<&Message>> = BTreeMap::new();
        for (msg, resend) in &batch.sends {
            let Some(name) = msg.participant() else { continue };
            if *resend && !self.consuming(name, p).await {
                skipped += 1;
                continue;
            }
            to.entry(name).or_default().push(msg);
        }
        for (name, msgs) in to {
            let stream = keys::participant_stream(name, p);
            let [(t, kind), (m, bytes)] = entry_fields(&msgs);
            w.push(&stream, &[b"XADD", stream.as_bytes(), b"*", t.as_bytes(), &kind, m.as_bytes(), &bytes]);
        }
        if skipped > 0 {
            tracing::debug!(partition = p, skipped, "re-sends skipped: their participant is not reading its stream");
        }
        let maxlen = OUTCOMES_MAXLEN.to_string().into_bytes();
        for ((id, state), reason) in batch.announce.iter().zip(reasons) {
            let s = keys::outcomes_stream(p);
            let mut args: Vec<&[u8]> = vec![
                b"XADD",
                s.as_bytes(),
                b"MAXLEN",
                b"~",
                &maxlen,
                b"*",
                b"id",
                id.as_bytes(),
                b"state",
                state.as_bytes(),
            ];
            // With the reason, a producer needs no record read to learn why (docs/protocol.md).
            if let Some(r) = &reason {
                args.extend([b"reason".as_slice(), r.as_bytes()]);
            }
            w.push(&s, &args);
        }
        let stream = keys::coord_stream(p);
        for (entry, reason) in &batch.dead {
            tracing::warn!(partition = p, id = %entry.id, %reason, "dead-lettering entry");
            let dl = keys::dead_letter_stream(p);
            let fields = dead_letter_fields(&stream, keys::COORD_GROUP, &entry.id, reason, t_ms, &entry.map);
            let mut args: Vec<&[u8]> = vec![b"XADD", dl.as_bytes(), b"*"];
            for (k, v) in &fields {
                args.extend([k.as_bytes(), v.as_slice()]);
            }
            w.push(&dl, &args);
            let counts = keys::dead_letter_counts(p);
            w.push(&counts, &[b"HINCRBY", counts.as_bytes(), stream.as_bytes(), b"1"]);
        }
        // Entries held for the transactions written now are recorded by this write; an entry
        // still held by another transaction (a batch entry) waits for that one's write.
        let mut released = Vec::new();
        let mut acks: Vec<&str> = Vec::new();
        if let Some(part) = self.parts.get_mut(&p) {
            for id in batch.created.iter().chain(&batch.dirty).chain(&batch.finished) {
                part.release(id, &mut released);
            }
            acks.extend(
                batch
                    .acks
                    .iter()
                    .chain(batch.dead.iter().map(|(e, _)| &e.id))
                    .filter(|e| !part.holders.contains_key(*e))
                    .map(String::as_str),
            );
        }
        acks.extend(released.iter().map(String::as_str));
        acks.sort_unstable();
        acks.dedup();
        // In chunks: Lua's `unpack` in fenced.lua takes a few thousand arguments at most.
        for chunk in acks.chunks(MAX_ACKS_PER_COMMAND) {
            let mut args: Vec<&[u8]> = vec![b"XACK", stream.as_bytes(), keys::COORD_GROUP.as_bytes()];
            args.extend(chunk.iter().map(|id| id.as_bytes()));
            w.push(&stream, &args);
        }
        w.len() > before
    }
}

/// Steps a live transaction of `part`, keeping its timer; returns the reject reason if any.
fn step_live(part: &mut Part, id: &str, event: Event, t: Timing, batch: &mut Batch) -> Option<String> {
    step_live_entry(part, id, event, None, t, batch)
}

/// Steps a live transaction for `event`, which came in stream entry `entry` (`None`: a tick).
/// The entry is acked with the write that records what it changed. An event that changes only
/// the transaction's counters (a vote or an ack that is not the last, a repeat) is not written
/// on its own: its entry is held pending until the transaction's next write, which records it
/// with the rest; a new owner replays such entries. Returns the reject reason, if any.
fn step_live_entry(
    part: &mut Part,
    id: &str,
    event: Event,
    entry: Option<String>,
    t: Timing,
    batch: &mut Batch,
) -> Option<String> {
    let txn = part.txns.get_mut(id)?;
    let before = txn.wake_ms();
    let state_before = txn.state();
    let out = txn.step(event, t);
    if out.reject.is_some() {
        return out.reject;
    }
    let after = txn.wake_ms();
    let essential =
        txn.state() != state_before || out.effects.iter().any(|e| !matches!(e, Effect::Send { resend: true, .. }));
    let finished = out.effects.contains(&Effect::Finish);
    let write = out.changed && (essential || entry.is_none());
    if write {
        batch.dirty.insert(id.to_string());
    }
    match entry {
        Some(e) if !write && (out.changed || part.held.contains_key(id)) => {
            // Memory is (or was already) ahead of the record for this transaction.
            part.hold(id, e);
        }
        Some(e) => batch.acks.push(e),
        None => {}
    }
    collect(id, out, batch);
    if finished {
        part.set_timer(id, before, None);
        if let Some(txn) = part.txns.remove(id) {
            batch.detached.insert(id.to_string(), txn);
        }
    } else {
        part.set_timer(id, before, after);
    }
    None
}

/// Adds an output's effects to the batch.
fn collect(id: &str, out: Output, batch: &mut Batch) {
    batch.decisions += u64::from(out.decided);
    for e in out.effects {
        match e {
            Effect::Send { msg, resend } => batch.sends.push((msg, resend)),
            Effect::Announce(s) => batch.announce.push((id.to_string(), s.as_str())),
            Effect::Finish => {
                batch.finished.insert(id.to_string());
            }
        }
    }
}

/// A decoded entry of a coordinator stream.
enum Incoming {
    /// A message.
    Msg(Message),
    /// A `submit` that does not decode but names a valid id (and maybe its mode): refused.
    BadSubmit { id: String, mode: Option<Mode>, reason: String },
}

impl Incoming {
    fn txn(&self) -> &str {
        match self {
            Incoming::Msg(m) => m.txn(),
            Incoming::BadSubmit { id, .. } => id,
        }
    }
}

/// Refuses a submit of `id`, which has no record: a `rejected` record and outcome tell the
/// producer waiting on it why; the entry itself is dead-lettered for operators.
fn reject(id: &str, mode: Option<Mode>, entry: StreamId, reason: String, t: Timing, batch: &mut Batch) {
    let (txn, out) = Txn::rejected(id, mode, reason.clone(), t);
    batch.created.insert(id.to_string());
    collect(id, out, batch);
    batch.detached.insert(id.to_string(), txn);
    batch.dead.push((entry, reason));
}

/// Steps every entry of one partition's batch (records of transactions not in memory were read
/// beforehand into `records`).
fn step_entries(
    part: &mut Part,
    p: u32,
    partitions: u32,
    msgs: Vec<(StreamId, Incoming)>,
    records: &HashMap<(u32, String), std::result::Result<Option<Txn>, String>>,
    t: Timing,
    batch: &mut Batch,
) {
    for (entry, incoming) in msgs {
        let id = incoming.txn().to_string();
        let msg = match incoming {
            Incoming::Msg(m) => m,
            Incoming::BadSubmit { mode, reason, .. } => {
                // An id that has a record keeps it: only a submit of a new id is rejected.
                let known = part.txns.contains_key(&id)
                    || batch.detached.contains_key(&id)
                    || !matches!(records.get(&(p, id.clone())), Some(Ok(None)) | None);
                if known {
                    batch.dead.push((entry, reason));
                } else {
                    reject(&id, mode, entry, reason, t, batch);
                }
                continue;
            }
        };
        let event = match msg {
            Message::Submit(s) => {
                if !part.txns.contains_key(&id) {
                    // Finished earlier in this batch: its record is the detached copy.
                    let finished_here = batch.detached.get(&id).cloned().map(|t| Ok(Some(t)));
                    match finished_here.or_else(|| records.get(&(p, id.clone())).cloned()) {
                        Some(Err(e)) => {
                            batch.dead.push((entry, format!("the record of {id} cannot be read: {e}")));
                            continue;
                        }
                        Some(Ok(Some(txn))) => {
                            if !txn.state().is_terminal() {
                                part.set_timer(&id, None, txn.wake_ms());
                                part.txns.insert(id.clone(), txn);
                            }
                        }
                        Some(Ok(None)) | None => {
                            let mode = Some(s.spec.mode);
                            if let Err(e) = s.spec.validate() {
                                reject(&id, mode, entry, format!("invalid spec: {e}"), t, batch);
                                continue;
                            }
                            // Recorded here, where that producer (with its --partitions) waits.
                            let home = keys::partition(&id, partitions);
                            if home != p {
                                let reason = format!(
                                    "txn {id} belongs to partition {home} of {partitions}, not {p}: \
                                     the producer's --partitions differs from the coordinators'"
                                );
                                reject(&id, mode, entry, reason, t, batch);
                                continue;
                            }
                            let (txn, out) = Txn::create(s.spec, t);
                            batch.created.insert(id.clone());
                            part.set_timer(&id, None, txn.wake_ms());
                            part.txns.insert(id.clone(), txn);
                            collect(&id, out, batch);
                            batch.acks.push(entry.id);
                            continue;
                        }
                    }
                }
                if !part.txns.contains_key(&id) {
                    // A finished transaction submitted again: announce its outcome again, so
                    // that a producer waiting on the outcomes stream hears at once.
                    let state =
                        batch.detached.get(&id).map(Txn::state).or_else(|| match records.get(&(p, id.clone())) {
                            Some(Ok(Some(txn))) => Some(txn.state()),
                            _ => None,
                        });
                    if let Some(state) = state {
                        batch.announce.push((id.clone(), state.as_str()));
                    }
                    batch.acks.push(entry.id);
                    continue;
                }
                Event::Submit
            }
            Message::Vote(v) => Event::Vote(v),
            Message::Ack(a) => Event::Ack(a),
            Message::Result(r) => Event::Result(r),
            other => {
                let reason = format!("a `{}` message does not belong on the coordinator stream", other.kind());
                batch.dead.push((entry, reason));
                continue;
            }
        };
        if let Some(Ok(Some(txn))) = records.get(&(p, id.clone())) {
            if !txn.state().is_terminal() && !part.txns.contains_key(&id) {
                // Live but not in memory (the live set lost it): adopt it.
                part.set_timer(&id, None, txn.wake_ms());
                part.txns.insert(id.clone(), txn.clone());
            }
        }
        if part.txns.contains_key(&id) {
            let entry_id = entry.id.clone();
            if let Some(reason) = step_live_entry(part, &id, event, Some(entry_id), t, batch) {
                batch.dead.push((entry, reason));
            }
            continue;
        }
        // A transaction that finished earlier in this batch is answered like a finished record.
        let finished_here = batch.detached.get(&id).cloned().map(|t| Ok(Some(t)));
        match finished_here.as_ref().or(records.get(&(p, id.clone()))) {
            Some(Err(e)) => batch.dead.push((entry, format!("the record of {id} cannot be read: {e}"))),
            Some(Ok(Some(txn))) => {
                // Finished: it may still answer (a late `yes` to an abort gets the abort).
                let mut txn = batch.detached.remove(&id).unwrap_or_else(|| txn.clone());
                let out = txn.step(event, t);
                if let Some(reason) = out.reject.clone() {
                    batch.dead.push((entry, reason));
                    continue;
                }
                if out.changed {
                    batch.dirty.insert(id.clone());
                }
                collect(&id, out, batch);
                batch.detached.insert(id.clone(), txn);
                batch.acks.push(entry.id);
            }
            Some(Ok(None)) | None => {
                tracing::info!(partition = p, txn = %id, "message for a transaction without a record (expired or never created)");
                collect(&id, orphan(&event), batch);
                batch.acks.push(entry.id);
            }
        }
    }
}

/// Publishes the protocol version this coordinator speaks (`rtx:protocol`), for producers.
async fn publish_version(conn: &mut RedisConn, url: &RedisTarget) -> Result<()> {
    conn.set(keys::protocol(), PROTOCOL_VERSION).await.map_err(|e| Error::redis(url, e))
}
