//! The verified object store of manifest releases (`.aether/objects/<hex>-<mode>`): the
//! bytes of each file once, read-only, named by SHA-256 and mode (a hard link shares its
//! inode, so the same bytes as a plain and as an executable file are two objects).
//!
//! Blobs are fetched with bounded concurrency over the client's kept-alive connections,
//! hashed while they stream into staging, and renamed into place only when they match the
//! manifest; nothing unverified is ever visible under an object name. After each swap the
//! objects no kept release names are removed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aether_common::Sha256Writer;
use aether_common::release::{BLOB_BATCH_PATH, BlobBatchRequest, EntryType, Manifest, file_mode};
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::failure::{Reason, RefreshError};
use crate::workspace::Workspace;
use crate::{extract_bridge, fetch};

/// Blob downloads in flight at once: enough to hide round trips to the store, few enough
/// not to swamp it when many pods catch up together.
pub const CONCURRENCY: usize = 8;
/// Blobs up to this size are held in memory until complete, then written at once, and
/// travel in batched downloads.
const SMALL_BLOB: u64 = 1 << 20;
/// A batched download asks for at most this many blobs or about this many bytes: large
/// enough that a 40,000-file first release is tens of requests, small enough that several
/// batches keep the connections busy and a broken one costs little to ask again.
const BATCH_FILES: usize = 1024;
const BATCH_BYTES: u64 = 8 << 20;

/// The mode of an object and of every file linked to it: the manifest's mode without
/// special bits and without any write bit, so the app cannot change bytes that several
/// releases share.
pub fn object_mode(entry_mode: u32) -> u32 {
    file_mode(entry_mode) & !0o222
}

/// The object name of a file entry.
pub fn name(hex: &str, entry_mode: u32) -> String {
    format!("{hex}-{:o}", object_mode(entry_mode))
}

/// The objects a manifest names, by hash: each hash with its size and object names.
fn wanted(manifest: &Manifest) -> BTreeMap<&str, (u64, Vec<String>)> {
    let mut out: BTreeMap<&str, (u64, Vec<String>)> = BTreeMap::new();
    for e in manifest
        .entries
        .iter()
        .filter(|e| e.kind == EntryType::File)
    {
        let (Some(hex), Some(size)) = (e.sha256.as_deref(), e.size) else {
            continue;
        };
        let names = &mut out.entry(hex).or_insert((size, Vec::new())).1;
        let n = name(hex, e.mode);
        if !names.contains(&n) {
            names.push(n);
        }
    }
    out
}

/// One hash to bring in: download it, or copy it from an object of the same bytes with
/// another mode.
#[derive(Debug)]
struct Job {
    hex: String,
    size: u64,
    names: Vec<String>,
    local: Option<String>,
}

/// What bringing in the objects cost.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fetched {
    /// Bytes downloaded.
    pub downloaded: u64,
}

