//! End-to-end tests of the coordinator against a real Redis, with the participants played by
//! hand (votes and acks XADDed to `rtx:coord:{0}`, prepares/commits/aborts read back).

mod common;

use common::{transfer, Env};
use redis::AsyncCommands;
use redtx_common::keys;
use redtx_common::protocol::{Message, Outcome};
use redtx_common::record::TxnState;
use std::time::Duration;

#[tokio::test]
async fn all_yes_commits_and_publishes_the_outcome() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    env.client.submit(&transfer("t1")).await.unwrap();
    env.until_inbox("a", "t1", &["prepare"]).await;
    env.until_inbox("b", "t1", &["prepare"]).await;
    let Message::Prepare(p) = &env.inbox("b").await[0] else { panic!() };
    assert_eq!((p.branch, p.participant.as_str(), p.ops.len()), (1, "b", 2));
    let rec = env.record("t1").await.unwrap();
    assert_eq!(rec.state, TxnState::Preparing);
    assert_eq!(p.deadline_ms, rec.deadline_ms);
    assert_eq!(rec.deadline_ms - rec.created_ms, 5000);

    env.vote("t1", 0, "a", true, None).await;
    env.vote("t1", 1, "b", true, None).await;
    env.until_inbox("a", "t1", &["prepare", "commit"]).await;
    env.until_inbox("b", "t1", &["prepare", "commit"]).await;
    let Message::Commit(c) = &env.inbox("b").await[1] else { panic!() };
    assert_eq!(c.keys, vec!["acct:y".to_string(), "note".to_string()]);
    let rec = env.record("t1").await.unwrap();
    assert_eq!(rec.state, TxnState::Committing);
    assert!(rec.decided_ms.is_some());

    env.ack("t1", 0, "a", Outcome::Committed).await;
    env.ack("t1", 1, "b", Outcome::Committed).await;
    let rec = env.until_state("t1", "committed").await;
    assert!(rec.finished_ms.is_some());
    assert!(rec.branches.iter().all(|b| b.vote == Some(true) && b.ack.as_deref() == Some("committed")));
    let mut c = env.conn.clone();
    let ttl: i64 = c.pttl(keys::txn_record("t1")).await.unwrap();
    assert!(ttl > 23 * 3600 * 1000, "record expiry set after retention, got {ttl}");
    let outcomes = env
        .until("outcome", || async {
            let o = env.entries(&keys::outcomes_stream()).await;
            (!o.is_empty()).then_some(o)
        })
        .await;
    assert_eq!(outcomes[0]["id"], "t1");
    assert_eq!(outcomes[0]["state"], "committed");
    env.until("deadline dropped", || async {
        let mut c = env.conn.clone();
        let n: usize = c.zcard(keys::deadlines()).await.unwrap();
        (n == 0).then_some(())
    })
    .await;
    // The producer's wait sees it too.
    let r = env.client.wait("t1", Duration::from_secs(5)).await.unwrap();
    assert_eq!(r.state, TxnState::Committed);
    env.stop().await;
}

#[tokio::test]
async fn one_no_aborts_every_branch_with_the_reason() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    env.client.submit(&transfer("t2")).await.unwrap();
    env.until_inbox("a", "t2", &["prepare"]).await;
    env.vote("t2", 0, "a", false, Some("a: acct:x would be -10, below min 0")).await;
    let rec = env.until_state("t2", "aborting").await;
    assert_eq!(rec.reason.as_deref(), Some("a: acct:x would be -10, below min 0"));
    // b never voted, it still gets the abort (a tombstone against a late prepare).
    env.until_inbox("a", "t2", &["prepare", "abort"]).await;
    env.until_inbox("b", "t2", &["prepare", "abort"]).await;
    // A late yes from b changes nothing but re-sends the decision to b.
    env.vote("t2", 1, "b", true, None).await;
    env.until_inbox("b", "t2", &["prepare", "abort", "abort"]).await;
    assert_eq!(env.record("t2").await.unwrap().state, TxnState::Aborting);
    env.ack("t2", 0, "a", Outcome::Aborted).await;
    env.ack("t2", 1, "b", Outcome::Aborted).await;
    env.until_state("t2", "aborted").await;

    // A reason that does not name the participant gets it prefixed.
    env.client.submit(&transfer("t2b")).await.unwrap();
    env.vote("t2b", 1, "b", false, Some("conflict")).await;
    let rec = env.until_state("t2b", "aborting").await;
    assert_eq!(rec.reason.as_deref(), Some("b: conflict"));
    env.stop().await;
}

