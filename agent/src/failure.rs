//! Why a refresh failed: the contract's reason labels and the error that carries one.

use std::fmt;

/// A failure reason, exactly as it appears in metrics labels, log markers and `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
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
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::Download,
        Reason::Checksum,
        Reason::Signature,
        Reason::Extract,
        Reason::TooLarge,
        Reason::InvalidAnnotation,
        Reason::Timeout,
        Reason::Io,
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
        }
    }

    /// Whether trying the same desired release again can succeed. A bad annotation or a bad
    /// signature is decided before any byte is fetched and can only change with the
    /// annotations, so those wait for a new desired state instead of retrying.
    pub fn retryable(self) -> bool {
        !matches!(self, Reason::Signature | Reason::InvalidAnnotation)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The end of a refresh that did not make its release live.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("{reason}: {message}")]
    Failed { reason: Reason, message: String },
    /// A newer desired release or shutdown arrived first; not a failure.
    #[error("superseded before completion")]
    Cancelled,
}

impl RefreshError {
    pub fn new(reason: Reason, message: impl fmt::Display) -> Self {
        RefreshError::Failed {
            reason,
            message: message.to_string(),
        }
    }
}
