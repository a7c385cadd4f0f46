//! Participants of your own, in your own types: implement [`Service`] with business logic only,
//! and [`serve`] runs it with everything else redtx does for a participant.
//!
//! ```no_run
//! use redtx_participant::sdk::{serve, Ctx, Service};
//! use serde::{Deserialize, Serialize};
//! use std::collections::BTreeMap;
//!
//! #[derive(Clone, Default, Serialize, Deserialize)]
//! struct Inventory { stock: BTreeMap<String, i64>, reserved: BTreeMap<String, i64> }
//!
//! #[derive(Deserialize)]
//! struct Take { sku: String, qty: i64 }
//!
//! impl Service for Inventory {
//!     type Payload = Take;
//!     // 2PC (Try): check and reserve; an `Err` votes no, with the reason.
//!     fn prepare(&mut self, _: &Ctx, t: Take) -> Result<(), String> {
//!         let have = self.stock.get(&t.sku).copied().unwrap_or(0);
//!         if have < t.qty { return Err(format!("only {have} {} left", t.sku)); }
//!         *self.stock.entry(t.sku.clone()).or_default() -= t.qty;
//!         *self.reserved.entry(t.sku).or_default() += t.qty;
//!         Ok(())
//!     }
//!     // Confirm: the reservation is sold. Cancel: it goes back to stock.
//!     fn commit(&mut self, _: &Ctx, t: Take) { *self.reserved.entry(t.sku).or_default() -= t.qty; }
//!     fn abort(&mut self, _: &Ctx, t: Take) {
//!         *self.reserved.entry(t.sku.clone()).or_default() -= t.qty;
//!         *self.stock.entry(t.sku).or_default() += t.qty;
//!     }
//! }
//!
//! # async fn run() -> redtx_common::Result<()> {
//! let cfg = redtx_participant::ParticipantConfig::new("redis://127.0.0.1:6379", "inventory");
//! serve(cfg, Inventory::default(), redtx_common::shutdown::Shutdown::on_signals()).await
//! # }
//! ```
//!
//! # What the runtime does for you
//! Streams, the consumer group, batching, taking over the entries of a dead worker, shutdown,
//! dead letters, and every barrier rule ([`crate::barrier`]): a method's effect on the state
//! counts once per branch and verb, never for a repeat or a late message (`abort` only after a
//! `prepare` that succeeded, `compensate` only after an `execute` that succeeded, nothing after
//! a null compensation), and a payload that does not decode as [`Service::Payload`] is refused
//! with the reason before your code sees it.
//!
//! The *call* may repeat, though: a batch runs again when another instance saved first, and a
//! request comes back after a crash before the save. So a method changes only `self`. A side
//! effect outside it (an HTTP call, an email) is at least once: give it an idempotency key made
//! of [`Ctx::txn`] and [`Ctx::branch`], which stay the same on every repeat.
//!
//! # Why it is exactly-once
//! Delivery is at least once, so the same request can arrive twice, or again after a crash. The
//! service's state and its barriers are one value (the *image*), changed together in memory and
//! saved together, in one atomic compare-and-set (`lua/service/save.lua`), to the data Redis
//! **before** any answer is sent. A crash before the save loses the change and the barrier
//! together: the request is redelivered and applied once. A crash after it leaves both: the
//! repeat finds the barrier and is answered without calling your code. A method that returns
//! `Err` (or panics) has its changes rolled back, so a refusal never half-applies.
//!
//! # Limits
//! The whole image is cloned and saved once per batch: this store suits states up to a few
//! megabytes. Several instances of one service are correct (the compare-and-set makes one of
//! two concurrent batches reload and run again), but they contend on the image: one instance is
//! the efficient setup, and a second one started after a crash takes over. For a
//! database of your own, implement [`Resource`] instead (see the PostgreSQL participant), with
//! the barrier in the same local transaction as the business change.

