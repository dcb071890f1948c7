//! Manifests served as a patch against the one the client holds
//! (`aether_common::release::delta`). The release route and the local loop make the patch
//! from the two manifests they have in memory anyway; otherwise the two are read and
//! compared on the first request, one pair at a time. Either way the patch is kept for
//! the app's other pods, which ask for the same one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aether_common::Digest;
use aether_common::release::delta;
use bytes::Bytes;
use tokio::sync::Semaphore;

use super::{Kind, Store, StoreError};

/// Patches of recent pairs `(base, target)`, newest or most recently used first; `None`
/// for a pair better served whole (so that it is not compared again).
#[derive(Debug)]
pub(super) struct Recent {
    kept: Mutex<VecDeque<(Digest, Digest, Option<Bytes>)>>,
    /// One comparison at a time: each holds two manifests in memory. The permit goes with
    /// the comparison itself, so a client that goes away does not free it early.
    comparing: Arc<Semaphore>,
}

impl Default for Recent {
    fn default() -> Self {
        Self {
            kept: Mutex::default(),
            comparing: Arc::new(Semaphore::new(1)),
        }
    }
}

/// Pairs kept: a few apps saving at once.
const KEPT: usize = 16;
/// Larger patches are not kept (a save of many files; rare, and big).
const KEPT_BYTES: usize = 1 << 20;
/// Manifests larger than this are not compared on request (both are read to compare
/// them): about 200,000 entries.
const MAX_COMPARED_BYTES: u64 = 32 << 20;
/// How long a request waits for another comparison before it is served whole.
const COMPARE_WAIT: Duration = Duration::from_secs(2);

impl Store {
    /// Keeps a patch made elsewhere (the release route's, from the manifests it checked;
    /// the local loop's) of a `whole`-byte manifest for the pods that will ask for it, if
    /// it is worth sending.
    pub fn keep_patch(&self, base: Digest, target: Digest, patch: Vec<u8>, whole: usize) {
        if delta::worth_sending(patch.len(), whole) && patch.len() <= KEPT_BYTES {
            self.deltas.keep(base, target, Some(patch.into()));
        }
    }

    /// Blob `target` as a patch against blob `base`, or `None` when it is better served
    /// whole: `base` is not stored (collected, or never a blob here), either is not a
    /// manifest or larger than `MAX_COMPARED_BYTES`, the patch is not worth sending, or
    /// another comparison keeps this one waiting too long.
    pub async fn manifest_patch(
        &self,
        base: &Digest,
        target: &Digest,
    ) -> Result<Option<Bytes>, StoreError> {
        if let Some(known) = self.deltas.find(base, target) {
            return Ok(known);
        }
        let Ok(Ok(permit)) =
            tokio::time::timeout(COMPARE_WAIT, self.deltas.comparing.clone().acquire_owned()).await
        else {
            return Ok(None);
        };
        // Made while this one waited?
        if let Some(known) = self.deltas.find(base, target) {
            return Ok(known);
        }
        let read = |digest| self.read_small(Kind::Blob, digest, MAX_COMPARED_BYTES);
        let held = match read(base).await {
            Err(StoreError::Missing(..) | StoreError::TooLarge(_)) => return Ok(None),
            other => other?,
        };
        let wanted = match read(target).await {
            Err(StoreError::TooLarge(_)) => return Ok(None),
            other => other?,
        };
        // Blobs are any files; only manifests are compared.
        let manifest = |b: &[u8]| b.starts_with(b"{\"app\":");
        let patch = if manifest(&held) && manifest(&wanted) {
            // Tens of megabytes compared at most: off the async workers.
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let patch = delta::encode(&held, &wanted);
                delta::worth_sending(patch.len(), wanted.len()).then(|| Bytes::from(patch))
            })
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
        } else {
            None
        };
        if patch.as_ref().is_none_or(|p| p.len() <= KEPT_BYTES) {
            self.deltas.keep(*base, *target, patch.clone());
        }
        Ok(patch)
    }
}

impl Recent {
    /// What is known of a pair, moved to the front.
    fn find(&self, base: &Digest, target: &Digest) -> Option<Option<Bytes>> {
        let mut kept = self.kept.lock().ok()?;
        let at = kept.iter().position(|(b, t, _)| b == base && t == target)?;
        let hit = kept.remove(at)?;
        let patch = hit.2.clone();
        kept.push_front(hit);
        Some(patch)
    }

    fn keep(&self, base: Digest, target: Digest, patch: Option<Bytes>) {
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        kept.retain(|(b, t, _)| (*b, *t) != (base, target));
        if kept.len() == KEPT {
            kept.pop_back();
        }
        kept.push_front((base, target, patch));
    }
}
