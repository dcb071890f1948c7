//! End-to-end tests of the real `aether-fetcher` binary against the Kubernetes API
//! emulator and a fault-injecting artifact server.

mod rig;

use std::time::Duration;

use aether_common::{Digest, SigningKey};
use aether_testkit::artifacts::Fault;
use aether_testkit::hostile::{self, Hostile};
use aether_testkit::process::{metric, wait_until};
use rig::*;
use serde_json::json;

/// Logging that shows the fetcher's decisions (nothing to fetch, unchanged annotations),
/// the events tests wait for when they check that something did not happen.
const DECISIONS: &str = "info,aether_fetcher::engine=debug,aether_fetcher::source=debug";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_mode_applies_a_patched_release_and_reports_it_everywhere() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    assert_eq!(
        status(addr).await["current_digest"],
        serde_json::Value::Null
    );
    let (code, _) = aether_testkit::process::http_get(&format!("http://{addr}/readyz"))
        .await
        .unwrap();
    assert_eq!(code, 503, "not ready before a release is live");

    let (url, digest) = rig.publish("v1.tgz", &[("index.html", "v1"), ("lib/a.js", "a")]);
    rig.point_at(&url, &digest).await;
    wait_live(addr, &digest).await;

    assert_eq!(rig.read_current("index.html").as_deref(), Some("v1"));
    assert_eq!(rig.read_current("lib/a.js").as_deref(), Some("a"));
    let target = rig.current_target().unwrap();
    assert!(
        target.is_relative(),
        "current must be a relative link: {target:?}"
    );
    assert_eq!(
        target,
        std::path::Path::new(".aether/releases").join(digest.hex())
    );
    assert!(rig.workspace.join(".ready").exists());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rig.workspace.join(".aether/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["digest"], digest.to_string());
    assert_eq!(state["consecutive_failures"], 0);

    let line = fetcher
        .wait_for_log(
            &format!("REFRESH_OK app={POD} digest={} ms=", digest.hex()),
            LONG,
        )
        .await
        .unwrap();
    assert!(line.contains("ms="));
    let (code, _) = aether_testkit::process::http_get(&format!("http://{addr}/readyz"))
        .await
        .unwrap();
    assert_eq!(code, 200);
    let m = metrics(addr).await;
    assert_eq!(metric(&m, "dev_hot_refresh_total", ""), Some(1.0));
    assert_eq!(
        metric(&m, "dev_hot_refresh_latency_seconds_count", ""),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "dev_hot_refresh_consecutive_failures", ""),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, "dev_hot_current_info", &format!("digest=\"{digest}\"")),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "dev_hot_desired_info", &format!("digest=\"{digest}\"")),
        Some(1.0)
    );
    assert_eq!(metric(&m, "dev_hot_in_sync", ""), Some(1.0));
    assert_eq!(
        metric(&m, "dev_hot_refresh_failure_total", "reason=\"checksum\""),
        Some(0.0),
        "every reason is exported from the start"
    );

    // A second release replaces the first; the old info series disappears.
    let (url2, digest2) = rig.publish("v2.tgz", &[("index.html", "v2")]);
    rig.point_at(&url2, &digest2).await;
    wait_live(addr, &digest2).await;
    assert_eq!(rig.read_current("index.html").as_deref(), Some("v2"));
    assert_eq!(
        rig.read_current("lib/a.js"),
        None,
        "a release is a fresh directory"
    );
    let m = metrics(addr).await;
    assert_eq!(metric(&m, "dev_hot_refresh_total", ""), Some(2.0));
    assert_eq!(m.matches("dev_hot_current_info{").count(), 1, "{m}");
    assert!(m.contains(&digest2.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_applies_a_patched_release() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[("AETHER_FETCH_MODE", "poll".into())]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url, digest) = rig.publish("p.tgz", &[("f", "polled")]);
    rig.point_at(&url, &digest).await;
    wait_live(addr, &digest).await;
    assert_eq!(rig.read_current("f").as_deref(), Some("polled"));
    assert!(rig.emu.stats().get >= 1, "poll mode GETs the pod");
    assert_eq!(rig.emu.stats().watch, 0, "poll mode never watches");
}

