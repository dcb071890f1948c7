//! The Pod and Deployment annotation keys of the contract, and parsing of the desired
//! release they describe.

use std::collections::BTreeMap;

use crate::{Digest, DigestError, Signature, SignatureError};

pub const DIGEST: &str = "aether.dev/digest";
pub const ARTIFACT_URL: &str = "aether.dev/artifact-url";
pub const SIGNATURE: &str = "aether.dev/signature";
pub const DEV_HOT: &str = "aether.dev/dev-hot";
pub const BUILD_COMMIT: &str = "aether.dev/build-commit";
/// On a Deployment only: the release it asked for before the current one, set by the
/// control plane on each release (what `aether rollback` goes back to).
pub const PREVIOUS_DIGEST: &str = "aether.dev/previous-digest";
/// `manifest` for a release manifest; absent (or `tar.gz`) for a tar.gz artifact.
pub const FORMAT: &str = "aether.dev/format";

/// What the artifact URL serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Format {
    /// A gzip-compressed tar of the whole tree.
    #[default]
    TarGz,
    /// A release manifest (`crate::release::Manifest`) naming every file by its hash.
    Manifest,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::TarGz => "tar.gz",
            Format::Manifest => "manifest",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = AnnotationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "tar.gz" => Ok(Format::TarGz),
            "manifest" => Ok(Format::Manifest),
            other => Err(AnnotationError::Format(other.to_owned())),
        }
    }
}

/// The release a Pod's annotations ask for. The URL is only checked for its scheme here;
/// the fetcher parses it fully before use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredRelease {
    pub digest: Digest,
    pub url: String,
    pub signature: Option<Signature>,
    pub format: Format,
}

/// Why a set of annotations does not describe a usable release.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnotationError {
    #[error("{DIGEST}: {0}")]
    Digest(#[from] DigestError),
    #[error("{SIGNATURE}: {0}")]
    Signature(#[from] SignatureError),
    #[error("{ARTIFACT_URL} is missing while {DIGEST} is set")]
    MissingUrl,
    #[error("{ARTIFACT_URL} must be an absolute https:// URL{}", if *.0 { "" } else { " (http:// is refused unless AETHER_ALLOW_HTTP=1)" })]
    BadUrl(bool),
    #[error("{FORMAT}: {0:?} is neither `manifest` nor `tar.gz`")]
    Format(String),
}

/// Reads the desired release from annotations. `Ok(None)` means no digest is annotated
/// yet, which is not an error: the pod simply has nothing to run.
pub fn desired_release(
    annotations: &BTreeMap<String, String>,
    allow_http: bool,
) -> Result<Option<DesiredRelease>, AnnotationError> {
    let Some(digest) = annotations.get(DIGEST).map(|d| d.trim()) else {
        return Ok(None);
    };
    if digest.is_empty() {
        return Ok(None);
    }
    let digest: Digest = digest.parse()?;
    let url = annotations
        .get(ARTIFACT_URL)
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
        .ok_or(AnnotationError::MissingUrl)?;
    let scheme_ok = url.starts_with("https://") || (allow_http && url.starts_with("http://"));
    let has_host = url
        .split_once("://")
        .is_some_and(|(_, rest)| !rest.is_empty() && !rest.starts_with('/'));
    if !scheme_ok || !has_host || url.chars().any(char::is_whitespace) {
        return Err(AnnotationError::BadUrl(allow_http));
    }
    let signature = match annotations.get(SIGNATURE).map(|s| s.trim()) {
        Some(s) if !s.is_empty() => Some(s.parse()?),
        _ => None,
    };
    let format = match annotations.get(FORMAT) {
        Some(f) => f.parse()?,
        None => Format::TarGz,
    };
    Ok(Some(DesiredRelease {
        digest,
        url: url.to_owned(),
        signature,
        format,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_digest_means_nothing_desired() {
        assert_eq!(desired_release(&map(&[]), false), Ok(None));
        assert_eq!(desired_release(&map(&[(DIGEST, "")]), false), Ok(None));
    }

    #[test]
    fn full_set_parses() {
        let d = Digest::of(b"x");
        let got = desired_release(
            &map(&[(DIGEST, &d.to_string()), (ARTIFACT_URL, "https://h/a.tgz")]),
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(got.digest, d);
        assert_eq!(got.url, "https://h/a.tgz");
        assert!(got.signature.is_none());
        assert_eq!(
            got.format,
            Format::TarGz,
            "no format annotation means tar.gz"
        );
    }

    #[test]
    fn format_annotation_selects_manifest_and_refuses_unknown_values() {
        let d = Digest::of(b"x").to_string();
        let with = |f: &str| {
            desired_release(
                &map(&[(DIGEST, &d), (ARTIFACT_URL, "https://h/m"), (FORMAT, f)]),
                false,
            )
        };
        assert_eq!(with("manifest").unwrap().unwrap().format, Format::Manifest);
        assert_eq!(with("tar.gz").unwrap().unwrap().format, Format::TarGz);
        assert_eq!(with("zip"), Err(AnnotationError::Format("zip".into())));
    }

    #[test]
    fn plain_http_needs_opt_in() {
        let d = Digest::of(b"x").to_string();
        let m = map(&[(DIGEST, &d), (ARTIFACT_URL, "http://h/a.tgz")]);
        assert_eq!(
            desired_release(&m, false),
            Err(AnnotationError::BadUrl(false))
        );
        assert!(desired_release(&m, true).unwrap().is_some());
    }

    #[test]
    fn malformed_values_are_refused() {
        let d = Digest::of(b"x").to_string();
        assert!(desired_release(&map(&[(DIGEST, "sha1:abc")]), false).is_err());
        assert_eq!(
            desired_release(&map(&[(DIGEST, &d)]), false),
            Err(AnnotationError::MissingUrl)
        );
        assert!(matches!(
            desired_release(
                &map(&[
                    (DIGEST, &d),
                    (ARTIFACT_URL, "https://h/a"),
                    (SIGNATURE, "xyz")
                ]),
                false
            ),
            Err(AnnotationError::Signature(_))
        ));
        assert!(desired_release(&map(&[(DIGEST, &d), (ARTIFACT_URL, "ftp://h/a")]), true).is_err());
        assert!(
            desired_release(&map(&[(DIGEST, &d), (ARTIFACT_URL, "https:///a")]), true).is_err()
        );
    }
}
