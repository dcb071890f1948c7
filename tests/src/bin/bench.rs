//! `aether-bench`: patch-to-live latency of a real `aether-fetcher` process.
//!
//! Starts the API emulator and an artifact server in this process, spawns the fetcher
//! (watch mode) against them, then for each of N patches: serves a fresh artifact of SIZE
//! bytes, merge-patches the pod's annotations over HTTP, and polls the fetcher's `/status`
//! every millisecond until the digest is live. Prints one JSON object with the figures.
//!
//! usage: aether-bench latency --fetcher PATH [--patches 50] [--size 1048576]
//!
//! `aether-bench fanout --aether PATH [--pods 200] [--rounds 5]`: the control plane's
//! patch fan-out. The emulator holds a dev-hot Deployment and N pods; `aether serve` runs
//! against it. Each round times (a) `POST /v1/apps/app/release` until every pod carries
//! the new digest, and (b) an annotation on the Deployment alone (what
//! `kubectl annotate deployment` does) until the reconcile loop has copied it to every pod.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use aether_testkit::artifacts::ArtifactServer;
use aether_testkit::emulator::Emulator;
use aether_testkit::process::Proc;
use anyhow::{Context, bail};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    if mode == "fanout" {
        return fanout(args).await;
    }
    if mode != "latency" {
        bail!(
            "usage: aether-bench latency --fetcher PATH [--patches N] [--size BYTES] | fanout --aether PATH [--pods N]"
        );
    }
    let mut fetcher: Option<PathBuf> = None;
    let mut patches = 50usize;
    let mut size = 1usize << 20;
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--fetcher" => fetcher = Some(value.into()),
            "--patches" => patches = value.parse()?,
            "--size" => size = value.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let fetcher = fetcher.context("--fetcher is required")?;
    let emu = Emulator::start().await?;
    let art = ArtifactServer::start().await?;
    let dir = std::env::temp_dir().join(format!("aether-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("workspace"))?;
    let kubeconfig = emu.write_kubeconfig(&dir)?;
    emu.create(
        "pods",
        Some("default"),
        json!({"metadata": {"name": "bench-0"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}),
    )
    .map_err(anyhow::Error::msg)?;
    let proc = Proc::spawn(
        &fetcher,
        &[],
        &[
            ("KUBECONFIG", kubeconfig.display().to_string()),
            ("POD_NAME", "bench-0".into()),
            ("POD_NAMESPACE", "default".into()),
            (
                "AETHER_WORKSPACE",
                dir.join("workspace").display().to_string(),
            ),
            ("AETHER_HTTP_ADDR", "127.0.0.1:0".into()),
            ("AETHER_ALLOW_HTTP", "1".into()),
            ("AETHER_MIN_REFRESH_INTERVAL_MS", "0".into()),
            ("RUST_LOG", "warn,aether_fetcher::http=info".into()),
        ],
    )?;
    let addr = proc.http_addr().await.map_err(anyhow::Error::msg)?;
    let status_url = format!("http://{addr}/status");
    aether_testkit::process::install_crypto();
    let http = reqwest::Client::new();
    let patch_url = format!("{}/api/v1/namespaces/default/pods/bench-0", emu.url());
    let mut samples = Vec::with_capacity(patches);
    for i in 0..patches {
        let name = format!("a{i}.tgz");
        let bytes = aether_testkit::artifacts::incompressible_release(i, size);
        let digest = aether_common::Digest::of(&bytes);
        let url = art.put(&name, bytes);
        let body = json!({"metadata": {"annotations": {
            "aether.dev/digest": digest.to_string(), "aether.dev/artifact-url": url}}});
        let want = digest.to_string();
        let start = Instant::now();
        http.patch(&patch_url)
            .header("content-type", "application/merge-patch+json")
            .body(body.to_string())
            .send()
            .await?
            .error_for_status()?;
        loop {
            let text = http.get(&status_url).send().await?.text().await?;
            let status: serde_json::Value = serde_json::from_str(&text)?;
            if status["current_digest"] == want.as_str() {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("patch {i} never went live: {status}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    drop(proc);
    let _ = std::fs::remove_dir_all(&dir);
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| sorted[((sorted.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{}",
        json!({
            "patches": patches, "artifact_bytes": size,
            "p50_ms": round(pct(0.50)), "p95_ms": round(pct(0.95)), "p99_ms": round(pct(0.99)),
            "max_ms": round(pct(1.0)), "min_ms": round(pct(0.0)),
        })
    );
    Ok(())
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

async fn fanout(mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let mut aether: Option<PathBuf> = None;
    let mut pods = 200usize;
    let mut rounds = 5usize;
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--aether" => aether = Some(value.into()),
            "--pods" => pods = value.parse()?,
            "--rounds" => rounds = value.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let aether = aether.context("--aether is required")?;
    let emu = Emulator::start().await?;
    let dir = std::env::temp_dir().join(format!("aether-fanout-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = emu.write_kubeconfig(&dir)?;
    let labels = json!({"app.kubernetes.io/name": "app", "app.kubernetes.io/managed-by": "aether"});
    emu.create(
        "deployments",
        Some("default"),
        json!({"metadata": {"name": "app", "labels": labels, "annotations": {"aether.dev/dev-hot": "true"}},
               "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "app", "image": "app"}]}}}}),
    )
    .map_err(anyhow::Error::msg)?;
    for i in 0..pods {
        emu.create(
            "pods",
            Some("default"),
            json!({"metadata": {"name": format!("app-{i}"), "labels": labels},
                   "spec": {"containers": [{"name": "app", "image": "app"}]}}),
        )
        .map_err(anyhow::Error::msg)?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let serve = Proc::spawn(
        &aether,
        &["serve"],
        &[
            ("KUBECONFIG", kubeconfig.display().to_string()),
            ("AETHER_LISTEN", format!("127.0.0.1:{port}")),
            ("AETHER_DATA_DIR", dir.join("data").display().to_string()),
            ("AETHER_API_TOKEN", "bench".into()),
            ("RUST_LOG", "warn,aether::serve=info".into()),
        ],
    )?;
    serve
        .wait_for_log("aether serve listening", Duration::from_secs(20))
        .await
        .map_err(anyhow::Error::msg)?;
    aether_testkit::process::install_crypto();
    let http = reqwest::Client::new();
    let all_annotated = |want: &str| {
        (0..pods).all(|i| {
            emu.get("pods", Some("default"), &format!("app-{i}"))
                .and_then(|p| {
                    p.pointer("/metadata/annotations/aether.dev~1digest")
                        .cloned()
                })
                .is_some_and(|d| d == want)
        })
    };
    let mut api_ms = Vec::new();
    let mut reconcile_ms = Vec::new();
    for round in 0..rounds {
        let digest = aether_common::Digest::of(format!("api-{round}").as_bytes()).to_string();
        let start = Instant::now();
        http.post(format!("http://127.0.0.1:{port}/v1/apps/app/release"))
            .bearer_auth("bench")
            .header("content-type", "application/json")
            .body(json!({"digest": digest, "url": "https://artifacts.example/a.tgz"}).to_string())
            .send()
            .await?
            .error_for_status()?;
        while !all_annotated(&digest) {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("release did not reach every pod");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        api_ms.push(start.elapsed().as_secs_f64() * 1000.0);

        let digest = aether_common::Digest::of(format!("reconcile-{round}").as_bytes()).to_string();
        let start = Instant::now();
        emu.merge_patch("deployments", Some("default"), "app", &json!({"metadata": {"annotations": {
            "aether.dev/digest": digest, "aether.dev/artifact-url": "https://artifacts.example/b.tgz"}}}))
            .map_err(anyhow::Error::msg)?;
        while !all_annotated(&digest) {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the reconcile loop did not reach every pod");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        reconcile_ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    drop(serve);
    let _ = std::fs::remove_dir_all(&dir);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        round(v[v.len() / 2])
    };
    println!(
        "{}",
        json!({"pods": pods, "rounds": rounds,
               "release_api_median_ms": median(&mut api_ms), "release_api_max_ms": round(api_ms.iter().cloned().fold(0.0, f64::max)),
               "deployment_annotation_median_ms": median(&mut reconcile_ms), "deployment_annotation_max_ms": round(reconcile_ms.iter().cloned().fold(0.0, f64::max))})
    );
    Ok(())
}
