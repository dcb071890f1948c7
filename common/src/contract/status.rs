//! The fetcher's `/status` document and the failure reasons of the contract: one typed
//! definition, written by `aether-fetcher` and read by `aether` (control plane and CLI).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Digest;

/// A failure reason, exactly as it appears in metrics labels, log markers and `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Download,
    Checksum,
    Signature,
    Extract,
    TooLarge,
    InvalidAnnotation,
    Timeout,
    Io,
    /// A manifest for another app, or older than the newest release made live.
    Replay,
    /// A manifest past its `expires_at`.
    Expired,
}

impl Reason {
    pub const ALL: [Reason; 10] = [
        Reason::Download,
        Reason::Checksum,
        Reason::Signature,
        Reason::Extract,
        Reason::TooLarge,
        Reason::InvalidAnnotation,
        Reason::Timeout,
        Reason::Io,
        Reason::Replay,
        Reason::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Download => "download",
            Reason::Checksum => "checksum",
            Reason::Signature => "signature",
            Reason::Extract => "extract",
            Reason::TooLarge => "too_large",
            Reason::InvalidAnnotation => "invalid_annotation",
            Reason::Timeout => "timeout",
            Reason::Io => "io",
            Reason::Replay => "replay",
            Reason::Expired => "expired",
        }
    }

    /// Whether trying the same desired release again can succeed. A bad annotation or a bad
    /// signature is decided before any byte is fetched and can only change with the
    /// annotations, so those wait for a new desired state instead of retrying; so do a
    /// replayed or expired manifest, which time can only make older.
    pub fn retryable(self) -> bool {
        !matches!(
            self,
            Reason::Signature | Reason::InvalidAnnotation | Reason::Replay | Reason::Expired
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The latest failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    pub reason: Reason,
    pub message: String,
    /// The desired digest the attempt was for (`None` when the annotations were too
    /// malformed to name one), so a client reports a refusal only for its own release.
    #[serde(default)]
    pub digest: Option<Digest>,
    /// Whether the fetcher retries this digest by itself (with backoff); `false` means it
    /// waits for the annotations to change.
    #[serde(default)]
    pub will_retry: bool,
}

/// The `/status` document. `last_error` describes the latest failed attempt and is cleared
/// when a release goes live.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub desired_digest: Option<Digest>,
    pub current_digest: Option<Digest>,
    pub consecutive_failures: u32,
    pub last_error: Option<LastError>,
    pub last_refresh_ms: Option<u64>,
}

impl StatusReport {
    /// The refusal of `digest`: the latest failure was for it and the fetcher will not
    /// retry it by itself. A failure it retries (a download error, a timeout) is not a
    /// verdict yet.
    pub fn refusal_of(&self, digest: &Digest) -> Option<&LastError> {
        self.last_error
            .as_ref()
            .filter(|e| e.digest.as_ref() == Some(digest) && !e.will_retry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_serialise_as_their_contract_labels() {
        for r in Reason::ALL {
            assert_eq!(
                serde_json::to_value(r).unwrap(),
                serde_json::Value::from(r.as_str())
            );
        }
    }

    #[test]
    fn refusal_is_reported_only_for_its_own_digest() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let s = StatusReport {
            last_error: Some(LastError {
                reason: Reason::Extract,
                message: "m".into(),
                digest: Some(a),
                will_retry: false,
            }),
            ..Default::default()
        };
        assert!(s.refusal_of(&a).is_some());
        assert!(s.refusal_of(&b).is_none());
        let mut retried = s.clone();
        if let Some(e) = retried.last_error.as_mut() {
            e.will_retry = true;
        }
        assert!(retried.refusal_of(&a).is_none(), "still being retried");
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<StatusReport>(&text).unwrap(), s);
    }
}
