//! What ships for the Prometheus stack (`aether install --monitoring`,
//! `deploy/monitoring/`): PodMonitors for the fetchers and the control plane, and the alert
//! rules, both as a Prometheus Operator `PrometheusRule` and as a plain rules file.

use serde_json::{Value, json};

use super::install::{self, COMPONENT_LABEL, PART_OF_LABEL};
use super::manifest::{APP_LABEL, FETCHER_PORT_NAME, MANAGED_BY, MANAGED_BY_LABEL};
use crate::contract::metrics as m;

/// Name of the fetchers' PodMonitor; Prometheus Operator makes it the `job` label
/// (`<namespace>/<name>`), which the target-down alerts select on.
pub const FETCHERS_MONITOR: &str = "aether-fetchers";
pub const CONTROL_PLANE_MONITOR: &str = "aether-control-plane";
/// Consecutive failures that count as an anomaly: the fetcher's default
/// `AETHER_ANOMALY_FAIL_THRESHOLD`, one constant for both.
pub const ANOMALY_THRESHOLD: u32 = m::DEFAULT_ANOMALY_FAIL_THRESHOLD;

/// One alert with its runbook.
pub struct Alert {
    pub name: &'static str,
    pub expr: String,
    /// How long the condition must hold (Prometheus duration).
    pub for_: &'static str,
    pub severity: &'static str,
    pub summary: &'static str,
    pub description: &'static str,
    pub runbook: &'static str,
}

/// The alerts, in the order of the README's table.
pub fn alerts() -> Vec<Alert> {
    vec![
        Alert {
            name: "AetherRefreshFailuresRising",
            expr: format!(
                "sum by (namespace, pod) (increase({}[10m])) > 3",
                m::REFRESH_FAILURE_TOTAL
            ),
            for_: "5m",
            severity: "warning",
            summary: "Releases keep failing to go live in {{ $labels.namespace }}/{{ $labels.pod }}",
            description: "More than 3 refreshes failed in 10 minutes, for 5 minutes.",
            runbook: "Run `aether status <app>` or read the fetcher's /status (last_error.reason), \
                      then `dev_hot_refresh_failure_total` by reason: download (store unreachable \
                      from the pod, public URL, TLS), checksum (artifact changed after release), \
                      extract or too_large (refused archive), timeout (slow store or huge \
                      artifact), io (workspace volume full or read-only).",
        },
        Alert {
            name: "AetherRefreshFailingRepeatedly",
            expr: format!("{} >= {ANOMALY_THRESHOLD}", m::CONSECUTIVE_FAILURES),
            for_: "1m",
            severity: "warning",
            summary: "{{ $labels.namespace }}/{{ $labels.pod }} failed {{ $value }} refreshes in a row",
            description: "The fetcher reached the anomaly threshold (AETHER_ANOMALY_FAIL_THRESHOLD) \
                          of consecutive failures; it keeps serving its previous release and \
                          retries with backoff.",
            runbook: "Read the fetcher's log (REFRESH_FAIL lines give the reason) and /status. A \
                      refusal that cannot succeed (bad signature, hostile archive) stops retrying \
                      by itself; retried failures (download, io, timeout) point at the store or \
                      the volume. A new release resets the count once it goes live.",
        },
        Alert {
            name: "AetherSignatureFailure",
            // `increase` alone misses a refusal made before the pod's first scrape (the
            // series starts above 0): a series that is new in the window and above 0 counts.
            expr: format!(
                "increase({s}[10m]) > 0 or ({s} unless {s} offset 10m) * 1 > 0",
                s = m::SIGNATURE_FAIL_TOTAL
            ),
            for_: "0m",
            severity: "critical",
            summary: "{{ $labels.namespace }}/{{ $labels.pod }} refused a release for its signature",
            description: "A release whose Ed25519 signature did not verify against the pod's \
                          public key was refused. Either the signing key and AETHER_PUBKEY \
                          disagree, or someone tried to run code that was not signed.",
            runbook: "Treat as a security event until explained. Compare the key the CLI signs \
                      with (`aether keygen` output, AETHER_SIGNING_KEY) and the fetcher's \
                      AETHER_PUBKEY; check who patched the aether.dev/* annotations (audit log). \
                      The pod keeps serving its previous release.",
        },
        Alert {
            name: "AetherReleaseOutOfSync",
            expr: format!("{} == 0", m::IN_SYNC),
            for_: "2m",
            severity: "warning",
            summary: "{{ $labels.namespace }}/{{ $labels.pod }} does not run its desired release",
            description: "The pod's live release has differed from the release its annotations \
                          ask for for more than 2 minutes.",
            runbook: "Compare dev_hot_desired_info and dev_hot_current_info for the pod, then see \
                      AetherRefreshFailuresRising: a refused release (reason in /status) stays \
                      refused until a new one is released.",
        },
        Alert {
            name: "AetherFetcherDown",
            expr: format!("up{{job=~\".*/{FETCHERS_MONITOR}\"}} == 0"),
            for_: "5m",
            severity: "warning",
            summary: "The fetcher of {{ $labels.namespace }}/{{ $labels.pod }} cannot be scraped",
            description: "Prometheus has not scraped the aether-fetcher sidecar for 5 minutes: it \
                          is crashing, stuck, or its port is blocked by a NetworkPolicy.",
            runbook: "`kubectl describe pod` (sidecar restarts, probe failures), `kubectl logs \
                      <pod> -c aether-fetcher`; allow Prometheus to reach port 9180.",
        },
        Alert {
            name: "AetherControlPlaneDown",
            // No target at all (a pod that never got an IP: Pending, an unbound claim, a
            // missing token Secret, zero replicas) is down too.
            expr: format!("absent(up{{job=~\".*/{CONTROL_PLANE_MONITOR}\"}} == 1)"),
            for_: "5m",
            severity: "critical",
            summary: "The aether control plane is down or not scraped",
            description: "No control-plane target has been up for 5 minutes. Deploys and releases \
                          cannot be made while it is down; running pods keep their live release.",
            runbook: "`kubectl -n <ns> describe deploy aether` and `kubectl -n <ns> logs deploy/aether`: \
                      a Pending pod (claim not bound, Secret aether-api-token missing), a crash \
                      at start (the log's last line says why); /readyz fails while the \
                      Kubernetes API is unreachable from the pod.",
        },
    ]
}

