//! The artifact store: content-addressed release artifacts (`sha256/<hex>.tar.gz`) and
//! blobs of the content store (`blobs/<hex>`: files of releases, manifests), in one of two
//! backends behind the same interface: a directory on the control plane's disk (`local`,
//! the default and the local loop's) or S3-compatible object storage (`s3`), where several
//! control-plane replicas share it. Whatever the backend, an upload is hashed while it
//! streams and becomes visible under its digest only when the hash matches.

mod delta;
mod local;
mod s3;
#[cfg(test)]
mod tests;

use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use aether_common::Digest;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};

pub use s3::{DownloadMode, S3Config};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("upload hashes to {got}, the request claimed {claimed}")]
    Mismatch { claimed: Digest, got: Digest },
    #[error("upload exceeds {0} bytes")]
    TooLarge(u64),
    #[error("reading the upload: {0}")]
    Body(String),
    #[error("batch entry {entry:?}: {why}")]
    Batch { entry: String, why: String },
    #[error("no {0} {1}")]
    Missing(&'static str, Digest),
    #[error("store I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("object storage: {0}")]
    Backend(String),
}

/// Objects of a batched download opened ahead of the one being sent.
const BATCH_PREFETCH: usize = 8;

/// Most entries in one batched upload; a client sends more in several batches.
pub const MAX_BATCH_ENTRIES: u64 = 100_000;

/// What a batched upload did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchReport {
    /// Blobs written.
    pub stored: u64,
    /// Blobs that were already there (their bytes were read and dropped).
    pub known: u64,
}

/// Which of the two content-addressed namespaces an object belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Artifact,
    Blob,
}

impl Kind {
    /// The word for it in errors.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Artifact => "artifact",
            Kind::Blob => "blob",
        }
    }
}

/// How a stored object reaches a client.
pub enum Download {
    /// Its bytes, through this process.
    Stream {
        len: u64,
        body: BoxStream<'static, io::Result<Bytes>>,
    },
    /// A short-lived URL the client fetches it from directly.
    Redirect(String),
}

#[derive(Debug)]
enum Backend {
    Local(local::Local),
    S3(s3::S3),
}

#[derive(Debug)]
pub struct Store {
    backend: Backend,
    deltas: delta::Recent,
}

impl Store {
    /// The directory store under `data_dir`.
    pub fn open(data_dir: &Path, max_bytes: u64) -> io::Result<Self> {
        Ok(Self {
            backend: Backend::Local(local::Local::open(data_dir, max_bytes)?),
            deltas: Default::default(),
        })
    }

