//! Waiting for a release to go live: the one loop behind `aether dev --hot` (every pod,
//! through the control plane) and the local loop (one fetcher's `/status`). It ends when
//! every pod runs the release or refused it, when a newer save supersedes it (newest wins,
//! as in the fetcher), or at the timeout; and it reads status at a bounded pace, so a pod
//! that never reports costs the API server a few requests a second, not a hundred.

use std::future::Future;
use std::time::{Duration, Instant};

use aether_common::Digest;
use aether_common::contract::status::{LastError, StatusReport};

/// One observation: each pod by name, with its fetcher's status when it could be read.
pub type Observation = Vec<(String, Option<StatusReport>)>;

/// How often status is read: soon after the release (a small release is live within
/// milliseconds), then every `every`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub first: Duration,
    pub every: Duration,
}

impl Pace {
    /// Through the control plane: each read costs one pod-proxy request per pod, so 200 ms
    /// keeps a one-pod wait at about 5 API requests a second.
    pub const CLUSTER: Pace = Pace {
        first: Duration::from_millis(20),
        every: Duration::from_millis(200),
    };
    /// One fetcher on loopback: reads are free, latency is what the user watches.
    pub const LOCAL: Pace = Pace {
        first: Duration::from_millis(5),
        every: Duration::from_millis(5),
    };
}

/// Where the pods stand on one release.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub total: usize,
    pub live: usize,
    /// Pods whose fetcher refused this very release (not an earlier one).
    pub refused: Vec<(String, LastError)>,
    /// Pods neither live nor refused (still working, or not reporting).
    pub pending: Vec<String>,
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
                    None => p.pending.push(name.clone()),
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
/// `timeout` passes. A failed read is retried at the same pace (the control plane may be
/// restarting); it ends the wait only at the timeout.
pub async fn wait<O, Fut, S, T>(
    digest: &Digest,
    mut observe: O,
    pace: Pace,
    timeout: Duration,
    superseded: S,
) -> Outcome<T>
where
    O: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Observation>>,
    S: Future<Output = T>,
{
    tokio::pin!(superseded);
    let deadline = Instant::now() + timeout;
    let mut delay = pace.first;
    let mut last = Progress::default();
    loop {
        let next = tokio::time::sleep(delay);
        tokio::select! {
            () = next => {}
            t = &mut superseded => return Outcome::Superseded(t, last),
        }
        delay = pace.every;
        match observe().await {
            Ok(pods) => {
                last = Progress::of(digest, &pods);
                if last.settled() {
                    return Outcome::Settled(last);
                }
            }
            Err(e) => tracing::debug!("reading status failed: {e:#}"),
        }
        if Instant::now() >= deadline {
            return Outcome::TimedOut(last);
        }
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

    #[tokio::test]
    async fn a_newer_save_ends_the_wait_for_a_pod_that_never_reports() {
        let d = Digest::of(b"x");
        let (tx, rx) = tokio::sync::oneshot::channel::<&str>();
        let observe = || async { Ok(vec![("silent".to_owned(), None)]) };
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