use crate::barrier::{Barrier, BarrierState, Request, Work};
use crate::resource::{Applied, Resource, Transition};
use crate::ParticipantConfig;
use redis::aio::MultiplexedConnection;
use redtx_common::conn::RedisUrl;
use redtx_common::scripts::{self, LuaScript};
use redtx_common::shutdown::Shutdown;
use redtx_common::{keys, Error, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

/// `lua/service/save.lua`: the image's compare-and-set.
pub static SAVE: LuaScript = LuaScript::new("save", include_str!("../../lua/service/save.lua"));

/// MessagePack `nil`: the compensation payload of a step given none (`null` in JSON).
const NIL: &[u8] = &[0xc0];

/// How many times one batch is run again on a freshly loaded image when another instance saved
/// meanwhile; after that the batch stays pending and comes back later.
const SAVE_ATTEMPTS: usize = 3;

/// What a method learns about the request it serves.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// The transaction id.
    pub txn: &'a str,
    /// The branch (step) index within the transaction.
    pub branch: u32,
    /// This participant's name.
    pub participant: &'a str,
    /// The runtime's clock (ms since the epoch).
    pub now_ms: u64,
}

/// A participant's business logic, on a state of your own (`Self`).
///
/// 2PC is TCC: [`prepare`](Service::prepare) checks and reserves (Try), [`commit`](Service::commit)
/// makes the reservation final (Confirm), [`abort`](Service::abort) releases it (Cancel); commit
/// and abort get the payload the prepare got. A saga step is [`execute`](Service::execute),
/// undone by [`compensate`](Service::compensate), which gets the step's compensation payload, or
/// the action's when the step has none (`compensation_payload` omitted or `null`). Implement the methods of the modes you take part in:
/// the others refuse.
///
/// A method that returns `Err` must leave `self` as it found it; the runtime makes sure of it by
/// restoring a copy taken before the call.
pub trait Service: Clone + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The branch payload, as the producer wrote it (JSON `payload` in a spec, or MessagePack on
    /// the wire), deserialized with serde.
    type Payload: DeserializeOwned;

    /// 2PC phase one (Try): check, and reserve what commit needs. `Err(reason)` votes no.
    fn prepare(&mut self, ctx: &Ctx<'_>, payload: Self::Payload) -> std::result::Result<(), String> {
        let _ = (ctx, payload);
        Err("this participant does not take part in 2PC transactions".into())
    }

    /// 2PC commit (Confirm) of a branch this service prepared. It cannot refuse: the reservation
    /// made at prepare must be enough.
    fn commit(&mut self, ctx: &Ctx<'_>, payload: Self::Payload) {
        let _ = (ctx, payload);
    }

    /// 2PC abort (Cancel) of a branch this service prepared: release the reservation.
    fn abort(&mut self, ctx: &Ctx<'_>, payload: Self::Payload) {
        let _ = (ctx, payload);
    }

    /// Saga action. `Err(reason)` fails the step (the saga compensates the steps before it).
    fn execute(&mut self, ctx: &Ctx<'_>, payload: Self::Payload) -> std::result::Result<(), String> {
        let _ = (ctx, payload);
        Err("this participant does not take part in sagas".into())
    }

    /// Saga compensation of an action this service executed. `Err(reason)` is retried by the
    /// coordinator (with backoff) until it succeeds; the saga is `stuck` meanwhile.
    fn compensate(&mut self, ctx: &Ctx<'_>, payload: Self::Payload) -> std::result::Result<(), String> {
        let _ = (ctx, payload);
        Err("this service cannot compensate".into())
    }
}

/// Runs `service` as participant `cfg.name` until `shutdown`: its image lives on `cfg.data` (or
/// the stream Redis). A saved image, if any, wins over `initial`, which only seeds a service
/// that never ran.
pub async fn serve<S: Service>(cfg: ParticipantConfig, initial: S, shutdown: Shutdown) -> Result<()> {
    let url = RedisUrl::parse(cfg.data.as_deref().unwrap_or(&cfg.redis))?;
    tracing::info!(participant = %cfg.name, data = %url, "service image on this Redis");
    let store = Local::new(url, cfg.name.clone(), initial, cfg.retention);
    crate::run_with(cfg, store, shutdown).await
}

