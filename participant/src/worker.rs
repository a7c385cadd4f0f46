//! The participant worker: a [`Handler`] for the shared stream runtime that runs a batch of
//! requests on a [`Resource`], writes the votes/acks to the coordinator stream, and only then
//! lets the runtime ack the entries.

use crate::machine;
use crate::resource::{Request, Resource, Response};
use redis::aio::MultiplexedConnection;
use redtx_common::conn::RedisUrl;
use redtx_common::consumer::{Delivery, Disposition, Handler};
use redtx_common::protocol::Message;
use redtx_common::{failpoint, keys, Error, Result};

/// Fail point: the prepare scripts of a batch ran, its votes are not sent yet.
pub const AFTER_PREPARE: &str = "participant-after-prepare";
/// Fail point: the commit/abort scripts of a batch ran, its acks are not sent yet.
pub const AFTER_COMMIT: &str = "participant-after-commit";

/// A lazily opened connection, dropped after a failure so that the next use reconnects.
struct Link {
    url: RedisUrl,
    conn: Option<MultiplexedConnection>,
}

impl Link {
    async fn conn(&mut self) -> Result<&mut MultiplexedConnection> {
        if self.conn.is_none() {
            self.conn = Some(self.url.connect().await?);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// `XADD`s every reply to the coordinator stream, as one pipeline.
    async fn send(&mut self, replies: &[Message]) -> Result<()> {
        if replies.is_empty() {
            return Ok(());
        }
        let mut p = redis::pipe();
        let stream = keys::coord_stream();
        for m in replies {
            p.xadd(&stream, "*", &m.fields()[..]).ignore();
        }
        let url = self.url.clone();
        if let Err(e) = p.query_async::<()>(self.conn().await?).await {
            // Maybe a connection that died with a Redis restart: open a fresh one and send
            // again (a duplicate vote or ack is harmless to the coordinator).
            tracing::debug!(error = %e, "stream Redis pipeline failed; retrying on a new connection");
            self.conn = None;
            let r = p.query_async::<()>(self.conn().await?).await;
            r.map_err(|e| {
                self.conn = None;
                Error::redis(&url, e)
            })?;
        }
        Ok(())
    }
}

/// The participant's [`Handler`].
pub struct Participant<R> {
    name: String,
    resource: R,
    stream: Link,
}

impl<R: Resource> Participant<R> {
    /// A handler for participant `name` whose replies go to the stream Redis at `stream_url`.
    pub fn new(name: impl Into<String>, resource: R, stream_url: RedisUrl) -> Self {
        Participant { name: name.into(), resource, stream: Link { url: stream_url, conn: None } }
    }
}

impl<R: Resource> Handler for Participant<R> {
    async fn handle(&mut self, batch: Vec<Delivery>) -> Result<Vec<Disposition>> {
        let mut out: Vec<Option<Disposition>> = vec![None; batch.len()];
        let mut requests = Vec::with_capacity(batch.len());
        let mut at = Vec::with_capacity(batch.len());
        for (i, d) in batch.into_iter().enumerate() {
            match machine::request(&self.name, d.msg) {
                Ok(r) => {
                    requests.push(r);
                    at.push(i);
                }
                Err(reason) => out[i] = Some(Disposition::DeadLetter(reason)),
            }
        }
        let answers = self.resource.apply(&requests).await?;
        if requests.iter().any(|r| matches!(r, Request::Prepare(_))) {
            failpoint::hit(AFTER_PREPARE).await;
        }
        if requests.iter().any(|r| !matches!(r, Request::Prepare(_))) {
            failpoint::hit(AFTER_COMMIT).await;
        }
        let mut replies = Vec::with_capacity(requests.len());
        for ((i, req), answer) in at.into_iter().zip(&requests).zip(answers) {
            log(&self.name, req, &answer);
            let step = machine::respond(&self.name, req, answer);
            replies.extend(step.reply);
            out[i] = Some(step.disposition);
        }
        self.stream.send(&replies).await?;
        Ok(out.into_iter().map(|d| d.expect("every entry decided")).collect())
    }
}

fn log(name: &str, req: &Request, answer: &std::result::Result<Response, String>) {
    let (txn, branch, kind) = (req.txn(), req.branch(), req.kind());
    match answer {
        Ok(Response::Vote { yes, reason, repeat }) => {
            tracing::debug!(participant = name, txn, branch, yes, ?reason, repeat, "voted")
        }
        Ok(Response::Done { outcome, repeat, warning: None }) => {
            tracing::debug!(participant = name, txn, branch, outcome = outcome.as_str(), repeat, "applied")
        }
        Ok(Response::Done { outcome, warning: Some(w), .. }) => {
            tracing::error!(participant = name, txn, branch, outcome = outcome.as_str(), warning = %w, "applied with errors")
        }
        Ok(Response::Violation(reason)) => {
            tracing::error!(participant = name, txn, branch, kind, %reason, "protocol violation")
        }
        Err(e) => tracing::warn!(participant = name, txn, branch, kind, error = %e, "request failed; will retry"),
    }
}
