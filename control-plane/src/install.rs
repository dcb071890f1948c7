//! `aether install`: prints the control plane's installation (or its monitoring) as YAML.
//! The objects come from `aether_common::kube::{install, monitoring}`, the code that also
//! builds app Deployments; `deploy/` is this command's output (scripts/gen-deploy.sh).

use aether_common::kube::install::{InstallSpec, StoreVolume};
use aether_common::kube::{install, manifest, monitoring, yaml};
use anyhow::bail;

/// `--store`: `pvc`, `emptydir` or `s3://bucket[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// A PersistentVolumeClaim: releases survive restarts and rescheduling.
    Pvc,
    /// An emptyDir: releases are lost with the pod (throw-away clusters).
    Emptydir,
    /// S3-compatible object storage, shared by every replica.
    S3(String),
}

impl std::str::FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pvc" => Ok(Self::Pvc),
            "emptydir" => Ok(Self::Emptydir),
            url if url.starts_with("s3://") && url.len() > "s3://".len() => {
                Ok(Self::S3(url.to_owned()))
            }
            other => Err(format!(
                "{other:?}: expected pvc, emptydir or s3://bucket[/prefix]"
            )),
        }
    }
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
    /// Where the artifact store lives: `pvc`, `emptydir`, or `s3://bucket[/prefix]` (object
    /// storage, needed for more than one replica; settings from --store-secret).
    #[arg(long, default_value = "pvc")]
    pub store: StoreKind,
    /// With an s3:// store: the Secret whose keys are the bucket's standard AWS settings
    /// (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...), given to
    /// the control plane as its environment.
    #[arg(long, default_value = "aether-store")]
    pub store_secret: String,
    /// Control-plane replicas. Every replica serves the API; a Lease elects the one that
    /// runs the reconcile loop. More than one needs an s3:// store.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub replicas: u32,
    /// Size of the store's PersistentVolumeClaim.
    #[arg(long, default_value = "10Gi")]
    pub store_size: String,
    /// The aether (control plane) image.
    #[arg(long, default_value = "aether:dev")]
    pub image: String,
    /// The aether-fetcher image the control plane puts in app pods.
    #[arg(long, default_value = "aether-fetcher:dev")]
    pub fetch_image: String,
    /// Install into a namespace that exists: the Namespace object (with its restricted Pod
    /// Security labels) is not printed, so its policy and lifetime stay its owner's.
    #[arg(long)]
    pub existing_namespace: bool,
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
    // The namespace and the Secret name become object and DNS names: DNS-1123 labels,
    // within the app-name bound (tighter than the 63 characters Kubernetes allows).
    manifest::check_dns_label("--namespace", &args.namespace, manifest::MAX_APP_NAME)
        .map_err(anyhow::Error::msg)?;
    if let Some(url) = &args.public_url {
        check_public_url(url)?;
    }
    if !is_quantity(&args.store_size) {
        bail!(
            "--store-size {:?} is not a storage quantity (for example 10Gi or 500Mi)",
            args.store_size
        );
    }
    manifest::check_dns_label("--token-secret", &args.token_secret, manifest::MAX_APP_NAME)
        .map_err(anyhow::Error::msg)?;
    manifest::check_dns_label("--store-secret", &args.store_secret, manifest::MAX_APP_NAME)
        .map_err(anyhow::Error::msg)?;
    if args.replicas > 1 && !matches!(args.store, StoreKind::S3(_)) {
        bail!(
            "--replicas {} needs --store s3://bucket[/prefix]: replicas cannot share a volume",
            args.replicas
        );
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
        store: match &args.store {
            StoreKind::Pvc => StoreVolume::Pvc {
                size: args.store_size.clone(),
            },
            StoreKind::Emptydir => StoreVolume::EmptyDir,
            StoreKind::S3(url) => StoreVolume::S3 {
                url: url.clone(),
                secret: args.store_secret.clone(),
            },
        },
        replicas: args.replicas,
        image: args.image.clone(),
        fetch_image: args.fetch_image.clone(),
        create_namespace: !args.existing_namespace,
    };
    Ok(yaml::documents(&install::objects(&spec)))
}

/// A positive whole number with an optional binary or decimal suffix: the storage
/// quantities a claim is sized in.
fn is_quantity(s: &str) -> bool {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let suffix = &s[digits..];
    digits > 0
        && s[..digits].bytes().any(|b| b != b'0')
        && [
            "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E",
        ]
        .contains(&suffix)
}

/// The rules `aether serve` applies to `--public-url` at start, checked here so a bad URL
/// is an error now rather than a crash-looping pod; a loopback host is refused outright,
/// since the pods that download from it are never on this machine.
fn check_public_url(raw: &str) -> anyhow::Result<()> {
    if crate::serve::parse_public_url(raw)?.loopback {
        bail!("--public-url {raw:?} names a loopback address, which pods cannot reach");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_urls_pods_cannot_use_are_refused() {
        assert!(check_public_url("https://aether.example.com").is_ok());
        assert!(check_public_url("http://aether.team-a.svc:80").is_ok());
        for bad in [
            "ftp://x",
            "http://127.0.0.1:3000",
            "http://localhost",
            "http://[::1]/",
            "https://u:p@x",
            "https://x/?a=1",
            "https://x/#f",
            "not a url",
        ] {
            assert!(check_public_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn store_sizes_are_storage_quantities() {
        for ok in ["10Gi", "500Mi", "1T", "2048"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "Gi", "0Gi", "10GB", "-1Gi", "1.5Gi", "10 Gi"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
