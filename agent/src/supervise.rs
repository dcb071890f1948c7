//! `aether-fetcher supervise -- CMD…`: runs the app from the live release and restarts it
//! when a new release goes live. It works as PID 1 of a container: it reaps every zombie
//! and forwards SIGTERM/SIGINT to the app's process group.
//!
//! A restart is: SIGTERM to the app's process group, up to the grace period for the whole
//! group to exit, SIGKILL, then start again with the working directory in the new release.
//! An app that exits on its own is restarted with backoff (0.5 s doubling to 10 s, reset
//! after 10 s of running); a new release restarts it at once. Whenever the app's leader
//! process ends, crash included, what is left of its group is stopped the same way before
//! the next start, so no orphan keeps the app's port.
//!
//! With `--on-release signal:<SIG>` the app is not restarted: it gets the signal after the
//! swap and keeps its process (and its working directory, the release it started in, so it
//! must read new code through `current`). With `--on-release none` it is left alone.
//!
//! While an app runs from a release, that release is marked in use
//! (`.aether/in-use/<hex>`): the fetcher never patches or prunes it under the app. An app
//! that is signalled rather than restarted keeps its start release marked (its working
//! directory) and the release it was last told about.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use aether_common::Digest;
use aether_common::contract::on_release::OnRelease;
use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::workspace::Workspace;

const CRASH_BACKOFF_MIN: Duration = Duration::from_millis(500);
const CRASH_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// An app that ran this long before exiting is not crash-looping: its backoff resets.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// How often the `current` link is re-read in case a file event is missed.
const LINK_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, clap::Args)]
pub struct SuperviseArgs {
    /// Seconds between SIGTERM and SIGKILL when stopping the app.
    #[arg(long, env = "AETHER_SUPERVISOR_GRACE_SEC", default_value_t = 3)]
    pub grace_sec: u64,
    /// What a new release does to the running app: `restart`, `signal:<SIG>` (for
    /// example `signal:HUP`; the app keeps its process) or `none`.
    #[arg(long, env = "AETHER_ON_RELEASE", default_value = "restart")]
    pub on_release: OnRelease,
    /// The app command, run with its working directory in the live release.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

struct App {
    pid: i32,
    started: Instant,
    /// The release it started in (its working directory).
    release: PathBuf,
    /// The releases it was last told about, newest last (at most [`TOLD_KEPT`]): `release`,
    /// then later ones it was signalled for (or left alone with) under
    /// `--on-release signal:…|none`. All stay marked in use: an app still reloading from
    /// the one before the newest must not see it patched.
    told: Vec<PathBuf>,
    /// The signal last sent for a new release, to recognise an app it killed.
    signalled: Option<i32>,
}

/// Releases told about that stay marked in use (besides the start release).
const TOLD_KEPT: usize = 2;

impl App {
    /// The release it was last told about.
    fn current(&self) -> &Path {
        self.told.last().unwrap_or(&self.release)
    }

    /// Every release it may be using: its working directory and what it was told about.
    fn held(&self) -> Vec<&Path> {
        let mut held: Vec<&Path> = vec![&self.release];
        held.extend(self.told.iter().map(PathBuf::as_path));
        held
    }
}

/// How the app ended.
#[derive(Debug, Clone, Copy)]
enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    fn from_wait_status(status: i32) -> Self {
        if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }

    fn code(self) -> u8 {
        match self {
            Exit::Code(c) => u8::try_from(c).unwrap_or(1),
            Exit::Signal(s) => u8::try_from(128 + s).unwrap_or(1),
        }
    }
}

/// Reaps every exited child (zombies of any descendant re-parented to us included);
/// returns the app's exit if it was among them.
fn reap(app_pid: Option<i32>) -> Option<Exit> {
    let mut app_exit = None;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG only writes the status integer we own.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return app_exit;
        }
        if Some(pid) == app_pid {
            app_exit = Some(Exit::from_wait_status(status));
        }
    }
}

fn signal_group(pid: i32, sig: i32) {
    // SAFETY: kill(2) on our child's process group; no memory is touched.
    unsafe {
        libc::kill(-pid, sig);
    }
}

