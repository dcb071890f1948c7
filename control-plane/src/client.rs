//! The CLI's client of the control plane API.

use std::time::Duration;

use aether_common::Digest;
use anyhow::{Context, bail};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::api::{
    DeployRequest, MAX_MISSING_QUERY, MissingRequest, MissingResponse, ReleaseRequest,
    ReleaseResponse, UploadResponse,
};
use crate::cluster::AppStatus;
use crate::known::KnownBlobs;
use crate::snapshot::Snapshot;
use crate::store::BatchReport;

/// Files up to this size travel in batches (one request for many), larger ones alone.
const BATCH_FILE_MAX: u64 = 1 << 20;
/// A batch is sent when it holds this many bytes or files.
const BATCH_BYTES: u64 = 32 << 20;
const BATCH_FILES: usize = 10_000;
/// Large blobs uploaded at once.
const UPLOAD_CONCURRENCY: usize = 4;
/// Attempts of a request that fails transiently, and the delays between them (doubling,
/// jittered): about six seconds in all, long enough for a Service to stop sending to a
/// replica that went away.
const ATTEMPTS: u32 = 6;
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(3);
/// How long a peer may acknowledge nothing before the CLI drops the connection.
const DEAD_PEER: Duration = Duration::from_secs(30);

/// Between half and all of `d`, so that clients that failed together retry apart.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d / 2 + d.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

