//! A Kubernetes API server emulator for tests and scripts.
//!
//! It speaks the real wire protocol, so the real kube-rs client and the real `kubectl`
//! work against it: discovery (`/api`, `/apis`, resource lists, `/version`), create, get,
//! list with label and field selectors, watch with resource versions, bookmarks,
//! `timeoutSeconds` and `410 Gone` (as an `ERROR` event) for versions older than the
//! retained history, merge / strategic-merge / server-side-apply / JSON patches, replace,
//! delete, and `Table` output for `kubectl get`.
//!
//! Simplifications, on purpose: no authentication; strategic merge and server-side apply
//! merge lists of named objects by `name` and replace other lists (no field ownership, no
//! `$patch` directives); a deleted pod disappears at once.
//!
//! Test hooks: [`Emulator::drop_watches`] cuts every open watch connection,
//! [`Emulator::compact`] forgets the history so that resuming an older watch gets 410, and
//! [`Emulator::hold_watches`] parks new watch requests until [`Emulator::release_watches`],
//! so a test can change the world while a client is known to be reconnecting (the events
//! a test waits for, instead of racing the client's backoff). The same hooks are reachable
//! over HTTP: `POST /_emulator/drop-watches`, `POST /_emulator/compact`,
//! `GET /_emulator/stats`.
//!
//! Pods have a `log` subresource (`container`, `follow`, `tailLines`, `sinceSeconds`,
//! `sinceTime`, `timestamps`) fed by the test through [`Emulator::append_log`]: emulated
//! pods run no containers.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::SinkExt;
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

/// A kind of object the emulator stores.
#[derive(Debug)]
pub struct ResourceType {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
}

impl ResourceType {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

macro_rules! rt {
    ($g:expr, $v:expr, $p:expr, $s:expr, $k:expr, $ns:expr, $short:expr) => {
        ResourceType {
            group: $g,
            version: $v,
            plural: $p,
            singular: $s,
            kind: $k,
            namespaced: $ns,
            short_names: $short,
        }
    };
}

/// Everything the emulator serves.
pub static TYPES: &[ResourceType] = &[
    rt!(
        "",
        "v1",
        "namespaces",
        "namespace",
        "Namespace",
        false,
        &["ns"]
    ),
    rt!("", "v1", "pods", "pod", "Pod", true, &["po"]),
    rt!("", "v1", "services", "service", "Service", true, &["svc"]),
    rt!(
        "",
        "v1",
        "serviceaccounts",
        "serviceaccount",
        "ServiceAccount",
        true,
        &["sa"]
    ),
    rt!(
        "",
        "v1",
        "configmaps",
        "configmap",
        "ConfigMap",
        true,
        &["cm"]
    ),
    rt!("", "v1", "secrets", "secret", "Secret", true, &[]),
    rt!(
        "apps",
        "v1",
        "deployments",
        "deployment",
        "Deployment",
        true,
        &["deploy"]
    ),
    rt!(
        "rbac.authorization.k8s.io",
        "v1",
        "roles",
        "role",
        "Role",
        true,
        &[]
    ),
    rt!(
        "rbac.authorization.k8s.io",
        "v1",
        "rolebindings",
        "rolebinding",
        "RoleBinding",
        true,
        &[]
    ),
    rt!(
        "",
        "v1",
        "persistentvolumeclaims",
        "persistentvolumeclaim",
        "PersistentVolumeClaim",
        true,
        &["pvc"]
    ),
    // Leader election of the control plane's replicas.
    rt!(
        "coordination.k8s.io",
        "v1",
        "leases",
        "lease",
        "Lease",
        true,
        &[]
    ),
    rt!(
        "policy",
        "v1",
        "poddisruptionbudgets",
        "poddisruptionbudget",
        "PodDisruptionBudget",
        true,
        &["pdb"]
    ),
    // Prometheus Operator's custom resources, as if its CRDs were installed.
    rt!(
        "monitoring.coreos.com",
        "v1",
        "podmonitors",
        "podmonitor",
        "PodMonitor",
        true,
        &["pmon"]
    ),
    rt!(
        "monitoring.coreos.com",
        "v1",
        "prometheusrules",
        "prometheusrule",
        "PrometheusRule",
        true,
        &["promrule"]
    ),
];

const GROUPS: &[(&str, &str)] = &[
    ("apps", "v1"),
    ("rbac.authorization.k8s.io", "v1"),
    ("coordination.k8s.io", "v1"),
    ("policy", "v1"),
    ("monitoring.coreos.com", "v1"),
];

/// One kind of request as RBAC authorizes it: API group, resource (with its subresource,
/// `pods/proxy`) and verb.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    pub group: String,
    pub resource: String,
    pub verb: String,
}

/// Events kept for resuming watches; older resource versions get 410 Gone.
const HISTORY: usize = 10_000;

#[derive(Debug)]
struct WatchEvent {
    rv: u64,
    type_idx: usize,
    kind: &'static str,
    object: Value,
}

type Key = (usize, String, String);

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<WatchEvent>>,
    /// Oldest resource version a watch may resume from.
    floor: u64,
    uid_seq: u64,
}

/// Request counters, by verb.
#[derive(Debug, Default, serde::Serialize, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub total: u64,
    pub get: u64,
    pub list: u64,
    pub watch: u64,
    pub create: u64,
    pub update: u64,
    pub patch: u64,
    pub delete: u64,
    pub discovery: u64,
    /// Requests through the `pods/proxy` subresource.
    pub proxy: u64,
    /// Requests on Leases: the control plane's leader election, steady background traffic.
    pub leases: u64,
}

#[derive(Default)]
struct Counters {
    total: AtomicU64,
    get: AtomicU64,
    list: AtomicU64,
    watch: AtomicU64,
    create: AtomicU64,
    update: AtomicU64,
    patch: AtomicU64,
    delete: AtomicU64,
    discovery: AtomicU64,
    proxy: AtomicU64,
    leases: AtomicU64,
}

/// A container's log: (namespace, pod, container).
type LogKey = (String, String, String);

