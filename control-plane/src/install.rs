//! `aether install`: prints the control plane's installation (or its monitoring) as YAML.
//! The objects come from `aether_common::kube::{install, monitoring}`, the code that also
//! builds app Deployments; `deploy/` is this command's output (scripts/gen-deploy.sh).

use aether_common::kube::install::{InstallSpec, StoreVolume};
use aether_common::kube::{install, manifest, monitoring, yaml};
use anyhow::bail;
use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// A PersistentVolumeClaim: releases survive restarts and rescheduling.
    Pvc,
    /// An emptyDir: releases are lost with the pod (throw-away clusters).
    Emptydir,
}

#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// Namespace of the control plane and of the apps it manages (created).
    #[arg(long, short = 'n', default_value = "aether")]
    pub namespace: String,
    /// Base URL pods download artifacts from (default: the Service,
    /// http://aether.<namespace>.svc:80).
    #[arg(long)]
    pub public_url: Option<String>,
    /// Secret holding the API token under the key `token` (create it before or after).
    #[arg(long, default_value = "aether-api-token")]
    pub token_secret: String,
    /// Where the artifact store lives.
    #[arg(long, value_enum, default_value = "pvc")]
    pub store: StoreKind,
    /// Size of the store's PersistentVolumeClaim.
    #[arg(long, default_value = "10Gi")]
    pub store_size: String,
    /// The aether (control plane) image.
    #[arg(long, default_value = "aether:dev")]
    pub image: String,
    /// The aether-fetcher image the control plane puts in app pods.
    #[arg(long, default_value = "aether-fetcher:dev")]
    pub fetch_image: String,
    /// Print the Prometheus Operator objects instead: PodMonitors for the fetchers and
    /// the control plane, and the PrometheusRule with the alerts.
    #[arg(long, conflicts_with = "prometheus_rules")]
    pub monitoring: bool,
    /// Print the alerts as a plain Prometheus rules file (no Operator needed).
    #[arg(long)]
    pub prometheus_rules: bool,
}

/// The YAML the arguments ask for.
pub fn render(args: &InstallArgs) -> anyhow::Result<String> {
    // The namespace becomes object names and DNS names; the same rule as app names,
    // minus the room apps need for suffixes.
    if let Err(e) = manifest::check_app_name(&args.namespace) {
        bail!("--namespace: {}", e.replace("app name", "namespace"));
    }
    if let Some(url) = &args.public_url {
        let parsed =
            reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("--public-url {url:?}: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            bail!("--public-url {url:?} must be an http:// or https:// URL with a host");
        }
    }
    if args.prometheus_rules {
        return Ok(yaml::document(&monitoring::rules_file()));
    }
    if args.monitoring {
        return Ok(yaml::documents(&monitoring::objects(&args.namespace)));
    }
    let spec = InstallSpec {
        namespace: args.namespace.clone(),
        public_url: args.public_url.clone(),
        token_secret: args.token_secret.clone(),
        store: match args.store {
            StoreKind::Pvc => StoreVolume::Pvc {
                size: args.store_size.clone(),
            },
            StoreKind::Emptydir => StoreVolume::EmptyDir,
        },
        image: args.image.clone(),
        fetch_image: args.fetch_image.clone(),
    };
    Ok(yaml::documents(&install::objects(&spec)))
}
