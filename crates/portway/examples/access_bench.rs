//! What each AccessPolicy rule costs on the built-in edge: requests/s through a tunnel
//! with the rule, beside the same without any policy, in one run, as ratios. The sign-in
//! rules (basic auth, a bearer JWT, an OIDC session cookie) include signing the
//! `portway-identity` header the app is sent.
//!
//! Needs nginx, wrk and curl (`apt-get install -y nginx wrk curl`) and release binaries:
//!
//! ```sh
//! cargo build --release -p portway --bins --examples
//! target/release/examples/access_bench
//! ```
//!
//! Path: wrk (64 connections, 2 threads, 5 s) → `portway up` edge → iroh → `portway
//! http` agent → nginx serving a 13-byte file. Two hostnames reach the same device and
//! file: `bench.localhost` carries the policy, `plain.localhost` none. Each policy is
//! applied, then waited for by a request it must refuse (from another loopback address,
//! with a wrong method, or without credentials); then the two are measured in turn, five
//! times, and the median of the five ratios is reported (this machine's req/s drifts by
//! ±30% over a minute, so only side-by-side pairs compare).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, PostParams};
use portway_api::{AccessPolicy, HttpProxy};
use serde_json::json;

/// The response head of one curl request to the tunnel, from `source`, with `extra`
/// arguments, lower-cased.
fn head(edge: SocketAddr, source: &str, extra: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-D", "-", "--interface", source])
        .args(["-H", "host: bench.localhost"])
        .args(extra)
        .arg(format!("http://{edge}/small.txt"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// req/s with `Host: host` and `headers`, 64 connections for 5 s.
fn rps(edge: SocketAddr, host: &str, headers: &[&str]) -> f64 {
    portway_testkit::bench::wrk_rps(edge, host, "/small.txt", headers)
}

/// Five pairs of runs, `plain` then `bench` (with `headers`): the medians of each and of
/// the ratios.
fn pairs(edge: SocketAddr, headers: &[&str]) -> (f64, f64, f64) {
    let runs: Vec<(f64, f64)> = (0..5)
        .map(|_| {
            let without = rps(edge, "plain.localhost", headers);
            let with = rps(edge, "bench.localhost", headers);
            eprintln!("  {without:.0} → {with:.0}");
            (without, with)
        })
        .collect();
    portway_testkit::bench::pair_medians(&runs)
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bin = portway_testkit::bench::release_bin();
    let tmp = tempfile::tempdir().unwrap();
    let stack = portway_testkit::bench::TunnelStack::start(&bin, tmp.path()).await;
    let edge = stack.edge;
    let kubeconfig = stack.info["kubeconfig"].as_str().unwrap();
    let client = portway_testkit::kube_client(Path::new(kubeconfig))
        .await
        .unwrap();
    let proxies: Api<HttpProxy> = Api::namespaced(client.clone(), "default");
    let bench = proxies
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| p.spec.hostnames.iter().any(|h| h == "bench.localhost"))
        .unwrap();
    let proxy = bench.metadata.name.clone().unwrap();
    let plain: HttpProxy = serde_json::from_value(json!({
        "metadata": {"name": "plain"},
        "spec": {"hostnames": ["plain.localhost"], "rules": bench.spec.rules},
    }))
    .unwrap();
    proxies
        .create(&PostParams::default(), &plain)
        .await
        .unwrap();
    wait_until("plain.localhost is served", || {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-H", "host: plain.localhost"])
            .arg(format!("http://{edge}/small.txt"))
            .output()
            .unwrap();
        out.stdout == b"200"
    });
    let policies: Api<AccessPolicy> = Api::namespaced(client.clone(), "default");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, "default");
    let hash = bcrypt::hash("s3cret", bcrypt::DEFAULT_COST).unwrap();
    let users: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "users"}, "type": "portway.dev/htpasswd",
        "stringData": {"htpasswd": format!("ann:{hash}\n")},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &users)
        .await
        .unwrap();
    let login = vec!["Authorization: Basic YW5uOnMzY3JldA==".to_owned()];
    // A bearer JWT: the issuer's key in a JWKS Secret, one token for the whole run.
    let issuer = {
        use portway_gateway::jwt::Signer;
        Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap()
    };
    let keys: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "keys"}, "type": "portway.dev/jwks",
        "stringData": {"jwks": issuer.jwks()},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &keys).await.unwrap();
    let claims = json!({"iss": "https://id.example", "aud": "bench", "sub": "ann",
        "exp": portway_gateway::jwt::now() + 3600});
    let bearer = vec![format!("Authorization: Bearer {}", issuer.sign(&claims))];
    // An OIDC session: sealed here with the data planes' key (the bench is an admin, who
    // can read it), as the edge seals one after a sign-in; no provider is asked.
    let client_secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "oidc-client"}, "type": "portway.dev/oidc-client",
        "stringData": {"clientSecret": "s3cret"},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &client_secret)
        .await
        .unwrap();
    let system: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(secrets.clone().into_client(), "portway-system");
    let key = system.get("portway-identity").await.unwrap();
    let edge_key =
        portway_gateway::jwt::Signer::from_pkcs8(&key.data.as_ref().unwrap()["ed25519.pk8"].0)
            .unwrap();
    let session = |p: &AccessPolicy| {
        let policy = format!(
            "default/{}/{}",
            p.metadata.name.as_deref().unwrap(),
            p.metadata.uid.as_deref().unwrap()
        );
        let name = portway_gateway::oidc::cookie_name(&policy);
        let value = json!({"sub": "ann", "email": "ann@example.com", "aud": "bench.localhost",
            "pol": policy, "exp": portway_gateway::jwt::now() + 3600});
        vec![format!(
            "Cookie: {name}={}",
            edge_key.seal(&name, value.to_string().as_bytes())
        )]
    };

    // Warm the path.
    let _ = rps(edge, "bench.localhost", &[]);
    let _ = rps(edge, "plain.localhost", &[]);
    let mut rows = vec![("none (the two hostnames alike)", pairs(edge, &[]))];
    let ip = json!({"allow": ["127.0.0.0/8"], "deny": ["127.0.0.9"]});
    // Each case: the rules, a probe the policy refuses (source address, curl arguments,
    // and what in the answer shows the refusal), and wrk's headers.
    let denied = ("127.0.0.9", &[][..], "http/1.1 403");
    let method = ("127.0.0.1", &["-X", "DELETE"][..], "allow: get, head");
    let anonymous = ("127.0.0.1", &[][..], "http/1.1 401");
    // No session: the edge would send the browser to the provider, which here is nowhere
    // (503), and no request of the run needs it.
    let redirected = ("127.0.0.1", &[][..], "http/1.1 503");
    type Probe<'a> = (&'a str, &'a [&'a str], &'a str);
    type Headers<'a> = Box<dyn Fn(&AccessPolicy) -> Vec<String> + 'a>;
    let none = || -> Headers<'_> { Box::new(|_| Vec::new()) };
    let fixed = |h: &Vec<String>| -> Headers<'_> {
        let h = h.clone();
        Box::new(move |_| h.clone())
    };
    let cases: Vec<(&str, serde_json::Value, Probe<'_>, Headers<'_>)> = vec![
        ("ip (allow + deny)", json!({"ip": ip}), denied, none()),
        (
            "ip + rateLimit (per client and per tunnel, never reached)",
            json!({"ip": ip, "rateLimit": {"perClient": {"requests": 1_000_000, "per": "Second"},
                                           "perTunnel": {"requests": 1_000_000, "per": "Second"}}}),
            denied,
            none(),
        ),
        (
            "methods",
            json!({"methods": ["GET", "HEAD"]}),
            method,
            none(),
        ),
        (
            "methods + maxRequestBytes",
            json!({"methods": ["GET", "HEAD"], "maxRequestBytes": 1024}),
            method,
            none(),
        ),
        (
            "basicAuth (bcrypt cost 12, verified once)",
            json!({"basicAuth": {"secretRef": {"name": "users"}}}),
            anonymous,
            fixed(&login),
        ),
        (
            "jwt (EdDSA bearer token, claim to a header)",
            json!({"jwt": {"issuer": "https://id.example", "audiences": ["bench"],
                "jwks": {"secretRef": {"name": "keys"}},
                "claimToHeaders": [{"claim": "sub", "header": "x-user"}]}}),
            anonymous,
            fixed(&bearer),
        ),
        (
            "oidc (a signed-in session cookie)",
            json!({"oidc": {"issuer": "http://127.0.0.1:9", "clientID": "bench",
                "clientSecretRef": {"name": "oidc-client"}}}),
            redirected,
            Box::new(session),
        ),
        (
            "all of them",
            json!({"ip": ip, "rateLimit": {"perClient": {"requests": 1_000_000, "per": "Second"}},
                   "basicAuth": {"secretRef": {"name": "users"}}, "methods": ["GET", "HEAD"],
                   "maxRequestBytes": 1024}),
            denied,
            fixed(&login),
        ),
    ];
    for (name, rules, probe, headers) in cases {
        let mut spec = rules;
        spec["targetRefs"] =
            json!([{"group": "networking.datumapis.com", "kind": "HTTPProxy", "name": proxy}]);
        let policy: AccessPolicy =
            serde_json::from_value(json!({"metadata": {"name": "bench"}, "spec": spec})).unwrap();
        let policy = policies
            .create(&PostParams::default(), &policy)
            .await
            .unwrap();
        let (source, extra, refused) = probe;
        wait_until(name, || head(edge, source, extra).contains(refused));
        eprintln!("{name}");
        let headers = headers(&policy);
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        rows.push((name, pairs(edge, &headers)));
        policies
            .delete("bench", &DeleteParams::default())
            .await
            .unwrap();
        wait_until("the policy is lifted", || {
            !head(edge, source, extra).contains(refused)
        });
    }
    println!(
        "| policy on `bench` | req/s without (`plain`) | req/s with | ratio (median of 5 pairs) |"
    );
    println!("|---|---|---|---|");
    for (name, (without, with, ratio)) in rows {
        println!("| {name} | {without:.0} | {with:.0} | {ratio:.2} × |");
    }
}
