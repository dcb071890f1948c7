//! Waiting for a release to go live: the one loop behind `aether dev --hot` (every pod,
//! through the control plane) and the local loop (one fetcher's `/status`). It ends when
//! every pod runs the release or refused it, when a newer save supersedes it (newest wins,
//! as in the fetcher), or at the timeout; and it reads status at a bounded pace, so a pod
//! that never reports costs the API server a few requests a second, not a hundred: after
//! the first read only the pods still pending are read again, and the pause between reads
//! grows with their number.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use aether_common::Digest;
use aether_common::contract::status::{LastError, StatusReport};

/// One observation: each pod by name, with its fetcher's status when it could be read.
pub type Observation = Vec<(String, Option<StatusReport>)>;

/// How often status is read: soon after the release (a small release is live within
/// milliseconds), then every `every`, or `per_pod` for each pod still pending when that is
/// longer, up to `slowest`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub first: Duration,
    pub every: Duration,
    pub per_pod: Duration,
    pub slowest: Duration,
}

impl Pace {
    /// Through the control plane: each read costs one pod-proxy request per pending pod, so
    /// 200 ms per pod keeps a wait at about 5 API requests a second; past 10 pending pods
    /// the 2 s ceiling wins (latency stays visible, at pending/2 requests a second).
    pub const CLUSTER: Pace = Pace {
        first: Duration::from_millis(20),
        every: Duration::from_millis(200),
        per_pod: Duration::from_millis(200),
        slowest: Duration::from_secs(2),
    };
    /// One fetcher on loopback: reads are free, latency is what the user watches.
    pub const LOCAL: Pace = Pace {
        first: Duration::from_millis(5),
        every: Duration::from_millis(5),
        per_pod: Duration::ZERO,
        slowest: Duration::from_millis(5),
    };

    fn after(&self, pending: usize) -> Duration {
        let stretched = self
            .per_pod
            .saturating_mul(u32::try_from(pending).unwrap_or(u32::MAX));
        self.every.max(stretched).min(self.slowest.max(self.every))
    }
}

/// Where the pods stand on one release.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub total: usize,
    pub live: usize,
    /// Pods whose fetcher refused this very release (not an earlier one) for good.
    pub refused: Vec<(String, LastError)>,
    /// Pods neither live nor refused (still working, retrying, or not reporting).
    pub pending: Vec<String>,
    /// Of the pending pods, those whose last attempt at this release failed and is being
    /// retried, with that failure.
    pub retrying: Vec<(String, LastError)>,
    /// The pods seen running this release, with when that was first seen.
    pub live_since: BTreeMap<String, Instant>,
}

impl Progress {
    pub fn of(digest: &Digest, pods: &Observation) -> Self {
        let mut p = Progress {
            total: pods.len(),
            ..Default::default()
        };
        for (name, status) in pods {
            match status {
                Some(s) if s.current_digest.as_ref() == Some(digest) => p.live += 1,
                Some(s) => match s.refusal_of(digest) {
                    Some(e) => p.refused.push((name.clone(), e.clone())),
                    None => {
                        p.pending.push(name.clone());
                        if let Some(e) = s
                            .last_error
                            .as_ref()
                            .filter(|e| e.digest.as_ref() == Some(digest))
                        {
                            p.retrying.push((name.clone(), e.clone()));
                        }
                    }
                },
                None => p.pending.push(name.clone()),
            }
        }
        p
    }

    /// Every pod has an answer for this release.
    pub fn settled(&self) -> bool {
        self.pending.is_empty()
    }
}

/// How a wait ended.
#[derive(Debug)]
pub enum Outcome<T> {
    Settled(Progress),
    /// A newer save arrived first; it carries what `superseded` yielded.
    Superseded(T, Progress),
    TimedOut(Progress),
}

