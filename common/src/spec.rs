//! The transaction spec: what a producer asks redtx to do, all-or-nothing.
//!
//! A spec arrives as JSON (CLI, other languages via `docs/protocol.md`) or is built in Rust. It is
//! validated completely before anything is enqueued; a [`SpecError`] names the offending field by
//! its path (e.g. `branches[1].ops[0].by`).
//!
//! ```
//! use redtx_common::spec::TxnSpec;
//! let spec = TxnSpec::from_json(br#"{"mode":"2pc","timeout":"5s","branches":[
//!   {"participant":"bank-a","ops":[{"op":"incrby","key":"acct:alice","by":-10,"min":0}]},
//!   {"participant":"bank-b","ops":[{"op":"incrby","key":"acct:bob","by":10}]}]}"#).unwrap();
//! assert_eq!(spec.branches.len(), 2);
//! ```

use crate::kv;
pub use crate::kv::{DelOp, ExpectOp, HdelOp, HincrbyOp, HsetOp, IncrbyOp, Op, SetOp, MAX_OPS_PER_BRANCH, OP_NAMES};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Largest JSON spec accepted, in bytes.
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;
/// Most branches (participants) in one transaction.
pub const MAX_BRANCHES: usize = 16;
/// Largest payload (or compensation) of one branch, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 512 * 1024;
/// Longest key, hash field or participant-visible string used as a name, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest value of a `set`/`hset`/`expect`, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Longest transaction id, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Longest participant name, in bytes.
pub const MAX_PARTICIPANT_BYTES: usize = 64;
/// Shortest and longest transaction timeout.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(10);
/// See [`MIN_TIMEOUT`].
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Timeout of a 2PC transaction that names none (the vote deadline).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of a saga that names none (the forward steps' deadline).
pub const DEFAULT_SAGA_TIMEOUT: Duration = Duration::from_secs(30);
/// Prefix of every key redtx itself owns; user keys may not start with it.
pub const RESERVED_PREFIX: &str = "rtx:";

/// A spec that failed validation: `field` is the path of the culprit, `problem` says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{problem}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct SpecError {
    /// Path of the offending field, e.g. `branches[0].ops[1].key`; empty for the whole spec.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl SpecError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        SpecError { field: field.into(), problem: problem.into() }
    }
}

/// How the transaction is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Mode {
    /// Two-phase commit: prepare (lock, check, stage) everywhere, then commit or abort everywhere.
    #[default]
    #[serde(rename = "2pc")]
    TwoPhase,
    /// Saga: each step commits locally, in order; a failed step compensates the ones that ran,
    /// in reverse order.
    #[serde(rename = "saga")]
    Saga,
}

impl Mode {
    /// The name used on the wire and in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::TwoPhase => "2pc",
            Mode::Saga => "saga",
        }
    }
}

/// The part of a transaction one participant carries out: in 2PC a branch, in a saga a step.
///
/// The coordinator routes, counts, decides and retries; it never reads `payload` or
/// `compensation`, which belong to the participant (for the built-in key-value participant, a
/// MessagePack list of [`Op`]s, see [`crate::kv`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    /// Name of the participant (its consumer group and stream), e.g. `bank-a`.
    pub participant: String,
    /// What the participant does: the 2PC branch, or the saga step's action.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Saga only: what undoes the action (sent with `compensate`).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub compensation: Option<Vec<u8>>,
    /// Saga only: the earlier steps this one waits for. `None`: the step before it (steps run in
    /// order); `Some(vec![])`: none (it starts at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<u32>>,
}

impl Branch {
    /// A 2PC branch of the built-in key-value participant.
    pub fn kv(participant: impl Into<String>, ops: Vec<Op>) -> Branch {
        Branch { participant: participant.into(), payload: kv::encode_ops(&ops), compensation: None, after: None }
    }

    /// A saga step of the built-in key-value participant.
    pub fn kv_step(participant: impl Into<String>, action: Vec<Op>, compensation: Vec<Op>) -> Branch {
        Branch {
            participant: participant.into(),
            payload: kv::encode_ops(&action),
            compensation: Some(kv::encode_ops(&compensation)),
            after: None,
        }
    }

    /// Sets the steps this saga step waits for.
    pub fn after(mut self, steps: Vec<u32>) -> Branch {
        self.after = Some(steps);
        self
    }

