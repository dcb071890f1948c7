//! App logs: `GET /v1/apps/{app}/logs` follows the app container's log of every pod of the
//! app through the API server's `log` subresource (kube-rs) and multiplexes them into one
//! NDJSON stream, a `{"pod", "line"}` object per line. While following, pods that appear
//! join (from their first line); a pod whose container is not running yet is retried until
//! it runs or goes. The CLI side (`aether logs`, `aether dev --hot`) reads that stream.

use std::collections::BTreeMap;
use std::time::Duration;

use aether_common::kube::manifest;
use bytes::Bytes;
use futures::{AsyncBufRead, AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, LogParams};
use kube::runtime::watcher;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Longest line passed on; the rest of a longer one is dropped (an app printing megabytes
/// without a newline must not grow the control plane's memory).
pub const MAX_LINE: usize = 16 * 1024;
/// Lines buffered for a slow reader before the pods' streams wait for it.
const BUFFER: usize = 256;
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// One line of one pod's app container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogLine {
    pub pod: String,
    pub line: String,
}

/// What to read, from the query string.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LogQuery {
    pub namespace: Option<String>,
    /// Keep the stream open for new lines and new pods.
    #[serde(default)]
    pub follow: bool,
    /// Only lines newer than this many seconds (pods present at the start).
    pub since_seconds: Option<i64>,
    /// Only the last lines of each pod present at the start (`0`: only new lines).
    pub tail_lines: Option<i64>,
}

/// The NDJSON body: lines of every pod of `app` in `ns`. Ends when every pod's log has
/// been read (or, following, when the client goes away).
pub fn stream(
    client: kube::Client,
    ns: &str,
    app: &str,
    q: LogQuery,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<Bytes>(BUFFER);
    let pods = Api::<Pod>::namespaced(client, ns);
    let app = app.to_owned();
    tokio::spawn(async move {
        let gone = CancellationToken::new();
        let closed = {
            let tx = tx.clone();
            let gone = gone.clone();
            async move {
                tx.closed().await;
                gone.cancel();
            }
        };
        tokio::select! {
            () = multiplex(pods, app, q, tx, gone.clone()) => {}
            () = closed => {}
        }
        gone.cancel();
    });
    futures::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok(chunk), rx))
    })
}

async fn multiplex(
    pods: Api<Pod>,
    app: String,
    q: LogQuery,
    tx: mpsc::Sender<Bytes>,
    gone: CancellationToken,
) {
    let selector = manifest::selector(&app);
    let first = LogParams {
        container: Some(app.clone()),
        follow: q.follow,
        since_seconds: q.since_seconds,
        tail_lines: q.tail_lines,
        ..LogParams::default()
    };
    if !q.follow {
        let list = match pods.list(&ListParams::default().labels(&selector)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(app, error = %e, "listing pods for logs");
                return;
            }
        };
        for pod in list.items {
            if let Some(name) = pod.metadata.name {
                let _ = read_pod(&pods, &name, &first, &tx, &gone).await;
            }
        }
        return;
    }
    // Following: every pod the watcher reports gets one reader, keyed by uid, so a pod
    // re-created under the same name is read again and an update never restarts one.
    let mut readers: BTreeMap<String, CancellationToken> = BTreeMap::new();
    let mut initial = true;
    let mut events = std::pin::pin!(watcher(
        pods.clone(),
        watcher::Config::default().labels(&selector)
    ));
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(app, error = %e, "pod watch for logs; it retries");
                tokio::time::sleep(RETRY_MIN).await;
                continue;
            }
        };
        match event {
            watcher::Event::Init => {}
            watcher::Event::InitDone => initial = false,
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                let (Some(name), Some(uid)) = (pod.metadata.name, pod.metadata.uid) else {
                    continue;
                };
                if readers.contains_key(&uid) {
                    continue;
                }
                let stop = gone.child_token();
                readers.insert(uid, stop.clone());
                // Pods present at the start honour since/tail; pods that join are read
                // from their first line.
                let params = if initial {
                    first.clone()
                } else {
                    LogParams {
                        container: Some(app.clone()),
                        follow: true,
                        ..LogParams::default()
                    }
                };
                let (pods, tx) = (pods.clone(), tx.clone());
                tokio::spawn(async move {
                    follow_pod(&pods, &name, &params, &tx, &stop).await;
                });
            }
            watcher::Event::Delete(pod) => {
                if let Some(stop) = pod.metadata.uid.and_then(|uid| readers.remove(&uid)) {
                    stop.cancel();
                }
            }
        }
    }
}

/// Follows one pod's log, retrying while its container is not running yet (or the API
/// server drops the stream) until the stream ends on its own or `stop`.
async fn follow_pod(
    pods: &Api<Pod>,
    name: &str,
    params: &LogParams,
    tx: &mpsc::Sender<Bytes>,
    stop: &CancellationToken,
) {
    let mut delay = RETRY_MIN;
    loop {
        match read_pod(pods, name, params, tx, stop).await {
            Ok(()) => return,
            Err(e) => tracing::debug!(pod = name, error = %e, "reading the log; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return,
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// Reads one pod's log to its end (or `stop`), sending each line.
async fn read_pod(
    pods: &Api<Pod>,
    name: &str,
    params: &LogParams,
    tx: &mpsc::Sender<Bytes>,
    stop: &CancellationToken,
) -> Result<(), kube::Error> {
    let reader = tokio::select! {
        r = pods.log_stream(name, params) => r?,
        () = stop.cancelled() => return Ok(()),
    };
    let mut reader = std::pin::pin!(reader);
    let mut buf = Vec::new();
    loop {
        let line = tokio::select! {
            l = next_line(&mut reader, &mut buf) => l,
            () = stop.cancelled() => return Ok(()),
        };
        let Ok(Some(line)) = line else {
            return Ok(());
        };
        let item = LogLine {
            pod: name.to_owned(),
            line,
        };
        let Ok(mut json) = serde_json::to_vec(&item) else {
            continue;
        };
        json.push(b'\n');
        if tx.send(Bytes::from(json)).await.is_err() {
            return Ok(());
        }
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
        println!("{}", printer.format(&l));
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
