//! A transaction's whole life, 2PC and saga, as one pure state machine: events in, effects
//! out, no I/O and no clock of its own (the caller passes [`Timing`]). The coordinator runs
//! exactly this code; Redis only stores what it decides.
//!
//! [`Txn::create`] starts a transaction from its spec; [`Txn::step`] applies one [`Event`] and
//! returns an [`Output`]: the [`Effect`]s to carry out (messages to send, an outcome to
//! announce, the end of the transaction), whether the record changed (it must be written in
//! the same atomic call as the effects), or why the event is refused (dead-letter).
//! [`Txn::wake_ms`] says when the transaction wants a [`Event::Tick`].
//!
//! # States and events
//!
//! 2PC (`P` = participant of the branch; "decide X" writes the decision and sends X to every
//! branch, before anything else can happen):
//!
//! | state        | event                                   | next         | effects                                   |
//! |--------------|-----------------------------------------|--------------|-------------------------------------------|
//! | (new)        | submit                                  | preparing    | `prepare` to every branch                 |
//! | preparing    | first `yes` of a branch, not the last   | preparing    | —                                         |
//! | preparing    | last `yes`                              | committing   | decide `commit`                           |
//! | preparing    | first `no`                              | aborting     | decide `abort`; announce `aborting`       |
//! | preparing    | tick at/after the deadline              | aborting     | decide `abort` (reason names the silent); announce |
//! | preparing    | submit again                            | preparing    | `prepare` again to branches without a vote (re-send) |
//! | committing/aborting | vote, submit                     | same         | the decision again to unacked branches (re-send) |
//! | committing/aborting | matching `ack`, not the last     | same         | —                                         |
//! | committing/aborting | last matching `ack`              | committed/aborted | announce; finish                     |
//! | committing/aborting | tick                             | same         | the decision again to unacked branches, backing off to 30 s (re-send) |
//! | preparing or decided | `ack` before or against the decision | same     | refused (dead-letter)                     |
//! | committed/aborted | anything                           | same         | — (a late `yes` to an abort gets `abort` again) |
//!
//! Saga (steps run when the steps they wait for are `done`; `B` = a step's retry limit,
//! backoff doubling from `retry.backoff`, capped at 30 s):
//!
//! | state        | event                                   | next         | effects                                   |
//! |--------------|-----------------------------------------|--------------|-------------------------------------------|
//! | (new)        | submit                                  | running      | `execute` to every ready step             |
//! | running      | action `done`, not the last             | running      | `execute` to steps now ready              |
//! | running      | last action `done`                      | completed    | announce; finish                          |
//! | running      | action `failed` (business)              | compensating | `compensate` the last step that ran       |
//! | running      | action `error`, or no result within `step_timeout`, attempts < B | running | `execute` again after the backoff |
//! | running      | the same at attempt B                   | compensating | `compensate` the last step that ran       |
//! | running      | tick at/after the deadline              | compensating | `compensate` the last step that ran       |
//! | compensating | compensation `done` (or `skipped`: nothing to undo, for an action never reported applied) | compensating | `compensate` the next step, in reverse order |
//! | compensating | last compensation `done`                | compensated  | announce; finish                          |
//! | compensating | compensation `failed`/`error`/no result, or `skipped` for an action reported applied, attempts < B | compensating | `compensate` again after the backoff |
//! | compensating | the same at attempt B                   | stuck        | announce `stuck`; retried, backing off to 30 s |
//! | stuck        | compensation `done`                     | compensating (or compensated) | go on                    |
//! | any          | a result of a step not in flight (repeat, late) | same  | —                                         |
//!
//! "Ran" means `done`, or sent without a result (it may have applied): those get a
//! compensation; a step whose action `failed` applied nothing and gets none; a step never sent
//! gets none. The participant's barrier makes a compensation of an action that never ran a
//! recorded no-op, and refuses that action if it arrives later.
//!
//! A submit the coordinator refuses (it does not decode, its spec is invalid, it came to the
//! wrong partition) and whose id has no record yet becomes [`Txn::rejected`]: state `rejected`
//! with the reason, announced and finished at once, nothing sent, so the producer waiting on
//! that id learns why. A submit of an id that has a record never changes it.
//!
//! A vote, ack or result for a transaction with no record at all is answered by [`orphan`]:
//! no record means no decision was ever made, so a `yes` vote gets an `abort`.

