//! A real etcd cluster (Debian's `etcd` 3.4) of 1 or 3 members on loopback ports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::pebble::free_port;
use crate::{Process, eventually};

const BIN: &str = "/usr/bin/etcd";

/// How long a member may take to answer healthy after it starts.
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

/// Clusters started by this test process, so each gets its own cluster token.
static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// An etcd cluster whose members are killed when it is dropped (their data stays in `dir`).
pub struct Cluster {
    members: Vec<Member>,
    /// `m0=http://127.0.0.1:PP0,…`, the same for every member and every restart.
    initial_cluster: String,
    token: String,
}

struct Member {
    name: String,
    data: PathBuf,
    client: u16,
    peer: u16,
    process: Process,
    /// Runs replaced by [`Cluster::restart`], kept so their logs print if the test fails.
    earlier: Vec<Process>,
}

impl Cluster {
    /// Starts `members` etcd members (1 or 3) as one cluster on loopback; returns once every
    /// member answers healthy. Data directories are `dir/m0`, `dir/m1`, ….
    ///
    /// # Errors
    /// When etcd cannot be started or a member exits before it is healthy (with its log).
    ///
    /// # Panics
    /// When a member is not healthy within 30 s (the members' logs are printed).
    pub async fn start(dir: &Path, members: usize) -> Result<Self> {
        if members == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        if !Path::new(BIN).exists() {
            bail!("{BIN} is not installed: `apt-get install -y etcd-server`");
        }
        let ports = distinct_ports(2 * members)?;
        let initial_cluster = (0..members)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", ports[2 * i + 1]))
            .collect::<Vec<_>>()
            .join(",");
        // Peers check the token, so a member of another test's cluster that happens to
        // reuse a port is refused instead of joined.
        let token = format!(
            "portway-test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        let mut cluster = Self {
            members: Vec::with_capacity(members),
            initial_cluster,
            token,
        };
        for i in 0..members {
            let (name, data) = (format!("m{i}"), dir.join(format!("m{i}")));
            let (client, peer) = (ports[2 * i], ports[2 * i + 1]);
            let process = cluster.spawn(&name, &data, client, peer, "new")?;
            cluster.members.push(Member {
                name,
                data,
                client,
                peer,
                process,
                earlier: Vec::new(),
            });
        }
        // Up to ~2 s with 3 members: a new member first asks each peer whether it was
        // bootstrapped already, waiting 1 s on a peer that listens but does not serve yet.
        for i in 0..members {
            cluster.wait_healthy(i).await?;
        }
        Ok(cluster)
    }

    /// Client URLs, `http://127.0.0.1:PORT`, one per member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| endpoint(m.client)).collect()
    }

    /// The member that leads the cluster now (its raft leader), asked of each member
    /// through etcd's JSON gateway.
    ///
    /// # Errors
    /// When no member answers with the leader among the members.
    pub async fn leader(&self) -> Result<usize> {
        let client =
            Client::builder(TokioExecutor::new()).build_http::<http_body_util::Full<Bytes>>();
        let mut ids = Vec::new();
        let mut leader = None;
        for m in &self.members {
            let req = hyper::Request::post(format!("{}/v3/maintenance/status", endpoint(m.client)))
                .body(http_body_util::Full::new(Bytes::from_static(b"{}")))?;
            let answer = async {
                let resp = client.request(req).await?;
                let body = resp.into_body().collect().await?.to_bytes();
                anyhow::Ok(serde_json::from_slice::<serde_json::Value>(&body)?)
            };
            let v = match tokio::time::timeout(Duration::from_secs(2), answer).await {
                Ok(Ok(v)) => v,
                _ => {
                    ids.push(None);
                    continue;
                }
            };
            ids.push(v["header"]["member_id"].as_str().map(str::to_owned));
            leader = leader.or(v["leader"].as_str().map(str::to_owned));
        }
        let leader = leader.context("no member said who leads")?;
        ids.iter()
            .position(|id| id.as_deref() == Some(leader.as_str()))
            .with_context(|| format!("the leader {leader} is not among the members {ids:?}"))
    }

    /// `kill -9` member `i` (its data stays).
    ///
    /// # Panics
    /// When there is no member `i`.
    pub fn kill9(&mut self, i: usize) {
        self.members[i].process.kill9();
    }

    /// Starts member `i` again with its data (same ports, `--initial-cluster-state
    /// existing`) and waits until it answers healthy. A member still running is killed
    /// first.
    ///
    /// # Errors
    /// When etcd cannot be started or exits before it is healthy (with its log).
    ///
    /// # Panics
    /// When there is no member `i`, or it is not healthy within 30 s.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.members[i].process.kill9();
        let m = &self.members[i];
        let process = self.spawn(&m.name, &m.data, m.client, m.peer, "existing")?;
        let m = &mut self.members[i];
        let old = std::mem::replace(&mut m.process, process);
        m.earlier.push(old);
        self.wait_healthy(i).await
    }

    fn spawn(
        &self,
        name: &str,
        data: &Path,
        client: u16,
        peer: u16,
        state: &str,
    ) -> Result<Process> {
        let (client, peer) = (endpoint(client), endpoint(peer));
        let data = data.to_str().context("etcd data directory is not UTF-8")?;
        Process::spawn(
            &format!("etcd {name}"),
            Path::new(BIN),
            [
                "--name",
                name,
                "--data-dir",
                data,
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-state",
                state,
                "--initial-cluster-token",
                &self.token,
                // Loopback round trips are well under a millisecond: elect a leader (and
                // notice a killed one) in half a second instead of the default seconds.
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                // Structured logs to the log file; warnings say why a member is unhappy.
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "warn",
            ],
        )
    }

    /// Polls member `i`'s `/health` until it says `true`; fails at once if it exits.
    async fn wait_healthy(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        let url = format!("{}/health", endpoint(m.client));
        let what = format!("etcd {} answers healthy", m.name);
        // `Ok(Some(…))` stops `eventually` early: a member that exited will not recover.
        let exited = eventually(&what, HEALTHY_WITHIN, || {
            let exited = m.process.exited();
            let url = url.clone();
            async move {
                if exited.is_some() {
                    return Ok(exited);
                }
                healthy(&url).await.map(|()| None)
            }
        })
        .await;
        if let Some(status) = exited {
            bail!(
                "etcd {} exited with {status} before it was healthy:\n{}",
                m.name,
                m.process.logs()
            );
        }
        Ok(())
    }
}

fn endpoint(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// `n` free ports, no two alike (free_port may hand out a port it handed out before).
fn distinct_ports(n: usize) -> Result<Vec<u16>> {
    let mut seen = BTreeSet::new();
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let port = free_port()?;
        if seen.insert(port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

/// One `GET /health`: etcd answers `{"health":"true"}` once the member has a leader and
/// can serve a read.
async fn healthy(url: &str) -> Result<()> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let req = async {
        let resp = client.get(url.parse()?).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    // Every hop has a timeout: a member without quorum can hold the request.
    let (status, body) = tokio::time::timeout(Duration::from_secs(2), req)
        .await
        .context("no answer within 2 s")??;
    let v: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("{status}: {}", String::from_utf8_lossy(&body)))?;
    if v["health"] != "true" {
        bail!("{status}: {v}");
    }
    Ok(())
}
