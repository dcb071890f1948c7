//! `aether dev --hot`: watch a directory, and on each burst of changes pack, upload, patch,
//! and wait until every pod's fetcher reports the new digest live; print the latency.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aether_common::Digest;
use anyhow::Context;
use tokio::sync::mpsc;

use crate::client::Client;
use crate::publish::Publisher;
use crate::{live, pack};

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

/// Watches `dir` recursively; yields one `Burst` per group of changes.
pub fn watch(dir: &Path) -> anyhow::Result<(notify::RecommendedWatcher, mpsc::Receiver<Burst>)> {
    use notify::Watcher;
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event
            && !matches!(e.kind, notify::EventKind::Access(_))
        {
            let _ = raw_tx.send(());
        }
    })?;
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
    Ok((watcher, rx))
}

/// Packs `dir` off the runtime.
pub async fn pack_dir(dir: PathBuf) -> anyhow::Result<pack::Packed> {
    tokio::task::spawn_blocking(move || pack::pack(&dir)).await?
}

pub struct DevLoop {
    pub client: Client,
    pub dir: PathBuf,
    pub publisher: Publisher,
}

impl DevLoop {
    /// Runs until the watch ends: one release at start, then one per burst of changes. A
    /// burst that arrives while pods are still taking the previous release supersedes the
    /// wait (newest wins, as in the fetcher).
    pub async fn run(mut self) -> anyhow::Result<()> {
        let (_watcher, mut events) = watch(&self.dir)?;
        let mut last: Option<Digest> = None;
        let now = Instant::now();
        let mut next = Some(Burst {
            first: now,
            quiet: now,
        });
        loop {
            let burst = match next.take() {
                Some(b) => b,
                None => match events.recv().await {
                    Some(b) => b,
                    None => return Ok(()),
                },
            };
            match self.once(burst, last, &mut events).await {
                Ok(sent) => {
                    if sent.tree.is_some() {
                        last = sent.tree;
                    }
                    next = sent.superseded_by;
                }
                Err(e) => eprintln!("aether dev: {e:#} (waiting for the next change)"),
            }
        }
    }

    /// One refresh: snapshot (or pack), upload what the store lacks, release, wait.
    async fn once(
        &mut self,
        burst: Burst,
        last: Option<Digest>,
        events: &mut mpsc::Receiver<Burst>,
    ) -> anyhow::Result<Sent> {
        let t0 = burst.first;
        let Some(prepared) = self
            .publisher
            .prepare(&self.client, &self.dir, last)
            .await?
        else {
            println!("unchanged tree (no refresh)");
            return Ok(Sent::default());
        };
        let t_upload = Instant::now();
        let digest = prepared.digest;
        let app = self.publisher.app.clone();
        let namespace = self.publisher.namespace.clone();
        self.client.release(&app, &prepared.request).await?;
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
        let progress = match outcome {
            live::Outcome::Settled(p) => p,
            live::Outcome::Superseded(next, p) => {
                println!(
                    "superseded {} by a newer save ({}/{} pods had it live)",
                    short(&digest),
                    p.live,
                    p.total
                );
                return Ok(Sent {
                    tree: Some(prepared.tree),
                    superseded_by: next,
                });
            }
            live::Outcome::TimedOut(p) => {
                report_refusals(&digest, &p);
                for (pod, e) in &p.retrying {
                    println!(
                        "pod {pod}: still retrying {}: {} ({})",
                        short(&digest),
                        e.reason,
                        e.message
                    );
                }
                println!(
                    "{} live on {}/{} pods after {} s; not reporting it yet: {}",
                    short(&digest),
                    p.live,
                    p.total,
                    LIVE_TIMEOUT.as_secs(),
                    p.pending.join(", ")
                );
                return Ok(Sent {
                    tree: Some(prepared.tree),
                    superseded_by: None,
                });
            }
        };
        report_refusals(&digest, &progress);
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
        Ok(Sent {
            tree: Some(prepared.tree),
            superseded_by: None,
        })
    }
}

/// What one refresh sent (the tree, to spot an unchanged one), and the save that cut its
/// wait short, if any.
#[derive(Default)]
struct Sent {
    tree: Option<Digest>,
    superseded_by: Option<Burst>,
}

fn report_refusals(digest: &Digest, progress: &live::Progress) {
    for (pod, e) in &progress.refused {
        println!(
            "pod {pod}: refused {}: {} ({})",
            short(digest),
            e.reason,
            e.message
        );
    }
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
