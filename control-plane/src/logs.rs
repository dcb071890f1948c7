//! App logs: `GET /v1/apps/{app}/logs` follows the app container's log of every pod of the
//! app through the API server's `log` subresource (kube-rs) and multiplexes them into one
//! NDJSON stream, a `{"pod", "line"}` object per line (`{"pod", "error"}` when a pod's log
//! cannot be read). While following, pods that appear join (from their first line); a pod
//! whose container is not running yet, or whose stream ends while the pod lives, is read
//! again from the last line seen. The CLI side (`aether logs`, `aether dev --hot`) reads
//! that stream.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use aether_common::kube::manifest;
use bytes::Bytes;
use futures::{AsyncBufRead, AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, LogParams};
use kube::runtime::watcher;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

/// Longest line passed on; the rest of a longer one is dropped (an app printing megabytes
/// without a newline must not grow the control plane's memory).
pub const MAX_LINE: usize = 16 * 1024;
/// Records buffered for a slow reader before the pods' streams wait for it (at most about
/// 6 MiB with the longest lines).
const BUFFER: usize = 64;
/// Pods of one request read at once; more are named in an error record and skipped.
pub const MAX_PODS: usize = 64;
/// Log requests served at once by one control plane (each holds a watch and a stream per
/// pod on the API server); more are refused with 429.
pub const MAX_STREAMS: usize = 16;
/// An empty line this often keeps a quiet stream's connection alive and lets the client
/// tell a silent app from a dead connection.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// One record: a line of one pod's app container, or why its log cannot be read.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogLine {
    pub pod: String,
    #[serde(default)]
    pub line: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What to read, from the query string.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LogQuery {
    pub namespace: Option<String>,
    /// Keep the stream open for new lines and new pods.
    #[serde(default)]
    pub follow: bool,
    /// Only lines newer than this many seconds; `0`: only lines written from now on.
    pub since_seconds: Option<i64>,
    /// Only the last lines of each pod present at the start.
    pub tail_lines: Option<i64>,
}

/// Why a log request is refused before it starts.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("listing the app's pods: {0}")]
    Pods(#[from] kube::Error),
}

/// Bounds the log requests served at once.
#[derive(Clone)]
pub struct Limiter(Arc<tokio::sync::Semaphore>);

impl Default for Limiter {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)))
    }
}

impl Limiter {
    /// A slot, or `None` when [`MAX_STREAMS`] are in use.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().ok()
    }
}

/// The NDJSON body: records of every pod of `app` in `ns`. The pods are listed first, so
/// a refusal (RBAC, a gone namespace) is an error before any byte is sent. Ends when every
/// pod's log has been read (or, following, when the client goes away). `slot` is held for
/// as long as the stream runs.
pub async fn stream(
    client: kube::Client,
    ns: &str,
    app: &str,
    q: LogQuery,
    slot: OwnedSemaphorePermit,
) -> Result<impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static, LogsError>
{
    let pods = Api::<Pod>::namespaced(client, ns);
    let listed = pods
        .list(&ListParams::default().labels(&manifest::selector(app)))
        .await?;
    let (tx, rx) = mpsc::channel::<Bytes>(BUFFER);
    let app = app.to_owned();
    tokio::spawn(async move {
        let _slot = slot;
        let gone = CancellationToken::new();
        let closed = {
            let tx = tx.clone();
            let gone = gone.clone();
            async move {
                tx.closed().await;
                gone.cancel();
            }
        };
        let heartbeat = heartbeat(tx.clone());
        tokio::select! {
            () = multiplex(pods, app, q, listed.items, tx, gone.clone()) => {}
            () = closed => {}
            () = heartbeat => {}
        }
        gone.cancel();
    });
    Ok(futures::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok(chunk), rx))
    }))
}

/// Sends an empty line every [`HEARTBEAT`] when there is room; returns when the client
/// has gone.
async fn heartbeat(tx: mpsc::Sender<Bytes>) {
    let mut every = tokio::time::interval(HEARTBEAT);
    every.tick().await;
    loop {
        every.tick().await;
        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Bytes::from_static(b"\n")) {
            return;
        }
    }
}

async fn send(tx: &mpsc::Sender<Bytes>, record: &LogLine) -> bool {
    let Ok(mut json) = serde_json::to_vec(record) else {
        return true;
    };
    json.push(b'\n');
    tx.send(Bytes::from(json)).await.is_ok()
}

