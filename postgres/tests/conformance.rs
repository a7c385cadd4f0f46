//! The conformance suite on the PostgreSQL resource, on a private PostgreSQL server.

use redtx_common::pg_server::PgServer;
use redtx_participant::conformance::{self, Fixture};
use redtx_postgres::{payload, PgOptions, PgResource, Statement};
use serde_json::json;
use std::time::Duration;
use tokio_postgres::NoTls;

const NAME: &str = "ledger";

/// Items are rows of `conf_items`; the refused payload takes a unit from an item that has none
/// (a row-count guard fails).
struct PgFixture {
    client: tokio_postgres::Client,
}

impl Fixture for PgFixture {
    fn participant(&self) -> &str {
        NAME
    }
    fn add(&self, item: &str) -> Vec<u8> {
        payload::encode(&[Statement::new(
            "INSERT INTO conf_items (item, n) VALUES ($1, 1) ON CONFLICT (item) DO UPDATE SET n = conf_items.n + 1",
            vec![json!(item)],
        )])
    }
    fn remove(&self, item: &str) -> Vec<u8> {
        payload::encode(&[Statement::new("UPDATE conf_items SET n = n - 1 WHERE item = $1", vec![json!(item)]).rows(1)])
    }
    fn refused(&self) -> Vec<u8> {
        payload::encode(&[Statement::new(
            "UPDATE conf_items SET n = n - 1 WHERE item = $1 AND n > 0",
            vec![json!("empty")],
        )
        .rows(1)])
    }
    async fn count(&mut self, item: &str) -> redtx_common::Result<i64> {
        let row = self.client.query_opt("SELECT n FROM conf_items WHERE item = $1", &[&item]).await.unwrap();
        Ok(row.map(|r| r.get(0)).unwrap_or(0))
    }
}

pub async fn client(pg: &PgServer) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&pg.url(), NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn resource(pg: &PgServer) -> PgResource {
    PgResource::new(PgOptions {
        url: pg.url(),
        participant: NAME.into(),
        deployment: "test".into(),
        connections: 3,
        lock_timeout: Duration::from_millis(200),
        retention: Duration::from_secs(3600),
        records: None,
        orphan_after: Duration::from_secs(3600),
    })
}

#[tokio::test]
async fn postgres_resource_passes_the_conformance_suite() {
    let pg = PgServer::start().expect("PostgreSQL starts");
    let client = client(&pg).await;
    client
        .batch_execute("CREATE TABLE conf_items (item text PRIMARY KEY, n bigint NOT NULL CHECK (n >= 0))")
        .await
        .unwrap();
    let mut fixture = PgFixture { client };
    let mut r = resource(&pg);
    let n = conformance::run(&mut r, &mut fixture).await.unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(n, conformance::RULES.len());
    // Again, and from a second resource (a second worker) on the same database.
    conformance::run(&mut r, &mut fixture).await.unwrap_or_else(|f| panic!("{f}"));
    let mut other = resource(&pg);
    conformance::run(&mut other, &mut fixture).await.unwrap_or_else(|f| panic!("{f}"));
    // Nothing left prepared.
    let left = fixture.client.query("SELECT gid FROM pg_prepared_xacts", &[]).await.unwrap();
    assert!(
        left.is_empty(),
        "prepared transactions left: {:?}",
        left.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
    );
}
