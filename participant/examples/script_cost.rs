//! What the key-value participant's scripts cost on Redis, per transition, with nothing else
//! running: a private `redis-server`, batches of 2PC prepares then commits (one `incrby` with a
//! `min` guard per branch, as `redtx bench` sends), settled through the real runtime
//! (`worker::settle`, so the calls are exactly the participant's). Reports the server's
//! `EVALSHA` microseconds per transition (`INFO commandstats`), and how much of it the Redis
//! commands inside the scripts took, and the server's whole CPU (`/proc/<pid>/stat`: the
//! `EVALSHA`s with the parsing of their arguments and the writing of their replies) per
//! prepared-and-committed transaction.
//!
//! ```sh
//! cargo run --release -p redtx-participant --example script_cost -- [batch] [blocks]
//! ```

use redis::AsyncCommands;
use redtx_common::conn::RedisUrl;
use redtx_common::kv::{encode_ops, IncrbyOp, Op};
use redtx_common::protocol::{Prepare, Resolve};
use redtx_common::server::{RedisServer, ServerOptions};
use redtx_participant::{worker, KvResource, Request};
use std::collections::HashMap;
use std::time::Duration;

const NAME: &str = "bank-a";

/// `INFO commandstats` as command -> (calls, usec).
async fn stats(c: &mut redis::aio::MultiplexedConnection) -> HashMap<String, (u64, u64)> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(c).await.expect("INFO");
    let mut out = HashMap::new();
    for line in info.lines().filter_map(|l| l.strip_prefix("cmdstat_")) {
        let Some((name, rest)) = line.split_once(':') else { continue };
        let field = |f: &str| {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(f).and_then(|v| v.strip_prefix('=')))
                .and_then(|v| v.parse().ok())
        };
        out.insert(name.to_string(), (field("calls").unwrap_or(0), field("usec").unwrap_or(0)));
    }
    out
}

/// (EVALSHA usec, usec of every other command) between two snapshots.
fn delta(a: &HashMap<String, (u64, u64)>, b: &HashMap<String, (u64, u64)>) -> (u64, u64) {
    let d = |k: &str| b.get(k).map(|x| x.1).unwrap_or(0) - a.get(k).map(|x| x.1).unwrap_or(0);
    let inner =
        b.keys().filter(|k| !matches!(k.as_str(), "evalsha" | "info" | "script" | "evalsha_ro")).map(|k| d(k)).sum();
    (d("evalsha"), inner)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(30);
    let blocks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let server =
        RedisServer::start_with(ServerOptions { aof: false, ..Default::default() }).expect("redis-server starts");
    let url = RedisUrl::parse(&server.url()).expect("url");
    let mut c = url.connect().await.expect("connect");
    let mut kv = KvResource::new(url, NAME, Duration::from_secs(3600));
    for i in 0..batch {
        let _: () = c.set(format!("acct:{i}"), 1_000_000_000).await.expect("SET");
    }
    let cpu0 = server.pid().and_then(redtx_common::server::cpu_ticks);
    let (mut prep, mut commit) = (Vec::new(), Vec::new());
    let (mut prep_inner, mut commit_inner) = (Vec::new(), Vec::new());
    for block in 0..blocks {
        let txn = |i: usize| format!("b{block}-t{i}");
        let prepares: Vec<Request> = (0..batch)
            .map(|i| {
                let op = Op::Incrby(IncrbyOp { key: format!("acct:{i}"), by: -1, min: Some(0), max: None });
                Request::Prepare(Prepare {
                    txn: txn(i),
                    branch: 0,
                    participant: NAME.into(),
                    deadline_ms: redtx_common::now_ms() + 60_000,
                    payload: encode_ops(&[op]),
                })
            })
            .collect();
        let commits: Vec<Request> =
            (0..batch).map(|i| Request::Commit(Resolve { txn: txn(i), branch: 0, participant: NAME.into() })).collect();
        let s0 = stats(&mut c).await;
        let answers = worker::settle(&mut kv, &prepares, redtx_common::now_ms()).await.expect("prepare");
        assert!(answers.iter().all(|a| a.is_ok()), "{:?}", answers.iter().find(|a| a.is_err()));
        let s1 = stats(&mut c).await;
        let answers = worker::settle(&mut kv, &commits, redtx_common::now_ms()).await.expect("commit");
        assert!(answers.iter().all(|a| a.is_ok()), "{:?}", answers.iter().find(|a| a.is_err()));
        let s2 = stats(&mut c).await;
        let (p, pi) = delta(&s0, &s1);
        let (k, ki) = delta(&s1, &s2);
        let per = |x: u64| x as f64 / batch as f64;
        prep.push(per(p));
        prep_inner.push(per(pi));
        commit.push(per(k));
        commit_inner.push(per(ki));
    }
    let cpu = match (cpu0, server.pid().and_then(redtx_common::server::cpu_ticks)) {
        // Clock ticks of 10 ms (CLK_TCK is 100 on Linux).
        (Some(a), Some(b)) => format!("{:.1} us", (b - a) as f64 * 10_000.0 / (blocks * batch) as f64),
        _ => "not measured".into(),
    };
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!(
        "per transition, median of {blocks} blocks of {batch}: prepare {:.1} us (commands inside {:.1}), commit {:.1} us (commands inside {:.1}); server CPU per prepare + commit {cpu}",
        median(&mut prep),
        median(&mut prep_inner),
        median(&mut commit),
        median(&mut commit_inner)
    );
}
