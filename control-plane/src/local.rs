//! `aether dev --hot --local DIR -- CMD…`: the whole hot-reload loop on one machine, no
//! cluster, through the production pipeline: snapshot (or pack) → the embedded store → a
//! Downward-API-format annotations file → `aether-fetcher` (file mode: fetch, verify,
//! assemble or extract, swap) → `aether-fetcher supervise` restarting CMD in the new
//! release.
//! Nothing is copied directly: the app only ever sees what the fetcher put live.
//!
//! The loop's children die with it: SIGTERM, SIGINT and SIGHUP stop them cleanly, and
//! each child asks the kernel (`PR_SET_PDEATHSIG`) for a SIGTERM should `aether` itself be
//! killed outright; the supervisor passes it on to the app's process group.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use aether_common::Digest;
use aether_common::contract::annotations::{ARTIFACT_URL, DIGEST, FORMAT, Format};
use aether_common::contract::status::StatusReport;
use aether_common::release::delta;
use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::dev::{self, Burst, short};
use crate::known::KnownBlobs;
use crate::live;
use crate::publish::FormatArg;
use crate::snapshot::{self, HashCache};
use crate::store::{Kind, Store};

/// The app name of the local loop's manifests (the fetcher is started with it).
const LOCAL_APP: &str = "local";

const LIVE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct LocalArgs {
    pub dir: PathBuf,
    pub command: Vec<String>,
    pub work: Option<PathBuf>,
    pub grace_sec: u64,
    pub format: FormatArg,
    /// Show the fetcher's and the supervisor's info logs (else warnings and errors only).
    pub verbose: bool,
    /// Probed after each restart: the loop reports save → app answering.
    pub ready_url: Option<reqwest::Url>,
}

/// Where `aether-fetcher` is: `AETHER_FETCHER_BIN`, else beside this binary, else `PATH`.
fn fetcher_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AETHER_FETCHER_BIN") {
        return p.into();
    }
    if let Ok(exe) = std::env::current_exe() {
        let sibling = exe.with_file_name("aether-fetcher");
        if sibling.exists() {
            return sibling;
        }
    }
    PathBuf::from("aether-fetcher")
}

/// Writes the annotations file as the kubelet does: a fresh directory, then an atomic
/// swap of the `..data` link, so the fetcher never reads a half-written file.
fn write_downward(
    dir: &Path,
    annotations: &BTreeMap<String, String>,
    generation: u64,
) -> anyhow::Result<()> {
    let data = dir.join(format!("..{generation}"));
    std::fs::create_dir_all(&data)?;
    let mut text = String::new();
    for (k, v) in annotations {
        text.push_str(&format!("{k}={}\n", serde_json::to_string(v)?));
    }
    std::fs::write(data.join("annotations"), text)?;
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(data.file_name().context("name")?, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    let link = dir.join("annotations");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/annotations", &link)?;
    }
    if generation > 1 {
        let _ = std::fs::remove_dir_all(dir.join(format!("..{}", generation - 1)));
    }
    Ok(())
}

/// One log line of our own binaries (`AETHER_LOG_FORMAT=json`), as `LEVEL message k=v…`
/// with its level; `None` for anything else (the app's own output).
fn our_log(line: &str) -> Option<(String, String)> {
    let serde_json::Value::Object(fields) = serde_json::from_str(line).ok()? else {
        return None;
    };
    let level = fields.get("level")?.as_str()?.to_owned();
    if !fields.get("target")?.as_str()?.starts_with("aether") {
        return None;
    }
    let mut text = format!("{level} ");
    if let Some(m) = fields.get("message").and_then(|m| m.as_str()) {
        text.push_str(m);
    }
    for (k, v) in &fields {
        if matches!(k.as_str(), "timestamp" | "level" | "target" | "message") {
            continue;
        }
        match v {
            serde_json::Value::String(s) => text.push_str(&format!(" {k}={s}")),
            other => text.push_str(&format!(" {k}={other}")),
        }
    }
    Some((level, text))
}

