//! Crash-safe file writes: the one implementation of "write a temporary, fsync, rename".
//!
//! A file written here appears under its final name only once its contents are on disk, so a
//! crash (or `kill -9`) leaves either the previous file, or the whole new one, never a truncated
//! one that would load. The temporary lives in the same directory (a rename is atomic only within
//! one file system), carries a random suffix (two writers never share one), and is created with
//! its final permission bits (a secret is never readable by others, not even for a moment). The
//! directory is fsynced after the rename, so the new name itself survives a power loss.
//!
//! [`write_dir_atomically`] does the same for a whole directory (an exported model).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A filesystem operation that failed, with the path it failed on.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FileError {
    /// The file or directory involved.
    pub path: PathBuf,
    /// The operating system's error. [`ErrorKind::AlreadyExists`] when [`Overwrite::Refuse`]
    /// found the name taken.
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    fn new(path: &Path, source: std::io::Error) -> Self {
        Self { path: path.to_path_buf(), source }
    }

    /// Whether the write was refused because the name was taken ([`Overwrite::Refuse`]).
    pub fn is_already_exists(&self) -> bool {
        self.source.kind() == ErrorKind::AlreadyExists
    }
}

/// Whether an atomic write may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// Fail with [`ErrorKind::AlreadyExists`] if the path is taken. The final step is a hard
    /// link, which fails if the name is taken, so two processes racing to create the same
    /// file cannot silently replace each other's.
    Refuse,
    /// Atomically replace whatever is there.
    Replace,
}

/// Permission bits of files that are not secret: world-readable, owner-writable.
pub const DEFAULT_FILE_MODE: u32 = 0o644;

/// Writes `contents` to `path` atomically and durably (see the module docs), replacing any
/// existing file, with mode [`DEFAULT_FILE_MODE`]. The parent directory must exist.
pub fn atomic_write(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    atomic_write_with(path, contents, DEFAULT_FILE_MODE, Overwrite::Replace)
}

/// [`atomic_write`] with explicit permission bits `mode` (applied regardless of the umask) and
/// overwrite policy.
pub fn atomic_write_with(
    path: &Path,
    contents: &[u8],
    mode: u32,
    overwrite: Overwrite,
) -> Result<(), FileError> {
    if overwrite == Overwrite::Refuse && path.symlink_metadata().is_ok() {
        return Err(FileError::new(path, ErrorKind::AlreadyExists.into()));
    }
    let dir = parent_dir(path);
    let file_name = path.file_name().ok_or_else(|| {
        FileError::new(path, std::io::Error::new(ErrorKind::InvalidInput, "does not name a file"))
    })?;
    let tmp = dir.join(format!(".{}.tmp-{}", file_name.to_string_lossy(), random_suffix()));
    let result = write_then_publish(&tmp, path, contents, mode, overwrite);
    // After a rename the temporary name is gone; after a hard link or a failure it must be
    // removed, so that no stray copy (of a secret, say) lingers.
    let _ = fs::remove_file(&tmp);
    result?;
    sync_dir(&dir)
}

fn write_then_publish(
    tmp: &Path,
    path: &Path,
    contents: &[u8],
    mode: u32,
    overwrite: Overwrite,
) -> Result<(), FileError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .map_err(|e| FileError::new(&parent_dir(path), e))?;
    // `mode` at creation is filtered by the umask; set it explicitly so a public file is
    // readable even under umask 077 and a secret is never wider than asked.
    file.set_permissions(fs::Permissions::from_mode(mode)).map_err(|e| FileError::new(tmp, e))?;
    file.write_all(contents).map_err(|e| FileError::new(tmp, e))?;
    file.sync_all().map_err(|e| FileError::new(tmp, e))?;
    drop(file);
    match overwrite {
        Overwrite::Replace => fs::rename(tmp, path).map_err(|e| FileError::new(path, e)),
        Overwrite::Refuse => fs::hard_link(tmp, path).map_err(|e| FileError::new(path, e)),
    }
}

