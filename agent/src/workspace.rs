//! The workspace on the shared volume: staging directories, complete releases, the
//! `current` link, `state.json` and `.ready`.
//!
//! Layout (all below `AETHER_WORKSPACE`):
//! - `current` → `.aether/releases/<hex>` (relative, swapped with rename(2));
//! - `.aether/releases/<hex>/`: complete, verified releases only;
//! - `.aether/staging/`: work in progress, never reachable through `current`, wiped at start;
//! - `.aether/objects/<hex>-<mode>`: verified, read-only file contents of manifest
//!   releases, hard-linked into their release directories (see `objects`);
//! - `.aether/manifests/<hex>`: the manifest of each kept manifest release (what a later
//!   release is patched against, and what keeps its objects);
//! - `.aether/in-use/<hex>`: set by the supervisor while an app of that release runs;
//! - `.aether/state.json`, `.ready`.
//!
//! Renames make every step atomic for readers and against a killed process. There is no
//! fsync: the workspace is an `emptyDir`, which does not outlive the node crash an fsync
//! would protect against, and fsync on a node busy writing back other data stalled swaps
//! for hundreds of milliseconds in the benchmarks.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use aether_common::Digest;
use aether_common::release::Manifest;
use serde::{Deserialize, Serialize};

use crate::background;

const CURRENT: &str = "current";
const READY: &str = ".ready";
const CURRENT_TMP: &str = ".current.tmp";
const STATE: &str = "state.json";

/// What survives a restart besides the releases themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub digest: Option<Digest>,
    pub consecutive_failures: u32,
    pub updated_at: String,
    /// The highest manifest `seq` made live and that manifest's digest: a lower `seq`, or
    /// the same `seq` with another digest, is a replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_digest: Option<Digest>,
}

impl State {
    /// The replay high-water mark, when both halves are present.
    pub fn high_water(&self) -> Option<(u64, Digest)> {
        self.seq.zip(self.seq_digest)
    }
}

/// Handle on the workspace directories.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
    meta: PathBuf,
    releases: PathBuf,
    staging: PathBuf,
    objects: PathBuf,
    manifests: PathBuf,
    in_use: PathBuf,
    /// At most one spare copy of a release, `<hex>` (see `assemble::prepare_spare`).
    spare: PathBuf,
    /// The kept manifests read last, parsed, newest first: one refresh reads the live
    /// release's, its base's and (collecting objects) every kept one, and a manifest of a
    /// large tree takes tens of milliseconds to parse. Few, because each is the size of
    /// the tree's listing in memory.
    parsed: Mutex<Vec<(Digest, Arc<Manifest>)>>,
    /// Refreshes under way, which the clean-up of manifests waits for.
    quiet: Arc<background::Quiet>,
}

/// Parsed manifests kept in memory: the new release's, the live one's and a base.
const PARSED_MANIFESTS: usize = 3;

/// A staging directory being filled. Dropping it without `Workspace::commit` removes it,
/// so every failure path leaves nothing behind.
#[derive(Debug)]
pub struct Staging {
    path: PathBuf,
    keep: bool,
}

impl Staging {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep
            && let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove staging directory");
        }
    }
}

static STAGING_SEQ: AtomicU64 = AtomicU64::new(0);

impl Workspace {
    /// Creates the layout if needed.
    pub fn open(root: &Path) -> io::Result<Self> {
        let meta = root.join(".aether");
        let ws = Self {
            root: root.to_path_buf(),
            releases: meta.join("releases"),
            staging: meta.join("staging"),
            objects: meta.join("objects"),
            manifests: meta.join("manifests"),
            in_use: meta.join("in-use"),
            spare: meta.join("spare"),
            meta,
            parsed: Mutex::default(),
            quiet: Arc::default(),
        };
        for dir in [
            &ws.releases,
            &ws.staging,
            &ws.objects,
            &ws.manifests,
            &ws.in_use,
            &ws.spare,
        ] {
            fs::create_dir_all(dir)?;
        }
        Ok(ws)
    }

    /// `open`, with the in-use marks in `in_use_dir` when given (a volume the app
    /// container may write, when the workspace is read-only there).
    pub fn open_with(root: &Path, in_use_dir: Option<&Path>) -> io::Result<Self> {
        let mut ws = Self::open(root)?;
        if let Some(dir) = in_use_dir {
            fs::create_dir_all(dir)?;
            ws.in_use = dir.to_path_buf();
        }
        Ok(ws)
    }

