//! The installation of the control plane (`aether install`, `deploy/`): its namespace,
//! ServiceAccount and least-privilege Role, its Deployment, store volume and Service.
//! Built beside the app manifests, with the same restricted container settings.

use serde_json::{Value, json};

use super::manifest::{self, restricted};

/// Name of every object of the installation (and of the Service pods reach).
pub const NAME: &str = "aether";
/// The control plane's listening port inside its pod.
pub const PORT: u16 = 3000;
/// The Service's port.
pub const SERVICE_PORT: u16 = 80;
/// Where the store volume is mounted.
pub const DATA_DIR: &str = "/var/lib/aether";
/// Where the API token Secret is mounted; the token is read from `TOKEN_DIR/token`.
pub const TOKEN_DIR: &str = "/etc/aether/api-token";
/// The key of the token in its Secret.
pub const TOKEN_KEY: &str = "token";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const PART_OF_LABEL: &str = "app.kubernetes.io/part-of";

/// Where the control plane keeps its artifact store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreVolume {
    /// A PersistentVolumeClaim of this size (releases survive a restart).
    Pvc { size: String },
    /// An emptyDir (releases are lost with the pod; for throw-away clusters).
    EmptyDir,
    /// S3-compatible object storage at `url` (`s3://bucket[/prefix]`), shared by every
    /// replica; its standard AWS settings (`AWS_ENDPOINT_URL`, `AWS_REGION`, credentials)
    /// are the keys of the Secret `secret`.
    S3 { url: String, secret: String },
}

/// What to install.
#[derive(Debug, Clone)]
pub struct InstallSpec {
    pub namespace: String,
    /// Base URL pods download artifacts from; `None`: the Service's cluster DNS name.
    pub public_url: Option<String>,
    /// The Secret (key `token`) holding the API token.
    pub token_secret: String,
    pub store: StoreVolume,
    /// The `aether` image.
    pub image: String,
    /// The `aether-fetcher` image the control plane puts in app pods.
    pub fetch_image: String,
    /// Print the Namespace (with the restricted Pod Security labels); off for an
    /// existing namespace, whose policy is not ours to change.
    pub create_namespace: bool,
    /// Control-plane replicas (more than one only with object storage).
    pub replicas: u32,
}

impl InstallSpec {
    /// The public URL the control plane will tell pods: the configured one, or the
    /// Service's name in the cluster DNS (`<svc>.<ns>.svc` resolves through the pods'
    /// search domains whatever the cluster domain is). The namespace is a reference to the
    /// `AETHER_NAMESPACE` env var (the pod's own namespace), which Kubernetes expands, so
    /// the URL stays right under a kustomize namespace override.
    pub fn effective_public_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{NAME}.$(AETHER_NAMESPACE).svc:{SERVICE_PORT}"))
    }
}

/// Labels of the control plane's objects. Deliberately without
/// `app.kubernetes.io/managed-by=aether`: that label marks the apps the reconcile loop
/// manages, and the control plane must not manage itself.
pub fn labels() -> Value {
    json!({
        manifest::APP_LABEL: NAME,
        COMPONENT_LABEL: "control-plane",
        PART_OF_LABEL: NAME,
    })
}

fn selector_labels() -> Value {
    json!({manifest::APP_LABEL: NAME, COMPONENT_LABEL: "control-plane"})
}

fn meta(spec: &InstallSpec, name: &str) -> Value {
    json!({"name": name, "namespace": spec.namespace, "labels": labels()})
}

/// One rule of the control plane's Role, with the reason it is needed (the README's
/// permission table is written from these).
pub struct Permission {
    pub api_group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// The only objects the rule applies to; empty: every object of the resource.
    pub resource_names: &'static [&'static str],
    pub why: &'static str,
}

/// The Lease the replicas elect their leader with (`aether serve --lease-name`).
pub const LEASE_NAME: &str = "aether-control-plane";