use crate::protocol::{Ack, Execute, Message, Outcome, Prepare, Resolve, StepKind, StepResult, StepStatus, Vote};
use crate::record::TxnState;
use crate::spec::{Mode, TxnSpec};
use serde::{Deserialize, Serialize};

/// Longest pause between two re-sends (2PC decisions, saga retries, a stuck compensation).
pub const MAX_RESEND_DELAY_MS: u64 = 30_000;

/// The clock and settings a step needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Now (ms since the epoch).
    pub now_ms: u64,
    /// First pause before a 2PC decision is re-sent to a branch that has not acked (ms).
    pub resend_every_ms: u64,
}

/// Where one branch (2PC) or step (saga) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// 2PC: prepare sent, no vote yet. Saga: waiting for earlier steps.
    #[default]
    Pending,
    /// 2PC: voted yes (prepared).
    VotedYes,
    /// 2PC: voted no.
    VotedNo,
    /// 2PC: acked the commit.
    Committed,
    /// 2PC: acked the abort.
    Aborted,
    /// Saga: the action is sent (or waits for a retry) and has no result yet.
    Running,
    /// Saga: the action applied.
    Done,
    /// Saga: the action was refused for a business reason; nothing applied.
    Failed,
    /// Saga: the compensation is sent and has no result yet.
    Compensating,
    /// Saga: compensated (or nothing to undo).
    Compensated,
}

impl Phase {
    /// The name shown by `redtx status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::VotedYes => "voted-yes",
            Phase::VotedNo => "voted-no",
            Phase::Committed => "committed",
            Phase::Aborted => "aborted",
            Phase::Running => "running",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::Compensating => "compensating",
            Phase::Compensated => "compensated",
        }
    }
}

/// The mutable part of one branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BranchProgress {
    /// Where it is.
    pub phase: Phase,
    /// The participant's reason (no vote, failed or erroring step).
    #[serde(default)]
    pub reason: Option<String>,
    /// Saga: attempts of the current half (action, then compensation).
    #[serde(default)]
    pub attempts: u32,
    /// Saga: when the current attempt was sent (ms); `None` while a retry waits.
    #[serde(default)]
    pub sent_ms: Option<u64>,
    /// Saga: when to send the next attempt (ms).
    #[serde(default)]
    pub retry_at_ms: Option<u64>,
    /// When the phase last changed (ms).
    #[serde(default)]
    pub at_ms: Option<u64>,
    /// Saga: the participant reported the action `done` (its compensation must undo something).
    #[serde(default)]
    pub applied: bool,
}

/// The mutable part of a transaction (the record's `st`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Current state.
    pub state: TxnState,
    /// Created (ms).
    pub created_ms: u64,
    /// 2PC: vote deadline; saga: forward deadline (ms).
    pub deadline_ms: u64,
    /// When the decision (2PC) or the compensation (saga) was made (ms).
    #[serde(default)]
    pub decided_ms: Option<u64>,
    /// When it became terminal (ms).
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// Why it aborted, compensated or was rejected.
    #[serde(default)]
    pub reason: Option<String>,
    /// Saga: the step whose failure started the compensation.
    #[serde(default)]
    pub failed_step: Option<u32>,
    /// 2PC: when to re-send the decision next (ms).
    #[serde(default)]
    pub resend_at_ms: Option<u64>,
    /// One per branch, in spec order.
    pub branches: Vec<BranchProgress>,
}

/// A live transaction: its spec and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Txn {
    /// As submitted first.
    pub spec: TxnSpec,
    /// Where it is.
    pub progress: Progress,
}

