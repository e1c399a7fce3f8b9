//! Test helpers that start real Portway parts and tools on loopback.
//!
//! [`Process`] runs a built binary with `--ready-file`, waits for the file, kills the
//! child on drop and prints its log when the test failed. [`eventually`] polls a
//! condition with a deadline instead of sleeping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod bench;
pub mod etcd;
pub mod forward;
pub mod origin;
pub mod pebble;

use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// A child process of a test, killed on drop.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    ready: Value,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Starts `bin args… --ready-file F` and waits (up to 120 s) until F holds JSON.
    ///
    /// # Errors
    /// When the process cannot start, exits early, or never becomes ready; the error
    /// carries its log.
    pub async fn start<I, S>(name: &str, bin: &Path, args: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::start_with_env(name, bin, args, std::iter::empty::<(&str, &str)>()).await
    }

    /// As [`Process::start`], with extra environment variables.
    ///
    /// # Errors
    /// As [`Process::start`].
    pub async fn start_with_env<I, S, E, K, V>(
        name: &str,
        bin: &Path,
        args: I,
        env: E,
    ) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
        E: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let dir = tempfile::tempdir()?;
        let ready_file = dir.path().join("ready.json");
        let log = dir.path().join("log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .args(args)
            .arg("--ready-file")
            .arg(&ready_file)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // After the default, so a caller's RUST_LOG wins.
            .envs(env)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut p = Self {
            name: name.to_owned(),
            child,
            log,
            ready: Value::Null,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready_file)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
            {
                p.ready = v;
                return Ok(p);
            }
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "{name} exited with {status} before it was ready:\n{}",
                    p.logs()
                );
            }
            if Instant::now() > deadline {
                bail!("{name} was not ready within 120 s:\n{}", p.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a program that has no ready file (Envoy); the caller polls for readiness.
    ///
    /// # Errors
    /// When the program cannot be started.
    pub fn spawn<I, S>(name: &str, bin: &Path, args: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_with_env(name, bin, args, std::iter::empty::<(&str, &str)>())
    }

    /// [`Process::spawn`] with extra environment variables.
    ///
    /// # Errors
    /// When the program cannot be started.
    pub fn spawn_with_env<I, S, E, K, V>(name: &str, bin: &Path, args: I, env: E) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
        E: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .args(args)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
            ready: Value::Null,
            _dir: dir,
        })
    }

    /// Whether the process has exited (and with what).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Where the process wrote its ready file (its own temporary directory).
    pub fn ready_path(&self) -> PathBuf {
        self._dir.path().join("ready.json")
    }

    /// The JSON the process wrote to its ready file.
    pub fn ready(&self) -> &Value {
        &self.ready
    }

    /// A string field of the ready file.
    pub fn ready_str(&self, key: &str) -> String {
        self.ready[key]
            .as_str()
            .unwrap_or_else(|| panic!("{} ready file has no {key}: {}", self.name, self.ready))
            .to_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `timeout` for a clean exit.
    ///
    /// # Errors
    /// When the process does not exit in time or exits unsuccessfully.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<()> {
        signal(self.child.id(), "TERM")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if status.success() {
                    return Ok(());
                }
                bail!(
                    "{} exited with {status} after SIGTERM:\n{}",
                    self.name,
                    self.logs()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.name,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `portway up --data DATA` with every listener on a free loopback port (`127.0.0.1:0`),
/// plus the `extra` listener flags (e.g. `--https`).
pub fn up_args(data: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["up".to_owned(), "--data".into(), data.display().to_string()];
    let listeners = [
        "--http",
        "--apiserver",
        "--dns",
        "--relay",
        "--sidecar",
        "--metrics",
    ];
    for flag in extra.iter().chain(&listeners) {
        args.extend([(*flag).to_owned(), "127.0.0.1:0".into()]);
    }
    args
}

/// Starts a built binary with `--ready-file` and `RUST_LOG=warn` (for benchmarks); returns
/// it with its ready JSON. Panics with the log if it does not become ready.
pub async fn start_quiet(bin: &Path, args: &[&str], name: &str) -> (Process, Value) {
    let p = Process::start_with_env(name, bin, args, [("RUST_LOG", "warn")])
        .await
        .unwrap();
    let ready = p.ready().clone();
    (p, ready)
}

/// Sends a signal by name (`TERM`, `INT`, `STOP`, `CONT`) with the `kill` tool.
///
/// # Errors
/// When `kill` fails.
pub fn signal(pid: u32, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- log of {} -----\n{}\n----- end of {} -----",
                self.name,
                self.logs(),
                self.name
            );
        }
    }
}

