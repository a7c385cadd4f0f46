//! `redtx status`: show a transaction's record.

use crate::{fail, output, Exit};
use redtx_common::spec::check_id;
use redtx_common::{Client, Error};

pub async fn run(url: &str, partitions: u32, json: bool, id: &str) -> Exit {
    if let Err(e) = check_id("id", id) {
        return fail(&Error::Spec(e));
    }
    let client = match Client::connect(url).await {
        Ok(c) => c.with_partitions(partitions),
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
                "no transaction {id} in partition {} of {partitions} at {}: never submitted, not yet picked up by a \
                 coordinator, expired after its retention, or the deployment uses another --partitions",
                client.partition(id),
                client.url()
            );
            Exit::Aborted
        }
        Err(e) => fail(&e),
    }
}
