//! One way to build a client: from a kubeconfig file, from a parsed kubeconfig, or, with
//! neither, from kube's defaults (`$KUBECONFIG`, `~/.kube/config`, in-cluster).

use std::path::{Path, PathBuf};

use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("kubeconfig {path} describes no usable cluster")]
    Load {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("the kubeconfig describes no usable cluster")]
    Config(#[source] kube::config::KubeconfigError),
    #[error("finding a kubeconfig (use --kubeconfig)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client")]
    Build(#[source] kube::Error),
}

/// A client from the kubeconfig at `path`, or from kube's defaults when there is none.
///
/// # Errors
/// When the file is unreadable or invalid, or no configuration can be found.
pub async fn client(path: Option<&Path>) -> Result<kube::Client, ClientError> {
    let config = match path {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| ClientError::Read {
                path: path.to_owned(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::Load {
                    path: path.to_owned(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(ClientError::Infer)?,
    };
    kube::Client::try_from(config).map_err(ClientError::Build)
}

/// A client from a kubeconfig already in memory (the agent edits its join token in).
///
/// # Errors
/// When it describes no usable cluster.
pub async fn client_from(kc: Kubeconfig) -> Result<kube::Client, ClientError> {
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(ClientError::Config)?;
    kube::Client::try_from(config).map_err(ClientError::Build)
}