fn rule_groups() -> Value {
    let rules: Vec<Value> = alerts()
        .into_iter()
        .map(|a| {
            json!({
                "alert": a.name,
                "expr": a.expr,
                "for": a.for_,
                "labels": {"severity": a.severity},
                "annotations": {
                    "summary": a.summary,
                    "description": a.description,
                    "runbook": a.runbook,
                },
            })
        })
        .collect();
    json!([{"name": "aether", "rules": rules}])
}

/// The rules as a Prometheus rules file (for a Prometheus without the Operator, and for
/// `promtool`).
pub fn rules_file() -> Value {
    json!({"groups": rule_groups()})
}

fn meta(namespace: &str, name: &str) -> Value {
    json!({"name": name, "namespace": namespace, "labels": {PART_OF_LABEL: install::NAME}})
}

/// PodMonitors (fetchers, control plane) and the PrometheusRule, for Prometheus Operator.
pub fn objects(namespace: &str) -> Vec<Value> {
    let app_label = format!(
        "__meta_kubernetes_pod_label_{}",
        APP_LABEL.replace(['.', '/', '-'], "_")
    );
    vec![
        json!({
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": meta(namespace, FETCHERS_MONITOR),
            // No namespaceSelector: a PodMonitor selects pods in its own namespace, which
            // is the managed one, also after a kustomize namespace override.
            "spec": {
                "selector": {"matchLabels": {MANAGED_BY_LABEL: MANAGED_BY}},
                // The fetcher is a native sidecar (an init container); Prometheus discovers
                // init containers' ports too.
                "podMetricsEndpoints": [{
                    "port": FETCHER_PORT_NAME,
                    "path": "/metrics",
                    "interval": "15s",
                    "relabelings": [{"sourceLabels": [app_label], "targetLabel": "app"}],
                }],
            },
        }),
        json!({
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": meta(namespace, CONTROL_PLANE_MONITOR),
            "spec": {
                "selector": {"matchLabels": {APP_LABEL: install::NAME, COMPONENT_LABEL: "control-plane"}},
                "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
            },
        }),
        json!({
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": meta(namespace, install::NAME),
            "spec": {"groups": rule_groups()},
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_alert_has_a_severity_and_a_runbook() {
        let alerts = alerts();
        assert!(alerts.len() >= 5);
        for a in &alerts {
            assert!(matches!(a.severity, "warning" | "critical"), "{}", a.name);
            assert!(a.runbook.len() > 40, "{}", a.name);
        }
        let sig = alerts
            .iter()
            .find(|a| a.name == "AetherSignatureFailure")
            .unwrap();
        assert_eq!(sig.severity, "critical");
    }

    #[test]
    fn the_fetcher_monitor_selects_managed_pods_by_the_sidecar_port() {
        let objects = objects("aether");
        let pm = &objects[0];
        assert_eq!(
            pm["spec"]["selector"]["matchLabels"][MANAGED_BY_LABEL],
            MANAGED_BY
        );
        assert_eq!(
            pm["spec"]["podMetricsEndpoints"][0]["port"],
            FETCHER_PORT_NAME
        );
        assert_eq!(
            pm["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["sourceLabels"][0],
            "__meta_kubernetes_pod_label_app_kubernetes_io_name"
        );
    }
}