struct Shared {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<WatchEvent>>,
    drop_watches: watch::Sender<u64>,
    /// While true, new watch requests wait before they are served.
    hold_watches: watch::Sender<bool>,
    /// Watch requests parked by `hold_watches` right now.
    held: AtomicU64,
    /// Patches of a resource type (by plural) still to be answered with 500.
    failing_patches: Mutex<BTreeMap<String, u64>>,
    /// The resource type (plural) whose patches wait before they are applied, if any.
    hold_patches: watch::Sender<Option<String>>,
    /// Patch requests parked by `hold_patches` right now.
    held_patches: AtomicU64,
    /// Requests answered 409 Conflict (stale resourceVersion).
    conflicts: AtomicU64,
    counters: Counters,
    /// Every kind of resource request served, as RBAC would authorize it.
    accesses: Mutex<BTreeSet<Access>>,
    bookmark_every: Duration,
    /// Container logs by (namespace, pod, container): when each line was written, and it.
    logs: Mutex<BTreeMap<LogKey, Vec<(jiff::Timestamp, String)>>>,
    /// Ticks on every appended log line and every pod deletion, for followers.
    log_ticks: watch::Sender<u64>,
    /// Ticks to end every open log follow (as an API server restart would).
    drop_logs: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Options for [`Emulator::start_with`].
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    /// Interval of BOOKMARK events on watches that allow them.
    pub bookmark_every: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            bookmark_every: Duration::from_secs(2),
        }
    }
}

/// A running emulator; stops when dropped.
pub struct Emulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Emulator {
    /// Starts on a free loopback port, with namespaces `default`, `kube-system` and
    /// `kube-public`.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(options.listen).await?;
        let addr = listener.local_addr()?;
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            events,
            drop_watches: watch::channel(0).0,
            hold_watches: watch::channel(false).0,
            held: AtomicU64::new(0),
            failing_patches: Mutex::new(BTreeMap::new()),
            hold_patches: watch::channel(None).0,
            held_patches: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            counters: Counters::default(),
            accesses: Mutex::new(BTreeSet::new()),
            bookmark_every: options.bookmark_every,
            logs: Mutex::new(BTreeMap::new()),
            log_ticks: watch::channel(0).0,
            drop_logs: watch::channel(0).0,
        });
        for ns in ["default", "kube-system", "kube-public"] {
            let _ = create(&shared, 0, None, json!({"metadata": {"name": ns}}));
        }
        let stop = CancellationToken::new();
        let app = Router::new().fallback(handle).with_state(shared.clone());
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

    /// Base URL, for `kubectl --server` and kubeconfigs.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this emulator (namespace `default`) into `dir`.
    pub fn write_kubeconfig(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, kubeconfig(&self.url()))?;
        Ok(path)
    }

    /// Cuts every open watch connection, as a restarting API server or load balancer would.
    pub fn drop_watches(&self) {
        self.shared.drop_watches.send_modify(|g| *g += 1);
    }

    /// Parks every new watch request (already open watches are untouched) until
    /// [`Emulator::release_watches`]; [`Emulator::held_watches`] counts the parked ones.
    pub fn hold_watches(&self) {
        self.shared.hold_watches.send_replace(true);
    }

    /// Serves the parked watch requests, each as of now (its resource version is checked
    /// against the history at release time).
    pub fn release_watches(&self) {
        self.shared.hold_watches.send_replace(false);
    }

    /// Answers the next `count` patches of `plural` with 500 Internal Server Error, as an
    /// overloaded or restarting API server would.
    pub fn fail_patches(&self, plural: &str, count: u64) {
        if let Ok(mut f) = self.shared.failing_patches.lock() {
            f.insert(plural.to_owned(), count);
        }
    }

    /// Parks every patch of `plural` before it is applied, until [`Emulator::release_patches`]
    /// (objects changed meanwhile through [`Emulator::merge_patch`] are seen at release
    /// time, as by a slow client).
    pub fn hold_patches(&self, plural: &str) {
        self.shared
            .hold_patches
            .send_replace(Some(plural.to_owned()));
    }

    pub fn release_patches(&self) {
        self.shared.hold_patches.send_replace(None);
    }

    /// Patch requests parked right now.
    pub fn held_patches(&self) -> u64 {
        self.shared.held_patches.load(Ordering::SeqCst)
    }

    /// Requests refused with 409 Conflict so far (a stale `resourceVersion`).
    pub fn conflicts(&self) -> u64 {
        self.shared.conflicts.load(Ordering::SeqCst)
    }

    /// Injected patch failures of `plural` not used yet.
    pub fn patch_failures_left(&self, plural: &str) -> u64 {
        self.shared
            .failing_patches
            .lock()
            .map_or(0, |f| f.get(plural).copied().unwrap_or(0))
    }

    /// Watch requests parked right now.
    pub fn held_watches(&self) -> u64 {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Forgets the event history: a watch resuming from any earlier resource version gets
    /// 410 Gone and must re-list.
    pub fn compact(&self) {
        compact(&self.shared);
    }

    /// Every kind of resource request served so far (group, resource, verb), the way RBAC
    /// authorizes it: a server-side apply that creates its object counts as `patch` and
    /// `create`.
    pub fn accesses(&self) -> Vec<Access> {
        lock_accesses(&self.shared).iter().cloned().collect()
    }

    /// Forgets the accesses recorded so far (to look at one client's requests only).
    pub fn reset_accesses(&self) {
        lock_accesses(&self.shared).clear();
    }

    pub fn stats(&self) -> Stats {
        stats(&self.shared)
    }

    /// Creates an object directly (as a controller would); returns it as stored.
    pub fn create(
        &self,
        plural: &str,
        namespace: Option<&str>,
        object: Value,
    ) -> Result<Value, String> {
        let idx = type_index(plural).ok_or_else(|| format!("unknown resource {plural}"))?;
        create(&self.shared, idx, namespace, object).map_err(|e| e.message)
    }

    /// Reads an object directly.
    pub fn get(&self, plural: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let idx = type_index(plural)?;
        let key = (idx, namespace.unwrap_or("").to_owned(), name.to_owned());
        self.shared.lock().objects.get(&key).cloned()
    }

    /// Appends `line` to the log of `container` in pod `pod`, as if the container had
    /// written it; followers of that log get it at once.
    pub fn append_log(&self, namespace: &str, pod: &str, container: &str, line: &str) {
        self.append_log_at(namespace, pod, container, jiff::Timestamp::now(), line);
    }

    /// [`Emulator::append_log`] with the time the container wrote the line.
    pub fn append_log_at(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        at: jiff::Timestamp,
        line: &str,
    ) {
        self.shared
            .logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((namespace.to_owned(), pod.to_owned(), container.to_owned()))
            .or_default()
            .push((at, line.to_owned()));
        self.shared.log_ticks.send_modify(|t| *t += 1);
    }

    /// Ends every open log follow, as an API server restart would; the pods live on.
    pub fn drop_log_streams(&self) {
        self.shared.drop_logs.send_modify(|t| *t += 1);
    }

    /// Applies a JSON merge patch directly.
    pub fn merge_patch(
        &self,
        plural: &str,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
    ) -> Result<Value, String> {
        let idx = type_index(plural).ok_or_else(|| format!("unknown resource {plural}"))?;
        let ns = namespace.unwrap_or("").to_owned();
        update(&self.shared, idx, &ns, name, |obj| {
            merge_patch(obj, patch);
            Ok(())
        })
        .map_err(|e| e.message)
    }
}

