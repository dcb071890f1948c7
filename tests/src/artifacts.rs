//! An HTTP artifact server for tests: serves named blobs on loopback, counts requests, and
//! injects faults (error statuses, truncation, stalls, wrong bytes, slow bodies). It also
//! answers the content store's batched blob download (`POST <prefix>download`, a tar of
//! the blobs stored as `<prefix>sha256:<hex>`), so fetchers use it as they use the store.
//! With `serve_differences`, it answers a GET that asks for a patch against a blob it
//! holds (`A-IM: aether-patch`, `If-None-Match: "sha256:<hex>"`) as the control plane's
//! store does; faults can spoil that answer.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aether_common::release::delta;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::SinkExt;
use tokio_util::sync::CancellationToken;

/// One injected fault, consumed by one request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status and no body.
    Status(u16),
    /// Announce the full length, send this many bytes, then cut the connection.
    Truncate(usize),
    /// Send this many bytes, then go silent for the duration, then send the rest.
    Stall { after: usize, pause: Duration },
    /// Send bytes of the right length but different content.
    WrongBytes,
    /// Send the body in chunks of `chunk` bytes with `delay` between them.
    Slow { chunk: usize, delay: Duration },
    /// When the request asks for a patch: answer one that is wrong this way.
    BadDifference(BadDifference),
}

/// How an injected patch (`226 IM Used`) is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadDifference {
    /// A patch that rebuilds other bytes.
    WrongBytes,
    /// A patch that copies past the end of the blob the client holds.
    CopiesPastHeld,
    /// No `Delta-Base` header.
    NoBase,
    /// A body that is not a patch.
    Garbled,
}

