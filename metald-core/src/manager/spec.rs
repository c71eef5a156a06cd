//! Spec assembly: from a VM's configuration to what its backend is given.
//! The configuration is checked against the backend's [`Capabilities`]
//! (field paths in every refusal), its images are opened inside the image
//! root, writable drives are copied into the VM's folder, and the result is
//! a [`VmmSpec`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{ManagerError, VmManager};
use crate::backend::{CacheMode, Capabilities, CpuSpec, DriveSpec, InterfaceSpec, IoEngine, MemorySpec, VmmSpec};
use crate::config::StorageDevice;
use crate::config::{ConfigError, Problem, VmConfig};
use crate::ids::{TenantId, VmId};
use crate::images::{self, ImageError, ImageFile};
use crate::jailer::IdentityLease;
use crate::network::NetworkAttachment;
use crate::vm_dir::VmDir;

impl VmManager {
    /// The guest's kernel command line is the caller's, then what the VMM
    /// and the network add: all of it must fit, so a line too long is told
    /// at the request, naming what takes the room, not at the boot.
    fn check_command_line(&self, config: &VmConfig, capabilities: &Capabilities) -> Result<(), ManagerError> {
        let network_bytes = self.inner.network.as_ref().map_or(0, |network| network.kernel_args_bound(&config.network));
        let devices = config.storage.len() + config.network.len();
        let host_bytes = network_bytes + devices * capabilities.kernel_cmdline_bytes_per_device;
        let capacity = capabilities.kernel_cmdline_capacity;
        let refuse = |field: &str, reason: String| {
            Err(ManagerError::InvalidConfig(ConfigError { field: field.to_owned(), problem: Problem::Inconsistent { reason } }))
        };
        if host_bytes > capacity {
            return refuse(
                "network",
                format!(
                    "{} interfaces and {} drives need up to {host_bytes} bytes of the guest's kernel command line for the host's own \
                     entries (addresses, devices); it holds {capacity}",
                    config.network.len(),
                    config.storage.len()
                ),
            );
        }
        let room = capacity - host_bytes;
        let asked = config.boot.kernel_args.len();
        if asked > room {
            return refuse(
                "boot.kernel_args",
                format!(
                    "is {asked} bytes long; with up to {host_bytes} bytes the host adds for this VM's {devices} devices, \
                     at most {room} fit in the {capacity} of the guest's kernel command line"
                ),
            );
        }
        Ok(())
    }

    /// Whether a create of `config` would be refused for the configuration
    /// itself (invalid, or asking its VMM for what it cannot do), before
    /// anything is counted or made: a caller that counts quotas asks this
    /// first, so a wrong field is told as such and not as a full quota.
    pub fn check_config(&self, config: &VmConfig) -> Result<(), ManagerError> {
        config.validate().map_err(ManagerError::InvalidConfig)?;
        self.check_capabilities(config)
    }

    /// Refuses, naming the field, what the VM's backend cannot do.
    pub(super) fn check_capabilities(&self, config: &VmConfig) -> Result<(), ManagerError> {
        let backend = self.backend_of(config)?;
        let capabilities = backend.capabilities();
        let refuse = |field: &str, problem: Problem| Err(ManagerError::InvalidConfig(ConfigError { field: field.to_owned(), problem }));
        let cannot = |field: &str, reason: &str| {
            refuse(field, Problem::Inconsistent { reason: format!("{reason}, which the {} backend cannot do", backend.name()) })
        };
        let vcpus_allowed = |field: &str, vcpus: u32| {
            if vcpus > capabilities.max_vcpus {
                return refuse(field, Problem::BeyondVmm { value: vcpus.into(), max: capabilities.max_vcpus.into(), vmm: backend.name() });
            }
            Ok(())
        };
        vcpus_allowed("cpu.vcpu_count", config.cpu.vcpu_count)?;
        vcpus_allowed("cpu.max_vcpu_count", config.cpu.max_vcpu_count)?;
        if config.memory.hotplug_enabled && !capabilities.memory_hotplug {
            return cannot("memory.hotplug_enabled", "asks for memory hotplug");
        }
        if config.cpu.max_vcpu_count > config.cpu.vcpu_count && !capabilities.cpu_hotplug {
            return cannot("cpu.max_vcpu_count", "asks for CPU hotplug");
        }
        if config.cpu.topology.is_some() && !capabilities.cpu_topology {
            return cannot("cpu.topology", "asks for a CPU topology");
        }
        for (index, drive) in config.storage.iter().enumerate() {
            storage_option(index, drive, "io_engine", capabilities.io_engines, IoEngine::name)?;
            storage_option(index, drive, "cache_type", capabilities.cache_modes, CacheMode::name)?;
        }
        self.check_command_line(config, &capabilities)?;
        for (index, interface) in config.network.iter().enumerate() {
            let tap_problem = match (&self.inner.network, interface.tap_device.is_empty()) {
                (None, true) => Some("is required: this manager has no network provider to make a TAP device"),
                (Some(_), false) => Some("must be empty: the network provider makes and names the TAP device"),
                _ => None,
            };
            if let Some(reason) = tap_problem {
                return refuse(&format!("network[{index}].tap_device"), Problem::Inconsistent { reason: reason.into() });
            }
            let asymmetric = interface.rx_rate_limit != interface.tx_rate_limit;
            if asymmetric && !capabilities.separate_rx_tx_rate_limits {
                return cannot(&format!("network[{index}].tx_rate_limit"), "differs from rx_rate_limit");
            }
        }
        Ok(())
    }

