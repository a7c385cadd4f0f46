//! The participant worker end to end: messages XADDed to its stream, replies read from
//! `rtx:coord:{0}`, dead letters from `rtx:dead:{0}`.

mod support;

use redis::AsyncCommands;
use redtx_common::conn::RedisUrl;
use redtx_common::keys;
use redtx_common::protocol::{Ack, Message, Outcome, Resolve, Vote};
use redtx_common::shutdown::Shutdown;
use redtx_common::spec::{IncrbyOp, Op};
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

fn vote(txn: &str, yes: bool, reason: Option<&str>) -> Message {
    Message::Vote(Vote { txn: txn.into(), branch: 0, participant: NAME.into(), yes, reason: reason.map(Into::into) })
}

fn ack(txn: &str, outcome: Outcome) -> Message {
    Message::Ack(Ack { txn: txn.into(), branch: 0, participant: NAME.into(), outcome })
}

async fn pending(c: &mut redis::aio::MultiplexedConnection) -> usize {
    let r: redis::streams::StreamPendingReply = c.xpending(keys::participant_stream(NAME), NAME).await.unwrap();
    r.count()
}

#[tokio::test(flavor = "multi_thread")]
async fn prepare_commit_abort_end_to_end() {
    let s = server();
    let mut c = conn(&s).await;
    let w = Worker::start(ParticipantConfig::new(s.url(), NAME));
    let _: () = c.set("acct:alice", 100).await.unwrap();

    let p1 = prepare("t1", vec![Op::Incrby(IncrbyOp { key: "acct:alice".into(), by: -30, min: Some(0), max: None })]);
    let p2 = prepare("t2", vec![Op::Incrby(IncrbyOp { key: "acct:alice".into(), by: -1, min: Some(0), max: None })]);
    let p3 = prepare("t3", vec![Op::Incrby(IncrbyOp { key: "acct:bob".into(), by: -1, min: Some(0), max: None })]);
    send(&mut c, &Message::Prepare(p1.clone())).await;
    send(&mut c, &Message::Prepare(p2.clone())).await;
    send(&mut c, &Message::Prepare(p3.clone())).await;
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

    send(&mut c, &Message::Commit(resolve(&p1))).await;
    send(&mut c, &Message::Commit(resolve(&p1))).await; // a duplicate
    send(&mut c, &Message::Abort(resolve(&p2))).await;
    send(&mut c, &Message::Abort(resolve(&p3))).await;
    // Abort before prepare, then the late prepare.
    let p4 = prepare("t4", vec![Op::set("x", "y")]);
    send(&mut c, &Message::Abort(resolve(&p4))).await;
    send(&mut c, &Message::Prepare(p4.clone())).await;
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
    assert_eq!(get(&mut c, &keys::lock("x")).await, None);
    assert_eq!(pending(&mut c).await, 0, "everything acked");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_entries_are_dead_lettered_and_the_worker_goes_on() {
    let s = server();
    let mut c = conn(&s).await;
    let w = Worker::start(ParticipantConfig::new(s.url(), NAME));
    let stream = keys::participant_stream(NAME);
    let mut elsewhere = prepare("d1", vec![Op::set("k", "v")]);
    elsewhere.participant = "bank-b".into();
    xadd(&mut c, &stream, &Message::Prepare(elsewhere).fields()[..]).await;
    xadd(&mut c, &stream, &[("t", b"prepare".to_vec()), ("m", vec![0xff])]).await;
    xadd(&mut c, &stream, &[("nothing", b"here".to_vec())]).await;
    xadd(&mut c, &stream, &vote("d2", true, None).fields()[..]).await;
    // Commit of a branch never prepared: a protocol violation, dead-lettered, no ack sent.
    let ghost = Resolve { txn: "d3".into(), branch: 0, participant: NAME.into(), keys: vec!["k".into()] };
    send(&mut c, &Message::Commit(ghost)).await;
    let ok = prepare("d4", vec![Op::set("k", "v")]);
    send(&mut c, &Message::Prepare(ok)).await;

    assert_eq!(wait_messages(&mut c, 1).await, vec![vote("d4", true, None)]);
    let started = std::time::Instant::now();
    let dead = loop {
        let dead: redis::streams::StreamRangeReply = c.xrange_all(keys::dead_letter_stream()).await.unwrap();
        if dead.ids.len() >= 5 || started.elapsed() > Duration::from_secs(5) {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let reasons: Vec<String> = dead.ids.iter().map(|e| e.get::<String>("reason").unwrap()).collect();
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("\"bank-b\"")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("bad prepare payload")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("no field")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("`vote`")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("never prepared")), "{reasons:?}");
    let count: u64 = c.hget(keys::dead_letter_counts(), &stream).await.unwrap();
    assert_eq!(count, 5);
    assert_eq!(coord_messages(&mut c).await.len(), 1, "no reply to dead letters");
    assert_eq!(pending(&mut c).await, 0);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn data_can_live_on_another_redis() {
    let streams = server();
    let data = server();
    let mut sc = conn(&streams).await;
    let mut dc = conn(&data).await;
    let mut cfg = ParticipantConfig::new(streams.url(), NAME);
    cfg.data = Some(data.url());
    let w = Worker::start(cfg);
    let p = prepare("s1", vec![Op::set("k", "v")]);
    send(&mut sc, &Message::Prepare(p.clone())).await;
    send(&mut sc, &Message::Commit(resolve(&p))).await;
    assert_eq!(wait_messages(&mut sc, 2).await[1], ack("s1", Outcome::Committed));
    assert_eq!(get(&mut dc, "k").await.as_deref(), Some("v"));
    assert_eq!(get(&mut sc, "k").await, None);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_is_graceful_and_a_restart_resumes() {
    let s = server();
    let mut c = conn(&s).await;
    let w = Worker::start(ParticipantConfig::new(s.url(), NAME));
    let p = prepare("g1", vec![Op::set("k", "v")]);
    send(&mut c, &Message::Prepare(p.clone())).await;
    wait_messages(&mut c, 1).await;
    w.stop().await;
    // Sent while no worker runs: picked up by the next one. (The stopped worker's blocking
    // XREADGROUP may still be open on the server for a moment and receive it; then the next
    // worker claims it after `claim_idle`.)
    send(&mut c, &Message::Commit(resolve(&p))).await;
    let mut cfg = ParticipantConfig::new(s.url(), NAME);
    cfg.claim_idle = Duration::from_millis(300);
    let w = Worker::start(cfg);
    assert_eq!(wait_messages(&mut c, 2).await[1], ack("g1", Outcome::Committed));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_redis_is_waited_for_and_invalid_names_fail() {
    let port = redtx_common::server::free_port().unwrap();
    let w = Worker::start(ParticipantConfig::new(format!("redis://127.0.0.1:{port}"), NAME));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!w.task.is_finished(), "keeps retrying");
    w.stop().await;
    let e = run(ParticipantConfig::new("redis://127.0.0.1:1", "bad name"), Shutdown::new()).await.unwrap_err();
    assert!(e.to_string().contains("bad name"), "{e}");
    let e = run(ParticipantConfig::new("http://x", NAME), Shutdown::new()).await.unwrap_err();
    assert!(matches!(e, redtx_common::Error::BadUrl { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn survives_a_redis_restart() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().try_init();
    let mut s = server();
    let mut c = conn(&s).await;
    // A batch that fails while Redis is still coming back stays pending and is claimed again.
    let mut cfg = ParticipantConfig::new(s.url(), NAME);
    cfg.claim_idle = Duration::from_millis(300);
    let w = Worker::start(cfg);
    let p = prepare("r1", vec![Op::set("k", "v")]);
    send(&mut c, &Message::Prepare(p.clone())).await;
    wait_messages(&mut c, 1).await;
    s.restart().unwrap();
    let mut c = conn(&s).await;
    send(&mut c, &Message::Commit(resolve(&p))).await;
    assert_eq!(wait_messages(&mut c, 2).await[1], ack("r1", Outcome::Committed));
    assert_eq!(get(&mut c, "k").await.as_deref(), Some("v"));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_entries_keep_their_original_fields_in_the_dead_letter() {
    // docs/protocol.md: a dead letter holds `orig.t`/`orig.m`, the original fields, so that an
    // operator can inspect or re-drive it. That must hold for entries the handler refuses (a
    // misrouted prepare, a commit of a branch never prepared here), not only undecodable ones.
    let s = server();
    let mut c = conn(&s).await;
    let w = Worker::start(ParticipantConfig::new(s.url(), NAME));
    let stream = keys::participant_stream(NAME);
    let mut elsewhere = prepare("o1", vec![Op::set("k", "v")]);
    elsewhere.participant = "bank-b".into();
    let misrouted = Message::Prepare(elsewhere);
    let ghost =
        Message::Commit(Resolve { txn: "o2".into(), branch: 0, participant: NAME.into(), keys: vec!["k".into()] });
    xadd(&mut c, &stream, &misrouted.fields()[..]).await;
    xadd(&mut c, &stream, &ghost.fields()[..]).await;
    let started = std::time::Instant::now();
    let dead = loop {
        let dead: redis::streams::StreamRangeReply = c.xrange_all(keys::dead_letter_stream()).await.unwrap();
        if dead.ids.len() >= 2 || started.elapsed() > Duration::from_secs(5) {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(dead.ids.len(), 2);
    for (entry, orig) in dead.ids.iter().zip([&misrouted, &ghost]) {
        let t: Option<Vec<u8>> = entry.get("orig.t");
        let m: Option<Vec<u8>> = entry.get("orig.m");
        assert_eq!(t.as_deref(), Some(orig.kind().as_bytes()), "{entry:?}");
        assert_eq!(m, Some(orig.encode()), "the dead letter lost the original payload: {entry:?}");
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_that_cannot_be_written_is_not_acked() {
    // A full Redis (maxmemory, noeviction) refuses XADD/HINCRBY but still accepts XACK: a
    // refused entry must stay pending until its dead letter is written, never be acked without it.
    let s = server();
    let mut c = conn(&s).await;
    let stream = keys::participant_stream(NAME);
    let mut elsewhere = prepare("m1", vec![Op::set("k", "v")]);
    elsewhere.participant = "bank-b".into();
    xadd(&mut c, &stream, &Message::Prepare(elsewhere).fields()[..]).await;
    // Delivered to a worker that died: the live one takes it over after `claim_idle`.
    redtx_common::consumer::ensure_group(&mut c, &RedisUrl::parse(&s.url()).unwrap(), &stream, NAME).await.unwrap();
    let opts = redis::streams::StreamReadOptions::default().group(NAME, "dead-worker").count(10);
    let _: redis::streams::StreamReadReply = c.xread_options(&[&stream], &[">"], &opts).await.unwrap();
    let mut cfg = ParticipantConfig::new(s.url(), NAME);
    cfg.claim_idle = Duration::from_millis(1500);
    let w = Worker::start(cfg);
    tokio::time::sleep(Duration::from_millis(500)).await; // connected, not yet claiming
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query_async(&mut c).await.unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(1).query_async(&mut c).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let dead: u64 = c.xlen(keys::dead_letter_stream()).await.unwrap();
    assert_eq!(dead, 0, "Redis is full: nothing can be written");
    assert_eq!(pending(&mut c).await, 1, "acked although its dead letter was not written: the entry is lost");
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0).query_async(&mut c).await.unwrap();
    let started = std::time::Instant::now();
    while c.xlen::<_, u64>(keys::dead_letter_stream()).await.unwrap() == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = std::time::Instant::now();
    while pending(&mut c).await > 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "dead letter written but the entry not acked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.stop().await;
}