    /// The key-value ops of the payload, if it is one.
    pub fn ops(&self) -> Option<Vec<Op>> {
        rmp_serde::from_slice(&self.payload).ok()
    }
}

/// How a saga retries a step that failed for a transient reason (an error, or no answer in
/// time). On the wire each field may be omitted (its default applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Retry {
    /// Attempts of an action before the saga compensates; attempts of a compensation before it
    /// is marked `stuck` (it is still retried, slowly).
    pub limit: u32,
    /// Pause before the second attempt; doubles with every attempt (capped at 30 s).
    pub backoff_ms: u64,
    /// How long to wait for a step's result before counting the attempt as failed.
    pub step_timeout_ms: u64,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { limit: 5, backoff_ms: 100, step_timeout_ms: 2000 }
    }
}

/// A validated transaction: what travels in a `Submit` message and is stored in the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnSpec {
    /// The transaction id; resubmitting the same id never creates a second transaction.
    pub id: String,
    /// How it is carried out.
    pub mode: Mode,
    /// 2PC: how long participants have to vote before the transaction aborts. Saga: how long
    /// the forward steps may take before the saga compensates. Milliseconds.
    pub timeout_ms: u64,
    /// One branch (2PC) or step (saga) per participant.
    pub branches: Vec<Branch>,
    /// Saga retries (ignored by 2PC). Omitted or nil on the wire: the defaults.
    #[serde(default, deserialize_with = "nil_is_default")]
    pub retry: Retry,
}

