//! One suite of store tests, run against both backends: the data directory and object
//! storage (a real S3 implementation, moto's server, on loopback).

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use aether_common::Digest;
use aether_testkit::s3::Moto;
use bytes::Bytes;
use futures::StreamExt;

use super::*;

const MAX: u64 = 24 << 20;
const BUCKET: &str = "aether-store";

fn one_chunk(bytes: Vec<u8>) -> impl Stream<Item = Result<Bytes, io::Error>> + Unpin + Send {
    futures::stream::iter([Ok(Bytes::from(bytes))])
}

/// Bytes no other case uses (every case of a run shares one store).
fn unique(case: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + case.len());
    out.extend_from_slice(case.as_bytes());
    let mut x: u32 = case
        .bytes()
        .fold(7, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len.max(case.len()));
    out
}

async fn bytes_of(store: &Store, kind: Kind, digest: &Digest) -> Vec<u8> {
    match store.download(kind, digest).await.unwrap() {
        Download::Stream { len, body } => {
            let chunks: Vec<Bytes> = body.map(|c| c.unwrap()).collect().await;
            let out = chunks.concat();
            assert_eq!(out.len() as u64, len, "announced length");
            out
        }
        Download::Redirect(url) => {
            aether_testkit::process::install_crypto();
            let r = reqwest::get(&url).await.unwrap();
            assert!(r.status().is_success(), "GET {url}: {}", r.status());
            r.bytes().await.unwrap().to_vec()
        }
    }
}

/// A batched upload's body: an uncompressed tar of `(name, bytes)` entries.
fn batch(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, bytes) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_path(name).unwrap();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, bytes.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

async fn put_batch(store: &Arc<Store>, body: Vec<u8>) -> Result<BatchReport, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.put_blob_batch(body.as_slice()))
        .await
        .unwrap()
}

async fn an_upload_is_stored_once_and_read_back_whole(store: &Arc<Store>) {
    // One small object and one past a part, which object storage puts in several parts.
    for (case, len) in [("small", 1000), ("multipart", super::s3::PART * 2 + 12_345)] {
        let bytes = unique(case, len);
        let digest = Digest::of(&bytes);
        assert!(!store.contains_of(Kind::Blob, &digest).await.unwrap());
        // In chunks, as a client streams it.
        let chunks: Vec<Result<Bytes, io::Error>> = bytes
            .chunks(256 * 1024)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        assert!(
            store
                .put_of(Kind::Blob, digest, futures::stream::iter(chunks))
                .await
                .unwrap(),
            "{case}: first upload stores"
        );
        assert!(
            !store
                .put_of(Kind::Blob, digest, one_chunk(bytes.clone()))
                .await
                .unwrap(),
            "{case}: second upload finds it"
        );
        assert!(store.contains_of(Kind::Blob, &digest).await.unwrap());
        assert!(!store.contains_of(Kind::Artifact, &digest).await.unwrap());
        assert!(
            bytes_of(store, Kind::Blob, &digest).await == bytes,
            "{case}"
        );
    }
}

async fn a_mismatched_or_oversized_upload_leaves_no_object(store: &Arc<Store>) {
    for (case, len) in [
        ("mismatch-small", 100),
        ("mismatch-multipart", super::s3::PART + 1),
    ] {
        let bytes = unique(case, len);
        let claimed = Digest::of(b"something else");
        let err = store
            .put_of(Kind::Artifact, claimed, one_chunk(bytes))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Mismatch { .. }), "{case}: {err}");
        assert!(!store.contains_of(Kind::Artifact, &claimed).await.unwrap());
    }
    // Too large in one chunk, and in chunks (past a part: object storage has begun a
    // multipart upload by then, which must be aborted).
    let big = unique("too-large", MAX as usize + 1);
    let digest = Digest::of(&big);
    let err = store
        .put_of(Kind::Artifact, digest, one_chunk(big.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge(MAX)), "{err}");
    let chunks: Vec<Result<Bytes, io::Error>> = big
        .chunks(1 << 20)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let err = store
        .put_of(Kind::Artifact, digest, futures::stream::iter(chunks))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge(MAX)), "{err}");
    assert!(!store.contains_of(Kind::Artifact, &digest).await.unwrap());
    // A body that breaks after a part: nothing either.
    let broken = futures::stream::iter(
        big[..super::s3::PART + 1000]
            .chunks(1 << 20)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .chain([Err(io::Error::other("client went away"))]),
    );
    let err = store.put_of(Kind::Blob, digest, broken).await.unwrap_err();
    assert!(matches!(err, StoreError::Body(_)), "{err}");
    assert!(!store.contains_of(Kind::Blob, &digest).await.unwrap());
    assert!(matches!(
        store.download(Kind::Artifact, &digest).await,
        Err(StoreError::Missing(..)) | Ok(Download::Redirect(_))
    ));
}

