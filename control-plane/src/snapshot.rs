//! The release manifest of a source directory: the files `pack` would archive, each named
//! by its SHA-256, in the canonical form the fetcher verifies. A per-directory cache of
//! (size, mtime, ctime, inode) → hash means a save re-hashes only the files that changed,
//! and with the file watcher's `Changes` a save stats only the paths it reported, patching
//! the last snapshot instead of walking the whole tree.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aether_common::release::{Entry, EntryType, Manifest, PARALLEL_CHECKS};
use aether_common::{Digest, Sha256Writer};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::pack;

/// Where blobs are relative to the manifest: the control plane serves both under
/// `/v1/blobs/`, so the manifest's own directory.
pub const BLOBS_BESIDE: &str = "./";

/// A manifest of a tree, with where each blob's bytes are on disk.
pub struct Snapshot {
    /// Shared with the directory's state, which patches it in place at the next save once
    /// this snapshot is dropped.
    pub manifest: Arc<Manifest>,
    /// The canonical bytes (the manifest blob), shared with the directory's state (the
    /// next save serializes against them).
    pub bytes: bytes::Bytes,
    pub digest: Digest,
    /// The hash of the entries alone: equal for two snapshots of the same tree, whatever
    /// their `seq` and time.
    pub tree: Digest,
    /// Each distinct file hash, with one path holding those bytes and their size.
    pub blobs: Arc<Blobs>,
    /// Files hashed for this snapshot (the rest came from the cache).
    pub hashed: usize,
    /// Whether the whole tree was walked (else the last snapshot was patched).
    pub walked: bool,
    /// The digest of the snapshot this one patched (`None` after a walk)...
    pub patched_from: Option<Digest>,
    /// ...and the blobs the patch added to that snapshot's (the only ones it may lack).
    pub added: Vec<Digest>,
}

impl Snapshot {
    /// The release's files, as a count.
    pub fn files(&self) -> usize {
        self.manifest
            .entries
            .iter()
            .filter(|e| e.kind == EntryType::File)
            .count()
    }
}

/// Each distinct file hash, with one path holding those bytes and their size.
pub type Blobs = BTreeMap<Digest, (PathBuf, u64)>;

/// A file's identity as far as the cache is concerned: any change to its bytes through
/// the file system changes at least one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Self {
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cached {
    stamp: Stamp,
    /// Kept as a digest, not hex: a save of a large tree looks up every file.
    sha256: Digest,
    /// When the hash was taken: a file modified in the same instant it was hashed (within
    /// the file system's timestamp granularity) could change without its stamp changing,
    /// so such an entry is not trusted (git's "racily clean" rule).
    hashed_ns: i128,
}

/// The hash cache of one source directory, kept under the user's cache directory (never
/// in the tree itself, which the watcher would see).
#[derive(Default)]
pub struct HashCache {
    file: Option<PathBuf>,
    entries: HashMap<String, Cached>,
    /// When it was last written by `take`.
    saved_at: Option<std::time::Instant>,
    /// The last snapshot, the base the next one patches (memory only).
    last: Option<Last>,
    /// The next save walks the tree whatever changed: a directory was new, and files
    /// written into it before the watcher watched it have no event.
    walk_again: bool,
}

/// The last snapshot of a directory, as a base to patch.
struct Last {
    digest: Digest,
    manifest: Arc<Manifest>,
    /// The manifest's canonical bytes.
    bytes: bytes::Bytes,
    blobs: Arc<Blobs>,
    tree: Digest,
    /// The ignore files above the directory, which the walk reads and the watcher does
    /// not watch, as they were then.
    above: Vec<Option<Stamp>>,
}

/// The ignore files of `dir`'s ancestors, as the walk reads them (following links).
fn ignore_files_above(dir: &Path) -> Vec<Option<Stamp>> {
    let Ok(absolute) = std::path::absolute(dir) else {
        return Vec::new();
    };
    absolute
        .ancestors()
        .skip(1)
        .flat_map(|a| IGNORE_FILES.iter().map(move |f| a.join(f)))
        .map(|f| fs::metadata(f).ok().map(|m| Stamp::of(&m)))
        .collect()
}

/// `take` writes the cache at most this often: writing a large tree's cache costs tens of
/// milliseconds of CPU beside the save it follows, and what a loop stopped in between
/// did not write costs only hashing those files again.
const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Entries hashed this close to their modification are re-hashed next time.
const RACY_NS: i128 = 2_000_000_000;

