//! What the control plane does to the cluster: apply an app's manifests, set the desired
//! annotations on a Deployment and its pods, and read each pod's fetcher status through the
//! API server's pod proxy.

use std::collections::BTreeMap;

use aether_common::contract::annotations::{
    ARTIFACT_URL, BUILD_COMMIT, DEV_HOT, DIGEST, FORMAT, Format, PREVIOUS_DIGEST, SIGNATURE,
};
use aether_common::contract::status::StatusReport;
use aether_common::kube::manifest::{self, AppSpec, FETCHER_PORT};
use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use serde::Serialize;

use crate::reconcile::Cache;
use serde_json::{Value, json};

/// The annotation keys the control plane owns on pods.
pub const DESIRED_KEYS: [&str; 5] = [DIGEST, ARTIFACT_URL, SIGNATURE, BUILD_COMMIT, FORMAT];
const FIELD_MANAGER: &str = "aether";

/// Server-side applies the app's Deployment and, with dev-hot, the fetcher's RBAC.
pub async fn apply_app(client: &kube::Client, spec: &AppSpec) -> anyhow::Result<()> {
    let ns = &spec.namespace;
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    // A forced apply would take over any Deployment of that name, the control plane's own
    // (`aether`, in the namespace it manages) included: only ours are ours to change.
    let existing = deployments
        .get_opt(&spec.app)
        .await
        .with_context(|| format!("reading deployment {ns}/{}", spec.app))?;
    if let Some(existing) = &existing {
        let managed = existing
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(manifest::MANAGED_BY_LABEL))
            .is_some_and(|v| v == manifest::MANAGED_BY);
        if !managed {
            return Err(NotManaged {
                namespace: ns.clone(),
                app: spec.app.clone(),
            }
            .into());
        }
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for obj in manifest::fetcher_rbac(spec) {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match obj["kind"].as_str() {
            Some("ServiceAccount") => {
                Api::<ServiceAccount>::namespaced(client.clone(), ns)
                    .patch(&name, &params, &Patch::Apply(&obj))
                    .await?;
            }
            Some("Role") => {
                Api::<Role>::namespaced(client.clone(), ns)
                    .patch(&name, &params, &Patch::Apply(&obj))
                    .await?;
            }
            Some("RoleBinding") => {
                Api::<RoleBinding>::namespaced(client.clone(), ns)
                    .patch(&name, &params, &Patch::Apply(&obj))
                    .await?;
            }
            _ => {}
        }
    }
    let mut deployment = manifest::deployment(spec);
    // The Deployment remembers the release it leaves (or keeps what it remembered when the
    // release stays), for `aether rollback`.
    let new_digest = spec
        .desired
        .iter()
        .find(|(k, _)| k == DIGEST)
        .map(|(_, v)| v.as_str());
    let previous = existing.as_ref().and_then(|e| {
        let before = annotation(e, DIGEST);
        if before.is_some() && before.as_deref() != new_digest {
            before
        } else {
            annotation(e, PREVIOUS_DIGEST)
        }
    });
    if let Some(previous) = previous
        && let Some(a) = deployment["metadata"]["annotations"].as_object_mut()
    {
        a.insert(PREVIOUS_DIGEST.into(), json!(previous));
    }
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(&spec.app, &params, &Patch::Apply(&deployment))
        .await
        .with_context(|| format!("applying deployment {ns}/{}", spec.app))?;
    Ok(())
}

/// A deploy would overwrite a Deployment that aether did not create.
#[derive(Debug, thiserror::Error)]
#[error(
    "deployment {namespace}/{app} exists and is not managed by aether (no label \
     app.kubernetes.io/managed-by=aether): choose another app name"
)]
pub struct NotManaged {
    pub namespace: String,
    pub app: String,
}

/// A manifest release for a Deployment whose fetcher was deployed before manifest
/// releases: it has no `AETHER_APP`, so every pod would refuse the release.
#[derive(Debug, thiserror::Error)]
#[error(
    "deployment {namespace}/{app} predates manifest releases (its fetcher has no AETHER_APP): \
     deploy it again with `aether deploy {app} --dev-hot`, or release with --format tar"
)]
pub struct NoManifests {
    pub namespace: String,
    pub app: String,
}