/// Spawns one of our binaries (logging JSON), whose stderr lines are broadcast as text.
/// Its own log lines are echoed as `[name] …` when `verbose` or at warn and above; any
/// other line is the app's output (the supervisor shares its stderr with the app) and is
/// always echoed as `[app] …`. The child gets SIGTERM from the kernel if this process
/// dies without stopping it (SIGKILL).
fn spawn_logged(
    mut cmd: Command,
    name: &'static str,
    lines: broadcast::Sender<String>,
    verbose: bool,
) -> anyhow::Result<Child> {
    cmd.env("AETHER_LOG_FORMAT", "json");
    let parent = std::process::id();
    // SAFETY: between fork and exec only async-signal-safe calls: prctl, getppid, raise.
    unsafe {
        cmd.pre_exec(move || {
            // Fires when the thread that forked exits: a tokio worker thread, which lives
            // as long as the runtime, that is as long as this process.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        });
    }
    cmd.stderr(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    if let Some(err) = child.stderr.take() {
        tokio::spawn(async move {
            let mut reader = BufReader::new(err).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let line = match our_log(&line) {
                    Some((level, text)) => {
                        if verbose || matches!(level.as_str(), "WARN" | "ERROR") {
                            eprintln!("[{name}] {text}");
                        }
                        text
                    }
                    None => {
                        eprintln!("[app] {line}");
                        line
                    }
                };
                let _ = lines.send(line);
            }
        });
    }
    Ok(child)
}

pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    if args.command.is_empty() {
        bail!(
            "give the app command after `--`, for example: aether dev --hot --local DIR -- python3 -m http.server 8080"
        );
    }
    let dir = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("source directory {}", args.dir.display()))?;
    let work = match &args.work {
        Some(w) => w.clone(),
        None => std::env::temp_dir().join(format!("aether-local-{}", std::process::id())),
    };
    let workspace = work.join("workspace");
    let podinfo = work.join("podinfo");
    std::fs::create_dir_all(&workspace)?;
    std::fs::create_dir_all(&podinfo)?;
    // One store for the loop and its server: the patch the loop keeps for each manifest
    // is the one the fetcher's request finds (a second instance would make it again
    // from both manifests on disk: ~8 ms of each 40,000-file save).
    let store = std::sync::Arc::new(Store::open(&work.join("store"), 1 << 30)?.scratch());
    let (store_addr, _server) = crate::serve::serve_store_only(store.clone()).await?;
    println!(
        "local loop: source {}, workspace {}, store http://{store_addr}",
        dir.display(),
        workspace.display()
    );

    let (lines, _) = broadcast::channel::<String>(1024);
    let fetcher_path = fetcher_bin();
    let mut fetcher_cmd = Command::new(&fetcher_path);
    fetcher_cmd
        .env("AETHER_FETCH_MODE", "file")
        .env("AETHER_ANNOTATIONS_FILE", podinfo.join("annotations"))
        .env("AETHER_WORKSPACE", &workspace)
        .env("AETHER_ALLOW_HTTP", "1")
        .env("AETHER_MIN_REFRESH_INTERVAL_MS", "0")
        .env("AETHER_HTTP_ADDR", "127.0.0.1:0")
        .env("POD_NAME", "local")
        .env("AETHER_APP", LOCAL_APP)
        .env_remove("KUBECONFIG");
    let mut fetch_lines = lines.subscribe();
    let fetcher =
        spawn_logged(fetcher_cmd, "fetcher", lines.clone(), args.verbose).with_context(|| {
            format!(
                "is {} built? (cargo build -p aether-fetcher, or set AETHER_FETCHER_BIN)",
                fetcher_path.display()
            )
        })?;
    let status_addr = wait_line(
        &mut fetch_lines,
        "serving /metrics",
        Duration::from_secs(20),
    )
    .await
    .and_then(|l| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .map(str::to_owned)
    })
    .context("the fetcher did not start")?;
    let mut sup_cmd = Command::new(&fetcher_path);
    sup_cmd
        .arg("supervise")
        .arg("--grace-sec")
        .arg(args.grace_sec.to_string())
        .arg("--")
        .args(&args.command)
        .env("AETHER_WORKSPACE", &workspace)
        // The loop measures restarts: a reload mode from the user's shell would leave
        // the old process answering.
        .env_remove("AETHER_ON_RELEASE");
    let supervisor = spawn_logged(sup_cmd, "supervisor", lines.clone(), args.verbose)?;
    let http = reqwest::Client::new();
    let status_url = format!("http://{status_addr}/status");

    let (_watcher, mut bursts, changes) = dev::watch(&dir)?;
    let stopping = stop_signals()?;
    let now = Instant::now();
    let mut next = Some(Burst {
        first: now,
        quiet: now,
    });
    let mut last: Option<Digest> = None;
    let mut generation = 0u64;
    let mut source = Source {
        format: args.format,
        cache: None,
        changes,
        seq: None,
        stored: KnownBlobs::default(),
        last_manifest: None,
    };
    let children = (fetcher, supervisor);
    loop {
        let burst = match next.take() {
            Some(b) => b,
            None => tokio::select! {
                b = bursts.recv() => match b { Some(b) => b, None => break },
                () = stopping.cancelled() => break,
            },
        };
        let mut app_lines = lines.subscribe();
        // `last` is what the annotations file asks for, live or refused: an edit that
        // reverts to it is not a change, one that reverts to an earlier tree is.
        let result = refresh_once(
            &Target {
                dir: &dir,
                store: &store,
                store_addr,
                podinfo: &podinfo,
                http: &http,
                status_url: &status_url,
                ready_url: args.ready_url.as_ref(),
            },
            &mut source,
            &mut generation,
            &mut app_lines,
            burst,
            &mut last,
            Interrupts {
                bursts: &mut bursts,
                stopping: &stopping,
            },
        )
        .await;
        match result {
            Ok(Some(Next::Save(b))) => next = Some(b),
            Ok(Some(Next::Stop)) => break,
            Ok(None) => {}
            Err(e) => {
                // The store may have lost blobs (a temporary directory cleaned under us):
                // the next save asks it about every one.
                source.stored.clear();
                // And the tree is walked again, in case what failed was a stale entry.
                source.changes.mark_everything();
                println!("refresh failed: {e:#} (the app keeps running the previous release)")
            }
        }
        if stopping.is_cancelled() {
            break;
        }
    }
    println!("stopping the app and the fetcher");
    stop(children, Duration::from_secs(args.grace_sec)).await;
    if args.work.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

