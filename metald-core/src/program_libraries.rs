//! What a dynamically linked VMM needs in its jail to start: its ELF
//! interpreter and the shared libraries it and they load, found where the
//! host's loader would find them (the program's run paths, then the
//! system's library folders), each exposed read-only at its host path and
//! nothing else of the host. A static VMM (Firecracker's releases, Cloud
//! Hypervisor's static build) needs none; what is found for a program is
//! kept for as long as the file is the same one.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::launch::Exposure;

/// Where the loader looks when a program's run paths do not say (Debian's
/// multiarch folders first).
const SYSTEM_LIBRARY_DIRS: &[&str] = &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

/// How deep libraries may pull in libraries; a real chain is a few levels.
const MAX_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an ELF file the loader can use: {reason}")]
    NotElf { path: PathBuf, reason: String },
    #[error("{program} needs {library}, which is in none of {searched:?}")]
    Missing { program: PathBuf, library: String, searched: Vec<PathBuf> },
    #[error("{program} pulls in libraries more than {MAX_DEPTH} levels deep")]
    TooDeep { program: PathBuf },
}

/// A program's interpreter and libraries, by their path in the jail (the
/// host path without its leading `/`).
#[derive(Debug, Clone, Default)]
pub struct ProgramLibraries {
    /// The interpreter the program asks for, when it is dynamically linked.
    pub interpreter: Option<PathBuf>,
    /// Every file to expose, interpreter included.
    pub files: BTreeMap<String, PathBuf>,
}

impl ProgramLibraries {
    /// Opens each file for the jail to expose, read-only.
    pub fn exposures(&self) -> Result<Vec<Exposure>, LibraryError> {
        self.files
            .iter()
            .map(|(name, path)| {
                let file = std::fs::File::open(path).map_err(|source| LibraryError::Read { path: path.clone(), source })?;
                Ok(Exposure { name: name.clone(), host_path: path.clone(), file: Arc::new(OwnedFd::from(file)), writable: false })
            })
            .collect()
    }
}

/// The interpreter and libraries of the program at `path`, whose open file
/// is `file`; empty for a static program. Kept per file (device, inode,
/// size, modification time), so a launch reads the program once.
pub fn of_program(path: &Path, file: &OwnedFd) -> Result<ProgramLibraries, LibraryError> {
    static FOUND: Mutex<Option<HashMap<FileIdentity, ProgramLibraries>>> = Mutex::new(None);
    let identity = FileIdentity::of(path, file)?;
    if let Some(found) = FOUND.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().and_then(|cache| cache.get(&identity)) {
        return Ok(found.clone());
    }
    let found = resolve(path)?;
    FOUND.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert_with(HashMap::new).insert(identity, found.clone());
    Ok(found)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileIdentity {
    device: u64,
    inode: u64,
    size: i64,
    modified: (i64, i64),
}

impl FileIdentity {
    fn of(path: &Path, file: &OwnedFd) -> Result<Self, LibraryError> {
        let stat = nix::sys::stat::fstat(file).map_err(|errno| LibraryError::Read { path: path.to_path_buf(), source: errno.into() })?;
        Ok(Self { device: stat.st_dev, inode: stat.st_ino, size: stat.st_size, modified: (stat.st_mtime, stat.st_mtime_nsec) })
    }
}

/// What one ELF file asks of the loader.
struct Needs {
    interpreter: Option<String>,
    libraries: Vec<String>,
    run_paths: Vec<PathBuf>,
}

fn needs(path: &Path) -> Result<Needs, LibraryError> {
    let bytes = std::fs::read(path).map_err(|source| LibraryError::Read { path: path.to_path_buf(), source })?;
    let elf =
        goblin::elf::Elf::parse(&bytes).map_err(|error| LibraryError::NotElf { path: path.to_path_buf(), reason: error.to_string() })?;
    let origin = path.parent().unwrap_or(Path::new("/"));
    let run_paths = elf
        .runpaths
        .iter()
        .chain(elf.rpaths.iter())
        .flat_map(|paths| paths.split(':'))
        .filter(|entry| !entry.is_empty())
        .map(|entry| PathBuf::from(entry.replace("$ORIGIN", &origin.to_string_lossy())))
        .collect();
    Ok(Needs {
        interpreter: elf.interpreter.map(str::to_owned),
        libraries: elf.libraries.iter().map(|library| (*library).to_owned()).collect(),
        run_paths,
    })
}

fn resolve(program: &Path) -> Result<ProgramLibraries, LibraryError> {
    let top = needs(program)?;
    let Some(interpreter) = top.interpreter.clone() else {
        return Ok(ProgramLibraries::default());
    };
    let mut found = ProgramLibraries { interpreter: Some(PathBuf::from(&interpreter)), files: BTreeMap::new() };
    add(&mut found, Path::new(&interpreter), program)?;
    // Breadth first: each library once, by the name the loader asks for.
    let mut pending: Vec<(String, Vec<PathBuf>, usize)> =
        top.libraries.iter().map(|library| (library.clone(), top.run_paths.clone(), 1)).collect();
    let mut seen = std::collections::HashSet::new();
    while let Some((library, run_paths, depth)) = pending.pop() {
        if !seen.insert(library.clone()) {
            continue;
        }
        if depth > MAX_DEPTH {
            return Err(LibraryError::TooDeep { program: program.to_path_buf() });
        }
        let searched: Vec<PathBuf> = run_paths.iter().cloned().chain(SYSTEM_LIBRARY_DIRS.iter().map(PathBuf::from)).collect();
        let Some(path) = searched.iter().map(|dir| dir.join(&library)).find(|candidate| candidate.is_file()) else {
            return Err(LibraryError::Missing { program: program.to_path_buf(), library, searched });
        };
        add(&mut found, &path, program)?;
        let library_needs = needs(&path)?;
        pending.extend(library_needs.libraries.into_iter().map(|next| (next, library_needs.run_paths.clone(), depth + 1)));
    }
    Ok(found)
}

/// Exposes `path` at the same path in the jail, its content read through any symlink.
fn add(found: &mut ProgramLibraries, path: &Path, program: &Path) -> Result<(), LibraryError> {
    let name = path.strip_prefix("/").map_err(|_| LibraryError::NotElf {
        path: program.to_path_buf(),
        reason: format!("it asks for {}, which is no absolute path", path.display()),
    })?;
    found.files.insert(name.to_string_lossy().into_owned(), path.to_path_buf());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_program_brings_its_interpreter_and_libraries_and_a_static_one_nothing() {
        let shell: OwnedFd = std::fs::File::open("/bin/sh").unwrap().into();
        let found = of_program(Path::new("/bin/sh"), &shell).unwrap();
        let interpreter = found.interpreter.clone().expect("/bin/sh is dynamically linked");
        assert!(interpreter.to_string_lossy().contains("ld-linux"), "{interpreter:?}");
        assert!(found.files.keys().any(|name| name.ends_with("/libc.so.6")), "{:?}", found.files);
        assert!(found.files.keys().all(|name| !name.starts_with('/')), "{:?}", found.files);
        assert_eq!(found.exposures().unwrap().len(), found.files.len());

        let guest: OwnedFd = std::fs::File::open(metald_testguest::kernel_path()).unwrap().into();
        let found = of_program(metald_testguest::kernel_path(), &guest).unwrap();
        assert!(found.interpreter.is_none() && found.files.is_empty(), "{found:?}");
    }
}
