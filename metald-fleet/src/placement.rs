//! Where a new VM goes. Hosts are filtered (ready, active, announcing if
//! they announce themselves, offering the
//! VM's VMM, with the vCPUs, memory and a VM slot it needs free, counting
//! creates in flight), then the best of `choices` hosts sampled at random
//! is tried first: the one with the most free room, by its scarcest
//! resource. Sampling a few instead of taking the single emptiest host
//! keeps gateways that place at once from all picking the same host. The
//! rest follow, best first, for when a host turns out to be full.

use rand::seq::SliceRandom;

use crate::hosts::{Ask, Health, HostView};
use crate::store::HostMode;

/// How many hosts each filter left out, for an answer that explains itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub not_ready: usize,
    pub cordoned_or_draining: usize,
    pub not_announcing: usize,
    pub vmm_not_offered: usize,
    pub vcpus: usize,
    pub memory: usize,
    pub vm_slots: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no host can take this VM: {}", describe(.hosts, .dropped))]
pub struct NoRoom {
    pub hosts: usize,
    pub dropped: Dropped,
}

fn describe(hosts: &usize, dropped: &Dropped) -> String {
    if *hosts == 0 {
        return "the gateway has no hosts".into();
    }
    let reasons = [
        (dropped.not_ready, "not ready"),
        (dropped.cordoned_or_draining, "cordoned or draining"),
        (dropped.not_announcing, "no longer announcing"),
        (dropped.vmm_not_offered, "without the VM's VMM"),
        (dropped.vcpus, "without enough free vCPUs"),
        (dropped.memory, "without enough free memory"),
        (dropped.vm_slots, "without a free VM slot"),
    ];
    let said: Vec<String> = reasons.iter().filter(|(count, _)| *count > 0).map(|(count, why)| format!("{count} {why}")).collect();
    format!("of {hosts} hosts, {}", said.join(", "))
}

/// What a host has left for a create, counting creates in flight.
fn room(view: &HostView) -> Option<(u64, u64, u64)> {
    let capacity = view.status.capacity.as_ref()?;
    Some((
        capacity.vcpus.free().saturating_sub(view.in_flight.vcpus),
        capacity.memory_bytes.free().saturating_sub(view.in_flight.memory_bytes),
        capacity.vms.free().saturating_sub(view.in_flight_vms),
    ))
}

/// How much room a host keeps after the create, by its scarcest resource, from 0 to 1.
fn score(view: &HostView, ask: Ask) -> f64 {
    let (Some(capacity), Some((vcpus, memory, vms))) = (view.status.capacity.as_ref(), room(view)) else { return 0.0 };
    let share = |left: u64, asked: u64, total: u64| if total == 0 { 0.0 } else { left.saturating_sub(asked) as f64 / total as f64 };
    share(vcpus, ask.vcpus, capacity.vcpus.total).min(share(memory, ask.memory_bytes, capacity.memory_bytes.total)).min(share(
        vms,
        1,
        capacity.vms.total,
    ))
}

