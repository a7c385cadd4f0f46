//! `redtx submit`: validate a JSON spec, enqueue it, optionally wait for its outcome.
//!
//! With `--wait`, a lost connection, a refused one or a Redis still loading its data never ends
//! the command early: connecting, submitting (always with the same id, so never twice) and
//! waiting are retried until `--timeout`, and then it exits 3 with what it knows.

use crate::output::{self, Outcome};
use crate::{fail, Exit};
use redtx_common::conn::RedisTarget;
use redtx_common::consumer::Backoff;
use redtx_common::record::TxnRecord;
use redtx_common::spec::{TxnSpec, MAX_SPEC_BYTES};
use redtx_common::{Client, Error};
use std::io::Read;
use std::time::{Duration, Instant};

/// What `redtx submit` was asked.
pub struct Args<'a> {
    /// `--redis`: one URL, or with `cluster` a comma-separated list of seed nodes.
    pub url: &'a str,
    pub cluster: bool,
    pub partitions: u32,
    pub wait: bool,
    /// `--final`: wait past `aborting`, for the end ([`Client::wait_final`]).
    pub final_only: bool,
    pub timeout: Duration,
    pub json: bool,
    pub file: &'a str,
}

/// Reads at most one byte more than the limit, so an oversized spec is refused without
/// reading all of it.
fn read_spec(file: &str) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    let limit = MAX_SPEC_BYTES as u64 + 1;
    let r = if file == "-" {
        std::io::stdin().lock().take(limit).read_to_end(&mut buf)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(limit).read_to_end(&mut buf))
    };
    r.map_err(|e| format!("cannot read spec {file}: {e}"))?;
    Ok(buf)
}

/// Prints the `--json` object (if asked) and returns `code`.
fn report(json: bool, o: Outcome<'_>, code: Exit) -> Exit {
    if json {
        println!("{}", o.json());
    }
    code
}

/// An outcome without a record.
fn bare<'a>(id: &'a str, enqueued: bool, state: &'a str, reason: Option<&'a str>) -> Outcome<'a> {
    Outcome { id, enqueued, record: None, state, reason, spec_differs: false }
}

