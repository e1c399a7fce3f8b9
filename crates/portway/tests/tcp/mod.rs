//! Public TCP ports (`TCPProxy`), on both data planes: the port granted (asked for, or
//! from the range), a refused request for a taken or foreign port, bytes both ways by
//! hash with half-close, 200 connections at once, a Redis client against a Redis
//! server on the device, and a device that goes offline. TLS passthrough runs on the
//! same stack ([`tls`]).

mod tls;
mod udp;

use std::net::IpAddr;

use kube::api::DeleteParams;
use portway_api::TcpProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// An echo server for the device: reads everything until the client's end (half-close),
/// then sends it all back and ends its own side. One direction at a time: with both
/// directions saturated at once through loopback TCP, the kernel was seen to drop and
/// then back off retransmissions for minutes under CI load (a stall of the test rig, not
/// of the tunnel).
async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if s.read_to_end(&mut all).await.is_ok() && s.write_all(&all).await.is_ok() {
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    (addr, task)
}

/// Sends `n` bytes of the test pattern through `addr` while reading the echo, ends its
/// side (half-close), and returns the hash of what came back once the far end closed.
async fn echo_through(addr: SocketAddr, n: u64) -> anyhow::Result<String> {
    echo_over(tokio::net::TcpStream::connect(addr).await?, n).await
}

/// As [`echo_through`], over any connection (TLS to a device, say).
async fn echo_over<S>(s: S, n: u64) -> anyhow::Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    let (mut r, mut w) = tokio::io::split(s);
    let write = async move {
        let mut sent = 0u64;
        while sent < n {
            let chunk: Vec<u8> = (sent..n.min(sent + 65536)).map(pattern).collect();
            w.write_all(&chunk).await?;
            sent += chunk.len() as u64;
        }
        w.shutdown().await?;
        anyhow::Ok(())
    };
    let read = async move {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 65536];
        let mut got = 0u64;
        loop {
            let k = r.read(&mut buf).await?;
            if k == 0 {
                break;
            }
            hasher.update(&buf[..k]);
            got += k as u64;
        }
        anyhow::ensure!(got == n, "{got} of {n} bytes came back");
        anyhow::Ok(hex(&hasher.finalize()))
    };
    let ((), hash) = tokio::try_join!(write, read)?;
    Ok(hash)
}

/// A TCPProxy's status once it is `Accepted` (or refused: `want` False).
async fn proxy_condition(
    api: &Api<TcpProxy>,
    name: &str,
    type_: &str,
    want: &str,
) -> (String, String, Option<i32>) {
    eventually(&format!("{name} {type_}={want}"), WAIT, || async {
        let p = api.get(name).await?;
        let status = p.status.unwrap_or_default();
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .context(format!("no {type_} yet"))?;
        ensure!(c.status == want, "{c:?}");
        Ok((c.reason.clone(), c.message.clone(), status.port))
    })
    .await
}

fn tcp_proxy(name: &str, port: Option<u16>, endpoint: &str, connector: &str) -> TcpProxy {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"port": port, "backends": [{"endpoint": endpoint, "connector": {"name": connector}}]},
    }))
    .unwrap()
}

