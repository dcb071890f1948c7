//! `aether-fetcher`: keeps a pod's shared volume on the release annotated on its own Pod.

mod assemble;
mod background;
mod config;
mod engine;
mod extract_bridge;
mod failure;
mod fetch;
mod hook;
mod http;
mod incremental;
mod metrics;
mod objects;
mod refresh;
mod source;
mod status;
mod supervise;
mod verify;
mod workspace;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use aether_common::archive::extract::Limits;
use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{FetchMode, SA_NAMESPACE_FILE, Settings};
use crate::engine::{Engine, EngineConfig};
use crate::hook::HookConfig;
use crate::metrics::Metrics;
use crate::refresh::Refresher;
use crate::source::Observed;
use crate::status::Status;
use crate::workspace::Workspace;

/// Exit code of `--once` when the release could not be applied.
const EXIT_REFRESH_FAILED: u8 = 1;
/// Exit code for bad settings or an unusable environment.
const EXIT_SETUP: u8 = 2;
/// A SIGTERM'd fetcher exits within a second (the pod's grace period is longer): this long
/// for the tasks to stop,
const SHUTDOWN_BUDGET: Duration = Duration::from_millis(700);
/// this long for removing staging (the next start removes what is left),
const CLEANUP_BUDGET: Duration = Duration::from_millis(100);
/// and this long for blocking threads, one of which may be stuck on a hung volume.
const BLOCKING_SHUTDOWN_BUDGET: Duration = Duration::from_millis(100);

#[derive(Debug, Parser)]
#[command(name = "aether-fetcher", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the app from the live release and restart it when a new release goes live
    /// (works as PID 1: reaps zombies, forwards SIGTERM/SIGINT).
    Supervise(supervise::SuperviseArgs),
    /// Copy this static binary into DIR (a shared volume), for app images without a shell.
    Install {
        /// Destination directory.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    aether_common::logging::init(cli.settings.log_format);
    if let Some(Command::Install { dir }) = &cli.command {
        return match install(dir) {
            Ok(path) => {
                tracing::info!(path = %path.display(), "installed");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("install failed: {e:#}");
                ExitCode::from(EXIT_SETUP)
            }
        };
    }
    if let Some(Command::Supervise(args)) = cli.command {
        let workspace = cli.settings.workspace.clone();
        let in_use_dir = cli.settings.in_use_dir.clone();
        // One thread: the supervisor waits on signals and its child, nothing more.
        let Some(runtime) = runtime(&mut tokio::runtime::Builder::new_current_thread()) else {
            return ExitCode::from(EXIT_SETUP);
        };
        return match runtime.block_on(supervise::run(workspace, in_use_dir, args)) {
            Ok(code) => code,
            Err(e) => {
                tracing::error!("supervise: {e:#}");
                ExitCode::from(EXIT_SETUP)
            }
        };
    }
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    limit_allocator_arenas();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // Few blocking threads: each may hold an allocator arena, and thousands of blob writes
    // through a 512-thread pool grew the fetcher past its 64 MiB limit.
    builder.worker_threads(2).max_blocking_threads(16);
    let Some(runtime) = runtime(&mut builder) else {
        return ExitCode::from(EXIT_SETUP);
    };
    let code = runtime.block_on(run(cli.settings));
    // Dropping a runtime waits for every blocking thread; one stuck in a system call (a
    // hung volume) must not keep a SIGTERM'd fetcher alive, so the wait is bounded.
    runtime.shutdown_timeout(BLOCKING_SHUTDOWN_BUDGET);
    code
}

/// Builds a runtime with every driver enabled; logs why when it cannot.
fn runtime(builder: &mut tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    builder
        .enable_all()
        .build()
        .map_err(|e| tracing::error!("cannot start the runtime: {e}"))
        .ok()
}

async fn run(settings: Settings) -> ExitCode {
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    match run_inner(settings, shutdown).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(EXIT_SETUP)
        }
    }
}

