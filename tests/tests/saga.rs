//! Sagas end to end, on the shop fixture (`orders` → `stock` → `payment`, each on its own Redis):
//! an order completes; an order failing at each step compensates the steps that ran, in reverse
//! order, each exactly once; a step that errs or gets no answer in time is retried and applied
//! once; `kill -9` of a coordinator or a participant during the forward steps or the
//! compensation never applies or undoes anything twice; every message delivered twice is
//! harmless; and many concurrent orders conserve stock and money.

use rand::Rng;
use redis::Commands;
use redtx_common::machine::Phase;
use redtx_common::protocol::{Message, StepKind, StepStatus};
use redtx_common::record::{TxnRecord, TxnState};
use redtx_common::spec::TxnSpec;
use redtx_tests::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn reached(fp: &str) -> String {
    format!("failpoint {fp} reached")
}

/// A shop with 10 widgets in stock and ann holding 100.
fn shop_with(opts: ClusterOptions) -> Shop {
    let shop = Shop::start_with(opts);
    shop.seed_stock("widget", 10);
    shop.seed_customer("ann", 100);
    shop
}

/// The steps whose compensation reported `done`, in the order the coordinator received them
/// (first report of each).
fn compensations_done(shop: &Shop, id: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for m in shop.coord_messages(id) {
        if let Message::Result(r) = m {
            if r.step == StepKind::Compensation && r.status == StepStatus::Done && !out.contains(&r.branch) {
                out.push(r.branch);
            }
        }
    }
    out
}

fn phases(rec: &TxnRecord) -> Vec<Phase> {
    rec.branches.iter().map(|b| b.phase).collect()
}

#[test]
fn an_order_completes_and_the_cli_reports_saga_outcomes() {
    let shop = shop_with(ClusterOptions::default());
    let order = Order::new("o-ok", "ann", "widget", 2, 10);
    let rec = shop.run(&order.saga());
    assert_eq!(rec.state, TxnState::Completed, "{rec:?}");
    assert_eq!(phases(&rec), vec![Phase::Done; 3]);
    assert_eq!(shop.int("stock", "stock:widget"), 8);
    assert_eq!(shop.int("payment", "bal:ann"), 80);
    assert!(compensations_done(&shop, "o-ok").is_empty());
    let sum = shop.check(&[(order, rec)]);
    assert_eq!(sum.completed, 1);

    // The JSON form through `redtx submit --wait`: completed exits 0, compensated exits 1.
    let saga = |id: &str, qty: i64| {
        serde_json::json!({
            "id": id, "mode": "saga", "timeout": "20s",
            "steps": [
                {"participant": "stock",
                 "action": [{"op": "incrby", "key": "stock:widget", "by": -qty, "min": 0}],
                 "compensation": [{"op": "incrby", "key": "stock:widget", "by": qty}]},
                {"participant": "payment",
                 "action": [{"op": "incrby", "key": "bal:ann", "by": -qty * 10, "min": 0}],
                 "compensation": [{"op": "incrby", "key": "bal:ann", "by": qty * 10}]}]
        })
        .to_string()
    };
    let out = redtx("submit", &shop.url(), &["--wait", "--json", "-"], Some(saga("cli-ok", 1).as_bytes()));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.json()["state"], "completed", "{out:?}");
    assert_eq!((shop.int("stock", "stock:widget"), shop.int("payment", "bal:ann")), (7, 70));
    // 8 widgets with 7 in stock: the first step fails, there is nothing to undo.
    let out = redtx("submit", &shop.url(), &["--wait", "--json", "-"], Some(saga("cli-no", 8).as_bytes()));
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.json()["state"], "compensated", "{out:?}");
    assert!(out.json()["reason"].as_str().unwrap_or_default().contains("stock:widget"), "{out:?}");
    assert_eq!((shop.int("stock", "stock:widget"), shop.int("payment", "bal:ann")), (7, 70));
    let st = redtx("status", &shop.url(), &["cli-no"], None);
    assert_eq!(st.code, Some(0), "{st:?}");
    assert!(st.stdout.contains("compensated"), "{st:?}");
    shop.assert_clean();
}

