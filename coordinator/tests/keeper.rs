//! The lease keeper (`lease::Keeper`) against a real Redis: it renews a coordinator's leases off
//! its loop while the loop keeps passing, lets them lapse once the loop stops, and reports a
//! lease another coordinator took.

use redis::AsyncCommands;
use redtx_common::conn::{RedisTarget, RedisUrl};
use redtx_common::keys;
use redtx_common::server::RedisServer;
use redtx_coordinator::lease::{self, Keeper};
use std::time::{Duration, Instant};

const TTL_MS: u64 = 1500;

async fn holder(conn: &mut redtx_common::conn::RedisConn, p: u32) -> Option<String> {
    conn.get(keys::lease(p)).await.unwrap()
}

#[tokio::test]
async fn the_keeper_renews_while_the_loop_passes_and_lets_go_once_it_stops() {
    let server = RedisServer::start().unwrap();
    let url = RedisTarget::single(RedisUrl::parse(&server.url()).unwrap());
    let mut conn = url.connect().await.unwrap();
    let held = lease::acquire(&mut conn, &url, "me", TTL_MS, &[0, 1, 2]).await.unwrap();
    assert_eq!(held.len(), 3);
    let keeper = Keeper::start(url.connect_managed(Duration::from_secs(1)).await.unwrap(), url.clone(), TTL_MS);

    // The loop passes every 50 ms for three lease lifetimes: the leases outlive their TTL.
    let until = Instant::now() + Duration::from_millis(3 * TTL_MS);
    while Instant::now() < until {
        keeper.sync(held.clone());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (p, value) in &held {
        assert_eq!(holder(&mut conn, *p).await.as_deref(), Some(value.as_str()), "partition {p} kept");
    }
    assert!(keeper.lost().is_empty());

    // Another coordinator takes partition 2 (its lease moved): the keeper reports it lost.
    let _: () = conn.set(keys::lease(2), "99:other").await.unwrap();
    let lost = loop {
        keeper.sync(held.clone());
        let lost = keeper.lost();
        if !lost.is_empty() {
            break lost;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // (Reported again at each renewal while the loop still names it: the same report.)
    let expected = (2, held[2].1.clone(), "99:other".to_string());
    assert!(lost.iter().all(|l| *l == expected), "{lost:?}");

    // The loop stops passing: the keeper stops renewing after half a lease, and the leases
    // lapse within one and a half leases of the last pass (plus this machine's slack).
    let last_pass = Instant::now();
    loop {
        let gone = holder(&mut conn, 0).await.is_none() && holder(&mut conn, 1).await.is_none();
        if gone {
            break;
        }
        assert!(
            last_pass.elapsed() < Duration::from_millis(3 * TTL_MS),
            "leases still held {:?} after the loop's last pass",
            last_pass.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lapsed = last_pass.elapsed();
    // Not before a lease's life (less this test's own few milliseconds): the keeper renewed
    // after the last pass.
    assert!(lapsed >= Duration::from_millis(TTL_MS - 200), "lapsed {lapsed:?} after the last pass");
    // The other coordinator's lease is untouched.
    assert_eq!(holder(&mut conn, 2).await.as_deref(), Some("99:other"));
}
