//! The data planes' identity signing key: one Ed25519 key in a Secret of
//! `portway-system`, made once by whichever operator replica gets there first, and read by
//! every edge and the xDS server, so an app checking the identity header against any
//! hostname's published JWKS sees the same key whichever edge served it.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use portway_api::access::{IDENTITY_SECRET, IDENTITY_SECRET_KEY, IDENTITY_SECRET_TYPE};
use portway_api::certificates::SYSTEM_NAMESPACE;
use tokio_util::sync::CancellationToken;

/// Makes the key unless it exists, trying again until it does (the API server may not be
/// up yet). Creation is first-writer-wins: a replica that loses the race (409) keeps the
/// winner's key.
pub async fn ensure_key(client: kube::Client, shutdown: CancellationToken) {
    let secrets: Api<Secret> = Api::namespaced(client, SYSTEM_NAMESPACE);
    let mut wait = Duration::from_millis(200);
    loop {
        match make(&secrets).await {
            Ok(()) => return,
            Err(e) => tracing::warn!("the identity signing key: {e}; trying again"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

async fn make(secrets: &Api<Secret>) -> Result<(), String> {
    if secrets
        .get_opt(IDENTITY_SECRET)
        .await
        .map_err(|e| format!("reading Secret {SYSTEM_NAMESPACE}/{IDENTITY_SECRET}: {e}"))?
        .is_some()
    {
        return Ok(());
    }
    let der = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .map_err(|_| "generating an Ed25519 key failed".to_owned())?;
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": IDENTITY_SECRET, "namespace": SYSTEM_NAMESPACE,
            "labels": {portway_api::labels::MANAGED_BY: "portway"}},
        "type": IDENTITY_SECRET_TYPE,
        "data": {IDENTITY_SECRET_KEY: base64_of(der.as_ref())},
    }))
    .map_err(|e| e.to_string())?;
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!("made the identity signing key {SYSTEM_NAMESPACE}/{IDENTITY_SECRET}");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(format!(
            "creating Secret {SYSTEM_NAMESPACE}/{IDENTITY_SECRET}: {e}"
        )),
    }
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
