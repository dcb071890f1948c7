//! Safe extraction of an untrusted `tar.gz` stream into a fresh, empty release directory.
//!
//! The rules are those of Python's PEP 706 `data` filter, made stricter:
//! - absolute paths, `..` components, NUL bytes, over-long paths, device nodes, FIFOs and
//!   other special entries are refused;
//! - symbolic links are created only after every file, directory and hard link has been
//!   written, so no write can ever pass through a link the archive planted; a path that a
//!   later link would shadow is refused as a duplicate;
//! - every link must resolve inside the release (chains of links are followed on disk);
//!   hard links must name a regular file extracted earlier;
//! - setuid, setgid, sticky and group/other write bits are stripped, ownership is ignored;
//! - total bytes, entry count and path length are capped (gzip bombs stop at the cap).
//!
//! Any refusal is an error: the caller removes the whole staging directory, so a refused
//! archive leaves nothing behind.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use flate2::read::MultiGzDecoder;

/// Longest single path component, as on common Linux file systems.
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Links followed while checking where a symlink leads, as the kernel's own limit.
const MAX_LINK_DEPTH: u32 = 40;
/// Data allowed after the end-of-archive marker (tar pads records to 10 KiB).
const MAX_TRAILING_BYTES: u64 = 1 << 20;
const COPY_BUFFER: usize = 256 * 1024;

/// Caps on what one archive may expand to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sum of all regular file sizes.
    pub max_bytes: u64,
    /// Number of entries of any kind.
    pub max_entries: u64,
    /// Length of an entry path or link target in bytes.
    pub max_path_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 4 << 30,
            max_entries: 100_000,
            max_path_bytes: 4096,
        }
    }
}

/// What an extraction wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
}

/// Why an archive was not extracted.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The archive is well formed but asks for something unsafe.
    #[error("refused entry {path:?}: {why}")]
    Refused { path: String, why: String },
    /// The archive expands beyond a configured cap.
    #[error("archive too large: {0}")]
    TooLarge(String),
    /// The compressed or tar stream could not be read.
    #[error("archive is corrupt or truncated: {0}")]
    Corrupt(#[source] io::Error),
    /// Writing into the destination failed (disk full, permissions).
    #[error("writing {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn refused(path: impl AsRef<[u8]>, why: impl Into<String>) -> ExtractError {
    ExtractError::Refused {
        path: String::from_utf8_lossy(path.as_ref()).into_owned(),
        why: why.into(),
    }
}

/// Inflates `reader` and extracts the tar stream into `dest`, which must be an existing,
/// empty directory. The whole compressed stream is consumed, so its gzip checksum is
/// verified and trailing garbage is detected.
pub fn unpack_tar_gz<R: Read>(
    reader: R,
    dest: &Path,
    limits: &Limits,
) -> Result<Stats, ExtractError> {
    let mut gz = MultiGzDecoder::new(reader);
    let stats = unpack_tar(&mut gz, dest, limits)?;
    let trailing = io::copy(&mut (&mut gz).take(MAX_TRAILING_BYTES + 1), &mut io::sink())
        .map_err(ExtractError::Corrupt)?;
    if trailing > MAX_TRAILING_BYTES {
        return Err(ExtractError::TooLarge(format!(
            "more than {MAX_TRAILING_BYTES} bytes after the end of the archive"
        )));
    }
    Ok(stats)
}

/// Extracts an uncompressed tar stream into `dest` (an existing, empty directory).
pub fn unpack_tar<R: Read>(reader: R, dest: &Path, limits: &Limits) -> Result<Stats, ExtractError> {
    let mut archive = tar::Archive::new(reader);
    let mut unpacker = Unpacker {
        root: dest,
        limits,
        stats: Stats::default(),
        dirs_made: HashSet::new(),
        files: HashSet::new(),
        dir_modes: Vec::new(),
        symlinks: Vec::new(),
        buf: vec![0u8; COPY_BUFFER],
    };
    for entry in archive.entries().map_err(ExtractError::Corrupt)? {
        let mut entry = entry.map_err(ExtractError::Corrupt)?;
        unpacker.entry(&mut entry)?;
    }
    unpacker.finish()
}

