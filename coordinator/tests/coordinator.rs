//! End-to-end tests of the coordinator against a real Redis, with the participants played by
//! hand (votes and acks XADDed to `rtx:coord:{P}`, prepares/commits/aborts read back through
//! each participant's consumer group).

mod common;

use common::{transfer, Env, PARTITIONS};
use redis::AsyncCommands;
use redtx_common::keys;
use redtx_common::machine::Phase;
use redtx_common::protocol::{Message, Outcome, StepKind, StepStatus};
use redtx_common::record::TxnState;
use redtx_common::spec::{Branch, Op, TxnSpec};
use redtx_coordinator::CoordinatorConfig;
use std::collections::HashMap;
use std::time::Duration;

#[tokio::test]
async fn all_yes_commits_and_publishes_the_outcome() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    env.client.submit(&transfer("t1")).await.unwrap();
    env.until_inbox("a", "t1", &["prepare"]).await;
    env.until_inbox("b", "t1", &["prepare"]).await;
    let Message::Prepare(p) = &env.inbox("b").await[0] else { panic!() };
    assert_eq!((p.branch, p.participant.as_str()), (1, "b"));
    assert_eq!(p.payload, transfer("t1").branches[1].payload, "the payload travels untouched");
    let rec = env.record("t1").await.unwrap();
    assert_eq!(rec.state, TxnState::Preparing);
    assert_eq!(p.deadline_ms, rec.deadline_ms);
    assert_eq!(rec.deadline_ms - rec.created_ms, 5000);

    env.vote("t1", 0, "a", true, None).await;
    env.vote("t1", 1, "b", true, None).await;
    env.until_inbox("a", "t1", &["prepare", "commit"]).await;
    env.until_inbox("b", "t1", &["prepare", "commit"]).await;
    let Message::Commit(c) = &env.inbox("b").await[1] else { panic!() };
    assert_eq!((c.branch, c.participant.as_str()), (1, "b"));
    let rec = env.record("t1").await.unwrap();
    assert_eq!(rec.state, TxnState::Committing);
    assert!(rec.decided_ms.is_some());

    env.ack("t1", 0, "a", Outcome::Committed).await;
    env.ack("t1", 1, "b", Outcome::Committed).await;
    let rec = env.until_state("t1", "committed").await;
    assert!(rec.finished_ms.is_some());
    assert!(rec.branches.iter().all(|b| b.phase == Phase::Committed));
    let mut c = env.conn.clone();
    let ttl: i64 = c.pttl(keys::txn_record(env.part("t1"), "t1")).await.unwrap();
    assert!(ttl > 23 * 3600 * 1000, "record expiry set after retention, got {ttl}");
    let outcomes = env
        .until("outcome", || async {
            let o = env.entries(&keys::outcomes_stream(env.part("t1"))).await;
            (!o.is_empty()).then_some(o)
        })
        .await;
    assert_eq!(outcomes[0]["id"], "t1");
    assert_eq!(outcomes[0]["state"], "committed");
    env.until("left the live set", || async {
        let mut c = env.conn.clone();
        let n: usize = c.zcard(keys::live(env.part("t1"))).await.unwrap();
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
    // A decided abort is a definite answer: waiting producers get it at once.
    assert_eq!(env.client.wait("t2", Duration::from_secs(5)).await.unwrap().state, TxnState::Aborting);
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
    env.join("c").await;
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
    // Checked once a later message of the same partition went through.
    let marker = (0..).map(|i| format!("marker{i}")).find(|id| env.part(id) == env.part("t3")).unwrap();
    env.vote(&marker, 0, "a", true, None).await;
    env.until_inbox("a", &marker, &["abort"]).await;
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
    env.vote("t4", 1, "b", true, None).await;
    // Reaching `committing` proves the later no was ignored.
    let rec = env.until_state("t4", "committing").await;
    assert_eq!(rec.branches[0].phase, Phase::VotedYes);
    env.until_inbox("a", "t4", &["prepare", "commit"]).await;
    for _ in 0..3 {
        env.ack("t4", 0, "a", Outcome::Committed).await;
    }
    env.ack("t4", 1, "b", Outcome::Committed).await;
    env.ack("t4", 1, "b", Outcome::Committed).await;
    env.until_state("t4", "committed").await;
    // A vote after the end re-sends nothing (the branch acked): checked once a later message of
    // the same partition went through.
    env.vote("t4", 0, "a", true, None).await;
    let marker = (0..).map(|i| format!("marker{i}")).find(|id| env.part(id) == env.part("t4")).unwrap();
    env.vote(&marker, 0, "a", true, None).await;
    env.until_inbox("a", &marker, &["abort"]).await;
    assert_eq!(env.inbox_kinds("a", "t4").await, vec!["prepare", "commit"]);
    let dead = env.entries(&keys::dead_letter_stream(env.part("t4"))).await;
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
async fn a_participant_nobody_runs_gets_a_definite_answer_and_no_pile_of_resends() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    let mut spec = transfer("typo");
    spec.branches[1].participant = "bnak-b".into(); // never started: no consumer group
    let spec = spec.with_timeout(Duration::from_millis(300));
    env.client.submit(&spec).await.unwrap();
    env.vote("typo", 0, "a", true, None).await;
    // The producer gets its answer at the deadline, although bnak-b never acks the abort.
    let rec = env.client.wait("typo", Duration::from_secs(10)).await.unwrap();
    assert_eq!(rec.state, TxnState::Aborting);
    assert_eq!(rec.reason.as_deref(), Some("timeout: bnak-b did not vote within 300ms"));
    env.ack("typo", 0, "a", Outcome::Aborted).await;
    // The decision is due for re-sending again and again (the record's next re-send moves on);
    // none of them reaches the stream nobody reads.
    let mut seen = std::collections::BTreeSet::new();
    let started = std::time::Instant::now();
    while seen.len() < 4 {
        assert!(started.elapsed() < Duration::from_secs(20), "re-send rounds: {seen:?}");
        seen.insert(env.progress("typo").await.resend_at_ms);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = env.conn.clone();
    let stream = keys::participant_stream("bnak-b", env.part("typo"));
    let len: usize = c.xlen(&stream).await.unwrap();
    assert_eq!(len, 2, "the prepare and the first abort only");
    env.stop().await;
}

#[tokio::test]
async fn a_vote_for_a_transaction_without_record_gets_an_abort() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    // A hand-written prepare was answered yes: no record means no decision, so: abort.
    env.vote("ghost", 1, "b", true, None).await;
    env.until_inbox("b", "ghost", &["abort"]).await;
    // A no vote or an ack of a ghost needs nothing.
    env.vote("ghost2", 0, "a", false, None).await;
    env.ack("ghost3", 0, "a", Outcome::Aborted).await;
    env.vote("ghost4", 0, "a", true, None).await;
    env.until_inbox("a", "ghost4", &["abort"]).await;
    assert!(env.inbox_kinds("a", "ghost2").await.is_empty());
    env.stop().await;
}

#[tokio::test]
async fn coordinators_spread_the_partitions_and_finish_each_others_work() {
    let mut env = Env::start().await;
    // The acks below come long after their decisions on a busy machine: no re-send meanwhile,
    // so that each inbox holds exactly what the protocol sends once.
    let mut cfg = env.config();
    cfg.resend_every = Duration::from_secs(60);
    env.spawn(cfg.clone());
    env.spawn(cfg);
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
    // Both own a share: every lease is held, by two different coordinators.
    let owners = env
        .until("an even spread", || async {
            let o = env.lease_owners().await;
            let distinct: std::collections::BTreeSet<&String> = o.iter().flatten().collect();
            (o.iter().all(Option::is_some) && distinct.len() == 2).then_some(o)
        })
        .await;
    assert_eq!(owners.len(), common::PARTITIONS as usize);
    // One stops cleanly: it gives its partitions up and the other takes them at once.
    env.stop_one().await;
    env.until("one owner of everything", || async {
        let o = env.lease_owners().await;
        let distinct: std::collections::BTreeSet<&String> = o.iter().flatten().collect();
        (o.iter().all(Option::is_some) && distinct.len() == 1).then_some(())
    })
    .await;
    env.client.submit(&transfer("after")).await.unwrap();
    env.until_inbox("a", "after", &["prepare"]).await;
    env.stop().await;
}

/// The reply of `fenced.lua` as strings.
fn fenced_reply(v: &redis::Value) -> Vec<String> {
    redtx_common::scripts::reply_strings("fenced", v).unwrap()
}

#[tokio::test]
async fn a_write_with_a_moved_lease_is_refused_whole() {
    let env = Env::start().await;
    let mut c = env.conn.clone();
    let _: () = c.set(keys::lease(1), "7:someone-else").await.unwrap();
    let cmds: Vec<&str> = vec!["3", "SET", "rtx:probe:{1}", "x"];
    let url = redtx_common::conn::RedisUrl::parse(&env.server.url()).unwrap();
    let call = redtx_coordinator::owner::FENCED.call().key(keys::lease(1)).key(keys::write_seq(1)).key("rtx:probe:{1}");
    let v = call.clone().arg(1).arg("6:me").arg(0).arg(cmds.clone()).run(&mut c, &url).await.unwrap();
    assert_eq!(fenced_reply(&v), vec!["0", "1", "7:someone-else"]);
    assert!(!c.exists::<_, bool>("rtx:probe:{1}").await.unwrap(), "nothing written");
    let v = call.clone().arg(1).arg("7:someone-else").arg(0).arg(cmds.clone()).run(&mut c, &url).await.unwrap();
    assert_eq!(fenced_reply(&v), vec!["1", "1"]);
    assert_eq!(c.get::<_, String>("rtx:probe:{1}").await.unwrap(), "x");
    // A lapsed lease fences too.
    let _: () = c.del(keys::lease(1)).await.unwrap();
    let v = call.clone().arg(1).arg("7:someone-else").arg(1).arg(cmds.clone()).run(&mut c, &url).await.unwrap();
    assert_eq!(fenced_reply(&v), vec!["0", "1", ""]);
    // Two partitions: the second lease moved, so nothing is written for the first either.
    let _: () = c.set(keys::lease(1), "8:me").await.unwrap();
    let _: () = c.set(keys::lease(2), "9:other").await.unwrap();
    let two = redtx_coordinator::owner::FENCED
        .call()
        .key(keys::lease(1))
        .key(keys::lease(2))
        .key(keys::write_seq(1))
        .key(keys::write_seq(2))
        .key("rtx:probe:{1}");
    let v = two
        .arg(2)
        .arg("8:me")
        .arg("8:me")
        .arg(1)
        .arg(0)
        .arg(vec!["3", "SET", "rtx:probe:{1}", "y"])
        .run(&mut c, &url)
        .await
        .unwrap();
    assert_eq!(fenced_reply(&v), vec!["0", "2", "9:other"]);
    assert_eq!(c.get::<_, String>("rtx:probe:{1}").await.unwrap(), "x");
    assert_eq!(c.get::<_, u64>(keys::write_seq(1)).await.unwrap(), 1, "only the applied write counted");
}

#[tokio::test]
async fn a_write_that_follows_one_not_applied_is_refused_whole() {
    let env = Env::start().await;
    let mut c = env.conn.clone();
    let url = redtx_common::conn::RedisUrl::parse(&env.server.url()).unwrap();
    let _: () = c.set(keys::lease(1), "3:me").await.unwrap();
    let _: () = c.set(keys::lease(2), "3:me").await.unwrap();
    let write = |after: [u64; 2], value: &'static str| {
        redtx_coordinator::owner::FENCED
            .call()
            .key(keys::lease(1))
            .key(keys::lease(2))
            .key(keys::write_seq(1))
            .key(keys::write_seq(2))
            .key("rtx:probe:{1}")
            .arg(2)
            .arg("3:me")
            .arg("3:me")
            .arg(after[0])
            .arg(after[1])
            .arg(vec!["3", "SET", "rtx:probe:{1}", value])
    };
    // The first write of a fresh partition follows 0 (the counter does not exist yet).
    let v = write([0, 0], "first").run(&mut c, &url).await.unwrap();
    assert_eq!(fenced_reply(&v), vec!["1", "1"]);
    // A write sent after one that never arrived names 1 for partition 2: refused, nothing runs,
    // and the reply says what the counter holds.
    let v = write([1, 2], "second").run(&mut c, &url).await.unwrap();
    assert_eq!(fenced_reply(&v), vec!["2", "2", "1"]);
    assert_eq!(c.get::<_, String>("rtx:probe:{1}").await.unwrap(), "first");
    assert_eq!(c.get::<_, u64>(keys::write_seq(1)).await.unwrap(), 1, "no counter moved");
    // The same write sent twice: the second is refused (it follows 1, the counter is now 2).
    let v = write([1, 1], "third").run(&mut c, &url).await.unwrap();
    assert_eq!(fenced_reply(&v), vec!["1", "1"]);
    let v = write([1, 1], "third").run(&mut c, &url).await.unwrap();
    assert_eq!(fenced_reply(&v), vec!["2", "1", "2"]);
    assert_eq!(c.get::<_, String>("rtx:probe:{1}").await.unwrap(), "third");
}

