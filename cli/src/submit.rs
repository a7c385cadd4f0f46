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
            return Exit::Invalid;
        }
    };
    let spec = match TxnSpec::from_json(&bytes) {
        Ok(s) => s,
        Err(e) => return fail(&Error::Spec(e)),
    };
    let client = match Client::connect(url).await {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    if !wait {
        return match client.submit(&spec).await {
            Ok(id) => {
                println!("{}", if json { output::json_state(&id, "submitted", None) } else { id });
                Exit::Ok
            }
            Err(e) => fail(&e),
        };
    }
    match client.submit_and_wait(&spec, timeout).await {
        Ok(r) => {
            println!("{}", if json { output::json(&r) } else { output::line(&r) });
            if r.state == TxnState::Committed {
                Exit::Ok
            } else {
                Exit::Aborted
            }
        }
        Err(e @ Error::WaitTimeout { .. }) => {
            if json {
                let state = match client.status(&spec.id).await {
                    Ok(Some(r)) => r.state.as_str().to_string(),
                    _ => "unknown".to_string(),
                };
                println!("{}", output::json_state(&spec.id, &state, None));
            }
            fail(&e)
        }
        Err(e) => fail(&e),
    }
}