/// One barrier of the image, with the payload its later verbs need.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Kept {
    state: String,
    reason: Option<String>,
    deadline_ms: Option<u64>,
    /// The prepare's or the action's payload (for commit, abort and a compensation without one).
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
    /// When it last changed (ms), for [`Image::prune`].
    at_ms: u64,
}

impl Kept {
    fn barrier(&self) -> Option<Barrier> {
        let state = BarrierState::parse(&self.state)?;
        Some(Barrier { state, reason: self.reason.clone(), deadline_ms: self.deadline_ms })
    }
}

/// The service's state and its barriers (by transaction id): what is saved as one value.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Image<S> {
    state: S,
    barriers: BTreeMap<String, Kept>,
}

/// What one call of the business did.
enum Called {
    Ok,
    Refused(String),
}

impl<S: Service> Image<S> {
    /// Carries out `t` on this image: the barrier's compare-and-set, then the business. Returns
    /// what happened and whether the image changed. `Err`: it cannot be done now (a panic).
    fn apply(&mut self, name: &str, t: &Transition<'_>) -> std::result::Result<(Applied, bool), String> {
        let req = t.request;
        let txn = req.txn();
        let current = self.barriers.get(txn);
        let state = current.and_then(Kept::barrier);
        if state.as_ref().map(|b| b.state) != t.expect {
            return Ok((Applied::Moved(state), false));
        }
        let ctx = Ctx { txn, branch: req.branch(), participant: name, now_ms: t.now_ms };
        let kept_payload = current.map(|k| k.payload.clone()).unwrap_or_default();
        let deadline = match req {
            Request::Prepare(p) => Some(p.deadline_ms),
            _ => current.and_then(|k| k.deadline_ms),
        };
        let prefixed = |why: String| format!("{name}: {why}");
        let (to, reason, payload) = match &t.work {
            Work::Try => match self.call(req.payload(), |s, p| s.prepare(&ctx, p))? {
                Called::Ok => (BarrierState::Prepared, None, req.payload().to_vec()),
                Called::Refused(why) => (BarrierState::Refused, Some(prefixed(why)), Vec::new()),
            },
            Work::Confirm => {
                self.must_call(&kept_payload, |s, p| s.commit(&ctx, p))?;
                (BarrierState::Committed, None, Vec::new())
            }
            Work::Cancel => {
                self.must_call(&kept_payload, |s, p| s.abort(&ctx, p))?;
                (BarrierState::Aborted, None, Vec::new())
            }
            Work::Action => match self.call(req.payload(), |s, p| s.execute(&ctx, p))? {
                Called::Ok => (BarrierState::Done, None, req.payload().to_vec()),
                Called::Refused(why) => (BarrierState::Failed, Some(prefixed(why)), Vec::new()),
            },
            Work::Compensation => {
                // No compensation payload (none, or a JSON `null`): undo with the action's.
                let none = req.payload().is_empty() || req.payload() == NIL;
                let undo = if none { &kept_payload[..] } else { req.payload() };
                match self.call(undo, |s, p| s.compensate(&ctx, p))? {
                    Called::Ok => (BarrierState::Compensated, None, Vec::new()),
                    // Nothing recorded: the action stays applied and the compensation is retried.
                    Called::Refused(why) => {
                        return Ok((Applied::Done { state: BarrierState::Done, reason: Some(prefixed(why)) }, false))
                    }
                }
            }
            // A tombstone has no deadline; a late prepare's refusal records the prepare's.
            Work::Mark { to, reason } => (*to, reason.clone(), Vec::new()),
        };
        let kept =
            Kept { state: to.as_str().into(), reason: reason.clone(), deadline_ms: deadline, payload, at_ms: t.now_ms };
        self.barriers.insert(txn.to_string(), kept);
        Ok((Applied::Done { state: to, reason }, true))
    }

