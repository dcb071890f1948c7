//! The control plane's Prometheus metrics: names, help texts, and the recorder. Every
//! series is registered at zero when the server starts, so dashboards and alerts see it
//! before the first event (and `promtool check metrics` sees help and type for each).

use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const UNAUTHORIZED_TOTAL: &str = "aether_api_unauthorized_total";
pub const UPLOADS_TOTAL: &str = "aether_uploads_total";
pub const DOWNLOADS_TOTAL: &str = "aether_downloads_total";
pub const BLOB_UPLOADS_TOTAL: &str = "aether_blob_uploads_total";
pub const BLOB_DOWNLOADS_TOTAL: &str = "aether_blob_downloads_total";
pub const SIGNATURE_REFUSED_TOTAL: &str = "aether_signature_refused_total";
pub const DEPLOYS_TOTAL: &str = "aether_deploys_total";
pub const PATCHES_TOTAL: &str = "aether_patches_total";
pub const PATCH_FAILURES_TOTAL: &str = "aether_patch_failures_total";
/// Release route: request in → Deployment and every pod patched.
pub const PATCH_SECONDS: &str = "aether_patch_seconds";
/// 1 on the replica that holds the Lease and runs the reconcile loop, 0 on the others.
pub const LEADER: &str = "aether_leader";
/// Pods annotated with a desired release (the fan-out of releases to pods), by result.
pub const POD_PATCHES_TOTAL: &str = "aether_pod_patches_total";

const BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Counts one pod patch by its outcome. A 409 is the resourceVersion precondition doing
/// its job (a newer change got there first), not a failure.
pub fn pod_patched<T>(result: &Result<T, kube::Error>) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(kube::Error::Api(status)) if status.code == 409 => "conflict",
        Err(_) => "error",
    };
    counter!(POD_PATCHES_TOTAL, "result" => outcome).increment(1);
}

/// Installs the global recorder and registers every series.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(PATCH_SECONDS.into()), BUCKETS)?
        .install_recorder()?;
    describe_counter!(
        UNAUTHORIZED_TOTAL,
        "API requests refused for their bearer token"
    );
    describe_counter!(
        UPLOADS_TOTAL,
        "Artifact uploads accepted, by whether they were new (stored) or already known"
    );
    describe_counter!(DOWNLOADS_TOTAL, "Artifact downloads served");
    describe_counter!(
        BLOB_UPLOADS_TOTAL,
        "Content-store blobs received (single or batched), by whether they were new (stored)"
    );
    describe_counter!(BLOB_DOWNLOADS_TOTAL, "Content-store blob downloads served");
    describe_counter!(
        SIGNATURE_REFUSED_TOTAL,
        "Releases refused for a missing or invalid signature"
    );
    describe_counter!(DEPLOYS_TOTAL, "Deployments applied");
    metrics::describe_gauge!(
        LEADER,
        "1 on the replica that holds the Lease and runs the reconcile loop, 0 on the others"
    );
    describe_counter!(PATCHES_TOTAL, "Releases patched onto an app");
    describe_counter!(PATCH_FAILURES_TOTAL, "Releases that could not be patched");
    describe_histogram!(
        PATCH_SECONDS,
        Unit::Seconds,
        "Release request to the Deployment and every pod annotated"
    );
    describe_counter!(
        POD_PATCHES_TOTAL,
        "Pod annotation patches (release route and reconcile loop): ok, conflict (a newer \
         change won; retried) or error"
    );
    for name in [
        UNAUTHORIZED_TOTAL,
        DOWNLOADS_TOTAL,
        BLOB_DOWNLOADS_TOTAL,
        SIGNATURE_REFUSED_TOTAL,
        DEPLOYS_TOTAL,
        PATCHES_TOTAL,
        PATCH_FAILURES_TOTAL,
    ] {
        counter!(name).absolute(0);
    }
    for stored in ["true", "false"] {
        counter!(UPLOADS_TOTAL, "stored" => stored).absolute(0);
        counter!(BLOB_UPLOADS_TOTAL, "stored" => stored).absolute(0);
    }
    for result in ["ok", "conflict", "error"] {
        counter!(POD_PATCHES_TOTAL, "result" => result).absolute(0);
    }
    metrics::gauge!(LEADER).set(0.0);
    // A histogram appears in the exposition only once it has a sample; its buckets are
    // rendered from the first release on.
    let _ = histogram!(PATCH_SECONDS);
    Ok(handle)
}