async fn run_inner(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let key = settings.public_key()?;
    let pod = settings.pod_name()?;
    let workspace = Arc::new(
        settings
            .open_workspace()
            .with_context(|| format!("opening workspace {}", settings.workspace.display()))?,
    );
    let removed = workspace
        .clean_staging()
        .context("removing stale staging")?;
    if removed > 0 {
        tracing::info!(removed, "removed staging left by an earlier run");
    }
    let previous = workspace.load_state();
    tracing::info!(
        "REFRESH_STATE failures={} last_digest={}",
        previous.as_ref().map_or(0, |s| s.consecutive_failures),
        workspace.live_digest().map(|d| d.hex()).unwrap_or_default()
    );
    let metrics = Arc::new(Metrics::install()?);
    let status = Arc::new(Status::default());
    let refresher = Refresher {
        workspace: workspace.clone(),
        http: fetch::client(&settings)?,
        key,
        max_artifact_bytes: settings.max_artifact_bytes,
        limits: Limits {
            max_bytes: settings.max_extract_bytes,
            max_entries: settings.max_entries,
            ..Limits::default()
        },
        keep_releases: usize::try_from(settings.keep_releases).unwrap_or(usize::MAX),
        app: settings.app.clone().filter(|a| !a.is_empty()),
        require_manifest: settings.require_manifest,
        high_water: std::sync::Mutex::new(incremental::high_water(&workspace, previous.as_ref())),
        objects_lock: Arc::default(),
        collector: Arc::default(),
        last_manifest: std::sync::Mutex::default(),
        lineage: std::sync::Mutex::default(),
    };
    let engine = Engine::new(
        EngineConfig {
            pod: pod.clone(),
            min_interval: Duration::from_millis(settings.min_refresh_interval_ms),
            backoff_max: Duration::from_millis(settings.backoff_max_ms),
            anomaly_threshold: settings.anomaly_fail_threshold,
            resync: settings.interval(),
            refresh_timeout: Duration::from_millis(settings.refresh_timeout_ms),
        },
        refresher,
        metrics.clone(),
        status.clone(),
        previous.as_ref(),
    );

    let pod_api = match settings.fetch_mode {
        FetchMode::File => None,
        FetchMode::Watch | FetchMode::Poll => Some(pod_api(&settings).await?),
    };

    if settings.once {
        let annotations = match &pod_api {
            Some(api) => source::get_pod_once(api, &pod)
                .await
                .with_context(|| format!("reading pod {pod}"))?,
            None => source::read_annotations_file(&settings.annotations_file)
                .await
                .map_err(anyhow::Error::msg)?,
        };
        let (tx, rx) = watch::channel(None);
        source::publish(&tx, &annotations, settings.allow_http);
        let observed: Option<Observed> = rx.borrow().clone();
        let Some(observed) = observed else {
            bail!("no desired state");
        };
        let result = engine.once(observed, shutdown.clone()).await;
        cleanup(&workspace);
        return Ok(match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("--once failed: {e}");
                ExitCode::from(EXIT_REFRESH_FAILED)
            }
        });
    }

    let hook = match HookConfig::from_settings(&settings)? {
        Some(cfg) => Some(tokio::spawn(hook::run(
            cfg,
            hook::client(&settings)?,
            engine.live_releases(),
            shutdown.clone(),
        ))),
        None => None,
    };
    let http = http::serve(settings.http_addr, metrics, status, shutdown.clone()).await?;
    let (tx, rx) = watch::channel(None);
    let allow_http = settings.allow_http;
    let source = match (settings.fetch_mode, pod_api) {
        (FetchMode::Watch, Some(api)) => tokio::spawn(source::watch_pod(
            api,
            pod.clone(),
            tx,
            allow_http,
            shutdown.clone(),
        )),
        (FetchMode::Poll, Some(api)) => tokio::spawn(source::poll_pod(
            api,
            pod.clone(),
            settings.interval(),
            tx,
            allow_http,
            shutdown.clone(),
        )),
        _ => tokio::spawn(source::watch_file(
            settings.annotations_file.clone(),
            settings.interval(),
            tx,
            allow_http,
            shutdown.clone(),
        )),
    };
    tracing::info!(pod = %pod, mode = ?settings.fetch_mode, workspace = %settings.workspace.display(), "aether-fetcher started");
    let engine = tokio::spawn(engine.run(rx, shutdown.clone()));
    shutdown.cancelled().await;
    let stopped = tokio::time::timeout(SHUTDOWN_BUDGET, async {
        let _ = engine.await;
        let _ = source.await;
        let _ = http.await;
        if let Some(hook) = hook {
            let _ = hook.await;
        }
    })
    .await;
    if stopped.is_err() {
        tracing::warn!("stopping took longer than {SHUTDOWN_BUDGET:?}; exiting anyway");
    }
    cleanup(&workspace);
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Removes the staging this run left, waiting at most `CLEANUP_BUDGET`: removing a large
/// tree from a slow or hung volume must not hold up a stop.
fn cleanup(workspace: &Arc<Workspace>) {
    let ws = workspace.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("cleanup".into())
        .spawn(move || {
            let _ = tx.send(ws.clean_staging());
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start removing staging on exit");
        return;
    }
    match rx.recv_timeout(CLEANUP_BUDGET) {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not remove staging on exit"),
        Err(_) => tracing::warn!(
            "removing staging takes longer than {CLEANUP_BUDGET:?}; the next start finishes it"
        ),
    }
}

async fn pod_api(settings: &Settings) -> anyhow::Result<Api<Pod>> {
    let conn = aether_common::kube::client::connect(settings.kubeconfig.as_deref()).await?;
    let namespace = match settings.pod_namespace.as_deref().filter(|n| !n.is_empty()) {
        Some(ns) => ns.to_owned(),
        None => match std::fs::read_to_string(SA_NAMESPACE_FILE) {
            Ok(ns) => ns.trim().to_owned(),
            Err(_) => conn.default_namespace,
        },
    };
    Ok(Api::namespaced(conn.client, &namespace))
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        shutdown.cancel();
    });
}

/// Copies the running binary into `dir` atomically (temporary file, then rename), so a
/// concurrently starting app never sees a half-written executable.
fn install(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe().context("locating the running binary")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dest = dir.join("aether-fetcher");
    let tmp = dir.join(".aether-fetcher.tmp");
    std::fs::copy(&exe, &tmp).with_context(|| format!("copying to {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("renaming to {}", dest.display()))?;
    Ok(dest)
}

/// glibc (the host build the local loop runs; the image's static build uses musl's
/// allocator) gives each thread that allocates an arena of its own and keeps what is freed
/// there: the first release of a 40,000-file tree peaked at 291 MiB with the default, 66 MiB
/// with two arenas. A sidecar with a memory limit wants the bound more than the speed.
fn limit_allocator_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two integers and changes only the allocator's settings; it is
    // called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