/// A token cancelled by the first SIGTERM, SIGINT or SIGHUP.
fn stop_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
        }
        cancel.cancel();
    });
    Ok(token)
}

/// What ended a wait early.
enum Next {
    /// A newer save: refresh it now.
    Save(Burst),
    /// A stop signal.
    Stop,
}

/// Where one refresh goes.
struct Target<'a> {
    dir: &'a Path,
    store: &'a Store,
    store_addr: std::net::SocketAddr,
    podinfo: &'a Path,
    http: &'a reqwest::Client,
    status_url: &'a str,
    ready_url: Option<&'a reqwest::Url>,
}

/// What may cut a refresh's wait short.
struct Interrupts<'a> {
    bursts: &'a mut mpsc::Receiver<Burst>,
    stopping: &'a CancellationToken,
}

/// Stops the supervisor (which stops the app within `grace`, then SIGKILLs its group) and
/// the fetcher. Each gets SIGTERM and the time its own stop needs; only past that is it
/// killed (by `kill_on_drop`).
async fn stop((mut fetcher, mut supervisor): (Child, Child), grace: Duration) {
    const MARGIN: Duration = Duration::from_secs(5);
    for (child, budget) in [(&mut supervisor, grace + MARGIN), (&mut fetcher, MARGIN)] {
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) on our own child; no memory is touched.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        let _ = tokio::time::timeout(budget, child.wait()).await;
    }
}

/// How the loop turns the tree into a release, with what it keeps between saves.
struct Source {
    format: FormatArg,
    cache: Option<HashCache>,
    /// What the watcher saw change since the last snapshot.
    changes: snapshot::Changes,
    seq: Option<u64>,
    /// Blobs this loop has put in its store (which only it writes, and never prunes): a
    /// save asks the store only about the others, not about every file of the tree.
    stored: KnownBlobs,
    /// The manifest stored last: the next one is stored with the patch from it, which
    /// the fetcher asks for (`release::delta`) and the store then has at hand.
    last_manifest: Option<(Digest, bytes::Bytes)>,
}

/// A release in the store, ready to be annotated.
struct Stored {
    digest: Digest,
    /// Identifies the tree's content (equal for an unchanged tree).
    tree: Digest,
    annotations: BTreeMap<String, String>,
    /// How the tree was read: `pack`, `walk` (every path) or `patch` (the watcher's).
    read: &'static str,
}

