//! Leader election on a `coordination.k8s.io/v1` Lease, so that the reconcile loop runs on
//! one control-plane replica at a time while every replica serves the API.
//!
//! client-go's algorithm, on kube's Lease API: the leader renews the Lease every retry
//! period; another replica takes it only once it has seen the holder's record unchanged
//! for a whole lease duration, timed on its own clock (so clock skew between nodes does not
//! matter), and every write is guarded by the resourceVersion it read, so of two replicas
//! racing for a free Lease exactly one wins. A leader that cannot renew within the renew
//! deadline (two thirds of the duration) steps down before anyone else may take over. A
//! replica that shuts down gracefully releases the Lease, so the next one takes it at once.
//!
//! kube-lease-manager (the kube-rs ecosystem's crate) was considered: its exclusion rests on
//! server-side-apply field-ownership conflicts, while this rests on the resourceVersion
//! precondition every Kubernetes object has; that is simpler to reason about and to test.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where the Lease is, who we are, and how long a holder keeps it without renewing.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
}

impl Config {
    /// A leader that has not renewed for this long steps down.
    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// Time between attempts: renewals while leading, checks while standing by.
    fn retry_period(&self) -> Duration {
        (self.duration / 6).max(Duration::from_millis(200))
    }

    /// The most one attempt (a read and a write) may take.
    fn attempt_timeout(&self) -> Duration {
        self.duration / 3
    }
}

/// The default identity: the pod's name (a restarted container keeps its Lease), else the
/// host name and process id.
pub fn default_identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!(
        "{}-{}",
        if host.is_empty() { "aether" } else { &host },
        std::process::id()
    )
}

/// Runs the election until `shutdown`, and `work` while this replica leads: a fresh task
/// each time it acquires the Lease, aborted (and awaited) the moment it stops holding it —
/// lost, not renewed in time, or at shutdown, where the Lease is released only after the
/// work has stopped. The receiver says whether this replica leads; the handle ends once
/// the Lease is released after `shutdown` (await it before the process exits).
pub fn lead<F, Fut>(
    client: kube::Client,
    config: Config,
    shutdown: CancellationToken,
    work: F,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = watch::channel(false);
    let elector = Elector {
        api: Api::namespaced(client, &config.namespace),
        config,
        observed: None,
    };
    let handle = tokio::spawn(elector.run(tx, shutdown, work));
    (rx, handle)
}

/// The work of a leader, while it leads.
struct Leading(Option<tokio::task::JoinHandle<()>>);

impl Leading {
    fn is_leading(&self) -> bool {
        self.0.is_some()
    }

    /// Aborts the work and waits until its task has stopped. The controller's own reconcile
    /// tasks are aborted with it; a patch already sent may still land, within the third of
    /// the lease duration between the renew deadline and any standby's take-over.
    async fn stop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
            let _ = task.await;
            metrics::gauge!(crate::metrics::LEADER).set(0.0);
            tracing::info!("reconcile loop stopped");
        }
    }
}

/// What a standby watches for change: the holder's renewals.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: Option<String>,
    renew: Option<MicroTime>,
    transitions: Option<i32>,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Self {
        Self {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            renew: spec.renew_time.clone(),
            transitions: spec.lease_transitions,
        }
    }
}

struct Elector {
    api: Api<Lease>,
    config: Config,
    /// The last record seen, and when it was first seen (on our clock).
    observed: Option<(Record, Instant)>,
}

