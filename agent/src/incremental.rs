//! A manifest release's refresh (`aether.dev/format: manifest`): the manifest fetched and
//! checked against its digest (already signed), its safe-extraction rules and replay;
//! only the objects not yet on the volume downloaded and verified; the release assembled
//! from a kept one by the difference; then the same atomic swap as a tar.gz release.

use std::fs;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use aether_common::contract::annotations::DesiredRelease;
use aether_common::release::{MAX_MANIFEST_BYTES, Manifest, ManifestError};
use aether_common::{Digest, Sha256Writer};
use tokio_util::sync::CancellationToken;

use crate::failure::{Reason, RefreshError};
use crate::refresh::{Applied, Refresher, Stage, Stages, blocking};
use crate::workspace::{State, Workspace};
use crate::{assemble, fetch, objects, verify};

/// The replay high-water mark at start: the higher of `state.json`'s and the live
/// release's own (a kill between the swap and the write of `state.json` must not let a
/// lower `seq` back in).
pub fn high_water(ws: &Workspace, state: Option<&State>) -> Option<(u64, Digest)> {
    let saved = state.and_then(State::high_water);
    let live = ws
        .live_digest()
        .and_then(|d| Some((ws.kept_manifest(&d).ok()?.seq, d)));
    match (saved, live) {
        (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
        (a, b) => a.or(b),
    }
}

impl Refresher {
    pub(crate) async fn apply_manifest(
        &self,
        desired: &DesiredRelease,
        url: reqwest::Url,
        cancel: &CancellationToken,
    ) -> Result<Applied, RefreshError> {
        let digest = desired.digest;
        let mut clock = Instant::now();
        let Some(app) = self.app.as_deref() else {
            return Err(RefreshError::new(
                Reason::Replay,
                "AETHER_APP is not set: a manifest release names its app, and this fetcher \
                 does not know its own",
            )
            .settled());
        };
        let _objects = tokio::select! {
            g = self.objects_lock.clone().lock_owned() => g,
            () = cancel.cancelled() => return Err(RefreshError::Cancelled),
        };
        // A spare copy or an object collection may hold the lock for a while: its own stage.
        let mut stages = Stages::default();
        stages.lap(Stage::Wait, &mut clock);
        let kept_path = self.workspace.manifest_path(&digest);
        let kept = fs::read(&kept_path)
            .ok()
            .filter(|b| Digest::of(b) == digest);
        let (bytes, manifest_bytes) = match kept {
            Some(kept) => (kept, 0),
            None => {
                // Absent, or damaged on disk: fetched again, and checked like any download.
                let _ = fs::remove_file(&kept_path);
                self.workspace.forget_manifest(&digest);
                let (fetched, actual) = self.download_manifest(url.clone(), cancel).await?;
                // Verified before it is parsed: unverified bytes could be a parse made to
                // exhaust the pod's memory.
                verify::digest(&digest, &actual)?;
                let n = fetched.len() as u64;
                (fetched, n)
            }
        };
        let bytes = bytes::Bytes::from(bytes);
        let (manifest, parent) = {
            let known = self.known_manifest();
            let bytes = bytes.clone();
            let (manifest, parent) = blocking(move || {
                let parsed = Manifest::parse_against_ends(
                    &bytes,
                    known.as_ref().map(|(_, m, b)| (m.as_ref(), b.as_ref())),
                );
                Ok(parsed.map(|(m, ends)| (m, known.map(|(d, _, _)| d).zip(ends))))
            })
            .await?
            .map_err(refused)?;
            (Arc::new(manifest), parent)
        };
        let high_water = self.high_water.lock().ok().and_then(|h| *h);
        manifest
            .check_fresh(app, high_water, jiff::Timestamp::now())
            .map_err(refused)?;
        self.check_limits(&manifest)?;
        // Accepted: what it shares with the manifest it was parsed against spares the
        // diffs against its base and the live release a pass over every entry.
        let lineage = {
            let Ok(mut lineage) = self.lineage.lock() else {
                return Err(RefreshError::new(Reason::Io, "lineage lock poisoned"));
            };
            // A release applied again (a retry after its swap failed, a rollback to it)
            // is parsed against itself: no link to follow.
            if let Some((parent, ends)) = parent.filter(|(p, _)| *p != digest) {
                lineage.record(digest, parent, ends);
            }
            lineage.clone()
        };
        // Kept for the next save to be parsed against, when the live release is a
        // manifest release too: a first one (on a new pod, or after tar.gz releases)
        // downloads every blob and uses the most memory, without 6 MB more for 40,000
        // files. The save after it is parsed in full, then kept.
        if let Ok(mut last) = self.last_manifest.lock() {
            let follows_manifest = self
                .workspace
                .live_digest()
                .is_some_and(|d| self.workspace.manifest_path(&d).exists());
            *last = follows_manifest.then(|| (digest, bytes.clone()));
        }
        let new_release = !self.workspace.has_release(&digest);
        // A new release's manifest is kept before anything else (a release on disk always
        // has its manifest; one left without a release, by a refusal, a failure or a kill,
        // is removed by the next collection). Only an accepted one; written on another
        // core while the refresh goes on, and awaited before the release is built: 6 MB
        // for 40,000 files.
        let writing = (new_release && manifest_bytes > 0).then(|| {
            let (ws, bytes) = (self.workspace.clone(), bytes.clone());
            tokio::task::spawn_blocking(move || write_manifest(&ws, &digest, &bytes))
        });
        let mut applied = Applied {
            downloaded: manifest_bytes,
            reused: true,
            seq: Some(manifest.seq),
            delta: None,
            bytes_reused: 0,
            stages,
        };
        if !new_release {
            if manifest_bytes > 0 {
                // The release is on disk but its manifest was lost: kept again, so the
                // release can be a base and its objects are not collected.
                let (ws, manifest) = (self.workspace.clone(), manifest.clone());
                blocking(move || keep_manifest(&ws, &digest, &bytes, &manifest)).await?;
            }
            applied.stages.lap(Stage::Manifest, &mut clock);
        } else {
            applied.stages.lap(Stage::Manifest, &mut clock);
            let blobs = url.join(&manifest.blobs).map_err(|e| {
                RefreshError::new(Reason::Extract, format!("manifest blobs URL: {e}")).settled()
            })?;
            // The bytes are let go once written (unless kept to parse the next save
            // against): 6 MB for 40,000 files, while a first release's downloads hold
            // the most memory.
            drop(bytes);
            let ws = self.workspace.clone();
            let live = ws.live_digest();
            // The release this one is patched from, chosen first: the objects to look for
            // are exactly those of the files that differ from it (every one without a base).
            let (base, lineage) = {
                let (ws, manifest) = (ws.clone(), manifest.clone());
                blocking(move || {
                    let base =
                        assemble::pick_base(&ws, live.as_ref(), &manifest, &digest, &lineage);
                    Ok((base, lineage))
                })
                .await?
            };
            let fetched =
                objects::fetch_missing(&ws, &self.http, &blobs, &manifest, base.as_ref(), cancel)
                    .await?;
            applied.downloaded += fetched.downloaded;
            applied.reused = false;
            applied.bytes_reused = manifest.total_size().saturating_sub(fetched.downloaded);
            applied.stages.lap(Stage::Objects, &mut clock);
            if let Some(writing) = writing {
                writing
                    .await
                    .map_err(|e| RefreshError::new(Reason::Io, e))?
                    .map_err(|e| RefreshError::new(Reason::Io, e))?;
            }
            let delta = blocking(move || {
                // What the user changed: the difference from the live release (often the
                // base itself, as its spare copy).
                let mut delta = match (&base, live) {
                    (Some(base), Some(live)) if base.digest == live => {
                        base.changes.delta(&base.manifest, &manifest)
                    }
                    _ => {
                        let before = live.and_then(|d| Some((d, ws.kept_manifest(&d).ok()?)));
                        let ends = before
                            .as_ref()
                            .and_then(|(d, _)| lineage.between(d, &digest));
                        let before = before
                            .map(|(_, m)| m)
                            .unwrap_or_else(|| Arc::new(assemble::empty(&manifest)));
                        assemble::Changes::between_known(&before, &manifest, ends)
                            .delta(&before, &manifest)
                    }
                };
                // Remembered only now: the live and base manifests must stay among the
                // last few used until the release is built from them.
                ws.remember_manifest(digest, manifest.clone());
                let (staging, patched) = assemble::build_from(&ws, &manifest, &digest, base)?;
                delta.patched = patched;
                ws.commit(staging, &digest)?;
                Ok(delta)
            })
            .await?;
            applied.delta = Some(delta);
            applied.stages.lap(Stage::Assemble, &mut clock);
        }
        // A newer release or the deadline arrived while the release was built: it stays
        // on disk (a later refresh reuses it) but does not go live.
        if cancel.is_cancelled() {
            return Err(RefreshError::Cancelled);
        }
        self.swap(digest).await?;
        applied.stages.lap(Stage::Swap, &mut clock);
        if let Ok(mut h) = self.high_water.lock()
            && applied.seq > h.map(|(s, _)| s)
        {
            *h = applied.seq.map(|s| (s, digest));
        }
        // Scheduled before the objects lock is let go, so that a save coming next finds
        // the spare copy being built and waits for it (best effort: it is a task).
        self.prepare_spare();
        drop(_objects);
        self.collect_garbage();
        Ok(applied)
    }

    /// The manifest accepted last with its bytes, while it is among the parsed ones at
    /// hand: both of one digest, as `Manifest::parse_against` needs them.
    fn known_manifest(&self) -> Option<(Digest, Arc<Manifest>, bytes::Bytes)> {
        let (digest, bytes) = self.last_manifest.lock().ok()?.clone()?;
        Some((digest, self.workspace.parsed_manifest(&digest)?, bytes))
    }

    /// The manifest's bytes, at most `MAX_MANIFEST_BYTES` (and the artifact cap), and
    /// their digest, hashed as they arrive (6 MB for 40,000 files: the hash is done when
    /// the last byte is).
    async fn download_manifest(
        &self,
        url: reqwest::Url,
        cancel: &CancellationToken,
    ) -> Result<(Vec<u8>, Digest), RefreshError> {
        let cap = MAX_MANIFEST_BYTES.min(self.max_artifact_bytes);
        let mut response = tokio::select! {
            r = fetch::start(&self.http, url, cap) => r?,
            () = cancel.cancelled() => return Err(RefreshError::Cancelled),
        };
        // Sized once from the length the server states (bounded by the cap): no copies
        // as a large manifest grows.
        let stated = response.content_length().unwrap_or(0).min(cap);
        let mut bytes = Vec::with_capacity(usize::try_from(stated).unwrap_or(0));
        let mut hash = Sha256Writer::new();
        loop {
            let chunk = tokio::select! {
                c = response.chunk() => c.map_err(fetch::classify)?,
                () = cancel.cancelled() => return Err(RefreshError::Cancelled),
            };
            let Some(chunk) = chunk else { break };
            if (bytes.len() + chunk.len()) as u64 > cap {
                return Err(RefreshError::new(
                    Reason::TooLarge,
                    format!("manifest exceeds {cap} bytes"),
                ));
            }
            hash.update(&chunk);
            bytes.extend_from_slice(&chunk);
        }
        Ok((bytes, hash.finish()))
    }

    /// The extraction limits apply to a manifest's files as to an archive's entries.
    fn check_limits(&self, manifest: &Manifest) -> Result<(), RefreshError> {
        let entries = manifest.entries.len() as u64;
        if entries > self.limits.max_entries {
            return Err(RefreshError::new(
                Reason::TooLarge,
                format!(
                    "manifest has {entries} entries, limit {} (AETHER_MAX_ENTRIES)",
                    self.limits.max_entries
                ),
            )
            .settled());
        }
        let bytes = manifest.total_size();
        if bytes > self.limits.max_bytes {
            return Err(RefreshError::new(
                Reason::TooLarge,
                format!(
                    "manifest files total {bytes} bytes, limit {} (AETHER_MAX_EXTRACT_BYTES)",
                    self.limits.max_bytes
                ),
            )
            .settled());
        }
        Ok(())
    }

    /// Builds the spare copy of the live release when a next save would have no base
    /// (`assemble::prepare_spare`), at once, in the background, under the objects lock:
    /// a save that arrives meanwhile waits for it and is then patched.
    pub(crate) fn prepare_spare(&self) {
        let lock = self.objects_lock.clone();
        let ws = self.workspace.clone();
        tokio::spawn(async move {
            let _guard = lock.lock_owned().await;
            match tokio::task::spawn_blocking(move || assemble::prepare_spare(&ws)).await {
                Ok(Ok(true)) => tracing::debug!("spare copy of the live release built"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not build a spare copy of the live release")
                }
                _ => {}
            }
        });
    }

    /// Removes objects no kept release names, in the background but never beside a
    /// refresh (it takes the objects lock), once swaps have been quiet for `GC_QUIET` or
    /// at most `GC_AT_MOST` after the first swap it follows: listing a large tree's
    /// objects and manifests costs more CPU than applying a save, and run at once it would
    /// compete with the app's restart for the pod's cores.
    pub(crate) fn collect_garbage(&self) {
        let collector = self.collector.clone();
        {
            let Ok(mut pending) = collector.pending.lock() else {
                return;
            };
            if *pending {
                // The run already scheduled collects this swap's objects too.
                collector.poke.notify_one();
                return;
            }
            *pending = true;
        }
        let lock = self.objects_lock.clone();
        let ws = self.workspace.clone();
        tokio::spawn(async move {
            let first = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    () = tokio::time::sleep(GC_QUIET) => break,
                    () = collector.poke.notified() => {
                        if first.elapsed() >= GC_AT_MOST {
                            break;
                        }
                    }
                }
            }
            let _guard = lock.lock_owned().await;
            // A swap from here on schedules another run.
            if let Ok(mut pending) = collector.pending.lock() {
                *pending = false;
            }
            match tokio::task::spawn_blocking(move || objects::collect_garbage(&ws)).await {
                Ok(Ok(removed)) if removed > 0 => tracing::debug!(removed, "objects removed"),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not remove unused objects"),
                _ => {}
            }
        });
    }
}

