//! AccessPolicy, rule by rule, through either data plane: each rule allows what it should
//! and refuses what it should, a client cannot talk its way past the address rule, a
//! second policy on the same proxy is refused as `Conflicted` until the first goes, and a
//! policy that does not validate never reaches the store. Part of the e2e binary.

use super::*;

use kube::api::DeleteParams;
use portway_api::AccessPolicy;

/// Where a data plane counts denials: the built-in edge's `/metrics`, or Envoy's admin
/// `/stats` (its RBAC filter's counter).
pub(crate) enum Denials {
    Edge(String),
    Envoy(PathBuf),
}

impl Denials {
    /// The address rule's denials so far.
    async fn ip(&self) -> u64 {
        let (url, needle) = match self {
            Self::Edge(addr) => (
                format!("http://{addr}/metrics"),
                "portway_gateway_denials_total{host=\"guarded.localhost\",rule=\"ip\",reason=\"denied\"}",
            ),
            Self::Envoy(admin_file) => {
                let admin = std::fs::read_to_string(admin_file).unwrap();
                (
                    format!("http://{}/stats?filter=rbac", admin.trim()),
                    "http.portway.rbac.denied:",
                )
            }
        };
        let out = tokio::process::Command::new("curl")
            .args(["-sSf", &url])
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let n = text
            .lines()
            .find_map(|l| l.strip_prefix(needle))
            .map_or(0, |n| n.trim().parse().unwrap_or(0));
        if n == 0 {
            eprintln!("no {needle} at {url} yet:\n{text}");
        }
        n
    }
}

/// `curl` from `source` (a loopback address of its own) to `front`: status, headers and
/// body as one text.
async fn curl_from(source: &str, front: SocketAddr, path: &str, extra: &[&str]) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-i", "--max-time", "20", "--interface", source])
        .args(["-H", "host: guarded.localhost"])
        .args(extra)
        .arg(format!("http://{front}{path}"))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

async fn accepted(policies: &Api<AccessPolicy>, name: &str) -> anyhow::Result<(String, String)> {
    condition(policies, name, "Accepted").await
}

/// A condition of the policy's first target: status and reason.
pub(crate) async fn condition(
    policies: &Api<AccessPolicy>,
    name: &str,
    type_: &str,
) -> anyhow::Result<(String, String)> {
    let p = policies.get(name).await?;
    let c = p
        .status
        .iter()
        .flat_map(|s| &s.ancestors)
        .flat_map(|a| &a.conditions)
        .find(|c| c.type_ == type_)
        .with_context(|| format!("no {type_} yet"))?;
    Ok((c.status.clone(), c.reason.clone()))
}

