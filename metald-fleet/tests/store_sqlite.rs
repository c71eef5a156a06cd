//! The fleet store's contract against the embedded SQLite store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod store_suite;

use std::sync::Arc;

use metald_fleet::store::FleetStore;
use metald_fleet::store::sqlite::SqliteStore;

struct Sqlite {
    dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
}

impl store_suite::StoreSubject for Sqlite {
    fn new(_test: &str) -> Option<Self> {
        let dir = tempfile::Builder::new().prefix("metald-fleet-test-").tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("fleet.db")).unwrap());
        Some(Self { dir, store })
    }

    async fn store(&self) -> Arc<dyn FleetStore> {
        Arc::clone(&self.store) as Arc<dyn FleetStore>
    }

    async fn reopen(&self) -> Arc<dyn FleetStore> {
        Arc::new(SqliteStore::open(&self.dir.path().join("fleet.db")).unwrap())
    }
}

store_suite!(Sqlite);
