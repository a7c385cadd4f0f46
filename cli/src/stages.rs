//! Where a transaction's time goes: `redtx bench` keeps, for a sample of the half load's
//! transactions, when each was submitted and when its producer saw the outcome, then reads their
//! records (created, decided and finished times, written by the coordinator) and splits the end
//! to end latency into stages:
//!
//! | stage | from | to | what it holds |
//! |---|---|---|---|
//! | `create` | submit | record created | the submit `XADD`, waiting for a coordinator round, the round |
//! | `prepare` | created | decided | the prepares out, the participants' rounds, the votes back, a coordinator round |
//! | `commit` | decided | finished | the decisions out, the participants' rounds, the acks back, a coordinator round |
//! | `run` | created | finished | a saga that completed: every step, one after the other |
//!
//! Only transactions that ended well (committed, completed) are split.
//! | `tell` | finished | outcome seen | the outcome entry read by the producer's reader |
//!
//! Times are wall-clock milliseconds of one machine (the bench's servers and workers run on it),
//! so each stage is known to a millisecond.

use redtx_common::record::TxnRecord;
use redtx_common::{now_ms, Client};
use serde_json::json;
use std::sync::Mutex;

/// How many of a phase's transactions are followed, at most.
pub const SAMPLE: usize = 2_000;

/// One followed transaction.
struct Followed {
    id: String,
    submitted_ms: u64,
    seen_ms: u64,
}

/// The transactions followed during a phase.
#[derive(Default)]
pub struct Follow {
    every: u64,
    followed: Mutex<Vec<Followed>>,
}

impl Follow {
    /// Follows about [`SAMPLE`] of `expected` transactions, spread over the phase.
    pub fn new(expected: u64) -> Follow {
        Follow { every: expected.div_ceil(SAMPLE as u64).max(1), followed: Mutex::default() }
    }

    /// Whether the `n`-th transaction of the phase is followed.
    pub fn follows(&self, n: u64) -> bool {
        n.is_multiple_of(self.every)
    }

    /// Notes that `id`, submitted at wall-clock `submitted_ms`, was seen settled now.
    pub fn seen(&self, id: String, submitted_ms: u64) {
        let seen_ms = now_ms();
        self.followed.lock().expect("followed").push(Followed { id, submitted_ms, seen_ms });
    }

    /// Reads the followed transactions' records and splits their times into stages.
    pub async fn stages(&self, client: &Client) -> redtx_common::Result<Stages> {
        let followed = std::mem::take(&mut *self.followed.lock().expect("followed"));
        let mut stages = Stages::default();
        for chunk in followed.chunks(100) {
            let mut reads = tokio::task::JoinSet::new();
            for f in chunk {
                let (client, id) = (client.clone(), f.id.clone());
                reads.spawn(async move { client.status(&id).await });
            }
            let mut records: Vec<TxnRecord> = Vec::with_capacity(chunk.len());
            while let Some(r) = reads.join_next().await {
                records.extend(r.expect("record read")?);
            }
            for f in chunk {
                if let Some(r) = records.iter().find(|r| r.id == f.id) {
                    stages.add(f, r);
                }
            }
        }
        Ok(stages)
    }
}

/// Milliseconds spent per stage by the followed transactions that ended well (committed, or
/// completed), and how many that was.
#[derive(Default)]
pub struct Stages {
    create: Vec<u64>,
    prepare: Vec<u64>,
    commit: Vec<u64>,
    run: Vec<u64>,
    tell: Vec<u64>,
    total: Vec<u64>,
}

impl Stages {
    fn add(&mut self, f: &Followed, r: &TxnRecord) {
        if !r.state.is_success() {
            return;
        }
        let Some(finished) = r.finished_ms else { return };
        let gap = |from: u64, to: u64| to.saturating_sub(from);
        self.create.push(gap(f.submitted_ms, r.created_ms));
        match r.decided_ms {
            Some(decided) => {
                self.prepare.push(gap(r.created_ms, decided));
                self.commit.push(gap(decided, finished));
            }
            None => self.run.push(gap(r.created_ms, finished)),
        }
        self.tell.push(gap(finished, f.seen_ms));
        self.total.push(gap(f.submitted_ms, f.seen_ms));
    }

    /// Number of transactions split.
    pub fn len(&self) -> usize {
        self.total.len()
    }

    /// (name, p50 ms, p99 ms) of each stage that any transaction went through, in order.
    pub fn rows(&self) -> Vec<(&'static str, u64, u64)> {
        let all = [
            ("create", &self.create),
            ("prepare", &self.prepare),
            ("commit", &self.commit),
            ("run", &self.run),
            ("tell", &self.tell),
            ("total", &self.total),
        ];
        all.into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(name, v)| (name, percentile(v, 0.5), percentile(v, 0.99)))
            .collect()
    }

    pub fn json(&self) -> serde_json::Value {
        let stages: serde_json::Map<String, serde_json::Value> = self
            .rows()
            .into_iter()
            .map(|(name, p50, p99)| (name.to_string(), json!({"p50_ms": p50, "p99_ms": p99})))
            .collect();
        json!({ "followed": self.len(), "stages": stages })
    }
}

/// Percentile `p` (0..=1) of `v` (0 when empty).
fn percentile(v: &[u64], p: f64) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    let i = ((v.len() as f64 * p).ceil() as usize).saturating_sub(1);
    v.get(i).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redtx_common::record::TxnState;

    fn record(state: TxnState, created: u64, decided: Option<u64>, finished: Option<u64>) -> TxnRecord {
        TxnRecord {
            id: "t".into(),
            mode: "2pc".into(),
            state,
            reason: None,
            failed_step: None,
            created_ms: created,
            deadline_ms: created + 5_000,
            decided_ms: decided,
            finished_ms: finished,
            branches: Vec::new(),
            spec: None,
        }
    }

    #[test]
    fn a_transaction_splits_into_its_stages() {
        let f = Followed { id: "t".into(), submitted_ms: 100, seen_ms: 112 };
        let mut s = Stages::default();
        s.add(&f, &record(TxnState::Committed, 102, Some(106), Some(111)));
        // Completed saga: no decision, one run stage.
        s.add(&f, &record(TxnState::Completed, 101, None, Some(110)));
        // Aborted, or not finished: not split.
        s.add(&f, &record(TxnState::Aborted, 101, Some(103), Some(104)));
        s.add(&f, &record(TxnState::Committed, 101, Some(103), None));
        assert_eq!(s.len(), 2);
        let rows = s.rows();
        assert_eq!(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec!["create", "prepare", "commit", "run", "tell", "total"]
        );
        assert_eq!(rows[1], ("prepare", 4, 4));
        assert_eq!(rows[2], ("commit", 5, 5));
        assert_eq!(rows[3], ("run", 9, 9));
        assert_eq!(rows[5], ("total", 12, 12));
    }

    #[test]
    fn percentiles_of_a_few() {
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[5, 1, 3], 0.5), 3);
        assert_eq!(percentile(&[5, 1, 3], 0.99), 5);
    }
}