/// An AccessPolicy named `name` guarding the proxy `guarded` with `rules`.
fn guarding(name: &str, rules: serde_json::Value) -> AccessPolicy {
    let mut spec = rules;
    spec["targetRefs"] =
        json!([{"group": "networking.datumapis.com", "kind": "HTTPProxy", "name": "guarded"}]);
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

/// Waits until the policy `name` has resolved its Secret and a request without
/// credentials gets 401; that answer.
async fn challenged(policies: &Api<AccessPolicy>, name: &str, front: SocketAddr) -> String {
    eventually(
        &format!("policy {name} resolves its Secret and asks to sign in"),
        WAIT,
        || async {
            let (status, reason) = condition(policies, name, "ResolvedRefs").await?;
            ensure!(status == "True", "{status} {reason}");
            let (status, text) = curl_from("127.0.0.1", front, "/echo", &[]).await;
            ensure!(status == 401, "{text}");
            Ok(text)
        },
    )
    .await
}

/// `kubectl create secret generic NAME --type=TYPE --from-literal=KEY=VALUE` (`literal` is
/// the whole `--from-literal=...` argument) as the admin: success, and what it printed.
async fn create_secret(stack: &Stack, name: &str, type_: &str, literal: &str) -> (bool, String) {
    let type_ = format!("--type={type_}");
    kubectl(
        stack,
        &["create", "secret", "generic", name, &type_, literal],
    )
    .await
}

/// `kubectl` as the admin: success, and what it printed (stdout then stderr).
async fn kubectl(stack: &Stack, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("kubectl")
        .args(["--kubeconfig", &stack.up.ready_str("kubeconfig")])
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub(crate) async fn battery(stack: &Stack, front: SocketAddr, denials: Denials) {
    let (proxies, connector, endpoint) = app_backend(stack).await;
    let policies: Api<AccessPolicy> = Api::namespaced(proxies.clone().into_client(), "default");
    let proxy = serde_json::from_value(json!({
        "metadata": {"name": "guarded"},
        "spec": {"hostnames": ["guarded.localhost"], "rules": [
            {"backends": [{"endpoint": endpoint, "connector": connector}]}]},
    }))
    .unwrap();
    proxies
        .create(&PostParams::default(), &proxy)
        .await
        .unwrap();
    eventually("the guarded proxy is served", WAIT, || async {
        let (status, text) = curl_from("127.0.0.1", front, "/echo", &[]).await;
        ensure!(status == 200, "{text}");
        Ok(())
    })
    .await;
    // Only a policy's sign-in tells the app who called: a client's own claim never passes.
    let (status, text) = curl_from(
        "127.0.0.1",
        front,
        "/headers",
        &["-H", "portway-identity: forged"],
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(
        !text.contains("forged"),
        "a client's identity header passed: {text}"
    );

    // A policy that does not validate is refused at admission, each field named.
    let bad: AccessPolicy = guarding(
        "bad",
        json!({"ip": {"allow": ["10.0.0.0/33"]}, "methods": ["get"], "maxRequestBytes": 0}),
    );
    let err = policies
        .create(&PostParams::default(), &bad)
        .await
        .unwrap_err();
    let err = err.to_string();
    for field in [
        "spec.ip.allow[0]",
        "spec.methods[0]",
        "spec.maxRequestBytes",
    ] {
        assert!(err.contains(field), "{err}");
    }

    let guard: AccessPolicy = guarding(
        "guard",
        json!({"ip": {"allow": ["127.0.0.0/8", "::1"], "deny": ["127.0.0.2"]},
                 "methods": ["GET", "POST"], "maxRequestBytes": 16}),
    );
    policies
        .create(&PostParams::default(), &guard)
        .await
        .unwrap();
    eventually("the policy is accepted", WAIT, || async {
        let (status, reason) = accepted(&policies, "guard").await?;
        ensure!(status == "True", "{reason}");
        Ok(())
    })
    .await;

    // The address rule: a denied address gets 403 and the app never sees it, whatever
    // X-Forwarded-For it claims; an allowed one passes.
    let before = denials.ip().await;
    eventually("the denied address is refused", WAIT, || async {
        let (status, text) = curl_from("127.0.0.2", front, "/echo", &[]).await;
        ensure!(status == 403, "{text}");
        Ok(())
    })
    .await;
    let (status, text) = curl_from(
        "127.0.0.2",
        front,
        "/echo",
        &[
            "-H",
            "x-forwarded-for: 127.0.0.1",
            "-H",
            "x-real-ip: 127.0.0.1",
        ],
    )
    .await;
    assert_eq!(status, 403, "a claimed address must not count: {text}");
    assert!(!text.contains("GET /echo"), "the app was reached: {text}");
    let (status, text) = curl_from("127.0.0.1", front, "/echo", &[]).await;
    assert_eq!(status, 200, "{text}");
    eventually("the denials are counted", WAIT, || async {
        let after = denials.ip().await;
        ensure!(after >= before + 2, "{before} → {after}");
        Ok(())
    })
    .await;

    // Methods: another gets 405 naming the allowed ones, before any of it reaches the app.
    let (status, text) = curl_from("127.0.0.1", front, "/echo", &["-X", "DELETE"]).await;
    assert_eq!(status, 405, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("allow: get, post"),
        "{text}"
    );
    assert!(
        !text.contains("DELETE /echo"),
        "the app was reached: {text}"
    );

    // Size: 16 bytes pass; 17 are refused with 413, declared or streamed in chunks.
    let (status, text) =
        curl_from("127.0.0.1", front, "/echo", &["--data", "0123456789abcdef"]).await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = curl_from(
        "127.0.0.1",
        front,
        "/echo",
        &["--data", "0123456789abcdefg"],
    )
    .await;
    assert_eq!(status, 413, "{text}");
    let chunked = [
        "-H",
        "transfer-encoding: chunked",
        "--data-binary",
        "0123456789abcdefg",
    ];
    let (status, text) = curl_from("127.0.0.1", front, "/echo", &chunked).await;
    assert_eq!(status, 413, "{text}");
    assert!(!text.contains("POST /echo"), "the app was reached: {text}");
    // An upgrade has no request body to hold: a WebSocket works under the size limit,
    // its messages of any size.
    let stream = connect(front, "guarded.localhost", None).await;
    let handshake = tokio_tungstenite::client_async("ws://guarded.localhost/ws", stream);
    let (mut ws, resp) = tokio::time::timeout(Duration::from_secs(10), handshake)
        .await
        .expect("the WebSocket handshake within 10 s")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let message = tokio_tungstenite::tungstenite::Message::binary(vec![7u8; 4096]);
    ws.send(message.clone()).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    assert_eq!(echo.unwrap().unwrap().unwrap(), message);
    ws.close(None).await.unwrap();

    // A second policy on the same proxy is refused as Conflicted and changes nothing...
    let late: AccessPolicy = guarding("late", json!({"methods": ["GET"]}));
    policies
        .create(&PostParams::default(), &late)
        .await
        .unwrap();
    eventually("the second policy is refused", WAIT, || async {
        let (status, reason) = accepted(&policies, "late").await?;
        ensure!(
            status == "False" && reason == "Conflicted",
            "{status} {reason}"
        );
        Ok(())
    })
    .await;
    let (status, text) = curl_from("127.0.0.1", front, "/echo", &["--data", "x"]).await;
    assert_eq!(status, 200, "{text}");
    // ... until the first goes: then it guards the proxy (only GET now; any address).
    policies
        .delete("guard", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the second policy takes over", WAIT, || async {
        let (status, reason) = accepted(&policies, "late").await?;
        ensure!(status == "True", "{status} {reason}");
        let (status, text) = curl_from("127.0.0.1", front, "/echo", &["--data", "x"]).await;
        ensure!(status == 405, "{text}");
        let (status, text) = curl_from("127.0.0.2", front, "/echo", &[]).await;
        ensure!(status == 200, "{text}");
        Ok(())
    })
    .await;
    // And with no policy left, the proxy is open again.
    policies
        .delete("late", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the proxy is open again", WAIT, || async {
        let (status, text) = curl_from("127.0.0.2", front, "/echo", &["--data", "x"]).await;
        ensure!(status == 200, "{text}");
        Ok(())
    })
    .await;

    rate_limit(front, &policies).await;
    basic_auth(stack, front, &policies).await;
    jwt(stack, front, &policies).await;
    oidc(stack, front, &policies).await;
    one_liner(stack, front, &policies).await;
}

/// `portway http PORT --basic-auth ... --allow-ip ... --rate-limit ...`: the device writes
/// the policy and its users (hashed on the device) for its own proxy, and the URL is
/// never served unguarded, not even while the policy is being written.
async fn one_liner(stack: &Stack, front: SocketAddr, policies: &Api<AccessPolicy>) {
    // A bad flag is refused before anything is written, naming it.
    let out = tokio::process::Command::new(bin())
        .args(["http", "1", "--rate-limit", "often"])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--rate-limit"),
        "{err}"
    );
    let http = stack
        .http_to(
            stack.origin.addr.port(),
            "flags.localhost",
            30,
            &[
                "--basic-auth",
                "ann:s3cret",
                "--allow-ip",
                "127.0.0.1",
                "--rate-limit",
                "4/m",
            ],
        )
        .await
        .unwrap();
    let get = |source: &'static str, creds: Option<&'static str>| async move {
        let mut args = vec!["-sS", "-i", "--max-time", "20", "--interface", source];
        args.extend(["-H", "host: flags.localhost"]);
        if let Some(c) = creds {
            args.extend(["-u", c]);
        }
        let url = format!("http://{front}/headers");
        let out = tokio::process::Command::new("curl")
            .args(&args)
            .arg(&url)
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, text)
    };
    // Ready: `portway http` waits until the proxy is programmed, and its policy is named
    // by then: a request without credentials never reaches the app.
    let (status, text) = get("127.0.0.1", None).await;
    assert!(matches!(status, 401 | 500), "served unguarded: {text}");
    eventually("the one-liner's policy is in force", WAIT, || async {
        let (status, text) = get("127.0.0.1", None).await;
        ensure!(status == 401, "{text}");
        Ok(())
    })
    .await;
    let (status, text) = get("127.0.0.1", Some("ann:s3cret")).await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = get("127.0.0.2", Some("ann:s3cret")).await;
    assert_eq!(status, 403, "--allow-ip: {text}");
    // 4 a minute from this client: 2 were taken (the 401 and the 200), then 2 more pass.
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(get("127.0.0.1", Some("ann:s3cret")).await.0);
    }
    assert!(seen.contains(&429), "--rate-limit 4/m: {seen:?}");
    // What the device wrote: its policy, labelled with its connector; its users as a
    // bcrypt hash, never the password.
    let proxies: Api<portway_api::HttpProxy> =
        Api::namespaced(policies.clone().into_client(), "default");
    let proxy = proxies
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| p.spec.hostnames.iter().any(|h| h == "flags.localhost"))
        .expect("the one-liner's proxy");
    let written = policies
        .get(&format!(
            "{}-access",
            proxy.metadata.name.as_deref().unwrap()
        ))
        .await
        .unwrap();
    let connector = proxy.spec.rules[0].backends[0]
        .connector
        .as_ref()
        .unwrap()
        .name
        .clone();
    assert_eq!(
        written
            .metadata
            .labels
            .as_ref()
            .unwrap()
            .get("portway.dev/connector"),
        connector.as_ref()
    );
    let users = &written.spec.basic_auth.as_ref().unwrap().secret_ref.name;
    let (ok, yaml) = kubectl(stack, &["get", "secret", users, "-o", "yaml"]).await;
    assert!(ok, "{yaml}");
    assert!(!yaml.contains("s3cret"), "{yaml}");
    // Ctrl-C removes the tunnel, its policy with it.
    let mut http = http;
    http.terminate(Duration::from_secs(20)).await.unwrap();
    let name = written.metadata.name.clone().unwrap();
    eventually("the one-liner's policy goes with it", WAIT, || async {
        ensure!(
            policies.get_opt(&name).await?.is_none(),
            "{name} is still there"
        );
        Ok(())
    })
    .await;
}

