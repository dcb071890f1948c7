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

use aether_common::release::{
    BLOB_BATCH_PATH, BlobBatchRequest, Entry, EntryType, Manifest, file_mode,
};
use aether_common::{Digest, Sha256Writer};
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::failure::{Reason, RefreshError};
use crate::workspace::Workspace;
use crate::{assemble, extract_bridge, fetch};

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
/// Chunks buffered between a batched download and its receiver thread: with up to
/// CONCURRENCY batches at once, hyper's chunks of up to ~400 KiB stay a few MiB in all.
const BATCH_CHANNEL_DEPTH: usize = 2;
/// Most bytes read after a batch's last entry.
const TRAILER_READ: u64 = 64 * 1024;

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
    wanted_of(manifest.entries.iter().map(Arc::as_ref))
}

/// The objects of these entries, by hash.
fn wanted_of<'a>(
    entries: impl Iterator<Item = &'a Entry>,
) -> BTreeMap<&'a str, (u64, Vec<String>)> {
    let mut out: BTreeMap<&str, (u64, Vec<String>)> = BTreeMap::new();
    for e in entries.filter(|e| e.kind == EntryType::File) {
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

/// Makes every object the release of `manifest` will link present, downloading the
/// missing ones from `blobs_url` (the manifest's blob prefix, already resolved): small
/// blobs in batched downloads, large ones one by one. With `base` (the kept release it
/// will be patched from), only the objects of the files that differ from it.
pub async fn fetch_missing(
    ws: &Arc<Workspace>,
    http: &reqwest::Client,
    blobs_url: &reqwest::Url,
    manifest: &Manifest,
    base: Option<&assemble::Base>,
    cancel: &CancellationToken,
) -> Result<Fetched, RefreshError> {
    let (wanted, present) = match base {
        // The release is patched from `base`: only the files that differ from it are linked
        // from objects, so only theirs are looked for, one by one (a save of a large tree
        // changes a few), with the same bytes' objects of the usual modes to copy from.
        Some(base) => {
            let differ = base.changes.files_to_link(&base.manifest, manifest);
            let wanted = wanted_of(differ.iter().copied());
            let present: HashSet<String> = wanted
                .iter()
                .flat_map(|(hex, (_, names))| {
                    let usual = [name(hex, 0o644), name(hex, 0o755)];
                    names.iter().cloned().chain(usual)
                })
                .filter(|n| fs::symlink_metadata(ws.objects_dir().join(n)).is_ok())
                .collect();
            (wanted, present)
        }
        None => (
            wanted(manifest),
            list(ws.objects_dir())
                .map_err(|e| RefreshError::new(Reason::Io, format!("listing objects: {e}")))?,
        ),
    };
    let mut units = Vec::new();
    let mut batches: Vec<Vec<Job>> = Vec::new();
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    for (hex, (size, names)) in wanted {
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
            batches.push(std::mem::take(&mut batch));
            batch_bytes = 0;
        }
    }
    match batch.len() {
        0 => {}
        // One blob travels as well alone, and a plain file server serves it.
        1 => units.extend(batch.into_iter().map(Unit::One)),
        _ => batches.push(batch),
    }
    // The first batch alone: it tells whether this store has the batched route at all,
    // before the others are sent.
    let mut downloaded = 0;
    let mut batches = batches.into_iter();
    if let Some(first) = batches.next() {
        match bring_in_batch(ws, http, blobs_url, first, cancel).await? {
            Batched::Done(n) => {
                downloaded += n;
                units.extend(batches.map(Unit::Batch));
            }
            Batched::Refused(jobs) => {
                units.extend(jobs.into_iter().chain(batches.flatten()).map(Unit::One));
            }
        }
    }
    let results: Vec<u64> = futures::stream::iter(units)
        .map(|unit| async move {
            match unit {
                Unit::One(job) => bring_in(ws, http, blobs_url, job, cancel).await,
                Unit::Batch(jobs) => match bring_in_batch(ws, http, blobs_url, jobs, cancel).await?
                {
                    Batched::Done(n) => Ok(n),
                    // It had the route a moment ago (a rolling update of the store?).
                    Batched::Refused(jobs) => {
                        let mut n = 0;
                        for job in jobs {
                            n += bring_in(ws, http, blobs_url, job, cancel).await?;
                        }
                        Ok(n)
                    }
                },
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    Ok(Fetched {
        downloaded: downloaded + results.iter().sum::<u64>(),
    })
}

/// Downloads of one refresh: a blob alone, or many small ones in one request.
enum Unit {
    One(Job),
    Batch(Vec<Job>),
}

/// How a batched download went.
enum Batched {
    /// Every blob is an object; this many bytes were downloaded.
    Done(u64),
    /// The store has no batched route: the jobs, to fetch one by one.
    Refused(Vec<Job>),
}

/// Whether an answer to the batched download means "no such route here" rather than a
/// failure of the store: a client error other than a timeout or rate limit (a plain file
/// server says 404 or 405, an object store or proxy 400 or 403), or 501.
fn route_absent(status: reqwest::StatusCode) -> bool {
    (status.is_client_error() && !matches!(status.as_u16(), 408 | 429)) || status.as_u16() == 501
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
/// streams through a small bounded channel to a blocking thread that hashes each entry
/// into staging and places it only when it is one of those asked for, with the manifest's
/// size and hash.
async fn bring_in_batch(
    ws: &Arc<Workspace>,
    http: &reqwest::Client,
    base: &reqwest::Url,
    jobs: Vec<Job>,
    cancel: &CancellationToken,
) -> Result<Batched, RefreshError> {
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
    if route_absent(status) {
        tracing::debug!(%status, blobs = jobs.len(), "no batched blob download here; one by one");
        return Ok(Batched::Refused(jobs));
    }
    let mut response = fetch::check_status(sent, "POST", &url)?;
    let (feed, reader) = extract_bridge::channel(BATCH_CHANNEL_DEPTH);
    // The receiver stops at its next entry when this future ends early: dropped because
    // another download of the refresh failed, or cancelled.
    let stop = cancel.child_token();
    let _stop_on_drop = stop.clone().drop_guard();
    let receiver = {
        let ws = ws.clone();
        tokio::task::spawn_blocking(move || receive_batch(&ws, reader, jobs, &stop))
    };
    let stream_error = loop {
        let chunk = tokio::select! {
            c = response.chunk() => c,
            () = cancel.cancelled() => return Err(RefreshError::Cancelled),
        };
        match chunk {
            Ok(Some(bytes)) => {
                let sent = tokio::select! {
                    s = feed.send(bytes) => s.is_ok(),
                    () = cancel.cancelled() => return Err(RefreshError::Cancelled),
                };
                if !sent {
                    // The receiver gave up on the tar; its error is the verdict.
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
        (_, Some(e)) => Err(e),
        (result, None) => result.map(Batched::Done),
    }
}

/// Reads a batched download's tar: every entry must be a regular file named
/// `sha256:<hex>` of a blob asked for and not yet received, of its manifest size, hashing
/// to its name; every blob asked for must come. Blocking; stops at the next entry or
/// chunk once `stop` is cancelled.
fn receive_batch(
    ws: &Workspace,
    reader: impl Read,
    jobs: Vec<Job>,
    stop: &CancellationToken,
) -> Result<u64, RefreshError> {
    let broken = |e: io::Error| {
        RefreshError::new(
            Reason::Download,
            format!("batched blob download broke: {e}"),
        )
    };
    let mut expected: HashMap<String, Job> = jobs.into_iter().map(|j| (j.hex.clone(), j)).collect();
    let mut archive = tar::Archive::new(reader);
    let mut downloaded = 0;
    let mut buf = vec![0u8; 64 * 1024];
    {
        // Raw: an extension header (PAX, GNU long name) is an entry of its own, refused
        // below as not asked for, never buffered.
        let entries = archive.entries().map_err(broken)?.raw(true);
        for entry in entries {
            if stop.is_cancelled() {
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
            let io_error =
                |e: io::Error| RefreshError::new(Reason::Io, format!("writing object: {e}"));
            let mut file = fs::File::create(&tmp.0).map_err(io_error)?;
            let mut hasher = Sha256Writer::new();
            let mut total = 0u64;
            loop {
                let n = entry.read(&mut buf).map_err(broken)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).map_err(io_error)?;
            }
            drop(file);
            if total != job.size {
                // The stream ended inside the entry: a broken download, not a wrong blob.
                return Err(RefreshError::new(
                    Reason::Download,
                    format!("batched blob download ended inside sha256:{}", job.hex),
                ));
            }
            let got = hasher.finish();
            if got.hex() != job.hex {
                return Err(mismatch(&job.hex, &format!("hashes to {got}")));
            }
            if stop.is_cancelled() {
                return Err(RefreshError::Cancelled);
            }
            store(ws, &job, &tmp)?;
            downloaded += job.size;
        }
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
    // The rest of the end-of-archive blocks, so the connection can be used again (a
    // well-formed batch has 1 KiB left; more is not read).
    let _ = io::copy(
        &mut archive.into_inner().take(TRAILER_READ),
        &mut io::sink(),
    );
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
pub(crate) struct Temp(pub(crate) PathBuf);

impl Temp {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

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
            ws.forget_manifest(&digest);
            continue;
        }
        let manifest = ws.kept_manifest(&digest)?;
        for e in manifest
            .entries
            .iter()
            .filter(|e| e.kind == EntryType::File)
        {
            if let Some(hash) = e.sha256.as_deref().and_then(|h| Digest::from_hex(h).ok()) {
                keep.insert((hash, object_mode(e.mode)));
            }
        }
    }
    // Objects by (hash, mode) rather than by name: 36 bytes each instead of a string, so
    // collecting a 40,000-file tree's objects stays a few MiB beside its kept manifests.
    let kept = |name: &str| -> Option<()> {
        let (hex, mode) = name.split_once('-')?;
        let mode = u32::from_str_radix(mode, 8).ok()?;
        let object = (Digest::from_hex(hex).ok()?, mode);
        // Exactly the name `name()` gives it: `-0444` or `-+444` is a stray file.
        (keep.contains(&object) && name == self::name(hex, mode)).then_some(())
    };
    let mut unused = Vec::new();
    for entry in fs::read_dir(ws.objects_dir())? {
        let name = entry?.file_name();
        if name.to_str().and_then(kept).is_none() {
            unused.push(name);
        }
    }
    let mut removed = 0;
    for n in unused {
        match fs::remove_file(ws.objects_dir().join(&n)) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // One entry that cannot go (a directory someone made there) must not stop
            // every later collection.
            Err(e) => tracing::warn!(object = ?n, error = %e, "could not remove an unused object"),
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

    fn job(bytes: &[u8]) -> Job {
        let hex = aether_common::Digest::of(bytes).hex();
        Job {
            names: vec![name(&hex, 0o644), name(&hex, 0o755)],
            hex,
            size: bytes.len() as u64,
            local: None,
        }
    }

    /// A tar of `(name, type, bytes)` entries, headers written as told (sizes included).
    fn tar_of(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, kind, bytes) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(*kind);
            h.set_size(bytes.len() as u64);
            h.set_mode(0o444);
            tar.append_data(&mut h, path, *bytes).unwrap();
        }
        tar.into_inner().unwrap()
    }

    fn reason(r: Result<u64, RefreshError>) -> String {
        match r {
            Err(RefreshError::Failed {
                reason, message, ..
            }) => format!("{reason}: {message}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn sha(bytes: &[u8]) -> String {
        aether_common::Digest::of(bytes).to_string()
    }

    #[test]
    fn collection_keeps_what_kept_releases_name_and_removes_strays_past_an_unremovable_entry() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path()).unwrap();
        let hex = aether_common::Digest::of(b"kept").hex();
        let manifest = Manifest {
            app: "web".into(),
            blobs: "./".into(),
            created_at: "2026-12-01T00:00:00Z".into(),
            entries: vec![Arc::new(Entry {
                mode: 0o644,
                path: "f".into(),
                sha256: Some(hex.clone()),
                size: Some(4),
                target: None,
                kind: EntryType::File,
            })],
            expires_at: None,
            seq: 1,
        };
        let bytes = manifest.to_canonical();
        let digest = aether_common::Digest::of(&bytes);
        std::fs::write(ws.manifest_path(&digest), &bytes).unwrap();
        let staging = ws.stage(&digest).unwrap();
        ws.commit(staging, &digest).unwrap();
        let objects = ws.objects_dir();
        let gone = aether_common::Digest::of(b"gone").hex();
        for n in [
            name(&hex, 0o644),
            format!("{hex}-0444"),
            format!("{hex}-+444"),
            name(&gone, 0o644),
        ] {
            std::fs::write(objects.join(n), b"x").unwrap();
        }
        // A directory cannot be unlinked: the collection goes on past it.
        std::fs::create_dir(objects.join("a-directory")).unwrap();
        assert_eq!(collect_garbage(&ws).unwrap(), 3);
        let mut left: Vec<String> = list(objects).unwrap().into_iter().collect();
        left.sort();
        let mut want = vec!["a-directory".to_owned(), name(&hex, 0o644)];
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn a_batch_places_only_verified_blobs_it_asked_for_under_every_mode() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path()).unwrap();
        let stop = CancellationToken::new();
        let (a, b) = (b"alpha".as_slice(), b"beta".repeat(300));
        let tar = tar_of(&[
            (&sha(a), tar::EntryType::Regular, a),
            (&sha(&b), tar::EntryType::Regular, &b),
        ]);
        let got = receive_batch(&ws, tar.as_slice(), vec![job(a), job(&b)], &stop).unwrap();
        assert_eq!(got, (a.len() + b.len()) as u64);
        let objects = list(ws.objects_dir()).unwrap();
        for n in job(a).names.iter().chain(&job(&b).names) {
            assert!(objects.contains(n), "{n} in {objects:?}");
        }
        assert_eq!(
            fs::read(ws.objects_dir().join(&job(a).names[1])).unwrap(),
            a
        );
    }

    #[test]
    fn a_hostile_or_broken_batch_is_refused_and_leaves_no_object_of_its_blob() {
        let a = b"alpha".as_slice();
        let b = b"bravo".as_slice();
        let mut long = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(a.len() as u64);
        long.append_data(&mut h, format!("{}/{}", "x".repeat(200), sha(a)), a)
            .unwrap();
        let mut pax = tar::Builder::new(Vec::new());
        pax.append_pax_extensions([("path", sha(a).as_bytes())])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(a.len() as u64);
        pax.append_data(&mut h, "anything", a).unwrap();
        let whole = tar_of(&[(&sha(a), tar::EntryType::Regular, a)]);
        let cases: Vec<(&str, Vec<u8>, Vec<Job>, &str)> = vec![
            (
                "an entry not asked for",
                tar_of(&[(&sha(b), tar::EntryType::Regular, b)]),
                vec![job(a)],
                "checksum: batched blob download sent",
            ),
            (
                "an entry twice",
                tar_of(&[
                    (&sha(a), tar::EntryType::Regular, a),
                    (&sha(a), tar::EntryType::Regular, a),
                ]),
                vec![job(a), job(b)],
                "not asked for",
            ),
            (
                "a symlink",
                tar_of(&[(&sha(a), tar::EntryType::Symlink, b"")]),
                vec![job(a)],
                "checksum",
            ),
            (
                "another size",
                tar_of(&[(&sha(a), tar::EntryType::Regular, b"alphabet")]),
                vec![job(a)],
                "8 bytes in the batch, the manifest says 5",
            ),
            (
                "other bytes",
                tar_of(&[(&sha(a), tar::EntryType::Regular, b"ALPHA")]),
                vec![job(a)],
                "checksum: blob sha256:",
            ),
            (
                "a GNU long name",
                long.into_inner().unwrap(),
                vec![job(a)],
                "not asked for",
            ),
            (
                "a PAX header",
                pax.into_inner().unwrap(),
                vec![job(a)],
                "not asked for",
            ),
            (
                "a blob missing",
                whole.clone(),
                vec![job(a), job(b)],
                "download: batched blob download ended without 1",
            ),
            (
                "an end inside a blob",
                whole[..512 + 2].to_vec(),
                vec![job(a)],
                "download: batched blob download ended inside",
            ),
        ];
        for (what, tar, jobs, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let ws = Workspace::open(dir.path()).unwrap();
            let stop = CancellationToken::new();
            let got = reason(receive_batch(&ws, tar.as_slice(), jobs, &stop));
            assert!(got.contains(want), "{what}: {got}");
            // Only a verified blob asked for (the first `a`) may have become an object.
            let verified: HashSet<String> = job(a).names.into_iter().collect();
            let objects = list(ws.objects_dir()).unwrap();
            if matches!(what, "an entry twice" | "a blob missing") {
                assert_eq!(objects, verified, "{what}");
            } else {
                assert!(objects.is_empty(), "{what}: {objects:?}");
            }
        }
    }

    #[test]
    fn a_stopped_batch_places_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path()).unwrap();
        let stop = CancellationToken::new();
        stop.cancel();
        let a = b"alpha".as_slice();
        let tar = tar_of(&[(&sha(a), tar::EntryType::Regular, a)]);
        let got = receive_batch(&ws, tar.as_slice(), vec![job(a)], &stop);
        assert!(matches!(got, Err(RefreshError::Cancelled)), "{got:?}");
        assert!(list(ws.objects_dir()).unwrap().is_empty());
    }
}