#[tokio::test]
async fn a_coordinator_whose_write_was_out_of_sequence_reloads_and_finishes_exactly_once() {
    let mut env = Env::start().await;
    // No re-send within the test: only the reload can deliver the commits.
    env.spawn(CoordinatorConfig { resend_every: Duration::from_secs(3600), ..env.config() });
    env.client.submit(&transfer("seq")).await.unwrap();
    env.until_inbox("a", "seq", &["prepare"]).await;
    env.until_inbox("b", "seq", &["prepare"]).await;
    // As if a write sent before the next one had been applied by nobody: the counter is not
    // where the coordinator expects it, so its next write must be refused whole.
    let p = env.part("seq");
    let mut c = env.conn.clone();
    let before: u64 = c.incr(keys::write_seq(p), 1).await.unwrap();
    env.vote("seq", 0, "a", true, None).await;
    env.vote("seq", 1, "b", true, None).await;
    // Refused, reloaded (the counter read again), the pending votes handled again: committed.
    env.until_inbox("a", "seq", &["prepare", "commit"]).await;
    env.until_inbox("b", "seq", &["prepare", "commit"]).await;
    assert_eq!(env.record("seq").await.unwrap().state, TxnState::Committing);
    let after: u64 = c.get(keys::write_seq(p)).await.unwrap();
    assert!(after > before, "the decision was written after the counter moved ({before} -> {after})");
    env.ack("seq", 0, "a", Outcome::Committed).await;
    env.ack("seq", 1, "b", Outcome::Committed).await;
    env.until_state("seq", "committed").await;
    // One commit per branch: the refused write sent nothing.
    assert_eq!(env.inbox_kinds("a", "seq").await, vec!["prepare", "commit"]);
    assert_eq!(env.inbox_kinds("b", "seq").await, vec!["prepare", "commit"]);
    env.stop().await;
}

