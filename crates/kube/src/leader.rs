//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's `leaderelection`:
//! of several replicas of a controller, the one whose identity the Lease holds works; the
//! others wait until it stops renewing for a lease duration, then one takes it.
//!
//! Expiry is judged by the local clock, from when this replica last saw the Lease change
//! (its holder or renew time), never from the renew time written by another machine's
//! clock: clocks that disagree must not hand the Lease to two replicas at once. Every
//! take-over is an update guarded on the Lease's `resourceVersion`, so two waiting
//! replicas cannot both win; so is a release, so a replica that lost the Lease cannot
//! clear the new holder's.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Which Lease, who we are, and how fast leadership moves.
#[derive(Clone, Debug)]
pub struct Config {
    pub namespace: String,
    pub name: String,
    /// Unique per replica (host name and process id, say).
    pub identity: String,
    /// How long a holder that stopped renewing keeps it (default 15 s).
    pub lease_duration: Duration,
    /// How often the holder renews, and the others look (default 2 s).
    pub retry_period: Duration,
}

impl Config {
    pub fn new(namespace: &str, name: &str, identity: String) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity,
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }

    /// A holder that cannot renew for this long stops working, before the others may
    /// take over (a lease duration after its last renewal).
    fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }
}

/// Leadership held: renewed in the background until lost or released.
pub struct Leadership {
    lost: CancellationToken,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Leadership {
    /// Cancelled when leadership is lost: another replica holds the Lease, or renewing
    /// failed for the renew deadline. Work done as leader must stop then.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Gives the Lease up, so another replica takes over at once rather than after a
    /// lease duration.
    pub async fn release(self, client: kube::Client, config: &Config) {
        self.stop.cancel();
        let _ = self.task.await;
        if self.lost.is_cancelled() {
            return;
        }
        let api: Api<Lease> = Api::namespaced(client, &config.namespace);
        let released = match api.get_opt(&config.name).await {
            Ok(Some(l)) => clear(&api, config, &l).await,
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = released {
            tracing::warn!(error = %e, "releasing the leader lease");
        }
    }
}

/// Clears the Lease's holder if it is `config.identity` in `read`, guarded on `read`'s
/// resourceVersion: a replica that lost the Lease since must not clear the new holder's.
///
/// # Errors
/// When the API cannot be reached; a conflict (another holds it now) is no error.
async fn clear(api: &Api<Lease>, config: &Config, read: &Lease) -> Result<(), kube::Error> {
    let Some(rv) = read.metadata.resource_version.as_deref() else {
        return Ok(());
    };
    if holder(read) != Some(config.identity.as_str()) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": rv},
        "spec": {"holderIdentity": null},
    });
    match api
        .patch(&config.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::debug!("the leader lease changed hands before it was released");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn holder(l: &Lease) -> Option<&str> {
    l.spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// The Lease as held by `identity` from now: renewed, and taken over if it was another's.
fn held(old: Option<&Lease>, config: &Config) -> Lease {
    let mut lease = old.cloned().unwrap_or_else(|| Lease {
        metadata: kube::api::ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            ..Default::default()
        },
        spec: Some(LeaseSpec::default()),
    });
    let was = old.and_then(holder).map(str::to_owned);
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if was.as_deref() != Some(config.identity.as_str()) {
        spec.acquire_time = Some(now());
        spec.lease_transitions =
            Some(spec.lease_transitions.unwrap_or(0) + i32::from(old.is_some()));
    }
    spec.holder_identity = Some(config.identity.clone());
    spec.lease_duration_seconds = i32::try_from(config.lease_duration.as_secs()).ok();
    spec.renew_time = Some(now());
    lease
}

type Observed = (Option<String>, Option<MicroTime>);

/// Waits until this replica holds the Lease (or `shutdown`), then renews it in the
/// background.
///
/// # Errors
/// None but `shutdown`: failures to reach the API are retried (they are logged).
pub async fn acquire(
    client: kube::Client,
    config: Config,
    shutdown: CancellationToken,
) -> Option<Leadership> {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    // What the Lease last looked like (holder, renew time), and when this replica first
    // saw it so.
    let mut seen: Option<(Observed, Instant)> = None;
    loop {
        let attempt = match api.get_opt(&config.name).await {
            Ok(None) => api
                .create(&PostParams::default(), &held(None, &config))
                .await
                .map(Some),
            Ok(Some(l)) => {
                let key = (
                    holder(&l).map(str::to_owned),
                    l.spec.as_ref().and_then(|s| s.renew_time.clone()),
                );
                if seen.as_ref().is_none_or(|(k, _)| *k != key) {
                    seen = Some((key.clone(), Instant::now()));
                }
                let duration = l
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_duration_seconds)
                    .and_then(|s| u64::try_from(s).ok())
                    .map_or(config.lease_duration, Duration::from_secs);
                let stale = seen
                    .as_ref()
                    .is_some_and(|(_, at)| at.elapsed() >= duration);
                let free = key.0.is_none() || key.0.as_deref() == Some(&config.identity) || stale;
                if free {
                    // Guarded on the resourceVersion read: of two replicas taking over,
                    // one gets 409.
                    api.replace(
                        &config.name,
                        &PostParams::default(),
                        &held(Some(&l), &config),
                    )
                    .await
                    .map(Some)
                } else {
                    Ok(None)
                }
            }
            Err(e) => Err(e),
        };
        match attempt {
            Ok(Some(_)) => {
                tracing::info!(lease = %format!("{}/{}", config.namespace, config.name), identity = %config.identity, "became the leader");
                let lost = CancellationToken::new();
                let stop = CancellationToken::new();
                let task = tokio::spawn(renew(api, config, lost.clone(), stop.clone()));
                return Some(Leadership { lost, stop, task });
            }
            Ok(None) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => tracing::debug!(error = %e, "looking at the leader lease"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(config.retry_period) => {}
        }
    }
}

/// Leadership as a flag, for parts that serve always but write only while leading (an
/// xDS server's status, the DNS server's conditions): true while this replica holds the
/// Lease; lost, it waits to lead again. The Lease is released at `shutdown`.
pub fn follow(
    client: kube::Client,
    config: Config,
    shutdown: CancellationToken,
) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Some(leading) = acquire(client.clone(), config.clone(), shutdown.clone()).await {
            tx.send_replace(true);
            let lost = leading.lost();
            tokio::select! {
                () = lost.cancelled() => {
                    tx.send_replace(false);
                }
                () = shutdown.cancelled() => {
                    tx.send_replace(false);
                    leading.release(client, &config).await;
                    return;
                }
            }
        }
    });
    rx
}

