//! The manifest builder: the Deployment, ServiceAccount, Role and RoleBinding of an app,
//! with or without dev-hot. The control plane applies exactly these; tests and the
//! container end-to-end script read them too, so there is one source of truth.

use serde_json::{Value, json};

use crate::contract::annotations;
use crate::contract::on_release::OnRelease;

/// Port of the fetcher's HTTP listener inside the pod.
pub const FETCHER_PORT: u16 = 9180;
/// Name of that port on the fetcher container (what PodMonitors select).
pub const FETCHER_PORT_NAME: &str = "aether-http";
/// The shared volume mount.
pub const WORKSPACE: &str = "/workspace";
/// Label carrying the app name, also the pod selector.
pub const APP_LABEL: &str = "app.kubernetes.io/name";
/// The fetcher's container in an app's pod.
pub const FETCHER_CONTAINER: &str = "aether-fetcher";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "aether";
/// UID and GID of the non-root containers (the `nonroot` user of distroless images).
pub const RUN_AS: i64 = 65532;
/// Where `aether-fetcher install` puts the binary for the app container's supervisor.
pub const BIN_DIR: &str = "/aether/bin";
/// Where kube-rs' in-cluster configuration (like every Kubernetes client) looks for the
/// service-account token, CA and namespace. Only the fetcher gets a volume here.
pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Lifetime asked for the fetcher's projected token; the kubelet refreshes it at 80 %, and
/// kube-rs re-reads the file. 3607 s is what the kubelet itself asks for by default.
const TOKEN_SECONDS: i64 = 3607;

/// What to deploy.
#[derive(Debug, Clone)]
pub struct AppSpec {
    pub app: String,
    pub namespace: String,
    /// The app image (runs the app from `/workspace/current`).
    pub image: String,
    /// Command of the app container; empty keeps the image's entrypoint.
    pub command: Vec<String>,
    pub dev_hot: bool,
    /// The `aether-fetcher` image.
    pub fetch_image: String,
    pub replicas: i32,
    /// Desired release annotations (contract keys) to start with.
    pub desired: Vec<(String, String)>,
    /// Public key the fetchers require signatures from, if any.
    pub public_key: Option<String>,
    /// Extra env for the fetcher (for example `AETHER_ALLOW_HTTP=1` for a plain store).
    pub fetcher_env: Vec<(String, String)>,
    /// What a new release does to the supervised app; `None` keeps the supervisor's
    /// default (restart).
    pub on_release: Option<OnRelease>,
}

/// Longest app name: names derived from it (`<app>-aether-fetcher`, 15 more characters)
/// stay within a DNS-1123 label's 63 characters.
pub const MAX_APP_NAME: usize = 47;

/// Checks that `app` is a DNS-1123 label (lowercase letters, digits and `-`, starting and
/// ending with a letter or digit) of at most [`MAX_APP_NAME`] characters.
pub fn check_app_name(app: &str) -> Result<(), String> {
    check_dns_label("app name", app, MAX_APP_NAME).map_err(|e| {
        format!("{e} (a DNS-1123 label that leaves room for the \"-aether-fetcher\" suffix)")
    })
}