async fn multiplex(
    pods: Api<Pod>,
    app: String,
    q: LogQuery,
    listed: Vec<Pod>,
    tx: mpsc::Sender<Bytes>,
    gone: CancellationToken,
) {
    // One absolute bound for every pod and every re-read: `since_seconds=0` means lines
    // written from now on, also by a pod whose container starts later.
    let since = q.since_seconds.map(|s| {
        jiff::Timestamp::now()
            .checked_sub(jiff::SignedDuration::from_secs(s.max(0)))
            .unwrap_or(jiff::Timestamp::MIN)
    });
    let first = Read {
        app: app.clone(),
        since,
        tail: q.tail_lines,
        follow: q.follow,
    };
    if !q.follow {
        for name in names(&listed, &tx).await {
            read_pod(&pods, &name, first.clone(), &tx, &gone).await;
        }
        return;
    }
    // Following: every pod the watcher reports gets one reader, keyed by uid, so a pod
    // re-created under the same name is read again and an update never restarts one.
    let mut readers: BTreeMap<String, CancellationToken> = BTreeMap::new();
    let mut relisted: Option<BTreeSet<String>> = None;
    let mut initial = true;
    let selector = manifest::selector(&app);
    let mut events = std::pin::pin!(watcher(
        pods.clone(),
        watcher::Config::default().labels(&selector)
    ));
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(app, error = %e, "pod watch for logs failed; retrying");
                tokio::time::sleep(RETRY_MIN).await;
                continue;
            }
        };
        let pod = match event {
            watcher::Event::Init => {
                relisted = Some(BTreeSet::new());
                continue;
            }
            watcher::Event::InitDone => {
                // A re-list after a lost watch sends no Delete for pods gone meanwhile.
                if let Some(seen) = relisted.take() {
                    readers.retain(|uid, stop| {
                        let keep = seen.contains(uid);
                        if !keep {
                            stop.cancel();
                        }
                        keep
                    });
                }
                initial = false;
                continue;
            }
            watcher::Event::Delete(pod) => {
                if let Some(stop) = pod.metadata.uid.and_then(|uid| readers.remove(&uid)) {
                    stop.cancel();
                }
                continue;
            }
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => pod,
        };
        let (Some(name), Some(uid)) = (pod.metadata.name, pod.metadata.uid) else {
            continue;
        };
        if let Some(seen) = relisted.as_mut() {
            seen.insert(uid.clone());
        }
        if readers.contains_key(&uid) {
            continue;
        }
        if readers.len() >= MAX_PODS {
            let record = LogLine {
                pod: name,
                error: Some(format!(
                    "not followed: this stream already follows {MAX_PODS} pods"
                )),
                ..LogLine::default()
            };
            if !send(&tx, &record).await {
                return;
            }
            continue;
        }
        let stop = gone.child_token();
        readers.insert(uid, stop.clone());
        // Pods present at the start honour tail; pods that join are read from their first
        // line (within `since`).
        let mut read = first.clone();
        if !initial {
            read.tail = None;
        }
        let (pods, tx) = (pods.clone(), tx.clone());
        tokio::spawn(async move {
            read_pod(&pods, &name, read, &tx, &stop).await;
        });
    }
}

/// The names of the listed pods, at most [`MAX_PODS`] (the others named in an error).
async fn names(listed: &[Pod], tx: &mpsc::Sender<Bytes>) -> Vec<String> {
    let mut names: Vec<String> = listed
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    for skipped in names.split_off(names.len().min(MAX_PODS)) {
        let record = LogLine {
            pod: skipped,
            error: Some(format!(
                "not read: one request reads at most {MAX_PODS} pods"
            )),
            ..LogLine::default()
        };
        if !send(tx, &record).await {
            break;
        }
    }
    names
}

/// How to read one pod's log.
#[derive(Debug, Clone)]
struct Read {
    app: String,
    since: Option<jiff::Timestamp>,
    tail: Option<i64>,
    follow: bool,
}

/// Reads one pod's log. Following, it reads again from the last line seen whenever the
/// stream cannot be opened (a container not running yet) or ends while `stop` is not
/// cancelled (the API server dropped it, the container restarted); the first failure is
/// told to the client as an error record. Without following, one attempt.
async fn read_pod(
    pods: &Api<Pod>,
    name: &str,
    mut read: Read,
    tx: &mpsc::Sender<Bytes>,
    stop: &CancellationToken,
) {
    let mut delay = RETRY_MIN;
    let mut told = false;
    // The timestamp of the last line sent: a re-read skips up to it.
    let mut last: Option<jiff::Timestamp> = None;
    loop {
        let params = LogParams {
            container: Some(read.app.clone()),
            follow: read.follow,
            // The API takes whole seconds (kube-rs rounds to the nearest): floored here, a
            // re-read starts in the second of the last line and skips what was sent.
            since_time: last.or(read.since).map(floor_second),
            tail_lines: if last.is_some() { None } else { read.tail },
            timestamps: true,
            ..LogParams::default()
        };
        let opened = tokio::select! {
            r = pods.log_stream(name, &params) => r,
            () = stop.cancelled() => return,
        };
        match opened {
            Ok(reader) => {
                let mut reader = std::pin::pin!(reader);
                let mut buf = Vec::new();
                loop {
                    let line = tokio::select! {
                        l = next_line(&mut reader, &mut buf) => l,
                        () = stop.cancelled() => return,
                    };
                    let Ok(Some(line)) = line else { break };
                    let (at, text) = split_timestamp(&line);
                    if let (Some(at), Some(last)) = (at, last)
                        && at <= last
                    {
                        continue;
                    }
                    if at.is_some() {
                        last = at;
                    }
                    let record = LogLine {
                        pod: name.to_owned(),
                        line: text.to_owned(),
                        error: None,
                    };
                    if !send(tx, &record).await {
                        return;
                    }
                    delay = RETRY_MIN;
                }
            }
            Err(e) => {
                tracing::debug!(pod = name, error = %e, "reading the log");
                if !told || !read.follow {
                    told = true;
                    let record = LogLine {
                        pod: name.to_owned(),
                        error: Some(if read.follow {
                            format!("{e} (retrying)")
                        } else {
                            e.to_string()
                        }),
                        ..LogLine::default()
                    };
                    if !send(tx, &record).await {
                        return;
                    }
                }
            }
        }
        if !read.follow {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return,
        }
        delay = (delay * 2).min(RETRY_MAX);
        read.tail = None;
    }
}

