//! The reconcile loop: copies each dev-hot Deployment's desired annotations onto its pods,
//! new and restarted pods included, so `kubectl annotate deployment …` works too and a pod
//! created by a rollout or a crash starts on the desired release.
//!
//! It is a kube-runtime `Controller` over the managed Deployments, triggered by their pods
//! too: a failed pod patch is requeued with backoff, and reconciles of one app never run
//! concurrently. With several replicas it runs only on the one that holds the Lease
//! (`lease`); every replica keeps the caches. A reconcile reads the app's pods and Deployment from the API server, not
//! from a cache: a cache fed by another watch can lag the event that triggered the
//! reconcile and hide the very pod it is about. The caches (Deployments and pods) answer
//! `aether status` reads instead, where a few milliseconds of lag do no harm.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aether_common::kube::manifest::{self, APP_LABEL, MANAGED_BY, MANAGED_BY_LABEL};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

use crate::cluster;

/// First delay before a failed reconcile is retried; it doubles up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Triggers of one app arriving within this window make one reconcile (a release patches
/// every pod, and each patch comes back as a pod event).
const DEBOUNCE: Duration = Duration::from_millis(50);

/// The reflector caches of the managed objects, shared with the API handlers.
#[derive(Clone)]
pub struct Cache {
    pub deployments: Store<Deployment>,
    pub pods: Store<Pod>,
}

impl Cache {
    /// Whether both caches hold a complete list (until then readers ask the API server).
    pub fn ready(&self) -> bool {
        use futures::FutureExt;
        self.deployments.wait_until_ready().now_or_never().is_some()
            && self.pods.wait_until_ready().now_or_never().is_some()
    }
}

struct Ctx {
    pods: Api<Pod>,
    deployments: Api<Deployment>,
    /// Consecutive failures per app, for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
}

#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    #[error("reading {0}: {1}")]
    Read(String, #[source] kube::Error),
    #[error("{failed} of {total} pod patches failed, first: {first}")]
    Patch {
        failed: usize,
        total: usize,
        first: kube::Error,
    },
}

/// Starts the caches of the managed Deployments and pods (until `shutdown`). Every replica
/// keeps them, for `aether status`; only the leader reconciles.
pub fn caches(client: kube::Client, ns: &str, shutdown: CancellationToken) -> Cache {
    let cfg = watcher::Config::default().labels(&managed_selector());
    let (deployments, deployment_writer) = reflector::store::<Deployment>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let deployment_reflector = drive(
        "deployment",
        reflector::reflector(
            deployment_writer,
            watcher(
                Api::<Deployment>::namespaced(client.clone(), ns),
                cfg.clone(),
            ),
        ),
    );
    let pod_reflector = drive(
        "pod",
        reflector::reflector(pod_writer, watcher(Api::<Pod>::namespaced(client, ns), cfg)),
    );
    tokio::spawn(async move {
        tokio::select! {
            () = deployment_reflector => {}
            () = pod_reflector => {}
            () = shutdown.cancelled() => {}
        }
    });
    Cache { deployments, pods }
}

fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY}")
}

/// Drives a reflector's stream, logging its errors (the watcher retries with backoff).
async fn drive<K>(
    what: &'static str,
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
) {
    stream
        .default_backoff()
        .for_each(|event| async move {
            if let Err(e) = event {
                tracing::warn!(error = %e, "{what} watch failed; retrying with backoff");
            }
        })
        .await;
}

