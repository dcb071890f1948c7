//! The end-to-end test harness of Aether dev-hot.
//!
//! - [`emulator`]: a Kubernetes API server emulator (namespaces, pods, deployments, RBAC
//!   objects; list/watch with resource versions, bookmarks and 410 Gone; merge, strategic
//!   and server-side-apply patches; discovery for real `kubectl`), with hooks to drop
//!   watches and compact history.
//! - [`artifacts`]: an HTTP artifact server with fault injection and request counting.
//! - [`balancer`]: a TCP load balancer, the Service in front of control-plane replicas.
//! - [`hostile`]: builders for archives that a safe extractor must refuse.
//! - [`process`]: spawning the built binaries and reading their logs, metrics and status.
//! - [`s3`]: a real S3 implementation (moto's server) on loopback.

pub mod artifacts;
pub mod balancer;
pub mod emulator;
pub mod hostile;
pub mod process;
pub mod s3;
