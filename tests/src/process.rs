//! Spawning the built binaries as real processes, and reading what they report: log lines,
//! `/metrics` and `/status`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// A spawned process whose stdout and stderr are collected line by line (and echoed with a
/// prefix, so a failing test shows them). Killed when dropped.
pub struct Proc {
    child: tokio::process::Child,
    name: String,
    logs: Arc<Mutex<Vec<String>>>,
    /// The readers of stdout and stderr; they end at end of file.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

/// How long `wait_exit` waits for the output pipes to close after the process exited. They
/// close at once unless a grandchild inherited them and outlives the process; the bound
/// keeps such a test from hanging, the lines themselves are never cut short otherwise.
const DRAIN_BOUND: Duration = Duration::from_secs(10);

impl Proc {
    pub fn spawn(
        bin: impl AsRef<Path>,
        args: &[&str],
        envs: &[(&str, String)],
    ) -> std::io::Result<Self> {
        let bin = bin.as_ref();
        let name = bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env_remove("KUBECONFIG")
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(collect(out, logs.clone(), name.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(collect(err, logs.clone(), name.clone()));
        }
        Ok(Self {
            child,
            name,
            logs,
            readers,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Every line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Lines containing `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.logs()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect()
    }

    /// Waits until at least `count` lines contain `needle`; returns the last of them.
    pub async fn wait_for_lines(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.lines_with(needle);
            if found.len() >= count {
                return Ok(found[count - 1].clone());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: no {count} line(s) with {needle:?} within {timeout:?}; logs:\n{}",
                    self.name,
                    self.logs().join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        self.wait_for_lines(needle, 1, timeout).await
    }

    /// The `addr=` logged by the fetcher's HTTP listener.
    pub async fn http_addr(&self) -> Result<SocketAddr, String> {
        let line = self
            .wait_for_log("serving /metrics", Duration::from_secs(20))
            .await?;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .ok_or_else(|| format!("no addr= in {line:?}"))?;
        addr.parse().map_err(|e| format!("{addr}: {e}"))
    }

    /// The process's peak resident set size so far (`VmHWM`), while it runs.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) has no memory effects; the pid is our own child.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }

    pub fn sigkill(&self) {
        self.signal(libc::SIGKILL);
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits for the process to exit, then for everything it wrote to be collected, so
    /// `logs()` afterwards holds its last lines.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()?
            .ok()?;
        self.drain().await;
        Some(status)
    }

    /// Waits until both output pipes reached end of file (bounded by `DRAIN_BOUND`).
    async fn drain(&mut self) {
        let readers = std::mem::take(&mut self.readers);
        let all = futures::future::join_all(readers);
        if tokio::time::timeout(DRAIN_BOUND, all).await.is_err() {
            eprintln!(
                "[{}] output still open {DRAIN_BOUND:?} after exit (a child kept the pipe)",
                self.name
            );
        }
    }
}

fn collect<R>(stream: R, logs: Arc<Mutex<Vec<String>>>, name: String) -> tokio::task::JoinHandle<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if std::env::var_os("AETHER_QUIET_CHILDREN").is_none() {
                eprintln!("[{name}] {line}");
            }
            if let Ok(mut l) = logs.lock() {
                l.push(line);
            }
        }
    })
}

/// A binary of the workspace built beside `sibling` (the test's own `CARGO_BIN_EXE_…`):
/// `cargo test --workspace` builds every binary into the same directory.
pub fn workspace_bin(sibling: &str, name: &str) -> std::path::PathBuf {
    let path = Path::new(sibling).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p {name}` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// A loopback port free right now (for processes that must be told their port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Installs the ring crypto provider once: reqwest is built without a default provider
/// (as in the fetcher) and refuses to build a client before one is installed.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// One HTTP client for every loopback request of a test or benchmark process. Building a
/// client loads the system's root certificates: built per request, a helper polling every
/// few milliseconds kept a core busy and slowed what it measured. No idle connections are
/// kept: each request's connection lives on the runtime that sent it (every test has its
/// own), and loopback connections cost little.
pub fn loopback_client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    if let Some(client) = CLIENT.get() {
        return Ok(client);
    }
    install_crypto();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(CLIENT.get_or_init(|| client))
}

/// GETs a URL on loopback; returns status and body.
pub async fn http_get(url: &str) -> Result<(u16, String), String> {
    let r = loopback_client()?
        .get(url)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let body = r.text().await.map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// The value of one series in a Prometheus text exposition. `labels` is the exact label
/// set as written (for example `reason="checksum"`), empty for none.
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let series = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok()).flatten()
    })
}

/// Polls `check` every 20 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
