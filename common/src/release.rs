//! The release manifest (`aether.dev/format: manifest`): one signed statement naming every
//! file of a release by its SHA-256, so only changed files need to travel while every byte
//! stays verified. This module parses it (canonical bytes only), checks it against the
//! safe-extraction rules before any blob is fetched, and checks it against replay.
//!
//! Canonical form: JSON with keys sorted, entries sorted by path, no insignificant
//! whitespace. The release digest is the SHA-256 of exactly those bytes, so a manifest is
//! accepted only if re-serializing it gives the same bytes: one release, one digest.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::Digest;

mod against;
pub mod delta;

pub use against::SharedEnds;

/// Largest manifest accepted (about 400,000 entries of typical length).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// Most entries in one manifest.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Longest path and symlink target, and longest path component (Linux's limits).
pub const MAX_PATH: usize = 4096;
pub const MAX_COMPONENT: usize = 255;
/// Symlinks followed in resolving one link (the kernel's own limit).
const MAX_FOLLOWS: u32 = 40;
/// Path lookups for resolving every symlink of one manifest.
const MAX_LOOKUPS: u64 = 1_000_000;

/// The batched blob download, relative to a manifest's `blobs` prefix: `POST` a
/// [`BlobBatchRequest`], get back an uncompressed tar whose entries are the blobs, in the
/// order asked, each a regular file named `sha256:<hex>`. One request for many small files
/// instead of one each: a first release of a `node_modules`-like tree is tens of thousands
/// of blobs. Stores without it (a plain file server) answer 404 or 405, and the fetcher
/// then fetches those blobs one by one.
pub const BLOB_BATCH_PATH: &str = "download";
/// Most blobs in one batched download.
pub const MAX_BLOB_BATCH: usize = 4096;
/// Most bytes of blob content in one batched download (the store refuses more, 413).
pub const MAX_BLOB_BATCH_BYTES: u64 = 256 << 20;

/// The body of a batched blob download: digests (`sha256:<hex>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobBatchRequest {
    pub digests: Vec<String>,
}

/// What one entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    File,
    Dir,
    Symlink,
}

/// One path of the release. Fields are in alphabetical order: that order is the
/// canonical key order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub mode: u32,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(rename = "type")]
    pub kind: EntryType,
}

/// A release manifest. Fields in alphabetical order (canonical key order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The app the release is for (a fetcher refuses another app's release).
    pub app: String,
    /// URL prefix of the content store; blob `sha256:<hex>` is at `<blobs>sha256:<hex>`,
    /// resolved against the manifest's own URL when relative.
    pub blobs: String,
    /// RFC 3339.
    pub created_at: String,
    /// Shared: a save's manifest differs from the one before it in a few entries, and
    /// takes the others from it without copying them (40,000 files: 320 kB of pointers,
    /// not 10 MB of strings).
    pub entries: Vec<Arc<Entry>>,
    /// RFC 3339; after it the release is refused (reason `expired`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Increases with every release of the app; a fetcher never goes back.
    pub seq: u64,
}

/// Why a manifest is refused. `Invalid` maps to the failure reason `extract` (the
/// safe-extraction rules), `Replay` and `Expired` to `replay` and `expired`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest: {0}")]
    Invalid(String),
    #[error("replay: {0}")]
    Replay(String),
    #[error("expired: {0}")]
    Expired(String),
}

fn invalid(msg: impl Into<String>) -> ManifestError {
    ManifestError::Invalid(msg.into())
}

impl Manifest {
    /// The canonical bytes (what is hashed and signed).
    pub fn to_canonical(&self) -> Vec<u8> {
        // Serializing plain structs of strings and integers cannot fail.
        if self.is_sorted() {
            return serde_json::to_vec(self).unwrap_or_default();
        }
        let mut sorted = self.clone();
        sorted.entries.sort_by(|a, b| a.path.cmp(&b.path));
        serde_json::to_vec(&sorted).unwrap_or_default()
    }

    /// The entries in path order (sorted only when they are not already, as parsed
    /// manifests are), duplicates side by side.
    pub fn in_path_order(&self) -> Vec<&Entry> {
        let mut sorted: Vec<&Entry> = self.entries.iter().map(Arc::as_ref).collect();
        if !sorted.is_sorted_by(|a, b| a.path <= b.path) {
            sorted.sort_by(|a, b| a.path.cmp(&b.path));
        }
        sorted
    }