    /// The object-storage store `config` describes.
    pub fn s3(config: &S3Config, max_bytes: u64) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::S3(s3::S3::new(config, max_bytes)?),
            deltas: Default::default(),
        })
    }

    /// The same directory store without fsync (the local loop's scratch store).
    pub fn scratch(self) -> Self {
        match self.backend {
            Backend::Local(l) => Self {
                backend: Backend::Local(l.scratch()),
                deltas: self.deltas,
            },
            other => Self {
                backend: other,
                deltas: self.deltas,
            },
        }
    }

    /// Where it keeps its objects, for logs.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Local(l) => l.describe(),
            Backend::S3(s) => s.describe(),
        }
    }

    pub async fn contains_of(&self, kind: Kind, digest: &Digest) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Local(l) => Ok(l.contains_of(kind, digest)),
            Backend::S3(s) => s.contains_of(kind, digest).await,
        }
    }

    /// The stored size of an object; [`StoreError::Missing`] when it is not stored.
    pub async fn size_of(&self, kind: Kind, digest: &Digest) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Local(l) => l.size_of(kind, digest),
            Backend::S3(s) => s
                .size(kind, digest)
                .await?
                .ok_or(StoreError::Missing(kind.noun(), *digest)),
        }
    }

    /// The digests of `wanted` that are not stored as blobs, in their order, once each.
    pub async fn missing_blobs(&self, wanted: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let unique = once_each(wanted);
        match &self.backend {
            Backend::Local(l) => Ok(unique
                .into_iter()
                .filter(|d| !l.contains_of(Kind::Blob, d))
                .collect()),
            Backend::S3(s) => s.missing(Kind::Blob, unique).await,
        }
    }

    /// Stores an artifact if the body hashes to `claimed`; returns false when it was
    /// already there (the body is then not read at all).
    pub async fn put<S, E>(&self, claimed: Digest, body: S) -> Result<bool, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin + Send,
        E: std::fmt::Display,
    {
        self.put_of(Kind::Artifact, claimed, body).await
    }

    /// Stores the body as `kind` if it hashes to `claimed`; returns false when it was
    /// already there (the body is then not read at all).
    pub async fn put_of<S, E>(
        &self,
        kind: Kind,
        claimed: Digest,
        body: S,
    ) -> Result<bool, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin + Send,
        E: std::fmt::Display,
    {
        match &self.backend {
            Backend::Local(l) => l.put_of(kind, claimed, body).await,
            Backend::S3(s) => s.put_of(kind, claimed, body).await,
        }
    }

    /// `put_of` for bytes already in memory (the directory store hashes and writes them
    /// at once); verified all the same.
    pub async fn put_bytes(
        &self,
        kind: Kind,
        claimed: Digest,
        bytes: Bytes,
    ) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Local(l) => l.put_bytes(kind, claimed, bytes).await,
            Backend::S3(s) => {
                let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes)]);
                s.put_of(kind, claimed, body).await
            }
        }
    }

    /// Stores the blobs of a batched upload: an uncompressed tar stream whose entries are
    /// regular files named `sha256:<hex>` (or `<hex>`), each holding that blob. Blocking
    /// (run it off the async runtime, inside it: the object-storage backend hands each
    /// entry to an upload task). Each entry is hashed while it is stored and kept only if
    /// it matches its name; the first entry that does not (a wrong hash, another entry
    /// type, a bad name, too many entries or bytes) ends the request with an error, and
    /// the blobs verified before it stay (they are content-addressed: keeping them is
    /// never wrong). The whole body may not exceed the store's size cap.
    pub fn put_blob_batch<R: Read>(&self, reader: R) -> Result<BatchReport, StoreError> {
        let max_bytes = self.max_bytes();
        let mut archive = tar::Archive::new(reader.take(max_bytes.saturating_add(1)));
        let result = match &self.backend {
            Backend::Local(l) => {
                let mut report = BatchReport::default();
                read_batch(&mut archive, max_bytes, |claimed, _size, entry| {
                    if l.put_entry(claimed, entry, max_bytes)? {
                        report.stored += 1;
                    } else {
                        report.known += 1;
                    }
                    Ok(())
                })
                .map(|()| report)
            }
            Backend::S3(s) => {
                let mut writer = s.batch_writer()?;
                let read = read_batch(&mut archive, max_bytes, |claimed, size, entry| {
                    writer.put_entry(claimed, size, entry)
                });
                // The entries before a bad one finish (and are kept if they verify), as
                // they are with the directory store.
                let finished = writer.finish();
                read.and(finished)
            }
        };
        // The reader is cut one byte past the cap: a batch that reached it is too large,
        // whatever tar made of the cut.
        if archive.into_inner().limit() == 0 {
            return Err(StoreError::TooLarge(max_bytes));
        }
        result
    }

    fn max_bytes(&self) -> u64 {
        match &self.backend {
            Backend::Local(l) => l.max_bytes(),
            Backend::S3(s) => s.max_bytes(),
        }
    }

    /// The stored sizes of the blobs of a batched download, in order and once each;
    /// [`StoreError::Missing`] names the first one the store lacks.
    pub async fn blob_sizes(&self, wanted: &[Digest]) -> Result<Vec<(Digest, u64)>, StoreError> {
        let unique = once_each(wanted);
        match &self.backend {
            Backend::Local(l) => unique
                .into_iter()
                .map(|d| l.size_of(Kind::Blob, &d).map(|size| (d, size)))
                .collect(),
            Backend::S3(s) => s.sizes(Kind::Blob, unique).await,
        }
    }

    /// How a client gets a stored object: a redirect when the backend hands out URLs
    /// (object storage with `--download=redirect`), else its bytes.
    /// [`StoreError::Missing`] when it is not stored (a redirect is not checked: the
    /// object store answers 404 itself).
    pub async fn download(&self, kind: Kind, digest: &Digest) -> Result<Download, StoreError> {
        match &self.backend {
            Backend::Local(l) => l.read(kind, digest).await,
            Backend::S3(s) => s.download(kind, digest).await,
        }
    }

    /// The bytes of a stored object, streamed through this process whatever the download
    /// mode, with their length.
    async fn read(&self, kind: Kind, digest: &Digest) -> Result<Download, StoreError> {
        match &self.backend {
            Backend::Local(l) => l.read(kind, digest).await,
            Backend::S3(s) => s.read(kind, digest).await,
        }
    }

    /// A small stored object (a manifest) in memory; [`StoreError::TooLarge`] past `max`.
    pub async fn read_small(
        &self,
        kind: Kind,
        digest: &Digest,
        max: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let Download::Stream { len, mut body } = self.read(kind, digest).await? else {
            return Err(StoreError::Backend("read answered with a redirect".into()));
        };
        if len > max {
            return Err(StoreError::TooLarge(max));
        }
        let mut out = Vec::with_capacity(len as usize);
        while let Some(chunk) = body.next().await {
            out.extend_from_slice(&chunk?);
            if out.len() as u64 > max {
                return Err(StoreError::TooLarge(max));
            }
        }
        Ok(out)
    }

    /// The body of a batched download (see `aether_common::release::BLOB_BATCH_PATH`): an
    /// uncompressed tar of `blobs` in order, each a regular file named `sha256:<hex>`, of
    /// exactly [`batch_tar_len`] bytes. Always streamed through this process (a tar of
    /// many objects has no single URL). Asynchronous all the way: a client that reads
    /// slowly or not at all holds a connection, never a thread. A blob that reads short of
    /// its size (it cannot: stored objects are immutable) ends the body short of its
    /// announced length, which the client sees as a broken download.
    pub fn blob_batch_body(
        self: &Arc<Self>,
        blobs: Vec<(Digest, u64)>,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let store = self.clone();
        // The next objects are opened while one streams: from object storage each is a
        // request, and one at a time would make a batch a chain of round trips.
        let opened = futures::stream::iter(blobs)
            .map(move |(digest, size)| {
                let store = store.clone();
                async move { (digest, size, store.read(Kind::Blob, &digest).await) }
            })
            .buffered(BATCH_PREFETCH);
        let entries = opened.flat_map(|(digest, size, read)| {
            let content = match read {
                Ok(Download::Stream { body, .. }) => body,
                Ok(Download::Redirect(_)) => futures::stream::once(std::future::ready(Err(
                    io::Error::other("read answered with a redirect"),
                )))
                .boxed(),
                Err(e) => {
                    futures::stream::once(std::future::ready(Err(io::Error::other(e)))).boxed()
                }
            };
            let padding = Bytes::from(vec![0u8; padding(size) as usize]);
            futures::stream::once(std::future::ready(batch_header(&digest, size)))
                .chain(content)
                .chain(futures::stream::once(std::future::ready(Ok(padding))))
        });
        entries.chain(futures::stream::once(std::future::ready(Ok(
            Bytes::from_static(&[0u8; 1024]),
        ))))
    }
}

