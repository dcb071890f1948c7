//! The supervisor as a real process: restarts on a new release, graceful then forced stop,
//! zombie reaping, signal forwarding, crash restart with backoff.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aether_testkit::process::{Proc, wait_until};

const FETCHER: &str = env!("CARGO_BIN_EXE_aether-fetcher");
const LONG: Duration = Duration::from_secs(20);

/// A workspace with releases `names`, `current` on the first.
fn workspace(names: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    for name in names {
        let rel = ws.join(".aether/releases").join(name);
        std::fs::create_dir_all(&rel).unwrap();
        std::fs::write(rel.join("v"), name).unwrap();
    }
    swap(&ws, names[0]);
    (dir, ws)
}

fn swap(ws: &Path, name: &str) {
    let tmp = ws.join(".current.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(Path::new(".aether/releases").join(name), &tmp).unwrap();
    std::fs::rename(&tmp, ws.join("current")).unwrap();
}

fn supervise(ws: &Path, grace: &str, script: &str) -> Proc {
    Proc::spawn(
        FETCHER,
        &["supervise", "--grace-sec", grace, "--", "sh", "-c", script],
        &[
            ("AETHER_WORKSPACE", ws.display().to_string()),
            ("RUST_LOG", "info".into()),
        ],
    )
    .unwrap()
}

fn alive(pid: i32) -> bool {
    // A zombie still "exists" for kill(0); look at its state instead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

fn pid_of(line: &str) -> i32 {
    line.split_whitespace().last().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_release_restarts_the_app_there_and_the_old_process_is_gone() {
    let (_d, ws) = workspace(&["a", "b"]);
    let sup = supervise(&ws, "3", "echo started $(cat v) $$; exec sleep 1000");
    let first = sup.wait_for_log("started a", LONG).await.unwrap();
    let old = pid_of(&first);
    let marker = sup.wait_for_log("SUPERVISE_START", LONG).await.unwrap();
    assert_eq!(
        (
            marker.matches("pid=").count(),
            marker.matches("release=").count()
        ),
        (1, 1),
        "each field once: {marker}"
    );
    swap(&ws, "b");
    let second = sup.wait_for_log("started b", LONG).await.unwrap();
    assert_ne!(pid_of(&second), old);
    assert!(
        wait_until(LONG, || async move { !alive(old) }).await,
        "old app still running"
    );
}

/// CPU time a process has used, in clock ticks (10 ms).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // utime and stime: fields 14 and 15, counted from after the command name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_waiting_for_its_first_release_sleeps_and_starts_the_app_when_it_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    let rel = ws.join(".aether/releases/a");
    std::fs::create_dir_all(&rel).unwrap();
    std::fs::write(rel.join("v"), "a").unwrap();
    let sup = supervise(&ws, "3", "echo started $(cat v) $$; exec sleep 1000");
    sup.wait_for_log("waiting for the first release", LONG)
        .await
        .unwrap();
    let pid = sup.pid().unwrap();
    let before = cpu_ticks(pid);
    // A window, not a wait for an event: a pod's first release can take minutes, and
    // the supervisor used to spin a whole core meanwhile (about 100 ticks a second
    // alone, still dozens on a busy machine). Sleeping, it uses none.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(pid) - before;
    assert!(
        used <= 10,
        "the waiting supervisor used {used} ticks in one second"
    );
    swap(&ws, "a");
    sup.wait_for_log("started a", LONG).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_ignoring_sigterm_is_killed_after_the_grace_period() {
    let (_d, ws) = workspace(&["a", "b"]);
    let sup = supervise(
        &ws,
        "1",
        "trap '' TERM; echo started $(cat v) $$; while true; do sleep 0.05; done",
    );
    sup.wait_for_log("started a", LONG).await.unwrap();
    let t = Instant::now();
    swap(&ws, "b");
    sup.wait_for_log("started b", LONG).await.unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "SIGKILL came before the grace period: {took:?}"
    );
    assert!(!sup.lines_with("ignored SIGTERM").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_grandchildren_are_reaped() {
    let (_d, ws) = workspace(&["a"]);
    let sup = supervise(
        &ws,
        "1",
        "for i in 1 2 3 4 5; do sh -c 'sleep 0.2 & echo orphan $!'; done; echo spawned; exec sleep 1000",
    );
    sup.wait_for_log("spawned", LONG).await.unwrap();
    let me = sup.pid().unwrap() as i32;
    let orphans: Vec<i32> = sup
        .lines_with("orphan ")
        .iter()
        .map(|l| pid_of(l))
        .collect();
    assert_eq!(orphans.len(), 5);
    // Reaped means gone from /proc altogether (a zombie still has its entry).
    let reaped = wait_until(LONG, || {
        let orphans = orphans.clone();
        async move {
            orphans
                .iter()
                .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        }
    })
    .await;
    assert!(reaped, "orphans not reaped: {orphans:?}");
    let zombies: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            let after = stat.rsplit(')').next().unwrap_or("");
            let mut f = after.split_whitespace();
            let state = f.next().unwrap_or("");
            let ppid: i32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            state == "Z" && ppid == me
        })
        .collect();
    assert!(zombies.is_empty(), "zombies left: {zombies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_forwarded_and_the_supervisor_exits_cleanly() {
    let (_d, ws) = workspace(&["a"]);
    let mut sup = supervise(
        &ws,
        "3",
        "trap 'echo got TERM; exit 0' TERM; echo trap-installed; while true; do sleep 0.05; done",
    );
    // A marker no log line of the supervisor holds ("up" matched "supervise", so the
    // signal could come before the trap).
    sup.wait_for_log("trap-installed", LONG).await.unwrap();
    sup.sigterm();
    let status = sup.wait_exit(Duration::from_secs(5)).await.expect("exits");
    assert!(status.success(), "{status:?}");
    assert!(
        !sup.lines_with("got TERM").is_empty(),
        "the app saw SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_app_is_restarted_with_growing_backoff() {
    let (_d, ws) = workspace(&["a"]);
    let sup = supervise(&ws, "1", "echo boot; exit 3");
    let t = Instant::now();
    sup.wait_for_lines("boot", 3, LONG).await.unwrap();
    let took = t.elapsed();
    // 0.5 s then 1 s of backoff before the third start.
    assert!(
        took >= Duration::from_millis(1400),
        "restarted too fast: {took:?}"
    );
    assert!(
        sup.lines_with("app exited")
            .iter()
            .any(|l| l.contains("Code(3)"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_crashed_app_left_in_its_group_is_stopped_before_the_restart() {
    let (_d, ws) = workspace(&["a"]);
    // The leader forks a child that would keep the app's port, one that ignores SIGTERM
    // even, then crashes.
    let sup = supervise(
        &ws,
        "1",
        "(trap '' TERM; exec sleep 1000) & echo child $!; exit 3",
    );
    let line = sup.wait_for_lines("child ", 1, LONG).await.unwrap();
    let orphan = pid_of(&line);
    assert!(
        wait_until(LONG, || async move { !alive(orphan) }).await,
        "the crashed app's child is still running"
    );
    // The restart comes after the group is empty: the second start's child is new.
    let line = sup.wait_for_lines("child ", 2, LONG).await.unwrap();
    assert_ne!(pid_of(&line), orphan);
    sup.wait_for_log("sending SIGKILL", LONG).await.unwrap();
    // The app crashes and starts again until the supervisor stops: stop it, then make
    // sure no child a start left behind (ignoring SIGTERM) outlives the test.
    let mut sup = sup;
    sup.sigterm();
    sup.wait_exit(LONG)
        .await
        .expect("the supervisor exits on SIGTERM");
    for line in sup.lines_with("child ") {
        let pid = pid_of(&line);
        if alive(pid) {
            // SAFETY: kill(2) has no memory effects.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_copies_the_binary_for_images_without_a_shell() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(
        FETCHER,
        &["install", dir.path().join("bin").to_str().unwrap()],
        &[],
    )
    .unwrap();
    assert!(p.wait_exit(LONG).await.unwrap().success());
    let copied = dir.path().join("bin/aether-fetcher");
    let out = std::process::Command::new(&copied)
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("aether-fetcher"));
}

/// Runs the in-use check with the marks in `in_use_dir` (default: the workspace's own).
async fn marks_the_release_in_use(in_use_dir: Option<&str>) {
    let (a, b) = ("a".repeat(64), "b".repeat(64));
    let (d, ws) = workspace(&[&a, &b]);
    let marks = match in_use_dir {
        Some(sub) => d.path().join(sub),
        None => ws.join(".aether/in-use"),
    };
    let marked = |name: &str| marks.join(name).exists();
    let mut env = vec![
        ("AETHER_WORKSPACE", ws.display().to_string()),
        ("RUST_LOG", "info".into()),
    ];
    if in_use_dir.is_some() {
        env.push(("AETHER_IN_USE_DIR", marks.display().to_string()));
    }
    // Slow to stop: the mark must outlive the whole grace period the app takes.
    let script =
        "trap 'sleep 0.5; exit 0' TERM; echo started $(cat v); while :; do sleep 0.1; done";
    let sup = Proc::spawn(
        FETCHER,
        &["supervise", "--grace-sec", "5", "--", "sh", "-c", script],
        &env,
    )
    .unwrap();
    sup.wait_for_log(&format!("started {a}"), LONG)
        .await
        .unwrap();
    assert!(marked(&a), "the running app's release is marked");
    swap(&ws, &b);
    sup.wait_for_log(&format!("started {b}"), LONG)
        .await
        .unwrap();
    assert!(!marked(&a), "the mark goes once the old app has exited");
    assert!(marked(&b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_an_app_runs_from_is_marked_in_use_until_the_app_is_gone() {
    marks_the_release_in_use(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_use_marks_go_to_aether_in_use_dir_when_set() {
    marks_the_release_in_use(Some("run/in-use")).await;
}

fn supervise_on_release(ws: &Path, on_release: &str, script: &str) -> Proc {
    Proc::spawn(
        FETCHER,
        &["supervise", "--grace-sec", "3", "--", "sh", "-c", script],
        &[
            ("AETHER_WORKSPACE", ws.display().to_string()),
            ("AETHER_ON_RELEASE", on_release.into()),
            ("RUST_LOG", "info".into()),
        ],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_release_signal_hup_signals_the_app_which_keeps_its_pid_and_reads_current() {
    let (a, b, c, d) = (
        "a".repeat(64),
        "b".repeat(64),
        "c".repeat(64),
        "d".repeat(64),
    );
    let (_d, ws) = workspace(&[&a, &b, &c, &d]);
    let marks = ws.join(".aether/in-use");
    // Counts SIGHUPs and reads the code through `current`, as such an app must.
    let script = "n=0; trap 'n=$((n+1)); echo hup $n $(cat ../../../current/v) $$' HUP; \
                  echo started $(cat v) $$; while :; do sleep 0.05; done";
    let sup = supervise_on_release(&ws, "signal:HUP", script);
    let pid = pid_of(
        &sup.wait_for_log(&format!("started {a}"), LONG)
            .await
            .unwrap(),
    );
    swap(&ws, &b);
    let first = sup.wait_for_log(&format!("hup 1 {b}"), LONG).await.unwrap();
    assert_eq!(pid_of(&first), pid, "the app keeps its process");
    assert!(
        marks.join(&a).exists() && marks.join(&b).exists(),
        "its working directory and the release it was told about are both in use"
    );
    swap(&ws, &c);
    let second = sup.wait_for_log(&format!("hup 2 {c}"), LONG).await.unwrap();
    assert_eq!(pid_of(&second), pid);
    assert!(
        [&a, &b, &c].iter().all(|r| marks.join(r).exists()),
        "the release told about before stays in use while the app may still reload from it"
    );
    swap(&ws, &d);
    sup.wait_for_log(&format!("hup 3 {d}"), LONG).await.unwrap();
    assert!([&a, &c, &d].iter().all(|r| marks.join(r).exists()));
    assert!(
        !marks.join(&b).exists(),
        "an older release told about is free"
    );
    assert_eq!(sup.lines_with("started ").len(), 1, "never restarted");
    assert!(alive(pid));
    let reload = sup.lines_with("SUPERVISE_RELOAD");
    assert!(
        reload
            .iter()
            .any(|l| l.contains(&format!("pid={pid} release={d} action=signal:HUP"))),
        "{reload:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_killed_by_the_reload_signal_starts_again_at_once_with_a_hint() {
    let (_d, ws) = workspace(&["a", "b"]);
    // No HUP handler: the signal ends it, as it would a shell wrapper's leader.
    let sup = supervise_on_release(
        &ws,
        "signal:HUP",
        "echo started $(cat v) $$; exec sleep 1000",
    );
    sup.wait_for_log("started a", LONG).await.unwrap();
    swap(&ws, "b");
    sup.wait_for_log("started b", LONG).await.unwrap();
    let hint = sup.lines_with("does not handle it");
    assert_eq!(hint.len(), 1, "{:?}", sup.logs());
    assert!(hint[0].contains("SIGHUP"), "{hint:?}");
    assert!(
        sup.lines_with("restarting in").is_empty(),
        "not a crash: no backoff"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_release_none_leaves_the_app_running_untouched() {
    let (a, b) = ("a".repeat(64), "b".repeat(64));
    let (_d, ws) = workspace(&[&a, &b]);
    // A HUP would end this app (no trap): only a signal-free reload keeps it alive.
    let script = "echo started $(cat v) $$; while :; do sleep 0.05; done";
    let sup = supervise_on_release(&ws, "none", script);
    let pid = pid_of(
        &sup.wait_for_log(&format!("started {a}"), LONG)
            .await
            .unwrap(),
    );
    swap(&ws, &b);
    sup.wait_for_log(&format!("pid={pid} release={b} action=none"), LONG)
        .await
        .unwrap();
    assert!(alive(pid));
    assert_eq!(sup.lines_with("started ").len(), 1, "never restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_on_release_action_is_refused_at_start() {
    let (_d, ws) = workspace(&["a"]);
    let mut sup = supervise_on_release(&ws, "signal:KILL", "sleep 1000");
    let status = sup.wait_exit(LONG).await.expect("exits");
    assert!(!status.success());
    let logs = sup.logs().join("\n");
    assert!(
        logs.contains("signal:KILL") || logs.contains("KILL"),
        "{logs}"
    );
    assert!(sup.lines_with("SUPERVISE_START").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_killed_outright_takes_its_app_with_it() {
    let (_d, ws) = workspace(&["a"]);
    // Ignores SIGTERM: only the kernel's SIGKILL on the supervisor's death ends it.
    let mut sup = supervise(
        &ws,
        "3",
        "trap '' TERM; echo started $(cat v) $$; while :; do sleep 0.05; done",
    );
    let app = pid_of(&sup.wait_for_log("started a", LONG).await.unwrap());
    sup.sigkill();
    sup.wait_exit(LONG).await.expect("the supervisor exits");
    assert!(
        wait_until(LONG, || async move { !alive(app) }).await,
        "the app outlived its supervisor"
    );
}
