//! Turns a source tree into a release the control plane can hand to pods: a manifest
//! (default: only the blobs the store lacks travel) or a whole tar.gz. Shared by `aether
//! deploy`, `aether dev --hot` and `aether rollback`.

use std::path::Path;

use aether_common::contract::annotations::Format;
use aether_common::release::Manifest;
use aether_common::{Digest, SigningKey};
use anyhow::Context;

use crate::api::ReleaseRequest;
use crate::client::Client;
use crate::known::KnownBlobs;
use crate::snapshot::{self, HashCache};

/// `--format`: how releases travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// A signed manifest of file hashes; only missing files are uploaded.
    Manifest,
    /// The whole tree as one tar.gz.
    Tar,
}

/// A release ready to be sent as a deploy or a release request.
pub struct Prepared {
    pub request: ReleaseRequest,
    pub digest: Digest,
    /// Identifies the tree's content (equal for an unchanged tree).
    pub tree: Digest,
    pub files: usize,
    /// Blobs and bytes uploaded for it.
    pub sent_blobs: usize,
    pub sent_bytes: u64,
    /// Files hashed (the others came from the cache).
    pub hashed: usize,
}

/// Publishes successive releases of one app.
pub struct Publisher {
    pub app: String,
    pub namespace: Option<String>,
    pub key: Option<SigningKey>,
    pub format: FormatArg,
    /// Manifests expire this long after they are made (`--expires-in`).
    pub expires_in: Option<jiff::SignedDuration>,
    /// The source directory's hash cache (a publisher serves one directory).
    cache: Option<HashCache>,
    /// What the directory's watcher saw change, when one runs (`aether dev`).
    pub changes: Option<snapshot::Changes>,
    last_seq: Option<u64>,
    /// Blobs of the last snapshot the store holds (it said so, or took them): a save asks
    /// only about the others. The store never deletes a blob; `forget_stored` after a
    /// failed or refused release asks about every blob again, in case one went missing.
    stored: KnownBlobs,
    /// When the store was last asked about every blob: at least every `ASK_ALL_EVERY`,
    /// since a pod that starts later may need a blob no release of this loop saw fail.
    asked_all: Option<std::time::Instant>,
}

/// How long the loop trusts what it knows to be stored before asking about every blob.
const ASK_ALL_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Publisher {
    pub fn new(
        app: String,
        namespace: Option<String>,
        key: Option<SigningKey>,
        format: FormatArg,
    ) -> Self {
        Self {
            app,
            namespace,
            key,
            format,
            expires_in: None,
            cache: None,
            changes: None,
            last_seq: None,
            stored: KnownBlobs::default(),
            asked_all: None,
        }
    }

    /// The next save asks the store about every blob again.
    pub fn forget_stored(&mut self) {
        self.stored.clear();
    }

    /// When a manifest made now expires.
    fn expires_at(&self) -> anyhow::Result<Option<jiff::Timestamp>> {
        self.expires_in
            .map(|d| jiff::Timestamp::now().checked_add(d))
            .transpose()
            .context("--expires-in is out of range")
    }

    /// Builds the release of `source` and uploads what the store lacks; the caller sends
    /// the request. A `.tar.gz` file is always released as is. `None` (nothing uploaded)
    /// when the tree is `unchanged_from`.
    pub async fn prepare(
        &mut self,
        client: &Client,
        source: &Path,
        unchanged_from: Option<Digest>,
    ) -> anyhow::Result<Option<Prepared>> {
        if self.format == FormatArg::Tar || source.is_file() {
            return self.prepare_tar(client, source, unchanged_from).await;
        }
        if self.last_seq.is_none() {
            self.last_seq = desired_manifest(client, &self.app, self.namespace.as_deref())
                .await
                .map(|m| m.seq);
        }
        let seq = snapshot::next_seq(self.last_seq);
        let release = snapshot::Release {
            app: self.app.clone(),
            seq,
            expires_at: self.expires_at()?,
        };
        let snap = snapshot::take(source, &mut self.cache, release, self.changes.as_ref()).await?;
        if Some(snap.tree) == unchanged_from {
            self.stored.unchanged(&snap);
            return Ok(None);
        }
        if self.asked_all.is_none_or(|t| t.elapsed() >= ASK_ALL_EVERY) {
            self.stored.clear();
        }
        let asking_all = self.stored.is_empty();
        let pushed = client.push(&snap, &mut self.stored).await?;
        if asking_all {
            self.asked_all = Some(std::time::Instant::now());
        }
        self.last_seq = Some(seq);
        Ok(Some(Prepared {
            request: self.manifest_request(&snap.digest),
            digest: snap.digest,
            tree: snap.tree,
            files: snap.files(),
            sent_blobs: pushed.blobs,
            sent_bytes: pushed.bytes,
            hashed: snap.hashed,
        }))
    }

    /// The release request of a manifest already in the store.
    pub fn manifest_request(&self, digest: &Digest) -> ReleaseRequest {
        self.request(digest, None, Format::Manifest)
    }

    /// A release request of `digest`, signed when a key is configured; without `url` the
    /// control plane names its own copy.
    pub fn request(&self, digest: &Digest, url: Option<String>, format: Format) -> ReleaseRequest {
        ReleaseRequest {
            namespace: self.namespace.clone(),
            digest: digest.to_string(),
            url,
            signature: self.key.as_ref().map(|k| k.sign(digest).hex()),
            build_commit: None,
            format: (format == Format::Manifest).then(|| format.as_str().to_owned()),
        }
    }

    async fn prepare_tar(
        &self,
        client: &Client,
        source: &Path,
        unchanged_from: Option<Digest>,
    ) -> anyhow::Result<Option<Prepared>> {
        let packed = crate::dev::pack_dir(source.to_path_buf())
            .await
            .with_context(|| format!("packing {}", source.display()))?;
        let digest = packed.digest;
        if Some(digest) == unchanged_from {
            return Ok(None);
        }
        let len = packed.bytes.len() as u64;
        // Without a URL the control plane names its own copy.
        let (url, stored) = if client.has_artifact(&digest).await? {
            (None, false)
        } else {
            let uploaded = client.upload(&digest, packed.bytes).await?;
            (Some(uploaded.url), uploaded.stored)
        };
        Ok(Some(Prepared {
            request: self.request(&digest, url, Format::TarGz),
            digest,
            tree: digest,
            files: packed.files,
            sent_blobs: usize::from(stored),
            sent_bytes: if stored { len } else { 0 },
            hashed: packed.files,
        }))
    }
}