impl Source {
    /// Puts the release of `dir` in the store; `None` when the tree is `last`.
    async fn store(
        &mut self,
        target: &Target<'_>,
        last: Option<Digest>,
    ) -> anyhow::Result<Option<Stored>> {
        let mut annotations = BTreeMap::new();
        if self.format == FormatArg::Tar {
            let packed = dev::pack_dir(target.dir.to_path_buf())
                .await
                .context("packing")?;
            if Some(packed.digest) == last {
                return Ok(None);
            }
            let digest = packed.digest;
            target
                .store
                .put(digest, one_chunk(packed.bytes))
                .await
                .context("storing the artifact")?;
            annotations.insert(DIGEST.to_owned(), digest.to_string());
            annotations.insert(
                ARTIFACT_URL.to_owned(),
                format!("http://{}/v1/artifacts/{digest}", target.store_addr),
            );
            return Ok(Some(Stored {
                digest,
                tree: digest,
                read: "pack",
                annotations,
            }));
        }
        let seq = snapshot::next_seq(self.seq);
        let release = snapshot::Release {
            app: LOCAL_APP.to_owned(),
            seq,
            expires_at: None,
        };
        let snap =
            snapshot::take(target.dir, &mut self.cache, release, Some(&self.changes)).await?;
        if Some(snap.tree) == last {
            self.stored.unchanged(&snap);
            return Ok(None);
        }
        let wanted = self.stored.unknown(&snap);
        for digest in target.store.missing_blobs(&wanted).await? {
            let Some((path, _)) = snap.blobs.get(&digest) else {
                continue;
            };
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            target
                .store
                .put_of(Kind::Blob, digest, one_chunk(bytes))
                .await
                .with_context(|| format!("storing {} (changed while stored?)", path.display()))?;
        }
        let manifest = snap.bytes.clone();
        // The patch from the manifest stored last is made while this one is stored: the
        // fetcher asks for it (`release::delta`) as soon as the annotation names the new
        // one. It only saves bytes: a save goes on without it.
        // Cloned (shared bytes), not taken: a failed store keeps the base of the next patch.
        let patching = self.last_manifest.clone().map(|(base, held)| {
            let new = manifest.clone();
            (
                base,
                tokio::task::spawn_blocking(move || delta::encode(&held, &new)),
            )
        });
        target
            .store
            .put_bytes(Kind::Blob, snap.digest, manifest.clone())
            .await
            .context("storing the manifest")?;
        if let Some((base, patching)) = patching {
            match patching.await {
                Ok(patch) => target
                    .store
                    .keep_patch(base, snap.digest, patch, manifest.len()),
                Err(e) => tracing::warn!(error = %e, "could not make the manifest's patch"),
            }
        }
        self.last_manifest = Some((snap.digest, manifest));
        self.stored.confirm(&snap, wanted);
        self.seq = Some(seq);
        annotations.insert(DIGEST.to_owned(), snap.digest.to_string());
        annotations.insert(
            ARTIFACT_URL.to_owned(),
            format!("http://{}/v1/blobs/{}", target.store_addr, snap.digest),
        );
        annotations.insert(FORMAT.to_owned(), Format::Manifest.as_str().to_owned());
        Ok(Some(Stored {
            digest: snap.digest,
            tree: snap.tree,
            read: if snap.walked { "walk" } else { "patch" },
            annotations,
        }))
    }
}

