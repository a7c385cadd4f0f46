//! An inventory service as a redtx participant, with the SDK: business logic only.
//!
//! ```text
//! cargo run -p redtx-participant --example inventory -- --redis redis://127.0.0.1:6379
//! echo '{"branches":[{"participant":"inventory","payload":{"sku":"apple","qty":2}},
//!   {"participant":"bank-a","ops":[{"op":"incrby","key":"acct:alice","by":-4,"min":0}]}]}' | redtx submit --wait -
//! ```
//! In 2PC, prepare reserves stock, commit sells it, abort puts it back. In a saga, the action
//! sells at once and the compensation puts it back.

use clap::Parser;
use redtx_common::shutdown::Shutdown;
use redtx_participant::sdk::{serve, Ctx, Service};
use redtx_participant::ParticipantConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Serialize, Deserialize)]
struct Inventory {
    stock: BTreeMap<String, i64>,
    reserved: BTreeMap<String, i64>,
    sold: BTreeMap<String, i64>,
}

/// A branch's payload: `{"sku": "apple", "qty": 2}`.
#[derive(Deserialize)]
struct Take {
    sku: String,
    qty: i64,
}

impl Inventory {
    fn take(&mut self, t: &Take) -> Result<(), String> {
        let have = self.stock.get(&t.sku).copied().unwrap_or(0);
        if t.qty <= 0 || have < t.qty {
            return Err(format!("cannot take {} {}: {have} in stock", t.qty, t.sku));
        }
        *self.stock.entry(t.sku.clone()).or_default() -= t.qty;
        Ok(())
    }

    fn add(map: &mut BTreeMap<String, i64>, sku: &str, qty: i64) {
        *map.entry(sku.to_string()).or_default() += qty;
    }
}

impl Service for Inventory {
    type Payload = Take;

    fn prepare(&mut self, _: &Ctx<'_>, t: Take) -> Result<(), String> {
        self.take(&t)?;
        Self::add(&mut self.reserved, &t.sku, t.qty);
        Ok(())
    }
    fn commit(&mut self, ctx: &Ctx<'_>, t: Take) {
        Self::add(&mut self.reserved, &t.sku, -t.qty);
        Self::add(&mut self.sold, &t.sku, t.qty);
        tracing::info!(txn = ctx.txn, sku = %t.sku, qty = t.qty, "sold");
    }
    fn abort(&mut self, _: &Ctx<'_>, t: Take) {
        Self::add(&mut self.reserved, &t.sku, -t.qty);
        Self::add(&mut self.stock, &t.sku, t.qty);
    }
    fn execute(&mut self, _: &Ctx<'_>, t: Take) -> Result<(), String> {
        self.take(&t)?;
        Self::add(&mut self.sold, &t.sku, t.qty);
        Ok(())
    }
    fn compensate(&mut self, _: &Ctx<'_>, t: Take) -> Result<(), String> {
        Self::add(&mut self.sold, &t.sku, -t.qty);
        Self::add(&mut self.stock, &t.sku, t.qty);
        Ok(())
    }
}

#[derive(Parser)]
struct Args {
    #[arg(long, env = "REDTX_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    #[arg(long, default_value = "inventory")]
    name: String,
    #[arg(long, env = "REDTX_PARTITIONS", default_value_t = redtx_common::keys::DEFAULT_PARTITIONS)]
    partitions: u32,
}

#[tokio::main]
async fn main() -> redtx_common::Result<()> {
    redtx_common::init_logging("info");
    let args = Args::parse();
    let mut cfg = ParticipantConfig::new(args.redis, args.name);
    cfg.partitions = args.partitions;
    // The first run starts with 10 apples and 5 pears; later runs find their saved state.
    let stock = BTreeMap::from([("apple".to_string(), 10), ("pear".to_string(), 5)]);
    let initial = Inventory { stock, reserved: BTreeMap::new(), sold: BTreeMap::new() };
    serve(cfg, initial, Shutdown::on_signals()).await
}
