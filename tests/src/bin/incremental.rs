//! `aether-bench-incremental`: save → new code served, manifest releases side by side with
//! tar.gz releases of the same trees (`scripts/bench-incremental.sh` runs it).
//!
//! For each generated tree (SIZE bytes in FILES files) and each format, one 10 KB file is
//! rewritten SAVES times and the time from the write until the app serves the new bytes is
//! measured, in two set-ups:
//! - the local loop: `aether dev --hot --local DIR --format F -- aether-example-server`;
//! - the cluster path: the API emulator (in this process), `aether serve`, two "pods" (`--pods`; a
//!   real `aether-fetcher` watching its Pod object and `aether-fetcher supervise` running
//!   the example server) and `aether dev --hot app DIR --format F`; a save counts once all
//!   pods serve it. Bytes downloaded per pod per save come from the fetchers'
//!   `dev_hot_refresh_bytes_total{source="downloaded"}`, the time of each stage of their
//!   refresh from `dev_hot_refresh_stage_seconds_sum{stage}` (the apply time: from the
//!   manifest accepted to the swap), the whole refresh from their `REFRESH_OK … ms=`
//!   lines, their peak RSS from `VmHWM`.
//!
//! Prints one JSON object per (tree, format, set-up).
//!
//! usage: aether-bench-incremental --aether PATH --fetcher PATH [--pod-fetcher PATH] --app PATH
//!        [--trees 20000000:1000,200000000:5000,200000000:40000] [--saves 30] [--tar-saves 10]
//!        [--formats manifest,tar] [--pods 2]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aether_testkit::emulator::Emulator;
use aether_testkit::process::{Proc, free_port, http_get, metric};
use anyhow::{Context, bail};
use serde_json::json;

const LONG: Duration = Duration::from_secs(300);
const CHANGED: &str = "changed.txt";
const CHANGED_BYTES: usize = 10 * 1024;
/// The fetcher's stages (`dev_hot_refresh_stage_seconds{stage}`), in order.
const STAGES: [&str; 6] = [
    "wait", "manifest", "artifact", "objects", "assemble", "swap",
];
/// Where applying starts: waiting for the fetcher's background work and fetching and
/// checking the statement of what to apply come before; a tar.gz's single pass is the
/// whole apply.
const STAGE_APPLY_FROM: usize = 2;