/// A kubeconfig for `server`, namespace `default`.
pub fn kubeconfig(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {server}\ncontexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: default\ncurrent-context: emulator\nusers:\n- name: emulator\n  user:\n    token: emulator\n"
    )
}

fn type_index(plural: &str) -> Option<usize> {
    TYPES.iter().position(|t| t.plural == plural)
}

fn compact(shared: &Shared) {
    let mut inner = shared.lock();
    inner.history.clear();
    // Like an etcd compaction: the revision moves on, so a fresh list can be watched
    // from while every earlier version is gone.
    inner.rv += 1;
    inner.floor = inner.rv;
}

fn stats(shared: &Shared) -> Stats {
    let c = &shared.counters;
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Stats {
        total: l(&c.total),
        get: l(&c.get),
        list: l(&c.list),
        watch: l(&c.watch),
        create: l(&c.create),
        update: l(&c.update),
        patch: l(&c.patch),
        delete: l(&c.delete),
        discovery: l(&c.discovery),
        proxy: l(&c.proxy),
        leases: l(&c.leases),
    }
}

/// An API error, rendered as a `Status` object.
#[derive(Debug)]
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    fn not_found(what: &str, name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{what} \"{name}\" not found"),
        )
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(
            self.code,
            &status_json(self.code.as_u16(), self.reason, &self.message),
        )
    }
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn query_map(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .map(|q| {
            url_pairs(q)
                .into_iter()
                .collect::<BTreeMap<String, String>>()
        })
        .unwrap_or_default()
}

fn url_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.counters.total.fetch_add(1, Ordering::Relaxed);
    let path = uri.path().trim_end_matches('/').to_owned();
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let query = query_map(&uri);
    let result = match (method.clone(), segs.as_slice()) {
        (Method::GET, ["version"]) => Ok(discovery(&shared, version())),
        (Method::GET, ["api"]) => Ok(discovery(
            &shared,
            json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
            }),
        )),
        (Method::GET, ["apis"]) => Ok(discovery(&shared, group_list())),
        (Method::GET, ["openapi", "v3"]) => Ok(discovery(&shared, openapi_index())),
        (Method::GET, ["openapi", "v3", "api", "v1"]) => {
            Ok(discovery(&shared, openapi_doc("", "v1")))
        }
        (Method::GET, ["openapi", "v3", "apis", group, version]) => {
            Ok(discovery(&shared, openapi_doc(group, version)))
        }
        (Method::GET, ["api", "v1"]) => Ok(discovery(&shared, resource_list("", "v1"))),
        (Method::GET, ["apis", group, version]) => {
            match GROUPS.iter().any(|(g, v)| g == group && v == version) {
                true => Ok(discovery(&shared, resource_list(group, version))),
                false => Err(ApiError::not_found("group", group)),
            }
        }
        (Method::GET, ["apis", group]) => match GROUPS.iter().find(|(g, _)| g == group) {
            Some((g, v)) => Ok(discovery(&shared, group_json(g, v))),
            None => Err(ApiError::not_found("group", group)),
        },
        (_, ["api", "v1", rest @ ..]) => {
            resource(&shared, "", "v1", rest, method, &query, &headers, &body).await
        }
        (_, ["apis", group, version, rest @ ..]) => {
            resource(
                &shared, group, version, rest, method, &query, &headers, &body,
            )
            .await
        }
        (Method::POST, ["_emulator", "drop-watches"]) => {
            shared.drop_watches.send_modify(|g| *g += 1);
            Ok(json_response(StatusCode::OK, &json!({"dropped": true})))
        }
        (Method::POST, ["_emulator", "compact"]) => {
            compact(&shared);
            Ok(json_response(StatusCode::OK, &json!({"compacted": true})))
        }
        (Method::GET, ["_emulator", "stats"]) => Ok(json_response(
            StatusCode::OK,
            &serde_json::to_value(stats(&shared)).unwrap_or(Value::Null),
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({method} {path})"),
        )),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

fn discovery(shared: &Shared, value: Value) -> Response {
    shared.counters.discovery.fetch_add(1, Ordering::Relaxed);
    json_response(StatusCode::OK, &value)
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "32", "gitVersion": "v1.32.0-aether-emulator",
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23", "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn group_json(group: &str, version: &str) -> Value {
    let gv = format!("{group}/{version}");
    json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": group,
        "versions": [{"groupVersion": gv, "version": version}],
        "preferredVersion": {"groupVersion": gv, "version": version},
    })
}

fn group_list() -> Value {
    let groups: Vec<Value> = GROUPS.iter().map(|(g, v)| group_json(g, v)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The OpenAPI v3 index. kubectl reads it to learn that the server validates fields
/// itself (`fieldValidation`), and then skips client-side schema validation.
fn openapi_index() -> Value {
    let mut paths = Map::new();
    let mut gvs: Vec<(&str, &str)> = vec![("", "v1")];
    gvs.extend(GROUPS.iter().copied());
    for (g, v) in gvs {
        let p = gv_path(g, v);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}")}),
        );
    }
    json!({"paths": paths})
}

