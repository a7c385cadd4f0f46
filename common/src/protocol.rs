//! The messages redtx sends over Redis Streams, and their wire format.
//!
//! Every stream entry has two fields: `t`, the message type in plain text (readable in
//! `redis-cli`), and `m`, a MessagePack map (field names as keys) holding `v` (the protocol
//! version, [`PROTOCOL_VERSION`]) and the message's own fields. `docs/protocol.md` is the
//! language-neutral description. `{P}` is the transaction's partition ([`crate::keys::partition`]).
//!
//! | `t`          | stream                | from         | struct         |
//! |--------------|-----------------------|--------------|----------------|
//! | `submit`     | `rtx:coord:{P}`       | producer     | [`Submit`]     |
//! | `vote`       | `rtx:coord:{P}`       | participant  | [`Vote`]       |
//! | `ack`        | `rtx:coord:{P}`       | participant  | [`Ack`]        |
//! | `result`     | `rtx:coord:{P}`       | participant  | [`StepResult`] |
//! | `prepare`    | `rtx:part:<name>:{P}` | coordinator  | [`Prepare`]    |
//! | `commit`     | `rtx:part:<name>:{P}` | coordinator  | [`Resolve`]    |
//! | `abort`      | `rtx:part:<name>:{P}` | coordinator  | [`Resolve`]    |
//! | `execute`    | `rtx:part:<name>:{P}` | coordinator  | [`Execute`]    |
//! | `compensate` | `rtx:part:<name>:{P}` | coordinator  | [`Execute`]    |
//!
//! Payloads are opaque bytes to everyone but their participant.

use crate::spec::{Mode, TxnSpec};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_path_to_error::Segment;
use std::collections::HashMap;

/// Version written in every envelope; a reader refuses versions it does not know. Bumped when a
/// message changes in a way an older reader would misread. Version 2: opaque payloads,
/// partitions, saga messages.
pub const PROTOCOL_VERSION: u32 = 2;

/// A producer asks for a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submit {
    /// The validated spec (its `id` is the transaction id).
    pub spec: TxnSpec,
    /// When the producer submitted it (ms since the epoch); for latency figures and logs.
    pub submitted_ms: u64,
}

/// The coordinator asks a participant to prepare its 2PC branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    /// Transaction id.
    pub txn: String,
    /// Index of the branch in the spec.
    pub branch: u32,
    /// Participant name (must match the worker reading it).
    pub participant: String,
    /// After this instant (ms since the epoch) the participant votes no without locking anything.
    pub deadline_ms: u64,
    /// The branch's payload, for the participant alone.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// A participant's answer to a [`Prepare`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    /// Transaction id.
    pub txn: String,
    /// Branch index.
    pub branch: u32,
    /// Participant name.
    pub participant: String,
    /// `true`: prepared (locked, checked, staged); `false`: refused.
    pub yes: bool,
    /// Why it refused (e.g. `conflict`, `bank-a: acct:alice would be -20, below min 0`).
    #[serde(default)]
    pub reason: Option<String>,
}

/// The coordinator's decision for one 2PC branch (sent as `commit` or `abort`). The
/// participant knows from its barrier what the branch holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolve {
    /// Transaction id.
    pub txn: String,
    /// Branch index.
    pub branch: u32,
    /// Participant name.
    pub participant: String,
}

/// How a branch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The staged writes were applied.
    Committed,
    /// The staging was dropped (or never existed).
    Aborted,
}

impl Outcome {
    /// Name on the wire and in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::Aborted => "aborted",
        }
    }
}

/// A participant confirms it applied a 2PC decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Transaction id.
    pub txn: String,
    /// Branch index.
    pub branch: u32,
    /// Participant name.
    pub participant: String,
    /// What was applied.
    pub outcome: Outcome,
}

/// The coordinator asks a participant to run a saga step's action (`execute`) or its
/// compensation (`compensate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execute {
    /// Transaction id.
    pub txn: String,
    /// Step index.
    pub branch: u32,
    /// Participant name.
    pub participant: String,
    /// 1 for the first attempt; a retry carries the next number (informational: the barrier
    /// makes every attempt after the first that applied a no-op).
    pub attempt: u32,
    /// The action's or the compensation's payload.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// Which half of a saga step a [`StepResult`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    /// The forward action.
    Action,
    /// The compensation.
    Compensation,
}