/// Exactly what `aether serve` does in its namespace; nothing cluster-wide, no `*`.
pub const PERMISSIONS: &[Permission] = &[
    Permission {
        api_group: "apps",
        resource: "deployments",
        verbs: &["get", "list", "watch", "create", "patch"],
        resource_names: &[],
        why: "deploy reads an existing Deployment of that name (it changes only those aether \
              created), then applies it (server-side apply: patch, and create for a new one); \
              release reads one and patches its desired annotations; the reconcile loop lists \
              and watches the managed ones",
    },
    Permission {
        api_group: "",
        resource: "pods",
        verbs: &["get", "list", "watch", "patch"],
        resource_names: &[],
        why: "the reconcile loop lists and watches app pods and patches the desired \
              annotations onto them; get is also what the fetchers' Role grants, and RBAC \
              lets the control plane create that Role only if it holds those verbs itself",
    },
    Permission {
        api_group: "",
        resource: "pods/proxy",
        verbs: &["get"],
        resource_names: &[],
        why: "status reads each fetcher's /status through the API server",
    },
    Permission {
        api_group: "",
        resource: "pods/log",
        verbs: &["get"],
        resource_names: &[],
        why: "aether logs and aether dev --hot stream the app container's output of each pod",
    },
    Permission {
        api_group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["create"],
        resource_names: &[],
        why: "the first replica creates the Lease that elects the one running the reconcile \
              loop (RBAC cannot restrict create to a name)",
    },
    Permission {
        api_group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "update"],
        resource_names: &[LEASE_NAME],
        why: "each replica reads that Lease; the leader renews it and a standby takes it \
              over (update, guarded by its resourceVersion); no other Lease of the namespace",
    },
    Permission {
        api_group: "",
        resource: "serviceaccounts",
        verbs: &["create", "patch"],
        resource_names: &[],
        why: "deploy --dev-hot applies each app's fetcher ServiceAccount",
    },
    Permission {
        api_group: "rbac.authorization.k8s.io",
        resource: "roles",
        verbs: &["create", "patch"],
        resource_names: &[],
        why: "deploy --dev-hot applies each app's fetcher Role (get, list, watch pods)",
    },
    Permission {
        api_group: "rbac.authorization.k8s.io",
        resource: "rolebindings",
        verbs: &["create", "patch"],
        resource_names: &[],
        why: "deploy --dev-hot binds that Role to the fetcher's ServiceAccount",
    },
];

fn rules() -> Value {
    Value::Array(
        PERMISSIONS
            .iter()
            .map(|p| {
                let mut rule = json!({"apiGroups": [p.api_group], "resources": [p.resource], "verbs": p.verbs});
                if !p.resource_names.is_empty() {
                    rule["resourceNames"] = json!(p.resource_names);
                }
                rule
            })
            .collect(),
    )
}

