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

use serde::{Deserialize, Deserializer, Serialize};
use std::time::Duration;

/// Largest JSON spec accepted, in bytes.
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;
/// Most branches (participants) in one transaction.
pub const MAX_BRANCHES: usize = 16;
/// Most ops in one branch.
pub const MAX_OPS_PER_BRANCH: usize = 128;
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
/// Timeout used when the spec names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
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
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
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
}

impl Mode {
    /// The name used on the wire and in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::TwoPhase => "2pc",
        }
    }
}

/// One change (or guard) applied by the built-in key-value participant. On the wire and in JSON
/// an op is one map whose `op` field names the variant, e.g.
/// `{"op":"incrby","key":"acct:alice","by":-10,"min":0}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// `SET key value`.
    Set(SetOp),
    /// `DEL key`.
    Del(DelOp),
    /// `INCRBY key by`, refused (vote no) if the result would leave `[min, max]`.
    Incrby(IncrbyOp),
    /// `HSET key field value`.
    Hset(HsetOp),
    /// `HDEL key field`.
    Hdel(HdelOp),
    /// `HINCRBY key field by`, refused if the result would leave `[min, max]`.
    Hincrby(HincrbyOp),
    /// Guard only: the string at `key` must equal `value`; `null` means the key must not exist.
    Expect(ExpectOp),
}

/// Fields of [`Op::Set`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetOp {
    pub key: String,
    pub value: String,
}

/// Fields of [`Op::Del`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelOp {
    pub key: String,
}

/// Fields of [`Op::Incrby`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncrbyOp {
    pub key: String,
    pub by: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
}

/// Fields of [`Op::Hset`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsetOp {
    pub key: String,
    pub field: String,
    pub value: String,
}

/// Fields of [`Op::Hdel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HdelOp {
    pub key: String,
    pub field: String,
}

/// Fields of [`Op::Hincrby`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HincrbyOp {
    pub key: String,
    pub field: String,
    pub by: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
}

/// Fields of [`Op::Expect`]. `value` must be present; `null` means "the key must not exist".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectOp {
    pub key: String,
    #[serde(deserialize_with = "present_nullable")]
    pub value: Option<String>,
}

/// Accepts `null` or a string, but (unlike a plain `Option`) insists that the field is present.
fn present_nullable<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
}

/// Names of the ops, as written in specs.
pub const OP_NAMES: [&str; 7] = ["set", "del", "incrby", "hset", "hdel", "hincrby", "expect"];

impl Op {
    /// Shorthand for an unbounded [`Op::Incrby`].
    pub fn incrby(key: impl Into<String>, by: i64) -> Op {
        Op::Incrby(IncrbyOp { key: key.into(), by, min: None, max: None })
    }

    /// Shorthand for [`Op::Set`].
    pub fn set(key: impl Into<String>, value: impl Into<String>) -> Op {
        Op::Set(SetOp { key: key.into(), value: value.into() })
    }

    /// Parses one op from JSON, naming the failing field precisely (`by`, not just the op).
    fn from_json_value(mut v: serde_json::Value, path: &str) -> Result<Op, SpecError> {
        let obj = v
            .as_object_mut()
            .ok_or_else(|| SpecError::new(path, "an op must be an object like {\"op\": \"set\", ...}"))?;
        let tag = match obj.remove("op") {
            Some(serde_json::Value::String(t)) => t,
            Some(other) => {
                return Err(SpecError::new(format!("{path}.op"), format!("expected an op name, got {other}")))
            }
            None => return Err(SpecError::new(path, format!("missing field `op` (one of {})", OP_NAMES.join(", ")))),
        };
        fn fields<T: serde::de::DeserializeOwned>(v: serde_json::Value, path: &str) -> Result<T, SpecError> {
            serde_path_to_error::deserialize(v).map_err(|e| {
                let p = e.path().to_string();
                let field = if p == "." { path.to_string() } else { format!("{path}.{p}") };
                SpecError::new(field, e.into_inner().to_string())
            })
        }
        Ok(match tag.as_str() {
            "set" => Op::Set(fields(v, path)?),
            "del" => Op::Del(fields(v, path)?),
            "incrby" => Op::Incrby(fields(v, path)?),
            "hset" => Op::Hset(fields(v, path)?),
            "hdel" => Op::Hdel(fields(v, path)?),
            "hincrby" => Op::Hincrby(fields(v, path)?),
            "expect" => Op::Expect(fields(v, path)?),
            other => {
                return Err(SpecError::new(
                    format!("{path}.op"),
                    format!("unknown op {other:?}; known ops: {}", OP_NAMES.join(", ")),
                ))
            }
        })
    }
}

impl Op {
    /// The key this op reads or writes.
    pub fn key(&self) -> &str {
        match self {
            Op::Set(SetOp { key, .. })
            | Op::Del(DelOp { key })
            | Op::Incrby(IncrbyOp { key, .. })
            | Op::Hset(HsetOp { key, .. })
            | Op::Hdel(HdelOp { key, .. })
            | Op::Hincrby(HincrbyOp { key, .. })
            | Op::Expect(ExpectOp { key, .. }) => key,
        }
    }

