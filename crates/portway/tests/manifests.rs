//! `deploy/k8s/`, checked without a Kubernetes cluster: every document parses and has the
//! fields of its kind (k8s-openapi's types, which the kinds `portway apiserver` does not
//! serve can only get), the parts hang together (selectors, ports, volumes, variables,
//! the Secrets the README says how to make), the topology is the one documented, every
//! `portway` command line is accepted by the real binary, and the kinds the API server
//! serves pass `kubectl apply --dry-run=server` against one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Deserialize as _;
use serde_json::Value;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portway"))
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/k8s")
}

/// One manifest document and where it is.
struct Doc {
    at: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn is_workload(&self) -> bool {
        matches!(self.kind(), "Deployment" | "StatefulSet")
    }

    fn pod(&self) -> &Value {
        &self.value["spec"]["template"]["spec"]
    }

    fn containers(&self) -> impl Iterator<Item = &Value> {
        self.pod()["containers"].as_array().into_iter().flatten()
    }
}

/// Every document of every `*.yaml`, in the order `kubectl apply -f deploy/k8s/` applies
/// them (file names sorted, then documents in file order).
fn docs() -> Vec<Doc> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/k8s exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name}: document {i} is not YAML: {e}"));
            if !value.is_null() {
                out.push(Doc {
                    at: format!("{name}#{i}"),
                    value,
                });
            }
        }
    }
    assert!(
        !out.is_empty(),
        "no manifests in {}",
        deploy_dir().display()
    );
    out
}

fn readme() -> String {
    std::fs::read_to_string(deploy_dir().join("README.md")).expect("deploy/k8s/README.md")
}

/// The arguments after `portway` when the container runs it (command and args joined).
fn portway_args(container: &Value) -> Option<Vec<String>> {
    let strings = |key: &str| -> Vec<String> {
        container[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let mut all = strings("command");
    all.extend(strings("args"));
    let first = all.first()?;
    (first == "portway" || first.ends_with("/portway")).then(|| all.split_off(1))
}

/// The value of `--flag` (as `--flag=V` or `--flag V`); `Some("")` for a bare switch.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            Some(v)
        } else if a == name {
            Some(
                args.get(i + 1)
                    .filter(|n| !n.starts_with("--"))
                    .map_or("", String::as_str),
            )
        } else {
            None
        }
    })
}

/// `$(NAME)` references in `s`.
fn references(s: &str) -> Vec<&str> {
    s.match_indices("$(")
        .filter_map(|(i, _)| s[i + 2..].split_once(')').map(|(name, _)| name))
        .collect()
}

