//! `portway operator`: HTTPProxy and TCPProxy → Gateway API objects, connector readiness.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;

use super::{kube_client, shutdown_signal, write_ready_file};

#[derive(Parser)]
pub struct Args {
    /// Kubeconfig of the control plane (an operator or admin token).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Sidecar address(es) the generated EndpointSlices point at (comma-separated or
    /// repeated).
    #[arg(long, value_delimiter = ',', required = true)]
    sidecar: Vec<SocketAddr>,
    /// Zone for canonical hostnames (`<uid>.<zone>`).
    #[arg(long, default_value = "portway.localhost")]
    zone: String,
    /// ConnectorClass controller names served (comma-separated or repeated): a connector
    /// whose class names one of them is this operator's. Default: Portway's own
    /// (`portway.dev/operator`) and Datum's (`networking.datumapis.com/datum-connect`).
    #[arg(long, value_delimiter = ',', value_name = "NAME")]
    connector_controller: Vec<String>,
    /// Seconds an ephemeral connector (made by `portway http`) outlives its lease before
    /// it is deleted with its proxies.
    #[arg(long, default_value_t = 900)]
    ephemeral_ttl: u64,
    /// Issue the zone's wildcard certificate from the CA in this directory (`ca.crt`,
    /// `ca.key`; `portway apiserver` makes one in `<data-dir>/pki`), kept as a Secret in
    /// `portway-system` that every edge serves.
    #[arg(long, conflicts_with = "acme_directory")]
    local_ca: Option<PathBuf>,
    #[command(flatten)]
    acme: super::acme::AcmeFlags,
    /// The zone's authoritative DNS server (`portway dns`), asked for each ACME answer
    /// before the ACME server is told to look.
    #[arg(long, value_name = "ADDR", requires = "acme_directory")]
    acme_dns: Option<SocketAddr>,
    /// Route a hostname outside the zone only once its project proves control (TXT
    /// `_portway-challenge.<name>` with the token shown in status, or a CNAME to the
    /// proxy's canonical name), asked of this resolver.
    #[arg(long, value_name = "ADDR")]
    hostname_resolver: Option<SocketAddr>,
    #[command(flatten)]
    renewal: super::acme::RenewalFlags,
    #[command(flatten)]
    origins: super::origins::AllowFlags,
    /// The public ports TCPProxies may have, FIRST-LAST: a proxy without `spec.port` gets
    /// the lowest free one, and one asking for a port outside is refused.
    #[arg(long, value_name = "FIRST-LAST", default_value = "20000-20999", value_parser = super::parse_port_range)]
    tcp_ports: std::ops::RangeInclusive<u16>,
    /// With --leader-elect, only the replica holding the Lease
    /// `portway-system/portway-operator` works; the others wait and take over within a
    /// lease duration of the leader's loss.
    #[command(flatten)]
    leader: super::LeaderFlags,
    /// Write {"operator": "ready"} here once the caches are synced and controllers run
    /// (with --leader-elect: {"operator": "standby", "identity": …} at once).
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub async fn run(args: Args) -> Result<()> {
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let mut config = portway_operator::Config::new(args.sidecar);
    config.proxy.zone = args.zone;
    config.ephemeral_ttl = std::time::Duration::from_secs(args.ephemeral_ttl);
    config.proxy.allowed_origins = args.origins.allow_origin_network;
    config.tcp_ports = args.tcp_ports;
    if !args.connector_controller.is_empty() {
        config.connector_controllers = args.connector_controller;
    }
    config.verification = args
        .hostname_resolver
        .map(portway_operator::verify::Config::new);
    let acme = args.acme.config(args.acme_dns, args.hostname_resolver)?;
    if let Some(acme) = acme {
        let issuer = portway_operator::acme::Acme::new(acme, client.clone());
        config.certificates = Some(portway_operator::certs::Config::new(
            portway_operator::certs::Issuer::Acme(std::sync::Arc::new(issuer)),
        ));
    } else if let Some(dir) = &args.local_ca {
        let ca = portway_tls::ca::LocalCa::load(dir)
            .with_context(|| format!("loading the local CA from {}", dir.display()))?;
        config.certificates = Some(portway_operator::certs::Config::new(
            portway_operator::certs::Issuer::LocalCa(std::sync::Arc::new(ca)),
        ));
    }
    if let Some(certs) = &mut config.certificates {
        let (validity, renew_before) = args.renewal.durations();
        certs.validity = validity.unwrap_or(certs.validity);
        certs.renew_before = renew_before.unwrap_or(certs.renew_before);
    }
    let mut signal = std::pin::pin!(shutdown_signal());
    let election = if let Some(lease) = args.leader.config("portway-operator") {
        let identity = lease.identity.clone();
        portway_operator::certs::ensure_namespace(&client)
            .await
            .context("creating portway-system for the leader lease")?;
        if let Some(path) = &args.ready_file {
            write_ready_file(path, &json!({"operator": "standby", "identity": identity}))?;
        }
        eprintln!("waiting to lead (Lease portway-system/portway-operator) as {identity}");
        let stop = tokio_util::sync::CancellationToken::new();
        let leading = tokio::select! {
            l = portway_kube::leader::acquire(client.clone(), lease.clone(), stop.clone()) => l,
            () = &mut signal => return Ok(()),
        };
        leading.map(|l| (l, lease))
    } else {
        None
    };
    let lost = election.as_ref().map(|(l, _)| l.lost());
    let lost_leadership = async {
        match &lost {
            Some(t) => t.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let mut lost_leadership = std::pin::pin!(lost_leadership);
    let operator = portway_operator::Operator::start(config, client.clone())
        .await
        .context("starting the operator")?;
    let mut stepped_down = false;
    tokio::select! {
        synced = operator.ready() => {
            synced.context("waiting for the operator's caches")?;
            if let Some(path) = &args.ready_file {
                write_ready_file(path, &json!({"operator": "ready"}))?;
            }
            eprintln!("operator running");
            tokio::select! {
                () = &mut signal => {}
                () = &mut lost_leadership => stepped_down = true,
            }
        }
        () = &mut signal => {}
        () = &mut lost_leadership => stepped_down = true,
    }
    operator.shutdown();
    match join_bound(stepped_down, election.as_ref().map(|(_, lease)| lease)) {
        None => operator.join().await,
        Some(within) => {
            if !joined_within(operator.join(), within).await {
                // Dropped with the runtime as the process exits, just below.
                tracing::warn!(
                    waited = ?within,
                    "reconciles still running after losing the leader lease; aborting them"
                );
            }
        }
    }
    if let Some((leadership, lease)) = election {
        leadership.release(client, &lease).await;
    }
    if stepped_down {
        // Another replica leads now; a supervisor starts this one again as a standby.
        anyhow::bail!("lost the leader lease; stopped so that only the leader works");
    }
    Ok(())
}

/// How long to wait for the operator's running reconciles once it stops. Having lost the
/// Lease, a quarter of its duration: a standby takes over a lease duration after the last
/// renewal, about a third of it after this replica stepped down (its renew deadline is
/// two thirds), and what still runs then would write beside the new leader. Stopped by a
/// signal, the Lease is still renewed until released: no bound.
fn join_bound(
    stepped_down: bool,
    lease: Option<&portway_kube::leader::Config>,
) -> Option<std::time::Duration> {
    lease.filter(|_| stepped_down).map(|l| l.lease_duration / 4)
}

/// Whether `join` finished within `within` (else it is dropped).
async fn joined_within(
    join: impl std::future::Future<Output = ()>,
    within: std::time::Duration,
) -> bool {
    tokio::time::timeout(within, join).await.is_ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Reconciles that outlast a quarter of the lease after losing it are given up on,
    /// before a standby may take over; a signal (the Lease still held) waits for them.
    #[tokio::test]
    async fn losing_the_lease_bounds_the_wait_for_reconciles() {
        let mut lease = portway_kube::leader::Config::new("ns", "op", "a".into());
        lease.lease_duration = Duration::from_millis(200);
        let within = join_bound(true, Some(&lease)).expect("bounded once lost");
        assert!(within < lease.lease_duration / 3);
        assert_eq!(join_bound(false, Some(&lease)), None);
        assert_eq!(join_bound(true, None), None);
        let started = std::time::Instant::now();
        assert!(!joined_within(std::future::pending(), within).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(joined_within(async {}, within).await);
    }
}