/// Resolves when `leading` (if any) changes; never when there is none or it is gone.
pub async fn changed(leading: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match leading {
        Some(l) => {
            // Gone (shut down): the last word stands (`false` after a release), rather
            // than every replica writing as if there were no election.
            if l.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Whether to do a leader's work now: always without an election.
pub fn leads(leading: Option<&tokio::sync::watch::Receiver<bool>>) -> bool {
    leading.is_none_or(|l| *l.borrow())
}

/// Renews the Lease every retry period; cancels `lost` when another holds it or renewing
/// has failed for the renew deadline.
async fn renew(api: Api<Lease>, config: Config, lost: CancellationToken, stop: CancellationToken) {
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(config.retry_period) => {}
        }
        // A request that hangs must not keep this replica leading past its deadline:
        // a standby takes over a lease duration after the last renewal.
        let left = config.renew_deadline().saturating_sub(last_ok.elapsed());
        let attempt = tokio::time::timeout(left, async {
            match api.get_opt(&config.name).await {
                Ok(Some(l)) if holder(&l) == Some(config.identity.as_str()) => api
                    .replace(&config.name, &PostParams::default(), &held(Some(&l), &config))
                    .await
                    .map(|_| true),
                Ok(other) => {
                    tracing::warn!(holder = ?other.as_ref().and_then(holder), "another replica holds the leader lease");
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })
        .await;
        match attempt {
            Ok(Ok(true)) => last_ok = Instant::now(),
            Ok(Ok(false)) => {
                lost.cancel();
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "renewing the leader lease"),
            Err(_) => tracing::warn!("renewing the leader lease took too long"),
        }
        if last_ok.elapsed() >= config.renew_deadline() {
            tracing::warn!("could not renew the leader lease in time; stepping down");
            lost.cancel();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica that lost the Lease (it read it as its own, then another took it over)
    /// leaves the new holder's Lease alone when it releases.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_release_leaves_the_new_holder_its_lease() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let mut server_config = portway_apiserver::Config::new(dir.path().to_owned());
        server_config.listen = "127.0.0.1:0".parse().unwrap();
        let server = portway_apiserver::Server::bind(server_config)
            .await
            .unwrap();
        let client = crate::client(server.kubeconfig()).await.unwrap();
        let api: Api<Lease> = Api::namespaced(client, "default");
        let a = Config::new("default", "op", "a".into());
        let b = Config::new("default", "op", "b".into());
        let read = api
            .create(&PostParams::default(), &held(None, &a))
            .await
            .unwrap();
        api.replace("op", &PostParams::default(), &held(Some(&read), &b))
            .await
            .unwrap();
        clear(&api, &a, &read)
            .await
            .expect("a conflict means another holds it: no error");
        let now = api.get("op").await.unwrap();
        assert_eq!(holder(&now), Some("b"));
        // Not ours as read: left alone, no request needed.
        clear(&api, &a, &now).await.unwrap();
        assert_eq!(holder(&api.get("op").await.unwrap()), Some("b"));
        // Ours as read and unchanged since: released.
        clear(&api, &b, &now).await.unwrap();
        assert_eq!(holder(&api.get("op").await.unwrap()), None);
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let config = Config::new("ns", "op", "b".into());
        let first = held(None, &config);
        let spec = first.spec.clone().unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        let renewed = held(Some(&first), &config);
        assert_eq!(renewed.spec.as_ref().unwrap().lease_transitions, Some(0));
        assert_eq!(
            renewed.spec.as_ref().unwrap().acquire_time,
            spec.acquire_time
        );
        let other = Config::new("ns", "op", "c".into());
        let taken = held(Some(&renewed), &other);
        assert_eq!(taken.spec.as_ref().unwrap().lease_transitions, Some(1));
        assert_eq!(
            taken.spec.as_ref().unwrap().holder_identity.as_deref(),
            Some("c")
        );
    }
}