/// Something that happened to a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The same id was submitted again (the stored spec wins): re-send what is outstanding.
    Submit,
    /// A participant voted.
    Vote(Vote),
    /// A participant applied a 2PC decision.
    Ack(Ack),
    /// A participant reports on a saga step.
    Result(StepResult),
    /// Time passed ([`Txn::wake_ms`] is due).
    Tick,
}

/// One thing the caller must do, in the same atomic write as the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send `msg` to its participant's stream of the transaction's partition. `resend`: a
    /// repeat of an earlier message, which the caller may skip while that participant is not
    /// reading its stream (the earlier one still waits there).
    Send { msg: Message, resend: bool },
    /// Tell waiting producers the transaction reached `state` (settled: terminal, `aborting`,
    /// `stuck`).
    Announce(TxnState),
    /// The transaction is terminal: drop it from the live set and let its record expire.
    Finish,
}

/// The result of one event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// What to do, in order.
    pub effects: Vec<Effect>,
    /// The record changed and must be written.
    pub changed: bool,
    /// `Some(reason)`: the event is refused (a protocol violation); dead-letter it.
    pub reject: Option<String>,
    /// This event wrote a 2PC decision or started a compensation.
    pub decided: bool,
}

impl Output {
    fn reject(reason: String) -> Output {
        Output { reject: Some(reason), ..Output::default() }
    }

    fn send(&mut self, msg: Message, resend: bool) {
        self.effects.push(Effect::Send { msg, resend });
    }
}

/// The answer to a vote, ack or result of a transaction that has no record: it was never
/// created (a hand-written or misrouted entry) or expired. No record means no decision was ever
/// made, so a prepared branch is told to abort. Nothing else is sent: a saga step without its
/// record has no known compensation.
pub fn orphan(ev: &Event) -> Output {
    let mut out = Output::default();
    if let Event::Vote(v) = ev {
        if v.yes {
            out.send(
                Message::Abort(Resolve { txn: v.txn.clone(), branch: v.branch, participant: v.participant.clone() }),
                false,
            );
        }
    }
    out
}

fn backoff_ms(base_ms: u64, attempts: u32) -> u64 {
    let shift = attempts.saturating_sub(1).min(20);
    base_ms.max(1).saturating_mul(1 << shift).min(MAX_RESEND_DELAY_MS)
}

impl Txn {
    /// Starts a transaction from a validated spec.
    pub fn create(spec: TxnSpec, t: Timing) -> (Txn, Output) {
        let n = spec.branches.len();
        let state = match spec.mode {
            Mode::TwoPhase => TxnState::Preparing,
            Mode::Saga => TxnState::Running,
        };
        let mut txn = Txn {
            progress: Progress {
                state,
                created_ms: t.now_ms,
                deadline_ms: t.now_ms + spec.timeout_ms,
                decided_ms: None,
                finished_ms: None,
                reason: None,
                failed_step: None,
                resend_at_ms: None,
                branches: vec![BranchProgress::default(); n],
            },
            spec,
        };
        let mut out = Output { changed: true, ..Output::default() };
        match txn.spec.mode {
            Mode::TwoPhase => {
                for i in 0..n {
                    out.send(txn.prepare(i), false);
                }
            }
            Mode::Saga => txn.start_ready(t, &mut out),
        }
        (txn, out)
    }

    /// A refused submit of `id`: terminal at once (`rejected`, with `reason`), announced,
    /// nothing sent. Its spec keeps only the id and the mode (`mode` if it could be read, else
    /// 2PC): the refused one may be invalid or unreadable.
    pub fn rejected(id: &str, mode: Option<Mode>, reason: String, t: Timing) -> (Txn, Output) {
        let spec = TxnSpec {
            id: id.to_string(),
            mode: mode.unwrap_or_default(),
            timeout_ms: 0,
            branches: Vec::new(),
            retry: Default::default(),
        };
        let mut txn = Txn {
            spec,
            progress: Progress {
                state: TxnState::Rejected,
                created_ms: t.now_ms,
                deadline_ms: t.now_ms,
                decided_ms: Some(t.now_ms),
                finished_ms: None,
                reason: Some(reason),
                failed_step: None,
                resend_at_ms: None,
                branches: Vec::new(),
            },
        };
        let mut out = Output::default();
        txn.finish(TxnState::Rejected, t, &mut out);
        (txn, out)
    }