#[test]
fn a_failure_at_each_step_compensates_the_steps_that_ran_in_reverse_exactly_once() {
    let shop = shop_with(ClusterOptions::default());
    let mut done = Vec::new();

    // Step 0 fails (the shop is closed): nothing ran, nothing to compensate.
    let _: () = shop.data_conn("orders").set("shop:closed", "1").unwrap();
    let o0 = Order::new("o-fail-0", "ann", "widget", 1, 10);
    let rec = shop.run(&o0.saga());
    assert_eq!(rec.state, TxnState::Compensated, "{rec:?}");
    assert_eq!(rec.failed_step, Some(0), "{rec:?}");
    let reason = rec.reason.clone().unwrap_or_default();
    assert!(reason.contains("orders") && reason.contains("shop:closed"), "{reason}");
    assert_eq!(phases(&rec), vec![Phase::Failed, Phase::Pending, Phase::Pending]);
    assert!(compensations_done(&shop, &o0.id).is_empty());
    assert_eq!(shop.barrier_state("orders", &o0.id).as_deref(), Some("failed"));
    assert_eq!(shop.barrier_state("stock", &o0.id), None, "step 1 never ran");
    done.push((o0, rec));
    let _: () = shop.data_conn("orders").del("shop:closed").unwrap();

    // Step 1 fails (11 widgets, 10 in stock): step 0 is compensated.
    let o1 = Order::new("o-fail-1", "ann", "widget", 11, 1);
    let rec = shop.run(&o1.saga());
    assert_eq!(rec.state, TxnState::Compensated, "{rec:?}");
    assert_eq!(rec.failed_step, Some(1), "{rec:?}");
    let reason = rec.reason.clone().unwrap_or_default();
    assert!(reason.contains("stock") && reason.contains("stock:widget") && reason.contains("min 0"), "{reason}");
    assert_eq!(phases(&rec), vec![Phase::Compensated, Phase::Failed, Phase::Pending]);
    assert_eq!(compensations_done(&shop, &o1.id), vec![0]);
    assert_eq!(shop.marker("orders", &o1), (1, 1));
    assert_eq!(shop.marker("stock", &o1), (0, 0));
    assert_eq!(shop.barrier_state("stock", &o1.id).as_deref(), Some("failed"));
    assert_eq!(shop.barrier_state("payment", &o1.id), None, "step 2 never ran");
    done.push((o1, rec));

    // Step 2 fails (3 widgets at 40, ann has 100): step 1, then step 0 are compensated.
    let o2 = Order::new("o-fail-2", "ann", "widget", 3, 40);
    let rec = shop.run(&o2.saga());
    assert_eq!(rec.state, TxnState::Compensated, "{rec:?}");
    assert_eq!(rec.failed_step, Some(2), "{rec:?}");
    let reason = rec.reason.clone().unwrap_or_default();
    assert!(reason.contains("payment") && reason.contains("bal:ann"), "{reason}");
    assert_eq!(phases(&rec), vec![Phase::Compensated, Phase::Compensated, Phase::Failed]);
    assert_eq!(compensations_done(&shop, &o2.id), vec![1, 0], "compensations must run in reverse order");
    assert_eq!(shop.marker("orders", &o2), (1, 1));
    assert_eq!(shop.marker("stock", &o2), (1, 1));
    assert_eq!(shop.marker("payment", &o2), (0, 0));
    for (name, state) in [("orders", "compensated"), ("stock", "compensated"), ("payment", "failed")] {
        assert_eq!(shop.barrier_state(name, &o2.id).as_deref(), Some(state), "{name}: {}", shop.dump(&o2.id));
    }
    // Each compensation was asked for once (nothing timed out) and applied once.
    for (name, branch) in [("stock", 1), ("orders", 0)] {
        let n = shop
            .sent_to(name, &o2.id)
            .iter()
            .filter(|m| matches!(m, Message::Compensate(e) if e.branch == branch))
            .count();
        assert_eq!(n, 1, "compensate sent to {name} {n} times");
    }
    done.push((o2, rec));

    assert_eq!(shop.int("stock", "stock:widget"), 10);
    assert_eq!(shop.int("payment", "bal:ann"), 100);
    let sum = shop.check(&done);
    assert_eq!(sum.compensated, 3);
}