struct Unpacker<'a> {
    root: &'a Path,
    limits: &'a Limits,
    stats: Stats,
    /// Directories known to exist (created by us), relative to the root.
    dirs_made: HashSet<PathBuf>,
    /// Regular files written, relative to the root: the only valid hard link targets.
    files: HashSet<PathBuf>,
    dir_modes: Vec<(PathBuf, u32)>,
    symlinks: Vec<(PathBuf, PathBuf)>,
    buf: Vec<u8>,
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ExtractError> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(ExtractError::TooLarge(format!(
                "more than {} entries",
                self.limits.max_entries
            )));
        }
        let raw_path = entry.path_bytes().into_owned();
        let Some(rel) = self.sanitize(&raw_path)? else {
            // The archive's own root (`./`): nothing to create.
            return Ok(());
        };
        let mode = entry.header().mode().map_err(ExtractError::Corrupt)?;
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                self.write_file(entry, &rel, &raw_path, mode)
            }
            tar::EntryType::Directory => self.make_dir(&rel, &raw_path, mode),
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refused(&raw_path, "hard link without a target"))?
                    .into_owned();
                self.hard_link(&rel, &raw_path, &target)
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refused(&raw_path, "symlink without a target"))?
                    .into_owned();
                self.check_link_target(&raw_path, &target)?;
                self.symlinks
                    .push((rel, PathBuf::from(OsStr::from_bytes(&target))));
                Ok(())
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                Err(refused(&raw_path, "device nodes are not allowed"))
            }
            tar::EntryType::Fifo => Err(refused(&raw_path, "FIFOs are not allowed")),
            other => Err(refused(
                &raw_path,
                format!("unsupported entry type {:?}", other.as_byte() as char),
            )),
        }
    }

    /// Turns an archive path into a clean relative path, or `None` for the archive root.
    fn sanitize(&self, raw: &[u8]) -> Result<Option<PathBuf>, ExtractError> {
        if raw.contains(&0) {
            return Err(refused(raw, "NUL byte in path"));
        }
        if raw.len() > self.limits.max_path_bytes {
            return Err(refused(
                raw,
                format!("path longer than {} bytes", self.limits.max_path_bytes),
            ));
        }
        let mut clean = PathBuf::new();
        for component in Path::new(OsStr::from_bytes(raw)).components() {
            match component {
                Component::Normal(part) => {
                    if part.len() > MAX_COMPONENT_BYTES {
                        return Err(refused(
                            raw,
                            format!("path component longer than {MAX_COMPONENT_BYTES} bytes"),
                        ));
                    }
                    clean.push(part);
                }
                Component::CurDir => {}
                Component::ParentDir => return Err(refused(raw, "`..` in path")),
                Component::RootDir | Component::Prefix(_) => {
                    return Err(refused(raw, "absolute path"));
                }
            }
        }
        Ok((!clean.as_os_str().is_empty()).then_some(clean))
    }

    fn check_link_target(&self, raw_path: &[u8], target: &[u8]) -> Result<(), ExtractError> {
        if target.is_empty() {
            return Err(refused(raw_path, "empty link target"));
        }
        if target.contains(&0) {
            return Err(refused(raw_path, "NUL byte in link target"));
        }
        if target.len() > self.limits.max_path_bytes {
            return Err(refused(raw_path, "link target too long"));
        }
        if target.starts_with(b"/") {
            return Err(refused(raw_path, "absolute link target"));
        }
        Ok(())
    }

    /// Creates the parent directories of `rel`, refusing to pass through anything that is
    /// not a directory we made. No symlink exists yet at this point (they come last).
    fn make_parents(&mut self, rel: &Path, raw: &[u8]) -> Result<(), ExtractError> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        let mut prefix = PathBuf::new();
        for part in parent.components() {
            prefix.push(part);
            if self.dirs_made.contains(&prefix) {
                continue;
            }
            let full = self.root.join(&prefix);
            match fs::create_dir(&full) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let meta =
                        fs::symlink_metadata(&full).map_err(|source| io_err(&full, source))?;
                    if !meta.is_dir() {
                        return Err(refused(raw, "a parent path is not a directory"));
                    }
                }
                Err(source) => return Err(io_err(&full, source)),
            }
            self.dirs_made.insert(prefix.clone());
        }
        Ok(())
    }

    fn write_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: &Path,
        raw: &[u8],
        mode: u32,
    ) -> Result<(), ExtractError> {
        let size = entry.size();
        if self.stats.bytes.saturating_add(size) > self.limits.max_bytes {
            return Err(ExtractError::TooLarge(format!(
                "more than {} bytes extracted",
                self.limits.max_bytes
            )));
        }
        self.make_parents(rel, raw)?;
        let full = self.root.join(rel);
        // create_new (O_EXCL) never follows a link at the final component and refuses
        // duplicates, so an entry cannot overwrite an earlier one.
        let mut file = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&full)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(refused(raw, "duplicate entry"));
            }
            Err(source) => return Err(io_err(&full, source)),
        };
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ExtractError::Corrupt(e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(|source| io_err(&full, source))?;
            written += n as u64;
        }
        if written != size {
            return Err(ExtractError::Corrupt(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("entry {} ended early", full.display()),
            )));
        }
        self.stats.bytes += written;
        if let Ok(mtime) = entry.header().mtime() {
            // Best effort: a file system without mtime support must not fail the release.
            let _ = file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime));
        }
        file.set_permissions(fs::Permissions::from_mode(file_mode(mode)))
            .map_err(|source| io_err(&full, source))?;
        self.files.insert(rel.to_path_buf());
        Ok(())
    }

    fn make_dir(&mut self, rel: &Path, raw: &[u8], mode: u32) -> Result<(), ExtractError> {
        self.make_parents(rel, raw)?;
        let full = self.root.join(rel);
        if !self.dirs_made.contains(rel) {
            match fs::create_dir(&full) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(refused(raw, "a file already exists at this path"));
                }
                Err(source) => return Err(io_err(&full, source)),
            }
            self.dirs_made.insert(rel.to_path_buf());
        }
        self.dir_modes.push((rel.to_path_buf(), dir_mode(mode)));
        Ok(())
    }

    fn hard_link(&mut self, rel: &Path, raw: &[u8], target: &[u8]) -> Result<(), ExtractError> {
        self.check_link_target(raw, target)?;
        let target_rel = self
            .sanitize(target)
            .map_err(|_| refused(raw, "hard link target leaves the release"))?
            .ok_or_else(|| refused(raw, "hard link to the release root"))?;
        if !self.files.contains(&target_rel) {
            return Err(refused(
                raw,
                "hard link target is not a regular file earlier in the archive",
            ));
        }
        self.make_parents(rel, raw)?;
        let full = self.root.join(rel);
        match fs::hard_link(self.root.join(&target_rel), &full) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(refused(raw, "duplicate entry"));
            }
            Err(source) => return Err(io_err(&full, source)),
        }
        self.files.insert(rel.to_path_buf());
        Ok(())
    }

    fn finish(mut self) -> Result<Stats, ExtractError> {
        let symlinks = std::mem::take(&mut self.symlinks);
        for (rel, target) in &symlinks {
            let raw = rel.as_os_str().as_bytes();
            self.make_parents(rel, raw)?;
            let full = self.root.join(rel);
            match std::os::unix::fs::symlink(target, &full) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(refused(raw, "duplicate entry"));
                }
                Err(source) => return Err(io_err(&full, source)),
            }
        }
        // Checked once all links exist, because a later link can change where an earlier
        // one leads.
        for (rel, target) in &symlinks {
            let start: Vec<OsString> = rel
                .parent()
                .map(|p| p.iter().map(OsStr::to_owned).collect())
                .unwrap_or_default();
            resolve_inside(self.root, start, target, 0).map_err(|why| {
                refused(
                    rel.as_os_str().as_bytes(),
                    format!("symlink to {}: {why}", target.display()),
                )
            })?;
        }
        for (rel, mode) in &self.dir_modes {
            let full = self.root.join(rel);
            fs::set_permissions(&full, fs::Permissions::from_mode(*mode))
                .map_err(|source| io_err(&full, source))?;
        }
        Ok(self.stats)
    }
}

