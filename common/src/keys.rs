//! Names of every Redis key and stream redtx uses, and the partition of a transaction.
//! `docs/protocol.md` lists the same table.
//!
//! Transactions are spread over `N` partitions (`--partitions`, the same for a whole
//! deployment) by [`partition`], a CRC-32 of the id. Every key of partition `P` carries the hash
//! tag `{P}`, so on Redis Cluster a partition is one slot: the coordinator owning it can write a
//! batch's records, messages and acks in one atomic script. Participant-side keys live in the
//! participant's data Redis.

/// Default number of partitions. Eight lets up to eight coordinators (or the masters of a
/// small Redis Cluster) share the work, while one coordinator or participant still reads every
/// partition's stream in one `XREADGROUP`; more partitions only add streams to read.
pub const DEFAULT_PARTITIONS: u32 = 8;

/// Most partitions a deployment may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// Consumer group of the coordinators on [`coord_stream`].
pub const COORD_GROUP: &str = "coordinators";

/// The partition of transaction `txn` among `partitions`: CRC-32 (IEEE, as zlib's `crc32`) of
/// the id's bytes, modulo the count.
pub fn partition(txn: &str, partitions: u32) -> u32 {
    crc32fast::hash(txn.as_bytes()) % partitions.max(1)
}

/// Stream read by the coordinator owning partition `p`: `submit`, `vote`, `ack`, `result`.
pub fn coord_stream(p: u32) -> String {
    format!("rtx:coord:{{{p}}}")
}

/// Stream of partition `p` read by the participant named `name` (consumer group: the
/// participant's name).
pub fn participant_stream(name: &str, p: u32) -> String {
    format!("rtx:part:{name}:{{{p}}}")
}

/// The partition a stream name of [`coord_stream`] or [`participant_stream`] belongs to.
pub fn partition_of_stream(stream: &str) -> Option<u32> {
    let open = stream.rfind('{')?;
    stream[open + 1..].strip_suffix('}')?.parse().ok()
}

/// Dead-letter stream of partition `p`, for entries that could not be decoded or handled.
pub fn dead_letter_stream(p: u32) -> String {
    format!("rtx:dead:{{{p}}}")
}

/// Counter hash of dead-lettered entries of partition `p` (field: the stream they came from).
pub fn dead_letter_counts(p: u32) -> String {
    format!("rtx:dead:count:{{{p}}}")
}

/// Stream where the owner of partition `p` announces decided and finished transactions
/// (fields `id`, `state`), read by waiting producers. Capped by `MAXLEN ~`.
pub fn outcomes_stream(p: u32) -> String {
    format!("rtx:outcomes:{{{p}}}")
}

/// The transaction record (hash) of `txn` in partition `p`.
pub fn txn_record(p: u32, txn: &str) -> String {
    format!("rtx:txn:{{{p}}}:{txn}")
}

/// Sorted set of the unfinished transactions of partition `p` (scored by creation time, ms):
/// what a new owner reloads.
pub fn live(p: u32) -> String {
    format!("rtx:live:{{{p}}}")
}

/// The lease of partition `p`: a string `<token>:<owner>` with a time to live; only the holder
/// may write the partition.
pub fn lease(p: u32) -> String {
    format!("rtx:lease:{{{p}}}")
}

/// The write counter of partition `p`: how many fenced writes its owners have applied. Each
/// write names the value it follows, so one stepped on top of an unapplied write is refused
/// (`lua/coordinator/fenced.lua`).
pub fn write_seq(p: u32) -> String {
    format!("rtx:wseq:{{{p}}}")
}

/// The fencing counter of partition `p`: every new lease takes the next token.
pub fn epoch(p: u32) -> String {
    format!("rtx:epoch:{{{p}}}")
}

/// Sorted set of live coordinators (scored by when their membership lapses, ms), used to
/// spread partitions evenly.
pub fn coordinators() -> String {
    "rtx:coordinators".to_string()
}

/// The protocol version the coordinators speak (a string holding
/// [`PROTOCOL_VERSION`](crate::protocol::PROTOCOL_VERSION)), set by every coordinator when it
/// starts: a producer in another language reads it to learn which version to send.
pub fn protocol() -> String {
    "rtx:protocol".to_string()
}

/// The work counters of coordinator `id` (a hash with a time to live, rewritten every few
/// seconds while it runs; see [`crate::stats`]).
pub fn coordinator_stats(id: &str) -> String {
    format!("rtx:stats:coordinator:{id}")
}

/// The work counters of instance `consumer` of participant `name` (see [`crate::stats`]).
pub fn participant_stats(name: &str, consumer: &str) -> String {
    format!("rtx:stats:participant:{name}:{consumer}")
}

/// `SCAN` pattern of every worker's stats hash.
pub const STATS_PATTERN: &str = "rtx:stats:*";

/// Participant side: the per-branch barrier (hash) of transaction `txn` at participant `name`.
pub fn barrier(name: &str, txn: &str) -> String {
    format!("rtx:bar:{name}:{txn}")
}

/// Participant side: the lock of a user key; its value names the owning branch.
pub fn lock(key: &str) -> String {
    format!("rtx:lock:{key}")
}

/// Participant side, data on a Redis Cluster: the *home* barrier (hash) of `participant`'s
/// branch of `txn`, in partition `p`'s slot (`rtx:bar:{P}:<participant>:<txn>`). Its place
/// follows from the transaction alone, so a commit or an abort, which carries no keys, finds it;
/// it records the branch's state and keys, and decides for the branch's slot groups
/// ([`group_barrier`]).
pub fn home_barrier(p: u32, participant: &str, txn: &str) -> String {
    format!("rtx:bar:{{{p}}}:{participant}:{txn}")
}

