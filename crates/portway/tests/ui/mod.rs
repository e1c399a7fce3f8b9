//! The device's local UI (`portway http` serves it): driven by headless Chromium and by
//! its JSON API with curl, as people and scripts use it. Screenshots of each page are
//! written to `target/ui-screenshots/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use portway_testkit::{LocalUi, Process, curl, eventually};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

use super::Stack;

/// A local app that counts what reaches it and keeps the last body.
struct App {
    addr: std::net::SocketAddr,
    count: Arc<AtomicU64>,
    last: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    async fn spawn() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let last = Arc::new(Mutex::new(String::new()));
        let (c, l) = (count.clone(), last.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (c, l) = (c.clone(), l.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: http::Request<Incoming>| {
                            let (c, l) = (c.clone(), l.clone());
                            async move {
                                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                                let body = req.into_body().collect().await?.to_bytes();
                                *l.lock() = String::from_utf8_lossy(&body).into_owned();
                                let answer = format!("{{\"n\":{n},\"saw\":{}}}", body.len());
                                Ok::<_, hyper::Error>(
                                    http::Response::builder()
                                        .header("content-type", "application/json")
                                        .header("set-cookie", "session=app-secret")
                                        .body(http_body_util::Full::new(bytes::Bytes::from(answer)))
                                        .unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            count,
            last,
            task,
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// One step of `drive.mjs` in headless Chromium (Debian's, through npm's
/// playwright-core, which `.ci/run` installs): what it saw, as JSON. A script error or a
/// CSP refusal on the page fails it.
async fn browser(base: &str, token: &str, step: &[&str]) -> Value {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let run = tokio::process::Command::new("node")
        .arg(dir.join("drive.mjs"))
        .arg(base)
        .args(step)
        .env("PORTWAY_UI_TOKEN", token)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the browser step finished within 90 s")
        .expect("node runs (and `npm ci --prefix crates/portway/tests/ui` was run)");
    assert!(
        out.status.success(),
        "browser step {step:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = json(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(seen["errors"], serde_json::json!([]), "errors on the page");
    seen
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `portway up`, a counting app, and `portway http` publishing it at `host` with its UI
/// on a free port; and curl's `--resolve` for `host` at the edge.
async fn published(host: &str) -> (Stack, App, Process, LocalUi, String) {
    let stack = Stack::start().await;
    let app = App::spawn().await;
    let http = stack
        .http_to(app.addr.port(), host, 30, &["--ui", "127.0.0.1:0"])
        .await
        .unwrap();
    let ui = LocalUi::of(&http);
    let resolve = format!("{host}:{}:127.0.0.1", stack.edge.port());
    (stack, app, http, ui, resolve)
}

#[tokio::test]
async fn the_local_ui_inspects_replays_and_pauses() {
    let host = "inspect.localhost";
    let (stack, app, http, ui, resolve) = published(host).await;
    let public = format!("http://{host}:{}", stack.edge.port());

    // The live stream, open before the request, as the page keeps it.
    let mut events = tokio::process::Command::new("curl")
        .args(["-sN", "-H", &ui.header()])
        .arg(format!("{}/api/events", ui.base))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(events.stdout.take().unwrap()).lines();

    let (status, body) = curl(&[
        "--resolve",
        &resolve,
        "-H",
        "authorization: Bearer device-secret",
        "-H",
        "content-type: application/json",
        "--data-binary",
        r#"{"hello":"inspector","n":[1,2]}"#,
        &format!("{public}/hooks/github?x=1"),
    ])
    .await;
    assert_eq!((status, body.as_str()), (200, r#"{"n":1,"saw":31}"#));
    assert_eq!(app.count(), 1);

    // It is listed as the answer is sent (the tap sees the answer before passing it on),
    // and the stream tells it at once: well within the second the issue allows.
    let seen = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("data:") && line.contains("/hooks/github?x=1") {
                return json(line.trim_start_matches("data:").trim());
            }
        }
        panic!("the event stream ended");
    })
    .await
    .expect("the request was streamed within a second");
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["status"], 200);
    assert_eq!(seen["client"], "127.0.0.1");
    drop(events);
    let (_, list) = ui.get("/api/requests").await;
    let list = json(&list);
    let first = &list["requests"][0];
    assert_eq!(first["path"], "/hooks/github?x=1");
    let id = first["id"].as_u64().unwrap();

    // The detail: bodies, and credentials masked until revealed with the token.
    let (_, detail) = ui.get(&format!("/api/requests/{id}")).await;
    let detail = json(&detail);
    assert_eq!(
        detail["request"]["body"]["text"],
        r#"{"hello":"inspector","n":[1,2]}"#
    );
    assert_eq!(detail["response"]["body"]["text"], r#"{"n":1,"saw":31}"#);
    assert_eq!(detail["public_url"], format!("{public}/hooks/github?x=1"));
    let headers = detail["request"]["headers"].to_string();
    assert!(!headers.contains("device-secret"), "{headers}");
    assert!(
        !detail["response"]["headers"]
            .to_string()
            .contains("app-secret")
    );
    assert_eq!(
        detail["masked"],
        serde_json::json!(["authorization", "set-cookie"])
    );
    let cookie = format!(
        "cookie: portway-ui-{}={}",
        ui.base.rsplit(':').next().unwrap(),
        ui.token
    );
    let (status, _) = curl(&[
        "-H",
        &cookie,
        &format!("{}/api/requests/{id}?reveal=%31", ui.base),
    ])
    .await;
    assert_eq!(
        status, 403,
        "revealing needs the token in the header, however spelt"
    );
    let (status, revealed) = ui
        .send("GET", &format!("/api/requests/{id}?reveal=1"), "")
        .await;
    assert_eq!(status, 200);
    assert!(revealed.contains("Bearer device-secret"));

    // The pages, in a real browser: the tunnel online with its URL, the list showing the
    // request, the detail its bodies (the JSON pretty-printed) and no secret.
    let shots = screenshots();
    let dir = shots.display().to_string();
    let seen = browser(
        &ui.base,
        &ui.token,
        &["screens", &id.to_string(), "/hooks/github?x=1", &dir],
    )
    .await;
    assert!(seen["tunnels"].as_str().unwrap().contains(host), "{seen}");
    let row = seen["row"].as_str().unwrap();
    assert!(
        row.contains("POST") && row.contains("/hooks/github?x=1") && row.contains("200"),
        "{row}"
    );
    let bodies = seen["bodies"].to_string();
    assert!(
        bodies.contains("\\\"hello\\\": \\\"inspector\\\""),
        "pretty JSON: {bodies}"
    );
    assert!(
        !seen["page"].as_str().unwrap().contains("device-secret"),
        "masked in the page too"
    );
    for shot in [
        "tunnels.png",
        "inspector.png",
        "request.png",
        "request-phone.png",
    ] {
        assert!(
            shots.join(shot).metadata().unwrap().len() > 10_000,
            "{shot}"
        );
    }

    // Replay, the detail's button, reaches the app again, once; an edited one (through
    // the API) sends the edit.
    let seen = browser(&ui.base, &ui.token, &["replay", &id.to_string()]).await;
    assert_eq!(app.count(), 2, "{seen}");
    assert_eq!(*app.last.lock(), r#"{"hello":"inspector","n":[1,2]}"#);
    let (_, list) = ui.get("/api/requests?limit=1").await;
    let replayed = json(&list)["requests"][0].clone();
    assert_eq!(replayed["replay_of"], id);
    assert_eq!(seen["hash"], format!("#/inspect/{}", replayed["id"]));
    let edit =
        r#"{"method":"PUT","body":"edited","headers":[["authorization","••••••"],["x-edit","1"]]}"#;
    let (status, replayed) = ui
        .send("POST", &format!("/api/requests/{id}/replay"), edit)
        .await;
    assert_eq!(status, 201, "{replayed}");
    assert_eq!(app.count(), 3);
    assert_eq!(*app.last.lock(), "edited");
    let (_, d) = ui
        .send(
            "GET",
            &format!("/api/requests/{}?reveal=1", json(&replayed)["id"]),
            "",
        )
        .await;
    let d = json(&d);
    assert_eq!(d["method"], "PUT");
    assert!(
        d["request"]["headers"]
            .to_string()
            .contains("Bearer device-secret"),
        "the masked value stood for the original"
    );

    // The pause switch takes the tunnel offline: the public URL answers 503, pooled
    // connections included; resumed, it answers again.
    let name = format!("http-{}", app.addr.port());
    let seen = browser(&ui.base, &ui.token, &["pause", &name]).await;
    assert_eq!(seen["state"], "paused");
    let before = app.count();
    let (status, body) = curl(&["--resolve", &resolve, &format!("{public}/")]).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("paused"), "{body}");
    assert_eq!(app.count(), before, "nothing reached the app");
    let seen = browser(&ui.base, &ui.token, &["pause", &name]).await;
    assert_eq!(seen["state"], "online");
    eventually(
        "the tunnel answers again",
        Duration::from_secs(10),
        || async {
            let (status, body) = curl(&["--resolve", &resolve, &format!("{public}/")]).await;
            anyhow::ensure!(status == 200, "{status}: {body}");
            Ok(())
        },
    )
    .await;

    // The tunnels page's data: the public URL, the target, the path to the edge, counters.
    let (_, all) = ui.get("/api/tunnels").await;
    let t = &json(&all)["tunnels"][0];
    assert_eq!(t["urls"][0], format!("{public}/"));
    assert_eq!(t["target"], format!("127.0.0.1:{}", app.addr.port()));
    assert_eq!(t["state"], "online");
    assert!(
        matches!(t["paths"][0]["path"].as_str(), Some("direct" | "relay")),
        "{t}"
    );
    assert!(t["requests"].as_u64().unwrap() >= 2 && t["bytes_in"].as_u64().unwrap() > 31);
    assert!(t["conditions"].to_string().contains("Programmed"), "{t}");
    // The one-liner has no config file to edit.
    let (status, _) = ui
        .send(
            "POST",
            "/api/tunnels",
            r#"{"name":"x","target":"127.0.0.1:1"}"#,
        )
        .await;
    assert_eq!(status, 409);
    drop(http);
}

/// Attacks on the UI: another site's page (DNS rebinding, a cross-site form, a forged
/// Origin) and a local script without the token get nothing and change nothing.
#[tokio::test]
async fn the_local_ui_refuses_other_sites_and_requests_without_its_token() {
    let host = "guarded.localhost";
    let (stack, app, http, ui, resolve) = published(host).await;
    curl(&[
        "--resolve",
        &resolve,
        &format!("http://{host}:{}/", stack.edge.port()),
    ])
    .await;
    assert_eq!(app.count(), 1);
    let (_, list) = ui.get("/api/requests").await;
    let id = json(&list)["requests"][0]["id"].as_u64().unwrap();
    let replay = format!("{}/api/requests/{id}/replay", ui.base);
    let port = ui.base.rsplit(':').next().unwrap().to_owned();
    let token = ui.header();
    for (what, args) in [
        // Another user or program on the machine, without the token.
        (
            "a read without the token",
            vec![format!("{}/api/requests", ui.base)],
        ),
        ("the page without the token", vec![format!("{}/", ui.base)]),
        (
            "the live stream without the token",
            vec![
                "--max-time".into(),
                "3".into(),
                format!("{}/api/events", ui.base),
            ],
        ),
        ("a guessed link", vec![format!("{}/?token=0000", ui.base)]),
        // A page whose name now resolves to 127.0.0.1 (DNS rebinding) sends its own Host.
        (
            "rebinding read",
            vec![
                "-H".to_owned(),
                format!("host: evil.example:{port}"),
                format!("{}/api/requests", ui.base),
            ],
        ),
        (
            "rebinding page",
            vec![
                "-H".to_owned(),
                format!("host: evil.example:{port}"),
                format!("{}/", ui.base),
            ],
        ),
        (
            "replay without the token",
            vec!["-X".into(), "POST".into(), replay.clone()],
        ),
        (
            "a cross-site form",
            vec![
                "-X".into(),
                "POST".into(),
                "-H".into(),
                "origin: http://evil.example".into(),
                "-H".into(),
                "content-type: application/x-www-form-urlencoded".into(),
                "-d".into(),
                "a=1".into(),
                replay.clone(),
            ],
        ),
        (
            "a forged origin with the token",
            vec![
                "-X".into(),
                "POST".into(),
                "-H".into(),
                token.clone(),
                "-H".into(),
                "origin: http://evil.example".into(),
                replay.clone(),
            ],
        ),
        (
            "sec-fetch-site cross-site",
            vec![
                "-X".into(),
                "POST".into(),
                "-H".into(),
                token.clone(),
                "-H".into(),
                "sec-fetch-site: cross-site".into(),
                replay.clone(),
            ],
        ),
        (
            "a wrong token",
            vec![
                "-X".into(),
                "POST".into(),
                "-H".into(),
                "x-portway-token: 0000".into(),
                replay.clone(),
            ],
        ),
        (
            "pause without the token",
            vec![
                "-X".into(),
                "POST".into(),
                "-H".into(),
                "content-type: application/json".into(),
                "--data".into(),
                r#"{"paused":true}"#.into(),
                format!("{}/api/tunnels/http-{}/pause", ui.base, app.addr.port()),
            ],
        ),
        (
            "clear without the token",
            vec![
                "-X".into(),
                "DELETE".into(),
                format!("{}/api/requests", ui.base),
            ],
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, body) = curl(&args).await;
        assert!(matches!(status, 401 | 403), "{what}: {status} {body}");
        assert!(!body.contains(&ui.token), "{what} leaked the token");
        assert!(!body.contains("guarded.localhost"), "{what} leaked: {body}");
    }
    assert_eq!(app.count(), 1, "no replay reached the app");
    let (_, list) = ui.get("/api/requests").await;
    assert_eq!(
        json(&list)["requests"].as_array().unwrap().len(),
        1,
        "nothing was cleared"
    );
    let (_, all) = ui.get("/api/tunnels").await;
    assert_eq!(json(&all)["tunnels"][0]["paused"], false);
    // Every page forbids framing (clickjacking the switches) and other origins' scripts.
    let out = tokio::process::Command::new("curl")
        .args(["-sSI", &format!("{}/", ui.base)])
        .output()
        .await
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        head.contains("x-frame-options: deny") && head.contains("frame-ancestors 'none'"),
        "{head}"
    );
    // The printed link lets a browser in: its token becomes a SameSite=Strict cookie
    // (and leaves the address bar), and the page then carries the token for its calls.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "/dev/null"])
        .arg(format!("{}/?token={}", ui.base, ui.token))
        .output()
        .await
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 303") && head.contains("location: /\r\n"),
        "{head}"
    );
    assert!(head.contains("httponly; samesite=strict"), "{head}");
    let port = ui.base.rsplit(':').next().unwrap();
    let (status, page) = curl(&[
        "-H",
        &format!("cookie: portway-ui-{port}={}", ui.token),
        &format!("{}/", ui.base),
    ])
    .await;
    assert_eq!(status, 200);
    assert!(page.contains(&ui.token));
    // The ready file holding the token is the user's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(http.ready_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "ready file mode {mode:o}");

    // Listening anywhere but loopback is refused before anything starts.
    let refused = stack
        .http_to(
            app.addr.port(),
            "open.localhost",
            30,
            &["--ui", "0.0.0.0:0"],
        )
        .await;
    let err = format!("{:#}", refused.err().expect("--ui 0.0.0.0 is refused"));
    assert!(err.contains("loopback only"), "{err}");
    drop(http);
}
