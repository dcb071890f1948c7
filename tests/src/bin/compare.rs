//! `aether-compare`: aether-fetcher side by side with the legacy busybox loop
//! (`scripts/legacy/busybox-fetch-loop.sh`), against the same emulator code and the same
//! artifact server, in one run. Prints one JSON object; `scripts/bench-compare.sh` turns
//! it into the README table.
//!
//! usage: aether-compare --fetcher PATH --legacy PATH [--busybox busybox] [--patches 30]
//!        [--idle-sec 60] [--fleet 100] [--fleet-idle-sec 30] [--big-mb 100] [--runs 3]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aether_common::Digest;
use aether_common::archive::pack::ArchiveBuilder;
use aether_testkit::artifacts::ArtifactServer;
use aether_testkit::emulator::Emulator;
use aether_testkit::process::Proc;
use anyhow::{Context, bail};
use serde_json::{Value, json};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Fetcher,
    Legacy,
}

struct Opts {
    fetcher: PathBuf,
    legacy: PathBuf,
    busybox: String,
    patches: usize,
    idle: Duration,
    fleet: usize,
    fleet_idle: Duration,
    big_mb: usize,
    runs: usize,
    tmp: PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut fetcher = None;
    let mut legacy = None;
    let mut o = Opts {
        fetcher: PathBuf::new(),
        legacy: PathBuf::new(),
        busybox: "busybox".into(),
        patches: 30,
        idle: Duration::from_secs(60),
        fleet: 100,
        fleet_idle: Duration::from_secs(30),
        big_mb: 100,
        runs: 3,
        tmp: std::env::temp_dir().join(format!("aether-compare-{}", std::process::id())),
    };
    while let Some(arg) = args.next() {
        let v = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--fetcher" => fetcher = Some(PathBuf::from(v)),
            "--legacy" => legacy = Some(PathBuf::from(v)),
            "--busybox" => o.busybox = v,
            "--patches" => o.patches = v.parse()?,
            "--idle-sec" => o.idle = Duration::from_secs(v.parse()?),
            "--fleet" => o.fleet = v.parse()?,
            "--fleet-idle-sec" => o.fleet_idle = Duration::from_secs(v.parse()?),
            "--big-mb" => o.big_mb = v.parse()?,
            "--runs" => o.runs = v.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    o.fetcher = fetcher.context("--fetcher is required")?;
    o.legacy = legacy.context("--legacy is required")?;
    std::fs::create_dir_all(&o.tmp)?;
    aether_testkit::process::install_crypto();
    let result = run(&o).await;
    let _ = std::fs::remove_dir_all(&o.tmp);
    println!("{}", result?);
    Ok(())
}

async fn run(o: &Opts) -> anyhow::Result<Value> {
    eprintln!("latency: {} patches each", o.patches);
    let lat_f = latency(o, Kind::Fetcher).await?;
    let lat_l = latency(o, Kind::Legacy).await?;
    eprintln!("idle: {:?} each (concurrently)", o.idle);
    let (idle_f, idle_l) = tokio::try_join!(idle(o, Kind::Fetcher), idle(o, Kind::Legacy))?;
    eprintln!("big artifact: {} MB, {} runs each", o.big_mb, o.runs);
    let (big_f, big_l) = big(o).await?;
    eprintln!("fleet: {} agents each", o.fleet);
    let fleet_f = fleet(o, Kind::Fetcher).await?;
    let fleet_l = fleet(o, Kind::Legacy).await?;
    Ok(json!({
        "latency": {"fetcher": lat_f, "legacy": lat_l, "patches": o.patches},
        "idle": {"fetcher": idle_f, "legacy": idle_l, "seconds": o.idle.as_secs()},
        "big": {"fetcher": big_f, "legacy": big_l, "runs": o.runs},
        "fleet": {"fetcher": fleet_f, "legacy": fleet_l, "agents": o.fleet, "idle_seconds": o.fleet_idle.as_secs()},
    }))
}

fn spawn(
    o: &Opts,
    kind: Kind,
    emu: &Emulator,
    pod: &str,
    workspace: &Path,
    quiet: bool,
) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(workspace)?;
    let kubeconfig = emu.write_kubeconfig(workspace.parent().unwrap_or(workspace))?;
    let level = if quiet { "warn" } else { "info" };
    Ok(match kind {
        Kind::Fetcher => Proc::spawn(
            &o.fetcher,
            &[],
            &[
                ("KUBECONFIG", kubeconfig.display().to_string()),
                ("POD_NAME", pod.into()),
                ("POD_NAMESPACE", "default".into()),
                ("AETHER_WORKSPACE", workspace.display().to_string()),
                ("AETHER_HTTP_ADDR", "127.0.0.1:0".into()),
                ("AETHER_ALLOW_HTTP", "1".into()),
                ("AETHER_MIN_REFRESH_INTERVAL_MS", "0".into()),
                ("RUST_LOG", format!("{level},aether_fetcher::engine=info")),
            ],
        )?,
        Kind::Legacy => Proc::spawn(
            &o.busybox,
            &["sh", &o.legacy.display().to_string()],
            &[
                ("API_SERVER", emu.url()),
                ("POD_NAME", pod.into()),
                ("POD_NAMESPACE", "default".into()),
                ("AETHER_WORKSPACE", workspace.display().to_string()),
                ("AETHER_FETCH_INTERVAL_SEC", "5".into()),
                ("BUSYBOX", o.busybox.clone()),
            ],
        )?,
    })
}

