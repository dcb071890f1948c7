//! The reconcile loop: copies each dev-hot Deployment's desired annotations onto its pods,
//! new and restarted pods included, so `kubectl annotate deployment …` works too and a pod
//! created by a rollout or a crash starts on the desired release.

use std::time::Duration;

use aether_common::manifest::{APP_LABEL, MANAGED_BY, MANAGED_BY_LABEL};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

use crate::cluster;

/// Runs until `shutdown`, watching Deployments and pods managed by aether in `ns`.
pub async fn run(client: kube::Client, ns: String, shutdown: CancellationToken) {
    let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");
    let deploys = Api::<Deployment>::namespaced(client.clone(), &ns);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let (dstore, dwriter) = reflector::store::<Deployment>();
    let (pstore, pwriter) = reflector::store::<Pod>();
    let cfg = watcher::Config::default().labels(&selector);
    let mut deploy_events = reflector::reflector(dwriter, watcher(deploys, cfg.clone()))
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut pod_events = reflector::reflector(pwriter, watcher(pods.clone(), cfg))
        .default_backoff()
        .applied_objects()
        .boxed();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            Some(event) = deploy_events.next() => match event {
                Ok(deploy) => {
                    let app = deploy.metadata.name.clone().unwrap_or_default();
                    for pod in pstore.state() {
                        if app_of(&pod).as_deref() == Some(app.as_str()) {
                            sync(&pods, &deploy, &pod).await;
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "deployment watch failed; retrying"),
            },
            Some(event) = pod_events.next() => match event {
                Ok(pod) => {
                    if let Some(app) = app_of(&pod)
                        && let Some(deploy) = dstore.get(&ObjectRef::new(&app).within(&ns))
                    {
                        sync(&pods, &deploy, &pod).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "pod watch failed; retrying"),
            },
            else => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn app_of(pod: &Pod) -> Option<String> {
    pod.metadata.labels.as_ref()?.get(APP_LABEL).cloned()
}

/// Patches `pod` when its owned annotations differ from the Deployment's.
async fn sync(pods: &Api<Pod>, deploy: &Deployment, pod: &Pod) {
    if !cluster::is_dev_hot(deploy) || pod.metadata.deletion_timestamp.is_some() {
        return;
    }
    let desired = cluster::owned(deploy.metadata.annotations.as_ref());
    let actual = cluster::owned(pod.metadata.annotations.as_ref());
    if desired == actual {
        return;
    }
    let name = pod.metadata.name.clone().unwrap_or_default();
    match pods
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(cluster::desired_patch(&desired)),
        )
        .await
    {
        Ok(_) => tracing::info!(pod = %name, "copied the desired release annotations onto the pod"),
        Err(e) => tracing::warn!(pod = %name, error = %e, "could not annotate pod"),
    }
}