#[derive(Default)]
struct Inner {
    blobs: HashMap<String, Bytes>,
    faults: HashMap<String, VecDeque<Fault>>,
    /// Applied to every request of a name once its queued faults are used up.
    standing: HashMap<String, Fault>,
    requests: HashMap<String, u64>,
    /// Patches answered (226), by name.
    differences: HashMap<String, u64>,
    serve_differences: bool,
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Inner>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running artifact server; stops when dropped.
pub struct ArtifactServer {
    addr: SocketAddr,
    shared: Shared,
    stop: CancellationToken,
}

impl Drop for ArtifactServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

const CHUNK: usize = 64 * 1024;

impl ArtifactServer {
    /// Starts on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Shared::default();
        let app = Router::new()
            .route("/{*name}", get(serve).post(serve_batch))
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
        });
        Ok(Self { addr, shared, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `bytes` at `/name`; returns the URL.
    pub fn put(&self, name: &str, bytes: impl Into<Bytes>) -> String {
        self.shared
            .lock()
            .blobs
            .insert(name.to_owned(), bytes.into());
        self.url(name)
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// Queues a fault for the next request of `name` (faults are used in order).
    pub fn fail_next(&self, name: &str, fault: Fault) {
        self.shared
            .lock()
            .faults
            .entry(name.to_owned())
            .or_default()
            .push_back(fault);
    }

    /// Applies `fault` to every request of `name` until cleared.
    pub fn fail_always(&self, name: &str, fault: Option<Fault>) {
        let mut inner = self.shared.lock();
        match fault {
            Some(f) => inner.standing.insert(name.to_owned(), f),
            None => inner.standing.remove(name),
        };
    }

    /// Answers requests for a patch against a blob it holds with one (226), as the
    /// control plane's store does.
    pub fn serve_differences(&self, on: bool) {
        self.shared.lock().serve_differences = on;
    }

    /// Requests of `name` answered with a patch (226).
    pub fn differences(&self, name: &str) -> u64 {
        self.shared
            .lock()
            .differences
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// Requests received for `name` so far (a batched download counts one for each blob it
    /// carries, and one for its own name, `<prefix>download`).
    pub fn requests(&self, name: &str) -> u64 {
        self.shared.lock().requests.get(name).copied().unwrap_or(0)
    }
}

async fn serve(
    State(shared): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (blob, fault, held) = {
        let mut inner = shared.lock();
        let fault = inner.take_fault(&name);
        let held = inner.held(&headers);
        let blob = inner.blobs.get(&name).cloned();
        let patched = blob.is_some()
            && held.is_some()
            && matches!(fault, None | Some(Fault::BadDifference(_)));
        if patched {
            *inner.differences.entry(name.clone()).or_default() += 1;
        }
        (blob, fault, held)
    };
    let Some(blob) = blob else {
        return (StatusCode::NOT_FOUND, "no such artifact\n").into_response();
    };
    match (held, fault) {
        (Some(held), Some(Fault::BadDifference(bad))) => difference(&held, &blob, Some(bad)),
        (Some(held), None) => difference(&held, &blob, None),
        (_, fault) => respond(blob, fault, "application/gzip"),
    }
}

/// `226 IM Used`: `blob` as a patch against `held` (made as the control plane's store
/// makes it), or wrong the way `bad` says.
fn difference(held: &[u8], blob: &[u8], bad: Option<BadDifference>) -> Response {
    let mut base = format!("\"{}\"", aether_common::Digest::of(held));
    let patch = match bad {
        Some(BadDifference::WrongBytes) => {
            let mut wrong = blob.to_vec();
            corrupt(&mut wrong);
            [format!("insert {}\n", wrong.len()).into_bytes(), wrong].concat()
        }
        Some(BadDifference::CopiesPastHeld) => format!("copy 0 {}\n", held.len() + 1).into_bytes(),
        Some(BadDifference::Garbled) => b"splice 1 2\n".to_vec(),
        Some(BadDifference::NoBase) => {
            base.clear();
            delta::encode(held, blob)
        }
        None => delta::encode(held, blob),
    };
    let mut response = (
        StatusCode::IM_USED,
        [
            (delta::IM_HEADER, delta::IM.to_owned()),
            (header::CONTENT_LENGTH.as_str(), patch.len().to_string()),
        ],
        patch,
    )
        .into_response();
    if !base.is_empty()
        && let Ok(value) = base.parse()
    {
        response
            .headers_mut()
            .insert(delta::DELTA_BASE_HEADER, value);
    }
    response
}

impl Inner {
    /// The blob a request asks for a patch against, when this server answers them and
    /// holds it.
    fn held(&self, headers: &HeaderMap) -> Option<Bytes> {
        let asks = headers
            .get(delta::A_IM_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(delta::accepted);
        if !self.serve_differences || !asks {
            return None;
        }
        let tag = headers.get(header::IF_NONE_MATCH)?.to_str().ok()?;
        self.blobs
            .values()
            .find(|b| format!("\"{}\"", aether_common::Digest::of(b)) == tag)
            .cloned()
    }

    /// Counts a request of `name` and takes the fault it gets.
    fn take_fault(&mut self, name: &str) -> Option<Fault> {
        *self.requests.entry(name.to_owned()).or_default() += 1;
        self.faults
            .get_mut(name)
            .and_then(VecDeque::pop_front)
            .or_else(|| self.standing.get(name).cloned())
    }
}

/// `POST <prefix>download`: the blobs asked for as a tar. Faults of the batch's own name
/// apply to the tar's bytes; a blob's `WrongBytes` fault corrupts that blob inside it.
async fn serve_batch(
    State(shared): State<Shared>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let Some(prefix) = name.strip_suffix("download") else {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    };
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON\n").into_response();
    };
    let digests: Vec<String> = req["digests"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut tar = tar::Builder::new(Vec::new());
    let fault = {
        let mut inner = shared.lock();
        let fault = inner.take_fault(&name);
        if let Some(Fault::Status(code)) = fault {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (code, "injected fault\n").into_response();
        }
        for digest in &digests {
            let blob_name = format!("{prefix}{digest}");
            let blob_fault = inner.take_fault(&blob_name);
            let Some(blob) = inner.blobs.get(&blob_name) else {
                return (StatusCode::NOT_FOUND, format!("no blob {digest}\n")).into_response();
            };
            let mut bytes = blob.to_vec();
            if let Some(Fault::WrongBytes) = blob_fault {
                corrupt(&mut bytes);
            }
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o444);
            header.set_entry_type(tar::EntryType::Regular);
            if tar
                .append_data(&mut header, digest, bytes.as_slice())
                .is_err()
            {
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
        }
        fault
    };
    let Ok(bytes) = tar.into_inner() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    respond(Bytes::from(bytes), fault, "application/x-tar")
}

/// Flips bits along the bytes, keeping their length.
fn corrupt(bytes: &mut [u8]) {
    for b in bytes.iter_mut().step_by(97) {
        *b ^= 0x5a;
    }
}

/// Sends `blob` as the fault says.
fn respond(blob: Bytes, fault: Option<Fault>, content_type: &str) -> Response {
    let len = blob.len();
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body_fault = match fault {
        Some(Fault::Status(code)) => {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (code, "injected fault\n").into_response();
        }
        Some(Fault::WrongBytes) => {
            let mut wrong = blob.to_vec();
            corrupt(&mut wrong);
            return ([(header::CONTENT_LENGTH, len.to_string())], wrong).into_response();
        }
        other => other,
    };
    tokio::spawn(async move {
        let mut sent = 0;
        let mut stalled = false;
        while sent < len {
            let chunk = match &body_fault {
                Some(Fault::Slow { chunk, .. }) => *chunk,
                _ => CHUNK,
            };
            let mut end = (sent + chunk).min(len);
            match &body_fault {
                Some(Fault::Truncate(at)) if end >= *at => {
                    if *at > sent {
                        let _ = tx.send(Ok(blob.slice(sent..*at))).await;
                    }
                    let _ = tx
                        .send(Err(std::io::Error::other("injected truncation")))
                        .await;
                    return;
                }
                Some(Fault::Stall { after, pause }) if !stalled && end >= *after => {
                    end = (*after).max(sent);
                    if end > sent && tx.send(Ok(blob.slice(sent..end))).await.is_err() {
                        return;
                    }
                    sent = end;
                    stalled = true;
                    tokio::time::sleep(*pause).await;
                    continue;
                }
                _ => {}
            }
            if tx.send(Ok(blob.slice(sent..end))).await.is_err() {
                return;
            }
            sent = end;
            if let Some(Fault::Slow { delay, .. }) = &body_fault {
                tokio::time::sleep(*delay).await;
            }
        }
    });
    (
        [
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CONTENT_TYPE, content_type.to_owned()),
        ],
        Body::from_stream(rx),
    )
        .into_response()
}

/// A distinct tar.gz of about `size` incompressible bytes (`payload.bin`) plus
/// `version.txt` holding `seed`: benchmark releases that never compress away.
pub fn incompressible_release(seed: usize, size: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(size);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (seed as u64 + 1);
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let mut b = aether_common::archive::pack::ArchiveBuilder::in_memory();
    let _ = b.file("payload.bin", &data, 0o644);
    let _ = b.file("version.txt", seed.to_string().as_bytes(), 0o644);
    b.finish().unwrap_or_default()
}