/// The OpenID Provider: npm's `oidc-provider` (certified), installed by `.ci/run` with
/// `npm ci --prefix crates/portway/tests/oidc`, sending browsers back to `redirect`.
async fn provider(redirect: &str) -> Process {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
    assert!(
        dir.join("node_modules/oidc-provider").exists(),
        "the OIDC test needs npm's oidc-provider: npm ci --prefix {}",
        dir.display()
    );
    let script = dir.join("provider.mjs").display().to_string();
    Process::start(
        "oidc-provider",
        Path::new("node"),
        [script.as_str(), redirect, "s3cret"],
    )
    .await
    .unwrap()
}

/// A browser for the OIDC step: curl with a cookie jar of its own, `*.localhost` sent to
/// `front`.
struct Browser {
    jar: tempfile::TempDir,
    front: SocketAddr,
}

impl Browser {
    fn new(front: SocketAddr) -> Self {
        Self {
            jar: tempfile::tempdir().unwrap(),
            front,
        }
    }

    /// `curl -i` of `url` with the jar (no redirects followed unless `extra` says):
    /// status, headers and body.
    async fn get(&self, url: &str, extra: &[&str]) -> (u16, String) {
        let jar = self.jar.path().join("jar").display().to_string();
        let resolve = format!(
            "guarded.localhost:{}:{}",
            self.front.port(),
            self.front.ip()
        );
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "-i", "--max-time", "20", "-c", &jar, "-b", &jar])
            .args(["--resolve", &resolve])
            .args(extra)
            .arg(url)
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // With -L, the last response's status.
        let status = text
            .lines()
            .rfind(|l| l.starts_with("HTTP/"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, text)
    }

    /// A cookie's value in the jar.
    fn cookie(&self, prefix: &str) -> Option<String> {
        let jar = std::fs::read_to_string(self.jar.path().join("jar")).ok()?;
        jar.lines()
            .map(|l| l.split('\t').collect::<Vec<_>>())
            .find(|f| f.len() == 7 && f[5].starts_with(prefix) && !f[5].ends_with("-login"))
            .map(|f| format!("{}={}", f[5], f[6]))
    }

    /// Signs `login` in at the provider, from the page the edge redirected to, through
    /// its login and consent pages: where the provider then sends the browser back.
    async fn sign_in_at_provider(&self, auth_url: &str, login: &str) -> String {
        let form = |page: &str| -> String {
            page.split("action=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or_else(|| panic!("no form on the provider's page: {page}"))
                .to_owned()
        };
        let (_, page) = self.get(auth_url, &["-L"]).await;
        let login_form = form(&page);
        let body = format!("prompt=login&login={login}&password=any");
        let (_, page) = self.get(&login_form, &["-L", "--data", &body]).await;
        let consent = form(&page);
        let (_, text) = self.get(&consent, &["--data", "prompt=consent"]).await;
        let (_, text) = self.get(&location(&text), &[]).await;
        location(&text)
    }
}

