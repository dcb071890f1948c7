//! The contract: names and formats users, manifests, dashboards and scripts rely on.

pub mod annotations;
pub mod digest;
pub mod metrics;
pub mod on_release;
pub mod signature;
pub mod status;