#[tokio::test]
async fn tcp_ports_on_both_data_planes() {
    // Three free ports: the range from the lowest to the highest, which holds the third.
    let mut ports = std::collections::BTreeSet::new();
    while ports.len() < 3 {
        ports.insert(portway_testkit::pebble::free_port().unwrap());
    }
    let [lo, mid, hi]: [u16; 3] = ports.into_iter().collect::<Vec<_>>().try_into().unwrap();
    let range = format!("{lo}-{hi}");
    let stack = Stack::start_full(None, &["--tcp-ports", &range], &[]).await;
    let admin = kube_client(Path::new(&stack.up.ready_str("kubeconfig")))
        .await
        .unwrap();
    let tcp: Api<TcpProxy> = Api::namespaced(admin.clone(), "default");

    // The device: `portway http` advertises its target (TCP) and names its connector.
    let (echo, _echo_task) = echo_server().await;
    let (device, connector) = stack.device_for(echo.port(), "echo.localhost", 5).await;
    let endpoint = format!("tcp://127.0.0.1:{}", echo.port());

    // Allocated from the range: the lowest free port; asked for: granted; taken or
    // outside the range: refused, saying why.
    tcp.create(
        &PostParams::default(),
        &tcp_proxy("echo", None, &endpoint, &connector),
    )
    .await
    .unwrap();
    let (_, _, port) = proxy_condition(&tcp, "echo", "Programmed", "True").await;
    assert_eq!(port, Some(i32::from(lo)));
    tcp.create(
        &PostParams::default(),
        &tcp_proxy("asked", Some(hi), &endpoint, &connector),
    )
    .await
    .unwrap();
    let (_, _, port) = proxy_condition(&tcp, "asked", "Programmed", "True").await;
    assert_eq!(port, Some(i32::from(hi)));
    tcp.create(
        &PostParams::default(),
        &tcp_proxy("taken", Some(hi), &endpoint, &connector),
    )
    .await
    .unwrap();
    let (reason, message, _) = proxy_condition(&tcp, "taken", "Accepted", "False").await;
    assert_eq!(reason, "PortInUse", "{message}");
    assert!(message.contains("asked"), "{message}");
    let outside = if lo > 1024 { lo - 1 } else { hi + 1 };
    tcp.create(
        &PostParams::default(),
        &tcp_proxy("outside", Some(outside), &endpoint, &connector),
    )
    .await
    .unwrap();
    let (reason, message, _) = proxy_condition(&tcp, "outside", "Accepted", "False").await;
    assert_eq!(reason, "PortNotAllowed", "{message}");
    assert!(message.contains(&range), "{message}");

    // A port another program holds on the edge's machine: not programmed, saying why,
    // until it is free.
    let holder = std::net::TcpListener::bind((stack.edge.ip(), mid)).unwrap();
    tcp.create(
        &PostParams::default(),
        &tcp_proxy("held", Some(mid), &endpoint, &connector),
    )
    .await
    .unwrap();
    let message = eventually("held: PortUnavailable", WAIT, || async {
        let p = tcp.get("held").await?;
        let c = portway_api::find_condition(&p.status.unwrap_or_default().conditions, "Programmed")
            .cloned()
            .context("no Programmed yet")?;
        ensure!(
            c.status == "False" && c.reason == "PortUnavailable",
            "{c:?}"
        );
        Ok(c.message)
    })
    .await;
    assert!(message.contains(&mid.to_string()), "{message}");
    drop(holder);
    proxy_condition(&tcp, "held", "Programmed", "True").await;
    assert_eq!(
        echo_through(SocketAddr::new(stack.edge.ip(), mid), 1000)
            .await
            .unwrap(),
        pattern_hash(1000)
    );
    tcp.delete("held", &DeleteParams::default()).await.unwrap();

    // Envoy on a loopback address of its own, so both planes can open the same ports.
    let envoy_ip: IpAddr = "127.0.0.2".parse().unwrap();
    let mut front = envoy_front_on(&stack, "envoy-tcp", "127.0.0.2").await;
    let edge_ip = stack.edge.ip();
    const BULK: u64 = 256 << 20;
    for (plane, ip) in [("built-in edge", edge_ip), ("Envoy", envoy_ip)] {
        for port in [lo, hi] {
            let addr = SocketAddr::new(ip, port);
            if ip == envoy_ip {
                envoy_listener(
                    &mut front.envoy,
                    &front.admin_file,
                    &format!("portway_tcp_{port}"),
                )
                .await;
            }
            let hash = eventually(&format!("{plane} serves port {port}"), WAIT, || async {
                echo_through(addr, 1000).await
            })
            .await;
            assert_eq!(hash, pattern_hash(1000));
        }
        // Bytes both ways by hash (up, then back), each side's end passed on.
        let addr = SocketAddr::new(ip, lo);
        let started = Instant::now();
        // A deadline, so a stall fails here rather than hanging the run.
        let echoed = tokio::time::timeout(Duration::from_secs(300), echo_through(addr, BULK))
            .await
            .unwrap_or_else(|_| panic!("{plane}: {} MiB not echoed within 300 s", BULK >> 20));
        assert_eq!(echoed.unwrap(), pattern_hash(BULK));
        eprintln!(
            "{plane}: {} MiB echoed through a public TCP port in {:?}",
            BULK >> 20,
            started.elapsed()
        );
        // 200 connections at once.
        let all = futures::future::join_all((0..200).map(|_| echo_through(addr, 4096))).await;
        let failed: Vec<String> = all
            .iter()
            .filter_map(|r| r.as_ref().err().map(ToString::to_string))
            .collect();
        assert!(
            failed.is_empty(),
            "{plane}: {} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
    }

    // A Redis server on the device, a Redis client at the public port.
    let redis_port = portway_testkit::pebble::free_port().unwrap();
    let _redis = Process::spawn(
        "redis",
        Path::new("redis-server"),
        [
            "--port",
            &redis_port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    )
    .expect("redis-server is not installed (.ci/run installs it)");
    let (redis_device, redis_connector) = stack.device_for(redis_port, "redis.localhost", 5).await;
    // The port `asked` held, for Redis (`taken` goes first: it asked for it too).
    for name in ["taken", "asked"] {
        tcp.delete(name, &DeleteParams::default()).await.unwrap();
    }
    tcp.create(
        &PostParams::default(),
        &tcp_proxy(
            "redis",
            Some(hi),
            &format!("tcp://127.0.0.1:{redis_port}"),
            &redis_connector,
        ),
    )
    .await
    .unwrap();
    proxy_condition(&tcp, "redis", "Programmed", "True").await;
    for (plane, ip) in [("built-in edge", edge_ip), ("Envoy", envoy_ip)] {
        let cli = |args: &[&str]| {
            let mut all = vec![
                "-h".to_owned(),
                ip.to_string(),
                "-p".to_owned(),
                hi.to_string(),
            ];
            all.extend(args.iter().map(|a| (*a).to_owned()));
            async move {
                let out = tokio::process::Command::new("redis-cli")
                    .args(&all)
                    .output()
                    .await?;
                anyhow::Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
            }
        };
        eventually(&format!("{plane}: redis-cli PING"), WAIT, || async {
            let pong = cli(&["PING"]).await?;
            ensure!(pong == "PONG", "{pong:?}");
            Ok(())
        })
        .await;
        assert_eq!(cli(&["SET", "plane", plane]).await.unwrap(), "OK");
        assert_eq!(cli(&["GET", "plane"]).await.unwrap(), plane);
    }

    tls::passthrough_on_both_planes(&stack, &mut front).await;

    // The device goes away: new connections are closed at once, not left hanging.
    drop(device);
    for (plane, ip) in [("built-in edge", edge_ip), ("Envoy", envoy_ip)] {
        closed_quickly(plane, SocketAddr::new(ip, lo)).await;
    }

    // `portway tcp PORT` (like `ngrok tcp`): the one-liner joins, publishes the port the
    // range gives (the one `echo` frees) and prints where to connect.
    tcp.delete("echo", &DeleteParams::default()).await.unwrap();
    let data = stack.data();
    let one_liner = start_one_liner(&stack, &["tcp", &echo.port().to_string()]).await;
    assert_eq!(one_liner.ready_str("url"), format!("tcp://{edge_ip}:{lo}"));
    for (plane, ip) in [("built-in edge", edge_ip), ("Envoy", envoy_ip)] {
        let addr = SocketAddr::new(ip, lo);
        let hash = eventually(&format!("{plane}: portway tcp's port"), WAIT, || async {
            echo_through(addr, 1000).await
        })
        .await;
        assert_eq!(hash, pattern_hash(1000));
    }
    // Asked for a port another proxy holds: one clear line, non-zero exit.
    let out = tokio::process::Command::new(bin())
        .args([
            "tcp",
            &echo.port().to_string(),
            "--remote-port",
            &hi.to_string(),
        ])
        .args(["--data", data.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("public port is refused")
            && err.contains("--remote-port"),
        "{err}"
    );
    drop(one_liner);

    // `--proxy-protocol`: the app reads a PROXY v2 header naming the real client first.
    // Envoy's port is held by another program at first: Envoy's refusal to bind is
    // reported (its NACK, on the Gateways), and the listener is pushed again until Envoy
    // can bind it, once the port is free.
    let envoy_holder = std::net::TcpListener::bind((envoy_ip, mid)).unwrap();
    let (who, _who_task) = proxy_protocol_server().await;
    let one_liner = start_one_liner(
        &stack,
        &[
            "tcp",
            &who.port().to_string(),
            "--remote-port",
            &mid.to_string(),
            "--proxy-protocol",
        ],
    )
    .await;
    let admin = kube_client(Path::new(&stack.up.ready_str("kubeconfig")))
        .await
        .unwrap();
    let nack = eventually("Envoy's bind failure is reported", WAIT, || async {
        let (status, _, message) = xds_accepted(&admin).await?;
        ensure!(
            status == "False" && message.contains(&format!("portway_tcp_{mid}")),
            "{status}: {message}"
        );
        Ok(message)
    })
    .await;
    assert!(nack.contains("cannot bind"), "{nack}");
    drop(envoy_holder);
    for (plane, ip) in [("built-in edge", edge_ip), ("Envoy", envoy_ip)] {
        if ip == envoy_ip {
            envoy_listener(
                &mut front.envoy,
                &front.admin_file,
                &format!("portway_tcp_{mid}"),
            )
            .await;
        }
        let addr = SocketAddr::new(ip, mid);
        let (client, seen) = eventually(&format!("{plane}: PROXY v2 header"), WAIT, || async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            let client = s.local_addr()?;
            let mut seen = String::new();
            s.read_to_string(&mut seen).await?;
            ensure!(!seen.is_empty(), "closed without an answer");
            Ok((client, seen))
        })
        .await;
        assert_eq!(seen, format!("PROXY {client}\n"), "{plane}");
    }
    drop(one_liner);
    drop((front, redis_device));
}

/// An app that takes the PROXY protocol: reads the v2 header each connection starts with
/// and answers `PROXY <source address>` (or what was wrong), then closes.
async fn proxy_protocol_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 16];
                let answer = match s.read_exact(&mut head).await {
                    Err(e) => format!("no header: {e}\n"),
                    Ok(_) if &head[..12] != b"\r\n\r\n\0\r\nQUIT\n" => "not PROXY v2\n".into(),
                    Ok(_) => {
                        let mut body =
                            vec![0u8; usize::from(u16::from_be_bytes([head[14], head[15]]))];
                        let _ = s.read_exact(&mut body).await;
                        match (head[12], head[13], body.len()) {
                            (0x21, 0x11, 12) => {
                                let ip =
                                    std::net::Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                                let port = u16::from_be_bytes([body[8], body[9]]);
                                format!("PROXY {}\n", SocketAddr::from((ip, port)))
                            }
                            (cmd, fam, len) => format!("unexpected {cmd:#x} {fam:#x} {len}\n"),
                        }
                    }
                };
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// A one-liner (`portway tcp …`, `portway tls …`) joined to `stack`, with a short lease.
async fn start_one_liner(stack: &Stack, args: &[&str]) -> Process {
    let data = stack.data();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--data", data.to_str().unwrap(), "--lease-seconds", "5"]);
    Process::start(args[0], bin(), all).await.unwrap()
}

/// New connections to `addr` end at once (its device is offline), within a deadline.
async fn closed_quickly(plane: &str, addr: SocketAddr) {
    eventually(
        &format!("{plane} closes connections to an offline device"),
        WAIT,
        || async {
            let started = Instant::now();
            let r = echo_through(addr, 10).await;
            ensure!(r.is_err(), "still served");
            ensure!(
                started.elapsed() < Duration::from_secs(5),
                "took {:?}",
                started.elapsed()
            );
            Ok(())
        },
    )
    .await;
}
