//! The fleet store's contract, one function per promise, run against each
//! store (`store_sqlite.rs`, `store_postgres.rs`). A store passes when every one holds.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, async_fn_in_trait)]

use std::sync::Arc;

use metald_fleet::keys::NewKey;
use metald_fleet::store::{
    FleetStore, HostMode, HostRecord, Idempotency, KeyRecord, Placement, PlacementStatus, Quota, Reservation, StoreError, Tenant,
};

/// A store of its own for one test, and how to open it again.
pub trait StoreSubject: Sized {
    fn new(test: &str) -> Option<Self>;
    async fn store(&self) -> Arc<dyn FleetStore>;
    /// The same store opened anew, as a restarted (or another) gateway does.
    async fn reopen(&self) -> Arc<dyn FleetStore>;
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn tenant(id: &str, quota: Quota) -> Tenant {
    Tenant { id: id.into(), quota, created_at_ms: 1_000 }
}

fn key_of(tenant: &str, made: &NewKey) -> KeyRecord {
    KeyRecord {
        id: made.id.clone(),
        tenant: tenant.into(),
        digest: made.digest,
        label: "ci".into(),
        created_at_ms: 2_000,
        expires_at_ms: None,
        revoked_at_ms: None,
        last_used_ms: None,
    }
}

fn host(name: &str) -> HostRecord {
    HostRecord {
        name: name.into(),
        url: format!("http://127.0.0.1:1/{name}"),
        mode: HostMode::Active,
        added_at_ms: 3_000,
        announced_at_ms: None,
    }
}

fn placement(vm_id: &str, tenant: &str, host: &str, vcpus: u64) -> Placement {
    Placement {
        vm_id: vm_id.into(),
        tenant: tenant.into(),
        host: host.into(),
        status: PlacementStatus::Pending,
        vcpus,
        memory_bytes: 64 << 20,
        created_at_ms: 4_000,
    }
}

pub fn tenants_are_made_once_and_keep_their_quota<S: StoreSubject>(test: &str) {
    let Some(subject) = S::new(test) else { return };
    runtime().block_on(async {
        let store = subject.store().await;
        store.create_tenant(tenant("acme", Quota::default())).await.unwrap();
        assert!(matches!(store.create_tenant(tenant("acme", Quota::default())).await, Err(StoreError::TenantExists(id)) if id == "acme"));
        let quota = Quota { max_vms: Some(3), max_vcpus: None, max_memory_bytes: Some(1 << 30) };
        assert_eq!(store.set_quota("acme", quota).await.unwrap().quota, quota);
        assert!(matches!(store.set_quota("nobody", quota).await, Err(StoreError::NoSuchTenant(_))));
        store.create_tenant(tenant("globex", Quota::default())).await.unwrap();
        let ids: Vec<String> = store.tenants().await.unwrap().into_iter().map(|tenant| tenant.id).collect();
        assert_eq!(ids, ["acme", "globex"]);
        assert_eq!(subject.reopen().await.tenant("acme").await.unwrap().map(|tenant| tenant.quota), Some(quota), "kept across a reopen");
        assert_eq!(store.tenant("nobody").await.unwrap(), None);
    });
}

pub fn keys_are_kept_as_digests_and_revoked_for_good<S: StoreSubject>(test: &str) {
    let Some(subject) = S::new(test) else { return };
    runtime().block_on(async {
        let store = subject.store().await;
        let made = NewKey::generate();
        assert!(matches!(store.insert_key(key_of("acme", &made)).await, Err(StoreError::NoSuchTenant(_))), "a key needs its tenant");
        store.create_tenant(tenant("acme", Quota::default())).await.unwrap();
        store.create_tenant(tenant("globex", Quota::default())).await.unwrap();
        store.insert_key(key_of("acme", &made)).await.unwrap();
        let other = NewKey::generate();
        store.insert_key(key_of("globex", &other)).await.unwrap();
        let found = store.key(&made.id).await.unwrap().unwrap();
        assert_eq!((found.tenant.as_str(), found.digest), ("acme", made.digest));
        assert!(found.valid_at(5_000));
        assert_eq!(store.keys(Some("acme")).await.unwrap().len(), 1);
        assert_eq!(store.keys(None).await.unwrap().len(), 2);

        store.record_key_uses(vec![(made.id.clone(), 9_000)]).await.unwrap();
        store.record_key_uses(vec![(made.id.clone(), 8_000)]).await.unwrap();
        assert_eq!(store.key(&made.id).await.unwrap().unwrap().last_used_ms, Some(9_000), "a later use never goes back");

        let revoked = store.revoke_key(&made.id, 10_000).await.unwrap();
        assert_eq!(revoked.revoked_at_ms, Some(10_000));
        assert!(!revoked.valid_at(10_001));
        assert_eq!(store.revoke_key(&made.id, 20_000).await.unwrap().revoked_at_ms, Some(10_000), "the first revocation stands");
        assert!(matches!(store.revoke_key("0000000000000000", 1).await, Err(StoreError::NoSuchKey(_))));
        assert!(!subject.reopen().await.key(&made.id).await.unwrap().unwrap().valid_at(30_000), "revoked across a reopen");

        let mut expiring = key_of("acme", &NewKey::generate());
        expiring.expires_at_ms = Some(50_000);
        assert!(expiring.valid_at(49_999) && !expiring.valid_at(50_000));
    });
}

pub fn hosts_are_added_moded_and_removed_only_when_empty<S: StoreSubject>(test: &str) {
    let Some(subject) = S::new(test) else { return };
    runtime().block_on(async {
        let store = subject.store().await;
        store.add_host(host("h1")).await.unwrap();
        assert!(matches!(store.add_host(host("h1")).await, Err(StoreError::HostExists(_))));
        store.add_host(host("h2")).await.unwrap();
        assert_eq!(store.set_host_mode("h1", HostMode::Cordoned).await.unwrap().mode, HostMode::Cordoned);
        assert!(matches!(store.set_host_mode("h9", HostMode::Draining).await, Err(StoreError::NoSuchHost(_))));
        store.create_tenant(tenant("acme", Quota::default())).await.unwrap();
        store.reserve_placement(placement("vm-1", "acme", "h2", 1), Quota::default(), None).await.unwrap();
        assert!(matches!(store.remove_host("h2", false).await, Err(StoreError::HostNotEmpty { vms: 1, .. })));
        store.remove_host("h1", false).await.unwrap();
        store.remove_host("h2", true).await.unwrap();
        assert!(store.hosts().await.unwrap().is_empty());
        assert!(matches!(store.remove_host("h2", true).await, Err(StoreError::NoSuchHost(_))));
    });
}

pub fn a_host_announces_itself_and_keeps_the_mode_its_operator_gave_it<S: StoreSubject>(test: &str) {
    let Some(subject) = S::new(test) else { return };
    runtime().block_on(async {
        let store = subject.store().await;
        let first = store.announce_host("h1", "http://127.0.0.1:7070", 5_000).await.unwrap();
        assert_eq!((first.mode, first.added_at_ms, first.announced_at_ms), (HostMode::Active, 5_000, Some(5_000)));
        store.set_host_mode("h1", HostMode::Cordoned).await.unwrap();
        let again = store.announce_host("h1", "http://127.0.0.1:7071", 6_000).await.unwrap();
        assert_eq!(
            (again.url.as_str(), again.mode, again.added_at_ms, again.announced_at_ms),
            ("http://127.0.0.1:7071", HostMode::Cordoned, 5_000, Some(6_000)),
            "the URL and time are the host's, the mode the operator's"
        );
        store.add_host(host("h2")).await.unwrap();
        assert_eq!(store.announce_host("h2", "http://127.0.0.1:1/h2", 7_000).await.unwrap().announced_at_ms, Some(7_000));
        let hosts = subject.reopen().await.hosts().await.unwrap();
        assert_eq!(hosts.iter().map(|host| host.announced_at_ms).collect::<Vec<_>>(), [Some(6_000), Some(7_000)]);
    });
}

pub fn a_placement_counts_against_its_tenants_quota_until_it_is_removed_or_lost<S: StoreSubject>(test: &str) {
    let Some(subject) = S::new(test) else { return };
    runtime().block_on(async {
        let store = subject.store().await;
        let quota = Quota { max_vms: Some(2), max_vcpus: Some(3), max_memory_bytes: None };
        let unknown = store.reserve_placement(placement("vm-0", "acme", "h1", 1), quota, None).await.unwrap_err();
        assert!(matches!(unknown, StoreError::NoSuchTenant(_)), "{unknown:?}");
        store.create_tenant(tenant("acme", quota)).await.unwrap();
        store.reserve_placement(placement("vm-1", "acme", "h1", 2), quota, None).await.unwrap();
        let refused = store.reserve_placement(placement("vm-2", "acme", "h1", 2), quota, None).await.unwrap_err();
        assert_eq!(
            refused.to_string(),
            "tenant acme may hold at most 3 vCPUs across the fleet; it holds 2 and asks for 2 more",
            "{refused:?}"
        );
        store.reserve_placement(placement("vm-2", "acme", "h1", 1), quota, None).await.unwrap();
        let full = store.reserve_placement(placement("vm-3", "acme", "h1", 0), quota, None).await.unwrap_err();
        assert!(matches!(full, StoreError::QuotaExceeded { what: "VMs", limit: 2, held: 2, .. }), "{full:?}");
        assert!(store.placement("vm-3").await.unwrap().is_none(), "a refused reservation writes nothing");
        assert!(matches!(
            store.reserve_placement(placement("vm-2", "acme", "h1", 0), Quota::default(), None).await,
            Err(StoreError::VmExists(_))
        ));

        store.update_placement("vm-1", "h2", PlacementStatus::Placed).await.unwrap();
        let moved = store.placement("vm-1").await.unwrap().unwrap();
        assert_eq!((moved.host.as_str(), moved.status), ("h2", PlacementStatus::Placed));
        store.update_placement("vm-1", "h2", PlacementStatus::Lost { reason: "lost: h2 no longer has it".into() }).await.unwrap();
        store.reserve_placement(placement("vm-4", "acme", "h1", 1), quota, None).await.expect("a lost VM holds no quota");
        let lost: Vec<String> = store.lost_placements("acme").await.unwrap().into_iter().map(|placement| placement.vm_id).collect();
        assert_eq!(lost, ["vm-1"]);
        assert!(store.lost_placements("globex").await.unwrap().is_empty());
        store.remove_placement("vm-2").await.unwrap();
        store.reserve_placement(placement("vm-5", "acme", "h1", 1), quota, None).await.expect("a removed VM holds no quota");
        let on_h2: Vec<String> = store.placements(Some("h2")).await.unwrap().into_iter().map(|placement| placement.vm_id).collect();
        assert_eq!(on_h2, ["vm-1"]);
        assert_eq!(subject.reopen().await.placements(None).await.unwrap().len(), 3, "vm-1 (lost), vm-4, vm-5 across a reopen");
    });
}

pub fn an_idempotency_key_answers_its_first_create_and_no_other_request<S: StoreSubject>(test: &str) {
    let Some(subject) = S::new(test) else { return };
    runtime().block_on(async {
        let store = subject.store().await;
        store.create_tenant(tenant("acme", Quota::default())).await.unwrap();
        store.create_tenant(tenant("globex", Quota::default())).await.unwrap();
        let once = |digest: u8| Some(Idempotency { key: "create-web-1".into(), request_digest: [digest; 32] });
        let first = store.reserve_placement(placement("vm-1", "acme", "h1", 1), Quota::default(), once(1)).await.unwrap();
        assert_eq!(first, Reservation::Reserved);
        let again = store.reserve_placement(placement("vm-2", "acme", "h1", 1), Quota::default(), once(1)).await.unwrap();
        let Reservation::Existing(existing) = again else { panic!("{again:?}") };
        assert_eq!(existing.vm_id, "vm-1", "the same VM, and no second one");
        assert!(store.placement("vm-2").await.unwrap().is_none());
        let reused = store.reserve_placement(placement("vm-3", "acme", "h1", 1), Quota::default(), once(2)).await.unwrap_err();
        assert!(matches!(reused, StoreError::IdempotencyKeyReused { .. }), "{reused:?}");
        let other_tenant = store.reserve_placement(placement("vm-4", "globex", "h1", 1), Quota::default(), once(2)).await.unwrap();
        assert_eq!(other_tenant, Reservation::Reserved, "keys are per tenant");
        store.remove_placement("vm-1").await.unwrap();
        let after_delete = store.reserve_placement(placement("vm-5", "acme", "h1", 1), Quota::default(), once(3)).await.unwrap();
        assert_eq!(after_delete, Reservation::Reserved, "a deleted VM's key is free again");
    });
}

/// Eight reservations race for a tenant's last slot, half through the
/// store and half through the same store opened again (as two gateways
/// share one): exactly one wins.
pub fn racing_reservations_for_the_last_slot_let_exactly_one_in<S: StoreSubject>(test: &str) {
    let Some(subject) = S::new(test) else { return };
    runtime().block_on(async {
        let store = subject.store().await;
        let other = subject.reopen().await;
        let quota = Quota { max_vms: Some(3), ..Quota::default() };
        store.create_tenant(tenant("acme", quota)).await.unwrap();
        for index in 0..2 {
            store.reserve_placement(placement(&format!("vm-held-{index}"), "acme", "h1", 1), quota, None).await.unwrap();
        }
        let racers = (0..8).map(|index| {
            let store = Arc::clone(if index % 2 == 0 { &store } else { &other });
            tokio::spawn(async move { store.reserve_placement(placement(&format!("vm-race-{index}"), "acme", "h1", 1), quota, None).await })
        });
        let outcomes: Vec<_> = futures::future::join_all(racers).await.into_iter().map(|joined| joined.unwrap()).collect();
        assert_eq!(outcomes.iter().filter(|outcome| outcome.is_ok()).count(), 1, "{outcomes:?}");
        assert!(
            outcomes.iter().all(|outcome| matches!(outcome, Ok(_) | Err(StoreError::QuotaExceeded { what: "VMs", .. }))),
            "{outcomes:?}"
        );
        assert_eq!(store.placements(None).await.unwrap().len(), 3);
    });
}

/// Every promise, as tests of one store.
#[macro_export]
macro_rules! store_suite {
    ($subject:ty) => {
        #[test]
        fn tenants_are_made_once_and_keep_their_quota() {
            store_suite::tenants_are_made_once_and_keep_their_quota::<$subject>("tenants_are_made_once_and_keep_their_quota");
        }
        #[test]
        fn keys_are_kept_as_digests_and_revoked_for_good() {
            store_suite::keys_are_kept_as_digests_and_revoked_for_good::<$subject>("keys_are_kept_as_digests_and_revoked_for_good");
        }
        #[test]
        fn hosts_are_added_moded_and_removed_only_when_empty() {
            store_suite::hosts_are_added_moded_and_removed_only_when_empty::<$subject>("hosts_are_added_moded_and_removed_only_when_empty");
        }
        #[test]
        fn a_host_announces_itself_and_keeps_the_mode_its_operator_gave_it() {
            store_suite::a_host_announces_itself_and_keeps_the_mode_its_operator_gave_it::<$subject>(
                "a_host_announces_itself_and_keeps_the_mode_its_operator_gave_it",
            );
        }
        #[test]
        fn a_placement_counts_against_its_tenants_quota_until_it_is_removed_or_lost() {
            store_suite::a_placement_counts_against_its_tenants_quota_until_it_is_removed_or_lost::<$subject>(
                "a_placement_counts_against_its_tenants_quota_until_it_is_removed_or_lost",
            );
        }
        #[test]
        fn an_idempotency_key_answers_its_first_create_and_no_other_request() {
            store_suite::an_idempotency_key_answers_its_first_create_and_no_other_request::<$subject>(
                "an_idempotency_key_answers_its_first_create_and_no_other_request",
            );
        }
        #[test]
        fn racing_reservations_for_the_last_slot_let_exactly_one_in() {
            store_suite::racing_reservations_for_the_last_slot_let_exactly_one_in::<$subject>(
                "racing_reservations_for_the_last_slot_let_exactly_one_in",
            );
        }
    };
}