/// A field that may be nil on the wire, meaning the same as omitted.
fn nil_is_default<'de, D: serde::Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The JSON form of a spec (`timeout` as a humantime string, `id` and `mode` optional).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecJson {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    branches: Option<Vec<BranchJson>>,
    #[serde(default)]
    steps: Option<Vec<BranchJson>>,
    #[serde(default)]
    retry: Option<RetryJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryJson {
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    backoff: Option<String>,
    #[serde(default)]
    step_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BranchJson {
    participant: String,
    #[serde(default)]
    ops: Option<serde_json::Value>,
    #[serde(default)]
    action: Option<serde_json::Value>,
    #[serde(default)]
    compensation: Option<serde_json::Value>,
    #[serde(default)]
    payload: Option<serde_json::Value>,
    #[serde(default)]
    compensation_payload: Option<serde_json::Value>,
    #[serde(default)]
    after: Option<Vec<u32>>,
}

fn duration_field(field: &str, t: &str) -> Result<u64, SpecError> {
    humantime::parse_duration(t)
        .map(|d| d.as_millis() as u64)
        .map_err(|e| SpecError::new(field, format!("{t:?} is not a duration ({e}); write e.g. \"250ms\" or \"5s\"")))
}

/// An opaque JSON payload as MessagePack.
fn opaque(v: &serde_json::Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("JSON values always serialize")
}

impl BranchJson {
    fn into_branch(self, mode: Mode, path: &str) -> Result<Branch, SpecError> {
        let unexpected = |name: &str, mode: Mode| {
            SpecError::new(format!("{path}.{name}"), format!("not a field of a {} branch", mode.as_str()))
        };
        let (payload, compensation) = match mode {
            Mode::TwoPhase => {
                for (name, present) in [
                    ("action", self.action.is_some()),
                    ("compensation", self.compensation.is_some()),
                    ("compensation_payload", self.compensation_payload.is_some()),
                    ("after", self.after.is_some()),
                ] {
                    if present {
                        return Err(unexpected(name, mode));
                    }
                }
                match (self.ops, self.payload) {
                    (Some(ops), None) => (kv::encode_ops(&kv::ops_from_json(ops, &format!("{path}.ops"))?), None),
                    (None, Some(p)) => (opaque(&p), None),
                    (Some(_), Some(_)) => {
                        return Err(SpecError::new(path, "give either `ops` (key-value) or `payload`, not both"))
                    }
                    (None, None) => {
                        return Err(SpecError::new(path, "missing field `ops` (or `payload` for your own participant)"))
                    }
                }
            }
            Mode::Saga => {
                if self.ops.is_some() {
                    return Err(SpecError::new(
                        format!("{path}.ops"),
                        "a saga step has `action` and `compensation` instead of `ops`",
                    ));
                }
                match (self.action, self.compensation, self.payload, self.compensation_payload) {
                    (Some(a), c, None, None) => {
                        let action = kv::ops_from_json(a, &format!("{path}.action"))?;
                        let comp = match c {
                            Some(c) => kv::ops_from_json(c, &format!("{path}.compensation"))?,
                            None => {
                                return Err(SpecError::new(
                                    path,
                                    "missing field `compensation` (the ops that undo the action)",
                                ))
                            }
                        };
                        (kv::encode_ops(&action), Some(kv::encode_ops(&comp)))
                    }
                    (None, None, Some(p), c) => (opaque(&p), Some(opaque(&c.unwrap_or(serde_json::Value::Null)))),
                    (None, None, None, _) => {
                        return Err(SpecError::new(
                            path,
                            "missing field `action` (or `payload` for your own participant)",
                        ))
                    }
                    _ => {
                        return Err(SpecError::new(
                            path,
                            "give either `action`/`compensation` (key-value) or `payload`/`compensation_payload`",
                        ))
                    }
                }
            }
        };
        Ok(Branch { participant: self.participant, payload, compensation, after: self.after })
    }
}

impl TxnSpec {
    /// Builds a 2PC spec in Rust: a fresh id, the default timeout. Call [`TxnSpec::validate`]
    /// (the [`Client`](crate::Client) does) before submitting.
    pub fn new(branches: Vec<Branch>) -> Self {
        TxnSpec {
            id: new_txn_id(),
            mode: Mode::TwoPhase,
            timeout_ms: DEFAULT_TIMEOUT.as_millis() as u64,
            branches,
            retry: Retry::default(),
        }
    }

    /// Builds a saga spec in Rust: steps run in order unless they name others in `after`.
    pub fn saga(steps: Vec<Branch>) -> Self {
        TxnSpec { mode: Mode::Saga, timeout_ms: DEFAULT_SAGA_TIMEOUT.as_millis() as u64, ..TxnSpec::new(steps) }
    }

    /// Sets the timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout_ms = timeout.as_millis() as u64;
        self
    }

    /// Sets the id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// The timeout as a [`Duration`].
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The steps saga step `i` waits for.
    pub fn deps(&self, i: usize) -> Vec<u32> {
        match &self.branches[i].after {
            Some(a) => a.clone(),
            None if i == 0 => Vec::new(),
            None => vec![i as u32 - 1],
        }
    }

    /// Parses and validates a JSON spec. Errors name the offending field.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SpecError> {
        if bytes.len() > MAX_SPEC_BYTES {
            return Err(SpecError::new(
                "",
                format!("spec is {} bytes, above the limit of {MAX_SPEC_BYTES}", bytes.len()),
            ));
        }
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let raw: SpecJson = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let field = if path == "." { String::new() } else { path };
            SpecError::new(field, clean_json_error(&inner))
        })?;
        let mode = match raw.mode.as_deref() {
            None | Some("2pc") => Mode::TwoPhase,
            Some("saga") => Mode::Saga,
            Some(other) => {
                return Err(SpecError::new("mode", format!("unknown mode {other:?}; supported: \"2pc\", \"saga\"")))
            }
        };
        let (list, name) = match (mode, raw.branches, raw.steps) {
            (Mode::TwoPhase, Some(b), None) => (b, "branches"),
            (Mode::Saga, None, Some(s)) => (s, "steps"),
            (Mode::TwoPhase, _, Some(_)) => {
                return Err(SpecError::new(
                    "steps",
                    "a 2pc transaction has `branches` (did you mean \"mode\": \"saga\"?)",
                ))
            }
            (Mode::Saga, Some(_), _) => return Err(SpecError::new("branches", "a saga has `steps`, not `branches`")),
            (Mode::TwoPhase, None, None) => return Err(SpecError::new("", "missing field `branches`")),
            (Mode::Saga, None, None) => return Err(SpecError::new("", "missing field `steps`")),
        };
        let timeout_ms = match raw.timeout {
            None if mode == Mode::Saga => DEFAULT_SAGA_TIMEOUT.as_millis() as u64,
            None => DEFAULT_TIMEOUT.as_millis() as u64,
            Some(t) => duration_field("timeout", &t)?,
        };
        let mut retry = Retry::default();
        if let Some(r) = raw.retry {
            if mode != Mode::Saga {
                return Err(SpecError::new("retry", "only a saga retries steps"));
            }
            retry.limit = r.limit.unwrap_or(retry.limit);
            if let Some(b) = r.backoff {
                retry.backoff_ms = duration_field("retry.backoff", &b)?;
            }
            if let Some(t) = r.step_timeout {
                retry.step_timeout_ms = duration_field("retry.step_timeout", &t)?;
            }
        }
        let branches = list
            .into_iter()
            .enumerate()
            .map(|(i, b)| b.into_branch(mode, &format!("{name}[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let spec = TxnSpec { id: raw.id.unwrap_or_else(new_txn_id), mode, timeout_ms, branches, retry };
        spec.validate()?;
        Ok(spec)
    }

    /// What branches are called in this spec's JSON (`branches` or `steps`).
    pub fn list_name(&self) -> &'static str {
        match self.mode {
            Mode::TwoPhase => "branches",
            Mode::Saga => "steps",
        }
    }

    /// Checks every limit and rule; the first problem found is returned. Payloads are opaque
    /// here (only their size is checked); key-value ops are checked when parsed from JSON and
    /// again by the participant.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_id("id", &self.id)?;
        let t = Duration::from_millis(self.timeout_ms);
        if t < MIN_TIMEOUT || t > MAX_TIMEOUT {
            return Err(SpecError::new(
                "timeout",
                format!(
                    "{} is outside the allowed range {}..={}",
                    humantime::format_duration(t),
                    humantime::format_duration(MIN_TIMEOUT),
                    humantime::format_duration(MAX_TIMEOUT)
                ),
            ));
        }
        let list = self.list_name();
        if self.branches.is_empty() {
            return Err(SpecError::new(list, format!("a transaction needs at least one entry in `{list}`")));
        }
        if self.branches.len() > MAX_BRANCHES {
            return Err(SpecError::new(
                list,
                format!("{} {list}, above the limit of {MAX_BRANCHES}", self.branches.len()),
            ));
        }
        if self.mode == Mode::Saga {
            if self.retry.limit == 0 || self.retry.limit > 100 {
                return Err(SpecError::new("retry.limit", format!("{} is outside 1..=100", self.retry.limit)));
            }
            let step_t = Duration::from_millis(self.retry.step_timeout_ms);
            if step_t < MIN_TIMEOUT || step_t > MAX_TIMEOUT {
                return Err(SpecError::new("retry.step_timeout", "must be between 10ms and 1h"));
            }
            if self.retry.backoff_ms > MAX_TIMEOUT.as_millis() as u64 {
                return Err(SpecError::new("retry.backoff", "must be at most 1h"));
            }
        }
        for (i, b) in self.branches.iter().enumerate() {
            let path = format!("{list}[{i}]");
            check_participant(&format!("{path}.participant"), &b.participant)?;
            if let Some(j) = self.branches[..i].iter().position(|o| o.participant == b.participant) {
                return Err(SpecError::new(
                    format!("{path}.participant"),
                    format!("participant {:?} already has {list}[{j}]; put all its work in one", b.participant),
                ));
            }
            for (name, p) in [("payload", Some(&b.payload)), ("compensation", b.compensation.as_ref())] {
                if p.is_some_and(|p| p.len() > MAX_PAYLOAD_BYTES) {
                    return Err(SpecError::new(
                        format!("{path}.{name}"),
                        format!("above the limit of {MAX_PAYLOAD_BYTES} bytes"),
                    ));
                }
            }
            match self.mode {
                Mode::TwoPhase => {
                    if b.compensation.is_some() || b.after.is_some() {
                        return Err(SpecError::new(path, "a 2pc branch has no compensation and no `after`"));
                    }
                }
                Mode::Saga => {
                    if b.compensation.is_none() {
                        return Err(SpecError::new(format!("{path}.compensation"), "a saga step needs a compensation"));
                    }
                    let deps = self.deps(i);
                    for (k, d) in deps.iter().enumerate() {
                        if *d as usize >= i {
                            return Err(SpecError::new(
                                format!("{path}.after[{k}]"),
                                format!("step {d} is not an earlier step; a step may only wait for earlier ones"),
                            ));
                        }
                        if deps[..k].contains(d) {
                            return Err(SpecError::new(
                                format!("{path}.after[{k}]"),
                                format!("step {d} is named twice"),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// A fresh, random transaction id.
pub fn new_txn_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Checks a transaction id: 1..=128 bytes of `A-Z a-z 0-9 - _ . :`.
pub fn check_id(field: &str, id: &str) -> Result<(), SpecError> {
    check_name(field, id, MAX_ID_BYTES, |c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

/// Checks a participant name: 1..=64 bytes of `A-Z a-z 0-9 - _ .`.
pub fn check_participant(field: &str, name: &str) -> Result<(), SpecError> {
    check_name(field, name, MAX_PARTICIPANT_BYTES, |c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn check_name(field: &str, s: &str, max: usize, ok: impl Fn(char) -> bool) -> Result<(), SpecError> {
    if s.is_empty() {
        return Err(SpecError::new(field, "must not be empty"));
    }
    check_len(field, s, max)?;
    if let Some(c) = s.chars().find(|c| !ok(*c)) {
        return Err(SpecError::new(
            field,
            format!("{s:?} contains {c:?}; allowed are letters, digits and - _ . (and : in ids)"),
        ));
    }
    Ok(())
}

pub(crate) fn check_key(field: &str, key: &str) -> Result<(), SpecError> {
    if key.is_empty() {
        return Err(SpecError::new(field, "must not be empty"));
    }
    check_len(field, key, MAX_KEY_BYTES)?;
    if key.starts_with(RESERVED_PREFIX) {
        return Err(SpecError::new(
            field,
            format!("{key:?} starts with {RESERVED_PREFIX:?}, which is reserved for redtx's own keys"),
        ));
    }
    Ok(())
}

pub(crate) fn check_value(field: &str, value: &str) -> Result<(), SpecError> {
    check_len(field, value, MAX_VALUE_BYTES)
}

pub(crate) fn check_len(field: &str, s: &str, max: usize) -> Result<(), SpecError> {
    if s.len() > max {
        return Err(SpecError::new(field, format!("{} bytes, above the limit of {max}", s.len())));
    }
    Ok(())
}

/// serde_json's message (with " at line L column C", which helps).
fn clean_json_error(e: &serde_json::Error) -> String {
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> SpecError {
        TxnSpec::from_json(json.as_bytes()).unwrap_err()
    }

    const OK: &str = r#"{"id":"t1","mode":"2pc","timeout":"5s","branches":[
        {"participant":"bank-a","ops":[{"op":"incrby","key":"acct:alice","by":-10,"min":0}]},
        {"participant":"bank-b","ops":[{"op":"incrby","key":"acct:bob","by":10},{"op":"expect","key":"x","value":null}]}]}"#;

    #[test]
    fn parses_the_documented_example() {
        let s = TxnSpec::from_json(OK.as_bytes()).unwrap();
        assert_eq!(s.id, "t1");
        assert_eq!(s.timeout_ms, 5000);
        let ops = s.branches[1].ops().unwrap();
        assert_eq!(ops[1], Op::Expect(ExpectOp { key: "x".into(), value: None }));
        assert_eq!(kv::keys_of(&ops), vec!["acct:bob".to_string(), "x".to_string()]);
    }

    #[test]
    fn parses_a_saga_with_parallel_steps_and_opaque_payloads() {
        let s = TxnSpec::from_json(
            br#"{"mode":"saga","timeout":"30s","retry":{"limit":3,"backoff":"50ms"},"steps":[
              {"participant":"orders","action":[{"op":"set","key":"order:7","value":"placed"}],
                                      "compensation":[{"op":"set","key":"order:7","value":"cancelled"}]},
              {"participant":"mail","payload":{"to":"u1"},"compensation_payload":null,"after":[]}]}"#,
        )
        .unwrap();
        assert_eq!((s.mode, s.retry.limit, s.retry.backoff_ms), (Mode::Saga, 3, 50));
        assert_eq!(s.deps(0), Vec::<u32>::new());
        assert_eq!(s.deps(1), Vec::<u32>::new());
        assert_eq!(s.branches[0].ops().unwrap()[0], Op::set("order:7", "placed"));
        let opaque: serde_json::Value = rmp_serde::from_slice(&s.branches[1].payload).unwrap();
        assert_eq!(opaque, serde_json::json!({"to": "u1"}));
    }

    #[test]
    fn a_missing_id_gets_a_fresh_one() {
        let a = TxnSpec::from_json(br#"{"branches":[{"participant":"p","ops":[{"op":"del","key":"k"}]}]}"#).unwrap();
        assert_eq!(a.id.len(), 32);
        assert_eq!(a.timeout_ms, DEFAULT_TIMEOUT.as_millis() as u64);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(err("{").problem.contains("EOF"));
        let e = err(r#"{"branches":[{"participant":"p","ops":[{"op":"frob","key":"k"}]}]}"#);
        assert_eq!(e.field, "branches[0].ops[0].op");
        assert!(e.problem.contains("unknown op \"frob\""), "{e}");
        let e = err(r#"{"branches":[{"participant":"p","ops":[{"op":"incrby","key":"k"}]}]}"#);
        assert!(e.to_string().contains("missing field `by`"), "{e}");
        let e = err(r#"{"branches":[{"participant":"p","ops":[{"op":"incrby","key":"k","by":"ten"}]}]}"#);
        assert_eq!(e.field, "branches[0].ops[0].by");
        let e = err(r#"{"branches":[{"participant":"p","ops":[{"op":"expect","key":"k"}]}]}"#);
        assert!(e.to_string().contains("missing field `value`"), "{e}");
        let e = err(r#"{"branches":[]}"#);
        assert_eq!(e.field, "branches");
        let e = err(r#"{"mode":"saga","steps":[{"participant":"p","action":[{"op":"del","key":"k"}]}]}"#);
        assert!(e.problem.contains("missing field `compensation`"), "{e}");
        let e = err(
            r#"{"mode":"saga","steps":[{"participant":"p","action":[{"op":"del","key":"k"}],"compensation":[{"op":"frob"}]}]}"#,
        );
        assert_eq!(e.field, "steps[0].compensation[0].op");
        let e = err(
            r#"{"mode":"saga","steps":[{"participant":"p","action":[{"op":"del","key":"k"}],"compensation":[{"op":"del","key":"k"}],"after":[0]}]}"#,
        );
        assert_eq!(e.field, "steps[0].after[0]");
        let e = err(r#"{"mode":"saga","branches":[]}"#);
        assert_eq!(e.field, "branches");
        let e = err(r#"{"steps":[]}"#);
        assert_eq!(e.field, "steps");
        let e = err(
            r#"{"branches":[{"participant":"p","ops":[{"op":"del","key":"k"}]},{"participant":"p","ops":[{"op":"del","key":"j"}]}]}"#,
        );
        assert_eq!(e.field, "branches[1].participant");
        let e = err(r#"{"timeout":"soon","branches":[{"participant":"p","ops":[{"op":"del","key":"k"}]}]}"#);
        assert_eq!(e.field, "timeout");
        let e = err(r#"{"mode":"3pc","branches":[{"participant":"p","ops":[{"op":"del","key":"k"}]}]}"#);
        assert_eq!(e.field, "mode");
        let e = err(r#"{"branches":[{"participant":"p q","ops":[{"op":"del","key":"k"}]}]}"#);
        assert_eq!(e.field, "branches[0].participant");
        let e = err(r#"{"branches":[{"participant":"p","ops":[{"op":"del","key":"rtx:lock:k"}]}]}"#);
        assert_eq!(e.field, "branches[0].ops[0].key");
        let e = err(r#"{"colour":"red","branches":[{"participant":"p","ops":[{"op":"del","key":"k"}]}]}"#);
        assert!(e.problem.contains("unknown field `colour`"), "{e}");
        let e = err(r#"{"branches":[{"participant":"p","ops":[{"op":"incrby","key":"k","by":1,"min":5,"max":1}]}]}"#);
        assert_eq!(e.field, "branches[0].ops[0].min");
    }

    #[test]
    fn oversized_specs_are_refused() {
        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        let e =
            err(&format!(r#"{{"branches":[{{"participant":"p","ops":[{{"op":"set","key":"k","value":"{big}"}}]}}]}}"#));
        assert_eq!(e.field, "branches[0].ops[0].value");
        let ops = vec![r#"{"op":"del","key":"k"}"#; MAX_OPS_PER_BRANCH + 1].join(",");
        let e = err(&format!(r#"{{"branches":[{{"participant":"p","ops":[{ops}]}}]}}"#));
        assert_eq!(e.field, "branches[0].ops");
        let branches: Vec<String> = (0..=MAX_BRANCHES)
            .map(|i| format!(r#"{{"participant":"p{i}","ops":[{{"op":"del","key":"k"}}]}}"#))
            .collect();
        let e = err(&format!(r#"{{"branches":[{}]}}"#, branches.join(",")));
        assert_eq!(e.field, "branches");
        let e = TxnSpec::from_json(&vec![b' '; MAX_SPEC_BYTES + 1]).unwrap_err();
        assert!(e.problem.contains("above the limit"));
    }
}