#[tokio::test]
async fn a_resubmitted_id_creates_nothing_new() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    env.client.submit(&transfer("t3")).await.unwrap();
    env.until_inbox("a", "t3", &["prepare"]).await;
    let before = env.record("t3").await.unwrap();
    // Same id, other spec: the stored one wins; prepares are re-sent from it.
    let mut other = transfer("t3");
    other.branches[0].participant = "c".into();
    env.client.submit(&other).await.unwrap();
    env.until_inbox("a", "t3", &["prepare", "prepare"]).await;
    assert!(env.inbox("c").await.is_empty());
    assert_eq!(env.record("t3").await.unwrap(), before);

    // Once decided, a resubmit re-sends the decision; once terminal, nothing.
    env.vote("t3", 0, "a", false, Some("a: no")).await;
    env.until_inbox("a", "t3", &["prepare", "prepare", "abort"]).await;
    env.client.submit(&transfer("t3")).await.unwrap();
    env.until_inbox("a", "t3", &["prepare", "prepare", "abort", "abort"]).await;
    env.ack("t3", 0, "a", Outcome::Aborted).await;
    env.ack("t3", 1, "b", Outcome::Aborted).await;
    env.until_state("t3", "aborted").await;
    env.client.submit(&transfer("t3")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.inbox_kinds("a", "t3").await.len(), 4);
    assert_eq!(env.record("t3").await.unwrap().state, TxnState::Aborted);
    env.stop().await;
}

#[tokio::test]
async fn duplicate_votes_and_acks_are_harmless() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    env.client.submit(&transfer("t4")).await.unwrap();
    env.until_inbox("a", "t4", &["prepare"]).await;
    env.vote("t4", 0, "a", true, None).await;
    env.vote("t4", 0, "a", true, None).await;
    env.vote("t4", 0, "a", false, Some("changed my mind")).await; // first vote wins
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rec = env.record("t4").await.unwrap();
    assert_eq!(rec.state, TxnState::Preparing);
    assert_eq!(rec.branches[0].vote, Some(true));
    env.vote("t4", 1, "b", true, None).await;
    env.until_state("t4", "committing").await;
    env.until_inbox("a", "t4", &["prepare", "commit"]).await;
    for _ in 0..3 {
        env.ack("t4", 0, "a", Outcome::Committed).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.record("t4").await.unwrap().state, TxnState::Committing);
    env.ack("t4", 1, "b", Outcome::Committed).await;
    env.ack("t4", 1, "b", Outcome::Committed).await;
    env.until_state("t4", "committed").await;
    // A vote after the end re-sends nothing (the branch acked).
    env.vote("t4", 0, "a", true, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.inbox_kinds("a", "t4").await, vec!["prepare", "commit"]);
    let dead = env.entries(&keys::dead_letter_stream()).await;
    assert!(dead.is_empty(), "{dead:?}");
    env.stop().await;
}

#[tokio::test]
async fn a_silent_participant_times_out() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    env.client.submit(&transfer("t5").with_timeout(Duration::from_millis(300))).await.unwrap();
    env.vote("t5", 0, "a", true, None).await;
    let rec = env.until_state("t5", "aborting").await;
    assert_eq!(rec.reason.as_deref(), Some("timeout: b did not vote within 300ms"));
    env.until_inbox("a", "t5", &["prepare", "abort"]).await;
    env.until_inbox("b", "t5", &["prepare", "abort"]).await;
    // Nobody votes at all: both named.
    env.client.submit(&transfer("t5b").with_timeout(Duration::from_millis(1500))).await.unwrap();
    let rec = env.until_state("t5b", "aborting").await;
    assert_eq!(rec.reason.as_deref(), Some("timeout: a, b did not vote within 1s 500ms"));
    env.stop().await;
}

#[tokio::test]
async fn the_decision_is_resent_until_acked() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    env.client.submit(&transfer("t6")).await.unwrap();
    env.vote("t6", 0, "a", true, None).await;
    env.vote("t6", 1, "b", true, None).await;
    env.until_inbox("a", "t6", &["prepare", "commit"]).await;
    env.ack("t6", 0, "a", Outcome::Committed).await;
    env.until("b to get the commit again", || async { (env.inbox_kinds("b", "t6").await.len() >= 4).then_some(()) })
        .await;
    // a acked: it got no more.
    assert_eq!(env.inbox_kinds("a", "t6").await, vec!["prepare", "commit"]);
    assert!(env.inbox_kinds("b", "t6").await[1..].iter().all(|k| *k == "commit"));
    env.ack("t6", 1, "b", Outcome::Committed).await;
    env.until_state("t6", "committed").await;
    env.stop().await;
}

#[tokio::test]
async fn two_coordinators_share_the_stream() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    env.spawn(env.config());
    let ids: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    for id in &ids {
        env.client.submit(&transfer(id)).await.unwrap();
    }
    for id in &ids {
        env.until_inbox("b", id, &["prepare"]).await;
        env.vote(id, 0, "a", true, None).await;
        env.vote(id, 1, "b", true, None).await;
    }
    for id in &ids {
        env.until_inbox("b", id, &["prepare", "commit"]).await;
        env.ack(id, 0, "a", Outcome::Committed).await;
        env.ack(id, 1, "b", Outcome::Committed).await;
    }
    for id in &ids {
        env.until_state(id, "committed").await;
        assert_eq!(env.inbox_kinds("a", id).await, vec!["prepare", "commit"]);
    }
    let mut c = env.conn.clone();
    let info: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(keys::coord_stream())
        .arg(keys::COORD_GROUP)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(info.len(), 2);
    env.stop().await;
}