/// The variables Kubernetes sets for a Service (`PORTWAY_DNS_SERVICE_HOST`, …), with
/// stand-in values.
fn service_variables(svc: &Value) -> BTreeMap<String, String> {
    let prefix = svc["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_uppercase()
        .replace('-', "_");
    let ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
    let port = ports
        .first()
        .map(|p| p["port"].to_string())
        .unwrap_or_default();
    let mut vars = BTreeMap::from([
        (format!("{prefix}_SERVICE_HOST"), "127.0.0.1".to_owned()),
        (format!("{prefix}_SERVICE_PORT"), port),
    ]);
    for p in &ports {
        if let Some(name) = p["name"].as_str() {
            vars.insert(
                format!(
                    "{prefix}_SERVICE_PORT_{}",
                    name.to_uppercase().replace('-', "_")
                ),
                p["port"].to_string(),
            );
        }
    }
    vars
}

/// Fields of `orig` that `back` lost or changed (a misspelt or misplaced field does not
/// survive a trip through the typed object).
fn lost(orig: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (k, v) in o {
                match b.get(k) {
                    Some(bv) => lost(v, bv, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}: not a field of the kind")),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            for (i, (x, y)) in o.iter().zip(b).enumerate() {
                lost(x, y, &format!("{path}[{i}]"), out);
            }
        }
        (o, b) if o == b => {}
        (o, b) => out.push(format!("{path}: {o} became {b}")),
    }
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Vec<String> {
    match serde_json::from_value::<T>(v.clone()) {
        Ok(typed) => {
            let mut out = Vec::new();
            lost(v, &serde_json::to_value(typed).unwrap(), "", &mut out);
            out
        }
        Err(e) => vec![format!("does not parse as its kind: {e}")],
    }
}

#[test]
fn every_document_has_the_fields_of_its_kind() {
    use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
    use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
    let mut problems = Vec::new();
    for d in docs() {
        let found = match d.kind() {
            "Namespace" => round_trip::<Namespace>(&d.value),
            "Service" => round_trip::<Service>(&d.value),
            "Secret" => round_trip::<Secret>(&d.value),
            "Deployment" => round_trip::<Deployment>(&d.value),
            "StatefulSet" => round_trip::<StatefulSet>(&d.value),
            other => vec![format!("kind {other:?}: add it to this test")],
        };
        problems.extend(
            found
                .into_iter()
                .map(|p| format!("{} {}: {p}", d.at, d.name())),
        );
        if d.kind() != "Namespace" && d.value["metadata"]["namespace"] != "portway" {
            problems.push(format!("{}: not in namespace portway", d.at));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_parts_hang_together() {
    let docs = docs();
    let readme = readme();
    let mut problems = Vec::new();
    let workloads: Vec<&Doc> = docs.iter().filter(|d| d.is_workload()).collect();
    let services: Vec<&Doc> = docs.iter().filter(|d| d.kind() == "Service").collect();
    let labels = |d: &Doc| -> BTreeMap<String, Value> {
        d.value["spec"]["template"]["metadata"]["labels"]
            .as_object()
            .map(|m| m.clone().into_iter().collect())
            .unwrap_or_default()
    };
    let selects = |selector: &Value, d: &Doc| {
        let have = labels(d);
        selector
            .as_object()
            .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| have.get(k) == Some(v)))
    };

    for w in &workloads {
        let at = format!("{} {}", w.at, w.name());
        if !selects(&w.value["spec"]["selector"]["matchLabels"], w) {
            problems.push(format!("{at}: the selector does not select its own pods"));
        }
        // Volumes: every mount names one; every Secret is one the README makes.
        let mut volumes: BTreeSet<&str> = w.pod()["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str())
            .collect();
        volumes.extend(
            w.value["spec"]["volumeClaimTemplates"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["metadata"]["name"].as_str()),
        );
        for v in w.pod()["volumes"].as_array().into_iter().flatten() {
            if let Some(secret) = v["secret"]["secretName"].as_str() {
                let made = readme.lines().any(|l| {
                    l.contains("create secret") && l.split_whitespace().any(|w| w == secret)
                });
                if !made {
                    problems.push(format!(
                        "{at}: Secret {secret} is not made by a `kubectl create secret` in README.md"
                    ));
                }
            }
        }
        // Variables: the container's own, or a Service's applied before this workload
        // (Kubernetes sets those only for Services that exist when the pod starts).
        let position = docs.iter().position(|d| std::ptr::eq(d, *w)).unwrap();
        let earlier: BTreeMap<String, String> = docs[..position]
            .iter()
            .filter(|d| d.kind() == "Service")
            .flat_map(|d| service_variables(&d.value))
            .collect();
        for c in w.containers() {
            let cname = c["name"].as_str().unwrap_or_default();
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let name = m["name"].as_str().unwrap_or_default();
                if !volumes.contains(name) {
                    problems.push(format!("{at} {cname}: mounts unknown volume {name}"));
                }
            }
            let env: BTreeSet<&str> = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["name"].as_str())
                .collect();
            for text in ["command", "args"]
                .iter()
                .flat_map(|k| c[*k].as_array().into_iter().flatten())
                .filter_map(Value::as_str)
            {
                for var in references(text) {
                    if !env.contains(var) && !earlier.contains_key(var) {
                        problems.push(format!(
                            "{at} {cname}: $({var}) is neither in env nor set by an earlier Service"
                        ));
                    }
                }
            }
        }
        if w.kind() == "StatefulSet" {
            let svc = w.value["spec"]["serviceName"].as_str().unwrap_or_default();
            let headless = services
                .iter()
                .any(|s| s.name() == svc && s.value["spec"]["clusterIP"] == "None");
            if !headless {
                problems.push(format!("{at}: serviceName {svc:?} is no headless Service"));
            }
        }
    }

    // Services: each selects exactly one workload, at ports its containers have.
    for s in &services {
        let at = format!("{} {}", s.at, s.name());
        let selector = &s.value["spec"]["selector"];
        let matched: Vec<&&Doc> = workloads.iter().filter(|w| selects(selector, w)).collect();
        let [w] = matched.as_slice() else {
            problems.push(format!("{at}: selects {} workloads", matched.len()));
            continue;
        };
        let ports: Vec<&Value> = w
            .containers()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .collect();
        let protocol = |p: &Value| p["protocol"].as_str().unwrap_or("TCP").to_owned();
        for p in s.value["spec"]["ports"].as_array().into_iter().flatten() {
            let target = p.get("targetPort").unwrap_or(&p["port"]);
            let found = ports.iter().any(|c| {
                protocol(c) == protocol(p)
                    && match target {
                        Value::String(name) => c["name"] == *name.as_str(),
                        number => c["containerPort"] == *number,
                    }
            });
            if !found {
                problems.push(format!(
                    "{at}: port {} ({}) has no container port {target} in {}",
                    p["port"],
                    protocol(p),
                    w.name()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_topology_is_the_documented_one() {
    let docs = docs();
    let find = |kind: &str, name: &str| -> &Doc {
        docs.iter()
            .find(|d| d.kind() == kind && d.name() == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let replicas = |kind: &str, name: &str| find(kind, name).value["spec"]["replicas"].as_u64();
    assert_eq!(replicas("StatefulSet", "portway-etcd"), Some(3));
    assert_eq!(replicas("Deployment", "portway-apiserver"), Some(2));
    assert_eq!(replicas("Deployment", "portway-operator"), Some(2));
    assert_eq!(replicas("Deployment", "portway-dns"), Some(2));
    assert_eq!(replicas("Deployment", "portway-edge"), Some(2));
    assert_eq!(replicas("Deployment", "portway-relay"), Some(1));
    let args = |name: &str| -> Vec<String> {
        let mut all: Vec<Vec<String>> = find("Deployment", name)
            .containers()
            .filter_map(portway_args)
            .collect();
        assert_eq!(all.len(), 1, "{name}: one portway container");
        all.remove(0)
    };

    // Every etcd member is one of the API servers' --etcd-servers.
    let servers = args("portway-apiserver");
    let endpoints = flag(&servers, "--etcd-servers").expect("--etcd-servers");
    for i in 0..3 {
        let member = format!("http://portway-etcd-{i}.portway-etcd:2379");
        assert!(
            endpoints.split(',').any(|e| e == member),
            "{member} not in {endpoints}"
        );
    }
    for part in ["portway-operator", "portway-dns"] {
        assert_eq!(flag(&args(part), "--leader-elect"), Some(""), "{part}");
    }
    // One zone everywhere; the edges use the relay that runs.
    let zones: BTreeSet<_> = ["portway-operator", "portway-dns", "portway-edge"]
        .iter()
        .map(|p| {
            flag(&args(p), "--zone")
                .unwrap_or("portway.localhost")
                .to_owned()
        })
        .collect();
    assert_eq!(zones.len(), 1, "zones differ: {zones:?}");
    let edge = args("portway-edge");
    let relay_host = flag(&args("portway-relay"), "--hostname")
        .unwrap()
        .to_owned();
    assert_eq!(
        flag(&edge, "--relay"),
        Some(format!("https://{relay_host}/").as_str())
    );
    // Each edge pod is its own gateway: named after the pod.
    assert_eq!(flag(&edge, "--name"), Some("$(POD_NAME)"));
    let env = &find("Deployment", "portway-edge").pod()["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "POD_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"),
        "{env}"
    );

    let service = |name: &str| &find("Service", name).value["spec"];
    assert_eq!(service("portway-edge")["type"], "LoadBalancer");
    assert_eq!(service("portway-etcd")["clusterIP"], "None");
    let dns: BTreeSet<(u64, &str)> = service("portway-dns")["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["port"].as_u64().unwrap(), p["protocol"].as_str().unwrap()))
        .collect();
    assert_eq!(dns, BTreeSet::from([(53, "TCP"), (53, "UDP")]));
}

/// The real binary is given each container's command line (variables filled in as the
/// kubelet would, mounted paths moved into a temporary directory) and must get past its
/// flag parsing: clap refuses an unknown flag or a bad value with exit code 2 before
/// anything else, while a command line it accepts reaches `main`'s first log line (the
/// open files limit) or fails later, for want of the cluster, with another code.
#[tokio::test]
async fn every_portway_command_line_is_accepted_by_the_binary() {
    let docs = docs();
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    let mut problems = Vec::new();
    for (i, w) in docs.iter().enumerate() {
        if !w.is_workload() {
            continue;
        }
        let mut vars: BTreeMap<String, String> = docs[..i]
            .iter()
            .filter(|d| d.kind() == "Service")
            .flat_map(|d| service_variables(&d.value))
            .collect();
        for c in w.containers() {
            let Some(mut args) = portway_args(c) else {
                continue;
            };
            for e in c["env"].as_array().into_iter().flatten() {
                let value = match &e["value"] {
                    Value::String(v) => v.clone(),
                    // A downward-API value: a pod name will do.
                    _ => format!("{}-0", w.name()),
                };
                vars.insert(e["name"].as_str().unwrap().to_owned(), value);
            }
            // Nothing may land outside the temporary directory.
            let mounts: Vec<(String, PathBuf)> = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    let name = m["name"].as_str().unwrap();
                    let at = tmp.path().join(format!("{}-{name}", w.name()));
                    (m["mountPath"].as_str().unwrap().to_owned(), at)
                })
                .collect();
            for a in &mut args {
                for (name, value) in &vars {
                    *a = a.replace(&format!("$({name})"), value);
                }
                for (path, at) in &mounts {
                    *a = a.replace(path.as_str(), &at.display().to_string());
                }
            }
            checked += 1;
            if let Err(e) = accepted(&args, tmp.path()).await {
                problems.push(format!(
                    "{} {}: portway {}: {e}",
                    w.at,
                    w.name(),
                    args.join(" ")
                ));
            }
        }
    }
    assert!(checked >= 5, "only {checked} portway containers found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Runs `portway ARGS` until it has parsed them (see the test above), then kills it.
async fn accepted(args: &[String], home: &Path) -> anyhow::Result<()> {
    let log = home.join("log");
    let child = Command::new(bin())
        .args(args)
        .env("RUST_LOG", "portway=debug")
        .env("HOME", home)
        .env("XDG_STATE_HOME", home)
        .env("XDG_DATA_HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let child = std::cell::RefCell::new(child);
    let what = format!("portway {} parses its arguments or exits", args[0]);
    let exit = portway_testkit::eventually(&what, Duration::from_secs(30), || {
        let (log, child) = (&log, &child);
        async move {
            let text = std::fs::read_to_string(log)?;
            if text.contains("open files limit") {
                return Ok(None);
            }
            let status = child
                .borrow_mut()
                .try_wait()?
                .ok_or_else(|| anyhow::anyhow!("{text}"))?;
            Ok(Some((status, std::fs::read_to_string(log)?)))
        }
    })
    .await;
    let mut child = child.into_inner();
    let _ = child.kill();
    let _ = child.wait();
    match exit {
        Some((status, text)) if status.code() == Some(2) => {
            Err(anyhow::anyhow!("refused its arguments: {text}"))
        }
        _ => Ok(()),
    }
}

/// Namespace and Service (and any other kind `portway apiserver` serves) through
/// `kubectl apply --dry-run=server` against a real one; the rest are the kinds the README
/// says are checked by structure only.
#[tokio::test]
async fn served_kinds_pass_a_server_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let api = portway_testkit::Process::start(
        "apiserver",
        bin(),
        [
            "apiserver",
            "--data",
            dir.path().join("api").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    )
    .await
    .unwrap();
    let kc = PathBuf::from(api.ready_str("kubeconfig"));
    let docs = docs();
    let readme = readme();
    for kubectl in portway_testkit::kubectls() {
        let kubectl = portway_testkit::Kubectl::new(kubectl, &kc);
        // (apiVersion, kind) served, from discovery: NAME [SHORTNAMES] APIVERSION
        // NAMESPACED KIND.
        let served: BTreeSet<(String, String)> = kubectl
            .ok(&["api-resources", "--no-headers"], None)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 4).then(|| (f[f.len() - 3].to_owned(), f[f.len() - 1].to_owned()))
            })
            .collect();
        let mut unserved = BTreeSet::new();
        for d in &docs {
            let key = (
                d.value["apiVersion"].as_str().unwrap().to_owned(),
                d.kind().to_owned(),
            );
            if !served.contains(&key) {
                unserved.insert(key.1);
                continue;
            }
            let yaml = serde_yaml::to_string(&d.value).unwrap();
            // kubectl before 1.26 looks for `dryRun` in the server's OpenAPI v2 document
            // before a server dry run, and Portway's is empty (see the notes on kubectl
            // 1.20): with it, the server checks the object as it is applied for real.
            let dry_run = if kubectl.minor() >= 26 {
                "--dry-run=server"
            } else {
                "--dry-run=none"
            };
            let (ok, out, err) = kubectl.run(&["apply", dry_run, "-f", "-"], Some(&yaml));
            assert!(ok, "{} {}: {out}{err}", d.at, d.name());
            // The namespace for real, so the namespaced documents after it can be tried.
            if d.kind() == "Namespace" {
                kubectl.ok(&["apply", "-f", "-"], Some(&yaml));
            }
        }
        for kind in &unserved {
            assert!(
                readme.contains(kind.as_str()),
                "{kind} is not served by portway apiserver, so README.md must say it is checked by structure only"
            );
        }
        assert!(
            docs.iter().any(|d| d.kind() == "Service"),
            "no Service was dry-run"
        );
    }
}
