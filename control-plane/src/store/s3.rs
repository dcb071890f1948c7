//! The object-storage backend: objects in an S3-compatible bucket (AWS S3, GCS through its
//! S3 API, MinIO, Ceph RGW, R2) through the `object_store` crate, so that several control
//! planes share one store and none keeps anything that matters on its own disk.
//!
//! An upload of up to one part is hashed in memory and put only when it matches; a larger
//! one goes up as a multipart upload that is completed only when the hash matches and
//! aborted otherwise, so a mismatch never becomes a visible object either way.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use aether_common::{Digest, Sha256Writer};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::client::{ClientConfigKey, ClientOptions, HttpClient, HttpConnector};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart};

use super::{BatchReport, Download, Kind, StoreError};

/// Size of one part of a multipart upload, and the most an upload is buffered before it
/// becomes one (S3 parts are at least 5 MiB, but the last).
pub(super) const PART: usize = 8 << 20;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 2;
/// Uploads to the bucket that may buffer at once, across every request: each holds up to
/// one part before it becomes a multipart upload, then a part being filled and
/// `PARTS_IN_FLIGHT` being sent, about 32 MiB; eight keep the process well within the
/// installation's 512 MiB limit whatever clients send.
static UPLOADS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(8);
/// The longest an upload to the bucket waits for the next bytes of its body.
const BODY_IDLE: Duration = Duration::from_secs(30);
/// Requests in flight for the existence and size checks of one query.
const HEADS_IN_FLIGHT: usize = 32;
/// Blobs of a batched upload being put at once, and the bytes they may hold in memory.
const BATCH_IN_FLIGHT: usize = 16;
const BATCH_BYTES_IN_FLIGHT: u64 = 32 << 20;

/// How pods get objects from an object-storage store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DownloadMode {
    /// Redirect to a short-lived presigned URL of the object: the bytes go from the store
    /// to the pod, not through the control plane.
    Redirect,
    /// Stream the object through the control plane (for stores pods cannot reach).
    Proxy,
}

/// Where and how to reach the bucket.
#[derive(Clone)]
pub struct S3Config {
    /// `s3://bucket[/prefix]`.
    pub url: String,
    pub download: DownloadMode,
    /// Lifetime of a presigned download URL.
    pub presign_ttl: Duration,
    /// The standard AWS settings, by their environment names: `AWS_REGION`,
    /// `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` or
    /// `AWS_WEB_IDENTITY_TOKEN_FILE` with `AWS_ROLE_ARN`, `AWS_ALLOW_HTTP`, `AWS_CA_BUNDLE`.
    pub aws: BTreeMap<String, String>,
}