    /// The op's name as written in specs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Set(_) => "set",
            Op::Del(_) => "del",
            Op::Incrby(_) => "incrby",
            Op::Hset(_) => "hset",
            Op::Hdel(_) => "hdel",
            Op::Hincrby(_) => "hincrby",
            Op::Expect(_) => "expect",
        }
    }

    fn validate(&self, path: &str) -> Result<(), SpecError> {
        check_key(&format!("{path}.key"), self.key())?;
        match self {
            Op::Set(SetOp { value, .. }) | Op::Hset(HsetOp { value, .. }) => {
                check_value(&format!("{path}.value"), value)?
            }
            Op::Expect(ExpectOp { value: Some(v), .. }) => check_value(&format!("{path}.value"), v)?,
            _ => {}
        }
        match self {
            Op::Hset(HsetOp { field, .. }) | Op::Hdel(HdelOp { field, .. }) | Op::Hincrby(HincrbyOp { field, .. }) => {
                check_len(&format!("{path}.field"), field, MAX_KEY_BYTES)?
            }
            _ => {}
        }
        if let Op::Incrby(IncrbyOp { min: Some(lo), max: Some(hi), .. })
        | Op::Hincrby(HincrbyOp { min: Some(lo), max: Some(hi), .. }) = self
        {
            if lo > hi {
                return Err(SpecError::new(format!("{path}.min"), format!("min {lo} is above max {hi}")));
            }
        }
        Ok(())
    }
}

/// The part of a transaction one participant carries out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Branch {
    /// Name of the participant (its consumer group and stream), e.g. `bank-a`.
    pub participant: String,
    /// The ops, applied in order, all or none.
    pub ops: Vec<Op>,
}

impl Branch {
    /// The distinct keys of this branch, in first-use order (the keys its Lua scripts declare).
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::with_capacity(self.ops.len());
        for op in &self.ops {
            if !keys.iter().any(|k| k == op.key()) {
                keys.push(op.key().to_string());
            }
        }
        keys
    }
}

/// A validated transaction: what travels in a `Submit` message and is stored in the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnSpec {
    /// The transaction id; resubmitting the same id never creates a second transaction.
    pub id: String,
    /// How it is carried out.
    pub mode: Mode,
    /// How long participants have to vote before the transaction aborts, in milliseconds.
    pub timeout_ms: u64,
    /// One branch per participant.
    pub branches: Vec<Branch>,
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
    branches: Vec<BranchJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BranchJson {
    participant: String,
    ops: Vec<serde_json::Value>,
}

impl TxnSpec {
    /// Builds a spec in Rust: a fresh id, 2PC, the default timeout. Call [`TxnSpec::validate`]
    /// (the [`Client`](crate::Client) does) before submitting.
    pub fn new(branches: Vec<Branch>) -> Self {
        TxnSpec { id: new_txn_id(), mode: Mode::TwoPhase, timeout_ms: DEFAULT_TIMEOUT.as_millis() as u64, branches }
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
            Some(other) => return Err(SpecError::new("mode", format!("unknown mode {other:?}; supported: \"2pc\""))),
        };
        let timeout_ms = match raw.timeout {
            None => DEFAULT_TIMEOUT.as_millis() as u64,
            Some(t) => humantime::parse_duration(&t)
                .map_err(|e| {
                    SpecError::new("timeout", format!("{t:?} is not a duration ({e}); write e.g. \"250ms\" or \"5s\""))
                })?
                .as_millis() as u64,
        };
        let mut branches = Vec::with_capacity(raw.branches.len());
        for (i, b) in raw.branches.into_iter().enumerate() {
            let ops = b
                .ops
                .into_iter()
                .enumerate()
                .map(|(k, v)| Op::from_json_value(v, &format!("branches[{i}].ops[{k}]")))
                .collect::<Result<Vec<_>, _>>()?;
            branches.push(Branch { participant: b.participant, ops });
        }
        let spec = TxnSpec { id: raw.id.unwrap_or_else(new_txn_id), mode, timeout_ms, branches };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every limit and rule; the first problem found is returned.
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
        if self.branches.is_empty() {
            return Err(SpecError::new("branches", "a transaction needs at least one branch"));
        }
        if self.branches.len() > MAX_BRANCHES {
            return Err(SpecError::new(
                "branches",
                format!("{} branches, above the limit of {MAX_BRANCHES}", self.branches.len()),
            ));
        }
        for (i, b) in self.branches.iter().enumerate() {
            let path = format!("branches[{i}]");
            check_participant(&format!("{path}.participant"), &b.participant)?;
            if let Some(j) = self.branches[..i].iter().position(|o| o.participant == b.participant) {
                return Err(SpecError::new(
                    format!("{path}.participant"),
                    format!("participant {:?} already has branch {j}; put all its ops in one branch", b.participant),
                ));
            }
            if b.ops.is_empty() {
                return Err(SpecError::new(format!("{path}.ops"), "a branch needs at least one op"));
            }
            if b.ops.len() > MAX_OPS_PER_BRANCH {
                return Err(SpecError::new(
                    format!("{path}.ops"),
                    format!("{} ops, above the limit of {MAX_OPS_PER_BRANCH}", b.ops.len()),
                ));
            }
            for (k, op) in b.ops.iter().enumerate() {
                op.validate(&format!("{path}.ops[{k}]"))?;
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

fn check_key(field: &str, key: &str) -> Result<(), SpecError> {
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

fn check_value(field: &str, value: &str) -> Result<(), SpecError> {
    check_len(field, value, MAX_VALUE_BYTES)
}

fn check_len(field: &str, s: &str, max: usize) -> Result<(), SpecError> {
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
        assert_eq!(s.branches[1].ops[1], Op::Expect(ExpectOp { key: "x".into(), value: None }));
        assert_eq!(s.branches[1].keys(), vec!["acct:bob".to_string(), "x".to_string()]);
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