/// Whether the Deployment's fetcher sidecar is given `AETHER_APP`.
fn fetcher_knows_its_app(deploy: &Deployment) -> bool {
    let Some(spec) = deploy.spec.template.spec.as_ref() else {
        return false;
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter(|c| c.name == manifest::FETCHER_CONTAINER)
        .any(|c| c.env.iter().flatten().any(|e| e.name == "AETHER_APP"))
}

/// A hot release was asked for an app deployed without dev-hot.
#[derive(Debug, thiserror::Error)]
#[error("deployment {namespace}/{app} is not a dev-hot deployment (deploy it with --dev-hot)")]
pub struct NotDevHot {
    pub namespace: String,
    pub app: String,
}

/// Whether the Deployment carries `aether.dev/dev-hot=true`.
pub fn is_dev_hot(deploy: &Deployment) -> bool {
    deploy
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DEV_HOT))
        .is_some_and(|v| v == "true")
}

/// The desired annotations as a merge patch: the given keys set, the other owned keys
/// removed (so a release without a signature drops a stale one).
pub fn desired_patch(desired: &BTreeMap<String, String>) -> Value {
    let mut annotations = serde_json::Map::new();
    for key in DESIRED_KEYS {
        annotations.insert(
            key.into(),
            desired.get(key).map_or(Value::Null, |v| json!(v)),
        );
    }
    json!({"metadata": {"annotations": annotations}})
}