    /// The transaction id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// The current state.
    pub fn state(&self) -> TxnState {
        self.progress.state
    }

    /// When the transaction wants a [`Event::Tick`] (ms), if ever.
    pub fn wake_ms(&self) -> Option<u64> {
        let p = &self.progress;
        match p.state {
            TxnState::Preparing => Some(p.deadline_ms),
            TxnState::Committing | TxnState::Aborting => p.resend_at_ms,
            TxnState::Running => {
                let steps = self.step_wakes(Phase::Running);
                Some(steps.map_or(p.deadline_ms, |s| s.min(p.deadline_ms)))
            }
            TxnState::Compensating | TxnState::Stuck => self.step_wakes(Phase::Compensating),
            _ => None,
        }
    }

    fn step_wakes(&self, phase: Phase) -> Option<u64> {
        let timeout = self.spec.retry.step_timeout_ms;
        self.progress
            .branches
            .iter()
            .filter(|b| b.phase == phase)
            .filter_map(|b| b.retry_at_ms.or(b.sent_ms.map(|s| s + timeout)))
            .min()
    }

    /// Applies one event.
    pub fn step(&mut self, ev: Event, t: Timing) -> Output {
        let mut out = Output::default();
        if let Some(reason) = self.check_sender(&ev) {
            return Output::reject(reason);
        }
        match (self.spec.mode, ev) {
            (_, Event::Submit) => self.resend_outstanding(&mut out),
            (Mode::TwoPhase, Event::Vote(v)) => self.on_vote(v, t, &mut out),
            (Mode::TwoPhase, Event::Ack(a)) => self.on_ack(a, t, &mut out),
            (Mode::TwoPhase, Event::Tick) => self.on_tick_2pc(t, &mut out),
            (Mode::Saga, Event::Result(r)) => self.on_result(r, t, &mut out),
            (Mode::Saga, Event::Tick) => self.on_tick_saga(t, &mut out),
            (mode, ev) => {
                return Output::reject(format!(
                    "a {} message does not belong to a {} transaction",
                    kind(&ev),
                    mode.as_str()
                ))
            }
        }
        out
    }

    /// The event names a branch this transaction has, with its participant; else the reason.
    fn check_sender(&self, ev: &Event) -> Option<String> {
        let (branch, participant) = match ev {
            Event::Vote(v) => (v.branch, &v.participant),
            Event::Ack(a) => (a.branch, &a.participant),
            Event::Result(r) => (r.branch, &r.participant),
            Event::Submit | Event::Tick => return None,
        };
        match self.spec.branches.get(branch as usize) {
            None => Some(format!(
                "{} names branch {branch}, but txn {} has {}",
                kind(ev),
                self.id(),
                self.spec.branches.len()
            )),
            Some(b) if &b.participant != participant => Some(format!(
                "{} for branch {branch} of txn {} comes from {participant:?}, but that branch belongs to {:?}",
                kind(ev),
                self.id(),
                b.participant
            )),
            Some(_) => None,
        }
    }

    fn branch_mut(&mut self, i: usize, phase: Phase, t: Timing) -> &mut BranchProgress {
        let b = &mut self.progress.branches[i];
        b.phase = phase;
        b.at_ms = Some(t.now_ms);
        b
    }

    // ---- 2PC --------------------------------------------------------------------------------

    fn prepare(&self, i: usize) -> Message {
        let b = &self.spec.branches[i];
        Message::Prepare(Prepare {
            txn: self.spec.id.clone(),
            branch: i as u32,
            participant: b.participant.clone(),
            deadline_ms: self.progress.deadline_ms,
            payload: b.payload.clone(),
        })
    }