#[tokio::test]
async fn a_write_refused_for_memory_leaves_everything_pending_and_is_retried() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    env.client.submit(&transfer("oom")).await.unwrap();
    env.until_inbox("a", "oom", &["prepare"]).await;
    env.until_inbox("b", "oom", &["prepare"]).await;
    let mut c = env.conn.clone();
    let oom_errors = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("errorstat_OOM:count="))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    // Both votes land, then Redis refuses every write from the next command on.
    let coord = keys::coord_stream(env.part("oom"));
    let mut p = redis::pipe();
    p.atomic();
    for b in [0u32, 1] {
        let m = Message::Vote(redtx_common::protocol::Vote {
            txn: "oom".into(),
            branch: b,
            participant: ["a", "b"][b as usize].into(),
            yes: true,
            reason: None,
        });
        p.xadd(&coord, "*", &m.fields()).ignore();
    }
    p.cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").ignore();
    p.cmd("CONFIG").arg("SET").arg("maxmemory").arg("1").ignore();
    let _: () = p.query_async(&mut c).await.unwrap();
    // The coordinator decides commit in memory, but its write is refused, more than once.
    env.until("two refused writes", || async {
        let info: String = redis::cmd("INFO").arg("errorstats").query_async(&mut env.conn.clone()).await.unwrap();
        (oom_errors(info) >= 2).then_some(())
    })
    .await;
    assert_eq!(env.record("oom").await.unwrap().state, TxnState::Preparing, "nothing of the decision written");
    let pending: redis::streams::StreamPendingReply = c.xpending(&coord, keys::COORD_GROUP).await.unwrap();
    assert_eq!(pending.count(), 2, "both votes stay pending");
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("0").query_async(&mut c).await.unwrap();
    env.until_inbox("a", "oom", &["prepare", "commit"]).await;
    env.until_inbox("b", "oom", &["prepare", "commit"]).await;
    assert_eq!(env.record("oom").await.unwrap().state, TxnState::Committing);
    env.stop().await;
}

