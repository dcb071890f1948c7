//! Shared set-up for the end-to-end tests: an emulated API server with one pod, an
//! artifact server, a workspace, and the real `aether-fetcher` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use aether_common::Digest;
use aether_common::archive::pack::ArchiveBuilder;
use aether_common::release::{Entry, EntryType, Manifest};
use aether_testkit::artifacts::ArtifactServer;
use aether_testkit::emulator::Emulator;
use aether_testkit::process::{Proc, http_get, wait_until};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

pub const POD: &str = "app-0";
/// The app of the rig's pod (`AETHER_APP`), named in its manifests.
pub const APP: &str = "demo";
pub const FETCHER: &str = env!("CARGO_BIN_EXE_aether-fetcher");
pub const LONG: Duration = Duration::from_secs(30);

pub struct Rig {
    pub emu: Emulator,
    pub art: ArtifactServer,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub workspace: PathBuf,
    /// A directory hostile archives aim at; must stay empty.
    pub outside: PathBuf,
    pub pods: Api<Pod>,
}

impl Rig {
    pub async fn new() -> Self {
        let emu = Emulator::start().await.expect("emulator");
        let art = ArtifactServer::start().await.expect("artifact server");
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = emu.write_kubeconfig(dir.path()).expect("kubeconfig");
        let workspace = dir.path().join("workspace");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&workspace).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        emu.create(
            "pods",
            Some("default"),
            json!({"metadata": {"name": POD, "labels": {"app": "demo"}},
                   "spec": {"containers": [{"name": "app", "image": "app"}]}}),
        )
        .expect("pod");
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let pods = Api::namespaced(client, "default");
        Self {
            emu,
            art,
            dir,
            kubeconfig,
            workspace,
            outside,
            pods,
        }
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KUBECONFIG", self.kubeconfig.display().to_string()),
            ("POD_NAME", POD.into()),
            ("POD_NAMESPACE", "default".into()),
            ("AETHER_APP", APP.into()),
            ("AETHER_WORKSPACE", self.workspace.display().to_string()),
            ("AETHER_HTTP_ADDR", "127.0.0.1:0".into()),
            ("AETHER_ALLOW_HTTP", "1".into()),
            ("AETHER_MIN_REFRESH_INTERVAL_MS", "0".into()),
            ("AETHER_BACKOFF_MAX_MS", "1000".into()),
            ("AETHER_FETCH_INTERVAL_SEC", "1".into()),
            ("RUST_LOG", "info".into()),
        ]
    }

    /// Spawns the fetcher with the rig's settings, overridden by `extra`.
    pub fn fetcher(&self, extra: &[(&'static str, String)]) -> Proc {
        self.fetcher_args(&[], extra)
    }

    pub fn fetcher_args(&self, args: &[&str], extra: &[(&'static str, String)]) -> Proc {
        let mut env = self.env();
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k, v.clone()));
        }
        Proc::spawn(FETCHER, args, &env).expect("spawn aether-fetcher")
    }

    /// Serves a release made of `files` under `name`; returns its URL and digest.
    pub fn publish(&self, name: &str, files: &[(&str, &str)]) -> (String, Digest) {
        self.publish_bytes(name, release(files))
    }

    pub fn publish_bytes(&self, name: &str, bytes: Vec<u8>) -> (String, Digest) {
        let digest = Digest::of(&bytes);
        (self.art.put(name, bytes), digest)
    }

    /// Merge-patches pod annotations through kube-rs, as the control plane does.
    pub async fn annotate(&self, annotations: Value) {
        self.pods
            .patch(
                POD,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
            )
            .await
            .expect("patch pod");
    }

    /// Serves each file as a blob and the manifest beside them (`blobs/sha256:<hex>`);
    /// returns the manifest's URL and digest.
    pub fn publish_manifest(
        &self,
        manifest: &Manifest,
        files: &[(&str, &str)],
    ) -> (String, Digest) {
        for (_, content) in files {
            let d = Digest::of(content.as_bytes());
            self.art.put(&blob_name(&d), content.as_bytes().to_vec());
        }
        let bytes = manifest.to_canonical();
        let digest = Digest::of(&bytes);
        (self.art.put(&blob_name(&digest), bytes), digest)
    }

    /// Points the pod at a manifest release.
    pub async fn point_at_manifest(&self, url: &str, digest: &Digest) {
        self.annotate(json!({
            "aether.dev/digest": digest.to_string(),
            "aether.dev/artifact-url": url,
            "aether.dev/format": "manifest",
        }))
        .await;
    }

    /// The objects on the volume.
    pub fn objects(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.workspace.join(".aether/objects"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    pub async fn point_at(&self, url: &str, digest: &Digest) {
        self.annotate(json!({
            "aether.dev/digest": digest.to_string(),
            "aether.dev/artifact-url": url,
        }))
        .await;
    }

    pub fn read_current(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.workspace.join("current").join(rel)).ok()
    }

    pub fn current_target(&self) -> Option<PathBuf> {
        std::fs::read_link(self.workspace.join("current")).ok()
    }

    pub fn staging_entries(&self) -> usize {
        std::fs::read_dir(self.workspace.join(".aether/staging")).map_or(0, |d| d.count())
    }

    pub fn outside_is_empty(&self) -> bool {
        is_dir_empty(&self.outside)
    }
}

/// Where the rig's artifact server keeps a blob.
pub fn blob_name(d: &Digest) -> String {
    format!("blobs/{d}")
}

/// A manifest of `app` at `seq` holding `files` (0644) below their directories.
pub fn manifest(app: &str, seq: u64, files: &[(&str, &str)]) -> Manifest {
    let mut entries = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for (path, content) in files {
        let mut parts: Vec<&str> = path.split('/').collect();
        parts.pop();
        for i in 1..=parts.len() {
            dirs.insert(parts[..i].join("/"));
        }
        entries.push(Entry {
            mode: 0o644,
            path: (*path).to_owned(),
            sha256: Some(Digest::of(content.as_bytes()).hex()),
            size: Some(content.len() as u64),
            target: None,
            kind: EntryType::File,
        });
    }
    for dir in dirs {
        entries.push(Entry {
            mode: 0o755,
            path: dir,
            sha256: None,
            size: None,
            target: None,
            kind: EntryType::Dir,
        });
    }
    Manifest {
        app: app.to_owned(),
        blobs: "./".into(),
        created_at: "2026-11-30T00:00:00Z".into(),
        entries: entries.into_iter().map(std::sync::Arc::new).collect(),
        expires_at: None,
        seq,
    }
}

/// A deterministic tar.gz of `files`.
pub fn release(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = ArchiveBuilder::in_memory();
    for (path, content) in files {
        b.file(path, content.as_bytes(), 0o644).unwrap();
    }
    b.finish().unwrap()
}

pub async fn status(addr: std::net::SocketAddr) -> Value {
    let (_, body) = http_get(&format!("http://{addr}/status"))
        .await
        .expect("GET /status");
    serde_json::from_str(&body).expect("status JSON")
}

pub async fn metrics(addr: std::net::SocketAddr) -> String {
    http_get(&format!("http://{addr}/metrics"))
        .await
        .expect("GET /metrics")
        .1
}

/// Waits until `/status` reports `digest` live.
pub async fn wait_live(addr: std::net::SocketAddr, digest: &Digest) {
    let want = digest.to_string();
    let ok = wait_until(LONG, || {
        let want = want.clone();
        async move { status(addr).await["current_digest"] == want.as_str() }
    })
    .await;
    assert!(ok, "{want} never went live; status: {}", status(addr).await);
}

/// Waits until `/status` counts at least `n` consecutive failures.
pub async fn wait_failures(addr: std::net::SocketAddr, n: u64) -> Value {
    let ok = wait_until(LONG, || async move {
        status(addr).await["consecutive_failures"]
            .as_u64()
            .unwrap_or(0)
            >= n
    })
    .await;
    let s = status(addr).await;
    assert!(ok, "never reached {n} failures; status: {s}");
    s
}

pub fn is_dir_empty(path: &Path) -> bool {
    std::fs::read_dir(path).map_or(true, |mut d| d.next().is_none())
}

/// `n` bytes of incompressible letters (xorshift), so compressed artifacts stay large.
pub fn noise(n: usize) -> String {
    let mut out = Vec::with_capacity(n);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ n as u64;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(b'a' + (x % 26) as u8);
    }
    String::from_utf8(out).unwrap_or_default()
}
