//! The SDK's example participant (`participant/examples/inventory.rs`) as a real process, with
//! the coordinator and the key-value participant `bank-a`: 2PC and sagas commit, refuse and
//! compensate; a `kill -9` loses nothing; stock + reserved + sold stays constant.

use redis::Commands;
use redtx_common::record::TxnState;
use redtx_common::server::ServerOptions;
use redtx_common::spec::{Branch, TxnSpec};
use redtx_tests::*;
use serde_json::{json, Value};

const ALICE: &str = "acct:alice";

fn start_inventory(c: &Cluster, n: usize) -> Proc {
    let mut args = vec!["--redis".to_string(), c.url()];
    args.extend(partitions_args());
    let mut p = Proc::spawn(&format!("inventory#{n}"), &example("inventory"), &args, &[]);
    p.wait_for_line("service image on this Redis", LONG);
    p
}

fn take(sku: &str, qty: i64) -> Vec<u8> {
    rmp_serde::to_vec_named(&json!({"sku": sku, "qty": qty})).unwrap()
}

fn inventory(sku: &str, qty: i64) -> Branch {
    Branch { participant: "inventory".into(), payload: take(sku, qty), compensation: None, after: None }
}

/// The service's saved state (`stock`, `reserved`, `sold`).
fn state(c: &Cluster) -> Value {
    /// The image's state (its barriers hold byte strings, which JSON has no type for: skipped).
    #[derive(serde::Deserialize)]
    struct Image {
        state: Value,
    }
    let blob: Vec<u8> = c.stream_conn().hget("rtx:svc:inventory", "image").unwrap();
    rmp_serde::from_slice::<Image>(&blob).unwrap().state
}

fn count(state: &Value, map: &str, sku: &str) -> i64 {
    state[map][sku].as_i64().unwrap_or(0)
}

/// stock + reserved + sold of `sku` (constant: the example starts with 10 apples and 5 pears).
fn total(c: &Cluster, sku: &str) -> i64 {
    let s = state(c);
    count(&s, "stock", sku) + count(&s, "reserved", sku) + count(&s, "sold", sku)
}

#[test]
fn the_inventory_example_takes_part_in_2pc_and_sagas() {
    let c = Cluster::start(1, ServerOptions::default(), &[("bank-a", 0)], ClusterOptions::default());
    let mut data = c.data_conn("bank-a");
    let _: () = data.set(ALICE, 100).unwrap();
    let mut procs = vec![start_inventory(&c, 1)];
    let pay = |n: i64| Branch::kv("bank-a", vec![incrby(ALICE, -n, Some(0), None)]);

    // 2PC: two apples for 4.
    let rec = c.run(&TxnSpec::new(vec![inventory("apple", 2), pay(4)]));
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    let s = state(&c);
    assert_eq!((count(&s, "stock", "apple"), count(&s, "reserved", "apple"), count(&s, "sold", "apple")), (8, 0, 2));

    // More apples than there are: the service votes no, with its reason; nothing changes.
    let rec = c.run(&TxnSpec::new(vec![inventory("apple", 50), pay(1)]));
    assert_eq!(rec.state, TxnState::Aborted, "{rec:?}");
    assert_eq!(rec.reason.as_deref(), Some("inventory: cannot take 50 apple: 8 in stock"));
    // A payload that is not a `Take`: refused before the service's code runs.
    let mut bad = inventory("apple", 1);
    bad.payload = rmp_serde::to_vec_named(&json!({"sku": "apple"})).unwrap();
    let rec = c.run(&TxnSpec::new(vec![bad, pay(1)]));
    assert!(rec.reason.as_deref().unwrap_or("").contains("the payload is not a valid Take"), "{rec:?}");
    let got: i64 = data.get(ALICE).unwrap();
    assert_eq!(got, 96);

    // A saga: a pear, then the payment; then one whose payment fails, so the pear goes back.
    // The inventory step has no compensation payload (JSON `null`): the service undoes with the
    // action's.
    let pear = || Branch { compensation: Some(vec![0xc0]), ..inventory("pear", 1) };
    let pay =
        |n: i64| Branch::kv_step("bank-a", vec![incrby(ALICE, -n, Some(0), None)], vec![incrby(ALICE, n, None, None)]);
    let rec = c.run(&TxnSpec::saga(vec![pear(), pay(3)]));
    assert_eq!(rec.state, TxnState::Completed, "{rec:?}");
    let rec = c.run(&TxnSpec::saga(vec![pear(), pay(1000)]));
    assert_eq!(rec.state, TxnState::Compensated, "{rec:?}");
    let s = state(&c);
    assert_eq!((count(&s, "stock", "pear"), count(&s, "sold", "pear")), (4, 1));

    // kill -9, restart: the saved image comes back, and work goes on from it.
    let pay = |n: i64| Branch::kv("bank-a", vec![incrby(ALICE, -n, Some(0), None)]);
    procs[0].kill9();
    let id = c.submit(&TxnSpec::new(vec![inventory("apple", 3), pay(6)]));
    procs.push(start_inventory(&c, 2));
    let rec = c.wait(&id);
    assert_eq!(rec.state, TxnState::Committed, "{rec:?}");
    let s = state(&c);
    assert_eq!((count(&s, "stock", "apple"), count(&s, "sold", "apple")), (5, 5));
    assert_eq!((total(&c, "apple"), total(&c, "pear")), (10, 5), "stock + reserved + sold is constant");
    let got: i64 = data.get(ALICE).unwrap();
    assert_eq!(got, 100 - 4 - 3 - 6);
    c.wait_clean();
}