impl HashCache {
    /// The cache of `dir` (empty when there is none or it cannot be read).
    pub fn load(dir: &Path) -> Self {
        let file = cache_file(dir);
        let entries = file
            .as_ref()
            .and_then(|f| fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            file,
            entries,
            saved_at: None,
            last: None,
            walk_again: false,
        }
    }

    fn hash(
        &mut self,
        rel: &str,
        full: &Path,
        meta: &fs::Metadata,
    ) -> anyhow::Result<(Digest, bool)> {
        let stamp = Stamp::of(meta);
        if let Some(c) = self.entries.get(rel)
            && c.stamp == stamp
            && c.hashed_ns - stamp.mtime_ns.max(stamp.ctime_ns) > RACY_NS
        {
            return Ok((c.sha256, false));
        }
        let hashed_ns = now_ns();
        let digest = hash_file(full)?;
        self.entries.insert(
            rel.to_owned(),
            Cached {
                stamp,
                sha256: digest,
                hashed_ns,
            },
        );
        Ok((digest, true))
    }
}

/// Writes the cache (atomically); a failure only costs re-hashing next time.
fn save_entries(file: Option<&Path>, entries: &HashMap<String, Cached>) {
    let Some(file) = file else { return };
    let write = || -> std::io::Result<()> {
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent)?;
        }
        let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
        fs::write(&tmp, serde_json::to_vec(entries)?)?;
        fs::rename(&tmp, file)
    };
    if let Err(e) = write() {
        tracing::debug!(error = %e, "could not save the hash cache");
    }
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// `$XDG_CACHE_HOME/aether/trees/<sha256 of the directory's path>.json`, or under
/// `$HOME/.cache`.
fn cache_file(dir: &Path) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let abs = fs::canonicalize(dir).ok()?;
    let key = Digest::of(abs.as_os_str().as_encoded_bytes()).hex();
    Some(
        base.join("aether")
            .join("trees")
            .join(format!("{}.json", &key[..32])),
    )
}

fn hash_file(path: &Path) -> anyhow::Result<Digest> {
    let mut file = fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Sha256Writer::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

/// What a snapshot is for.
#[derive(Debug, Clone)]
pub struct Release {
    pub app: String,
    pub seq: u64,
    /// After it, fetchers refuse the release (`expired`).
    pub expires_at: Option<jiff::Timestamp>,
}

/// Paths the file watcher saw change since the last snapshot took them. Shared between
/// the watcher's thread, which marks them, and the save, which takes them all at its start:
/// a change seen after that is kept for the next save, so none is lost.
#[derive(Clone, Default)]
pub struct Changes(Arc<Mutex<Pending>>);

#[derive(Default)]
struct Pending {
    paths: HashSet<PathBuf>,
    /// Too many paths, or events lost (the watcher's queue overflowed): walk everything.
    everything: bool,
}

/// Past this many changed paths a save walks the tree: as fast by then, and the set stays
/// bounded whatever a build or a `git checkout` does to the tree.
const MAX_CHANGED: usize = 4096;

/// Files whose change can change which paths a release holds.
const IGNORE_FILES: &[&str] = &[".gitignore", ".ignore", ".aetherignore"];

impl Changes {
    /// Records paths the watcher reported.
    pub fn mark(&self, paths: impl IntoIterator<Item = PathBuf>) {
        let Ok(mut p) = self.0.lock() else { return };
        if p.everything {
            return;
        }
        p.paths.extend(paths);
        if p.paths.len() > MAX_CHANGED {
            p.everything = true;
            p.paths = HashSet::new();
        }
    }

    /// Records that changes may have been missed: the next save walks the whole tree.
    pub fn mark_everything(&self) {
        if let Ok(mut p) = self.0.lock() {
            p.everything = true;
            p.paths = HashSet::new();
        }
    }

    /// The paths marked since the last call; `None` when the whole tree must be walked.
    fn take(&self) -> Option<HashSet<PathBuf>> {
        let mut p = self.0.lock().ok()?;
        let taken = std::mem::take(&mut *p);
        (!taken.everything).then_some(taken.paths)
    }
}

/// One path of the tree as a manifest entry, with its blob for a file; `None` for what a
/// release does not hold (sockets, FIFOs, devices, as in `pack`).
fn entry_of(
    rel: &str,
    full: &Path,
    meta: &fs::Metadata,
    cache: &mut HashCache,
    hashed: &mut usize,
) -> anyhow::Result<Option<(Entry, Option<Digest>)>> {
    let ft = meta.file_type();
    let entry = if ft.is_symlink() {
        let target = fs::read_link(full)?;
        let target = target
            .to_str()
            .with_context(|| format!("the target of {} is not UTF-8", full.display()))?;
        Entry {
            mode: 0o777,
            path: rel.to_owned(),
            sha256: None,
            size: None,
            target: Some(target.to_owned()),
            kind: EntryType::Symlink,
        }
    } else if ft.is_dir() {
        Entry {
            mode: 0o755,
            path: rel.to_owned(),
            sha256: None,
            size: None,
            target: None,
            kind: EntryType::Dir,
        }
    } else if ft.is_file() {
        let (digest, fresh) = cache.hash(rel, full, meta)?;
        *hashed += usize::from(fresh);
        let entry = Entry {
            mode: if meta.mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            },
            path: rel.to_owned(),
            sha256: Some(digest.hex()),
            size: Some(meta.len()),
            target: None,
            kind: EntryType::File,
        };
        return Ok(Some((entry, Some(digest))));
    } else {
        return Ok(None);
    };
    Ok(Some((entry, None)))
}

