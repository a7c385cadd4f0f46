//! Names of every Redis key and stream redtx uses. `docs/protocol.md` lists the same table.
//!
//! Streams and shared indexes carry the partition hash tag `{0}` so that, on Redis Cluster, a
//! partition's streams live in one slot. Per-transaction keys carry `{<txn id>}` so that the record
//! of a transaction is one slot on its own. Participant-side keys live in the participant's data
//! Redis.

/// The partition every stream uses today (one partition).
pub const PARTITION: &str = "0";

/// Consumer group of the coordinators on [`coord_stream`].
pub const COORD_GROUP: &str = "coordinators";

/// Stream read by coordinators: `submit`, `vote` and `ack` messages.
pub fn coord_stream() -> String {
    format!("rtx:coord:{{{PARTITION}}}")
}

/// Stream read by the participant named `name` (consumer group: the participant's name).
pub fn participant_stream(name: &str) -> String {
    format!("rtx:part:{name}:{{{PARTITION}}}")
}

/// Dead-letter stream for entries that could not be decoded or handled.
pub fn dead_letter_stream() -> String {
    format!("rtx:dead:{{{PARTITION}}}")
}

/// Counter hash of dead-lettered entries (field: the stream they came from).
pub fn dead_letter_counts() -> String {
    format!("rtx:dead:count:{{{PARTITION}}}")
}

/// Sorted set of unfinished transactions scored by the instant (ms) at which a coordinator must
/// look at them again (vote deadline, then re-send interval).
pub fn deadlines() -> String {
    format!("rtx:deadlines:{{{PARTITION}}}")
}

/// Stream where coordinators announce terminal transactions (fields `id`, `state`), read by
/// waiting producers. Capped by `MAXLEN ~`.
pub fn outcomes_stream() -> String {
    format!("rtx:outcomes:{{{PARTITION}}}")
}

/// The transaction record (hash) of `txn`.
pub fn txn_record(txn: &str) -> String {
    format!("rtx:txn:{{{txn}}}")
}

/// Participant side: the per-branch barrier (hash) of transaction `txn` at participant `name`;
/// holds the branch state, staged writes and the keys it locked.
pub fn barrier(name: &str, txn: &str) -> String {
    format!("rtx:bar:{name}:{txn}")
}

/// Participant side: the lock of a user key; its value is the owning barrier's key.
pub fn lock(key: &str) -> String {
    format!("rtx:lock:{key}")
}
