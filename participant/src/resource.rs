//! The [`Resource`] trait: the one atomic primitive a participant's data store supplies.
//!
//! The runtime owns the barrier *rules* ([`crate::barrier`]); a resource only carries out a
//! [`Transition`]: "if the barrier is still in state `expect`, change it and make the business
//! change, atomically". The built-in [`KvResource`](crate::kv::KvResource) does it in one Lua
//! call on its data Redis; a SQL resource would do it in one database transaction with a
//! barrier table. Implement this trait and call [`run_with`](crate::run_with) for a participant
//! of your own, and run [`conformance::run`](crate::conformance::run) against it in a test.

use crate::barrier::{Barrier, BarrierState, Request, Work};
use redtx_common::Result;
use std::future::Future;

/// One barrier transition to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition<'a> {
    /// The request it serves (transaction, branch, participant, payload, deadline).
    pub request: &'a Request,
    /// Compare-and-set: carry it out only if the barrier is in this state (`None`: there is no
    /// barrier yet). Otherwise change nothing and answer [`Applied::Moved`].
    pub expect: Option<BarrierState>,
    /// What to do.
    pub work: Work,
    /// The runtime's clock (ms since the epoch), for timestamps and expiries.
    pub now_ms: u64,
}

/// What a resource did with one [`Transition`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Done, atomically with the barrier change: the barrier is now in `state`. For
    /// [`Work::Try`] and [`Work::Action`] the business may refuse: `state` is then `Refused` /
    /// `Failed` with the `reason` (recorded). A compensation the business refuses leaves the
    /// barrier `Done` (nothing recorded) with the `reason`. A [`Work::Mark`] ends in its `to`.
    Done { state: BarrierState, reason: Option<String> },
    /// The barrier was not in the expected state; nothing changed. Carries the barrier as it is,
    /// so the runtime decides again.
    Moved(Option<Barrier>),
    /// Saga only: the change cannot be made now (e.g. a key held by a 2PC branch's lock);
    /// nothing changed. The step is answered `error`, and the coordinator retries it later.
    Busy(String),
}

/// A transactional data store driven by the participant runtime.
///
/// `apply` carries out a batch of transitions, each atomically (barrier change + business
/// change, or nothing). The runtime never puts two transitions of the same barrier in one
/// batch. It may send any transition again (after a crash, or a redelivery): the
/// compare-and-set on `expect` makes a repeat answer [`Applied::Moved`].
pub trait Resource: Send {
    /// One result per transition, in order. Inner `Err(detail)`: this one could not be done now
    /// (nothing changed; it stays pending and is retried). Outer `Err`: nothing is known about
    /// any of them (all stay pending).
    fn apply(
        &mut self,
        batch: &[Transition<'_>],
    ) -> impl Future<Output = Result<Vec<std::result::Result<Applied, String>>>> + Send;
}
