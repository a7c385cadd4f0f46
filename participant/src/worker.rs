//! The participant worker: a [`Handler`] for the shared stream runtime that runs a batch of
//! requests on a [`Resource`] and hands the votes/acks to the runtime, which writes them to the
//! coordinator stream and acks the entries in one transaction.

use crate::machine;
use crate::resource::{Request, Resource, Response};
use redtx_common::consumer::{Delivery, Disposition, Handled, Handler};
use redtx_common::{failpoint, keys, Result};

/// Fail point: the prepare scripts of a batch ran, its votes are not sent yet.
pub const AFTER_PREPARE: &str = "participant-after-prepare";
/// Fail point: the commit/abort scripts of a batch ran, its acks are not sent yet.
pub const AFTER_COMMIT: &str = "participant-after-commit";

/// The participant's [`Handler`].
pub struct Participant<R> {
    name: String,
    resource: R,
}

impl<R: Resource> Participant<R> {
    /// A handler for participant `name`; its replies go to the coordinator stream on the stream
    /// Redis, written by the runtime together with the acks.
    pub fn new(name: impl Into<String>, resource: R) -> Self {
        Participant { name: name.into(), resource }
    }
}

impl<R: Resource> Handler for Participant<R> {
    async fn handle(&mut self, batch: Vec<Delivery>) -> Result<Handled> {
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
        let stream = keys::coord_stream();
        let writes =
            replies.iter().map(|m| redis::cmd("XADD").arg(&stream).arg("*").arg(&m.fields()[..]).clone()).collect();
        Ok(Handled { dispositions: out.into_iter().map(|d| d.expect("every entry decided")).collect(), writes })
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
