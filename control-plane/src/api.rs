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
    use aether_common::contract::annotations::{ARTIFACT_URL, BUILD_COMMIT, DIGEST, SIGNATURE};
    let mut out = BTreeMap::new();
    out.insert(DIGEST.to_owned(), digest.to_owned());
    out.insert(ARTIFACT_URL.to_owned(), url.to_owned());
    if let Some(sig) = release.signature.as_deref().filter(|s| !s.is_empty()) {
        out.insert(SIGNATURE.to_owned(), sig.to_owned());
    }
    if let Some(commit) = release.build_commit.as_deref().filter(|s| !s.is_empty()) {
        out.insert(BUILD_COMMIT.to_owned(), commit.to_owned());
    }
    out
}