pub async fn run(a: Args<'_>) -> Exit {
    let started = Instant::now();
    let bytes = match read_spec(a.file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return report(a.json, bare("", false, "invalid", Some(&e)), Exit::Invalid);
        }
    };
    let spec = match TxnSpec::from_json(&bytes) {
        Ok(s) => s,
        Err(e) => return fail_json(a.json, "", false, &Error::Spec(e)),
    };
    let id = spec.id.as_str();

    let client = match connect(&a, started).await {
        Ok(c) => c.with_partitions(a.partitions),
        Err(e) if a.wait && e.is_transient() => {
            let why = format!(
                "gave up after {:.1}s: {e}; the transaction was not submitted",
                started.elapsed().as_secs_f64()
            );
            eprintln!("error: {why}");
            return report(a.json, bare(id, false, "unknown", Some(&why)), Exit::GaveUp);
        }
        Err(e) => return fail_json(a.json, id, false, &e),
    };
    // A participant nobody ever started (often a typo) makes the transaction abort at its
    // deadline and wait for that participant: say so now rather than after the wait.
    if let Ok(missing) = client.missing_participants(&spec).await {
        for p in missing {
            let then = match spec.mode {
                redtx_common::spec::Mode::Saga => "gives up on that step and stays compensating (then stuck)",
                redtx_common::spec::Mode::TwoPhase => "aborts at its deadline and stays aborting",
            };
            eprintln!(
                "warning: no participant named {p:?} has ever read partition {} of {} at {}; unless one starts (with \
                 the same --partitions), this transaction {then} until {p} answers",
                client.partition(id),
                client.partitions(),
                client.target(),
            );
        }
    }

    if !a.wait {
        // An id submitted before keeps its first spec: say so when this one differs.
        let existing = client.status(id).await.ok().flatten();
        let differs = warn_if_differs(existing.as_ref(), &spec);
        return match client.submit(&spec).await {
            Ok(id) => {
                if a.json {
                    let o = Outcome { spec_differs: differs, ..bare(&id, true, "submitted", None) };
                    report(true, o, Exit::Ok)
                } else {
                    println!("{id}");
                    Exit::Ok
                }
            }
            Err(e) => fail_json(a.json, id, false, &e),
        };
    }

    // Submit, retrying a transient failure with the same id until the timeout.
    let mut backoff = Backoff::default();
    let submitted = loop {
        match client.submit(&spec).await {
            Ok(_) => break Ok(()),
            Err(e) if e.is_transient() && started.elapsed() < a.timeout => {
                tracing::debug!(error = %e, "submit: Redis unavailable; retrying");
                tokio::time::sleep(backoff.next().min(a.timeout.saturating_sub(started.elapsed()))).await;
            }
            Err(e) => break Err(e),
        }
    };
    // Waiting starts only after the submit was acknowledged.
    let (enqueued, result) = match submitted {
        Ok(()) => {
            let left = a.timeout.saturating_sub(started.elapsed());
            let r = if a.final_only { client.wait_final(id, left).await } else { client.wait(id, left).await };
            (true, r)
        }
        Err(e) => (false, Err(e)),
    };
    match result {
        Ok(r) => {
            let differs = warn_if_differs(Some(&r), &spec);
            let code = Exit::of_state(r.state);
            if !a.json {
                println!("{}", output::line(&r));
            }
            report(a.json, Outcome { spec_differs: differs, ..record_outcome(&r, true) }, code)
        }
        Err(e) if matches!(e, Error::WaitTimeout { .. }) || e.is_transient() => {
            // Gave up: say what is known (the record, if Redis answers now).
            let record = client.status(id).await.ok().flatten();
            let enqueued = enqueued || record.is_some();
            match &e {
                Error::WaitTimeout { .. } => eprintln!("error: {e}"),
                _ => eprintln!(
                    "error: gave up after {:.1}s: {e}; the transaction {}",
                    started.elapsed().as_secs_f64(),
                    if enqueued { "goes on" } else { "may not have been submitted (submitting it again is safe)" }
                ),
            }
            let differs = warn_if_differs(record.as_ref(), &spec);
            match &record {
                Some(r) => eprintln!("{}", output::pending(r)),
                None if enqueued => eprintln!(
                    "{id} has no record yet: no coordinator has picked it up (is one running, with --partitions {}?)",
                    client.partitions()
                ),
                None => {}
            }
            let o = match &record {
                Some(r) => record_outcome(r, enqueued),
                None => bare(id, enqueued, "unknown", None),
            };
            report(a.json, Outcome { spec_differs: differs, ..o }, Exit::GaveUp)
        }
        Err(e) => fail_json(a.json, id, enqueued, &e),
    }
}

fn record_outcome(r: &TxnRecord, enqueued: bool) -> Outcome<'_> {
    Outcome {
        id: &r.id,
        enqueued,
        record: Some(r),
        state: r.state.as_str(),
        reason: r.reason.as_deref(),
        spec_differs: false,
    }
}

/// Connects; with `--wait`, retries a transient failure (refused, dropped, `LOADING`) until the
/// timeout.
async fn connect(a: &Args<'_>, started: Instant) -> Result<Client, Error> {
    let target = RedisTarget::parse(a.url, a.cluster)?;
    let mut backoff = Backoff::default();
    loop {
        match Client::connect_target(target.clone()).await {
            Err(e) if a.wait && e.is_transient() && started.elapsed() < a.timeout => {
                tracing::debug!(error = %e, "connect: Redis unavailable; retrying");
                tokio::time::sleep(backoff.next().min(a.timeout.saturating_sub(started.elapsed()))).await;
            }
            r => return r,
        }
    }
}

/// Warns when the stored transaction of this id has another spec; returns whether it does.
fn warn_if_differs(stored: Option<&TxnRecord>, spec: &TxnSpec) -> bool {
    // A rejected record keeps only the id of the spec it refused.
    let differs = stored
        .filter(|r| r.state != redtx_common::record::TxnState::Rejected)
        .and_then(|r| r.spec.as_ref())
        .is_some_and(|s| s != spec);
    if differs {
        eprintln!(
            "warning: transaction {} already exists with a different spec; this is the outcome of the first one",
            spec.id
        );
    }
    differs
}

/// [`fail`], and with `--json` also one object on stdout: `state` is `invalid` (exit 2) or
/// `error`, `reason` the message.
fn fail_json(json: bool, id: &str, enqueued: bool, e: &Error) -> Exit {
    let code = fail(e);
    let state = if code == Exit::Invalid { "invalid" } else { "error" };
    let reason = e.to_string();
    report(json, bare(id, enqueued, state, Some(&reason)), code)
}
