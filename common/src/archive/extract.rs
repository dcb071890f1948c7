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
//! - total bytes, entry count and path length are capped (gzip bombs stop at the cap);
//! - extension headers (GNU long names and links, PAX records) are read by this module,
//!   not by tar-rs, so each is capped at [`MAX_EXTENSION_BYTES`] before it is buffered: an
//!   archive cannot make the extractor allocate more than that for one header;
//! - link resolution follows at most [`MAX_LINK_FOLLOWS`] links per symlink checked, as the
//!   kernel does, and at most [`MAX_LINK_LOOKUPS`] path components in the whole archive, so
//!   no arrangement of links makes the check exponential or merely endless;
//! - the names kept in memory until the end (directories made, directory modes, symlinks)
//!   are capped at [`MAX_NAME_MEMORY`] bytes, and entries that are not regular files must
//!   carry no data (tar would skip it unread and uncounted);
//! - file system errors that a retry cannot change (a name too long for `PATH_MAX` once
//!   below the staging directory, too many hard links to one file) are refusals, not I/O
//!   failures;
//! - a caller-supplied cancel check runs before every entry and every chunk written, so a
//!   deadline or shutdown stops a long extraction promptly.
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
/// Links followed while checking where one symlink leads (the kernel's own limit for one
/// path resolution). It bounds the total, not only the nesting: links `l0 -> .` and
/// `lk -> l(k-1)/l(k-1)` would otherwise cost 2^k lookups.
pub const MAX_LINK_FOLLOWS: u32 = 40;
/// Largest GNU long name, long link or PAX extension header accepted. Real ones are a few
/// hundred bytes; tar-rs would buffer any size, which lets a small gzip exhaust memory.
pub const MAX_EXTENSION_BYTES: u64 = 64 * 1024;
/// Path components looked up, in the whole archive, while checking where symlinks lead. A
/// `node_modules` tree with thousands of links needs a few tens of thousands.
pub const MAX_LINK_LOOKUPS: u64 = 1_000_000;
/// Memory for the names kept until the end of an extraction (directories made, directory
/// modes, symlinks and their targets), bookkeeping included. A tree of 100,000 entries
/// with ordinary names needs a few MiB; a fetcher runs within a 64 MiB pod limit.
pub const MAX_NAME_MEMORY: usize = 16 << 20;
/// What one retained name costs besides its bytes (the `PathBuf`, the set or vector slot).
const NAME_OVERHEAD: usize = 64;
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
    /// The caller's cancel check fired (deadline or shutdown): not a verdict on the archive.
    #[error("extraction cancelled")]
    Cancelled,
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

/// Tells a running extraction to stop; checked before every entry and every chunk.
pub type CancelCheck<'a> = &'a (dyn Fn() -> bool + Sync);

/// Inflates `reader` and extracts the tar stream into `dest`, which must be an existing,
/// empty directory. The whole compressed stream is consumed, so its gzip checksum is
/// verified and trailing garbage is detected.
pub fn unpack_tar_gz<R: Read>(
    reader: R,
    dest: &Path,
    limits: &Limits,
) -> Result<Stats, ExtractError> {
    unpack_tar_gz_cancellable(reader, dest, limits, &|| false)
}

/// As [`unpack_tar_gz`], stopping with [`ExtractError::Cancelled`] once `cancelled` is true.
pub fn unpack_tar_gz_cancellable<R: Read>(
    reader: R,
    dest: &Path,
    limits: &Limits,
    cancelled: CancelCheck<'_>,
) -> Result<Stats, ExtractError> {
    let mut gz = MultiGzDecoder::new(reader);
    let stats = unpack_tar_cancellable(&mut gz, dest, limits, cancelled)?;
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
    unpack_tar_cancellable(reader, dest, limits, &|| false)
}

fn unpack_tar_cancellable<R: Read>(
    reader: R,
    dest: &Path,
    limits: &Limits,
    cancelled: CancelCheck<'_>,
) -> Result<Stats, ExtractError> {
    let mut archive = tar::Archive::new(reader);
    let mut unpacker = Unpacker {
        root: dest,
        limits,
        cancelled,
        stats: Stats::default(),
        dirs_made: HashSet::new(),
        dir_modes: Vec::new(),
        symlinks: Vec::new(),
        name_memory: 0,
        buf: vec![0u8; COPY_BUFFER],
    };
    // Raw mode: tar-rs hands over extension headers as entries instead of buffering them
    // itself without a cap; `Extensions` reads them with one.
    let mut ext = Extensions::default();
    for entry in archive.entries().map_err(ExtractError::Corrupt)?.raw(true) {
        if cancelled() {
            return Err(ExtractError::Cancelled);
        }
        let mut entry = entry.map_err(ExtractError::Corrupt)?;
        if ext.absorb(&mut entry)? {
            continue;
        }
        let names = ext.take_names(&entry)?;
        unpacker.entry(&mut entry, names)?;
    }
    if ext.pending() {
        return Err(ExtractError::Corrupt(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "extension header without the entry it describes",
        )));
    }
    unpacker.finish()
}

