//! The fetcher's view of itself, served as JSON on `/status` and used by `/readyz`.

use std::sync::RwLock;

use aether_common::Digest;
use serde::Serialize;

use crate::failure::Reason;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LastError {
    pub reason: Reason,
    pub message: String,
}

/// The `/status` document. `last_error` describes the latest failed attempt and is
/// cleared when a release goes live.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusReport {
    pub desired_digest: Option<Digest>,
    pub current_digest: Option<Digest>,
    pub consecutive_failures: u32,
    pub last_error: Option<LastError>,
    pub last_refresh_ms: Option<u64>,
}

/// Shared, updated by the engine, read by the HTTP handlers.
#[derive(Debug, Default)]
pub struct Status(RwLock<StatusReport>);

impl Status {
    pub fn snapshot(&self) -> StatusReport {
        self.0.read().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn update(&self, f: impl FnOnce(&mut StatusReport)) {
        if let Ok(mut report) = self.0.write() {
            f(&mut report);
        }
    }

    pub fn is_live(&self) -> bool {
        self.0.read().is_ok_and(|r| r.current_digest.is_some())
    }
}
