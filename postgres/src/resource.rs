//! [`PgResource`]: the barrier rules' transitions carried out on PostgreSQL.
//!
//! The barrier of a branch is a row of `redtx_barrier` (`participant`, `txn`, `branch`,
//! `state`, `reason`, `deadline_ms`, `at_ms`), always written in the same local transaction as
//! the business change:
//!
//! - **Try** (2PC prepare): `BEGIN`, insert the row as `prepared`, run the statements and their
//!   guards, `PREPARE TRANSACTION '<gid>'`. The locks are held by PostgreSQL until the decision.
//!   The row is inside the prepared transaction, so it becomes visible only if it commits: a
//!   prepared transaction named `<gid>` in `pg_prepared_xacts` *is* the `prepared` barrier, and
//!   a visible row still saying `prepared` means it committed.
//! - **Confirm**: `COMMIT PREPARED`, then the row says `committed`. **Cancel**: `ROLLBACK
//!   PREPARED`, then an `aborted` row (a tombstone a late prepare finds).
//! - **Action** (saga): `BEGIN`, insert the row as `done`, the statements, `COMMIT`.
//!   **Compensation**: `BEGIN`, `done` → `compensated` (only if still `done`), the statements,
//!   `COMMIT`.
//! - A refusal (bad SQL, a constraint, a failed guard, a lock held too long) rolls the local
//!   transaction back and records `refused`/`failed` with PostgreSQL's message.
//!
//! A compare-and-set that finds the barrier moved (a unique violation on insert, no row on
//! update, no prepared transaction to finish) changes nothing and reports the barrier as it is.
//!
//! The gid is `redtx:<deployment>:<participant>:<txn>` (the transaction id replaced by its
//! UUIDv5 when that would pass PostgreSQL's 200-byte limit). `<deployment>` is the id in the
//! stream Redis's `rtx:deployment`, so one database can serve several deployments and a
//! participant only ever finishes its own prepared transactions. Names and ids are checked to
//! hold only `A-Z a-z 0-9 - _ . :` before they reach a gid, which is the one value written into
//! SQL text (PostgreSQL takes no parameter there); everything else is a bound parameter.

use crate::payload::{self, bind, Statement};
use redtx_common::conn::RedisUrl;
use redtx_common::record::TxnState;
use redtx_common::{keys, Error};
use redtx_participant::{Applied, Barrier, BarrierState, Request, Resource, Transition, Work};
use std::collections::HashMap;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

/// The barrier table, created when missing.
pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS redtx_barrier (
    participant text NOT NULL,
    txn text NOT NULL,
    branch integer NOT NULL,
    state text NOT NULL,
    reason text,
    deadline_ms bigint,
    at_ms bigint NOT NULL,
    PRIMARY KEY (participant, txn))";

/// Most prepared statements kept per connection.
const MAX_STATEMENTS: usize = 1024;

/// Longest gid PostgreSQL takes (its `GIDSIZE` less the terminating byte).
const MAX_GID: usize = 199;

/// How often finished barriers older than the retention are deleted.
const CLEANUP_EVERY: Duration = Duration::from_secs(600);

/// How often this participant's prepared transactions are checked against their records.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// How a [`PgResource`] connects and behaves.
#[derive(Clone)]
pub struct PgOptions {
    /// The PostgreSQL URL (`postgres://user:pass@host:port/db`); never logged.
    pub url: String,
    /// Participant name (barrier rows and gids carry it).
    pub participant: String,
    /// The deployment id (see the module doc).
    pub deployment: String,
    /// Connections, each carrying out its share of a batch concurrently with the others.
    pub connections: usize,
    /// `lock_timeout` of every statement: a row held longer (e.g. by another transaction's
    /// prepared branch) refuses the prepare, or makes a saga step answer `error` (retried).
    pub lock_timeout: Duration,
    /// Finished barriers are kept this long (a repeat within it is recognised).
    pub retention: Duration,
    /// Where transaction records live (the stream Redis) and how many partitions the deployment
    /// has, for the sweep of prepared transactions left behind (`None`: no sweep).
    pub records: Option<(RedisUrl, u32)>,
    /// A prepared transaction this old whose transaction has no record is rolled back by the
    /// sweep: no coordinator can commit it any more (its deadline is long past).
    pub orphan_after: Duration,
}