async fn bytes_in_memory_are_stored_verified_and_once(store: &Arc<Store>) {
    let bytes = Bytes::from(unique("in-memory", 3 << 20));
    let digest = Digest::of(&bytes);
    assert!(
        store
            .put_bytes(Kind::Blob, digest, bytes.clone())
            .await
            .unwrap()
    );
    assert!(
        !store
            .put_bytes(Kind::Blob, digest, bytes.clone())
            .await
            .unwrap()
    );
    assert!(bytes_of(store, Kind::Blob, &digest).await == bytes);
    let claimed = Digest::of(b"not these bytes");
    let err = store
        .put_bytes(
            Kind::Blob,
            claimed,
            Bytes::from(unique("in-memory-mismatch", 100)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Mismatch { .. }), "{err}");
    assert!(!store.contains_of(Kind::Blob, &claimed).await.unwrap());
    let big = Bytes::from(unique("in-memory-too-large", MAX as usize + 1));
    let digest = Digest::of(&big);
    let err = store.put_bytes(Kind::Blob, digest, big).await.unwrap_err();
    assert!(matches!(err, StoreError::TooLarge(MAX)), "{err}");
    assert!(!store.contains_of(Kind::Blob, &digest).await.unwrap());
}

async fn missing_blobs_are_listed_in_order_once_each(store: &Arc<Store>) {
    let stored: Vec<Digest> = futures::future::join_all((0..3).map(|i| async move {
        let bytes = unique(&format!("present-{i}"), 10);
        let d = Digest::of(&bytes);
        store.put_of(Kind::Blob, d, one_chunk(bytes)).await.unwrap();
        d
    }))
    .await;
    let absent: Vec<Digest> = (0..3)
        .map(|i| Digest::of(format!("absent-{i}").as_bytes()))
        .collect();
    let wanted = vec![
        absent[2], stored[0], absent[0], absent[2], stored[1], absent[1], stored[2], absent[0],
    ];
    assert_eq!(
        store.missing_blobs(&wanted).await.unwrap(),
        vec![absent[2], absent[0], absent[1]]
    );
    assert_eq!(
        store.missing_blobs(&[]).await.unwrap(),
        Vec::<Digest>::new()
    );
}