#[tokio::test]
async fn invalid_and_garbage_entries_are_dead_lettered() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    let p = env.part("t8");
    let coord = keys::coord_stream(p);
    // An invalid spec (bypassing the client's validation), for the same partition as t8.
    let bad_id = (0..).map(|i| format!("t7-{i}")).find(|id| env.part(id) == p).unwrap();
    let mut bad = transfer(&bad_id);
    bad.timeout_ms = 0;
    env.send(Message::Submit(redtx_common::protocol::Submit { spec: bad, submitted_ms: 0 })).await;
    // Garbage, and a message that belongs to a participant stream.
    env.xadd(&coord, &[("t", b"vote".to_vec()), ("m", b"\xc1nonsense".to_vec())]).await;
    env.xadd(&coord, &[("hello", b"world".to_vec())]).await;
    env.xadd(
        &coord,
        &Message::Abort(redtx_common::protocol::Resolve { txn: "t8".into(), branch: 0, participant: "a".into() })
            .fields()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect::<Vec<_>>(),
    )
    .await;
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
            let d = env.entries(&keys::dead_letter_stream(p)).await;
            (d.len() >= 8).then_some(d)
        })
        .await;
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str()).collect();
    assert_eq!(reasons.len(), 8, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.starts_with("invalid spec: timeout")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("bad vote payload")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("no field")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("does not belong on the coordinator stream")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("comes from \"b\", but that branch belongs to \"a\"")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("names branch 5")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("before its decision")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("contradicts its decision")), "{reasons:?}");
    assert!(dead.iter().all(|d| d["stream"] == coord && d.contains_key("orig.t") || d.contains_key("orig.hello")));
    let rec = env.record("t8").await.unwrap();
    assert_eq!(rec.reason.as_deref(), Some("a voted no"));
    assert_eq!(rec.branches[1].phase, Phase::Pending);
    // The refused submit is visible to its producer too.
    let bad = env.record(&bad_id).await.unwrap();
    assert_eq!(bad.state, TxnState::Rejected);
    assert!(bad.reason.unwrap().starts_with("invalid spec: timeout"));
    // Everything was acked: nothing stays pending (checked after a later event went through).
    env.ack("t8", 0, "a", Outcome::Aborted).await;
    env.ack("t8", 1, "b", Outcome::Aborted).await;
    env.until_state("t8", "aborted").await;
    let mut c = env.conn.clone();
    let pending: redis::streams::StreamPendingReply = c.xpending(&coord, keys::COORD_GROUP).await.unwrap();
    assert_eq!(pending.count(), 0);
    env.stop().await;
}