/// The `Location` of a response.
fn location(text: &str) -> String {
    text.lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no Location: {text}"))
}

/// OIDC login against a real provider: a page redirects to it; the provider's login and
/// consent are driven through; the callback sets a session and returns to the page,
/// where the app gets a signed identity and its own cookies but never the session;
/// someone outside the allowed group is refused; a callback finished in another browser
/// (login CSRF), a forged session cookie and a script without a session are refused;
/// logout ends the session.
async fn oidc(stack: &Stack, front: SocketAddr, policies: &Api<AccessPolicy>) {
    let site = format!("http://guarded.localhost:{}", front.port());
    let provider = provider(&format!("{site}/.portway/oidc/callback")).await;
    let issuer = provider.ready_str("issuer");
    let (ok, out) = create_secret(
        stack,
        "oidc-client",
        "portway.dev/oidc-client",
        "--from-literal=clientSecret=s3cret",
    )
    .await;
    assert!(ok, "{out}");
    let browser = guarding(
        "browser",
        json!({"oidc": {"issuer": issuer, "clientID": "portway",
            "clientSecretRef": {"name": "oidc-client"},
            "scopes": ["openid", "email", "groups"], "allowedGroups": ["dev"]}}),
    );
    policies
        .create(&PostParams::default(), &browser)
        .await
        .unwrap();
    let ann = Browser::new(front);
    let text = eventually("a page redirects to the provider", WAIT, || async {
        let (status, reason) = condition(policies, "browser", "ResolvedRefs").await?;
        ensure!(status == "True", "{status} {reason}");
        let (status, text) = ann.get(&format!("{site}/headers?from=start"), &[]).await;
        ensure!(status == 302, "{text}");
        Ok(text)
    })
    .await;
    let auth_url = location(&text);
    assert!(
        auth_url.starts_with(&format!("{issuer}/auth?")),
        "{auth_url}"
    );
    for param in [
        "code_challenge_method=S256",
        "code_challenge=",
        "nonce=",
        "state=",
    ] {
        assert!(auth_url.contains(param), "{param}: {auth_url}");
    }
    let callback = ann.sign_in_at_provider(&auth_url, "ann").await;
    assert!(
        callback.starts_with(&format!("{site}/.portway/oidc/callback?code=")),
        "{callback}"
    );

    // Login CSRF: the same callback in a browser that did not start the sign-in.
    let (status, text) = Browser::new(front).get(&callback, &[]).await;
    assert_eq!(status, 400, "{text}");

    let (status, text) = ann.get(&callback, &[]).await;
    assert_eq!(status, 302, "{text}");
    assert_eq!(location(&text), "/headers?from=start");
    let session = ann.cookie("portway-").expect("a session cookie");
    let with_theme = format!("cookie: theme=dark; {session}");
    let (status, text) = Browser::new(front)
        .get(&format!("{site}/headers?from=start"), &["-H", &with_theme])
        .await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("cookie: theme=dark\r\n") || text.contains("cookie: theme=dark\n"),
        "the app gets its own cookies: {text}"
    );
    let name = session.split('=').next().unwrap();
    assert!(
        !text.contains(name),
        "the app saw the session {name}: {text}"
    );
    let id = identity(front, &text).await;
    assert_eq!(
        (
            id["sub"].as_str(),
            id["auth"].as_str(),
            id["email"].as_str()
        ),
        (Some("ann"), Some("oidc"), Some("ann@example.com")),
        "{id:?}"
    );
    assert_eq!(id["groups"], json!(["dev"]));

    // A changed session cookie is no session; a script without one gets 401.
    let forged = format!("cookie: {}x", session);
    let (status, text) = Browser::new(front)
        .get(&format!("{site}/echo"), &["-H", &forged])
        .await;
    assert_eq!(status, 302, "{text}");
    let (status, text) = Browser::new(front)
        .get(&format!("{site}/echo"), &["--data", "x"])
        .await;
    assert_eq!(status, 401, "{text}");
    assert!(!text.contains("POST /echo"), "the app was reached: {text}");

    // Bob signs in at the provider but is not in the allowed group.
    let bob = Browser::new(front);
    let (_, text) = bob.get(&format!("{site}/"), &[]).await;
    let callback = bob.sign_in_at_provider(&location(&text), "bob").await;
    let (status, text) = bob.get(&callback, &[]).await;
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("bob@example.com may not sign in here"),
        "{text}"
    );
    assert!(bob.cookie("portway-").is_none(), "bob got a session");

    // Logout ends ann's session.
    let (status, text) = ann.get(&format!("{site}/.portway/oidc/logout"), &[]).await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = ann.get(&format!("{site}/headers"), &[]).await;
    assert_eq!(status, 302, "{text}");

    policies
        .delete("browser", &DeleteParams::default())
        .await
        .unwrap();
    let (ok, out) = kubectl(stack, &["delete", "secret", "oidc-client"]).await;
    assert!(ok, "{out}");
    drop(provider);
}