fn pod(emu: &Emulator, name: &str) -> anyhow::Result<()> {
    emu.create(
        "pods",
        Some("default"),
        json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "i"}]}}),
    )
    .map(|_| ())
    .map_err(anyhow::Error::msg)
}

fn annotate(emu: &Emulator, name: &str, url: &str, digest: &Digest) -> anyhow::Result<()> {
    emu.merge_patch(
        "pods",
        Some("default"),
        name,
        &json!({"metadata": {"annotations": {"aether.dev/digest": digest.to_string(), "aether.dev/artifact-url": url}}}),
    )
    .map(|_| ())
    .map_err(anyhow::Error::msg)
}

/// Waits (polling every millisecond) until `proc` logged REFRESH_OK for `digest`.
async fn wait_ok(proc: &Proc, digest: &Digest, timeout: Duration) -> anyhow::Result<()> {
    let needle = format!("digest={}", digest.hex());
    let deadline = Instant::now() + timeout;
    loop {
        if proc
            .logs()
            .iter()
            .any(|l| l.contains("REFRESH_OK") && l.contains(&needle))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{digest} not live within {timeout:?}; last lines: {:?}",
                proc.logs().iter().rev().take(5).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn percentiles(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let pct = |p: f64| (v[((v.len() as f64 - 1.0) * p).round() as usize] * 10.0).round() / 10.0;
    json!({"p50_ms": pct(0.5), "p95_ms": pct(0.95), "max_ms": pct(1.0)})
}

async fn latency(o: &Opts, kind: Kind) -> anyhow::Result<Value> {
    let emu = Emulator::start().await?;
    let art = ArtifactServer::start().await?;
    pod(&emu, "p-0")?;
    let agent = spawn(
        o,
        kind,
        &emu,
        "p-0",
        &o.tmp.join(format!("lat-{kind:?}/ws")),
        false,
    )?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut samples = Vec::new();
    for i in 0..o.patches {
        let bytes = aether_testkit::artifacts::incompressible_release(i, 1 << 20);
        let digest = Digest::of(&bytes);
        let url = art.put(&format!("a{i}.tgz"), bytes);
        let start = Instant::now();
        annotate(&emu, "p-0", &url, &digest)?;
        wait_ok(&agent, &digest, Duration::from_secs(30)).await?;
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(percentiles(samples))
}

/// CPU time of a process and its waited-for children, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // After the command: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
    let ticks: f64 = [11, 12, 13, 14]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}

async fn idle(o: &Opts, kind: Kind) -> anyhow::Result<Value> {
    let emu = Emulator::start().await?;
    let art = ArtifactServer::start().await?;
    pod(&emu, "p-0")?;
    let bytes = aether_testkit::artifacts::incompressible_release(7, 1 << 20);
    let digest = Digest::of(&bytes);
    let url = art.put("a.tgz", bytes);
    annotate(&emu, "p-0", &url, &digest)?;
    let agent = spawn(
        o,
        kind,
        &emu,
        "p-0",
        &o.tmp.join(format!("idle-{kind:?}/ws")),
        false,
    )?;
    wait_ok(&agent, &digest, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = agent.pid().context("no pid")?;
    let (req0, cpu0) = (emu.stats().total, cpu_seconds(pid));
    tokio::time::sleep(o.idle).await;
    let (req1, cpu1) = (emu.stats().total, cpu_seconds(pid));
    let minutes = o.idle.as_secs_f64() / 60.0;
    Ok(json!({
        "requests_per_min": ((req1 - req0) as f64 / minutes * 10.0).round() / 10.0,
        "cpu_seconds": ((cpu1 - cpu0) * 100.0).round() / 100.0,
    }))
}

/// A ~`mb` MB tar.gz of base64-like text (gzip keeps ~76%), as in bench-pipeline.sh.
fn big_artifact(mb: usize) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = mb * 1_000_000 * 100 / 76;
    let mut b = ArchiveBuilder::new(Vec::new(), flate2::Compression::default());
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut written = 0;
    let mut i = 0;
    while written < raw {
        let n = (4 << 20).min(raw - written);
        let mut file = Vec::with_capacity(n);
        while file.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            for k in 0..8 {
                file.push(ALPHABET[((x >> (k * 6)) & 63) as usize]);
            }
            if file.len() % 77 == 76 {
                file.push(b'\n');
            }
        }
        let _ = b.file(&format!("f{i}.txt"), &file, 0o644);
        written += n;
        i += 1;
    }
    b.finish().unwrap_or_default()
}

/// Runs a command under /usr/bin/time -v; returns (wall ms, max RSS KiB).
fn timed(cmd: &mut std::process::Command, out: &Path) -> anyhow::Result<(f64, u64)> {
    let start = Instant::now();
    let status = cmd.status()?;
    let wall = start.elapsed().as_secs_f64() * 1000.0;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    let text = std::fs::read_to_string(out)?;
    let rss = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok((wall, rss))
}

async fn big(o: &Opts) -> anyhow::Result<(Value, Value)> {
    let bytes = tokio::task::spawn_blocking({
        let mb = o.big_mb;
        move || big_artifact(mb)
    })
    .await?;
    let size = bytes.len();
    let digest = Digest::of(&bytes);
    let art = ArtifactServer::start().await?;
    let url = art.put("big.tgz", bytes);
    let emu = Emulator::start().await?;
    pod(&emu, "big-0")?;
    annotate(&emu, "big-0", &url, &digest)?;
    let podinfo = o.tmp.join("podinfo");
    std::fs::create_dir_all(&podinfo)?;
    std::fs::write(
        podinfo.join("annotations"),
        format!("aether.dev/digest=\"{digest}\"\naether.dev/artifact-url=\"{url}\"\n"),
    )?;
    let time_out = o.tmp.join("time.txt");
    let (mut fw, mut fr, mut lw, mut lr) = (vec![], vec![], vec![], vec![]);
    for run in 0..o.runs {
        let ws = o.tmp.join(format!("big-f-{run}"));
        let mut cmd = std::process::Command::new("/usr/bin/time");
        cmd.arg("-v")
            .arg("-o")
            .arg(&time_out)
            .arg(&o.fetcher)
            .arg("--once")
            .env_clear()
            .env("AETHER_FETCH_MODE", "file")
            .env("AETHER_ANNOTATIONS_FILE", podinfo.join("annotations"))
            .env("AETHER_WORKSPACE", &ws)
            .env("AETHER_ALLOW_HTTP", "1")
            .env("AETHER_HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn");
        let (w, r) = tokio::task::block_in_place(|| timed(&mut cmd, &time_out))?;
        fw.push(w);
        fr.push(r);
        let _ = std::fs::remove_dir_all(&ws);

        let ws = o.tmp.join(format!("big-l-{run}"));
        let mut cmd = std::process::Command::new("/usr/bin/time");
        cmd.arg("-v")
            .arg("-o")
            .arg(&time_out)
            .arg(&o.busybox)
            .arg("sh")
            .arg(&o.legacy)
            .env("API_SERVER", emu.url())
            .env("POD_NAME", "big-0")
            .env("AETHER_WORKSPACE", &ws)
            .env("TMPDIR", &o.tmp)
            .env("LEGACY_ONCE", "1")
            .env("BUSYBOX", &o.busybox)
            .stdout(std::process::Stdio::null());
        let (w, r) = tokio::task::block_in_place(|| timed(&mut cmd, &time_out))?;
        lw.push(w);
        lr.push(r);
        let _ = std::fs::remove_dir_all(&ws);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2]).round()
    };
    let medu = |mut v: Vec<u64>| {
        v.sort();
        v[v.len() / 2]
    };
    let mb = size as f64 / 1e6;
    Ok((
        json!({"wall_ms": med(fw), "rss_kib": medu(fr), "artifact_mb": (mb * 10.0).round() / 10.0}),
        json!({"wall_ms": med(lw), "rss_kib": medu(lr), "artifact_mb": (mb * 10.0).round() / 10.0}),
    ))
}

