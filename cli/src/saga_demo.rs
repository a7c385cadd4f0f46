//! `redtx demo --mode saga`: an order flow as sagas over three participants, each on its own
//! Redis.
//!
//! Every order is a saga of three steps, run in order:
//!
//! | step | participant | action                                  | compensation              |
//! |------|-------------|-----------------------------------------|---------------------------|
//! | 0    | `orders`    | `set order:<n> placed`                  | `set order:<n> cancelled` |
//! | 1    | `stock`     | `incrby stock:<sku> -qty` (min 0)       | `incrby stock:<sku> +qty` |
//! | 2    | `payment`   | `incrby balance:<user> -price` (min 0)  | `incrby balance:<user> +price` |
//!
//! Stock and balances are sized so that demand exceeds them: some orders fail at the stock step
//! (out of stock) or at the payment step (insufficient funds) and compensate the steps that ran.
//! Concurrent producers place the orders; at the end the demo checks, from the data itself:
//!
//! - stock + sold is what it was for every product, and balance + spent for every user, where
//!   sold and spent add up the orders that completed;
//! - every order ended `completed` or `compensated`;
//! - nothing is half-done: `order:<n>` is `placed` exactly for the completed orders (a
//!   compensated one is `cancelled`, or absent if its first step never applied);
//! - no lock is left behind.
//!
//! Any of these broken: exit 5.

use crate::cluster::{self, Cluster};
use crate::demo::{progress_bar, DemoArgs, Latencies};
use crate::Exit;
use rand::Rng;
use redtx_common::record::TxnState;
use redtx_common::spec::{Branch, IncrbyOp, Op, TxnSpec};
use redtx_common::{Client, Error};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The participants, in step order.
const PARTICIPANTS: [&str; 3] = ["orders", "stock", "payment"];
/// How long a producer waits for an order's outcome.
const WAIT: Duration = Duration::from_secs(60);

/// One order: `qty` of product `sku` for `user`, at `price` in total.
#[derive(Debug, Clone, Copy)]
struct Order {
    sku: usize,
    qty: i64,
    user: usize,
    price: i64,
}

/// The price of one unit of `sku`: 5 to 35.
fn unit_price(sku: usize) -> i64 {
    5 + (sku as i64 * 7) % 31
}

/// What the producer learnt about one order.
#[derive(Debug, Clone)]
struct Answer {
    id: String,
    state: Option<TxnState>,
    failed_step: Option<u32>,
}

/// The keys of the run.
struct Keys {
    orders: Vec<String>,
    stock: Vec<String>,
    balance: Vec<String>,
}

impl Order {
    fn saga(&self, n: usize, participants: &[String], keys: &Keys) -> TxnSpec {
        let (order, stock, balance) = (&keys.orders[n], &keys.stock[self.sku], &keys.balance[self.user]);
        let take = |key: &String, by: i64| Op::Incrby(IncrbyOp { key: key.clone(), by: -by, min: Some(0), max: None });
        TxnSpec::saga(vec![
            Branch::kv_step(
                participants[0].clone(),
                vec![Op::set(order.clone(), "placed")],
                vec![Op::set(order.clone(), "cancelled")],
            ),
            Branch::kv_step(
                participants[1].clone(),
                vec![take(stock, self.qty)],
                vec![Op::incrby(stock.clone(), self.qty)],
            ),
            Branch::kv_step(
                participants[2].clone(),
                vec![take(balance, self.price)],
                vec![Op::incrby(balance.clone(), self.price)],
            ),
        ])
    }
}