/// What pushing a snapshot sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pushed {
    /// Blobs the store lacked and that were sent (the manifest included).
    pub blobs: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// Connection settings shared by every client command.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Base URL of `aether serve`.
    #[arg(
        long,
        env = "AETHER_API_URL",
        default_value = "http://127.0.0.1:3000",
        global = true
    )]
    pub api_url: String,
    /// Bearer token for the API.
    #[arg(long, env = "AETHER_API_TOKEN", hide_env_values = true, global = true)]
    pub api_token: Option<String>,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // A replica lost without a reset (a node gone, a partition) must not hold a
            // request forever: TCP gives up on a peer that acknowledges nothing for this
            // long (keepalive probes while idle, unacknowledged data while sending), and
            // the retry goes to another replica. Not a read timeout: an upload of a large
            // artifact legitimately waits long for its answer.
            .tcp_keepalive(Duration::from_secs(15))
            .tcp_keepalive_interval(Duration::from_secs(5))
            .tcp_keepalive_retries(3)
            .tcp_user_timeout(DEAD_PEER)
            .tls_backend_preconfigured(aether_common::tls::client_config(&[])?)
            .build()?;
        Ok(Self {
            http,
            base: args.api_url.trim_end_matches('/').to_owned(),
            token: args.api_token.clone().filter(|t| !t.is_empty()),
        })
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Sends a request, again after a transient failure: the control plane could not be
    /// reached or the connection broke (a replica going away behind its Service), or it
    /// answered 502, 503 or 504 (object storage failing). Every route of the API is
    /// idempotent (content-addressed uploads, releases of a digest), so a request that may
    /// have been handled is safe to repeat. A streamed body cannot be sent twice: such a
    /// request gets one attempt.
    async fn send_retrying(
        &self,
        r: reqwest::RequestBuilder,
    ) -> reqwest::Result<reqwest::Response> {
        let mut delay = RETRY_FIRST;
        for _ in 1..ATTEMPTS {
            let Some(attempt) = r.try_clone() else {
                break;
            };
            match attempt.send().await {
                Ok(response) if matches!(response.status().as_u16(), 502..=504) => {}
                Err(e) if e.is_connect() || e.is_request() || e.is_timeout() => {
                    tracing::debug!(error = %e, "request failed; retrying");
                }
                done => return done,
            }
            tokio::time::sleep(jitter(delay)).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
        r.send().await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        r: reqwest::RequestBuilder,
        what: &str,
    ) -> anyhow::Result<T> {
        let response = self
            .send_retrying(r)
            .await
            .with_context(|| format!("{what}: cannot reach {}", self.base))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("{what}: {status}: {}", error_message(text));
        }
        serde_json::from_str(&text).with_context(|| format!("{what}: unexpected answer {text:?}"))
    }

    /// Whether the store already holds the artifact (`HEAD`): a known digest is answered
    /// before its body is read, so sending a large body again would end in a broken pipe.
    pub async fn has_artifact(&self, digest: &Digest) -> anyhow::Result<bool> {
        let response = self
            .send_retrying(self.req(reqwest::Method::HEAD, &format!("/v1/artifacts/{digest}")))
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        Ok(response.status().is_success())
    }

    pub async fn upload(&self, digest: &Digest, bytes: Vec<u8>) -> anyhow::Result<UploadResponse> {
        let len = bytes.len();
        let body =
            if len > PROGRESS_MIN_BYTES && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                progress_body(bytes)
            } else {
                reqwest::Body::from(bytes)
            };
        let r = self
            .req(reqwest::Method::PUT, &format!("/v1/artifacts/{digest}"))
            .header("content-type", "application/gzip")
            .header("content-length", len.to_string())
            .body(body);
        let result = self.send(r, "upload").await;
        if len > PROGRESS_MIN_BYTES && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprintln!();
        }
        result
    }

    /// Sends what the store lacks of a snapshot: asks which blobs are missing (of those not
    /// `known` to be stored), sends the small ones in batches and the large ones alone,
    /// then the manifest itself. Once all is sent, `known` covers the snapshot: a one-file
    /// save of a 40,000-file tree then asks about one blob, not all.
    pub async fn push(&self, snap: &Snapshot, known: &mut KnownBlobs) -> anyhow::Result<Pushed> {
        let unknown = known.unknown(snap);
        let mut wanted = unknown.clone();
        wanted.push(snap.digest);
        tracing::debug!(
            asked = wanted.len(),
            known = known.len(),
            "asking the store which blobs it lacks"
        );
        let missing: std::collections::HashSet<String> =
            self.missing(&wanted).await?.into_iter().collect();
        let mut pushed = Pushed::default();
        let mut small = Vec::new();
        let mut large = Vec::new();
        for digest in &unknown {
            let Some((path, size)) = snap.blobs.get(digest) else {
                continue;
            };
            if !missing.contains(&digest.to_string()) {
                continue;
            }
            pushed.blobs += 1;
            pushed.bytes += size;
            if *size <= BATCH_FILE_MAX {
                small.push((*digest, path.clone(), *size));
            } else {
                large.push((*digest, path.clone()));
            }
        }
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        for (i, item) in small.iter().enumerate() {
            batch_bytes += item.2;
            batch.push((item.0, item.1.clone()));
            if batch_bytes >= BATCH_BYTES || batch.len() >= BATCH_FILES || i + 1 == small.len() {
                self.upload_batch(std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
        }
        futures::stream::iter(large)
            .map(|(digest, path)| async move { self.upload_file(&digest, &path).await })
            .buffer_unordered(UPLOAD_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?;
        if missing.contains(&snap.digest.to_string()) {
            pushed.blobs += 1;
            pushed.bytes += snap.bytes.len() as u64;
            self.put_blob(&snap.digest, snap.bytes.clone()).await?;
        }
        known.confirm(snap, unknown);
        Ok(pushed)
    }

    /// Uploads one blob held in memory (a manifest).
    pub async fn put_blob(
        &self,
        digest: &Digest,
        bytes: impl Into<reqwest::Body>,
    ) -> anyhow::Result<()> {
        let r = self
            .req(reqwest::Method::PUT, &format!("/v1/blobs/{digest}"))
            .body(bytes);
        let _: UploadResponse = self.send(r, "blob upload").await?;
        Ok(())
    }

    /// Which of `digests` the store lacks.
    pub async fn missing(&self, digests: &[Digest]) -> anyhow::Result<Vec<String>> {
        let mut missing = Vec::new();
        for chunk in digests.chunks(MAX_MISSING_QUERY) {
            let r = self
                .req(reqwest::Method::POST, "/v1/blobs/missing")
                .json_body(&MissingRequest {
                    digests: chunk.iter().map(ToString::to_string).collect(),
                })?;
            let answer: MissingResponse = self.send(r, "missing blobs").await?;
            missing.extend(answer.missing);
        }
        Ok(missing)
    }

    /// One batched upload: an uncompressed tar of blobs named by digest.
    async fn upload_batch(&self, files: Vec<(Digest, std::path::PathBuf)>) -> anyhow::Result<()> {
        let body = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
            let mut tar = tar::Builder::new(Vec::new());
            for (digest, path) in files {
                let bytes =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                let mut header = tar::Header::new_ustar();
                header.set_size(bytes.len() as u64);
                header.set_mode(0o644);
                header.set_entry_type(tar::EntryType::Regular);
                tar.append_data(&mut header, digest.to_string(), &bytes[..])?;
            }
            Ok(tar.into_inner()?)
        })
        .await??;
        let r = self
            .req(reqwest::Method::POST, "/v1/blobs/batch")
            .header("content-type", "application/x-tar")
            .body(body);
        let _: BatchReport = self
            .send(r, "blob upload (a file changed while it was sent?)")
            .await?;
        Ok(())
    }

    /// One blob streamed from its file.
    async fn upload_file(&self, digest: &Digest, path: &std::path::Path) -> anyhow::Result<()> {
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("reading {}", path.display()))?;
        let len = file.metadata().await?.len();
        let r = self
            .req(reqwest::Method::PUT, &format!("/v1/blobs/{digest}"))
            .header("content-length", len.to_string())
            .body(reqwest::Body::wrap_stream(
                tokio_util::io::ReaderStream::new(file),
            ));
        let _: UploadResponse = self
            .send(r, &format!("uploading {}", path.display()))
            .await?;
        Ok(())
    }

    /// A stored blob's bytes (unauthenticated route; `None` when the store lacks it).
    pub async fn blob(&self, digest: &Digest) -> anyhow::Result<Option<Vec<u8>>> {
        let response = self
            .send_retrying(self.req(reqwest::Method::GET, &format!("/v1/blobs/{digest}")))
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = response.error_for_status()?;
        Ok(Some(response.bytes().await?.to_vec()))
    }

    pub async fn deploy(&self, app: &str, req: &DeployRequest) -> anyhow::Result<ReleaseResponse> {
        let r = self
            .req(reqwest::Method::POST, &format!("/v1/apps/{app}/deploy"))
            .json_body(req)?;
        self.send(r, "deploy").await
    }

    pub async fn release(
        &self,
        app: &str,
        req: &ReleaseRequest,
    ) -> anyhow::Result<ReleaseResponse> {
        let r = self
            .req(reqwest::Method::POST, &format!("/v1/apps/{app}/release"))
            .json_body(req)?;
        self.send(r, "release").await
    }

    pub async fn status(&self, app: &str, namespace: Option<&str>) -> anyhow::Result<AppStatus> {
        self.status_of(app, namespace, None).await
    }

    /// The app's status, its fetchers read only for the pods named in `only` (all when
    /// `None`).
    pub async fn status_of(
        &self,
        app: &str,
        namespace: Option<&str>,
        only: Option<&[String]>,
    ) -> anyhow::Result<AppStatus> {
        let mut query = Vec::new();
        if let Some(ns) = namespace {
            query.push(("namespace", ns.to_owned()));
        }
        if let Some(pods) = only {
            query.push(("pods", pods.join(",")));
        }
        let path = with_query(&format!("/v1/apps/{app}/status"), &query)?;
        // Bounded: `status -w` and the live wait must notice a control plane that stopped
        // answering rather than hang on it.
        self.send(
            self.req(reqwest::Method::GET, &path)
                .timeout(STATUS_TIMEOUT),
            "status",
        )
        .await
    }
}

