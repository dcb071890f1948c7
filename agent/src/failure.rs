//! Why a refresh failed: the error that carries one of the contract's reasons.

use std::fmt;

pub use aether_common::contract::status::Reason;

/// The end of a refresh that did not make its release live.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// `settled`: the verdict cannot change by trying again (for example the bytes hash to
    /// the annotated digest and the archive is refused), so the same desired release is not
    /// retried until the annotations change.
    #[error("{reason}: {message}")]
    Failed {
        reason: Reason,
        message: String,
        settled: bool,
    },
    /// A newer desired release or shutdown arrived first; not a failure.
    #[error("superseded before completion")]
    Cancelled,
}

impl RefreshError {
    pub fn new(reason: Reason, message: impl fmt::Display) -> Self {
        RefreshError::Failed {
            reason,
            message: message.to_string(),
            settled: false,
        }
    }

    /// The same failure, marked as one that retrying cannot change.
    pub fn settled(self) -> Self {
        match self {
            RefreshError::Failed {
                reason, message, ..
            } => RefreshError::Failed {
                reason,
                message,
                settled: true,
            },
            other => other,
        }
    }
}