impl std::fmt::Debug for S3Config {
    // The AWS settings hold credentials: only their names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("url", &self.url)
            .field("download", &self.download)
            .field("presign_ttl", &self.presign_ttl)
            .field("aws", &self.aws.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl S3Config {
    /// The `AWS_*` variables of this process's environment.
    pub fn aws_from_env() -> BTreeMap<String, String> {
        std::env::vars()
            .filter(|(k, v)| k.starts_with("AWS_") && !v.is_empty())
            .collect()
    }

    /// The endpoint the store is reached at, as configured (`None`: AWS itself, https).
    pub fn endpoint(&self) -> Option<&str> {
        // object_store's own precedence: the S3-specific setting first.
        ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
            .iter()
            .find_map(|name| self.aws.get(*name))
            .map(String::as_str)
    }

    /// Whether a boolean AWS setting is on, as the AWS tools read them.
    fn flag(&self, name: &str) -> bool {
        self.aws.get(name).is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
    }
}

#[derive(Debug, Clone)]
pub(super) struct S3 {
    store: Arc<AmazonS3>,
    /// `bucket/prefix`, for logs.
    location: String,
    prefix: String,
    max_bytes: u64,
    download: DownloadMode,
    presign_ttl: Duration,
}

/// `s3://bucket[/prefix]` → (bucket, prefix without surrounding slashes).
fn parse_url(url: &str) -> Result<(String, String), StoreError> {
    let invalid = |why: &str| StoreError::Backend(format!("AETHER_STORE {url:?}: {why}"));
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| invalid("expected s3://bucket[/prefix]"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(invalid("no bucket name"));
    }
    let prefix = prefix.trim_matches('/');
    if prefix
        .split('/')
        .any(|part| part == "." || part == ".." || (part.is_empty() && !prefix.is_empty()))
    {
        return Err(invalid(
            "the prefix may not hold empty, '.' or '..' segments",
        ));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

/// Our own HTTP client for `object_store`: the image is `FROM scratch` with no system
/// trust store, so the roots are the public web roots plus `AWS_CA_BUNDLE`, as for every
/// other TLS connection we make; plain http only with `AWS_ALLOW_HTTP`.
#[derive(Debug)]
struct Connector {
    tls: rustls::ClientConfig,
    allow_http: bool,
}

impl HttpConnector for Connector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        // object_store asks for plain http itself where the protocol is http: the instance
        // metadata service, ECS and EKS Pod Identity credentials on link-local addresses.
        let allow_http = self.allow_http
            || options
                .get_config_value(&ClientConfigKey::AllowHttp)
                .is_some_and(|v| v == "true");
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(self.tls.clone())
            .https_only(!allow_http)
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(client))
    }
}

fn backend(e: object_store::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A multipart upload that is aborted if it is dropped before it completes (a client that
/// goes away drops the handler's future): its parts never become an object either way, but
/// an abort frees them at once instead of at the bucket's lifecycle rule.
struct Multipart(Option<WriteMultipart>);

impl Drop for Multipart {
    fn drop(&mut self) {
        if let (Some(upload), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = upload.abort().await;
            });
        }
    }
}

impl S3 {
    pub(super) fn new(config: &S3Config, max_bytes: u64) -> Result<Self, StoreError> {
        let (bucket, prefix) = parse_url(&config.url)?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let extra: Vec<&std::path::Path> = config
            .aws
            .get("AWS_CA_BUNDLE")
            .map(std::path::Path::new)
            .into_iter()
            .collect();
        let tls = aether_common::tls::client_config(&extra)
            .map_err(|e| StoreError::Backend(format!("AWS_CA_BUNDLE: {e}")))?;
        let allow_http = config.flag("AWS_ALLOW_HTTP");
        if let Some(endpoint) = config.endpoint()
            && endpoint.starts_with("http://")
            && !allow_http
        {
            return Err(StoreError::Backend(format!(
                "AWS_ENDPOINT_URL {endpoint} is plain http: set AWS_ALLOW_HTTP=true to allow it"
            )));
        }
        // As `AmazonS3Builder::from_env` does, from the settings given rather than the
        // process environment.
        let mut builder = AmazonS3Builder::new();
        for (name, value) in &config.aws {
            if let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                builder = builder.with_config(key, value);
            }
        }
        let store = builder
            .with_bucket_name(&bucket)
            .with_allow_http(allow_http)
            .with_http_connector(Connector { tls, allow_http })
            // A dead endpoint fails a request within seconds, not after object_store's
            // default three minutes of retries: a CLI is waiting on the other end.
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(15),
                ..RetryConfig::default()
            })
            .build()
            .map_err(backend)?;
        let location = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        tracing::debug!(%location, endpoint = config.endpoint().unwrap_or("aws"), "object storage configured");
        Ok(Self {
            store: Arc::new(store),
            location,
            prefix,
            max_bytes,
            download: config.download,
            presign_ttl: config.presign_ttl,
        })
    }

    pub(super) fn describe(&self) -> String {
        self.location.clone()
    }

    pub(super) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn key(&self, kind: Kind, digest: &Digest) -> Path {
        let name = match kind {
            Kind::Artifact => format!("sha256/{}.tar.gz", digest.hex()),
            Kind::Blob => format!("blobs/{}", digest.hex()),
        };
        if self.prefix.is_empty() {
            Path::from(name)
        } else {
            Path::from(format!("{}/{name}", self.prefix))
        }
    }

    /// The object's size, `None` when it is not stored.
    pub(super) async fn size(
        &self,
        kind: Kind,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        match self.store.head(&self.key(kind, digest)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(backend(e)),
        }
    }

    pub(super) async fn contains_of(
        &self,
        kind: Kind,
        digest: &Digest,
    ) -> Result<bool, StoreError> {
        Ok(self.size(kind, digest).await?.is_some())
    }

    /// The sizes of `wanted` (asked concurrently), in order; `None` for one not stored.
    async fn sizes_or_none(
        &self,
        kind: Kind,
        wanted: Vec<Digest>,
    ) -> Result<Vec<(Digest, Option<u64>)>, StoreError> {
        futures::stream::iter(wanted)
            .map(|d| async move { self.size(kind, &d).await.map(|size| (d, size)) })
            .buffered(HEADS_IN_FLIGHT)
            .try_collect()
            .await
    }

    pub(super) async fn missing(
        &self,
        kind: Kind,
        wanted: Vec<Digest>,
    ) -> Result<Vec<Digest>, StoreError> {
        Ok(self
            .sizes_or_none(kind, wanted)
            .await?
            .into_iter()
            .filter_map(|(d, size)| size.is_none().then_some(d))
            .collect())
    }

    pub(super) async fn sizes(
        &self,
        kind: Kind,
        wanted: Vec<Digest>,
    ) -> Result<Vec<(Digest, u64)>, StoreError> {
        self.sizes_or_none(kind, wanted)
            .await?
            .into_iter()
            .map(|(d, size)| {
                size.map(|s| (d, s))
                    .ok_or(StoreError::Missing(kind.noun(), d))
            })
            .collect()
    }

    pub(super) async fn read(&self, kind: Kind, digest: &Digest) -> Result<Download, StoreError> {
        match self.store.get(&self.key(kind, digest)).await {
            Ok(got) => Ok(Download::Stream {
                len: got.meta.size,
                body: got.into_stream().map_err(io::Error::other).boxed(),
            }),
            Err(object_store::Error::NotFound { .. }) => {
                Err(StoreError::Missing(kind.noun(), *digest))
            }
            Err(e) => Err(backend(e)),
        }
    }

    pub(super) async fn download(
        &self,
        kind: Kind,
        digest: &Digest,
    ) -> Result<Download, StoreError> {
        match self.download {
            DownloadMode::Proxy => self.read(kind, digest).await,
            DownloadMode::Redirect => {
                let url = self
                    .store
                    .signed_url(http::Method::GET, &self.key(kind, digest), self.presign_ttl)
                    .await
                    .map_err(backend)?;
                Ok(Download::Redirect(url.to_string()))
            }
        }
    }

    pub(super) async fn put_of<S, E>(
        &self,
        kind: Kind,
        claimed: Digest,
        mut body: S,
    ) -> Result<bool, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let key = self.key(kind, &claimed);
        if self.contains_of(kind, &claimed).await? {
            return Ok(false);
        }
        let _buffering = UPLOADS
            .acquire()
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let mut upload = Multipart(None);
        let result = self.stream_up(&key, claimed, &mut body, &mut upload).await;
        if result.is_err()
            && let Some(parts) = upload.0.take()
        {
            // Aborted now rather than by the drop guard, so that a refused upload leaves no
            // parts behind by the time the client hears of it; in a task of its own, so
            // that a client gone meanwhile (axum drops the handler) cannot cut it short.
            let _ = tokio::spawn(async move { parts.abort().await }).await;
        }
        result.map(|()| true)
    }

    /// Hashes the body while buffering it, up to a part, then as a multipart upload;
    /// puts (or completes) it only when the hash matches.
    async fn stream_up<S, E>(
        &self,
        key: &Path,
        claimed: Digest,
        body: &mut S,
        upload: &mut Multipart,
    ) -> Result<(), StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut hasher = Sha256Writer::new();
        let mut total = 0u64;
        let mut buffered: Vec<Bytes> = Vec::new();
        let mut buffered_len = 0usize;
        loop {
            // A client that sends nothing for this long gives its upload slot back.
            let next = tokio::time::timeout(BODY_IDLE, body.next())
                .await
                .map_err(|_| StoreError::Body(format!("no data for {} s", BODY_IDLE.as_secs())))?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| StoreError::Body(e.to_string()))?;
            total += chunk.len() as u64;
            if total > self.max_bytes {
                return Err(StoreError::TooLarge(self.max_bytes));
            }
            hasher.update(&chunk);
            if let Some(parts) = upload.0.as_mut() {
                parts
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(backend)?;
                parts.put(chunk);
                continue;
            }
            buffered_len += chunk.len();
            buffered.push(chunk);
            if buffered_len >= PART {
                let started = self.store.put_multipart(key).await.map_err(backend)?;
                let mut parts = WriteMultipart::new_with_chunk_size(started, PART);
                for chunk in buffered.drain(..) {
                    parts.put(chunk);
                }
                upload.0 = Some(parts);
            }
        }
        let got = hasher.finish();
        if got != claimed {
            return Err(StoreError::Mismatch { claimed, got });
        }
        match upload.0.take() {
            Some(parts) => {
                // A task of its own: completing a verified upload is not cut short by the
                // client going away.
                tokio::spawn(async move { parts.finish().await })
                    .await
                    .map_err(|e| StoreError::Backend(format!("completing the upload: {e}")))?
                    .map_err(backend)?;
            }
            None => {
                self.store
                    .put(key, PutPayload::from_iter(buffered))
                    .await
                    .map_err(backend)?;
            }
        }
        Ok(())
    }

    /// Puts the entries of a batched upload, several at once.
    pub(super) fn batch_writer(&self) -> Result<BatchWriter, StoreError> {
        Ok(BatchWriter {
            s3: self.clone(),
            rt: tokio::runtime::Handle::try_current()
                .map_err(|e| StoreError::Backend(format!("no async runtime: {e}")))?,
            tasks: tokio::task::JoinSet::new(),
            bytes_in_flight: 0,
            report: BatchReport::default(),
        })
    }
}