impl Client {
    /// Opens `GET /v1/apps/{app}/logs` (NDJSON); read it with [`LogLines::next`].
    pub async fn logs(
        &self,
        app: &str,
        namespace: Option<&str>,
        q: &crate::logs::LogQuery,
    ) -> anyhow::Result<LogLines> {
        let mut query = vec![("follow", q.follow.to_string())];
        if let Some(ns) = namespace {
            query.push(("namespace", ns.to_owned()));
        }
        if let Some(s) = q.since_seconds {
            query.push(("since_seconds", s.to_string()));
        }
        if let Some(t) = q.tail_lines {
            query.push(("tail_lines", t.to_string()));
        }
        let path = with_query(&format!("/v1/apps/{app}/logs"), &query)?;
        let response = self
            .req(reqwest::Method::GET, &path)
            .send()
            .await
            .with_context(|| format!("logs: cannot reach {}", self.base))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!("logs: {status}: {}", error_message(text));
        }
        Ok(LogLines {
            response,
            buf: Vec::new(),
        })
    }
}

/// `path` with `query` percent-encoded by the URL parser. Only the query string is built
/// here: the base URL may carry a path prefix of its own.
fn with_query(path: &str, query: &[(&str, String)]) -> anyhow::Result<String> {
    let mut encoder = reqwest::Url::parse("http://query.invalid/")?;
    encoder
        .query_pairs_mut()
        .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
    Ok(match encoder.query().filter(|q| !q.is_empty()) {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    })
}