/// How a saga step's half ended at the participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// Applied (or already applied before: a repeat), or a compensation with nothing to undo.
    Done,
    /// Refused for a business reason (a guard); nothing was applied. For an action, the saga
    /// compensates.
    Failed,
    /// Could not be done now (a transient error); the coordinator retries with backoff.
    Error,
    /// A compensation with nothing to undo: the action never ran here, or failed (a null
    /// compensation, recorded so that the action is refused if it arrives later).
    Skipped,
}

/// A participant reports on a saga step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepResult {
    /// Transaction id.
    pub txn: String,
    /// Step index.
    pub branch: u32,
    /// Participant name.
    pub participant: String,
    /// Action or compensation.
    pub step: StepKind,
    /// How it ended.
    pub status: StepStatus,
    /// Why it failed.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Producer -> coordinator.
    Submit(Submit),
    /// Coordinator -> participant.
    Prepare(Prepare),
    /// Participant -> coordinator.
    Vote(Vote),
    /// Coordinator -> participant.
    Commit(Resolve),
    /// Coordinator -> participant.
    Abort(Resolve),
    /// Participant -> coordinator.
    Ack(Ack),
    /// Coordinator -> participant (saga action).
    Execute(Execute),
    /// Coordinator -> participant (saga compensation).
    Compensate(Execute),
    /// Participant -> coordinator (saga step result).
    Result(StepResult),
}

/// Why a stream entry could not be turned into a [`Message`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The entry lacks field `t` or `m`.
    #[error("entry has no field {0:?}")]
    MissingField(&'static str),
    /// `t` is not a known message type.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// The envelope's version is not one this build understands.
    #[error("protocol version {0} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version(u32),
    /// `m` is not valid MessagePack for the type.
    #[error("bad {kind} payload: {detail}")]
    Payload { kind: &'static str, detail: String },
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    v: u32,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Serialize, Deserialize)]
struct VersionOnly {
    v: u32,
}