/// The path and link target of one entry, after its extension headers are applied.
struct Names {
    path: Vec<u8>,
    link: Option<Vec<u8>>,
}

/// Extension headers seen since the last real entry. They apply to the next entry only.
#[derive(Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax_path: Option<Vec<u8>>,
    pax_link: Option<Vec<u8>>,
    pax_size: Option<u64>,
    seen_pax: bool,
}

impl Extensions {
    fn pending(&self) -> bool {
        self.long_name.is_some() || self.long_link.is_some() || self.seen_pax
    }

    /// Consumes `entry` if it is an extension header; returns whether it was one.
    fn absorb<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<bool, ExtractError> {
        let kind = entry.header().entry_type();
        let what = if kind.is_gnu_longname() {
            "GNU long name"
        } else if kind.is_gnu_longlink() {
            "GNU long link"
        } else if kind.is_pax_local_extensions() {
            "PAX extension"
        } else if kind.is_pax_global_extensions() {
            "PAX global extension"
        } else {
            return Ok(false);
        };
        let raw_path = entry.header().path_bytes().into_owned();
        let size = entry.header().entry_size().map_err(ExtractError::Corrupt)?;
        if size > MAX_EXTENSION_BYTES {
            return Err(refused(
                &raw_path,
                format!("{what} header of {size} bytes (at most {MAX_EXTENSION_BYTES})"),
            ));
        }
        let mut data = Vec::with_capacity(size as usize);
        Read::by_ref(entry)
            .take(MAX_EXTENSION_BYTES)
            .read_to_end(&mut data)
            .map_err(ExtractError::Corrupt)?;
        if data.len() as u64 != size {
            return Err(ExtractError::Corrupt(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{what} header ended early"),
            )));
        }
        let twice = || refused(&raw_path, format!("two {what} headers for one entry"));
        if kind.is_gnu_longname() {
            if self.long_name.is_some() {
                return Err(twice());
            }
            self.long_name = Some(strip_nuls(data));
        } else if kind.is_gnu_longlink() {
            if self.long_link.is_some() {
                return Err(twice());
            }
            self.long_link = Some(strip_nuls(data));
        } else if kind.is_pax_local_extensions() {
            if self.seen_pax {
                return Err(twice());
            }
            self.seen_pax = true;
            self.read_pax(&raw_path, &data)?;
        }
        // Global PAX records (comments, charset, default times) change nothing we honour.
        Ok(true)
    }

    fn read_pax(&mut self, raw_path: &[u8], data: &[u8]) -> Result<(), ExtractError> {
        for record in tar::PaxExtensions::new(data) {
            let record = record.map_err(|_| refused(raw_path, "malformed PAX record"))?;
            match record.key_bytes() {
                b"path" => self.pax_path = Some(record.value_bytes().to_vec()),
                b"linkpath" => self.pax_link = Some(record.value_bytes().to_vec()),
                b"size" => {
                    let size = record
                        .value()
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or_else(|| refused(raw_path, "malformed PAX size"))?;
                    self.pax_size = Some(size);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The names of the real entry that follows the extension headers, which are reset.
    fn take_names<R: Read>(&mut self, entry: &tar::Entry<'_, R>) -> Result<Names, ExtractError> {
        let header = entry.header();
        let path = self
            .pax_path
            .take()
            .or_else(|| self.long_name.take())
            .unwrap_or_else(|| header.path_bytes().into_owned());
        if let Some(size) = self.pax_size.take() {
            // Raw mode frames the entry by its header size; a PAX size that disagrees would
            // make this parser and others see different archives, so it is refused.
            if Some(size) != header.entry_size().ok() {
                return Err(refused(&path, "PAX size disagrees with the header size"));
            }
        }
        let link = self
            .pax_link
            .take()
            .or_else(|| self.long_link.take())
            .or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
        *self = Self::default();
        Ok(Names { path, link })
    }
}

fn strip_nuls(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

struct Unpacker<'a> {
    root: &'a Path,
    limits: &'a Limits,
    cancelled: CancelCheck<'a>,
    stats: Stats,
    /// Directories known to exist (created by us), relative to the root.
    dirs_made: HashSet<PathBuf>,
    dir_modes: Vec<(PathBuf, u32)>,
    symlinks: Vec<(PathBuf, PathBuf)>,
    /// Bytes held by the three above, checked against `MAX_NAME_MEMORY`.
    name_memory: usize,
    buf: Vec<u8>,
}

impl Unpacker<'_> {
    /// Accounts for names about to be kept until the end of the extraction.
    fn retain(&mut self, names: &[&Path]) -> Result<(), ExtractError> {
        let bytes: usize = names
            .iter()
            .map(|n| n.as_os_str().len() + NAME_OVERHEAD)
            .sum();
        self.name_memory += bytes;
        if self.name_memory > MAX_NAME_MEMORY {
            return Err(ExtractError::TooLarge(format!(
                "the names of the directories and links in this archive need more than {} MiB",
                MAX_NAME_MEMORY >> 20
            )));
        }
        Ok(())
    }

    fn check_cancel(&self) -> Result<(), ExtractError> {
        if (self.cancelled)() {
            Err(ExtractError::Cancelled)
        } else {
            Ok(())
        }
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        names: Names,
    ) -> Result<(), ExtractError> {
        let kind = entry.header().entry_type();
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(ExtractError::TooLarge(format!(
                "more than {} entries",
                self.limits.max_entries
            )));
        }
        let raw_path = names.path;
        let size = entry.header().entry_size().map_err(ExtractError::Corrupt)?;
        let is_file = matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous);
        if !is_file && size != 0 {
            // tar-rs would skip that data unread: bytes no cap counts and no check sees.
            return Err(refused(
                &raw_path,
                format!("a non-file entry carrying {size} bytes"),
            ));
        }
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
                let target = names
                    .link
                    .ok_or_else(|| refused(&raw_path, "hard link without a target"))?;
                self.hard_link(&rel, &raw_path, &target)
            }
            tar::EntryType::Symlink => {
                let target = names
                    .link
                    .ok_or_else(|| refused(&raw_path, "symlink without a target"))?;
                self.check_link_target(&raw_path, &target)?;
                let target = PathBuf::from(OsStr::from_bytes(&target));
                self.retain(&[&rel, &target])?;
                self.symlinks.push((rel, target));
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
            self.retain(&[&prefix])?;
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
            if (self.cancelled)() {
                return Err(ExtractError::Cancelled);
            }
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
            self.retain(&[rel])?;
            self.dirs_made.insert(rel.to_path_buf());
        }
        self.retain(&[rel])?;
        self.dir_modes.push((rel.to_path_buf(), dir_mode(mode)));
        Ok(())
    }

    fn hard_link(&mut self, rel: &Path, raw: &[u8], target: &[u8]) -> Result<(), ExtractError> {
        self.check_link_target(raw, target)?;
        let target_rel = self
            .sanitize(target)
            .map_err(|_| refused(raw, "hard link target leaves the release"))?
            .ok_or_else(|| refused(raw, "hard link to the release root"))?;
        // No symlink exists yet and every directory on the way was made by us, so a regular
        // file found there was written by an earlier entry of this archive.
        let is_earlier_file =
            fs::symlink_metadata(self.root.join(&target_rel)).is_ok_and(|m| m.is_file());
        if !is_earlier_file {
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
        Ok(())
    }

    fn finish(mut self) -> Result<Stats, ExtractError> {
        let symlinks = std::mem::take(&mut self.symlinks);
        for (rel, target) in &symlinks {
            self.check_cancel()?;
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
        let mut walk = Walk {
            root: self.root,
            follows: 0,
            lookups: 0,
            cancelled: self.cancelled,
        };
        for (rel, target) in &symlinks {
            let start: Vec<OsString> = rel
                .parent()
                .map(|p| p.iter().map(OsStr::to_owned).collect())
                .unwrap_or_default();
            walk.follows = 0;
            walk.resolve(start, target).map_err(|e| match e {
                LinkError::Cancelled => ExtractError::Cancelled,
                LinkError::Refused(why) => refused(
                    rel.as_os_str().as_bytes(),
                    format!("symlink to {}: {why}", target.display()),
                ),
            })?;
        }
        self.check_cancel()?;
        for (rel, mode) in &self.dir_modes {
            let full = self.root.join(rel);
            fs::set_permissions(&full, fs::Permissions::from_mode(*mode))
                .map_err(|source| io_err(&full, source))?;
        }
        Ok(self.stats)
    }
}

/// Why a symlink check stopped.
enum LinkError {
    Refused(String),
    Cancelled,
}

/// The state of checking where the archive's symlinks lead.
struct Walk<'a> {
    root: &'a Path,
    /// Links followed for the symlink being checked.
    follows: u32,
    /// Components looked up on disk for the whole archive.
    lookups: u64,
    cancelled: CancelCheck<'a>,
}

