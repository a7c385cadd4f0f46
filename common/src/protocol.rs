//! The messages redtx sends over Redis Streams, and their wire format.
//!
//! Every stream entry has two fields: `t`, the message type in plain text (readable in
//! `redis-cli`), and `m`, a MessagePack map (field names as keys) holding `v` (the protocol
//! version, [`PROTOCOL_VERSION`]) and the message's own fields. `docs/protocol.md` is the
//! language-neutral description.
//!
//! | `t`       | stream                | from         | struct      |
//! |-----------|-----------------------|--------------|-------------|
//! | `submit`  | `rtx:coord:{0}`       | producer     | [`Submit`]  |
//! | `vote`    | `rtx:coord:{0}`       | participant  | [`Vote`]    |
//! | `ack`     | `rtx:coord:{0}`       | participant  | [`Ack`]     |
//! | `prepare` | `rtx:part:<name>:{0}` | coordinator  | [`Prepare`] |
//! | `commit`  | `rtx:part:<name>:{0}` | coordinator  | [`Resolve`] |
//! | `abort`   | `rtx:part:<name>:{0}` | coordinator  | [`Resolve`] |

use crate::spec::{Op, TxnSpec};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Version written in every envelope; a reader refuses versions it does not know.
pub const PROTOCOL_VERSION: u32 = 1;

/// A producer asks for a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submit {
    /// The validated spec (its `id` is the transaction id).
    pub spec: TxnSpec,
    /// When the producer submitted it (ms since the epoch).
    pub submitted_ms: u64,
}

/// The coordinator asks a participant to prepare its branch.
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
    /// The branch's ops.
    pub ops: Vec<Op>,
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

/// The coordinator's decision for one branch (sent as `commit` or `abort`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolve {
    /// Transaction id.
    pub txn: String,
    /// Branch index.
    pub branch: u32,
    /// Participant name.
    pub participant: String,
    /// The branch's keys (declared to the Lua script, which may only touch declared keys).
    pub keys: Vec<String>,
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

