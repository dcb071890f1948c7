//! Several `aether serve` replicas sharing object storage (a real S3 implementation,
//! moto's server) behind one address, as behind a Service: any replica answers any route,
//! a Lease elects the one that reconciles, and the leader's SIGKILL loses no release and
//! no save.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aether_testkit::balancer::Balancer;
use aether_testkit::emulator::{Emulator, PROXY_ADDRESS_ANNOTATION};
use aether_testkit::process::{Proc, free_port, install_crypto, wait_until};
use aether_testkit::s3::Moto;
use serde_json::json;

const AETHER: &str = env!("CARGO_BIN_EXE_aether");
const TOKEN: &str = "replicas-token-8c1d";
const LONG: Duration = Duration::from_secs(60);
const BUCKET: &str = "releases";
/// Short, so the take-over happens within the test; production's default is 15 s.
const LEASE_SEC: u64 = 4;

fn fetcher_bin() -> PathBuf {
    aether_testkit::process::workspace_bin(AETHER, "aether-fetcher")
}

struct Cluster {
    emu: Emulator,
    moto: Moto,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    balancer: Balancer,
    replicas: Vec<(String, SocketAddr, Proc)>,
}

impl Cluster {
    /// The emulator, a bucket, and two replicas behind one balancer.
    async fn start() -> Self {
        let emu = Emulator::start().await.unwrap();
        let moto = Moto::start().await.unwrap();
        moto.create_bucket(BUCKET).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = emu.write_kubeconfig(dir.path()).unwrap();
        let addrs: Vec<SocketAddr> = (0..2)
            .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
            .collect();
        let balancer = Balancer::start(addrs.clone()).await.unwrap();
        let mut replicas = Vec::new();
        for (i, addr) in addrs.into_iter().enumerate() {
            let name = format!("replica-{i}");
            let mut env = vec![
                ("KUBECONFIG", kubeconfig.display().to_string()),
                ("AETHER_LISTEN", addr.to_string()),
                // Each replica's own disk: nothing may depend on it.
                (
                    "AETHER_DATA_DIR",
                    dir.path().join(&name).display().to_string(),
                ),
                ("AETHER_API_TOKEN", TOKEN.into()),
                ("AETHER_FETCH_IMAGE", "aether-fetcher:test".into()),
                ("AETHER_PUBLIC_URL", balancer.url()),
                ("AETHER_STORE", format!("s3://{BUCKET}/aether")),
                ("AETHER_IDENTITY", name.clone()),
                ("AETHER_LEASE_DURATION_SEC", LEASE_SEC.to_string()),
            ];
            env.extend(moto.aws_env());
            let server = Proc::spawn(AETHER, &["serve"], &env).unwrap();
            server
                .wait_for_log("aether serve listening", LONG)
                .await
                .unwrap();
            replicas.push((name, addr, server));
        }
        Self {
            emu,
            moto,
            dir,
            kubeconfig,
            balancer,
            replicas,
        }
    }

    /// The index of the replica that holds the Lease (as the API server says), once one
    /// does.
    async fn leader(&self) -> usize {
        let holder = || {
            self.emu
                .get("leases", Some("default"), "aether-control-plane")
                .and_then(|l| {
                    l.pointer("/spec/holderIdentity")?
                        .as_str()
                        .map(str::to_owned)
                })
        };
        assert!(
            wait_until(LONG, || async { holder().is_some() }).await,
            "no replica took the lease"
        );
        let holder = holder().unwrap_or_default();
        self.replicas
            .iter()
            .position(|(name, _, _)| *name == holder)
            .unwrap_or_else(|| panic!("the lease is held by {holder:?}, no replica of ours"))
    }

    fn cli(&self, args: &[&str]) -> Proc {
        let env = vec![
            ("AETHER_API_URL", self.balancer.url()),
            ("AETHER_API_TOKEN", TOKEN.to_owned()),
            (
                "XDG_CACHE_HOME",
                self.dir.path().join("cache").display().to_string(),
            ),
        ];
        Proc::spawn(AETHER, args, &env).unwrap()
    }

