//! Files and folders only their owner may read: tenants' console output,
//! the VM store, usage records. Made 0600 (folders 0700) whatever the
//! process umask, and tightened when an earlier build or an operator left
//! them wider.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const FILE_MODE: u32 = 0o600;
pub const DIR_MODE: u32 = 0o700;

/// Opens `path` for appending, creating it 0600, and makes an existing
/// file 0600 too.
pub fn open_append(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new().create(true).append(true).mode(FILE_MODE).open(path)?;
    tighten(&file)?;
    Ok(file)
}

/// Opens `path` for writing at chosen offsets, creating it 0600, and makes
/// an existing file 0600 too. Nothing it holds is truncated.
pub fn open_write(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new().create(true).truncate(false).write(true).read(true).mode(FILE_MODE).open(path)?;
    tighten(&file)?;
    Ok(file)
}

/// Creates the file a database will open, 0600, or tightens it and the
/// journal files beside it: SQLite gives its `-wal` and `-shm` the mode
/// of the database file.
pub fn prepare_database(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new().create(true).truncate(false).write(true).mode(FILE_MODE).open(path)?;
    tighten(&file)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::set_permissions(&name, Permissions::from_mode(FILE_MODE)) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    Ok(())
}

/// Creates `path` (and missing parents) 0700, or makes an existing folder
/// 0700. Returns the mode it had when that was wider.
pub fn private_dir(path: &Path) -> io::Result<Option<u32>> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(path)?;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if mode & !DIR_MODE == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, Permissions::from_mode(DIR_MODE))?;
    Ok(Some(mode))
}

/// Makes an open file 0600 if it is wider.
pub fn tighten(file: &File) -> io::Result<()> {
    let mode = file.metadata()?.permissions().mode() & 0o7777;
    if mode & !FILE_MODE != 0 {
        file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn files_are_made_and_kept_owner_only_whatever_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        open_append(&log).unwrap();
        assert_eq!(mode_of(&log), 0o600);
        std::fs::set_permissions(&log, Permissions::from_mode(0o644)).unwrap();
        open_append(&log).unwrap();
        assert_eq!(mode_of(&log), 0o600);

        let database = dir.path().join("vms.db");
        let wal = dir.path().join("vms.db-wal");
        std::fs::write(&wal, b"").unwrap();
        std::fs::set_permissions(&wal, Permissions::from_mode(0o644)).unwrap();
        prepare_database(&database).unwrap();
        assert_eq!((mode_of(&database), mode_of(&wal)), (0o600, 0o600));
    }

    #[test]
    fn a_folder_is_made_owner_only_and_a_wider_one_is_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a/data");
        assert_eq!(private_dir(&data).unwrap(), None);
        assert_eq!(mode_of(&data), 0o700);
        std::fs::set_permissions(&data, Permissions::from_mode(0o755)).unwrap();
        assert_eq!(private_dir(&data).unwrap(), Some(0o755));
        assert_eq!(mode_of(&data), 0o700);
    }
}