/// The identity header the app saw in `/headers` output, verified against the JWKS the
/// hostname publishes, for this hostname, and not expired: its claims.
async fn identity(front: SocketAddr, seen: &str) -> serde_json::Map<String, serde_json::Value> {
    let token = seen
        .lines()
        .find_map(|l| l.strip_prefix("portway-identity: "))
        .unwrap_or_else(|| panic!("the app was sent no identity: {seen}"));
    assert!(
        !token.contains("forged"),
        "a client's identity header passed: {seen}"
    );
    let (status, jwks) = curl_from("127.0.0.1", front, "/.well-known/portway/jwks.json", &[]).await;
    assert_eq!(status, 200, "{jwks}");
    let body = jwks.split("\r\n\r\n").nth(1).unwrap_or_default();
    let keys = portway_gateway::jwt::Keys::parse(body).unwrap();
    let t = portway_gateway::jwt::Token::parse(token).unwrap();
    t.verify(&keys).unwrap();
    t.check_claims(
        "portway",
        &["guarded.localhost".into()],
        portway_gateway::jwt::now(),
    )
    .unwrap();
    t.claims
}

/// A JWT bearer token of `claims` signed by `key`.
fn token(key: &portway_gateway::jwt::Signer, claims: serde_json::Value) -> String {
    key.sign(&claims)
}