impl Walk<'_> {
    /// Follows `target` from the directory `start` (components below the root), through
    /// any symlinks on disk, and fails if the walk ever climbs above the root.
    fn resolve(&mut self, start: Vec<OsString>, target: &Path) -> Result<Vec<OsString>, LinkError> {
        let mut stack = start;
        // The on-disk path of `stack`, kept in step with it (rebuilding it for every
        // component would make long targets quadratic).
        let mut on_disk: PathBuf = self.root.join(stack.iter().collect::<PathBuf>());
        for component in target.components() {
            match component {
                Component::CurDir => {}
                Component::ParentDir => {
                    if stack.pop().is_none() {
                        return Err(LinkError::Refused("leads outside the release".into()));
                    }
                    on_disk.pop();
                }
                Component::Normal(part) => {
                    self.lookups += 1;
                    if self.lookups > MAX_LINK_LOOKUPS {
                        return Err(LinkError::Refused(format!(
                            "checking the archive's links needs more than {MAX_LINK_LOOKUPS} lookups"
                        )));
                    }
                    if self.lookups.is_multiple_of(1024) && (self.cancelled)() {
                        return Err(LinkError::Cancelled);
                    }
                    stack.push(part.to_owned());
                    on_disk.push(part);
                    if let Ok(meta) = fs::symlink_metadata(&on_disk)
                        && meta.file_type().is_symlink()
                    {
                        self.follows += 1;
                        if self.follows > MAX_LINK_FOLLOWS {
                            return Err(LinkError::Refused(
                                "too many levels of symbolic links".into(),
                            ));
                        }
                        let next = fs::read_link(&on_disk)
                            .map_err(|e| LinkError::Refused(e.to_string()))?;
                        stack.pop();
                        stack = self.resolve(stack, &next)?;
                        on_disk = self.root.join(stack.iter().collect::<PathBuf>());
                    }
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(LinkError::Refused("absolute link target".into()));
                }
            }
        }
        Ok(stack)
    }
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

