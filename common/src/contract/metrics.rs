//! Names of the fetcher's Prometheus metrics (the contract's table), shared by the
//! fetcher that exports them and the alert rules and dashboard that read them.

/// Default of `AETHER_ANOMALY_FAIL_THRESHOLD`: consecutive failures that count as an
/// anomaly (the shipped alert fires at the same count).
pub const DEFAULT_ANOMALY_FAIL_THRESHOLD: u32 = 7;

pub const REFRESH_TOTAL: &str = "dev_hot_refresh_total";
pub const REFRESH_FAILURE_TOTAL: &str = "dev_hot_refresh_failure_total";
pub const REFRESH_LATENCY: &str = "dev_hot_refresh_latency_seconds";
pub const CONSECUTIVE_FAILURES: &str = "dev_hot_refresh_consecutive_failures";
pub const SIGNATURE_FAIL_TOTAL: &str = "dev_hot_signature_fail_total";
pub const ANOMALY_EVENTS_TOTAL: &str = "dev_hot_anomaly_events_total";
/// Gauge 1 labelled with the live digest (one series).
pub const CURRENT_INFO: &str = "dev_hot_current_info";
/// Gauge 1 labelled with the desired digest the fetcher last read (one series).
pub const DESIRED_INFO: &str = "dev_hot_desired_info";
/// Gauge: 1 when the live release is the desired one (or nothing is desired), else 0.
pub const IN_SYNC: &str = "dev_hot_in_sync";
/// Counter of release bytes by `source`: `downloaded` (over the network) or `reused`
/// (files of a manifest release already on the volume).
pub const REFRESH_BYTES_TOTAL: &str = "dev_hot_refresh_bytes_total";
/// Counter of the files of manifest releases made live, by `change`: `added`, `changed`,
/// `removed` (against the release they were built from) and `reused`.
pub const REFRESH_FILES_TOTAL: &str = "dev_hot_refresh_files_total";
/// Histogram of the time a successful refresh spent in each `stage`: `wait` (a manifest
/// refresh waiting for a spare copy or an object collection to finish), `artifact` (a tar.gz
/// release downloaded, verified and extracted in one pass), `manifest` (a manifest
/// downloaded, verified, parsed and checked), `objects` (the base chosen and the missing
/// objects fetched), `assemble` (the release built from its base and committed) and
/// `swap` (`current` swapped, old releases pruned).
pub const REFRESH_STAGE: &str = "dev_hot_refresh_stage_seconds";
/// Counter of webhook calls (`AETHER_WEBHOOK_URL`) by `result`: `success` or `failure`
/// (each failed attempt counts; retries included).
pub const HOOK_TOTAL: &str = "dev_hot_hook_total";
