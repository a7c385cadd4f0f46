//! The built-in key-value participant's payload: a list of [`Op`]s.
//!
//! The coordinator never reads a branch's payload; for a branch of the built-in key-value
//! participant it is the MessagePack encoding of `Vec<Op>` ([`encode_ops`]). Producers validate
//! ops before enqueueing ([`validate_ops`]); the participant validates them again and votes no
//! (or fails the step) naming the field when they are bad.

use crate::spec::{check_key, check_len, check_value, SpecError, MAX_KEY_BYTES};
use serde::{Deserialize, Deserializer, Serialize};

/// Most ops in one branch (or one saga action or compensation).
pub const MAX_OPS_PER_BRANCH: usize = 128;

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
    pub fn from_json_value(mut v: serde_json::Value, path: &str) -> Result<Op, SpecError> {
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

    pub fn validate(&self, path: &str) -> Result<(), SpecError> {
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

/// Checks a list of ops (`path` names the list, e.g. `branches[0].ops`).
pub fn validate_ops(ops: &[Op], path: &str) -> Result<(), SpecError> {
    if ops.is_empty() {
        return Err(SpecError::new(path, "needs at least one op"));
    }
    if ops.len() > MAX_OPS_PER_BRANCH {
        return Err(SpecError::new(path, format!("{} ops, above the limit of {MAX_OPS_PER_BRANCH}", ops.len())));
    }
    for (k, op) in ops.iter().enumerate() {
        op.validate(&format!("{path}[{k}]"))?;
    }
    Ok(())
}

/// Parses a JSON array of ops (`path` names it), naming the failing field precisely.
pub fn ops_from_json(v: serde_json::Value, path: &str) -> Result<Vec<Op>, SpecError> {
    let serde_json::Value::Array(items) = v else {
        return Err(SpecError::new(path, "expected an array of ops like [{\"op\": \"set\", ...}]"));
    };
    let ops = items
        .into_iter()
        .enumerate()
        .map(|(k, v)| Op::from_json_value(v, &format!("{path}[{k}]")))
        .collect::<Result<Vec<_>, _>>()?;
    validate_ops(&ops, path)?;
    Ok(ops)
}

/// The payload of a key-value branch: `ops` as MessagePack.
pub fn encode_ops(ops: &[Op]) -> Vec<u8> {
    rmp_serde::to_vec_named(ops).expect("ops always serialize")
}

/// Reads a key-value payload back, checking every op (`path` prefixes the field in errors).
pub fn decode_ops(payload: &[u8], path: &str) -> Result<Vec<Op>, SpecError> {
    let ops: Vec<Op> = rmp_serde::from_slice(payload)
        .map_err(|e| SpecError::new(path, format!("not a list of key-value ops: {e}")))?;
    validate_ops(&ops, path)?;
    Ok(ops)
}

/// The distinct keys of `ops`, in first-use order (the keys the Lua scripts declare).
pub fn keys_of(ops: &[Op]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::with_capacity(ops.len());
    for op in ops {
        if !keys.iter().any(|k| k == op.key()) {
            keys.push(op.key().to_string());
        }
    }
    keys
}
