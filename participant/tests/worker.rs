//! The participant worker end to end: messages XADDed to its partition streams, replies read
//! from `rtx:coord:{P}`, dead letters from `rtx:dead:{P}`.

mod support;

use redis::AsyncCommands;
use redtx_common::conn::RedisUrl;
use redtx_common::keys;
use redtx_common::kv::{IncrbyOp, Op};
use redtx_common::protocol::{Ack, Message, Outcome, StepKind, StepResult, StepStatus, Vote};
use redtx_common::shutdown::Shutdown;
use redtx_participant::{run, ParticipantConfig};
use std::time::Duration;
use support::*;

struct Worker {
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<redtx_common::Result<()>>,
}

impl Worker {
    fn start(cfg: ParticipantConfig) -> Self {
        let shutdown = Shutdown::new();
        let task = tokio::spawn(run(cfg, shutdown.clone()));
        Worker { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.trigger();
        let r = tokio::time::timeout(Duration::from_secs(5), self.task).await.expect("stops promptly");
        r.unwrap().expect("clean exit");
    }
}

fn cfg(url: String) -> ParticipantConfig {
    let mut cfg = ParticipantConfig::new(url, NAME);
    cfg.partitions = 4;
    cfg
}

fn vote(txn: &str, yes: bool, reason: Option<&str>) -> Message {
    Message::Vote(Vote { txn: txn.into(), branch: 0, participant: NAME.into(), yes, reason: reason.map(Into::into) })
}

fn ack(txn: &str, outcome: Outcome) -> Message {
    Message::Ack(Ack { txn: txn.into(), branch: 0, participant: NAME.into(), outcome })
}

fn result(txn: &str, step: StepKind, status: StepStatus, reason: Option<&str>) -> Message {
    Message::Result(StepResult {
        txn: txn.into(),
        branch: 0,
        participant: NAME.into(),
        step,
        status,
        reason: reason.map(Into::into),
    })
}

fn debit(key: &str, by: i64) -> Op {
    Op::Incrby(IncrbyOp { key: key.into(), by: -by, min: Some(0), max: None })
}

async fn pending(c: &mut redis::aio::MultiplexedConnection, p: u32) -> usize {
    let r: redis::streams::StreamPendingReply = c.xpending(keys::participant_stream(NAME, p), NAME).await.unwrap();
    r.count()
}

async fn dead_letters(c: &mut redis::aio::MultiplexedConnection, p: u32, n: usize) -> Vec<redis::streams::StreamId> {
    let started = std::time::Instant::now();
    loop {
        let r: redis::streams::StreamRangeReply = c.xrange_all(keys::dead_letter_stream(p)).await.unwrap();
        if r.ids.len() >= n {
            return r.ids;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "waited for {n} dead letters on partition {p}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prepare_commit_abort_end_to_end_on_every_partition() {
    let s = server();
    let mut c = conn(&s).await;
    let w = Worker::start(cfg(s.url()));
    let _: () = c.set("acct:alice", 100).await.unwrap();

    let p1 = prepare("t1", vec![debit("acct:alice", 30)]);
    let p2 = prepare("t2", vec![debit("acct:alice", 1)]);
    let p3 = prepare("t3", vec![debit("acct:bob", 1)]);
    send(&mut c, &Message::Prepare(p1)).await;
    send(&mut c, &Message::Prepare(p2)).await;
    send(&mut c, &Message::Prepare(p3)).await;
    let m = wait_messages(&mut c, 3).await;
    assert_eq!(
        m,
        vec![
            vote("t1", true, None),
            vote("t2", false, Some("bank-a: conflict: acct:alice is held by another transaction")),
            vote("t3", false, Some("bank-a: acct:bob would be -1, below min 0")),
        ]
    );
    assert_eq!(get(&mut c, "acct:alice").await.as_deref(), Some("100"), "staged, not applied");

    send(&mut c, &Message::Commit(resolve("t1"))).await;
    send(&mut c, &Message::Commit(resolve("t1"))).await; // a duplicate
    send(&mut c, &Message::Abort(resolve("t2"))).await;
    send(&mut c, &Message::Abort(resolve("t3"))).await;
    // Abort before prepare, then the late prepare.
    send(&mut c, &Message::Abort(resolve("t4"))).await;
    send(&mut c, &Message::Prepare(prepare("t4", vec![Op::set("x", "y")]))).await;
    let m = wait_messages(&mut c, 9).await;
    assert_eq!(
        m[3..],
        [
            ack("t1", Outcome::Committed),
            ack("t1", Outcome::Committed),
            ack("t2", Outcome::Aborted),
            ack("t3", Outcome::Aborted),
            ack("t4", Outcome::Aborted),
            vote("t4", false, Some("bank-a: aborted before prepare")),
        ]
    );
    assert_eq!(get(&mut c, "acct:alice").await.as_deref(), Some("70"));
    assert_eq!(get(&mut c, "x").await, None);
    assert_eq!(pending(&mut c, 0).await, 0, "everything acked");

    // Every partition is read; each reply goes to the coordinator stream of its partition.
    for p in 1..4 {
        let txn = format!("p{p}");
        send_to(&mut c, p, &Message::Prepare(prepare(&txn, vec![Op::set(format!("k{p}"), "v")]))).await;
        send_to(&mut c, p, &Message::Commit(resolve(&txn))).await;
        let m = wait_messages_of(&mut c, p, 2).await;
        assert_eq!(m, vec![vote(&txn, true, None), ack(&txn, Outcome::Committed)], "partition {p}");
        assert_eq!(get(&mut c, &format!("k{p}")).await.as_deref(), Some("v"));
    }
    assert_eq!(coord_messages(&mut c).await.len(), 9, "nothing else went to partition 0");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn saga_steps_end_to_end() {
    let s = server();
    let mut c = conn(&s).await;
    let w = Worker::start(cfg(s.url()));
    let _: () = c.set("stock", 1).await.unwrap();
    let take = |t: &str| execute(t, vec![debit("stock", 1)]);
    let put_back = |t: &str| execute(t, vec![Op::incrby("stock", 1)]);
    send_to(&mut c, 2, &Message::Execute(take("s1"))).await;
    send_to(&mut c, 2, &Message::Execute(take("s2"))).await;
    send_to(&mut c, 2, &Message::Compensate(put_back("s1"))).await;
    send_to(&mut c, 2, &Message::Compensate(put_back("s3"))).await; // before its action
    send_to(&mut c, 2, &Message::Execute(take("s3"))).await; // refused: compensated first
    let m = wait_messages_of(&mut c, 2, 5).await;
    assert_eq!(
        m[..4],
        [
            result("s1", StepKind::Action, StepStatus::Done, None),
            result("s2", StepKind::Action, StepStatus::Failed, Some("bank-a: stock would be -1, below min 0")),
            result("s1", StepKind::Compensation, StepStatus::Done, None),
            result(
                "s3",
                StepKind::Compensation,
                StepStatus::Skipped,
                Some("bank-a: compensated before its action ran (null compensation)")
            ),
        ]
    );
    assert!(
        matches!(&m[4], Message::Result(StepResult { txn, step: StepKind::Action, status: StepStatus::Failed, reason: Some(r), .. })
            if txn == "s3" && r.contains("compensated before this action arrived")),
        "{:?}",
        m[4]
    );
    assert_eq!(get(&mut c, "stock").await.as_deref(), Some("1"));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_entries_are_dead_lettered_in_their_partition_and_the_worker_goes_on() {
    let s = server();
    let mut c = conn(&s).await;
    let w = Worker::start(cfg(s.url()));
    let stream = keys::participant_stream(NAME, 3);
    let mut elsewhere = prepare("d1", vec![Op::set("k", "v")]);
    elsewhere.participant = "bank-b".into();
    xadd(&mut c, &stream, &Message::Prepare(elsewhere).fields()[..]).await;
    xadd(&mut c, &stream, &[("t", b"prepare".to_vec()), ("m", vec![0xff])]).await;
    xadd(&mut c, &stream, &[("nothing", b"here".to_vec())]).await;
    xadd(&mut c, &stream, &vote("d2", true, None).fields()[..]).await;
    // Commit of a branch never prepared: a protocol violation, dead-lettered, no ack sent.
    send_to(&mut c, 3, &Message::Commit(resolve("d3"))).await;
    send_to(&mut c, 3, &Message::Prepare(prepare("d4", vec![Op::set("k", "v")]))).await;

    assert_eq!(wait_messages_of(&mut c, 3, 1).await, vec![vote("d4", true, None)]);
    let dead = dead_letters(&mut c, 3, 5).await;
    let reasons: Vec<String> = dead.iter().map(|e| e.get::<String>("reason").unwrap()).collect();
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("\"bank-b\"")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("bad prepare payload")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("no field")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("`vote`")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("never prepared")), "{reasons:?}");
    for e in &dead {
        assert_eq!(e.get::<String>("stream").as_deref(), Some(stream.as_str()));
    }
    let count: u64 = c.hget(keys::dead_letter_counts(3), &stream).await.unwrap();
    assert_eq!(count, 5);
    let elsewhere: u64 = c.xlen(keys::dead_letter_stream(0)).await.unwrap();
    assert_eq!(elsewhere, 0, "dead letters stay in their partition");
    assert_eq!(coord_messages_of(&mut c, 3).await.len(), 1, "no reply to dead letters");
    assert_eq!(pending(&mut c, 3).await, 0);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn data_can_live_on_another_redis() {
    let streams = server();
    let data = server();
    let mut sc = conn(&streams).await;
    let mut dc = conn(&data).await;
    let mut cfg = cfg(streams.url());
    cfg.data = Some(data.url());
    let w = Worker::start(cfg);
    send(&mut sc, &Message::Prepare(prepare("s1", vec![Op::set("k", "v")]))).await;
    send(&mut sc, &Message::Commit(resolve("s1"))).await;
    assert_eq!(wait_messages(&mut sc, 2).await[1], ack("s1", Outcome::Committed));
    assert_eq!(get(&mut dc, "k").await.as_deref(), Some("v"));
    assert_eq!(get(&mut sc, "k").await, None);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_is_graceful_and_a_restart_resumes() {
    let s = server();
    let mut c = conn(&s).await;
    let w = Worker::start(cfg(s.url()));
    send(&mut c, &Message::Prepare(prepare("g1", vec![Op::set("k", "v")]))).await;
    wait_messages(&mut c, 1).await;
    w.stop().await;
    // Sent while no worker runs: picked up by the next one. (The stopped worker's blocking
    // XREADGROUP may still be open on the server for a moment and receive it; then the next
    // worker claims it after `claim_idle`.)
    send(&mut c, &Message::Commit(resolve("g1"))).await;
    let mut cfg = cfg(s.url());
    cfg.claim_idle = Duration::from_millis(300);
    let w = Worker::start(cfg);
    assert_eq!(wait_messages(&mut c, 2).await[1], ack("g1", Outcome::Committed));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_redis_is_waited_for_and_invalid_configs_fail() {
    let port = redtx_common::server::free_port().unwrap();
    let w = Worker::start(cfg(format!("redis://127.0.0.1:{port}")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!w.task.is_finished(), "keeps retrying");
    w.stop().await;
    let e = run(ParticipantConfig::new("redis://127.0.0.1:1", "bad name"), Shutdown::new()).await.unwrap_err();
    assert!(e.to_string().contains("bad name"), "{e}");
    let e = run(ParticipantConfig::new("http://x", NAME), Shutdown::new()).await.unwrap_err();
    assert!(matches!(e, redtx_common::Error::BadUrl { .. }), "{e}");
    let mut zero = ParticipantConfig::new("redis://127.0.0.1:1", NAME);
    zero.partitions = 0;
    let e = run(zero, Shutdown::new()).await.unwrap_err();
    assert!(e.to_string().contains("partitions"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn survives_a_redis_restart() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().try_init();
    let mut s = server();
    let mut c = conn(&s).await;
    // A batch that fails while Redis is still coming back stays pending and is claimed again.
    let mut cfg = cfg(s.url());
    cfg.claim_idle = Duration::from_millis(300);
    let w = Worker::start(cfg);
    send(&mut c, &Message::Prepare(prepare("r1", vec![Op::set("k", "v")]))).await;
    wait_messages(&mut c, 1).await;
    s.restart().unwrap();
    let mut c = conn(&s).await;
    send(&mut c, &Message::Commit(resolve("r1"))).await;
    assert_eq!(wait_messages(&mut c, 2).await[1], ack("r1", Outcome::Committed));
    assert_eq!(get(&mut c, "k").await.as_deref(), Some("v"));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_entries_keep_their_original_fields_in_the_dead_letter() {
    // docs/protocol.md: a dead letter holds `orig.t`/`orig.m`, the original fields, so that an
    // operator can inspect or re-drive it: also for entries the handler refuses.
    let s = server();
    let mut c = conn(&s).await;
    let w = Worker::start(cfg(s.url()));
    let stream = keys::participant_stream(NAME, 1);
    let mut elsewhere = prepare("o1", vec![Op::set("k", "v")]);
    elsewhere.participant = "bank-b".into();
    let misrouted = Message::Prepare(elsewhere);
    let ghost = Message::Commit(resolve("o2"));
    xadd(&mut c, &stream, &misrouted.fields()[..]).await;
    xadd(&mut c, &stream, &ghost.fields()[..]).await;
    let dead = dead_letters(&mut c, 1, 2).await;
    assert_eq!(dead.len(), 2);
    for (entry, orig) in dead.iter().zip([&misrouted, &ghost]) {
        let t: Option<Vec<u8>> = entry.get("orig.t");
        let m: Option<Vec<u8>> = entry.get("orig.m");
        assert_eq!(t.as_deref(), Some(orig.kind().as_bytes()), "{entry:?}");
        assert_eq!(m, Some(orig.encode()), "the dead letter lost the original payload: {entry:?}");
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_acked_while_the_stream_redis_is_full() {
    // A full Redis (maxmemory, noeviction) refuses XADD/HINCRBY but still accepts XACK: entries
    // must stay pending until their replies (or dead letters) are written, never be acked
    // without them.
    let s = server();
    let mut c = conn(&s).await;
    let url = RedisUrl::parse(&s.url()).unwrap();
    let stream = keys::participant_stream(NAME, 0);
    let mut elsewhere = prepare("m1", vec![Op::set("k", "v")]);
    elsewhere.participant = "bank-b".into();
    xadd(&mut c, &stream, &Message::Prepare(elsewhere).fields()[..]).await;
    send(&mut c, &Message::Abort(resolve("m2"))).await;
    // Delivered to a worker that died: the live one takes them over after `claim_idle`.
    redtx_common::consumer::ensure_group(&mut c, &url, &stream, NAME).await.unwrap();
    let opts = redis::streams::StreamReadOptions::default().group(NAME, "dead-worker").count(10);
    let _: redis::streams::StreamReadReply = c.xread_options(&[&stream], &[">"], &opts).await.unwrap();
    let mut cfg = cfg(s.url());
    cfg.claim_idle = Duration::from_millis(1000);
    let w = Worker::start(cfg);
    // Connected (the groups of every partition created: a full Redis refuses that), not yet
    // claiming: then fill it up.
    eventually("the worker created its groups", || {
        let mut c = c.clone();
        async move { c.exists::<_, bool>(keys::participant_stream(NAME, 3)).await.unwrap() }
    })
    .await;
    maxmemory(&mut c, 1).await;
    // Claimed (and tried) again and again: each claim bumps the delivery count.
    eventually("the worker took the entries over at least twice", || {
        let mut c = c.clone();
        let stream = stream.clone();
        async move {
            let r: redis::streams::StreamPendingCountReply =
                c.xpending_count(&stream, NAME, "-", "+", 10).await.unwrap();
            r.ids.len() == 2 && r.ids.iter().all(|p| p.times_delivered >= 3)
        }
    })
    .await;
    let dead: u64 = c.xlen(keys::dead_letter_stream(0)).await.unwrap();
    assert_eq!(dead, 0, "Redis is full: nothing can be written");
    assert!(coord_messages(&mut c).await.is_empty());
    assert_eq!(pending(&mut c, 0).await, 2, "acked although nothing was written: the entries are lost");
    maxmemory(&mut c, 0).await;
    assert_eq!(dead_letters(&mut c, 0, 1).await.len(), 1);
    assert_eq!(wait_messages(&mut c, 1).await, vec![ack("m2", Outcome::Aborted)]);
    eventually("every entry acked", || {
        let mut c = c.clone();
        async move { pending(&mut c, 0).await == 0 }
    })
    .await;
    w.stop().await;
}