/// Builds a directory at `out` atomically: `fill` writes the files into an empty temporary
/// directory next to `out` (each file it writes should be fsynced, e.g. with
/// [`atomic_write`]); then the temporary directory is fsynced and renamed to `out`.
///
/// An existing `out` is replaced: an empty one directly by the rename; a non-empty one is moved
/// aside first and removed after the new directory is in place, so readers see the old
/// directory or the new one, and a crash in between leaves the old one under
/// `.{name}.old-{suffix}` next to it rather than losing it. On any error the temporary
/// directory is removed and `out` is untouched.
pub fn write_dir_atomically<E>(out: &Path, fill: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E>
where
    E: From<FileError>,
{
    let parent = parent_dir(out);
    fs::create_dir_all(&parent).map_err(|e| FileError::new(&parent, e))?;
    let name = out.file_name().ok_or_else(|| {
        FileError::new(out, std::io::Error::new(ErrorKind::InvalidInput, "does not name a directory"))
    })?;
    let name = name.to_string_lossy();
    let suffix = random_suffix();
    let tmp = parent.join(format!(".{name}.tmp-{suffix}"));
    fs::create_dir(&tmp).map_err(|e| FileError::new(&tmp, e))?;
    let published = fill(&tmp).and_then(|()| {
        sync_dir(&tmp)?;
        publish_dir(&tmp, out, &parent.join(format!(".{name}.old-{suffix}")))?;
        Ok(())
    });
    if published.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    published?;
    sync_dir(&parent)?;
    Ok(())
}

fn publish_dir(tmp: &Path, out: &Path, aside: &Path) -> Result<(), FileError> {
    // rename(2) replaces an empty directory; only a non-empty one needs moving aside.
    match fs::rename(tmp, out) {
        Ok(()) => Ok(()),
        Err(_) if out.is_dir() => {
            fs::rename(out, aside).map_err(|e| FileError::new(out, e))?;
            fs::rename(tmp, out).map_err(|e| FileError::new(out, e))?;
            fs::remove_dir_all(aside).map_err(|e| FileError::new(aside, e))
        }
        Err(e) => Err(FileError::new(out, e)),
    }
}

/// Copies `src` to `dst` with [`atomic_write`].
pub fn atomic_copy(src: &Path, dst: &Path) -> Result<(), FileError> {
    let bytes = fs::read(src).map_err(|e| FileError::new(src, e))?;
    atomic_write(dst, &bytes)
}

/// Makes a directory's entries durable: without this a crash right after a rename can leave
/// the old name (or none) even though the data blocks were synced.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| FileError::new(dir, e))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// 16 hex digits from the process id and the clock: unique among concurrent writers of one
/// machine, which is all a temporary name needs (it is created with `create_new`).
fn random_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}{:04x}{:04x}", std::process::id(), nanos & 0xffff, n & 0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        atomic_write(&path, b"old").unwrap();
        atomic_write(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(mode_of(&path), DEFAULT_FILE_MODE);
        assert_eq!(names(dir.path()), ["model.safetensors"]);
    }

    #[test]
    fn refusing_to_overwrite_keeps_the_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        atomic_write_with(&path, b"first", 0o600, Overwrite::Refuse).unwrap();
        let err = atomic_write_with(&path, b"second", 0o600, Overwrite::Refuse).unwrap_err();
        assert!(err.is_already_exists() && err.path == path, "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"first");
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(names(dir.path()), ["key"]);
    }

    #[test]
    fn a_write_into_a_missing_directory_names_it_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let err = atomic_write(&dir.path().join("missing/file"), b"x").unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn a_directory_appears_whole_or_not_at_all() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("export");
        let failed: Result<(), FileError> = write_dir_atomically(&out, |tmp| {
            atomic_write(&tmp.join("config.json"), b"{}")?;
            Err(FileError::new(tmp, ErrorKind::Other.into()))
        });
        assert!(failed.is_err());
        assert!(names(root.path()).is_empty(), "no half-written export and no temporary");

        write_dir_atomically::<FileError>(&out, |tmp| atomic_write(&tmp.join("config.json"), b"{}")).unwrap();
        assert_eq!(names(&out), ["config.json"]);
        assert_eq!(names(root.path()), ["export"]);
    }

    #[test]
    fn a_directory_replaces_an_existing_one_empty_or_not() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("export");
        fs::create_dir(&out).unwrap();
        write_dir_atomically::<FileError>(&out, |tmp| atomic_write(&tmp.join("a"), b"1")).unwrap();
        write_dir_atomically::<FileError>(&out, |tmp| atomic_write(&tmp.join("b"), b"2")).unwrap();
        assert_eq!(names(&out), ["b"], "the previous export is replaced, not merged");
        assert_eq!(names(root.path()), ["export"], "nothing set aside is left behind");
    }
}
