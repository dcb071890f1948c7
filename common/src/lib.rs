//! The library `aether-fetcher` and `aether` share, in three parts with one job each:
//!
//! - [`contract`]: the names and formats users rely on (annotation keys, the digest and
//!   signature formats and key loading, the fetcher's `/status` document and failure
//!   reasons). Defined once so the sidecar and the control plane cannot drift apart.
//! - [`archive`] (feature `archive`): packing a tree into a release and extracting an
//!   untrusted one safely.
//! - [`release`] (feature `release`): the release manifest of incremental releases.
//! - [`kube`]: the Kubernetes side, the objects the control plane applies (feature
//!   `manifest`) and the client set-up both binaries use (feature `kube`).
//!
//! Beside them, the process plumbing both binaries need alike: [`logging`] (feature
//! `logging`) and [`tls`] (feature `tls`). The fetcher enables only what it uses.

pub mod contract;

#[cfg(feature = "archive")]
pub mod archive;

#[cfg(any(feature = "manifest", feature = "kube"))]
pub mod kube;

#[cfg(feature = "logging")]
pub mod logging;

#[cfg(feature = "release")]
pub mod release;

#[cfg(feature = "tls")]
pub mod tls;

pub use contract::digest::{Digest, DigestError, Sha256Writer};
pub use contract::signature::{PublicKey, Signature, SignatureError, SigningKey};
