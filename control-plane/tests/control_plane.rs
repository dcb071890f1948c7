//! End-to-end tests of `aether serve` and the CLI, spawned as real processes against the
//! Kubernetes API emulator, with a real `aether-fetcher` for the hot-reload loop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aether_common::SigningKey;
use aether_testkit::emulator::{Emulator, PROXY_ADDRESS_ANNOTATION};
use aether_testkit::process::{Proc, free_port, wait_until};
use serde_json::{Value, json};

const AETHER: &str = env!("CARGO_BIN_EXE_aether");
const TOKEN: &str = "test-token-1234";
const LONG: Duration = Duration::from_secs(30);

fn fetcher_bin() -> PathBuf {
    aether_testkit::process::workspace_bin(AETHER, "aether-fetcher")
}

struct Plane {
    emu: Emulator,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    server: Proc,
    url: String,
    /// Creates and patches the API server had seen once the server was up (its Lease).
    writes_at_start: u64,
}

impl Plane {
    async fn start(extra: &[(&'static str, String)]) -> Self {
        let emu = Emulator::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = emu.write_kubeconfig(dir.path()).unwrap();
        let port = free_port();
        let mut env = vec![
            ("KUBECONFIG", kubeconfig.display().to_string()),
            ("AETHER_LISTEN", format!("127.0.0.1:{port}")),
            (
                "AETHER_DATA_DIR",
                dir.path().join("data").display().to_string(),
            ),
            ("AETHER_API_TOKEN", TOKEN.into()),
            ("AETHER_FETCH_IMAGE", "aether-fetcher:test".into()),
        ];
        env.extend(extra.iter().cloned());
        let server = Proc::spawn(AETHER, &["serve"], &env).unwrap();
        server
            .wait_for_log("aether serve listening", LONG)
            .await
            .unwrap();
        // The only replica creates the Lease and runs the reconcile loop.
        server
            .wait_for_log("acquired the lease", LONG)
            .await
            .unwrap();
        let writes_at_start = emu.stats().create + emu.stats().patch;
        Self {
            emu,
            dir,
            kubeconfig,
            server,
            url: format!("http://127.0.0.1:{port}"),
            writes_at_start,
        }
    }

    /// Objects the server created or patched since it started (Lease renewals are
    /// updates, not counted).
    fn writes(&self) -> u64 {
        self.emu.stats().create + self.emu.stats().patch - self.writes_at_start
    }

    fn cli(&self, args: &[&str], extra: &[(&'static str, String)]) -> Proc {
        let mut env = vec![
            ("AETHER_API_URL", self.url.clone()),
            ("AETHER_API_TOKEN", TOKEN.to_owned()),
            // The CLI's hash cache stays with the test's files.
            (
                "XDG_CACHE_HOME",
                self.dir.path().join("cache").display().to_string(),
            ),
        ];
        env.extend(extra.iter().cloned());
        Proc::spawn(AETHER, args, &env).unwrap()
    }

    async fn run(&self, args: &[&str], extra: &[(&'static str, String)]) -> (bool, String) {
        let mut p = self.cli(args, extra);
        let status = p.wait_exit(LONG).await.expect("cli exits");
        (status.success(), p.logs().join("\n"))
    }

    /// `aether deploy APP SRC --dev-hot -- ./run` through the CLI, which must succeed.
    async fn deploy_dev_hot(&self, app: &str, src: &Path) {
        let (ok, out) = self
            .run(
                &[
                    "deploy",
                    app,
                    src.to_str().unwrap(),
                    "--dev-hot",
                    "--",
                    "./run",
                ],
                &[],
            )
            .await;
        assert!(ok, "{out}");
    }

    fn source(&self, files: &[(&str, &str)]) -> PathBuf {
        let src = self.dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        for (name, content) in files {
            std::fs::write(src.join(name), content).unwrap();
        }
        src
    }

    fn pod(&self, name: &str, app: &str) {
        self.emu
            .create("pods", Some("default"), json!({
                "metadata": {"name": name, "labels": {"app.kubernetes.io/name": app, "app.kubernetes.io/managed-by": "aether"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            }))
            .unwrap();
    }

    /// A real fetcher process for pod `pod` of `app` (which must exist), serving its
    /// status on `port`, with its own workspace; `extra` env overrides.
    fn hot_fetcher(
        &self,
        app: &str,
        pod: &str,
        port: u16,
        extra: &[(&'static str, String)],
    ) -> (Proc, PathBuf) {
        let workspace = self.dir.path().join(format!("workspace-{pod}"));
        std::fs::create_dir_all(&workspace).unwrap();
        let mut env = vec![
            ("KUBECONFIG", self.kubeconfig.display().to_string()),
            ("POD_NAME", pod.into()),
            ("AETHER_APP", app.into()),
            ("POD_NAMESPACE", "default".into()),
            ("AETHER_WORKSPACE", workspace.display().to_string()),
            ("AETHER_HTTP_ADDR", format!("127.0.0.1:{port}")),
            ("AETHER_ALLOW_HTTP", "1".into()),
            ("AETHER_MIN_REFRESH_INTERVAL_MS", "100".into()),
        ];
        env.extend(extra.iter().cloned());
        (Proc::spawn(fetcher_bin(), &[], &env).unwrap(), workspace)
    }

    /// Pod `pod` of `app` in the emulator, reached through the pod proxy at `port`.
    fn proxied_pod(&self, app: &str, pod: &str, port: u16) {
        self.pod(pod, app);
        self.emu
            .merge_patch("pods", Some("default"), pod, &json!({"metadata": {"annotations": {PROXY_ADDRESS_ANNOTATION: format!("127.0.0.1:{port}")}}}))
            .unwrap();
    }

    fn annotation(&self, kind: &str, name: &str, key: &str) -> Option<String> {
        self.emu
            .get(kind, Some("default"), name)?
            .pointer("/metadata/annotations")?
            .get(key)?
            .as_str()
            .map(str::to_owned)
    }
}

async fn http(method: &str, url: &str, token: Option<&str>, body: Vec<u8>) -> (u16, String) {
    aether_testkit::process::install_crypto();
    let client = reqwest::Client::new();
    let mut r = client.request(method.parse().unwrap(), url).body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if method == "POST" {
        r = r.header("content-type", "application/json");
    }
    let resp = r.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_with_dev_hot_creates_the_sidecar_deployment_and_least_privilege_rbac() {
    let plane = Plane::start(&[]).await;
    let src = plane.source(&[("app.sh", "echo hi")]);
    let (ok, out) = plane
        .run(
            &[
                "deploy",
                "web",
                src.to_str().unwrap(),
                "--dev-hot",
                "--image",
                "web:1",
                "--",
                "./app.sh",
            ],
            &[],
        )
        .await;
    assert!(ok, "{out}");
    let d = plane
        .emu
        .get("deployments", Some("default"), "web")
        .expect("deployment");
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(
        pod["initContainers"][0]["args"],
        json!(["install", "/aether/bin"])
    );
    let sidecar = &pod["initContainers"][1];
    assert_eq!(sidecar["image"], "aether-fetcher:test");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        sidecar["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert!(
        sidecar["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "AETHER_ALLOW_HTTP"),
        "plain-http store needs the opt-in"
    );
    assert_eq!(
        pod["containers"][0]["command"],
        json!(["/aether/bin/aether-fetcher", "supervise", "--", "./app.sh"])
    );
    assert_eq!(pod["containers"][0]["workingDir"], "/workspace/current");
    assert_eq!(pod["serviceAccountName"], "web-aether-fetcher");
    assert_eq!(d["metadata"]["annotations"]["aether.dev/dev-hot"], "true");
    let digest = d["metadata"]["annotations"]["aether.dev/digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        d["spec"]["template"]["metadata"]["annotations"]
            .get("aether.dev/digest")
            .is_none()
    );
    let role = plane
        .emu
        .get("roles", Some("default"), "web-aether-fetcher")
        .expect("role");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
    );
    let binding = plane
        .emu
        .get("rolebindings", Some("default"), "web-aether-fetcher")
        .expect("binding");
    assert_eq!(binding["subjects"][0]["name"], "web-aether-fetcher");
    assert!(
        plane
            .emu
            .get("serviceaccounts", Some("default"), "web-aether-fetcher")
            .is_some()
    );
    // The artifact is downloadable from the store, with its digest as ETag.
    let url = d["metadata"]["annotations"]["aether.dev/artifact-url"]
        .as_str()
        .unwrap();
    let (code, _) = http("GET", url, None, vec![]).await;
    assert_eq!(code, 200);
    assert!(url.ends_with(&digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_without_dev_hot_runs_the_fetcher_once_as_an_init_container() {
    let plane = Plane::start(&[]).await;
    let src = plane.source(&[("index.html", "x")]);
    let (ok, out) = plane
        .run(
            &["deploy", "site", src.to_str().unwrap(), "--image", "site:1"],
            &[],
        )
        .await;
    assert!(ok, "{out}");
    let d = plane
        .emu
        .get("deployments", Some("default"), "site")
        .unwrap();
    let init = &d["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(init["args"], json!(["--once"]));
    assert!(init.get("restartPolicy").is_none());
    assert!(d["spec"]["template"]["metadata"]["annotations"]["aether.dev/digest"].is_string());
    assert!(
        plane
            .emu
            .get("roles", Some("default"), "site-aether-fetcher")
            .is_none(),
        "no RBAC without dev-hot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_patch_annotates_pods_and_deployment_and_never_touches_the_template() {
    let plane = Plane::start(&[]).await;
    let src = plane.source(&[("f", "1")]);
    plane.deploy_dev_hot("app", &src).await;
    plane.pod("app-a", "app");
    plane.pod("app-b", "app");
    plane.pod("other-0", "other");
    let before = plane
        .emu
        .get("deployments", Some("default"), "app")
        .unwrap();
    // Upload a new artifact and release it.
    let bytes = aether_common::archive::pack::pack_dir(
        &src,
        Vec::new(),
        flate2::Compression::fast(),
        &|_| false,
    )
    .unwrap();
    let _ = bytes;
    std::fs::write(src.join("f"), "2").unwrap();
    let packed = {
        let b = aether_common::archive::pack::pack_dir(
            &src,
            Vec::new(),
            flate2::Compression::fast(),
            &|_| false,
        )
        .unwrap();
        (aether_common::Digest::of(&b), b)
    };
    let (code, body) = http(
        "PUT",
        &format!("{}/v1/artifacts/{}", plane.url, packed.0),
        Some(TOKEN),
        packed.1,
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = http(
        "POST",
        &format!("{}/v1/apps/app/release", plane.url),
        Some(TOKEN),
        json!({"digest": packed.0.to_string()})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let resp: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(resp["pods_patched"], 2);
    let want = packed.0.to_string();
    for pod in ["app-a", "app-b"] {
        assert_eq!(
            plane
                .annotation("pods", pod, "aether.dev/digest")
                .as_deref(),
            Some(want.as_str())
        );
    }
    assert_eq!(
        plane.annotation("pods", "other-0", "aether.dev/digest"),
        None
    );
    let after = plane
        .emu
        .get("deployments", Some("default"), "app")
        .unwrap();
    assert_eq!(
        after["metadata"]["annotations"]["aether.dev/digest"],
        want.as_str()
    );
    assert_eq!(
        after["spec"]["template"], before["spec"]["template"],
        "no rollout"
    );
    assert_eq!(
        after["metadata"]["generation"],
        before["metadata"]["generation"]
    );
    let (_, metrics) = http("GET", &format!("{}/metrics", plane.url), None, vec![]).await;
    assert!(metrics.contains("aether_patches_total 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_pods_and_kubectl_annotate_deployment_get_the_desired_annotations() {
    let plane = Plane::start(&[]).await;
    let src = plane.source(&[("f", "1")]);
    plane.deploy_dev_hot("app", &src).await;
    let desired = plane
        .annotation("deployments", "app", "aether.dev/digest")
        .unwrap();
    let t = std::time::Instant::now();
    plane.pod("app-late", "app");
    // How fast is a benchmark's question (scripts/bench-fanout.sh); here only that it happens.
    let ok = wait_until(LONG, || async {
        plane
            .annotation("pods", "app-late", "aether.dev/digest")
            .as_deref()
            == Some(desired.as_str())
    })
    .await;
    assert!(
        ok,
        "a new pod never got the desired annotations (waited {:?})",
        t.elapsed()
    );

    let other = format!("sha256:{}", "ab".repeat(32));
    let out = tokio::process::Command::new("kubectl")
        .args([
            "--server",
            &plane.emu.url(),
            "-n",
            "default",
            "annotate",
            "deployment",
            "app",
            "--overwrite",
        ])
        .arg(format!("aether.dev/digest={other}"))
        .env("KUBECONFIG", "/dev/null")
        .env("HOME", plane.dir.path())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = wait_until(LONG, || async {
        plane
            .annotation("pods", "app-late", "aether.dev/digest")
            .as_deref()
            == Some(other.as_str())
    })
    .await;
    assert!(ok, "kubectl annotate deployment propagates to pods");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pod_patch_is_retried_with_backoff_until_it_lands() {
    let plane = Plane::start(&[]).await;
    let src = plane.source(&[("f", "1")]);
    plane.deploy_dev_hot("app", &src).await;
    let desired = plane
        .annotation("deployments", "app", "aether.dev/digest")
        .unwrap();
    // The API server refuses the next three pod patches; nothing else will change, so
    // only the reconciler's own retries can annotate the pod.
    plane.emu.fail_patches("pods", 3);
    plane.pod("app-0", "app");
    let annotated = wait_until(LONG, || async {
        plane
            .annotation("pods", "app-0", "aether.dev/digest")
            .as_deref()
            == Some(desired.as_str())
    })
    .await;
    assert!(annotated, "the pod was never annotated");
    assert_eq!(
        plane.emu.patch_failures_left("pods"),
        0,
        "the annotation came after the injected failures"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_never_puts_an_older_release_back_on_a_pod() {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::{WatchStreamExt, watcher};
    let plane = Plane::start(&[("RUST_LOG", "info,aether::reconcile=debug".into())]).await;
    let src = plane.source(&[("f", "1")]);
    plane.deploy_dev_hot("app", &src).await;
    let first = plane
        .annotation("deployments", "app", "aether.dev/digest")
        .unwrap();
    // Every value the pod's digest takes, in order, from a watch opened before it exists.
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&plane.kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let pods: kube::Api<Pod> =
        kube::Api::namespaced(kube::Client::try_from(config).unwrap(), "default");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let recorder = {
        let seen = seen.clone();
        let cfg = watcher::Config::default().fields("metadata.name=app-0");
        tokio::spawn(async move {
            let mut events = watcher(pods, cfg).applied_objects().boxed();
            while let Some(Ok(pod)) = events.next().await {
                let digest = pod
                    .metadata
                    .annotations
                    .and_then(|a| a.get("aether.dev/digest").cloned());
                if let Some(d) = digest {
                    let mut seen = seen.lock().unwrap();
                    if seen.last() != Some(&d) {
                        seen.push(d);
                    }
                }
            }
        })
    };
    // The reconciler's patch of the new pod is parked after it read the pods and the
    // Deployment: it carries `first`.
    plane.emu.hold_patches("pods");
    plane.pod("app-0", "app");
    let parked = wait_until(LONG, || async { plane.emu.held_patches() >= 1 }).await;
    assert!(parked, "the reconciler never patched the new pod");
    // A newer release lands meanwhile, in the release route's order: Deployment, then pods.
    let newer = format!("sha256:{}", "cd".repeat(32));
    let annotate = json!({"metadata": {"annotations": {"aether.dev/digest": newer}}});
    plane
        .emu
        .merge_patch("deployments", Some("default"), "app", &annotate)
        .unwrap();
    plane
        .emu
        .merge_patch("pods", Some("default"), "app-0", &annotate)
        .unwrap();
    let conflicts = plane.emu.conflicts();
    let decided = plane
        .server
        .lines_with("every pod carries the desired release")
        .len();
    plane.emu.release_patches();
    // The parked patch names the pod's resourceVersion from before the release: refused.
    let refused = wait_until(LONG, || async { plane.emu.conflicts() > conflicts }).await;
    assert!(refused, "the stale patch was applied");
    // Reconciles after it read everything again and find nothing to change.
    plane
        .server
        .wait_for_lines("every pod carries the desired release", decided + 1, LONG)
        .await
        .unwrap();
    assert_eq!(
        plane
            .annotation("pods", "app-0", "aether.dev/digest")
            .as_deref(),
        Some(newer.as_str())
    );
    let seen = seen.lock().unwrap().clone();
    recorder.abort();
    assert!(
        !seen
            .iter()
            .skip_while(|d| **d != newer)
            .any(|d| *d == first),
        "the older release came back: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_token_are_refused_and_a_wrong_digest_stores_nothing() {
    let plane = Plane::start(&[]).await;
    let digest = aether_common::Digest::of(b"payload");
    let url = format!("{}/v1/artifacts/{digest}", plane.url);
    let (code, _) = http("PUT", &url, None, b"payload".to_vec()).await;
    assert_eq!(code, 401);
    let (code, _) = http("PUT", &url, Some("wrong-token"), b"payload".to_vec()).await;
    assert_eq!(code, 401);
    let (code, body) = http("PUT", &url, Some(TOKEN), b"other bytes".to_vec()).await;
    assert_eq!(code, 400, "{body}");
    let stored: Vec<_> = std::fs::read_dir(plane.dir.path().join("data/sha256"))
        .unwrap()
        .collect();
    assert!(stored.is_empty(), "a mismatch stores nothing");
    assert_eq!(
        std::fs::read_dir(plane.dir.path().join("data/tmp"))
            .unwrap()
            .count(),
        0
    );
    let (code, _) = http("PUT", &url, Some(TOKEN), b"payload".to_vec()).await;
    assert_eq!(code, 201);
    let (code, _) = http("PUT", &url, Some(TOKEN), b"payload".to_vec()).await;
    assert_eq!(code, 200, "re-upload of a known digest is a no-op");
    let (code, body) = http("GET", &url, None, vec![]).await;
    assert_eq!((code, body.as_str()), (200, "payload"));
    let (code, _) = http(
        "GET",
        &format!("{}/v1/apps/x/status", plane.url),
        None,
        vec![],
    )
    .await;
    assert_eq!(code, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_public_listener_without_a_token() {
    let mut p = Proc::spawn(
        AETHER,
        &["serve"],
        &[
            ("AETHER_LISTEN", "0.0.0.0:0".into()),
            ("KUBECONFIG", "/nonexistent".into()),
        ],
    )
    .unwrap();
    let status = p.wait_exit(LONG).await.unwrap();
    assert!(!status.success());
    assert!(p.logs().join("\n").contains("without AETHER_API_TOKEN"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_required_signatures_unsigned_and_badly_signed_releases_are_refused() {
    let key = SigningKey::from_seed([3; 32]);
    let plane = Plane::start(&[
        ("AETHER_REQUIRE_SIGNATURE", "1".into()),
        ("AETHER_PUBKEY", key.public_key().hex()),
    ])
    .await;
    let src = plane.source(&[("f", "1")]);
    let (ok, out) = plane
        .run(
            &[
                "deploy",
                "app",
                src.to_str().unwrap(),
                "--dev-hot",
                "--",
                "./run",
            ],
            &[],
        )
        .await;
    assert!(!ok && out.contains("signature"), "{out}");
    let bad = SigningKey::from_seed([4; 32]).seed_hex();
    let (ok, out) = plane
        .run(
            &[
                "deploy",
                "app",
                src.to_str().unwrap(),
                "--dev-hot",
                "--",
                "./run",
            ],
            &[("AETHER_SIGNING_KEY", bad)],
        )
        .await;
    assert!(!ok && out.contains("signature refused"), "{out}");
    let (ok, out) = plane
        .run(
            &[
                "deploy",
                "app",
                src.to_str().unwrap(),
                "--dev-hot",
                "--",
                "./run",
            ],
            &[("AETHER_SIGNING_KEY", key.seed_hex())],
        )
        .await;
    assert!(ok, "{out}");
    let d = plane
        .emu
        .get("deployments", Some("default"), "app")
        .unwrap();
    assert!(d["metadata"]["annotations"]["aether.dev/signature"].is_string());
    let env = d["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "aether-fetcher")
        .expect("fetcher sidecar")["env"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        env.iter()
            .any(|e| e["name"] == "AETHER_PUBKEY" && e["value"] == key.public_key().hex())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_hot_puts_an_edit_live_in_the_pod_and_prints_a_plausible_latency() {
    let plane = Plane::start(&[]).await;
    let src = plane.source(&[("index.html", "version one"), ("a.js", "a"), ("b.js", "b")]);
    plane.deploy_dev_hot("web", &src).await;
    // The "pod": an emulated Pod object plus a real fetcher process watching it.
    let port = free_port();
    plane.proxied_pod("web", "web-0", port);
    let (_fetcher, workspace) = plane.hot_fetcher("web", "web-0", port, &[]);
    let read = |f: &str| std::fs::read_to_string(workspace.join("current").join(f)).ok();
    assert!(
        wait_until(LONG, || async {
            read("index.html").as_deref() == Some("version one")
        })
        .await,
        "first release live via the reconcile loop"
    );

    let dev = plane.cli(
        &["dev", "--hot", "web", src.to_str().unwrap()],
        &[("RUST_LOG", "info,aether::client=debug".into())],
    );
    // The watch is set up before the first release, so an edit after its line is seen.
    dev.wait_for_lines("live sha256:", 1, LONG).await.unwrap();
    std::fs::write(src.join("index.html"), "version two").unwrap();
    let line = dev.wait_for_lines("live sha256:", 2, LONG).await.unwrap();
    assert_eq!(read("index.html").as_deref(), Some("version two"));
    // The first save asks the store about its three blobs and the manifest; the next, only
    // about what the loop does not already know to be stored: the edit and its manifest.
    let asked: Vec<String> = dev
        .lines_with("which blobs it lacks")
        .iter()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("asked=")))
        .map(str::to_owned)
        .collect();
    // (A loaded machine may split the write into two saves: each asks about two.)
    assert!(
        asked.len() >= 2 && asked[0] == "asked=4" && asked[1..].iter().all(|a| a == "asked=2"),
        "{:?}",
        dev.lines_with("lacks")
    );
    assert!(line.contains("on 1/1 pods"), "{line}");
    let ms: u64 = line
        .split(" in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("latency in the line");
    assert!(ms > 0 && ms < 10_000, "implausible latency {ms} ms: {line}");
    let (ok, status) = plane.run(&["status", "web", "-o", "json"], &[]).await;
    assert!(ok, "{status}");
    let json_text = status
        .lines()
        .skip_while(|l| !l.starts_with('{'))
        .collect::<Vec<_>>()
        .join("\n");
    let s: Value = serde_json::from_str(&json_text).unwrap_or_else(|e| panic!("{e}: {status}"));
    assert_eq!(s["pods"][0]["live_digest"], s["desired_digest"]);
}

/// The JSON events `aether dev -o json` printed.
fn events(p: &Proc) -> Vec<Value> {
    p.logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("event").is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_once_exits_0_when_every_pod_runs_the_tree_and_1_with_the_refusal() {
    let plane = Plane::start(&[]).await;
    let src = plane.source(&[("index.html", "version one")]);
    plane.deploy_dev_hot("web", &src).await;
    let port = free_port();
    plane.proxied_pod("web", "web-0", port);
    // A small extraction limit lets a large file be refused for good (`too_large`).
    let (_fetcher, workspace) = plane.hot_fetcher(
        "web",
        "web-0",
        port,
        &[("AETHER_MAX_EXTRACT_BYTES", "4096".into())],
    );
    let read = |f: &str| std::fs::read_to_string(workspace.join("current").join(f)).ok();
    // `status -w` prints one line per change: first the state before the save.
    let watch = plane.cli(&["status", "web", "-w", "-o", "json"], &[]);
    watch.wait_for_lines("\"pods\"", 1, LONG).await.unwrap();
    std::fs::write(src.join("index.html"), "version two").unwrap();
    let dir = src.to_str().unwrap();
    let mut once = plane.cli(&["dev", "--hot", "web", dir, "--once", "-o", "json"], &[]);
    let status = once.wait_exit(LONG).await.unwrap();
    assert!(status.success(), "{:?}", once.logs());
    assert_eq!(
        read("index.html").as_deref(),
        Some("version two"),
        "live when it exits"
    );
    let ev = events(&once);
    let release = ev
        .iter()
        .find(|e| e["event"] == "release")
        .expect("release event");
    let digest = release["digest"].as_str().unwrap();
    let live = ev
        .iter()
        .find(|e| e["event"] == "live")
        .expect("live event");
    assert_eq!(live["pod"], "web-0");
    assert_eq!(live["digest"], digest);
    assert!(live["latency_ms"].as_u64().is_some(), "{live}");
    let settled = ev
        .iter()
        .find(|e| e["event"] == "settled")
        .expect("settled");
    assert_eq!(
        (settled["live"].as_u64(), settled["total"].as_u64()),
        (Some(1), Some(1))
    );
    let seen = watch
        .wait_for_log(&format!("\"live_digest\":\"{digest}\""), LONG)
        .await
        .unwrap();
    let seen: Value = serde_json::from_str(&seen).unwrap();
    assert_eq!(seen["desired_digest"], digest, "{seen}");
    let lines = watch.lines_with("\"pods\"");
    assert!(
        lines.windows(2).all(|w| w[0] != w[1]),
        "only changes are printed: {lines:?}"
    );

    std::fs::write(src.join("big.bin"), "x".repeat(10_000)).unwrap();
    let mut refused = plane.cli(&["dev", "--hot", "web", dir, "--once", "-o", "json"], &[]);
    let status = refused.wait_exit(LONG).await.unwrap();
    assert_eq!(status.code(), Some(1), "{:?}", refused.logs());
    let ev = events(&refused);
    let r = ev
        .iter()
        .find(|e| e["event"] == "refused")
        .expect("refused event");
    assert_eq!(
        (r["pod"].as_str(), r["reason"].as_str()),
        (Some("web-0"), Some("too_large"))
    );
    assert!(
        refused
            .logs()
            .iter()
            .any(|l| l.starts_with("aether: ") && l.contains("too_large"))
    );
    assert_eq!(
        read("index.html").as_deref(),
        Some("version two"),
        "the live release stays"
    );

    // The loop with --exit-on-failure ends at the same refusal (text output).
    let mut looped = plane.cli(&["dev", "--hot", "web", dir, "--exit-on-failure"], &[]);
    let status = looped.wait_exit(LONG).await.unwrap();
    assert_eq!(status.code(), Some(1), "{:?}", looped.logs());
    assert!(
        !looped.lines_with("pod web-0: refused").is_empty(),
        "{:?}",
        looped.logs()
    );
    assert!(!looped.lines_with("--exit-on-failure").is_empty());
}

/// Uploads `bytes` and returns its digest.
async fn upload(plane: &Plane, bytes: &[u8]) -> aether_common::Digest {
    let digest = aether_common::Digest::of(bytes);
    let (code, body) = http(
        "PUT",
        &format!("{}/v1/artifacts/{digest}", plane.url),
        Some(TOKEN),
        bytes.to_vec(),
    )
    .await;
    assert!(code == 201 || code == 200, "{code} {body}");
    digest
}

async fn post(plane: &Plane, path: &str, body: &Value) -> (u16, String) {
    http(
        "POST",
        &format!("{}{path}", plane.url),
        Some(TOKEN),
        body.to_string().into_bytes(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_app_names_missing_and_plain_apps_get_the_right_status_and_nothing_applied() {
    let plane = Plane::start(&[]).await;
    let digest = upload(&plane, b"release").await;
    let release = json!({"digest": digest.to_string()});
    let deploy = json!({"image": "i", "command": ["./run"], "dev_hot": true, "release": release});
    for bad in ["Web", "-web", "web_1", &"a".repeat(48)] {
        let (code, body) = post(&plane, &format!("/v1/apps/{bad}/deploy"), &deploy).await;
        assert_eq!(code, 422, "{bad}: {body}");
        assert!(body.contains("DNS-1123"), "{body}");
        assert!(plane.emu.get("deployments", Some("default"), bad).is_none());
        let (code, _) = post(&plane, &format!("/v1/apps/{bad}/release"), &release).await;
        assert_eq!(code, 422, "{bad}");
    }
    assert_eq!(plane.writes(), 0);
    // The API server's own answers, with its message: 404 for an app that does not exist,
    let (code, body) = post(&plane, "/v1/apps/ghost/release", &release).await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("ghost"), "{body}");
    // 409 for a hot release of an app deployed without dev-hot.
    let plain = json!({"image": "i", "release": release});
    let (code, body) = post(&plane, "/v1/apps/plain/deploy", &plain).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = post(&plane, "/v1/apps/plain/release", &release).await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("not a dev-hot deployment"), "{body}");
    // A dev-hot deploy without a command would never run a later release.
    let no_cmd = json!({"image": "i", "dev_hot": true, "release": release});
    let (code, body) = post(&plane, "/v1/apps/nocmd/deploy", &no_cmd).await;
    assert_eq!(code, 422, "{body}");
    assert!(
        plane
            .emu
            .get("deployments", Some("default"), "nocmd")
            .is_none()
    );
    // A digest that is not in the store and has no URL.
    let unknown = json!({"digest": aether_common::Digest::of(b"nowhere").to_string()});
    let (code, _) = post(&plane, "/v1/apps/plain/release", &unknown).await;
    assert_eq!(code, 422);
    // JSON bodies are capped at 1 MiB; artifact uploads are not.
    let mut huge = release.clone();
    huge["build_commit"] = json!("x".repeat(2 << 20));
    let (code, _) = post(&plane, "/v1/apps/plain/release", &huge).await;
    assert_eq!(code, 413);
    upload(&plane, &vec![7u8; 3 << 20]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_allows_plain_http_artifacts_and_any_applicable_key_is_enforced() {
    let key = SigningKey::from_seed([5; 32]);
    let plane = Plane::start(&[
        ("AETHER_PUBLIC_URL", "https://aether.example.test".into()),
        (
            "AETHER_APP_KEYS",
            format!("signed={}", key.public_key().hex()),
        ),
    ])
    .await;
    let digest = upload(&plane, b"bytes").await;
    let url = format!("{}/v1/artifacts/{digest}", plane.url);
    // A client naming an http:// URL does not turn plain http on.
    let deploy = json!({"image": "i", "command": ["./run"], "dev_hot": true,
        "release": {"digest": digest.to_string(), "url": url}});
    let (code, body) = post(&plane, "/v1/apps/web/deploy", &deploy).await;
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("https"), "{body}");
    assert!(
        plane
            .emu
            .get("deployments", Some("default"), "web")
            .is_none()
    );
    // The store's own https URL is fine, and the fetchers are not told to allow http.
    let deploy = json!({"image": "i", "command": ["./run"], "dev_hot": true,
        "release": {"digest": digest.to_string()}});
    let (code, body) = post(&plane, "/v1/apps/web/deploy", &deploy).await;
    assert_eq!(code, 200, "{body}");
    let d = plane
        .emu
        .get("deployments", Some("default"), "web")
        .unwrap();
    let text = d.to_string();
    assert!(!text.contains("AETHER_ALLOW_HTTP"), "{text}");
    assert!(
        text.contains("https://aether.example.test/v1/artifacts/"),
        "{text}"
    );
    // A per-app key applies without --require-signature: unsigned and badly signed
    // releases of that app are refused, a good signature passes.
    let (code, body) = post(&plane, "/v1/apps/signed/deploy", &deploy).await;
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("signature"), "{body}");
    let mut signed = deploy.clone();
    signed["release"]["signature"] = json!(SigningKey::from_seed([6; 32]).sign(&digest).hex());
    let (code, body) = post(&plane, "/v1/apps/signed/deploy", &signed).await;
    assert_eq!(code, 422, "{body}");
    signed["release"]["signature"] = json!(key.sign(&digest).hex());
    let (code, body) = post(&plane, "/v1/apps/signed/deploy", &signed).await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_public_listener_without_a_reachable_public_url() {
    for (public_url, expect) in [
        (None, "needs --public-url"),
        (Some("ftp://x"), "must be an http:// or https:// base URL"),
        (
            Some("https://u:p@x"),
            "must be an http:// or https:// base URL",
        ),
    ] {
        let mut env = vec![
            ("AETHER_LISTEN", "0.0.0.0:0".to_owned()),
            ("AETHER_API_TOKEN", TOKEN.to_owned()),
            ("KUBECONFIG", "/nonexistent".to_owned()),
        ];
        if let Some(u) = public_url {
            env.push(("AETHER_PUBLIC_URL", u.to_owned()));
        }
        let mut p = Proc::spawn(AETHER, &["serve"], &env).unwrap();
        let status = p.wait_exit(LONG).await.unwrap();
        assert!(!status.success());
        let logs = p.logs().join("\n");
        assert!(logs.contains(expect), "{public_url:?}: {logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_dev_hot_without_a_command_is_a_usage_error() {
    let plane = Plane::start(&[]).await;
    let src = plane.source(&[("f", "1")]);
    let mut p = plane.cli(&["deploy", "app", src.to_str().unwrap(), "--dev-hot"], &[]);
    let status = p.wait_exit(LONG).await.unwrap();
    assert_eq!(status.code(), Some(2));
    let logs = p.logs().join("\n");
    assert!(logs.contains("supervisor"), "{logs}");
    assert_eq!(plane.writes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_on_release_reaches_the_supervisor_and_bad_values_are_refused_before_anything() {
    let plane = Plane::start(&[]).await;
    let src = plane.source(&[("f", "1")]);
    let src = src.to_str().unwrap();
    for (args, why) in [
        (
            vec![
                "deploy",
                "app",
                src,
                "--on-release",
                "signal:HUP",
                "--",
                "./run",
            ],
            "without --dev-hot",
        ),
        (
            vec![
                "deploy",
                "app",
                src,
                "--dev-hot",
                "--on-release",
                "signal:KILL",
                "--",
                "./run",
            ],
            "a signal no app reloads on",
        ),
    ] {
        let mut p = plane.cli(&args, &[]);
        let status = p.wait_exit(LONG).await.unwrap();
        assert_eq!(status.code(), Some(2), "{why}: {:?}", p.logs());
    }
    assert_eq!(plane.writes(), 0);
    // The API refuses what the CLI would, for other clients.
    let (code, body) = post(
        &plane,
        "/v1/apps/app/deploy",
        &json!({"image": "i", "command": ["./run"], "dev_hot": true, "on_release": "reload",
                "release": {"digest": format!("sha256:{}", "0".repeat(64))}}),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("signal:<SIG>"), "{body}");
    let (ok, out) = plane
        .run(
            &[
                "deploy",
                "app",
                src,
                "--dev-hot",
                "--on-release",
                "signal:HUP",
                "--",
                "./run",
            ],
            &[],
        )
        .await;
    assert!(ok, "{out}");
    let d = plane
        .emu
        .get("deployments", Some("default"), "app")
        .unwrap();
    let env = &d["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .contains(&json!({"name": "AETHER_ON_RELEASE", "value": "signal:HUP"})),
        "{env}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_on_a_silent_pod_is_gentle_on_the_api_and_a_newer_save_supersedes_it() {
    let plane = Plane::start(&[]).await;
    let src = plane.source(&[("index.html", "one")]);
    plane.deploy_dev_hot("web", &src).await;
    // A pod whose fetcher never answers (crash-looping): the wait cannot settle.
    plane.pod("web-0", "web");
    let deployed = plane
        .annotation("deployments", "web", "aether.dev/digest")
        .unwrap();
    // Without the log stream: its requests (a pod watch, log reads) are not the wait's.
    let dev = plane.cli(
        &["dev", "--hot", "web", src.to_str().unwrap(), "--no-logs"],
        &[],
    );
    // `dev` releases the tree as a new manifest (a new seq, so a new digest): the wait
    // starts once the pod carries it and the CLI has asked for status.
    let annotated = wait_until(LONG, || async {
        plane
            .annotation("pods", "web-0", "aether.dev/digest")
            .is_some_and(|d| d != deployed)
    })
    .await;
    assert!(annotated);
    // The wait has begun once the CLI reads the pod's status.
    let reading = wait_until(LONG, || async { plane.emu.stats().proxy >= 1 }).await;
    assert!(reading);
    // Measure the API requests over a window of the wait (a measurement, not a wait for
    // an event: load can only make the loop slower).
    // The Lease's renewals are the server's own steady traffic, not the wait's.
    let waiting = || {
        let stats = plane.emu.stats();
        stats.total - stats.leases
    };
    let before = waiting();
    let t = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let per_second = (waiting() - before) as f64 / t.elapsed().as_secs_f64();
    assert!(
        per_second <= 6.0,
        "{per_second:.1} API requests per second while waiting for one pod"
    );
    // A save during the wait supersedes it at once, not after the 60 s timeout.
    let first = plane
        .annotation("deployments", "web", "aether.dev/digest")
        .unwrap();
    std::fs::write(src.join("index.html"), "two").unwrap();
    dev.wait_for_log("superseded sha256:", LONG).await.unwrap();
    let released = wait_until(LONG, || async {
        plane
            .annotation("deployments", "web", "aether.dev/digest")
            .is_some_and(|d| d != first)
    })
    .await;
    assert!(released, "the newer save was released");
}

/// An uncompressed tar of (name, bytes) regular files: a batched blob upload.
fn blob_batch(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, bytes) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, name, bytes.as_slice())
            .unwrap();
    }
    builder.into_inner().unwrap()
}

fn blob_files(plane: &Plane) -> usize {
    std::fs::read_dir(plane.dir.path().join("data/blobs"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_are_stored_by_their_hash_and_a_wrong_hash_stores_nothing() {
    let plane = Plane::start(&[]).await;
    let digest = aether_common::Digest::of(b"one file");
    let url = format!("{}/v1/blobs/{digest}", plane.url);
    assert_eq!(http("PUT", &url, None, b"one file".to_vec()).await.0, 401);
    let (code, body) = http("PUT", &url, Some(TOKEN), b"other bytes".to_vec()).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(blob_files(&plane), 0, "a mismatch stores nothing");
    assert_eq!(http("GET", &url, None, vec![]).await.0, 404);
    let (code, body) = http("PUT", &url, Some(TOKEN), b"one file".to_vec()).await;
    assert_eq!(code, 201, "{body}");
    let uploaded: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(uploaded["url"], url);
    assert_eq!(
        http("PUT", &url, Some(TOKEN), b"one file".to_vec()).await.0,
        200,
        "a known blob is a no-op"
    );
    // Downloads need no token, like artifacts: pods hold none, and verify every byte.
    let (code, body) = http("GET", &url, None, vec![]).await;
    assert_eq!((code, body.as_str()), (200, "one file"));
    // Blobs and artifacts are separate namespaces.
    let artifact = format!("{}/v1/artifacts/{digest}", plane.url);
    assert_eq!(http("GET", &artifact, None, vec![]).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_is_served_as_a_patch_against_one_the_client_holds_and_whole_otherwise() {
    let plane = Plane::start(&[]).await;
    // Shaped as canonical manifests; a save changes created_at, one entry and seq.
    let manifest = |seq: u64, changed: usize| {
        let entries: Vec<String> = (0..2000)
            .map(|i| {
                let hash = if i == changed { "bb" } else { "aa" };
                format!("{{\"mode\":420,\"path\":\"f{i:05}\",\"sha256\":\"{hash}\"}}")
            })
            .collect();
        format!(
            "{{\"app\":\"web\",\"blobs\":\"./\",\"created_at\":\"2026-12-07T10:00:0{seq}Z\",\"entries\":[{}],\"seq\":{seq}}}",
            entries.join(",")
        )
        .into_bytes()
    };
    let (held, wanted) = (manifest(1, usize::MAX), manifest(2, 1234));
    let (hd, wd) = (
        aether_common::Digest::of(&held),
        aether_common::Digest::of(&wanted),
    );
    for (d, bytes) in [(hd, &held), (wd, &wanted)] {
        let url = format!("{}/v1/blobs/{d}", plane.url);
        assert_eq!(http("PUT", &url, Some(TOKEN), bytes.clone()).await.0, 201);
    }
    aether_testkit::process::install_crypto();
    let client = reqwest::Client::new();
    let get = |digest: aether_common::Digest, kind: &str, a_im: Option<&str>, base: String| {
        let mut r = client
            .get(format!("{}/v1/{kind}/{digest}", plane.url))
            .header("if-none-match", base);
        if let Some(a_im) = a_im {
            r = r.header("a-im", a_im);
        }
        r.send()
    };
    let tag = |d: aether_common::Digest| format!("\"{d}\"");
    let header = |r: &reqwest::Response, name: &str| r.headers()[name].to_str().unwrap().to_owned();

    let r = get(wd, "blobs", Some("vcdiff, aether-patch"), tag(hd))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 226);
    assert_eq!(header(&r, "im"), "aether-patch");
    assert_eq!(header(&r, "delta-base"), tag(hd));
    assert_eq!(header(&r, "etag"), tag(wd));
    let patch = r.bytes().await.unwrap();
    assert!(
        patch.len() < 200,
        "{} bytes sent for a {}-byte manifest: {}",
        patch.len(),
        wanted.len(),
        String::from_utf8_lossy(&patch)
    );
    let rebuilt = aether_common::release::delta::apply(&held, &patch, u64::MAX).unwrap();
    assert_eq!(rebuilt, wanted);
    // The app's other pods ask for the same patch: the same answer.
    let again = get(wd, "blobs", Some("aether-patch"), tag(hd))
        .await
        .unwrap();
    assert_eq!(again.bytes().await.unwrap(), patch);

    // Whole: without A-IM, against a base the store does not hold, for another
    // instance manipulation.
    let whole = [
        get(wd, "blobs", None, tag(hd)).await.unwrap(),
        get(
            wd,
            "blobs",
            Some("aether-patch"),
            tag(aether_common::Digest::of(b"gone")),
        )
        .await
        .unwrap(),
        get(wd, "blobs", Some("gzip"), tag(hd)).await.unwrap(),
    ];
    for r in whole {
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.bytes().await.unwrap(), wanted);
    }
    // Blobs only (manifests are blobs): the same bytes as an artifact go whole.
    let url = format!("{}/v1/artifacts/{wd}", plane.url);
    assert_eq!(http("PUT", &url, Some(TOKEN), wanted.clone()).await.0, 201);
    let artifact = get(wd, "artifacts", Some("aether-patch"), tag(hd))
        .await
        .unwrap();
    assert_eq!(artifact.status().as_u16(), 200);
    assert_eq!(artifact.bytes().await.unwrap(), wanted);
    // The client already holds it.
    let same = get(wd, "blobs", Some("aether-patch"), tag(wd))
        .await
        .unwrap();
    assert_eq!(same.status().as_u16(), 304);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_keeps_the_patch_from_the_apps_release_before_so_pods_get_it_without_the_base_read()
 {
    let plane = Plane::start(&[]).await;
    let files: Vec<(String, String)> = (0..200)
        .map(|i| (format!("f{i:03}.js"), format!("file {i}")))
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_str()))
        .collect();
    let src = plane.source(&files);
    plane.deploy_dev_hot("web", &src).await;
    let d1 = plane
        .annotation("deployments", "web", "aether.dev/digest")
        .unwrap();
    aether_testkit::process::install_crypto();
    let client = reqwest::Client::new();
    let blob = |digest: &str| client.get(format!("{}/v1/blobs/{digest}", plane.url));
    let m1 = blob(&d1).send().await.unwrap().bytes().await.unwrap();
    std::fs::write(src.join("f100.js"), "edited").unwrap();
    plane.deploy_dev_hot("web", &src).await;
    let d2 = plane
        .annotation("deployments", "web", "aether.dev/digest")
        .unwrap();
    assert_ne!(d1, d2);
    let m2 = blob(&d2).send().await.unwrap().bytes().await.unwrap();
    // Without the base on disk, only the patch the release route kept can answer.
    let hex = d1.strip_prefix("sha256:").unwrap();
    std::fs::remove_file(plane.dir.path().join("data/blobs").join(hex)).unwrap();
    let r = blob(&d2)
        .header("a-im", "aether-patch")
        .header("if-none-match", format!("\"{d1}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 226);
    assert_eq!(r.headers()["delta-base"], format!("\"{d1}\"").as_str());
    let patch = r.bytes().await.unwrap();
    assert!(patch.len() < m2.len() / 4, "{} bytes", patch.len());
    let rebuilt = aether_common::release::delta::apply(&m1, &patch, u64::MAX).unwrap();
    assert_eq!(rebuilt, m2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_missing_blobs_query_names_only_unknown_digests_once_each() {
    let plane = Plane::start(&[]).await;
    let known = aether_common::Digest::of(b"known");
    let unknown = aether_common::Digest::of(b"unknown");
    let put = format!("{}/v1/blobs/{known}", plane.url);
    assert_eq!(
        http("PUT", &put, Some(TOKEN), b"known".to_vec()).await.0,
        201
    );
    let url = format!("{}/v1/blobs/missing", plane.url);
    let query = json!({"digests": [known.to_string(), unknown.to_string(), unknown.to_string()]});
    assert_eq!(
        http("POST", &url, None, query.to_string().into_bytes())
            .await
            .0,
        401
    );
    let (code, body) = http("POST", &url, Some(TOKEN), query.to_string().into_bytes()).await;
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["missing"], json!([unknown.to_string()]));
    let bad = json!({"digests": ["sha256:xyz"]});
    let (code, body) = http("POST", &url, Some(TOKEN), bad.to_string().into_bytes()).await;
    assert_eq!(code, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_upload_stores_many_small_blobs_a_batched_download_returns_them_and_bad_entries_are_refused()
 {
    let plane = Plane::start(&[]).await;
    let url = format!("{}/v1/blobs/batch", plane.url);
    let files: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| {
            let bytes = format!("small file {i}").into_bytes();
            let name = aether_common::Digest::of(&bytes).to_string();
            (name, bytes)
        })
        .collect();
    assert_eq!(http("POST", &url, None, blob_batch(&files)).await.0, 401);
    let (code, body) = http("POST", &url, Some(TOKEN), blob_batch(&files)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"stored": 300, "known": 0})
    );
    assert_eq!(blob_files(&plane), 300);
    let (code, body) = http(
        "GET",
        &format!("{}/v1/blobs/{}", plane.url, files[7].0),
        None,
        vec![],
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "small file 7"));
    // The same batch again: every blob is known.
    let (_, body) = http("POST", &url, Some(TOKEN), blob_batch(&files)).await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"stored": 0, "known": 300})
    );

    // Pods download many of them in one request, without a token, as a tar in the order
    // asked (each once).
    let download = format!(
        "{}/v1/blobs/{}",
        plane.url,
        aether_common::release::BLOB_BATCH_PATH
    );
    let asked = [&files[9].0, &files[3].0, &files[9].0];
    let response = reqwest::Client::new()
        .post(&download)
        .header("content-type", "application/json")
        .body(json!({ "digests": asked }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let announced = response.content_length();
    let tar_bytes = response.bytes().await.unwrap();
    assert_eq!(announced, Some(tar_bytes.len() as u64));
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let got: Vec<(String, String)> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).unwrap();
            (name, text)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (files[9].0.clone(), "small file 9".to_owned()),
            (files[3].0.clone(), "small file 3".to_owned()),
        ]
    );
    let absent = aether_common::Digest::of(b"absent").to_string();
    let (code, body) = http(
        "POST",
        &download,
        None,
        json!({ "digests": [files[0].0, absent] })
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains(&absent), "{body}");
    let too_many = vec![files[0].0.clone(); aether_common::release::MAX_BLOB_BATCH + 1];
    let (code, body) = http(
        "POST",
        &download,
        None,
        json!({ "digests": too_many }).to_string().into_bytes(),
    )
    .await;
    assert_eq!(code, 400, "{body}");

    // An entry whose bytes do not hash to its name ends the batch; it is not stored.
    let good = b"good".to_vec();
    let good_name = aether_common::Digest::of(&good).to_string();
    let liar = aether_common::Digest::of(b"claimed").to_string();
    let (code, body) = http(
        "POST",
        &url,
        Some(TOKEN),
        blob_batch(&[
            (good_name.clone(), good),
            (liar.clone(), b"actual".to_vec()),
        ]),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains(&liar), "{body}");
    let missing = json!({"digests": [good_name, liar.clone()]});
    let (_, body) = http(
        "POST",
        &format!("{}/v1/blobs/missing", plane.url),
        Some(TOKEN),
        missing.to_string().into_bytes(),
    )
    .await;
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        answer["missing"],
        json!([liar]),
        "verified blobs before it stay"
    );

    // Only regular files named by a digest are blobs.
    let (code, body) = http(
        "POST",
        &url,
        Some(TOKEN),
        blob_batch(&[("notes.txt".into(), b"x".to_vec())]),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let mut link = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    link.append_link(
        &mut header,
        aether_common::Digest::of(b"l").to_string(),
        "/etc/passwd",
    )
    .unwrap();
    let (code, body) = http("POST", &url, Some(TOKEN), link.into_inner().unwrap()).await;
    assert_eq!(code, 400, "{body}");
    // A GNU long-name header is refused, not buffered.
    let mut long = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(1);
    long.append_data(&mut header, "a".repeat(300), &b"x"[..])
        .unwrap();
    let (code, body) = http("POST", &url, Some(TOKEN), long.into_inner().unwrap()).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        std::fs::read_dir(plane.dir.path().join("data/tmp"))
            .unwrap()
            .count(),
        0,
        "no temporary file left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_size_cap_is_refused_as_too_large() {
    let plane = Plane::start(&[("AETHER_MAX_ARTIFACT_BYTES", "65536".into())]).await;
    let files: Vec<(String, Vec<u8>)> = (0..40u8)
        .map(|i| {
            let bytes = vec![i; 4000];
            (aether_common::Digest::of(&bytes).to_string(), bytes)
        })
        .collect();
    let url = format!("{}/v1/blobs/batch", plane.url);
    let (code, body) = http("POST", &url, Some(TOKEN), blob_batch(&files)).await;
    assert_eq!(code, 413, "{body}");
    let (code, body) = http("POST", &url, Some(TOKEN), blob_batch(&files[..5])).await;
    assert_eq!(code, 200, "{body}");
}

/// The stored manifest of a digest.
async fn stored_manifest(plane: &Plane, digest: &str) -> aether_common::release::Manifest {
    let (code, body) = http(
        "GET",
        &format!("{}/v1/blobs/{digest}", plane.url),
        None,
        vec![],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    aether_common::release::Manifest::parse(body.as_bytes()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_uploads_only_missing_blobs_and_rollback_brings_a_tree_back_with_a_newer_seq() {
    let plane = Plane::start(&[]).await;
    let big = "x".repeat(200_000);
    let src = plane.source(&[("index.html", "one"), ("big.js", &big)]);
    plane.deploy_dev_hot("web", &src).await;
    let d1 = plane
        .annotation("deployments", "web", "aether.dev/digest")
        .unwrap();
    assert_eq!(
        plane
            .annotation("deployments", "web", "aether.dev/format")
            .as_deref(),
        Some("manifest")
    );
    let m1 = stored_manifest(&plane, &d1).await;
    assert_eq!(m1.app, "web");

    // A second deploy of a one-file edit sends that file and the manifest only.
    std::fs::write(src.join("index.html"), "two").unwrap();
    let (ok, out) = plane
        .run(
            &[
                "deploy",
                "web",
                src.to_str().unwrap(),
                "--dev-hot",
                "--",
                "./run",
            ],
            &[],
        )
        .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("2 blobs"),
        "the edited file and the manifest: {out}"
    );
    let d2 = plane
        .annotation("deployments", "web", "aether.dev/digest")
        .unwrap();
    let m2 = stored_manifest(&plane, &d2).await;
    assert!(m2.seq > m1.seq);
    assert_eq!(
        plane
            .annotation("deployments", "web", "aether.dev/previous-digest")
            .as_deref(),
        Some(d1.as_str()),
        "a deploy records the release it replaces"
    );

    // Back to the first tree: a new manifest, same entries, a seq above the current one.
    let (ok, out) = plane.run(&["rollback", "web", "--to", &d1], &[]).await;
    assert!(ok, "{out}");
    let d3 = plane
        .annotation("deployments", "web", "aether.dev/digest")
        .unwrap();
    assert_ne!(d3, d1, "a rollback is a new release");
    let m3 = stored_manifest(&plane, &d3).await;
    assert_eq!(m3.entries, m1.entries);
    assert!(m3.seq > m2.seq);
    assert_eq!(
        plane
            .annotation("deployments", "web", "aether.dev/previous-digest")
            .as_deref(),
        Some(d2.as_str())
    );
    // Without --to: the release before the current one.
    let (ok, out) = plane.run(&["rollback", "web"], &[]).await;
    assert!(ok, "{out}");
    let d4 = plane
        .annotation("deployments", "web", "aether.dev/digest")
        .unwrap();
    let m4 = stored_manifest(&plane, &d4).await;
    assert_eq!(m4.entries, m2.entries);
    assert!(m4.seq > m3.seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_for_another_app_or_unsafe_is_refused_by_the_release_route() {
    let plane = Plane::start(&[]).await;
    let src = plane.source(&[("index.html", "one")]);
    plane.deploy_dev_hot("web", &src).await;
    let d1 = plane
        .annotation("deployments", "web", "aether.dev/digest")
        .unwrap();
    let mut m = stored_manifest(&plane, &d1).await;
    for (app, path, expect) in [
        ("api", "index.html", "is for app"),
        ("web", "../escape", "not a valid release manifest"),
    ] {
        m.app = app.into();
        std::sync::Arc::make_mut(&mut m.entries[0]).path = path.into();
        m.seq += 1;
        let bytes = m.to_canonical();
        let digest = aether_common::Digest::of(&bytes);
        let (code, body) = http(
            "PUT",
            &format!("{}/v1/blobs/{digest}", plane.url),
            Some(TOKEN),
            bytes,
        )
        .await;
        assert_eq!(code, 201, "{body}");
        let (code, body) = post(
            &plane,
            "/v1/apps/web/release",
            &json!({"digest": digest.to_string(), "format": "manifest"}),
        )
        .await;
        assert_eq!(code, 422, "{body}");
        assert!(body.contains(expect), "{body}");
    }
    assert_eq!(
        plane.annotation("deployments", "web", "aether.dev/digest"),
        Some(d1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_with_format_tar_keeps_the_tar_gz_path_and_never_resends_a_stored_artifact() {
    let plane = Plane::start(&[]).await;
    // Incompressible, so the artifact is larger than socket buffers: the store answers a
    // known digest without reading the body, and sending it again broke the pipe.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: String = (0..8 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 90) as u8)
        })
        .collect();
    let src = plane.source(&[("index.html", "one"), ("big.bin", &noise)]);
    let args = [
        "deploy",
        "web",
        src.to_str().unwrap(),
        "--format",
        "tar",
        "--dev-hot",
        "--",
        "./run",
    ];
    let (ok, out) = plane.run(&args, &[]).await;
    assert!(ok, "{out}");
    let (ok, again) = plane.run(&args, &[]).await;
    assert!(ok, "{again}");
    assert!(again.contains("0 blobs"), "nothing sent twice: {again}");
    let url = plane
        .annotation("deployments", "web", "aether.dev/artifact-url")
        .unwrap();
    assert!(url.contains("/v1/artifacts/sha256:"), "{url}");
    assert_eq!(
        plane.annotation("deployments", "web", "aether.dev/format"),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_release_to_a_fetcher_without_aether_app_is_refused_with_a_way_out() {
    let plane = Plane::start(&[]).await;
    let src = plane.source(&[("index.html", "one")]);
    let (ok, out) = plane
        .run(
            &[
                "deploy",
                "web",
                src.to_str().unwrap(),
                "--dev-hot",
                "--expires-in",
                "1h",
                "--",
                "./run",
            ],
            &[],
        )
        .await;
    assert!(ok, "{out}");
    let d1 = plane
        .annotation("deployments", "web", "aether.dev/digest")
        .unwrap();
    let m = stored_manifest(&plane, &d1).await;
    let expires: jiff::Timestamp = m.expires_at.as_deref().unwrap().parse().unwrap();
    assert!(
        expires > jiff::Timestamp::now(),
        "--expires-in sets expires_at"
    );
    // The Deployment as an earlier aether made it: a fetcher without AETHER_APP.
    let mut deploy = plane
        .emu
        .get("deployments", Some("default"), "web")
        .unwrap();
    for c in deploy["spec"]["template"]["spec"]["initContainers"]
        .as_array_mut()
        .unwrap()
    {
        if let Some(env) = c["env"].as_array_mut() {
            env.retain(|e| e["name"] != "AETHER_APP");
        }
    }
    plane
        .emu
        .merge_patch(
            "deployments",
            Some("default"),
            "web",
            &json!({"spec": deploy["spec"].clone()}),
        )
        .unwrap();
    let (code, body) = post(
        &plane,
        "/v1/apps/web/release",
        &json!({"digest": d1, "format": "manifest"}),
    )
    .await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("--format tar"), "{body}");
}

/// A control plane with dev-hot app `web` deployed from a one-file tree (returned) and
/// its pod `web-0`.
async fn web_with_a_pod() -> (Plane, PathBuf) {
    let plane = Plane::start(&[]).await;
    let src = plane.source(&[("f", "1")]);
    plane.deploy_dev_hot("web", &src).await;
    app_pod(&plane, "web", "web-0");
    (plane, src)
}

/// Pod `name` of `app` whose app container is named like the app, as the Deployment
/// aether applies names it (the logs route reads that container).
fn app_pod(plane: &Plane, app: &str, name: &str) {
    plane
        .emu
        .create("pods", Some("default"), json!({
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": app, "app.kubernetes.io/managed-by": "aether"}},
            "spec": {"containers": [{"name": app, "image": "i"}]},
        }))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_every_pod_are_prefixed_and_while_following_new_lines_and_new_pods_join() {
    let (plane, _) = web_with_a_pod().await;
    app_pod(&plane, "web", "web-1");
    plane.emu.append_log("default", "web-0", "web", "zero: old");
    plane
        .emu
        .append_log("default", "web-0", "web", "zero: newer");
    plane.emu.append_log("default", "web-1", "web", "one: old");

    let (ok, out) = plane.run(&["logs", "web"], &[]).await;
    assert!(ok, "{out}");
    for line in [
        "[web-0] zero: old",
        "[web-0] zero: newer",
        "[web-1] one: old",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} in {out}");
    }
    let (ok, out) = plane.run(&["logs", "web", "--tail", "1"], &[]).await;
    assert!(ok, "{out}");
    assert!(
        !out.contains("zero: old") && out.contains("zero: newer"),
        "{out}"
    );
    // A line written an hour ago is left out by --since 10m.
    let hour_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    app_pod(&plane, "web", "web-9");
    plane
        .emu
        .append_log_at("default", "web-9", "web", hour_ago, "nine: an hour ago");
    plane.emu.append_log("default", "web-9", "web", "nine: now");
    let (ok, out) = plane.run(&["logs", "web", "--since", "10m"], &[]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("[web-9] nine: now") && !out.contains("an hour ago"),
        "{out}"
    );

    let follow = plane.cli(&["logs", "web", "-f"], &[]);
    follow.wait_for_log("[web-1] one: old", LONG).await.unwrap();
    plane.emu.append_log("default", "web-1", "web", "one: live");
    follow
        .wait_for_log("[web-1] one: live", LONG)
        .await
        .unwrap();
    // A pod that starts later joins, from its first line.
    app_pod(&plane, "web", "web-2");
    plane
        .emu
        .append_log("default", "web-2", "web", "two: first");
    follow
        .wait_for_log("[web-2] two: first", LONG)
        .await
        .unwrap();

    let (ok, out) = plane.run(&["logs", "nope"], &[]).await;
    assert!(!ok && out.contains("no app \"nope\""), "{out}");
    let (code, _) = http(
        "GET",
        &format!("{}/v1/apps/web/logs", plane.url),
        None,
        vec![],
    )
    .await;
    assert_eq!(
        code, 401,
        "app output may hold secrets: the token is required"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_hot_streams_the_apps_logs_between_its_events() {
    let (plane, src) = web_with_a_pod().await;
    let dev = plane.cli(
        &["dev", "--hot", "web", src.to_str().unwrap(), "-o", "json"],
        &[],
    );
    dev.wait_for_log("\"event\":\"watching\"", LONG)
        .await
        .unwrap();
    // Only new lines are shown: write until the stream (which connects on its own
    // schedule) has passed one on.
    let mut n = 0;
    let seen = wait_until(LONG, || {
        n += 1;
        plane
            .emu
            .append_log("default", "web-0", "web", &format!("tick {n}"));
        let found = !dev.lines_with("\"event\":\"log\"").is_empty();
        async move { found }
    })
    .await;
    assert!(seen, "{:?}", dev.logs());
    let line = &dev.lines_with("\"event\":\"log\"")[0];
    let ev: Value = serde_json::from_str(line).unwrap();
    assert_eq!(ev["pod"], "web-0");
    assert!(ev["line"].as_str().unwrap().starts_with("tick "), "{ev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_log_stream_is_read_again_from_the_last_line_and_unreadable_pods_say_why() {
    let (plane, _) = web_with_a_pod().await;
    plane.emu.append_log("default", "web-0", "web", "before");
    let follow = plane.cli(&["logs", "web", "-f"], &[]);
    follow.wait_for_log("[web-0] before", LONG).await.unwrap();
    // The API server ends the stream while the pod lives (a restart, a timeout).
    plane.emu.drop_log_streams();
    plane.emu.append_log("default", "web-0", "web", "after");
    follow.wait_for_log("[web-0] after", LONG).await.unwrap();
    plane.emu.append_log("default", "web-0", "web", "later");
    follow.wait_for_log("[web-0] later", LONG).await.unwrap();
    assert_eq!(
        follow.lines_with("[web-0] before").len(),
        1,
        "nothing is repeated: {:?}",
        follow.logs()
    );
    assert_eq!(follow.lines_with("[web-0] after").len(), 1);

    // A pod whose app container cannot be read is named with the reason, not skipped.
    plane.pod("web-odd", "web");
    let (ok, out) = plane.run(&["logs", "web"], &[]).await;
    assert!(ok, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("[web-odd] log unavailable:")),
        "{out}"
    );
    assert!(out.contains("[web-0] later"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_streams_beyond_the_cap_are_refused_with_429_until_one_ends() {
    let (plane, _) = web_with_a_pod().await;
    let url = format!("{}/v1/apps/web/logs?follow=true", plane.url);
    aether_testkit::process::install_crypto();
    let client = reqwest::Client::new();
    let open = || client.get(&url).bearer_auth(TOKEN).send();
    let mut streams = Vec::new();
    // The cap (MAX_STREAMS in control-plane/src/logs.rs).
    for _ in 0..16 {
        let r = open().await.unwrap();
        assert_eq!(r.status(), 200);
        streams.push(r);
    }
    let refused = open().await.unwrap();
    assert_eq!(refused.status(), 429);
    drop(streams.pop());
    let freed = wait_until(LONG, || async { open().await.unwrap().status() == 200 }).await;
    assert!(freed, "a slot comes back when a stream ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_once_fails_when_the_app_has_no_pods_to_run_the_tree() {
    let plane = Plane::start(&[]).await;
    let src = plane.source(&[("f", "1")]);
    plane.deploy_dev_hot("lonely", &src).await;
    std::fs::write(src.join("f"), "2").unwrap();
    let mut once = plane.cli(
        &["dev", "--hot", "lonely", src.to_str().unwrap(), "--once"],
        &[],
    );
    let status = once.wait_exit(LONG).await.unwrap();
    assert_eq!(status.code(), Some(1), "{:?}", once.logs());
    assert!(
        !once.lines_with("has no pods").is_empty(),
        "{:?}",
        once.logs()
    );
}
