//! `aether dev --hot --local` end to end: the real CLI, store, fetcher and supervisor on
//! one machine, serving the example-style app with `python3 -m http.server`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aether_testkit::process::{Proc, free_port, http_get, wait_until};

const AETHER: &str = env!("CARGO_BIN_EXE_aether");
const LONG: Duration = Duration::from_secs(30);

/// Processes whose environment names `dir` (the loop's fetcher, supervisor and app all
/// carry `AETHER_WORKSPACE=<work dir>/workspace`), zombies excluded.
fn processes_under(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            });
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            !zombie && environ.windows(needle.len()).any(|w| w == needle)
        })
        .collect()
}

/// Starts the local loop on `src` with `python3 -m http.server` on `port`, releasing in
/// `format` (`manifest` or `tar`).
fn local_loop_as(src: &Path, work: &Path, port: u16, format: &str) -> Proc {
    local_loop_with(src, work, port, &["--format", format])
}

/// Starts the local loop with `options` before the source directory.
fn local_loop_with(src: &Path, work: &Path, port: u16, options: &[&str]) -> Proc {
    let fetcher = Path::new(AETHER).with_file_name("aether-fetcher");
    let port_s = port.to_string();
    let mut args = vec!["dev", "--hot", "--local"];
    args.extend_from_slice(options);
    Proc::spawn(
        AETHER,
        &[
            args.as_slice(),
            &[
                src.to_str().unwrap(),
                "--work-dir",
                work.to_str().unwrap(),
                "--grace-sec",
                "1",
                "--",
                "python3",
                "-m",
                "http.server",
                &port_s,
                "--bind",
                "127.0.0.1",
            ],
        ]
        .concat(),
        &[
            ("AETHER_FETCHER_BIN", fetcher.display().to_string()),
            // The hash cache stays with the test's files.
            ("XDG_CACHE_HOME", work.join("cache").display().to_string()),
        ],
    )
    .unwrap()
}

fn local_loop(src: &Path, work: &Path, port: u16) -> Proc {
    local_loop_as(src, work, port, "manifest")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_or_killing_the_loop_leaves_no_process_behind() {
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGKILL] {
        let (_dir, src, work, port) = site("up");
        let mut dev = local_loop(&src, &work, port);
        dev.wait_for_lines("app restarted in", 1, LONG)
            .await
            .unwrap();
        assert!(
            wait_until(LONG, || async { page(port).await.is_some() }).await,
            "the app serves"
        );
        assert!(
            processes_under(&work).len() >= 3,
            "fetcher, supervisor and app: {:?}",
            processes_under(&work)
        );
        dev.signal(signal);
        let exit = dev.wait_exit(LONG).await.expect("the loop exits");
        if signal != libc::SIGKILL {
            assert!(exit.success(), "signal {signal}: {exit:?}");
        }
        let gone = wait_until(LONG, || async { processes_under(&work).is_empty() }).await;
        assert!(
            gone,
            "signal {signal}: left behind {:?}",
            processes_under(&work)
        );
        assert!(page(port).await.is_none(), "the port is free again");
    }
}

/// A temporary directory with the app's source (`index.html` holding `index`), the loop's
/// work directory and a free port.
fn site(index: &str) -> (tempfile::TempDir, PathBuf, PathBuf, u16) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("index.html"), index).unwrap();
    let work = dir.path().join("work");
    (dir, src, work, free_port())
}