/// The manifest the app's Deployment asks for now, if its release is a manifest in the
/// store.
pub async fn desired_manifest(
    client: &Client,
    app: &str,
    namespace: Option<&str>,
) -> Option<Manifest> {
    let status = client.status_of(app, namespace, Some(&[])).await.ok()?;
    let digest: Digest = status.desired_digest?.parse().ok()?;
    manifest_of(client, &digest).await.ok().flatten()
}

/// A stored manifest, checked against its digest; `None` when the store has no such blob.
pub async fn manifest_of(client: &Client, digest: &Digest) -> anyhow::Result<Option<Manifest>> {
    let Some(bytes) = client.blob(digest).await? else {
        return Ok(None);
    };
    if Digest::of(&bytes) != *digest {
        anyhow::bail!("the store returned bytes that do not hash to {digest}");
    }
    Manifest::parse(&bytes)
        .map(Some)
        .with_context(|| format!("{digest} is stored but is not a release manifest"))
}

/// `aether rollback`: makes `to` (default: the release before the desired one) the
/// desired release again. A manifest comes back as a new manifest with the old entries and
/// a new `seq` (fetchers refuse a lower one), so its blobs, all still stored, make it
/// instant; a tar.gz artifact is released again as it is. Returns the digest released.
pub async fn rollback(
    client: &Client,
    publisher: &Publisher,
    to: Option<Digest>,
) -> anyhow::Result<Digest> {
    let app = &publisher.app;
    // No pod is read: only the Deployment's annotations matter here.
    let status = client
        .status_of(app, publisher.namespace.as_deref(), Some(&[]))
        .await?;
    let target = match to {
        Some(d) => d,
        None => status
            .previous_digest
            .as_deref()
            .and_then(|d| d.parse().ok())
            .with_context(|| {
                format!("no earlier release of {app} is recorded; give one with --to DIGEST")
            })?,
    };
    let Some(old) = manifest_of(client, &target).await? else {
        // Not a manifest: a tar.gz artifact of the store, released as it is.
        client
            .release(app, &publisher.request(&target, None, Format::TarGz))
            .await?;
        return Ok(target);
    };
    if &old.app != app {
        anyhow::bail!("{target} is a release of {:?}, not of {app:?}", old.app);
    }
    let hashes: Vec<Digest> = old
        .entries
        .iter()
        .filter_map(|e| e.sha256.as_deref())
        .filter_map(|h| format!("sha256:{h}").parse().ok())
        .collect();
    let missing = client.missing(&hashes).await?;
    if let Some(first) = missing.first() {
        anyhow::bail!(
            "{} files of {target} are no longer in the store (first: {first})",
            missing.len()
        );
    }
    let current_seq = match status.desired_digest.as_deref().map(str::parse::<Digest>) {
        Some(Ok(d)) => manifest_of(client, &d).await?.map(|m| m.seq),
        _ => None,
    };
    let manifest = Manifest {
        seq: snapshot::next_seq(current_seq.max(Some(old.seq))),
        created_at: jiff::Timestamp::now().to_string(),
        expires_at: publisher.expires_at()?.map(|t| t.to_string()),
        ..old
    };
    let bytes = manifest.to_canonical();
    let digest = Digest::of(&bytes);
    client.put_blob(&digest, bytes).await?;
    client
        .release(app, &publisher.manifest_request(&digest))
        .await?;
    Ok(digest)
}