/// Polls `check` until it returns `Ok`, or panics with its last error after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => {
                panic!("{what}: not true within {timeout:?}: {e:#}")
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// Selects ring as rustls' process-wide provider (both ring and aws-lc-rs are linked, so
/// rustls cannot choose on its own). Idempotent.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A kube client from a kubeconfig file.
///
/// # Errors
/// When the file cannot be read or describes no usable cluster.
pub async fn kube_client(kubeconfig: &Path) -> Result<kube::Client> {
    install_crypto();
    Ok(portway_kube::client(Some(kubeconfig)).await?)
}

/// The kubectl binaries to test against: the one on PATH, plus `$PORTWAY_KUBECTL_EXTRA`
/// (a path list; `.ci/run` puts Debian's kubectl 1.20 there).
pub fn kubectls() -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from("kubectl")];
    if let Ok(extra) = std::env::var("PORTWAY_KUBECTL_EXTRA") {
        out.extend(std::env::split_paths(&extra).filter(|p| p.exists()));
    }
    out
}

/// Runs kubectl with a kubeconfig and a private cache directory.
pub struct Kubectl {
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
    cache: tempfile::TempDir,
}

impl Kubectl {
    pub fn new(bin: PathBuf, kubeconfig: &Path) -> Self {
        Self {
            bin,
            kubeconfig: kubeconfig.to_owned(),
            cache: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Runs kubectl; returns (success, stdout, stderr).
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        use std::io::Write;
        let mut child = Command::new(&self.bin)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("KUBECACHEDIR", self.cache.path())
            .env("HOME", self.cache.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.bin.display()));
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    /// Runs kubectl and panics with its output unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let (ok, out, err) = self.run(args, stdin);
        assert!(ok, "{} {args:?} failed:\n{out}\n{err}", self.bin.display());
        out
    }

    /// The client's minor version (`20` for 1.20; `32` for the 1.32 dispatcher).
    pub fn minor(&self) -> u32 {
        let out = self.ok(&["version", "--client", "-o", "json"], None);
        let v: serde_json::Value = serde_json::from_str(&out).expect("kubectl version JSON");
        let minor = v["clientVersion"]["minor"].as_str().unwrap_or_default();
        let digits: String = minor.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().expect("a minor version")
    }
}

/// One `dig` answer: the response code and the answer section's data fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigAnswer {
    pub status: String,
    pub authoritative: bool,
    pub answers: Vec<String>,
}

/// Queries `server` with the real `dig` (UDP, or TCP with `tcp`).
///
/// # Errors
/// When dig cannot run or prints no status.
pub fn dig(server: std::net::SocketAddr, name: &str, rtype: &str, tcp: bool) -> Result<DigAnswer> {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", server.ip())).args([
        "-p",
        &server.port().to_string(),
        name,
        rtype,
        "+norecurse",
        "+time=2",
        "+tries=1",
    ]);
    if tcp {
        cmd.arg("+tcp");
    }
    let out = cmd
        .output()
        .context("running dig (install bind9-dnsutils)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|s| s.split(',').next())
        .with_context(|| format!("dig printed no status:\n{text}"))?
        .to_owned();
    let authoritative = text.lines().any(|l| {
        l.starts_with(";; flags:") && l.split(';').nth(2).is_some_and(|f| f.contains(" aa"))
    });
    let mut answers = Vec::new();
    let mut in_answer = false;
    for line in text.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            in_answer = true;
        } else if line.trim().is_empty() || line.starts_with(";;") {
            in_answer = false;
        } else if in_answer {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() >= 5 {
                answers.push(fields[4..].join(" ").trim_matches('"').to_owned());
            }
        }
    }
    answers.sort();
    Ok(DigAnswer {
        status,
        authoritative,
        answers,
    })
}