#[test]
fn a_step_without_an_answer_in_time_is_retried_and_applied_once() {
    // stock is frozen (SIGSTOP) past the step timeout: the coordinator counts the attempt as
    // failed and tries again; once stock runs again, it applies the action once (the barrier
    // turns every later attempt into a repeat) and the order completes.
    let mut shop = shop_with(ClusterOptions::default());
    shop.procs("stock")[0].stop();
    let order = Order::new("o-slow", "ann", "widget", 1, 10);
    let mut spec = order.saga();
    spec.retry.step_timeout_ms = 500;
    let id = shop.submit(&spec);
    let rec = shop.wait_record(&id, "a second attempt at step 1", LONG, |r| r.branches[1].attempts >= 2);
    assert_eq!(rec.state, TxnState::Running, "{rec:?}");
    assert!(rec.branches[1].reason.as_deref().unwrap_or_default().contains("no result within"), "{rec:?}");
    shop.procs("stock")[0].cont();

    let rec = shop.wait(&id);
    assert_eq!(rec.state, TxnState::Completed, "{rec:?}");
    assert_eq!(shop.marker("stock", &order), (1, 0), "the action must apply exactly once");
    shop.check(&[(order, rec)]);
}

#[test]
fn a_data_redis_refusing_writes_is_retried_then_succeeds() {
    // payment's data Redis refuses every write for a moment (`maxmemory 1`, noeviction): the
    // step cannot apply and is retried, without applying anything half-way; once writes are
    // accepted again it applies once and the order completes.
    let mut shop = shop_with(ClusterOptions::default());
    let mut data = shop.data_conn("payment");
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query(&mut data).unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1").query(&mut data).unwrap();
    let order = Order::new("o-oom", "ann", "widget", 1, 10);
    let id = shop.submit(&order.saga());
    // Evidence that payment tried and was refused: an erring attempt in the record, or the
    // refusal in the worker's log (the request stays pending and is retried).
    let started = Instant::now();
    loop {
        let rec = shop.record(&id);
        let in_record = rec.as_ref().is_some_and(|r| {
            r.branches[2].attempts >= 2 || r.branches[2].reason.as_deref().is_some_and(|x| x.contains("OOM"))
        });
        if in_record || shop.procs("payment")[0].printed("OOM") {
            break;
        }
        assert!(started.elapsed() < LONG, "payment never tried the step:\n{}\n{}", shop.dump(&id), shop.tails());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(shop.int("payment", "bal:ann"), 100, "nothing may apply while writes are refused");
    assert_eq!(shop.barrier_state("payment", &id), None);
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("0").query(&mut data).unwrap();

    let rec = shop.wait(&id);
    assert_eq!(rec.state, TxnState::Completed, "{rec:?}");
    assert_eq!(shop.marker("payment", &order), (1, 0));
    shop.check(&[(order, rec)]);
    shop.assert_running(&["payment#1"]);
}

#[test]
fn participant_killed_after_a_forward_step_applies_it_once() {
    let fp = "participant-after-execute";
    let mut shop = shop_with(ClusterOptions::default().failpoint("stock", fp));
    let order = Order::new("o-kill-stock", "ann", "widget", 2, 10);
    let id = shop.submit(&order.saga());
    shop.procs("stock")[0].wait_for_line(&reached(fp), LONG);
    // The action is applied, its result never sent.
    assert_eq!(shop.marker("stock", &order), (1, 0));
    assert_eq!(shop.barrier_state("stock", &id).as_deref(), Some("done"));
    assert_eq!(shop.record(&id).unwrap().branches[1].phase, Phase::Running);
    shop.procs("stock")[0].kill9();

    shop.start_worker("stock", None);
    let rec = shop.wait(&id);
    assert_eq!(rec.state, TxnState::Completed, "{rec:?}");
    assert_eq!(shop.int("stock", "stock:widget"), 8);
    shop.check(&[(order, rec)]);
}

#[test]
fn participant_killed_during_compensation_undoes_once() {
    // payment is not running yet, so the order waits at step 2 after stock took the goods.
    // stock is then replaced by an instance that freezes after its next request: the
    // compensation, which comes once payment refuses the charge. It is killed there and a fresh
    // instance finishes.
    let fp = "participant-after-execute";
    let mut shop = shop_with(ClusterOptions::default().instances("payment", 0));
    let order = Order::new("o-kill-comp", "ann", "widget", 3, 40);
    let id = shop.submit(&order.saga());
    shop.wait_record(&id, "step 1 done", LONG, |r| r.branches[1].phase == Phase::Done);
    shop.procs("stock")[0].term();
    let status = shop.procs("stock")[0].wait_exit(LONG).expect("stock did not stop on SIGTERM");
    assert!(status.success(), "stock exited {status}");
    shop.start_worker("stock", Some(fp));
    shop.start_worker("payment", None);

    shop.procs("stock")[1].wait_for_line(&reached(fp), LONG);
    // The compensation is applied, its result never sent.
    assert_eq!(shop.marker("stock", &order), (1, 1));
    assert_eq!(shop.barrier_state("stock", &id).as_deref(), Some("compensated"));
    let rec = shop.record(&id).unwrap();
    assert_eq!(rec.state, TxnState::Compensating, "{rec:?}");
    shop.procs("stock")[1].kill9();

    shop.start_worker("stock", None);
    let rec = shop.wait(&id);
    assert_eq!(rec.state, TxnState::Compensated, "{rec:?}");
    assert_eq!(compensations_done(&shop, &id), vec![1, 0]);
    assert_eq!(shop.int("stock", "stock:widget"), 10);
    shop.check(&[(order, rec)]);
}

#[test]
fn coordinator_killed_during_forward_steps_is_finished_by_a_new_one() {
    let mut shop = shop_with(ClusterOptions::default());
    // stock is frozen, so the order is in the middle of its forward steps when the coordinator
    // dies.
    shop.procs("stock")[0].stop();
    let order = Order::new("o-kill-coord", "ann", "widget", 1, 10);
    let id = shop.submit(&order.saga());
    shop.wait_record(&id, "step 0 done, step 1 sent", LONG, |r| {
        r.branches[0].phase == Phase::Done && r.branches[1].phase == Phase::Running
    });
    shop.coordinators[0].kill9();
    shop.procs("stock")[0].cont();
    // stock applies the step and reports to a coordinator stream nobody reads until the new
    // coordinator takes the partition over (after the lease lapses).
    shop.wait_barrier("stock", &id, "done");
    shop.start_coordinator(None);

    let rec = shop.wait(&id);
    assert_eq!(rec.state, TxnState::Completed, "{rec:?}");
    shop.check(&[(order, rec)]);
}

#[test]
fn coordinator_killed_after_starting_the_compensation_is_finished_by_a_new_one() {
    let fp = "coordinator-after-decision";
    let mut shop = shop_with(ClusterOptions::default().coord_failpoint(fp));
    let order = Order::new("o-kill-coord-comp", "ann", "widget", 3, 40);
    let id = shop.submit(&order.saga());
    shop.coordinators[0].wait_for_line(&reached(fp), LONG);
    let rec = shop.record(&id).unwrap();
    assert_eq!(rec.state, TxnState::Compensating, "{rec:?}");
    assert_eq!(rec.failed_step, Some(2), "{rec:?}");
    shop.coordinators[0].kill9();

    shop.start_coordinator(None);
    let rec = shop.wait(&id);
    assert_eq!(rec.state, TxnState::Compensated, "{rec:?}");
    assert_eq!(compensations_done(&shop, &id), vec![1, 0]);
    shop.check(&[(order, rec)]);
}

/// Everything that must not change when old messages are delivered again.
fn snapshot(shop: &Shop, orders: &[&Order]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for o in orders {
        for name in SHOP_STEPS {
            out.insert(format!("{name} marker {}", o.id), format!("{:?}", shop.marker(name, o)));
            out.insert(format!("{name} barrier {}", o.id), format!("{:?}", shop.barrier_state(name, &o.id)));
        }
        let rec = shop.record(&o.id).unwrap();
        out.insert(format!("record {}", o.id), format!("{} {:?} {:?}", rec.state, phases(&rec), rec.reason));
    }
    for (name, key) in [("stock", "stock:widget"), ("stock", "sold:widget"), ("payment", "bal:ann")] {
        out.insert(key.to_string(), shop.int(name, key).to_string());
    }
    out
}

fn all_streams() -> Vec<String> {
    let mut v = coord_streams();
    for name in SHOP_STEPS {
        v.extend(participant_streams(name));
    }
    v
}

fn wait_quiet(shop: &Shop) {
    let mut s = shop.stream_conn();
    poll("every stream drained and quiet", LONG, || {
        let before = xlen_sum(&mut s, &all_streams());
        let all = all_streams().iter().all(|st| s.xlen::<_, u64>(st).unwrap() == 0 || drained(&mut s, st));
        (all && xlen_sum(&mut s, &all_streams()) == before).then_some(())
    });
}

#[test]
fn every_saga_message_delivered_twice_is_harmless() {
    let shop = shop_with(ClusterOptions::default());
    let ok = Order::new("o-dup-ok", "ann", "widget", 2, 10);
    let no = Order::new("o-dup-no", "ann", "widget", 3, 40);
    assert_eq!(shop.run(&ok.saga()).state, TxnState::Completed);
    assert_eq!(shop.run(&no.saga()).state, TxnState::Compensated);
    wait_quiet(&shop);
    let before = snapshot(&shop, &[&ok, &no]);

    // Re-deliver every message: copy each entry's `t` and `m` to a new entry of its stream.
    let mut s = shop.stream_conn();
    let mut kinds = std::collections::BTreeSet::new();
    for stream in all_streams() {
        for (_, f) in xrange(&mut s, &stream) {
            let (t, m) = (f.get("t").cloned().unwrap_or_default(), f.get("m").cloned().unwrap_or_default());
            kinds.insert(lossy(&t));
            let _: String = s.xadd(&stream, "*", &[("t", t), ("m", m)]).unwrap();
        }
    }
    for k in ["submit", "execute", "compensate", "result"] {
        assert!(kinds.contains(k), "no {k} re-sent: {kinds:?}");
    }
    wait_quiet(&shop);
    // A later order completes: everything before it was handled.
    let later = Order::new("o-dup-later", "bob", "gadget", 1, 1);
    shop.seed_stock("gadget", 1);
    shop.seed_customer("bob", 1);
    assert_eq!(shop.run(&later.saga()).state, TxnState::Completed);
    wait_quiet(&shop);

    let after = snapshot(&shop, &[&ok, &no]);
    assert_eq!(after, before);
    assert_eq!(shop.int("orders", "orders:placed"), 2, "o-dup-ok and o-dup-later");
    let dead = shop.dead_letters();
    assert!(dead.is_empty(), "a duplicate is not a poison message: {dead:?}");
}

#[test]
fn concurrent_orders_conserve_stock_and_money_across_kills() {
    const PRODUCERS: usize = 8;
    const PER_PRODUCER: usize = 64;
    const SKUS: usize = 4;
    const CUSTOMERS: usize = 16;
    let started = Instant::now();
    // Two coordinators (the partitions spread over them) and two stock instances; one of each
    // is killed with SIGKILL a third of the way in.
    let mut shop = Shop::start_with(
        ClusterOptions {
            coordinators: 2,
            coord_args: ["--lease", "2s", "--claim-idle", "1s", "--resend-every", "1s"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            part_args: ["--claim-idle", "1s"].iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
        .instances("stock", 2),
    );
    // The partitions are spread over both coordinators before the load starts, so the kill
    // takes some of them away.
    for c in shop.coordinators.iter_mut() {
        c.wait_for_line("acquired partition", LONG);
    }
    for i in 0..SKUS {
        // sku0 runs out (refused by stock); the customers run out of money (refused by payment).
        shop.seed_stock(&format!("sku{i}"), if i == 0 { 20 } else { 200 });
    }
    for i in 0..CUSTOMERS {
        shop.seed_customer(&format!("c{i}"), 300);
    }
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let url = shop.url();
        tasks.push(shop.rt.spawn(async move {
            let client = connect_client(&url).await.expect("connect");
            let mut out = Vec::new();
            // Four orders in flight per producer.
            for chunk in (0..PER_PRODUCER).collect::<Vec<_>>().chunks(4) {
                let mut handles = Vec::new();
                for &n in chunk {
                    let order = {
                        let mut rng = rand::rng();
                        Order::new(
                            &format!("o-{p}-{n}"),
                            &format!("c{}", rng.random_range(0..CUSTOMERS)),
                            &format!("sku{}", rng.random_range(0..SKUS)),
                            rng.random_range(1..=3),
                            rng.random_range(5..=25),
                        )
                    };
                    let client = client.clone();
                    handles.push(tokio::spawn(async move {
                        let r = client.submit_and_wait(&order.saga(), Duration::from_secs(60)).await;
                        (order, r)
                    }));
                }
                for h in handles {
                    out.push(h.await.expect("order task"));
                }
            }
            out
        }));
    }
    let mut s = shop.stream_conn();
    let third = PRODUCERS * PER_PRODUCER / 3;
    poll("a third of the orders in", LONG, || (scan(&mut s, "rtx:txn:*").len() >= third).then_some(()));
    shop.coordinators[0].kill9();
    shop.procs("stock")[0].kill9();
    let mut results = Vec::new();
    for t in tasks {
        for (o, r) in shop.rt.block_on(t).expect("producer") {
            let rec = r.unwrap_or_else(|e| panic!("{}: {e}\n{}", o.id, shop.dump(&o.id)));
            results.push((o, rec));
        }
    }
    let load = started.elapsed();
    assert_eq!(results.len(), PRODUCERS * PER_PRODUCER);
    for (o, rec) in &results {
        assert!(rec.state.is_terminal(), "{} settled as {}: {rec:?}", o.id, rec.state);
    }
    let sum = shop.check(&results);
    let stock_failures = results.iter().filter(|(_, r)| r.failed_step == Some(1)).count();
    let payment_failures = results.iter().filter(|(_, r)| r.failed_step == Some(2)).count();
    eprintln!(
        "{} orders in {load:?}: {} completed, {} compensated ({stock_failures} at stock, {payment_failures} at payment)",
        results.len(),
        sum.completed,
        sum.compensated
    );
    assert!(sum.completed > results.len() / 8, "too few orders completed: {sum:?}");
    assert!(stock_failures > 0, "no order was refused by stock");
    assert!(payment_failures > 0, "no order was refused by payment");
    assert!(shop.dead_letters().is_empty(), "{:?}", shop.dead_letters());
    shop.assert_running(&["coordinator#2", "orders#1", "stock#2", "payment#1"]);
}

#[test]
fn a_compensation_that_keeps_failing_is_stuck_then_finishes_once_it_can() {
    let shop = shop_with(ClusterOptions::default());
    // Step 0's compensation is guarded by a flag an operator has not set yet; step 1 fails
    // (10 widgets wanted, 10 in stock, but ann cannot pay 1000), so step 0 must be undone.
    let spec = serde_json::json!({
        "id": "stuck-1", "mode": "saga", "timeout": "20s",
        "retry": {"limit": 2, "backoff": "20ms", "step_timeout": "2s"},
        "steps": [
            {"participant": "stock",
             "action": [{"op": "incrby", "key": "stock:widget", "by": -10, "min": 0}],
             "compensation": [{"op": "expect", "key": "undo-allowed", "value": "yes"},
                              {"op": "incrby", "key": "stock:widget", "by": 10}]},
            {"participant": "payment",
             "action": [{"op": "incrby", "key": "bal:ann", "by": -1000, "min": 0}],
             "compensation": [{"op": "incrby", "key": "bal:ann", "by": 1000}]}]
    })
    .to_string();
    let out = redtx("submit", &shop.url(), &["--wait", "--json", "-"], Some(spec.as_bytes()));
    assert_eq!(out.code, Some(6), "stuck exits 6: {out:?}");
    assert_eq!(out.json()["state"], "stuck", "{out:?}");
    assert_eq!(shop.int("stock", "stock:widget"), 0, "not undone yet");
    let st = redtx("status", &shop.url(), &["stuck-1"], None);
    assert!(st.stdout.contains("stuck") && st.stdout.contains("undo-allowed"), "{st:?}");
    // It is still retried: once the guard can pass, the saga finishes, undoing step 0 once.
    let mut c = shop.data_conn("stock");
    let _: () = c.set("undo-allowed", "yes").unwrap();
    let rec = shop.wait("stuck-1");
    assert_eq!(rec.state, TxnState::Compensated, "{rec:?}");
    assert!(rec.branches[0].attempts > 2, "{rec:?}");
    assert_eq!(shop.int("stock", "stock:widget"), 10);
    assert_eq!(shop.int("payment", "bal:ann"), 100);
    assert_eq!(compensations_done(&shop, "stuck-1"), vec![0]);
}

#[test]
fn a_compensation_that_finds_no_trace_of_its_applied_action_is_not_taken_for_success() {
    // stock applied its action, then lost its barrier before the compensation reached it (as if
    // kept shorter than the saga took). Its answer "nothing to undo" contradicts the `done` the
    // coordinator had: the saga must not end `compensated` with the stock still taken.
    let mut shop = shop_with(ClusterOptions::default());
    let spec = serde_json::json!({
        "id": "lost-1", "mode": "saga", "timeout": "20s",
        "retry": {"limit": 2, "backoff": "20ms", "step_timeout": "10s"},
        "steps": [
            {"participant": "stock",
             "action": [{"op": "incrby", "key": "stock:widget", "by": -3, "min": 0}],
             "compensation": [{"op": "incrby", "key": "stock:widget", "by": 3}]},
            {"participant": "payment",
             "action": [{"op": "incrby", "key": "bal:ann", "by": -1000, "min": 0}],
             "compensation": [{"op": "incrby", "key": "bal:ann", "by": 1000}]}]
    });
    let spec = TxnSpec::from_json(spec.to_string().as_bytes()).unwrap();
    // payment holds step 1 back until stock is frozen with its action applied.
    shop.procs("payment")[0].stop();
    let id = shop.submit(&spec);
    shop.wait_barrier("stock", &id, "done");
    shop.procs("stock")[0].stop();
    shop.procs("payment")[0].cont();
    shop.wait_record(&id, "the compensation of step 0 sent", LONG, |r| r.branches[0].phase == Phase::Compensating);
    let _: () = shop.data_conn("stock").del(keys::barrier("stock", &id)).unwrap();
    shop.procs("stock")[0].cont();
    let rec = shop.wait_settled(&id);
    assert_eq!(rec.state, TxnState::Stuck, "{rec:?}");
    assert!(rec.branches[0].reason.as_deref().unwrap_or_default().contains("no trace of the action"), "{rec:?}");
    assert_eq!(shop.int("stock", "stock:widget"), 7, "the action stays applied; an operator must undo it");
}
