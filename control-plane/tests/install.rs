//! `aether install` end to end: its output applied with the real `kubectl apply
//! --server-side` to the Kubernetes API emulator, every object checked, then the installed
//! control plane run as a real process with exactly the settings its Deployment gives it
//! (args, env, the mounted token Secret) deploying an app; and its Kubernetes requests
//! compared with the Role it was given.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use aether_common::kube::install::PERMISSIONS;
use aether_testkit::emulator::{Access, Emulator, PROXY_ADDRESS_ANNOTATION};
use aether_testkit::process::{Proc, free_port, http_get, wait_until};
use base64::Engine;
use serde_json::{Value, json};

const AETHER: &str = env!("CARGO_BIN_EXE_aether");
const NS: &str = "aether-test";
/// The name the installed control plane's pod would have.
const POD: &str = "aether-5d8f7c9b4-x2k7q";
const TOKEN: &str = "install-test-token-5f1e";
const LONG: Duration = Duration::from_secs(30);

fn aether(args: &[&str]) -> String {
    let out = Command::new(AETHER)
        .args(args)
        .output()
        .expect("run aether");
    assert!(
        out.status.success(),
        "aether {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 YAML")
}

/// Runs the real kubectl (a blocking process) off the runtime that serves the emulator.
async fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<String>) -> String {
    let kubeconfig = kubeconfig.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new("kubectl")
            .args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl is installed (apt-get install kubectl)");
        let mut input = child.stdin.take().expect("stdin");
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).expect("write stdin");
        }
        drop(input);
        let out = child.wait_with_output().expect("kubectl runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "kubectl {args:?} failed: {text}");
        text
    })
    .await
    .expect("kubectl task")
}

fn get(emu: &Emulator, plural: &str, name: &str) -> Value {
    let ns = (plural != "namespaces").then_some(NS);
    emu.get(plural, ns, name)
        .unwrap_or_else(|| panic!("{plural}/{name} was not applied"))
}