    fn is_sorted(&self) -> bool {
        self.entries.windows(2).all(|w| w[0].path < w[1].path)
    }

    /// The release digest: SHA-256 of the canonical bytes.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.to_canonical())
    }

    /// Parses manifest bytes that must already be canonical, and validates them.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(invalid(format!(
                "{} bytes, more than {MAX_MANIFEST_BYTES}",
                bytes.len()
            )));
        }
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("not a manifest: {e}")))?;
        if manifest.entries.len() > MAX_ENTRIES {
            return Err(invalid(format!("more than {MAX_ENTRIES} entries")));
        }
        let (valid, canonical) = manifest.validate_beside(|| is_canonical(&manifest, bytes));
        if !canonical {
            return Err(invalid(
                "not in canonical form (keys sorted, entries sorted by path, no whitespace)",
            ));
        }
        valid?;
        Ok(manifest)
    }

    /// The safe-extraction rules, checked before any blob is fetched: relative paths
    /// without `.`, `..` or empty components, no duplicates, nothing below a file or a
    /// symlink, files with a hash and a size, symlinks that resolve inside the release.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.entries.len() > MAX_ENTRIES {
            return Err(invalid(format!("more than {MAX_ENTRIES} entries")));
        }
        self.validate_header()?;
        for entry in &self.entries {
            check_entry(entry)?;
        }
        let tree = Paths(self.in_path_order());
        if let Some(w) = tree.0.windows(2).find(|w| w[0].path == w[1].path) {
            return Err(invalid(format!("{}: duplicate path", w[0].path)));
        }
        // Every parent is a directory of the manifest: nothing may live below a file or a
        // symlink (writing `a/b` where `a` is a link would write wherever `a` points), and
        // a release is exactly its entries (a patch that removes `a` removes `a/b`).
        // Siblings are side by side in path order: a parent found to be a directory is
        // not looked up again for the next entry (one comparison instead of a search).
        let mut checked = "";
        for path in tree.0.iter().map(|e| e.path.as_str()) {
            if let Some((parent, _)) = path.rsplit_once('/') {
                if parent == checked {
                    continue;
                }
                match tree.get(parent) {
                    Some(e) if e.kind == EntryType::Dir => checked = parent,
                    Some(_) => {
                        return Err(invalid(format!(
                            "{path}: below {parent}, which is not a directory"
                        )));
                    }
                    None => {
                        return Err(invalid(format!(
                            "{path}: its directory {parent} is not an entry"
                        )));
                    }
                }
            }
        }
        let mut lookups = 0u64;
        for entry in tree.0.iter().filter(|e| e.kind == EntryType::Symlink) {
            let parent: Vec<&str> = match entry.path.rsplit_once('/') {
                Some((dir, _)) => dir.split('/').collect(),
                None => Vec::new(),
            };
            let mut follows = 0;
            resolve(
                &tree,
                parent,
                entry.target.as_deref().unwrap_or(""),
                &mut follows,
                &mut lookups,
            )
            .map_err(|why| invalid(format!("{}: symlink {why}", entry.path)))?;
        }
        Ok(())
    }

    /// The rules on the fields other than `entries`.
    fn validate_header(&self) -> Result<(), ManifestError> {
        if self.app.is_empty() || self.app.len() > 253 {
            return Err(invalid("app must be a name of 1 to 253 characters"));
        }
        check_time("created_at", &self.created_at)?;
        if let Some(t) = &self.expires_at {
            check_time("expires_at", t)?;
        }
        Ok(())
    }

    /// `validate`, and `work` beside it: on another core for a large manifest (each of
    /// the callers' checks, serializations and hashes takes milliseconds at 40,000
    /// entries, and they only read the manifest). A check that panicked has not passed.
    pub fn validate_beside<T: Send>(
        &self,
        work: impl FnOnce() -> T + Send,
    ) -> (Result<(), ManifestError>, T) {
        if self.entries.len() < PARALLEL_CHECKS {
            return (self.validate(), work());
        }
        std::thread::scope(|s| {
            let validating = s.spawn(|| self.validate());
            let done = work();
            let valid = validating
                .join()
                .unwrap_or_else(|_| Err(invalid("validation failed")));
            (valid, done)
        })
    }

    /// Replay and freshness: the release must be for `app`, newer than the highest `seq`
    /// made live (or that same release again), and not expired at `now`.
    pub fn check_fresh(
        &self,
        app: &str,
        last: Option<(u64, Digest)>,
        now: jiff::Timestamp,
    ) -> Result<(), ManifestError> {
        if self.app != app {
            return Err(ManifestError::Replay(format!(
                "the release is for app {:?}, this pod runs {app:?}",
                self.app
            )));
        }
        if let Some((seq, digest)) = last {
            // Hashed only when it decides: the same `seq` again.
            if self.seq < seq || (self.seq == seq && self.digest() != digest) {
                return Err(ManifestError::Replay(format!(
                    "seq {} is not newer than {seq}, the highest made live",
                    self.seq
                )));
            }
        }
        if let Some(expires) = &self.expires_at {
            let at: jiff::Timestamp = expires
                .parse()
                .map_err(|e| invalid(format!("expires_at: {e}")))?;
            if now >= at {
                return Err(ManifestError::Expired(format!(
                    "the release expired at {expires}"
                )));
            }
        }
        Ok(())
    }
}

