//! The conformance suite on the built-in key-value resource, on a real Redis.

mod support;

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use redtx_common::kv::{encode_ops, IncrbyOp, Op};
use redtx_participant::conformance::{self, Fixture};
use support::*;

/// Items are counters `conf:<item>`; the refused payload decrements a counter below its min.
struct KvFixture {
    conn: MultiplexedConnection,
}

impl Fixture for KvFixture {
    fn participant(&self) -> &str {
        NAME
    }

    fn add(&self, item: &str) -> Vec<u8> {
        encode_ops(&[Op::incrby(format!("conf:{item}"), 1)])
    }

    fn remove(&self, item: &str) -> Vec<u8> {
        encode_ops(&[Op::incrby(format!("conf:{item}"), -1)])
    }

    fn refused(&self) -> Vec<u8> {
        encode_ops(&[Op::Incrby(IncrbyOp { key: "conf:empty".into(), by: -1, min: Some(0), max: None })])
    }

    async fn count(&mut self, item: &str) -> redtx_common::Result<i64> {
        let v: Option<i64> = self.conn.get(format!("conf:{item}")).await.unwrap();
        Ok(v.unwrap_or(0))
    }
}

#[tokio::test]
async fn kv_resource_passes_the_conformance_suite() {
    let s = server();
    let mut fixture = KvFixture { conn: conn(&s).await };
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
