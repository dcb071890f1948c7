//! A manifest release's refresh (`aether.dev/format: manifest`): the manifest fetched and
//! checked against its digest (already signed), its safe-extraction rules and replay;
//! only the objects not yet on the volume downloaded and verified; the release assembled
//! from a kept one by the difference; then the same atomic swap as a tar.gz release.

use std::fs;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use aether_common::contract::annotations::DesiredRelease;
use aether_common::release::delta::{self, MAX_PATCH_BYTES};
use aether_common::release::{EntryType, MAX_MANIFEST_BYTES, Manifest, ManifestError};
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
        // Until this refresh returns, the manifests it lets go are freed and unlinked
        // later (taken once the lock is: a collection or a spare copy let go of theirs at
        // once).
        let _refreshing = self.workspace.refreshing();
        // A spare copy or an object collection may hold the lock for a while: its own stage.
        let mut stages = Stages::default();
        stages.lap(Stage::Wait, &mut clock);
        let kept_path = self.workspace.manifest_path(&digest);
        let kept = fs::read(&kept_path)
            .ok()
            .filter(|b| Digest::of(b) == digest);
        let known = self.known_manifest();
        let (bytes, downloaded) = match kept {
            Some(kept) => (bytes::Bytes::from(kept), None),
            None => {
                // Absent, or damaged on disk: fetched again, and checked like any download.
                let _ = fs::remove_file(&kept_path);
                self.workspace.forget_manifest(&digest);
                let held = self.held_manifest(&digest).await;
                let (fetched, wire) = self
                    .download_manifest(url.clone(), &digest, held, cancel)
                    .await?;
                (bytes::Bytes::from(fetched), Some(wire))
            }
        };
        // A downloaded manifest is written to a temporary file while it is parsed (6 MB
        // for 40,000 files), and put in place only once accepted.
        let writing = downloaded.is_some().then(|| {
            let (ws, bytes) = (self.workspace.clone(), bytes.clone());
            tokio::task::spawn_blocking(move || write_temp(&ws, &bytes))
        });
        let parsed = {
            let bytes = bytes.clone();
            blocking(move || {
                let parsed = Manifest::parse_against_ends(
                    &bytes,
                    known.as_ref().map(|(_, m, b)| (m.as_ref(), b.as_ref())),
                );
                Ok(parsed.map(|(m, ends)| (m, known.map(|(d, _, _)| d).zip(ends))))
            })
            .await
        };
        // A refused manifest is refused whatever became of its write (the task's
        // temporary file is removed when it ends, unawaited).
        let (manifest, parent) = parsed?.map_err(refused)?;
        let manifest = Arc::new(manifest);
        let high_water = self.high_water.lock().ok().and_then(|h| *h);
        manifest
            .check_fresh(app, high_water, jiff::Timestamp::now())
            .map_err(refused)?;
        let totals = self.check_limits(&manifest)?;
        let written = match writing {
            Some(writing) => Some(
                writing
                    .await
                    .map_err(|e| RefreshError::new(Reason::Io, e))?
                    .map_err(|e| {
                        RefreshError::new(Reason::Io, format!("keeping the manifest: {e}"))
                    })?,
            ),
            None => None,
        };
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
        // Kept before anything else is done with it (a release on disk always has its
        // manifest; one left without a release, by a failure or a kill, is removed by the
        // next collection). A release on disk whose manifest was lost gets it back, so it
        // can be a base and its objects are not collected.
        if let Some(written) = written {
            fs::rename(written.path(), &kept_path)
                .map_err(|e| RefreshError::new(Reason::Io, format!("keeping the manifest: {e}")))?;
            if !new_release {
                self.workspace.remember_manifest(digest, manifest.clone());
            }
        }
        let mut applied = Applied {
            downloaded: downloaded.unwrap_or(0),
            reused: true,
            seq: Some(manifest.seq),
            delta: None,
            bytes_reused: 0,
            stages,
        };
        applied.stages.lap(Stage::Manifest, &mut clock);
        if new_release {
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
            applied.bytes_reused = totals.bytes.saturating_sub(fetched.downloaded);
            applied.stages.lap(Stage::Objects, &mut clock);
            let delta = blocking(move || {
                // What the user changed: the difference from the live release (often the
                // base itself, as its spare copy).
                let mut delta = match (&base, live) {
                    (Some(base), Some(live)) if base.digest == live => {
                        base.changes.delta(&base.manifest, &manifest, totals.files)
                    }
                    _ => {
                        let before = live.and_then(|d| Some((d, ws.kept_manifest(&d).ok()?)));
                        let ends = before
                            .as_ref()
                            .and_then(|(d, _)| lineage.between(d, &digest));
                        let before = before
                            .map(|(_, m)| m)
                            .unwrap_or_else(|| Arc::new(assemble::empty(&manifest)));
                        assemble::Changes::between_known(&before, &manifest, ends).delta(
                            &before,
                            &manifest,
                            totals.files,
                        )
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

    /// A manifest this fetcher holds, to ask for `digest` as the difference from it: the
    /// one accepted last while it is kept in memory, else the live release's, read back
    /// (after a start, or after a first release, which does not keep its bytes). Not
    /// hashed again: bytes that are not what they were would rebuild a manifest that does
    /// not verify, and it would then be downloaded whole.
    async fn held_manifest(&self, digest: &Digest) -> Option<(Digest, bytes::Bytes)> {
        let last = self.last_manifest.lock().ok()?.clone();
        let held = match last {
            Some(last) => last,
            None => {
                let live = self.workspace.live_digest()?;
                let path = self.workspace.manifest_path(&live);
                // 6 MB for 40,000 files: off the async workers.
                let bytes = blocking(move || fs::read(path)).await.ok()?;
                (live, bytes.into())
            }
        };
        // Asked for by its own digest, a store would answer "not modified".
        (held.0 != *digest).then_some(held)
    }

    /// The manifest of `digest`: its bytes, verified, and how many bytes came over the
    /// wire. With `held`, asked for as a patch against that manifest (`release::delta`);
    /// a store that does not answer with one sends it whole, and a patch that is not ours,
    /// cannot be applied or does not rebuild `digest` is followed by one download of the
    /// whole.
    async fn download_manifest(
        &self,
        url: reqwest::Url,
        digest: &Digest,
        held: Option<(Digest, bytes::Bytes)>,
        cancel: &CancellationToken,
    ) -> Result<(Vec<u8>, u64), RefreshError> {
        let mut wire = 0;
        // A whole manifest: the answer to the request for a patch when it is not one,
        // else the answer to a plain request.
        let mut whole = None;
        if let Some((base, held)) = held {
            let request = self
                .http
                .get(url.clone())
                .header(delta::A_IM_HEADER, delta::IM)
                .header(reqwest::header::IF_NONE_MATCH, delta::etag(&base));
            // Whatever goes wrong with the request for a patch, the manifest is asked for
            // whole once: a store may know nothing of patches, or fail to make one.
            match self.start_manifest(request, &url, cancel).await {
                Err(RefreshError::Cancelled) => return Err(RefreshError::Cancelled),
                Err(e) => tracing::warn!(
                    error = %e,
                    "asking for the manifest as a patch failed; downloading it whole"
                ),
                Ok(response) if response.status() != reqwest::StatusCode::IM_USED => {
                    whole = Some(response);
                }
                Ok(response) => {
                    match self
                        .rebuild(response, &base, held, digest, &mut wire, cancel)
                        .await
                    {
                        Ok(Some(bytes)) => return Ok((bytes, wire)),
                        Ok(None) => {}
                        Err(RefreshError::Cancelled) => return Err(RefreshError::Cancelled),
                        Err(e) => tracing::warn!(
                            error = %e,
                            "receiving a manifest patch failed; downloading the manifest whole"
                        ),
                    }
                }
            }
        }
        let response = match whole {
            Some(response) => response,
            None => {
                let request = self.http.get(url.clone());
                self.start_manifest(request, &url, cancel).await?
            }
        };
        let got = self.receive(response, self.manifest_cap(), cancel).await?;
        wire += got.bytes.len() as u64;
        // Verified before it is parsed: unverified bytes could be a parse made to exhaust
        // the pod's memory.
        verify::digest(digest, &got.digest)?;
        Ok((got.bytes, wire))
    }

    /// The manifest `digest` rebuilt from `held` (of digest `base`) by the patch a
    /// `226 IM Used` answer carries; `None` (logged) when the answer is not such a patch,
    /// cannot be applied or rebuilds other bytes, an error when its body could not be
    /// received (past `MAX_PATCH_BYTES`, cut): the manifest is then downloaded whole.
    async fn rebuild(
        &self,
        response: reqwest::Response,
        base: &Digest,
        held: bytes::Bytes,
        digest: &Digest,
        wire: &mut u64,
        cancel: &CancellationToken,
    ) -> Result<Option<Vec<u8>>, RefreshError> {
        if !is_patch_against(&response, base) {
            tracing::warn!(
                "a 226 answer without `IM: aether-patch` and a Delta-Base naming the held \
                 manifest; downloading the manifest whole"
            );
            return Ok(None);
        }
        let cap = self.manifest_cap();
        // Errors out (and the manifest is downloaded whole) past this many bytes.
        let patch = self
            .receive(response, MAX_PATCH_BYTES.min(cap), cancel)
            .await?
            .bytes;
        *wire += patch.len() as u64;
        // 6 MB written and hashed for 40,000 files: off the async workers.
        let rebuilt = blocking(move || {
            Ok(delta::apply(&held, &patch, cap).map(|bytes| {
                let actual = Digest::of(&bytes);
                (bytes, actual)
            }))
        })
        .await?;
        match rebuilt {
            Ok((bytes, actual)) if actual == *digest => return Ok(Some(bytes)),
            Ok((_, actual)) => tracing::warn!(
                expected = %digest,
                rebuilt = %actual,
                "a manifest patch did not rebuild the manifest; downloading it whole"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "a manifest patch could not be applied; downloading the manifest whole"
            ),
        }
        Ok(None)
    }

    /// Sends a manifest request; its announced length within the cap.
    async fn start_manifest(
        &self,
        request: reqwest::RequestBuilder,
        url: &reqwest::Url,
        cancel: &CancellationToken,
    ) -> Result<reqwest::Response, RefreshError> {
        tokio::select! {
            r = fetch::send(request, url, self.manifest_cap()) => r,
            () = cancel.cancelled() => Err(RefreshError::Cancelled),
        }
    }

    /// At most `MAX_MANIFEST_BYTES`, and the artifact cap.
    fn manifest_cap(&self) -> u64 {
        MAX_MANIFEST_BYTES.min(self.max_artifact_bytes)
    }

    /// A body of at most `cap` bytes, hashed as it arrives (6 MB for 40,000 files: the
    /// hash is done when the last byte is).
    async fn receive(
        &self,
        mut response: reqwest::Response,
        cap: u64,
        cancel: &CancellationToken,
    ) -> Result<Received, RefreshError> {
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
        Ok(Received {
            bytes,
            digest: hash.finish(),
        })
    }

    /// The extraction limits apply to a manifest's files as to an archive's entries.
    /// Returns the totals, counted here once: each pass over 40,000 entries costs about a
    /// millisecond, and the rest of a refresh follows what changed.
    fn check_limits(&self, manifest: &Manifest) -> Result<Totals, RefreshError> {
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
        let totals = Totals::of(manifest);
        let bytes = totals.bytes;
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
        Ok(totals)
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

/// Writes a verified manifest to a temporary file in staging, removed when dropped unless
/// renamed into `.aether/manifests/` first.
fn write_temp(ws: &Workspace, bytes: &[u8]) -> std::io::Result<objects::Temp> {
    let tmp = objects::Temp(ws.temp_path("manifest"));
    fs::File::create(tmp.path())?.write_all(bytes)?;
    Ok(tmp)
}

/// A manifest's files: how many, and their size.
#[derive(Debug, Clone, Copy)]
struct Totals {
    files: u64,
    bytes: u64,
}

impl Totals {
    fn of(manifest: &Manifest) -> Self {
        let files = manifest
            .entries
            .iter()
            .filter(|e| e.kind == EntryType::File);
        files.fold(Self { files: 0, bytes: 0 }, |t, e| Self {
            files: t.files + 1,
            bytes: t.bytes.saturating_add(e.size.unwrap_or(0)),
        })
    }
}

/// A body as received, and its digest.
struct Received {
    bytes: Vec<u8>,
    digest: Digest,
}

/// Whether a `226 IM Used` answer is a patch of ours against `base`.
fn is_patch_against(response: &reqwest::Response, base: &Digest) -> bool {
    let header = |name: &str| response.headers().get(name)?.to_str().ok();
    header(delta::IM_HEADER).is_some_and(delta::used)
        && header(delta::DELTA_BASE_HEADER).and_then(delta::etag_digest) == Some(*base)
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
