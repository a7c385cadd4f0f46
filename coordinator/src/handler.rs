//! The Redis layer: runs a batch's script calls as one pipeline, feeds each reply to the pure
//! [`machine`], and hands the resulting effects to the runtime, which writes them
//! in one transaction with the batch's acks.

use crate::machine::{self, Effect, Step, Timing};
use crate::scripts;
use crate::CoordinatorConfig;
use redis::aio::MultiplexedConnection;
use redtx_common::conn::RedisUrl;
use redtx_common::consumer::{Delivery, Disposition, Handled, Handler};
use redtx_common::protocol::Message;
use redtx_common::scripts::Call;
use redtx_common::{failpoint, keys, now_ms, Error, Result};

/// Fail point: the record was created, no prepare sent yet.
pub const FP_AFTER_CREATE: &str = "coordinator-after-create";
/// Fail point: a decision was written to the record, no commit/abort sent yet.
pub const FP_AFTER_DECISION: &str = "coordinator-after-decision";

/// Outcome stream cap (`MAXLEN ~`).
pub const OUTCOMES_MAXLEN: usize = 100_000;

/// Most due transactions looked at per deadline scan.
pub const SCAN_LIMIT: usize = 256;

/// The coordinator's [`Handler`].
pub struct Coordinator {
    url: RedisUrl,
    conn: Option<MultiplexedConnection>,
    resend_every_ms: u64,
    retention_ms: u64,
}

/// What to do with one delivery once the scripts answered.
enum Plan {
    /// Decided without Redis.
    Now(Disposition),
    /// Call number `i` of the pipeline.
    Call(usize),
}

impl Coordinator {
    /// A handler talking to `url` (connects lazily, and again after a connection error).
    pub fn new(url: RedisUrl, cfg: &CoordinatorConfig) -> Self {
        Coordinator {
            url,
            conn: None,
            resend_every_ms: cfg.resend_every.as_millis().max(1) as u64,
            retention_ms: cfg.retention.as_millis().max(1) as u64,
        }
    }

    fn timing(&self, now_ms: u64) -> Timing {
        Timing { now_ms, resend_every_ms: self.resend_every_ms }
    }

    async fn conn(&mut self) -> Result<MultiplexedConnection> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let c = self.url.connect().await?;
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// Forgets the connection after a connection-level failure (e.g. Redis restarted).
    fn on_error<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(Error::Redis { source, .. }) = &r {
            if source.is_io_error() || source.is_connection_dropped() || source.is_timeout() {
                self.conn = None;
            }
        }
        r
    }

    async fn run_calls(&mut self, calls: &[Call]) -> Result<Vec<redis::RedisResult<redis::Value>>> {
        let mut conn = self.conn().await?;
        let r = redtx_common::scripts::run(&mut conn, &self.url, calls).await;
        self.on_error(r)
    }

    /// Carries out `effects` (of the deadline scan) as one pipeline.
    async fn execute(&mut self, effects: &[Effect]) -> Result<()> {
        if effects.is_empty() {
            return Ok(());
        }
        let mut p = redis::pipe();
        for c in effect_commands(effects) {
            p.add_command(c).ignore();
        }
        let mut conn = self.conn().await?;
        let r = p.query_async::<()>(&mut conn).await.map_err(|e| Error::redis(&self.url, e));
        self.on_error(r)
    }
}

/// The commands that carry out `effects`: schedules first (so a deadline never outlives the
/// transaction's end), then sends, publications and unschedules.
fn effect_commands(effects: &[Effect]) -> Vec<redis::Cmd> {
    let deadlines = keys::deadlines();
    let mut cmds = Vec::with_capacity(effects.len());
    for e in effects {
        if let Effect::Schedule { txn, at_ms } = e {
            cmds.push(redis::cmd("ZADD").arg(&deadlines).arg(*at_ms).arg(txn).clone());
        }
    }
    for e in effects {
        match e {
            Effect::Schedule { .. } => {}
            Effect::Send(m) => {
                let Some(participant) = recipient(m) else { continue };
                cmds.push(
                    redis::cmd("XADD").arg(keys::participant_stream(participant)).arg("*").arg(&m.fields()[..]).clone(),
                );
            }
            Effect::Publish { txn, state } => cmds.push(
                redis::cmd("XADD")
                    .arg(keys::outcomes_stream())
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(OUTCOMES_MAXLEN)
                    .arg("*")
                    .arg("id")
                    .arg(txn)
                    .arg("state")
                    .arg(state.as_str())
                    .clone(),
            ),
            Effect::Unschedule { txn } => cmds.push(redis::cmd("ZREM").arg(&deadlines).arg(txn).clone()),
        }
    }
    cmds
}

/// The participant a coordinator-sent message goes to.
fn recipient(m: &Message) -> Option<&str> {
    match m {
        Message::Prepare(p) => Some(&p.participant),
        Message::Commit(r) | Message::Abort(r) => Some(&r.participant),
        _ => None,
    }
}