#[tokio::test]
async fn invalid_and_garbage_entries_are_dead_lettered() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    // An invalid spec (bypassing the client's validation).
    let mut bad = transfer("t7");
    bad.timeout_ms = 0;
    env.send(Message::Submit(redtx_common::protocol::Submit { spec: bad, submitted_ms: 0 })).await;
    // Garbage, and a message that belongs to a participant stream.
    env.xadd(&keys::coord_stream(), &[("t", b"vote".to_vec()), ("m", b"\xc1nonsense".to_vec())]).await;
    env.xadd(&keys::coord_stream(), &[("hello", b"world".to_vec())]).await;
    env.send(Message::Abort(redtx_common::protocol::Resolve {
        txn: "x".into(),
        branch: 0,
        participant: "a".into(),
        keys: vec![],
    }))
    .await;
    // A vote and an ack for an unknown transaction: logged and acked, not dead-lettered.
    env.vote("nope", 0, "a", true, None).await;
    env.ack("nope", 0, "a", Outcome::Committed).await;
    // Protocol violations: a wrong participant, and an ack not matching the decision.
    env.client.submit(&transfer("t8")).await.unwrap();
    env.until_inbox("a", "t8", &["prepare"]).await;
    env.vote("t8", 0, "b", true, None).await;
    env.vote("t8", 5, "a", true, None).await;
    env.ack("t8", 0, "a", Outcome::Committed).await; // before any decision
    env.vote("t8", 0, "a", false, None).await;
    env.until_state("t8", "aborting").await;
    env.ack("t8", 1, "b", Outcome::Committed).await; // decision is abort

    let dead = env
        .until("8 dead letters", || async {
            let d = env.entries(&keys::dead_letter_stream()).await;
            (d.len() >= 8).then_some(d)
        })
        .await;
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str()).collect();
    assert_eq!(reasons.len(), 8, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.starts_with("invalid spec: timeout")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("bad vote payload")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("no field")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("does not belong on the coordinator stream")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("belongs to a, not b")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("branch 5 does not exist")), "{reasons:?}");
    assert!(reasons
        .iter()
        .any(|r| r.contains("protocol violation: a acked committed while the transaction is preparing")));
    assert!(reasons.iter().any(|r| r.contains("protocol violation: b acked committed but the decision is aborted")));
    let rec = env.record("t8").await.unwrap();
    assert_eq!(rec.reason.as_deref(), Some("a voted no"));
    assert_eq!(rec.branches[1].ack, None);
    assert!(env.record("t7").await.is_none());
    // Everything was acked: nothing stays pending.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = env.conn.clone();
    let pending: redis::streams::StreamPendingReply =
        c.xpending(keys::coord_stream(), keys::COORD_GROUP).await.unwrap();
    assert_eq!(pending.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn survives_a_redis_restart() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    env.client.submit(&transfer("r1")).await.unwrap();
    env.until_inbox("a", "r1", &["prepare"]).await;
    env.server.restart().unwrap();
    let client = redtx_common::Client::connect(&env.server.url()).await.unwrap();
    let conn = redis::Client::open(env.server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    env.conn = conn;
    client.submit(&transfer("r2")).await.unwrap();
    env.until_inbox("a", "r2", &["prepare"]).await;
    env.vote("r2", 0, "a", true, None).await;
    env.vote("r2", 1, "b", true, None).await;
    env.until_state("r2", "committing").await;
    env.stop().await;
}

#[tokio::test]
async fn records_the_deadline_scan_cannot_read_never_block_it() {
    let mut env = Env::start().await;
    // More unreadable due records than one scan reads (a state no build knows), all due first.
    let mut c = env.conn.clone();
    for i in 0..300 {
        let id = format!("junk{i}");
        let _: () = c.hset_multiple(keys::txn_record(&id), &[("state", "frozen"), ("n", "1")]).await.unwrap();
        let _: () = c.zadd(keys::deadlines(), &id, 1).await.unwrap();
    }
    env.spawn(env.config());
    // A real transaction behind them still times out.
    env.client.submit(&transfer("t-behind").with_timeout(Duration::from_millis(300))).await.unwrap();
    let rec = env.until_state("t-behind", "aborting").await;
    assert!(rec.reason.unwrap_or_default().starts_with("timeout: "));
    // The junk is looked at again later, not dropped (an operator may repair it).
    let left: usize = c.zcard(keys::deadlines()).await.unwrap();
    assert!(left >= 300, "{left}");
    env.stop().await;
}