/// Checks that `name` (described by `what` in the error) is a DNS-1123 label of at most
/// `max` characters: lowercase letters, digits and `-`, starting and ending with a letter
/// or digit.
pub fn check_dns_label(what: &str, name: &str, max: usize) -> Result<(), String> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let valid_ends = !name.starts_with('-') && !name.ends_with('-');
    if name.is_empty() || name.len() > max || !valid_chars || !valid_ends {
        return Err(format!(
            "{what} {name:?} must be 1 to {max} lowercase letters, digits or '-', starting \
             and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// Name of the fetcher's ServiceAccount, Role and RoleBinding.
pub fn fetcher_account(app: &str) -> String {
    format!("{app}-aether-fetcher")
}

pub fn labels(app: &str) -> Value {
    json!({APP_LABEL: app, MANAGED_BY_LABEL: MANAGED_BY})
}

/// The label selector of an app's pods, in API syntax.
pub fn selector(app: &str) -> String {
    format!("{APP_LABEL}={app},{MANAGED_BY_LABEL}={MANAGED_BY}")
}

/// The service-account credentials the kubelet would mount by default, as a projected
/// volume that only the fetcher mounts (the pod itself has `automountServiceAccountToken:
/// false`, so the app container holds no token).
fn token_volume() -> Value {
    json!({"name": "aether-fetcher-token", "projected": {"defaultMode": 0o444, "sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": TOKEN_SECONDS}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace",
            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]}})
}

/// The restricted Pod Security Standard, per container.
pub(crate) fn restricted() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

fn fetcher_env(spec: &AppSpec, mode: &str) -> Vec<Value> {
    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        // From the pod's own app label (Downward API): a manifest release names its app,
        // and a fetcher refuses another app's release (replay protection).
        json!({"name": "AETHER_APP", "valueFrom": {"fieldRef": {"fieldPath": format!("metadata.labels['{APP_LABEL}']")}}}),
        json!({"name": "AETHER_FETCH_MODE", "value": mode}),
        json!({"name": "AETHER_WORKSPACE", "value": WORKSPACE}),
        json!({"name": "AETHER_HTTP_ADDR", "value": format!("0.0.0.0:{FETCHER_PORT}")}),
    ];
    if spec.dev_hot {
        // A developer saving twice in a second wants both saves live; the contract's 2 s
        // default is for production rollouts.
        env.push(json!({"name": "AETHER_MIN_REFRESH_INTERVAL_MS", "value": "100"}));
    }
    if let Some(key) = &spec.public_key {
        env.push(json!({"name": "AETHER_PUBKEY", "value": key}));
        env.push(json!({"name": "AETHER_REQUIRE_SIGNATURE", "value": "1"}));
    }
    for (k, v) in &spec.fetcher_env {
        env.push(json!({"name": k, "value": v}));
    }
    env
}

/// The volume where the supervisor marks the release its app runs from and the fetcher
/// reads the marks: the app container may write it, unlike its read-only `/workspace`.
const RUN_VOLUME: &str = "aether-run";
const RUN_DIR: &str = "/aether/run";

/// Mounts the run volume into a container and points `AETHER_IN_USE_DIR` at it.
fn push_run_dir(container: &mut Value) {
    if let Some(mounts) = container["volumeMounts"].as_array_mut() {
        mounts.push(json!({"name": RUN_VOLUME, "mountPath": RUN_DIR}));
    }
    let env = json!({"name": "AETHER_IN_USE_DIR", "value": format!("{RUN_DIR}/in-use")});
    match container["env"].as_array_mut() {
        Some(list) => list.push(env),
        None => container["env"] = json!([env]),
    }
}

fn resources(cpu_request: &str, mem_request: &str, cpu_limit: &str, mem_limit: &str) -> Value {
    json!({
        "requests": {"cpu": cpu_request, "memory": mem_request},
        "limits": {"cpu": cpu_limit, "memory": mem_limit},
    })
}

