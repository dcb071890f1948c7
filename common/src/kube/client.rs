//! The Kubernetes API client, set up the same way by the fetcher and the control plane: a
//! kubeconfig file when one is given (`KUBECONFIG`, `--kubeconfig`), otherwise the pod's
//! in-cluster configuration (service-account token, cluster CA and namespace), with kube's
//! usual kubeconfig search as the last resort.

use std::path::{Path, PathBuf};

use kube::config::{InferConfigError, KubeconfigError};

/// Why no client could be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("loading kubeconfig {}: {source}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("no in-cluster configuration and no KUBECONFIG: {0}")]
    Infer(#[source] InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Build(#[source] kube::Error),
}

/// A client and the namespace its configuration names (the kubeconfig context's, or the
/// pod's own in-cluster).
pub struct Connection {
    pub client: kube::Client,
    pub default_namespace: String,
}

/// Connects with the kubeconfig at `kubeconfig`, or in-cluster when it is `None`.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Connection, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let file =
                kube::config::Kubeconfig::read_from(path).map_err(|source| ClientError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|source| ClientError::Load {
                    path: path.to_path_buf(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(ClientError::Infer)?,
    };
    let default_namespace = config.default_namespace.clone();
    let client = kube::Client::try_from(config).map_err(ClientError::Build)?;
    Ok(Connection {
        client,
        default_namespace,
    })
}
