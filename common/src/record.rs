//! The transaction record (`rtx:txn:{P}:<id>`, a hash) and the transaction states.
//!
//! The owner of partition `P` keeps its live transactions in memory ([`crate::machine::Txn`])
//! and writes the record whenever one changes, in the same atomic call as the messages the
//! change causes. The record is what a new owner reloads and what `redtx status` reads.
//!
//! Hash fields: `v` (record version, `2`), `mode`, `state`, `reason` (why it aborted,
//! compensated or was rejected), `created`, `deadline`, `finished` (ms since the epoch), `spec` (MessagePack
//! [`TxnSpec`], as submitted first, written once; for a `rejected` submit only its id and mode)
//! and `st` (MessagePack [`Progress`]: every branch's phase, attempts
//! and reasons).

use crate::machine::{Phase, Progress, Txn};
use crate::spec::TxnSpec;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Version of the record layout.
pub const RECORD_VERSION: u32 = 2;

/// Where a transaction is in its life. The moves are in [`crate::machine`]'s table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TxnState {
    /// 2PC: prepares are out; waiting for every vote.
    Preparing,
    /// 2PC: decided to commit (written before any commit is sent); waiting for every ack.
    Committing,
    /// 2PC: decided to abort (written before any abort is sent); nothing is or will be applied;
    /// waiting for every participant to confirm it released what it held.
    Aborting,
    /// 2PC, terminal: every branch applied its writes.
    Committed,
    /// 2PC, terminal: no branch applied anything, and every one confirmed.
    Aborted,
    /// Saga: forward steps are running.
    Running,
    /// Saga: a step failed; the steps that ran are being compensated, in reverse order.
    Compensating,
    /// Saga, terminal: every step's action applied.
    Completed,
    /// Saga, terminal: every step that ran was compensated.
    Compensated,
    /// Saga: a compensation keeps failing past its retry limit. It is still retried (slowly),
    /// never dropped; it moves on to `compensated` once it succeeds.
    Stuck,
    /// Terminal: the coordinator refused the submit (it does not decode, its spec is invalid,
    /// or it came to the wrong partition); `reason` says why. Nothing was sent to anyone.
    Rejected,
}

impl TxnState {
    /// Every state.
    pub const ALL: [TxnState; 11] = [
        TxnState::Preparing,
        TxnState::Committing,
        TxnState::Aborting,
        TxnState::Committed,
        TxnState::Aborted,
        TxnState::Running,
        TxnState::Compensating,
        TxnState::Completed,
        TxnState::Compensated,
        TxnState::Stuck,
        TxnState::Rejected,
    ];

    /// Name stored in the record.
    pub fn as_str(self) -> &'static str {
        match self {
            TxnState::Preparing => "preparing",
            TxnState::Committing => "committing",
            TxnState::Aborting => "aborting",
            TxnState::Committed => "committed",
            TxnState::Aborted => "aborted",
            TxnState::Running => "running",
            TxnState::Compensating => "compensating",
            TxnState::Completed => "completed",
            TxnState::Compensated => "compensated",
            TxnState::Stuck => "stuck",
            TxnState::Rejected => "rejected",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<TxnState> {
        TxnState::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// `committed`, `aborted`, `completed`, `compensated`, `rejected`: nothing will change any
    /// more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TxnState::Committed | TxnState::Aborted | TxnState::Completed | TxnState::Compensated | TxnState::Rejected
        )
    }

    /// A producer's answer is known: terminal, or `aborting` (decided: nothing is applied
    /// anywhere), or `stuck` (needs an operator).
    pub fn is_settled(self) -> bool {
        self.is_terminal() || matches!(self, TxnState::Aborting | TxnState::Stuck)
    }

    /// The outcome a producer should act on: `true` when the change is applied everywhere.
    pub fn is_success(self) -> bool {
        matches!(self, TxnState::Committed | TxnState::Completed)
    }
}

impl std::fmt::Display for TxnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the record says about one branch (2PC) or step (saga).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BranchStatus {
    /// Participant name.
    pub participant: String,
    /// Where the branch is (e.g. `voted-yes`, `committed`, `running`, `compensated`).
    pub phase: Phase,
    /// The participant's reason (a no vote, a failed or erroring step).
    pub reason: Option<String>,
    /// Saga: attempts of the current half (action or compensation).
    pub attempts: u32,
    /// When the branch last changed (ms).
    pub at_ms: Option<u64>,
}