/// The owned keys of an object's annotations.
pub fn owned(annotations: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
    annotations
        .map(|a| {
            a.iter()
                .filter(|(k, _)| DESIRED_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// Sets the desired annotations on the Deployment's metadata (never its template: no
/// rollout) and merge-patches them onto every current pod of the app. Returns how many pods
/// were patched.
pub async fn release(
    client: &kube::Client,
    ns: &str,
    app: &str,
    desired: &BTreeMap<String, String>,
) -> anyhow::Result<usize> {
    let patch = desired_patch(desired);
    let deploys = Api::<Deployment>::namespaced(client.clone(), ns);
    let deploy = deploys
        .get(app)
        .await
        .with_context(|| format!("deployment {ns}/{app}"))?;
    if !is_dev_hot(&deploy) {
        return Err(NotDevHot {
            namespace: ns.to_owned(),
            app: app.to_owned(),
        }
        .into());
    }
    if desired.get(FORMAT).map(String::as_str) == Some(Format::Manifest.as_str())
        && !fetcher_knows_its_app(&deploy)
    {
        return Err(NoManifests {
            namespace: ns.to_owned(),
            app: app.to_owned(),
        }
        .into());
    }
    // The Deployment remembers the release it leaves, for `aether rollback`.
    let mut deploy_patch = patch.clone();
    let before = annotation(&deploy, DIGEST);
    if let Some(before) = before.filter(|b| Some(b) != desired.get(DIGEST))
        && let Some(a) = deploy_patch["metadata"]["annotations"].as_object_mut()
    {
        a.insert(PREVIOUS_DIGEST.into(), json!(before));
    }
    deploys
        .patch(
            app,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Merge(&deploy_patch),
        )
        .await
        .with_context(|| format!("annotating deployment {ns}/{app}"))?;
    patch_pods(client, ns, app, &patch).await
}

/// Merge-patches every pod of the app, 32 at a time.
pub async fn patch_pods(
    client: &kube::Client,
    ns: &str,
    app: &str,
    patch: &Value,
) -> anyhow::Result<usize> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&manifest::selector(app)))
        .await?;
    let names: Vec<String> = list
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(names.clone())
        .map(|name| {
            let pods = pods.clone();
            let patch = patch.clone();
            let ns = ns.to_owned();
            async move {
                let result = pods
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
                crate::metrics::pod_patched(&result);
                result
                    .map(|_| ())
                    .with_context(|| format!("annotating pod {ns}/{name}"))
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(names.len())
}

/// One pod as `aether status` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct PodStatus {
    pub name: String,
    pub annotated_digest: Option<String>,
    /// What the pod's fetcher reports on `/status`, or `None` when it cannot be reached.
    pub fetcher: Option<StatusReport>,
    pub live_digest: Option<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct AppStatus {
    pub app: String,
    pub namespace: String,
    pub desired_digest: Option<String>,
    /// The release the app asked for before the desired one.
    #[serde(default)]
    pub previous_digest: Option<String>,
    pub pods: Vec<PodStatus>,
}

/// One annotation of a Deployment.
fn annotation(deploy: &Deployment, key: &str) -> Option<String> {
    deploy.metadata.annotations.as_ref()?.get(key).cloned()
}

/// Desired digest and, per pod (or only the pods named in `only`), the annotated and the
/// live digest. The Deployment and its pods come from the reconcile loop's caches once
/// they are complete (one pod-proxy request per pod is then the whole cost of a read),
/// from the API server before that.
pub async fn status(
    client: &kube::Client,
    cache: Option<&Cache>,
    ns: &str,
    app: &str,
    only: Option<&[String]>,
) -> anyhow::Result<AppStatus> {
    let cached = cache.filter(|c| c.ready()).and_then(|c| {
        let deploy = c.deployments.get(&ObjectRef::new(app).within(ns))?;
        let selector = manifest::labels(app);
        let pods: Vec<Pod> = c
            .pods
            .state()
            .into_iter()
            .filter(|p| {
                let labels = p.metadata.labels.clone().unwrap_or_default();
                selector.as_object().is_some_and(|want| {
                    want.iter()
                        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
                })
            })
            .map(|p| Pod::clone(&p))
            .collect();
        Some((Deployment::clone(&deploy), pods))
    });
    let (deploy, pods) = match cached {
        Some(found) => found,
        None => {
            let deploy = Api::<Deployment>::namespaced(client.clone(), ns)
                .get(app)
                .await
                .with_context(|| format!("deployment {ns}/{app}"))?;
            let pods = Api::<Pod>::namespaced(client.clone(), ns)
                .list(&ListParams::default().labels(&manifest::selector(app)))
                .await?
                .items;
            (deploy, pods)
        }
    };
    let desired = annotation(&deploy, DIGEST);
    let previous = annotation(&deploy, PREVIOUS_DIGEST);
    let pods = pods.into_iter().filter(|p| {
        only.is_none_or(|names| p.metadata.name.as_ref().is_some_and(|n| names.contains(n)))
    });
    let mut statuses = futures::stream::iter(pods)
        .map(|pod| {
            let client = client.clone();
            let ns = ns.to_owned();
            async move {
                let name = pod.metadata.name.clone().unwrap_or_default();
                let annotated = owned(pod.metadata.annotations.as_ref())
                    .get(DIGEST)
                    .cloned();
                let fetcher = fetcher_status(&client, &ns, &name).await.ok();
                let live = fetcher
                    .as_ref()
                    .and_then(|f| f.current_digest)
                    .map(|d| d.to_string());
                PodStatus {
                    name,
                    annotated_digest: annotated,
                    fetcher,
                    live_digest: live,
                }
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    statuses.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(AppStatus {
        app: app.into(),
        namespace: ns.into(),
        desired_digest: desired,
        previous_digest: previous,
        pods: statuses,
    })
}

/// GET `/status` of the pod's fetcher through `pods/proxy`.
async fn fetcher_status(
    client: &kube::Client,
    ns: &str,
    pod: &str,
) -> anyhow::Result<StatusReport> {
    let path = format!("/api/v1/namespaces/{ns}/pods/{pod}:{FETCHER_PORT}/proxy/status");
    let request = http::Request::get(path).body(Vec::new())?;
    let text = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        client.request_text(request),
    )
    .await??;
    Ok(serde_json::from_str(&text)?)
}

/// Whether the API server answers (for `/readyz`).
pub async fn reachable(client: &kube::Client) -> bool {
    client.apiserver_version().await.is_ok()
}
