//! Sources of the desired release: the kube-runtime watcher on the own Pod, polling it, or
//! the Downward API annotations file. Each publishes into a `watch` channel, which keeps
//! only the newest value: that is what makes rapid patches coalesce.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aether_common::contract::annotations::{self, DesiredRelease};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// One observation of the desired state. `desired` is `Err` with a message when the
/// annotations are malformed, `Ok(None)` when no digest is annotated.
#[derive(Debug, Clone)]
pub struct Observed {
    pub desired: Result<Option<DesiredRelease>, String>,
    /// When this desired state was first seen: the start of the refresh latency.
    pub seen_at: Instant,
}

pub type Publisher = watch::Sender<Option<Observed>>;

/// Publishes the desired state read from `annotations`, if it differs from the last one.
pub fn publish(tx: &Publisher, annotations: &BTreeMap<String, String>, allow_http: bool) {
    let desired = annotations::desired_release(annotations, allow_http).map_err(|e| e.to_string());
    tx.send_if_modified(|current| {
        if current.as_ref().is_some_and(|c| c.desired == desired) {
            tracing::debug!("annotations read; desired release unchanged");
            return false;
        }
        tracing::debug!(?desired, "desired state changed");
        *current = Some(Observed {
            desired: desired.clone(),
            seen_at: Instant::now(),
        });
        true
    });
}

fn pod_annotations(pod: &Pod) -> BTreeMap<String, String> {
    pod.metadata.annotations.clone().unwrap_or_default()
}

/// Watches the own Pod (field selector on its name). The watcher re-lists after a 410
/// Gone or a dropped connection, with kube-runtime's default backoff.
pub async fn watch_pod(
    api: Api<Pod>,
    name: String,
    tx: Publisher,
    allow_http: bool,
    shutdown: CancellationToken,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            () = shutdown.cancelled() => return,
        };
        match event {
            Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => {
                publish(&tx, &pod_annotations(&pod), allow_http);
            }
            Some(Ok(watcher::Event::Delete(_))) => {
                tracing::warn!(pod = %name, "own pod deleted; keeping the live release");
            }
            Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
            Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; retrying with backoff"),
            None => return,
        }
    }
}

/// GETs the own Pod every `interval`.
pub async fn poll_pod(
    api: Api<Pod>,
    name: String,
    interval: Duration,
    tx: Publisher,
    allow_http: bool,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match api.get(&name).await {
            Ok(pod) => publish(&tx, &pod_annotations(&pod), allow_http),
            Err(e) => tracing::warn!(error = %e, pod = %name, "polling the pod failed"),
        }
    }
}

/// Reads the own Pod once (for `--once`).
pub async fn get_pod_once(api: &Api<Pod>, name: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let pod = api.get(name).await?;
    Ok(pod_annotations(&pod))
}

/// Follows the Downward API annotations file. The kubelet replaces it by swapping a
/// `..data` symlink in its directory, so the directory is watched, and the file is also
/// re-read every `interval` in case an event is missed.
pub async fn watch_file(
    path: PathBuf,
    interval: Duration,
    tx: Publisher,
    allow_http: bool,
    shutdown: CancellationToken,
) {
    let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
    let _watcher = match file_watcher(&path, wake_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot watch the annotations file; re-reading it every interval");
            None
        }
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        match read_annotations_file(&path).await {
            Ok(map) => {
                last_error = None;
                publish(&tx, &map, allow_http);
            }
            Err(e) => {
                if last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(error = %e, path = %path.display(), "cannot read the annotations file");
                }
                last_error = Some(e);
            }
        }
        tokio::select! {
            _ = ticker.tick() => {}
            Some(()) = wake_rx.recv() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

fn file_watcher(path: &Path, wake: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
        // A full channel already holds a wake-up; nothing is lost.
        let _ = wake.try_send(());
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Reads and parses the annotations file; a missing file reads as no annotations.
pub async fn read_annotations_file(path: &Path) -> Result<BTreeMap<String, String>, String> {
    match tokio::fs::read_to_string(path).await {
        Ok(text) => parse_downward(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses the Downward API format: one `key="value"` per line, the value quoted as Go's
/// `strconv.Quote` does.
pub fn parse_downward(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected key=\"value\"", n + 1))?;
        let value = unquote_go(value).ok_or_else(|| format!("line {}: bad quoted value", n + 1))?;
        out.insert(key.to_owned(), value);
    }
    Ok(out)
}

fn unquote_go(quoted: &str) -> Option<String> {
    let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let escaped = match chars.next()? {
            'a' => '\x07',
            'b' => '\x08',
            'f' => '\x0c',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'v' => '\x0b',
            '\\' => '\\',
            '"' => '"',
            '\'' => '\'',
            'x' => hex_char(&mut chars, 2)?,
            'u' => hex_char(&mut chars, 4)?,
            'U' => hex_char(&mut chars, 8)?,
            d @ '0'..='7' => {
                let mut v = d.to_digit(8)?;
                for _ in 0..2 {
                    v = v * 8 + chars.next()?.to_digit(8)?;
                }
                char::from_u32(v)?
            }
            _ => return None,
        };
        out.push(escaped);
    }
    Some(out)
}

fn hex_char(chars: &mut std::str::Chars<'_>, digits: usize) -> Option<char> {
    let mut v = 0u32;
    for _ in 0..digits {
        v = v * 16 + chars.next()?.to_digit(16)?;
    }
    char::from_u32(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_downward_api_lines_with_go_escapes() {
        let text = "aether.dev/digest=\"sha256:ab\"\nkubernetes.io/config.seen=\"2026-01-01T00:00:00Z\"\nx=\"a\\\"b\\\\c\\n\\u00e9\"\n";
        let map = parse_downward(text).unwrap();
        assert_eq!(map["aether.dev/digest"], "sha256:ab");
        assert_eq!(map["x"], "a\"b\\c\né");
    }

    #[test]
    fn refuses_unquoted_values() {
        assert!(parse_downward("k=v\n").is_err());
        assert!(parse_downward("novalue\n").is_err());
    }

    #[test]
    fn publish_only_signals_real_changes() {
        let (tx, mut rx) = watch::channel(None);
        let mut map = BTreeMap::new();
        publish(&tx, &map, false);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        publish(&tx, &map, false);
        assert!(!rx.has_changed().unwrap());
        map.insert(annotations::DIGEST.into(), "bad".into());
        publish(&tx, &map, false);
        assert!(rx.has_changed().unwrap());
    }
}