/// The fields of a valid saga submit of `id` whose MessagePack bytes `from` are replaced by
/// `to`: a producer in another language that got one field wrong.
fn spoiled_submit(id: &str, from: &[u8], to: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let step = Branch::kv_step("a", vec![Op::incrby("k", 1)], vec![Op::incrby("k", -1)]);
    let spec = TxnSpec::saga(vec![step]).with_id(id);
    let m = Message::Submit(redtx_common::protocol::Submit { spec, submitted_ms: 1 }).encode();
    let at = m.windows(from.len()).position(|w| w == from).expect("the bytes to spoil");
    let spoiled = [&m[..at], to, &m[at + from.len()..]].concat();
    vec![("t", b"submit".to_vec()), ("m", spoiled)]
}

/// `v: 2` and `v: "2"` in MessagePack.
const V_INT: &[u8] = b"\xa1v\x02";
const V_STR: &[u8] = b"\xa1v\xa12";

#[tokio::test]
async fn a_refused_submit_is_recorded_rejected_and_announced_to_its_producer() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    let mut c = env.conn.clone();
    let version: String = env.until("rtx:protocol", || async { c.clone().get(keys::protocol()).await.ok() }).await;
    assert_eq!(version, "2");

    // `v` as a string: the record says which field is wrong and what was expected.
    let p = env.part("r1");
    env.xadd(&keys::coord_stream(p), &spoiled_submit("r1", V_INT, V_STR)).await;
    let rec = env.client.wait("r1", Duration::from_secs(10)).await.unwrap();
    assert_eq!(rec.state, TxnState::Rejected);
    assert_eq!(rec.mode, "saga");
    assert_eq!(
        rec.reason.as_deref(),
        Some("bad submit payload: field `v`: expected a MessagePack integer, got a string")
    );
    assert!(rec.finished_ms.is_some() && rec.branches.is_empty());
    let outcomes = env.entries(&keys::outcomes_stream(p)).await;
    assert!(outcomes.iter().any(|o| o["id"] == "r1" && o["state"] == "rejected"), "{outcomes:?}");
    let ttl: i64 = c.pttl(keys::txn_record(p, "r1")).await.unwrap();
    assert!(ttl > 23 * 3600 * 1000, "a rejected record expires after the retention, got {ttl}");
    let live: usize = c.zcard(keys::live(p)).await.unwrap();
    assert_eq!(live, 0);
    let dead = env.entries(&keys::dead_letter_stream(p)).await;
    assert!(dead.iter().any(|d| d["reason"].contains("field `v`")), "operators still see it: {dead:?}");

    // The id stays rejected: a valid resubmit hears the same answer and creates nothing.
    env.client.submit(&transfer("r1")).await.unwrap();
    env.until("the rejection announced again", || async {
        let o = env.entries(&keys::outcomes_stream(p)).await;
        (o.iter().filter(|o| o["id"] == "r1" && o["state"] == "rejected").count() == 2).then_some(())
    })
    .await;
    assert!(env.inbox_kinds("a", "r1").await.is_empty());
    assert_eq!(env.record("r1").await.unwrap().state, TxnState::Rejected);

    // An invalid spec, and a submit that reached the wrong partition (another --partitions).
    let mut invalid = transfer("r2");
    invalid.branches.clear();
    env.send(Message::Submit(redtx_common::protocol::Submit { spec: invalid, submitted_ms: 0 })).await;
    let rec = env.client.wait("r2", Duration::from_secs(10)).await.unwrap();
    assert_eq!(rec.state, TxnState::Rejected);
    assert!(rec.reason.unwrap().starts_with("invalid spec: branches"));
    let other = redtx_common::Client::connect(&env.server.url()).await.unwrap().with_partitions(7);
    // Sent to a partition the coordinators have, but not its own.
    let stray = (0..)
        .map(|i| format!("r3-{i}"))
        .find(|id| other.partition(id) < PARTITIONS && other.partition(id) != env.part(id))
        .unwrap();
    other.submit(&transfer(&stray)).await.unwrap();
    let rec = other.wait(&stray, Duration::from_secs(10)).await.unwrap();
    assert_eq!(rec.state, TxnState::Rejected);
    assert!(rec.reason.unwrap().contains(&format!("of {PARTITIONS}, not {}", other.partition(&stray))));

    // A spoiled submit of an id that exists leaves its transaction alone.
    env.client.submit(&transfer("r4")).await.unwrap();
    env.until_inbox("a", "r4", &["prepare"]).await;
    let before = env.record("r4").await.unwrap();
    let p4 = env.part("r4");
    // timeout_ms 30000 (uint16) sent as the string "5s".
    let spoiled = spoiled_submit("r4", b"timeout_ms\xcd\x75\x30", b"timeout_ms\xa25s");
    env.xadd(&keys::coord_stream(p4), &spoiled).await;
    env.until("the spoiled resubmit dead-lettered", || async {
        let d = env.entries(&keys::dead_letter_stream(p4)).await;
        d.iter().any(|d| d["reason"].contains("field `spec.timeout_ms`")).then_some(())
    })
    .await;
    assert_eq!(env.record("r4").await.unwrap(), before);

    // An id that is not one cannot get a record: dead-lettered only.
    let bad_id = "not an id!";
    let pb = env.part(bad_id);
    env.xadd(&keys::coord_stream(pb), &spoiled_submit(bad_id, V_INT, V_STR)).await;
    env.until("the submit without a valid id dead-lettered", || async {
        let d = env.entries(&keys::dead_letter_stream(pb)).await;
        d.iter().any(|d| d["reason"].contains("field `v`") && d["orig.m"].contains(bad_id)).then_some(())
    })
    .await;
    let n: usize = c.exists(keys::txn_record(pb, bad_id)).await.unwrap();
    assert_eq!(n, 0);
    env.stop().await;
}

