//! The verified object store of manifest releases (`.aether/objects/<hex>-<mode>`): the
//! bytes of each file once, read-only, named by SHA-256 and mode (a hard link shares its
//! inode, so the same bytes as a plain and as an executable file are two objects).
//!
//! Blobs are fetched with bounded concurrency over the client's kept-alive connections,
//! hashed while they stream into staging, and renamed into place only when they match the
//! manifest; nothing unverified is ever visible under an object name. After each swap the
//! objects no kept release names are removed.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aether_common::Sha256Writer;
use aether_common::release::{EntryType, Manifest, file_mode};
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::failure::{Reason, RefreshError};
use crate::fetch;
use crate::workspace::Workspace;

/// Blob downloads in flight at once: enough to hide round trips to the store, few enough
/// not to swamp it when many pods catch up together.
pub const CONCURRENCY: usize = 8;
/// Blobs up to this size are held in memory until complete, then written at once.
const SMALL_BLOB: u64 = 1 << 20;

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
/// (the manifest's blob prefix, already resolved).
pub async fn fetch_missing(
    ws: &Workspace,
    http: &reqwest::Client,
    base: &reqwest::Url,
    manifest: &Manifest,
    cancel: &CancellationToken,
) -> Result<Fetched, RefreshError> {
    let present: HashSet<String> = list(ws.objects_dir())
        .map_err(|e| RefreshError::new(Reason::Io, format!("listing objects: {e}")))?;
    let mut jobs = Vec::new();
    for (hex, (size, names)) in wanted(manifest) {
        let missing: Vec<String> = names.into_iter().filter(|n| !present.contains(n)).collect();
        if missing.is_empty() {
            continue;
        }
        let prefix = format!("{hex}-");
        let local = present.iter().find(|n| n.starts_with(&prefix)).cloned();
        jobs.push(Job {
            hex: hex.to_owned(),
            size,
            names: missing,
            local,
        });
    }
    let results: Vec<u64> = futures::stream::iter(jobs)
        .map(|job| bring_in(ws, http, base, job, cancel))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    Ok(Fetched {
        downloaded: results.iter().sum(),
    })
}

async fn bring_in(
    ws: &Workspace,
    http: &reqwest::Client,
    base: &reqwest::Url,
    job: Job,
    cancel: &CancellationToken,
) -> Result<u64, RefreshError> {
    let dir = ws.objects_dir();
    let (first, downloaded) = match &job.local {
        Some(local) => (dir.join(local), 0),
        None => {
            let tmp = download(ws, http, base, &job.hex, job.size, cancel).await?;
            let first = dir.join(&job.names[0]);
            place(&tmp.0, &first, &job.names[0])?;
            (first, job.size)
        }
    };
    for n in &job.names {
        let dest = dir.join(n);
        if dest == first {
            continue;
        }
        let tmp = Temp(ws.temp_path(&format!("obj-{}", job.hex)));
        fs::copy(&first, &tmp.0)
            .map_err(|e| RefreshError::new(Reason::Io, format!("copying object {n}: {e}")))?;
        place(&tmp.0, &dest, n)?;
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