/// The reconcile loop: a kube-runtime `Controller` over the managed Deployments, triggered
/// by their pods too. It runs while this replica leads (`lease::lead`), which aborts it the
/// moment it does not.
pub async fn run(client: kube::Client, ns: String) {
    let cfg = watcher::Config::default().labels(&managed_selector());
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let pods = Api::<Pod>::namespaced(client, &ns);
    let namespace = ns.clone();
    let controller = Controller::new(deployments.clone(), cfg.clone())
        .with_config(ControllerConfig::default().debounce(DEBOUNCE))
        .watches(pods.clone(), cfg, move |pod: Pod| {
            app_of(&pod).map(|app| ObjectRef::new(&app).within(&namespace))
        });
    let ctx = Arc::new(Ctx {
        pods,
        deployments,
        failures: Mutex::new(HashMap::new()),
    });
    tracing::info!(namespace = %ns, "reconcile loop started");
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

fn app_of(pod: &Pod) -> Option<String> {
    pod.metadata.labels.as_ref()?.get(APP_LABEL).cloned()
}

/// Brings every pod of one app to its Deployment's desired annotations.
///
/// Never copies a stale desired state: the pods are listed first, the Deployment is read
/// after them, and each patch carries the pod's resourceVersion from that list. `aether serve`'s release route patches the
/// Deployment before its pods, so a pod patched by a newer release after our read makes
/// our patch fail with 409 (and be retried), and one patched before it means the fresh
/// read already sees that release.
async fn reconcile(deploy: Arc<Deployment>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let app = deploy.metadata.name.clone().unwrap_or_default();
    let pods: Vec<Pod> = ctx
        .pods
        .list(&ListParams::default().labels(&manifest::selector(&app)))
        .await
        .map_err(|e| ReconcileError::Read(format!("the pods of {app}"), e))?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let fresh = match ctx.deployments.get_opt(&app).await {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(Action::await_change()),
        Err(e) => return Err(ReconcileError::Read(format!("deployment {app}"), e)),
    };
    if !cluster::is_dev_hot(&fresh) {
        return Ok(Action::await_change());
    }
    let desired = cluster::owned(fresh.metadata.annotations.as_ref());
    let patch = cluster::desired_patch(&desired);
    let stale: Vec<Pod> = pods
        .into_iter()
        .filter(|p| cluster::owned(p.metadata.annotations.as_ref()) != desired)
        .collect();
    let total = stale.len();
    if total == 0 {
        tracing::debug!(app = %app, "every pod carries the desired release");
    }
    let errors: Vec<kube::Error> = futures::stream::iter(stale)
        .map(|pod| {
            let api = ctx.pods.clone();
            let mut patch = patch.clone();
            async move {
                let name = pod.metadata.name.clone().unwrap_or_default();
                if let Some(rv) = &pod.metadata.resource_version {
                    patch["metadata"]["resourceVersion"] = serde_json::json!(rv);
                }
                let result = api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
                crate::metrics::pod_patched(&result);
                match &result {
                    Ok(_) => tracing::info!(pod = %name, "copied the desired release annotations onto the pod"),
                    Err(e) => tracing::warn!(pod = %name, error = %e, "could not annotate pod; retrying with backoff"),
                }
                result.err()
            }
        })
        .buffer_unordered(32)
        .filter_map(|e| async move { e })
        .collect()
        .await;
    let failed = errors.len();
    match errors.into_iter().next() {
        Some(first) => Err(ReconcileError::Patch {
            failed,
            total,
            first,
        }),
        None => {
            if let Ok(mut f) = ctx.failures.lock() {
                f.remove(&app);
            }
            Ok(Action::await_change())
        }
    }
}

fn error_policy(deploy: Arc<Deployment>, error: &ReconcileError, ctx: Arc<Ctx>) -> Action {
    let app = deploy.metadata.name.clone().unwrap_or_default();
    let attempt = ctx.failures.lock().map_or(0, |mut f| {
        let n = f.entry(app.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    });
    let delay = retry_delay(attempt);
    tracing::warn!(app = %app, attempt, retry_in_ms = delay.as_millis() as u64, "reconcile failed: {error}");
    Action::requeue(delay)
}

/// 200 ms, 400 ms, … doubling up to 30 s.
fn retry_delay(attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(16);
    RETRY_MIN.saturating_mul(factor).min(RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        assert_eq!(retry_delay(1), Duration::from_millis(200));
        assert_eq!(retry_delay(2), Duration::from_millis(400));
        assert_eq!(retry_delay(5), Duration::from_millis(3200));
        assert_eq!(retry_delay(100), RETRY_MAX);
    }
}
