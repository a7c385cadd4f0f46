//! `redtx status`: show a transaction's record.

use crate::{fail, output, Exit};
use redtx_common::spec::check_id;
use redtx_common::{Client, Error};

pub async fn run(url: &str, json: bool, id: &str) -> Exit {
    if let Err(e) = check_id("id", id) {
        return fail(&Error::Spec(e));
    }
    let client = match Client::connect(url).await {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    match client.status(id).await {
        Ok(Some(r)) => {
            print!("{}", if json { output::json(&r) + "\n" } else { output::text(&r) });
            Exit::Ok
        }
        Ok(None) => {
            if json {
                println!("{}", output::json_state(id, "unknown", Some("no such transaction")));
            }
            eprintln!(
                "no transaction {id} at {}: never submitted, not yet picked up by a coordinator, or expired after its retention",
                client.url()
            );
            Exit::Aborted
        }
        Err(e) => fail(&e),
    }
}