/// Bearer JWTs: keys from a Secret (a JWKS holding a private key is refused), then from
/// an issuer's URL; a missing, expired, foreign or wrongly-scoped token is refused and
/// never reaches the app; a good one passes with its claims as headers, and a client's
/// own copy of a claim header never passes.
async fn jwt(stack: &Stack, front: SocketAddr, policies: &Api<AccessPolicy>) {
    use portway_gateway::jwt::{Signer, now};
    let issuer = Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap();
    let stranger = Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap();
    let mut leaked: serde_json::Value = serde_json::from_str(issuer.jwks()).unwrap();
    leaked["keys"][0]["d"] = json!("AAAA");
    let (ok, out) = create_secret(
        stack,
        "issuer-keys",
        "portway.dev/jwks",
        &format!("--from-literal=jwks={leaked}"),
    )
    .await;
    assert!(
        !ok && out.contains("data[jwks]") && out.contains("private key"),
        "{out}"
    );
    let (ok, out) = create_secret(
        stack,
        "issuer-keys",
        "portway.dev/jwks",
        &format!("--from-literal=jwks={}", issuer.jwks()),
    )
    .await;
    assert!(ok, "{out}");
    let rules = |jwks: serde_json::Value| {
        json!({"jwt": {"issuer": "https://id.example", "audiences": ["guarded"], "jwks": jwks,
            "requiredClaims": [{"name": "groups", "values": ["dev"]}],
            "claimToHeaders": [{"claim": "email", "header": "x-user-email"}]}})
    };
    let bearer = guarding(
        "bearer",
        rules(json!({"secretRef": {"name": "issuer-keys"}})),
    );
    policies
        .create(&PostParams::default(), &bearer)
        .await
        .unwrap();
    let good = json!({"iss": "https://id.example", "aud": "guarded", "exp": now() + 300,
        "sub": "ann", "email": "ann@example.com", "groups": ["ops", "dev"]});
    let auth = |t: String| format!("authorization: Bearer {t}");
    let text = challenged(policies, "bearer", front).await;
    assert!(
        text.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{text}"
    );
    let mut expired = good.clone();
    expired["exp"] = json!(now() - 600);
    let mut other_issuer = good.clone();
    other_issuer["iss"] = json!("https://evil.example");
    let mut other_audience = good.clone();
    other_audience["aud"] = json!("another-app");
    for (why, t, want) in [
        ("expired", token(&issuer, expired), 401),
        ("another issuer", token(&issuer, other_issuer), 401),
        ("another audience", token(&issuer, other_audience), 401),
        ("a stranger's key", token(&stranger, good.clone()), 401),
        ("not a JWT", "x.y.z".to_owned(), 401),
    ] {
        let (status, text) = curl_from("127.0.0.1", front, "/echo", &["-H", &auth(t)]).await;
        assert_eq!(status, want, "{why}: {text}");
        assert!(
            !text.contains("GET /echo"),
            "{why}: the app was reached: {text}"
        );
    }
    let mut outsider = good.clone();
    outsider["groups"] = json!(["ops"]);
    let (status, text) = curl_from(
        "127.0.0.1",
        front,
        "/echo",
        &["-H", &auth(token(&issuer, outsider))],
    )
    .await;
    assert_eq!(status, 403, "a token without the required group: {text}");
    let (status, text) = curl_from(
        "127.0.0.1",
        front,
        "/headers",
        &[
            "-H",
            &auth(token(&issuer, good.clone())),
            "-H",
            "x-user-email: forged@example.com",
        ],
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("x-user-email: ann@example.com"), "{text}");
    assert!(!text.contains("forged@example.com"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("authorization:"),
        "{text}"
    );
    let id = identity(front, &text).await;
    assert_eq!(
        (id["sub"].as_str(), id["auth"].as_str()),
        (Some("ann"), Some("jwt")),
        "{id:?}"
    );
    // A token without the claim: the client's own x-user-email is removed, not passed.
    let mut quiet = good.clone();
    quiet.as_object_mut().unwrap().remove("email");
    let (status, text) = curl_from(
        "127.0.0.1",
        front,
        "/headers",
        &[
            "-H",
            &auth(token(&issuer, quiet)),
            "-H",
            "x-user-email: forged@example.com",
            // CGI-style apps read this as X-User-Email.
            "-H",
            "x_user_email: forged@example.com",
        ],
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(!text.contains("forged@example.com"), "{text}");

    // Keys from the issuer's URL: the data plane fetches them (a real HTTP server here).
    let elsewhere = serve_issuer(stranger.jwks().to_owned()).await;
    let jwks_url = format!("{elsewhere}/jwks.json");
    // The stranger's keys now, then (`--jwt-issuer`) no keys named: found from the
    // issuer's OpenID configuration. Each time the key served passes, another does not.
    let mut theirs = good.clone();
    theirs["iss"] = json!(elsewhere);
    for (what, iss, jwks, claims) in [
        (
            "fetched from the issuer's URL",
            None,
            json!({"uri": jwks_url}),
            &good,
        ),
        (
            "found from the issuer",
            Some(&elsewhere),
            json!({}),
            &theirs,
        ),
    ] {
        let mut p = policies.get("bearer").await.unwrap();
        let j = p.spec.jwt.as_mut().unwrap();
        if let Some(iss) = iss {
            j.issuer.clone_from(iss);
        }
        j.jwks = serde_json::from_value(jwks).unwrap();
        policies
            .replace("bearer", &PostParams::default(), &p)
            .await
            .unwrap();
        let bearer = |key: &portway_gateway::jwt::Signer| {
            let header = auth(token(key, claims.clone()));
            async move { curl_from("127.0.0.1", front, "/echo", &["-H", &header]).await }
        };
        eventually(&format!("keys are {what}"), WAIT, || async {
            let (status, text) = bearer(&stranger).await;
            ensure!(status == 200, "{text}");
            Ok(())
        })
        .await;
        let (status, text) = bearer(&issuer).await;
        assert_eq!(status, 401, "{what}: a key not published: {text}");
    }
    policies
        .delete("bearer", &DeleteParams::default())
        .await
        .unwrap();
    let (ok, out) = kubectl(stack, &["delete", "secret", "issuer-keys"]).await;
    assert!(ok, "{out}");
}

/// A plain HTTP server on loopback standing for a token issuer: its OpenID configuration
/// at `/.well-known/openid-configuration` (naming itself and its `jwks_uri`), and `jwks`
/// at `/jwks.json`. Its base URL (the issuer).
async fn serve_issuer(jwks: String) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let config = json!({"issuer": base, "jwks_uri": format!("{base}/jwks.json"),
        "authorization_endpoint": format!("{base}/auth"), "token_endpoint": format!("{base}/token")})
    .to_string();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (jwks, config) = (jwks.clone(), config.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]);
                let body = if head.starts_with("GET /.well-known/openid-configuration ") {
                    config
                } else {
                    jwks
                };
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    base
}