impl Message {
    /// The `t` field: the message type.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Submit(_) => "submit",
            Message::Prepare(_) => "prepare",
            Message::Vote(_) => "vote",
            Message::Commit(_) => "commit",
            Message::Abort(_) => "abort",
            Message::Ack(_) => "ack",
            Message::Execute(_) => "execute",
            Message::Compensate(_) => "compensate",
            Message::Result(_) => "result",
        }
    }

    /// The transaction this message is about.
    pub fn txn(&self) -> &str {
        match self {
            Message::Submit(m) => &m.spec.id,
            Message::Prepare(m) => &m.txn,
            Message::Vote(m) => &m.txn,
            Message::Commit(m) | Message::Abort(m) => &m.txn,
            Message::Ack(m) => &m.txn,
            Message::Execute(m) | Message::Compensate(m) => &m.txn,
            Message::Result(m) => &m.txn,
        }
    }

    /// The participant this message is to or from (`None` for `submit`).
    pub fn participant(&self) -> Option<&str> {
        match self {
            Message::Submit(_) => None,
            Message::Prepare(m) => Some(&m.participant),
            Message::Vote(m) => Some(&m.participant),
            Message::Commit(m) | Message::Abort(m) => Some(&m.participant),
            Message::Ack(m) => Some(&m.participant),
            Message::Execute(m) | Message::Compensate(m) => Some(&m.participant),
            Message::Result(m) => Some(&m.participant),
        }
    }

    /// The `m` field: the versioned MessagePack envelope.
    pub fn encode(&self) -> Vec<u8> {
        fn enc<T: Serialize>(body: &T) -> Vec<u8> {
            rmp_serde::to_vec_named(&EnvelopeOut { v: PROTOCOL_VERSION, body })
                .expect("protocol messages always serialize")
        }
        match self {
            Message::Submit(m) => enc(m),
            Message::Prepare(m) => enc(m),
            Message::Vote(m) => enc(m),
            Message::Commit(m) | Message::Abort(m) => enc(m),
            Message::Ack(m) => enc(m),
            Message::Execute(m) | Message::Compensate(m) => enc(m),
            Message::Result(m) => enc(m),
        }
    }

    /// The two stream fields of this message, ready for `XADD key * t <kind> m <payload>`.
    pub fn fields(&self) -> [(&'static str, Vec<u8>); 2] {
        [("t", self.kind().as_bytes().to_vec()), ("m", self.encode())]
    }

    /// Decodes the `t` and `m` fields of a stream entry. An error names the field at fault and
    /// what was expected (`field `spec.timeout_ms`: expected a MessagePack integer, got a
    /// string`): the producer may be written in any language.
    pub fn decode(kind: &[u8], payload: &[u8]) -> Result<Message, DecodeError> {
        fn dec<T: DeserializeOwned>(kind: &'static str, payload: &[u8]) -> Result<T, DecodeError> {
            // The common case, a well-formed message of this version, takes the plain decoder;
            // only a message that fails it is decoded again to name the field at fault.
            if let Ok(VersionOnly { v: PROTOCOL_VERSION }) = rmp_serde::from_slice::<VersionOnly>(payload) {
                if let Ok(m) = rmp_serde::from_slice::<T>(payload) {
                    return Ok(m);
                }
            }
            let bad = |detail: String| DecodeError::Payload { kind, detail };
            let v: VersionOnly = from_msgpack(payload).map_err(bad)?;
            if v.v != PROTOCOL_VERSION {
                return Err(DecodeError::Version(v.v));
            }
            from_msgpack(payload).map_err(bad)
        }
        Ok(match kind {
            b"submit" => Message::Submit(dec("submit", payload)?),
            b"prepare" => Message::Prepare(dec("prepare", payload)?),
            b"vote" => Message::Vote(dec("vote", payload)?),
            b"commit" => Message::Commit(dec("commit", payload)?),
            b"abort" => Message::Abort(dec("abort", payload)?),
            b"ack" => Message::Ack(dec("ack", payload)?),
            b"execute" => Message::Execute(dec("execute", payload)?),
            b"compensate" => Message::Compensate(dec("compensate", payload)?),
            b"result" => Message::Result(dec("result", payload)?),
            other => return Err(DecodeError::UnknownType(String::from_utf8_lossy(other).into_owned())),
        })
    }

    /// Decodes a stream entry given as its field map (as returned by `XREADGROUP`).
    pub fn from_entry(map: &HashMap<String, redis::Value>) -> Result<Message, DecodeError> {
        Message::decode(entry_field(map, "t")?, entry_field(map, "m")?)
    }
}

fn entry_field<'a>(map: &'a HashMap<String, redis::Value>, name: &'static str) -> Result<&'a [u8], DecodeError> {
    match map.get(name) {
        Some(redis::Value::BulkString(b)) => Ok(b.as_slice()),
        Some(redis::Value::SimpleString(s)) => Ok(s.as_bytes()),
        _ => Err(DecodeError::MissingField(name)),
    }
}

/// The `t` of an entry that carries several messages (a *batch entry*): its `m` is a
/// MessagePack array of `[t, m]` pairs, each the two fields a single entry would carry (`t` a
/// string, `m` binary). Coordinators and participants write one batch entry per destination
/// stream per batch, so that a stream entry (one `XADD`, one delivery, one `XACK`) is paid
/// per batch rather than per message; both read single and batch entries alike.
pub const BATCH: &str = "batch";

/// One message of a stream entry, as read: its `t` and `m` bytes, and what they decode to.
#[derive(Debug, Clone)]
pub struct Item {
    /// The message type, as written.
    pub kind: Vec<u8>,
    /// The MessagePack envelope, as written.
    pub bytes: Vec<u8>,
    /// The decoded message, or why it does not decode.
    pub msg: Result<Message, DecodeError>,
}

impl Item {
    /// The fields of a single entry carrying this item alone (for its dead letter).
    pub fn fields(&self) -> HashMap<String, redis::Value> {
        HashMap::from([
            ("t".to_string(), redis::Value::BulkString(self.kind.clone())),
            ("m".to_string(), redis::Value::BulkString(self.bytes.clone())),
        ])
    }
}