/// A participant confirms it applied a decision.
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
        }
    }

    /// The two stream fields of this message, ready for `XADD key * t <kind> m <payload>`.
    pub fn fields(&self) -> [(&'static str, Vec<u8>); 2] {
        [("t", self.kind().as_bytes().to_vec()), ("m", self.encode())]
    }

    /// Decodes the `t` and `m` fields of a stream entry.
    pub fn decode(kind: &[u8], payload: &[u8]) -> Result<Message, DecodeError> {
        fn dec<T: DeserializeOwned>(kind: &'static str, payload: &[u8]) -> Result<T, DecodeError> {
            let bad = |e: rmp_serde::decode::Error| DecodeError::Payload { kind, detail: e.to_string() };
            let v: VersionOnly = rmp_serde::from_slice(payload).map_err(bad)?;
            if v.v != PROTOCOL_VERSION {
                return Err(DecodeError::Version(v.v));
            }
            rmp_serde::from_slice(payload).map_err(bad)
        }
        Ok(match kind {
            b"submit" => Message::Submit(dec("submit", payload)?),
            b"prepare" => Message::Prepare(dec("prepare", payload)?),
            b"vote" => Message::Vote(dec("vote", payload)?),
            b"commit" => Message::Commit(dec("commit", payload)?),
            b"abort" => Message::Abort(dec("abort", payload)?),
            b"ack" => Message::Ack(dec("ack", payload)?),
            other => return Err(DecodeError::UnknownType(String::from_utf8_lossy(other).into_owned())),
        })
    }

    /// Decodes a stream entry given as its field map (as returned by `XREADGROUP`).
    pub fn from_entry(map: &std::collections::HashMap<String, redis::Value>) -> Result<Message, DecodeError> {
        let field = |name: &'static str| match map.get(name) {
            Some(redis::Value::BulkString(b)) => Ok(b.as_slice()),
            Some(redis::Value::SimpleString(s)) => Ok(s.as_bytes()),
            _ => Err(DecodeError::MissingField(name)),
        };
        Message::decode(field("t")?, field("m")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::*;
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = Op> {
        let s = ".{0,12}";
        prop_oneof![
            (s, s).prop_map(|(key, value)| Op::Set(SetOp { key, value })),
            s.prop_map(|key| Op::Del(DelOp { key })),
            (s, any::<i64>(), any::<Option<i64>>(), any::<Option<i64>>())
                .prop_map(|(key, by, min, max)| Op::Incrby(IncrbyOp { key, by, min, max })),
            (s, s, s).prop_map(|(key, field, value)| Op::Hset(HsetOp { key, field, value })),
            (s, s).prop_map(|(key, field)| Op::Hdel(HdelOp { key, field })),
            (s, s, any::<i64>(), any::<Option<i64>>()).prop_map(|(key, field, by, min)| Op::Hincrby(HincrbyOp {
                key,
                field,
                by,
                min,
                max: None
            })),
            (s, proptest::option::of(s)).prop_map(|(key, value)| Op::Expect(ExpectOp { key, value })),
        ]
    }

    fn message() -> impl Strategy<Value = Message> {
        let s = "[a-z0-9]{1,10}";
        prop_oneof![
            (
                s,
                proptest::collection::vec((s, proptest::collection::vec(op(), 1..4)), 1..4),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(id, branches, timeout_ms, submitted_ms)| Message::Submit(Submit {
                    spec: TxnSpec {
                        id,
                        mode: Mode::TwoPhase,
                        timeout_ms,
                        branches: branches.into_iter().map(|(participant, ops)| Branch { participant, ops }).collect(),
                    },
                    submitted_ms,
                })),
            (s, any::<u32>(), s, any::<u64>(), proptest::collection::vec(op(), 0..4)).prop_map(
                |(txn, branch, participant, deadline_ms, ops)| Message::Prepare(Prepare {
                    txn,
                    branch,
                    participant,
                    deadline_ms,
                    ops
                })
            ),
            (s, any::<u32>(), s, any::<bool>(), proptest::option::of(".*")).prop_map(
                |(txn, branch, participant, yes, reason)| Message::Vote(Vote { txn, branch, participant, yes, reason })
            ),
            (s, any::<u32>(), s, proptest::collection::vec(".*", 0..3)).prop_map(|(txn, branch, participant, keys)| {
                Message::Commit(Resolve { txn, branch, participant, keys })
            }),
            (s, any::<u32>(), s, proptest::collection::vec(".*", 0..3)).prop_map(|(txn, branch, participant, keys)| {
                Message::Abort(Resolve { txn, branch, participant, keys })
            }),
            (s, any::<u32>(), s, any::<bool>()).prop_map(|(txn, branch, participant, c)| Message::Ack(Ack {
                txn,
                branch,
                participant,
                outcome: if c { Outcome::Committed } else { Outcome::Aborted }
            })),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(m in message()) {
            let decoded = Message::decode(m.kind().as_bytes(), &m.encode()).unwrap();
            prop_assert_eq!(decoded, m);
        }

        #[test]
        fn garbage_never_panics(kind in prop_oneof![Just("submit".to_string()), Just("prepare".to_string()), Just("vote".to_string()), Just("ack".to_string()), ".*"],
                                payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Message::decode(kind.as_bytes(), &payload);
        }
    }

    #[test]
    fn unknown_versions_and_types_are_refused() {
        let m = Message::Ack(Ack { txn: "t".into(), branch: 0, participant: "p".into(), outcome: Outcome::Committed });
        let v2 = rmp_serde::to_vec_named(&VersionOnly { v: 2 }).unwrap();
        assert_eq!(Message::decode(b"ack", &v2), Err(DecodeError::Version(2)));
        assert!(matches!(Message::decode(b"nope", &m.encode()), Err(DecodeError::UnknownType(t)) if t == "nope"));
        assert!(matches!(Message::decode(b"vote", &m.encode()), Err(DecodeError::Payload { kind: "vote", .. })));
    }
}
