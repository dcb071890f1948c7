//! `aether serve`: the thin control plane. An axum API (artifact store, deploy, release,
//! status), bearer-token auth, Prometheus metrics, and the reconcile loop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use aether_common::contract::annotations::{self, AnnotationError, Format};
use aether_common::contract::on_release::OnRelease;
use aether_common::contract::signature::load_public_key;
use aether_common::kube::manifest::{self, AppSpec};
use aether_common::release::{BlobBatchRequest, MAX_BLOB_BATCH, MAX_BLOB_BATCH_BYTES, delta};
use aether_common::{Digest, PublicKey};
use anyhow::{Context, bail};
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post, put};
use axum::serve::ListenerExt;
use metrics::{counter, histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::api::{
    DeployRequest, ErrorBody, MAX_MISSING_QUERY, MissingRequest, MissingResponse, ReleaseRequest,
    ReleaseResponse, UploadResponse, desired_annotations,
};
use crate::metrics as m;
use crate::store::{
    BatchReport, Download, DownloadMode, Kind, S3Config, Store, StoreError, batch_tar_len,
};
use crate::{cluster, lease, reconcile};

/// The batched blob download's route (`BLOB_BATCH_PATH` under the blobs prefix).
const BLOB_BATCH_ROUTE: &str = "/v1/blobs/download";
/// Largest JSON request body.
const JSON_BODY_LIMIT: usize = 1 << 20;
/// Largest missing-blobs query: 16 MiB holds about 230,000 digests.
const MISSING_BODY_LIMIT: usize = 16 << 20;

/// Settings of `aether serve`; every flag is also an env var.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Listen address. Without AETHER_API_TOKEN only loopback addresses are allowed.
    #[arg(long, env = "AETHER_LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// Artifact store directory.
    #[arg(long, env = "AETHER_DATA_DIR", default_value = "./aether-data")]
    pub data_dir: PathBuf,
    /// Bearer token required on every API call except artifact downloads and probes.
    #[arg(long, env = "AETHER_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// File holding the bearer token (a mounted Secret), instead of AETHER_API_TOKEN.
    /// Read at start; restart after rotating it.
    #[arg(long, env = "AETHER_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// The namespace this control plane manages.
    #[arg(long, env = "AETHER_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Base URL pods use to reach this server's artifact store (`https://…`, or `http://…`
    /// which then allows plain-http artifact URLs). Required with a non-loopback listener;
    /// the default, `http://<listen address>`, only works on this machine.
    #[arg(long, env = "AETHER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Allow plain `http://` artifact URLs in releases (and tell the fetchers so) even
    /// though the public URL is https. Only the operator decides this, never a client.
    #[arg(long, env = "AETHER_ALLOW_HTTP_ARTIFACTS", value_parser = clap::builder::BoolishValueParser::new(), default_value = "0", num_args = 0..=1, default_missing_value = "1")]
    pub allow_http_artifacts: bool,
    /// The aether-fetcher image used in deployments.
    #[arg(long, env = "AETHER_FETCH_IMAGE", default_value = "aether-fetcher:dev")]
    pub fetch_image: String,
    /// Refuse releases without a valid signature.
    #[arg(long, env = "AETHER_REQUIRE_SIGNATURE", value_parser = clap::builder::BoolishValueParser::new(), default_value = "0", num_args = 0..=1, default_missing_value = "1")]
    pub require_signature: bool,
    /// Global Ed25519 public key (64 hex) for signature checks.
    #[arg(long, env = "AETHER_PUBKEY")]
    pub pubkey: Option<String>,
    /// File holding the global public key.
    #[arg(long, env = "AETHER_PUBKEY_FILE")]
    pub pubkey_file: Option<PathBuf>,
    /// Per-app public keys, `app=HEX` (comma-separated in the env var).
    #[arg(long = "app-key", env = "AETHER_APP_KEYS", value_delimiter = ',')]
    pub app_keys: Vec<String>,
    /// Largest artifact accepted by the store.
    #[arg(long, env = "AETHER_MAX_ARTIFACT_BYTES", default_value_t = 1 << 30)]
    pub max_artifact_bytes: u64,
    /// Object storage for artifacts and blobs, `s3://bucket[/prefix]`, instead of the data
    /// directory (for several replicas). Endpoint, region and credentials come from the
    /// standard AWS variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY or AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ALLOW_HTTP, AWS_CA_BUNDLE).
    #[arg(long, env = "AETHER_STORE")]
    pub store: Option<String>,
    /// How pods download from object storage: `redirect` to a presigned URL of the object
    /// (the default), or `proxy` it through the control plane (for a store pods cannot
    /// reach). The data-directory store always streams.
    #[arg(long, env = "AETHER_DOWNLOAD", value_enum)]
    pub download: Option<DownloadMode>,
    /// Lifetime of a presigned download URL, in seconds (it must outlast a fetcher's
    /// retries of one refresh only until the download starts).
    #[arg(long, env = "AETHER_PRESIGN_TTL_SEC", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub presign_ttl_sec: u64,
    /// The Lease (in the namespace) that elects the replica running the reconcile loop.
    #[arg(
        long,
        env = "AETHER_LEASE_NAME",
        default_value = aether_common::kube::install::LEASE_NAME
    )]
    pub lease_name: String,
    /// How long a leader keeps the Lease without renewing it, in seconds: the longest a
    /// killed leader's reconcile loop stays stopped before a standby takes over.
    #[arg(long, env = "AETHER_LEASE_DURATION_SEC", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(2..=300))]
    pub lease_duration_sec: u64,
    /// This replica's name in the Lease; default POD_NAME, else host name and process id.
    #[arg(long, env = "AETHER_IDENTITY")]
    pub identity: Option<String>,
    /// Kubeconfig; in-cluster configuration when unset.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