/// Rate limits: a client over its own rate gets 429 with `Retry-After`; another client
/// has its own bucket until the tunnel's, shared by all, runs out.
async fn rate_limit(front: SocketAddr, policies: &Api<AccessPolicy>) {
    let slow = guarding(
        "slow",
        json!({"rateLimit": {"perClient": {"requests": 3, "per": "Minute"},
                             "perTunnel": {"requests": 5, "per": "Minute"}}}),
    );
    policies
        .create(&PostParams::default(), &slow)
        .await
        .unwrap();
    // Every request once the policy is in force takes a token from both buckets, so the
    // first 429 comes after exactly 3 from this client, leaving the tunnel 2.
    let text = eventually("the rate limit is in force", WAIT, || async {
        let (status, text) = curl_from("127.0.0.1", front, "/echo", &[]).await;
        ensure!(status == 429, "{text}");
        Ok(text)
    })
    .await;
    // 3 a minute: the next token in at most 20 s.
    let retry: u64 = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after: ")
                .map(str::to_owned)
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {text}"));
    assert!((15..=20).contains(&retry), "{text}");
    assert!(!text.contains("GET /echo"), "the app was reached: {text}");
    for _ in 0..2 {
        let (status, text) = curl_from("127.0.0.2", front, "/echo", &[]).await;
        assert_eq!(status, 200, "another client has its own bucket: {text}");
    }
    for client in ["127.0.0.2", "127.0.0.3"] {
        let (status, text) = curl_from(client, front, "/echo", &[]).await;
        assert_eq!(status, 429, "the tunnel's 5 a minute are spent: {text}");
        assert!(text.to_ascii_lowercase().contains("retry-after:"), "{text}");
    }
    policies
        .delete("slow", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the rate limit is lifted", WAIT, || async {
        let (status, text) = curl_from("127.0.0.3", front, "/echo", &[]).await;
        ensure!(status == 200, "{text}");
        Ok(())
    })
    .await;
}

