//! The embedded store: content-addressed files under the data directory, release artifacts
//! (`sha256/<hex>.tar.gz`) and the content store's blobs (`blobs/<hex>`: files of
//! releases, manifests). Uploads stream to a temporary file while being hashed; only a
//! verified upload is renamed into place, so a mismatch stores nothing.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use aether_common::{Digest, Sha256Writer};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    #[error("store I/O: {0}")]
    Io(#[from] std::io::Error),
}

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

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    blobs: PathBuf,
    tmp: PathBuf,
    max_bytes: u64,
    /// fsync each upload before it is renamed into place: the control plane's store must
    /// survive a node crash; the local loop's, a temporary directory, need not wait for it.
    durable: bool,
}

/// Which of the two content-addressed namespaces an upload goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Artifact,
    Blob,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl Store {
    pub fn open(data_dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let dir = data_dir.join("sha256");
        let blobs = data_dir.join("blobs");
        let tmp = data_dir.join("tmp");
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(&blobs)?;
        std::fs::create_dir_all(&tmp)?;
        // Uploads cut off by a crash are never complete; drop them.
        for entry in std::fs::read_dir(&tmp)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(Self {
            dir,
            blobs,
            tmp,
            max_bytes,
            durable: true,
        })
    }

    /// The same store without fsync (the local loop's scratch store).
    pub fn scratch(mut self) -> Self {
        self.durable = false;
        self
    }

    /// Where an artifact is (or would be) stored.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.path_of(Kind::Artifact, digest)
    }

    pub fn path_of(&self, kind: Kind, digest: &Digest) -> PathBuf {
        match kind {
            Kind::Artifact => self.dir.join(format!("{}.tar.gz", digest.hex())),
            Kind::Blob => self.blobs.join(digest.hex()),
        }
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    pub fn contains_of(&self, kind: Kind, digest: &Digest) -> bool {
        self.path_of(kind, digest).is_file()
    }

    /// The digests of `wanted` that are not stored as blobs, in their order, once each.
    pub fn missing_blobs(&self, wanted: &[Digest]) -> Vec<Digest> {
        let mut seen = std::collections::HashSet::new();
        wanted
            .iter()
            .filter(|d| seen.insert(**d) && !self.contains_of(Kind::Blob, d))
            .copied()
            .collect()
    }

    fn temp_file(&self, claimed: &Digest) -> TempFile {
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        TempFile(Some(self.tmp.join(format!(
            "{}.{}.{seq}",
            claimed.hex(),
            std::process::id()
        ))))
    }

    /// Stores an artifact if the body hashes to `claimed`; returns false when it was
    /// already there (the body is then not read at all).
    pub async fn put<S, E>(&self, claimed: Digest, body: S) -> Result<bool, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
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
        mut body: S,
    ) -> Result<bool, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        if self.contains_of(kind, &claimed) {
            return Ok(false);
        }
        let mut tmp = self.temp_file(&claimed);
        let path = tmp.path().to_path_buf();
        {
            let mut file = tokio::fs::File::create(&path).await?;
            let mut hasher = Sha256Writer::new();
            let mut total = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| StoreError::Body(e.to_string()))?;
                total += chunk.len() as u64;
                if total > self.max_bytes {
                    return Err(StoreError::TooLarge(self.max_bytes));
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await?;
            }
            // tokio's File writes in the background: without this the last write may still
            // be in flight when the file is renamed into place and served (short, to a
            // fetcher that then refuses it). The scratch store skips only the fsync.
            file.flush().await?;
            if self.durable {
                file.sync_all().await?;
            }
            let got = hasher.finish();
            if got != claimed {
                return Err(StoreError::Mismatch { claimed, got });
            }
        }
        tokio::fs::rename(&path, self.path_of(kind, &claimed)).await?;
        tmp.0 = None;
        Ok(true)
    }

    /// Stores the blobs of a batched upload: an uncompressed tar stream whose entries are
    /// regular files named `sha256:<hex>` (or `<hex>`), each holding that blob. Blocking
    /// (run it off the async runtime). Each entry is hashed while it is written and kept
    /// only if it matches its name; the first entry that does not (a wrong hash, another
    /// entry type, a bad name, too many entries or bytes) ends the request with an error,
    /// and the blobs verified before it stay (they are content-addressed: keeping them is
    /// never wrong). The whole body may not exceed the store's size cap.
    pub fn put_blob_batch<R: Read>(&self, reader: R) -> Result<BatchReport, StoreError> {
        let mut archive = tar::Archive::new(reader.take(self.max_bytes.saturating_add(1)));
        let result = self.put_blob_entries(&mut archive);
        // The reader is cut one byte past the cap: a batch that reached it is too large,
        // whatever tar made of the cut.
        if archive.into_inner().limit() == 0 {
            return Err(StoreError::TooLarge(self.max_bytes));
        }
        result
    }

    fn put_blob_entries<R: Read>(
        &self,
        archive: &mut tar::Archive<R>,
    ) -> Result<BatchReport, StoreError> {
        let mut report = BatchReport::default();
        // Raw: extension headers (GNU long names, PAX) are entries of their own, refused
        // below as not regular files, instead of being buffered whatever their size. Blob
        // names fit the 100-byte ustar name field.
        let entries = archive
            .entries()
            .map_err(|e| StoreError::Body(e.to_string()))?
            .raw(true);
        for (n, entry) in entries.enumerate() {
            let mut entry = entry.map_err(|e| self.batch_read_error(e))?;
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
            if self.contains_of(Kind::Blob, &claimed) {
                io::copy(&mut entry, &mut io::sink()).map_err(|e| self.batch_read_error(e))?;
                report.known += 1;
                continue;
            }
            let mut tmp = self.temp_file(&claimed);
            let mut file = std::fs::File::create(tmp.path())?;
            let mut hasher = Sha256Writer::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let read = entry.read(&mut buf).map_err(|e| self.batch_read_error(e))?;
                if read == 0 {
                    break;
                }
                hasher.update(&buf[..read]);
                file.write_all(&buf[..read])?;
            }
            if self.durable {
                file.sync_all()?;
            }
            let got = hasher.finish();
            if got != claimed {
                return Err(bad(&format!("hashes to {got}")));
            }
            std::fs::rename(tmp.path(), self.path_of(Kind::Blob, &claimed))?;
            tmp.0 = None;
            report.stored += 1;
        }
        Ok(report)
    }

    /// The stored sizes of the blobs of a batched download, in order and once each;
    /// `Err` names the first one the store lacks.
    pub fn blob_sizes(&self, wanted: &[Digest]) -> Result<Vec<(Digest, u64)>, Digest> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(wanted.len());
        for d in wanted.iter().filter(|d| seen.insert(**d)) {
            match std::fs::metadata(self.path_of(Kind::Blob, d)) {
                Ok(meta) if meta.is_file() => out.push((*d, meta.len())),
                _ => return Err(*d),
            }
        }
        Ok(out)
    }

    /// The body of a batched download (see `aether_common::release::BLOB_BATCH_PATH`): an
    /// uncompressed tar of `blobs` in order, each a regular file named `sha256:<hex>`, of
    /// exactly [`batch_tar_len`] bytes. Asynchronous all the way: a client that reads
    /// slowly or not at all holds a connection, never a thread. A blob shorter than its
    /// size (it cannot be: blobs are immutable once renamed in) ends the body short of its
    /// announced length, which the client sees as a broken download.
    pub fn blob_batch_body(
        &self,
        blobs: Vec<(Digest, u64)>,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let files: Vec<(PathBuf, Digest, u64)> = blobs
            .into_iter()
            .map(|(d, size)| (self.path_of(Kind::Blob, &d), d, size))
            .collect();
        let entries = futures::stream::iter(files).flat_map(|(path, digest, size)| {
            let content = futures::stream::once(tokio::fs::File::open(path))
                .map(move |file| match file {
                    Ok(f) => tokio_util::io::ReaderStream::with_capacity(f.take(size), 64 * 1024)
                        .left_stream(),
                    Err(e) => futures::stream::once(std::future::ready(Err(e))).right_stream(),
                })
                .flatten();
            let padding = Bytes::from(vec![0u8; padding(size) as usize]);
            futures::stream::once(std::future::ready(batch_header(&digest, size)))
                .chain(content)
                .chain(futures::stream::once(std::future::ready(Ok(padding))))
        });
        entries.chain(futures::stream::once(std::future::ready(Ok(
            Bytes::from_static(&[0u8; 1024]),
        ))))
    }

    /// A read error inside a batch: the body ended early or broke.
    fn batch_read_error(&self, e: io::Error) -> StoreError {
        StoreError::Body(format!(
            "{e} (a batch is an uncompressed tar of at most {} bytes)",
            self.max_bytes
        ))
    }
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

