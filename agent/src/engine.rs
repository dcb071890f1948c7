//! The refresh loop. It turns the stream of desired releases into refreshes: the newest
//! desired state wins, changes arriving during a refresh cancel it, a minimum gap separates
//! releases, failures retry with jittered exponential backoff, and every outcome is
//! reported (metrics, log marker, `/status`, `state.json`, `.ready`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aether_common::Digest;
use aether_common::contract::annotations::DesiredRelease;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::sync::watch;
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use crate::failure::{Reason, RefreshError};
use crate::hook::Live;
use crate::metrics::Metrics;
use crate::refresh::{Refresher, Stage};
use crate::source::Observed;
use crate::status::{LastError, Status};
use crate::workspace::{State, Workspace};

/// First retry delay.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Attempts made by `--once` before giving up on a retryable failure.
const ONCE_ATTEMPTS: u32 = 5;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub pod: String,
    pub min_interval: Duration,
    pub backoff_max: Duration,
    pub anomaly_threshold: u32,
    /// How often the workspace is re-checked against the desired state.
    pub resync: Duration,
    /// Overall deadline of one refresh (download, verification, extraction, swap).
    pub refresh_timeout: Duration,
}

/// A failed desired release and when it may be tried again (`None`: not until it changes).
struct Pending {
    desired: DesiredRelease,
    retry_at: Option<Instant>,
}

pub struct Engine {
    cfg: EngineConfig,
    refresher: Refresher,
    workspace: Arc<Workspace>,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    live: Option<Digest>,
    failures: u32,
    last_swap: Option<Instant>,
    pending: Option<Pending>,
    reported_invalid: Option<Instant>,
    backoff: ExponentialBackoff,
    /// Each release made (or found) live, for the webhook.
    announced: watch::Sender<Option<Live>>,
}

enum Plan {
    Idle,
    Refresh(DesiredRelease, Instant),
}

impl Engine {
    pub fn new(
        cfg: EngineConfig,
        refresher: Refresher,
        metrics: Arc<Metrics>,
        status: Arc<Status>,
        previous: Option<&State>,
    ) -> Self {
        let workspace = refresher.workspace.clone();
        let live = workspace.live_digest();
        let failures = previous.map_or(0, |s| s.consecutive_failures);
        metrics.set_current(live);
        metrics.set_consecutive(failures);
        status.update(|s| {
            s.current_digest = live;
            s.consecutive_failures = failures;
        });
        let backoff = backoff(cfg.backoff_max);
        Self {
            cfg,
            refresher,
            workspace,
            metrics,
            status,
            live,
            failures,
            last_swap: None,
            pending: None,
            reported_invalid: None,
            backoff,
            announced: watch::Sender::new(None),
        }
    }

    /// The releases this engine makes live (or finds live at start), newest only.
    pub fn live_releases(&self) -> watch::Receiver<Option<Live>> {
        self.announced.subscribe()
    }

    /// Announces `digest` as live unless it already is.
    fn announce(&self, digest: Digest, seq: Option<u64>) {
        self.announced.send_if_modified(|last| {
            if last.is_some_and(|l| l.digest == digest) {
                return false;
            }
            *last = Some(Live { digest, seq });
            true
        });
    }

