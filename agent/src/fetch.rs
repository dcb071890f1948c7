//! Artifact download: an HTTP client that verifies TLS against the public web roots, the
//! cluster CA and an optional extra bundle, and the request that starts a download.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::config::{SA_CA_FILE, Settings};
use crate::failure::{Reason, RefreshError};

/// Builds the download client: TLS verified against the public web roots, the cluster CA
/// (when mounted) and `AETHER_CA_FILE`.
pub fn client(settings: &Settings) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls(settings)?)
        // Without AETHER_ALLOW_HTTP no plain-http request is made at all, redirects
        // included; with it, an https URL still never redirects to http (a downgrade
        // would let anyone on the path serve the bytes).
        .https_only(!settings.allow_http)
        .redirect(redirect_policy())
        .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .read_timeout(Duration::from_millis(settings.read_timeout_ms))
        .user_agent(concat!("aether-fetcher/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the HTTP client")
}

/// TLS trusting the public web roots, the cluster CA (when mounted) and `AETHER_CA_FILE`:
/// for downloads and for the webhook alike.
pub fn tls(settings: &Settings) -> anyhow::Result<rustls::ClientConfig> {
    let cluster_ca = Path::new(SA_CA_FILE);
    let mut bundles: Vec<&Path> = Vec::new();
    if cluster_ca.exists() {
        bundles.push(cluster_ca);
    }
    if let Some(path) = &settings.ca_file {
        bundles.push(path);
    }
    Ok(aether_common::tls::client_config(&bundles)?)
}

/// Redirects the fetcher follows: at most `MAX_REDIRECTS`, never from https to http.
fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let downgrade = attempt.url().scheme() != "https"
            && attempt.previous().iter().any(|u| u.scheme() == "https");
        if downgrade {
            let to = redact(attempt.url());
            attempt.error(format!("refusing a redirect from https to {to}"))
        } else if attempt.previous().len() >= MAX_REDIRECTS {
            attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
        } else {
            attempt.follow()
        }
    })
}

/// As browsers and curl's default.
const MAX_REDIRECTS: usize = 10;

/// Sends the GET and checks status and announced size; the body is read by the caller.
pub async fn start(
    client: &reqwest::Client,
    url: reqwest::Url,
    max_bytes: u64,
) -> Result<reqwest::Response, RefreshError> {
    send(client.get(url.clone()), &url, max_bytes).await
}

/// `start` for a GET of `url` built with headers of its own.
pub async fn send(
    request: reqwest::RequestBuilder,
    url: &reqwest::Url,
    max_bytes: u64,
) -> Result<reqwest::Response, RefreshError> {
    let response = request.send().await.map_err(classify)?;
    let response = check_status(response, "GET", url)?;
    if let Some(len) = response.content_length()
        && len > max_bytes
    {
        return Err(RefreshError::new(
            Reason::TooLarge,
            format!("artifact is {len} bytes, limit is {max_bytes} (AETHER_MAX_ARTIFACT_BYTES)"),
        ));
    }
    Ok(response)
}

/// A response that is not a success is a download failure, named by method and URL.
pub fn check_status(
    response: reqwest::Response,
    method: &str,
    url: &reqwest::Url,
) -> Result<reqwest::Response, RefreshError> {
    let status = response.status();
    if !status.is_success() {
        return Err(RefreshError::new(
            Reason::Download,
            format!("{method} {} answered {status}", redact(url)),
        ));
    }
    Ok(response)
}

/// Maps a transport error to its failure reason.
pub fn classify(e: reqwest::Error) -> RefreshError {
    let reason = if e.is_timeout() {
        Reason::Timeout
    } else {
        Reason::Download
    };
    // reqwest's Display includes the URL, which may carry a presigned credential.
    RefreshError::new(reason, error_chain(&e.without_url()))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The URL without its query string: presigned URLs carry credentials there, and secrets
/// never reach the logs.
pub fn redact(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    if shown.query().is_some() {
        shown.set_query(Some("REDACTED"));
    }
    let _ = shown.set_password(None);
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_query_and_password() {
        let url: reqwest::Url = "https://u:secret@h/a.tgz?X-Amz-Signature=abc"
            .parse()
            .unwrap();
        let shown = redact(&url);
        assert!(
            !shown.contains("secret") && !shown.contains("abc"),
            "{shown}"
        );
    }
}