/// Object collection after swaps: at most one run scheduled at a time.
#[derive(Debug, Default)]
pub struct Collector {
    pending: std::sync::Mutex<bool>,
    poke: tokio::sync::Notify,
}

/// Swaps this close together share one collection...
const GC_QUIET: std::time::Duration = std::time::Duration::from_secs(1);
/// ...unless they keep coming this long after the first.
const GC_AT_MOST: std::time::Duration = std::time::Duration::from_secs(10);

/// Writes a verified manifest to `.aether/manifests/` (atomically) and keeps it parsed.
fn keep_manifest(
    ws: &Workspace,
    digest: &Digest,
    bytes: &[u8],
    manifest: &Arc<Manifest>,
) -> std::io::Result<()> {
    write_manifest(ws, digest, bytes)?;
    ws.remember_manifest(*digest, manifest.clone());
    Ok(())
}

/// Writes a verified manifest to `.aether/manifests/` (atomically).
fn write_manifest(ws: &Workspace, digest: &Digest, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = ws.temp_path("manifest");
    let mut file = fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    fs::rename(&tmp, ws.manifest_path(digest))
}

/// A refused manifest: final for its digest (the bytes are verified; trying again gives
/// the same verdict).
fn refused(e: ManifestError) -> RefreshError {
    let reason = match e {
        ManifestError::Invalid(_) => Reason::Extract,
        ManifestError::Replay(_) => Reason::Replay,
        ManifestError::Expired(_) => Reason::Expired,
    };
    RefreshError::new(reason, e).settled()
}