#[derive(Debug, thiserror::Error)]
enum LeaseError {
    #[error("{what} Lease {name}: {source}")]
    Api {
        what: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the renew deadline passed")]
    Deadline,
}

impl LeaseError {
    /// The API server refused the request (RBAC): retrying will not help.
    fn forbidden(&self) -> bool {
        matches!(self, Self::Api { source: kube::Error::Api(s), .. } if s.code == 403)
    }
}

#[derive(Debug)]
enum Outcome {
    /// We hold the Lease (acquired or renewed).
    Held,
    /// Another replica holds it, or won the race for it.
    Other(Option<String>),
}

impl Elector {
    async fn run<F, Fut>(mut self, tx: watch::Sender<bool>, shutdown: CancellationToken, work: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut leading = Leading(None);
        // When the last successful write was sent: a standby counts from when it sees the
        // write, which is later, so the deadline below is conservative.
        let mut renewed: Option<Instant> = None;
        loop {
            // A leader must stop its work by this instant, whatever the API server does.
            let deadline = renewed
                .filter(|_| leading.is_leading())
                .map(|at| at + self.config.renew_deadline());
            let sent = Instant::now();
            let attempt =
                tokio::time::timeout(self.config.attempt_timeout(), self.try_acquire_or_renew());
            let result = tokio::select! {
                r = attempt => r.unwrap_or(Err(LeaseError::Timeout(self.config.attempt_timeout()))),
                () = sleep_until_some(deadline) => Err(LeaseError::Deadline),
                () = shutdown.cancelled() => break,
            };
            match result {
                Ok(Outcome::Held) => {
                    renewed = Some(sent);
                    if leading.0.as_ref().is_some_and(|t| t.is_finished()) {
                        // Holding the Lease with nothing running would stall every app.
                        tracing::error!(lease = %self.config.name, "the reconcile loop ended; starting it again");
                        leading.0 = Some(tokio::spawn(work()));
                    }
                    if !leading.is_leading() {
                        tracing::info!(lease = %self.config.name, identity = %self.config.identity,
                            "acquired the lease: this replica runs the reconcile loop");
                        metrics::gauge!(crate::metrics::LEADER).set(1.0);
                        leading.0 = Some(tokio::spawn(work()));
                        tx.send_replace(true);
                    }
                }
                Ok(Outcome::Other(holder)) => {
                    if leading.is_leading() {
                        tracing::warn!(lease = %self.config.name, holder = holder.as_deref().unwrap_or(""),
                            "another replica holds the lease: stopping the reconcile loop");
                        leading.stop().await;
                        tx.send_replace(false);
                    }
                }
                Err(e) if e.forbidden() => {
                    tracing::error!(lease = %self.config.name, error = %e,
                        "the Role lacks leases get/create/update (coordination.k8s.io): \
                         re-apply `aether install`; no reconcile loop runs until then");
                }
                Err(e) => {
                    tracing::warn!(lease = %self.config.name, error = %e, "lease request failed; retrying");
                }
            }
            let deadline = renewed
                .filter(|_| leading.is_leading())
                .map(|at| at + self.config.renew_deadline());
            if deadline.is_some_and(|d| Instant::now() >= d) {
                tracing::warn!(lease = %self.config.name, deadline = ?self.config.renew_deadline(),
                    "could not renew the lease in time: stopping the reconcile loop");
                leading.stop().await;
                tx.send_replace(false);
                renewed = None;
            }
            // Sleep until the next attempt; a leader wakes in time for its deadline.
            let mut wake = Instant::now() + jittered(self.config.retry_period());
            if let Some(deadline) = deadline.filter(|_| leading.is_leading()) {
                wake = wake.min(deadline);
            }
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = shutdown.cancelled() => break,
            }
        }
        if leading.is_leading() {
            // The work stops first; only then may another replica take over.
            leading.stop().await;
            tx.send_replace(false);
            match tokio::time::timeout(self.config.attempt_timeout(), self.release()).await {
                Ok(Ok(())) => tracing::info!(lease = %self.config.name, "released the lease"),
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.config.name, error = %e, "releasing the lease")
                }
                Err(_) => {
                    tracing::warn!(lease = %self.config.name, "releasing the lease timed out")
                }
            }
        }
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.config.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Outcome, LeaseError> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let me = self.config.identity.clone();
        let Some(lease) = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.api_error("reading", e))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.duration_secs()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(Outcome::Held)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Outcome::Other(None)),
                Err(e) => Err(self.api_error("creating", e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let since = self.observe(&lease);
        let holder = Record::of(&spec).holder;
        let mine = holder.as_deref() == Some(me.as_str());
        let their_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.config.duration, Duration::from_secs);
        let expired = holder.is_none() || since.elapsed() > their_duration;
        if !mine && !expired {
            return Ok(Outcome::Other(holder));
        }
        let mut next = spec.clone();
        next.holder_identity = Some(me);
        next.lease_duration_seconds = Some(self.duration_secs());
        next.renew_time = Some(now.clone());
        if !mine {
            next.acquire_time = Some(now);
            next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        let mut update = lease;
        update.spec = Some(next);
        // `update` carries the resourceVersion read above: a replica that wrote in between
        // makes this a 409, and it keeps the Lease.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &update)
            .await
        {
            Ok(written) => {
                self.observe(&written);
                Ok(Outcome::Held)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Outcome::Other(holder)),
            Err(e) => Err(self.api_error("writing", e)),
        }
    }

    /// Notes the Lease's record; returns when it was first seen as it is now.
    fn observe(&mut self, lease: &Lease) -> Instant {
        let record = Record::of(&lease.spec.clone().unwrap_or_default());
        match &self.observed {
            Some((seen, at)) if *seen == record => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((record, at));
                at
            }
        }
    }

    /// Gives the Lease up (if we still hold it), so another replica takes it at once.
    fn api_error(&self, what: &'static str, source: kube::Error) -> LeaseError {
        LeaseError::Api {
            what,
            name: self.config.name.clone(),
            source,
        }
    }

    async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.api_error("reading", e))?
        else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        lease.spec = Some(spec);
        self.api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
            .map_err(|e| self.api_error("releasing", e))
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Up to a fifth more than `d`, so that replicas started together do not keep asking at
/// the same instant.
fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d + d.mul_f64(f64::from(nanos % 1000) / 5000.0)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use aether_testkit::emulator::Emulator;
    use aether_testkit::process::wait_until;

    use super::*;

    const LONG: Duration = Duration::from_secs(30);

    /// Counts the leaders' work running at once, and the most ever seen.
    #[derive(Default)]
    struct Running {
        now: AtomicUsize,
        most: AtomicUsize,
    }

    struct Guard(Arc<Running>);

    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.now.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn replica(
        client: &kube::Client,
        identity: &str,
        running: &Arc<Running>,
    ) -> (watch::Receiver<bool>, CancellationToken) {
        let shutdown = CancellationToken::new();
        let running = running.clone();
        let (leading, _elector) = lead(
            client.clone(),
            Config {
                name: "test-lease".into(),
                namespace: "default".into(),
                identity: identity.into(),
                duration: Duration::from_secs(4),
            },
            shutdown.clone(),
            move || {
                let running = running.clone();
                async move {
                    let now = running.now.fetch_add(1, Ordering::SeqCst) + 1;
                    running.most.fetch_max(now, Ordering::SeqCst);
                    let _guard = Guard(running);
                    std::future::pending::<()>().await;
                }
            },
        );
        (leading, shutdown)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn of_two_replicas_one_leads_and_the_other_takes_over_once_it_has_stopped() {
        let emu = Emulator::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = emu.write_kubeconfig(dir.path()).unwrap();
        let client = aether_common::kube::client::connect(Some(&kubeconfig))
            .await
            .unwrap()
            .client;
        let running = Arc::new(Running::default());
        let (a, stop_a) = replica(&client, "a", &running);
        let (b, stop_b) = replica(&client, "b", &running);
        assert!(
            wait_until(LONG, || async { *a.borrow() || *b.borrow() }).await,
            "nobody leads"
        );
        // Renewals go on.
        let lease = || emu.get("leases", Some("default"), "test-lease").unwrap();
        let version = lease()["metadata"]["resourceVersion"].clone();
        assert!(
            wait_until(LONG, || async {
                lease()["metadata"]["resourceVersion"] != version
            })
            .await,
            "the leader never renewed"
        );
        // The holder, as the API server has it, stops gracefully (its work first, then it
        // releases the Lease): the other takes over, and never ran its work beside it.
        let holder = lease()["spec"]["holderIdentity"].clone();
        let (leader, standby, stop_leader) = if holder == "a" {
            (a, b, stop_a)
        } else {
            (b, a, stop_b)
        };
        stop_leader.cancel();
        assert!(wait_until(LONG, || async { *standby.borrow() }).await);
        assert!(!*leader.borrow());
        assert_eq!(
            running.most.load(Ordering::SeqCst),
            1,
            "two leaders at once"
        );
        assert_eq!(running.now.load(Ordering::SeqCst), 1);
    }
}