#[tokio::test]
async fn survives_a_redis_restart() {
    let mut env = Env::start().await;
    env.spawn(env.config());
    env.client.submit(&transfer("r1")).await.unwrap();
    env.until_inbox("a", "r1", &["prepare"]).await;
    env.server.restart().unwrap();
    let conn = redis::Client::open(env.server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    env.conn = conn;
    env.join("a").await;
    env.join("b").await;
    env.client.submit(&transfer("r2")).await.unwrap();
    env.until_inbox("a", "r2", &["prepare"]).await;
    env.vote("r2", 0, "a", true, None).await;
    env.vote("r2", 1, "b", true, None).await;
    env.until_state("r2", "committing").await;
    env.stop().await;
}

#[tokio::test]
async fn a_saga_runs_forward_and_compensates_in_reverse() {
    let mut env = Env::start().await;
    env.join("c").await;
    env.spawn(env.config());
    let step = |p: &str| {
        redtx_common::spec::Branch::kv_step(
            p,
            vec![redtx_common::spec::Op::incrby("k", 1)],
            vec![redtx_common::spec::Op::incrby("k", -1)],
        )
    };
    let saga = redtx_common::spec::TxnSpec::saga(vec![step("a"), step("b"), step("c")]).with_id("s1");
    env.client.submit(&saga).await.unwrap();
    env.until_inbox("a", "s1", &["execute"]).await;
    env.result("s1", 0, "a", StepKind::Action, StepStatus::Done).await;
    env.until_inbox("b", "s1", &["execute"]).await;
    env.result("s1", 1, "b", StepKind::Action, StepStatus::Done).await;
    env.until_inbox("c", "s1", &["execute"]).await;
    env.result("s1", 2, "c", StepKind::Action, StepStatus::Failed).await;
    env.until_inbox("b", "s1", &["execute", "compensate"]).await;
    assert_eq!(env.inbox_kinds("a", "s1").await, vec!["execute"], "one at a time, the last first");
    let Message::Compensate(m) = env.inbox("b").await.into_iter().filter(|m| m.txn() == "s1").nth(1).unwrap() else {
        panic!()
    };
    assert_eq!(m.payload, saga.branches[1].compensation.clone().unwrap());
    env.result("s1", 1, "b", StepKind::Compensation, StepStatus::Done).await;
    env.until_inbox("a", "s1", &["execute", "compensate"]).await;
    env.result("s1", 0, "a", StepKind::Compensation, StepStatus::Done).await;
    let rec = env.until_state("s1", "compensated").await;
    assert_eq!(rec.failed_step, Some(2));
    assert_eq!(rec.reason.as_deref(), Some("c: why"));
    assert_eq!(env.inbox_kinds("c", "s1").await, vec!["execute"], "the failed step applied nothing");
    env.stop().await;
}

#[tokio::test]
async fn a_batch_of_thousands_of_entries_is_written_whole() {
    let mut env = Env::start().await;
    let mut cfg = env.config();
    cfg.partitions = 1; // one partition, one read: every entry in one write
    cfg.batch = 10_000;
    let mut c = env.conn.clone();
    let mut p = redis::pipe();
    for i in 0..9000 {
        let m = Message::Vote(redtx_common::protocol::Vote {
            txn: format!("ghost{i}"),
            branch: 0,
            participant: "a".into(),
            yes: false,
            reason: None,
        });
        p.xadd(keys::coord_stream(0), "*", &m.fields()).ignore();
    }
    let _: () = p.query_async(&mut c).await.unwrap();
    env.spawn(cfg);
    env.until("every entry acked", || async {
        let mut c = env.conn.clone();
        let pending: redis::streams::StreamPendingReply =
            c.xpending(keys::coord_stream(0), keys::COORD_GROUP).await.ok()?;
        let info: Vec<HashMap<String, redis::Value>> =
            redis::cmd("XINFO").arg("GROUPS").arg(keys::coord_stream(0)).query_async(&mut c).await.ok()?;
        let read = matches!(info[0].get("entries-read"), Some(redis::Value::Int(9000)));
        (read && pending.count() == 0).then_some(())
    })
    .await;
    env.stop().await;
}
