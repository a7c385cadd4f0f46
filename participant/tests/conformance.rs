//! The conformance suite on the built-in key-value resource, on a real Redis.

mod support;

use redis::AsyncCommands;
use redtx_participant::conformance;
use support::*;

#[tokio::test]
async fn kv_resource_passes_the_conformance_suite() {
    let s = server();
    let mut fixture = CounterFixture { conn: conn(&s).await };
    let mut r = kv(&s);
    let n = conformance::run(&mut r, &mut fixture).await.unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(n, conformance::RULES.len());
    // Twice on the same data: a run never trips over an earlier one.
    conformance::run(&mut r, &mut fixture).await.unwrap_or_else(|f| panic!("{f}"));
    // And from a resource that did not see the prepares (no key cache: keys read from barriers).
    let mut other = kv(&s);
    conformance::run(&mut other, &mut fixture).await.unwrap_or_else(|f| panic!("{f}"));
    let locks: Vec<String> = fixture.conn.keys("rtx:lock:*").await.unwrap();
    assert!(locks.is_empty(), "locks left behind: {locks:?}");
}