/// Follows `target` from the directory `start` (components below the root), through any
/// symlinks on disk, and fails if the walk ever climbs above the root.
fn resolve_inside(
    root: &Path,
    start: Vec<OsString>,
    target: &Path,
    depth: u32,
) -> Result<Vec<OsString>, String> {
    if depth > MAX_LINK_DEPTH {
        return Err("too many levels of symbolic links".into());
    }
    let mut stack = start;
    for component in target.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if stack.pop().is_none() {
                    return Err("leads outside the release".into());
                }
            }
            Component::Normal(part) => {
                stack.push(part.to_owned());
                let on_disk: PathBuf = root.join(stack.iter().collect::<PathBuf>());
                if let Ok(meta) = fs::symlink_metadata(&on_disk)
                    && meta.file_type().is_symlink()
                {
                    let next = fs::read_link(&on_disk).map_err(|e| e.to_string())?;
                    stack.pop();
                    stack = resolve_inside(root, stack, &next, depth + 1)?;
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute link target".into());
            }
        }
    }
    Ok(stack)
}

/// Keeps the owner's bits and group/other read+execute; drops setuid, setgid, sticky and
/// group/other write.
fn file_mode(mode: u32) -> u32 {
    mode & 0o755
}

/// As `file_mode`, but the owner always keeps full access so the release can be pruned.
fn dir_mode(mode: u32) -> u32 {
    (mode & 0o755) | 0o700
}

fn io_err(path: &Path, source: io::Error) -> ExtractError {
    ExtractError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_drop_special_and_shared_write_bits() {
        assert_eq!(file_mode(0o4777), 0o755);
        assert_eq!(file_mode(0o2644), 0o644);
        assert_eq!(file_mode(0o1666), 0o644);
        assert_eq!(dir_mode(0o555), 0o755);
        assert_eq!(dir_mode(0o000), 0o700);
    }

    #[test]
    fn link_chain_through_dot_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(".", root.join("d")).unwrap();
        // `d/..` looks harmless written down, but `d` is `.`, so it means the root's parent.
        assert!(resolve_inside(&root, vec![], Path::new("d/.."), 0).is_err());
        assert!(resolve_inside(&root, vec![], Path::new("d/x"), 0).is_ok());
    }

    #[test]
    fn link_loop_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("b", dir.path().join("a")).unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("b")).unwrap();
        assert!(resolve_inside(dir.path(), vec![], Path::new("a"), 0).is_err());
    }
}