struct Bins {
    aether: PathBuf,
    /// The local loop's fetcher (what `aether` finds beside itself on a developer's machine).
    fetcher: PathBuf,
    /// The "pods'" fetcher: the static musl build the image holds, whose allocator and
    /// memory are what a pod has.
    pod_fetcher: PathBuf,
    app: PathBuf,
    /// How many "pods" the cluster path runs (2 by default; 1 shows a pod's figures
    /// without another one competing for the machine's cores).
    pods: usize,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut aether, mut fetcher, mut pod_fetcher, mut app) = (None, None, None, None);
    let mut trees = "20000000:1000,200000000:5000,200000000:40000".to_owned();
    let mut saves = 30usize;
    let mut tar_saves = 10usize;
    let mut formats = "manifest,tar".to_owned();
    let mut pods = 2usize;
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--aether" => aether = Some(PathBuf::from(value)),
            "--fetcher" => fetcher = Some(PathBuf::from(value)),
            "--pod-fetcher" => pod_fetcher = Some(PathBuf::from(value)),
            "--app" => app = Some(PathBuf::from(value)),
            "--trees" => trees = value,
            "--saves" => saves = value.parse()?,
            "--tar-saves" => tar_saves = value.parse()?,
            "--formats" => formats = value,
            "--pods" => pods = value.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    // Absolute: the app is started in its release directory.
    let abs = |p: Option<PathBuf>, what: &str| -> anyhow::Result<PathBuf> {
        let p = p.with_context(|| format!("--{what} is required"))?;
        std::fs::canonicalize(&p).with_context(|| format!("--{what} {}", p.display()))
    };
    let fetcher = abs(fetcher, "fetcher")?;
    let bins = Bins {
        aether: abs(aether, "aether")?,
        pod_fetcher: match pod_fetcher {
            Some(p) => abs(Some(p), "pod-fetcher")?,
            None => fetcher.clone(),
        },
        fetcher,
        app: abs(app, "app")?,
        pods,
    };
    if pods == 0 {
        bail!("--pods 0: the cluster path needs at least one pod");
    }
    let formats: Vec<&str> = formats.split(',').collect();
    if formats.is_empty()
        || formats.iter().any(|f| !matches!(*f, "manifest" | "tar"))
        || formats
            .iter()
            .enumerate()
            .any(|(i, f)| formats[..i].contains(f))
    {
        bail!("--formats {formats:?}: manifest and/or tar, each once");
    }
    aether_testkit::process::install_crypto();
    let root = std::env::temp_dir().join(format!("aether-bench-inc-{}", std::process::id()));
    for spec in trees.split(',') {
        let (size, files) = spec.split_once(':').context("a tree is SIZE:FILES")?;
        let (size, files): (usize, usize) = (size.parse()?, files.parse()?);
        let src = root.join(format!("tree-{size}-{files}"));
        generate(&src, size, files)?;
        for &format in &formats {
            let n = if format == "tar" { tar_saves } else { saves };
            let work = root.join(format!("work-{size}-{files}-{format}"));
            let local = local_loop(&bins, &src, &work.join("local"), format, n).await?;
            println!(
                "{}",
                json!({"setup": "local", "tree_bytes": size, "files": files, "format": format, "saves": n,
                       "p50_ms": pct(&local, 50.0), "p99_ms": pct(&local, 99.0)})
            );
            let c = cluster(&bins, &src, &work.join("cluster"), format, n).await?;
            println!(
                "{}",
                json!({"setup": "cluster", "tree_bytes": size, "files": files, "format": format, "saves": n,
                       "pods": bins.pods,
                       "p50_ms": pct(&c.latency, 50.0), "p99_ms": pct(&c.latency, 99.0),
                       "downloaded_bytes_per_pod_per_save_p50": pct(&c.bytes, 50.0),
                       "fetcher_refresh_ms_p50": pct(&c.refresh, 50.0),
                       "fetcher_apply_ms_p50": pct(&c.apply, 50.0),
                       "fetcher_stage_ms_p50": STAGES.iter().zip(&c.stages)
                           .map(|(s, v)| (s.to_string(), json!(pct(v, 50.0))))
                           .collect::<serde_json::Map<_, _>>(),
                       "fetcher_peak_rss_mib": c.fetcher_rss_mib})
            );
            let _ = std::fs::remove_dir_all(&work);
        }
        let _ = std::fs::remove_dir_all(&src);
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// The milliseconds the loop's report gives `stage` (`… {stage} N ms …`).
fn stage_ms(line: &str, stage: &str) -> Option<f64> {
    let (_, rest) = line.split_once(&format!("{stage} "))?;
    rest.split_whitespace().next()?.parse().ok()
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    (v[i] * 10.0).round() / 10.0
}

/// A tree of `files` files of about `size` bytes in all, in nested directories of 100
/// files each (a `node_modules`-like shape), letters from a xorshift stream (text that
/// gzip shrinks about as much as source code), plus the 10 KB file the saves rewrite.
fn generate(dir: &Path, size: usize, files: usize) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let per_file = size / files.max(1);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; per_file];
    for i in 0..files {
        let sub = dir.join(format!("lib/pkg{:04}/src", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&sub)?;
        }
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = b'a' + (x % 26) as u8;
        }
        std::fs::write(sub.join(format!("m{i}.js")), &buf)?;
    }
    std::fs::write(dir.join(CHANGED), save_bytes(0))?;
    Ok(())
}

/// The changed file's content at save `n`: 10 KB whose first line names the save.
fn save_bytes(n: usize) -> Vec<u8> {
    let mut v = format!("save {n}\n").into_bytes();
    v.resize(CHANGED_BYTES, b'.');
    v
}