/// Builds the manifest of `dir` with the same files as `pack::pack` and the same modes
/// (0755 for an executable file, else 0644; 0755 for directories).
pub fn snapshot(dir: &Path, cache: &mut HashCache, release: &Release) -> anyhow::Result<Snapshot> {
    cache.last = None;
    // Read before the walk reads them: a change from here on is seen by the next save.
    let above = ignore_files_above(dir);
    let mut entries = Vec::new();
    let mut blobs = Blobs::new();
    let mut hashed = 0;
    for rel in pack::walk(dir)? {
        let path = rel
            .to_str()
            .with_context(|| format!("{} is not UTF-8", rel.display()))?;
        let full = dir.join(&rel);
        let meta =
            fs::symlink_metadata(&full).with_context(|| format!("reading {}", full.display()))?;
        let Some((entry, digest)) = entry_of(path, &full, &meta, cache, &mut hashed)? else {
            continue;
        };
        if let Some(digest) = digest {
            blobs.entry(digest).or_insert((full, meta.len()));
        }
        entries.push(Arc::new(entry));
    }
    // Files deleted since the last snapshot leave the cache too.
    let live: HashSet<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    cache.entries.retain(|k, _| live.contains(k.as_str()));
    let manifest = Manifest {
        app: String::new(),
        blobs: BLOBS_BESIDE.to_owned(),
        created_at: String::new(),
        entries,
        expires_at: None,
        seq: 0,
    };
    let read = Found {
        blobs,
        tree: None,
        above,
        hashed,
        patched_from: None,
        added: Vec::new(),
        known: None,
    };
    finish(dir, cache, manifest, read, release).map(|s| Snapshot { walked: true, ..s })
}

/// What reading the tree found besides its entries.
struct Found {
    blobs: Blobs,
    /// The entries' hash, when known to be unchanged.
    tree: Option<Digest>,
    above: Vec<Option<Stamp>>,
    hashed: usize,
    /// The snapshot patched, and the blobs the patch added.
    patched_from: Option<Digest>,
    added: Vec<Digest>,
    /// The snapshot patched and its bytes: what the new one is serialized and checked
    /// against.
    known: Option<(Arc<Manifest>, bytes::Bytes)>,
}

/// Stamps the release on the entries, checks and serializes the manifest, and keeps it as
/// the base of the next patch.
fn finish(
    dir: &Path,
    cache: &mut HashCache,
    mut manifest: Manifest,
    read: Found,
    release: &Release,
) -> anyhow::Result<Snapshot> {
    let Found {
        blobs,
        tree,
        above,
        hashed,
        patched_from,
        added,
        known,
    } = read;
    manifest.app = release.app.clone();
    manifest.created_at = jiff::Timestamp::now().to_string();
    manifest.expires_at = release.expires_at.map(|t| t.to_string());
    manifest.seq = release.seq;
    let (valid, (bytes, digest, tree)) = match &known {
        // A patch: the entries it left are copied from the known bytes and not checked
        // again (a one-file save of 40,000 files: ~5 ms instead of ~20).
        Some((known, known_bytes)) => {
            let bytes = manifest.to_canonical_against(known, known_bytes);
            debug_assert_eq!(bytes, manifest.to_canonical());
            let valid = manifest.validate_against(&bytes, known, known_bytes);
            let (digest, tree) = hash_both(&manifest, &bytes, tree);
            (valid, (bytes, digest, tree))
        }
        // Checked, serialized and hashed twice (the release, the entries): for a large
        // tree each takes milliseconds, and they share nothing but the manifest, so they
        // run on two cores at once.
        None => manifest.validate_beside(|| {
            let bytes = manifest.to_canonical();
            let (digest, tree) = hash_both(&manifest, &bytes, tree);
            (bytes, digest, tree)
        }),
    };
    drop(known);
    if let Err(e) = valid {
        bail!("{} cannot be released: {e}", dir.display());
    }
    let tree = tree?;
    let (manifest, blobs) = (Arc::new(manifest), Arc::new(blobs));
    let bytes = bytes::Bytes::from(bytes);
    cache.last = Some(Last {
        digest,
        manifest: manifest.clone(),
        bytes: bytes.clone(),
        blobs: blobs.clone(),
        tree,
        above,
    });
    Ok(Snapshot {
        manifest,
        bytes,
        digest,
        tree,
        blobs,
        hashed,
        walked: false,
        patched_from,
        added,
    })
}