/// Basic auth: users from a Secret of bcrypt hashes (a plaintext one is refused by the API
/// server), 401 with a challenge until the right password, which the app never sees; a
/// Secret that goes takes the proxy down (500), never open.
async fn basic_auth(stack: &Stack, front: SocketAddr, policies: &Api<AccessPolicy>) {
    let (ok, out) = create_secret(
        stack,
        "users",
        "portway.dev/htpasswd",
        "--from-literal=htpasswd=ann:hunter2",
    )
    .await;
    assert!(!ok && out.contains("data[htpasswd]"), "{out}");
    assert!(
        !out.contains("hunter2"),
        "the refusal repeats the password: {out}"
    );
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let (ok, out) = create_secret(
        stack,
        "users",
        "portway.dev/htpasswd",
        &format!("--from-literal=htpasswd=ann:{hash}"),
    )
    .await;
    assert!(ok, "{out}");
    let login: AccessPolicy = guarding(
        "login",
        json!({"basicAuth": {"secretRef": {"name": "users"}, "realm": "guarded"}}),
    );
    policies
        .create(&PostParams::default(), &login)
        .await
        .unwrap();
    let text = challenged(policies, "login", front).await;
    assert!(
        text.to_ascii_lowercase()
            .contains("www-authenticate: basic realm=\"guarded\""),
        "{text}"
    );
    for creds in ["ann:wrong", "eve:s3cret"] {
        let (status, text) = curl_from("127.0.0.1", front, "/echo", &["-u", creds]).await;
        assert_eq!(status, 401, "{creds}: {text}");
        assert!(!text.contains("GET /echo"), "the app was reached: {text}");
    }
    let (status, text) = curl_from(
        "127.0.0.1",
        front,
        "/headers",
        &["-u", "ann:s3cret", "-H", "portway-identity: forged"],
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("authorization:"),
        "the app saw the credentials: {text}"
    );
    // The app is told who signed in, signed with the key the hostname publishes.
    let id = identity(front, &text).await;
    assert_eq!(
        (id["sub"].as_str(), id["auth"].as_str()),
        (Some("ann"), Some("basic")),
        "{id:?}"
    );

    // The Secret goes: the proxy answers 500, even to the right password, and says why.
    let (ok, out) = kubectl(stack, &["delete", "secret", "users"]).await;
    assert!(ok, "{out}");
    eventually("a policy without its Secret fails closed", WAIT, || async {
        let (status, reason) = condition(policies, "login", "ResolvedRefs").await?;
        ensure!(
            status == "False" && reason == "SecretNotFound",
            "{status} {reason}"
        );
        let (status, text) = curl_from("127.0.0.1", front, "/echo", &["-u", "ann:s3cret"]).await;
        ensure!(status == 500, "{text}");
        Ok(())
    })
    .await;
    policies
        .delete("login", &DeleteParams::default())
        .await
        .unwrap();
}
