//! The real `redtx-participant` binary: arguments, exit codes, signals, fail points.

mod support;

use redtx_common::kv::Op;
use redtx_common::protocol::{Message, Outcome, StepKind, StepResult, StepStatus, Vote};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_redtx-participant");

fn spawn(url: &str, extra: &[&str], failpoint: Option<&str>) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args(["--redis", url, "--name", NAME]).args(extra).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd.env_remove("REDTX_FAILPOINT");
    if let Some(f) = failpoint {
        cmd.env("REDTX_FAILPOINT", f);
    }
    cmd.spawn().unwrap()
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(started.elapsed() < within, "did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the child announces that it froze at fail point `name` (on stderr), then keeps
/// draining its stderr so that it never blocks on a full pipe.
fn wait_failpoint(child: &mut Child, name: &str) {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let want = format!("failpoint {name} reached");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(&want) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("fail point {name} never reached"));
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().unwrap();
    assert!(ok.success());
}

#[test]
fn help_and_bad_arguments() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--redis",
        "--name",
        "--data",
        "--partitions",
        "--batch",
        "--claim-idle",
        "--retention",
        "--keep-history",
        "--wait-replicas",
    ] {
        assert!(help.contains(flag), "{help}");
    }
    let out = Command::new(BIN).args(["--name", "bad name!"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad name!"));
    let out = Command::new(BIN).args(["--name", "p", "--claim-idle", "soon"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN).args(["--name", "p", "--partitions", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN).args(["--name", "p", "--redis", "http://u:hunter2@x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid Redis URL") && !err.contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn votes_then_exits_cleanly_on_sigterm() {
    let s = server();
    let mut c = conn(&s).await;
    let mut child = spawn(&s.url(), &[], None);
    let p = prepare("b1", vec![Op::set("k", "v")]);
    send(&mut c, &Message::Prepare(p)).await;
    assert!(matches!(&wait_messages(&mut c, 1).await[0], Message::Vote(Vote { yes: true, .. })));
    signal(&child, "TERM");
    assert!(wait_exit(&mut child, Duration::from_secs(5)).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_after_prepare_a_successor_votes_the_same() {
    let s = server();
    let mut c = conn(&s).await;
    let mut frozen = spawn(&s.url(), &["--claim-idle", "300ms"], Some(redtx_participant::AFTER_PREPARE));
    let p = prepare("k1", vec![Op::set("k", "v")]);
    send(&mut c, &Message::Prepare(p.clone())).await;
    // Frozen after the prepare ran (the lock is taken), before voting: kill -9.
    wait_failpoint(&mut frozen, redtx_participant::AFTER_PREPARE);
    assert!(get(&mut c, &redtx_common::keys::lock("k")).await.is_some(), "prepare ran");
    assert!(coord_messages(&mut c).await.is_empty(), "frozen before voting");
    signal(&frozen, "KILL");
    wait_exit(&mut frozen, Duration::from_secs(5));

    let mut next = spawn(&s.url(), &["--claim-idle", "300ms"], None);
    assert!(matches!(&wait_messages(&mut c, 1).await[0], Message::Vote(Vote { yes: true, .. })));
    send(&mut c, &Message::Commit(resolve(&p.txn))).await;
    let m = wait_messages(&mut c, 2).await;
    assert!(matches!(&m[1], Message::Ack(a) if a.outcome == Outcome::Committed));
    assert_eq!(get(&mut c, "k").await.as_deref(), Some("v"));
    signal(&next, "TERM");
    assert!(wait_exit(&mut next, Duration::from_secs(5)).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_after_commit_a_successor_acks_without_applying_twice() {
    let s = server();
    let mut c = conn(&s).await;
    let _: () = redis::AsyncCommands::set(&mut c, "n", 1).await.unwrap();
    let p = prepare("k2", vec![Op::incrby("n", 1)]);
    let mut first = spawn(&s.url(), &["--claim-idle", "300ms"], Some(redtx_participant::AFTER_COMMIT));
    send(&mut c, &Message::Prepare(p.clone())).await;
    wait_messages(&mut c, 1).await;
    send(&mut c, &Message::Commit(resolve(&p.txn))).await;
    wait_failpoint(&mut first, redtx_participant::AFTER_COMMIT);
    assert_eq!(get(&mut c, "n").await.as_deref(), Some("2"), "commit ran");
    assert_eq!(coord_messages(&mut c).await.len(), 1, "frozen before acking");
    signal(&first, "KILL");
    wait_exit(&mut first, Duration::from_secs(5));

    let mut next = spawn(&s.url(), &["--claim-idle", "300ms"], None);
    let m = wait_messages(&mut c, 2).await;
    assert!(matches!(&m[1], Message::Ack(a) if a.outcome == Outcome::Committed));
    assert_eq!(get(&mut c, "n").await.as_deref(), Some("2"), "applied once");
    signal(&next, "TERM");
    assert!(wait_exit(&mut next, Duration::from_secs(5)).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_after_execute_a_successor_reports_without_applying_twice() {
    let s = server();
    let mut c = conn(&s).await;
    let _: () = redis::AsyncCommands::set(&mut c, "n", 1).await.unwrap();
    let mut first =
        spawn(&s.url(), &["--claim-idle", "300ms", "--partitions", "2"], Some(redtx_participant::AFTER_EXECUTE));
    send_to(&mut c, 1, &Message::Execute(execute("k3", vec![Op::incrby("n", 1)]))).await;
    wait_failpoint(&mut first, redtx_participant::AFTER_EXECUTE);
    assert_eq!(get(&mut c, "n").await.as_deref(), Some("2"), "execute ran");
    assert!(coord_messages_of(&mut c, 1).await.is_empty(), "frozen before reporting");
    signal(&first, "KILL");
    wait_exit(&mut first, Duration::from_secs(5));

    let mut next = spawn(&s.url(), &["--claim-idle", "300ms", "--partitions", "2"], None);
    let m = wait_messages_of(&mut c, 1, 1).await;
    assert!(
        matches!(&m[0], Message::Result(StepResult { step: StepKind::Action, status: StepStatus::Done, .. })),
        "{m:?}"
    );
    assert_eq!(get(&mut c, "n").await.as_deref(), Some("2"), "applied once");
    signal(&next, "TERM");
    assert!(wait_exit(&mut next, Duration::from_secs(5)).success());
}
