//! Property test: the exact 64-bit counter checks of `lua/lib/i64.lua` (through `prepare.lua`
//! and `commit.lua`) agree with Rust's i128 arithmetic, on a real Redis, including near ±2^53
//! and the i64 limits.

mod support;

use proptest::prelude::*;
use redis::AsyncCommands;
use redtx_common::kv::{IncrbyOp, Op};
use redtx_common::protocol::Outcome;
use redtx_participant::{Answer, Request};
use support::*;

fn interesting() -> impl Strategy<Value = i64> {
    let p53 = 1i64 << 53;
    prop_oneof![
        Just(0i64),
        Just(i64::MAX),
        Just(i64::MIN),
        (-3i64..=3).prop_map(move |d| p53 + d),
        (-3i64..=3).prop_map(move |d| -p53 + d),
        (0i64..5).prop_map(|d| i64::MAX - d),
        (0i64..5).prop_map(|d| i64::MIN + d),
        -1000i64..1000,
        // Around the fast path's edge (15 digits: Lua numbers, exact) and just past it.
        (-3i64..=3).prop_map(|d| 999_999_999_999_999 + d),
        (-3i64..=3).prop_map(|d| -999_999_999_999_999 + d),
        any::<i64>(),
    ]
}

/// What prepare must answer, computed in Rust.
fn expected(cur: i64, by: i64, min: Option<i64>, max: Option<i64>) -> Option<String> {
    let new = cur as i128 + by as i128;
    if new < i64::MIN as i128 || new > i64::MAX as i128 {
        return Some(format!("bank-a: k would be {new}, outside the 64-bit integer range"));
    }
    if let Some(lo) = min.filter(|lo| new < *lo as i128) {
        return Some(format!("bank-a: k would be {new}, below min {lo}"));
    }
    if let Some(hi) = max.filter(|hi| new > *hi as i128) {
        return Some(format!("bank-a: k would be {new}, above max {hi}"));
    }
    None
}

#[test]
fn counters_match_i128_arithmetic() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = server();
    let (c, kv) = rt.block_on(async { (conn(&s).await, kv(&s)) });
    // The property closure is `Fn`: state it mutates lives in cells.
    let (c, kv, n) = (std::cell::RefCell::new(c), std::cell::RefCell::new(kv), std::cell::Cell::new(0u64));
    let cfg = ProptestConfig { cases: 300, ..ProptestConfig::default() };
    proptest!(cfg, |(cur in interesting(), by in interesting(), min in proptest::option::of(interesting()), max in proptest::option::of(interesting()))| {
        if let (Some(lo), Some(hi)) = (min, max) {
            prop_assume!(lo <= hi, "a spec with min above max is invalid");
        }
        n.set(n.get() + 1);
        let txn = format!("p{}", n.get());
        let p = prepare(&txn, vec![Op::Incrby(IncrbyOp { key: "k".into(), by, min, max })]);
        let (mut c, mut kv) = (c.borrow_mut(), kv.borrow_mut());
        let (c, kv) = (&mut *c, &mut *kv);
        let (answer, value) = rt.block_on(async {
            let _: () = c.set("k", cur).await.unwrap();
            let answer = ask(kv, Request::Prepare(p.clone())).await.unwrap();
            if answer == (Answer::Vote { yes: true, reason: None }) {
                assert_eq!(ask(kv, Request::Commit(resolve(&txn))).await.unwrap(), Answer::Ack(Outcome::Committed));
            } else {
                assert_eq!(ask(kv, Request::Abort(resolve(&txn))).await.unwrap(), Answer::Ack(Outcome::Aborted));
            }
            (answer, get(c, "k").await.unwrap())
        });
        match expected(cur, by, min, max) {
            None => {
                prop_assert_eq!(answer, Answer::Vote { yes: true, reason: None });
                prop_assert_eq!(value, (cur + by).to_string());
            }
            Some(reason) => {
                prop_assert_eq!(answer, Answer::Vote { yes: false, reason: Some(reason) });
                prop_assert_eq!(value, cur.to_string());
            }
        }
    });
}
