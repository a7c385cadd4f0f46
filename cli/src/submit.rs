//! `redtx submit`: validate a JSON spec, enqueue it, optionally wait for its outcome.

use crate::{fail, output, Exit};
use redtx_common::record::TxnState;
use redtx_common::spec::{TxnSpec, MAX_SPEC_BYTES};
use redtx_common::{Client, Error};
use std::io::Read;
use std::time::Duration;

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

pub async fn run(url: &str, wait: bool, timeout: Duration, json: bool, file: &str) -> Exit {
    let bytes = match read_spec(file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            if json {
                println!("{}", output::json_state("", "invalid", Some(&e)));
            }
            return Exit::Invalid;
        }
    };
    let spec = match TxnSpec::from_json(&bytes) {
        Ok(s) => s,
        Err(e) => return fail_json(json, "", &Error::Spec(e)),
    };
    let client = match Client::connect(url).await {
        Ok(c) => c,
        Err(e) => return fail_json(json, &spec.id, &e),
    };
    // A participant nobody ever started (often a typo) makes the transaction abort at its
    // deadline and wait for that participant: say so now rather than after the wait.
    if let Ok(missing) = client.missing_participants(&spec).await {
        for p in missing {
            eprintln!(
                "warning: no participant named {p:?} has ever connected to {}; unless one starts, this transaction \
                 aborts at its deadline and stays aborting until {p} applies the abort",
                client.url()
            );
        }
    }
    if !wait {
        return match client.submit(&spec).await {
            Ok(id) => {
                println!("{}", if json { output::json_state(&id, "submitted", None) } else { id });
                Exit::Ok
            }
            Err(e) => fail_json(json, &spec.id, &e),
        };
    }
    match client.submit_and_wait(&spec, timeout).await {
        Ok(r) => {
            if r.spec.as_ref().is_some_and(|stored| stored != &spec) {
                eprintln!(
                    "warning: transaction {} already existed with a different spec; this is the outcome of the first one",
                    r.id
                );
            }
            println!("{}", if json { output::json(&r) } else { output::line(&r) });
            if r.state == TxnState::Committed {
                Exit::Ok
            } else {
                Exit::Aborted
            }
        }
        Err(e @ Error::WaitTimeout { .. }) => {
            let record = client.status(&spec.id).await.ok().flatten();
            if json {
                match &record {
                    Some(r) => println!("{}", output::json(r)),
                    None => println!("{}", output::json_state(&spec.id, "unknown", None)),
                }
            }
            let code = fail(&e);
            if let Some(r) = record {
                eprintln!("{}", output::pending(&r));
            }
            code
        }
        Err(e) => fail_json(json, &spec.id, &e),
    }
}

/// [`fail`], and with `--json` also one object on stdout: `state` is `invalid` (exit 2) or
/// `error`, `reason` the message.
fn fail_json(json: bool, id: &str, e: &Error) -> Exit {
    let code = fail(e);
    if json {
        let state = if code == Exit::Invalid { "invalid" } else { "error" };
        println!("{}", output::json_state(id, state, Some(&e.to_string())));
    }
    code
}