/// The fields of ONE entry carrying `msgs` (at least one): a single entry for one message, a
/// [`BATCH`] entry for more.
pub fn entry_fields(msgs: &[&Message]) -> [(&'static str, Vec<u8>); 2] {
    match msgs {
        [one] => one.fields(),
        _ => {
            let items: Vec<(&str, serde_bytes::ByteBuf)> =
                msgs.iter().map(|m| (m.kind(), serde_bytes::ByteBuf::from(m.encode()))).collect();
            let m = rmp_serde::to_vec(&items).expect("a batch always serializes");
            [("t", BATCH.as_bytes().to_vec()), ("m", m)]
        }
    }
}

/// Whether an entry is a [`BATCH`] entry.
pub fn is_batch_entry(map: &HashMap<String, redis::Value>) -> bool {
    entry_field(map, "t").is_ok_and(|t| t == BATCH.as_bytes())
}

/// The messages of a stream entry, single or [`BATCH`]: `Err` when the entry as a whole cannot
/// be read (no `t`/`m`, or a batch whose `m` is not an array of `[t, m]` pairs); otherwise one
/// [`Item`] per message, each decoded on its own, so one bad message never hides the others.
pub fn items_of_entry(map: &HashMap<String, redis::Value>) -> Result<Vec<Item>, DecodeError> {
    let kind = entry_field(map, "t")?;
    let bytes = entry_field(map, "m")?;
    if kind != BATCH.as_bytes() {
        let msg = Message::decode(kind, bytes);
        return Ok(vec![Item { kind: kind.to_vec(), bytes: bytes.to_vec(), msg }]);
    }
    let pairs: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)> = rmp_serde::from_slice(bytes)
        .map_err(|e| DecodeError::Payload { kind: BATCH, detail: format!("expected an array of [t, m] pairs: {e}") })?;
    Ok(pairs
        .into_iter()
        .map(|(k, m)| {
            let msg = Message::decode(&k, &m);
            Item { kind: k.into_vec(), bytes: m.into_vec(), msg }
        })
        .collect())
}

/// What can still be read of a `submit` entry that does not decode: `spec.id` (and `spec.mode`
/// when it is valid). The coordinator records the refusal under that id, so that the producer
/// waiting on it learns why; an entry without a readable id can only be dead-lettered.
pub fn submit_head(map: &HashMap<String, redis::Value>) -> Option<(String, Option<Mode>)> {
    #[derive(Deserialize)]
    struct Head<S> {
        spec: S,
    }
    #[derive(Deserialize)]
    struct IdMode {
        id: String,
        #[serde(default)]
        mode: Option<Mode>,
    }
    #[derive(Deserialize)]
    struct IdOnly {
        id: String,
    }
    if entry_field(map, "t").ok()? != b"submit" {
        return None;
    }
    let m = entry_field(map, "m").ok()?;
    // A bad `mode` must not hide the id: read the id alone then.
    match rmp_serde::from_slice::<Head<IdMode>>(m) {
        Ok(h) => Some((h.spec.id, h.spec.mode)),
        Err(_) => rmp_serde::from_slice::<Head<IdOnly>>(m).ok().map(|h| (h.spec.id, None)),
    }
}

/// Decodes MessagePack; the error names the field at fault by its path, and says what was
/// expected and what was found in MessagePack's terms.
fn from_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut de = rmp_serde::Deserializer::new(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path: Vec<String> = e
            .path()
            .iter()
            .filter_map(|s| match s {
                Segment::Map { key } => Some(key.clone()),
                Segment::Seq { index } => Some(format!("[{index}]")),
                Segment::Enum { .. } | Segment::Unknown => None,
            })
            .collect();
        explain(&path, e.into_inner())
    })
}