impl Handler for Coordinator {
    async fn handle(&mut self, batch: Vec<Delivery>) -> Result<Handled> {
        let now = now_ms();
        let t = self.timing(now);
        let mut calls = Vec::with_capacity(batch.len());
        let plans: Vec<Plan> = batch
            .iter()
            .map(|d| {
                let call = match &d.msg {
                    Message::Submit(s) => match s.spec.validate() {
                        Ok(()) => scripts::create(&s.spec, now),
                        Err(e) => return Plan::Now(Disposition::DeadLetter(format!("invalid spec: {e}"))),
                    },
                    Message::Vote(v) => scripts::vote(v, now),
                    Message::Ack(a) => scripts::ack(a, now, self.retention_ms),
                    other => {
                        return Plan::Now(Disposition::DeadLetter(format!(
                            "a message of type {:?} does not belong on the coordinator stream",
                            other.kind()
                        )))
                    }
                };
                calls.push(call);
                Plan::Call(calls.len() - 1)
            })
            .collect();
        let replies = self.run_calls(&calls).await?;

        let mut out = Vec::with_capacity(batch.len());
        let mut effects = Vec::new();
        let (mut created, mut decided) = (false, false);
        for (d, plan) in batch.iter().zip(plans) {
            let i = match plan {
                Plan::Now(disp) => {
                    out.push(disp);
                    continue;
                }
                Plan::Call(i) => i,
            };
            let reply = match &replies[i] {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(id = %d.id, txn = d.msg.txn(), error = %e, "script failed; entry stays pending");
                    out.push(Disposition::Retry);
                    continue;
                }
            };
            let step: Result<Step> = match &d.msg {
                Message::Submit(s) => scripts::parse_created(reply).map(|r| {
                    created |= r.created;
                    if !r.created {
                        tracing::debug!(txn = %s.spec.id, state = %r.state, "submit of an existing transaction");
                    }
                    machine::on_submit(&s.spec, &r, t)
                }),
                Message::Vote(v) => scripts::parse_voted(reply).map(|r| machine::on_vote(v, &r, t)),
                Message::Ack(a) => scripts::parse_acked(reply).map(|r| machine::on_ack(a, &r)),
                _ => unreachable!("only submit, vote and ack are called"),
            };
            match step {
                Ok(step) => {
                    if step.missing {
                        tracing::info!(
                            txn = d.msg.txn(),
                            kind = d.msg.kind(),
                            "no record (expired or never created); ignored"
                        );
                    }
                    decided |= step.decided;
                    match step.reject {
                        Some(reason) => out.push(Disposition::DeadLetter(reason)),
                        None => {
                            effects.extend(step.effects);
                            out.push(Disposition::Ack);
                        }
                    }
                }
                Err(e) => out.push(Disposition::DeadLetter(e.to_string())),
            }
        }
        if created {
            failpoint::hit(FP_AFTER_CREATE).await;
        }
        if decided {
            failpoint::hit(FP_AFTER_DECISION).await;
        }
        // The runtime writes these and acks the batch in one transaction.
        Ok(Handled { dispositions: out, writes: effect_commands(&effects) })
    }

    async fn tick(&mut self) -> Result<()> {
        let now = now_ms();
        let mut conn = self.conn().await?;
        let due: Result<Vec<String>> = redis::cmd("ZRANGEBYSCORE")
            .arg(keys::deadlines())
            .arg("-inf")
            .arg(now)
            .arg("LIMIT")
            .arg(0)
            .arg(SCAN_LIMIT)
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::redis(&self.url, e));
        let due = self.on_error(due)?;
        if due.is_empty() {
            return Ok(());
        }
        let calls: Vec<Call> = due.iter().map(|id| scripts::expire(id, now)).collect();
        let replies = self.run_calls(&calls).await?;
        let t = self.timing(now);
        let mut effects = Vec::new();
        let mut decided = false;
        for (id, reply) in due.iter().zip(replies) {
            let step = match reply.map_err(|e| Error::redis(&self.url, e)).and_then(|v| scripts::parse_expired(&v)) {
                Ok(r) => machine::on_expire(id, &r, t),
                Err(e) => {
                    // Look again later, so that a record that keeps failing never holds the
                    // head of the scan (it reads at most SCAN_LIMIT due transactions).
                    tracing::warn!(txn = %id, error = %e, "deadline scan failed for this transaction");
                    effects.push(Effect::Schedule { txn: id.clone(), at_ms: t.resend_at(None) });
                    continue;
                }
            };
            if let Some(reason) = &step.reject {
                tracing::error!(txn = %id, %reason, "deadline scan: cannot handle this record; dropping its deadline");
                effects.push(Effect::Unschedule { txn: id.clone() });
                continue;
            }
            if step.decided {
                tracing::info!(txn = %id, "vote deadline passed: aborting");
            }
            decided |= step.decided;
            effects.extend(step.effects);
        }
        if decided {
            failpoint::hit(FP_AFTER_DECISION).await;
        }
        self.execute(&effects).await
    }
}
