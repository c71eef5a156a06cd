//! `WatchVms` through the gateway: one stream merging the events of every
//! host (or of the one that holds the watched VM). A host's stream that
//! ends (the host stopped, or cannot be reached) is opened again as soon
//! as the host answers, and the watcher then learns what changed while it
//! was away: one `resynced` event for each of its VMs there whose state
//! differs from the last one the watcher was told, and `deleted` for those
//! that are gone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use connectrpc::{ConnectError, Response, ServiceResult, ServiceStream};
use metald_api::proto::vmprovisioner::v1 as wire;
use tokio::sync::mpsc;

use crate::auth::Caller;
use crate::hosts::{Host, Hosts};
use crate::store::FleetStore;

const WATCH_PROCEDURE: &str = "/vmprovisioner.v1.VmService/WatchVms";
const LIST_PROCEDURE: &str = "/vmprovisioner.v1.VmService/ListVms";
/// How long a host whose stream ended is left before it is asked again; doubled up to the most.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MOST_RETRY: Duration = Duration::from_secs(2);
const BUFFERED_EVENTS: usize = 1024;

/// The merged stream for `caller`.
pub async fn merged(
    store: Arc<dyn FleetStore>,
    hosts: Arc<Hosts>,
    caller: Caller,
    request: wire::WatchVmsRequest,
) -> ServiceResult<ServiceStream<wire::VmEvent>> {
    let watched: Vec<Arc<Host>> = if request.vm_id.is_empty() {
        hosts.all()
    } else {
        let vm_id = metald_api::convert::request::vm_id_from_wire("vm_id", &request.vm_id)
            .map_err(|error| metald_api::wire_error_to_connect(&error))?;
        let placement = store
            .placement(vm_id.as_str())
            .await
            .map_err(|error| ConnectError::unavailable(format!("the gateway cannot reach its store: {error}")))?
            .filter(|placement| placement.tenant == caller.tenant)
            .ok_or_else(|| metald_api::manager_error_to_connect(&metald_core::manager::ManagerError::NotFound(vm_id.clone())))?;
        hosts.get(&placement.host).into_iter().collect()
    };
    let (events, received) = mpsc::channel(BUFFERED_EVENTS);
    for host in watched {
        tokio::spawn(follow(host, caller.clone(), request.clone(), events.clone()));
    }
    drop(events);
    let stream = futures::stream::unfold(received, |mut received| async move {
        let event = received.recv().await?;
        Some((Ok(event), received))
    });
    Ok(Response::stream(stream))
}

/// The caller's VMs on `host` and their states, or `None` if it did not answer.
async fn states(host: &Host, caller: &Caller, only: &str) -> Option<BTreeMap<String, wire::VmState>> {
    let mut states = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let request = wire::ListVmsRequest { page_token: page_token.clone(), page_size: 1000, ..Default::default() };
        let options = host.link().call_options(&caller.tenant, LIST_PROCEDURE, &request, None);
        let answer = host.link().vms.list_vms_with_options(request, options).await.ok()?;
        let answer = answer.into_owned();
        for vm in answer.vms.into_iter().filter(|vm| only.is_empty() || vm.vm_id == only) {
            states.insert(vm.vm_id, vm.state.as_known().unwrap_or(wire::VmState::VM_STATE_UNSPECIFIED));
        }
        if answer.next_page_token.is_empty() {
            return Some(states);
        }
        page_token = answer.next_page_token;
    }
}

fn event(caller: &Caller, vm_id: &str, state: wire::VmState, kind: &str) -> wire::VmEvent {
    wire::VmEvent {
        vm_id: vm_id.to_owned(),
        customer_id: caller.tenant.clone(),
        state: state.into(),
        kind: kind.to_owned(),
        timestamp: i64::try_from(metald_types::time::unix_millis_now()).unwrap_or(i64::MAX),
        ..Default::default()
    }
}

/// Follows one host's events into `events` until the watcher leaves.
async fn follow(host: Arc<Host>, caller: Caller, request: wire::WatchVmsRequest, events: mpsc::Sender<wire::VmEvent>) {
    // What the watcher was last told of each VM here; `None` until the first stream opened.
    let mut told: Option<BTreeMap<String, wire::VmState>> = None;
    let mut retry = FIRST_RETRY;
    loop {
        let options = host.link().stream_options(&caller.tenant, WATCH_PROCEDURE);
        let opened = tokio::select! {
            opened = host.link().vms.watch_vms_with_options(request.clone(), options) => opened,
            () = events.closed() => return,
        };
        if let Ok(mut stream) = opened {
            // Subscribed first, then read: nothing between the two is missed.
            let Some(now) = states(&host, &caller, &request.vm_id).await else {
                tokio::time::sleep(retry).await;
                continue;
            };
            if let Some(before) = &told {
                for (vm_id, state) in &now {
                    if before.get(vm_id) != Some(state) && events.send(event(&caller, vm_id, *state, "resynced")).await.is_err() {
                        return;
                    }
                }
                for vm_id in before.keys().filter(|vm_id| !now.contains_key(*vm_id)) {
                    if events.send(event(&caller, vm_id, wire::VmState::VM_STATE_UNSPECIFIED, "deleted")).await.is_err() {
                        return;
                    }
                }
            }
            let mut known = now;
            retry = FIRST_RETRY;
            loop {
                let message = tokio::select! {
                    message = stream.message() => message,
                    () = events.closed() => return,
                };
                let Ok(Some(message)) = message else { break };
                let delivered = message.to_owned_message();
                let state = delivered.state.as_known().unwrap_or(wire::VmState::VM_STATE_UNSPECIFIED);
                if delivered.kind == "deleted" {
                    known.remove(&delivered.vm_id);
                } else {
                    known.insert(delivered.vm_id.clone(), state);
                }
                if events.send(delivered).await.is_err() {
                    return;
                }
            }
            told = Some(known);
            tracing::info!(host = %host.name, "a host's event stream ended; following it again when it answers");
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = events.closed() => return,
        }
        retry = (retry * 2).min(MOST_RETRY);
    }
}
