//! Joining: a device turns a short-lived join token into its own credential, once, the
//! way a kubelet bootstraps with a bootstrap kubeconfig.
//!
//! [`client`] looks in the state directory for `device.kubeconfig`; without one, when the
//! given kubeconfig carries a join token (`pwj.…`), it asks the API server for a nonce,
//! signs it (with the project, connector name and NodeID) with the device's iroh key,
//! and writes the credential it gets back beside the key (mode 0600). A kubeconfig with
//! any other token is used as it is (a person's agent-role token).

use std::path::{Path, PathBuf};

use http::Request;
use kube::config::Kubeconfig;
use portway_discovery::endpoint;
use serde_json::{Value, json};

/// The signed message; the API server checks the same bytes.
pub fn join_message(nonce: &str, ns: &str, connector: &str, node_id: &str) -> String {
    format!("portway-join-v1\n{nonce}\n{ns}\n{connector}\n{node_id}")
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("reading kubeconfig {path}: {reason}")]
    Kubeconfig { path: PathBuf, reason: String },
    #[error("loading the agent key")]
    Key(#[from] endpoint::KeyError),
    #[error("joining project {project} as connector {connector}: {source}")]
    Join {
        project: String,
        connector: String,
        source: Box<kube::Error>,
    },
    #[error("creating a join token for project {project}: {source}")]
    Create {
        project: String,
        source: Box<kube::Error>,
    },
    #[error(
        "{path} is the credential of connector {connector} in project {project}; run with \
         --name {connector} --project {project}, or delete it and join again with a new join token"
    )]
    Mismatch {
        path: PathBuf,
        project: String,
        connector: String,
    },
    #[error("the API server's join answer lacks {0}")]
    Answer(&'static str),
    #[error(
        "the join token is for project {token}, not {wanted}; use a token for {wanted} or --project {token}"
    )]
    Project { token: String, wanted: String },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kube client: {0}")]
    Client(String),
    #[error(transparent)]
    Kube(#[from] portway_kube::ClientError),
}

/// Where the device credential lives.
pub fn credential_path(state_dir: &Path) -> PathBuf {
    state_dir.join("device.kubeconfig")
}

