//! The embedded artifact store: content-addressed files under the data directory.
//! Uploads stream to a temporary file while being hashed; only a verified upload is renamed
//! into place, so a mismatch stores nothing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use aether_common::{Digest, Sha256Writer};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("upload hashes to {got}, the request claimed {claimed}")]
    Mismatch { claimed: Digest, got: Digest },
    #[error("upload exceeds {0} bytes")]
    TooLarge(u64),
    #[error("reading the upload: {0}")]
    Body(String),
    #[error("store I/O: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    tmp: PathBuf,
    max_bytes: u64,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl Store {
    pub fn open(data_dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let dir = data_dir.join("sha256");
        let tmp = data_dir.join("tmp");
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(&tmp)?;
        // Uploads cut off by a crash are never complete; drop them.
        for entry in std::fs::read_dir(&tmp)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(Self {
            dir,
            tmp,
            max_bytes,
        })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.tar.gz", digest.hex()))
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Stores the body if it hashes to `claimed`; returns false when it was already there
    /// (the body is then not read at all).
    pub async fn put<S, E>(&self, claimed: Digest, mut body: S) -> Result<bool, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        if self.contains(&claimed) {
            return Ok(false);
        }
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let mut tmp = TempFile(Some(self.tmp.join(format!(
            "{}.{}.{seq}",
            claimed.hex(),
            std::process::id()
        ))));
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
            file.sync_all().await?;
            let got = hasher.finish();
            if got != claimed {
                return Err(StoreError::Mismatch { claimed, got });
            }
        }
        tokio::fs::rename(&path, self.path(&claimed)).await?;
        tmp.0 = None;
        Ok(true)
    }
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
}
