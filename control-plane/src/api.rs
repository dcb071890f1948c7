//! The wire types of the control plane's HTTP API, shared by `aether serve` and the CLI.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /v1/apps/{app}/deploy`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployRequest {
    pub namespace: Option<String>,
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub dev_hot: bool,
    #[serde(default = "one")]
    pub replicas: i32,
    /// What a new release does to the supervised app (`AETHER_ON_RELEASE`): `restart`
    /// (default), `signal:<SIG>` or `none`. Dev-hot only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_release: Option<String>,
    pub release: ReleaseRequest,
}

fn one() -> i32 {
    1
}

/// `POST /v1/apps/{app}/release`, and the release part of a deploy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub namespace: Option<String>,
    /// `sha256:<hex>`
    pub digest: String,
    /// Where pods fetch it; default: this server's store.
    pub url: Option<String>,
    pub signature: Option<String>,
    pub build_commit: Option<String>,
    /// `manifest` for a release manifest (stored as a blob); absent for a tar.gz artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseResponse {
    pub digest: String,
    pub url: String,
    pub pods_patched: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadResponse {
    pub digest: String,
    pub url: String,
    pub stored: bool,
}

/// Most digests in one `POST /v1/blobs/missing`.
pub const MAX_MISSING_QUERY: usize = 200_000;

/// `POST /v1/blobs/missing`: digests (`sha256:<hex>`) in, the ones the store lacks out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MissingRequest {
    pub digests: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MissingResponse {
    pub missing: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// The contract annotations of a release.
pub fn desired_annotations(
    digest: &str,
    url: &str,
    release: &ReleaseRequest,
) -> BTreeMap<String, String> {
    use aether_common::contract::annotations::{
        ARTIFACT_URL, BUILD_COMMIT, DIGEST, FORMAT, Format, SIGNATURE,
    };
    let mut out = BTreeMap::new();
    out.insert(DIGEST.to_owned(), digest.to_owned());
    out.insert(ARTIFACT_URL.to_owned(), url.to_owned());
    if let Some(sig) = release.signature.as_deref().filter(|s| !s.is_empty()) {
        out.insert(SIGNATURE.to_owned(), sig.to_owned());
    }
    if let Some(commit) = release.build_commit.as_deref().filter(|s| !s.is_empty()) {
        out.insert(BUILD_COMMIT.to_owned(), commit.to_owned());
    }
    // Written only for manifests: tar.gz stays annotated exactly as before, which fetchers
    // of earlier versions understand.
    if release.format.as_deref() == Some(Format::Manifest.as_str()) {
        out.insert(FORMAT.to_owned(), Format::Manifest.as_str().to_owned());
    }
    out
}