/// Writes a Downward API annotations file the way the kubelet does: a new timestamped
/// directory, a `..data` symlink swapped by rename, and the file a link through it.
fn write_downward(dir: &std::path::Path, lines: &str, generation: u32) {
    let ts = dir.join(format!("..2026_{generation}"));
    std::fs::create_dir_all(&ts).unwrap();
    std::fs::write(ts.join("annotations"), lines).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(ts.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("annotations");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/annotations", &link).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_follows_the_downward_api_file_without_api_access() {
    let rig = Rig::new().await;
    let podinfo = rig.dir.path().join("podinfo");
    std::fs::create_dir_all(&podinfo).unwrap();
    write_downward(&podinfo, "kubernetes.io/config.seen=\"2026-01-01\"\n", 1);
    let fetcher = rig.fetcher(&[
        ("AETHER_FETCH_MODE", "file".into()),
        (
            "AETHER_ANNOTATIONS_FILE",
            podinfo.join("annotations").display().to_string(),
        ),
        // No API server at all: file mode must not need one.
        ("KUBECONFIG", "/nonexistent".into()),
        ("AETHER_FETCH_INTERVAL_SEC", "60".into()),
    ]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url, digest) = rig.publish("f1.tgz", &[("f", "one")]);
    write_downward(
        &podinfo,
        &format!("aether.dev/artifact-url=\"{url}\"\naether.dev/digest=\"{digest}\"\n"),
        2,
    );
    wait_live(addr, &digest).await;
    let (url2, digest2) = rig.publish("f2.tgz", &[("f", "two")]);
    write_downward(
        &podinfo,
        &format!("aether.dev/artifact-url=\"{url2}\"\naether.dev/digest=\"{digest2}\"\n"),
        3,
    );
    // The resync interval is 60 s: going live quickly proves the file watch works.
    wait_live(addr, &digest2).await;
    assert_eq!(rig.read_current("f").as_deref(), Some("two"));
    assert_eq!(rig.emu.stats().total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_annotate_triggers_a_refresh() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url, digest) = rig.publish("k.tgz", &[("f", "kubectl")]);
    let out = tokio::process::Command::new("kubectl")
        .args([
            "--server",
            &rig.emu.url(),
            "-n",
            "default",
            "annotate",
            "pod",
            POD,
            "--overwrite",
        ])
        .arg(format!("aether.dev/digest={digest}"))
        .arg(format!("aether.dev/artifact-url={url}"))
        .env("KUBECONFIG", "/dev/null")
        .env("HOME", rig.dir.path())
        .output()
        .await
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_live(addr, &digest).await;
    assert_eq!(rig.read_current("f").as_deref(), Some("kubectl"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_digest_is_never_downloaded_again_even_after_a_restart() {
    let rig = Rig::new().await;
    let (url, digest) = rig.publish("same.tgz", &[("f", "x")]);
    rig.point_at(&url, &digest).await;
    let mut fetcher = rig.fetcher(&[("RUST_LOG", DECISIONS.into())]);
    let addr = fetcher.http_addr().await.unwrap();
    wait_live(addr, &digest).await;
    // An unrelated annotation change is seen and changes nothing.
    rig.annotate(json!({"unrelated": "1"})).await;
    fetcher
        .wait_for_log("desired release unchanged", LONG)
        .await
        .unwrap();
    // A resync after it decides there is nothing to fetch.
    let decided = fetcher.lines_with("nothing to fetch").len();
    fetcher
        .wait_for_lines("nothing to fetch", decided + 1, LONG)
        .await
        .unwrap();
    assert_eq!(rig.art.requests("same.tgz"), 1);

    fetcher.sigterm();
    assert!(fetcher.wait_exit(Duration::from_secs(5)).await.is_some());
    let fetcher = rig.fetcher(&[("RUST_LOG", DECISIONS.into())]);
    fetcher
        .wait_for_log(
            &format!("REFRESH_STATE failures=0 last_digest={}", digest.hex()),
            LONG,
        )
        .await
        .unwrap();
    let addr = fetcher.http_addr().await.unwrap();
    wait_live(addr, &digest).await;
    let ready = wait_until(LONG, || async { rig.workspace.join(".ready").exists() }).await;
    assert!(ready);
    // The restarted fetcher decided, from the disk alone, that there is nothing to fetch.
    fetcher
        .wait_for_log(&format!("digest={digest}"), LONG)
        .await
        .unwrap();
    fetcher
        .wait_for_log("nothing to fetch", LONG)
        .await
        .unwrap();
    assert_eq!(
        rig.art.requests("same.tgz"),
        1,
        "restart must not re-download"
    );
    assert!(fetcher.lines_with("REFRESH_OK").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_patches_end_on_the_newest_and_never_go_back() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[
        ("AETHER_MIN_REFRESH_INTERVAL_MS", "300".into()),
        ("RUST_LOG", DECISIONS.into()),
    ]);
    let addr = fetcher.http_addr().await.unwrap();
    let mut last = None;
    for i in 0..8 {
        let name = format!("r{i}.tgz");
        let (url, digest) = rig.publish(&name, &[("version", &i.to_string())]);
        rig.art.fail_next(
            &name,
            Fault::Slow {
                chunk: 64,
                delay: Duration::from_millis(5),
            },
        );
        rig.point_at(&url, &digest).await;
        last = Some(digest);
    }
    let last = last.unwrap();
    wait_live(addr, &last).await;
    // Decisions made after the newest went live keep it: nothing older comes back.
    let decided = fetcher.lines_with("nothing to fetch").len();
    fetcher
        .wait_for_lines("nothing to fetch", decided + 1, LONG)
        .await
        .unwrap();
    assert_eq!(status(addr).await["current_digest"], last.to_string());
    assert_eq!(rig.read_current("version").as_deref(), Some("7"));
    let oks = fetcher.lines_with("REFRESH_OK");
    assert!(oks.last().unwrap().contains(&last.hex()), "{oks:?}");
    assert!(
        oks.len() < 8,
        "rapid patches are coalesced, got {} refreshes",
        oks.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_mismatch_is_refused_and_the_live_release_keeps_serving() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url, digest) = rig.publish("good.tgz", &[("f", "good")]);
    rig.point_at(&url, &digest).await;
    wait_live(addr, &digest).await;

    let (bad_url, _) = rig.publish("bad.tgz", &[("f", "evil")]);
    let wrong = Digest::of(b"something else");
    rig.point_at(&bad_url, &wrong).await;
    let s = wait_failures(addr, 1).await;
    assert_eq!(s["last_error"]["reason"], "checksum");
    assert_eq!(s["desired_digest"], wrong.to_string());
    assert_eq!(s["current_digest"], digest.to_string());
    assert_eq!(rig.read_current("f").as_deref(), Some("good"));
    assert!(
        !rig.workspace.join(".ready").exists(),
        ".ready only while current is desired"
    );
    assert!(
        !rig.workspace
            .join(".aether/releases")
            .join(wrong.hex())
            .exists()
    );
    fetcher
        .wait_for_log("REFRESH_FAIL app=app-0 reason=checksum", LONG)
        .await
        .unwrap();
    let m = metrics(addr).await;
    assert!(metric(&m, "dev_hot_refresh_failure_total", "reason=\"checksum\"").unwrap() >= 1.0);
    assert!(metric(&m, "dev_hot_refresh_consecutive_failures", "").unwrap() >= 1.0);
    assert_eq!(rig.staging_entries(), 0);

    // The same bytes served with wrong content (a corrupted mirror) are refused too.
    let (url3, digest3) = rig.publish("flip.tgz", &[("f", "flip")]);
    rig.art.fail_always("flip.tgz", Some(Fault::WrongBytes));
    rig.point_at(&url3, &digest3).await;
    let ok = wait_until(LONG, || async {
        status(addr).await["desired_digest"] == digest3.to_string().as_str()
            && status(addr).await["last_error"]["reason"] != serde_json::Value::Null
    })
    .await;
    assert!(ok);
    assert_eq!(rig.read_current("f").as_deref(), Some("good"));
    // Fix the mirror: the retry succeeds and the failure streak resets.
    rig.art.fail_always("flip.tgz", None);
    wait_live(addr, &digest3).await;
    assert_eq!(status(addr).await["consecutive_failures"], 0);
    assert_eq!(status(addr).await["last_error"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_key_missing_and_bad_signatures_are_refused_before_any_download() {
    let rig = Rig::new().await;
    let key = SigningKey::from_seed([9; 32]);
    let fetcher = rig.fetcher(&[("AETHER_PUBKEY", key.public_key().hex())]);
    let addr = fetcher.http_addr().await.unwrap();

    let (url, digest) = rig.publish("s.tgz", &[("f", "signed")]);
    rig.point_at(&url, &digest).await;
    let s = wait_failures(addr, 1).await;
    assert_eq!(s["last_error"]["reason"], "signature");

    let forged = SigningKey::from_seed([10; 32]).sign(&digest);
    rig.annotate(json!({"aether.dev/signature": forged.hex()}))
        .await;
    wait_failures(addr, 2).await;
    assert_eq!(
        rig.art.requests("s.tgz"),
        0,
        "signature is checked before the first request"
    );
    assert_eq!(rig.current_target(), None);
    let m = metrics(addr).await;
    assert_eq!(metric(&m, "dev_hot_signature_fail_total", ""), Some(2.0));
    assert_eq!(
        metric(&m, "dev_hot_refresh_failure_total", "reason=\"signature\""),
        Some(2.0)
    );
    fetcher
        .wait_for_log("REFRESH_FAIL app=app-0 reason=signature", LONG)
        .await
        .unwrap();

    rig.annotate(json!({"aether.dev/signature": key.sign(&digest).hex()}))
        .await;
    wait_live(addr, &digest).await;
    assert_eq!(rig.read_current("f").as_deref(), Some("signed"));
    assert_eq!(rig.art.requests("s.tgz"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_faults_are_retried_with_backoff_until_recovery() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[("AETHER_READ_TIMEOUT_MS", "300".into())]);
    let addr = fetcher.http_addr().await.unwrap();
    let big = noise(300_000);
    let (url, digest) = rig.publish("flaky.tgz", &[("big", &big), ("f", "finally")]);
    rig.art.fail_next("flaky.tgz", Fault::Status(500));
    rig.art.fail_next("flaky.tgz", Fault::Truncate(1000));
    rig.art.fail_next(
        "flaky.tgz",
        Fault::Stall {
            after: 500,
            pause: Duration::from_secs(3),
        },
    );
    rig.art.fail_next("flaky.tgz", Fault::Status(503));
    rig.point_at(&url, &digest).await;
    wait_live(addr, &digest).await;
    assert_eq!(rig.read_current("f").as_deref(), Some("finally"));
    assert_eq!(rig.art.requests("flaky.tgz"), 5);
    let m = metrics(addr).await;
    assert_eq!(
        metric(&m, "dev_hot_refresh_failure_total", "reason=\"download\""),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "dev_hot_refresh_failure_total", "reason=\"timeout\""),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "dev_hot_refresh_consecutive_failures", ""),
        Some(0.0)
    );
    assert_eq!(metric(&m, "dev_hot_refresh_total", ""), Some(5.0));
    assert_eq!(fetcher.lines_with("REFRESH_FAIL").len(), 4);
    assert_eq!(rig.staging_entries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomaly_is_counted_once_when_failures_reach_the_threshold() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[
        ("AETHER_ANOMALY_FAIL_THRESHOLD", "3".into()),
        ("AETHER_BACKOFF_MAX_MS", "500".into()),
    ]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url, digest) = rig.publish("down.tgz", &[("f", "x")]);
    rig.art.fail_always("down.tgz", Some(Fault::Status(500)));
    rig.point_at(&url, &digest).await;
    wait_failures(addr, 5).await;
    let m = metrics(addr).await;
    assert_eq!(metric(&m, "dev_hot_anomaly_events_total", ""), Some(1.0));
    assert!(metric(&m, "dev_hot_refresh_consecutive_failures", "").unwrap() >= 5.0);
    fetcher
        .wait_for_log("ANOMALY app=app-0", LONG)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_archive_is_refused_with_the_live_release_intact() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[("AETHER_BACKOFF_MAX_MS", "60000".into())]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url, digest) = rig.publish("base.tgz", &[("f", "base")]);
    rig.point_at(&url, &digest).await;
    wait_live(addr, &digest).await;
    std::fs::write(rig.outside.join("target.txt"), "outside").unwrap();

    for (i, kind) in Hostile::ALL.iter().enumerate() {
        let name = format!("hostile-{i}.tgz");
        let (url, bad) = rig.publish_bytes(&name, kind.build(&rig.outside));
        rig.point_at(&url, &bad).await;
        let ok = wait_until(LONG, || async {
            let s = status(addr).await;
            s["desired_digest"] == bad.to_string().as_str() && s["last_error"]["reason"].is_string()
        })
        .await;
        let s = status(addr).await;
        assert!(ok, "{kind:?}: no failure reported: {s}");
        assert_eq!(s["last_error"]["reason"], "extract", "{kind:?}: {s}");
        assert_eq!(s["current_digest"], digest.to_string(), "{kind:?}");
        assert_eq!(rig.read_current("f").as_deref(), Some("base"), "{kind:?}");
        assert!(
            !rig.workspace
                .join(".aether/releases")
                .join(bad.hex())
                .exists(),
            "{kind:?}"
        );
        assert_eq!(rig.staging_entries(), 0, "{kind:?} left staging behind");
        let outside: Vec<_> = std::fs::read_dir(&rig.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            outside,
            vec![std::ffi::OsString::from("target.txt")],
            "{kind:?} wrote outside"
        );
        assert_eq!(
            std::fs::read_to_string(rig.outside.join("target.txt")).unwrap(),
            "outside"
        );
        assert!(!std::path::Path::new("/tmp/aether-escape.txt").exists());
        assert!(
            !rig.workspace.join("escape.txt").exists()
                && !rig.workspace.join(".aether/escape.txt").exists()
        );
        // Back to the good release before the next kind, so each failure is its own.
        rig.point_at(&url_of(&rig, "base.tgz"), &digest).await;
        let ok = wait_until(LONG, || async {
            status(addr).await["last_error"].is_null()
        })
        .await;
        assert!(ok);
    }
    fetcher
        .wait_for_log("REFRESH_FAIL app=app-0 reason=extract", LONG)
        .await
        .unwrap();
    let m = metrics(addr).await;
    assert_eq!(
        metric(&m, "dev_hot_refresh_failure_total", "reason=\"extract\""),
        Some(Hostile::ALL.len() as f64)
    );
}

/// The pod limit the fetcher must live within, whatever the archive.
const POD_MEMORY_LIMIT: u64 = 64 << 20;

/// Waits until `/status` reports a failure of `bad`, then checks it is final (`reason`, not
/// retried), the live release `f=base` and staging are untouched, and the fetcher stayed
/// within the pod's memory limit.
async fn assert_refused_for_good(
    rig: &Rig,
    fetcher: &aether_testkit::process::Proc,
    addr: std::net::SocketAddr,
    bad: &Digest,
    reason: &str,
    case: &str,
) {
    let refused = wait_until(LONG, || async {
        status(addr)
            .await
            .get("last_error")
            .and_then(|e| e.get("digest"))
            .is_some_and(|d| d == bad.to_string().as_str())
    })
    .await;
    let s = status(addr).await;
    assert!(refused, "{case}: never refused: {s}");
    assert_eq!(s["last_error"]["reason"], reason, "{case}: {s}");
    assert_eq!(s["last_error"]["will_retry"], false, "{case}: {s}");
    assert_eq!(rig.read_current("f").as_deref(), Some("base"), "{case}");
    assert_eq!(rig.staging_entries(), 0, "{case}");
    let peak = fetcher.peak_rss_bytes().expect("fetcher is running");
    assert!(
        peak < POD_MEMORY_LIMIT,
        "{case}: peak RSS {peak} bytes, limit {POD_MEMORY_LIMIT}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_extension_headers_are_refused_for_good_within_the_memory_limit() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[("AETHER_BACKOFF_MAX_MS", "500".into())]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url, digest) = rig.publish("base.tgz", &[("f", "base")]);
    rig.point_at(&url, &digest).await;
    wait_live(addr, &digest).await;

    let mut refusals = 0;
    for (name, kind) in [
        ("pax.tgz", hostile::Extension::Pax),
        ("longname.tgz", hostile::Extension::GnuLongName),
    ] {
        // 300 MB of header that gzips to well under 1 MB.
        let bytes = hostile::huge_extension_header(kind, 300 << 20);
        assert!(bytes.len() < 1 << 20, "{kind:?}: {} bytes", bytes.len());
        let (bad_url, bad) = rig.publish_bytes(name, bytes.clone());
        rig.point_at(&bad_url, &bad).await;
        assert_refused_for_good(&rig, &fetcher, addr, &bad, "extract", name).await;
        // The same digest from another URL is a change of annotations: tried once more,
        // refused again. The first URL was fetched exactly once (no re-download loop):
        // its refusal was final, while the 500 ms backoff would have retried it by now
        // had it been retryable.
        let (again_url, _) = rig.publish_bytes(&format!("again-{name}"), bytes);
        rig.point_at(&again_url, &bad).await;
        refusals += 2;
        fetcher
            .wait_for_lines("refused for good", refusals, LONG)
            .await
            .unwrap();
        assert_eq!(rig.art.requests(name), 1, "{kind:?} was downloaded again");
        assert_eq!(rig.art.requests(&format!("again-{name}")), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_past_its_deadline_fails_as_timeout_and_is_retried() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[
        // Far more than a small release needs even on a loaded machine; far less than the
        // stall below.
        ("AETHER_REFRESH_TIMEOUT_MS", "5000".into()),
        // Only the overall deadline can end the stalled download.
        ("AETHER_READ_TIMEOUT_MS", "600000".into()),
        ("AETHER_BACKOFF_MAX_MS", "500".into()),
    ]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url, digest) = rig.publish("base.tgz", &[("f", "base")]);
    rig.point_at(&url, &digest).await;
    wait_live(addr, &digest).await;
    let big = noise(1 << 20);
    let (url2, digest2) = rig.publish("stalls.tgz", &[("big", &big), ("f", "new")]);
    rig.art.fail_next(
        "stalls.tgz",
        Fault::Stall {
            after: 4096,
            pause: Duration::from_secs(600),
        },
    );
    rig.point_at(&url2, &digest2).await;
    fetcher
        .wait_for_log("REFRESH_FAIL app=app-0 reason=timeout", LONG)
        .await
        .unwrap();
    assert_eq!(rig.read_current("f").as_deref(), Some("base"));
    let s = status(addr).await;
    assert_eq!(s["last_error"]["digest"], digest2.to_string(), "{s}");
    assert_eq!(s["last_error"]["will_retry"], true, "{s}");
    // The stall was the first request only: the retry completes.
    wait_live(addr, &digest2).await;
    assert_eq!(rig.read_current("f").as_deref(), Some("new"));
    assert_eq!(rig.staging_entries(), 0);
    let m = metrics(addr).await;
    let timeouts = metric(&m, "dev_hot_refresh_failure_total", "reason=\"timeout\"");
    assert!(timeouts >= Some(1.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_built_to_exhaust_memory_or_time_are_refused_within_the_pod_limit() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[("AETHER_BACKOFF_MAX_MS", "500".into())]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url, digest) = rig.publish("base.tgz", &[("f", "base")]);
    rig.point_at(&url, &digest).await;
    wait_live(addr, &digest).await;
    let cases = [
        // ~90 MB of directory names kept for the end, from a small archive.
        ("deep.tgz", hostile::deep_directories(40, 3000), "too_large"),
        // ~2 million lookups to check where the links lead.
        (
            "links.tgz",
            hostile::link_lookup_flood(5000, 2000),
            "extract",
        ),
        // 256 MiB that a directory entry declares and a reader would skip unseen.
        (
            "dirdata.tgz",
            hostile::directory_with_data(256 << 20),
            "extract",
        ),
    ];
    for (name, bytes, reason) in cases {
        assert!(bytes.len() < 4 << 20, "{name}: {} bytes", bytes.len());
        let (bad_url, bad) = rig.publish_bytes(name, bytes);
        rig.point_at(&bad_url, &bad).await;
        assert_refused_for_good(&rig, &fetcher, addr, &bad, reason, name).await;
    }
}

fn url_of(rig: &Rig, name: &str) -> String {
    rig.art.url(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bombs_and_entry_floods_are_refused_as_too_large() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[
        ("AETHER_MAX_EXTRACT_BYTES", (8u64 << 20).to_string()),
        ("AETHER_MAX_ENTRIES", "100".into()),
        ("AETHER_BACKOFF_MAX_MS", "60000".into()),
    ]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url, bomb) = rig.publish_bytes("bomb.tgz", hostile::zero_bomb(64 << 20));
    rig.point_at(&url, &bomb).await;
    let s = wait_failures(addr, 1).await;
    assert_eq!(s["last_error"]["reason"], "too_large", "{s}");
    let (url, flood) = rig.publish_bytes("flood.tgz", hostile::many_entries(500));
    rig.point_at(&url, &flood).await;
    let s = wait_failures(addr, 2).await;
    assert_eq!(s["last_error"]["reason"], "too_large", "{s}");
    assert_eq!(rig.staging_entries(), 0);
    assert_eq!(rig.current_target(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_over_the_download_cap_is_refused() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[("AETHER_MAX_ARTIFACT_BYTES", "1000".into())]);
    let addr = fetcher.http_addr().await.unwrap();
    let big = noise(5000);
    let (url, digest) = rig.publish("big.tgz", &[("f", &big)]);
    rig.point_at(&url, &digest).await;
    let s = wait_failures(addr, 1).await;
    assert_eq!(s["last_error"]["reason"], "too_large", "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setuid_sticky_and_shared_write_bits_are_stripped() {
    use std::os::unix::fs::PermissionsExt;
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url, digest) = rig.publish_bytes("modes.tgz", hostile::special_modes());
    rig.point_at(&url, &digest).await;
    wait_live(addr, &digest).await;
    let mode = |f: &str| {
        std::fs::metadata(rig.workspace.join("current").join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("suid.sh"), 0o755);
    assert_eq!(mode("sticky.txt"), 0o644);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_annotation_is_refused_and_nothing_is_touched() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[("RUST_LOG", DECISIONS.into())]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url, digest) = rig.publish("ok.tgz", &[("f", "ok")]);
    rig.point_at(&url, &digest).await;
    wait_live(addr, &digest).await;
    rig.annotate(json!({"aether.dev/digest": "sha256:NOT-HEX"}))
        .await;
    let s = wait_failures(addr, 1).await;
    assert_eq!(s["last_error"]["reason"], "invalid_annotation");
    fetcher
        .wait_for_log("REFRESH_FAIL app=app-0 reason=invalid_annotation", LONG)
        .await
        .unwrap();
    // The next resync looks at it again and waits for a change instead of retrying.
    fetcher
        .wait_for_log("malformed annotations already reported", LONG)
        .await
        .unwrap();
    assert_eq!(
        status(addr).await["consecutive_failures"],
        1,
        "refused once, not retried"
    );
    assert_eq!(rig.read_current("f").as_deref(), Some("ok"));
    // https is required unless allowed.
    let rig2 = Rig::new().await;
    let strict = rig2.fetcher(&[("AETHER_ALLOW_HTTP", "0".into())]);
    let addr2 = strict.http_addr().await.unwrap();
    let (url, digest) = rig2.publish("plain.tgz", &[("f", "x")]);
    rig2.point_at(&url, &digest).await;
    let s = wait_failures(addr2, 1).await;
    assert_eq!(s["last_error"]["reason"], "invalid_annotation");
    assert_eq!(rig2.art.requests("plain.tgz"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_extraction_keeps_current_intact_and_a_restart_completes() {
    let rig = Rig::new().await;
    let (url, digest) = rig.publish("old.tgz", &[("f", "old")]);
    rig.point_at(&url, &digest).await;
    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    wait_live(addr, &digest).await;

    // Incompressible content, served slowly, so the kill lands mid-extraction.
    let noise = noise(2 << 20);
    let (url2, digest2) = rig.publish("new.tgz", &[("big", &noise), ("f", "new")]);
    rig.art.fail_next(
        "new.tgz",
        Fault::Slow {
            chunk: 16 * 1024,
            delay: Duration::from_millis(10),
        },
    );
    rig.point_at(&url2, &digest2).await;
    let started = wait_until(LONG, || async {
        let staging = rig.workspace.join(".aether/staging");
        std::fs::read_dir(&staging)
            .ok()
            .and_then(|mut d| d.next())
            .is_some_and(|e| {
                let dir = e.unwrap().path();
                std::fs::metadata(dir.join("big")).is_ok_and(|m| m.len() > 0)
            })
    })
    .await;
    assert!(started, "extraction never started");
    fetcher.sigkill();
    let mut fetcher = fetcher;
    fetcher.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(rig.read_current("f").as_deref(), Some("old"));
    assert!(
        rig.staging_entries() > 0,
        "the kill left staging behind (as expected)"
    );
    assert!(
        !rig.workspace
            .join(".aether/releases")
            .join(digest2.hex())
            .exists()
    );

    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    wait_live(addr, &digest2).await;
    assert_eq!(rig.read_current("f").as_deref(), Some("new"));
    assert_eq!(rig.staging_entries(), 0, "start-up removes stale staging");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_download_exits_within_a_second_and_cleans_staging() {
    let rig = Rig::new().await;
    let mut fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    let big = noise(1 << 20);
    let (url, digest) = rig.publish("slow.tgz", &[("big", &big)]);
    rig.art.fail_next(
        "slow.tgz",
        Fault::Stall {
            after: 2000,
            pause: Duration::from_secs(30),
        },
    );
    rig.point_at(&url, &digest).await;
    let started = wait_until(LONG, || async { rig.staging_entries() > 0 }).await;
    assert!(started);
    let _ = addr;
    let t = std::time::Instant::now();
    fetcher.sigterm();
    let exit = fetcher
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exited");
    let took = t.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(rig.staging_entries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_extractor_checks_links_exits_within_a_second() {
    let rig = Rig::new().await;
    let mut fetcher = rig.fetcher(&[]);
    fetcher.http_addr().await.unwrap();
    // A million lookups' worth of links: the blocking thread is busy for a while in its
    // last phase, after the whole body has arrived.
    let (url, bad) = rig.publish_bytes("links.tgz", hostile::link_lookup_flood(5000, 2000));
    rig.point_at(&url, &bad).await;
    let staging = rig.workspace.join(".aether/staging");
    let checking = wait_until(LONG, || async {
        std::fs::read_dir(&staging).is_ok_and(|mut d| {
            d.any(|e| e.is_ok_and(|e| e.path().join("l4999").symlink_metadata().is_ok()))
        })
    })
    .await;
    assert!(checking, "the links were never created");
    let t = std::time::Instant::now();
    fetcher.sigterm();
    let exit = fetcher
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exited");
    let took = t.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(rig.current_target(), None, "nothing went live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_watch_and_410_gone_are_recovered() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[("AETHER_FETCH_INTERVAL_SEC", "300".into())]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url, digest) = rig.publish("w1.tgz", &[("f", "1")]);
    rig.point_at(&url, &digest).await;
    wait_live(addr, &digest).await;
    let watches_before = rig.emu.stats().watch;

    // Cut the connection while new watches are parked: the watcher is then known to be
    // reconnecting. Change the pod and forget the history before letting it through, so
    // its resumed watch gets 410 Gone and the only way to see the change is to re-list.
    rig.emu.hold_watches();
    rig.emu.drop_watches();
    let reconnecting = wait_until(LONG, || async { rig.emu.held_watches() >= 1 }).await;
    assert!(reconnecting, "the watcher never tried to reconnect");
    let (url2, digest2) = rig.publish("w2.tgz", &[("f", "2")]);
    rig.emu
        .merge_patch(
            "pods",
            Some("default"),
            POD,
            &json!({"metadata": {"annotations": {
            "aether.dev/digest": digest2.to_string(), "aether.dev/artifact-url": url2}}}),
        )
        .unwrap();
    rig.emu.compact();
    let lists_before = rig.emu.stats().list;
    rig.emu.release_watches();
    wait_live(addr, &digest2).await;
    assert!(
        rig.emu.stats().watch > watches_before,
        "the watcher reconnected"
    );
    assert!(
        rig.emu.stats().list > lists_before,
        "the watcher re-listed after 410"
    );

    // And plain drops without compaction resume from the last version.
    rig.emu.drop_watches();
    let (url3, digest3) = rig.publish("w3.tgz", &[("f", "3")]);
    rig.point_at(&url3, &digest3).await;
    wait_live(addr, &digest3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_mode_applies_the_release_and_exits_zero_or_fails_non_zero() {
    let rig = Rig::new().await;
    let (url, digest) = rig.publish("once.tgz", &[("f", "init")]);
    rig.point_at(&url, &digest).await;
    let mut once = rig.fetcher_args(&["--once"], &[]);
    let exit = once.wait_exit(LONG).await.expect("exits");
    assert!(exit.success(), "{:?}", once.logs());
    assert_eq!(rig.read_current("f").as_deref(), Some("init"));
    assert!(rig.workspace.join(".ready").exists());

    // Again with the same digest: nothing to download.
    let mut again = rig.fetcher_args(&["--once"], &[]);
    assert!(again.wait_exit(LONG).await.unwrap().success());
    assert_eq!(rig.art.requests("once.tgz"), 1);

    let wrong = Digest::of(b"nope");
    rig.point_at(&url, &wrong).await;
    let mut failing = rig.fetcher_args(&["--once"], &[("AETHER_BACKOFF_MAX_MS", "500".into())]);
    let exit = failing.wait_exit(LONG).await.expect("exits");
    assert_eq!(exit.code(), Some(1));
    assert_eq!(rig.read_current("f").as_deref(), Some("init"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requiring_signatures_without_a_key_is_a_start_up_error() {
    let rig = Rig::new().await;
    let mut f = rig.fetcher(&[("AETHER_REQUIRE_SIGNATURE", "1".into())]);
    let exit = f.wait_exit(LONG).await.expect("exits");
    assert_eq!(exit.code(), Some(2));
    assert!(
        f.logs()
            .iter()
            .any(|l| l.contains("AETHER_REQUIRE_SIGNATURE"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_info_follows_a_current_link_changed_behind_the_fetchers_back() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[("AETHER_BACKOFF_MAX_MS", "60000".into())]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url_a, a) = rig.publish("a.tgz", &[("f", "a")]);
    let (url_b, b) = rig.publish("b.tgz", &[("f", "b")]);
    rig.point_at(&url_a, &a).await;
    wait_live(addr, &a).await;
    rig.point_at(&url_b, &b).await;
    wait_live(addr, &b).await;
    // A desired release that cannot be fetched keeps the fetcher from re-applying one.
    let (url_c, c) = rig.publish("c.tgz", &[("f", "c")]);
    rig.art.fail_always("c.tgz", Some(Fault::Status(500)));
    rig.point_at(&url_c, &c).await;
    wait_failures(addr, 1).await;
    let m = metrics(addr).await;
    assert_eq!(
        metric(&m, "dev_hot_desired_info", &format!("digest=\"{c}\"")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "dev_hot_in_sync", ""), Some(0.0), "{m}");
    // Someone points `current` at the kept release A.
    let tmp = rig.workspace.join("current.test-tmp");
    std::os::unix::fs::symlink(format!(".aether/releases/{}", a.hex()), &tmp).unwrap();
    std::fs::rename(&tmp, rig.workspace.join("current")).unwrap();
    wait_live(addr, &a).await;
    let m = metrics(addr).await;
    let series = |d: &Digest| format!("digest=\"{d}\"");
    assert_eq!(
        metric(&m, "dev_hot_current_info", &series(&a)),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "dev_hot_current_info", &series(&b)), None, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_release_is_reused_without_downloading() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[("AETHER_KEEP_RELEASES", "3".into())]);
    let addr = fetcher.http_addr().await.unwrap();
    let (url_a, a) = rig.publish("a.tgz", &[("f", "a")]);
    let (url_b, b) = rig.publish("b.tgz", &[("f", "b")]);
    let (url_c, c) = rig.publish("c.tgz", &[("f", "c")]);
    for (url, d) in [(&url_a, &a), (&url_b, &b), (&url_c, &c)] {
        rig.point_at(url, d).await;
        wait_live(addr, d).await;
    }
    let releases = std::fs::read_dir(rig.workspace.join(".aether/releases"))
        .unwrap()
        .count();
    assert_eq!(releases, 3);
    rig.point_at(&url_a, &a).await;
    wait_live(addr, &a).await;
    assert_eq!(
        rig.art.requests("a.tgz"),
        1,
        "rollback to a kept release needs no download"
    );
    let (url_d, d) = rig.publish("d.tgz", &[("f", "d")]);
    rig.point_at(&url_d, &d).await;
    wait_live(addr, &d).await;
    let releases = std::fs::read_dir(rig.workspace.join(".aether/releases"))
        .unwrap()
        .count();
    assert_eq!(
        releases, 3,
        "old releases are pruned to AETHER_KEEP_RELEASES"
    );
    assert!(
        !rig.workspace
            .join(".aether/releases")
            .join(b.hex())
            .exists()
    );
}