async fn serves(port: u16, n: usize) -> bool {
    let want = format!("save {n}\n");
    http_get(&format!("http://127.0.0.1:{port}/{CHANGED}"))
        .await
        .is_ok_and(|(code, body)| code == 200 && body.starts_with(&want))
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + LONG;
    while !check().await {
        if Instant::now() > deadline {
            bail!("{what} did not happen within {LONG:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Writes the set-up's dirty pages out (the tree, the store's blobs, each pod's objects
/// and release: over 600 MB for the largest tree) before the measured saves. Left to the
/// kernel, their writeback runs during the saves and takes CPU from them, more the larger
/// the tree: a cost of setting the benchmark up, not of a save.
async fn flush_setup_writes() -> anyhow::Result<()> {
    let status = tokio::process::Command::new("sync")
        .status()
        .await
        .context("running sync")?;
    anyhow::ensure!(status.success(), "sync failed: {status}");
    Ok(())
}

/// Rewrites the changed file for save `n`; returns the time until every app port serves it.
async fn save(src: &Path, ports: &[u16], n: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    std::fs::write(src.join(CHANGED), save_bytes(n))?;
    for port in ports {
        until("the app serving the save", async || serves(*port, n).await).await?;
    }
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

async fn local_loop(
    bins: &Bins,
    src: &Path,
    work: &Path,
    format: &str,
    saves: usize,
) -> anyhow::Result<Vec<f64>> {
    let port = free_port();
    std::fs::create_dir_all(work)?;
    let dev = Proc::spawn(
        &bins.aether,
        &[
            "dev",
            "--hot",
            "--local",
            "--format",
            format,
            src.to_str().context("path")?,
            "--work-dir",
            work.to_str().context("path")?,
            "--grace-sec",
            "1",
            "--",
            bins.app.to_str().context("path")?,
        ],
        &[
            ("AETHER_FETCHER_BIN", bins.fetcher.display().to_string()),
            ("XDG_CACHE_HOME", work.join("cache").display().to_string()),
            ("PORT", port.to_string()),
        ],
    )?;
    dev.wait_for_lines("app restarted in", 1, LONG)
        .await
        .map_err(anyhow::Error::msg)?;
    until("the app serving", async || serves(port, 0).await).await?;
    flush_setup_writes().await?;
    let mut latency = Vec::new();
    for n in 1..=saves {
        latency.push(save(src, &[port], n).await?);
        // The loop has reported the save before the next one starts.
        until("the loop reporting the save", async || {
            dev.lines_with("app restarted in").len() > n
        })
        .await?;
    }
    // Where a save's time went, as the loop itself reports it (for the README's analysis):
    // the p50 of each stage over the measured saves (the first line is the start).
    let reports = dev.lines_with("app restarted in");
    let measured = reports.get(1..).unwrap_or_default();
    let stages: Vec<String> = ["debounce", "snapshot+store", "fetch→live", "restart"]
        .iter()
        .map(|stage| {
            let ms: Vec<f64> = measured.iter().filter_map(|l| stage_ms(l, stage)).collect();
            format!("{stage} {} ms", pct(&ms, 50.0))
        })
        .collect();
    eprintln!("local {format}, stage p50s: {}", stages.join(", "));
    drop(dev);
    std::fs::write(src.join(CHANGED), save_bytes(0))?;
    Ok(latency)
}

struct Cluster {
    latency: Vec<f64>,
    bytes: Vec<f64>,
    /// The fetchers' `REFRESH_OK … ms=`: annotation seen → swapped.
    refresh: Vec<f64>,
    /// Per pod and save, ms in each of `STAGES`.
    stages: Vec<Vec<f64>>,
    /// Per pod and save, ms from the manifest accepted (a tar.gz: from the start) to the
    /// swap.
    apply: Vec<f64>,
    /// Largest peak RSS of the two fetchers, MiB.
    fetcher_rss_mib: f64,
}

async fn cluster(
    bins: &Bins,
    src: &Path,
    work: &Path,
    format: &str,
    saves: usize,
) -> anyhow::Result<Cluster> {
    std::fs::create_dir_all(work)?;
    let emu = Emulator::start().await?;
    let kubeconfig = emu.write_kubeconfig(work)?;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let serve = Proc::spawn(
        &bins.aether,
        &["serve"],
        &[
            ("KUBECONFIG", kubeconfig.display().to_string()),
            ("AETHER_LISTEN", format!("127.0.0.1:{port}")),
            ("AETHER_DATA_DIR", work.join("data").display().to_string()),
            ("AETHER_API_TOKEN", "bench".into()),
            ("RUST_LOG", "warn,aether::serve=info".into()),
        ],
    )?;
    serve
        .wait_for_log("aether serve listening", Duration::from_secs(20))
        .await
        .map_err(anyhow::Error::msg)?;
    let cli_env = [
        ("AETHER_API_URL", url.clone()),
        ("AETHER_API_TOKEN", "bench".to_owned()),
        ("XDG_CACHE_HOME", work.join("cache").display().to_string()),
    ];
    let mut deploy = Proc::spawn(
        &bins.aether,
        &[
            "deploy",
            "app",
            src.to_str().context("path")?,
            "--dev-hot",
            "--format",
            format,
            "--",
            "server",
        ],
        &cli_env,
    )?;
    let status = deploy.wait_exit(LONG).await.context("deploy")?;
    if !status.success() {
        bail!("deploy failed: {}", deploy.logs().join("\n"));
    }
    let mut pods = Vec::new();
    for i in 0..bins.pods {
        let name = format!("app-{i}");
        let (fport, aport) = (free_port(), free_port());
        emu.create(
            "pods",
            Some("default"),
            json!({"metadata": {"name": name,
                    "labels": {"app.kubernetes.io/name": "app", "app.kubernetes.io/managed-by": "aether"},
                    "annotations": {"emulator.aether.dev/address": format!("127.0.0.1:{fport}")}},
                   "spec": {"containers": [{"name": "app", "image": "app"}]}}),
        )
        .map_err(anyhow::Error::msg)?;
        let ws = work.join(&name);
        std::fs::create_dir_all(&ws)?;
        let fetcher = Proc::spawn(
            &bins.pod_fetcher,
            &[],
            &[
                ("KUBECONFIG", kubeconfig.display().to_string()),
                ("POD_NAME", name.clone()),
                ("POD_NAMESPACE", "default".into()),
                ("AETHER_APP", "app".into()),
                ("AETHER_WORKSPACE", ws.display().to_string()),
                ("AETHER_HTTP_ADDR", format!("127.0.0.1:{fport}")),
                ("AETHER_ALLOW_HTTP", "1".into()),
                ("AETHER_MIN_REFRESH_INTERVAL_MS", "100".into()),
                ("RUST_LOG", "warn,aether_fetcher::engine=info".into()),
            ],
        )?;
        let app = Proc::spawn(
            &bins.pod_fetcher,
            &[
                "supervise",
                "--grace-sec",
                "1",
                "--",
                bins.app.to_str().context("path")?,
            ],
            &[
                ("AETHER_WORKSPACE", ws.display().to_string()),
                ("PORT", aport.to_string()),
                ("RUST_LOG", "warn".into()),
            ],
        )?;
        pods.push((fetcher, app, fport, aport));
    }
    for (_, _, _, aport) in &pods {
        until("the first release served", async || serves(*aport, 0).await).await?;
    }
    let dev = Proc::spawn(
        &bins.aether,
        &[
            "dev",
            "--hot",
            "app",
            src.to_str().context("path")?,
            "--format",
            format,
        ],
        &cli_env,
    )?;
    // The loop's first release (the tree as it is) must be live before the saves.
    dev.wait_for_lines("live sha256", 1, LONG)
        .await
        .map_err(anyhow::Error::msg)?;
    flush_setup_writes().await?;
    // Per pod: bytes downloaded, then seconds spent in each stage, all totals so far.
    let counters = async || -> Vec<[f64; 1 + STAGES.len()]> {
        let mut all = Vec::new();
        for (_, _, fport, _) in &pods {
            let mut c = [0.0; 1 + STAGES.len()];
            if let Ok((_, text)) = http_get(&format!("http://127.0.0.1:{fport}/metrics")).await {
                let downloaded = "source=\"downloaded\"";
                c[0] = metric(&text, "dev_hot_refresh_bytes_total", downloaded).unwrap_or(0.0);
                for (i, stage) in STAGES.iter().enumerate() {
                    let label = format!("stage=\"{stage}\"");
                    c[1 + i] =
                        metric(&text, "dev_hot_refresh_stage_seconds_sum", &label).unwrap_or(0.0);
                }
            }
            all.push(c);
        }
        all
    };
    let ports: Vec<u16> = pods.iter().map(|p| p.3).collect();
    let oks_before: Vec<usize> = pods
        .iter()
        .map(|p| p.0.lines_with("REFRESH_OK").len())
        .collect();
    let mut latency = Vec::new();
    let mut bytes = Vec::new();
    let mut stages = vec![Vec::new(); STAGES.len()];
    let mut apply = Vec::new();
    for n in 1..=saves {
        let before = counters().await;
        latency.push(save(src, &ports, n).await?);
        // The fetchers' `/status` says live once their metrics have the refresh.
        until("the loop reporting the save", async || {
            dev.lines_with("live sha256").len() > n
        })
        .await?;
        let after = counters().await;
        bytes.push(
            after
                .iter()
                .zip(&before)
                .map(|(a, b)| a[0] - b[0])
                .sum::<f64>()
                / pods.len() as f64,
        );
        for (a, b) in after.iter().zip(&before) {
            let ms: Vec<f64> = (1..a.len()).map(|i| (a[i] - b[i]) * 1000.0).collect();
            for (i, v) in ms.iter().enumerate() {
                stages[i].push(*v);
            }
            // After the manifest is accepted (or the tar.gz downloaded): what applying it
            // costs.
            apply.push(ms[STAGE_APPLY_FROM..].iter().sum());
        }
    }
    if let Some(line) = dev.lines_with("live sha256").last() {
        eprintln!("cluster {format}, last save: {line}");
    }
    let mut refresh = Vec::new();
    for (p, before) in pods.iter().zip(oks_before) {
        for line in p.0.lines_with("REFRESH_OK").iter().skip(before) {
            if let Some(ms) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("ms="))
                .and_then(|v| v.parse::<f64>().ok())
            {
                refresh.push(ms);
            }
        }
    }
    let fetcher_rss_mib = pods
        .iter()
        .filter_map(|p| p.0.peak_rss_bytes())
        .max()
        .map_or(f64::NAN, |b| (b as f64 / 1048576.0 * 10.0).round() / 10.0);
    drop(dev);
    drop(pods);
    drop(serve);
    std::fs::write(src.join(CHANGED), save_bytes(0))?;
    Ok(Cluster {
        latency,
        bytes,
        refresh,
        stages,
        apply,
        fetcher_rss_mib,
    })
}