/// `field `<path>`: <what is wrong>`; the root (`m` itself) when the path is empty.
fn explain(path: &[String], e: rmp_serde::decode::Error) -> String {
    use rmp_serde::decode::Error as E;
    let join = |path: &[String]| {
        let mut s = String::new();
        for p in path {
            if !s.is_empty() && !p.starts_with('[') {
                s.push('.');
            }
            s.push_str(p);
        }
        if s.is_empty() {
            "m".to_string()
        } else {
            s
        }
    };
    let expected = expected_type(path);
    let what = match &e {
        E::TypeMismatch(marker) => format!("expected {expected}, got {}", marker_kind(marker)),
        E::Syntax(msg) => {
            if let Some(field) = msg.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`')) {
                let mut full = path.to_vec();
                full.push(field.to_string());
                return format!("field `{}`: missing (it is required)", join(&full));
            }
            match (msg.strip_prefix("invalid type: "), msg.strip_prefix("invalid value: ")) {
                (Some(rest), _) => format!("expected {expected}, got {}", found(rest)),
                (_, Some(rest)) => {
                    let range = match rest.rsplit(", expected ").next() {
                        Some("u32") => "an unsigned integer below 2^32",
                        Some("u64") => "an unsigned integer below 2^64",
                        _ => expected,
                    };
                    format!("expected {range}, got {}", found(rest))
                }
                _ => msg.clone(),
            }
        }
        // A struct sent as an array (rmp accepts that form) with the wrong number of elements.
        E::LengthMismatch(_) => format!("expected {expected}, got an array"),
        E::Utf8Error(_) => "not valid UTF-8 (every string must be UTF-8)".to_string(),
        E::InvalidMarkerRead(_) | E::InvalidDataRead(_) => "the MessagePack data ends early".to_string(),
        other => other.to_string(),
    };
    format!("field `{}`: {what}", join(path))
}

/// The MessagePack type of the field at `path` (the last name in it, or an array's element).
fn expected_type(path: &[String]) -> &'static str {
    let Some(last) = path.last() else { return "a MessagePack map" };
    let (name, element) = match last.strip_prefix('[') {
        Some(_) => (path.iter().rev().find(|p| !p.starts_with('[')).map_or("", String::as_str), true),
        None => (last.as_str(), false),
    };
    match (name, element) {
        ("after", true) => "a MessagePack integer",
        ("branches", true) => "a MessagePack map",
        ("after", false) => "a MessagePack array of integers",
        ("branches", false) => "a MessagePack array of maps",
        ("spec" | "retry", false) => "a MessagePack map",
        ("payload" | "compensation", false) => "MessagePack binary (or a string)",
        ("yes", false) => "a MessagePack boolean",
        (
            "v" | "submitted_ms" | "timeout_ms" | "limit" | "backoff_ms" | "step_timeout_ms" | "branch" | "deadline_ms"
            | "attempt",
            false,
        ) => "a MessagePack integer",
        ("id" | "mode" | "participant" | "txn" | "reason" | "outcome" | "step" | "status", false) => {
            "a MessagePack string"
        }
        _ => "another type",
    }
}

/// A MessagePack marker (from rmp's `Debug` name, e.g. `FixStr(1)`) as a type name.
fn marker_kind(marker: &impl std::fmt::Debug) -> &'static str {
    let name = format!("{marker:?}");
    let kinds: [(&[&str], &str); 9] = [
        (&["FixPos", "FixNeg", "U8", "U16", "U32", "U64", "I8", "I16", "I32", "I64"], "an integer"),
        (&["F32", "F64"], "a float"),
        (&["FixStr", "Str"], "a string"),
        (&["Bin"], "binary"),
        (&["FixArray", "Array"], "an array"),
        (&["FixMap", "Map"], "a map"),
        (&["Null"], "nil"),
        (&["True", "False"], "a boolean"),
        (&["FixExt", "Ext"], "an extension"),
    ];
    kinds
        .iter()
        .find(|(prefixes, _)| prefixes.iter().any(|p| name.starts_with(p)))
        .map_or("the reserved byte 0xc1", |(_, kind)| kind)
}

/// serde's "unexpected" (`string "2", expected u32`) as a MessagePack type name.
fn found(msg: &str) -> String {
    let got = msg.split(", expected").next().unwrap_or(msg);
    let word = [
        ("string", "a string"),
        ("integer", "an integer"),
        ("floating point", "a float"),
        ("unit value", "nil"),
        ("boolean", "a boolean"),
        ("byte array", "binary"),
        ("sequence", "an array"),
        ("map", "a map"),
    ]
    .iter()
    .find(|(prefix, _)| got.starts_with(prefix));
    match word {
        // Numbers are worth showing; strings may be long.
        Some((prefix, name)) if matches!(*prefix, "integer" | "floating point") => {
            format!("{name} {}", got[prefix.len()..].trim())
        }
        Some((_, name)) => name.to_string(),
        None => got.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::*;
    use proptest::prelude::*;

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..16)
    }

    fn message() -> impl Strategy<Value = Message> {
        let s = "[a-z0-9]{1,10}";
        prop_oneof![
            (
                s,
                proptest::collection::vec((s, bytes(), proptest::option::of(bytes())), 1..4),
                any::<u64>(),
                any::<u64>(),
                any::<bool>()
            )
                .prop_map(|(id, branches, timeout_ms, submitted_ms, saga)| Message::Submit(Submit {
                    spec: TxnSpec {
                        id,
                        mode: if saga { Mode::Saga } else { Mode::TwoPhase },
                        timeout_ms,
                        branches: branches
                            .into_iter()
                            .map(|(participant, payload, compensation)| Branch {
                                participant,
                                payload,
                                compensation,
                                after: saga.then(Vec::new)
                            })
                            .collect(),
                        retry: Retry::default(),
                    },
                    submitted_ms,
                })),
            (s, any::<u32>(), s, any::<u64>(), bytes()).prop_map(|(txn, branch, participant, deadline_ms, payload)| {
                Message::Prepare(Prepare { txn, branch, participant, deadline_ms, payload })
            }),
            (s, any::<u32>(), s, any::<bool>(), proptest::option::of(".*")).prop_map(
                |(txn, branch, participant, yes, reason)| Message::Vote(Vote { txn, branch, participant, yes, reason })
            ),
            (s, any::<u32>(), s).prop_map(|(txn, branch, participant)| Message::Commit(Resolve {
                txn,
                branch,
                participant
            })),
            (s, any::<u32>(), s).prop_map(|(txn, branch, participant)| Message::Abort(Resolve {
                txn,
                branch,
                participant
            })),
            (s, any::<u32>(), s, any::<bool>()).prop_map(|(txn, branch, participant, c)| Message::Ack(Ack {
                txn,
                branch,
                participant,
                outcome: if c { Outcome::Committed } else { Outcome::Aborted }
            })),
            (s, any::<u32>(), s, any::<u32>(), bytes(), any::<bool>()).prop_map(
                |(txn, branch, participant, attempt, payload, c)| {
                    let e = Execute { txn, branch, participant, attempt, payload };
                    if c {
                        Message::Compensate(e)
                    } else {
                        Message::Execute(e)
                    }
                }
            ),
            (s, any::<u32>(), s, any::<bool>(), 0..4u8, proptest::option::of(".*")).prop_map(
                |(txn, branch, participant, action, st, reason)| Message::Result(StepResult {
                    txn,
                    branch,
                    participant,
                    step: if action { StepKind::Action } else { StepKind::Compensation },
                    status: [StepStatus::Done, StepStatus::Failed, StepStatus::Error, StepStatus::Skipped][st as usize],
                    reason
                })
            ),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(m in message()) {
            let decoded = Message::decode(m.kind().as_bytes(), &m.encode()).unwrap();
            prop_assert_eq!(decoded, m);
        }

        #[test]
        fn batch_entries_round_trip(ms in proptest::collection::vec(message(), 1..6)) {
            let refs: Vec<&Message> = ms.iter().collect();
            let [(_, t), (_, m)] = entry_fields(&refs);
            prop_assert_eq!(t == BATCH.as_bytes(), ms.len() > 1);
            let map = HashMap::from([
                ("t".to_string(), redis::Value::BulkString(t)),
                ("m".to_string(), redis::Value::BulkString(m)),
            ]);
            let items = items_of_entry(&map).unwrap();
            let back: Vec<Message> = items.into_iter().map(|i| i.msg.unwrap()).collect();
            prop_assert_eq!(back, ms);
        }

        #[test]
        fn garbage_batches_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let map = HashMap::from([
                ("t".to_string(), redis::Value::BulkString(BATCH.as_bytes().to_vec())),
                ("m".to_string(), redis::Value::BulkString(payload)),
            ]);
            let _ = items_of_entry(&map);
        }

        #[test]
        fn garbage_never_panics(kind in prop_oneof![Just("submit".to_string()), Just("prepare".to_string()), Just("vote".to_string()), Just("ack".to_string()), Just("result".to_string()), ".*"],
                                payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Message::decode(kind.as_bytes(), &payload);
        }
    }

    #[test]
    fn a_bad_message_in_a_batch_spoils_only_itself() {
        let vote = Message::Vote(Vote { txn: "a".into(), branch: 0, participant: "p".into(), yes: true, reason: None });
        let pairs: Vec<(&str, serde_bytes::ByteBuf)> = vec![
            ("vote", serde_bytes::ByteBuf::from(vote.encode())),
            ("vote", serde_bytes::ByteBuf::from(vec![0xc1])),
            ("frobnicate", serde_bytes::ByteBuf::from(vote.encode())),
        ];
        let map = HashMap::from([
            ("t".to_string(), redis::Value::BulkString(b"batch".to_vec())),
            ("m".to_string(), redis::Value::BulkString(rmp_serde::to_vec(&pairs).unwrap())),
        ]);
        let items = items_of_entry(&map).unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].msg.as_ref().unwrap(), &vote);
        assert!(matches!(items[1].msg, Err(DecodeError::Payload { kind: "vote", .. })));
        assert_eq!(items[2].msg, Err(DecodeError::UnknownType("frobnicate".into())));
        assert_eq!(items[1].fields()["m"], redis::Value::BulkString(vec![0xc1]));
        let not_pairs = HashMap::from([
            ("t".to_string(), redis::Value::BulkString(b"batch".to_vec())),
            ("m".to_string(), redis::Value::BulkString(rmp_serde::to_vec(&[1, 2]).unwrap())),
        ]);
        let e = items_of_entry(&not_pairs).unwrap_err().to_string();
        assert!(e.contains("batch") && e.contains("[t, m] pairs"), "{e}");
    }

    /// A valid submit as a producer in another language would write it, as JSON to edit.
    fn submit_json() -> serde_json::Value {
        serde_json::json!({"v": 2, "submitted_ms": 1, "spec": {"id": "x", "mode": "saga", "timeout_ms": 1000,
            "branches": [{"participant": "a", "payload": "p", "compensation": "c"}]}})
    }

    fn decode_json(v: &serde_json::Value) -> Result<Message, DecodeError> {
        Message::decode(b"submit", &rmp_serde::to_vec_named(v).unwrap())
    }

    fn detail(v: &serde_json::Value) -> String {
        match decode_json(v) {
            Err(DecodeError::Payload { kind: "submit", detail }) => detail,
            other => panic!("expected a payload error, got {other:?}"),
        }
    }

    #[test]
    fn decode_errors_name_the_field_and_what_was_expected() {
        let mut m = submit_json();
        m["v"] = "2".into();
        assert_eq!(detail(&m), "field `v`: expected a MessagePack integer, got a string");
        assert_eq!(
            decode_json(&m).unwrap_err().to_string(),
            "bad submit payload: field `v`: expected a MessagePack integer, got a string"
        );
        let mut m = submit_json();
        m["spec"]["timeout_ms"] = "5s".into();
        assert_eq!(detail(&m), "field `spec.timeout_ms`: expected a MessagePack integer, got a string");
        let mut m = submit_json();
        m["spec"]["branches"][0]["participant"] = 5.into();
        assert_eq!(
            detail(&m),
            "field `spec.branches[0].participant`: expected a MessagePack string, got an integer `5`"
        );
        let mut m = submit_json();
        m["spec"]["branches"][0]["after"] = serde_json::json!([-1]);
        assert_eq!(
            detail(&m),
            "field `spec.branches[0].after[0]`: expected an unsigned integer below 2^32, got an integer `-1`"
        );
        let mut m = submit_json();
        m["spec"]["branches"][0]["payload"] = serde_json::json!({"a": 1});
        assert_eq!(
            detail(&m),
            "field `spec.branches[0].payload`: expected MessagePack binary (or a string), got a map"
        );
        let mut m = submit_json();
        m.as_object_mut().unwrap().remove("submitted_ms");
        assert_eq!(detail(&m), "field `submitted_ms`: missing (it is required)");
        let mut m = submit_json();
        m["spec"].as_object_mut().unwrap().remove("id");
        assert_eq!(detail(&m), "field `spec.id`: missing (it is required)");
        let mut m = submit_json();
        m["spec"]["mode"] = "3pc".into();
        assert!(detail(&m).starts_with("field `spec.mode`: unknown variant `3pc`"), "{}", detail(&m));
        assert_eq!(detail(&serde_json::json!("hello")), "field `m`: expected a MessagePack map, got a string");
        // Strings must be UTF-8.
        let mut bytes = rmp_serde::to_vec_named(&submit_json()).unwrap();
        let at = bytes.windows(2).position(|w| w == [0xa1, b'x']).unwrap();
        bytes[at + 1] = 0xff;
        assert!(matches!(Message::decode(b"submit", &bytes),
            Err(DecodeError::Payload { detail, .. }) if detail == "field `spec.id`: not valid UTF-8 (every string must be UTF-8)"));
    }

    #[test]
    fn unknown_fields_are_ignored_and_optional_ones_may_be_nil() {
        let mut m = submit_json();
        m["colour"] = "red".into();
        m["spec"]["colour"] = "red".into();
        m["spec"]["branches"][0]["colour"] = "red".into();
        m["spec"]["retry"] = serde_json::json!({"limit": 3, "colour": "red"});
        let Message::Submit(s) = decode_json(&m).unwrap() else { panic!() };
        assert_eq!(s.spec.retry, Retry { limit: 3, ..Retry::default() }, "omitted retry fields take their defaults");
        m["spec"]["retry"] = serde_json::Value::Null;
        m["spec"]["branches"][0]["after"] = serde_json::Value::Null;
        let Message::Submit(s) = decode_json(&m).unwrap() else { panic!() };
        assert_eq!((s.spec.retry, s.spec.branches[0].after.clone()), (Retry::default(), None));
    }

    #[test]
    fn the_id_of_a_submit_that_does_not_decode_can_still_be_read() {
        let entry = |t: &str, m: &serde_json::Value| {
            HashMap::from([
                ("t".to_string(), redis::Value::BulkString(t.as_bytes().to_vec())),
                ("m".to_string(), redis::Value::BulkString(rmp_serde::to_vec_named(m).unwrap())),
            ])
        };
        let mut m = submit_json();
        m["v"] = "2".into();
        assert_eq!(submit_head(&entry("submit", &m)), Some(("x".to_string(), Some(Mode::Saga))));
        m["spec"]["mode"] = "3pc".into();
        assert_eq!(submit_head(&entry("submit", &m)), Some(("x".to_string(), None)));
        m["spec"]["id"] = 7.into();
        assert_eq!(submit_head(&entry("submit", &m)), None);
        assert_eq!(submit_head(&entry("vote", &submit_json())), None);
    }

    #[test]
    fn unknown_versions_and_types_are_refused() {
        let m = Message::Ack(Ack { txn: "t".into(), branch: 0, participant: "p".into(), outcome: Outcome::Committed });
        let v1 = rmp_serde::to_vec_named(&VersionOnly { v: 1 }).unwrap();
        assert_eq!(Message::decode(b"ack", &v1), Err(DecodeError::Version(1)));
        assert!(matches!(Message::decode(b"nope", &m.encode()), Err(DecodeError::UnknownType(t)) if t == "nope"));
        assert!(matches!(Message::decode(b"vote", &m.encode()), Err(DecodeError::Payload { kind: "vote", .. })));
    }
}