struct AppState {
    args: ServeArgs,
    store: Arc<Store>,
    client: kube::Client,
    public_url: String,
    /// Whether releases may name `http://` artifact URLs (and fetchers get
    /// `AETHER_ALLOW_HTTP=1`): the operator's `--public-url` or `--allow-http-artifacts`.
    allow_http: bool,
    global_key: Option<PublicKey>,
    app_keys: BTreeMap<String, PublicKey>,
    metrics: PrometheusHandle,
    /// The reconcile loop's caches of the managed Deployments and pods.
    cache: reconcile::Cache,
    /// Bounds the app log streams served at once.
    log_streams: crate::logs::Limiter,
    /// Each recent app's last release manifest, its next one is checked against.
    checked: Arc<crate::checked::CheckedManifests>,
}

type Shared = Arc<AppState>;

/// An API error with its HTTP status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// A request that is well formed but asks for something that cannot be done.
fn unprocessable(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNPROCESSABLE_ENTITY, msg.into())
}

/// Maps a failed cluster operation to an HTTP status by its type, not its text: the API
/// server's own status (403, 404, 409, 422) with its message, 409 for an app that is not
/// dev-hot, 502 for anything else (the API server could not be asked).
fn cluster_error(e: anyhow::Error) -> ApiError {
    let msg = format!("{e:#}");
    if e.downcast_ref::<cluster::NotDevHot>().is_some()
        || e.downcast_ref::<cluster::NotManaged>().is_some()
        || e.downcast_ref::<cluster::NoManifests>().is_some()
    {
        return ApiError(StatusCode::CONFLICT, msg);
    }
    let api_status = e.chain().find_map(|cause| match cause.downcast_ref() {
        Some(kube::Error::Api(status)) => Some(status.code),
        _ => None,
    });
    let code = match api_status {
        Some(c @ (400 | 403 | 404 | 409 | 422)) => {
            StatusCode::from_u16(if c == 400 { 422 } else { c }).unwrap_or(StatusCode::BAD_GATEWAY)
        }
        _ => StatusCode::BAD_GATEWAY,
    };
    ApiError(code, msg)
}

/// The `{app}` of a route, validated before the handler runs: app names become object
/// names (`<app>-aether-fetcher` too), so they must be DNS-1123 labels short enough for
/// that suffix. Anything else is a 422 and nothing is applied.
struct AppName(String);

impl<S: Send + Sync> FromRequestParts<S> for AppName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(app) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| bad_request(e.body_text()))?;
        manifest::check_app_name(&app).map_err(unprocessable)?;
        Ok(Self(app))
    }
}

/// The operator's public URL, validated; `None` means the listener's own address, which
/// is only allowed on loopback (pods elsewhere could not reach it).
fn configured_public_url(args: &ServeArgs) -> anyhow::Result<Option<String>> {
    let Some(raw) = args.public_url.as_deref().filter(|u| !u.is_empty()) else {
        if !args.listen.ip().is_loopback() {
            bail!(
                "listening on {} needs --public-url (AETHER_PUBLIC_URL): the default \
                 http://<listen address> only works on this machine, pods cannot reach it",
                args.listen
            );
        }
        return Ok(None);
    };
    let url = parse_public_url(raw)?;
    if url.loopback && !args.listen.ip().is_loopback() {
        bail!(
            "--public-url {raw:?} names this machine's loopback address while listening on {}: \
             pods cannot reach it; give the Service's or the node's address",
            args.listen
        );
    }
    Ok(Some(url.base))
}

