//! Manifest releases (`aether.dev/format: manifest`) end to end with the real fetcher: only
//! changed files travel, every blob is verified, replays and expired releases are refused
//! with their own reasons, and a kill at any point leaves a complete live release.

mod rig;

use std::time::Duration;

use aether_common::Digest;
use aether_testkit::artifacts::{BadDifference, Fault};
use aether_testkit::process::{metric, wait_until};
use rig::*;

fn files_metric(text: &str, change: &str) -> f64 {
    metric(
        text,
        "dev_hot_refresh_files_total",
        &format!("change=\"{change}\""),
    )
    .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_file_edit_downloads_only_that_file_and_unused_objects_are_removed() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    let big_js = "x".repeat(50_000);
    let v1: Vec<(&str, &str)> = vec![
        ("app.py", "print('v1')"),
        ("lib/util.py", "def f(): pass"),
        ("static/big.js", &big_js),
    ];
    let (url1, d1) = rig.publish_manifest(&manifest(APP, 1, &v1), &v1);
    rig.point_at_manifest(&url1, &d1).await;
    wait_live(addr, &d1).await;
    assert_eq!(rig.read_current("app.py").as_deref(), Some("print('v1')"));
    assert_eq!(
        rig.read_current("lib/util.py").as_deref(),
        Some("def f(): pass")
    );
    let big = Digest::of(v1[2].1.as_bytes());
    assert_eq!(rig.art.requests(&blob_name(&big)), 1);

    // One file changes: only its blob (and the manifest) is downloaded.
    let mut v2 = v1.clone();
    v2[0] = ("app.py", "print('v2')");
    let (url2, d2) = rig.publish_manifest(&manifest(APP, 2, &v2), &v2);
    rig.point_at_manifest(&url2, &d2).await;
    wait_live(addr, &d2).await;
    assert_eq!(rig.read_current("app.py").as_deref(), Some("print('v2')"));
    assert_eq!(
        rig.art.requests(&blob_name(&big)),
        1,
        "unchanged blobs stay"
    );
    let m = metrics(addr).await;
    assert_eq!(files_metric(&m, "changed"), 1.0, "{m}");
    assert_eq!(
        files_metric(&m, "added"),
        3.0,
        "the first release adds all: {m}"
    );
    assert_eq!(files_metric(&m, "reused"), 2.0, "{m}");
    let downloaded = metric(&m, "dev_hot_refresh_bytes_total", "source=\"downloaded\"").unwrap();
    assert!(downloaded < 60_000.0, "{downloaded} bytes for two releases");

    // A third release is patched from the first (neither live nor in use): the edit and
    // a removal, the rest reused in place.
    let v3: Vec<(&str, &str)> = vec![("app.py", "print('v3')"), ("static/big.js", v1[2].1)];
    let (url3, d3) = rig.publish_manifest(&manifest(APP, 3, &v3), &v3);
    rig.point_at_manifest(&url3, &d3).await;
    wait_live(addr, &d3).await;
    assert!(
        rig.read_current("lib/util.py").is_none(),
        "removed file is gone"
    );
    let m = metrics(addr).await;
    assert_eq!(files_metric(&m, "removed"), 1.0, "{m}");
    assert_eq!(files_metric(&m, "reused"), 3.0, "{m}");
    // The kept releases are v2 and v3: v1's app.py object is no longer named by either.
    let v1_app = format!("{}-444", Digest::of(b"print('v1')").hex());
    let collected = wait_until(LONG, || async { !rig.objects().contains(&v1_app) }).await;
    assert!(collected, "objects: {:?}", rig.objects());
    let v2_app = format!("{}-444", Digest::of(b"print('v2')").hex());
    assert!(
        rig.objects().contains(&v2_app),
        "v2 is kept, so are its objects"
    );
    let mode = std::fs::metadata(rig.workspace.join("current/app.py"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o444, "files of a manifest release are read-only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_foreign_and_expired_manifests_are_refused_even_after_a_restart() {
    let rig = Rig::new().await;
    let files = [("f", "five")];
    let (url5, d5) = rig.publish_manifest(&manifest(APP, 5, &files), &files);
    rig.point_at_manifest(&url5, &d5).await;
    let mut fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    wait_live(addr, &d5).await;
    let m = metrics(addr).await;
    for reason in ["replay", "expired"] {
        assert_eq!(
            metric(
                &m,
                "dev_hot_refresh_failure_total",
                &format!("reason=\"{reason}\"")
            ),
            Some(0.0),
            "{reason} exported at 0"
        );
    }

    let refused = |seq: u64, app: &str, expires: Option<&str>| {
        let older = [("f", "older")];
        let mut m = manifest(app, seq, &older);
        m.expires_at = expires.map(str::to_owned);
        rig.publish_manifest(&m, &older)
    };
    let expect = |reason: &'static str, failures: u64| async move {
        let s = wait_failures(addr, failures).await;
        assert_eq!(s["last_error"]["reason"], reason, "{s}");
        assert_eq!(s["current_digest"], d5.to_string().as_str());
    };
    let (url, d) = refused(4, APP, None);
    rig.point_at_manifest(&url, &d).await;
    expect("replay", 1).await;
    let (url, d) = refused(9, "other-app", None);
    rig.point_at_manifest(&url, &d).await;
    expect("replay", 2).await;
    let (url, d) = refused(10, APP, Some("2020-01-01T00:00:00Z"));
    rig.point_at_manifest(&url, &d).await;
    expect("expired", 3).await;
    assert_eq!(rig.read_current("f").as_deref(), Some("five"));

    // The high-water mark survives a restart (state.json).
    fetcher.sigterm();
    fetcher.wait_exit(LONG).await.expect("fetcher exits");
    let state = std::fs::read_to_string(rig.workspace.join(".aether/state.json")).unwrap();
    assert!(state.contains("\"seq\":5"), "{state}");
    let (url, d) = refused(4, APP, None);
    rig.point_at_manifest(&url, &d).await;
    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    let s = wait_failures(addr, 1).await;
    assert_eq!(s["last_error"]["reason"], "replay", "{s}");
    assert_eq!(rig.read_current("f").as_deref(), Some("five"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_manifest_fetches_no_blob_and_a_wrong_blob_never_becomes_an_object() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    let good = [("f", "good")];
    let (url, d) = rig.publish_manifest(&manifest(APP, 1, &good), &good);
    rig.point_at_manifest(&url, &d).await;
    wait_live(addr, &d).await;

    // A path out of the release: refused with reason extract before any blob request.
    let evil = [("../outside/pwned", "x")];
    let (url, d) = rig.publish_manifest(&manifest(APP, 2, &evil), &evil);
    rig.point_at_manifest(&url, &d).await;
    let s = wait_failures(addr, 1).await;
    assert_eq!(s["last_error"]["reason"], "extract", "{s}");
    assert_eq!(rig.art.requests(&blob_name(&Digest::of(b"x"))), 0);
    assert!(rig.outside_is_empty());

    // A blob whose bytes do not match: checksum, retried, never stored, live untouched.
    let next = [("f", "next")];
    let (url, d) = rig.publish_manifest(&manifest(APP, 3, &next), &next);
    let blob = blob_name(&Digest::of(b"next"));
    rig.art.fail_always(&blob, Some(Fault::WrongBytes));
    rig.point_at_manifest(&url, &d).await;
    let s = wait_failures(addr, 2).await;
    assert_eq!(s["last_error"]["reason"], "checksum", "{s}");
    assert_eq!(rig.read_current("f").as_deref(), Some("good"));
    let next_hex = Digest::of(b"next").hex();
    assert!(!rig.objects().iter().any(|o| o.starts_with(&next_hex)));
    // Once the store serves the right bytes, the retry succeeds.
    rig.art.fail_always(&blob, None);
    wait_live(addr, &d).await;
    assert_eq!(rig.read_current("f").as_deref(), Some("next"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_blobs_download_keeps_current_complete_and_a_restart_completes() {
    let rig = Rig::new().await;
    // Over the batched downloads' size: this blob travels alone.
    let big = noise((1 << 20) + 1);
    let new = vec![
        ("f".to_owned(), "new".to_owned()),
        ("big".to_owned(), big.clone()),
    ];
    let big_blob = blob_name(&Digest::of(big.as_bytes()));
    let d_new = sigkill_while_downloading(&rig, &new, &big_blob, 4096).await;
    let big_hex = Digest::of(big.as_bytes()).hex();
    assert!(
        !rig.objects().iter().any(|o| o.starts_with(&big_hex)),
        "a partial blob is never an object"
    );

    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    wait_live(addr, &d_new).await;
    assert_eq!(rig.read_current("f").as_deref(), Some("new"));
    assert_eq!(
        rig.read_current("big").map(|b| b.len()),
        Some((1 << 20) + 1)
    );
    assert_eq!(rig.staging_entries(), 0, "start-up removes stale staging");
}

/// With a release of `f` = "old" live, points the pod at `new` while the download named
/// `stalled` hangs after `after` bytes, and SIGKILLs the fetcher in it: `current` stays on
/// the old release. Returns the digest of `new`, for a fresh fetcher to make live.
async fn sigkill_while_downloading(
    rig: &Rig,
    new: &[(String, String)],
    stalled: &str,
    after: usize,
) -> Digest {
    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    let old = [("f".to_owned(), "old".to_owned())];
    wait_live(addr, &release(rig, 1, &old).await).await;
    rig.art.fail_next(
        stalled,
        Fault::Stall {
            after,
            pause: Duration::from_secs(60),
        },
    );
    let d_new = release(rig, 2, new).await;
    let started = wait_until(LONG, || async { rig.art.requests(stalled) >= 1 }).await;
    assert!(started, "the download of {stalled} never started");
    fetcher.sigkill();
    let mut fetcher = fetcher;
    fetcher.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(rig.read_current("f").as_deref(), Some("old"));
    d_new
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_applies_a_manifest_release_and_exits_zero() {
    let rig = Rig::new().await;
    let files = [("index.html", "hello"), ("run.sh", "#!/bin/sh")];
    let (url, d) = rig.publish_manifest(&manifest(APP, 1, &files), &files);
    rig.point_at_manifest(&url, &d).await;
    let mut once = rig.fetcher_args(&["--once"], &[]);
    let status = once.wait_exit(LONG).await.expect("--once exits");
    assert!(status.success(), "{:?}", once.logs());
    assert_eq!(rig.read_current("index.html").as_deref(), Some("hello"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_aether_app_a_manifest_is_refused_with_replay() {
    let rig = Rig::new().await;
    let files = [("f", "x")];
    let (url, d) = rig.publish_manifest(&manifest(APP, 1, &files), &files);
    rig.point_at_manifest(&url, &d).await;
    let fetcher = rig.fetcher(&[("AETHER_APP", String::new())]);
    let addr = fetcher.http_addr().await.unwrap();
    let s = wait_failures(addr, 1).await;
    assert_eq!(s["last_error"]["reason"], "replay", "{s}");
    assert!(
        s["last_error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("AETHER_APP"),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_require_manifest_a_tar_gz_release_is_refused_as_replay() {
    let rig = Rig::new().await;
    let (url, digest) = rig.publish("a.tgz", &[("f", "tar")]);
    rig.point_at(&url, &digest).await;
    let fetcher = rig.fetcher(&[("AETHER_REQUIRE_MANIFEST", "1".into())]);
    let addr = fetcher.http_addr().await.unwrap();
    let s = wait_failures(addr, 1).await;
    assert_eq!(s["last_error"]["reason"], "replay", "{s}");
    assert_eq!(rig.art.requests("a.tgz"), 0, "refused before any request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_release_keeps_its_seq_when_state_json_lost_it() {
    let rig = Rig::new().await;
    let files = [("f", "seven")];
    let (url, d7) = rig.publish_manifest(&manifest(APP, 7, &files), &files);
    rig.point_at_manifest(&url, &d7).await;
    let mut fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    wait_live(addr, &d7).await;
    fetcher.sigterm();
    fetcher.wait_exit(LONG).await.expect("fetcher exits");
    // As if killed after the swap, before state.json was written.
    std::fs::remove_file(rig.workspace.join(".aether/state.json")).unwrap();
    let older = [("f", "six")];
    let (url, d6) = rig.publish_manifest(&manifest(APP, 6, &older), &older);
    rig.point_at_manifest(&url, &d6).await;
    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    let s = wait_failures(addr, 1).await;
    assert_eq!(s["last_error"]["reason"], "replay", "{s}");
    assert_eq!(rig.read_current("f").as_deref(), Some("seven"));
}

/// `count` small files of distinct contents.
fn small_files(count: usize, version: &str) -> Vec<(String, String)> {
    (0..count)
        .map(|i| {
            (
                format!("node_modules/m{i}/index.js"),
                format!("{version} {i}"),
            )
        })
        .collect()
}

fn as_refs(files: &[(String, String)]) -> Vec<(&str, &str)> {
    files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_str()))
        .collect()
}

const BATCH: &str = "blobs/download";

/// Publishes `files` as release `seq` of the rig's app and points the pod at it.
async fn release(rig: &Rig, seq: u64, files: &[(String, String)]) -> Digest {
    let refs = as_refs(files);
    let (url, digest) = rig.publish_manifest(&manifest(APP, seq, &refs), &refs);
    rig.point_at_manifest(&url, &digest).await;
    digest
}

/// The live release holds `files`, and each one's blob was asked for `requests` times.
fn assert_served(rig: &Rig, files: &[(String, String)], requests: u64) {
    for (path, content) in files {
        assert_eq!(rig.read_current(path).as_ref(), Some(content), "{path}");
        let blob = blob_name(&Digest::of(content.as_bytes()));
        assert_eq!(rig.art.requests(&blob), requests, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_files_travel_in_one_batched_download_and_a_store_without_it_serves_them_one_by_one()
 {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    let v1 = small_files(60, "v1");
    wait_live(addr, &release(&rig, 1, &v1).await).await;
    assert_eq!(rig.art.requests(BATCH), 1, "one request for 60 blobs");
    assert_served(&rig, &v1, 1);

    // A store without the route (a plain file server): the same blobs, one request each.
    rig.art.fail_always(BATCH, Some(Fault::Status(404)));
    let v2 = small_files(60, "v2");
    wait_live(addr, &release(&rig, 2, &v2).await).await;
    assert_eq!(rig.art.requests(BATCH), 2, "asked once, refused");
    assert_served(&rig, &v2, 1);
    let s = status(addr).await;
    assert_eq!(s["consecutive_failures"], 0, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_batch_is_asked_again_and_a_wrong_blob_in_a_batch_never_becomes_an_object() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    let v1 = small_files(3, "v1");
    rig.art.fail_next(BATCH, Fault::Truncate(700));
    wait_live(addr, &release(&rig, 1, &v1).await).await;
    assert_eq!(rig.art.requests(BATCH), 2, "the cut batch was asked again");
    let m = metrics(addr).await;
    let failures = metric(&m, "dev_hot_refresh_failure_total", "reason=\"download\"");
    assert_eq!(failures, Some(1.0), "{m}");

    // One blob of the batch has the wrong bytes: checksum, nothing of it stored, the live
    // release untouched; once the store is right the retry succeeds.
    let v2 = small_files(3, "v2");
    let wrong = Digest::of(v2[1].1.as_bytes());
    rig.art
        .fail_always(&blob_name(&wrong), Some(Fault::WrongBytes));
    let d2 = release(&rig, 2, &v2).await;
    let s = wait_failures(addr, 2).await;
    assert_eq!(s["last_error"]["reason"], "checksum", "{s}");
    assert_eq!(rig.read_current(&v1[1].0).as_ref(), Some(&v1[1].1));
    assert!(!rig.objects().iter().any(|o| o.starts_with(&wrong.hex())));
    rig.art.fail_always(&blob_name(&wrong), None);
    wait_live(addr, &d2).await;
    assert_eq!(rig.read_current(&v2[1].0).as_ref(), Some(&v2[1].1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_batched_download_keeps_current_complete_and_a_restart_completes() {
    let rig = Rig::new().await;
    let mut new = small_files(20, "new");
    new.push(("f".into(), "new".into()));
    let d_new = sigkill_while_downloading(&rig, &new, BATCH, 2048).await;

    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    wait_live(addr, &d_new).await;
    // Each blob was asked for in the stalled batch, and again after the restart unless it
    // arrived whole before the stall: the first 2048 bytes of the tar hold at most two
    // entries (a 512-byte header and one padded block each), which a fetcher not killed
    // at once has already kept as objects.
    let mut again = 0;
    for (path, content) in &new {
        assert_eq!(rig.read_current(path).as_ref(), Some(content), "{path}");
        let asked = rig
            .art
            .requests(&blob_name(&Digest::of(content.as_bytes())));
        assert!((1..=2).contains(&asked), "{path} asked for {asked} times");
        again += usize::from(asked == 2);
    }
    assert!(again >= new.len() - 2, "only {again} blobs asked for again");
    assert_eq!(rig.staging_entries(), 0, "start-up removes stale staging");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_of_the_live_release_that_went_missing_is_fetched_again() {
    let rig = Rig::new().await;
    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    let v1 = [("keep.txt", "kept bytes"), ("app.py", "v1")];
    let (url, d1) = rig.publish_manifest(&manifest(APP, 1, &v1), &v1);
    rig.point_at_manifest(&url, &d1).await;
    wait_live(addr, &d1).await;
    // Someone removes an object the live release uses. The next release has no base to
    // patch (the only kept release is live, and its spare copy is removed too), so it is
    // linked from objects alone, and every object is looked for.
    let spare = rig.workspace.join(".aether/spare").join(d1.hex());
    let copied = wait_until(LONG, || async { spare.is_dir() }).await;
    assert!(copied, "the only release gets a spare copy");
    std::fs::remove_dir_all(&spare).unwrap();
    let kept_hex = Digest::of(b"kept bytes").hex();
    let object = rig
        .objects()
        .into_iter()
        .find(|o| o.starts_with(&kept_hex))
        .unwrap();
    std::fs::remove_file(rig.workspace.join(".aether/objects").join(&object)).unwrap();

    let v2 = [("keep.txt", "kept bytes"), ("app.py", "v2")];
    let (url, d2) = rig.publish_manifest(&manifest(APP, 2, &v2), &v2);
    rig.point_at_manifest(&url, &d2).await;
    wait_live(addr, &d2).await;
    assert_eq!(rig.read_current("keep.txt").as_deref(), Some("kept bytes"));
    assert_eq!(rig.read_current("app.py").as_deref(), Some("v2"));
    assert_eq!(rig.art.requests(&blob_name(&Digest::of(b"kept bytes"))), 2);
    let s = status(addr).await;
    assert!(
        s["last_error"].is_null(),
        "fetched on the first attempt: {s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_travels_as_a_patch_against_the_one_held_and_a_bad_patch_costs_one_whole_download()
 {
    let rig = Rig::new().await;
    rig.art.serve_differences(true);
    let fetcher = rig.fetcher(&[]);
    let addr = fetcher.http_addr().await.unwrap();
    let downloaded = || async {
        metric(
            &metrics(addr).await,
            "dev_hot_refresh_bytes_total",
            "source=\"downloaded\"",
        )
        .unwrap_or(-1.0)
    };
    let mut files = small_files(300, "v1");
    let d1 = release(&rig, 1, &files).await;
    wait_live(addr, &d1).await;
    assert_eq!(
        rig.art.differences(&blob_name(&d1)),
        0,
        "nothing held yet: the first manifest travels whole"
    );

    // One file changes: the manifest travels as a patch of a few hundred bytes.
    let before = downloaded().await;
    files[150].1 = "v2 150".into();
    let d2 = release(&rig, 2, &files).await;
    wait_live(addr, &d2).await;
    let whole = manifest(APP, 2, &as_refs(&files)).to_canonical().len() as f64;
    let cost = downloaded().await - before;
    assert_eq!(rig.art.requests(&blob_name(&d2)), 1);
    assert_eq!(rig.art.differences(&blob_name(&d2)), 1);
    assert!(
        cost < 1_000.0 && whole > 30_000.0,
        "{cost} bytes downloaded for a {whole}-byte manifest and a 6-byte file"
    );
    assert_served(&rig, &files[150..151], 1);

    // A wrong patch, however it is wrong, and a failed request for one are followed by
    // one download of the whole manifest; the release goes live on that first attempt.
    // Every reason's failures.
    let failures = || async {
        metrics(addr)
            .await
            .lines()
            .filter(|l| l.starts_with("dev_hot_refresh_failure_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>()
    };
    let failed_before = failures().await;
    for (seq, fault) in [
        Fault::BadDifference(BadDifference::WrongBytes),
        Fault::BadDifference(BadDifference::CopiesPastHeld),
        Fault::BadDifference(BadDifference::NoBase),
        Fault::BadDifference(BadDifference::Garbled),
        Fault::Status(503),
    ]
    .into_iter()
    .enumerate()
    {
        let seq = seq as u64 + 3;
        files[seq as usize].1 = format!("v{seq} {seq}");
        let refs = as_refs(&files);
        let m = manifest(APP, seq, &refs);
        let name = blob_name(&Digest::of(&m.to_canonical()));
        rig.art.fail_next(&name, fault.clone());
        let before = downloaded().await;
        let (url, digest) = rig.publish_manifest(&m, &refs);
        rig.point_at_manifest(&url, &digest).await;
        wait_live(addr, &digest).await;
        assert_eq!(
            rig.art.requests(&name),
            2,
            "{fault:?}: a patch asked for, then whole"
        );
        assert!(downloaded().await - before >= whole, "{fault:?}");
        assert_eq!(
            rig.read_current(&files[seq as usize].0).as_ref(),
            Some(&files[seq as usize].1),
            "{fault:?}"
        );
        assert_eq!(
            failures().await,
            failed_before,
            "{fault:?}: no failed attempt"
        );
    }
    // A refused manifest leaves nothing behind: not kept, no temporary file.
    let kept = std::fs::read_dir(rig.workspace.join(".aether/manifests"))
        .unwrap()
        .count();
    let refs = as_refs(&files);
    let replay = manifest(APP, 2, &refs);
    let (url, digest) = rig.publish_manifest(&replay, &refs);
    rig.point_at_manifest(&url, &digest).await;
    let s = wait_failures(addr, 1).await;
    assert_eq!(s["last_error"]["reason"], "replay", "{s}");
    assert_eq!(
        std::fs::read_dir(rig.workspace.join(".aether/manifests"))
            .unwrap()
            .count(),
        kept
    );
    assert_eq!(rig.staging_entries(), 0);
}