    /// Runs until `shutdown`. In-flight work is cancelled and its staging removed before
    /// this returns.
    pub async fn run(
        mut self,
        mut rx: watch::Receiver<Option<Observed>>,
        shutdown: CancellationToken,
    ) {
        let mut resync = tokio::time::interval(self.cfg.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut source_open = true;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let observed = rx.borrow_and_update().clone();
            if let Plan::Refresh(desired, seen_at) = self.plan(observed.as_ref()).await {
                if let Some(until) = self.last_swap.map(|t| t + self.cfg.min_interval)
                    && Instant::now() < until
                {
                    // Changes arriving now only replace the desired state; it is read
                    // again after the gap, so the newest wins and nothing is dropped.
                    tokio::select! {
                        () = sleep_until(until.into()) => {}
                        () = shutdown.cancelled() => return,
                    }
                    continue;
                }
                self.refresh(desired, seen_at, &mut rx, &shutdown).await;
                continue;
            }
            let retry_at = self.pending.as_ref().and_then(|p| p.retry_at);
            tokio::select! {
                changed = rx.changed(), if source_open => {
                    if changed.is_err() {
                        tracing::warn!("desired-state source ended; keeping the live release");
                        source_open = false;
                    }
                }
                () = async { sleep_until(retry_at.unwrap_or_else(Instant::now).into()).await }, if retry_at.is_some() => {}
                _ = resync.tick() => self.resync(),
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Applies `observed` once, retrying retryable failures a few times (init-container
    /// mode). Returns the failure that ended it, if any.
    pub async fn once(
        mut self,
        observed: Observed,
        shutdown: CancellationToken,
    ) -> Result<(), RefreshError> {
        let desired = match &observed.desired {
            Ok(Some(d)) => d.clone(),
            Ok(None) => {
                return Err(RefreshError::new(
                    Reason::InvalidAnnotation,
                    "no aether.dev/digest annotation on the pod",
                ));
            }
            Err(msg) => {
                self.record_failure(Reason::InvalidAnnotation, msg, Duration::ZERO, None, false)
                    .await;
                return Err(RefreshError::new(Reason::InvalidAnnotation, msg));
            }
        };
        let (_keep_open, mut rx) = watch::channel(Some(observed.clone()));
        for attempt in 1..=ONCE_ATTEMPTS {
            if self.live == Some(desired.digest) {
                self.plan(Some(&observed)).await;
                return Ok(());
            }
            self.refresh(desired.clone(), observed.seen_at, &mut rx, &shutdown)
                .await;
            if self.live == Some(desired.digest) {
                return Ok(());
            }
            let Some(Pending {
                retry_at: Some(at), ..
            }) = &self.pending
            else {
                break;
            };
            if attempt < ONCE_ATTEMPTS {
                tokio::select! {
                    () = sleep_until((*at).into()) => {}
                    () = shutdown.cancelled() => break,
                }
            }
        }
        let last = self.status.snapshot().last_error;
        Err(match last {
            Some(e) => RefreshError::new(e.reason, e.message),
            None => RefreshError::Cancelled,
        })
    }

    /// Decides what the observation asks for; updates readiness and status on the way.
    async fn plan(&mut self, observed: Option<&Observed>) -> Plan {
        let Some(observed) = observed else {
            return Plan::Idle;
        };
        let desired = match &observed.desired {
            Ok(Some(d)) => d,
            Ok(None) => {
                self.status.update(|s| s.desired_digest = None);
                self.metrics.set_desired(None);
                return Plan::Idle;
            }
            Err(message) => {
                // A malformed update is refused once; the live release keeps serving.
                if self.reported_invalid == Some(observed.seen_at) {
                    tracing::debug!("malformed annotations already reported; waiting for a change");
                }
                if self.reported_invalid != Some(observed.seen_at) {
                    self.reported_invalid = Some(observed.seen_at);
                    self.record_failure(
                        Reason::InvalidAnnotation,
                        message,
                        Duration::ZERO,
                        None,
                        false,
                    )
                    .await;
                }
                return Plan::Idle;
            }
        };
        self.status
            .update(|s| s.desired_digest = Some(desired.digest));
        self.metrics.set_desired(Some(desired.digest));
        if self.live == Some(desired.digest) {
            tracing::debug!(digest = %desired.digest, "desired release is live; nothing to fetch");
            self.pending = None;
            self.set_ready(true).await;
            // Live from before this process started: its seq is known if it was the
            // highest made live.
            let seq = self
                .refresher
                .high_water
                .lock()
                .ok()
                .and_then(|h| *h)
                .filter(|(_, d)| *d == desired.digest)
                .map(|(s, _)| s);
            self.announce(desired.digest, seq);
            if self.failures > 0 {
                self.failures = 0;
                self.save_state().await;
                self.metrics.set_consecutive(0);
                self.status.update(|s| {
                    s.consecutive_failures = 0;
                    s.last_error = None;
                });
            }
            return Plan::Idle;
        }
        self.set_ready(false).await;
        match &self.pending {
            Some(p) if &p.desired == desired => match p.retry_at {
                Some(at) if Instant::now() >= at => {
                    Plan::Refresh(desired.clone(), observed.seen_at)
                }
                _ => Plan::Idle,
            },
            _ => Plan::Refresh(desired.clone(), observed.seen_at),
        }
    }

    async fn refresh(
        &mut self,
        desired: DesiredRelease,
        seen_at: Instant,
        rx: &mut watch::Receiver<Option<Observed>>,
        shutdown: &CancellationToken,
    ) {
        let cancel = shutdown.child_token();
        let started = Instant::now();
        let deadline = tokio::time::sleep(self.cfg.refresh_timeout);
        tokio::pin!(deadline);
        let mut timed_out = false;
        let result = {
            let apply = self.refresher.apply(&desired, &cancel);
            tokio::pin!(apply);
            let mut watching = true;
            loop {
                tokio::select! {
                    r = &mut apply => break r,
                    changed = rx.changed(), if watching => {
                        // Any newer desired state makes this one obsolete: an older
                        // release must never go live after a newer one was asked for.
                        if changed.is_ok() {
                            cancel.cancel();
                        }
                        watching = false;
                    }
                    () = &mut deadline, if !timed_out => {
                        timed_out = true;
                        cancel.cancel();
                    }
                }
            }
        };
        let result = match result {
            Err(RefreshError::Cancelled) if timed_out && !shutdown.is_cancelled() => {
                Err(RefreshError::new(
                    Reason::Timeout,
                    format!(
                        "refresh took longer than {} ms (AETHER_REFRESH_TIMEOUT_MS)",
                        self.cfg.refresh_timeout.as_millis()
                    ),
                ))
            }
            other => other,
        };
        match result {
            Ok(applied) => {
                let latency = seen_at.elapsed();
                let digest = desired.digest;
                self.live = Some(digest);
                self.last_swap = Some(Instant::now());
                self.failures = 0;
                self.pending = None;
                self.backoff = backoff(self.cfg.backoff_max);
                // The workspace first (`state.json`, `.ready`), the reports after: whoever
                // sees the new release in `/status`, the metrics or the log finds the
                // workspace already saying so.
                self.save_state().await;
                self.set_ready(true).await;
                self.metrics.success(latency, digest);
                self.metrics.applied(&applied);
                let ms = latency.as_millis() as u64;
                let d = applied.delta.unwrap_or_default();
                tracing::debug!(
                    bytes = applied.downloaded,
                    reused = applied.reused,
                    seq = applied.seq,
                    files_added = d.added,
                    files_changed = d.changed,
                    files_removed = d.removed,
                    files_reused = d.reused,
                    patched = d.patched,
                    wait_ms = applied.stages.ms(Stage::Wait),
                    artifact_ms = applied.stages.ms(Stage::Artifact),
                    manifest_ms = applied.stages.ms(Stage::Manifest),
                    objects_ms = applied.stages.ms(Stage::Objects),
                    assemble_ms = applied.stages.ms(Stage::Assemble),
                    swap_ms = applied.stages.ms(Stage::Swap),
                    attempt_ms = started.elapsed().as_millis() as u64,
                    "release details"
                );
                // The marker line carries exactly the contract's fields, so scripts can
                // anchor their patterns.
                tracing::info!(
                    "REFRESH_OK app={} digest={} ms={ms}",
                    self.cfg.pod,
                    digest.hex()
                );
                self.status.update(|s| {
                    s.current_digest = Some(digest);
                    s.consecutive_failures = 0;
                    s.last_error = None;
                    s.last_refresh_ms = Some(ms);
                });
                self.announce(digest, applied.seq);
            }
            Err(RefreshError::Cancelled) => {
                tracing::debug!(digest = %desired.digest, "refresh superseded");
            }
            Err(RefreshError::Failed {
                reason,
                message,
                settled,
            }) => {
                let will_retry = reason.retryable() && !settled;
                self.record_failure(
                    reason,
                    &message,
                    started.elapsed(),
                    Some(desired.digest),
                    will_retry,
                )
                .await;
                if settled {
                    tracing::warn!(
                        digest = %desired.digest,
                        "refused for good: not retried until the annotations change"
                    );
                }
                let retry_at = will_retry.then(|| Instant::now() + self.next_delay());
                self.pending = Some(Pending { desired, retry_at });
            }
        }
    }

    async fn record_failure(
        &mut self,
        reason: Reason,
        message: &str,
        took: Duration,
        digest: Option<Digest>,
        will_retry: bool,
    ) {
        self.failures += 1;
        // As on success: the workspace first, then metrics, log and `/status`.
        self.save_state().await;
        let anomaly = self.failures == self.cfg.anomaly_threshold;
        self.metrics.failure(reason, self.failures, anomaly);
        tracing::warn!(reason = %reason, "refresh failed: {message}");
        tracing::warn!(
            "REFRESH_FAIL app={} reason={reason} ms={}",
            self.cfg.pod,
            took.as_millis()
        );
        if anomaly {
            tracing::error!(
                "ANOMALY app={} failures={} (AETHER_ANOMALY_FAIL_THRESHOLD reached)",
                self.cfg.pod,
                self.failures
            );
        }
        let failures = self.failures;
        self.status.update(|s| {
            s.consecutive_failures = failures;
            s.last_error = Some(LastError {
                reason,
                message: message.to_owned(),
                digest,
                will_retry,
            });
        });
    }

    /// Retry delays start in [0.5 s, 1 s), double, and stay within the cap.
    fn next_delay(&mut self) -> Duration {
        self.backoff
            .next()
            .unwrap_or(self.cfg.backoff_max)
            .min(self.cfg.backoff_max)
    }

    /// Notices a `current` link changed or removed behind our back, so the next plan
    /// re-applies the desired release.
    fn resync(&mut self) {
        let on_disk = self.workspace.live_digest();
        if on_disk != self.live {
            tracing::warn!(
                expected = ?self.live,
                found = ?on_disk,
                "`current` changed on disk; re-applying the desired release"
            );
            self.live = on_disk;
            // Metrics first: a reader that sees the new `/status` sees the new metric too.
            self.metrics.set_current(on_disk);
            self.status.update(|s| s.current_digest = on_disk);
        }
    }

    /// The one writer of `.ready`: present exactly while `current` holds the desired
    /// release.
    async fn set_ready(&self, ready: bool) {
        let ws = self.workspace.clone();
        let result = tokio::task::spawn_blocking(move || ws.set_ready(ready)).await;
        if let Ok(Err(e)) = result {
            tracing::warn!(error = %e, "could not update .ready");
        }
    }

    async fn save_state(&self) {
        let high_water = self.refresher.high_water.lock().ok().and_then(|h| *h);
        let state = State {
            digest: self.live,
            consecutive_failures: self.failures,
            updated_at: jiff::Timestamp::now().to_string(),
            seq: high_water.map(|(s, _)| s),
            seq_digest: high_water.map(|(_, d)| d),
        };
        let ws = self.workspace.clone();
        let result = tokio::task::spawn_blocking(move || ws.write_state(&state)).await;
        if let Ok(Err(e)) = result {
            tracing::warn!(error = %e, "could not write state.json");
        }
    }
}

fn backoff(max: Duration) -> ExponentialBackoff {
    // backon's jitter adds up to 100% of the delay, so the base stops at half the cap.
    ExponentialBuilder::default()
        .with_min_delay(BACKOFF_MIN)
        .with_max_delay((max / 2).max(BACKOFF_MIN))
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_half_a_second_and_respects_the_cap() {
        let cap = Duration::from_millis(5000);
        let mut b = backoff(cap);
        let first = b.next().unwrap();
        assert!(first >= BACKOFF_MIN && first < 2 * BACKOFF_MIN, "{first:?}");
        for _ in 0..20 {
            let d = b.next().unwrap().min(cap);
            assert!(d <= cap);
        }
        // After many attempts the base is at the cap's half: every delay is in [cap/2, cap].
        let d = b.next().unwrap().min(cap);
        assert!(d >= cap / 2, "{d:?}");
    }
}
