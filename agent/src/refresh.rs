//! One refresh: from a desired release to a live one. Signature first (before any
//! request); then, for a tar.gz artifact, one streaming pass (download → SHA-256 and
//! gunzip → tar into staging), the digest check, and only then the commit and the atomic
//! swap of `current`. A manifest release takes the incremental path (`incremental`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aether_common::archive::extract::Limits;
use aether_common::contract::annotations::{DesiredRelease, Format};
use aether_common::{Digest, PublicKey, Sha256Writer};
use tokio_util::sync::CancellationToken;

use crate::assemble::Delta;
use crate::failure::{Reason, RefreshError};
use crate::workspace::{Staging, Workspace};
use crate::{extract_bridge, fetch, verify};

/// The steps of a refresh timed on their own (`dev_hot_refresh_stage_seconds{stage}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Wait,
    Artifact,
    Manifest,
    Objects,
    Assemble,
    Swap,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Wait,
        Stage::Artifact,
        Stage::Manifest,
        Stage::Objects,
        Stage::Assemble,
        Stage::Swap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Wait => "wait",
            Stage::Artifact => "artifact",
            Stage::Manifest => "manifest",
            Stage::Objects => "objects",
            Stage::Assemble => "assemble",
            Stage::Swap => "swap",
        }
    }
}

/// How long each stage a refresh went through took.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stages([Option<Duration>; Stage::ALL.len()]);

impl Stages {
    /// Records the time since `*since` as `stage`'s, and restarts the clock.
    pub fn lap(&mut self, stage: Stage, since: &mut Instant) {
        let now = Instant::now();
        self.0[stage as usize] = Some(now - *since);
        *since = now;
    }

    /// The stages gone through, in order.
    pub fn iter(&self) -> impl Iterator<Item = (Stage, Duration)> + '_ {
        Stage::ALL
            .into_iter()
            .zip(self.0)
            .filter_map(|(stage, d)| Some((stage, d?)))
    }

    /// Milliseconds of `stage` (0 if the refresh did not go through it), for the log.
    pub fn ms(&self, stage: Stage) -> f64 {
        self.0[stage as usize].map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }
}

/// What a successful refresh did.
#[derive(Debug, Clone, Copy)]
pub struct Applied {
    /// Bytes downloaded (0 when the release was already on disk).
    pub downloaded: u64,
    /// The release was already on disk (a kept earlier release): nothing was fetched.
    pub reused: bool,
    /// A manifest release: its `seq`.
    pub seq: Option<u64>,
    /// A manifest release that was built: how it differs from its base.
    pub delta: Option<Delta>,
    /// A manifest release that was built: bytes of its files already on the volume.
    pub bytes_reused: u64,
    pub stages: Stages,
}

/// Everything a refresh needs; cheap to share.
pub struct Refresher {
    pub workspace: Arc<Workspace>,
    pub http: reqwest::Client,
    pub key: Option<PublicKey>,
    pub max_artifact_bytes: u64,
    pub limits: Limits,
    pub keep_releases: usize,
    /// `AETHER_APP`: manifests for another app are refused.
    pub app: Option<String>,
    /// `AETHER_REQUIRE_MANIFEST`: tar.gz releases are refused.
    pub require_manifest: bool,
    /// The highest manifest `seq` made live, with its digest (persisted in `state.json`).
    pub high_water: Mutex<Option<(u64, Digest)>>,
    /// Held while objects are brought in or collected: a collection running beside a
    /// refresh would remove objects the refresh has just fetched.
    pub objects_lock: Arc<tokio::sync::Mutex<()>>,
    /// Schedules object collections after swaps.
    pub collector: Arc<crate::incremental::Collector>,
    /// The bytes of the manifest accepted last, by digest: the next one is parsed
    /// against it (`Manifest::parse_against`).
    pub last_manifest: Mutex<Option<(Digest, bytes::Bytes)>>,
    /// How the manifests accepted last share entries with those parsed against.
    pub lineage: Mutex<crate::assemble::Lineage>,
}

impl Refresher {
    /// Makes `desired` the live release. Cancelling `cancel` stops the refresh early with
    /// `RefreshError::Cancelled`, after its staging directory is removed.
    pub async fn apply(
        &self,
        desired: &DesiredRelease,
        cancel: &CancellationToken,
    ) -> Result<Applied, RefreshError> {
        verify::signature(self.key.as_ref(), desired)?;
        // The scheme was checked with the annotations (`desired_release`), and the client
        // itself is https-only unless AETHER_ALLOW_HTTP=1; this is the full parse.
        let url = reqwest::Url::parse(&desired.url).map_err(|e| {
            RefreshError::new(Reason::InvalidAnnotation, format!("artifact URL: {e}"))
        })?;
        if desired.format == Format::Manifest {
            return self.apply_manifest(desired, url, cancel).await;
        }
        if self.require_manifest {
            return Err(RefreshError::new(
                Reason::Replay,
                "a tar.gz release carries no seq, and AETHER_REQUIRE_MANIFEST=1 refuses it",
            )
            .settled());
        }
        let digest = desired.digest;
        let mut clock = Instant::now();
        let mut applied = if self.workspace.has_release(&digest) {
            Applied {
                downloaded: 0,
                reused: true,
                seq: None,
                delta: None,
                bytes_reused: 0,
                stages: Stages::default(),
            }
        } else {
            let downloaded = self.download(url, &digest, cancel).await?;
            let mut stages = Stages::default();
            stages.lap(Stage::Artifact, &mut clock);
            Applied {
                downloaded,
                reused: false,
                seq: None,
                delta: None,
                bytes_reused: 0,
                stages,
            }
        };
        self.swap(digest).await?;
        applied.stages.lap(Stage::Swap, &mut clock);
        // Objects of manifest releases this one replaced.
        self.collect_garbage();
        Ok(applied)
    }