/// A failed file system call. Errors no retry can change — a name too long once below the
/// staging directory, too many hard links to one file — are the archive's fault: refusals,
/// so the same bytes are not fetched again.
fn io_err(path: &Path, source: io::Error) -> ExtractError {
    match source.kind() {
        io::ErrorKind::InvalidFilename | io::ErrorKind::TooManyLinks => ExtractError::Refused {
            path: path.display().to_string(),
            why: source.to_string(),
        },
        _ => ExtractError::Io {
            path: path.to_path_buf(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(root: &Path) -> Walk<'_> {
        Walk {
            root,
            follows: 0,
            lookups: 0,
            cancelled: &|| false,
        }
    }

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
        assert!(walk(&root).resolve(vec![], Path::new("d/..")).is_err());
        assert!(walk(&root).resolve(vec![], Path::new("d/x")).is_ok());
    }

    #[test]
    fn link_loop_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("b", dir.path().join("a")).unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("b")).unwrap();
        assert!(walk(dir.path()).resolve(vec![], Path::new("a")).is_err());
    }

    #[test]
    fn doubling_link_chains_stop_at_the_follow_budget() {
        // l0 -> ., lk -> l(k-1)/l(k-1): a depth bound alone lets link k cost 2^k lookups.
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(".", dir.path().join("l0")).unwrap();
        for k in 1..48 {
            let prev = format!("l{}", k - 1);
            std::os::unix::fs::symlink(format!("{prev}/{prev}"), dir.path().join(format!("l{k}")))
                .unwrap();
        }
        let mut w = walk(dir.path());
        assert!(w.resolve(vec![], Path::new("l47")).is_err());
        assert!(w.follows <= MAX_LINK_FOLLOWS + 1, "{}", w.follows);
        assert!(w.lookups < 1000, "{}", w.lookups);
    }
}
