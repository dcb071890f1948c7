//! The fetcher's view of itself, served as JSON on `/status` and used by `/readyz`. The
//! document itself is `aether_common::contract::status::StatusReport`, shared with its readers.

use std::sync::RwLock;

pub use aether_common::contract::status::{LastError, StatusReport};

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
