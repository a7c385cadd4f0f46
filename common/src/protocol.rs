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

use crate::spec::TxnSpec;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

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
            b"execute" => Message::Execute(dec("execute", payload)?),
            b"compensate" => Message::Compensate(dec("compensate", payload)?),
            b"result" => Message::Result(dec("result", payload)?),
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
        fn garbage_never_panics(kind in prop_oneof![Just("submit".to_string()), Just("prepare".to_string()), Just("vote".to_string()), Just("ack".to_string()), Just("result".to_string()), ".*"],
                                payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Message::decode(kind.as_bytes(), &payload);
        }
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