    /// [`Image::call`] for commit and abort, which cannot refuse: their payload decoded at
    /// prepare, so a failure now (the payload type changed meanwhile) stays pending, visibly.
    fn must_call(&mut self, payload: &[u8], f: impl FnOnce(&mut S, S::Payload)) -> std::result::Result<(), String> {
        match self.call(payload, |s, p| {
            f(s, p);
            Ok(())
        })? {
            Called::Ok => Ok(()),
            Called::Refused(why) => Err(format!("cannot finish a prepared branch: {why}")),
        }
    }

    /// Decodes `payload` and calls `f` on the state; a refusal or a panic restores the state as
    /// it was. A payload that does not decode is a refusal that says so.
    fn call(
        &mut self,
        payload: &[u8],
        f: impl FnOnce(&mut S, S::Payload) -> std::result::Result<(), String>,
    ) -> std::result::Result<Called, String> {
        let decoded: S::Payload = match rmp_serde::from_slice(payload) {
            Ok(p) => p,
            Err(e) => {
                return Ok(Called::Refused(format!(
                    "the payload is not a valid {}: {e}",
                    std::any::type_name::<S::Payload>().rsplit("::").next().unwrap_or("payload")
                )))
            }
        };
        let before = self.state.clone();
        match std::panic::catch_unwind(AssertUnwindSafe(|| f(&mut self.state, decoded))) {
            Ok(Ok(())) => Ok(Called::Ok),
            Ok(Err(why)) => {
                self.state = before;
                Ok(Called::Refused(why))
            }
            Err(panic) => {
                self.state = before;
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(format!("the service panicked: {what}; nothing changed, retrying later"))
            }
        }
    }

    /// Forgets finished barriers older than `retention` (a prepared one holds a reservation and
    /// is never forgotten). Never sooner than the longest timeout plus the skew margin: a
    /// tombstone must outlive any prepare it has to refuse.
    fn prune(&mut self, now_ms: u64, retention: Duration) {
        let keep = retention.max(redtx_common::spec::MAX_TIMEOUT + crate::barrier::SKEW);
        let horizon = now_ms.saturating_sub(keep.as_millis() as u64);
        self.barriers.retain(|_, k| k.state == BarrierState::Prepared.as_str() || k.at_ms >= horizon);
    }
}

/// The SDK's store: a [`Service`] in memory, its image saved to a Redis after every batch
/// (see the module doc). Implements [`Resource`], so [`crate::run_with`] runs it and
/// [`crate::conformance::run`] checks it.
pub struct Local<S> {
    name: String,
    url: RedisUrl,
    key: String,
    retention: Duration,
    conn: Option<MultiplexedConnection>,
    /// The image as saved at `version`; `None` until loaded.
    image: Option<(u64, Image<S>)>,
    initial: S,
}

impl<S: Service> Local<S> {
    /// A store for participant `name` whose image is `rtx:svc:<name>` on the Redis at `url`;
    /// `initial` seeds it when no image was ever saved. Finished barriers are kept `retention`.
    pub fn new(url: RedisUrl, name: impl Into<String>, initial: S, retention: Duration) -> Self {
        let name = name.into();
        Local { key: keys::service_image(&name), name, url, retention, conn: None, image: None, initial }
    }

    /// The service's state as last saved by this process (`None` before the first batch).
    pub fn state(&self) -> Option<&S> {
        self.image.as_ref().map(|(_, i)| &i.state)
    }