/// The blob uploads of one batched upload. The batch is read on a blocking thread; each
/// entry's bytes go over a channel to an upload task on the runtime, so small blobs are
/// put concurrently while the next entries are read, within a bound on tasks and bytes.
pub(super) struct BatchWriter {
    s3: S3,
    rt: tokio::runtime::Handle,
    tasks: tokio::task::JoinSet<Result<(bool, u64), StoreError>>,
    bytes_in_flight: u64,
    report: BatchReport,
}

impl BatchWriter {
    pub(super) fn put_entry(
        &mut self,
        claimed: Digest,
        size: u64,
        entry: &mut dyn Read,
    ) -> Result<(), StoreError> {
        while !self.tasks.is_empty()
            && (self.tasks.len() >= BATCH_IN_FLIGHT
                || self.bytes_in_flight + size > BATCH_BYTES_IN_FLIGHT)
        {
            self.join_one()?;
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
        let body = Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        }));
        let s3 = self.s3.clone();
        self.tasks.spawn_on(
            async move {
                match s3.put_of(Kind::Blob, claimed, body).await {
                    Ok(stored) => Ok((stored, size)),
                    Err(StoreError::Mismatch { got, .. }) => Err(StoreError::Batch {
                        entry: claimed.to_string(),
                        why: format!("hashes to {got}"),
                    }),
                    Err(e) => Err(e),
                }
            },
            &self.rt,
        );
        self.bytes_in_flight += size;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let read = match entry.read(&mut buf) {
                Ok(read) => read,
                Err(e) => {
                    // The upload must see a broken body, not an early end.
                    let _ = tx.blocking_send(Err(io::Error::new(e.kind(), e.to_string())));
                    return Err(StoreError::Body(e.to_string()));
                }
            };
            if read == 0 {
                return Ok(());
            }
            if tx
                .blocking_send(Ok(Bytes::copy_from_slice(&buf[..read])))
                .is_err()
            {
                // The upload ended without reading the rest: the blob was already stored
                // (or the upload failed, which joining it reports). Skip to the next entry.
                io::copy(entry, &mut io::sink()).map_err(|e| StoreError::Body(e.to_string()))?;
                return Ok(());
            }
        }
    }

    fn join_one(&mut self) -> Result<(), StoreError> {
        match self.rt.block_on(self.tasks.join_next()) {
            Some(Ok(Ok((stored, size)))) => {
                self.bytes_in_flight -= size;
                if stored {
                    self.report.stored += 1;
                } else {
                    self.report.known += 1;
                }
                Ok(())
            }
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(StoreError::Backend(format!("upload task: {e}"))),
            None => Ok(()),
        }
    }

    /// Waits for every upload still running (each keeps its blob if it verified, whatever
    /// the others do); the first failure is the batch's.
    pub(super) fn finish(mut self) -> Result<BatchReport, StoreError> {
        let mut first = None;
        while !self.tasks.is_empty() {
            if let Err(e) = self.join_one() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(self.report), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_url_names_a_bucket_and_an_optional_clean_prefix() {
        assert_eq!(parse_url("s3://b").unwrap(), ("b".into(), String::new()));
        assert_eq!(parse_url("s3://b/").unwrap(), ("b".into(), String::new()));
        assert_eq!(
            parse_url("s3://b/team/dev/").unwrap(),
            ("b".into(), "team/dev".into())
        );
        for bad in [
            "b/x",
            "s3://",
            "s3:///x",
            "s3://b/a//c",
            "s3://b/../x",
            "gs://b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
