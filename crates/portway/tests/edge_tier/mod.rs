//! The edge tier past one machine: two `portway edge` processes (each its own gateway in
//! the ConnectorClass) behind a TCP load balancer (nginx's `stream` module, as the README
//! documents), one API server, operator, DNS server, relay and a device publishing an HTTP
//! target. Both edges serve the route and dial the device themselves; after `kill -9` of
//! one, every request through the balancer is still answered.

use super::*;

const HOST: &str = "web.localhost";
const CLIENT: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// A client that opens a new connection for every request, so the balancer picks an edge
/// for each (a kept-alive connection would stay on one).
fn fresh_client(front: SocketAddr) -> Client<HttpConnector<FixedResolver>, Body> {
    let mut connector = HttpConnector::new_with_resolver(FixedResolver(front));
    connector.set_nodelay(true);
    // From an address of its own, so the edges can be seen to know it (the balancer
    // connects to them from 127.0.0.1).
    connector.set_local_address(Some(CLIENT));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// `GET http://web.localhost/hello` through `client`, within 5 s.
async fn hello(client: &Client<HttpConnector<FixedResolver>, Body>) -> anyhow::Result<String> {
    let req = Request::get(format!("http://{HOST}/hello")).body(empty())?;
    let resp = tokio::time::timeout(BOUND, client.request(req)).await??;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    ensure!(status == StatusCode::OK, "{status}: {body}");
    Ok(body)
}

/// From an edge's `/metrics`: the `200`s it answered for [`HOST`], and the tunnels it
/// opened to a device itself.
async fn served(metrics: SocketAddr) -> anyhow::Result<(u64, u64)> {
    let req = Request::get(format!("http://{metrics}/metrics")).body(empty())?;
    let resp = client(metrics, false).request(req).await?;
    let text = resp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&text);
    let value = |series: &str| -> anyhow::Result<u64> {
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(Ok(0), str::parse)?)
    };
    Ok((
        value(&format!(
            "portway_gateway_requests_total{{host=\"{HOST}\",code=\"200\"}}"
        ))?,
        value("portway_gateway_dial_seconds_count")?,
    ))
}

/// A control plane of separate processes (what `portway up` runs in one): an API server
/// on SQLite (data in `dir/api`), `relays` relays, a DNS server and an operator given
/// `operator_args` too. All start together once the API server is up; the operator
/// creates the ConnectorClass edges register in, so edges start after this.
pub(super) struct ControlPlane {
    pub kc: String,
    pub relays: Vec<Process>,
    pub relay_urls: Vec<String>,
    pub dns: String,
    _api: Process,
    _dns: Process,
    _operator: Process,
}

