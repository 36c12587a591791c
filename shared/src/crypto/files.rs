//! Writing and reading files that hold secrets (or certificates next to them).
//!
//! Writes go through [`crate::files`]: a temporary file in the same directory, created with its
//! final mode (so the secret is never readable by others, not even for a moment), fsynced, and
//! only then published under its final name. Without `overwrite` the final step is a hard link,
//! which fails if the name is taken, so two processes racing to create a key cannot silently
//! replace each other's.

use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub use crate::files::Overwrite;

use super::CryptoError;

/// Permission bits for files holding secrets: owner read/write only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Permission bits for public material (certificates): world-readable, owner-writable.
pub const PUBLIC_FILE_MODE: u32 = crate::files::DEFAULT_FILE_MODE;

/// Writes `contents` to `path` with permission bits `mode`, atomically and durably (see the
/// module docs). The parent directory must exist. A taken name under [`Overwrite::Refuse`] is
/// [`CryptoError::FileExists`].
pub fn write_file_atomically(
    path: &Path,
    contents: &[u8],
    mode: u32,
    overwrite: Overwrite,
) -> Result<(), CryptoError> {
    crate::files::atomic_write_with(path, contents, mode, overwrite).map_err(|e| {
        if overwrite == Overwrite::Refuse && e.is_already_exists() {
            CryptoError::FileExists { path: path.to_path_buf() }
        } else {
            CryptoError::io(e.path, e.source)
        }
    })
}

/// Reads a file that holds a secret, refusing it when group or others have any access to it
/// ([`CryptoError::InsecureFileMode`]) and naming it when it is missing
/// ([`CryptoError::FileMissing`]).
pub fn read_private_file(path: &Path) -> Result<Vec<u8>, CryptoError> {
    let mut file = File::open(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => CryptoError::FileMissing { path: path.to_path_buf() },
        _ => CryptoError::io(path, e),
    })?;
    // Check the mode of the file actually opened (not of the path, which could be swapped).
    let mode = file.metadata().map_err(|e| CryptoError::io(path, e))?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CryptoError::InsecureFileMode { path: path.to_path_buf(), mode });
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| CryptoError::io(path, e))?;
    Ok(bytes)
}

/// Reads a file that holds public material, naming it when it is missing.
pub fn read_public_file(path: &Path) -> Result<Vec<u8>, CryptoError> {
    fs::read(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => CryptoError::FileMissing { path: path.to_path_buf() },
        _ => CryptoError::io(path, e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_private_file_is_created_with_mode_0600_and_no_temporary_is_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_file_atomically(&path, b"s3cret", PRIVATE_FILE_MODE, Overwrite::Refuse).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"s3cret");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
    }

    #[test]
    fn refusing_to_overwrite_keeps_the_existing_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_file_atomically(&path, b"first", PRIVATE_FILE_MODE, Overwrite::Refuse).unwrap();
        let err = write_file_atomically(&path, b"second", PRIVATE_FILE_MODE, Overwrite::Refuse).unwrap_err();
        assert!(matches!(&err, CryptoError::FileExists { path: p } if *p == path), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"first");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn replacing_swaps_the_contents_and_applies_the_new_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cert.pem");
        write_file_atomically(&path, b"old", PRIVATE_FILE_MODE, Overwrite::Refuse).unwrap();
        write_file_atomically(&path, b"new", PUBLIC_FILE_MODE, Overwrite::Replace).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(mode_of(&path), 0o644);
    }

    #[test]
    fn a_private_file_readable_by_others_is_refused_with_its_path_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_file_atomically(&path, b"x", PRIVATE_FILE_MODE, Overwrite::Refuse).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = read_private_file(&path).unwrap_err();
            assert!(matches!(err, CryptoError::InsecureFileMode { mode: m, .. } if m == mode), "{err}");
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()) && msg.contains("chmod 600"), "{msg}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read_private_file(&path).unwrap(), b"x");
    }

    #[test]
    fn a_missing_file_is_named_in_the_error() {
        let path = Path::new("/nonexistent/fedtune/key.pem");
        let err = read_private_file(path).unwrap_err();
        assert!(matches!(err, CryptoError::FileMissing { .. }));
        assert!(err.to_string().contains("/nonexistent/fedtune/key.pem"));
        assert!(read_public_file(path).unwrap_err().to_string().contains("/nonexistent/fedtune/key.pem"));
    }
}
