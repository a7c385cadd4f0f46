//! The Python producer of `examples/python`, written from `docs/protocol.md` alone, against a
//! private deployment: its transfer commits and its saga completes, as Redis shows.

use redis::Commands;
use redtx_common::record::TxnState;
use redtx_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Panics with what to do unless `python3` can import redis-py and msgpack.
fn require_python_modules() {
    let ok = Command::new("python3").args(["-c", "import redis, msgpack"]).output();
    match ok {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "python3 cannot import redis and msgpack: run `pip install redis msgpack` (scripts/test.sh does)\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("cannot run python3 ({e}): install Python 3, then `pip install redis msgpack`"),
    }
}

/// The id printed on the line starting with `header` (`transfer (2pc) <id>  [...]`).
fn id_after(output: &str, header: &str) -> String {
    output
        .lines()
        .find_map(|l| l.strip_prefix(header))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no line starting with {header:?} in:\n{output}"))
        .to_string()
}

#[test]
fn the_python_producer_commits_a_transfer_and_completes_a_saga() {
    require_python_modules();
    let bank = Bank::start();
    bank.seed(Side::A, "acct:alice", 100);
    // The producer refuses to submit before the coordinator published its protocol version and
    // the participants created their consumer groups: wait for both.
    let mut s = bank.stream_conn();
    poll("the coordinator and both participants up", LONG, || {
        let version: Option<String> = s.get(keys::protocol()).unwrap();
        let groups = ["bank-a", "bank-b"].iter().all(|name| {
            participant_streams(name).iter().all(|stream| {
                let g: redis::RedisResult<Vec<std::collections::HashMap<String, redis::Value>>> =
                    redis::cmd("XINFO").arg("GROUPS").arg(stream).query(&mut s);
                g.is_ok_and(|g| !g.is_empty())
            })
        });
        (version.is_some() && groups).then_some(())
    });

    let script = workspace_root().join("examples/python/producer.py");
    let mut args = vec![script.display().to_string(), "--redis".into(), bank.url(), "--timeout".into(), "30".into()];
    args.extend(partitions_args());
    let mut producer = Proc::spawn("producer.py", Path::new("python3"), &args, &[]);
    let status = producer.wait_exit(Duration::from_secs(90)).expect("producer.py finished");
    let out = producer.output();
    assert!(status.success(), "producer.py exited {status}:\n{out}");

    let transfer = id_after(&out, "transfer (2pc) ");
    let saga = id_after(&out, "saga (saga) ");
    assert!(out.contains("state:  committed") && out.contains("state:  completed"), "{out}");
    assert_eq!(bank.record(&transfer).map(|r| r.state), Some(TxnState::Committed), "{out}");
    assert_eq!(bank.record(&saga).map(|r| r.state), Some(TxnState::Completed), "{out}");
    // 10 moved by the transfer, 5 by the saga, which also marked its invoice paid.
    assert_eq!(bank.balance(Side::A, "acct:alice"), 85);
    assert_eq!(bank.balance(Side::B, "acct:bob"), 15);
    let invoice: Option<String> = bank.side_conn(Side::B).hget(format!("invoice:{saga}"), "status").unwrap();
    assert_eq!(invoice.as_deref(), Some("paid"));
    assert!(bank.dead_letters().is_empty(), "{:?}", bank.dead_letters());
    bank.assert_clean();
}