/// The release digest of `bytes` and the tree digest (`known`, or hashed beside it).
fn hash_both(
    manifest: &Manifest,
    bytes: &[u8],
    known: Option<Digest>,
) -> (Digest, anyhow::Result<Digest>) {
    match known {
        Some(t) => (Digest::of(bytes), Ok(t)),
        None if manifest.entries.len() >= PARALLEL_CHECKS => std::thread::scope(|s| {
            let hashing = s.spawn(|| tree_of(manifest, bytes));
            let digest = Digest::of(bytes);
            let tree = hashing
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("hashing the tree failed")));
            (digest, tree)
        }),
        None => (Digest::of(bytes), tree_of(manifest, bytes)),
    }
}

/// The hash of the entries' JSON, read from the canonical bytes where they are a slice
/// (serializing a large tree's entries a second time costs tens of milliseconds).
fn tree_of(manifest: &Manifest, canonical: &[u8]) -> anyhow::Result<Digest> {
    let bare = Manifest {
        app: manifest.app.clone(),
        blobs: manifest.blobs.clone(),
        created_at: manifest.created_at.clone(),
        entries: Vec::new(),
        expires_at: manifest.expires_at.clone(),
        seq: manifest.seq,
    }
    .to_canonical();
    const EMPTY: &[u8] = br#""entries":[]"#;
    if let Some(at) = bare.windows(EMPTY.len()).position(|w| w == EMPTY) {
        let (head, tail) = (&bare[..at + EMPTY.len() - 2], &bare[at + EMPTY.len()..]);
        if canonical.len() >= head.len() + tail.len()
            && canonical.starts_with(head)
            && canonical.ends_with(tail)
        {
            return Ok(Digest::of(
                &canonical[head.len()..canonical.len() - tail.len()],
            ));
        }
    }
    Ok(Digest::of(&serde_json::to_vec(&manifest.entries)?))
}

