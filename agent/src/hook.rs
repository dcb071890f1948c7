//! The webhook (`AETHER_WEBHOOK_URL`): called after each release goes live, for example
//! an app's own reload endpoint. It runs beside the refresh loop, which never waits on it:
//! a failed call is retried with jittered exponential backoff until it succeeds or a newer
//! release supersedes it. A call may repeat for one release (a restarted fetcher calls it
//! again for the live release), so the endpoint must be idempotent.

use std::time::Duration;

use aether_common::Digest;
use anyhow::{Context, bail};
use backon::{BackoffBuilder, ExponentialBuilder};
use metrics::counter;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::metrics::HOOK_TOTAL;

/// Retries stop growing here (or at the configured first delay, if larger).
const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// A release that went live: what the hook is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    pub digest: Digest,
    /// The manifest's `seq`; none for a tar.gz release.
    pub seq: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct HookConfig {
    url: reqwest::Url,
    method: reqwest::Method,
    /// The one status that counts as success; `None`: any 2xx.
    success: Option<reqwest::StatusCode>,
    timeout: Duration,
    backoff: Duration,
}

impl HookConfig {
    /// The webhook of `settings`, if one is set; an error for an unusable setting, so a
    /// typo fails the start instead of every release.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Option<Self>> {
        let Some(url) = settings.webhook_url.as_deref().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let url = reqwest::Url::parse(url).context("AETHER_WEBHOOK_URL is not a URL")?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("AETHER_WEBHOOK_URL must be http:// or https://");
        }
        let method = reqwest::Method::from_bytes(settings.webhook_method.as_bytes())
            .context("AETHER_WEBHOOK_METHOD is not an HTTP method")?;
        let success = match settings.webhook_success_status {
            0 => None,
            code => Some(
                reqwest::StatusCode::from_u16(code)
                    .context("AETHER_WEBHOOK_SUCCESS_STATUS is not an HTTP status")?,
            ),
        };
        Ok(Some(Self {
            url,
            method,
            success,
            timeout: Duration::from_millis(settings.webhook_timeout_ms),
            backoff: Duration::from_millis(settings.webhook_backoff_ms),
        }))
    }

    /// Only scheme, host and port, for logs: hooks of chat and CI services carry their
    /// secret in the path, the user name or the query.
    fn shown(&self) -> String {
        let host = self.url.host_str().unwrap_or("");
        match self.url.port() {
            Some(port) => format!("{}://{host}:{port}/…", self.url.scheme()),
            None => format!("{}://{host}/…", self.url.scheme()),
        }
    }
}

/// Runs the hook until `shutdown`, calling it for each release `live` announces.
pub async fn run(
    cfg: HookConfig,
    client: reqwest::Client,
    mut live: watch::Receiver<Option<Live>>,
    shutdown: CancellationToken,
) {
    tracing::info!(url = %cfg.shown(), method = %cfg.method, "webhook configured");
    loop {
        let release = *live.borrow_and_update();
        if let Some(release) = release
            && call_until_done(&cfg, &client, release, &mut live, &shutdown).await
        {
            continue;
        }
        if shutdown.is_cancelled() {
            return;
        }
        // A release announced while a successful call ran counts as a change here.
        tokio::select! {
            changed = live.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}

/// Calls the hook for `release` until it succeeds, a newer release is announced (then
/// `true`: the caller calls again for that one) or `shutdown`.
async fn call_until_done(
    cfg: &HookConfig,
    client: &reqwest::Client,
    release: Live,
    live: &mut watch::Receiver<Option<Live>>,
    shutdown: &CancellationToken,
) -> bool {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(cfg.backoff)
        .with_max_delay(BACKOFF_CAP.max(cfg.backoff))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let outcome = tokio::select! {
            r = call(cfg, client, release) => r,
            () = shutdown.cancelled() => return false,
        };
        match outcome {
            Ok(status) => {
                counter!(HOOK_TOTAL, "result" => "success").increment(1);
                tracing::info!(digest = %release.digest, %status, "webhook called");
                return false;
            }
            Err(e) => {
                counter!(HOOK_TOTAL, "result" => "failure").increment(1);
                let delay = delays.next().unwrap_or(BACKOFF_CAP);
                tracing::warn!(digest = %release.digest, retry_in_ms = delay.as_millis() as u64, "webhook failed: {e:#}");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    changed = live.changed() => {
                        if changed.is_err() {
                            return false;
                        }
                        tracing::info!(digest = %release.digest, "webhook superseded by a newer release");
                        return true;
                    }
                    () = shutdown.cancelled() => return false,
                }
            }
        }
    }
}

async fn call(
    cfg: &HookConfig,
    client: &reqwest::Client,
    release: Live,
) -> anyhow::Result<reqwest::StatusCode> {
    let mut request = client
        .request(cfg.method.clone(), cfg.url.clone())
        .timeout(cfg.timeout)
        .header("Aether-Digest", release.digest.hex());
    if let Some(seq) = release.seq {
        request = request.header("Aether-Seq", seq.to_string());
    }
    // reqwest's errors name the URL, which may carry a credential: only the kind is kept.
    let response = request.send().await.map_err(|e| {
        anyhow::anyhow!(
            "{} {}: {}",
            cfg.method,
            cfg.shown(),
            if e.is_timeout() {
                "timed out (AETHER_WEBHOOK_TIMEOUT_MS)"
            } else if e.is_connect() {
                "cannot connect"
            } else {
                "request failed"
            }
        )
    })?;
    let status = response.status();
    let ok = match cfg.success {
        Some(want) => status == want,
        None => status.is_success(),
    };
    if !ok {
        bail!(
            "{} {} answered {status}, expected {}",
            cfg.method,
            cfg.shown(),
            cfg.success
                .map_or_else(|| "2xx".to_owned(), |s| s.to_string())
        );
    }
    Ok(status)
}

/// The client of the hook: TLS as for downloads, plain http allowed (the URL comes from
/// the pod spec, not from an annotation), no redirects (a reload endpoint answers itself).
pub fn client(settings: &Settings) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(crate::fetch::tls(settings)?)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .user_agent(concat!("aether-fetcher/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the webhook client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_logged_url_carries_no_path_user_or_query() {
        let cfg = HookConfig {
            url: "https://bot:pw@hooks.example.com:8443/services/T0/B0/s3cret?token=x"
                .parse()
                .unwrap(),
            method: reqwest::Method::POST,
            success: None,
            timeout: Duration::from_secs(1),
            backoff: Duration::from_secs(1),
        };
        assert_eq!(cfg.shown(), "https://hooks.example.com:8443/…");
    }
}