    fn decision(&self, i: usize) -> Option<Message> {
        let r = Resolve {
            txn: self.spec.id.clone(),
            branch: i as u32,
            participant: self.spec.branches[i].participant.clone(),
        };
        match self.progress.state {
            TxnState::Committing | TxnState::Committed => Some(Message::Commit(r)),
            TxnState::Aborting | TxnState::Aborted => Some(Message::Abort(r)),
            _ => None,
        }
    }

    fn unacked(&self, i: usize) -> bool {
        !matches!(self.progress.branches[i].phase, Phase::Committed | Phase::Aborted)
    }

    fn decide(&mut self, state: TxnState, reason: Option<String>, t: Timing, out: &mut Output) {
        let p = &mut self.progress;
        p.state = state;
        p.decided_ms = Some(t.now_ms);
        p.reason = reason;
        p.resend_at_ms = Some(t.now_ms + t.resend_every_ms.max(1));
        out.changed = true;
        out.decided = true;
        for i in 0..self.spec.branches.len() {
            out.send(self.decision(i).expect("decided"), false);
        }
        if state == TxnState::Aborting {
            out.effects.push(Effect::Announce(state));
        }
    }

    fn on_vote(&mut self, v: Vote, t: Timing, out: &mut Output) {
        let i = v.branch as usize;
        match self.progress.state {
            TxnState::Preparing => {
                if self.progress.branches[i].phase != Phase::Pending {
                    return; // the first vote of a branch wins
                }
                let phase = if v.yes { Phase::VotedYes } else { Phase::VotedNo };
                self.branch_mut(i, phase, t).reason = v.reason.clone();
                out.changed = true;
                if !v.yes {
                    let participant = &v.participant;
                    let reason = match v.reason.filter(|r| !r.is_empty()) {
                        Some(r) if r.starts_with(participant.as_str()) => r,
                        Some(r) => format!("{participant}: {r}"),
                        None => format!("{participant} voted no"),
                    };
                    self.decide(TxnState::Aborting, Some(reason), t, out);
                } else if self.progress.branches.iter().all(|b| b.phase == Phase::VotedYes) {
                    self.decide(TxnState::Committing, None, t, out);
                }
            }
            TxnState::Committing | TxnState::Aborting if self.unacked(i) => {
                out.send(self.decision(i).expect("decided"), true);
            }
            TxnState::Aborted if v.yes => out.send(self.decision(i).expect("decided"), true),
            _ => {}
        }
    }

    fn on_ack(&mut self, a: Ack, t: Timing, out: &mut Output) {
        let i = a.branch as usize;
        let expected = match self.progress.state {
            TxnState::Committing | TxnState::Committed => Outcome::Committed,
            TxnState::Aborting | TxnState::Aborted => Outcome::Aborted,
            s => {
                out.reject =
                    Some(format!("ack ({}) of txn {} before its decision (state {s})", a.outcome.as_str(), a.txn));
                return;
            }
        };
        if a.outcome != expected {
            out.reject = Some(format!(
                "ack {} of txn {} contradicts its decision ({})",
                a.outcome.as_str(),
                a.txn,
                expected.as_str()
            ));
            return;
        }
        if self.progress.state.is_terminal() || !self.unacked(i) {
            return;
        }
        let phase = if expected == Outcome::Committed { Phase::Committed } else { Phase::Aborted };
        self.branch_mut(i, phase, t);
        out.changed = true;
        if (0..self.spec.branches.len()).all(|i| !self.unacked(i)) {
            let end = if expected == Outcome::Committed { TxnState::Committed } else { TxnState::Aborted };
            self.finish(end, t, out);
        }
    }

    fn finish(&mut self, state: TxnState, t: Timing, out: &mut Output) {
        let p = &mut self.progress;
        p.state = state;
        p.finished_ms = Some(t.now_ms);
        p.resend_at_ms = None;
        out.changed = true;
        out.effects.push(Effect::Announce(state));
        out.effects.push(Effect::Finish);
    }

