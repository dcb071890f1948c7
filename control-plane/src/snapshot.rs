//! The release manifest of a source directory: the files `pack` would archive, each named
//! by its SHA-256, in the canonical form the fetcher verifies. A per-directory cache of
//! (size, mtime, ctime, inode) → hash means a save re-hashes only the files that changed.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aether_common::release::{Entry, EntryType, Manifest};
use aether_common::{Digest, Sha256Writer};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::pack;

/// Where blobs are relative to the manifest: the control plane serves both under
/// `/v1/blobs/`, so the manifest's own directory.
pub const BLOBS_BESIDE: &str = "./";

/// A manifest of a tree, with where each blob's bytes are on disk.
pub struct Snapshot {
    pub manifest: Manifest,
    /// The canonical bytes (the manifest blob).
    pub bytes: Vec<u8>,
    pub digest: Digest,
    /// The hash of the entries alone: equal for two snapshots of the same tree, whatever
    /// their `seq` and time.
    pub tree: Digest,
    /// Each distinct file hash, with one path holding those bytes and their size.
    pub blobs: BTreeMap<Digest, (PathBuf, u64)>,
    /// Files hashed for this snapshot (the rest came from the cache).
    pub hashed: usize,
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
#[derive(Default, Clone)]
pub struct HashCache {
    file: Option<PathBuf>,
    entries: HashMap<String, Cached>,
    /// When it was last written by `take`.
    saved_at: Option<std::time::Instant>,
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
        }
    }

    /// Writes the cache (atomically); a failure only costs re-hashing next time.
    pub fn save(&self) {
        let Some(file) = &self.file else { return };
        let write = || -> std::io::Result<()> {
            if let Some(parent) = file.parent() {
                fs::create_dir_all(parent)?;
            }
            let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
            fs::write(&tmp, serde_json::to_vec(&self.entries)?)?;
            fs::rename(&tmp, file)
        };
        if let Err(e) = write() {
            tracing::debug!(error = %e, "could not save the hash cache");
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

/// Builds the manifest of `dir` with the same files as `pack::pack` and the same modes
/// (0755 for an executable file, else 0644; 0755 for directories).
pub fn snapshot(dir: &Path, cache: &mut HashCache, release: &Release) -> anyhow::Result<Snapshot> {
    let mut entries = Vec::new();
    let mut blobs = BTreeMap::new();
    let mut hashed = 0;
    for rel in pack::walk(dir)? {
        let path = rel
            .to_str()
            .with_context(|| format!("{} is not UTF-8", rel.display()))?
            .to_owned();
        let full = dir.join(&rel);
        let meta =
            fs::symlink_metadata(&full).with_context(|| format!("reading {}", full.display()))?;
        let ft = meta.file_type();
        let entry = if ft.is_symlink() {
            let target = fs::read_link(&full)?;
            let target = target
                .to_str()
                .with_context(|| format!("the target of {} is not UTF-8", full.display()))?;
            Entry {
                mode: 0o777,
                path,
                sha256: None,
                size: None,
                target: Some(target.to_owned()),
                kind: EntryType::Symlink,
            }
        } else if ft.is_dir() {
            Entry {
                mode: 0o755,
                path,
                sha256: None,
                size: None,
                target: None,
                kind: EntryType::Dir,
            }
        } else if ft.is_file() {
            let (digest, fresh) = cache.hash(&path, &full, &meta)?;
            hashed += usize::from(fresh);
            blobs.entry(digest).or_insert((full, meta.len()));
            Entry {
                mode: if meta.mode() & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                },
                path,
                sha256: Some(digest.hex()),
                size: Some(meta.len()),
                target: None,
                kind: EntryType::File,
            }
        } else {
            continue; // sockets, FIFOs, devices: not part of a release, as in `pack`
        };
        entries.push(entry);
    }
    // Files deleted since the last snapshot leave the cache too.
    let live: std::collections::HashSet<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    cache.entries.retain(|k, _| live.contains(k.as_str()));
    let manifest = Manifest {
        app: release.app.clone(),
        blobs: BLOBS_BESIDE.to_owned(),
        created_at: jiff::Timestamp::now().to_string(),
        entries,
        expires_at: release.expires_at.map(|t| t.to_string()),
        seq: release.seq,
    };
    if let Err(e) = manifest.validate() {
        bail!("{} cannot be released: {e}", dir.display());
    }
    let bytes = manifest.to_canonical();
    let digest = Digest::of(&bytes);
    let tree = Digest::of(&serde_json::to_vec(&manifest.entries)?);
    Ok(Snapshot {
        manifest,
        bytes,
        digest,
        tree,
        blobs,
        hashed,
    })
}

/// `snapshot` off the async runtime. `cache` is the directory's hash cache, loaded on
/// first use and written in the background (off the save's path) after a snapshot that
/// hashed anything, at most every `SAVE_EVERY`.
pub async fn take(
    dir: &Path,
    cache: &mut Option<HashCache>,
    release: Release,
) -> anyhow::Result<Snapshot> {
    let held = cache.take();
    let dir = dir.to_path_buf();
    let (held, snap) = tokio::task::spawn_blocking(move || {
        let mut held = held.unwrap_or_else(|| HashCache::load(&dir));
        let snap = snapshot(&dir, &mut held, &release);
        (held, snap)
    })
    .await?;
    let mut held = held;
    let due = held.saved_at.is_none_or(|t| t.elapsed() >= SAVE_EVERY);
    if snap.as_ref().is_ok_and(|s| s.hashed > 0) && due {
        held.saved_at = Some(std::time::Instant::now());
        let copy = held.clone();
        tokio::task::spawn_blocking(move || copy.save());
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

    #[test]
    fn seq_moves_forward_even_when_the_clock_does_not() {
        let far = u64::MAX / 2;
        assert_eq!(next_seq(Some(far)), far + 1);
        assert!(next_seq(None) > 1_700_000_000_000);
    }
}
