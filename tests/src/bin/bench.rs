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
//!
//! `aether-bench store --aether PATH --fetcher PATH [--fetchers 100] [--mb 50]`: N fetchers
//! (`--once`, each its own pod and workspace) pull one release of MB megabytes at once,
//! (a) streamed by `aether serve` from its data directory and (b) redirected by it to
//! presigned URLs of an S3 bucket (moto's server). Per mode: wall time until every fetcher
//! has it live, aggregate throughput, and the control plane's CPU seconds and peak RSS
//! over the pull (and the S3 server's CPU seconds, for scale).

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
    if mode == "store" {
        return store(args).await;
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

fn hundredths(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// Peak resident set size so far, in MiB (VmHWM).
fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

async fn store(mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let mut aether: Option<PathBuf> = None;
    let mut fetcher: Option<PathBuf> = None;
    let mut fetchers = 100usize;
    let mut mb = 50usize;
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--aether" => aether = Some(value.into()),
            "--fetcher" => fetcher = Some(value.into()),
            "--fetchers" => fetchers = value.parse()?,
            "--mb" => mb = value.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let aether = aether.context("--aether is required")?;
    let fetcher = fetcher.context("--fetcher is required")?;
    let emu = Emulator::start().await?;
    let moto = aether_testkit::s3::Moto::start()
        .await
        .map_err(anyhow::Error::msg)?;
    moto.create_bucket("bench")
        .await
        .map_err(anyhow::Error::msg)?;
    let dir = std::env::temp_dir().join(format!("aether-store-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = emu.write_kubeconfig(&dir)?;
    let release = aether_testkit::artifacts::incompressible_release(7, mb << 20);
    let digest = aether_common::Digest::of(&release);
    aether_testkit::process::install_crypto();
    let http = reqwest::Client::new();
    let mut results = Vec::new();
    for (mode, s3) in [
        ("local disk, streamed", false),
        ("S3, presigned redirect", true),
    ] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let base = format!("http://127.0.0.1:{port}");
        let mut env = vec![
            ("KUBECONFIG", kubeconfig.display().to_string()),
            ("AETHER_LISTEN", format!("127.0.0.1:{port}")),
            (
                "AETHER_DATA_DIR",
                dir.join(format!("data-{s3}")).display().to_string(),
            ),
            ("AETHER_API_TOKEN", "bench".into()),
            ("RUST_LOG", "warn,aether::serve=info".into()),
        ];
        if s3 {
            env.push(("AETHER_STORE", "s3://bench/releases".into()));
            env.extend(moto.aws_env());
        }
        let serve = Proc::spawn(&aether, &["serve"], &env)?;
        serve
            .wait_for_log("aether serve listening", Duration::from_secs(30))
            .await
            .map_err(anyhow::Error::msg)?;
        http.put(format!("{base}/v1/artifacts/{digest}"))
            .bearer_auth("bench")
            .body(release.clone())
            .send()
            .await?
            .error_for_status()?;
        for i in 0..fetchers {
            emu.create(
                "pods",
                Some("default"),
                json!({"metadata": {"name": format!("{}-{i}", if s3 { "s3" } else { "local" }),
                        "annotations": {"aether.dev/digest": digest.to_string(),
                                        "aether.dev/artifact-url": format!("{base}/v1/artifacts/{digest}")}},
                       "spec": {"containers": [{"name": "app", "image": "app"}]}}),
            )
            .map_err(anyhow::Error::msg)?;
        }
        let pid = serve.pid().context("serve exited")?;
        // Peak RSS from here on: the upload above is not what is measured.
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
        let cpu0 = cpu_seconds(pid)?;
        let moto_pid = moto.pid().context("moto exited")?;
        let moto_cpu0 = cpu_seconds(moto_pid)?;
        let start = Instant::now();
        let mut procs = Vec::with_capacity(fetchers);
        for i in 0..fetchers {
            let pod = format!("{}-{i}", if s3 { "s3" } else { "local" });
            let workspace = dir.join(format!("ws-{pod}"));
            std::fs::create_dir_all(&workspace)?;
            procs.push(Proc::spawn(
                &fetcher,
                &["--once"],
                &[
                    ("KUBECONFIG", kubeconfig.display().to_string()),
                    ("POD_NAME", pod),
                    ("POD_NAMESPACE", "default".into()),
                    ("AETHER_WORKSPACE", workspace.display().to_string()),
                    ("AETHER_HTTP_ADDR", "127.0.0.1:0".into()),
                    ("AETHER_ALLOW_HTTP", "1".into()),
                    ("RUST_LOG", "warn".into()),
                ],
            )?);
        }
        let mut failed = 0;
        for p in &mut procs {
            let status = p.wait_exit(Duration::from_secs(600)).await;
            if !status.is_some_and(|s| s.success()) {
                failed += 1;
                eprintln!("a fetcher failed: {}", p.logs().join("\n"));
            }
        }
        let wall = start.elapsed().as_secs_f64();
        if failed > 0 {
            bail!("{failed} of {fetchers} fetchers failed ({mode})");
        }
        let cpu = cpu_seconds(pid)? - cpu0;
        let rss = peak_rss_mib(pid)?;
        let moto_cpu = cpu_seconds(moto_pid)? - moto_cpu0;
        results.push(json!({
            "mode": mode, "fetchers": fetchers, "release_mb": mb,
            "wall_s": hundredths(wall), "throughput_mb_s": round((fetchers * mb) as f64 / wall),
            "control_plane_cpu_s": hundredths(cpu), "control_plane_peak_rss_mib": round(rss),
            "object_store_cpu_s": hundredths(moto_cpu),
        }));
        drop(serve);
        for i in 0..fetchers {
            let pod = format!("{}-{i}", if s3 { "s3" } else { "local" });
            let _ = std::fs::remove_dir_all(dir.join(format!("ws-{pod}")));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("{}", serde_json::Value::Array(results));
    Ok(())
}