/// The app's Deployment.
///
/// With dev-hot: the fetcher is a native sidecar (an init container with
/// `restartPolicy: Always`) whose startupProbe on `/readyz` holds the app back until the
/// first release is live; it watches its own pod. The desired annotations go on the
/// Deployment's metadata only: the control plane copies them onto pods, so a hot patch
/// never changes the template and never causes a rollout.
///
/// Without dev-hot: an init container runs `aether-fetcher --once` in `file` mode (Downward
/// API, no RBAC), and the desired annotations are part of the template, so a new release
/// is an ordinary rollout.
pub fn deployment(spec: &AppSpec) -> Value {
    let app = &spec.app;
    let desired: serde_json::Map<String, Value> = spec
        .desired
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let mut meta_annotations = desired.clone();
    let mut template_annotations = serde_json::Map::new();
    if spec.dev_hot {
        meta_annotations.insert(annotations::DEV_HOT.into(), json!("true"));
        template_annotations.insert(annotations::DEV_HOT.into(), json!("true"));
    } else {
        template_annotations = desired;
    }
    let workspace_mount = json!({"name": "workspace", "mountPath": WORKSPACE});
    // The app runs under the supervisor, which marks the release it runs from in use.
    let supervised = spec.dev_hot && !spec.command.is_empty();
    let mut fetcher = json!({
        "name": FETCHER_CONTAINER,
        "image": spec.fetch_image,
        "imagePullPolicy": "IfNotPresent",
        "env": fetcher_env(spec, if spec.dev_hot { "watch" } else { "file" }),
        "volumeMounts": [workspace_mount.clone()],
        "resources": resources("10m", "16Mi", "500m", "64Mi"),
        "securityContext": restricted(),
    });
    let mut volumes = vec![json!({"name": "workspace", "emptyDir": {}})];
    let mut service_account = Value::Null;
    if spec.dev_hot {
        fetcher["restartPolicy"] = json!("Always");
        fetcher["ports"] = json!([{"name": FETCHER_PORT_NAME, "containerPort": FETCHER_PORT}]);
        fetcher["startupProbe"] = json!({
            "httpGet": {"path": "/readyz", "port": FETCHER_PORT},
            "periodSeconds": 1, "failureThreshold": 600,
        });
        fetcher["livenessProbe"] = json!({
            "httpGet": {"path": "/healthz", "port": FETCHER_PORT}, "periodSeconds": 10,
        });
        fetcher["volumeMounts"] = json!([
            workspace_mount.clone(),
            {"name": "aether-fetcher-token", "mountPath": SA_DIR, "readOnly": true},
        ]);
        volumes.push(token_volume());
        if supervised {
            push_run_dir(&mut fetcher);
        }
        service_account = json!(fetcher_account(app));
    } else {
        fetcher["args"] = json!(["--once"]);
        fetcher["volumeMounts"] = json!([workspace_mount.clone(), {"name": "podinfo", "mountPath": "/etc/podinfo", "readOnly": true}]);
        volumes.push(json!({"name": "podinfo", "downwardAPI": {"items": [
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}}));
    }
    // The app only reads releases; a write into one would change what a digest names.
    let app_workspace_mount =
        json!({"name": "workspace", "mountPath": WORKSPACE, "readOnly": true});
    let mut app_container = json!({
        "name": app,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": format!("{WORKSPACE}/current"),
        "volumeMounts": [app_workspace_mount.clone()],
        "resources": resources("50m", "64Mi", "1", "512Mi"),
        "securityContext": restricted(),
    });
    let mut init_containers = vec![fetcher];
    if supervised {
        // The app runs under `aether-fetcher supervise`, copied in by `aether-fetcher
        // install`, so it restarts in each new release even in an image with no shell.
        let bin_mount = json!({"name": "aether-bin", "mountPath": BIN_DIR});
        init_containers.insert(
            0,
            json!({
                "name": "aether-install",
                "image": spec.fetch_image,
                "imagePullPolicy": "IfNotPresent",
                "args": ["install", BIN_DIR],
                "volumeMounts": [bin_mount.clone()],
                "resources": resources("10m", "16Mi", "200m", "32Mi"),
                "securityContext": restricted(),
            }),
        );
        volumes.push(json!({"name": "aether-bin", "emptyDir": {}}));
        let mut command = vec![
            format!("{BIN_DIR}/aether-fetcher"),
            "supervise".into(),
            "--".into(),
        ];
        command.extend(spec.command.iter().cloned());
        app_container["command"] = json!(command);
        let mut env = vec![json!({"name": "AETHER_WORKSPACE", "value": WORKSPACE})];
        if let Some(on_release) = spec.on_release {
            env.push(json!({"name": "AETHER_ON_RELEASE", "value": on_release.to_string()}));
        }
        app_container["env"] = json!(env);
        app_container["volumeMounts"] = json!([
            app_workspace_mount,
            {"name": "aether-bin", "mountPath": BIN_DIR, "readOnly": true},
        ]);
        push_run_dir(&mut app_container);
        volumes.push(json!({"name": RUN_VOLUME, "emptyDir": {"sizeLimit": "1Mi"}}));
    } else if !spec.command.is_empty() {
        app_container["command"] = json!(spec.command);
    }
    let mut pod_spec = json!({
        "automountServiceAccountToken": false,
        "securityContext": {
            "runAsNonRoot": true, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": init_containers,
        "containers": [app_container],
        "volumes": volumes,
    });
    if !service_account.is_null() {
        pod_spec["serviceAccountName"] = service_account;
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": app, "namespace": spec.namespace,
            "labels": labels(app), "annotations": meta_annotations,
        },
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": labels(app)},
            "template": {
                "metadata": {"labels": labels(app), "annotations": template_annotations},
                "spec": pod_spec,
            },
        },
    })
}