/// A minimal OpenAPI v3 document for one group/version: each kind's schema carries its
/// group-version-kind, and each object path's PATCH declares the `fieldValidation` query
/// parameter.
fn openapi_doc(group: &str, version: &str) -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for t in TYPES
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        let gvk = json!({"group": t.group, "version": t.version, "kind": t.kind});
        let item = if t.namespaced {
            format!(
                "/{}/namespaces/{{namespace}}/{}/{{name}}",
                gv_path(group, version),
                t.plural
            )
        } else {
            format!("/{}/{}/{{name}}", gv_path(group, version), t.plural)
        };
        let param = json!([{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}}]);
        let op = |verb: &str| {
            json!({
                "operationId": format!("{verb}{}", t.kind), "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": gvk, "parameters": param,
                "responses": {"200": {"description": "OK"}},
            })
        };
        paths.insert(
            item,
            json!({"patch": op("patch"), "put": op("put"), "get": op("get")}),
        );
        let prefix = if group.is_empty() {
            "io.k8s.api.core".to_owned()
        } else {
            format!("io.k8s.api.{}", group.split('.').next().unwrap_or(group))
        };
        schemas.insert(
            format!("{prefix}.{version}.{}", t.kind),
            json!({"type": "object", "x-kubernetes-group-version-kind": [gvk]}),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (aether emulator)", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

fn resource_list(group: &str, version: &str) -> Value {
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    let mut resources = Vec::new();
    for t in TYPES
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        resources.push(json!({
            "name": t.plural, "singularName": t.singular, "namespaced": t.namespaced,
            "kind": t.kind, "shortNames": t.short_names,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
        }));
        if t.plural == "pods" {
            resources.push(json!({"name": "pods/proxy", "singularName": "", "namespaced": true,
                "kind": "PodProxyOptions", "verbs": ["create", "delete", "get", "patch", "update"]}));
            resources.push(
                json!({"name": "pods/log", "singularName": "", "namespaced": true,
                "kind": "Pod", "verbs": ["get"]}),
            );
        }
        if matches!(t.plural, "pods" | "deployments") {
            resources.push(
                json!({"name": format!("{}/status", t.plural), "singularName": "",
                "namespaced": true, "kind": t.kind, "verbs": ["get", "patch", "update"]}),
            );
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

#[allow(clippy::too_many_arguments)]
async fn resource(
    shared: &Arc<Shared>,
    group: &str,
    version: &str,
    rest: &[&str],
    method: Method,
    query: &BTreeMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let (namespace, plural, name, sub) = match rest {
        ["namespaces", ns, plural, tail @ ..] => (
            Some(*ns),
            *plural,
            tail.first().copied(),
            tail.get(1..).unwrap_or(&[]),
        ),
        [plural, tail @ ..] => (
            None,
            *plural,
            tail.first().copied(),
            tail.get(1..).unwrap_or(&[]),
        ),
        [] => return Err(ApiError::not_found("resource", "")),
    };
    let idx = TYPES
        .iter()
        .position(|t| t.group == group && t.version == version && t.plural == plural)
        .ok_or_else(|| ApiError::not_found("resource type", plural))?;
    let rt = &TYPES[idx];
    if !rt.namespaced && namespace.is_some() {
        return Err(ApiError::not_found("resource type", plural));
    }
    if rt.namespaced && namespace.is_none() && name.is_some() {
        return Err(ApiError::not_found("resource type", plural));
    }
    let ns = namespace.unwrap_or("");
    let resource_name = match sub.first() {
        Some(sub) => format!("{}/{sub}", rt.plural),
        None => rt.plural.to_owned(),
    };
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (&method, name) {
        (&Method::GET, None) if watch => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "unknown",
    };
    record_access(shared, rt.group, &resource_name, verb);
    if rt.plural == "leases" {
        shared.counters.leases.fetch_add(1, Ordering::Relaxed);
    }
    let wants_table = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    let c = &shared.counters;
    match (method, name, sub) {
        (Method::GET, None, _) => {
            if watch {
                c.watch.fetch_add(1, Ordering::Relaxed);
                wait_while_held(shared).await;
                return watch_response(shared, idx, namespace, query);
            }
            c.list.fetch_add(1, Ordering::Relaxed);
            let (items, rv) = list(shared, idx, namespace, query)?;
            if wants_table {
                return Ok(json_response(StatusCode::OK, &table(rt, &items, rv)));
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()}, "items": items,
                }),
            ))
        }
        (Method::POST, None, []) => {
            c.create.fetch_add(1, Ordering::Relaxed);
            let obj = parse_body(body)?;
            let created = create(shared, idx, namespace, obj)?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (Method::GET, Some(name), []) => {
            c.get.fetch_add(1, Ordering::Relaxed);
            let key = (idx, ns.to_owned(), name.to_owned());
            let (obj, rv) = {
                let inner = shared.lock();
                (inner.objects.get(&key).cloned(), inner.rv)
            };
            let obj = obj.ok_or_else(|| ApiError::not_found(rt.plural, name))?;
            if wants_table {
                return Ok(json_response(StatusCode::OK, &table(rt, &[obj], rv)));
            }
            Ok(json_response(StatusCode::OK, &obj))
        }
        (Method::GET, Some(name), ["proxy", rest @ ..]) if rt.plural == "pods" => {
            c.proxy.fetch_add(1, Ordering::Relaxed);
            c.get.fetch_add(1, Ordering::Relaxed);
            pod_proxy(shared, ns, name, rest).await
        }
        (Method::GET, Some(name), ["log"]) if rt.plural == "pods" => {
            c.get.fetch_add(1, Ordering::Relaxed);
            pod_log(shared, idx, ns, name, query)
        }
        (Method::GET, Some(name), ["status"]) => {
            c.get.fetch_add(1, Ordering::Relaxed);
            let key = (idx, ns.to_owned(), name.to_owned());
            let obj = shared.lock().objects.get(&key).cloned();
            obj.map(|o| json_response(StatusCode::OK, &o))
                .ok_or_else(|| ApiError::not_found(rt.plural, name))
        }
        (Method::PUT, Some(name), [] | ["status"]) => {
            c.update.fetch_add(1, Ordering::Relaxed);
            let new = parse_body(body)?;
            let updated = update(shared, idx, ns, name, |obj| {
                check_rv(obj, &new)?;
                let keep_meta = obj.get("metadata").cloned();
                *obj = new.clone();
                restore_system_meta(obj, keep_meta.as_ref());
                Ok(())
            })?;
            Ok(json_response(StatusCode::OK, &updated))
        }
        (Method::PATCH, Some(name), [] | ["status"]) => {
            c.patch.fetch_add(1, Ordering::Relaxed);
            wait_while_patches_held(shared, rt.plural).await;
            if take_failure(shared, rt.plural) {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "injected by the test (fail_patches)",
                ));
            }
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            let patched = patch(shared, idx, namespace, name, &content_type, query, body)
                .inspect_err(|e| {
                    if e.code == StatusCode::CONFLICT {
                        shared.conflicts.fetch_add(1, Ordering::SeqCst);
                    }
                })?;
            Ok(json_response(StatusCode::OK, &patched))
        }
        (Method::DELETE, Some(name), []) => {
            c.delete.fetch_add(1, Ordering::Relaxed);
            let deleted = delete(shared, idx, ns, name)?;
            Ok(json_response(StatusCode::OK, &deleted))
        }
        (m, _, _) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{m} is not supported on this path"),
        )),
    }
}

