//! A real S3 implementation on loopback: moto's server (`moto[server]` from PyPI, installed
//! by `scripts/install-test-deps.sh`), one per test, with buckets made on demand.

use std::time::Duration;

use crate::process::{Proc, install_crypto};

pub struct Moto {
    proc: Proc,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
}

/// Credentials moto accepts (it checks none); present so that clients sign as for AWS.
const ACCESS_KEY: &str = "aether-test";
const SECRET_KEY: &str = "aether-test-secret";

impl Moto {
    /// Starts a moto server on a free loopback port and waits until it answers.
    pub async fn start() -> Result<Self, String> {
        let proc = Proc::spawn(
            "python3",
            &["-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            &[],
        )
        .map_err(|e| format!("spawning python3 -m moto.server: {e}"))?;
        // Importing moto takes seconds on a loaded machine.
        let line = proc
            .wait_for_log("Running on http://", Duration::from_secs(120))
            .await?;
        let endpoint = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .ok_or_else(|| format!("no URL in {line:?}"))?
            .trim_end_matches('/')
            .to_owned();
        Ok(Self { proc, endpoint })
    }

    /// The standard AWS settings that point a client at this server.
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
        ]
    }

    /// Creates a bucket (moto accepts unsigned requests).
    pub async fn create_bucket(&self, bucket: &str) -> Result<(), String> {
        let r = client()?
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("creating bucket {bucket}: {}", r.status()));
        }
        Ok(())
    }

    /// Every object key of a bucket (ListObjectsV2, all pages).
    pub async fn keys(&self, bucket: &str) -> Result<Vec<String>, String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!("{}/{bucket}?list-type=2", self.endpoint);
            if let Some(t) = &token {
                url.push_str("&continuation-token=");
                url.push_str(&encode(t));
            }
            let body = get_text(&url).await?;
            keys.extend(tags(&body, "Key"));
            token = tags(&body, "NextContinuationToken").into_iter().next();
            if token.is_none() {
                return Ok(keys);
            }
        }
    }

    /// Multipart uploads begun and neither completed nor aborted (ListMultipartUploads):
    /// parts that take space without ever being an object.
    pub async fn pending_uploads(&self, bucket: &str) -> Result<Vec<String>, String> {
        let body = get_text(&format!("{}/{bucket}?uploads", self.endpoint)).await?;
        Ok(tags(&body, "Key"))
    }

    /// The server's process id (for CPU accounting in benchmarks).
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// The server's log so far.
    pub fn logs(&self) -> Vec<String> {
        self.proc.logs()
    }
}

fn client() -> Result<reqwest::Client, String> {
    install_crypto();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())
}

async fn get_text(url: &str) -> Result<String, String> {
    client()?
        .get(url)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())
}

/// The text of every `<tag>…</tag>` in an XML document (S3 listings hold no nesting of
/// the same tag, nor entities in keys we make).
fn tags(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(open.as_str())
        .skip(1)
        .filter_map(|rest| rest.split_once(close.as_str()).map(|(v, _)| v.to_owned()))
        .collect()
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
