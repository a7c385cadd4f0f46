//! `redtx status`: show a transaction's record.

use crate::{fail, output, Exit};
use redtx_common::conn::RedisTarget;
use redtx_common::spec::check_id;
use redtx_common::{Client, Error};

/// `url`: `--redis`, one URL or (with `cluster`) a comma-separated list of seed nodes.
pub async fn run(url: &str, cluster: bool, partitions: u32, json: bool, id: &str) -> Exit {
    if let Err(e) = check_id("id", id) {
        return fail(&Error::Spec(e));
    }
    let target = match RedisTarget::parse(url, cluster) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let client = match Client::connect_target(target).await {
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
                client.target()
            );
            Exit::Aborted
        }
        Err(e) => fail(&e),
    }
}
