//! The webhook (`AETHER_WEBHOOK_URL`) against a real HTTP receiver: called after each
//! release goes live with its digest and seq, retried until it succeeds, superseded by a
//! newer release, never holding up the swap, and called again by a restarted fetcher.

mod rig;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use aether_common::Digest;
use aether_testkit::process::{metric, wait_until};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use rig::*;

#[derive(Debug, Clone, PartialEq)]
struct Call {
    method: String,
    digest: String,
    seq: Option<String>,
    answered: u16,
}

/// A hook endpoint that fails for the digests in `failing` (or all of them while
/// `fail_all`) and records every call.
#[derive(Default, Clone)]
struct Receiver {
    calls: Arc<Mutex<Vec<Call>>>,
    failing: Arc<Mutex<HashSet<String>>>,
    fail_all: Arc<Mutex<bool>>,
}

impl Receiver {
    async fn start(&self) -> SocketAddr {
        async fn hook(State(r): State<Receiver>, method: Method, headers: HeaderMap) -> StatusCode {
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let digest = header("aether-digest").unwrap_or_default();
            let fail = *r.fail_all.lock().unwrap() || r.failing.lock().unwrap().contains(&digest);
            let status = if fail {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::NO_CONTENT
            };
            r.calls.lock().unwrap().push(Call {
                method: method.to_string(),
                digest,
                seq: header("aether-seq"),
                answered: status.as_u16(),
            });
            status
        }
        let app = axum::Router::new()
            .route("/-/reload", axum::routing::any(hook))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn calls_for(&self, digest: &Digest) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.digest == digest.hex())
            .cloned()
            .collect()
    }

    async fn wait_calls(&self, digest: &Digest, answered: u16, count: usize) -> Vec<Call> {
        let ok = wait_until(LONG, || async {
            self.calls_for(digest)
                .iter()
                .filter(|c| c.answered == answered)
                .count()
                >= count
        })
        .await;
        let calls = self.calls_for(digest);
        assert!(
            ok,
            "waiting for {count} calls answered {answered}: {calls:?}"
        );
        calls
    }
}

fn hook_env(addr: SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        ("AETHER_WEBHOOK_URL", format!("http://{addr}/-/reload")),
        ("AETHER_WEBHOOK_METHOD", "PUT".into()),
        ("AETHER_WEBHOOK_BACKOFF_MS", "20".into()),
    ]
}

fn hook_metric(text: &str, result: &str) -> f64 {
    metric(text, "dev_hot_hook_total", &format!("result=\"{result}\"")).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_gets_digest_and_seq_after_the_swap_and_is_retried_until_it_succeeds() {
    let rig = Rig::new().await;
    let receiver = Receiver::default();
    let hook = receiver.start().await;
    *receiver.fail_all.lock().unwrap() = true;
    let fetcher = rig.fetcher(&hook_env(hook));
    let addr = fetcher.http_addr().await.unwrap();
    let m = metrics(addr).await;
    assert_eq!(
        hook_metric(&m, "success"),
        0.0,
        "exported from the start: {m}"
    );
    assert_eq!(hook_metric(&m, "failure"), 0.0);

    let files = [("app.py", "print('v1')")];
    let (url, d1) = rig.publish_manifest(&manifest(APP, 7, &files), &files);
    rig.point_at_manifest(&url, &d1).await;
    // The swap does not wait for a hook that keeps failing.
    wait_live(addr, &d1).await;
    let failed = receiver.wait_calls(&d1, 503, 2).await;
    assert_eq!(
        failed[0],
        Call {
            method: "PUT".into(),
            digest: d1.hex(),
            seq: Some("7".into()),
            answered: 503
        }
    );
    *receiver.fail_all.lock().unwrap() = false;
    receiver.wait_calls(&d1, 204, 1).await;
    // The receiver records a call before it answers; the fetcher counts it after.
    let counted = wait_until(LONG, || async {
        hook_metric(&metrics(addr).await, "success") == 1.0
    })
    .await;
    let m = metrics(addr).await;
    assert!(counted, "{m}");
    assert!(hook_metric(&m, "failure") >= 2.0, "{m}");

    // A restarted fetcher finds the release live and calls the hook again (hooks must be
    // idempotent), with the seq it recorded.
    drop(fetcher);
    let _again = rig.fetcher(&hook_env(hook));
    let calls = receiver.wait_calls(&d1, 204, 2).await;
    assert_eq!(calls.last().unwrap().seq.as_deref(), Some("7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_release_supersedes_a_failing_webhook_call() {
    let rig = Rig::new().await;
    let receiver = Receiver::default();
    let hook = receiver.start().await;
    let fetcher = rig.fetcher(&hook_env(hook));
    let addr = fetcher.http_addr().await.unwrap();
    let (url1, d1) = rig.publish("v1.tgz", &[("v", "1")]);
    receiver.failing.lock().unwrap().insert(d1.hex());
    rig.point_at(&url1, &d1).await;
    receiver.wait_calls(&d1, 503, 1).await;

    let (url2, d2) = rig.publish("v2.tgz", &[("v", "2")]);
    rig.point_at(&url2, &d2).await;
    let calls = receiver.wait_calls(&d2, 204, 1).await;
    assert_eq!(calls[0].seq, None, "a tar.gz release has no seq");
    let d1_calls = receiver.calls_for(&d1).len();
    // Once a third release's hook has run, the first is certainly no longer retried.
    let (url3, d3) = rig.publish("v3.tgz", &[("v", "3")]);
    rig.point_at(&url3, &d3).await;
    receiver.wait_calls(&d3, 204, 1).await;
    assert_eq!(receiver.calls_for(&d1).len(), d1_calls);
    assert!(receiver.calls_for(&d1).iter().all(|c| c.answered == 503));
    wait_live(addr, &d3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_webhook_setting_stops_the_start_with_a_clear_error() {
    let rig = Rig::new().await;
    for (key, value, expect) in [
        (
            "AETHER_WEBHOOK_URL",
            "ftp://127.0.0.1/x",
            "http:// or https://",
        ),
        ("AETHER_WEBHOOK_METHOD", "GE T", "AETHER_WEBHOOK_METHOD"),
    ] {
        let mut env = hook_env("127.0.0.1:1".parse().unwrap());
        env.retain(|(k, _)| *k != key);
        env.push((key, value.into()));
        let mut fetcher = rig.fetcher(&env);
        let status = fetcher.wait_exit(LONG).await.expect("exits");
        assert!(!status.success());
        let logs = fetcher.logs().join("\n");
        assert!(logs.contains(expect), "{key}={value}: {logs}");
    }
}