/// A failure that is not the business's: the request stays pending and is retried.
struct Fault(String);

impl From<tokio_postgres::Error> for Fault {
    fn from(e: tokio_postgres::Error) -> Self {
        Fault(describe(&e))
    }
}

/// What a transition's local transaction ended with.
enum Ran {
    /// The statements ran and their guards held.
    Ok,
    /// The business refused: PostgreSQL's message, or a failed guard.
    Refused(String),
    /// A lock was not granted in time, a deadlock or a serialization failure: try again later.
    Contended(String),
}

/// One connection of a [`PgResource`] and what it carries out. Connects lazily and reconnects
/// after a lost connection.
pub struct Lane {
    opts: PgOptions,
    client: Option<Client>,
    statements: HashMap<String, tokio_postgres::Statement>,
    cleaned_at: Option<std::time::Instant>,
}

/// PostgreSQL's message for `e`, with its SQLSTATE and detail.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!(": {d}"));
            }
            s
        }
        None => format!("PostgreSQL connection: {e}"),
    }
}

/// `s` as a literal `LIKE` pattern.
fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

/// Whether `e` is the business's (a SQL error with a state) rather than the connection's or
/// the server's (class 08 connection, 53 resources, 57 operator intervention, 58 system).
fn is_business(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| !["08", "53", "57", "58"].iter().any(|c| db.code().code().starts_with(c)))
}

fn is_contention(e: &tokio_postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE)
}

impl Lane {
    /// A lane with `opts`; nothing is connected yet.
    pub fn new(opts: PgOptions) -> Self {
        Lane { opts, client: None, statements: HashMap::new(), cleaned_at: None }
    }

    /// The prefix of every gid of this participant in this deployment.
    pub fn gid_prefix(&self) -> String {
        format!("redtx:{}:{}:", self.opts.deployment, self.opts.participant)
    }