/// Makes every object of `manifest` present, downloading the missing ones from `base`
/// (the manifest's blob prefix, already resolved): small blobs in batched downloads, large
/// ones one by one.
pub async fn fetch_missing(
    ws: &Arc<Workspace>,
    http: &reqwest::Client,
    base: &reqwest::Url,
    manifest: &Manifest,
    cancel: &CancellationToken,
) -> Result<Fetched, RefreshError> {
    let present: HashSet<String> = list(ws.objects_dir())
        .map_err(|e| RefreshError::new(Reason::Io, format!("listing objects: {e}")))?;
    let mut units = Vec::new();
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    for (hex, (size, names)) in wanted(manifest) {
        let missing: Vec<String> = names.into_iter().filter(|n| !present.contains(n)).collect();
        if missing.is_empty() {
            continue;
        }
        let prefix = format!("{hex}-");
        let local = present.iter().find(|n| n.starts_with(&prefix)).cloned();
        let job = Job {
            hex: hex.to_owned(),
            size,
            names: missing,
            local,
        };
        if job.local.is_some() || size > SMALL_BLOB {
            units.push(Unit::One(job));
            continue;
        }
        batch_bytes += size;
        batch.push(job);
        if batch.len() >= BATCH_FILES || batch_bytes >= BATCH_BYTES {
            units.push(Unit::Batch(std::mem::take(&mut batch)));
            batch_bytes = 0;
        }
    }
    match batch.len() {
        0 => {}
        // One blob travels as well alone, and a plain file server serves it.
        1 => units.extend(batch.into_iter().map(Unit::One)),
        _ => units.push(Unit::Batch(batch)),
    }
    let results: Vec<u64> = futures::stream::iter(units)
        .map(|unit| async move {
            match unit {
                Unit::One(job) => bring_in(ws, http, base, job, cancel).await,
                Unit::Batch(jobs) => bring_in_batch(ws, http, base, jobs, cancel).await,
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    Ok(Fetched {
        downloaded: results.iter().sum(),
    })
}

/// Downloads of one refresh: a blob alone, or many small ones in one request.
enum Unit {
    One(Job),
    Batch(Vec<Job>),
}

async fn bring_in(
    ws: &Workspace,
    http: &reqwest::Client,
    base: &reqwest::Url,
    job: Job,
    cancel: &CancellationToken,
) -> Result<u64, RefreshError> {
    let dir = ws.objects_dir();
    match &job.local {
        Some(local) => {
            copy_to(ws, &job.hex, &dir.join(local), &job.names)?;
            Ok(0)
        }
        None => {
            let tmp = download(ws, http, base, &job.hex, job.size, cancel).await?;
            store(ws, &job, &tmp)?;
            Ok(job.size)
        }
    }
}

/// Gives a verified download its first object name and copies to the others.
fn store(ws: &Workspace, job: &Job, tmp: &Temp) -> Result<(), RefreshError> {
    let first = ws.objects_dir().join(&job.names[0]);
    place(&tmp.0, &first, &job.names[0])?;
    copy_to(ws, &job.hex, &first, &job.names[1..])
}

/// Makes `names` copies of the object at `from` (the same bytes under another mode).
fn copy_to(ws: &Workspace, hex: &str, from: &Path, names: &[String]) -> Result<(), RefreshError> {
    for n in names {
        let tmp = Temp(ws.temp_path(&format!("obj-{hex}")));
        fs::copy(from, &tmp.0)
            .map_err(|e| RefreshError::new(Reason::Io, format!("copying object {n}: {e}")))?;
        place(&tmp.0, &ws.objects_dir().join(n), n)?;
    }
    Ok(())
}

/// Many small blobs in one request (`BLOB_BATCH_PATH`): the response, a tar of the blobs,
/// streams through a bounded channel to a blocking thread that hashes each entry into
/// staging and places it only when it is one of those asked for, with the manifest's size
/// and hash. A store without the route (404, 405, 501: a plain file server, a store of an
/// earlier version) gets the same blobs asked one by one.
async fn bring_in_batch(
    ws: &Arc<Workspace>,
    http: &reqwest::Client,
    base: &reqwest::Url,
    jobs: Vec<Job>,
    cancel: &CancellationToken,
) -> Result<u64, RefreshError> {
    let url = base.join(BLOB_BATCH_PATH).map_err(|e| {
        RefreshError::new(Reason::Extract, format!("batched blob URL: {e}")).settled()
    })?;
    let body = serde_json::to_vec(&BlobBatchRequest {
        digests: jobs.iter().map(|j| format!("sha256:{}", j.hex)).collect(),
    })
    .map_err(|e| RefreshError::new(Reason::Io, e))?;
    let request = http
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    let sent = tokio::select! {
        r = request.send() => r.map_err(fetch::classify)?,
        () = cancel.cancelled() => return Err(RefreshError::Cancelled),
    };
    let status = sent.status();
    if matches!(status.as_u16(), 404 | 405 | 501) {
        tracing::debug!(%status, blobs = jobs.len(), "no batched blob download here; one by one");
        let mut downloaded = 0;
        for job in jobs {
            downloaded += bring_in(ws, http, base, job, cancel).await?;
        }
        return Ok(downloaded);
    }
    let mut response = fetch::check_status(sent, "POST", &url)?;
    let (feed, reader) = extract_bridge::channel();
    let receiver = {
        let ws = ws.clone();
        let cancel = cancel.clone();
        tokio::task::spawn_blocking(move || receive_batch(&ws, reader, jobs, &cancel))
    };
    let mut feed = Some(feed);
    let stream_error = loop {
        let chunk = tokio::select! {
            c = response.chunk() => c,
            () = cancel.cancelled() => return Err(RefreshError::Cancelled),
        };
        match chunk {
            Ok(Some(bytes)) => {
                let Some(tx) = &feed else { continue };
                let sent = tokio::select! {
                    s = tx.send(bytes) => s.is_ok(),
                    () = cancel.cancelled() => return Err(RefreshError::Cancelled),
                };
                if !sent {
                    // The receiver gave up on the tar; its error is the verdict.
                    feed = None;
                    break None;
                }
            }
            Ok(None) => break None,
            Err(e) => break Some(fetch::classify(e)),
        }
    };
    drop(feed);
    let received = receiver
        .await
        .map_err(|e| RefreshError::new(Reason::Io, e))?;
    match (received, stream_error) {
        // A broken stream explains a short tar better than the tar does.
        (Err(_), Some(e)) | (Ok(_), Some(e)) => Err(e),
        (result, None) => result,
    }
}

/// Reads a batched download's tar: every entry must be a regular file named
/// `sha256:<hex>` of a blob asked for and not yet received, of its manifest size, hashing
/// to its name; every blob asked for must come. Blocking.
fn receive_batch(
    ws: &Workspace,
    reader: impl Read,
    jobs: Vec<Job>,
    cancel: &CancellationToken,
) -> Result<u64, RefreshError> {
    let broken = |e: io::Error| {
        RefreshError::new(
            Reason::Download,
            format!("batched blob download broke: {e}"),
        )
    };
    let mut expected: HashMap<String, Job> = jobs.into_iter().map(|j| (j.hex.clone(), j)).collect();
    let mut archive = tar::Archive::new(reader);
    // Raw: an extension header is an entry of its own, refused below, never buffered.
    let entries = archive.entries().map_err(broken)?.raw(true);
    let mut downloaded = 0;
    let mut buf = vec![0u8; 64 * 1024];
    for entry in entries {
        if cancel.is_cancelled() {
            return Err(RefreshError::Cancelled);
        }
        let mut entry = entry.map_err(broken)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let job = name
            .strip_prefix("sha256:")
            .and_then(|hex| expected.remove(hex))
            .ok_or_else(|| {
                RefreshError::new(
                    Reason::Checksum,
                    format!("batched blob download sent {name:?}, which was not asked for"),
                )
            })?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(mismatch(&job.hex, "is not a regular file in the batch"));
        }
        if entry.size() != job.size {
            return Err(mismatch(
                &job.hex,
                &format!(
                    "is {} bytes in the batch, the manifest says {}",
                    entry.size(),
                    job.size
                ),
            ));
        }
        let tmp = Temp(ws.temp_path(&format!("obj-{}", job.hex)));
        let io_error = |e: io::Error| RefreshError::new(Reason::Io, format!("writing object: {e}"));
        let mut file = fs::File::create(&tmp.0).map_err(io_error)?;
        let mut hasher = Sha256Writer::new();
        loop {
            let n = entry.read(&mut buf).map_err(broken)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(io_error)?;
        }
        drop(file);
        let got = hasher.finish();
        if got.hex() != job.hex {
            return Err(mismatch(&job.hex, &format!("hashes to {got}")));
        }
        store(ws, &job, &tmp)?;
        downloaded += job.size;
    }
    if !expected.is_empty() {
        return Err(RefreshError::new(
            Reason::Download,
            format!(
                "batched blob download ended without {} of the blobs asked for",
                expected.len()
            ),
        ));
    }
    Ok(downloaded)
}

/// Gives a verified temporary file its object mode and name.
fn place(tmp: &Path, dest: &Path, name: &str) -> Result<(), RefreshError> {
    let mode = name
        .rsplit_once('-')
        .and_then(|(_, m)| u32::from_str_radix(m, 8).ok())
        .unwrap_or(0o444);
    fs::set_permissions(tmp, fs::Permissions::from_mode(mode))
        .and_then(|()| fs::rename(tmp, dest))
        .map_err(|e| RefreshError::new(Reason::Io, format!("storing object {name}: {e}")))
}

/// A temporary file in staging, removed unless renamed away.
struct Temp(PathBuf);

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Streams one blob into staging, hashing it; returns it only when it has exactly the
/// size and hash the manifest gives.
async fn download(
    ws: &Workspace,
    http: &reqwest::Client,
    base: &reqwest::Url,
    hex: &str,
    size: u64,
    cancel: &CancellationToken,
) -> Result<Temp, RefreshError> {
    // `./` keeps `sha256:` from being read as a URL scheme.
    let url = base.join(&format!("./sha256:{hex}")).map_err(|e| {
        RefreshError::new(Reason::Extract, format!("blob URL for {hex}: {e}")).settled()
    })?;
    let mut response = tokio::select! {
        // The size is checked while streaming: more bytes than the manifest says is a
        // mismatch, not a download over the artifact cap.
        r = fetch::start(http, url, u64::MAX) => r?,
        () = cancel.cancelled() => return Err(RefreshError::Cancelled),
    };
    let tmp = Temp(ws.temp_path(&format!("obj-{hex}")));
    let io_error =
        |e: std::io::Error| RefreshError::new(Reason::Io, format!("writing object: {e}"));
    // A small blob is written in one blocking call once it is in; a large one streams
    // through the file as it arrives (at most CONCURRENCY × SMALL_BLOB bytes are held).
    let mut file = if size > SMALL_BLOB {
        Some(tokio::fs::File::create(&tmp.0).await.map_err(io_error)?)
    } else {
        None
    };
    let mut held = Vec::new();
    let mut hasher = Sha256Writer::new();
    let mut total = 0u64;
    loop {
        let chunk = tokio::select! {
            c = response.chunk() => c.map_err(fetch::classify)?,
            () = cancel.cancelled() => return Err(RefreshError::Cancelled),
        };
        let Some(bytes) = chunk else { break };
        total += bytes.len() as u64;
        if total > size {
            return Err(mismatch(hex, "is larger than the manifest says"));
        }
        hasher.update(&bytes);
        match &mut file {
            Some(f) => f.write_all(&bytes).await.map_err(io_error)?,
            None => held.extend_from_slice(&bytes),
        }
    }
    match file {
        Some(mut f) => f.flush().await.map_err(io_error)?,
        None => {
            let path = tmp.0.clone();
            tokio::task::spawn_blocking(move || std::fs::write(path, held))
                .await
                .map_err(|e| RefreshError::new(Reason::Io, e))?
                .map_err(io_error)?;
        }
    }
    if total != size {
        return Err(mismatch(hex, "is shorter than the manifest says"));
    }
    let got = hasher.finish();
    if got.hex() != hex {
        return Err(mismatch(hex, &format!("hashes to {got}")));
    }
    Ok(tmp)
}

fn mismatch(hex: &str, why: &str) -> RefreshError {
    RefreshError::new(Reason::Checksum, format!("blob sha256:{hex} {why}"))
}

fn list(dir: &Path) -> io::Result<HashSet<String>> {
    let mut names = HashSet::new();
    for entry in fs::read_dir(dir)? {
        if let Ok(n) = entry?.file_name().into_string() {
            names.insert(n);
        }
    }
    Ok(names)
}

/// Removes the objects no kept manifest names, and the manifests whose release is gone.
/// Returns how many objects were removed. Must not run beside a refresh that is bringing
/// objects in (the refresher serializes the two).
pub fn collect_garbage(ws: &Workspace) -> io::Result<usize> {
    let mut keep = HashSet::new();
    for digest in ws.kept_manifests()? {
        let path = ws.manifest_path(&digest);
        if !ws.has_release(&digest) {
            let _ = fs::remove_file(&path);
            continue;
        }
        for (_, (_, names)) in wanted(&ws.kept_manifest(&digest)?) {
            keep.extend(names);
        }
    }
    let mut removed = 0;
    for n in list(ws.objects_dir())? {
        if !keep.contains(&n) {
            match fs::remove_file(ws.objects_dir().join(&n)) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_read_only_and_modes_make_distinct_names() {
        assert_eq!(object_mode(0o644), 0o444);
        assert_eq!(object_mode(0o4775), 0o555);
        assert_ne!(name("ab", 0o644), name("ab", 0o755));
        assert_eq!(name("ab", 0o664), "ab-444");
    }
}