/// The pod `ns/name` (`idx`: the pods' type index), or 404.
fn pod_object(shared: &Shared, idx: usize, ns: &str, name: &str) -> Result<Value, ApiError> {
    shared
        .lock()
        .objects
        .get(&(idx, ns.to_owned(), name.to_owned()))
        .cloned()
        .ok_or_else(|| ApiError::not_found("pods", name))
}

/// `GET /api/v1/namespaces/{ns}/pods/{name}/log`: the lines [`Emulator::append_log`] wrote
/// for the container (`container`, or the pod's only container), after `sinceSeconds`,
/// the last `tailLines`; with `follow=true` the response stays open for new lines until the
/// pod is deleted or the client goes.
fn pod_log(
    shared: &Arc<Shared>,
    idx: usize,
    ns: &str,
    name: &str,
    query: &BTreeMap<String, String>,
) -> Result<Response, ApiError> {
    let pod = pod_object(shared, idx, ns, name)?;
    let containers: Vec<String> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.get("name")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let container = match query.get("container") {
        Some(c) if containers.contains(c) => c.clone(),
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "container {c} is not valid for pod {name}"
            )));
        }
        None if containers.len() == 1 => containers[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: {containers:?}"
            )));
        }
    };
    let number = |key: &str| -> Result<Option<u64>, ApiError> {
        query
            .get(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid {key} {v:?}")))
            })
            .transpose()
    };
    let since = match (number("sinceSeconds")?, query.get("sinceTime")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "at most one of sinceTime or sinceSeconds may be specified",
            ));
        }
        (Some(s), None) => Some(
            jiff::Timestamp::now()
                .checked_sub(jiff::SignedDuration::from_secs(
                    i64::try_from(s).unwrap_or(0),
                ))
                .unwrap_or(jiff::Timestamp::MIN),
        ),
        (None, Some(t)) => Some(
            t.parse::<jiff::Timestamp>()
                .map_err(|e| ApiError::bad_request(format!("invalid sinceTime {t:?}: {e}")))?,
        ),
        (None, None) => None,
    };
    let tail = number("tailLines")?;
    let timestamps = query
        .get("timestamps")
        .is_some_and(|f| f == "true" || f == "1");
    let render = move |(at, line): &(jiff::Timestamp, String)| {
        if timestamps {
            format!("{at} {line}\n")
        } else {
            format!("{line}\n")
        }
    };
    let follow = query.get("follow").is_some_and(|f| f == "true" || f == "1");
    let key = (ns.to_owned(), name.to_owned(), container);
    let shared = shared.clone();
    let pod_key = (idx, ns.to_owned(), name.to_owned());
    // Lines up to `sent` are out; the first read applies sinceSeconds and tailLines.
    let backlog = |shared: &Shared| -> (Vec<String>, usize) {
        let logs = shared.logs.lock().unwrap_or_else(|p| p.into_inner());
        let lines = logs.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        let mut picked: Vec<String> = lines
            .iter()
            .filter(|(at, _)| since.is_none_or(|s| *at >= s))
            .map(render)
            .collect();
        if let Some(t) = tail {
            let skip = picked
                .len()
                .saturating_sub(usize::try_from(t).unwrap_or(usize::MAX));
            picked.drain(..skip);
        }
        (picked, lines.len())
    };
    let mut ticks = shared.log_ticks.subscribe();
    ticks.borrow_and_update();
    let mut drops = shared.drop_logs.subscribe();
    drops.borrow_and_update();
    let (first, mut sent) = backlog(&shared);
    let mut body: String = first.concat();
    if !follow {
        return Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], body).into_response());
    }
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let key = (key.0.clone(), key.1.clone(), key.2.clone());
    tokio::spawn(async move {
        loop {
            if !body.is_empty()
                && tx
                    .send(Ok(Bytes::from(std::mem::take(&mut body))))
                    .await
                    .is_err()
            {
                return;
            }
            if !shared.lock().objects.contains_key(&pod_key) {
                return;
            }
            tokio::select! {
                changed = ticks.changed() => if changed.is_err() { return },
                _ = drops.changed() => return,
            }
            let logs = shared.logs.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(lines) = logs.get(&key) {
                body = lines[sent.min(lines.len())..].iter().map(render).collect();
                sent = lines.len();
            }
        }
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain")],
        Body::from_stream(rx),
    )
        .into_response())
}

/// Pod annotation telling the emulator where a pod's ports really listen (`host:port`),
/// since emulated pods have no network of their own. `pods/proxy` forwards there.
pub const PROXY_ADDRESS_ANNOTATION: &str = "emulator.aether.dev/address";