    /// The manifest kept for a release: our own file, validated before it was written
    /// (parsed once while it is among the last few used).
    pub fn kept_manifest(&self, digest: &Digest) -> io::Result<Arc<Manifest>> {
        if let Some(m) = self.parsed_manifest(digest) {
            return Ok(m);
        }
        let bytes = fs::read(self.manifest_path(digest))?;
        if Digest::of(&bytes) != *digest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("kept manifest {digest} is damaged"),
            ));
        }
        let manifest: Arc<Manifest> =
            Arc::new(serde_json::from_slice(&bytes).map_err(io::Error::other)?);
        self.remember_manifest(*digest, manifest.clone());
        Ok(manifest)
    }

    /// The manifest kept for a release if it is among those parsed (never read).
    pub fn parsed_manifest(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        let mut parsed = self.parsed.lock().ok()?;
        let at = parsed.iter().position(|(d, _)| d == digest)?;
        let hit = parsed.remove(at);
        let manifest = hit.1.clone();
        parsed.insert(0, hit);
        Some(manifest)
    }

    /// Keeps a verified manifest parsed (the one a refresh just wrote).
    pub fn remember_manifest(&self, digest: Digest, manifest: Arc<Manifest>) {
        let evicted = match self.parsed.lock() {
            Ok(mut parsed) => {
                parsed.retain(|(d, _)| *d != digest);
                parsed.insert(0, (digest, manifest));
                let keep = PARSED_MANIFESTS.min(parsed.len());
                parsed.split_off(keep)
            }
            Err(_) => return,
        };
        // Freeing a 40,000-entry manifest's strings takes milliseconds: not on a
        // refresh's path.
        if !evicted.is_empty() {
            // Could the thread not start, the closure and the manifest are dropped here.
            let _ = background::spawn(&self.quiet, "drop-manifest", move || drop(evicted));
        }
    }

    /// Marks a refresh under way until the guard is dropped: the clean-up it causes
    /// (`background`) waits for it to end.
    pub fn refreshing(&self) -> background::Busy {
        self.quiet.busy()
    }

    /// Forgets a parsed manifest whose file is gone.
    pub fn forget_manifest(&self, digest: &Digest) {
        if let Ok(mut parsed) = self.parsed.lock() {
            parsed.retain(|(d, _)| d != digest);
        }
    }

    pub fn objects_dir(&self) -> &Path {
        &self.objects
    }

    /// Where the manifest of a kept manifest release is.
    pub fn manifest_path(&self, digest: &Digest) -> PathBuf {
        self.manifests.join(digest.hex())
    }

    /// Releases an app may still be running from (the supervisor's markers): never patched
    /// or pruned.
    pub fn in_use(&self) -> io::Result<Vec<Digest>> {
        digests_in(&self.in_use)
    }

    /// Marks a release as in use by an app (the supervisor, before it starts one).
    pub fn mark_in_use(&self, digest: &Digest) -> io::Result<()> {
        File::create(self.in_use.join(digest.hex())).map(drop)
    }

    /// Clears the mark (the supervisor, once the app and its process group are gone).
    pub fn unmark_in_use(&self, digest: &Digest) -> io::Result<()> {
        remove_if_present(&self.in_use.join(digest.hex()))
    }

    /// Removes every mark: a supervisor starting has no app running yet, whatever an
    /// earlier one that was killed left behind.
    pub fn clear_in_use(&self) -> io::Result<()> {
        for entry in fs::read_dir(&self.in_use)? {
            remove_if_present(&entry?.path())?;
        }
        Ok(())
    }

    /// A fresh path in staging for a temporary file (same file system as the objects and
    /// releases, so it can be renamed into place; wiped at start like all staging).
    pub fn temp_path(&self, what: &str) -> PathBuf {
        let seq = STAGING_SEQ.fetch_add(1, Ordering::Relaxed);
        self.staging
            .join(format!("{what}.{}.{seq}", std::process::id()))
    }

    /// The digests of the manifests kept in `.aether/manifests/`.
    pub fn kept_manifests(&self) -> io::Result<Vec<Digest>> {
        digests_in(&self.manifests)
    }

    /// Kept releases (not staging), newest activation first.
    pub fn releases(&self) -> io::Result<Vec<Digest>> {
        let mut releases = Vec::new();
        for entry in fs::read_dir(&self.releases)? {
            let entry = entry?;
            let Some(digest) = entry
                .file_name()
                .to_str()
                .and_then(|n| Digest::from_hex(n).ok())
            else {
                continue;
            };
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            releases.push((modified, digest));
        }
        releases.sort_by_key(|r| std::cmp::Reverse(r.0));
        Ok(releases.into_iter().map(|(_, d)| d).collect())
    }

    /// Takes a kept release out of the releases (into staging) to be patched into another
    /// one. Its manifest goes with it: the release no longer exists under its own digest.
    pub fn take_release(&self, digest: &Digest, into: &Digest) -> io::Result<Staging> {
        let path = self.temp_path(&into.hex());
        fs::rename(self.release_dir(digest), &path)?;
        let staging = Staging { path, keep: false };
        // Unlinking 6 MB (40,000 files) here cost a refresh as much as patching the release,
        // and leaving it to the next collection, seconds later, had it written to disk
        // first: it is moved aside and unlinked on another thread (a kill leaves it in
        // staging, which the next start wipes). Should it stay, the next collection
        // removes it with any manifest left without a release.
        let aside = self.temp_path("taken-manifest");
        match fs::rename(self.manifest_path(digest), &aside) {
            Ok(()) => {
                let remove = aside.clone();
                let spawned = background::spawn(&self.quiet, "remove-manifest", move || {
                    let _ = fs::remove_file(remove);
                });
                if spawned.is_err() {
                    let _ = fs::remove_file(&aside);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(release = %digest, error = %e, "could not move a base's manifest aside")
            }
        }
        Ok(staging)
    }

    /// The digest of the release the spare copy holds, if there is one.
    pub fn spare(&self) -> Option<Digest> {
        digests_in(&self.spare).ok()?.into_iter().next()
    }

    /// Takes the spare copy of `digest` (into staging) to be patched into another release;
    /// the release itself and its manifest stay.
    pub fn take_spare(&self, digest: &Digest, into: &Digest) -> io::Result<Staging> {
        let path = self.temp_path(&into.hex());
        fs::rename(self.spare.join(digest.hex()), &path)?;
        Ok(Staging { path, keep: false })
    }

    /// Makes a complete staging directory the spare copy of `digest`.
    pub fn keep_spare(&self, mut staging: Staging, digest: &Digest) -> io::Result<()> {
        fs::rename(&staging.path, self.spare.join(digest.hex()))?;
        staging.keep = true;
        Ok(())
    }

    /// Removes every spare copy; returns how many entries were removed.
    pub fn remove_spares(&self) -> io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.spare)? {
            match fs::remove_dir_all(entry?.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                Err(_) => {}
            }
        }
        Ok(removed)
    }

    pub fn release_dir(&self, digest: &Digest) -> PathBuf {
        self.releases.join(digest.hex())
    }

    /// Removes everything a killed process may have left half-written: staging directories,
    /// temporary files and spare copies (one being built or removed when the process
    /// stopped may be incomplete; a spare is rebuilt after the next swap). Returns how many
    /// entries were removed.
    pub fn clean_staging(&self) -> io::Result<usize> {
        let mut removed = self.remove_spares()?;
        for entry in fs::read_dir(&self.staging)? {
            let path = entry?.path();
            match fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path)) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        for tmp in [
            self.root.join(CURRENT_TMP),
            self.meta.join(format!("{STATE}.tmp")),
        ] {
            if fs::symlink_metadata(&tmp).is_ok() {
                fs::remove_file(&tmp)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The digest `current` points at, if it points at a complete release.
    pub fn live_digest(&self) -> Option<Digest> {
        let target = fs::read_link(self.root.join(CURRENT)).ok()?;
        let name = target.file_name()?.to_str()?;
        let digest = Digest::from_hex(name).ok()?;
        self.has_release(&digest).then_some(digest)
    }

    pub fn has_release(&self, digest: &Digest) -> bool {
        fs::symlink_metadata(self.release_dir(digest)).is_ok_and(|m| m.is_dir())
    }

    /// A fresh, empty staging directory beside the releases (same file system, so the
    /// final rename is atomic).
    pub fn stage(&self, digest: &Digest) -> io::Result<Staging> {
        let path = self.temp_path(&digest.hex());
        fs::create_dir(&path)?;
        Ok(Staging { path, keep: false })
    }

    /// Moves a verified staging directory to `.aether/releases/<hex>`. If that release
    /// already exists (another attempt finished it), the staging copy is discarded.
    pub fn commit(&self, mut staging: Staging, digest: &Digest) -> io::Result<()> {
        let dest = self.release_dir(digest);
        match fs::rename(&staging.path, &dest) {
            Ok(()) => {
                staging.keep = true;
                Ok(())
            }
            Err(_) if self.has_release(digest) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Points `current` at the release, atomically: a new link is made beside it and
    /// renamed over it, so readers see the old release or the new one, never neither.
    pub fn activate(&self, digest: &Digest) -> io::Result<()> {
        let tmp = self.root.join(CURRENT_TMP);
        let _ = fs::remove_file(&tmp);
        symlink(Path::new(".aether/releases").join(digest.hex()), &tmp)?;
        fs::rename(&tmp, self.root.join(CURRENT))?;
        // Newest activation first when pruning.
        if let Ok(dir) = File::open(self.release_dir(digest)) {
            let _ = dir.set_modified(SystemTime::now());
        }
        Ok(())
    }

    /// Creates or removes `.ready`.
    pub fn set_ready(&self, ready: bool) -> io::Result<()> {
        let path = self.root.join(READY);
        if ready {
            if fs::symlink_metadata(&path).is_err() {
                File::create(&path)?;
            }
            Ok(())
        } else {
            remove_if_present(&path)
        }
    }

    /// Removes releases beyond the newest `keep` (by activation time), with their
    /// manifests; never the live one, nor one an app still runs from (and nothing while
    /// the marks cannot be read).
    pub fn prune(&self, keep: usize, live: &Digest) -> io::Result<Vec<Digest>> {
        let in_use = self.in_use()?;
        let mut kept = 1; // the live release always stays
        let mut removed = Vec::new();
        for digest in self.releases()? {
            if &digest == live || in_use.contains(&digest) {
                continue;
            }
            if kept < keep {
                kept += 1;
                continue;
            }
            fs::remove_dir_all(self.release_dir(&digest))?;
            remove_if_present(&self.manifest_path(&digest))?;
            removed.push(digest);
        }
        Ok(removed)
    }

    pub fn load_state(&self) -> Option<State> {
        let text = fs::read(self.meta.join(STATE)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Writes `state.json` atomically (temporary file, then rename).
    pub fn write_state(&self, state: &State) -> io::Result<()> {
        let tmp = self.meta.join(format!("{STATE}.tmp"));
        let mut file = File::create(&tmp)?;
        serde_json::to_writer(&mut file, state)?;
        file.write_all(b"\n")?;
        fs::rename(&tmp, self.meta.join(STATE))
    }
}

/// The entries of `dir` named by a 64-hex digest (others are ignored).
fn digests_in(dir: &Path) -> io::Result<Vec<Digest>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        if let Some(d) = entry?
            .file_name()
            .to_str()
            .and_then(|n| Digest::from_hex(n).ok())
        {
            out.push(d);
        }
    }
    Ok(out)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(ws: &Workspace, content: &[u8]) -> Digest {
        let d = Digest::of(content);
        let s = ws.stage(&d).unwrap();
        fs::write(s.path().join("f"), content).unwrap();
        ws.commit(s, &d).unwrap();
        d
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path()).unwrap();
        let s = ws.stage(&Digest::of(b"x")).unwrap();
        fs::write(s.path().join("half"), b"..").unwrap();
        drop(s);
        assert_eq!(
            fs::read_dir(dir.path().join(".aether/staging"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn activate_swaps_current_to_a_relative_link() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path()).unwrap();
        let a = release(&ws, b"a");
        let b = release(&ws, b"b");
        ws.activate(&a).unwrap();
        assert_eq!(ws.live_digest(), Some(a));
        ws.activate(&b).unwrap();
        assert_eq!(ws.live_digest(), Some(b));
        let link = fs::read_link(dir.path().join("current")).unwrap();
        assert!(link.is_relative());
        assert_eq!(fs::read(dir.path().join("current/f")).unwrap(), b"b");
    }

    #[test]
    fn prune_keeps_newest_and_live() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path()).unwrap();
        let digests: Vec<_> = [b"1", b"2", b"3"]
            .iter()
            .map(|c| {
                let d = release(&ws, *c);
                ws.activate(&d).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(20));
                d
            })
            .collect();
        let removed = ws.prune(2, &digests[2]).unwrap();
        assert_eq!(removed, vec![digests[0]]);
        assert!(ws.has_release(&digests[1]) && ws.has_release(&digests[2]));
    }

    #[test]
    fn clean_staging_removes_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path()).unwrap();
        let s = ws.stage(&Digest::of(b"x")).unwrap();
        std::mem::forget(s); // as if the process had been killed
        assert_eq!(ws.clean_staging().unwrap(), 1);
    }

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path()).unwrap();
        let st = State {
            digest: Some(Digest::of(b"x")),
            consecutive_failures: 3,
            updated_at: "2026-01-01T00:00:00Z".into(),
            seq: Some(9),
            seq_digest: Some(Digest::of(b"m")),
        };
        ws.write_state(&st).unwrap();
        assert_eq!(ws.load_state(), Some(st));
    }
}