impl ControlPlane {
    pub async fn start(dir: &Path, relays: usize, operator_args: &[&str]) -> Self {
        let data = dir.join("api").display().to_string();
        let api = Process::start(
            "apiserver",
            bin(),
            ["apiserver", "--data", &data, "--listen", "127.0.0.1:0"],
        )
        .await
        .unwrap();
        let kc = api.ready_str("kubeconfig");
        let relay = |i: usize| {
            let kc = kc.clone();
            async move {
                Process::start(
                    &format!("relay-{i}"),
                    bin(),
                    ["relay", "--listen", "127.0.0.1:0", "--kubeconfig", &kc],
                )
                .await
                .unwrap()
            }
        };
        let mut operator = vec!["operator", "--sidecar", "127.0.0.1:1", "--kubeconfig", &kc];
        operator.extend_from_slice(operator_args);
        let (relays, dns, operator) = tokio::join!(
            futures::future::join_all((1..=relays).map(relay)),
            Process::start(
                "dns",
                bin(),
                ["dns", "--listen", "127.0.0.1:0", "--kubeconfig", &kc],
            ),
            Process::start("operator", bin(), operator),
        );
        let (dns, operator) = (dns.unwrap(), operator.unwrap());
        Self {
            relay_urls: relays.iter().map(|r| r.ready_str("relay")).collect(),
            dns: dns.ready_str("dns"),
            relays,
            kc,
            _api: api,
            _dns: dns,
            _operator: operator,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_behind_a_balancer_serve_one_route_and_survive_losing_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let plane = ControlPlane::start(dir.path(), 1, &[]).await;
    let (kc, relay_url, dns_addr) = (
        plane.kc.clone(),
        plane.relay_urls[0].clone(),
        plane.dns.clone(),
    );
    let edge = |i: usize| {
        let args = [
            "edge".to_owned(),
            "--kubeconfig".into(),
            kc.clone(),
            "--relay".into(),
            relay_url.clone(),
            "--dns".into(),
            dns_addr.clone(),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--metrics".into(),
            "127.0.0.1:0".into(),
            // Each edge is its own gateway (name and key) in the ConnectorClass.
            "--name".into(),
            format!("edge-{i}"),
            "--state-dir".into(),
            path(&format!("edge-{i}")),
            "--trusted-proxy".into(),
            "127.0.0.1/32".into(),
            // The balancer names each connection's client first.
            "--proxy-protocol-from".into(),
            "127.0.0.1/32".into(),
        ];
        async move { Process::start(&format!("edge-{i}"), bin(), args).await }
    };
    let (a, b) = tokio::join!(edge(1), edge(2));
    let mut edges = [a.unwrap(), b.unwrap()];
    let addr = |p: &Process, key: &str| -> SocketAddr { p.ready_str(key).parse().unwrap() };
    let metrics = [addr(&edges[0], "metrics"), addr(&edges[1], "metrics")];

    // A device publishing a local web server at web.localhost (a `.localhost` name needs
    // no proof of control).
    let origin = Origin::spawn().await.unwrap();
    let tunnel = format!("web=127.0.0.1:{},http,{HOST}", origin.addr.port());
    let _device = Process::start(
        "agent",
        bin(),
        [
            "agent",
            "--kubeconfig",
            &kc,
            "--project",
            "default",
            "--name",
            "laptop",
            "--state-dir",
            &path("device"),
            "--relay",
            &relay_url,
            "--tunnel",
            &tunnel,
        ],
    )
    .await
    .unwrap();

    let lb_dir = dir.path().join("lb");
    std::fs::create_dir(&lb_dir).unwrap();
    let (_nginx, lb) = portway_testkit::tcp_balancer_proxy_protocol(
        &lb_dir,
        &[addr(&edges[0], "http"), addr(&edges[1], "http")],
    );
    let client = fresh_client(lb);
    let want = format!("hello from {}", origin.addr.port());

    // (1) Through the balancer, the target answers, and from both edges: each has routed
    // requests and dialled the device itself.
    let started = Instant::now();
    eventually("both edges answer through the balancer", WAIT, || async {
        for _ in 0..4 {
            let body = hello(&client).await?;
            ensure!(body == want, "{body}");
        }
        let (x, y) = (served(metrics[0]).await?, served(metrics[1]).await?);
        ensure!(
            x.0 > 0 && y.0 > 0 && x.1 > 0 && y.1 > 0,
            "(200s, dials) per edge: {x:?} and {y:?}"
        );
        Ok(())
    })
    .await;
    eprintln!(
        "both edges served {HOST} {:?} after the balancer started",
        started.elapsed()
    );
    // The app sees the client's own address, not the balancer's: the edges read it from
    // the PROXY protocol header.
    for _ in 0..4 {
        let req = Request::get(format!("http://{HOST}/headers"))
            .body(empty())
            .unwrap();
        let resp = tokio::time::timeout(BOUND, client.request(req))
            .await
            .unwrap()
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let headers = String::from_utf8_lossy(&body);
        assert!(
            headers.contains(&format!("x-forwarded-for: {CLIENT}\n")),
            "{headers}"
        );
    }

    // (2) Lose one edge: the balancer's connection to it is refused and goes to the other.
    let (survivor_before, _) = served(metrics[1]).await.unwrap();
    edges[0].kill9();
    let killed = Instant::now();
    let (mut failed, mut first_ok) = (Vec::new(), None);
    for i in 0..50 {
        match hello(&client).await {
            Ok(body) if body == want => {
                first_ok.get_or_insert_with(|| killed.elapsed());
            }
            Ok(body) => failed.push(format!("request {i}: {body}")),
            Err(e) => failed.push(format!("request {i}: {e:#}")),
        }
    }
    let took = killed.elapsed();
    // The balancer did try the dead edge (so the retry was exercised, not dodged by luck).
    let dead = addr(&edges[0], "http").to_string();
    let refused = std::fs::read_to_string(lb_dir.join("nginx.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Connection refused") && l.contains(&dead))
        .count();
    let first_ms = first_ok.map_or_else(|| "never".into(), |d| d.as_millis().to_string());
    eprintln!(
        "edge failover: first 200 after {first_ms} ms, {} failed (50 requests in {took:?}; \
         the balancer found the dead edge refusing {refused} time(s) and went on)",
        failed.len()
    );
    assert!(failed.is_empty(), "after the kill: {failed:#?}");
    assert!(refused > 0, "the balancer never tried the killed edge");
    let (survivor_after, _) = served(metrics[1]).await.unwrap();
    assert!(
        survivor_after >= survivor_before + 50,
        "the surviving edge served {} of the 50",
        survivor_after - survivor_before
    );
}

/// Two relays, and a device reachable only through them (`--relay-only`): when its home
/// relay dies (`kill -9`), it moves home to the other and the edge reaches it there within
/// seconds (iroh by itself waits for its next full network report: 44 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moves_to_another_relay_when_its_home_relay_dies() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let mut plane = ControlPlane::start(dir.path(), 2, &[]).await;
    let (kc, urls, dns_addr) = (
        plane.kc.clone(),
        plane.relay_urls.clone(),
        plane.dns.clone(),
    );
    let edge = Process::start(
        "edge",
        bin(),
        [
            "edge",
            "--kubeconfig",
            &kc,
            "--relay",
            &urls[0],
            "--relay",
            &urls[1],
            "--dns",
            &dns_addr,
            "--http",
            "127.0.0.1:0",
            "--state-dir",
            &path("edge"),
        ],
    )
    .await
    .unwrap();
    let front: SocketAddr = edge.ready_str("http").parse().unwrap();
    let origin = Origin::spawn().await.unwrap();
    let tunnel = format!("web=127.0.0.1:{},http,{HOST}", origin.addr.port());
    let _device = Process::start(
        "agent",
        bin(),
        [
            "agent",
            "--kubeconfig",
            &kc,
            "--project",
            "default",
            "--name",
            "laptop",
            "--state-dir",
            &path("device"),
            "--relay",
            &urls[0],
            "--relay",
            &urls[1],
            "--relay-only",
            "--tunnel",
            &tunnel,
        ],
    )
    .await
    .unwrap();
    let client = client(front, false);
    let want = format!("hello from {}", origin.addr.port());
    let hello = || async {
        let req = Request::get(format!("http://{HOST}/hello")).body(empty())?;
        let resp = tokio::time::timeout(BOUND, client.request(req)).await??;
        let body = resp.into_body().collect().await?.to_bytes();
        ensure!(
            body == want.as_bytes(),
            "{}",
            String::from_utf8_lossy(&body)
        );
        Ok(())
    };
    eventually("the device answers through a relay", WAIT, hello).await;
    let admin = kube_client(Path::new(&kc)).await.unwrap();
    let connectors: Api<Connector> = Api::namespaced(admin, "default");
    let home = || async {
        connectors
            .get("laptop")
            .await
            .ok()
            .and_then(|c| c.status)
            .and_then(|s| s.connection_details)
            .and_then(|d| d.public_key)
            .and_then(|k| k.home_relay)
    };
    let before = home().await.expect("the device reports its home relay");
    let lost = urls.iter().position(|u| *u == before).expect("one of ours");
    plane.relays[lost].kill9();
    let killed = Instant::now();
    // Well under the 44 s iroh takes by itself.
    eventually(
        "the device answers again, through the other relay",
        Duration::from_secs(20),
        hello,
    )
    .await;
    eprintln!(
        "relay failover: the device answered again {:?} after its home relay was killed",
        killed.elapsed()
    );
    assert_eq!(home().await.as_deref(), Some(urls[1 - lost].as_str()));
}