    fn on_tick_2pc(&mut self, t: Timing, out: &mut Output) {
        let p = &self.progress;
        match p.state {
            TxnState::Preparing if t.now_ms >= p.deadline_ms => {
                let silent: Vec<&str> = self
                    .spec
                    .branches
                    .iter()
                    .zip(&p.branches)
                    .filter(|(_, s)| s.phase == Phase::Pending)
                    .map(|(b, _)| b.participant.as_str())
                    .collect();
                let reason = format!(
                    "timeout: {} did not vote within {}",
                    silent.join(", "),
                    humantime::format_duration(self.spec.timeout())
                );
                self.decide(TxnState::Aborting, Some(reason), t, out);
            }
            TxnState::Committing | TxnState::Aborting if p.resend_at_ms.is_some_and(|r| t.now_ms >= r) => {
                let age = t.now_ms.saturating_sub(p.decided_ms.unwrap_or(t.now_ms));
                let base = t.resend_every_ms.max(1);
                self.progress.resend_at_ms = Some(t.now_ms + age.clamp(base, MAX_RESEND_DELAY_MS.max(base)));
                out.changed = true;
                for i in 0..self.spec.branches.len() {
                    if self.unacked(i) {
                        out.send(self.decision(i).expect("decided"), true);
                    }
                }
            }
            _ => {}
        }
    }

