//! How records are shown: one JSON object (`--json`) or aligned text.

use redtx_common::record::{TxnRecord, TxnState};
use std::time::{Duration, UNIX_EPOCH};

/// `2026-11-25T10:00:00.123Z`.
fn at(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Timestamp plus the delay since `created`.
fn since(ms: Option<u64>, created: u64) -> String {
    match ms {
        Some(t) => format!("{} (+{}ms)", at(t), t.saturating_sub(created)),
        None => "-".into(),
    }
}

/// The record as one JSON object: `id`, `state`, `reason`, timestamps, `branches`.
pub fn json(r: &TxnRecord) -> String {
    serde_json::to_string(r).expect("records serialize")
}

/// `{"id":..,"state":..,"reason":..}` for a transaction whose record is not (yet) readable.
pub fn json_state(id: &str, state: &str, reason: Option<&str>) -> String {
    serde_json::json!({ "id": id, "state": state, "reason": reason }).to_string()
}

/// One line: `<id> committed` or `<id> aborted: <reason>`.
pub fn line(r: &TxnRecord) -> String {
    match &r.reason {
        Some(reason) => format!("{} {}: {}", r.id, r.state, reason),
        None => format!("{} {}", r.id, r.state),
    }
}

/// Where an unfinished transaction stands: its state and reason, and the participants it is
/// still waiting for (a vote while preparing, an ack once decided).
pub fn pending(r: &TxnRecord) -> String {
    let waiting: Vec<&str> = r
        .branches
        .iter()
        .filter(|b| if r.state == TxnState::Preparing { b.vote.is_none() } else { b.ack.is_none() })
        .map(|b| b.participant.as_str())
        .collect();
    let what = if r.state == TxnState::Preparing { "a vote" } else { "an ack" };
    let mut s = format!("{} is {}", r.id, r.state);
    if let Some(reason) = &r.reason {
        s += &format!(" ({reason})");
    }
    if !waiting.is_empty() && !r.state.is_terminal() {
        s += &format!("; waiting for {what} from {}", waiting.join(", "));
    }
    s
}

/// The full record as aligned text.
pub fn text(r: &TxnRecord) -> String {
    let mut s = String::new();
    s += &format!("id:        {}\n", r.id);
    s += &format!("state:     {}\n", r.state);
    s += &format!("reason:    {}\n", r.reason.as_deref().unwrap_or("-"));
    s += &format!("mode:      {}\n", r.mode);
    s += &format!("created:   {}\n", at(r.created_ms));
    s += &format!("deadline:  {}\n", since(Some(r.deadline_ms), r.created_ms));
    s += &format!("decided:   {}\n", since(r.decided_ms, r.created_ms));
    s += &format!("finished:  {}\n", since(r.finished_ms, r.created_ms));
    s += "branches:\n";
    for (i, b) in r.branches.iter().enumerate() {
        let vote = match b.vote {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        s += &format!(
            "  [{i}] {:<16} vote: {:<3}  ack: {:<9}  voted: {}  acked: {}",
            b.participant,
            vote,
            b.ack.as_deref().unwrap_or("-"),
            since(b.voted_ms, r.created_ms),
            since(b.acked_ms, r.created_ms),
        );
        if let Some(reason) = &b.reason {
            s += &format!("  reason: {reason}");
        }
        s += "\n";
    }
    s
}