/// A public URL whose shape is right: http(s), a host, no credentials, query or fragment.
pub struct PublicUrl {
    /// Without a trailing `/`.
    pub base: String,
    /// Its host is this machine's loopback address (pods elsewhere cannot reach it).
    pub loopback: bool,
}

/// Checks the shape of a `--public-url` (for `aether serve` and `aether install` alike);
/// whether a loopback host is acceptable is the caller's decision.
pub fn parse_public_url(raw: &str) -> anyhow::Result<PublicUrl> {
    let url = reqwest::Url::parse(raw).with_context(|| format!("--public-url {raw:?}"))?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none_or(str::is_empty)
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        bail!(
            "--public-url {raw:?} must be an http:// or https:// base URL with a host and no \
             credentials, query or fragment"
        );
    }
    let host = url
        .host_str()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    Ok(PublicUrl {
        base: raw.trim_end_matches('/').to_owned(),
        loopback,
    })
}

/// The token from `--api-token-file`, if given: trailing newlines are dropped (`echo` and
/// editors add one), an empty file is an error rather than an open API.
fn read_token_file(path: &std::path::Path) -> anyhow::Result<String> {
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("reading the API token file {}", path.display()))?;
    let token = raw.trim_end_matches(['\n', '\r']);
    if token.trim().is_empty() {
        bail!("the API token file {} is empty", path.display());
    }
    Ok(token.to_owned())
}

/// The store the flags name: object storage with `--store s3://…`, else the data directory.
fn open_store(args: &ServeArgs, public_url: Option<&str>) -> anyhow::Result<Store> {
    let Some(url) = args.store.as_deref().filter(|u| !u.is_empty()) else {
        if args.download == Some(DownloadMode::Redirect) {
            bail!("--download=redirect needs an object store (AETHER_STORE=s3://…)");
        }
        return Store::open(&args.data_dir, args.max_artifact_bytes)
            .with_context(|| format!("opening the artifact store {}", args.data_dir.display()));
    };
    let config = S3Config {
        url: url.to_owned(),
        download: args.download.unwrap_or(DownloadMode::Redirect),
        presign_ttl: std::time::Duration::from_secs(args.presign_ttl_sec),
        aws: S3Config::aws_from_env(),
    };
    // Fetchers refuse an https → http redirect (a downgrade an attacker on the path could
    // cause): say so now rather than through every pod's failed refresh.
    if config.download == DownloadMode::Redirect
        && public_url.is_some_and(|u| u.starts_with("https://"))
        && config.endpoint().is_some_and(|e| e.starts_with("http://"))
    {
        bail!(
            "--download=redirect would send fetchers from https://… to the http:// endpoint \
             AWS_ENDPOINT_URL, and they refuse downgrades: use an https endpoint or \
             --download=proxy"
        );
    }
    Store::s3(&config, args.max_artifact_bytes)
        .with_context(|| format!("opening the object store {url}"))
}