pub async fn run(args: DemoArgs) -> Result<Exit, Error> {
    if args.orders == 0
        || args.concurrency == 0
        || args.skus == 0
        || args.users == 0
        || args.stock < 0
        || args.balance < 0
    {
        eprintln!(
            "error: --orders, --concurrency, --skus and --users must be at least 1; --stock and --balance at least 0"
        );
        return Ok(Exit::Invalid);
    }
    // Dropping the cluster kills the servers it started: keep it until the end.
    let mut cluster = match args.cluster {
        false => Cluster::start(args.redis.as_deref(), "demo", &PARTICIPANTS, args.partitions, false)?,
        true => Cluster::start_on_redis_cluster(&PARTICIPANTS, args.partitions, args.masters)?,
    };
    let m = &cluster.members;
    let streams = match args.cluster {
        false => String::new(),
        true => format!(", streams on a private Redis Cluster of {} masters ({})", args.masters, cluster.stream_url),
    };
    println!(
        "redtx demo (saga): {} orders, {} at a time, over orders ({}), stock ({}) and payment ({}); {} products \
         with {} each in stock, {} users with {} each, {} partitions{streams}",
        args.orders,
        args.concurrency,
        m[0].url,
        m[1].url,
        m[2].url,
        args.skus,
        args.stock,
        args.users,
        args.balance,
        args.partitions
    );
    cluster.start_workers();
    let m = &cluster.members;

    let keys = Arc::new(Keys {
        orders: (0..args.orders).map(|n| m[0].key(&format!("order:{n}"))).collect(),
        stock: (0..args.skus).map(|s| m[1].key(&format!("stock:{s}"))).collect(),
        balance: (0..args.users).map(|u| m[2].key(&format!("balance:{u}"))).collect(),
    });
    let participants: Arc<Vec<String>> = Arc::new(m.iter().map(|m| m.name.clone()).collect());
    let mut conns = cluster.connect_all().await?;
    let stock_pairs: Vec<(&String, i64)> = keys.stock.iter().map(|k| (k, args.stock)).collect();
    cluster.set(&mut conns, 1, &stock_pairs).await?;
    let balance_pairs: Vec<(&String, i64)> = keys.balance.iter().map(|k| (k, args.balance)).collect();
    cluster.set(&mut conns, 2, &balance_pairs).await?;

    // One to three units of a random product for a random user.
    let orders: Arc<Vec<Order>> = Arc::new({
        let mut rng = rand::rng();
        (0..args.orders)
            .map(|_| {
                let (sku, qty) = (rng.random_range(0..args.skus), rng.random_range(1..=3));
                Order { sku, qty, user: rng.random_range(0..args.users), price: qty * unit_price(sku) }
            })
            .collect()
    });

    let client = Client::connect_target(cluster.stream_target()?).await?.with_partitions(args.partitions);
    let answers: Arc<Mutex<Vec<Option<Answer>>>> = Arc::new(Mutex::new(vec![None; args.orders]));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let (completed, compensated) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let next = Arc::new(AtomicUsize::new(0));
    let bar = progress_bar(args.orders, "orders");
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, keys, participants, orders) = (client.clone(), keys.clone(), participants.clone(), orders.clone());
        let (answers, latencies, next, bar) = (answers.clone(), latencies.clone(), next.clone(), bar.clone());
        let (completed, compensated) = (completed.clone(), compensated.clone());
        producers.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= orders.len() {
                    return Ok::<_, Error>(());
                }
                let spec = orders[n].saga(n, &participants, &keys);
                let t0 = Instant::now();
                let answer = match client.submit_and_wait(&spec, WAIT).await {
                    Ok(r) => {
                        latencies.lock().unwrap().push(t0.elapsed());
                        match r.state {
                            TxnState::Completed => completed.fetch_add(1, Ordering::Relaxed),
                            TxnState::Compensated => compensated.fetch_add(1, Ordering::Relaxed),
                            _ => 0,
                        };
                        Answer { id: r.id, state: Some(r.state), failed_step: r.failed_step }
                    }
                    Err(Error::WaitTimeout { .. }) => Answer { id: spec.id.clone(), state: None, failed_step: None },
                    Err(e) => return Err(e),
                };
                answers.lock().unwrap()[n] = Some(answer);
                bar.inc(1);
                bar.set_message(format!(
                    "{} completed, {} compensated",
                    completed.load(Ordering::Relaxed),
                    compensated.load(Ordering::Relaxed)
                ));
            }
        });
    }
    cluster.join_producers(producers).await?;
    let elapsed = started.elapsed();
    bar.finish_and_clear();

    // A producer is answered on `stuck` too, and gives up after WAIT: give those a last chance to
    // end before judging them.
    let mut answers: Vec<Answer> = std::mem::take(&mut *answers.lock().unwrap()).into_iter().flatten().collect();
    let open: Vec<usize> = (0..answers.len()).filter(|&i| !answers[i].state.is_some_and(|s| s.is_terminal())).collect();
    let ids: Vec<String> = open.iter().map(|&i| answers[i].id.clone()).collect();
    for (i, r) in open.iter().zip(cluster::settle(&client, &ids, Duration::from_secs(30)).await?) {
        if let Some(r) = r {
            answers[*i].state = Some(r.state);
            answers[*i].failed_step = r.failed_step;
        }
    }
    cluster.stop_workers().await;

    // Read the data back and check it.
    let stock_now: Vec<i64> =
        cluster.get::<i64>(&mut conns, 1, &keys.stock).await?.into_iter().map(|v| v.unwrap_or(0)).collect();
    let balance_now: Vec<i64> =
        cluster.get::<i64>(&mut conns, 2, &keys.balance).await?.into_iter().map(|v| v.unwrap_or(0)).collect();
    let order_keys: Vec<Option<String>> = cluster.get::<String>(&mut conns, 0, &keys.orders).await?;
    let locks = cluster.locks_left(&mut conns).await?;
    if cluster.shared() {
        cluster.delete(&mut conns, 0, &keys.orders).await?;
        cluster.delete(&mut conns, 1, &keys.stock).await?;
        cluster.delete(&mut conns, 2, &keys.balance).await?;
    }
    drop(cluster);

    let (mut sold, mut spent) = (vec![0i64; args.skus], vec![0i64; args.users]);
    let (mut completed, mut out_of_stock, mut no_funds, mut other_comp) = (0, 0, 0, 0);
    let (mut unfinished, mut half_done) = (Vec::new(), Vec::new());
    for (n, a) in answers.iter().enumerate() {
        let o = orders[n];
        let key = order_keys[n].as_deref();
        match a.state {
            Some(TxnState::Completed) => {
                completed += 1;
                sold[o.sku] += o.qty;
                spent[o.user] += o.price;
                if key != Some("placed") {
                    half_done.push(format!("order {n} ({}) completed but {} is {key:?}", a.id, keys.orders[n]));
                }
            }
            Some(TxnState::Compensated) => {
                match a.failed_step {
                    Some(1) => out_of_stock += 1,
                    Some(2) => no_funds += 1,
                    _ => other_comp += 1,
                }
                if !matches!(key, Some("cancelled") | None) {
                    half_done.push(format!("order {n} ({}) compensated but {} is {key:?}", a.id, keys.orders[n]));
                }
            }
            s => unfinished.push(format!(
                "order {n} ({}) is {}",
                a.id,
                s.map_or("unknown (gave up waiting)", |s| s.as_str())
            )),
        }
    }
    let stock_before = args.stock * args.skus as i64;
    let balance_before = args.balance * args.users as i64;
    let (stock_after, sold_total): (i64, i64) = (stock_now.iter().sum(), sold.iter().sum());
    let (balance_after, spent_total): (i64, i64) = (balance_now.iter().sum(), spent.iter().sum());
    let stock_ok = (0..args.skus).all(|s| stock_now[s] + sold[s] == args.stock);
    let money_ok = (0..args.users).all(|u| balance_now[u] + spent[u] == args.balance);

    let lat = Latencies::new(std::mem::take(&mut *latencies.lock().unwrap()));
    let comp = out_of_stock + no_funds + other_comp;
    println!("  completed:   {completed}");
    println!("  compensated: {comp}  (out of stock {out_of_stock}, insufficient funds {no_funds}, other {other_comp})");
    if !unfinished.is_empty() {
        println!("  unfinished:  {}", unfinished.len());
    }
    println!(
        "  throughput:  {:.0} orders/s over {:.2}s, {} producers",
        lat.0.len() as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        args.concurrency
    );
    println!(
        "  latency:     p50 {:.2} ms, p99 {:.2} ms (submit to completed or compensated)",
        lat.ms(0.50),
        lat.ms(0.99)
    );
    println!(
        "  stock:       {stock_before} before; {stock_after} left + {sold_total} sold = {}{}",
        stock_after + sold_total,
        if stock_ok { "" } else { "  (some product does not add up)" }
    );
    println!(
        "  money:       {balance_before} before; {balance_after} left + {spent_total} spent = {}{}",
        balance_after + spent_total,
        if money_ok { "" } else { "  (some user does not add up)" }
    );
    println!("  half-done:   {}", half_done.len());
    println!("  locks left:  {locks}");
    for problem in unfinished.iter().chain(&half_done).take(10) {
        println!("    {problem}");
    }
    if !stock_ok || !money_ok || !unfinished.is_empty() || !half_done.is_empty() || locks != 0 {
        println!("FAILED: stock or money not conserved, orders unfinished or half-done, or locks left behind");
        return Ok(Exit::Broken);
    }
    println!("OK: every order completed or was compensated entirely; stock and money add up");
    Ok(Exit::Ok)
}
