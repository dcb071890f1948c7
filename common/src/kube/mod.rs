//! The Kubernetes side: the objects the control plane applies, and the API client set-up.

#[cfg(feature = "kube")]
pub mod client;
#[cfg(feature = "manifest")]
pub mod install;
#[cfg(feature = "manifest")]
pub mod manifest;
#[cfg(feature = "manifest")]
pub mod monitoring;
#[cfg(feature = "manifest")]
pub mod yaml;
