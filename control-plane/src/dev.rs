//! `aether dev --hot`: watch a directory, and on each burst of changes pack, upload, patch,
//! and wait until every pod's fetcher reports the new digest live; print the latency.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aether_common::{Digest, SigningKey};
use anyhow::Context;
use tokio::sync::mpsc;

use crate::api::ReleaseRequest;
use crate::client::Client;
use crate::pack;

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
    pub app: String,
    pub namespace: Option<String>,
    pub dir: PathBuf,
    pub key: Option<SigningKey>,
}

impl DevLoop {
    /// Runs forever: one release at start, then one per burst of changes.
    pub async fn run(self) -> anyhow::Result<()> {
        let (_watcher, mut events) = watch(&self.dir)?;
        let mut last: Option<Digest> = None;
        let now = Instant::now();
        let mut start = Some(Burst {
            first: now,
            quiet: now,
        });
        loop {
            let burst = match start.take() {
                Some(b) => b,
                None => match events.recv().await {
                    Some(b) => b,
                    None => return Ok(()),
                },
            };
            match self.once(burst, last).await {
                Ok(Some(digest)) => last = Some(digest),
                Ok(None) => {}
                Err(e) => eprintln!("aether dev: {e:#} (waiting for the next change)"),
            }
        }
    }

    /// One refresh; returns the digest that went out, or `None` when nothing changed.
    async fn once(&self, burst: Burst, last: Option<Digest>) -> anyhow::Result<Option<Digest>> {
        let t0 = burst.first;
        let packed = pack_dir(self.dir.clone()).await.context("packing")?;
        let t_pack = Instant::now();
        if Some(packed.digest) == last {
            println!("unchanged {} (no refresh)", short(&packed.digest));
            return Ok(None);
        }
        let signature = self.key.as_ref().map(|k| k.sign(&packed.digest).hex());
        let uploaded = self.client.upload(&packed.digest, packed.bytes).await?;
        let t_upload = Instant::now();
        let release = ReleaseRequest {
            namespace: self.namespace.clone(),
            digest: packed.digest.to_string(),
            url: Some(uploaded.url),
            signature,
            build_commit: None,
        };
        self.client.release(&self.app, &release).await?;
        let (live, total, failures) = self.wait_live(&packed.digest).await?;
        let t_live = Instant::now();
        for (pod, reason) in &failures {
            println!("pod {pod}: refresh failed: {reason}");
        }
        println!(
            "live {} on {live}/{total} pods in {} ms (debounce {} ms, pack {} ms, upload {} ms, patch→live {} ms)",
            short(&packed.digest),
            ms(t_live - t0),
            ms(burst.quiet - t0),
            ms(t_pack - burst.quiet),
            ms(t_upload - t_pack),
            ms(t_live - t_upload),
        );
        Ok(Some(packed.digest))
    }

    /// Polls the status API until every pod reports `digest` live or has failed on it.
    async fn wait_live(
        &self,
        digest: &Digest,
    ) -> anyhow::Result<(usize, usize, Vec<(String, String)>)> {
        let want = digest.to_string();
        let deadline = Instant::now() + LIVE_TIMEOUT;
        loop {
            let status = self
                .client
                .status(&self.app, self.namespace.as_deref())
                .await?;
            let total = status.pods.len();
            let live = status
                .pods
                .iter()
                .filter(|p| p.live_digest.as_deref() == Some(&want))
                .count();
            let failed: Vec<(String, String)> = status
                .pods
                .iter()
                .filter(|p| p.live_digest.as_deref() != Some(&want))
                .filter_map(|p| {
                    let f = p.fetcher.as_ref()?;
                    (f["desired_digest"] == want.as_str() && f["last_error"].is_object()).then(
                        || {
                            (
                                p.name.clone(),
                                format!(
                                    "{} ({})",
                                    f["last_error"]["reason"].as_str().unwrap_or("?"),
                                    f["last_error"]["message"].as_str().unwrap_or("")
                                ),
                            )
                        },
                    )
                })
                .collect();
            if live + failed.len() >= total || Instant::now() > deadline {
                return Ok((live, total, failed));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub fn short(d: &Digest) -> String {
    format!("sha256:{}", &d.hex()[..12])
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}