    /// Points `current` at the release and prunes the old ones.
    pub(crate) async fn swap(&self, digest: Digest) -> Result<(), RefreshError> {
        let ws = self.workspace.clone();
        let keep = self.keep_releases;
        blocking(move || {
            ws.activate(&digest)?;
            if let Err(e) = ws.prune(keep, &digest) {
                // The new release is live; a failed clean-up must not undo that.
                tracing::warn!(error = %e, "could not remove old releases");
            }
            Ok(())
        })
        .await
    }

    /// Streams the artifact into a verified release directory; returns the bytes read.
    ///
    /// Every byte is hashed. When the extractor stops early (it refused the archive) the
    /// rest of the body is still hashed, up to the download cap: bytes that match the
    /// annotated digest make the refusal final for that digest (retrying would fetch the
    /// same refused bytes), while a mismatch is a `checksum` failure worth retrying.
    async fn download(
        &self,
        url: reqwest::Url,
        digest: &Digest,
        cancel: &CancellationToken,
    ) -> Result<u64, RefreshError> {
        let mut response = tokio::select! {
            r = fetch::start(&self.http, url, self.max_artifact_bytes) => r?,
            () = cancel.cancelled() => return Err(RefreshError::Cancelled),
        };
        let staging = self.workspace.stage(digest).map_err(|e| {
            RefreshError::new(Reason::Io, format!("creating staging directory: {e}"))
        })?;
        let (feed, extractor) = extract_bridge::spawn(staging, self.limits, cancel.clone());
        let mut feed = Some(feed);
        let mut hasher = Sha256Writer::new();
        let mut total = 0u64;
        let stream_error = loop {
            let chunk = tokio::select! {
                c = response.chunk() => c,
                () = cancel.cancelled() => break Some(RefreshError::Cancelled),
            };
            let bytes = match chunk {
                Ok(Some(bytes)) => bytes,
                Ok(None) => break None,
                Err(e) => break Some(fetch::classify(e)),
            };
            total += bytes.len() as u64;
            if total > self.max_artifact_bytes {
                break Some(RefreshError::new(
                    Reason::TooLarge,
                    format!(
                        "artifact exceeds {} bytes (AETHER_MAX_ARTIFACT_BYTES)",
                        self.max_artifact_bytes
                    ),
                ));
            }
            hasher.update(&bytes);
            if let Some(tx) = &feed {
                let sent = tokio::select! {
                    s = tx.send(bytes) => s.is_ok(),
                    () = cancel.cancelled() => break Some(RefreshError::Cancelled),
                };
                if !sent {
                    // The extractor gave up on the archive; keep hashing for the verdict.
                    feed = None;
                }
            }
        };
        drop(feed);
        if let Some(RefreshError::Cancelled) = stream_error {
            // Not waiting for the extractor: its thread sees the cancel flag (or the closed
            // feed) and drops the staging directory, which removes it. A thread stuck in
            // a system call must not hold up a deadline or a shutdown.
            return Err(RefreshError::Cancelled);
        }
        // The body is in; the extractor may still be busy (large files, the final checks of
        // the links). The deadline and a newer release must still be able to end the wait.
        let joined = tokio::select! {
            j = extractor => j,
            () = cancel.cancelled() => return Err(RefreshError::Cancelled),
        };
        let (staging, extracted) =
            joined.map_err(|e| RefreshError::new(Reason::Io, format!("extractor task: {e}")))?;
        if let Some(err) = stream_error {
            discard(staging).await;
            return Err(err);
        }
        if let Err(e) = verify::digest(digest, &hasher.finish()) {
            discard(staging).await;
            return Err(e);
        }
        if let Err(e) = extracted {
            discard(staging).await;
            let err = extract_bridge::classify(e);
            return Err(match err {
                // Disk full or permissions: the node may recover, so it is retried.
                RefreshError::Failed {
                    reason: Reason::Io, ..
                } => err,
                other => other.settled(),
            });
        }
        let ws = self.workspace.clone();
        let digest = *digest;
        blocking(move || ws.commit(staging, &digest)).await?;
        Ok(total)
    }
}

/// Removes a staging directory off the async runtime.
async fn discard(staging: Staging) {
    let _ = tokio::task::spawn_blocking(move || drop(staging)).await;
}

/// Runs file system work off the async runtime; its errors are `io` failures.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, RefreshError>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RefreshError::new(Reason::Io, e))?
        .map_err(|e| RefreshError::new(Reason::Io, e))
}
