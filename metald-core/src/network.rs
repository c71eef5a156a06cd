//! The network port: what the manager asks of a network provider, and what
//! it gets back. `metald-net` implements it; without a provider, each
//! interface must name a TAP device that already exists.
//!
//! A provider prepares, before the VMM starts, everything a VM's interfaces
//! need: a network namespace for the VMM to join, TAP devices inside it
//! owned by the VMM's user, addresses, routes and firewall rules; and it
//! says what the guest must be told. It undoes all of that on detach.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::NetworkInterface;
use crate::ids::{TenantId, VmId};

/// What to attach.
#[derive(Debug, Clone, Copy)]
pub struct AttachRequest<'a> {
    pub vm_id: &'a VmId,
    pub tenant: &'a TenantId,
    pub interfaces: &'a [NetworkInterface],
    /// The uid and gid the VMM runs as; its TAP devices must be theirs.
    pub owner: Option<(u32, u32)>,
}

/// An address given to one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assignment<A> {
    pub address: A,
    pub prefix_len: u8,
    pub gateway: A,
}

/// One interface as attached.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttachedInterface {
    /// The interface id from the VM's configuration.
    pub id: String,
    /// The TAP device the VMM opens, inside the VM's namespace.
    pub tap_device: String,
    pub mac_address: String,
    pub ipv6: Option<Assignment<Ipv6Addr>>,
    pub ipv4: Option<Assignment<Ipv4Addr>>,
    pub dns_servers: Vec<IpAddr>,
    /// The host's end of the VM's link, for operators.
    pub host_link: String,
}

/// Everything a provider made for one VM. Stored with the VM, all but the
/// open namespace, which [`NetworkProvider::take_over`] opens again.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NetworkAttachment {
    /// The namespace the VMM must run in, open.
    #[serde(skip)]
    pub netns: Option<Arc<OwnedFd>>,
    /// Its name (under `/run/netns` unless the provider says otherwise).
    pub netns_name: Option<String>,
    pub interfaces: Vec<AttachedInterface>,
    /// Kernel command-line tokens that tell the guest its network.
    pub kernel_args: Vec<String>,
}

/// Why a provider could not attach or detach.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The request asks for something this provider refuses (a field path is given).
    #[error("{field}: {reason}")]
    Refused { field: String, reason: String },
    #[error("cannot attach the network of VM {vm_id}")]
    Attach {
        vm_id: VmId,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("detaching the network of VM {vm_id} left work undone: {}", .problems.join("; "))]
    Detach { vm_id: VmId, problems: Vec<String> },
}

/// Attaches VMs to the network.
#[async_trait]
pub trait NetworkProvider: Send + Sync + fmt::Debug {
    /// Prepares the VM's networking. On error nothing of it is left. What
    /// the VMM opens (its TAP devices) exists when it returns; what only
    /// matters once the guest runs (the links beyond the TAP devices, the
    /// firewall rules) may still be in the making: see [`NetworkProvider::settle`].
    async fn attach(&self, request: AttachRequest<'_>) -> Result<NetworkAttachment, NetworkError>;

    /// Waits for what `attach` left in the making for the VM, so that its
    /// network is whole; a VM may run only after it returned `Ok`. The
    /// manager waits for it while the VMM starts. Settling a VM with
    /// nothing loading is not an error. On error the caller detaches.
    async fn settle(&self, vm_id: &VmId) -> Result<(), NetworkError> {
        let _ = vm_id;
        Ok(())
    }

    /// Removes everything `attach` made for the VM and frees its addresses.
    /// Keeps going when a step fails and reports every failure. Detaching a
    /// VM that has nothing attached is not an error.
    async fn detach(&self, vm_id: &VmId) -> Result<(), NetworkError>;

    /// The most bytes `attach` can add to the guest's kernel command line
    /// for `interfaces` (separating spaces included), so that a command line
    /// too long is refused at the request rather than at the boot.
    fn kernel_args_bound(&self, interfaces: &[NetworkInterface]) -> usize {
        let _ = interfaces;
        0
    }

    /// Detaches every VM it holds something for but those in `keep`: after
    /// a crash, what creates cut off midway left. Returns what could not be
    /// removed.
    async fn forget_all_but(&self, keep: &std::collections::HashSet<VmId>) -> Vec<String> {
        let _ = keep;
        Vec::new()
    }

    /// Removes what the provider set up on the host for all VMs (its
    /// firewall table), once it holds none; returns what could not be
    /// removed. An attach after it sets them up again.
    async fn release_host(&self) -> Vec<String> {
        Vec::new()
    }

    /// Opens again what a stored attachment refers to (its namespace), for
    /// a VM found after a restart of metald.
    async fn take_over(&self, vm_id: &VmId, attachment: NetworkAttachment) -> Result<NetworkAttachment, NetworkError> {
        let _ = vm_id;
        Ok(attachment)
    }
}
