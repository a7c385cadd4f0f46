//! The real `redtx-coordinator` binary: arguments, exit codes, and crash recovery at the fail
//! points (frozen there, `kill -9`ed, finished by another coordinator).

mod common;

use common::{transfer, Env};
use redtx_common::protocol::Outcome;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const BIN: &str = env!("CARGO_BIN_EXE_redtx-coordinator");

#[test]
fn help_and_a_bad_url() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--redis", "--batch", "--claim-idle", "--resend-every", "--retention"] {
        assert!(help.contains(flag), "{help}");
    }
    let out = Command::new(BIN).args(["--redis", "http://bob:hunter2@nowhere"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(all.contains("invalid Redis URL"), "{all}");
    assert!(!all.contains("hunter2"), "{all}");
    let out = Command::new(BIN).env("REDTX_REDIS_URL", "nope://:hunter2@x").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
    let out = Command::new(BIN).args(["--claim-idle", "soon"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A running binary and whether it announced reaching its fail point.
struct Proc {
    child: Child,
    reached: Arc<AtomicBool>,
}

/// Starts the binary, optionally with a fail point armed.
fn coordinator(url: &str, failpoint: Option<&str>) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(["--redis", url, "--claim-idle", "300ms", "--resend-every", "200ms"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(fp) = failpoint {
        cmd.env("REDTX_FAILPOINT", fp);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let reached = Arc::new(AtomicBool::new(false));
    let r = reached.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("failpoint") && line.contains("reached") {
                r.store(true, Ordering::SeqCst);
            }
        }
    });
    Proc { child, reached }
}

/// Waits until `p` is frozen at its fail point with `txn` in `state`, then `kill -9`s it.
async fn frozen(env: &Env, p: &mut Proc, txn: &str, state: &str) {
    env.until(&format!("{txn} to reach {state} in the frozen coordinator"), || async {
        let rec = env.record(txn).await.filter(|r| r.state.as_str() == state);
        rec.filter(|_| p.reached.load(Ordering::SeqCst))
    })
    .await;
    assert!(p.child.try_wait().unwrap().is_none(), "the coordinator must be frozen, not dead");
    p.child.kill().unwrap(); // SIGKILL
    p.child.wait().unwrap();
}

#[tokio::test]
async fn killed_after_create_another_coordinator_prepares() {
    let env = Env::start().await;
    let url = env.server.url();
    let mut a = coordinator(&url, Some("coordinator-after-create"));
    env.client.submit(&transfer("k1")).await.unwrap();
    frozen(&env, &mut a, "k1", "preparing").await;
    assert!(env.inbox("a").await.is_empty(), "no prepare was sent before the fail point");
    let mut b = coordinator(&url, None);
    env.until_inbox("a", "k1", &["prepare"]).await;
    env.until_inbox("b", "k1", &["prepare"]).await;
    env.vote("k1", 0, "a", true, None).await;
    env.vote("k1", 1, "b", true, None).await;
    env.until_inbox("b", "k1", &["prepare", "commit"]).await;
    env.ack("k1", 0, "a", Outcome::Committed).await;
    env.ack("k1", 1, "b", Outcome::Committed).await;
    env.until_state("k1", "committed").await;
    b.child.kill().unwrap();
    b.child.wait().unwrap();
}

#[tokio::test]
async fn killed_after_decision_another_coordinator_sends_it() {
    let env = Env::start().await;
    let url = env.server.url();
    let mut a = coordinator(&url, Some("coordinator-after-decision"));
    env.client.submit(&transfer("k2")).await.unwrap();
    env.until_inbox("a", "k2", &["prepare"]).await;
    env.vote("k2", 0, "a", true, None).await;
    env.vote("k2", 1, "b", true, None).await;
    frozen(&env, &mut a, "k2", "committing").await;
    assert_eq!(env.inbox_kinds("a", "k2").await, vec!["prepare"], "no commit was sent before the fail point");
    let mut b = coordinator(&url, None);
    env.until("both commits", || async {
        let a = env.inbox_kinds("a", "k2").await;
        let b = env.inbox_kinds("b", "k2").await;
        (a.contains(&"commit") && b.contains(&"commit")).then_some(())
    })
    .await;
    env.ack("k2", 0, "a", Outcome::Committed).await;
    env.ack("k2", 1, "b", Outcome::Committed).await;
    env.until_state("k2", "committed").await;
    // SIGTERM: a clean exit 0.
    Command::new("kill").args(["-TERM", &b.child.id().to_string()]).status().unwrap();
    assert_eq!(b.child.wait().unwrap().code(), Some(0));
}
