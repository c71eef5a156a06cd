//! A stand-in for `nft` that refuses some of what it is given, to fail a
//! firewall change on purpose.

use std::io;
use std::path::{Path, PathBuf};

/// Writes `folder/nft`: it fails with `injected failure` on stderr when its
/// input (the JSON batch) matches the shell `case` pattern `refused`, and
/// hands everything else to the real `nft`, found on PATH now, so that the
/// stand-in may itself come first on a PATH.
pub fn write_refusing_nft(folder: &Path, refused: &str) -> io::Result<PathBuf> {
    let found = std::process::Command::new("sh").args(["-c", "command -v nft"]).output()?;
    let real = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    if real.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no nft on PATH"));
    }
    let nft = folder.join("nft");
    let script = format!(
        "#!/bin/sh\ninput=$(cat)\ncase \"$input\" in {refused}) echo 'injected failure' >&2; exit 1;; esac\nprintf '%s' \"$input\" | exec {real} \"$@\"\n"
    );
    std::fs::write(&nft, script)?;
    std::fs::set_permissions(&nft, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(nft)
}