/// `wanted` in order, each digest once.
fn once_each(wanted: &[Digest]) -> Vec<Digest> {
    let mut seen = std::collections::HashSet::new();
    wanted
        .iter()
        .filter(|d| seen.insert(**d))
        .copied()
        .collect()
}

/// Reads the entries of a batched upload, checking each one's type and name and the
/// entry count, and hands each with its claimed digest to `put`.
fn read_batch<R: Read>(
    archive: &mut tar::Archive<R>,
    max_bytes: u64,
    mut put: impl FnMut(Digest, u64, &mut dyn Read) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let read_error = |e: io::Error| {
        StoreError::Body(format!(
            "{e} (a batch is an uncompressed tar of at most {max_bytes} bytes)"
        ))
    };
    // Raw: extension headers (GNU long names, PAX) are entries of their own, refused
    // below as not regular files, instead of being buffered whatever their size. Blob
    // names fit the 100-byte ustar name field.
    let entries = archive
        .entries()
        .map_err(|e| StoreError::Body(e.to_string()))?
        .raw(true);
    for (n, entry) in entries.enumerate() {
        let mut entry = entry.map_err(read_error)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let bad = |why: &str| StoreError::Batch {
            entry: name.clone(),
            why: why.to_owned(),
        };
        if n as u64 >= MAX_BATCH_ENTRIES {
            return Err(bad(&format!(
                "more than {MAX_BATCH_ENTRIES} entries in one batch; send several"
            )));
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(bad("only regular files are blobs"));
        }
        let claimed: Digest = name
            .strip_prefix("sha256:")
            .map_or_else(|| format!("sha256:{name}"), |hex| format!("sha256:{hex}"))
            .parse()
            .map_err(|_| bad("the name must be sha256:<64 hex>"))?;
        let size = entry.header().size().map_err(read_error)?;
        put(claimed, size, &mut entry).map_err(|e| match e {
            StoreError::Mismatch { got, .. } => bad(&format!("hashes to {got}")),
            StoreError::Body(why) => StoreError::Body(format!(
                "{why} (a batch is an uncompressed tar of at most {max_bytes} bytes)"
            )),
            other => other,
        })?;
    }
    Ok(())
}

/// The exact length of the tar [`Store::blob_batch_body`] sends: a 512-byte header per
/// blob, its bytes padded to 512, and the two zero blocks that end an archive.
pub fn batch_tar_len(blobs: &[(Digest, u64)]) -> u64 {
    blobs
        .iter()
        .map(|(_, size)| 512 + size + padding(*size))
        .sum::<u64>()
        + 1024
}

/// Zeros after an entry's bytes, up to the next 512-byte block.
fn padding(size: u64) -> u64 {
    size.next_multiple_of(512) - size
}

/// The ustar header of one blob of a batched download.
fn batch_header(digest: &Digest, size: u64) -> io::Result<Bytes> {
    let mut header = tar::Header::new_ustar();
    header.set_path(digest.to_string())?;
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o444);
    header.set_mtime(0);
    header.set_cksum();
    Ok(Bytes::copy_from_slice(header.as_bytes()))
}