pub async fn run(mut args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some(path) = &args.api_token_file {
        if args.api_token.as_deref().is_some_and(|t| !t.is_empty()) {
            bail!(
                "give the API token either in AETHER_API_TOKEN or in AETHER_API_TOKEN_FILE, not both"
            );
        }
        args.api_token = Some(read_token_file(path)?);
    }
    if args.api_token.as_deref().is_none_or(str::is_empty) {
        if !args.listen.ip().is_loopback() {
            bail!(
                "refusing to listen on {} without AETHER_API_TOKEN: set a token or listen on loopback",
                args.listen
            );
        }
        tracing::warn!(addr = %args.listen, "no AETHER_API_TOKEN: the API is unauthenticated and listens on loopback only");
    }
    let configured_url = configured_public_url(&args)?;
    let global_key = load_public_key(args.pubkey.as_deref(), args.pubkey_file.as_deref())?;
    let mut app_keys = BTreeMap::new();
    for entry in &args.app_keys {
        let (app, key) = entry
            .split_once('=')
            .with_context(|| format!("--app-key {entry:?}: expected app=HEX"))?;
        app_keys.insert(
            app.trim().to_owned(),
            key.trim()
                .parse::<PublicKey>()
                .with_context(|| format!("--app-key for {app}"))?,
        );
    }
    if args.require_signature && global_key.is_none() && app_keys.is_empty() {
        bail!(
            "AETHER_REQUIRE_SIGNATURE=1 needs AETHER_PUBKEY, AETHER_PUBKEY_FILE or AETHER_APP_KEYS"
        );
    }
    let store = open_store(&args, configured_url.as_deref())?;
    let client = aether_common::kube::client::connect(args.kubeconfig.as_deref())
        .await?
        .client;
    let metrics = m::install()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    let public_url = configured_url.unwrap_or_else(|| format!("http://{local}"));
    let allow_http = args.allow_http_artifacts || public_url.starts_with("http://");
    tracing::info!(addr = %local, public_url = %public_url, allow_http, namespace = %args.namespace, store = %store.describe(), "aether serve listening");
    let cache = reconcile::caches(client.clone(), &args.namespace, shutdown.clone());
    let reconcile_client = client.clone();
    let reconcile_ns = args.namespace.clone();
    let (_leading, elector) = lease::lead(
        client.clone(),
        lease::Config {
            name: args.lease_name.clone(),
            namespace: args.namespace.clone(),
            identity: args
                .identity
                .clone()
                .filter(|i| !i.is_empty())
                .unwrap_or_else(lease::default_identity),
            duration: std::time::Duration::from_secs(args.lease_duration_sec),
        },
        shutdown.clone(),
        move || reconcile::run(reconcile_client.clone(), reconcile_ns.clone()),
    );
    let state = Arc::new(AppState {
        cache,
        args: args.clone(),
        store: Arc::new(store),
        client: client.clone(),
        public_url,
        allow_http,
        global_key,
        app_keys,
        metrics,
        log_streams: crate::logs::Limiter::default(),
        checked: Arc::default(),
    });
    // JSON bodies are small; only artifact uploads may be large (up to the store's cap,
    // enforced while streaming).
    let protected = Router::new()
        .route(
            "/v1/artifacts/{digest}",
            put(upload).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/blobs/{digest}",
            put(upload_blob).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/blobs/batch",
            post(upload_blob_batch).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/blobs/missing",
            post(missing_blobs).layer(DefaultBodyLimit::max(MISSING_BODY_LIMIT)),
        )
        .route("/v1/apps/{app}/deploy", post(deploy))
        .route("/v1/apps/{app}/release", post(release))
        .route("/v1/apps/{app}/status", get(status))
        .route("/v1/apps/{app}/logs", get(app_logs))
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), auth));
    let app = Router::new()
        .route("/v1/artifacts/{digest}", get(download))
        .route("/v1/blobs/{digest}", get(download_blob))
        .route(
            BLOB_BATCH_ROUTE,
            post(download_blob_batch).layer(DefaultBodyLimit::max(JSON_BODY_LIMIT)),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .merge(protected)
        .with_state(state);
    let served = axum::serve(listener.tap_io(no_delay), app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
    // The reconcile loop stops and the Lease is released before the process exits, so a
    // standby takes over at once instead of after a lease duration.
    shutdown.cancel();
    if tokio::time::timeout(std::time::Duration::from_secs(10), elector)
        .await
        .is_err()
    {
        tracing::warn!("the lease was not released within 10 s");
    }
    served?;
    Ok(())
}

/// A server with only the download routes (artifacts and blobs), for the local loop: the
/// same code path as the control plane's store.
pub async fn serve_store_only(
    store: Arc<Store>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route(
            "/v1/artifacts/{digest}",
            get(
                |State(store): State<Arc<Store>>,
                 method: Method,
                 Path(digest): Path<String>,
                 headers: HeaderMap| async move {
                    serve_stored(&store, Kind::Artifact, &digest, &method, &headers).await
                },
            ),
        )
        .route(
            "/v1/blobs/{digest}",
            get(
                |State(store): State<Arc<Store>>,
                 method: Method,
                 Path(digest): Path<String>,
                 headers: HeaderMap| async move {
                    serve_stored(&store, Kind::Blob, &digest, &method, &headers).await
                },
            ),
        )
        .route(
            BLOB_BATCH_ROUTE,
            post(
                |State(store): State<Arc<Store>>, Json(req): Json<BlobBatchRequest>| async move {
                    serve_blob_batch(store, req).await
                },
            )
            .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT)),
        )
        .with_state(store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener.tap_io(no_delay), app).await;
    });
    Ok((addr, handle))
}

async fn auth(
    State(s): State<Shared>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = s.args.api_token.as_deref().filter(|t| !t.is_empty()) {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok: bool = presented.as_bytes().ct_eq(token.as_bytes()).into();
        if !ok {
            counter!(m::UNAUTHORIZED_TOTAL).increment(1);
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token".into(),
            )
            .into_response();
        }
    }
    next.run(request).await
}

async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    if cluster::reachable(&s.client).await {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "Kubernetes API unreachable\n",
        )
    }
}

