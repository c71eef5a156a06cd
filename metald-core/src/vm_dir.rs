//! A VM's folder, `<vm_root>/<vm id>/`, and the one place that knows its
//! layout: the drive copies (`drives/<id>.img`), the jail root (`root/`),
//! the console (`console.log`, see [`crate::console`]) and the files a
//! backend keeps there by name (its sockets, pipes and logs). Nothing else
//! builds these paths; snapshots will have their place here too.

use std::io;
use std::path::{Path, PathBuf};

use crate::console::ConsoleLog;
use crate::ids::VmId;

/// Where a jailed VMM's root is, inside the VM's folder.
pub const JAIL_DIR: &str = "root";
const DRIVES_DIR: &str = "drives";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDir {
    path: PathBuf,
}

impl VmDir {
    /// The folder of `vm_id` under the host's VM root.
    pub fn of(vm_root: &Path, vm_id: &VmId) -> Self {
        Self { path: vm_root.join(vm_id.as_str()) }
    }

    /// A folder found under the VM root, named by a VM id.
    pub fn at(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the folder; one that exists already is an error, as two VMs
    /// must never share one.
    pub fn create(&self) -> io::Result<()> {
        std::fs::create_dir(&self.path)
    }

    /// Removes the folder and all it holds; one already gone is fine.
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.path) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }

    /// The VM's console log, capped at `limit_bytes` per file.
    pub fn console(&self, limit_bytes: u64) -> ConsoleLog {
        ConsoleLog::new(&self.path, limit_bytes)
    }

    /// The folder of the per-VM copies of writable drives.
    pub fn drives(&self) -> PathBuf {
        self.path.join(DRIVES_DIR)
    }

    /// The copy of the writable drive `drive_id`.
    pub fn drive_copy(&self, drive_id: &str) -> PathBuf {
        self.drives().join(format!("{drive_id}.img"))
    }

    /// What a jailed VMM sees as `/`.
    pub fn jail_root(&self) -> PathBuf {
        self.path.join(JAIL_DIR)
    }

    /// A file a backend keeps in the folder under `name`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A file a jailed VMM makes at `/<name>` (its API socket, say), as the host sees it.
    pub fn in_jail(&self, name: &str) -> PathBuf {
        self.jail_root().join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_of_a_vms_folder() {
        let dir = VmDir::of(Path::new("/srv/vms"), &VmId::new("vm-1").unwrap());
        assert_eq!(dir.path(), Path::new("/srv/vms/vm-1"));
        assert_eq!(dir.drive_copy("data"), Path::new("/srv/vms/vm-1/drives/data.img"));
        assert_eq!(dir.in_jail("firecracker.sock"), Path::new("/srv/vms/vm-1/root/firecracker.sock"));
        assert_eq!(dir.file("console.fifo"), Path::new("/srv/vms/vm-1/console.fifo"));
    }
}