async fn fleet(o: &Opts, kind: Kind) -> anyhow::Result<Value> {
    let emu = Emulator::start().await?;
    let art = ArtifactServer::start().await?;
    let mut agents = Vec::with_capacity(o.fleet);
    for i in 0..o.fleet {
        let name = format!("f-{i}");
        pod(&emu, &name)?;
        agents.push(spawn(
            o,
            kind,
            &emu,
            &name,
            &o.tmp.join(format!("fleet-{kind:?}-{i}/ws")),
            true,
        )?);
    }
    // Let every agent settle (list + watch, or its first poll).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let req0 = emu.stats().total;
    tokio::time::sleep(o.fleet_idle).await;
    let req1 = emu.stats().total;
    let bytes = aether_testkit::artifacts::incompressible_release(99, 1 << 20);
    let digest = Digest::of(&bytes);
    let url = art.put("fleet.tgz", bytes);
    let start = Instant::now();
    for i in 0..o.fleet {
        annotate(&emu, &format!("f-{i}"), &url, &digest)?;
    }
    for agent in &agents {
        wait_ok(agent, &digest, Duration::from_secs(60)).await?;
    }
    let all_live = start.elapsed().as_secs_f64() * 1000.0;
    drop(agents);
    Ok(json!({
        "idle_requests_per_sec": ((req1 - req0) as f64 / o.fleet_idle.as_secs_f64() * 100.0).round() / 100.0,
        "all_live_ms": all_live.round(),
    }))
}