/// A minimal HTTP/1.1 origin for tests: answers every request with
/// `target <port> saw <request line>` (and `Connection: close`). Stops when dropped.
pub struct HttpTarget {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HttpTarget {
    /// # Errors
    /// When no loopback port can be bound.
    pub async fn spawn() -> Result<Self> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head);
                    let line = text.lines().next().unwrap_or_default();
                    let body = format!("target {} saw {line}", addr.port());
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(resp.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for HttpTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies an admin kubeconfig, replacing its token, namespace and user name.
///
/// # Errors
/// When the source cannot be read or the copy written.
pub fn kubeconfig_with_token(admin: &Path, token: &str, namespace: &str, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(admin)?;
    let replaced: Vec<String> = text
        .lines()
        .map(|l| {
            let trimmed = l.trim_start();
            let indent = &l[..l.len() - trimmed.len()];
            if trimmed.starts_with("token:") {
                format!("{indent}token: {token}")
            } else if trimmed.starts_with("namespace:") {
                format!("{indent}namespace: {namespace}")
            } else {
                l.to_owned()
            }
        })
        .collect();
    std::fs::write(out, replaced.join("\n") + "\n")?;
    Ok(())
}

/// nginx as a TCP load balancer over `upstreams` on a free loopback port (the stream
/// module, Debian's `libnginx-mod-stream`): an upstream that refuses a connection is
/// skipped for the next (`proxy_next_upstream`, on by default) and left out for 5 s.
/// One process (no master), so `kill -9` when dropped leaves no worker behind. Its log
/// is `dir/nginx.log`.
///
/// # Panics
/// When no port is free or nginx cannot be started.
pub fn tcp_balancer(
    dir: &Path,
    upstreams: &[std::net::SocketAddr],
) -> (Process, std::net::SocketAddr) {
    balancer(dir, upstreams, false)
}

/// [`tcp_balancer`] that opens each connection to an upstream with a PROXY protocol v1
/// header naming the client (nginx's `proxy_protocol on`).
///
/// # Panics
/// As [`tcp_balancer`].
pub fn tcp_balancer_proxy_protocol(
    dir: &Path,
    upstreams: &[std::net::SocketAddr],
) -> (Process, std::net::SocketAddr) {
    balancer(dir, upstreams, true)
}

fn balancer(
    dir: &Path,
    upstreams: &[std::net::SocketAddr],
    proxy_protocol: bool,
) -> (Process, std::net::SocketAddr) {
    let port = pebble::free_port().unwrap();
    let proxy_protocol = if proxy_protocol {
        "    proxy_protocol on;\n"
    } else {
        ""
    };
    let servers: String = upstreams
        .iter()
        .map(|u| format!("    server {u} max_fails=1 fail_timeout=5s;\n"))
        .collect();
    let conf = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\ndaemon off;\nmaster_process off;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx.log warn;\nevents {{}}\nstream {{\n  upstream backends {{\n{servers}  }}\n  server {{\n    listen 127.0.0.1:{port};\n    proxy_pass backends;\n    proxy_connect_timeout 1s;\n{proxy_protocol}  }}\n}}\n",
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let p = Process::spawn(
        "nginx",
        Path::new("/usr/sbin/nginx"),
        ["-c", path.to_str().unwrap(), "-p", dir.to_str().unwrap()],
    )
    .unwrap();
    (p, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

/// `curl ARGS` (silent, 20 s at most): the status and the body.
///
/// # Panics
/// When curl cannot be run.
pub async fn curl(args: &[&str]) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .await
        .expect("curl runs (apt-get install -y curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The local UI of a running `portway http` or `portway agent`, as a script uses it:
/// the address and token from its ready file, every call with the token header.
pub struct LocalUi {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base: String,
    pub token: String,
}

impl LocalUi {
    /// # Panics
    /// When the ready file has no `ui`.
    pub fn of(process: &Process) -> Self {
        let ui = &process.ready()["ui"];
        Self {
            base: ui["url"]
                .as_str()
                .expect("ui url in the ready file")
                .trim_end_matches('/')
                .to_owned(),
            token: ui["token"].as_str().expect("ui token").to_owned(),
        }
    }

    /// The token as the header a script sends.
    pub fn header(&self) -> String {
        format!("x-portway-token: {}", self.token)
    }

    /// A read of `path` (from `/`).
    pub async fn get(&self, path: &str) -> (u16, String) {
        curl(&["-H", &self.header(), &format!("{}{path}", self.base)]).await
    }

    /// `method path` with a JSON body.
    pub async fn send(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        curl(&[
            "-X",
            method,
            "-H",
            &self.header(),
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
            &format!("{}{path}", self.base),
        ])
        .await
    }
}