    /// The gid of `txn`'s prepared transaction.
    pub fn gid(&self, txn: &str) -> String {
        let gid = format!("{}{txn}", self.gid_prefix());
        if gid.len() <= MAX_GID {
            gid
        } else {
            format!("{}{}", self.gid_prefix(), uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, txn.as_bytes()))
        }
    }

    /// Connects (if needed), creates the barrier table and sets the lock timeout. Returns the
    /// gids of this participant's transactions PostgreSQL holds prepared (from before a crash:
    /// they finish when their decisions arrive).
    pub async fn connect(&mut self) -> redtx_common::Result<Vec<String>> {
        let what = self.what();
        let found = match self.client().await {
            Ok(_) => self.prepared().await,
            Err(f) => Err(f),
        };
        found.map_err(|f| Error::Resource { resource: what, detail: f.0 })
    }

    fn what(&self) -> String {
        format!("PostgreSQL participant {}", self.opts.participant)
    }

    async fn client(&mut self) -> Result<&Client, Fault> {
        if self.client.is_none() {
            let (client, connection) = tokio_postgres::connect(&self.opts.url, NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %describe(&e), "PostgreSQL connection closed");
                }
            });
            let ms = self.opts.lock_timeout.as_millis().max(1);
            // Notices (e.g. "relation already exists, skipping") are not worth a log line.
            client.batch_execute(&format!("SET lock_timeout = {ms}; SET client_min_messages = warning")).await?;
            // Two processes creating the table at once: one of them loses the race once.
            if let Err(e) = client.batch_execute(CREATE_TABLE).await {
                tracing::debug!(error = %describe(&e), "creating redtx_barrier again");
                client.batch_execute(CREATE_TABLE).await?;
            }
            self.statements.clear();
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("just connected"))
    }

    /// The gids of this participant's prepared transactions in this database.
    async fn prepared(&mut self) -> Result<Vec<String>, Fault> {
        let like = format!("{}%", like_escape(&self.gid_prefix()));
        let rows = self
            .client()
            .await?
            .query("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE $1 AND database = current_database()", &[&like])
            .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// The barrier of `txn` as it is now: the prepared transaction first, then the row (in this
    /// order, so that a commit between the two reads is seen as committed, never as nothing).
    async fn read(&mut self, txn: &str) -> Result<Option<Barrier>, Fault> {
        if self.is_prepared(txn).await? {
            return Ok(Some(Barrier::new(BarrierState::Prepared)));
        }
        let name = self.opts.participant.clone();
        let st = self
            .stmt("SELECT state, reason, deadline_ms FROM redtx_barrier WHERE participant = $1 AND txn = $2")
            .await?;
        let row = self.client().await?.query_opt(&st, &[&name, &txn]).await?;
        let Some(row) = row else { return Ok(None) };
        let state: String = row.get(0);
        let state = match state.as_str() {
            // Committed with its prepared transaction; the row was not updated yet.
            "prepared" => BarrierState::Committed,
            s => BarrierState::parse(s).ok_or_else(|| Fault(format!("redtx_barrier holds an unknown state {s:?}")))?,
        };
        let deadline: Option<i64> = row.get(2);
        Ok(Some(Barrier { state, reason: row.get(1), deadline_ms: deadline.map(|d| d as u64) }))
    }

    /// Whether PostgreSQL holds `txn`'s branch prepared.
    async fn is_prepared(&mut self, txn: &str) -> Result<bool, Fault> {
        let gid = self.gid(txn);
        let st = self.stmt("SELECT 1 FROM pg_prepared_xacts WHERE gid = $1 AND database = current_database()").await?;
        let row = self.client().await?.query_opt(&st, &[&gid]).await?;
        Ok(row.is_some())
    }

    /// The prepared statement of `sql` on this connection (prepared once, then cached: one round
    /// trip per use instead of two).
    async fn stmt(&mut self, sql: &str) -> Result<tokio_postgres::Statement, Fault> {
        if let Some(st) = self.statements.get(sql) {
            return Ok(st.clone());
        }
        let st = self.client().await?.prepare(sql).await?;
        self.statements.insert(sql.to_string(), st.clone());
        Ok(st)
    }

    async fn moved(&mut self, txn: &str) -> Result<Applied, Fault> {
        Ok(Applied::Moved(self.read(txn).await?))
    }

    /// Runs `statements` in the open transaction, checking their guards.
    async fn statements(&mut self, statements: &[Statement]) -> Result<Ran, Fault> {
        for (i, s) in statements.iter().enumerate() {
            let prepared = match self.statements.get(&s.sql) {
                Some(p) => p.clone(),
                None => match self.client().await?.prepare(&s.sql).await {
                    Ok(p) => {
                        // User SQL is cached too, up to a bound (a payload may carry any SQL).
                        if self.statements.len() >= MAX_STATEMENTS {
                            self.statements.clear();
                        }
                        self.statements.insert(s.sql.clone(), p.clone());
                        p
                    }
                    Err(e) => return self.refusal(i, &e),
                },
            };
            if prepared.params().len() != s.params.len() {
                return Ok(Ran::Refused(format!(
                    "statement {i}: the SQL takes {} parameters, {} given",
                    prepared.params().len(),
                    s.params.len()
                )));
            }
            let params = match s
                .params
                .iter()
                .zip(prepared.params())
                .enumerate()
                .map(|(n, (v, ty))| bind(v, ty, n + 1))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(p) => p,
                Err(why) => return Ok(Ran::Refused(format!("statement {i}: {why}"))),
            };
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            match self.client().await?.execute(&prepared, &refs).await {
                Ok(n) => {
                    if let Some(want) = s.rows.filter(|&w| w != n) {
                        return Ok(Ran::Refused(format!("statement {i} changed {n} rows, expected {want}")));
                    }
                }
                Err(e) => return self.refusal(i, &e),
            }
        }
        Ok(Ran::Ok)
    }

    fn refusal(&mut self, i: usize, e: &tokio_postgres::Error) -> Result<Ran, Fault> {
        if !is_business(e) {
            return Err(Fault(describe(e)));
        }
        let why = format!("statement {i}: {}", describe(e));
        Ok(if is_contention(e) { Ran::Contended(why) } else { Ran::Refused(why) })
    }

    /// Ends the open transaction with `ROLLBACK`.
    async fn rollback(&mut self) -> Result<(), Fault> {
        Ok(self.client().await?.batch_execute("ROLLBACK").await?)
    }

    /// Opens a transaction whose first write is the barrier row in `state` (a unique violation
    /// means the barrier moved: `Ok(false)`, rolled back).
    async fn begin_with_row(&mut self, req: &Request, state: BarrierState, now_ms: u64) -> Result<bool, Fault> {
        let deadline = match req {
            Request::Prepare(p) => Some(p.deadline_ms as i64),
            _ => None,
        };
        let (name, txn, branch) = (self.opts.participant.clone(), req.txn().to_string(), req.branch() as i32);
        let (state, now) = (state.as_str(), now_ms as i64);
        let params: [&(dyn ToSql + Sync); 6] = [&name, &txn, &branch, &state, &deadline, &now];
        let st = self
            .stmt("INSERT INTO redtx_barrier (participant, txn, branch, state, deadline_ms, at_ms) VALUES ($1, $2, $3, $4, $5, $6)")
            .await?;
        let c = self.client().await?;
        // One round trip: both are sent before the first reply is read.
        let (begun, insert) = tokio::join!(c.batch_execute("BEGIN"), c.execute(&st, &params));
        begun?;
        match insert {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) || is_contention(&e) => {
                self.rollback().await?;
                Ok(false)
            }
            Err(e) => {
                let _ = self.rollback().await;
                Err(e.into())
            }
        }
    }

    /// Records `state` with `reason` on a barrier that is `expect` (none: inserted), outside any
    /// business change. `Ok(false)`: the barrier moved.
    async fn record(
        &mut self,
        req: &Request,
        expect: Option<BarrierState>,
        state: BarrierState,
        reason: Option<&str>,
        now_ms: u64,
    ) -> Result<bool, Fault> {
        let (name, txn, branch) = (self.opts.participant.clone(), req.txn().to_string(), req.branch() as i32);
        let deadline = match req {
            Request::Prepare(p) => Some(p.deadline_ms as i64),
            _ => None,
        };
        // A branch PostgreSQL holds prepared is not "none" (and its uncommitted row would make
        // the insert wait for it).
        if expect.is_none() && self.is_prepared(&txn).await? {
            return Ok(false);
        }
        let n = match expect {
            None => {
                let st = self.stmt("INSERT INTO redtx_barrier (participant, txn, branch, state, reason, deadline_ms, at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING").await?;
                let c = self.client().await?;
                c.execute(&st, &[&name, &txn, &branch, &state.as_str(), &reason, &deadline, &(now_ms as i64)]).await
            }
            Some(from) => {
                let st = self.stmt("UPDATE redtx_barrier SET state = $3, reason = $4, at_ms = $5 WHERE participant = $1 AND txn = $2 AND state = $6").await?;
                let c = self.client().await?;
                c.execute(&st, &[&name, &txn, &state.as_str(), &reason, &(now_ms as i64), &from.as_str()]).await
            }
        };
        match n {
            Ok(n) => Ok(n == 1),
            Err(e) if is_contention(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Confirm or Cancel of a prepared branch, in one round trip: `COMMIT PREPARED` then the
    /// row says `committed`, or `ROLLBACK PREPARED` then a tombstone. The second statement is
    /// harmless when the first finds nothing to finish: the update matches only a committed
    /// branch's `prepared` row, the tombstone only a barrier that is not there (which an abort
    /// would leave anyway). `Ok(false)`: PostgreSQL held no such prepared transaction.
    async fn resolve(&mut self, req: &Request, commit: bool, now_ms: u64) -> Result<bool, Fault> {
        let (name, txn, branch) = (self.opts.participant.clone(), req.txn().to_string(), req.branch() as i32);
        let verb = if commit { "COMMIT" } else { "ROLLBACK" };
        // The gid is made of checked names only (see the module doc); quotes are doubled anyway.
        let finish = format!("{verb} PREPARED '{}'", self.gid(&txn).replace('\'', "''"));
        let now = now_ms as i64;
        let (record, params): (&str, Vec<&(dyn ToSql + Sync)>) = if commit {
            (
                "UPDATE redtx_barrier SET state = 'committed', at_ms = $3 WHERE participant = $1 AND txn = $2 AND state = 'prepared'",
                vec![&name, &txn, &now],
            )
        } else {
            (
                "INSERT INTO redtx_barrier (participant, txn, branch, state, at_ms) VALUES ($1, $2, $4, 'aborted', $3) ON CONFLICT DO NOTHING",
                vec![&name, &txn, &now, &branch],
            )
        };
        let st = self.stmt(record).await?;
        let c = self.client().await?;
        let (finished, recorded) = tokio::join!(c.batch_execute(&finish), c.execute(&st, &params));
        match finished {
            Ok(()) => {}
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        match recorded {
            Ok(_) => Ok(true),
            // Finished; the row catches up on a repeat (a `prepared` row without its prepared
            // transaction reads as committed; no row after a rollback reads as no barrier).
            Err(e) if is_contention(&e) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    /// One transition (see the module doc).
    async fn one(&mut self, t: &Transition<'_>) -> Result<Applied, Fault> {
        let req = t.request;
        let txn = req.txn();
        let now = t.now_ms;
        let name = self.opts.participant.clone();
        let prefix = move |why: String| format!("{name}: {why}");
        match &t.work {
            Work::Try | Work::Action => {
                let (ok, refused) = if t.work == Work::Try {
                    (BarrierState::Prepared, BarrierState::Refused)
                } else {
                    (BarrierState::Done, BarrierState::Failed)
                };
                if t.expect.is_some() {
                    return self.moved(txn).await;
                }
                let statements = match payload::decode(req.payload()) {
                    Ok(s) => s,
                    Err(why) => return self.refuse(req, refused, prefix(why), now).await,
                };
                // A branch prepared before a crash holds its (invisible) row: the insert below
                // waits for it until the lock timeout, and the barrier reads as prepared.
                if !self.begin_with_row(req, ok, now).await? {
                    return self.moved(txn).await;
                }
                match self.statements(&statements).await {
                    Ok(Ran::Ok) => {}
                    Ok(Ran::Refused(why)) => {
                        self.rollback().await?;
                        return self.refuse(req, refused, prefix(why), now).await;
                    }
                    Ok(Ran::Contended(why)) => {
                        self.rollback().await?;
                        return if t.work == Work::Try {
                            self.refuse(req, refused, prefix(why), now).await
                        } else {
                            Ok(Applied::Busy(prefix(why)))
                        };
                    }
                    Err(f) => {
                        self.client = None;
                        return Err(f);
                    }
                }
                let end = if t.work == Work::Try {
                    format!("PREPARE TRANSACTION '{}'", self.gid(txn).replace('\'', "''"))
                } else {
                    "COMMIT".to_string()
                };
                match self.client().await?.batch_execute(&end).await {
                    Ok(()) => Ok(Applied::Done { state: ok, reason: None }),
                    // e.g. max_prepared_transactions = 0: PostgreSQL says so, and the branch is
                    // refused (the transaction was rolled back by the failed PREPARE).
                    Err(e) if is_business(&e) && !is_contention(&e) => {
                        let _ = self.rollback().await;
                        self.refuse(req, refused, prefix(describe(&e)), now).await
                    }
                    Err(e) => {
                        self.client = None;
                        Err(e.into())
                    }
                }
            }
            Work::Confirm | Work::Cancel => {
                let commit = t.work == Work::Confirm;
                if t.expect != Some(BarrierState::Prepared) || !self.resolve(req, commit, now).await? {
                    return self.moved(txn).await;
                }
                let state = if commit { BarrierState::Committed } else { BarrierState::Aborted };
                Ok(Applied::Done { state, reason: None })
            }
            Work::Compensation => {
                if t.expect != Some(BarrierState::Done) {
                    return self.moved(txn).await;
                }
                let statements = match payload::decode_compensation(req.payload()) {
                    Ok(s) => s,
                    Err(why) => return Ok(Applied::Done { state: BarrierState::Done, reason: Some(prefix(why)) }),
                };
                let (name, txn_s, at) = (self.opts.participant.clone(), txn.to_string(), now as i64);
                let st = self.stmt("UPDATE redtx_barrier SET state = 'compensated', reason = NULL, at_ms = $3 WHERE participant = $1 AND txn = $2 AND state = 'done'").await?;
                let c = self.client().await?;
                let params: [&(dyn ToSql + Sync); 3] = [&name, &txn_s, &at];
                let (begun, n) = tokio::join!(c.batch_execute("BEGIN"), c.execute(&st, &params));
                begun?;
                match n {
                    Ok(1) => {}
                    Ok(_) => {
                        self.rollback().await?;
                        return self.moved(txn).await;
                    }
                    Err(e) => {
                        let _ = self.rollback().await;
                        return if is_contention(&e) { Ok(Applied::Busy(prefix(describe(&e)))) } else { Err(e.into()) };
                    }
                }
                match self.statements(&statements).await {
                    Ok(Ran::Ok) => {
                        self.client().await?.batch_execute("COMMIT").await?;
                        Ok(Applied::Done { state: BarrierState::Compensated, reason: None })
                    }
                    Ok(Ran::Refused(why)) => {
                        self.rollback().await?;
                        Ok(Applied::Done { state: BarrierState::Done, reason: Some(prefix(why)) })
                    }
                    Ok(Ran::Contended(why)) => {
                        self.rollback().await?;
                        Ok(Applied::Busy(prefix(why)))
                    }
                    Err(f) => {
                        self.client = None;
                        Err(f)
                    }
                }
            }
            Work::Mark { to, reason } => {
                if self.record(req, t.expect, *to, reason.as_deref(), now).await? {
                    Ok(Applied::Done { state: *to, reason: reason.clone() })
                } else {
                    self.moved(txn).await
                }
            }
        }
    }

    /// Records a refusal (`refused` or `failed`, with the reason) on a barrier that has none.
    async fn refuse(&mut self, req: &Request, state: BarrierState, why: String, now: u64) -> Result<Applied, Fault> {
        if self.record(req, None, state, Some(&why), now).await? {
            Ok(Applied::Done { state, reason: Some(why) })
        } else {
            self.moved(req.txn()).await
        }
    }

    /// Finishes this participant's prepared transactions whose decision is known from their
    /// record (`committing`/`committed`: commit; `aborting`/`aborted`: roll back), and rolls
    /// back those older than `orphan_after` whose transaction has no record at all. Normally
    /// the decision messages finish them; this covers decisions that can no longer arrive (a
    /// stream Redis that lost its data). Returns how many it finished. `sweep_every` says how
    /// often to run it.
    pub async fn sweep(&mut self) -> redtx_common::Result<usize> {
        let what = self.what();
        self.sweep_inner().await.map_err(|Fault(detail)| Error::Resource { resource: what, detail })
    }

    /// How often [`Lane::sweep`] should run: every 30 s, or sooner when `orphan_after`
    /// is shorter.
    pub fn sweep_every(&self) -> Duration {
        SWEEP_EVERY.min(self.opts.orphan_after.max(Duration::from_millis(100)))
    }

    async fn sweep_inner(&mut self) -> Result<usize, Fault> {
        let Some((url, partitions)) = self.opts.records.clone() else { return Ok(0) };
        let like = format!("{}%", like_escape(&self.gid_prefix()));
        let rows = self
            .client()
            .await?
            .query(
                "SELECT gid, extract(epoch FROM now() - prepared)::float8 FROM pg_prepared_xacts \
                 WHERE gid LIKE $1 AND database = current_database()",
                &[&like],
            )
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut redis = url.connect().await.map_err(|e| Fault(e.to_string()))?;
        let prefix = self.gid_prefix();
        let mut finished = 0;
        for row in rows {
            let (gid, age): (String, f64) = (row.get(0), row.get(1));
            let Some(txn) = gid.strip_prefix(&prefix).map(str::to_string) else { continue };
            // A hashed gid (a very long id) does not name its transaction: left to the messages.
            if self.gid(&txn) != gid {
                continue;
            }
            let key = keys::txn_record(keys::partition(&txn, partitions), &txn);
            let state: Option<String> = redis::cmd("HGET")
                .arg(&key)
                .arg("state")
                .query_async(&mut redis)
                .await
                .map_err(|e| Fault(format!("{url}: {e}")))?;
            let commit = match state.as_deref().and_then(TxnState::parse) {
                Some(TxnState::Committing | TxnState::Committed) => true,
                Some(TxnState::Aborting | TxnState::Aborted) => false,
                None if age >= self.opts.orphan_after.as_secs_f64() => false,
                _ => continue,
            };
            // The gid does not carry the branch index: the row says 0 (informational only).
            let req = Request::Abort(redtx_common::protocol::Resolve {
                txn: txn.clone(),
                branch: 0,
                participant: self.opts.participant.clone(),
            });
            if self.resolve(&req, commit, redtx_common::now_ms()).await? {
                finished += 1;
                tracing::warn!(
                    participant = %self.opts.participant, txn = %txn, record = state.as_deref().unwrap_or("none"),
                    age_s = age as u64, "finished a prepared transaction whose decision message had not arrived: {}",
                    if commit { "committed" } else { "rolled back" }
                );
            }
        }
        Ok(finished)
    }

    /// Deletes this participant's barriers older than the retention, now and then.
    async fn cleanup(&mut self) -> Result<(), Fault> {
        if self.cleaned_at.is_some_and(|at| at.elapsed() < CLEANUP_EVERY) {
            return Ok(());
        }
        self.cleaned_at = Some(std::time::Instant::now());
        // Never sooner than the longest timeout plus the skew margin: a tombstone must outlive
        // any prepare it has to refuse.
        let keep = self.opts.retention.max(redtx_common::spec::MAX_TIMEOUT + redtx_participant::barrier::SKEW);
        let horizon = redtx_common::now_ms().saturating_sub(keep.as_millis() as u64) as i64;
        let name = self.opts.participant.clone();
        let n = self
            .client()
            .await?
            .execute("DELETE FROM redtx_barrier WHERE participant = $1 AND at_ms < $2", &[&name, &horizon])
            .await?;
        if n > 0 {
            tracing::debug!(participant = %name, deleted = n, "forgot barriers past their retention");
        }
        Ok(())
    }
}

/// The PostgreSQL resource: [`PgOptions::connections`] lanes, each a connection. A batch's
/// transitions (each on its own barrier: the runtime never puts two of one barrier in a batch)
/// are dealt to the lanes and carried out concurrently, one after the other within a lane.
pub struct PgResource {
    lanes: Vec<Lane>,
}

impl PgResource {
    /// A resource with `opts`; nothing is connected yet.
    pub fn new(opts: PgOptions) -> Self {
        let n = opts.connections.max(1);
        PgResource { lanes: (0..n).map(|_| Lane::new(opts.clone())).collect() }
    }

    /// The first lane (connecting, sweeping, naming gids).
    pub fn lane(&mut self) -> &mut Lane {
        &mut self.lanes[0]
    }

    /// See [`Lane::connect`]: connects every lane.
    pub async fn connect(&mut self) -> redtx_common::Result<Vec<String>> {
        for lane in &mut self.lanes[1..] {
            lane.connect().await?;
        }
        self.lanes[0].connect().await
    }
}

impl Lane {
    async fn apply_all(&mut self, batch: &[(usize, &Transition<'_>)]) -> Vec<(usize, Result<Applied, String>)> {
        let mut out = Vec::with_capacity(batch.len());
        for (i, t) in batch {
            if t.request.participant() != self.opts.participant {
                out.push((*i, Err(format!("request for {:?} given to {}", t.request.participant(), self.what()))));
                continue;
            }
            let r = self.one(t).await.map_err(|Fault(why)| {
                // The connection may be gone with an open transaction: start afresh (PostgreSQL
                // rolls back what the closed session had open).
                self.client = None;
                why
            });
            out.push((*i, r));
        }
        out
    }
}

impl Resource for PgResource {
    async fn apply(&mut self, batch: &[Transition<'_>]) -> redtx_common::Result<Vec<Result<Applied, String>>> {
        let n = self.lanes.len();
        let mut dealt: Vec<Vec<(usize, &Transition<'_>)>> = vec![Vec::new(); n];
        for (i, t) in batch.iter().enumerate() {
            dealt[i % n].push((i, t));
        }
        let runs = self.lanes.iter_mut().zip(&dealt).map(|(lane, part)| lane.apply_all(part));
        let mut out: Vec<Option<Result<Applied, String>>> = vec![None; batch.len()];
        for (i, r) in futures::future::join_all(runs).await.into_iter().flatten() {
            out[i] = Some(r);
        }
        let lane = &mut self.lanes[0];
        if let Err(Fault(why)) = lane.cleanup().await {
            tracing::warn!(participant = %lane.opts.participant, error = %why, "could not delete old barriers");
        }
        Ok(out.into_iter().map(|r| r.expect("every transition dealt")).collect())
    }
}
