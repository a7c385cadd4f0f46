//! How records and outcomes are shown: one JSON object (`--json`) or aligned text.

use redtx_common::machine::Phase;
use redtx_common::record::{TxnRecord, TxnState};
use serde_json::{json, Value};
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

/// What `redtx submit` knows when it exits, printed as one JSON object on every exit.
pub struct Outcome<'a> {
    /// The transaction id (empty when the spec could not be read).
    pub id: &'a str,
    /// The transaction is known to be enqueued (a submit was acknowledged, or its record exists).
    pub enqueued: bool,
    /// Its record, when it could be read.
    pub record: Option<&'a TxnRecord>,
    /// The state to show without a record: `submitted`, `unknown`, `invalid`, `error`.
    pub state: &'a str,
    /// Why (an error message), without a record.
    pub reason: Option<&'a str>,
    /// The id existed with another spec: the record is the first transaction's.
    pub spec_differs: bool,
}

impl Outcome<'_> {
    /// `{"id", "enqueued", "state", "reason", "failed_step", "branches": [{"participant",
    /// "phase", "attempts", "reason", "at_ms"}], "waiting_for", ...}` plus the record's
    /// timestamps when there is one.
    pub fn json(&self) -> String {
        let mut v = match self.record {
            Some(r) => record_value(r),
            None => json!({
                "id": self.id, "state": self.state, "reason": self.reason, "failed_step": null, "branches": [],
            }),
        };
        v["enqueued"] = json!(self.enqueued);
        if let Some(r) = self.record {
            v["waiting_for"] = json!(waiting_for(r).iter().map(|w| w.participant).collect::<Vec<_>>());
        }
        if self.spec_differs {
            v["spec_differs"] = json!(true);
        }
        v.to_string()
    }
}

/// A record as a JSON value: `id`, `mode`, `state`, `reason`, `failed_step`, timestamps (ms) and
/// `branches` (each with `participant`, `phase`, `reason`, `attempts`, `at_ms`).
fn record_value(r: &TxnRecord) -> Value {
    serde_json::to_value(r).expect("records serialize")
}

/// The record as one JSON object.
pub fn json(r: &TxnRecord) -> String {
    record_value(r).to_string()
}

/// `{"id":..,"state":..,"reason":..}` for a transaction whose record is not (yet) readable.
pub fn json_state(id: &str, state: &str, reason: Option<&str>) -> String {
    json!({ "id": id, "state": state, "reason": reason, "failed_step": null, "branches": [] }).to_string()
}

/// `step 2 (payment)`, or `branch 1 (bank-b)` in 2PC.
fn branch_name(r: &TxnRecord, i: usize) -> String {
    let what = if r.mode == "saga" { "step" } else { "branch" };
    match r.branches.get(i) {
        Some(b) => format!("{what} {i} ({})", b.participant),
        None => format!("{what} {i}"),
    }
}

/// One line: `<id> committed`, `<id> aborted: <reason>`, or for a saga
/// `<id> compensated: <reason> (failed step 1 (stock))`.
pub fn line(r: &TxnRecord) -> String {
    let mut s = format!("{} {}", r.id, r.state);
    if let Some(reason) = &r.reason {
        s += &format!(": {reason}");
    }
    if let Some(i) = r.failed_step {
        s += &format!(" (failed {})", branch_name(r, i as usize));
    }
    s
}

/// A branch or step an unsettled transaction still waits for, and what it waits for.
pub struct Waiting<'a> {
    pub index: usize,
    pub participant: &'a str,
    pub what: &'static str,
}

/// The branches (2PC) or steps (saga) the transaction still waits for in its current state: a
/// vote while preparing, an ack of the decision, a step's result, a compensation's result.
pub fn waiting_for(r: &TxnRecord) -> Vec<Waiting<'_>> {
    let wanted = |phase: Phase| -> Option<&'static str> {
        match r.state {
            TxnState::Preparing => (phase == Phase::Pending).then_some("a vote"),
            TxnState::Committing => (phase != Phase::Committed).then_some("the commit ack"),
            TxnState::Aborting => (phase != Phase::Aborted).then_some("the abort ack"),
            TxnState::Running => match phase {
                Phase::Running => Some("its action's result"),
                Phase::Pending => Some("earlier steps, then its action"),
                _ => None,
            },
            TxnState::Compensating | TxnState::Stuck => {
                (phase == Phase::Compensating).then_some("its compensation's result")
            }
            _ => None,
        }
    };
    r.branches
        .iter()
        .enumerate()
        .filter_map(|(index, b)| wanted(b.phase).map(|what| Waiting { index, participant: &b.participant, what }))
        .collect()
}

/// Where an unsettled transaction stands: its state and reason, and the branches or steps it
/// still waits for.
pub fn pending(r: &TxnRecord) -> String {
    let mut s = format!("{} is {}", r.id, r.state);
    if let Some(reason) = &r.reason {
        s += &format!(" ({reason})");
    }
    let waiting = waiting_for(r);
    if !waiting.is_empty() && !r.state.is_terminal() {
        let list: Vec<String> = waiting
            .iter()
            .map(|w| {
                let attempts = r.branches[w.index].attempts;
                let tries =
                    if r.mode == "saga" && attempts > 1 { format!(", attempt {attempts}") } else { String::new() };
                format!("{} for {}{tries}", branch_name(r, w.index), w.what)
            })
            .collect();
        s += &format!("; waiting on {}", list.join("; "));
    }
    s
}

/// The full record as aligned text: the transaction's fields, then one row per branch or step
/// (participant, phase, attempts, when it last changed, reason).
pub fn text(r: &TxnRecord) -> String {
    let saga = r.mode == "saga";
    let mut s = String::new();
    let mut field = |name: &str, value: String| s += &format!("{:<12} {value}\n", format!("{name}:"));
    field("id", r.id.clone());
    field("mode", r.mode.clone());
    field("state", r.state.to_string());
    field("reason", r.reason.clone().unwrap_or_else(|| "-".into()));
    if saga {
        field("failed step", r.failed_step.map_or("-".into(), |i| branch_name(r, i as usize)));
    }
    field("created", at(r.created_ms));
    field("deadline", since(Some(r.deadline_ms), r.created_ms));
    field(if saga { "compensated" } else { "decided" }, since(r.decided_ms, r.created_ms));
    field("finished", since(r.finished_ms, r.created_ms));
    let header = ["#", "participant", "phase", "attempts", "changed", "reason"];
    let rows: Vec<[String; 6]> = r
        .branches
        .iter()
        .enumerate()
        .map(|(i, b)| {
            [
                i.to_string(),
                b.participant.clone(),
                b.phase.as_str().to_string(),
                if saga { b.attempts.to_string() } else { "-".into() },
                since(b.at_ms, r.created_ms),
                b.reason.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    s += if saga { "steps:\n" } else { "branches:\n" };
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|row| row[c].len()).chain([header[c].len()]).max().unwrap_or(0))
        .collect();
    let header: [String; 6] = header.map(String::from);
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            // The reason goes last and is not padded.
            .map(|(c, (cell, w))| if c + 1 == row.len() { cell.clone() } else { format!("{cell:<w$}") })
            .collect();
        s += &format!("  {}\n", cells.join("  "));
    }
    s
}