fn one_chunk(
    bytes: impl Into<bytes::Bytes>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Unpin {
    futures::stream::iter([Ok(bytes.into())])
}

/// One save: snapshot (or pack), store, annotate, wait until the fetcher has it live and
/// the app restarted. Returns what cut the wait short, if anything did.
async fn refresh_once(
    target: &Target<'_>,
    source: &mut Source,
    generation: &mut u64,
    app_lines: &mut broadcast::Receiver<String>,
    burst: Burst,
    last: &mut Option<Digest>,
    interrupts: Interrupts<'_>,
) -> anyhow::Result<Option<Next>> {
    let Some(stored) = source.store(target, *last).await? else {
        println!("unchanged tree (no refresh)");
        return Ok(None);
    };
    let t_store = Instant::now();
    let (digest, read) = (stored.digest, stored.read);
    let live_before = fetcher_status(target.http, target.status_url)
        .await
        .is_some_and(|s| s.current_digest == Some(digest));
    *generation += 1;
    write_downward(target.podinfo, &stored.annotations, *generation)?;
    *last = Some(stored.tree);
    if live_before {
        println!("back on {} (still live, no restart)", short(&digest));
        return Ok(None);
    }
    let observe = |_| async {
        let status = fetcher_status(target.http, target.status_url).await;
        Ok(vec![("local".to_owned(), status)])
    };
    let Interrupts { bursts, stopping } = interrupts;
    let interrupted = async {
        tokio::select! {
            b = bursts.recv() => b.map_or(Next::Stop, Next::Save),
            () = stopping.cancelled() => Next::Stop,
        }
    };
    let progress = match live::wait(
        &digest,
        observe,
        live::Pace::LOCAL,
        LIVE_TIMEOUT,
        interrupted,
    )
    .await
    {
        live::Outcome::Settled(p) => p,
        live::Outcome::Superseded(next, _) => {
            if matches!(next, Next::Save(_)) {
                println!("superseded {} by a newer save", short(&digest));
            }
            return Ok(Some(next));
        }
        live::Outcome::TimedOut(_) => {
            bail!("{} did not go live within {LIVE_TIMEOUT:?}", short(&digest))
        }
    };
    if let Some((_, e)) = progress.refused.first() {
        bail!(
            "the fetcher refused {}: {} ({})",
            short(&digest),
            e.reason,
            e.message
        );
    }
    let t_live = Instant::now();
    let restarted = format!("release={}", digest.hex());
    let started = tokio::select! {
        line = wait_line(app_lines, &restarted, LIVE_TIMEOUT) => line,
        () = stopping.cancelled() => return Ok(Some(Next::Stop)),
    };
    let t_app = Instant::now();
    if started.is_none() {
        bail!("{} is live but the app did not restart", short(&digest));
    }
    let stages = format!(
        "debounce {} ms, snapshot+store {} ms ({}), fetch→live {} ms, restart {} ms",
        (burst.quiet - burst.first).as_millis(),
        (t_store - burst.quiet).as_millis(),
        read,
        (t_live - t_store).as_millis(),
        (t_app - t_live).as_millis(),
    );
    let Some(url) = target.ready_url else {
        println!(
            "live {} and app restarted in {} ms ({stages}; save → process started, not probed: --ready-url)",
            short(&digest),
            (t_app - burst.first).as_millis(),
        );
        return Ok(None);
    };
    // The supervisor starts the new process only once the old one is gone: whatever
    // answers now is the new code.
    let answered = tokio::select! {
        a = probe(target.http, url, LIVE_TIMEOUT) => a,
        () = stopping.cancelled() => return Ok(Some(Next::Stop)),
    };
    let t_ready = Instant::now();
    if !answered {
        bail!(
            "{} is live and the app restarted, but {} did not answer within {LIVE_TIMEOUT:?}",
            short(&digest),
            url
        );
    }
    println!(
        "live {} and app ready in {} ms ({stages}, ready {} ms; save → {} answered)",
        short(&digest),
        (t_ready - burst.first).as_millis(),
        (t_ready - t_app).as_millis(),
        url,
    );
    Ok(None)
}

/// Polls `url` until the app answers it (any status below 500) or `timeout` passes.
async fn probe(http: &reqwest::Client, url: &reqwest::Url, timeout: Duration) -> bool {
    const EVERY: Duration = Duration::from_millis(10);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let answer = http
            .get(url.clone())
            .timeout(Duration::from_secs(1))
            .send()
            .await;
        if answer.is_ok_and(|r| r.status().as_u16() < 500) {
            return true;
        }
        if tokio::time::Instant::now() + EVERY >= deadline {
            return false;
        }
        tokio::time::sleep(EVERY).await;
    }
}

async fn fetcher_status(http: &reqwest::Client, url: &str) -> Option<StatusReport> {
    let text = http.get(url).send().await.ok()?.text().await.ok()?;
    serde_json::from_str(&text).ok()
}

async fn wait_line(
    rx: &mut broadcast::Receiver<String>,
    needle: &str,
    timeout: Duration,
) -> Option<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(line)) if line.contains(needle) => return Some(line),
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            _ => return None,
        }
    }
}
