//! Settings of the sidecar: every setting is an environment variable and a `--flag`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use aether_common::PublicKey;
use aether_common::contract::signature::load_public_key;
pub use aether_common::logging::LogFormat;
use anyhow::{Context, bail};
use clap::builder::BoolishValueParser;

/// Where the desired release is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FetchMode {
    /// Watch the own Pod through the API server.
    Watch,
    /// GET the own Pod every interval.
    Poll,
    /// Read the Downward API annotations file (no API access or RBAC needed).
    File,
}

/// The service-account namespace file mounted into every pod.
pub const SA_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// The cluster CA mounted into every pod; trusted for artifact URLs too.
pub const SA_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Name of the pod to watch (Downward API `metadata.name`). Default: the hostname.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Namespace of the pod. Default: the service-account namespace file, then the
    /// kubeconfig context's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// The app this pod belongs to: a manifest release for another app is refused
    /// (reason `replay`), and without it no manifest release is accepted.
    #[arg(long, env = "AETHER_APP")]
    pub app: Option<String>,

    /// Refuse tar.gz releases (reason `replay`): they carry no `seq`, so only manifest
    /// releases are protected against replay.
    #[arg(long, env = "AETHER_REQUIRE_MANIFEST", value_parser = BoolishValueParser::new(), default_value = "0", num_args = 0..=1, default_missing_value = "1")]
    pub require_manifest: bool,

    /// Where the supervisor marks the releases its app runs from (default:
    /// `<workspace>/.aether/in-use`); the fetcher never patches or prunes those.
    #[arg(long, env = "AETHER_IN_USE_DIR")]
    pub in_use_dir: Option<PathBuf>,

    /// Source of the desired release.
    #[arg(long, env = "AETHER_FETCH_MODE", value_enum, default_value = "watch")]
    pub fetch_mode: FetchMode,

    /// Downward API annotations file read in `file` mode.
    #[arg(
        long,
        env = "AETHER_ANNOTATIONS_FILE",
        default_value = "/etc/podinfo/annotations"
    )]
    pub annotations_file: PathBuf,

    /// Poll period in `poll` mode; the periodic resync in `watch` and `file` modes.
    #[arg(long, env = "AETHER_FETCH_INTERVAL_SEC", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub fetch_interval_sec: u64,

    /// Minimum time between one release going live and the next refresh starting; newer
    /// digests arriving meanwhile are coalesced, never dropped.
    #[arg(long, env = "AETHER_MIN_REFRESH_INTERVAL_MS", default_value_t = 2000)]
    pub min_refresh_interval_ms: u64,

    /// Consecutive failures that count as one anomaly event.
    #[arg(long, env = "AETHER_ANOMALY_FAIL_THRESHOLD", default_value_t = aether_common::contract::metrics::DEFAULT_ANOMALY_FAIL_THRESHOLD, value_parser = clap::value_parser!(u32).range(1..))]
    pub anomaly_fail_threshold: u32,

    /// Cap of the jittered exponential retry delay, which starts at 500 ms.
    #[arg(long, env = "AETHER_BACKOFF_MAX_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(500..))]
    pub backoff_max_ms: u64,

    /// Overall deadline of one refresh; past it the refresh is cancelled and counted as a
    /// `timeout` failure (retried with backoff).
    #[arg(long, env = "AETHER_REFRESH_TIMEOUT_MS", default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub refresh_timeout_ms: u64,

    /// Largest artifact (compressed bytes) accepted.
    #[arg(long, env = "AETHER_MAX_ARTIFACT_BYTES", default_value_t = 1 << 30)]
    pub max_artifact_bytes: u64,

    /// Largest total size of the files an artifact may extract to.
    #[arg(long, env = "AETHER_MAX_EXTRACT_BYTES", default_value_t = 4 << 30)]
    pub max_extract_bytes: u64,

    /// Largest number of entries an artifact may hold.
    #[arg(long, env = "AETHER_MAX_ENTRIES", default_value_t = 100_000)]
    pub max_entries: u64,

    /// Releases kept on disk, the live one included.
    #[arg(long, env = "AETHER_KEEP_RELEASES", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_releases: u64,

    /// The shared volume.
    #[arg(long, env = "AETHER_WORKSPACE", default_value = "/workspace")]
    pub workspace: PathBuf,

    /// Listener for /metrics, /healthz, /readyz and /status.
    #[arg(long, env = "AETHER_HTTP_ADDR", default_value = "0.0.0.0:9180")]
    pub http_addr: SocketAddr,

    /// Allow plain http:// artifact URLs.
    #[arg(long, env = "AETHER_ALLOW_HTTP", value_parser = BoolishValueParser::new(), default_value = "0", num_args = 0..=1, default_missing_value = "1")]
    pub allow_http: bool,

    /// Log format.
    #[arg(long, env = "AETHER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Ed25519 public key (64 hex digits); when set, every release must be signed.
    #[arg(long, env = "AETHER_PUBKEY")]
    pub pubkey: Option<String>,

    /// File holding the public key (for example a Secret mount).
    #[arg(long, env = "AETHER_PUBKEY_FILE")]
    pub pubkey_file: Option<PathBuf>,

    /// Refuse to start without a public key.
    #[arg(long, env = "AETHER_REQUIRE_SIGNATURE", value_parser = BoolishValueParser::new(), default_value = "0", num_args = 0..=1, default_missing_value = "1")]
    pub require_signature: bool,

    /// Extra PEM CA bundle trusted for artifact URLs, besides the public web roots and the
    /// cluster CA.
    #[arg(long, env = "AETHER_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// TCP/TLS connect timeout for artifact downloads.
    #[arg(long, env = "AETHER_CONNECT_TIMEOUT_MS", default_value_t = 5000)]
    pub connect_timeout_ms: u64,

    /// Longest silence while reading an artifact before the download counts as timed out.
    #[arg(long, env = "AETHER_READ_TIMEOUT_MS", default_value_t = 15000)]
    pub read_timeout_ms: u64,

    /// Kubeconfig file; in-cluster configuration when unset.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Called after each release goes live (not in `--once` mode), with headers
    /// `Aether-Digest` and, for a manifest release, `Aether-Seq`; for example an app's
    /// reload endpoint `http://127.0.0.1:8080/-/reload`.
    #[arg(long, env = "AETHER_WEBHOOK_URL", hide_env_values = true)]
    pub webhook_url: Option<String>,

    /// Method of the webhook call.
    #[arg(long, env = "AETHER_WEBHOOK_METHOD", default_value = "POST")]
    pub webhook_method: String,

    /// The HTTP status that counts as success; 0 means any 2xx.
    #[arg(long, env = "AETHER_WEBHOOK_SUCCESS_STATUS", default_value_t = 0)]
    pub webhook_success_status: u16,

    /// Deadline of one webhook call.
    #[arg(long, env = "AETHER_WEBHOOK_TIMEOUT_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub webhook_timeout_ms: u64,

    /// First retry delay of a failed webhook call; it doubles (with jitter) up to 60 s.
    #[arg(long, env = "AETHER_WEBHOOK_BACKOFF_MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..))]
    pub webhook_backoff_ms: u64,

    /// Apply the desired release once, then exit (init-container mode).
    #[arg(long)]
    pub once: bool,
}

impl Settings {
    /// Opens the workspace with its in-use directory.
    pub fn open_workspace(&self) -> std::io::Result<crate::workspace::Workspace> {
        crate::workspace::Workspace::open_with(&self.workspace, self.in_use_dir.as_deref())
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.fetch_interval_sec)
    }

    pub fn pod_name(&self) -> anyhow::Result<String> {
        if let Some(name) = self.pod_name.as_deref().filter(|n| !n.is_empty()) {
            return Ok(name.to_owned());
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("POD_NAME is unset and the hostname cannot be read")?;
        Ok(host.trim().to_owned())
    }

    /// The public key, from `AETHER_PUBKEY` or `AETHER_PUBKEY_FILE`; an error when
    /// signatures are required and no key is configured.
    pub fn public_key(&self) -> anyhow::Result<Option<PublicKey>> {
        let key = load_public_key(self.pubkey.as_deref(), self.pubkey_file.as_deref())?;
        if key.is_none() && self.require_signature {
            bail!("AETHER_REQUIRE_SIGNATURE=1 but no AETHER_PUBKEY or AETHER_PUBKEY_FILE is set");
        }
        Ok(key)
    }
}