/// `GET /api/v1/namespaces/{ns}/pods/{name}[:port]/proxy/{path}`.
async fn pod_proxy(
    shared: &Shared,
    ns: &str,
    name_port: &str,
    rest: &[&str],
) -> Result<Response, ApiError> {
    let name = name_port.split(':').next().unwrap_or(name_port);
    let idx = type_index("pods").unwrap_or(1);
    let pod = pod_object(shared, idx, ns, name)?;
    let addr = pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(PROXY_ADDRESS_ANNOTATION))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("pod {name} has no {PROXY_ADDRESS_ANNOTATION}"),
            )
        })?
        .to_owned();
    let url = format!("http://{addr}/{}", rest.join("/"));
    let client = crate::process::loopback_client()
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e))?;
    let response = client.get(&url).send().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            format!("proxy to {url}: {e}"),
        )
    })?;
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = response.bytes().await.unwrap_or_default();
    Ok((status, [(header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn lock_accesses(shared: &Shared) -> MutexGuard<'_, BTreeSet<Access>> {
    shared
        .accesses
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn record_access(shared: &Shared, group: &str, resource: &str, verb: &str) {
    lock_accesses(shared).insert(Access {
        group: group.to_owned(),
        resource: resource.to_owned(),
        verb: verb.to_owned(),
    });
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return Ok(v);
    }
    let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("body is not UTF-8"))?;
    serde_saphyr::from_str::<Value>(text)
        .map_err(|e| ApiError::bad_request(format!("cannot parse body: {e}")))
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was just made an object"),
    }
}

fn emit(shared: &Shared, inner: &mut Inner, type_idx: usize, kind: &'static str, object: Value) {
    let event = Arc::new(WatchEvent {
        rv: inner.rv,
        type_idx,
        kind,
        object,
    });
    inner.history.push_back(event.clone());
    while inner.history.len() > HISTORY {
        if let Some(old) = inner.history.pop_front() {
            inner.floor = old.rv;
        }
    }
    let _ = shared.events.send(event);
}

fn create(
    shared: &Shared,
    idx: usize,
    namespace: Option<&str>,
    mut obj: Value,
) -> Result<Value, ApiError> {
    let rt = &TYPES[idx];
    if !obj.is_object() {
        return Err(ApiError::bad_request("object expected"));
    }
    let mut inner = shared.lock();
    let ns = if rt.namespaced {
        let ns = namespace
            .map(str::to_owned)
            .or_else(|| {
                obj.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "default".to_owned());
        let ns_idx = type_index("namespaces").unwrap_or(0);
        if !inner
            .objects
            .contains_key(&(ns_idx, String::new(), ns.clone()))
        {
            return Err(ApiError::not_found("namespaces", &ns));
        }
        ns
    } else {
        String::new()
    };
    inner.uid_seq += 1;
    let uid_seq = inner.uid_seq;
    let meta = meta_mut(&mut obj);
    let name = match meta.get("name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => match meta.get("generateName").and_then(Value::as_str) {
            Some(prefix) => format!("{prefix}{uid_seq:05x}"),
            None => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name: Required value",
                ));
            }
        },
    };
    let key = (idx, ns.clone(), name.clone());
    if inner.objects.contains_key(&key) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", rt.plural),
        ));
    }
    inner.rv += 1;
    let rv = inner.rv;
    let meta = meta_mut(&mut obj);
    meta.insert("name".into(), json!(name));
    if rt.namespaced {
        meta.insert("namespace".into(), json!(ns));
    } else {
        meta.remove("namespace");
    }
    meta.insert(
        "uid".into(),
        json!(format!("00000000-0000-4000-8000-{uid_seq:012x}")),
    );
    meta.insert("resourceVersion".into(), json!(rv.to_string()));
    meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
    if rt.plural == "deployments" {
        meta.insert("generation".into(), json!(1));
    }
    obj["apiVersion"] = json!(rt.api_version());
    obj["kind"] = json!(rt.kind);
    if rt.plural == "pods" && obj.get("status").is_none() {
        obj["status"] = json!({"phase": "Running", "podIP": "127.0.0.1"});
    }
    if rt.plural == "namespaces" && obj.get("status").is_none() {
        obj["status"] = json!({"phase": "Active"});
    }
    inner.objects.insert(key, obj.clone());
    emit(shared, &mut inner, idx, "ADDED", obj.clone());
    Ok(obj)
}

fn check_rv(current: &Value, incoming: &Value) -> Result<(), ApiError> {
    let want = incoming
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str);
    let have = current
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str);
    match want {
        Some(w) if !w.is_empty() && Some(w) != have => Err(ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            "the object has been modified; please apply your changes to the latest version and try again",
        )),
        _ => Ok(()),
    }
}

/// Puts back the fields clients cannot change.
fn restore_system_meta(obj: &mut Value, old: Option<&Value>) {
    let Some(old) = old else { return };
    let meta = meta_mut(obj);
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "generation",
    ] {
        match old.get(field) {
            Some(v) => {
                meta.insert(field.into(), v.clone());
            }
            None => {
                meta.remove(field);
            }
        }
    }
}

/// Applies `change` to a stored object; bumps its resource version and emits MODIFIED
/// only when something changed.
fn update(
    shared: &Shared,
    idx: usize,
    ns: &str,
    name: &str,
    change: impl FnOnce(&mut Value) -> Result<(), ApiError>,
) -> Result<Value, ApiError> {
    let rt = &TYPES[idx];
    let mut inner = shared.lock();
    let key = (idx, ns.to_owned(), name.to_owned());
    let old = inner
        .objects
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(rt.plural, name))?;
    let mut obj = old.clone();
    change(&mut obj)?;
    restore_system_meta(&mut obj, old.get("metadata"));
    obj["apiVersion"] = json!(rt.api_version());
    obj["kind"] = json!(rt.kind);
    meta_mut(&mut obj).insert(
        "resourceVersion".into(),
        old.pointer("/metadata/resourceVersion")
            .cloned()
            .unwrap_or(Value::Null),
    );
    if obj == old {
        return Ok(obj);
    }
    if rt.plural == "deployments" && obj.get("spec") != old.get("spec") {
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        meta_mut(&mut obj).insert("generation".into(), json!(generation + 1));
    }
    inner.rv += 1;
    let rv = inner.rv;
    meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
    inner.objects.insert(key, obj.clone());
    emit(shared, &mut inner, idx, "MODIFIED", obj.clone());
    Ok(obj)
}