/// ServiceAccount, Role (get/list/watch pods, nothing else) and RoleBinding of the fetcher;
/// empty without dev-hot (the `--once` init container reads the Downward API file).
pub fn fetcher_rbac(spec: &AppSpec) -> Vec<Value> {
    if !spec.dev_hot {
        return Vec::new();
    }
    let name = fetcher_account(&spec.app);
    let meta = json!({"name": name, "namespace": spec.namespace, "labels": labels(&spec.app)});
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": spec.namespace}]}),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dev_hot: bool) -> AppSpec {
        AppSpec {
            app: "web".into(),
            namespace: "dev".into(),
            image: "web:1".into(),
            command: vec!["./serve".into()],
            dev_hot,
            fetch_image: "aether-fetcher:1".into(),
            replicas: 2,
            desired: vec![(annotations::DIGEST.into(), "sha256:00".into())],
            public_key: Some("ab".repeat(32)),
            fetcher_env: vec![],
            on_release: None,
        }
    }

    #[test]
    fn on_release_reaches_the_supervisor_of_the_app_container() {
        let mut s = spec(true);
        let app_env = |d: &Value| d["spec"]["template"]["spec"]["containers"][0]["env"].clone();
        assert!(
            !app_env(&deployment(&s))
                .to_string()
                .contains("AETHER_ON_RELEASE"),
            "the supervisor's default is left to it"
        );
        s.on_release = Some(OnRelease::Signal(1));
        let env = app_env(&deployment(&s));
        assert!(
            env.as_array()
                .unwrap()
                .contains(&json!({"name": "AETHER_ON_RELEASE", "value": "signal:HUP"})),
            "{env}"
        );
    }

    #[test]
    fn dev_hot_runs_the_app_under_the_installed_supervisor() {
        let d = deployment(&spec(true));
        let pod = &d["spec"]["template"]["spec"];
        let install = &pod["initContainers"][0];
        assert_eq!(install["args"], json!(["install", BIN_DIR]));
        let app = &pod["containers"][0];
        assert_eq!(
            app["command"],
            json!(["/aether/bin/aether-fetcher", "supervise", "--", "./serve"])
        );
        assert!(
            app["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["mountPath"] == BIN_DIR && m["readOnly"] == true)
        );
        assert!(
            pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == "aether-bin")
        );
    }

    #[test]
    fn dev_hot_uses_a_native_sidecar_with_a_startup_probe_and_no_template_digest() {
        let d = deployment(&spec(true));
        let pod = &d["spec"]["template"]["spec"];
        let sidecar = &pod["initContainers"][1];
        assert_eq!(sidecar["restartPolicy"], "Always");
        assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(pod["serviceAccountName"], "web-aether-fetcher");
        assert_eq!(pod["containers"][0]["workingDir"], "/workspace/current");
        assert_eq!(d["metadata"]["annotations"][annotations::DEV_HOT], "true");
        assert_eq!(
            d["metadata"]["annotations"][annotations::DIGEST],
            "sha256:00"
        );
        let tmpl = &d["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(tmpl[annotations::DEV_HOT], "true");
        assert!(
            tmpl.get(annotations::DIGEST).is_none(),
            "a hot patch must not roll out"
        );
        let env = sidecar["env"].as_array().unwrap();
        assert!(env.iter().any(|e| e["name"] == "POD_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"));
        assert!(env.iter().any(|e| e["name"] == "AETHER_REQUIRE_SIGNATURE"));
    }

    #[test]
    fn every_container_runs_restricted() {
        for dev_hot in [true, false] {
            let d = deployment(&spec(dev_hot));
            let pod = &d["spec"]["template"]["spec"];
            for c in pod["initContainers"]
                .as_array()
                .unwrap()
                .iter()
                .chain(pod["containers"].as_array().unwrap())
            {
                let sc = &c["securityContext"];
                assert_eq!(sc["allowPrivilegeEscalation"], false);
                assert_eq!(sc["readOnlyRootFilesystem"], true);
                assert_eq!(sc["runAsNonRoot"], true);
                assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
                assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
                assert!(c["resources"]["limits"]["memory"].is_string());
            }
        }
    }

    #[test]
    fn only_the_fetcher_holds_a_token_and_the_app_reads_the_workspace_only() {
        let d = deployment(&spec(true));
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["automountServiceAccountToken"], false);
        let mounts_token = |c: &Value| {
            c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["mountPath"] == SA_DIR)
        };
        let sidecar = &pod["initContainers"][1];
        assert_eq!(sidecar["name"], "aether-fetcher");
        assert!(mounts_token(sidecar));
        assert!(!mounts_token(&pod["initContainers"][0]));
        let app = &pod["containers"][0];
        assert!(!mounts_token(app));
        // The app writes only the run volume (the supervisor's in-use marks), which the
        // fetcher reads from the same place.
        for m in app["volumeMounts"].as_array().unwrap() {
            if m["name"] == RUN_VOLUME {
                assert_eq!(m["mountPath"], RUN_DIR);
                continue;
            }
            assert_eq!(m["readOnly"], true, "{m}");
        }
        let in_use = |c: &Value| {
            c["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "AETHER_IN_USE_DIR" && e["value"] == "/aether/run/in-use")
        };
        assert!(in_use(app) && in_use(sidecar));
        let token = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "aether-fetcher-token")
            .expect("projected token volume");
        let sources = token["projected"]["sources"].as_array().unwrap();
        assert_eq!(sources[0]["serviceAccountToken"]["path"], "token");
        assert_eq!(sources[1]["configMap"]["items"][0]["path"], "ca.crt");
        assert_eq!(sources[2]["downwardAPI"]["items"][0]["path"], "namespace");
    }

    #[test]
    fn without_dev_hot_an_init_container_runs_once_from_the_downward_api() {
        let d = deployment(&spec(false));
        let pod = &d["spec"]["template"]["spec"];
        let init = &pod["initContainers"][0];
        assert_eq!(init["args"], json!(["--once"]));
        assert!(init.get("restartPolicy").is_none());
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(
            d["spec"]["template"]["metadata"]["annotations"][annotations::DIGEST],
            "sha256:00"
        );
        assert!(fetcher_rbac(&spec(false)).is_empty());
    }

    #[test]
    fn app_names_are_short_dns_labels() {
        assert_eq!(MAX_APP_NAME, 47);
        for ok in ["a", "web", "web-2", &"a".repeat(47)] {
            assert!(check_app_name(ok).is_ok(), "{ok}");
            assert!(fetcher_account(ok).len() <= 63);
        }
        for bad in [
            "",
            "Web",
            "-web",
            "web-",
            "web_2",
            "a.b",
            &"a".repeat(48),
            "wéb",
        ] {
            assert!(check_app_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rbac_grants_only_reading_pods() {
        let objs = fetcher_rbac(&spec(true));
        assert_eq!(objs.len(), 3);
        assert_eq!(
            objs[1]["rules"],
            json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
        );
        assert_eq!(objs[2]["subjects"][0]["name"], "web-aether-fetcher");
    }
}