/// `at` without its fraction of a second.
fn floor_second(at: jiff::Timestamp) -> jiff::Timestamp {
    jiff::Timestamp::from_second(at.as_second()).unwrap_or(at)
}

/// Splits the RFC 3339 timestamp the API server puts before each line (`timestamps=true`).
fn split_timestamp(line: &str) -> (Option<jiff::Timestamp>, &str) {
    match line.split_once(' ') {
        Some((ts, rest)) => match ts.parse::<jiff::Timestamp>() {
            Ok(at) => (Some(at), rest),
            Err(_) => (None, line),
        },
        None => match line.parse::<jiff::Timestamp>() {
            Ok(at) => (Some(at), ""),
            Err(_) => (None, line),
        },
    }
}

/// The next line (without its newline) of at most [`MAX_LINE`] bytes, the rest of a
/// longer line skipped; `None` at the end.
async fn next_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<String>> {
    buf.clear();
    let mut cut = false;
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            if buf.is_empty() && !cut {
                return Ok(None);
            }
            break;
        }
        let (part, end) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        let room = MAX_LINE.saturating_sub(buf.len());
        if part.len() > room {
            cut = true;
        }
        buf.extend_from_slice(&part[..part.len().min(room)]);
        let used = end.unwrap_or(chunk.len());
        reader.consume_unpin(used);
        if end.is_some() {
            break;
        }
    }
    let mut line = String::from_utf8_lossy(buf).into_owned();
    if cut {
        line.push_str(" […]");
    }
    Ok(Some(line))
}

/// Prints log lines as `[pod] line`, each pod's prefix in its own colour on a terminal.
pub struct Printer {
    colour: bool,
    pods: BTreeMap<String, usize>,
}

impl Default for Printer {
    fn default() -> Self {
        Self {
            colour: std::io::IsTerminal::is_terminal(&std::io::stdout()),
            pods: BTreeMap::new(),
        }
    }
}

impl Printer {
    pub fn format(&mut self, l: &LogLine) -> String {
        if !self.colour {
            return format!("[{}] {}", l.pod, l.line);
        }
        // Cyan, yellow, magenta, green, blue, red: in order of first appearance.
        const COLOURS: [u8; 6] = [36, 33, 35, 32, 34, 31];
        let next = self.pods.len();
        let i = *self.pods.entry(l.pod.clone()).or_insert(next);
        format!(
            "\x1b[{}m[{}]\x1b[0m {}",
            COLOURS[i % COLOURS.len()],
            l.pod,
            l.line
        )
    }
}

/// `aether logs`: prints the app's logs; following, until interrupted.
pub async fn print(
    client: &crate::client::Client,
    app: &str,
    namespace: Option<&str>,
    q: &LogQuery,
) -> anyhow::Result<()> {
    let mut lines = client.logs(app, namespace, q).await?;
    let mut printer = Printer::default();
    while let Some(l) = lines.next().await? {
        match &l.error {
            Some(e) => eprintln!("[{}] log unavailable: {e}", l.pod),
            None => println!("{}", printer.format(&l)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_split_and_a_huge_one_is_cut_without_holding_it_all() {
        let huge = "x".repeat(MAX_LINE * 4);
        let text = format!("one\n{huge}\ntwo");
        let mut reader = futures::io::BufReader::with_capacity(1000, text.as_bytes());
        let mut buf = Vec::new();
        assert_eq!(
            next_line(&mut reader, &mut buf).await.unwrap().unwrap(),
            "one"
        );
        let cut = next_line(&mut reader, &mut buf).await.unwrap().unwrap();
        assert!(
            cut.ends_with(" […]") && cut.len() < MAX_LINE + 10,
            "{}",
            cut.len()
        );
        assert!(buf.capacity() <= 2 * MAX_LINE + 1000);
        assert_eq!(
            next_line(&mut reader, &mut buf).await.unwrap().unwrap(),
            "two"
        );
        assert_eq!(next_line(&mut reader, &mut buf).await.unwrap(), None);
    }
}
