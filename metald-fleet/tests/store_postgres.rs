//! The fleet store's contract against PostgreSQL, each test on a server of
//! its own (`metald_testguest::postgres`), and what only a shared store
//! must add: gateways starting together migrate it once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod store_suite;

use std::sync::Arc;

use metald_fleet::store::FleetStore;
use metald_fleet::store::postgres::PostgresStore;
use metald_testguest::postgres::{PostgresServer, require_postgres};

struct Postgres {
    server: PostgresServer,
}

impl store_suite::StoreSubject for Postgres {
    fn new(test: &str) -> Option<Self> {
        require_postgres(test).map(|server| Self { server })
    }

    async fn store(&self) -> Arc<dyn FleetStore> {
        Arc::new(PostgresStore::open(&self.server.url(), None).await.unwrap())
    }

    async fn reopen(&self) -> Arc<dyn FleetStore> {
        self.store().await
    }
}

store_suite!(Postgres);

#[test]
fn gateways_starting_at_once_apply_each_migration_once() {
    let Some(server) = require_postgres("gateways_starting_at_once_apply_each_migration_once") else { return };
    store_suite::runtime().block_on(async {
        let url = server.url();
        let opening = (0..4).map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PostgresStore::open(&url, None).await })
        });
        for opened in futures::future::join_all(opening).await {
            opened.unwrap().expect("every gateway starts");
        }
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let versions: Vec<i32> = client
            .query("SELECT version FROM metald_schema_migrations ORDER BY version", &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(versions, [1, 2], "each migration once");
    });
}

#[test]
fn a_store_that_cannot_reach_its_server_says_where() {
    let Some(mut server) = require_postgres("a_store_that_cannot_reach_its_server_says_where") else { return };
    store_suite::runtime().block_on(async {
        let store = PostgresStore::open(&server.url(), None).await.unwrap();
        server.stop();
        let error = store.tenants().await.unwrap_err();
        assert!(error.to_string().contains("the fleet store on PostgreSQL at 127.0.0.1:"), "{error}");
        server.restart().unwrap();
        assert!(store.tenants().await.unwrap().is_empty(), "the same store answers once its server is back");
    });
}