    async fn conn(&mut self) -> Result<&mut MultiplexedConnection> {
        if self.conn.is_none() {
            self.conn = Some(self.url.connect().await?);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// Loads the saved image (or the initial one at version 0).
    async fn load(&mut self) -> Result<()> {
        let url = self.url.clone();
        let key = self.key.clone();
        let (version, blob): (Option<u64>, Option<Vec<u8>>) =
            redis::cmd("HMGET").arg(&key).arg("version").arg("image").query_async(self.conn().await?).await.map_err(
                |e| {
                    self.conn = None;
                    Error::redis(&url, e)
                },
            )?;
        let image = match (version, blob) {
            (Some(v), Some(b)) => (
                v,
                rmp_serde::from_slice(&b).map_err(|e| Error::Resource {
                    resource: self.name.clone(),
                    detail: format!("the saved image {key} does not decode as this service's state: {e}"),
                })?,
            ),
            _ => (0, Image { state: self.initial.clone(), barriers: BTreeMap::new() }),
        };
        self.image = Some(image);
        Ok(())
    }

    /// Saves `image` over `version` (or checks `version` when `image` is `None`). `Ok(None)`: a
    /// conflict (someone else saved). `Ok(Some(v))`: the version now saved.
    async fn save(&mut self, version: u64, image: Option<&Image<S>>) -> Result<Option<u64>> {
        let blob = match image {
            // Named fields: a state type that gains a field (with a serde default) still reads
            // an image saved before.
            Some(i) => rmp_serde::to_vec_named(i).map_err(|e| Error::Resource {
                resource: self.name.clone(),
                detail: format!("the image does not serialize: {e}"),
            })?,
            None => Vec::new(),
        };
        let call = SAVE.call().key(&self.key).arg(version).arg(blob);
        let url = self.url.clone();
        let reply = call.run(self.conn().await?, &url).await.inspect_err(|_| self.conn = None)?;
        let items = scripts::reply_strings(SAVE.name, &reply)?;
        let bad = || Error::ScriptReply { script: SAVE.name, detail: format!("{items:?}") };
        let found: u64 = items.get(1).and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        match items.first().map(String::as_str) {
            Some("1") => Ok(Some(found)),
            Some("2") => Ok(None),
            _ => Err(bad()),
        }
    }
}

impl<S: Service> Resource for Local<S> {
    async fn apply(&mut self, batch: &[Transition<'_>]) -> Result<Vec<std::result::Result<Applied, String>>> {
        for attempt in 1..=SAVE_ATTEMPTS {
            if self.image.is_none() {
                self.load().await?;
            }
            let (version, image) = self.image.as_ref().expect("loaded");
            let version = *version;
            let mut next = image.clone();
            let mut changed = false;
            let mut out = Vec::with_capacity(batch.len());
            for t in batch {
                if t.request.participant() != self.name {
                    out.push(Err(format!(
                        "request for {:?} given to service {:?}",
                        t.request.participant(),
                        self.name
                    )));
                    continue;
                }
                out.push(next.apply(&self.name, t).map(|(applied, c)| {
                    changed |= c;
                    applied
                }));
            }
            if changed {
                if let Some(t) = batch.first() {
                    next.prune(t.now_ms, self.retention);
                }
            }
            match self.save(version, changed.then_some(&next)).await? {
                Some(saved) => {
                    if changed {
                        self.image = Some((saved, next));
                    }
                    return Ok(out);
                }
                None => {
                    tracing::debug!(participant = %self.name, attempt, "another instance saved the image; reloading");
                    self.image = None;
                }
            }
        }
        Err(Error::Resource {
            resource: self.name.clone(),
            detail: format!("another instance kept saving the image ({SAVE_ATTEMPTS} attempts); retrying later"),
        })
    }
}

/// Reads the state of service `name` as saved on `conn` (`None`: never saved). For tests and
/// tools: the running service keeps its own copy.
pub async fn saved_state<S: Service>(conn: &mut MultiplexedConnection, name: &str) -> Result<Option<S>> {
    let blob: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(keys::service_image(name))
        .arg("image")
        .query_async(conn)
        .await
        .map_err(|e| Error::Resource { resource: name.into(), detail: e.to_string() })?;
    blob.map(|b| {
        rmp_serde::from_slice::<Image<S>>(&b).map(|i| i.state).map_err(|e| Error::Resource {
            resource: name.into(),
            detail: format!("the saved image does not decode: {e}"),
        })
    })
    .transpose()
}