fn patch(
    shared: &Shared,
    idx: usize,
    namespace: Option<&str>,
    name: &str,
    content_type: &str,
    query: &BTreeMap<String, String>,
    body: &Bytes,
) -> Result<Value, ApiError> {
    let ns = namespace.unwrap_or("");
    match content_type {
        "application/merge-patch+json" => {
            let p = parse_body(body)?;
            update(shared, idx, ns, name, |obj| {
                check_rv(obj, &p)?;
                merge_patch(obj, &p);
                Ok(())
            })
        }
        "application/strategic-merge-patch+json" => {
            let p = parse_body(body)?;
            update(shared, idx, ns, name, |obj| {
                check_rv(obj, &p)?;
                strategic_merge(obj, &p);
                Ok(())
            })
        }
        "application/json-patch+json" => {
            let ops = parse_body(body)?;
            update(shared, idx, ns, name, |obj| json_patch(obj, &ops))
        }
        "application/apply-patch+yaml" => {
            if query.get("fieldManager").is_none_or(|m| m.is_empty()) {
                return Err(ApiError::bad_request(
                    "fieldManager is required for apply patch",
                ));
            }
            let applied = parse_body(body)?;
            let exists = shared
                .lock()
                .objects
                .contains_key(&(idx, ns.to_owned(), name.to_owned()));
            if !exists {
                record_access(shared, TYPES[idx].group, TYPES[idx].plural, "create");
            }
            if exists {
                update(shared, idx, ns, name, |obj| {
                    strategic_merge(obj, &applied);
                    Ok(())
                })
            } else {
                let mut applied = applied;
                meta_mut(&mut applied).insert("name".into(), json!(name));
                create(shared, idx, namespace, applied)
            }
        }
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
            ),
        )),
    }
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Value::Object(map) = target else { return };
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Strategic merge, simplified: maps merge, `null` deletes, lists whose items all have a
/// `name` merge item by item, other lists are replaced.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(map), Value::Object(patch)) => {
            for (k, v) in patch {
                if k.starts_with("$") {
                    continue;
                }
                if v.is_null() {
                    map.remove(k);
                } else if let Some(existing) = map.get_mut(k) {
                    strategic_merge(existing, v);
                } else {
                    map.insert(k.clone(), v.clone());
                }
            }
        }
        (Value::Array(items), Value::Array(patch_items))
            if named_list(items) && named_list(patch_items) =>
        {
            for p in patch_items {
                let name = p.get("name").cloned();
                match items.iter_mut().find(|i| i.get("name") == name.as_ref()) {
                    Some(existing) => strategic_merge(existing, p),
                    None => items.push(p.clone()),
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

fn named_list(items: &[Value]) -> bool {
    !items.is_empty()
        && items
            .iter()
            .all(|i| i.get("name").is_some_and(Value::is_string))
}

/// RFC 6902 JSON patch: add, remove, replace, test.
fn json_patch(obj: &mut Value, ops: &Value) -> Result<(), ApiError> {
    let ops = ops
        .as_array()
        .ok_or_else(|| ApiError::bad_request("JSON patch must be an array"))?;
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
        let path = op.get("path").and_then(Value::as_str).unwrap_or("");
        let (parent_path, last) = path
            .rsplit_once('/')
            .ok_or_else(|| ApiError::bad_request(format!("bad path {path:?}")))?;
        let last = last.replace("~1", "/").replace("~0", "~");
        let value = op.get("value").cloned().unwrap_or(Value::Null);
        if kind == "test" {
            if obj.pointer(path) != Some(&value) {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    format!("test failed at {path}"),
                ));
            }
            continue;
        }
        let parent = obj.pointer_mut(parent_path).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                format!("no parent for {path}"),
            )
        })?;
        match (kind, parent) {
            ("add" | "replace", Value::Object(m)) => {
                m.insert(last, value);
            }
            ("remove", Value::Object(m)) => {
                m.remove(&last);
            }
            ("add", Value::Array(a)) if last == "-" => a.push(value),
            ("add" | "replace" | "remove", Value::Array(a)) => {
                let i: usize = last
                    .parse()
                    .map_err(|_| ApiError::bad_request("bad index"))?;
                if i > a.len() || (kind != "add" && i == a.len()) {
                    return Err(ApiError::bad_request("index out of range"));
                }
                match kind {
                    "add" => a.insert(i, value),
                    "replace" => a[i] = value,
                    _ => {
                        a.remove(i);
                    }
                }
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unsupported op {kind:?} at {path}"
                )));
            }
        }
    }
    Ok(())
}

fn delete(shared: &Shared, idx: usize, ns: &str, name: &str) -> Result<Value, ApiError> {
    let rt = &TYPES[idx];
    let mut inner = shared.lock();
    let key = (idx, ns.to_owned(), name.to_owned());
    let obj = inner
        .objects
        .remove(&key)
        .ok_or_else(|| ApiError::not_found(rt.plural, name))?;
    // Log followers of a deleted pod end (they look under the lock held here).
    shared.log_ticks.send_modify(|t| *t += 1);
    let mut removed = vec![(idx, obj.clone())];
    if rt.plural == "namespaces" {
        let keys: Vec<Key> = inner
            .objects
            .keys()
            .filter(|k| k.1 == name)
            .cloned()
            .collect();
        for k in keys {
            if let Some(o) = inner.objects.remove(&k) {
                removed.push((k.0, o));
            }
        }
    }
    for (i, mut o) in removed {
        inner.rv += 1;
        let rv = inner.rv;
        meta_mut(&mut o).insert("resourceVersion".into(), json!(rv.to_string()));
        emit(shared, &mut inner, i, "DELETED", o);
    }
    Ok(obj)
}

/// A compiled label or field selector.
#[derive(Debug, Default, Clone)]
struct Selector {
    labels: Vec<LabelReq>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Debug, Clone)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