/// A transaction record as read from Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TxnRecord {
    /// Transaction id.
    pub id: String,
    /// `2pc` or `saga`.
    pub mode: String,
    /// Current state.
    pub state: TxnState,
    /// Why it aborted, compensated or was rejected.
    pub reason: Option<String>,
    /// Saga: the step whose failure started the compensation.
    pub failed_step: Option<u32>,
    /// Created (ms).
    pub created_ms: u64,
    /// 2PC vote deadline / saga forward deadline (ms).
    pub deadline_ms: u64,
    /// When the decision (2PC) or the compensation (saga) was made (ms).
    pub decided_ms: Option<u64>,
    /// When it became terminal (ms).
    pub finished_ms: Option<u64>,
    /// One entry per branch or step, in spec order.
    pub branches: Vec<BranchStatus>,
    /// The spec, as submitted first.
    #[serde(skip)]
    pub spec: Option<TxnSpec>,
}

impl TxnRecord {
    /// The status view of an in-memory transaction.
    pub fn of(txn: &Txn) -> TxnRecord {
        let p = &txn.progress;
        TxnRecord {
            id: txn.spec.id.clone(),
            mode: txn.spec.mode.as_str().to_string(),
            state: p.state,
            reason: p.reason.clone(),
            failed_step: p.failed_step,
            created_ms: p.created_ms,
            deadline_ms: p.deadline_ms,
            decided_ms: p.decided_ms,
            finished_ms: p.finished_ms,
            branches: txn
                .spec
                .branches
                .iter()
                .zip(&p.branches)
                .map(|(b, s)| BranchStatus {
                    participant: b.participant.clone(),
                    phase: s.phase,
                    reason: s.reason.clone(),
                    attempts: s.attempts,
                    at_ms: s.at_ms,
                })
                .collect(),
            spec: Some(txn.spec.clone()),
        }
    }

    /// Builds a record from `HGETALL rtx:txn:{P}:<id>`; `None` if the hash is empty (no such
    /// transaction, or it expired after its retention window).
    pub fn from_hash(id: &str, h: &HashMap<String, Vec<u8>>) -> Result<Option<TxnRecord>, String> {
        Ok(txn_from_hash(id, h)?.map(|t| TxnRecord::of(&t)))
    }
}

/// Decodes the in-memory transaction from its record's `spec` and `st` fields; `None` if the
/// hash is empty.
pub fn txn_from_hash(id: &str, h: &HashMap<String, Vec<u8>>) -> Result<Option<Txn>, String> {
    if h.is_empty() {
        return Ok(None);
    }
    let spec: TxnSpec = rmp_serde::from_slice(h.get("spec").ok_or("record has no spec")?)
        .map_err(|e| format!("record of {id}: bad spec: {e}"))?;
    let progress: Progress = rmp_serde::from_slice(h.get("st").ok_or("record has no st")?)
        .map_err(|e| format!("record of {id}: bad st: {e}"))?;
    if progress.branches.len() != spec.branches.len() {
        return Err(format!(
            "record of {id}: st has {} branches, spec {}",
            progress.branches.len(),
            spec.branches.len()
        ));
    }
    Ok(Some(Txn { spec, progress }))
}

/// The hash fields that carry `txn`'s mutable part (`state`, `reason`, `finished`, `st`).
pub fn progress_fields(txn: &Txn) -> Vec<(&'static str, Vec<u8>)> {
    let p = &txn.progress;
    let mut f = vec![
        ("state", p.state.as_str().as_bytes().to_vec()),
        ("st", rmp_serde::to_vec_named(p).expect("progress always serializes")),
    ];
    if let Some(r) = &p.reason {
        f.push(("reason", r.as_bytes().to_vec()));
    }
    if let Some(t) = p.finished_ms {
        f.push(("finished", t.to_string().into_bytes()));
    }
    f
}

/// Every hash field of a new record: the fixed ones and the spec, then [`progress_fields`].
pub fn create_fields(txn: &Txn) -> Vec<(&'static str, Vec<u8>)> {
    let p = &txn.progress;
    let mut f = vec![
        ("v", RECORD_VERSION.to_string().into_bytes()),
        ("mode", txn.spec.mode.as_str().as_bytes().to_vec()),
        ("created", p.created_ms.to_string().into_bytes()),
        ("deadline", p.deadline_ms.to_string().into_bytes()),
        ("spec", rmp_serde::to_vec_named(&txn.spec).expect("specs always serialize")),
    ];
    f.extend(progress_fields(txn));
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_terminal_states_are_settled() {
        for s in TxnState::ALL {
            assert_eq!(TxnState::parse(s.as_str()), Some(s));
            if s.is_terminal() {
                assert!(s.is_settled());
            }
        }
        assert!(TxnState::Aborting.is_settled() && !TxnState::Committing.is_settled());
    }
}