    pub(super) fn resolve_images(&self, config: &VmConfig) -> Result<ResolvedImages, ManagerError> {
        let resolved = self.resolve_images_with(config, |field, path| self.inner.images.open(field, path))?;
        // Shared images are checked by the jail (its VMM must read them); a
        // writable one is copied by root for the VM, so it is checked here.
        for (index, (drive, image)) in config.storage.iter().zip(&resolved.drives).enumerate() {
            if !drive.read_only && !image.world_readable() {
                let (field, path, mode) = (format!("storage[{index}].path"), drive.path.clone(), image.mode & 0o7777);
                return Err(ManagerError::Image(ImageError::NotShared { field, path, mode }));
            }
        }
        Ok(resolved)
    }

    /// The images of a VM found after a restart. One that is no longer in
    /// the image root does not stop the takeover: its VMM loaded the kernel
    /// and holds its drives already. It stands in as an unlinked empty
    /// file, which the jail refuses to expose if the VM is ever launched
    /// again ("was removed or replaced").
    pub(super) fn resolve_found_images(&self, vm_id: &VmId, config: &VmConfig) -> Result<ResolvedImages, ManagerError> {
        self.resolve_images_with(config, |field, path| match self.inner.images.open(field, path) {
            Err(ImageError::Missing { .. } | ImageError::SymlinkEscape { .. } | ImageError::NotAFile { .. }) => {
                tracing::warn!(%vm_id, field, path, "an image of a VM found after a restart is gone from the image root; the VM cannot be launched again");
                removed_image(&self.inner.vm_root, field, path)
            }
            opened => opened,
        })
    }

    fn resolve_images_with(
        &self,
        config: &VmConfig,
        open: impl Fn(&str, &str) -> Result<ImageFile, ImageError>,
    ) -> Result<ResolvedImages, ManagerError> {
        let kernel = open("boot.kernel_path", &config.boot.kernel_path).map_err(ManagerError::Image)?;
        let initrd = if config.boot.initrd_path.is_empty() {
            None
        } else {
            Some(open("boot.initrd_path", &config.boot.initrd_path).map_err(ManagerError::Image)?)
        };
        let drives = config
            .storage
            .iter()
            .enumerate()
            .map(|(index, drive)| open(&format!("storage[{index}].path"), &drive.path).map_err(ManagerError::Image))
            .collect::<Result<_, _>>()?;
        Ok(ResolvedImages { kernel, initrd, drives })
    }

    /// What the backend needs to run the VM: its resolved images, its
    /// drives (the copies [`copy_writable_drives`] made of the writable
    /// ones), its interfaces and kernel command line.
    pub(super) fn build_spec(&self, vm: SpecOf<'_>, images: ResolvedImages) -> Result<VmmSpec, ManagerError> {
        let SpecOf { vm_id, tenant, config, vm_dir, identity, network } = vm;
        let mut drives = Vec::with_capacity(config.storage.len());
        for (index, (drive, source)) in config.storage.iter().zip(images.drives).enumerate() {
            let image = if drive.read_only {
                source
            } else {
                images::open_copy(&format!("storage[{index}].path"), &vm_dir.drive_copy(&drive.id)).map_err(ManagerError::Image)?
            };
            drives.push(DriveSpec {
                id: drive.id.clone(),
                image,
                read_only: drive.read_only,
                is_root_device: drive.is_root_device,
                io_engine: drive.options.get("io_engine").and_then(|name| IoEngine::ALL.into_iter().find(|engine| engine.name() == name)),
                cache: drive.options.get("cache_type").and_then(|name| CacheMode::ALL.into_iter().find(|mode| mode.name() == name)),
            });
        }
        let interfaces = config
            .network
            .iter()
            .map(|interface| {
                let attached = network.and_then(|network| network.interfaces.iter().find(|attached| attached.id == interface.id));
                let (tap_device, guest_mac) = match attached {
                    Some(attached) => (attached.tap_device.clone(), Some(attached.mac_address.clone())),
                    None => (interface.tap_device.clone(), (!interface.mac_address.is_empty()).then(|| interface.mac_address.clone())),
                };
                InterfaceSpec {
                    id: interface.id.clone(),
                    tap_device,
                    guest_mac,
                    rx_rate_limit: interface.rx_rate_limit.clone(),
                    tx_rate_limit: interface.tx_rate_limit.clone(),
                }
            })
            .collect();
        let mut kernel_args = config.boot.kernel_args.clone();
        for token in network.iter().flat_map(|network| network.kernel_args.iter()) {
            if !kernel_args.is_empty() {
                kernel_args.push(' ');
            }
            kernel_args.push_str(token);
        }
        Ok(VmmSpec {
            vm_id: vm_id.clone(),
            tenant: tenant.clone(),
            cpu: CpuSpec {
                boot_vcpus: config.cpu.vcpu_count,
                max_vcpus: config.cpu.max_vcpu_count.max(config.cpu.vcpu_count),
                topology: config.cpu.topology.clone(),
                smt: config.cpu.features.get("smt").is_some_and(|value| value == "true"),
            },
            memory: MemorySpec {
                size_mib: config.memory_mib(),
                hotplug_mib: (config.memory.max_size_bytes.saturating_sub(config.memory.size_bytes)) / crate::config::MIB,
                huge_pages: config.memory.backing.get("huge_pages").is_some_and(|value| value == "2M"),
            },
            kernel: images.kernel,
            initrd: images.initrd,
            kernel_args,
            drives,
            interfaces,
            vm_dir: vm_dir.clone(),
            netns: network.and_then(|network| network.netns.clone()),
            identity,
        })
    }
}