async fn a_batched_upload_keeps_verified_blobs_and_refuses_a_corrupt_one(store: &Arc<Store>) {
    let blobs: Vec<Vec<u8>> = (0..40)
        .map(|i| unique(&format!("batch-{i}"), 100 + i * 997))
        .chain([unique("batch-large", super::s3::PART + 3)])
        .collect();
    let entry = |b: &Vec<u8>| (Digest::of(b).to_string(), b.clone());
    let mut entries: Vec<(String, Vec<u8>)> = blobs.iter().map(entry).collect();
    // The bare-hex name form too.
    entries[1].0 = Digest::of(&blobs[1]).hex().to_string();
    let report = put_batch(store, batch(&entries)).await.unwrap();
    assert_eq!(
        report,
        BatchReport {
            stored: 41,
            known: 0
        }
    );
    for b in &blobs {
        assert!(store.contains_of(Kind::Blob, &Digest::of(b)).await.unwrap());
    }
    // Sent again with one new blob: the others are known.
    let fresh = unique("batch-fresh", 5000);
    entries.push(entry(&fresh));
    let report = put_batch(store, batch(&entries)).await.unwrap();
    assert_eq!(
        report,
        BatchReport {
            stored: 1,
            known: 41
        }
    );

    // A corrupt entry among good ones: refused by name; the good one before it is kept
    // and the corrupt one is not stored under the name it claimed.
    let good = unique("batch-good-before", 300);
    let claimed = Digest::of(b"what the corrupt entry claims to be");
    let err = put_batch(
        store,
        batch(&[
            entry(&good),
            (claimed.to_string(), unique("batch-corrupt", 400)),
            entry(&unique("batch-after", 500)),
        ]),
    )
    .await
    .unwrap_err();
    match &err {
        StoreError::Batch { entry, why } => {
            assert_eq!(entry, &claimed.to_string());
            assert!(why.contains("hashes to"), "{why}");
        }
        other => panic!("expected a batch error, got {other}"),
    }
    assert!(!store.contains_of(Kind::Blob, &claimed).await.unwrap());
    assert!(
        store
            .contains_of(Kind::Blob, &Digest::of(&good))
            .await
            .unwrap()
    );

    // Not a regular file, or not a digest name: refused.
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_path("sub").unwrap();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_size(0);
    header.set_cksum();
    builder.append(&header, io::empty()).unwrap();
    let err = put_batch(store, builder.into_inner().unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("only regular files"), "{err}");
    let err = put_batch(store, batch(&[("notes.txt".into(), b"x".to_vec())]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("sha256:<64 hex>"), "{err}");
}

async fn a_batched_download_is_a_tar_of_the_blobs_in_order_of_its_announced_length(
    store: &Arc<Store>,
) {
    let blobs: Vec<Vec<u8>> = vec![Vec::new(), b"x".repeat(512), unique("download", 1000)];
    let mut digests = Vec::new();
    for b in &blobs {
        let d = Digest::of(b);
        store
            .put_of(Kind::Blob, d, one_chunk(b.clone()))
            .await
            .unwrap();
        digests.push(d);
    }
    // Asked twice, sent once; asked in this order, sent in it.
    digests.reverse();
    digests.push(digests[0]);
    let sizes = store.blob_sizes(&digests).await.unwrap();
    assert_eq!(sizes.len(), 3);
    let len = batch_tar_len(&sizes);
    let out: Vec<u8> = store
        .blob_batch_body(sizes)
        .map(|c| c.unwrap())
        .collect::<Vec<Bytes>>()
        .await
        .concat();
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
    assert!(matches!(
        store.blob_sizes(&[digests[0], absent]).await,
        Err(StoreError::Missing("blob", d)) if d == absent
    ));
}

async fn a_manifest_is_read_whole_up_to_a_cap(store: &Arc<Store>) {
    let bytes = unique("manifest", 4000);
    let digest = Digest::of(&bytes);
    store
        .put_of(Kind::Blob, digest, one_chunk(bytes.clone()))
        .await
        .unwrap();
    assert_eq!(
        store.read_small(Kind::Blob, &digest, 4000).await.unwrap(),
        bytes
    );
    assert!(matches!(
        store.read_small(Kind::Blob, &digest, 3999).await,
        Err(StoreError::TooLarge(3999))
    ));
    assert!(matches!(
        store.read_small(Kind::Blob, &Digest::of(b"none"), 10).await,
        Err(StoreError::Missing(..))
    ));
}

async fn a_manifest_patch_is_made_from_stored_manifests_or_kept_and_never_for_other_blobs(
    store: &Arc<Store>,
) {
    use aether_common::release::delta;
    let manifest = |seq: u64, changed: usize| {
        let entries: Vec<String> = (0..500)
            .map(|i| {
                let v = if i == changed { "b" } else { "a" };
                format!("{{\"mode\":420,\"path\":\"p{i:04}\",\"sha256\":\"{v}\"}}")
            })
            .collect();
        let entries = entries.join(",");
        format!("{{\"app\":\"patch-case\",\"entries\":[{entries}],\"seq\":{seq}}}").into_bytes()
    };
    let (held, wanted) = (manifest(1, usize::MAX), manifest(2, 250));
    let (h, w) = (Digest::of(&held), Digest::of(&wanted));
    for (d, bytes) in [(h, &held), (w, &wanted)] {
        store
            .put_of(Kind::Blob, d, one_chunk(bytes.clone()))
            .await
            .unwrap();
    }
    let patch = store
        .manifest_patch(&h, &w)
        .await
        .unwrap()
        .expect("a patch");
    assert!(patch.len() < 200, "{} bytes", patch.len());
    assert_eq!(delta::apply(&held, &patch, u64::MAX).unwrap(), wanted);
    // A base the store does not hold, and blobs that are not manifests: whole.
    let gone = Digest::of(b"never stored");
    assert!(store.manifest_patch(&gone, &w).await.unwrap().is_none());
    let (a, b) = (unique("patch-a", 5000), unique("patch-b", 5000));
    for bytes in [&a, &b] {
        let d = Digest::of(bytes);
        store
            .put_of(Kind::Blob, d, one_chunk(bytes.clone()))
            .await
            .unwrap();
    }
    let not_manifests = store
        .manifest_patch(&Digest::of(&a), &Digest::of(&b))
        .await
        .unwrap();
    assert!(not_manifests.is_none());
    // A patch kept by the release route is served without its base being read.
    let kept = b"insert 1\nx".to_vec();
    store.keep_patch(gone, w, kept.clone(), wanted.len());
    assert_eq!(
        store.manifest_patch(&gone, &w).await.unwrap(),
        Some(Bytes::from(kept))
    );
}

async fn suite(store: Store) {
    let store = Arc::new(store);
    an_upload_is_stored_once_and_read_back_whole(&store).await;
    a_mismatched_or_oversized_upload_leaves_no_object(&store).await;
    bytes_in_memory_are_stored_verified_and_once(&store).await;
    missing_blobs_are_listed_in_order_once_each(&store).await;
    a_batched_upload_keeps_verified_blobs_and_refuses_a_corrupt_one(&store).await;
    a_batched_download_is_a_tar_of_the_blobs_in_order_of_its_announced_length(&store).await;
    a_manifest_is_read_whole_up_to_a_cap(&store).await;
    a_manifest_patch_is_made_from_stored_manifests_or_kept_and_never_for_other_blobs(&store).await;
}

async fn moto_store(moto: &Moto, download: DownloadMode) -> Store {
    moto.create_bucket(BUCKET).await.unwrap();
    let config = S3Config {
        url: format!("s3://{BUCKET}/team/dev"),
        download,
        presign_ttl: Duration::from_secs(60),
        aws: moto
            .aws_env()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    };
    Store::s3(&config, MAX).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_suite_passes_on_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    suite(Store::open(dir.path(), MAX).unwrap()).await;
    // Refused uploads left no temporary file behind.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("tmp")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_suite_passes_on_s3_with_presigned_redirects_and_keeps_only_verified_objects() {
    let moto = Moto::start().await.unwrap();
    suite(moto_store(&moto, DownloadMode::Redirect).await).await;
    // Nothing but verified objects under the prefix: no temporary keys, and no multipart
    // upload left open by the refused ones.
    assert_eq!(
        moto.pending_uploads(BUCKET).await.unwrap(),
        Vec::<String>::new()
    );
    let keys = moto.keys(BUCKET).await.unwrap();
    assert!(!keys.is_empty());
    for key in &keys {
        let hex = key
            .strip_prefix("team/dev/blobs/")
            .or_else(|| {
                key.strip_prefix("team/dev/sha256/")
                    .and_then(|k| k.strip_suffix(".tar.gz"))
            })
            .unwrap_or_else(|| panic!("unexpected key {key}"));
        assert_eq!(hex.len(), 64, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_store_in_proxy_mode_streams_downloads_through_the_control_plane() {
    let moto = Moto::start().await.unwrap();
    let store = moto_store(&moto, DownloadMode::Proxy).await;
    let bytes = unique("proxied", 70_000);
    let digest = Digest::of(&bytes);
    store
        .put_of(Kind::Artifact, digest, one_chunk(bytes.clone()))
        .await
        .unwrap();
    match store.download(Kind::Artifact, &digest).await.unwrap() {
        Download::Stream { len, .. } => assert_eq!(len, bytes.len() as u64),
        Download::Redirect(url) => panic!("proxy mode redirected to {url}"),
    }
    assert!(matches!(
        store.download(Kind::Artifact, &Digest::of(b"nope")).await,
        Err(StoreError::Missing("artifact", _))
    ));
}

#[test]
fn a_plain_http_endpoint_needs_aws_allow_http() {
    let config = S3Config {
        url: "s3://b".into(),
        download: DownloadMode::Redirect,
        presign_ttl: Duration::from_secs(60),
        aws: [(
            "AWS_ENDPOINT_URL".to_owned(),
            "http://127.0.0.1:9".to_owned(),
        )]
        .into(),
    };
    let err = Store::s3(&config, MAX).unwrap_err();
    assert!(err.to_string().contains("AWS_ALLOW_HTTP"), "{err}");
}