/// Every object of the installation, in the order `kubectl apply` should create them.
pub fn objects(spec: &InstallSpec) -> Vec<Value> {
    let ns = &spec.namespace;
    let mut objects = Vec::new();
    if spec.create_namespace {
        // Everything aether runs, control plane and app pods alike, meets the restricted
        // Pod Security Standard; enforcing it keeps it that way.
        objects.push(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": ns, "labels": {
                PART_OF_LABEL: NAME,
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/warn": "restricted",
            }}}),
        );
    }
    objects.extend([
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(spec, NAME)}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": meta(spec, NAME), "rules": rules()}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": meta(spec, NAME),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}]}),
    ]);
    let store_volume = match &spec.store {
        StoreVolume::Pvc { size } => {
            objects.push(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": meta(spec, &store_claim()),
                "spec": {"accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": size}}}}));
            json!({"name": "store", "persistentVolumeClaim": {"claimName": store_claim()}})
        }
        StoreVolume::EmptyDir => json!({"name": "store", "emptyDir": {}}),
        // Nothing on the pod's disk matters: the store is the bucket.
        StoreVolume::S3 { .. } => json!({"name": "store", "emptyDir": {"sizeLimit": "64Mi"}}),
    };
    objects.push(deployment(spec, store_volume));
    if spec.replicas > 1 {
        // Voluntary disruptions (node drains, upgrades) take one replica at a time.
        objects.push(
            json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": meta(spec, NAME),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels()}}}),
        );
    }
    objects.push(
        json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(spec, NAME),
        "spec": {"selector": selector_labels(), "ports": [{"name": "http",
            "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}]}}),
    );
    objects
}

/// Name of the store's PersistentVolumeClaim.
pub fn store_claim() -> String {
    format!("{NAME}-store")
}

fn deployment(spec: &InstallSpec, store_volume: Value) -> Value {
    let mut env = vec![
        json!({"name": "AETHER_LISTEN", "value": format!("0.0.0.0:{PORT}")}),
        json!({"name": "AETHER_DATA_DIR", "value": DATA_DIR}),
        // The namespace the pod runs in, so a kustomize namespace override stays coherent.
        json!({"name": "AETHER_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        // The replica's name in the Lease: a restarted container keeps its leadership.
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "AETHER_PUBLIC_URL", "value": spec.effective_public_url()}),
        json!({"name": "AETHER_FETCH_IMAGE", "value": spec.fetch_image}),
        // A file, never the value: env is visible to anyone who can read the Deployment.
        json!({"name": "AETHER_API_TOKEN_FILE", "value": format!("{TOKEN_DIR}/{TOKEN_KEY}")}),
    ];
    let mut env_from = Vec::new();
    if let StoreVolume::S3 { url, secret } = &spec.store {
        env.push(json!({"name": "AETHER_STORE", "value": url}));
        // The bucket's settings and credentials, by reference: the Deployment names the
        // Secret, never its values.
        env_from.push(json!({"secretRef": {"name": secret}}));
    }
    let probe = |path: &str, period: u32| {
        json!({"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
            "timeoutSeconds": 2, "failureThreshold": 3})
    };
    let mut container = json!({
        "name": "aether",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["serve"],
        "env": env,
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "readinessProbe": probe("/readyz", 5),
        "livenessProbe": probe("/healthz", 10),
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"cpu": "1", "memory": "512Mi"},
        },
        "securityContext": restricted(),
        "volumeMounts": [
            {"name": "store", "mountPath": DATA_DIR},
            {"name": "api-token", "mountPath": TOKEN_DIR, "readOnly": true},
        ],
    });
    let strategy = match spec.store {
        // One writer of the store volume at a time (a ReadWriteOnce claim cannot be
        // mounted by the old and the new pod of a rolling update on two nodes).
        StoreVolume::Pvc { .. } => json!({"type": "Recreate"}),
        // Replicas share nothing but the bucket: a new one serves before an old one goes.
        _ => {
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}})
        }
    };
    // Replicas on different nodes where the scheduler can, so one node's loss leaves one.
    let affinity = (spec.replicas > 1).then(|| {
        json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchLabels": selector_labels()},
            },
        }]}})
    });
    if !env_from.is_empty() {
        container["envFrom"] = Value::Array(env_from);
    }
    let mut deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(spec, NAME),
        "spec": {
            "replicas": spec.replicas,
            "strategy": strategy,
            "selector": {"matchLabels": selector_labels()},
            "template": {
                "metadata": {"labels": labels()},
                "spec": {
                    "serviceAccountName": NAME,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": manifest::RUN_AS,
                        "runAsGroup": manifest::RUN_AS,
                        // Makes the store volume and the Secret's files the group's.
                        "fsGroup": manifest::RUN_AS,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        store_volume,
                        {"name": "api-token", "secret": {
                            "secretName": spec.token_secret,
                            "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}],
                            "defaultMode": 0o440,
                        }},
                    ],
                },
            },
        },
    });
    if let Some(affinity) = affinity {
        deployment["spec"]["template"]["spec"]["affinity"] = affinity;
    }
    deployment
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(store: StoreVolume) -> InstallSpec {
        InstallSpec {
            namespace: "aether".into(),
            public_url: None,
            token_secret: "aether-api-token".into(),
            store,
            image: "aether:dev".into(),
            fetch_image: "aether-fetcher:dev".into(),
            create_namespace: true,
            replicas: 1,
        }
    }

    #[test]
    fn several_replicas_share_a_bucket_from_a_secret_spread_over_nodes_with_a_budget() {
        let mut ha = spec(StoreVolume::S3 {
            url: "s3://releases/team".into(),
            secret: "aether-store".into(),
        });
        ha.replicas = 3;
        let all = objects(&ha);
        assert!(find(&all, "PersistentVolumeClaim").is_none());
        let d = find(&all, "Deployment").unwrap();
        assert_eq!(d["spec"]["replicas"], 3);
        assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate");
        let pod = &d["spec"]["template"]["spec"];
        let term = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            [0];
        assert_eq!(
            term["podAffinityTerm"]["topologyKey"],
            "kubernetes.io/hostname"
        );
        assert_eq!(
            term["podAffinityTerm"]["labelSelector"]["matchLabels"],
            selector_labels()
        );
        let c = &pod["containers"][0];
        assert_eq!(
            c["envFrom"],
            json!([{"secretRef": {"name": "aether-store"}}])
        );
        let env = c["env"].as_array().unwrap();
        assert!(
            env.iter()
                .any(|e| e["name"] == "AETHER_STORE" && e["value"] == "s3://releases/team")
        );
        // No AWS value in the Deployment itself.
        assert!(
            env.iter()
                .all(|e| !e["name"].as_str().unwrap().starts_with("AWS_"))
        );
        assert!(env.iter().any(|e| e["name"] == "POD_NAME"));
        let pdb = find(&all, "PodDisruptionBudget").unwrap();
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        assert_eq!(pdb["spec"]["selector"]["matchLabels"], selector_labels());

        // One replica: no budget (it would block every drain), no affinity.
        let single = objects(&spec(StoreVolume::EmptyDir));
        assert!(find(&single, "PodDisruptionBudget").is_none());
        let pod = &find(&single, "Deployment").unwrap()["spec"]["template"]["spec"];
        assert!(pod.get("affinity").is_none());
        assert!(pod["containers"][0].get("envFrom").is_none());
    }

    fn find<'a>(objects: &'a [Value], kind: &str) -> Option<&'a Value> {
        objects.iter().find(|o| o["kind"] == kind)
    }

    #[test]
    fn the_role_is_namespaced_and_names_every_verb_without_wildcards() {
        let objects = objects(&spec(StoreVolume::EmptyDir));
        assert!(find(&objects, "ClusterRole").is_none());
        let role = find(&objects, "Role").unwrap();
        for rule in role["rules"].as_array().unwrap() {
            for field in ["apiGroups", "resources", "verbs"] {
                assert!(
                    rule[field].as_array().unwrap().iter().all(|v| v != "*"),
                    "{rule}"
                );
            }
        }
        assert_eq!(role["metadata"]["namespace"], "aether");
    }

    #[test]
    fn the_token_comes_from_a_mounted_secret_never_from_plain_env() {
        let objects = objects(&spec(StoreVolume::EmptyDir));
        let d = find(&objects, "Deployment").unwrap();
        let pod = &d["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let env = c["env"].as_array().unwrap();
        assert!(env.iter().all(|e| e["name"] != "AETHER_API_TOKEN"));
        assert!(
            env.iter().any(|e| e["name"] == "AETHER_API_TOKEN_FILE"
                && e["value"] == "/etc/aether/api-token/token")
        );
        assert_eq!(
            pod["volumes"][1]["secret"]["secretName"],
            "aether-api-token"
        );
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    }

    #[test]
    fn the_store_is_a_claim_by_default_and_an_empty_dir_on_request() {
        let pvc = objects(&spec(StoreVolume::Pvc { size: "5Gi".into() }));
        let claim = find(&pvc, "PersistentVolumeClaim").unwrap();
        assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "5Gi");
        let d = find(&pvc, "Deployment").unwrap();
        assert_eq!(
            d["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "aether-store"
        );
        let empty = objects(&spec(StoreVolume::EmptyDir));
        assert!(find(&empty, "PersistentVolumeClaim").is_none());
    }

    #[test]
    fn the_public_url_defaults_to_the_service_dns_name() {
        let s = spec(StoreVolume::EmptyDir);
        assert_eq!(
            s.effective_public_url(),
            "http://aether.$(AETHER_NAMESPACE).svc:80"
        );
        let all = objects(&s);
        let env =
            &find(&all, "Deployment").unwrap()["spec"]["template"]["spec"]["containers"][0]["env"];
        let names: Vec<&str> = env
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        let at = |n: &str| names.iter().position(|x| *x == n).unwrap();
        assert!(
            at("AETHER_NAMESPACE") < at("AETHER_PUBLIC_URL"),
            "Kubernetes expands $(VAR) only from variables defined before"
        );
        let svc = find(&objects(&s), "Service").unwrap().clone();
        assert_eq!(svc["metadata"]["name"], NAME);
        assert_eq!(svc["spec"]["ports"][0]["port"], SERVICE_PORT);
    }

    #[test]
    fn an_existing_namespace_is_left_alone() {
        let mut s = spec(StoreVolume::EmptyDir);
        assert!(find(&objects(&s), "Namespace").is_some());
        s.create_namespace = false;
        assert!(find(&objects(&s), "Namespace").is_none());
    }

    #[test]
    fn the_control_plane_is_not_labelled_as_a_managed_app() {
        for o in objects(&spec(StoreVolume::EmptyDir)) {
            let labels = &o["metadata"]["labels"];
            assert!(labels.get(manifest::MANAGED_BY_LABEL).is_none(), "{o}");
        }
    }

    #[test]
    fn the_chosen_public_url_images_and_token_secret_are_the_ones_installed() {
        let s = InstallSpec {
            public_url: Some("https://aether.example.com".into()),
            token_secret: "team-token".into(),
            image: "registry.local/aether:1.2".into(),
            fetch_image: "registry.local/aether-fetcher:1.2".into(),
            ..spec(StoreVolume::EmptyDir)
        };
        let all = objects(&s);
        let pod = &find(&all, "Deployment").unwrap()["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let env = |name: &str| {
            c["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .map(|e| e["value"].clone())
        };
        assert_eq!(c["image"], "registry.local/aether:1.2");
        assert_eq!(
            env("AETHER_FETCH_IMAGE"),
            Some(json!("registry.local/aether-fetcher:1.2"))
        );
        assert_eq!(
            env("AETHER_PUBLIC_URL"),
            Some(json!("https://aether.example.com"))
        );
        let secrets: Vec<&Value> = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.get("secret"))
            .collect();
        assert_eq!(secrets.len(), 1);
        assert_eq!(secrets[0]["secretName"], "team-token");
    }
}