/// Reads `observe` at `pace` until the release settles, `superseded` resolves, or
/// `timeout` passes. `observe(None)` reads every pod, `observe(Some(names))` only those
/// (a pod missing from the answer is gone). A failed read is retried at the same pace (the
/// control plane may be restarting); it ends the wait only at the timeout.
pub async fn wait<O, Fut, S, T>(
    digest: &Digest,
    mut observe: O,
    pace: Pace,
    timeout: Duration,
    superseded: S,
) -> Outcome<T>
where
    O: FnMut(Option<Vec<String>>) -> Fut,
    Fut: Future<Output = anyhow::Result<Observation>>,
    S: Future<Output = T>,
{
    tokio::pin!(superseded);
    let deadline = Instant::now() + timeout;
    let mut delay = pace.first;
    // Every pod seen, with its latest status; `None` until the first read succeeds.
    let mut known: Option<BTreeMap<String, Option<StatusReport>>> = None;
    let mut last = Progress::default();
    loop {
        let next = tokio::time::sleep(delay);
        tokio::select! {
            () = next => {}
            t = &mut superseded => return Outcome::Superseded(t, last),
        }
        let only = known.as_ref().map(|_| last.pending.clone());
        match observe(only.clone()).await {
            Ok(pods) => {
                let pods: BTreeMap<_, _> = pods.into_iter().collect();
                let all = match (known.take(), only) {
                    (Some(mut all), Some(asked)) => {
                        for name in asked {
                            match pods.get(&name) {
                                Some(status) => all.insert(name, status.clone()),
                                None => all.remove(&name),
                            };
                        }
                        all
                    }
                    _ => pods,
                };
                let seen = Instant::now();
                let mut live_since = std::mem::take(&mut last.live_since);
                live_since.retain(|pod, _| all.contains_key(pod));
                for (pod, status) in &all {
                    if status.as_ref().and_then(|s| s.current_digest.as_ref()) == Some(digest) {
                        live_since.entry(pod.clone()).or_insert(seen);
                    }
                }
                last = Progress::of(digest, &all.clone().into_iter().collect());
                last.live_since = live_since;
                known = Some(all);
                if last.settled() {
                    return Outcome::Settled(last);
                }
            }
            Err(e) => tracing::debug!("reading status failed: {e:#}"),
        }
        if Instant::now() >= deadline {
            return Outcome::TimedOut(last);
        }
        delay = pace.after(last.pending.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aether_common::contract::status::Reason;

    fn report(current: Option<Digest>, refused: Option<Digest>) -> StatusReport {
        StatusReport {
            current_digest: current,
            last_error: refused.map(|d| LastError {
                reason: Reason::Extract,
                message: "no".into(),
                digest: Some(d),
                will_retry: false,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_refusal_of_an_earlier_release_is_not_a_refusal_of_this_one() {
        let old = Digest::of(b"old");
        let new = Digest::of(b"new");
        let pods = vec![
            ("a".into(), Some(report(Some(new), Some(old)))),
            ("b".into(), Some(report(Some(old), Some(old)))),
            ("c".into(), Some(report(Some(old), Some(new)))),
            ("d".into(), None),
        ];
        let p = Progress::of(&new, &pods);
        assert_eq!(p.live, 1);
        assert_eq!(p.refused.len(), 1);
        assert_eq!(p.refused[0].0, "c");
        assert_eq!(p.pending, vec!["b".to_owned(), "d".to_owned()]);
        assert!(!p.settled());
    }

    #[test]
    fn the_pause_between_reads_grows_with_the_pending_pods_up_to_a_ceiling() {
        let p = Pace::CLUSTER;
        assert_eq!(p.after(0), Duration::from_millis(200));
        assert_eq!(p.after(1), Duration::from_millis(200));
        assert_eq!(p.after(4), Duration::from_millis(800));
        assert_eq!(p.after(500), Duration::from_secs(2));
        assert_eq!(Pace::LOCAL.after(3), Duration::from_millis(5));
    }

    #[tokio::test]
    async fn after_the_first_read_only_pending_pods_are_read_again() {
        let d = Digest::of(b"x");
        let asked = std::sync::Mutex::new(Vec::new());
        let observe = |only: Option<Vec<String>>| {
            asked.lock().unwrap().push(only.clone());
            async move {
                Ok(match only {
                    // The first read: one pod live, one still working.
                    None => vec![
                        ("live".to_owned(), Some(report(Some(d), None))),
                        ("slow".to_owned(), Some(report(None, None))),
                    ],
                    // Then the slow one goes live.
                    Some(_) => vec![("slow".to_owned(), Some(report(Some(d), None)))],
                })
            }
        };
        let outcome = wait(
            &d,
            observe,
            Pace::LOCAL,
            Duration::from_secs(3600),
            std::future::pending::<()>(),
        )
        .await;
        match outcome {
            Outcome::Settled(p) => assert_eq!((p.live, p.total), (2, 2)),
            other => panic!("{other:?}"),
        }
        let asked = asked.into_inner().unwrap();
        assert_eq!(asked, vec![None, Some(vec!["slow".to_owned()])]);
    }

    #[tokio::test]
    async fn a_newer_save_ends_the_wait_for_a_pod_that_never_reports() {
        let d = Digest::of(b"x");
        let (tx, rx) = tokio::sync::oneshot::channel::<&str>();
        let observe = |_| async { Ok(vec![("silent".to_owned(), None)]) };
        let waiting = wait(&d, observe, Pace::LOCAL, Duration::from_secs(3600), async {
            rx.await.unwrap_or("closed")
        });
        tx.send("next save").unwrap();
        match waiting.await {
            Outcome::Superseded(t, _) => assert_eq!(t, "next save"),
            other => panic!("{other:?}"),
        }
    }
}
