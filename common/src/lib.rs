//! Names, types and archive handling shared by `aether-fetcher` and `aether`.
//!
//! Everything a user relies on by name (annotation keys, the digest and signature formats,
//! the workspace layout of a release) is defined once here so that the sidecar and the
//! control plane cannot drift apart.

pub mod annotations;
pub mod digest;
pub mod extract;
pub mod manifest;
pub mod pack;
pub mod signature;
pub mod status;

pub use digest::{Digest, DigestError, Sha256Writer};
pub use signature::{PublicKey, Signature, SignatureError, SigningKey};
