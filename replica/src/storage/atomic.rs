//! Crash-safe file replacement: a file is either its old contents or its new ones, never a mix.
//!
//! The sequence is the one every durable store uses (write a temporary file, fsync it, rename it
//! over the target, fsync the directory): without the file fsync a crash can leave the rename
//! pointing at empty blocks, and without the directory fsync the rename itself can be lost.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::StorageError;

/// Suffix of files being written; a crash can leave one behind, and `open` removes it.
pub const TEMP_SUFFIX: &str = ".tmp";

/// Maps an I/O error to a `StorageError` that names the operation and the file.
pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.to_path_buf();
    move |source| StorageError::Io { op, path, source }
}

/// Makes creations, renames and removals in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Replaces `dir/name` with `parts` concatenated, atomically and durably. Large parts are
/// written as they are, without being copied into one buffer.
pub(crate) fn write_atomic(
    dir: &Path,
    name: &str,
    parts: &[&[u8]],
) -> Result<PathBuf, StorageError> {
    let target = dir.join(name);
    let temp = dir.join(format!("{name}{TEMP_SUFFIX}"));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        for p in parts {
            f.write_all(p)?;
        }
        f.sync_all()
    };
    if let Err(e) = write() {
        // Best effort: a leftover temporary file is harmless (open removes it) but wastes space.
        let _ = fs::remove_file(&temp);
        return Err(io_err("write", &temp)(e));
    }
    fs::rename(&temp, &target).map_err(io_err("rename", &temp))?;
    sync_dir(dir)?;
    Ok(target)
}

/// Removes leftover temporary files from interrupted atomic writes. They were never renamed
/// into place, so nothing refers to them.
pub(crate) fn remove_temp_files(dir: &Path) -> Result<Vec<PathBuf>, StorageError> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let path = entry.path();
        let is_temp = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(TEMP_SUFFIX));
        if is_temp {
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
            removed.push(path);
        }
    }
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    Ok(removed)
}
