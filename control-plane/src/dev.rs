//! `aether dev --hot`: watch a directory, and on each burst of changes pack, upload, patch,
//! and wait until every pod's fetcher reports the new digest live; print the latency.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aether_common::Digest;
use anyhow::Context;
use tokio::sync::mpsc;

use crate::client::Client;
use crate::publish::Publisher;
use crate::{live, pack, snapshot};

/// Quiet time that ends a burst of file events (editors write several files per save).
pub const DEBOUNCE: Duration = Duration::from_millis(80);
/// How long to wait for pods before reporting them as not live.
const LIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// A burst of file events: when it started and when it went quiet.
#[derive(Debug, Clone, Copy)]
pub struct Burst {
    pub first: Instant,
    pub quiet: Instant,
}

/// Watches `dir` recursively; yields one `Burst` per group of changes, and marks the
/// changed paths in `Changes` (before the burst is signalled) for the next snapshot.
pub fn watch(
    dir: &Path,
) -> anyhow::Result<(
    notify::RecommendedWatcher,
    mpsc::Receiver<Burst>,
    snapshot::Changes,
)> {
    use notify::Watcher;
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let changes = snapshot::Changes::default();
    let marks = changes.clone();
    let handler = move |event: notify::Result<notify::Event>| {
        match event {
            Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => return,
            // The kernel's queue overflowed, or an event could not be read: paths may
            // have been missed.
            Ok(e) if e.need_rescan() => marks.mark_everything(),
            Ok(e) => marks.mark(e.paths),
            Err(_) => marks.mark_everything(),
        }
        let _ = raw_tx.send(());
    };
    // Symlinks are not followed: a watch through `alias -> lib` would share `lib`'s
    // inotify watch and name its events `alias/…`, paths the release does not hold.
    let config = notify::Config::default().with_follow_symlinks(false);
    let mut watcher = notify::RecommendedWatcher::new(handler, config)?;
    watcher
        .watch(dir, notify::RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            let first = Instant::now();
            // Debounce: wait for the burst to end.
            loop {
                match tokio::time::timeout(DEBOUNCE, raw_rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if tx
                .send(Burst {
                    first,
                    quiet: Instant::now(),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Ok((watcher, rx, changes))
}

/// Packs `dir` off the runtime.
pub async fn pack_dir(dir: PathBuf) -> anyhow::Result<pack::Packed> {
    tokio::task::spawn_blocking(move || pack::pack(&dir)).await?
}

pub struct DevLoop {
    pub client: Client,
    pub dir: PathBuf,
    pub publisher: Publisher,
    /// Push the tree once, wait for every pod, and end: an error unless all run it.
    pub once: bool,
    /// End the loop (with an error) at the first release a pod refuses.
    pub exit_on_failure: bool,
    pub output: Output,
    /// Stream the app's logs (every pod, new pods joining) between the sync lines.
    pub logs: bool,
}

/// How the loop reports: lines for people, or one JSON object per event for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// What `-o json` prints, one object per line, tagged by `event`.
#[derive(Debug, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event<'a> {
    Watching {
        app: &'a str,
        dir: String,
    },
    /// The tree is the release already sent: nothing was.
    Unchanged,
    Release {
        digest: String,
        files: usize,
        hashed: usize,
        blobs_sent: usize,
        bytes_sent: u64,
    },
    /// One pod runs the release; latency from the save.
    Live {
        pod: &'a str,
        digest: String,
        latency_ms: u128,
    },
    Refused {
        pod: &'a str,
        digest: String,
        reason: String,
        message: &'a str,
    },
    /// Every pod has answered: `live` of `total` run it.
    Settled {
        digest: String,
        live: usize,
        total: usize,
        latency_ms: u128,
    },
    Superseded {
        digest: String,
        live: usize,
        total: usize,
    },
    Timeout {
        digest: String,
        live: usize,
        total: usize,
        pending: &'a [String],
    },
    Error {
        message: String,
    },
    /// A line of the app container of a pod, or why its log cannot be read.
    Log {
        pod: &'a str,
        line: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a str>,
    },
}

impl Output {
    fn emit(self, event: &Event<'_>) {
        if self == Output::Json
            && let Ok(line) = serde_json::to_string(event)
        {
            println!("{line}");
        }
    }

    fn text(self) -> bool {
        self == Output::Text
    }
}

impl DevLoop {
    /// Runs until the watch ends: one release at start, then one per burst of changes. A
    /// burst that arrives while pods are still taking the previous release supersedes the
    /// wait (newest wins, as in the fetcher). With `once`, only the first release.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let first = Burst {
            first: now,
            quiet: now,
        };
        if self.once {
            // Nothing supersedes the one release: the channel stays open and silent.
            let (_keep, mut none) = mpsc::channel(1);
            let sent = self.refresh(first, None, &mut none).await?;
            return match sent.failed {
                Some(why) => Err(anyhow::anyhow!(why)),
                // Nothing runs it: a CI step right after a deploy must not pass on that.
                None if sent.pods == 0 && sent.tree.is_some() => Err(anyhow::anyhow!(
                    "{} has no pods: the release waits in the Deployment's annotations, \
                     but nothing runs it yet",
                    self.publisher.app
                )),
                None => Ok(()),
            };
        }
        let (_watcher, mut events, changes) = watch(&self.dir)?;
        self.publisher.changes = Some(changes);
        let _logs = self.logs.then(|| {
            AbortOnDrop(tokio::spawn(follow_logs(
                self.client.clone(),
                self.publisher.app.clone(),
                self.publisher.namespace.clone(),
                self.output,
            )))
        });
        if self.output.text() {
            println!(
                "watching {} for {}; Ctrl-C to stop",
                self.dir.display(),
                self.publisher.app
            );
        }
        self.output.emit(&Event::Watching {
            app: &self.publisher.app,
            dir: self.dir.display().to_string(),
        });
        let mut last: Option<Digest> = None;
        let mut next = Some(first);
        loop {
            let burst = match next.take() {
                Some(b) => b,
                None => match events.recv().await {
                    Some(b) => b,
                    None => return Ok(()),
                },
            };
            match self.refresh(burst, last, &mut events).await {
                Ok(sent) => {
                    if sent.tree.is_some() {
                        last = sent.tree;
                    }
                    if sent.failed.is_some() {
                        // A pod may have failed on a blob the store no longer holds.
                        self.publisher.forget_stored();
                    }
                    if self.exit_on_failure
                        && let Some(why) = sent.refused
                    {
                        anyhow::bail!("{why} (--exit-on-failure)");
                    }
                    next = sent.superseded_by;
                }
                Err(e) if self.exit_on_failure => return Err(e.context("--exit-on-failure")),
                Err(e) => {
                    // The next save walks the tree, in case what failed was a stale entry,
                    // and asks the store about every blob.
                    if let Some(changes) = &self.publisher.changes {
                        changes.mark_everything();
                    }
                    self.publisher.forget_stored();
                    if self.output.text() {
                        eprintln!("aether dev: {e:#} (waiting for the next change)");
                    }
                    self.output.emit(&Event::Error {
                        message: format!("{e:#}"),
                    });
                }
            }
        }
    }

    /// One refresh: snapshot (or pack), upload what the store lacks, release, wait.
    async fn refresh(
        &mut self,
        burst: Burst,
        last: Option<Digest>,
        events: &mut mpsc::Receiver<Burst>,
    ) -> anyhow::Result<Sent> {
        let t0 = burst.first;
        let out = self.output;
        let Some(prepared) = self
            .publisher
            .prepare(&self.client, &self.dir, last)
            .await?
        else {
            if out.text() {
                println!("unchanged tree (no refresh)");
            }
            out.emit(&Event::Unchanged);
            return Ok(Sent::default());
        };
        let t_upload = Instant::now();
        let digest = prepared.digest;
        let app = self.publisher.app.clone();
        let namespace = self.publisher.namespace.clone();
        self.client.release(&app, &prepared.request).await?;
        out.emit(&Event::Release {
            digest: digest.to_string(),
            files: prepared.files,
            hashed: prepared.hashed,
            blobs_sent: prepared.sent_blobs,
            bytes_sent: prepared.sent_bytes,
        });
        let t_release = Instant::now();
        let (client, app, namespace) = (&self.client, app.as_str(), namespace.as_deref());
        let observe = |only: Option<Vec<String>>| async move {
            let status = client.status_of(app, namespace, only.as_deref()).await?;
            Ok(status
                .pods
                .into_iter()
                .map(|p| (p.name, p.fetcher))
                .collect())
        };
        let outcome = live::wait(
            &digest,
            observe,
            live::Pace::CLUSTER,
            LIVE_TIMEOUT,
            events.recv(),
        )
        .await;
        let t_live = Instant::now();
        let mut sent = Sent {
            tree: Some(prepared.tree),
            ..Sent::default()
        };
        let progress = match outcome {
            live::Outcome::Settled(p) => p,
            live::Outcome::Superseded(next, p) => {
                if out.text() {
                    println!(
                        "superseded {} by a newer save ({}/{} pods had it live)",
                        short(&digest),
                        p.live,
                        p.total
                    );
                }
                out.emit(&Event::Superseded {
                    digest: digest.to_string(),
                    live: p.live,
                    total: p.total,
                });
                sent.superseded_by = next;
                if !p.retrying.is_empty() || !p.refused.is_empty() {
                    // Saves faster than the wait's timeout must not hide a lost blob.
                    self.publisher.forget_stored();
                }
                return Ok(sent);
            }
            live::Outcome::TimedOut(p) => {
                report(out, &digest, t0, &p);
                if out.text() {
                    for (pod, e) in &p.retrying {
                        println!(
                            "pod {pod}: still retrying {}: {} ({})",
                            short(&digest),
                            e.reason,
                            e.message
                        );
                    }
                }
                let why = format!(
                    "{} live on {}/{} pods after {} s; not live yet: {}",
                    short(&digest),
                    p.live,
                    p.total,
                    LIVE_TIMEOUT.as_secs(),
                    p.pending.join(", ")
                );
                if out.text() {
                    println!("{why}");
                }
                out.emit(&Event::Timeout {
                    digest: digest.to_string(),
                    live: p.live,
                    total: p.total,
                    pending: &p.pending,
                });
                sent.refused = refusals(&digest, &p);
                sent.failed = Some(sent.refused.clone().unwrap_or(why));
                return Ok(sent);
            }
        };
        report(out, &digest, t0, &progress);
        if progress.total == 0 && out.text() {
            println!("{app} has no pods yet: the release waits in the Deployment's annotations");
        }
        if out.text() {
            println!(
                "live {} on {}/{} pods in {} ms (debounce {} ms, hash+upload {} ms: {} files hashed, {} blobs {} sent; release {} ms, patch→live {} ms)",
                short(&digest),
                progress.live,
                progress.total,
                ms(t_live - t0),
                ms(burst.quiet - t0),
                ms(t_upload - burst.quiet),
                prepared.hashed,
                prepared.sent_blobs,
                human_bytes(prepared.sent_bytes),
                ms(t_release - t_upload),
                ms(t_live - t_release),
            );
        }
        out.emit(&Event::Settled {
            digest: digest.to_string(),
            live: progress.live,
            total: progress.total,
            latency_ms: ms(t_live - t0),
        });
        sent.refused = refusals(&digest, &progress);
        sent.failed = sent.refused.clone();
        sent.pods = progress.total;
        Ok(sent)
    }
}

/// Stops a background task when the loop ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long the log stream waits before it reconnects (the control plane restarting).
const LOGS_RECONNECT: Duration = Duration::from_secs(2);

/// Prints the app's new log lines (pods that start later from their first line) for as
/// long as the loop runs, reconnecting when the stream breaks.
async fn follow_logs(client: Client, app: String, namespace: Option<String>, output: Output) {
    // Lines written from now on: also what pods that start later print first.
    let q = crate::logs::LogQuery {
        follow: true,
        since_seconds: Some(0),
        ..Default::default()
    };
    let mut printer = crate::logs::Printer::default();
    let mut told = false;
    loop {
        match client.logs(&app, namespace.as_deref(), &q).await {
            Ok(mut lines) => {
                told = false;
                while let Ok(Some(l)) = lines.next().await {
                    if output.text() {
                        match &l.error {
                            Some(e) => eprintln!("[{}] log unavailable: {e}", l.pod),
                            None => println!("{}", printer.format(&l)),
                        }
                    }
                    output.emit(&Event::Log {
                        pod: &l.pod,
                        line: &l.line,
                        error: l.error.as_deref(),
                    });
                }
            }
            Err(e) if !told => {
                told = true;
                let message =
                    format!("app logs unavailable: {e:#} (retrying; --no-logs turns them off)");
                if output.text() {
                    eprintln!("aether dev: {message}");
                }
                output.emit(&Event::Error { message });
            }
            Err(_) => {}
        }
        tokio::time::sleep(LOGS_RECONNECT).await;
    }
}

/// What one refresh sent (the tree, to spot an unchanged one), the save that cut its
/// wait short, and why it fell short of every pod, if it did.
#[derive(Default)]
struct Sent {
    tree: Option<Digest>,
    superseded_by: Option<Burst>,
    /// Pods refused the release for good (the refusals, one per pod).
    refused: Option<String>,
    /// Not every pod runs it: refused, or still pending at the timeout.
    failed: Option<String>,
    /// Pods of the app when the release settled.
    pods: usize,
}

/// Prints each pod that runs the release (`-o json`) and each refusal.
fn report(out: Output, digest: &Digest, t0: Instant, progress: &live::Progress) {
    for (pod, at) in &progress.live_since {
        out.emit(&Event::Live {
            pod,
            digest: digest.to_string(),
            latency_ms: ms(at.saturating_duration_since(t0)),
        });
    }
    for (pod, e) in &progress.refused {
        if out.text() {
            println!(
                "pod {pod}: refused {}: {} ({})",
                short(digest),
                e.reason,
                e.message
            );
        }
        out.emit(&Event::Refused {
            pod,
            digest: digest.to_string(),
            reason: e.reason.to_string(),
            message: &e.message,
        });
    }
}

/// The refusals as one message, if any pod refused.
fn refusals(digest: &Digest, progress: &live::Progress) -> Option<String> {
    if progress.refused.is_empty() {
        return None;
    }
    let each: Vec<String> = progress
        .refused
        .iter()
        .map(|(pod, e)| format!("pod {pod}: {} ({})", e.reason, e.message))
        .collect();
    Some(format!("{} refused: {}", short(digest), each.join("; ")))
}

pub fn short(d: &Digest) -> String {
    format!("sha256:{}", &d.hex()[..12])
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// `812 B`, `10.2 kB`, `3.4 MB`.
pub fn human_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        _ => format!("{:.1} MB", n as f64 / 1e6),
    }
}