/// The hosts to try for a VM that asks `ask` of `vmm` (the host's default
/// when empty), in the order to try them.
pub fn choose(views: &[HostView], vmm: &str, ask: Ask, choices: usize, rng: &mut impl rand::Rng) -> Result<Vec<String>, NoRoom> {
    let mut dropped = Dropped::default();
    let mut fitting: Vec<&HostView> = Vec::new();
    for view in views {
        if view.status.health != Health::Ready {
            dropped.not_ready += 1;
            continue;
        }
        if view.record.mode != HostMode::Active {
            dropped.cordoned_or_draining += 1;
            continue;
        }
        if view.silent {
            dropped.not_announcing += 1;
            continue;
        }
        let Some((vcpus, memory, vms)) = room(view) else {
            dropped.not_ready += 1;
            continue;
        };
        let offers =
            view.status.capacity.as_ref().is_some_and(|capacity| vmm.is_empty() || capacity.vmms.iter().any(|offered| offered == vmm));
        if !offers {
            dropped.vmm_not_offered += 1;
        } else if vcpus < ask.vcpus {
            dropped.vcpus += 1;
        } else if memory < ask.memory_bytes {
            dropped.memory += 1;
        } else if vms < 1 {
            dropped.vm_slots += 1;
        } else {
            fitting.push(view);
        }
    }
    if fitting.is_empty() {
        return Err(NoRoom { hosts: views.len(), dropped });
    }
    fitting.shuffle(rng);
    let sampled = choices.clamp(1, fitting.len());
    let best = (0..sampled).max_by(|a, b| score(fitting[*a], ask).total_cmp(&score(fitting[*b], ask))).unwrap_or(0);
    let first = fitting.remove(best);
    fitting.sort_by(|a, b| score(b, ask).total_cmp(&score(a, ask)));
    Ok(std::iter::once(first).chain(fitting).map(|view| view.record.name.clone()).collect())
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::hosts::{CapacityReport, HostStatus, Resource};
    use crate::store::HostRecord;

    fn view(name: &str, health: Health, mode: HostMode, free_vcpus: u64) -> HostView {
        HostView {
            record: HostRecord { name: name.into(), url: String::new(), mode, added_at_ms: 0, announced_at_ms: None },
            status: HostStatus {
                health,
                capacity: Some(CapacityReport {
                    vcpus: Resource { total: 16, used: 16 - free_vcpus },
                    memory_bytes: Resource { total: 1 << 30, used: 0 },
                    vms: Resource { total: 10, used: 0 },
                    vmms: vec!["firecracker".into()],
                }),
                last_seen_ms: Some(0),
            },
            in_flight: Ask::default(),
            in_flight_vms: 0,
            silent: false,
        }
    }

    const ASK: Ask = Ask { vcpus: 2, memory_bytes: 64 << 20 };

    #[test]
    fn what_does_not_fit_is_left_out_and_counted_by_why() {
        let silent = HostView { silent: true, ..view("silent", Health::Ready, HostMode::Active, 16) };
        let views = [
            view("down", Health::Unreachable("refused".into()), HostMode::Active, 16),
            view("cordoned", Health::Ready, HostMode::Cordoned, 16),
            silent,
            view("full", Health::Ready, HostMode::Active, 1),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let refused = choose(&views, "", ASK, 2, &mut rng).unwrap_err();
        assert_eq!(refused.dropped, Dropped { not_ready: 1, cordoned_or_draining: 1, not_announcing: 1, vcpus: 1, ..Dropped::default() });
        assert_eq!(
            refused.to_string(),
            "no host can take this VM: of 4 hosts, 1 not ready, 1 cordoned or draining, 1 no longer announcing, 1 without enough free vCPUs"
        );
        let other_vmm = choose(&[view("fc", Health::Ready, HostMode::Active, 16)], "cloud-hypervisor", ASK, 2, &mut rng).unwrap_err();
        assert_eq!(other_vmm.dropped.vmm_not_offered, 1);
        assert_eq!(choose(&[], "", ASK, 2, &mut rng).unwrap_err().to_string(), "no host can take this VM: the gateway has no hosts");
    }

    #[test]
    fn the_emptier_host_wins_when_both_are_sampled_and_creates_in_flight_count() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let views = [view("busy", Health::Ready, HostMode::Active, 4), view("idle", Health::Ready, HostMode::Active, 16)];
        assert_eq!(choose(&views, "firecracker", ASK, 2, &mut rng).unwrap(), ["idle", "busy"]);
        let mut crowded = views.clone();
        crowded[1].in_flight = Ask { vcpus: 14, memory_bytes: 0 };
        crowded[1].in_flight_vms = 7;
        assert_eq!(choose(&crowded, "firecracker", ASK, 2, &mut rng).unwrap(), ["busy", "idle"], "placements in flight take room");
    }
}