/// A manifest's entries in path order, looked up by path with a binary search: a
/// 40,000-entry manifest is checked in a few milliseconds, where a map of every path cost
/// more than the rest of a refresh.
struct Paths<'a>(Vec<&'a Entry>);

impl<'a> Paths<'a> {
    fn get(&self, path: &str) -> Option<&'a Entry> {
        let i = self
            .0
            .binary_search_by(|e| e.path.as_str().cmp(path))
            .ok()?;
        Some(self.0[i])
    }
}

/// Manifests with at least this many entries are checked on two threads.
pub const PARALLEL_CHECKS: usize = 4096;

/// Whether `bytes` are exactly `manifest`'s canonical form. Compared as it is written: no
/// second copy of a large manifest in memory.
fn is_canonical(manifest: &Manifest, bytes: &[u8]) -> bool {
    use std::io::Write;
    // Buffered: compared in blocks, not token by token.
    let mut same = std::io::BufWriter::with_capacity(64 << 10, SameBytes { rest: bytes });
    manifest.is_sorted()
        && serde_json::to_writer(&mut same, manifest).is_ok()
        && same.flush().is_ok()
        && same.get_ref().rest.is_empty()
}

/// A writer that accepts exactly the bytes it was given, in order (and fails otherwise).
struct SameBytes<'a> {
    rest: &'a [u8],
}

