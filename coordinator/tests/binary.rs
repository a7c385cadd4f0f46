//! The real `redtx-coordinator` binary: arguments, exit codes, and crash recovery at the fail
//! points (frozen there, `kill -9`ed, finished by another coordinator).

mod common;

use common::{transfer, Env};
use redtx_common::protocol::Outcome;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_redtx-coordinator");

#[test]
fn help_and_a_bad_url() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--redis", "--partitions", "--lease", "--batch", "--claim-idle", "--resend-every", "--retention"] {
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

/// A running binary and its stderr lines so far.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- coordinator {} stderr:", self.child.id());
            for l in self.lines.lock().unwrap().iter() {
                eprintln!("{l}");
            }
        }
    }
}

impl Proc {
    fn saw(&self, needle: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    fn signal(&self, sig: &str) {
        assert!(Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success());
    }
}

/// Starts the binary (1 s leases), optionally with a fail point armed.
fn coordinator(url: &str, failpoint: Option<&str>) -> Proc {
    coordinator_resending(url, failpoint, "200ms")
}

/// [`coordinator`] with decisions re-sent after `resend_every`.
fn coordinator_resending(url: &str, failpoint: Option<&str>, resend_every: &str) -> Proc {
    let mut cmd = Command::new(BIN);
    let parts = common::PARTITIONS.to_string();
    cmd.args(["--redis", url, "--partitions", &parts, "--lease", "1s", "--claim-idle", "300ms"])
        .args(["--resend-every", resend_every])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(fp) = failpoint {
        cmd.env("REDTX_FAILPOINT", fp);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    Proc { child, lines }
}

/// Waits until `p` reached its fail point (frozen there), then `kill -9`s it.
async fn kill_when_frozen(env: &Env, p: &mut Proc) {
    env.until("the fail point", || async { p.saw("failpoint").then_some(()) }).await;
    assert!(p.child.try_wait().unwrap().is_none(), "the coordinator must be frozen, not dead");
    p.child.kill().unwrap(); // SIGKILL
    p.child.wait().unwrap();
}

#[tokio::test]
async fn killed_before_writing_a_new_transaction_another_coordinator_creates_it() {
    let env = Env::start().await;
    let url = env.server.url();
    let mut a = coordinator(&url, Some("coordinator-after-create"));
    env.until("a to own every partition", || async {
        env.lease_owners().await.iter().all(Option::is_some).then_some(())
    })
    .await;
    env.client.submit(&transfer("k1")).await.unwrap();
    kill_when_frozen(&env, &mut a).await;
    assert!(env.record("k1").await.is_none(), "nothing was written before the fail point");
    assert!(env.inbox("a").await.is_empty());
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
async fn killed_after_a_decision_the_next_owner_finishes_from_the_record() {
    let env = Env::start().await;
    let url = env.server.url();
    let mut a = coordinator(&url, Some("coordinator-after-decision"));
    env.client.submit(&transfer("k2")).await.unwrap();
    env.until_inbox("a", "k2", &["prepare"]).await;
    env.vote("k2", 0, "a", true, None).await;
    env.vote("k2", 1, "b", true, None).await;
    kill_when_frozen(&env, &mut a).await;
    assert_eq!(env.record("k2").await.unwrap().state.as_str(), "committing");
    env.until_inbox("a", "k2", &["prepare", "commit"]).await;
    // The acks reach a partition nobody owns until b takes it over and reloads the record.
    env.ack("k2", 0, "a", Outcome::Committed).await;
    env.ack("k2", 1, "b", Outcome::Committed).await;
    let killed = Instant::now();
    let mut b = coordinator(&url, None);
    env.until_state("k2", "committed").await;
    // Bounded takeover: the lease (1 s), at most a second of grace, a round, the reload.
    eprintln!("takeover after kill -9 with --lease 1s: {:?}", killed.elapsed());
    assert!(killed.elapsed() < Duration::from_secs(5), "takeover took {:?}", killed.elapsed());
    // SIGTERM: a clean exit 0, giving its partitions up.
    b.signal("-TERM");
    assert_eq!(b.child.wait().unwrap().code(), Some(0));
    assert!(env.lease_owners().await.iter().all(Option::is_none), "leases released on exit");
}

#[tokio::test]
async fn an_owner_frozen_past_its_lease_is_fenced_and_steps_down() {
    let env = Env::start().await;
    let url = env.server.url();
    // No re-sends within the test: a second abort could only come from the frozen owner.
    let mut x = coordinator_resending(&url, None, "1h");
    env.until("x to own every partition", || async {
        env.lease_owners().await.iter().all(Option::is_some).then_some(())
    })
    .await;
    // x holds live transactions in memory whose deadlines pass while it is frozen.
    let ids: Vec<String> = (0..8).map(|i| format!("f{i}")).collect();
    for id in &ids {
        env.client.submit(&transfer(id).with_timeout(Duration::from_millis(2500))).await.unwrap();
    }
    for id in &ids {
        env.until_inbox("a", id, &["prepare"]).await;
    }
    x.signal("-STOP");
    let x_owner = env.lease_owners().await[0].clone().unwrap();
    let mut y = coordinator_resending(&url, None, "1h");
    env.until("y to own every partition", || async {
        let o = env.lease_owners().await;
        o.iter().all(|h| h.as_ref().is_some_and(|h| *h != x_owner)).then_some(())
    })
    .await;
    // y reloads them and aborts them at their deadline, once each.
    for id in &ids {
        env.until_state(id, "aborting").await;
        env.until_inbox("a", id, &["prepare", "abort"]).await;
    }
    x.signal("-CONT");
    env.until("x to step down", || async { (x.saw("stepping down") || x.saw("refused by the fence")).then_some(()) })
        .await;
    // x, whose timers were all due when it woke, wrote nothing: one abort per transaction.
    // (A later round trip through y proves x had its chance: y answers a fresh transaction.)
    env.client.submit(&transfer("after")).await.unwrap();
    env.until_inbox("a", "after", &["prepare"]).await;
    for id in &ids {
        env.ack(id, 0, "a", Outcome::Aborted).await;
        env.ack(id, 1, "b", Outcome::Aborted).await;
    }
    for id in &ids {
        env.until_state(id, "aborted").await;
        assert_eq!(env.inbox_kinds("a", id).await, vec!["prepare", "abort"], "{id}: the frozen owner sent nothing");
    }
    for p in [&mut x, &mut y] {
        p.child.kill().unwrap();
        p.child.wait().unwrap();
    }
}
