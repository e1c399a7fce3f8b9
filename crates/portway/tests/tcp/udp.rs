//! Public UDP ports (`TCPProxy` with a `udp://` backend; `portway udp`), on the built-in
//! edge: datagrams round-trip loss-free and in order per client, two clients get flows of
//! their own, `dig` reaches the stack's own DNS server through a public port, and a
//! target advertised for one protocol is not reached with the other.

use std::net::SocketAddr;
use std::time::Duration;

use portway_api::TcpProxy;

use super::super::*;
use super::{proxy_condition, start_one_liner};

/// A UDP echo service on the device: every datagram back to its sender.
async fn udp_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    (addr, task)
}

/// Sends `count` datagrams one after another through `to`, each answered before the
/// next: returns how many came back intact (a lost one waits 2 s, then counts as lost).
async fn round_trips(to: SocketAddr, tag: &str, count: usize) -> anyhow::Result<usize> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(to).await?;
    let mut buf = vec![0u8; 65536];
    let mut ok = 0;
    for i in 0..count {
        // Sizes vary, one near the 1500-byte MTU.
        let payload = format!("{tag}-{i}-{}", "x".repeat(i % 1400));
        socket.send(payload.as_bytes()).await?;
        match tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await {
            Ok(Ok(n)) if buf[..n] == *payload.as_bytes() => ok += 1,
            Ok(Ok(n)) => anyhow::bail!(
                "datagram {i} came back changed: {:?}",
                String::from_utf8_lossy(&buf[..n.min(80)])
            ),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {}
        }
    }
    Ok(ok)
}

fn udp_url(url: &str) -> SocketAddr {
    url.strip_prefix("udp://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not udp://HOST:PORT: {url}"))
}

#[tokio::test]
async fn udp_ports_on_the_built_in_edge() {
    let mut ports = std::collections::BTreeSet::new();
    while ports.len() < 3 {
        ports.insert(portway_testkit::pebble::free_port().unwrap());
    }
    let [lo, _, hi]: [u16; 3] = ports.into_iter().collect::<Vec<_>>().try_into().unwrap();
    let stack = Stack::start_full(None, &["--tcp-ports", &format!("{lo}-{hi}")], &[]).await;
    let admin = kube_client(Path::new(&stack.up.ready_str("kubeconfig")))
        .await
        .unwrap();

    // `portway udp PORT`: a public UDP port from the range, echoed loss-free and in order.
    let (echo, _echo_task) = udp_echo().await;
    let device = start_one_liner(&stack, &["udp", &echo.port().to_string()]).await;
    let public = udp_url(&device.ready_str("url"));
    assert_eq!(public.ip(), stack.edge.ip());
    assert!((lo..=hi).contains(&public.port()), "{public}");
    eventually("the first datagram comes back", WAIT, || async {
        ensure!(round_trips(public, "warm", 1).await? == 1, "lost");
        Ok(())
    })
    .await;
    let got = round_trips(public, "one", 1000).await.unwrap();
    assert_eq!(got, 1000, "datagrams lost on loopback");
    // Two clients at once: a flow each, nothing crossed.
    let (a, b) = tokio::join!(round_trips(public, "a", 300), round_trips(public, "b", 300));
    assert_eq!((a.unwrap(), b.unwrap()), (300, 300));

    // A real DNS client against a real DNS server (the stack's own), through a public
    // UDP port.
    let dns: SocketAddr = stack.up.ready_str("dns").parse().unwrap();
    let dns_device = start_one_liner(&stack, &["udp", &dns.port().to_string()]).await;
    let dns_public = udp_url(&dns_device.ready_str("url"));
    let answer = eventually("dig through the public UDP port", WAIT, || async {
        let a = portway_testkit::dig(dns_public, "portway.localhost", "SOA", false)?;
        ensure!(a.status == "NOERROR" && !a.answers.is_empty(), "{a:?}");
        Ok(a)
    })
    .await;
    assert!(answer.authoritative, "{answer:?}");
    eprintln!(
        "udp: 1000 of 1000 datagrams back through {public}; dig through {dns_public}: {answer:?}"
    );

    // The protocol is part of what a device advertises: its UDP service is not reached
    // over TCP (and the operator says so).
    let proxies: Api<TcpProxy> = Api::namespaced(admin, "default");
    let connector = proxies
        .get(&device.ready_str("proxy"))
        .await
        .unwrap()
        .spec
        .backends[0]
        .connector
        .name
        .clone()
        .unwrap();
    let wrong: TcpProxy = serde_json::from_value(json!({
        "metadata": {"name": "wrong-protocol"},
        "spec": {"backends": [{"endpoint": format!("tcp://127.0.0.1:{}", echo.port()),
                               "connector": {"name": connector}}]}}))
    .unwrap();
    proxies
        .create(&PostParams::default(), &wrong)
        .await
        .unwrap();
    let (reason, message, _) =
        proxy_condition(&proxies, "wrong-protocol", "Accepted", "False").await;
    assert_eq!(reason, "BackendNotAdvertised", "{message}");
    assert!(
        message.contains(&format!("{}/udp", echo.port())),
        "{message}"
    );
    drop((device, dns_device));
}