/// The env of a container as the kubelet would set it: values, the fieldRefs the install
/// uses (the pod's namespace and name), and `$(VAR)` references to variables defined
/// before expanded.
fn container_env(container: &Value) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let raw = container["env"].as_array().unwrap().iter().map(|e| {
        let name = e["name"].as_str().unwrap().to_owned();
        let value = match e.get("value") {
            Some(v) => v.as_str().unwrap().to_owned(),
            None => match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.namespace") => NS.to_owned(),
                Some("metadata.name") => POD.to_owned(),
                _ => panic!("unexpected valueFrom in {e}"),
            },
        };
        (name, value)
    });
    for (name, mut value) in raw {
        for (earlier, v) in &env {
            value = value.replace(&format!("$({earlier})"), v);
        }
        env.push((name, value));
    }
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_applies_with_real_kubectl_and_the_installed_control_plane_deploys_an_app() {
    let emu = Emulator::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = emu.write_kubeconfig(dir.path()).unwrap();

    // What the README tells a platform engineer to run.
    let install = aether(&["install", "-n", NS]);
    let applied = kubectl(
        &kubeconfig,
        &["apply", "--server-side", "-f", "-"],
        Some(install),
    )
    .await;
    for object in [
        "namespace/aether-test",
        "serviceaccount/aether",
        "role.rbac.authorization.k8s.io/aether",
        "rolebinding.rbac.authorization.k8s.io/aether",
        "persistentvolumeclaim/aether-store",
        "deployment.apps/aether",
        "service/aether",
    ] {
        assert!(
            applied.contains(&format!("{object} serverside-applied")),
            "{object}: {applied}"
        );
    }
    let monitoring = aether(&["install", "-n", NS, "--monitoring"]);
    let applied = kubectl(
        &kubeconfig,
        &["apply", "--server-side", "-f", "-"],
        Some(monitoring),
    )
    .await;
    assert!(
        applied.contains("podmonitor.monitoring.coreos.com/aether-fetchers serverside-applied")
    );
    assert!(applied.contains("prometheusrule.monitoring.coreos.com/aether serverside-applied"));
    // The token Secret, as the README creates it.
    let secret = kubectl(
        &kubeconfig,
        &[
            "-n",
            NS,
            "create",
            "secret",
            "generic",
            "aether-api-token",
            &format!("--from-literal=token={TOKEN}"),
            "--dry-run=client",
            "-o",
            "yaml",
        ],
        None,
    )
    .await;
    kubectl(
        &kubeconfig,
        &["apply", "--server-side", "-f", "-"],
        Some(secret),
    )
    .await;

    // Every object as applied.
    let namespace = get(&emu, "namespaces", NS);
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    let role = get(&emu, "roles", "aether");
    let rules = role["rules"].as_array().unwrap();
    assert_eq!(rules.len(), PERMISSIONS.len());
    let binding = get(&emu, "rolebindings", "aether");
    assert_eq!(binding["roleRef"]["name"], "aether");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "aether", "namespace": NS}])
    );
    get(&emu, "serviceaccounts", "aether");
    let claim = get(&emu, "persistentvolumeclaims", "aether-store");
    assert_eq!(claim["spec"]["accessModes"], json!(["ReadWriteOnce"]));
    let service = get(&emu, "services", "aether");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    let deployment = get(&emu, "deployments", "aether");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "aether");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let service_selector = service["spec"]["selector"].as_object().unwrap();
    for (k, v) in service_selector {
        assert_eq!(
            &pod_labels(&deployment)[k],
            v,
            "the Service selects the pod"
        );
    }

    // The control plane with the Deployment's settings: its args, its env, its volumes
    // mounted at temporary directories (the store, and the token Secret's files as the
    // kubelet writes them). The one difference from a pod: a kubeconfig for the emulator
    // instead of the in-cluster configuration, and a free port on this shared machine.
    let mounts = mount_volumes(&emu, pod, container, dir.path());
    let mut env: Vec<(String, String)> = container_env(container)
        .into_iter()
        .map(|(k, v)| (k, remap(&v, &mounts)))
        .collect();
    assert!(env.iter().all(|(k, _)| k != "AETHER_API_TOKEN"));
    let port = free_port();
    for (k, v) in &mut env {
        if k == "AETHER_LISTEN" {
            let (host, _) = v.rsplit_once(':').unwrap();
            *v = format!("{host}:{port}");
        }
    }
    env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    emu.reset_accesses();
    let server = Proc::spawn(AETHER, &args, &env).unwrap();
    server
        .wait_for_log("aether serve listening", LONG)
        .await
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let ready = wait_until(LONG, || async {
        http_get(&format!("{url}/readyz"))
            .await
            .is_ok_and(|(code, _)| code == 200)
    })
    .await;
    assert!(ready, "/readyz (the readiness probe) never answered 200");

    // The token from the mounted Secret is enforced.
    let unauthenticated = reqwest::Client::new()
        .get(format!("{url}/v1/apps/web/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);

    // An app deployed through the installed control plane.
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("index.html"), "hello").unwrap();
    let cli_env = [
        ("AETHER_API_URL", url.clone()),
        ("AETHER_API_TOKEN", TOKEN.to_owned()),
        (
            "XDG_CACHE_HOME",
            dir.path().join("cache").display().to_string(),
        ),
    ];
    let deploy_dev_hot = |app: &'static str| {
        let src = src.clone();
        let env = cli_env.clone();
        async move {
            let args = [
                "deploy",
                app,
                src.to_str().unwrap(),
                "--dev-hot",
                "--",
                "./run",
            ];
            let mut deploy = Proc::spawn(AETHER, &args, &env).unwrap();
            let status = deploy.wait_exit(LONG).await.expect("deploy exits");
            (status.success(), deploy.logs().join("\n"))
        }
    };
    let (ok, out) = deploy_dev_hot("web").await;
    assert!(ok, "{out}");
    let web = get(&emu, "deployments", "web");
    let artifact_url = web["metadata"]["annotations"]["aether.dev/artifact-url"]
        .as_str()
        .unwrap();
    assert!(
        artifact_url.starts_with("http://aether.aether-test.svc:80/v1/blobs/sha256:"),
        "the public URL defaults to the Service's DNS name: {artifact_url}"
    );
    let fetcher = &web["spec"]["template"]["spec"]["initContainers"][1];
    assert_eq!(fetcher["image"], "aether-fetcher:dev");

    // An app named like the control plane cannot take its Deployment over.
    let before = get(&emu, "deployments", "aether");
    let (ok, out) = deploy_dev_hot("aether").await;
    assert!(!ok, "{out}");
    assert!(out.contains("not managed by aether"), "{out}");
    assert_eq!(get(&emu, "deployments", "aether"), before, "untouched");
    assert!(
        emu.get("serviceaccounts", Some(NS), "aether-aether-fetcher")
            .is_none(),
        "nothing applied before the refusal"
    );

    // A pod of the app gets the release (reconcile: pods list, watch, patch), and status
    // reads its fetcher through pods/proxy.
    emu.create(
        "pods",
        Some(NS),
        json!({
            "metadata": {"name": "web-0", "labels": {"app.kubernetes.io/name": "web",
                "app.kubernetes.io/managed-by": "aether"},
                "annotations": {PROXY_ADDRESS_ANNOTATION: "127.0.0.1:9"}},
            "spec": {"containers": [{"name": "web", "image": "web"}]},
        }),
    )
    .unwrap();
    let annotated = wait_until(LONG, || async {
        emu.get("pods", Some(NS), "web-0")
            .and_then(|p| {
                p.pointer("/metadata/annotations/aether.dev~1digest")
                    .cloned()
            })
            .is_some()
    })
    .await;
    assert!(
        annotated,
        "the installed control plane annotates the app's pods"
    );
    let mut status = Proc::spawn(AETHER, &["status", "web", "-n", NS], &cli_env).unwrap();
    assert!(
        status
            .wait_exit(LONG)
            .await
            .expect("status exits")
            .success()
    );
    emu.append_log(NS, "web-0", "web", "hello from web-0");
    // The emulator's log subresource is the one the real kubectl reads.
    let via_kubectl = kubectl(&kubeconfig, &["logs", "-n", NS, "web-0", "-c", "web"], None).await;
    assert_eq!(via_kubectl.trim(), "hello from web-0");
    let mut logs = Proc::spawn(AETHER, &["logs", "web", "-n", NS], &cli_env).unwrap();
    let exit = logs.wait_exit(LONG).await.expect("logs exits");
    assert!(exit.success(), "{:?}", logs.logs());
    assert!(
        logs.logs().contains(&"[web-0] hello from web-0".to_owned()),
        "{:?}",
        logs.logs()
    );
    let release = reqwest::Client::new()
        .post(format!("{url}/v1/apps/web/release"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(
            json!({
                "digest": web["metadata"]["annotations"]["aether.dev/digest"],
                "url": artifact_url,
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(release.status(), 200, "{}", release.text().await.unwrap());

    // Least privilege, checked against what the control plane really asked for: every
    // request is allowed by the Role, and every permission of the Role was used, except
    // `get pods`, which only lets it create the fetchers' Role (RBAC refuses to grant
    // what the granter does not hold).
    // The leader renews its Lease every few seconds (an update): wait for the first.
    let renewed = wait_until(LONG, || async {
        emu.accesses()
            .iter()
            .any(|a| a.resource == "leases" && a.verb == "update")
    })
    .await;
    assert!(renewed, "the Lease was never renewed");
    let used: BTreeSet<Access> = emu.accesses().into_iter().collect();
    let granted: BTreeSet<Access> = PERMISSIONS
        .iter()
        .flat_map(|p| {
            p.verbs.iter().map(|v| Access {
                group: p.api_group.into(),
                resource: p.resource.into(),
                verb: (*v).into(),
            })
        })
        .collect();
    let denied: Vec<_> = used.difference(&granted).collect();
    assert!(denied.is_empty(), "requests outside the Role: {denied:?}");
    let unused: Vec<_> = granted
        .difference(&used)
        .filter(|a| !(a.resource == "pods" && a.verb == "get"))
        .collect();
    assert!(unused.is_empty(), "permissions never used: {unused:?}");
}

fn pod_labels(deployment: &Value) -> serde_json::Map<String, Value> {
    deployment["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap()
        .clone()
}

/// Creates a directory for each volume mount of the container, filled as the kubelet
/// would (a Secret's items decoded into files); returns (mountPath, directory) pairs.
fn mount_volumes(
    emu: &Emulator,
    pod: &Value,
    container: &Value,
    root: &Path,
) -> Vec<(String, PathBuf)> {
    let volumes = pod["volumes"].as_array().unwrap();
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"].as_array().unwrap() {
        let name = mount["name"].as_str().unwrap();
        let path = mount["mountPath"].as_str().unwrap();
        let local = root.join("volumes").join(name);
        std::fs::create_dir_all(&local).unwrap();
        let volume = volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name} is mounted but not declared"));
        if let Some(secret) = volume.get("secret") {
            let stored = get(emu, "secrets", secret["secretName"].as_str().unwrap());
            for item in secret["items"].as_array().unwrap() {
                let data = stored["data"][item["key"].as_str().unwrap()]
                    .as_str()
                    .expect("the Secret has the item's key");
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .unwrap();
                std::fs::write(local.join(item["path"].as_str().unwrap()), bytes).unwrap();
            }
        }
        mounts.push((path.to_owned(), local));
    }
    mounts
}

/// A setting naming a path under a mount, moved to where that mount is here.
fn remap(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (path, local) in mounts {
        if let Some(rest) = value.strip_prefix(path.as_str()) {
            return format!("{}{rest}", local.display());
        }
    }
    value.to_owned()
}

#[test]
fn deploy_directory_is_exactly_what_aether_install_prints() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/gen-deploy.sh"))
        .arg("--check")
        .env("AETHER_BIN", AETHER)
        .output()
        .expect("run scripts/gen-deploy.sh");
    assert!(
        out.status.success(),
        "deploy/ is stale; run scripts/gen-deploy.sh\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn install_refuses_a_namespace_that_is_not_a_dns_label() {
    let out = Command::new(AETHER)
        .args(["install", "-n", "Team_A"])
        .output()
        .expect("run aether");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing half-printed for kubectl");
    assert!(String::from_utf8_lossy(&out.stderr).contains("namespace"));
}
