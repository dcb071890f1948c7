//! The Prometheus metrics of the contract, served by the fetcher itself on `/metrics`.

use std::sync::Mutex;
use std::time::Duration;

use aether_common::Digest;
use anyhow::Context;
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::failure::Reason;
use crate::refresh::Applied;

const BYTE_SOURCES: [&str; 2] = ["downloaded", "reused"];
const FILE_CHANGES: [&str; 4] = ["added", "changed", "removed", "reused"];
const HOOK_RESULTS: [&str; 2] = ["success", "failure"];

pub use aether_common::contract::metrics::*;

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// A stage of a one-file save takes milliseconds; a first release's, seconds.
const STAGE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// The recorder and the series the exporter cannot hold: `dev_hot_current_info` and
/// `dev_hot_desired_info` carry a digest as a label, and the old series must disappear
/// when the digest changes, which the `metrics` facade has no way to express. They are
/// rendered here, with `dev_hot_in_sync` derived from the two.
pub struct Metrics {
    handle: PrometheusHandle,
    digests: Mutex<Digests>,
}

#[derive(Default, Clone, Copy)]
struct Digests {
    current: Option<Digest>,
    desired: Option<Digest>,
}

impl Metrics {
    /// Installs the global recorder and registers every series at zero, so dashboards see
    /// them before the first event.
    pub fn install() -> anyhow::Result<Self> {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REFRESH_LATENCY.into()), LATENCY_BUCKETS)
            .context("latency buckets")?
            .set_buckets_for_metric(Matcher::Full(REFRESH_STAGE.into()), STAGE_BUCKETS)
            .context("stage buckets")?
            .install_recorder()
            .context("installing the metrics recorder")?;
        describe_counter!(
            REFRESH_TOTAL,
            "Refresh attempts that ended, successful or not"
        );
        describe_counter!(REFRESH_FAILURE_TOTAL, "Failed refresh attempts by reason");
        describe_histogram!(
            REFRESH_LATENCY,
            Unit::Seconds,
            "From a new desired digest being seen to `current` being swapped"
        );
        describe_gauge!(
            CONSECUTIVE_FAILURES,
            "Failed attempts since the last success"
        );
        describe_counter!(SIGNATURE_FAIL_TOTAL, "Releases refused for their signature");
        describe_counter!(
            ANOMALY_EVENTS_TOTAL,
            "Times the consecutive failures reached AETHER_ANOMALY_FAIL_THRESHOLD"
        );
        describe_counter!(
            REFRESH_BYTES_TOTAL,
            Unit::Bytes,
            "Bytes of the releases made live, by source: downloaded or reused from the volume"
        );
        describe_counter!(
            REFRESH_FILES_TOTAL,
            "Files of the manifest releases made live, by change against their base"
        );
        describe_histogram!(
            REFRESH_STAGE,
            Unit::Seconds,
            "Time successful refreshes spent in each stage: wait (for a spare copy or an \
             object collection), artifact (tar.gz download, check and extraction), \
             manifest, objects, assemble, swap"
        );
        describe_counter!(
            HOOK_TOTAL,
            "Webhook calls after a release went live, by result (retries included)"
        );
        for result in HOOK_RESULTS {
            counter!(HOOK_TOTAL, "result" => result).absolute(0);
        }
        for source in BYTE_SOURCES {
            counter!(REFRESH_BYTES_TOTAL, "source" => source).absolute(0);
        }
        for change in FILE_CHANGES {
            counter!(REFRESH_FILES_TOTAL, "change" => change).absolute(0);
        }
        counter!(REFRESH_TOTAL).absolute(0);
        for reason in Reason::ALL {
            counter!(REFRESH_FAILURE_TOTAL, "reason" => reason.as_str()).absolute(0);
        }
        counter!(SIGNATURE_FAIL_TOTAL).absolute(0);
        counter!(ANOMALY_EVENTS_TOTAL).absolute(0);
        gauge!(CONSECUTIVE_FAILURES).set(0.0);
        Ok(Self {
            handle,
            digests: Mutex::new(Digests::default()),
        })
    }

    pub fn success(&self, latency: Duration, live: Digest) {
        counter!(REFRESH_TOTAL).increment(1);
        histogram!(REFRESH_LATENCY).record(latency.as_secs_f64());
        gauge!(CONSECUTIVE_FAILURES).set(0.0);
        self.set_current(Some(live));
    }

    /// What a successful refresh moved and reused.
    pub fn applied(&self, applied: &Applied) {
        counter!(REFRESH_BYTES_TOTAL, "source" => "downloaded").increment(applied.downloaded);
        counter!(REFRESH_BYTES_TOTAL, "source" => "reused").increment(applied.bytes_reused);
        for (stage, took) in applied.stages.iter() {
            histogram!(REFRESH_STAGE, "stage" => stage.as_str()).record(took.as_secs_f64());
        }
        if let Some(d) = applied.delta {
            for (change, n) in FILE_CHANGES
                .iter()
                .zip([d.added, d.changed, d.removed, d.reused])
            {
                counter!(REFRESH_FILES_TOTAL, "change" => *change).increment(n);
            }
        }
    }

    pub fn failure(&self, reason: Reason, consecutive: u32, anomaly: bool) {
        counter!(REFRESH_TOTAL).increment(1);
        counter!(REFRESH_FAILURE_TOTAL, "reason" => reason.as_str()).increment(1);
        if reason == Reason::Signature {
            counter!(SIGNATURE_FAIL_TOTAL).increment(1);
        }
        if anomaly {
            counter!(ANOMALY_EVENTS_TOTAL).increment(1);
        }
        gauge!(CONSECUTIVE_FAILURES).set(f64::from(consecutive));
    }

    pub fn set_consecutive(&self, consecutive: u32) {
        gauge!(CONSECUTIVE_FAILURES).set(f64::from(consecutive));
    }

    /// The live release (`None`: nothing is live, the series disappears).
    pub fn set_current(&self, live: Option<Digest>) {
        if let Ok(mut d) = self.digests.lock() {
            d.current = live;
        }
    }

    /// The release the pod's annotations ask for (`None`: none).
    pub fn set_desired(&self, desired: Option<Digest>) {
        if let Ok(mut d) = self.digests.lock() {
            d.desired = desired;
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = self.handle.render();
        let d = self.digests.lock().map(|d| *d).unwrap_or_default();
        if let Some(digest) = d.current {
            out.push_str(&format!(
                "# HELP {CURRENT_INFO} The live release\n# TYPE {CURRENT_INFO} gauge\n{CURRENT_INFO}{{digest=\"{digest}\"}} 1\n"
            ));
        }
        if let Some(digest) = d.desired {
            out.push_str(&format!(
                "# HELP {DESIRED_INFO} The release the pod's annotations ask for\n# TYPE {DESIRED_INFO} gauge\n{DESIRED_INFO}{{digest=\"{digest}\"}} 1\n"
            ));
        }
        // Nothing desired is nothing to be out of sync with.
        let in_sync = d.desired.is_none() || d.desired == d.current;
        out.push_str(&format!(
            "# HELP {IN_SYNC} 1 when the live release is the desired one, else 0\n# TYPE {IN_SYNC} gauge\n{IN_SYNC} {}\n",
            u8::from(in_sync)
        ));
        out
    }
}