/// The VM a spec is built for: who it is, its configuration, its folder,
/// the user its VMMs run as and the network made for it.
pub(super) struct SpecOf<'a> {
    pub(super) vm_id: &'a VmId,
    pub(super) tenant: &'a TenantId,
    pub(super) config: &'a VmConfig,
    pub(super) vm_dir: &'a VmDir,
    pub(super) identity: Option<Arc<IdentityLease>>,
    pub(super) network: Option<&'a NetworkAttachment>,
}

/// A drive's option `key`, when given, must name one of what its backend
/// `offers`.
fn storage_option<T: Copy>(
    index: usize,
    drive: &StorageDevice,
    key: &str,
    offers: &[T],
    name: fn(T) -> &'static str,
) -> Result<(), ManagerError> {
    let Some(value) = drive.options.get(key) else { return Ok(()) };
    if offers.iter().any(|offered| name(*offered) == value) {
        return Ok(());
    }
    Err(ManagerError::InvalidConfig(ConfigError {
        field: format!("storage[{index}].options[{key:?}]"),
        problem: Problem::NotAllowed { value: value.clone(), allowed: offers.iter().map(|offered| name(*offered)).collect() },
    }))
}

/// A VM's images, opened inside the image root.
pub(super) struct ResolvedImages {
    pub(super) kernel: ImageFile,
    pub(super) initrd: Option<ImageFile>,
    pub(super) drives: Vec<ImageFile>,
}

/// The stand-in for an image gone from the image root: an empty file with
/// no name (`O_TMPFILE`), kept under the image's own path for messages.
fn removed_image(vm_root: &Path, field: &str, path: &str) -> Result<ImageFile, ImageError> {
    let failed = |errno: nix::errno::Errno| ImageError::Open { field: field.to_owned(), path: path.to_owned(), source: errno.into() };
    let flags = nix::fcntl::OFlag::O_TMPFILE | nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC;
    let file = nix::fcntl::open(vm_root, flags, nix::sys::stat::Mode::from_bits_truncate(0o444)).map_err(failed)?;
    Ok(ImageFile { path: PathBuf::from(path), file: Arc::new(file), size: 0, mode: 0o100444 })
}

/// Copies the VM's writable drives into its folder, on a thread of the
/// blocking pool: a copy (and its sync) of a large image takes as long as
/// the disk needs, and must not hold up the workers serving every other call.
pub(super) async fn copy_writable_drives(
    vm_id: &VmId,
    config: &VmConfig,
    images: &ResolvedImages,
    vm_dir: &VmDir,
) -> Result<(), ManagerError> {
    let copies: Vec<(ImageFile, PathBuf)> = config
        .storage
        .iter()
        .zip(&images.drives)
        .filter(|(drive, _)| !drive.read_only)
        .map(|(drive, source)| (source.clone(), vm_dir.drive_copy(&drive.id)))
        .collect();
    if copies.is_empty() {
        return Ok(());
    }
    let (vm_id, folder) = (vm_id.clone(), vm_dir.drives());
    let copy = move || {
        std::fs::create_dir(&folder).map_err(|source| ManagerError::VmDir {
            vm_id,
            action: "create drive copies in",
            path: folder.clone(),
            source,
        })?;
        copies.iter().try_for_each(|(source, copy)| images::copy_image(source, copy).map_err(ManagerError::Image))
    };
    tokio::task::spawn_blocking(copy).await.map_err(|_| ManagerError::ShuttingDown)?
}

/// Removes a VM's folder and what is in it, logging what it cannot.
pub(super) fn remove_vm_dir(vm_dir: &VmDir) {
    if let Err(error) = vm_dir.remove() {
        tracing::error!(path = %vm_dir.path().display(), %error, "cannot remove a VM folder")
    }
}