    fn pod(&self, name: &str, proxy_port: Option<u16>) {
        let mut annotations = serde_json::Map::new();
        if let Some(port) = proxy_port {
            annotations.insert(
                PROXY_ADDRESS_ANNOTATION.into(),
                json!(format!("127.0.0.1:{port}")),
            );
        }
        self.emu
            .create("pods", Some("default"), json!({
                "metadata": {"name": name, "annotations": annotations,
                    "labels": {"app.kubernetes.io/name": "web", "app.kubernetes.io/managed-by": "aether"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            }))
            .unwrap();
    }

    /// A real fetcher for pod `pod`; downloads go through the balancer to a replica,
    /// which redirects to a presigned URL of the bucket.
    fn fetcher(&self, pod: &str, port: u16) -> (Proc, PathBuf) {
        let workspace = self.dir.path().join(format!("workspace-{pod}"));
        std::fs::create_dir_all(&workspace).unwrap();
        let env = vec![
            ("KUBECONFIG", self.kubeconfig.display().to_string()),
            ("POD_NAME", pod.into()),
            ("AETHER_APP", "web".into()),
            ("POD_NAMESPACE", "default".into()),
            ("AETHER_WORKSPACE", workspace.display().to_string()),
            ("AETHER_HTTP_ADDR", format!("127.0.0.1:{port}")),
            ("AETHER_ALLOW_HTTP", "1".into()),
            ("AETHER_MIN_REFRESH_INTERVAL_MS", "100".into()),
        ];
        (Proc::spawn(fetcher_bin(), &[], &env).unwrap(), workspace)
    }

    fn annotation(&self, kind: &str, name: &str) -> Option<String> {
        self.emu
            .get(kind, Some("default"), name)?
            .pointer("/metadata/annotations")?
            .get("aether.dev/digest")?
            .as_str()
            .map(str::to_owned)
    }
}

fn client() -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_uploaded_through_one_replica_is_served_by_the_other_and_a_stopped_leader_hands_over()
 {
    let cluster = Cluster::start().await;
    let bytes = b"shared by every replica".repeat(1000);
    let digest = aether_common::Digest::of(&bytes);
    let http = client();
    let (_, first, _) = &cluster.replicas[0];
    let (_, second, _) = &cluster.replicas[1];
    let put = http
        .put(format!("http://{first}/v1/blobs/{digest}"))
        .bearer_auth(TOKEN)
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    // The other replica knows it (its own disk is empty) ...
    let missing = http
        .post(format!("http://{second}/v1/blobs/missing"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(json!({"digests": [digest.to_string()]}).to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(missing.contains("\"missing\":[]"), "{missing}");
    // ... answers HEAD itself, and sends GET to a short-lived presigned URL of the bucket.
    let head = http
        .head(format!("http://{second}/v1/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    let get = http
        .get(format!("http://{second}/v1/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 307);
    let location = get.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&cluster.moto.endpoint), "{location}");
    assert!(location.contains("X-Amz-Signature="), "{location}");
    let fetched = http.get(&location).send().await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert!(fetched.bytes().await.unwrap() == bytes);
    // A corrupt upload leaves nothing, on either replica.
    let wrong = aether_common::Digest::of(b"claimed");
    let put = http
        .put(format!("http://{second}/v1/blobs/{wrong}"))
        .bearer_auth(TOKEN)
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 400);
    let head = http
        .head(format!("http://{first}/v1/blobs/{wrong}"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 404);

    // A leader stopped gracefully stops its loop and releases the Lease before it exits,
    // and the other replica takes it without waiting out the lease duration.
    let leader = cluster.leader().await;
    let standby = 1 - leader;
    let before = cluster.replicas[standby]
        .2
        .lines_with("acquired the lease")
        .len();
    cluster.replicas[leader].2.sigterm();
    cluster.replicas[leader]
        .2
        .wait_for_log("released the lease", LONG)
        .await
        .unwrap();
    cluster.replicas[standby]
        .2
        .wait_for_lines("acquired the lease", before + 1, LONG)
        .await
        .unwrap();
    assert_eq!(cluster.leader().await, standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaders_sigkill_loses_no_save_and_a_standby_takes_the_lease_and_catches_new_pods_up() {
    let mut cluster = Cluster::start().await;
    let src = cluster.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("index.html"), "one").unwrap();
    let mut deploy = cluster.cli(&[
        "deploy",
        "web",
        src.to_str().unwrap(),
        "--dev-hot",
        "--",
        "./run",
    ]);
    let status = deploy.wait_exit(LONG).await.unwrap();
    assert!(status.success(), "{}", deploy.logs().join("\n"));

    let port = free_port();
    cluster.pod("web-0", Some(port));
    let (fetcher, workspace) = cluster.fetcher("web-0", port);
    let read = || std::fs::read_to_string(workspace.join("current/index.html")).ok();
    assert!(
        wait_until(LONG, || async { read().as_deref() == Some("one") }).await,
        "the first release is live through presigned downloads; fetcher:\n{}",
        fetcher.logs().join("\n")
    );

    let dev = cluster.cli(&["dev", "--hot", "--no-logs", "web", src.to_str().unwrap()]);
    dev.wait_for_lines("live sha256:", 1, LONG).await.unwrap();
    std::fs::write(src.join("index.html"), "two").unwrap();
    dev.wait_for_lines("live sha256:", 2, LONG).await.unwrap();
    assert_eq!(read().as_deref(), Some("two"));

    // SIGKILL the leader: no release of the Lease, no goodbye.
    let leader = cluster.leader().await;
    let standby = 1 - leader;
    let acquired_before = cluster.replicas[standby]
        .2
        .lines_with("acquired the lease")
        .len();
    let killed_at = Instant::now();
    cluster.replicas[leader].2.sigkill();
    let _ = cluster.replicas[leader].2.wait_exit(LONG).await;
    // A save right away goes on through the other replica.
    std::fs::write(src.join("index.html"), "three").unwrap();
    dev.wait_for_lines("live sha256:", 3, LONG).await.unwrap();
    assert_eq!(read().as_deref(), Some("three"));

    // The standby takes the Lease once the leader has not renewed it for a lease duration.
    cluster.replicas[standby]
        .2
        .wait_for_lines("acquired the lease", acquired_before + 1, LONG)
        .await
        .unwrap();
    let took_over = killed_at.elapsed();
    eprintln!(
        "take-over: the standby holds the lease {} ms after the leader's SIGKILL (lease {LEASE_SEC} s)",
        took_over.as_millis()
    );
    assert_eq!(cluster.leader().await, standby);

    // The new leader's reconcile loop catches a new pod up with the desired release.
    let desired = cluster.annotation("deployments", "web").unwrap();
    let port = free_port();
    cluster.pod("web-1", Some(port));
    let (_second_fetcher, second_workspace) = cluster.fetcher("web-1", port);
    assert!(
        wait_until(LONG, || async {
            cluster.annotation("pods", "web-1").as_deref() == Some(desired.as_str())
        })
        .await,
        "a pod created after the take-over gets the desired release"
    );
    let read_second = || std::fs::read_to_string(second_workspace.join("current/index.html")).ok();
    assert!(
        wait_until(LONG, || async { read_second().as_deref() == Some("three") }).await,
        "the new pod runs the last save"
    );
    // And the loop keeps going, to both pods.
    std::fs::write(src.join("index.html"), "four").unwrap();
    let line = dev.wait_for_lines("live sha256:", 4, LONG).await.unwrap();
    assert!(line.contains("on 2/2 pods"), "{line}");
    assert_eq!(read().as_deref(), Some("four"));
    assert_eq!(read_second().as_deref(), Some("four"));
    let errors = dev.lines_with("aether dev:");
    assert!(errors.is_empty(), "a save failed: {errors:?}");
}