async fn metrics_handler(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

fn parse_digest(raw: &str) -> Result<Digest, ApiError> {
    raw.parse::<Digest>()
        .map_err(|e| bad_request(format!("digest {raw:?}: {e}")))
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Mismatch { .. } | StoreError::Body(_) | StoreError::Batch { .. } => {
            bad_request(e.to_string())
        }
        StoreError::TooLarge(_) => ApiError(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        StoreError::Missing(..) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
        StoreError::Io(_) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        // The object store failed or could not be reached: a gateway's error, retryable.
        StoreError::Backend(_) => ApiError(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// `PUT /v1/blobs/sha256:<hex>`: one blob of the content store, streamed and verified.
async fn upload_blob(
    State(s): State<Shared>,
    Path(digest): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    upload_as(&s, Kind::Blob, &digest, body).await
}

/// Streams an upload into the store as `kind`: 201 when stored, 200 when it was known.
async fn upload_as(
    s: &AppState,
    kind: Kind,
    digest: &str,
    body: Body,
) -> Result<Response, ApiError> {
    let digest = parse_digest(digest)?;
    let stored = s
        .store
        .put_of(kind, digest, body.into_data_stream())
        .await
        .map_err(store_error)?;
    let (metric, url) = match kind {
        Kind::Artifact => (m::UPLOADS_TOTAL, artifact_url(s, &digest)),
        Kind::Blob => (m::BLOB_UPLOADS_TOTAL, blob_url(s, &digest)),
    };
    counter!(metric, "stored" => stored.to_string()).increment(1);
    let code = if stored {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        code,
        Json(UploadResponse {
            digest: digest.to_string(),
            url,
            stored,
        }),
    )
        .into_response())
}

/// `POST /v1/blobs/batch`: many small blobs in one request, as an uncompressed tar whose
/// entries are named by their digest (see `Store::put_blob_batch`).
async fn upload_blob_batch(State(s): State<Shared>, body: Body) -> Result<Response, ApiError> {
    use futures::TryStreamExt;
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let state = s.clone();
    let report: BatchReport =
        tokio::task::spawn_blocking(move || state.store.put_blob_batch(reader))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(store_error)?;
    counter!(m::BLOB_UPLOADS_TOTAL, "stored" => "true").increment(report.stored);
    counter!(m::BLOB_UPLOADS_TOTAL, "stored" => "false").increment(report.known);
    Ok(Json(report).into_response())
}

/// A list of digests in a request body, at most `max` of them (400 beyond, or for any
/// that is not `sha256:<64 hex>`).
fn parse_digests(list: &[String], max: usize, what: &str) -> Result<Vec<Digest>, ApiError> {
    if list.len() > max {
        return Err(bad_request(format!("at most {max} {what}; send several")));
    }
    list.iter().map(|d| parse_digest(d)).collect()
}

/// `POST /v1/blobs/missing`: which of these blobs the store lacks (so a client uploads
/// only those).
async fn missing_blobs(
    State(s): State<Shared>,
    Json(req): Json<MissingRequest>,
) -> Result<Response, ApiError> {
    let wanted = parse_digests(&req.digests, MAX_MISSING_QUERY, "digests per query")?;
    let missing = s
        .store
        .missing_blobs(&wanted)
        .await
        .map_err(store_error)?
        .iter()
        .map(ToString::to_string)
        .collect();
    Ok(Json(MissingResponse { missing }).into_response())
}

async fn upload(
    State(s): State<Shared>,
    Path(digest): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    upload_as(&s, Kind::Artifact, &digest, body).await
}

fn artifact_url(s: &AppState, digest: &Digest) -> String {
    format!("{}/v1/artifacts/{digest}", s.public_url)
}

fn blob_url(s: &AppState, digest: &Digest) -> String {
    format!("{}/v1/blobs/{digest}", s.public_url)
}

async fn download(
    State(s): State<Shared>,
    method: Method,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve_stored(&s.store, Kind::Artifact, &digest, &method, &headers).await
}

/// `GET /v1/blobs/sha256:<hex>`: unauthenticated like artifact downloads (pods hold no
/// token; the fetcher verifies every byte against the signed manifest).
async fn download_blob(
    State(s): State<Shared>,
    method: Method,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve_stored(&s.store, Kind::Blob, &digest, &method, &headers).await
}

/// `POST /v1/blobs/download`: many blobs in one uncompressed tar (see
/// `aether_common::release::BLOB_BATCH_PATH`). Unauthenticated like single blob downloads.
async fn download_blob_batch(
    State(s): State<Shared>,
    Json(req): Json<BlobBatchRequest>,
) -> Result<Response, ApiError> {
    serve_blob_batch(s.store.clone(), req).await
}

/// Answers a batched download: every blob is checked to be stored before the first byte
/// is sent (404 names a missing one), so the tar's length is known; the tar then streams
/// from the files as the client reads.
async fn serve_blob_batch(store: Arc<Store>, req: BlobBatchRequest) -> Result<Response, ApiError> {
    let wanted = parse_digests(&req.digests, MAX_BLOB_BATCH, "blobs per batched download")?;
    let blobs = store.blob_sizes(&wanted).await.map_err(store_error)?;
    let content: u64 = blobs.iter().map(|(_, size)| size).sum();
    if content > MAX_BLOB_BATCH_BYTES {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the blobs asked for total {content} bytes, at most {MAX_BLOB_BATCH_BYTES} \
                 per batched download; send several"
            ),
        ));
    }
    counter!(m::BLOB_DOWNLOADS_TOTAL).increment(blobs.len() as u64);
    let len = batch_tar_len(&blobs);
    Ok((
        [
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CONTENT_TYPE, "application/x-tar".to_owned()),
        ],
        Body::from_stream(store.blob_batch_body(blobs)),
    )
        .into_response())
}