/// Participant side, data on a Redis Cluster: the barrier (hash) of the keys of `participant`'s
/// branch (or saga action) of `txn` that lie in slot `slot`, in that slot
/// (`rtx:grp:{<tag>}:<participant>:<txn>`, the tag from [`slot_tag`]).
pub fn group_barrier(slot: u16, participant: &str, txn: &str) -> String {
    format!("rtx:grp:{{{}}}:{participant}:{txn}", slot_tag(slot))
}

/// Participant side, data on a Redis Cluster: the barrier (hash) of a saga step's compensation,
/// in the slot `slot` of its keys (`rtx:undo:{<tag>}:<participant>:<txn>`).
pub fn undo_barrier(slot: u16, participant: &str, txn: &str) -> String {
    format!("rtx:undo:{{{}}}:{participant}:{txn}", slot_tag(slot))
}

/// Participant side, data on a Redis Cluster: the lock of a user key, in the key's own slot
/// whatever the key holds (`{`, `}`, a hash tag of its own): `rtx:lock:{<tag>}:<key>`, where
/// the tag is [`slot_tag`] of the key's slot. The lock's hash tag is the first `{...}` of its
/// name, so it is in the tag's slot, which is the key's.
pub fn cluster_lock(key: &str) -> String {
    format!("rtx:lock:{{{}}}:{key}", slot_tag(slot(key)))
}

/// A short hash tag whose slot is `slot` (below 16384): the decimal form of the smallest
/// non-negative integer `n` with `slot(n) == slot` (slot 0 is `"3560"`, the slot of `{7}` is
/// `"7"`). Every slot has one of at most six digits; the table is built once, on first use.
/// Another implementation finds the same tag by counting up from 0.
pub fn slot_tag(slot: u16) -> &'static str {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags: Vec<Option<String>> = vec![None; usize::from(SLOTS)];
        let (mut left, mut n) = (usize::from(SLOTS), 0u32);
        while left > 0 {
            let tag = n.to_string();
            let s = &mut tags[usize::from(crc16(tag.as_bytes()) % SLOTS)];
            if s.is_none() {
                *s = Some(tag);
                left -= 1;
            }
            n += 1;
        }
        tags.into_iter().map(|t| t.expect("every slot found")).collect()
    });
    &tags[usize::from(slot % SLOTS)]
}

/// Participant side: the image (state and barriers) of a service run by the participant SDK's
/// in-memory store, on its data Redis.
pub fn service_image(name: &str) -> String {
    format!("rtx:svc:{name}")
}

/// The deployment's identity: a random id set once (`SET NX`) in the stream Redis. A resource
/// that leaves traces outside Redis (PostgreSQL's prepared transactions) names them with it,
/// so it never touches another deployment's.
pub fn deployment() -> String {
    "rtx:deployment".to_string()
}

/// The Redis Cluster slot of `key`: CRC-16/XMODEM of its hash tag (the text between the first
/// `{` and the next `}`, when not empty) or of the whole key, modulo 16384. Every key of
/// partition `P` is in the slot of `{P}`.
pub fn slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let hashed = match b.iter().position(|&c| c == b'{') {
        Some(open) => match b[open + 1..].iter().position(|&c| c == b'}') {
            Some(len) if len > 0 => &b[open + 1..open + 1 + len],
            _ => b,
        },
        None => b,
    };
    crc16(hashed) % SLOTS
}

/// Slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// CRC-16/XMODEM, as Redis Cluster hashes keys.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The Redis Cluster slot of partition `p` (of every key carrying `{p}`).
pub fn partition_slot(p: u32) -> u16 {
    slot(&format!("{{{p}}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_in_range() {
        // The documented function is zlib's crc32: its standard check value.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(partition("123456789", 8), 0xCBF4_3926 % 8);
        for id in ["a", "transfer-42", "x:y"] {
            assert!(partition(id, 8) < 8);
            assert_eq!(partition(id, 1), 0);
        }
        assert_eq!(partition_of_stream(&participant_stream("bank-a", 7)), Some(7));
        assert_eq!(partition_of_stream(&coord_stream(12)), Some(12));
        assert_eq!(partition_of_stream("nope"), None);
    }

    #[test]
    fn slots_follow_redis_cluster() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot("123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
        assert_eq!(slot(&outcomes_stream(3)), partition_slot(3));
        assert_eq!(slot(&txn_record(3, "x{y}")), partition_slot(3));
    }

    #[test]
    fn every_slot_has_a_short_tag_in_that_slot() {
        let mut longest = 0;
        for s in 0..SLOTS {
            let tag = slot_tag(s);
            assert_eq!(slot(tag), s, "tag {tag:?}");
            assert_eq!(slot(&format!("{{{tag}}}")), s);
            longest = longest.max(tag.len());
        }
        assert!(longest <= 6, "longest tag: {longest} digits");
        assert_eq!(slot_tag(slot("0")), "0");
        assert_eq!(slot_tag(partition_slot(7)), "7");
        assert_eq!(slot_tag(0), "3560");
    }

    #[test]
    fn cluster_data_keys_share_their_groups_slot() {
        for key in ["a{b}c", "{}x", "x{", "}{", "{user1}.bal", "acct:0", "{{x}}", "rtx:lockish", "ä{ö}"] {
            let s = slot(key);
            assert_eq!(slot(&cluster_lock(key)), s, "lock of {key:?}");
            assert_eq!(slot(&group_barrier(s, "bank-a", "t-1")), s);
            assert_eq!(slot(&undo_barrier(s, "bank-a", "t:1")), s);
        }
        assert_eq!(slot(&home_barrier(5, "bank-a", "t-1")), partition_slot(5));
        assert_ne!(home_barrier(3, "p", "t"), group_barrier(partition_slot(3), "p", "t"));
    }
}
