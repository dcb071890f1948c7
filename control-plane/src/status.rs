//! `aether status <app> [-w]`: the desired release and, per pod, the annotated and live
//! release with the fetcher's last error; once, or again on every change.

use std::time::Duration;

use crate::client::Client;
use crate::cluster::AppStatus;
use crate::dev::Output;

/// How often `-w` reads the status: each read is one pod-proxy request per pod.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The status as printed: a table, or JSON (pretty once, one line per change in a watch).
pub fn render(status: &AppStatus, output: Output, compact: bool) -> anyhow::Result<String> {
    if output == Output::Json {
        let mut text = if compact {
            serde_json::to_string(status)?
        } else {
            serde_json::to_string_pretty(status)?
        };
        text.push('\n');
        return Ok(text);
    }
    let short = |d: Option<&str>| {
        d.map(|d| d.chars().take(19).collect::<String>())
            .unwrap_or_else(|| "-".into())
    };
    let mut out = format!(
        "app {} in {}: desired {}\n{:<32} {:<20} {:<20} LAST ERROR\n",
        status.app,
        status.namespace,
        status.desired_digest.as_deref().unwrap_or("-"),
        "POD",
        "ANNOTATED",
        "LIVE"
    );
    for p in &status.pods {
        let err = match &p.fetcher {
            None => "fetcher unreachable".to_owned(),
            Some(f) => f
                .last_error
                .as_ref()
                .map_or_else(|| "-".to_owned(), |e| e.reason.to_string()),
        };
        out.push_str(&format!(
            "{:<32} {:<20} {:<20} {}\n",
            p.name,
            short(p.annotated_digest.as_deref()),
            short(p.live_digest.as_deref()),
            err
        ));
    }
    Ok(out)
}

/// Prints the status whenever it changes, until interrupted. A failed read is reported
/// once and retried: the control plane may be restarting.
pub async fn watch(
    client: &Client,
    app: &str,
    namespace: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    let mut shown = String::new();
    let mut failing = false;
    let mut every = tokio::time::interval(WATCH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match client.status(app, namespace).await {
            Ok(status) => {
                failing = false;
                let text = render(&status, output, true)?;
                if text != shown {
                    if output == Output::Text && !shown.is_empty() {
                        println!();
                    }
                    print!("{text}");
                    shown = text;
                }
            }
            Err(e) if !failing => {
                failing = true;
                eprintln!("aether status: {e:#} (retrying every {WATCH_EVERY:?})");
            }
            Err(_) => {}
        }
    }
}