async fn page(port: u16) -> Option<String> {
    http_get(&format!("http://127.0.0.1:{port}/index.html"))
        .await
        .ok()
        .filter(|(c, _)| *c == 200)
        .map(|(_, b)| b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_is_served_by_the_restarted_app_and_bad_edits_keep_the_old_app() {
    let (_dir, src, work, port) = site("version one");
    let mut dev = local_loop(&src, &work, port);
    dev.wait_for_lines("app restarted in", 1, LONG)
        .await
        .unwrap();
    assert!(
        wait_until(LONG, || async {
            page(port).await.as_deref() == Some("version one")
        })
        .await
    );

    std::fs::write(src.join("index.html"), "version two").unwrap();
    let line = dev
        .wait_for_lines("app restarted in", 2, LONG)
        .await
        .unwrap();
    assert!(
        wait_until(LONG, || async {
            page(port).await.as_deref() == Some("version two")
        })
        .await
    );
    let ms: u64 = line
        .split(" in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(ms < 10_000, "{line}");

    // A link leaving the tree is refused before anything is sent.
    std::os::unix::fs::symlink("/etc/passwd", src.join("evil")).unwrap();
    let err = dev
        .wait_for_log("the app keeps running", LONG)
        .await
        .unwrap();
    assert!(err.contains("absolute"), "{err}");
    assert_eq!(
        page(port).await.as_deref(),
        Some("version two"),
        "the old app keeps serving"
    );
    std::fs::remove_file(src.join("evil")).unwrap();
    dev.wait_for_log("unchanged tree", LONG).await.unwrap();

    // A file the packer cannot read (a name that is not UTF-8) is reported, nothing changes.
    let bad = std::ffi::OsStr::from_bytes_compat(b"bad\xff.txt");
    std::fs::write(src.join(bad), "x").unwrap();
    let err = dev
        .wait_for_lines("the app keeps running", 2, LONG)
        .await
        .unwrap();
    assert!(err.contains("UTF-8"), "{err}");
    assert_eq!(page(port).await.as_deref(), Some("version two"));
    dev.sigterm();
    dev.wait_exit(LONG).await.expect("the loop exits");
    assert!(
        wait_until(LONG, || async { processes_under(&work).is_empty() }).await,
        "left behind {:?}",
        processes_under(&work)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_format_tar_an_edit_is_served_and_a_hostile_archive_is_refused_by_the_fetcher() {
    let (_dir, src, work, port) = site("version one");
    let mut dev = local_loop_with(&src, &work, port, &["--format", "tar", "--verbose"]);
    dev.wait_for_lines("app restarted in", 1, LONG)
        .await
        .unwrap();
    // --verbose shows the fetcher's and the supervisor's info lines.
    dev.wait_for_log("[fetcher] INFO REFRESH_OK", LONG)
        .await
        .unwrap();
    dev.wait_for_log("[supervisor] INFO SUPERVISE_START", LONG)
        .await
        .unwrap();
    std::fs::write(src.join("index.html"), "version two").unwrap();
    dev.wait_for_lines("app restarted in", 2, LONG)
        .await
        .unwrap();
    assert!(
        wait_until(LONG, || async {
            page(port).await.as_deref() == Some("version two")
        })
        .await
    );
    // A link leaving the tree packs fine but the fetcher refuses the archive.
    std::os::unix::fs::symlink("/etc/passwd", src.join("evil")).unwrap();
    let err = dev
        .wait_for_log("the app keeps running", LONG)
        .await
        .unwrap();
    assert!(err.contains("extract"), "{err}");
    assert_eq!(page(port).await.as_deref(), Some("version two"));
    std::fs::remove_file(src.join("evil")).unwrap();
    dev.wait_for_log("back on", LONG).await.unwrap();
    dev.sigterm();
    dev.wait_exit(LONG).await.expect("the loop exits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probed_loop_reports_save_to_ready_and_shows_the_apps_output_not_ours() {
    let (_dir, src, work, port) = site("version one");
    let port_s = port.to_string();
    let mut dev = local_loop_with(&src, &work, port, &["--ready-port", &port_s]);
    let line = dev.wait_for_lines("app ready in", 1, LONG).await.unwrap();
    assert!(
        line.contains(&format!("save → http://127.0.0.1:{port}/ answered")),
        "{line}"
    );
    // Ready means answering: the first request after the line gets the new code, no retry.
    assert_eq!(page(port).await.as_deref(), Some("version one"));
    std::fs::write(src.join("index.html"), "version two").unwrap();
    dev.wait_for_lines("app ready in", 2, LONG).await.unwrap();
    assert_eq!(page(port).await.as_deref(), Some("version two"));
    // The app's own output (python's access log) is shown; our info lines are not.
    dev.wait_for_log("[app] ", LONG).await.unwrap();
    assert!(
        dev.lines_with("\"GET /index.html")
            .iter()
            .any(|l| l.starts_with("[app] ")),
        "{:?}",
        dev.logs()
    );
    assert!(dev.lines_with("REFRESH_OK").is_empty(), "{:?}", dev.logs());
    assert!(
        dev.lines_with("SUPERVISE_START").is_empty(),
        "{:?}",
        dev.logs()
    );
    assert!(dev.lines_with("app restarted in").is_empty());
    dev.sigterm();
    dev.wait_exit(LONG).await.expect("the loop exits");
}

trait FromBytesCompat {
    fn from_bytes_compat(b: &[u8]) -> &std::ffi::OsStr;
}

impl FromBytesCompat for std::ffi::OsStr {
    fn from_bytes_compat(b: &[u8]) -> &std::ffi::OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(b)
    }
}