    fn resend_outstanding(&self, out: &mut Output) {
        let p = &self.progress;
        match p.state {
            TxnState::Preparing => {
                for (i, b) in p.branches.iter().enumerate() {
                    if b.phase == Phase::Pending {
                        out.send(self.prepare(i), true);
                    }
                }
            }
            TxnState::Committing | TxnState::Aborting => {
                for i in 0..p.branches.len() {
                    if self.unacked(i) {
                        out.send(self.decision(i).expect("decided"), true);
                    }
                }
            }
            TxnState::Running | TxnState::Compensating | TxnState::Stuck => {
                for (i, b) in p.branches.iter().enumerate() {
                    if b.sent_ms.is_some() {
                        match b.phase {
                            Phase::Running => out.send(self.execute(i, StepKind::Action), true),
                            Phase::Compensating => out.send(self.execute(i, StepKind::Compensation), true),
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }

    // ---- saga -------------------------------------------------------------------------------

    fn execute(&self, i: usize, kind: StepKind) -> Message {
        let b = &self.spec.branches[i];
        let e = Execute {
            txn: self.spec.id.clone(),
            branch: i as u32,
            participant: b.participant.clone(),
            attempt: self.progress.branches[i].attempts.max(1),
            payload: match kind {
                StepKind::Action => b.payload.clone(),
                StepKind::Compensation => b.compensation.clone().unwrap_or_default(),
            },
        };
        match kind {
            StepKind::Action => Message::Execute(e),
            StepKind::Compensation => Message::Compensate(e),
        }
    }

    /// Sends the action of every step whose dependencies are done; completes the saga when
    /// every step is done.
    fn start_ready(&mut self, t: Timing, out: &mut Output) {
        let p = &self.progress;
        if p.branches.iter().all(|b| b.phase == Phase::Done) {
            self.finish(TxnState::Completed, t, out);
            return;
        }
        let ready: Vec<usize> = (0..p.branches.len())
            .filter(|&i| p.branches[i].phase == Phase::Pending)
            .filter(|&i| self.spec.deps(i).iter().all(|&d| p.branches[d as usize].phase == Phase::Done))
            .collect();
        for i in ready {
            let b = self.branch_mut(i, Phase::Running, t);
            b.attempts = 1;
            b.sent_ms = Some(t.now_ms);
            b.retry_at_ms = None;
            out.changed = true;
            out.send(self.execute(i, StepKind::Action), false);
        }
    }

    fn begin_compensation(&mut self, failed_step: Option<u32>, reason: String, t: Timing, out: &mut Output) {
        let p = &mut self.progress;
        p.state = TxnState::Compensating;
        p.decided_ms = Some(t.now_ms);
        p.reason = Some(reason);
        p.failed_step = failed_step;
        out.changed = true;
        out.decided = true;
        self.next_compensation(t, out);
    }

    /// Compensates the last step (highest index) that ran and is not compensated yet, one at a
    /// time; ends the saga when none is left.
    fn next_compensation(&mut self, t: Timing, out: &mut Output) {
        let p = &self.progress;
        if p.branches.iter().any(|b| b.phase == Phase::Compensating) {
            return;
        }
        let next = (0..p.branches.len()).rev().find(|&i| matches!(p.branches[i].phase, Phase::Done | Phase::Running));
        match next {
            Some(i) => {
                let b = self.branch_mut(i, Phase::Compensating, t);
                b.attempts = 1;
                b.sent_ms = Some(t.now_ms);
                b.retry_at_ms = None;
                out.changed = true;
                out.send(self.execute(i, StepKind::Compensation), false);
            }
            None => self.finish(TxnState::Compensated, t, out),
        }
    }

    fn on_result(&mut self, r: StepResult, t: Timing, out: &mut Output) {
        let i = r.branch as usize;
        let phase = self.progress.branches[i].phase;
        let state = self.progress.state;
        let name = self.spec.branches[i].participant.clone();
        match r.step {
            StepKind::Action if phase == Phase::Running => match (state, r.status) {
                (TxnState::Running, StepStatus::Done) => {
                    let b = self.branch_mut(i, Phase::Done, t);
                    b.sent_ms = None;
                    b.applied = true;
                    out.changed = true;
                    self.start_ready(t, out);
                }
                (TxnState::Running, StepStatus::Failed) => {
                    let reason = prefixed(&name, r.reason.as_deref(), "failed");
                    let b = self.branch_mut(i, Phase::Failed, t);
                    b.reason = Some(reason.clone());
                    b.sent_ms = None;
                    self.begin_compensation(Some(r.branch), reason, t, out);
                }
                (TxnState::Running, StepStatus::Error | StepStatus::Skipped) => {
                    let reason = prefixed(&name, r.reason.as_deref(), "error");
                    self.action_attempt_failed(i, reason, t, out);
                }
                // Compensating already: a step in flight finished. `Running` steps are
                // compensated anyway; one that failed has nothing to undo.
                (_, StepStatus::Done) => {
                    self.branch_mut(i, Phase::Done, t).applied = true;
                    out.changed = true;
                }
                (_, StepStatus::Failed) => {
                    self.branch_mut(i, Phase::Failed, t).reason = r.reason;
                    out.changed = true;
                    self.next_compensation(t, out);
                }
                (_, StepStatus::Error | StepStatus::Skipped) => {}
            },
            StepKind::Compensation if phase == Phase::Compensating => match r.status {
                // Nothing undone although the action reported it applied: the participant lost
                // its trace (a barrier kept shorter than the saga took). Never taken for
                // success: retried, then `stuck`, for an operator.
                StepStatus::Skipped if self.progress.branches[i].applied => {
                    let reason = format!(
                        "{name}: no trace of the action it reported applied (its barrier expired?); \
                         nothing was undone"
                    );
                    self.compensation_attempt_failed(i, reason, t, out);
                }
                StepStatus::Done | StepStatus::Skipped => {
                    let b = self.branch_mut(i, Phase::Compensated, t);
                    b.sent_ms = None;
                    b.retry_at_ms = None;
                    out.changed = true;
                    if state == TxnState::Stuck {
                        self.progress.state = TxnState::Compensating;
                    }
                    self.next_compensation(t, out);
                }
                StepStatus::Failed | StepStatus::Error => {
                    let reason = prefixed(&name, r.reason.as_deref(), "compensation failed");
                    self.compensation_attempt_failed(i, reason, t, out);
                }
            },
            _ => {} // a repeat, or a result of an attempt that is no longer in flight
        }
    }

    fn action_attempt_failed(&mut self, i: usize, reason: String, t: Timing, out: &mut Output) {
        let retry = self.spec.retry;
        let b = &mut self.progress.branches[i];
        b.reason = Some(reason.clone());
        b.sent_ms = None;
        b.at_ms = Some(t.now_ms);
        out.changed = true;
        if b.attempts < retry.limit {
            b.retry_at_ms = Some(t.now_ms + backoff_ms(retry.backoff_ms, b.attempts));
        } else {
            b.retry_at_ms = None;
            let why = format!("step {i} gave up after {} attempts: {reason}", b.attempts);
            self.begin_compensation(Some(i as u32), why, t, out);
        }
    }

    fn compensation_attempt_failed(&mut self, i: usize, reason: String, t: Timing, out: &mut Output) {
        let retry = self.spec.retry;
        let b = &mut self.progress.branches[i];
        b.reason = Some(reason);
        b.sent_ms = None;
        b.at_ms = Some(t.now_ms);
        out.changed = true;
        if b.attempts >= retry.limit {
            // Still retried, the backoff doubling on up to 30 s: never dropped.
            b.retry_at_ms = Some(t.now_ms + backoff_ms(retry.backoff_ms, b.attempts));
            if self.progress.state != TxnState::Stuck {
                self.progress.state = TxnState::Stuck;
                out.effects.push(Effect::Announce(TxnState::Stuck));
            }
        } else {
            b.retry_at_ms = Some(t.now_ms + backoff_ms(retry.backoff_ms, b.attempts));
        }
    }

    fn on_tick_saga(&mut self, t: Timing, out: &mut Output) {
        let state = self.progress.state;
        if state == TxnState::Running && t.now_ms >= self.progress.deadline_ms {
            let open: Vec<String> = (0..self.spec.branches.len())
                .filter(|&i| matches!(self.progress.branches[i].phase, Phase::Pending | Phase::Running))
                .map(|i| format!("{i} ({})", self.spec.branches[i].participant))
                .collect();
            let reason = format!(
                "timeout: step{} {} did not complete within {}",
                if open.len() == 1 { "" } else { "s" },
                open.join(", "),
                humantime::format_duration(self.spec.timeout())
            );
            self.begin_compensation(None, reason, t, out);
            return;
        }
        let (phase, kind) = match state {
            TxnState::Running => (Phase::Running, StepKind::Action),
            TxnState::Compensating | TxnState::Stuck => (Phase::Compensating, StepKind::Compensation),
            _ => return,
        };
        let timeout = self.spec.retry.step_timeout_ms;
        for i in 0..self.spec.branches.len() {
            let b = &self.progress.branches[i];
            if b.phase != phase || self.progress.state != state {
                continue;
            }
            if b.retry_at_ms.is_some_and(|r| t.now_ms >= r) {
                let b = &mut self.progress.branches[i];
                b.attempts += 1;
                b.sent_ms = Some(t.now_ms);
                b.retry_at_ms = None;
                out.changed = true;
                out.send(self.execute(i, kind), true);
            } else if b.sent_ms.is_some_and(|s| t.now_ms >= s + timeout) {
                let reason = format!(
                    "{}: no result within {}",
                    self.spec.branches[i].participant,
                    humantime::format_duration(std::time::Duration::from_millis(timeout))
                );
                match kind {
                    StepKind::Action => self.action_attempt_failed(i, reason, t, out),
                    StepKind::Compensation => self.compensation_attempt_failed(i, reason, t, out),
                }
            }
        }
    }
}

fn prefixed(participant: &str, reason: Option<&str>, default: &str) -> String {
    match reason.filter(|r| !r.is_empty()) {
        Some(r) if r.starts_with(participant) => r.to_string(),
        Some(r) => format!("{participant}: {r}"),
        None => format!("{participant}: {default}"),
    }
}

fn kind(ev: &Event) -> &'static str {
    match ev {
        Event::Submit => "submit",
        Event::Vote(_) => "vote",
        Event::Ack(_) => "ack",
        Event::Result(_) => "result",
        Event::Tick => "tick",
    }
}

#[cfg(test)]
mod tests;
