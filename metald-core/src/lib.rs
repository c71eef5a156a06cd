//! metald-core: the VM and everything needed to run one.
//!
//! It uses the ids ([`VmId`], [`TenantId`]) and owner-only files
//! ([`private_files`]) of `metald-types`, and owns the VM's description
//! ([`VmConfig`]) and its validation, the lifecycle ([`VmState`] and its
//! transition table), image confinement ([`images`]), the VMM backends
//! behind one trait ([`backend::VmmBackend`]: Firecracker and Cloud Hypervisor),
//! the launcher port ([`launch`]) with the integrated jailer that implements
//! it ([`jailer`], [`cgroups`], [`uid_lease`]) and a development launcher
//! ([`unjailed`]), the network
//! port ([`network`], implemented by `metald-net`), process supervision
//! ([`process`]), serial console capture ([`console`])
//! and the [`VmManager`] that ties them together and publishes
//! [`VmEvent`]s. It depends on no other metald crate but `metald-types`: networking and
//! billing plug into it, never the other way round.
//!
//! ```no_run
//! # async fn demo() -> Result<(), metald_core::ManagerError> {
//! use std::sync::Arc;
//!
//! use metald_core::jailer::JailerConfig;
//! use metald_core::{CreateVm, FirecrackerBackend, FirecrackerConfig, TenantId, VmConfig, VmManager};
//!
//! let firecracker = FirecrackerConfig::new("/usr/local/bin/firecracker");
//! let manager = VmManager::builder()
//!     .backend(Arc::new(FirecrackerBackend::jailed(firecracker, JailerConfig::default())?))
//!     .image_root("/var/lib/metald/images")
//!     .vm_root("/run/metald/vms")
//!     .build()?;
//! let mut config = VmConfig::default();
//! config.cpu.vcpu_count = 1;
//! config.memory.size_bytes = 128 << 20;
//! config.boot.kernel_path = "vmlinux".into();
//! let tenant = TenantId::new("acme").expect("a valid tenant id");
//! let vm_id = manager.create(CreateVm { vm_id: None, tenant, config }).await?;
//! manager.run(&vm_id, metald_core::operations::Boot).await?;
//! # Ok(()) }
//! ```

pub mod backend;
pub mod cgroups;
pub mod config;
pub mod console;
pub mod error_kind;
pub mod events;
pub mod images;
pub mod jail_child;
pub mod jail_pool;
pub mod jailer;
pub mod launch;
pub mod manager;
pub mod network;
pub mod process;
pub mod program_libraries;
pub mod restart;
pub mod state;
pub mod store;
pub mod tap;
pub mod target;
pub mod uid_lease;
pub mod unjailed;
pub mod vm_dir;

pub use metald_types::{error_chain, ids, private_files};

pub use backend::cloud_hypervisor::{CloudHypervisorBackend, CloudHypervisorConfig};
pub use backend::firecracker::{FirecrackerBackend, FirecrackerConfig};
pub use backend::{Capabilities, DeviceCounters, StopOutcome, VmmBackend, VmmInfo, VmmMetrics};
pub use config::VmConfig;
pub use error_kind::ErrorKind;
pub use events::{VmEvent, VmEventKind};
pub use ids::{TenantId, VmId};
pub use manager::operations;
pub use manager::{
    BackendOperation, CreateVm, ManagerError, StopOptions, Takeover, VmInfo, VmManager, VmManagerBuilder, VmPage, VmSummary,
};
pub use state::VmState;
pub use target::VmTarget;