/// Answers a download: a redirect to the object's presigned URL when the store hands them
/// out, else its bytes with Content-Length and its digest as ETag (304 when the client has
/// them). `HEAD` (the CLI asking whether an artifact is stored) is answered here whatever
/// the store: a presigned URL is signed for `GET` only.
async fn serve_stored(
    store: &Store,
    kind: Kind,
    digest: &str,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let digest = parse_digest(digest)?;
    let etag = delta::etag(&digest);
    if method == Method::HEAD {
        let len = store.size_of(kind, &digest).await.map_err(store_error)?;
        return Ok((
            [
                (header::CONTENT_LENGTH, len.to_string()),
                (header::ETAG, etag),
            ],
            Body::empty(),
        )
            .into_response());
    }
    let download = store.download(kind, &digest).await.map_err(store_error)?;
    match kind {
        Kind::Artifact => counter!(m::DOWNLOADS_TOTAL).increment(1),
        Kind::Blob => counter!(m::BLOB_DOWNLOADS_TOTAL).increment(1),
    }
    let (len, body) = match download {
        Download::Redirect(url) => {
            return Ok((
                StatusCode::TEMPORARY_REDIRECT,
                [
                    (header::LOCATION, url),
                    (header::CACHE_CONTROL, "no-store".to_owned()),
                ],
            )
                .into_response());
        }
        Download::Stream { len, body } => (len, body),
    };
    let if_none_match = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    if if_none_match == Some(etag.as_str()) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    // A fetcher holding the app's previous manifest asks for a patch against it.
    let held = if_none_match
        .and_then(delta::etag_digest)
        .filter(|_| kind == Kind::Blob)
        .filter(|_| {
            headers
                .get(delta::A_IM_HEADER)
                .and_then(|v| v.to_str().ok())
                .is_some_and(delta::accepted)
        });
    if let Some(held) = held {
        match store.manifest_patch(&held, &digest).await {
            Ok(Some(patch)) => return Ok(patch_response(&held, etag, patch)),
            Ok(None) => {}
            // The patch only saves bytes: the manifest is served whole.
            Err(e) => tracing::warn!(error = %e, %held, %digest, "could not make a manifest patch"),
        }
    }
    let content_type = match kind {
        Kind::Artifact => "application/gzip",
        Kind::Blob => "application/octet-stream",
    };
    Ok((
        [
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CONTENT_TYPE, content_type.to_owned()),
            (header::ETAG, etag),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// `226 IM Used`: a manifest as a patch against the one the client holds
/// (`aether_common::release::delta`).
fn patch_response(held: &Digest, etag: String, patch: bytes::Bytes) -> Response {
    (
        StatusCode::IM_USED,
        [
            (header::CONTENT_LENGTH, patch.len().to_string()),
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::ETAG, etag),
            (
                HeaderName::from_static(delta::IM_HEADER),
                delta::IM.to_owned(),
            ),
            (
                HeaderName::from_static(delta::DELTA_BASE_HEADER),
                delta::etag(held),
            ),
            // Of use only to a client holding that same manifest.
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        Body::from(patch),
    )
        .into_response()
}

fn namespace(s: &AppState, requested: Option<&str>) -> Result<String, ApiError> {
    match requested.filter(|n| !n.is_empty()) {
        Some(ns) if ns != s.args.namespace => Err(bad_request(format!(
            "this control plane manages namespace {:?}, not {ns:?}",
            s.args.namespace
        ))),
        _ => Ok(s.args.namespace.clone()),
    }
}

/// Checks a release with the fetcher's own rules (`annotations::desired_release`: digest
/// syntax, URL scheme and host, signature syntax) and the signature policy: whenever a key
/// applies to the app (its own or the global one) the signature must verify, and with
/// `--require-signature` an app without a key is refused. Returns the digest and the
/// artifact URL to annotate.
async fn check_release(
    s: &AppState,
    app: &str,
    r: &ReleaseRequest,
) -> Result<(Digest, String), ApiError> {
    let digest = parse_digest(&r.digest)?;
    let format: Format = r
        .format
        .as_deref()
        .unwrap_or_default()
        .parse()
        .map_err(|e: AnnotationError| unprocessable(e.to_string()))?;
    let kind = match format {
        Format::TarGz => Kind::Artifact,
        Format::Manifest => Kind::Blob,
    };
    let stored = s
        .store
        .contains_of(kind, &digest)
        .await
        .map_err(store_error)?;
    if format == Format::Manifest && stored {
        check_manifest(s, app, &digest).await?;
    }
    let url = match (r.url.as_deref().filter(|u| !u.is_empty()), format) {
        (Some(url), _) => url.to_owned(),
        (None, Format::TarGz) if stored => artifact_url(s, &digest),
        (None, Format::Manifest) if stored => blob_url(s, &digest),
        (None, _) => {
            return Err(unprocessable(format!(
                "{digest} is not in the store: upload it first or give its url"
            )));
        }
    };
    let desired = annotations::desired_release(
        &desired_annotations(&digest.to_string(), &url, r),
        s.allow_http,
    )
    .map_err(|e| unprocessable(e.to_string()))?
    .ok_or_else(|| unprocessable("no digest"))?;
    let key = s.app_keys.get(app).or(s.global_key.as_ref());
    match (key, &desired.signature) {
        (Some(key), Some(sig)) => key.verify(&digest, sig).map_err(|e| {
            counter!(m::SIGNATURE_REFUSED_TOTAL).increment(1);
            unprocessable(format!("signature refused: {e}"))
        })?,
        (Some(_), None) => {
            counter!(m::SIGNATURE_REFUSED_TOTAL).increment(1);
            return Err(unprocessable(format!(
                "a signature is required: a public key applies to app {app}"
            )));
        }
        (None, _) if s.args.require_signature => {
            return Err(unprocessable(format!(
                "no public key configured for app {app} and signatures are required"
            )));
        }
        (None, _) => {}
    }
    Ok((digest, url))
}

/// A stored manifest must be one a fetcher of `app` would accept: canonical, safe and
/// for this app. Refusing it here gives the CLI the reason at once, instead of as a
/// refusal from every pod.
async fn check_manifest(s: &AppState, app: &str, digest: &Digest) -> Result<(), ApiError> {
    let max = aether_common::release::MAX_MANIFEST_BYTES;
    let bytes = match s.store.read_small(Kind::Blob, digest, max).await {
        Err(StoreError::TooLarge(_)) => {
            return Err(unprocessable(format!(
                "{digest} is more than the {max} bytes a manifest may be"
            )));
        }
        read => read.map_err(store_error)?,
    };
    let (checked, owner) = (s.checked.clone(), app.to_owned());
    let (known, whole) = (*digest, bytes.len());
    let parsed = tokio::task::spawn_blocking(move || checked.parse(&owner, known, bytes))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| unprocessable(format!("{digest} is not a valid release manifest: {e}")))?;
    let manifest = parsed.manifest;
    if let Some((base, patch)) = parsed.patch {
        s.store.keep_patch(base, *digest, patch, whole);
    }
    if manifest.app != app {
        return Err(unprocessable(format!(
            "manifest {digest} is for app {:?}, not {app:?}",
            manifest.app
        )));
    }
    Ok(())
}

async fn deploy(
    State(s): State<Shared>,
    AppName(app): AppName,
    Json(req): Json<DeployRequest>,
) -> Result<Response, ApiError> {
    if req.dev_hot && req.command.is_empty() {
        return Err(unprocessable(
            "a dev-hot deployment needs the app's command: it runs under the supervisor, \
             which restarts it in each new release",
        ));
    }
    let on_release = req
        .on_release
        .as_deref()
        .map(str::parse::<OnRelease>)
        .transpose()
        .map_err(unprocessable)?;
    if on_release.is_some() && !req.dev_hot {
        return Err(unprocessable(
            "on_release applies to dev-hot deployments only: without dev-hot the app is \
             never told about a new release",
        ));
    }
    let ns = namespace(
        &s,
        req.namespace
            .as_deref()
            .or(req.release.namespace.as_deref()),
    )?;
    let (digest, url) = check_release(&s, &app, &req.release).await?;
    let key = s
        .app_keys
        .get(&app)
        .or(s.global_key.as_ref())
        .map(PublicKey::hex);
    let mut fetcher_env = Vec::new();
    if s.allow_http {
        fetcher_env.push(("AETHER_ALLOW_HTTP".to_owned(), "1".to_owned()));
    }
    let spec = AppSpec {
        app: app.clone(),
        namespace: ns.clone(),
        image: req.image,
        command: req.command,
        dev_hot: req.dev_hot,
        fetch_image: s.args.fetch_image.clone(),
        replicas: req.replicas,
        desired: desired_annotations(&digest.to_string(), &url, &req.release)
            .into_iter()
            .collect(),
        public_key: key,
        fetcher_env,
        on_release,
    };
    cluster::apply_app(&s.client, &spec)
        .await
        .map_err(cluster_error)?;
    counter!(m::DEPLOYS_TOTAL).increment(1);
    let pods = if req.dev_hot {
        let desired = desired_annotations(&digest.to_string(), &url, &req.release);
        cluster::patch_pods(&s.client, &ns, &app, &cluster::desired_patch(&desired))
            .await
            .map_err(cluster_error)?
    } else {
        0
    };
    Ok(Json(ReleaseResponse {
        digest: digest.to_string(),
        url,
        pods_patched: pods,
    })
    .into_response())
}

async fn release(
    State(s): State<Shared>,
    AppName(app): AppName,
    Json(req): Json<ReleaseRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let ns = namespace(&s, req.namespace.as_deref())?;
    let (digest, url) = check_release(&s, &app, &req).await?;
    let desired = desired_annotations(&digest.to_string(), &url, &req);
    let pods = cluster::release(&s.client, &ns, &app, &desired)
        .await
        .map_err(|e| {
            counter!(m::PATCH_FAILURES_TOTAL).increment(1);
            cluster_error(e)
        })?;
    counter!(m::PATCHES_TOTAL).increment(1);
    histogram!(m::PATCH_SECONDS).record(started.elapsed().as_secs_f64());
    tracing::info!(app = %app, digest = %digest, pods, ms = started.elapsed().as_millis() as u64, "release patched");
    Ok(Json(ReleaseResponse {
        digest: digest.to_string(),
        url,
        pods_patched: pods,
    })
    .into_response())
}

#[derive(serde::Deserialize)]
struct StatusQuery {
    namespace: Option<String>,
    /// Comma-separated pod names: only these are read (for waits that re-read the pods
    /// still pending). Default: every pod of the app.
    pods: Option<String>,
}

async fn status(
    State(s): State<Shared>,
    AppName(app): AppName,
    Query(q): Query<StatusQuery>,
) -> Result<Response, ApiError> {
    let ns = namespace(&s, q.namespace.as_deref())?;
    let only: Option<Vec<String>> = q.pods.as_deref().map(|p| {
        p.split(',')
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect()
    });
    let status = cluster::status(&s.client, Some(&s.cache), &ns, &app, only.as_deref())
        .await
        .map_err(cluster_error)?;
    Ok(Json(status).into_response())
}

/// The app container's logs of every pod of the app, as NDJSON (`{"pod", "line"}`).
async fn app_logs(
    State(s): State<Shared>,
    AppName(app): AppName,
    Query(q): Query<crate::logs::LogQuery>,
) -> Result<Response, ApiError> {
    let ns = namespace(&s, q.namespace.as_deref())?;
    let deployments =
        kube::Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(s.client.clone(), &ns);
    if deployments
        .get_opt(&app)
        .await
        .map_err(|e| cluster_error(e.into()))?
        .is_none()
    {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no app {app:?} in namespace {ns:?}"),
        ));
    }
    let slot = s.log_streams.try_acquire().ok_or_else(|| {
        ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} log streams are open on this control plane; try again when one ends",
                crate::logs::MAX_STREAMS
            ),
        )
    })?;
    let records = crate::logs::stream(s.client.clone(), &ns, &app, q, slot)
        .await
        .map_err(|e| cluster_error(anyhow::Error::new(e)))?;
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(records),
    )
        .into_response())
}

/// Responses stream their headers and then their body in separate writes: with Nagle's
/// algorithm the body waits for the client's delayed ACK of the headers, 40 ms on Linux,
/// which was a third of a local save.
pub(crate) fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_loses_its_trailing_newline_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(read_token_file(&file).unwrap(), "s3cret");
        std::fs::write(&file, "\n").unwrap();
        let err = read_token_file(&file).unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");
        let missing = read_token_file(&dir.path().join("nope")).unwrap_err();
        assert!(format!("{missing:#}").contains("reading the API token file"));
    }

    #[test]
    fn the_batched_download_route_is_the_contract_path_under_the_blobs_prefix() {
        assert_eq!(
            BLOB_BATCH_ROUTE,
            format!("/v1/blobs/{}", aether_common::release::BLOB_BATCH_PATH)
        );
    }
}