/// The `error` of the API's JSON error body, else the body as it is.
fn error_message(body: String) -> String {
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or(body)
}

/// The lines of an open logs stream.
pub struct LogLines {
    response: reqwest::Response,
    buf: Vec<u8>,
}

impl LogLines {
    /// The next record; `None` when the stream ends. Heartbeats (empty lines) are
    /// skipped; a stream silent for several heartbeats is a dead connection, an error.
    pub async fn next(&mut self) -> anyhow::Result<Option<crate::logs::LogLine>> {
        // The server cuts lines at MAX_LINE; JSON escaping at most sextuples them.
        const MAX_RECORD: usize = crate::logs::MAX_LINE * 6 + 1024;
        let idle = crate::logs::HEARTBEAT * 4;
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let record: Vec<u8> = self.buf.drain(..=i).collect();
                if record.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(
                    serde_json::from_slice(&record).context("logs: a line that is not JSON")?,
                ));
            }
            if self.buf.len() > MAX_RECORD {
                bail!("logs: a record longer than {MAX_RECORD} bytes");
            }
            let chunk = tokio::time::timeout(idle, self.response.chunk())
                .await
                .map_err(|_| anyhow::anyhow!("logs: nothing from the control plane for {idle:?}"))?
                .context("logs: reading")?;
            match chunk {
                Some(chunk) => self.buf.extend_from_slice(&chunk),
                None => return Ok(None),
            }
        }
    }
}

/// Longest a status read may take (the control plane reads every pod's fetcher, each
/// through the API server's proxy with its own 5 s bound).
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);

/// Uploads larger than this show a progress line on a terminal.
const PROGRESS_MIN_BYTES: usize = 4 << 20;

/// The upload body in 256 KiB chunks, printing `upload NN% (x/y MB)` as they are sent.
fn progress_body(bytes: Vec<u8>) -> reqwest::Body {
    let total = bytes.len();
    let bytes = bytes::Bytes::from(bytes);
    let chunks: Vec<bytes::Bytes> = (0..total)
        .step_by(256 * 1024)
        .map(|start| bytes.slice(start..(start + 256 * 1024).min(total)))
        .collect();
    let mut sent = 0usize;
    let stream = futures::stream::iter(chunks).map(move |chunk| {
        sent += chunk.len();
        eprint!(
            "\rupload {:>3}% ({:.1}/{:.1} MB)",
            sent * 100 / total.max(1),
            sent as f64 / 1e6,
            total as f64 / 1e6
        );
        Ok::<_, std::io::Error>(chunk)
    });
    reqwest::Body::wrap_stream(stream)
}

trait JsonBody: Sized {
    fn json_body<T: serde::Serialize>(self, body: &T) -> anyhow::Result<Self>;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body<T: serde::Serialize>(self, body: &T) -> anyhow::Result<Self> {
        Ok(self
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body)?))
    }
}