/// An upload's temporary file, removed when dropped unless it was renamed into place. A
/// drop guard, because an upload ends in ways that run no code of ours: the client goes
/// away and axum drops the handler's future at its next await.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_entries(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("tmp")).unwrap().count()
    }

    #[tokio::test]
    async fn a_cancelled_upload_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        // A body that yields one chunk and then never ends, like a client gone quiet.
        let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"abc"))])
            .chain(futures::stream::pending());
        let mut put = Box::pin(store.put(Digest::of(b"abcdef"), Box::pin(body)));
        // Drive the upload until its temporary file exists, then drop it mid-body.
        loop {
            tokio::select! {
                biased;
                _ = &mut put => panic!("the body never ends"),
                () = tokio::task::yield_now() => {}
            }
            if tmp_entries(dir.path()) == 1 {
                break;
            }
        }
        drop(put); // what axum does when the client goes away
        assert_eq!(tmp_entries(dir.path()), 0);
    }

    #[tokio::test]
    async fn a_mismatched_upload_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"abc"))]);
        let err = store.put(Digest::of(b"xyz"), body).await.unwrap_err();
        assert!(matches!(err, StoreError::Mismatch { .. }), "{err}");
        assert_eq!(tmp_entries(dir.path()), 0);
        assert!(!store.contains(&Digest::of(b"xyz")));
    }

    #[test]
    fn a_batched_download_is_a_tar_of_the_blobs_in_order_of_its_announced_length() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap().scratch();
        let blobs: Vec<Vec<u8>> = vec![b"".to_vec(), b"x".repeat(512), b"y".repeat(1000)];
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut digests = Vec::new();
        for b in &blobs {
            let d = Digest::of(b);
            let body = futures::stream::iter([Ok::<_, io::Error>(Bytes::from(b.clone()))]);
            rt.block_on(store.put_of(Kind::Blob, d, body)).unwrap();
            digests.push(d);
        }
        // Asked twice, sent once; asked in this order, sent in it.
        digests.reverse();
        digests.push(digests[0]);
        let sizes = store.blob_sizes(&digests).unwrap();
        assert_eq!(sizes.len(), 3);
        let len = batch_tar_len(&sizes);
        let chunks: Vec<Bytes> = rt
            .block_on(store.blob_batch_body(sizes).collect::<Vec<_>>())
            .into_iter()
            .collect::<io::Result<_>>()
            .unwrap();
        let out = chunks.concat();
        assert_eq!(out.len() as u64, len);
        let mut archive = tar::Archive::new(out.as_slice());
        let got: Vec<(String, Vec<u8>)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let mut bytes = Vec::new();
                e.read_to_end(&mut bytes).unwrap();
                (name, bytes)
            })
            .collect();
        let want: Vec<(String, Vec<u8>)> = blobs
            .iter()
            .rev()
            .map(|b| (Digest::of(b).to_string(), b.clone()))
            .collect();
        assert_eq!(got, want);
        let absent = Digest::of(b"absent");
        assert_eq!(store.blob_sizes(&[digests[0], absent]), Err(absent));
    }
}