/// Whether any process is left in the group (zombies not yet reaped included).
fn group_alive(pgid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks for existence.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

/// Stops what is left of a group whose leader has exited: SIGTERM, up to `grace` for it to
/// go, then SIGKILL. Members are re-parented to us (subreaper) and reaped here.
async fn drain_group(pgid: i32, grace: Duration) {
    if !group_alive(pgid) {
        return;
    }
    tracing::info!(
        pgid,
        "stopping what the app left running in its process group"
    );
    signal_group(pgid, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    let mut killed = false;
    while group_alive(pgid) {
        reap(None);
        if !killed && Instant::now() >= deadline {
            tracing::warn!(
                pgid,
                "processes of the app ignored SIGTERM for {grace:?}; sending SIGKILL"
            );
            signal_group(pgid, libc::SIGKILL);
            killed = true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The real directory `current` points at, if it exists.
fn live_release(workspace: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(workspace.join("current")).ok()
}

fn release_digest(release: &Path) -> Option<Digest> {
    Digest::from_hex(release.file_name()?.to_str()?).ok()
}

/// Marks the live release in use before anything runs from it, and returns it. The link
/// is read again after the mark: had it moved in between, the fetcher may have looked for
/// marks before this one was made, so the mark moves to the newer release — except from
/// the releases in `keep`, which a running app holds.
fn mark_live(workspace: &Path, ws: Option<&Workspace>, keep: &[&Path]) -> Option<PathBuf> {
    let mut release = live_release(workspace)?;
    let Some(ws) = ws else {
        return Some(release);
    };
    loop {
        let digest = release_digest(&release);
        if let Some(d) = &digest
            && let Err(e) = ws.mark_in_use(d)
        {
            tracing::warn!(error = %e, "could not mark the release in use");
        }
        let now = live_release(workspace)?;
        if now == release {
            return Some(release);
        }
        if !keep.contains(&release.as_path()) {
            unmark(ws, &release);
        }
        release = now;
    }
}

fn unmark(ws: &Workspace, release: &Path) {
    if let Some(d) = release_digest(release)
        && let Err(e) = ws.unmark_in_use(&d)
    {
        tracing::warn!(error = %e, "could not clear the in-use mark");
    }
}

fn start(command: &[String], release: &Path) -> anyhow::Result<App> {
    use std::os::unix::process::CommandExt;
    let (program, args) = command.split_first().context("empty command")?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .current_dir(release)
        .env("AETHER_RELEASE_DIR", release)
        // Its own process group, so a restart stops the app and everything it started.
        .process_group(0);
    let supervisor = std::process::id();
    // SAFETY: between fork and exec only async-signal-safe calls: prctl, getppid, raise.
    unsafe {
        cmd.pre_exec(move || {
            // A supervisor killed outright (SIGKILL, OOM) takes the app with it, as the
            // end of a container's PID 1 would: no orphan keeps the app's port. The
            // supervisor runs on one thread, the one that forks, for its whole life.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != supervisor {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {program:?} in {}", release.display()))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    // The child is reaped by `reap` (waitpid(-1)), not through this handle.
    drop(child);
    let name = release
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tracing::info!("SUPERVISE_START pid={pid} release={name}");
    Ok(App {
        pid,
        started: Instant::now(),
        release: release.to_path_buf(),
        told: vec![release.to_path_buf()],
        signalled: None,
    })
}

/// Tells a running app about the release `live` (already marked in use) without
/// restarting it: a signal to its process, or nothing. The oldest release it was told
/// about beyond [`TOLD_KEPT`] loses its mark (unless the app still holds it otherwise).
fn tell(app: &mut App, live: PathBuf, action: OnRelease, ws: Option<&Workspace>) {
    let name = live
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The marks first: whoever sees the app react sees them settled.
    app.told.push(live);
    if app.told.len() > TOLD_KEPT {
        let dropped = app.told.remove(0);
        if let Some(ws) = ws
            && !app.held().contains(&dropped.as_path())
        {
            unmark(ws, &dropped);
        }
    }
    if let OnRelease::Signal(sig) = action {
        // The leader only, as a config reloader does: workers the app forked are its own
        // business, and some die on signals their leader handles.
        // SAFETY: kill(2) on our own child; no memory is touched.
        unsafe {
            libc::kill(app.pid, sig);
        }
        app.signalled = Some(sig);
    }
    tracing::info!(
        "SUPERVISE_RELOAD pid={} release={name} action={action}",
        app.pid
    );
}

/// Stops the app: SIGTERM to its group, then SIGKILL after `grace`; returns when the whole
/// group is gone, with the leader's exit.
async fn stop(app: &App, grace: Duration) -> Exit {
    let started = Instant::now();
    let exit = stop_leader(app, grace).await;
    drain_group(app.pid, grace.saturating_sub(started.elapsed())).await;
    exit
}

async fn stop_leader(app: &App, grace: Duration) -> Exit {
    signal_group(app.pid, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        if let Some(exit) = reap(Some(app.pid)) {
            return exit;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!(
        pid = app.pid,
        "app ignored SIGTERM for {grace:?}; sending SIGKILL"
    );
    signal_group(app.pid, libc::SIGKILL);
    loop {
        if let Some(exit) = reap(Some(app.pid)) {
            return exit;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn run(
    workspace: PathBuf,
    in_use_dir: Option<PathBuf>,
    args: SuperviseArgs,
) -> anyhow::Result<ExitCode> {
    let grace = Duration::from_secs(args.grace_sec);
    // Orphans of the app are re-parented to us even when we are not PID 1, so they are
    // reaped too.
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        tracing::debug!("could not become a child subreaper");
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut chld = signal(SignalKind::child())?;
    let (link_tx, mut link_rx) = mpsc::channel::<()>(1);
    let _watcher = link_watcher(&workspace, link_tx)
        .map_err(|e| tracing::warn!(error = %e, "cannot watch the workspace; polling `current` every second"))
        .ok();
    let mut poll = tokio::time::interval(LINK_POLL);
    let mut app: Option<App> = None;
    let mut backoff = CRASH_BACKOFF_MIN;
    let mut restart_at: Option<Instant> = Some(Instant::now());
    let mut crashed_release: Option<PathBuf> = None;
    let ws = Workspace::open_with(&workspace, in_use_dir.as_deref())
        .and_then(|ws| ws.clear_in_use().map(|()| ws))
        .map_err(|e| tracing::warn!(error = %e, "cannot mark releases in use; the fetcher may patch one under the app"))
        .ok();
    let done = |app: &App| {
        if let Some(ws) = &ws {
            for release in app.held() {
                unmark(ws, release);
            }
        }
    };
    if live_release(&workspace).is_none() {
        tracing::info!(workspace = %workspace.display(), "waiting for the first release in `current`");
    }
    loop {
        if app.is_none() && restart_at.is_some_and(|t| Instant::now() >= t) {
            // Without a release yet, the start waits for one (below; the watcher or the
            // poll wakes the loop) instead of staying due, which spun a core until the
            // first release arrived.
            restart_at = None;
            if let Some(release) = mark_live(&workspace, ws.as_ref(), &[]) {
                match start(&args.command, &release) {
                    Ok(a) => {
                        crashed_release = None;
                        app = Some(a);
                    }
                    Err(e) => {
                        if let Some(ws) = &ws {
                            unmark(ws, &release);
                        }
                        tracing::error!("{e:#}");
                        restart_at = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(CRASH_BACKOFF_MAX);
                    }
                }
            }
        }
        let wake = restart_at.unwrap_or_else(|| Instant::now() + LINK_POLL);
        tokio::select! {
            _ = term.recv() => return Ok(shutdown(app.as_ref(), grace, "SIGTERM", done).await),
            _ = int.recv() => return Ok(shutdown(app.as_ref(), grace, "SIGINT", done).await),
            _ = chld.recv() => {
                if let Some(exit) = reap(app.as_ref().map(|a| a.pid)) && let Some(a) = app.take() {
                    drain_group(a.pid, grace).await;
                    done(&a);
                    let ran = a.started.elapsed();
                    if ran >= HEALTHY_RUN {
                        backoff = CRASH_BACKOFF_MIN;
                    }
                    if let (Exit::Signal(sig), Some(sent)) = (exit, a.signalled)
                        && sig == sent
                    {
                        // Not a crash: it cannot take the reload signal (a shell wrapper as
                        // the leader, or no handler yet). Start it in the new release now.
                        tracing::warn!(pid = a.pid, "the app died of SIG{} sent for the new release: its leader does not handle it (run the app itself, e.g. with exec, not through a wrapper); starting it again", OnRelease::signal_name(sig));
                        backoff = CRASH_BACKOFF_MIN;
                        restart_at = Some(Instant::now());
                        continue;
                    }
                    tracing::warn!(pid = a.pid, ?exit, ran_ms = ran.as_millis() as u64, "app exited; restarting in {backoff:?}");
                    restart_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(CRASH_BACKOFF_MAX);
                    crashed_release = Some(a.current().to_path_buf());
                }
            }
            Some(()) = link_rx.recv() => {}
            _ = poll.tick() => {}
            () = tokio::time::sleep_until(wake.into()), if restart_at.is_some() => {}
        }
        // A new release restarts the app at once, also out of a crash backoff.
        let live = live_release(&workspace);
        if let Some(live) = live {
            if let Some(a) = app.as_mut().filter(|a| a.current() != live) {
                match args.on_release {
                    OnRelease::Restart => {
                        tracing::info!(pid = a.pid, release = %live.display(), "new release live; restarting the app");
                        let exit = stop(a, grace).await;
                        done(a);
                        tracing::info!(pid = a.pid, ?exit, "app stopped");
                        app = None;
                        backoff = CRASH_BACKOFF_MIN;
                        restart_at = Some(Instant::now());
                    }
                    action => {
                        let held: Vec<PathBuf> = a.held().iter().map(|p| p.to_path_buf()).collect();
                        let held: Vec<&Path> = held.iter().map(PathBuf::as_path).collect();
                        if let Some(now) = mark_live(&workspace, ws.as_ref(), &held) {
                            tell(a, now, action, ws.as_ref());
                        }
                    }
                }
            } else if app.is_none() && crashed_release.as_ref().is_some_and(|r| r != &live) {
                crashed_release = None;
                backoff = CRASH_BACKOFF_MIN;
                restart_at = Some(Instant::now());
            } else if app.is_none() && restart_at.is_none() {
                // A release to start from at last: the first, or `current` resolvable
                // again after a due start found none (the crash backoff, if any, is over
                // and keeps its length).
                restart_at = Some(Instant::now());
            }
        }
    }
}

async fn shutdown(app: Option<&App>, grace: Duration, why: &str, done: impl Fn(&App)) -> ExitCode {
    let Some(app) = app else {
        tracing::info!("{why}: no app running; exiting");
        return ExitCode::SUCCESS;
    };
    tracing::info!(pid = app.pid, "{why}: stopping the app");
    let exit = stop(app, grace).await;
    done(app);
    tracing::info!(?exit, "app stopped; exiting");
    match exit {
        // Stopped by the signal we forwarded: a clean shutdown.
        Exit::Signal(libc::SIGTERM) | Exit::Code(0) => ExitCode::SUCCESS,
        other => ExitCode::from(other.code()),
    }
}

fn link_watcher(
    workspace: &Path,
    tx: mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |_e: notify::Result<notify::Event>| {
        let _ = tx.try_send(());
    })?;
    watcher.watch(workspace, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_release_signal_numbers_are_the_platforms() {
        for (name, sig) in [
            ("HUP", libc::SIGHUP),
            ("INT", libc::SIGINT),
            ("QUIT", libc::SIGQUIT),
            ("USR1", libc::SIGUSR1),
            ("USR2", libc::SIGUSR2),
            ("TERM", libc::SIGTERM),
            ("WINCH", libc::SIGWINCH),
        ] {
            assert_eq!(
                format!("signal:{name}").parse::<OnRelease>(),
                Ok(OnRelease::Signal(sig))
            );
        }
    }
}