/// The snapshot of `dir` as the last one with `changed` (the watcher's paths) looked at
/// again; `Ok(None)` when only a walk of the whole tree can tell: a path whose kind
/// changed, a directory created, removed or touched, a new file in a released directory
/// (an ignore rule may exclude it), an ignore file changed, a path outside `dir`.
fn patch(
    dir: &Path,
    cache: &mut HashCache,
    changed: HashSet<PathBuf>,
    release: &Release,
) -> anyhow::Result<Option<Snapshot>> {
    // Taken, not borrowed: a patch that fails half-way leaves no base, so the next save
    // walks the whole tree.
    let Some(Last {
        digest: base,
        manifest,
        bytes,
        blobs,
        tree,
        above,
    }) = cache.last.take()
    else {
        return Ok(None);
    };
    if ignore_files_above(dir) != above {
        return Ok(None);
    }
    // The watcher names paths under the absolute form of a relative `dir`.
    let absolute = std::path::absolute(dir)?;
    let mut rels = Vec::with_capacity(changed.len());
    for path in &changed {
        let Ok(rel) = path
            .strip_prefix(dir)
            .or_else(|_| path.strip_prefix(&absolute))
        else {
            return Ok(None);
        };
        let skipped =
            |c: std::path::Component<'_>| pack::ALWAYS_SKIPPED.iter().any(|s| c.as_os_str() == *s);
        if rel.as_os_str().is_empty() || rel.components().any(skipped) {
            continue;
        }
        let Some(rel) = rel.to_str() else {
            return Ok(None);
        };
        if rel
            .rsplit('/')
            .next()
            .is_some_and(|n| IGNORE_FILES.contains(&n))
        {
            return Ok(None);
        }
        rels.push(rel);
    }
    rels.sort_unstable();
    // Kept to serialize and check against: the entries the patch leaves are the same
    // `Arc`s in both.
    let known = (manifest.clone(), bytes);
    let mut manifest = Arc::unwrap_or_clone(manifest);
    let mut blobs = Arc::unwrap_or_clone(blobs);
    let find =
        |entries: &[Arc<Entry>], rel: &str| entries.binary_search_by(|e| e.path.as_str().cmp(rel));
    let mut hashed = 0;
    let mut dirty = false;
    let mut added = Vec::new();
    for rel in rels {
        let full = dir.join(rel);
        let meta = match fs::symlink_metadata(&full) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(_) => return Ok(None),
        };
        let at = find(&manifest.entries, rel);
        let (i, meta) = match (at, meta) {
            // Came and went (an editor's temporary file).
            (Err(_), None) => continue,
            (Err(_), Some(meta)) => {
                if meta.is_dir() {
                    cache.walk_again = true;
                    return Ok(None);
                }
                // Under a directory the release does not hold, a walk would not list it
                // either: that directory is ignored, or new and walked for its own event.
                match rel.rsplit_once('/') {
                    Some((parent, _)) if find(&manifest.entries, parent).is_err() => continue,
                    _ => return Ok(None),
                }
            }
            (Ok(i), meta) => (i, meta),
        };
        let old = &manifest.entries[i];
        if old.kind == EntryType::Dir {
            return Ok(None);
        }
        let old_blob = old.sha256.as_deref().map(Digest::from_hex).transpose()?;
        let new = match meta {
            None => None,
            Some(meta) => {
                let same_kind = match old.kind {
                    EntryType::File => meta.file_type().is_file(),
                    _ => meta.file_type().is_symlink(),
                };
                // Another link to the same file changes with it, unreported.
                if !same_kind || meta.nlink() > 1 && meta.is_file() {
                    return Ok(None);
                }
                let Some((entry, digest)) = entry_of(rel, &full, &meta, cache, &mut hashed)? else {
                    return Ok(None);
                };
                if let Some(d) = digest
                    && let std::collections::btree_map::Entry::Vacant(v) = blobs.entry(d)
                {
                    v.insert((full.clone(), meta.len()));
                    added.push(d);
                }
                Some(entry)
            }
        };
        if new.as_ref() == Some(&*manifest.entries[i]) {
            continue;
        }
        dirty = true;
        match new {
            Some(entry) => manifest.entries[i] = Arc::new(entry),
            None => {
                manifest.entries.remove(i);
                cache.entries.remove(rel);
            }
        }
        if let Some(old) = old_blob {
            rehome(&mut blobs, &manifest.entries, old, dir, &full);
        }
    }
    let tree = (!dirty).then_some(tree);
    let read = Found {
        blobs,
        tree,
        above,
        hashed,
        patched_from: Some(base),
        added,
        known: Some(known),
    };
    finish(dir, cache, manifest, read, release).map(Some)
}

/// After the file at `full` stopped holding `old`'s bytes: another file that holds them
/// becomes the blob's source, or the blob leaves the release.
fn rehome(blobs: &mut Blobs, entries: &[Arc<Entry>], old: Digest, dir: &Path, full: &Path) {
    if blobs.get(&old).is_none_or(|(p, _)| p != full) {
        return;
    }
    let hex = old.hex();
    match entries
        .iter()
        .find(|e| e.kind == EntryType::File && e.sha256.as_deref() == Some(hex.as_str()))
    {
        Some(e) => {
            let size = e.size.unwrap_or(0);
            blobs.insert(old, (dir.join(&e.path), size));
        }
        None => {
            blobs.remove(&old);
        }
    }
}

/// `snapshot` off the async runtime, or with `changes` (the directory's watcher) a `patch`
/// of the last one when it can tell. `cache` is the directory's hash cache, loaded on first
/// use and written in the background (off the save's path) after a snapshot that hashed
/// anything, at most every `SAVE_EVERY`.
pub async fn take(
    dir: &Path,
    cache: &mut Option<HashCache>,
    release: Release,
    changes: Option<&Changes>,
) -> anyhow::Result<Snapshot> {
    let held = cache.take();
    let dir = dir.to_path_buf();
    // Taken before the tree is read: what changes from here on is marked for the next save.
    let changed = changes.and_then(Changes::take);
    let (held, snap) = tokio::task::spawn_blocking(move || {
        let mut held = held.unwrap_or_else(|| HashCache::load(&dir));
        let again = std::mem::take(&mut held.walk_again);
        let patched = match changed {
            Some(changed) if !again => patch(&dir, &mut held, changed, &release).transpose(),
            _ => None,
        };
        let snap = patched.unwrap_or_else(|| {
            tracing::debug!(dir = %dir.display(), "walking the whole tree");
            snapshot(&dir, &mut held, &release)
        });
        (held, snap)
    })
    .await?;
    let mut held = held;
    let due = held.saved_at.is_none_or(|t| t.elapsed() >= SAVE_EVERY);
    if snap.as_ref().is_ok_and(|s| s.hashed > 0) && due {
        held.saved_at = Some(std::time::Instant::now());
        let (file, entries) = (held.file.clone(), held.entries.clone());
        tokio::task::spawn_blocking(move || save_entries(file.as_deref(), &entries));
    }
    *cache = Some(held);
    snap
}