impl std::io::Write for SameBytes<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.rest.split_at_checked(buf.len()) {
            Some((head, rest)) if same(head, buf) => {
                self.rest = rest;
                Ok(buf.len())
            }
            _ => Err(std::io::Error::other("differs")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Equal slices of equal length, compared a word at a time: the canonical check makes
/// one comparison per token, and musl's byte-by-byte `memcmp` made it cost more than the
/// serialization it checks.
fn same(a: &[u8], b: &[u8]) -> bool {
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tails = a8.remainder() == b8.remainder();
    tails
        && a8.zip(b8).all(|(x, y)| {
            u64::from_ne_bytes(x.try_into().unwrap_or_default())
                == u64::from_ne_bytes(y.try_into().unwrap_or_default())
        })
}

/// 64 lowercase hex digits (what `Digest::from_hex` accepts), checked without decoding:
/// a large manifest has tens of thousands.
fn is_hex_digest(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_time(field: &str, value: &str) -> Result<(), ManifestError> {
    value
        .parse::<jiff::Timestamp>()
        .map(|_| ())
        .map_err(|e| invalid(format!("{field} {value:?} is not an RFC 3339 time: {e}")))
}

/// The rules on one entry alone: its path, and the fields its type has.
fn check_entry(entry: &Entry) -> Result<(), ManifestError> {
    check_path(&entry.path)?;
    match entry.kind {
        EntryType::File => {
            if !entry.sha256.as_deref().is_some_and(is_hex_digest) {
                return Err(invalid(format!("{}: sha256 must be 64 hex", entry.path)));
            }
            if entry.size.is_none() || entry.target.is_some() {
                return Err(invalid(format!(
                    "{}: a file has a size and no target",
                    entry.path
                )));
            }
        }
        EntryType::Dir => {
            if entry.sha256.is_some() || entry.size.is_some() || entry.target.is_some() {
                return Err(invalid(format!(
                    "{}: a directory has no sha256, size or target",
                    entry.path
                )));
            }
        }
        EntryType::Symlink => {
            let target = entry.target.as_deref().unwrap_or("");
            if target.is_empty() || target.len() > MAX_PATH || target.contains('\0') {
                return Err(invalid(format!("{}: bad symlink target", entry.path)));
            }
            if entry.sha256.is_some() || entry.size.is_some() {
                return Err(invalid(format!(
                    "{}: a symlink has no sha256 or size",
                    entry.path
                )));
            }
        }
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), ManifestError> {
    if path.is_empty() || path.len() > MAX_PATH || path.contains('\0') {
        return Err(invalid(format!("bad path {path:?}")));
    }
    for component in path.split('/') {
        if matches!(component, "" | "." | "..") || component.len() > MAX_COMPONENT {
            return Err(invalid(format!(
                "{path:?}: paths are relative, without empty, `.` or `..` components"
            )));
        }
    }
    Ok(())
}

/// Resolves `target` from the directory `dir` (components from the release root) through
/// the manifest's own symlinks, as the kernel would once the release is on disk; fails if
/// the walk ever leaves the release.
fn resolve<'a>(
    tree: &Paths<'a>,
    mut dir: Vec<&'a str>,
    target: &'a str,
    follows: &mut u32,
    lookups: &mut u64,
) -> Result<Vec<&'a str>, String> {
    if target.starts_with('/') {
        return Err(format!("target {target:?} is absolute"));
    }
    for component in target.split('/') {
        *lookups += 1;
        if *lookups > MAX_LOOKUPS {
            return Err("resolution takes too many lookups".into());
        }
        match component {
            "" | "." => {}
            ".." => {
                if dir.pop().is_none() {
                    return Err(format!("target {target:?} leaves the release"));
                }
            }
            name => {
                dir.push(name);
                let joined = dir.join("/");
                if let Some(entry) = tree.get(&joined)
                    && entry.kind == EntryType::Symlink
                {
                    *follows += 1;
                    if *follows > MAX_FOLLOWS {
                        return Err("too many levels of symbolic links".into());
                    }
                    dir.pop();
                    let inner = entry.target.as_deref().unwrap_or("");
                    dir = resolve(tree, dir, inner, follows, lookups)?;
                }
            }
        }
    }
    Ok(dir)
}

/// The mode a file gets: the owner's bits and group/other read and execute; no setuid,
/// setgid, sticky or group/other write.
pub fn file_mode(mode: u32) -> u32 {
    mode & 0o755
}

/// As `file_mode`, but the owner keeps full access so the release can be pruned.
pub fn dir_mode(mode: u32) -> u32 {
    (mode & 0o755) | 0o700
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn file(path: &str, content: impl AsRef<[u8]>) -> Entry {
        let content = content.as_ref();
        Entry {
            mode: 0o644,
            path: path.into(),
            sha256: Some(Digest::of(content).hex()),
            size: Some(content.len() as u64),
            target: None,
            kind: EntryType::File,
        }
    }

    pub(super) fn dir(path: &str) -> Entry {
        Entry {
            mode: 0o755,
            path: path.into(),
            sha256: None,
            size: None,
            target: None,
            kind: EntryType::Dir,
        }
    }

    pub(super) fn link(path: &str, target: &str) -> Entry {
        Entry {
            mode: 0o777,
            path: path.into(),
            sha256: None,
            size: None,
            target: Some(target.into()),
            kind: EntryType::Symlink,
        }
    }

    fn manifest(entries: Vec<Entry>) -> Manifest {
        Manifest {
            app: "web".into(),
            blobs: "../blobs/".into(),
            created_at: "2026-11-30T05:00:00Z".into(),
            entries: entries.into_iter().map(Arc::new).collect(),
            expires_at: None,
            seq: 7,
        }
    }

    fn refused(entries: Vec<Entry>) -> String {
        match manifest(entries).validate() {
            Err(ManifestError::Invalid(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn canonical_bytes_round_trip_and_anything_else_is_refused() {
        let m = manifest(vec![file("b.txt", b"b"), dir("a"), file("a/x", b"x")]);
        let bytes = m.to_canonical();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.starts_with(r#"{"app":"web","blobs":"../blobs/","created_at":"#),
            "{text}"
        );
        assert!(text.find("\"a/x\"").unwrap() < text.find("\"b.txt\"").unwrap());
        let parsed = Manifest::parse(&bytes).unwrap();
        assert_eq!(parsed.digest(), Digest::of(&bytes));
        let pretty = serde_json::to_vec_pretty(&parsed).unwrap();
        assert!(
            Manifest::parse(&pretty).is_err(),
            "whitespace changes the digest"
        );
        let unknown = text.replacen("{\"app\"", "{\"admin\":true,\"app\"", 1);
        assert!(Manifest::parse(unknown.as_bytes()).is_err());
    }

    #[test]
    fn unsafe_paths_are_refused_before_anything_is_fetched() {
        for bad in ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", ""] {
            let why = refused(vec![file(bad, b"x")]);
            assert!(
                why.contains("path") || why.contains("relative"),
                "{bad}: {why}"
            );
        }
        assert!(refused(vec![file("a", b"1"), file("a", b"2")]).contains("duplicate"));
        assert!(refused(vec![file("a", b"1"), file("a/b", b"2")]).contains("not a directory"));
        assert!(refused(vec![file("a/b", b"2")]).contains("is not an entry"));
        assert!(
            refused(vec![link("a", "d"), dir("d"), file("a/b", b"2")]).contains("not a directory")
        );
        let mut no_hash = file("a", b"1");
        no_hash.sha256 = Some("zz".into());
        assert!(refused(vec![no_hash]).contains("64 hex"));
    }

    #[test]
    fn symlinks_must_resolve_inside_the_release_through_other_links_too() {
        assert!(
            manifest(vec![dir("d"), file("d/f", b"1"), link("l", "d/f")])
                .validate()
                .is_ok()
        );
        assert!(
            manifest(vec![dir("d"), link("d/up", "../x")])
                .validate()
                .is_ok()
        );
        assert!(refused(vec![link("l", "/etc/passwd")]).contains("absolute"));
        assert!(refused(vec![link("l", "../outside")]).contains("leaves"));
        // Lexically inside, physically outside: `self` is the root, so `self/..` is above it.
        assert!(refused(vec![link("self", "."), link("l", "self/../etc")]).contains("leaves"));
        // Through a chain of links.
        assert!(
            refused(vec![dir("a"), link("a/up", ".."), link("b", "a/up/..")]).contains("leaves")
        );
        let why = refused(vec![link("x", "y"), link("y", "x")]);
        assert!(why.contains("too many levels"), "{why}");
    }

    #[test]
    fn replay_and_expiry_are_refused_with_their_own_reasons() {
        let now: jiff::Timestamp = "2026-11-30T06:00:00Z".parse().unwrap();
        let m = manifest(vec![file("f", b"1")]);
        assert!(m.check_fresh("web", None, now).is_ok());
        assert!(matches!(
            m.check_fresh("api", None, now),
            Err(ManifestError::Replay(_))
        ));
        assert!(matches!(
            m.check_fresh("web", Some((8, Digest::of(b"other"))), now),
            Err(ManifestError::Replay(_))
        ));
        assert!(matches!(
            m.check_fresh("web", Some((7, Digest::of(b"other"))), now),
            Err(ManifestError::Replay(_))
        ));
        assert!(
            m.check_fresh("web", Some((7, m.digest())), now).is_ok(),
            "the same release again"
        );
        assert!(
            m.check_fresh("web", Some((6, Digest::of(b"older"))), now)
                .is_ok()
        );
        let mut expiring = m.clone();
        expiring.expires_at = Some("2026-11-30T05:59:59Z".into());
        assert!(matches!(
            expiring.check_fresh("web", None, now),
            Err(ManifestError::Expired(_))
        ));
    }

    #[test]
    fn modes_lose_special_bits_and_group_other_write() {
        assert_eq!(file_mode(0o4777), 0o755);
        assert_eq!(file_mode(0o644), 0o644);
        assert_eq!(dir_mode(0o500), 0o700);
    }
}
