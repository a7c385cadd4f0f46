//! The [`Resource`] trait: what a participant does with prepare/commit/abort requests.
//!
//! The worker runtime ([`crate::worker`]) owns delivery (batches, acks, claiming, dead letters,
//! replies to the coordinator); a resource owns the data and its idempotency barrier. The
//! built-in [`KvResource`](crate::kv::KvResource) runs Lua scripts on a data Redis; a custom
//! participant implements this trait and calls [`run_with`](crate::run_with).

use redtx_common::protocol::{Outcome, Prepare, Resolve};
use redtx_common::Result;
use std::future::Future;

/// One request to a resource, already checked to be addressed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Lock, check and stage a branch; answer with a vote.
    Prepare(Prepare),
    /// Apply the staged branch.
    Commit(Resolve),
    /// Drop the staged branch (or remember that it must never be prepared).
    Abort(Resolve),
}

impl Request {
    /// The transaction id.
    pub fn txn(&self) -> &str {
        match self {
            Request::Prepare(p) => &p.txn,
            Request::Commit(r) | Request::Abort(r) => &r.txn,
        }
    }

    /// The branch index.
    pub fn branch(&self) -> u32 {
        match self {
            Request::Prepare(p) => p.branch,
            Request::Commit(r) | Request::Abort(r) => r.branch,
        }
    }

    /// `prepare`, `commit` or `abort`.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Prepare(_) => "prepare",
            Request::Commit(_) => "commit",
            Request::Abort(_) => "abort",
        }
    }
}

/// What a resource did with one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Answer to a prepare. `repeat`: the same answer was given before (a redelivery).
    Vote { yes: bool, reason: Option<String>, repeat: bool },
    /// A commit or abort is applied (`repeat`: it already was). `warning`: something the
    /// operator must know although the outcome stands (e.g. a committed write that Redis
    /// refused because a plain writer changed a locked key).
    Done { outcome: Outcome, repeat: bool, warning: Option<String> },
    /// The request contradicts what the resource knows (commit of a branch never prepared,
    /// abort of a committed one, keys that differ from the prepared ones, an invalid message):
    /// nothing was changed; the entry is dead-lettered with this reason and nothing is sent.
    Violation(String),
}

/// A transactional resource driven by the participant worker.
///
/// Every operation must be idempotent (a request may be delivered again after a crash) and
/// atomic per request.
pub trait Resource: Send {
    /// Carries out a batch, in order. Returns one result per request: `Err(detail)` means this
    /// request could not be done now (it stays pending and is retried later). An outer `Err`
    /// means nothing is known about any of them (all stay pending).
    fn apply(&mut self, batch: &[Request]) -> impl Future<Output = Result<Vec<Result<Response, String>>>> + Send;
}