fn read(path: &Path) -> Result<Kubeconfig, JoinError> {
    Kubeconfig::read_from(path).map_err(|e| JoinError::Kubeconfig {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

async fn client_from(kc: Kubeconfig) -> Result<kube::Client, JoinError> {
    Ok(portway_kube::client_from(kc).await?)
}

/// The bearer token of the kubeconfig's current user.
fn token(kc: &Kubeconfig) -> Option<String> {
    let ctx = kc.current_context.as_deref()?;
    let user = kc
        .contexts
        .iter()
        .find(|c| c.name == ctx)?
        .context
        .as_ref()?
        .user
        .clone()?;
    let auth = kc
        .auth_infos
        .iter()
        .find(|a| a.name == user)?
        .auth_info
        .as_ref()?;
    auth.token
        .as_ref()
        .map(|t| secrecy::ExposeSecret::expose_secret(t).to_owned())
}

/// The kubeconfig with every user's token replaced.
pub fn with_token(mut kc: Kubeconfig, token: &str) -> Kubeconfig {
    for a in &mut kc.auth_infos {
        if let Some(auth) = a.auth_info.as_mut() {
            auth.token = Some(token.to_owned().into());
        }
    }
    kc
}

/// Creates a join token for `project` with an admin's client (`portway token create`).
///
/// # Errors
/// The API server's refusal (not an admin, no such project, bad TTL or uses).
pub async fn create_join_token(
    admin: &kube::Client,
    project: &str,
    ttl_seconds: u64,
    uses: u32,
) -> Result<(String, i64), JoinError> {
    let req = Request::post("/portway/v1/jointokens")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(
            json!({"namespace": project, "ttlSeconds": ttl_seconds, "uses": uses})
                .to_string()
                .into_bytes(),
        )
        .map_err(|e| JoinError::Client(e.to_string()))?;
    let v: Value = admin
        .request(req)
        .await
        .map_err(|source| JoinError::Create {
            project: project.to_owned(),
            source: Box::new(source),
        })?;
    let token = v["token"].as_str().ok_or(JoinError::Answer("token"))?;
    Ok((token.to_owned(), v["expires"].as_i64().unwrap_or_default()))
}

/// What a saved credential is bound to (`STATE/device.json`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Bound {
    project: String,
    connector: String,
}

/// Forgets the saved credential (after its connector was deleted, it binds to nothing).
///
/// # Errors
/// When a file exists but cannot be removed.
pub fn forget(state_dir: &Path) -> std::io::Result<()> {
    for path in [credential_path(state_dir), bound_path(state_dir)] {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

fn bound_path(state_dir: &Path) -> PathBuf {
    state_dir.join("device.json")
}

/// A client for the device: its credential when it has one, else the result of joining
/// with the kubeconfig's join token, else the kubeconfig as it is.
///
/// # Errors
/// When the kubeconfig is unusable or the join is refused (the error carries the API
/// server's reason: unknown or expired token, connector taken by another device…).
pub async fn client(
    kubeconfig: &Path,
    state_dir: &Path,
    project: &str,
    connector: &str,
    connector_class: &str,
) -> Result<kube::Client, JoinError> {
    if credential_path(state_dir).exists() {
        return saved(state_dir, project, connector).await;
    }
    client_with(
        read(kubeconfig)?,
        state_dir,
        project,
        connector,
        connector_class,
    )
    .await
}

/// The saved credential, if it is for this project and connector.
async fn saved(
    state_dir: &Path,
    project: &str,
    connector: &str,
) -> Result<kube::Client, JoinError> {
    let cred = credential_path(state_dir);
    if let Some(b) = std::fs::read(bound_path(state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice::<Bound>(&b).ok())
        && (b.project != project || b.connector != connector)
    {
        return Err(JoinError::Mismatch {
            path: cred,
            project: b.project,
            connector: b.connector,
        });
    }
    client_from(read(&cred)?).await
}

/// As [`client`], from a kubeconfig already read (`portway http` builds one).
///
/// # Errors
/// As [`client`].
pub async fn client_with(
    kc: Kubeconfig,
    state_dir: &Path,
    project: &str,
    connector: &str,
    connector_class: &str,
) -> Result<kube::Client, JoinError> {
    let cred = credential_path(state_dir);
    if cred.exists() {
        return saved(state_dir, project, connector).await;
    }
    let Some(join_token) = token(&kc).filter(|t| t.starts_with("pwj.")) else {
        return client_from(kc).await;
    };
    let key = endpoint::load_or_create_key(&state_dir.join("key"))?.0;
    let node_id = key.public().to_string();
    let bootstrap = client_from(kc.clone()).await?;
    let fail = |source: kube::Error| JoinError::Join {
        project: project.to_owned(),
        connector: connector.to_owned(),
        source: Box::new(source),
    };
    let post = |path: &str, body: Value| {
        Request::post(path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.to_string().into_bytes())
    };
    let req = post(
        "/portway/v1/join/challenge",
        json!({"joinToken": join_token}),
    )
    .map_err(|e| JoinError::Client(e.to_string()))?;
    let challenge: Value = bootstrap.request(req).await.map_err(fail)?;
    let nonce = challenge["nonce"]
        .as_str()
        .ok_or(JoinError::Answer("nonce"))?
        .to_owned();
    let ns = challenge["namespace"]
        .as_str()
        .ok_or(JoinError::Answer("namespace"))?;
    if ns != project {
        return Err(JoinError::Project {
            token: ns.to_owned(),
            wanted: project.to_owned(),
        });
    }
    let msg = join_message(&nonce, project, connector, &node_id);
    let signature: String = key
        .sign(msg.as_bytes())
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let req = post(
        "/portway/v1/join",
        json!({"joinToken": join_token, "connector": connector, "connectorClassName": connector_class,
               "nodeId": node_id, "nonce": nonce, "signature": signature}),
    )
    .map_err(|e| JoinError::Client(e.to_string()))?;
    let answer: Value = bootstrap.request(req).await.map_err(fail)?;
    let credential = answer["token"].as_str().ok_or(JoinError::Answer("token"))?;
    let device = with_token(kc, credential);
    let yaml = serde_yaml::to_string(&device).map_err(|e| JoinError::Client(e.to_string()))?;
    let bound = serde_json::to_vec(&Bound {
        project: project.to_owned(),
        connector: connector.to_owned(),
    })
    .unwrap_or_default();
    for (path, bytes) in [
        (bound_path(state_dir), bound),
        (cred.clone(), yaml.into_bytes()),
    ] {
        portway_tls::write_private(&path, &bytes)
            .map_err(|source| JoinError::Write { path, source })?;
    }
    tracing::info!(project, connector, %node_id, path = %cred.display(), "joined; device credential saved");
    client_from(read(&cred)?).await
}