/// The `seq` of the next release: milliseconds since the epoch, and always above the
/// previous one (a clock that went back still moves forward).
pub fn next_seq(previous: Option<u64>) -> u64 {
    let now = u64::try_from(now_ns() / 1_000_000).unwrap_or(0);
    previous.map_or(now, |p| now.max(p.saturating_add(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> Release {
        Release {
            app: "web".into(),
            seq: 1,
            expires_at: None,
        }
    }

    #[test]
    fn a_save_rehashes_only_changed_files_and_the_manifest_matches_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir(d.join("lib")).unwrap();
        fs::write(d.join("lib/a.py"), "a").unwrap();
        fs::write(d.join("app.py"), "v1").unwrap();
        std::os::unix::fs::symlink("lib/a.py", d.join("link")).unwrap();
        let mut cache = HashCache::default();
        let one = snapshot(d, &mut cache, &release()).unwrap();
        assert_eq!(one.hashed, 2);
        assert_eq!(one.files(), 2);
        assert_eq!(Manifest::parse(&one.bytes).unwrap().digest(), one.digest);
        let entries = serde_json::to_vec(&one.manifest.entries).unwrap();
        assert_eq!(
            one.tree,
            Digest::of(&entries),
            "the tree is the entries' hash"
        );
        // Stamps older than the racy window are trusted.
        for c in cache.entries.values_mut() {
            c.hashed_ns += 2 * RACY_NS;
        }
        fs::write(d.join("app.py"), "v2").unwrap();
        let two = snapshot(d, &mut cache, &release()).unwrap();
        assert_eq!(two.hashed, 1, "only the edited file is hashed again");
        assert_ne!(one.digest, two.digest);
        let app = two
            .manifest
            .entries
            .iter()
            .find(|e| e.path == "app.py")
            .unwrap();
        assert_eq!(
            app.sha256.as_deref(),
            Some(Digest::of(b"v2").hex().as_str())
        );
        let link = two
            .manifest
            .entries
            .iter()
            .find(|e| e.path == "link")
            .unwrap();
        assert_eq!(link.target.as_deref(), Some("lib/a.py"));
    }

    #[test]
    fn a_link_out_of_the_tree_is_refused_before_anything_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("bad")).unwrap();
        let err = snapshot(dir.path(), &mut HashCache::default(), &release())
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("absolute"), "{err:#}");
    }

    /// A tree with shared blobs, symlinks (one to a directory), an ignored directory and a
    /// nested one.
    fn tree() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("src");
        fs::create_dir_all(d.join("lib/deep")).unwrap();
        fs::create_dir_all(d.join("build")).unwrap();
        fs::create_dir_all(d.join("node_modules/pkg")).unwrap();
        fs::write(d.join(".gitignore"), "build/\n*.log\n").unwrap();
        for i in 0..20 {
            fs::write(d.join(format!("lib/m{i}.js")), format!("same {}", i % 3)).unwrap();
        }
        fs::write(d.join("lib/deep/x.js"), "x").unwrap();
        fs::write(d.join("app.py"), "v1").unwrap();
        std::os::unix::fs::symlink("lib/m1.js", d.join("link")).unwrap();
        // Sorted after `lib`: a watcher that followed it would name `lib`'s events
        // `z-alias/…`.
        std::os::unix::fs::symlink("lib", d.join("z-alias")).unwrap();
        (tmp, d)
    }

    /// One edit of `tree()`: what it does, the paths the watcher reports for it, and
    /// whether patching those paths can tell the result without walking the tree.
    struct Edit {
        what: &'static str,
        paths: &'static [&'static str],
        patched: bool,
        apply: fn(&Path),
    }

    fn write(d: &Path, p: &str, b: &str) {
        fs::write(d.join(p), b).unwrap();
    }

    const EDITS: &[Edit] = &[
        Edit {
            what: "an edit in place",
            paths: &["app.py"],
            patched: true,
            apply: |d| write(d, "app.py", "v2"),
        },
        Edit {
            what: "a temporary file renamed over the original (vim, JetBrains)",
            paths: &["lib/.m0.js.tmp", "lib/m0.js"],
            patched: true,
            apply: |d| {
                write(d, "lib/.m0.js.tmp", "saved atomically");
                fs::rename(d.join("lib/.m0.js.tmp"), d.join("lib/m0.js")).unwrap();
            },
        },
        Edit {
            // m0, then m12 (byte order), held "same 0" for the snapshot.
            what: "the file holding a blob shared with others changed",
            paths: &["lib/m12.js"],
            patched: true,
            apply: |d| write(d, "lib/m12.js", "new"),
        },
        Edit {
            what: "chmod +x",
            paths: &["app.py"],
            patched: true,
            apply: |d| {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(d.join("app.py"), fs::Permissions::from_mode(0o755)).unwrap();
            },
        },
        Edit {
            what: "a symlink pointed elsewhere",
            paths: &["link"],
            patched: true,
            apply: |d| {
                fs::remove_file(d.join("link")).unwrap();
                std::os::unix::fs::symlink("lib/m2.js", d.join("link")).unwrap();
            },
        },
        Edit {
            what: "the file holding a blob shared with others removed",
            paths: &["lib/m11.js"],
            patched: true,
            apply: |d| fs::remove_file(d.join("lib/m11.js")).unwrap(),
        },
        Edit {
            what: "the only file holding a blob removed",
            paths: &["lib/deep/x.js"],
            patched: true,
            apply: |d| fs::remove_file(d.join("lib/deep/x.js")).unwrap(),
        },
        Edit {
            what: "a file in an ignored directory",
            paths: &["build/out.o"],
            patched: true,
            apply: |d| write(d, "build/out.o", "obj"),
        },
        Edit {
            what: "a file in node_modules",
            paths: &["node_modules/pkg/i.js"],
            patched: true,
            apply: |d| write(d, "node_modules/pkg/i.js", "m"),
        },
        Edit {
            what: "a new file",
            paths: &["lib/new.js"],
            patched: false,
            apply: |d| write(d, "lib/new.js", "n"),
        },
        Edit {
            what: "a new file an ignore rule excludes",
            paths: &["debug.log"],
            patched: false,
            apply: |d| write(d, "debug.log", "ignored"),
        },
        Edit {
            what: "a new directory",
            paths: &["pkg", "pkg/sub", "pkg/sub/a.js"],
            patched: false,
            apply: |d| {
                fs::create_dir_all(d.join("pkg/sub")).unwrap();
                write(d, "pkg/sub/a.js", "a");
            },
        },
        Edit {
            // Files written into a new directory before the watcher watches it have no
            // event: the save after a new directory walks too.
            what: "an edit after a new directory",
            paths: &["app.py"],
            patched: false,
            apply: |d| write(d, "app.py", "v3"),
        },
        Edit {
            what: "a directory moved",
            paths: &["lib/deep", "moved"],
            patched: false,
            apply: |d| fs::rename(d.join("lib/deep"), d.join("moved")).unwrap(),
        },
        Edit {
            what: "a directory removed",
            paths: &["pkg/sub/a.js", "pkg/sub", "pkg"],
            patched: false,
            apply: |d| fs::remove_dir_all(d.join("pkg")).unwrap(),
        },
        Edit {
            what: "a hard link made",
            paths: &["lib/hard.js"],
            patched: false,
            apply: |d| fs::hard_link(d.join("lib/m7.js"), d.join("lib/hard.js")).unwrap(),
        },
        Edit {
            // Only the edited name is reported; the other changes with it.
            what: "a file with another link edited",
            paths: &["lib/m7.js"],
            patched: false,
            apply: |d| write(d, "lib/m7.js", "both names"),
        },
        Edit {
            what: "an ignore file above the directory changed (not watched)",
            paths: &[],
            patched: false,
            apply: |d| fs::write(d.parent().unwrap().join(".gitignore"), "m9.js\n").unwrap(),
        },
        Edit {
            what: "an ignore rule changed",
            paths: &[".gitignore"],
            patched: false,
            apply: |d| write(d, ".gitignore", "*.log\n"),
        },
        Edit {
            what: "a file replaced by a directory",
            paths: &["app.py"],
            patched: false,
            apply: |d| {
                fs::remove_file(d.join("app.py")).unwrap();
                fs::create_dir(d.join("app.py")).unwrap();
            },
        },
        Edit {
            what: "an edit after a walk",
            paths: &["lib/m8.js"],
            patched: true,
            apply: |d| write(d, "lib/m8.js", "y"),
        },
    ];

    /// Each blob's source file holds its bytes.
    fn assert_holders(snap: &Snapshot, what: &str) {
        for (digest, (path, size)) in snap.blobs.iter() {
            let bytes = fs::read(path).unwrap_or_else(|e| panic!("{what}: {path:?}: {e}"));
            assert_eq!(
                Digest::of(&bytes),
                *digest,
                "{what}: {path:?} holds other bytes"
            );
            assert_eq!(bytes.len() as u64, *size, "{what}");
        }
    }

    /// Entries and blobs of a snapshot.
    fn content(snap: &Snapshot) -> (Vec<Arc<Entry>>, Vec<(Digest, u64)>) {
        let blobs = snap.blobs.iter().map(|(d, (_, n))| (*d, *n)).collect();
        (snap.manifest.entries.clone(), blobs)
    }

    fn walk(d: &Path) -> Snapshot {
        snapshot(d, &mut HashCache::default(), &release()).unwrap()
    }

    #[tokio::test]
    async fn a_patch_of_the_changed_paths_equals_a_walk_and_walks_only_when_it_cannot_tell() {
        let (_tmp, d) = tree();
        let changes = Changes::default();
        let mut cache = None;
        let first = take(&d, &mut cache, release(), Some(&changes))
            .await
            .unwrap();
        assert!(first.walked, "the first save walks the tree");
        let mut last = first;
        for edit in EDITS {
            (edit.apply)(&d);
            changes.mark(edit.paths.iter().map(|p| d.join(p)));
            let snap = take(&d, &mut cache, release(), Some(&changes))
                .await
                .unwrap();
            assert_eq!(!snap.walked, edit.patched, "{}", edit.what);
            let walked = walk(&d);
            assert!(content(&snap) == content(&walked), "{}", edit.what);
            assert_eq!(snap.tree, walked.tree, "{}", edit.what);
            assert_holders(&snap, edit.what);
            // What a save asks the store about relies on this: a patch names the
            // snapshot it patched and every blob that one did not have.
            if !snap.walked {
                assert_eq!(snap.patched_from, Some(last.digest), "{}", edit.what);
                for blob in snap.blobs.keys() {
                    assert!(
                        last.blobs.contains_key(blob) || snap.added.contains(blob),
                        "{}: a new blob is not named as added",
                        edit.what
                    );
                }
            }
            last = snap;
        }
    }

    #[tokio::test]
    async fn saves_on_the_real_watchers_bursts_never_miss_a_change() {
        let (_tmp, d) = tree();
        let (_watcher, mut bursts, changes) = crate::dev::watch(&d).unwrap();
        let mut cache = None;
        take(&d, &mut cache, release(), Some(&changes))
            .await
            .unwrap();
        for edit in EDITS {
            (edit.apply)(&d);
            if edit.paths.is_empty() {
                // No event (nothing watched changed): the next edit's save sees it.
                continue;
            }
            // Saved on each burst, as the loop does, until a save equals a walk: the
            // edit's events may come in more than one burst, but never in none.
            loop {
                tokio::time::timeout(std::time::Duration::from_secs(60), bursts.recv())
                    .await
                    .unwrap_or_else(|_| panic!("no burst after {}", edit.what))
                    .expect("the watcher runs");
                let snap = take(&d, &mut cache, release(), Some(&changes))
                    .await
                    .unwrap();
                // A save between two bursts of one edit may name a holder the rest of the
                // edit changed; the one that sees the whole edit must not.
                if content(&snap) == content(&walk(&d)) {
                    assert_holders(&snap, edit.what);
                    break;
                }
            }
        }
    }

    #[test]
    fn more_changes_than_tracked_ask_for_a_walk() {
        let changes = Changes::default();
        changes.mark([PathBuf::from("/a")]);
        assert_eq!(changes.take().map(|p| p.len()), Some(1));
        assert_eq!(changes.take().map(|p| p.len()), Some(0), "taken once");
        changes.mark((0..=MAX_CHANGED).map(|i| PathBuf::from(format!("/f{i}"))));
        assert!(changes.take().is_none());
        changes.mark_everything();
        changes.mark([PathBuf::from("/a")]);
        assert!(changes.take().is_none());
        assert!(changes.take().is_some(), "a walk clears the mark");
    }

    #[test]
    fn seq_moves_forward_even_when_the_clock_does_not() {
        let far = u64::MAX / 2;
        assert_eq!(next_seq(Some(far)), far + 1);
        assert!(next_seq(None) > 1_700_000_000_000);
    }
}
