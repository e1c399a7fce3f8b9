//! Discovery (`/version`, `/api`, `/apis`, per group-version lists, aggregated v2) and
//! OpenAPI documents built from the registered types' schemas.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::LazyLock;

use serde_json::{Value, json};

use crate::registry::{Res, registry};

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const STATUS_VERBS: [&str; 3] = ["get", "patch", "update"];

/// A resource served without the store, all cluster-scoped.
pub struct Fixed {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub verbs: &'static [&'static str],
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
}

/// The reviews behind `kubectl auth can-i` and `kubectl auth whoami`, and the read-only
/// view of Portway's CustomResourceDefinitions, listed as kube-apiserver lists them (but
/// with only the verbs served).
pub const FIXED: [Fixed; 3] = [
    Fixed {
        group: "authentication.k8s.io",
        version: "v1",
        plural: "selfsubjectreviews",
        singular: "selfsubjectreview",
        kind: "SelfSubjectReview",
        verbs: &["create"],
        short_names: &[],
        categories: &[],
    },
    Fixed {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "selfsubjectaccessreviews",
        singular: "selfsubjectaccessreview",
        kind: "SelfSubjectAccessReview",
        verbs: &["create"],
        short_names: &[],
        categories: &[],
    },
    Fixed {
        group: "apiextensions.k8s.io",
        version: "v1",
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        kind: "CustomResourceDefinition",
        verbs: &["get", "list"],
        short_names: &["crd", "crds"],
        categories: &["api-extensions"],
    },
];

/// The fixed resource served at `group`/`plural`, if any.
pub fn fixed(group: &str, plural: &str) -> Option<&'static Fixed> {
    FIXED
        .iter()
        .find(|f| f.group == group && f.plural == plural)
}

/// Group names in discovery order (core excluded), each with its versions: the stored
/// kinds' groups, then the fixed resources' groups.
fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out = registry().groups();
    out.extend(FIXED.iter().map(|f| (f.group, vec![f.version])));
    out
}

fn fixed_in(group: &str, version: &str) -> impl Iterator<Item = &'static Fixed> {
    FIXED
        .iter()
        .filter(move |f| f.group == group && f.version == version)
}

/// `shortNames` and `categories`, when there are any.
fn names(r: &mut Value, f: &Fixed) {
    if !f.short_names.is_empty() {
        r["shortNames"] = json!(f.short_names);
    }
    if !f.categories.is_empty() {
        r["categories"] = json!(f.categories);
    }
}

/// The `Content-Type` of aggregated discovery, when the client asked for it.
pub fn aggregated_content_type(accept: &str) -> Option<&'static str> {
    let wants = |v: &str| {
        let version = format!("v={v}");
        accept.split(',').any(|part| {
            let params: Vec<&str> = part.split(';').map(str::trim).collect();
            params.contains(&"g=apidiscovery.k8s.io")
                && params.contains(&"as=APIGroupDiscoveryList")
                && params.contains(&version.as_str())
        })
    };
    if wants("v2") {
        Some("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList")
    } else if wants("v2beta1") {
        Some("application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList")
    } else {
        None
    }
}

pub fn version() -> Value {
    json!({
        "major": "1", "minor": "32",
        "gitVersion": concat!("v1.32.0+portway-", env!("CARGO_PKG_VERSION")),
        "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
        "goVersion": "", "compiler": "rustc", "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
    })
}

pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups()
        .into_iter()
        .map(|(g, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(group: &str) -> Option<Value> {
    let (g, versions) = groups().into_iter().find(|(g, _)| *g == group)?;
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    Some(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": versions, "preferredVersion": versions[0]}),
    )
}

/// `APIResourceList` for a group-version, or `None` if nothing is served there.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for t in registry().in_group_version(group, version) {
        resources.push(json!({
            "name": t.plural, "singularName": t.singular, "namespaced": t.namespaced, "kind": t.kind,
            "verbs": VERBS, "shortNames": t.short_names, "categories": ["portway"],
        }));
        if t.status {
            resources.push(json!({
                "name": format!("{}/status", t.plural), "singularName": "", "namespaced": t.namespaced,
                "kind": t.kind, "verbs": STATUS_VERBS,
            }));
        }
    }
    for f in fixed_in(group, version) {
        let mut r = json!({
            "name": f.plural, "singularName": f.singular, "namespaced": false, "kind": f.kind,
            "verbs": f.verbs,
        });
        names(&mut r, f);
        resources.push(r);
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

fn aggregated_fixed(f: &Fixed) -> Value {
    let mut r = json!({
        "resource": f.plural,
        "responseKind": {"group": f.group, "version": f.version, "kind": f.kind},
        "scope": "Cluster", "singularResource": f.singular, "verbs": f.verbs,
    });
    names(&mut r, f);
    r
}

fn aggregated_resource(t: Res) -> Value {
    let kind = json!({"group": t.group, "version": t.version, "kind": t.kind});
    let mut r = json!({
        "resource": t.plural, "responseKind": kind,
        "scope": if t.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": t.singular, "verbs": VERBS, "shortNames": t.short_names, "categories": ["portway"],
    });
    if t.status {
        r["subresources"] =
            json!([{"subresource": "status", "responseKind": kind, "verbs": STATUS_VERBS}]);
    }
    r
}

/// Aggregated discovery for `/api` (`core`) or `/apis`.
pub fn aggregated(core: bool, content_type: &str) -> Value {
    let api_version = if content_type.contains("v=v2beta1") {
        "apidiscovery.k8s.io/v2beta1"
    } else {
        "apidiscovery.k8s.io/v2"
    };
    let reg = registry();
    let item = |name: &str, versions: Vec<&str>| {
        let versions: Vec<Value> = versions
            .into_iter()
            .map(|v| {
                let resources: Vec<Value> = reg
                    .in_group_version(name, v)
                    .into_iter()
                    .map(aggregated_resource)
                    .chain(fixed_in(name, v).map(aggregated_fixed))
                    .collect();
                json!({"version": v, "resources": resources, "freshness": "Current"})
            })
            .collect();
        json!({"metadata": {"name": name}, "versions": versions})
    };
    let items: Vec<Value> = if core {
        vec![item("", vec!["v1"])]
    } else {
        groups().into_iter().map(|(g, vs)| item(g, vs)).collect()
    };
    json!({"apiVersion": api_version, "kind": "APIGroupDiscoveryList", "metadata": {}, "items": items})
}

/// Group-version documents for OpenAPI v3, keyed `api/v1` or `apis/{group}/{version}`.
struct OpenApi {
    docs: Vec<(String, Value, String)>,
}

static OPENAPI: LazyLock<OpenApi> = LazyLock::new(|| {
    let reg = registry();
    let mut gvs: Vec<(&str, &str)> = vec![("", "v1")];
    for (g, versions) in reg.groups() {
        gvs.extend(versions.into_iter().map(|v| (g, v)));
    }
    let docs = gvs
        .into_iter()
        .map(|(g, v)| {
            let key = if g.is_empty() {
                "api/v1".to_owned()
            } else {
                format!("apis/{g}/{v}")
            };
            let doc = group_version_doc(g, v, &key);
            let mut h = DefaultHasher::new();
            doc.to_string().hash(&mut h);
            (key, doc, format!("{:016X}", h.finish()))
        })
        .collect();
    OpenApi { docs }
});

fn group_version_doc(group: &str, version: &str, key: &str) -> Value {
    let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
    let mut paths = serde_json::Map::new();
    let field_validation = json!({"name": "fieldValidation", "in": "query", "schema": {"type": "string"}, "uniqueItems": true,
        "description": "Strict (default here) rejects unknown fields, Warn and Ignore drop them."});
    for t in registry().in_group_version(group, version) {
        let schema = t.schema(&mut generator);
        let gvk = json!({"group": t.group, "version": t.version, "kind": t.kind});
        let op = |action: &str, extra: Value| {
            let mut o = json!({
                "operationId": format!("{action}{}", t.kind),
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": schema}}}},
            });
            if let (Some(o), Some(extra)) = (o.as_object_mut(), extra.as_object()) {
                o.extend(extra.clone());
            }
            o
        };
        let ns = if t.namespaced {
            "/namespaces/{namespace}"
        } else {
            ""
        };
        let base = format!("/{key}{ns}/{}", t.plural);
        paths.insert(
            base.clone(),
            json!({
                "get": op("list", json!({})),
                "post": op("post", json!({"parameters": [field_validation]})),
                "delete": op("deletecollection", json!({})),
            }),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({
                "get": op("get", json!({})),
                "put": op("put", json!({"parameters": [field_validation]})),
                "patch": op("patch", json!({"parameters": [field_validation]})),
                "delete": op("delete", json!({})),
            }),
        );
    }
    let mut schemas = generator.take_definitions(true);
    for t in registry().in_group_version(group, version) {
        // Tag each kind's schema with its GVK, as kube-openapi does, so clients can find it.
        let mut g = schemars::generate::SchemaSettings::openapi3().into_generator();
        let reference = t.schema(&mut g);
        if let Some(name) = reference
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.rsplit('/').next())
            && let Some(Value::Object(s)) = schemas.get_mut(name)
        {
            s.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": t.group, "version": t.version, "kind": t.kind}]),
            );
        }
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Portway", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

pub fn openapi_v3_root() -> Value {
    let paths: serde_json::Map<String, Value> = OPENAPI
        .docs
        .iter()
        .map(|(key, _, hash)| {
            (
                key.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash={hash}")}),
            )
        })
        .collect();
    json!({"paths": paths})
}

pub fn openapi_v3_doc(key: &str) -> Option<&'static Value> {
    OPENAPI
        .docs
        .iter()
        .find(|(k, _, _)| k == key)
        .map(|(_, doc, _)| doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregated_is_only_for_clients_that_ask() {
        let kubectl = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(
            aggregated_content_type(kubectl),
            Some("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList")
        );
        assert_eq!(aggregated_content_type("application/json, */*"), None);
        let doc = aggregated(false, "v=v2");
        let first = &doc["items"][0];
        assert_eq!(first["metadata"]["name"], "coordination.k8s.io");
        assert_eq!(first["versions"][0]["resources"][0]["scope"], "Namespaced");
    }

    #[test]
    fn resource_lists_include_status_subresources() {
        let list = resource_list("networking.datumapis.com", "v1alpha1").unwrap();
        let names: Vec<&str> = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"connectors") && names.contains(&"connectors/status"));
        assert!(resource_list("networking.datumapis.com", "v9").is_none());
    }

    #[test]
    fn reviews_and_crds_are_listed_as_kube_apiserver_lists_them() {
        let groups = api_group_list();
        let names: Vec<&str> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        for g in [
            "authentication.k8s.io",
            "authorization.k8s.io",
            "apiextensions.k8s.io",
        ] {
            assert_eq!(names.iter().filter(|n| **n == g).count(), 1, "{names:?}");
        }
        let list = resource_list("authorization.k8s.io", "v1").unwrap();
        assert_eq!(
            list["resources"],
            json!([{"name": "selfsubjectaccessreviews", "singularName": "selfsubjectaccessreview",
                    "namespaced": false, "kind": "SelfSubjectAccessReview", "verbs": ["create"]}])
        );
        let crds = &resource_list("apiextensions.k8s.io", "v1").unwrap()["resources"][0];
        assert_eq!(crds["verbs"], json!(["get", "list"]));
        assert_eq!(crds["shortNames"], json!(["crd", "crds"]));
        let doc = aggregated(false, "v=v2");
        let item = doc["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["metadata"]["name"] == "authentication.k8s.io")
            .unwrap();
        assert_eq!(
            item["versions"][0]["resources"][0],
            json!({"resource": "selfsubjectreviews", "scope": "Cluster",
                   "responseKind": {"group": "authentication.k8s.io", "version": "v1", "kind": "SelfSubjectReview"},
                   "singularResource": "selfsubjectreview", "verbs": ["create"]})
        );
        assert!(api_group("authorization.k8s.io").is_some());
    }

    /// TCPRoute and UDPRoute are served from Gateway API's experimental version beside
    /// the v1 kinds (TLSRoute among them), which stays the group's preferred version.
    #[test]
    fn tcp_routes_and_proxies_are_discovered() {
        let group = api_group("gateway.networking.k8s.io").unwrap();
        assert_eq!(group["preferredVersion"]["version"], "v1");
        assert_eq!(
            group["versions"][1]["groupVersion"],
            "gateway.networking.k8s.io/v1alpha2"
        );
        let names = |group: &str, version: &str| -> Vec<String> {
            resource_list(group, version).unwrap()["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            names("gateway.networking.k8s.io", "v1alpha2"),
            [
                "tcproutes",
                "tcproutes/status",
                "udproutes",
                "udproutes/status"
            ]
        );
        let proxies = names("networking.datumapis.com", "v1alpha");
        assert!(
            proxies.contains(&"tcpproxies".to_owned())
                && proxies.contains(&"tcpproxies/status".to_owned()),
            "{proxies:?}"
        );
        let doc = aggregated(false, "v=v2");
        let versions: Vec<&str> = doc["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["metadata"]["name"] == "gateway.networking.k8s.io")
            .unwrap()["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["version"].as_str().unwrap())
            .collect();
        assert_eq!(versions, ["v1", "v1alpha2"]);
        assert!(openapi_v3_doc("apis/gateway.networking.k8s.io/v1alpha2").is_some());
    }

    #[test]
    fn openapi_docs_tag_kinds() {
        let root = openapi_v3_root();
        assert!(
            root["paths"]["apis/networking.datumapis.com/v1alpha1"]["serverRelativeURL"]
                .as_str()
                .unwrap()
                .contains("?hash=")
        );
        let doc = openapi_v3_doc("apis/networking.datumapis.com/v1alpha1").unwrap();
        let patch = &doc["paths"]["/apis/networking.datumapis.com/v1alpha1/namespaces/{namespace}/connectors/{name}"]
            ["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "Connector"
        );
        assert_eq!(patch["parameters"][0]["name"], "fieldValidation");
        assert!(
            doc["components"]["schemas"]["Connector"]["x-kubernetes-group-version-kind"].is_array()
        );
    }
}