impl Selector {
    fn from_query(query: &BTreeMap<String, String>) -> Result<Self, ApiError> {
        let mut sel = Selector::default();
        if let Some(ls) = query.get("labelSelector") {
            sel.labels = parse_label_selector(ls)?;
        }
        if let Some(fs) = query.get("fieldSelector") {
            for part in fs.split(',').filter(|p| !p.is_empty()) {
                let (field, negate, value) = if let Some((f, v)) = part.split_once("!=") {
                    (f, true, v)
                } else if let Some((f, v)) = part.split_once("==") {
                    (f, false, v)
                } else if let Some((f, v)) = part.split_once('=') {
                    (f, false, v)
                } else {
                    return Err(ApiError::bad_request(format!(
                        "invalid field selector {part:?}"
                    )));
                };
                sel.fields
                    .push((field.trim().to_owned(), negate, value.trim().to_owned()));
            }
        }
        Ok(sel)
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::Ne(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| !vs.iter().any(|v| v == l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::Absent(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(field, negate, value)| {
                let pointer = format!("/{}", field.replace('.', "/"));
                let actual = obj.pointer(&pointer).map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                (actual.as_deref().unwrap_or("") == value) != *negate
            })
    }
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, ApiError> {
    // Split on commas outside parentheses.
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, ch) in s.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    let set = |v: &str| -> Vec<String> {
        v.trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .split(',')
            .map(|x| x.trim().to_owned())
            .collect()
    };
    let mut out = Vec::new();
    for part in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
        let req = if let Some((k, v)) = part.split_once(" notin ") {
            LabelReq::NotIn(k.trim().into(), set(v))
        } else if let Some((k, v)) = part.split_once(" in ") {
            LabelReq::In(k.trim().into(), set(v))
        } else if let Some((k, v)) = part.split_once("!=") {
            LabelReq::Ne(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once("==") {
            LabelReq::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once('=') {
            LabelReq::Eq(k.trim().into(), v.trim().into())
        } else if let Some(k) = part.strip_prefix('!') {
            LabelReq::Absent(k.trim().into())
        } else if part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            LabelReq::Exists(part.into())
        } else {
            return Err(ApiError::bad_request(format!(
                "invalid label selector {part:?}"
            )));
        };
        out.push(req);
    }
    Ok(out)
}

fn in_scope(key_ns: &str, namespace: Option<&str>) -> bool {
    namespace.is_none_or(|ns| ns == key_ns)
}

fn list(
    shared: &Shared,
    idx: usize,
    namespace: Option<&str>,
    query: &BTreeMap<String, String>,
) -> Result<(Vec<Value>, u64), ApiError> {
    let sel = Selector::from_query(query)?;
    let inner = shared.lock();
    let items = inner
        .objects
        .iter()
        .filter(|((i, ns, _), obj)| *i == idx && in_scope(ns, namespace) && sel.matches(obj))
        .map(|(_, obj)| obj.clone())
        .collect();
    Ok((items, inner.rv))
}

fn table(rt: &ResourceType, items: &[Value], rv: u64) -> Value {
    let now = jiff::Timestamp::now();
    let rows: Vec<Value> = items
        .iter()
        .map(|obj| {
            let name = obj
                .pointer("/metadata/name")
                .cloned()
                .unwrap_or(Value::Null);
            let age = obj
                .pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .map(|t| format!("{}s", now.duration_since(t).as_secs().max(0)))
                .unwrap_or_else(|| "<unknown>".into());
            let mut cells = vec![name];
            if rt.plural == "pods" {
                cells.push(
                    obj.pointer("/status/phase")
                        .cloned()
                        .unwrap_or(json!("Unknown")),
                );
            }
            cells.push(json!(age));
            json!({"cells": cells, "object": {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
            }})
        })
        .collect();
    let col = |name: &str, format: &str| json!({"name": name, "type": "string", "format": format, "description": "", "priority": 0});
    let mut columns = vec![col("Name", "name")];
    if rt.plural == "pods" {
        columns.push(col("Status", ""));
    }
    columns.push(col("Age", ""));
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": columns, "rows": rows,
    })
}

/// Whether this request is one of the failures `fail_patches` asked for.
fn take_failure(shared: &Shared, plural: &str) -> bool {
    let Ok(mut failing) = shared.failing_patches.lock() else {
        return false;
    };
    match failing.get_mut(plural) {
        Some(n) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    }
}

/// Parks a patch of `plural` while the test holds that type's patches.
async fn wait_while_patches_held(shared: &Shared, plural: &str) {
    let mut hold = shared.hold_patches.subscribe();
    if hold.borrow_and_update().as_deref() != Some(plural) {
        return;
    }
    shared.held_patches.fetch_add(1, Ordering::SeqCst);
    let _ = hold.wait_for(|held| held.as_deref() != Some(plural)).await;
    shared.held_patches.fetch_sub(1, Ordering::SeqCst);
}

/// Parks a watch request while the test holds watches.
async fn wait_while_held(shared: &Shared) {
    let mut hold = shared.hold_watches.subscribe();
    if !*hold.borrow_and_update() {
        return;
    }
    shared.held.fetch_add(1, Ordering::SeqCst);
    // An error means the emulator is going away; serving the request is harmless then.
    let _ = hold.wait_for(|held| !*held).await;
    shared.held.fetch_sub(1, Ordering::SeqCst);
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch_response(
    shared: &Arc<Shared>,
    idx: usize,
    namespace: Option<&str>,
    query: &BTreeMap<String, String>,
) -> Result<Response, ApiError> {
    let rt = &TYPES[idx];
    let sel = Selector::from_query(query)?;
    let namespace = namespace.map(str::to_owned);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true" || v == "1");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let requested: Option<u64> = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(v) => Some(
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v:?}")))?,
        ),
    };
    // Subscribing and reading the backlog under one lock: no event is missed or doubled.
    let (backlog, mut live, gone) = {
        let inner = shared.lock();
        let live = shared.events.subscribe();
        match requested {
            None => {
                let added: Vec<Bytes> = inner
                    .objects
                    .iter()
                    .filter(|((i, ns, _), obj)| {
                        *i == idx && in_scope(ns, namespace.as_deref()) && sel.matches(obj)
                    })
                    .map(|(_, obj)| watch_line("ADDED", obj))
                    .collect();
                (added, live, None)
            }
            Some(rv) if rv < inner.floor => (
                Vec::new(),
                live,
                Some(format!("too old resource version: {rv} ({})", inner.floor)),
            ),
            Some(rv) => {
                let events = inner
                    .history
                    .iter()
                    .filter(|e| e.rv > rv && e.type_idx == idx)
                    .filter(|e| {
                        let ns = e
                            .object
                            .pointer("/metadata/namespace")
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        in_scope(ns, namespace.as_deref()) && sel.matches(&e.object)
                    })
                    .map(|e| watch_line(e.kind, &e.object))
                    .collect();
                (events, live, None)
            }
        }
    };
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let mut drops = shared.drop_watches.subscribe();
    drops.borrow_and_update();
    let shared = shared.clone();
    let kind = rt.kind;
    let api_version = rt.api_version();
    tokio::spawn(async move {
        if let Some(message) = gone {
            let _ = tx
                .send(Ok(watch_line(
                    "ERROR",
                    &status_json(410, "Expired", &message),
                )))
                .await;
            return;
        }
        for line in backlog {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut bookmark = tokio::time::interval(shared.bookmark_every);
        bookmark.tick().await;
        loop {
            tokio::select! {
                event = live.recv() => match event {
                    Ok(e) => {
                        if e.type_idx != idx {
                            continue;
                        }
                        let ns = e.object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
                        if !in_scope(ns, namespace.as_deref()) || !sel.matches(&e.object) {
                            continue;
                        }
                        if tx.send(Ok(watch_line(e.kind, &e.object))).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(Ok(watch_line("ERROR", &status_json(410, "Expired", "watch fell behind")))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = bookmark.tick(), if bookmarks => {
                    let rv = shared.lock().rv;
                    let obj = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}});
                    if tx.send(Ok(watch_line("BOOKMARK", &obj))).await.is_err() {
                        return;
                    }
                }
                () = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => return,
                _ = drops.changed() => {
                    // An error mid-body makes the server abort the connection.
                    let _ = tx.send(Err(std::io::Error::other("watch dropped by the test"))).await;
                    return;
                }
            }
        }
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(rx),
    )
        .into_response())
}

fn _assert_send() {
    fn is_send<T: Send>() {}
    is_send::<Emulator>();
}
