//! The transaction record (`rtx:txn:{id}`, a hash) and the transaction state machine.
//!
//! The record is the single source of truth about a transaction. The coordinator's Lua scripts
//! (`lua/txn_*.lua`) change it atomically; this module reads it and defines the legal moves.
//!
//! Hash fields: `v` (record version), `mode`, `state`, `n` (branch count), `spec` (MessagePack
//! [`TxnSpec`]), `created`, `deadline`, `decided`, `finished` (ms since the epoch), `reason`,
//! `yes` and `acks` (counters), and per branch `i`: `p:i` (participant), `vote:i` (`yes`/`no`),
//! `why:i` (vote reason), `vt:i` (vote time), `ack:i` (`committed`/`aborted`), `at:i` (ack time).

use crate::spec::TxnSpec;
use serde::Serialize;
use std::collections::HashMap;

/// Where a transaction is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TxnState {
    /// Prepares are out; waiting for every vote. Next: `committing` (all yes) or `aborting`
    /// (a no, or the deadline passed).
    Preparing,
    /// Decided to commit (written before any commit is sent). Next: `committed` once every
    /// participant acked.
    Committing,
    /// Decided to abort (written before any abort is sent). Next: `aborted` once every
    /// participant acked.
    Aborting,
    /// Terminal: every branch applied its writes.
    Committed,
    /// Terminal: no branch applied anything.
    Aborted,
}

impl TxnState {
    /// Every state, in life order.
    pub const ALL: [TxnState; 5] =
        [TxnState::Preparing, TxnState::Committing, TxnState::Aborting, TxnState::Committed, TxnState::Aborted];

    /// Name stored in the record.
    pub fn as_str(self) -> &'static str {
        match self {
            TxnState::Preparing => "preparing",
            TxnState::Committing => "committing",
            TxnState::Aborting => "aborting",
            TxnState::Committed => "committed",
            TxnState::Aborted => "aborted",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<TxnState> {
        TxnState::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// `committed` or `aborted`: nothing will change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, TxnState::Committed | TxnState::Aborted)
    }

    /// The only moves the record may make.
    pub fn can_move_to(self, next: TxnState) -> bool {
        use TxnState::*;
        matches!(
            (self, next),
            (Preparing, Committing) | (Preparing, Aborting) | (Committing, Committed) | (Aborting, Aborted)
        )
    }
}

impl std::fmt::Display for TxnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the record says about one branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BranchStatus {
    /// Participant name.
    pub participant: String,
    /// `Some(true)` voted yes, `Some(false)` voted no, `None` not yet.
    pub vote: Option<bool>,
    /// Reason given with a no vote.
    pub reason: Option<String>,
    /// When the vote was counted (ms).
    pub voted_ms: Option<u64>,
    /// `committed`/`aborted` once the participant applied the decision.
    pub ack: Option<String>,
    /// When the ack was counted (ms).
    pub acked_ms: Option<u64>,
}

/// A transaction record as read from Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TxnRecord {
    /// Transaction id.
    pub id: String,
    /// `2pc`.
    pub mode: String,
    /// Current state.
    pub state: TxnState,
    /// Why it aborted (or other note).
    pub reason: Option<String>,
    /// Created (ms).
    pub created_ms: u64,
    /// Vote deadline (ms).
    pub deadline_ms: u64,
    /// When the decision was written (ms).
    pub decided_ms: Option<u64>,
    /// When it became terminal (ms).
    pub finished_ms: Option<u64>,
    /// One entry per branch, in spec order.
    pub branches: Vec<BranchStatus>,
    /// The spec, as submitted.
    #[serde(skip)]
    pub spec: Option<TxnSpec>,
}

impl TxnRecord {
    /// Builds a record from `HGETALL rtx:txn:{id}`; `None` if the hash is empty (no such
    /// transaction, or it expired after its retention window).
    pub fn from_hash(id: &str, h: &HashMap<String, Vec<u8>>) -> Result<Option<TxnRecord>, String> {
        if h.is_empty() {
            return Ok(None);
        }
        let text = |k: &str| h.get(k).map(|v| String::from_utf8_lossy(v).into_owned());
        let num = |k: &str| text(k).and_then(|v| v.parse::<u64>().ok());
        let state_s = text("state").ok_or("record has no state")?;
        let state = TxnState::parse(&state_s).ok_or_else(|| format!("record has unknown state {state_s:?}"))?;
        let n = num("n").ok_or("record has no branch count")? as usize;
        let branches = (0..n)
            .map(|i| BranchStatus {
                participant: text(&format!("p:{i}")).unwrap_or_default(),
                vote: text(&format!("vote:{i}")).map(|v| v == "yes"),
                reason: text(&format!("why:{i}")).filter(|s| !s.is_empty()),
                voted_ms: num(&format!("vt:{i}")),
                ack: text(&format!("ack:{i}")),
                acked_ms: num(&format!("at:{i}")),
            })
            .collect();
        Ok(Some(TxnRecord {
            id: id.to_string(),
            mode: text("mode").unwrap_or_default(),
            state,
            reason: text("reason").filter(|s| !s.is_empty()),
            created_ms: num("created").unwrap_or(0),
            deadline_ms: num("deadline").unwrap_or(0),
            decided_ms: num("decided"),
            finished_ms: num("finished"),
            branches,
            spec: h.get("spec").and_then(|b| rmp_serde::from_slice(b).ok()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_forward_moves_are_legal() {
        use TxnState::*;
        for a in TxnState::ALL {
            assert_eq!(TxnState::parse(a.as_str()), Some(a));
            for b in TxnState::ALL {
                let legal = a.can_move_to(b);
                assert_eq!(
                    legal,
                    matches!(
                        (a, b),
                        (Preparing, Committing) | (Preparing, Aborting) | (Committing, Committed) | (Aborting, Aborted)
                    )
                );
                if a.is_terminal() {
                    assert!(!legal, "{a} is terminal");
                }
            }
        }
    }
}
