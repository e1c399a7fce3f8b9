//! The kinds this server serves: names, scope, printer columns, schema and decoding.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use gateway_api::apis::experimental::tcproutes::TcpRoute;
use gateway_api::apis::experimental::tlsroutes::TlsRoute;
use gateway_api::apis::experimental::udproutes::UdpRoute;
use gateway_api::apis::standard::gatewayclasses::GatewayClass;
use gateway_api::apis::standard::gateways::Gateway;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::CustomResourceExt;
use portway_api::validation::validate_meta;
use portway_api::{
    AccessPolicy, BackendTrafficPolicy, Connector, ConnectorAdvertisement, ConnectorClass,
    FieldError, FieldErrorKind, HttpProxy, TcpProxy, Validate,
};
use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::protobuf::{self, Message};

/// A printer column, as in a CRD's `additionalPrinterColumns`.
#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    pub type_: String,
    pub json_path: String,
    pub description: String,
    pub priority: i32,
}

/// How strategic merge patch treats a list at a path (keys only, no indices).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListStrategy {
    Replace,
    MergeByKey(&'static str),
    Union,
}

/// The outcome of decoding a body into its typed form and back.
pub struct Decoded {
    /// The canonical object: what the type serialises to, defaults applied.
    pub value: Value,
    /// Paths present in the input that the type does not know.
    pub unknown: Vec<String>,
    /// Validation failures of metadata, spec and status.
    pub errors: Vec<FieldError>,
}

/// One served resource.
#[derive(Debug)]
pub struct ResourceType {
    /// Index in the registry; identifies the kind in the store.
    pub id: usize,
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: String,
    pub short_names: Vec<String>,
    pub namespaced: bool,
    /// Whether `/status` is a separate subresource (writes to the main resource keep status).
    pub status: bool,
    pub columns: Vec<Column>,
    /// Field selector paths beyond `metadata.name` and `metadata.namespace`.
    pub field_selectors: &'static [&'static str],
    /// Lists with merge keys for strategic merge patch; `None` means strategic merge patch
    /// is refused with 415 (custom resources, as in Kubernetes).
    pub strategic: Option<&'static [(&'static str, ListStrategy)]>,
    /// The Kubernetes protobuf message of a built-in kind; `None` (custom resources, as in
    /// Kubernetes) answers protobuf bodies with 415.
    pub proto: Option<&'static Message>,
    decode: fn(&Value) -> Result<Decoded, FieldError>,
    schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
}

impl ResourceType {
    /// `group/version`, or `v1` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural.group` (or `plural`), the name Kubernetes uses in messages and we use as the
    /// storage key.
    pub fn key(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Decodes through the Rust type: type errors, unknown fields, defaults, validation.
    ///
    /// # Errors
    /// A field error when the body does not fit the type at all.
    pub fn decode(&self, value: &Value) -> Result<Decoded, FieldError> {
        (self.decode)(value)
    }

    pub fn schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        (self.schema)(generator)
    }

    pub fn list_strategy(&self, path: &str) -> ListStrategy {
        const META: &[(&str, ListStrategy)] = &[
            ("metadata.ownerReferences", ListStrategy::MergeByKey("uid")),
            ("metadata.finalizers", ListStrategy::Union),
        ];
        META.iter()
            .chain(self.strategic.unwrap_or_default())
            .find(|(p, _)| *p == path)
            .map_or(ListStrategy::Replace, |(_, s)| *s)
    }
}

fn decode<K>(value: &Value) -> Result<Decoded, FieldError>
where
    K: DeserializeOwned + Serialize + Validate + kube::Resource,
{
    let typed: K = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        FieldError {
            field: if path == "." { "<body>".into() } else { path },
            kind: FieldErrorKind::Invalid,
            message: e.into_inner().to_string(),
        }
    })?;
    let canonical = serde_json::to_value(&typed).map_err(|e| FieldError {
        field: "<body>".into(),
        kind: FieldErrorKind::Invalid,
        message: e.to_string(),
    })?;
    let mut unknown = Vec::new();
    unknown_fields(value, &canonical, String::new(), &mut unknown);
    let mut errors = validate_meta(typed.meta(), K::NAME_RULE);
    errors.extend(typed.validate());
    Ok(Decoded {
        value: canonical,
        unknown,
        errors,
    })
}

/// Paths set in `input` but absent after the round trip through the type. Empty lists and
/// maps are not reported: the types leave them out when serialising.
fn unknown_fields(input: &Value, canonical: &Value, path: String, out: &mut Vec<String>) {
    match (input, canonical) {
        (Value::Object(inp), Value::Object(can)) => {
            for (k, v) in inp {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match can.get(k) {
                    Some(c) => unknown_fields(v, c, p, out),
                    None if is_empty(v) => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(inp), Value::Array(can)) if inp.len() == can.len() => {
            for (i, (a, b)) in inp.iter().zip(can).enumerate() {
                unknown_fields(a, b, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn schema<K: JsonSchema>(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    generator.subschema_for::<K>()
}

fn column(name: &str, type_: &str, json_path: &str) -> Column {
    Column {
        name: name.into(),
        type_: type_.into(),
        json_path: json_path.into(),
        description: String::new(),
        priority: 0,
    }
}

fn age() -> Column {
    column("Age", "date", ".metadata.creationTimestamp")
}

struct Builtin {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    short_names: &'static [&'static str],
    namespaced: bool,
    status: bool,
    columns: Vec<Column>,
    strategic: Option<&'static [(&'static str, ListStrategy)]>,
    proto: Option<&'static Message>,
    field_selectors: &'static [&'static str],
}

fn builtin<K>(b: Builtin) -> ResourceType
where
    K: DeserializeOwned + Serialize + Validate + kube::Resource + JsonSchema,
{
    let mut columns = b.columns;
    // An Event's age is its Last Seen (as in Kubernetes, which shows no Age for them).
    if b.kind != "Event" {
        columns.push(age());
    }
    ResourceType {
        id: 0,
        group: b.group,
        version: b.version,
        kind: b.kind,
        plural: b.plural,
        singular: b.kind.to_lowercase(),
        short_names: b.short_names.iter().map(|s| s.to_string()).collect(),
        namespaced: b.namespaced,
        status: b.status,
        columns,
        field_selectors: b.field_selectors,
        strategic: b.strategic,
        proto: b.proto,
        decode: decode::<K>,
        schema: schema::<K>,
    }
}

/// A custom resource: names, scope, columns and subresources come from its CRD.
fn custom<K>(field_selectors: &'static [&'static str]) -> ResourceType
where
    K: DeserializeOwned
        + Serialize
        + Validate
        + kube::Resource<DynamicType = ()>
        + JsonSchema
        + CustomResourceExt,
{
    let crd = K::crd();
    let version = &crd.spec.versions[0];
    let columns = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| Column {
            name: c.name.clone(),
            type_: c.type_.clone(),
            json_path: c.json_path.clone(),
            description: c.description.clone().unwrap_or_default(),
            priority: c.priority.unwrap_or(0),
        })
        .collect();
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    ResourceType {
        id: 0,
        group: leak(K::group(&()).into_owned()),
        version: leak(K::version(&()).into_owned()),
        kind: leak(K::kind(&()).into_owned()),
        plural: leak(K::plural(&()).into_owned()),
        singular: crd
            .spec
            .names
            .singular
            .clone()
            .unwrap_or_else(|| K::kind(&()).to_lowercase()),
        short_names: crd.spec.names.short_names.clone().unwrap_or_default(),
        namespaced: crd.spec.scope == "Namespaced",
        status: version
            .subresources
            .as_ref()
            .is_some_and(|s| s.status.is_some()),
        columns,
        field_selectors,
        strategic: None,
        proto: None,
        decode: decode::<K>,
        schema: schema::<K>,
    }
}

/// Every served kind, looked up by storage key, by `(apiVersion, kind)` or by URL.
pub struct Registry {
    types: Vec<ResourceType>,
    by_key: BTreeMap<String, usize>,
}

pub type Res = &'static ResourceType;

static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::build);

/// The process-wide registry (the kinds are fixed at compile time).
pub fn registry() -> &'static Registry {
    &REGISTRY
}

impl Registry {
    fn build() -> Self {
        let status = |conds: &str| format!(".status.conditions[?(@.type==\"{conds}\")].status");
        let types = vec![
            builtin::<Namespace>(Builtin {
                group: "",
                version: "v1",
                kind: "Namespace",
                plural: "namespaces",
                short_names: &["ns"],
                namespaced: false,
                status: true,
                columns: vec![column("Status", "string", ".status.phase")],
                strategic: Some(&[]),
                proto: Some(&protobuf::NAMESPACE),
                field_selectors: &[],
            }),
            builtin::<Service>(Builtin {
                group: "",
                version: "v1",
                kind: "Service",
                plural: "services",
                short_names: &["svc"],
                namespaced: true,
                status: true,
                columns: vec![
                    column("Type", "string", ".spec.type"),
                    column("Ports", "string", ".spec.ports[*].port"),
                ],
                strategic: Some(&[("spec.ports", ListStrategy::MergeByKey("port"))]),
                proto: Some(&protobuf::SERVICE),
                field_selectors: &[],
            }),
            builtin::<Secret>(Builtin {
                group: "",
                version: "v1",
                kind: "Secret",
                plural: "secrets",
                short_names: &[],
                namespaced: true,
                status: false,
                columns: vec![
                    column("Type", "string", ".type"),
                    column("Data", crate::table::COUNT, ".data"),
                ],
                strategic: Some(&[]),
                proto: Some(&protobuf::SECRET),
                field_selectors: &["type"],
            }),
            builtin::<Lease>(Builtin {
                group: "coordination.k8s.io",
                version: "v1",
                kind: "Lease",
                plural: "leases",
                short_names: &[],
                namespaced: true,
                status: false,
                columns: vec![
                    column("Holder", "string", ".spec.holderIdentity"),
                    column("Renewed", "date", ".spec.renewTime"),
                ],
                strategic: Some(&[]),
                proto: Some(&protobuf::LEASE),
                field_selectors: &[],
            }),
            builtin::<EndpointSlice>(Builtin {
                group: "discovery.k8s.io",
                version: "v1",
                kind: "EndpointSlice",
                plural: "endpointslices",
                short_names: &[],
                namespaced: true,
                status: false,
                columns: vec![
                    column("AddressType", "string", ".addressType"),
                    column("Ports", "string", ".ports[*].port"),
                    column("Endpoints", "string", ".endpoints[*].addresses[0]"),
                    column("Ready", "string", ".endpoints[*].conditions.ready"),
                ],
                strategic: Some(&[]),
                proto: Some(&protobuf::ENDPOINT_SLICE),
                field_selectors: &[],
            }),
            builtin::<GatewayClass>(Builtin {
                group: "gateway.networking.k8s.io",
                version: "v1",
                kind: "GatewayClass",
                plural: "gatewayclasses",
                short_names: &["gc"],
                namespaced: false,
                status: true,
                columns: vec![
                    column("Controller", "string", ".spec.controllerName"),
                    column("Accepted", "string", &status("Accepted")),
                ],
                strategic: None,
                // Gateway API kinds are custom resources in Kubernetes too.
                proto: None,
                field_selectors: &[],
            }),
            builtin::<Gateway>(Builtin {
                group: "gateway.networking.k8s.io",
                version: "v1",
                kind: "Gateway",
                plural: "gateways",
                short_names: &["gtw"],
                namespaced: true,
                status: true,
                columns: vec![
                    column("Class", "string", ".spec.gatewayClassName"),
                    column("Programmed", "string", &status("Programmed")),
                ],
                strategic: None,
                proto: None,
                field_selectors: &[],
            }),
            builtin::<HttpRoute>(Builtin {
                group: "gateway.networking.k8s.io",
                version: "v1",
                kind: "HTTPRoute",
                plural: "httproutes",
                short_names: &[],
                namespaced: true,
                status: true,
                columns: vec![column("Hostnames", "string", ".spec.hostnames")],
                strategic: None,
                proto: None,
                field_selectors: &[],
            }),
            // Gateway API's experimental channel: the routes of TCPProxies.
            builtin::<TcpRoute>(Builtin {
                group: "gateway.networking.k8s.io",
                version: "v1alpha2",
                kind: "TCPRoute",
                plural: "tcproutes",
                short_names: &[],
                namespaced: true,
                status: true,
                columns: vec![],
                strategic: None,
                proto: None,
                field_selectors: &[],
            }),
            // The routes of TCPProxies with udp:// backends.
            builtin::<UdpRoute>(Builtin {
                group: "gateway.networking.k8s.io",
                version: "v1alpha2",
                kind: "UDPRoute",
                plural: "udproutes",
                short_names: &[],
                namespaced: true,
                status: true,
                columns: vec![],
                strategic: None,
                proto: None,
                field_selectors: &[],
            }),
            // The routes of TLS passthrough TCPProxies (v1 since Gateway API 1.5).
            builtin::<TlsRoute>(Builtin {
                group: "gateway.networking.k8s.io",
                version: "v1",
                kind: "TLSRoute",
                plural: "tlsroutes",
                short_names: &[],
                namespaced: true,
                status: true,
                columns: vec![column("Hostnames", "string", ".spec.hostnames")],
                strategic: None,
                proto: None,
                field_selectors: &[],
            }),
            // One record under two APIs (see `events`): kube-rs writes events.k8s.io,
            // kubectl reads core/v1.
            builtin::<k8s_openapi::api::core::v1::Event>(Builtin {
                group: "",
                version: "v1",
                kind: "Event",
                plural: "events",
                short_names: &["ev"],
                namespaced: true,
                status: false,
                columns: vec![
                    column("Last Seen", "date", ".lastTimestamp"),
                    column("Type", "string", ".type"),
                    column("Reason", "string", ".reason"),
                    column("Object", crate::table::OBJECT_REF, ".involvedObject"),
                    column("Message", "string", ".message"),
                    Column {
                        priority: 1,
                        ..column("Source", "string", ".source.component")
                    },
                    Column {
                        priority: 1,
                        ..column("Count", "integer", ".count")
                    },
                ],
                strategic: Some(&[]),
                proto: None,
                field_selectors: &[
                    "involvedObject.kind",
                    "involvedObject.namespace",
                    "involvedObject.name",
                    "involvedObject.uid",
                    "involvedObject.apiVersion",
                    "involvedObject.resourceVersion",
                    "involvedObject.fieldPath",
                    "reason",
                    "reportingComponent",
                    "type",
                ],
            }),
            builtin::<k8s_openapi::api::events::v1::Event>(Builtin {
                group: "events.k8s.io",
                version: "v1",
                kind: "Event",
                plural: "events",
                short_names: &["ev"],
                namespaced: true,
                status: false,
                columns: vec![
                    column("Type", "string", ".type"),
                    column("Reason", "string", ".reason"),
                    column("Object", crate::table::OBJECT_REF, ".regarding"),
                    column("Note", "string", ".note"),
                ],
                strategic: Some(&[]),
                proto: None,
                field_selectors: &[
                    "regarding.kind",
                    "regarding.namespace",
                    "regarding.name",
                    "regarding.uid",
                    "reason",
                    "reportingController",
                    "type",
                ],
            }),
            custom::<ConnectorClass>(&[]),
            custom::<Connector>(&[
                "spec.connectorClassName",
                "status.connectionDetails.publicKey.id",
            ]),
            custom::<ConnectorAdvertisement>(&["spec.connectorRef.name"]),
            custom::<HttpProxy>(&[]),
            custom::<TcpProxy>(&[]),
            custom::<BackendTrafficPolicy>(&[]),
            custom::<AccessPolicy>(&[]),
        ];
        let mut types = types;
        for (i, t) in types.iter_mut().enumerate() {
            t.id = i;
        }
        debug_assert_eq!(types[0].kind, "Namespace");
        let by_key = types
            .iter()
            .enumerate()
            .map(|(i, t)| (t.key(), i))
            .collect();
        Self { types, by_key }
    }

    pub fn all(&'static self) -> impl Iterator<Item = Res> {
        self.types.iter()
    }

    /// The Namespace kind (registered first).
    pub fn namespaces(&'static self) -> Res {
        &self.types[0]
    }

    pub fn by_key(&'static self, key: &str) -> Option<Res> {
        self.by_key.get(key).map(|&i| &self.types[i])
    }

    /// The resource served at `/{api|apis/group}/{version}/.../{plural}`.
    pub fn by_path(&'static self, group: &str, version: &str, plural: &str) -> Option<Res> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
    }

    pub fn by_kind(&'static self, api_version: &str, kind: &str) -> Option<Res> {
        self.types
            .iter()
            .find(|t| t.kind == kind && t.api_version() == api_version)
    }

    /// Group names in discovery order (core excluded), each with its versions.
    pub fn groups(&'static self) -> Vec<(&'static str, Vec<&'static str>)> {
        let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
        for t in self.types.iter().filter(|t| !t.group.is_empty()) {
            match out.iter_mut().find(|(g, _)| *g == t.group) {
                Some((_, versions)) if !versions.contains(&t.version) => versions.push(t.version),
                Some(_) => {}
                None => out.push((t.group, vec![t.version])),
            }
        }
        out
    }

    pub fn in_group_version(&'static self, group: &str, version: &str) -> Vec<Res> {
        self.types
            .iter()
            .filter(|t| t.group == group && t.version == version)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn custom_resources_take_names_from_their_crd() {
        let reg = registry();
        let conn = reg.by_key("connectors.networking.datumapis.com").unwrap();
        assert!(conn.namespaced && conn.status);
        assert_eq!(conn.short_names, ["conn"]);
        let names = |wide: bool| {
            conn.columns
                .iter()
                .filter(|c| (c.priority > 0) == wide)
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(false), ["Ready", "Node-ID", "Relay", "Age"]);
        assert_eq!(names(true), ["Class", "Addresses"]);
        let proxy = reg
            .by_path("networking.datumapis.com", "v1alpha", "httpproxies")
            .unwrap();
        assert_eq!(proxy.kind, "HTTPProxy");
        assert!(
            !reg.by_key("connectorclasses.networking.datumapis.com")
                .unwrap()
                .namespaced
        );
        assert_eq!(reg.groups()[0].0, "coordination.k8s.io");
        let tcp = reg
            .by_path("networking.datumapis.com", "v1alpha", "tcpproxies")
            .unwrap();
        assert_eq!((tcp.kind, tcp.singular.as_str()), ("TCPProxy", "tcpproxy"));
        assert!(tcp.namespaced && tcp.status);
        assert_eq!(tcp.short_names, ["tcpp"]);
        let columns: Vec<&str> = tcp.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            columns,
            [
                "Port",
                "Hostnames",
                "Accepted",
                "Programmed",
                "Age",
                "BackendsReady"
            ]
        );
    }

    #[test]
    fn tcp_routes_are_served_beside_the_v1_routes() {
        let reg = registry();
        let route = reg
            .by_kind("gateway.networking.k8s.io/v1alpha2", "TCPRoute")
            .unwrap();
        assert_eq!(route.key(), "tcproutes.gateway.networking.k8s.io");
        assert!(route.namespaced && route.status);
        let tls = reg
            .by_kind("gateway.networking.k8s.io/v1", "TLSRoute")
            .unwrap();
        assert_eq!(tls.key(), "tlsroutes.gateway.networking.k8s.io");
        assert!(tls.namespaced && tls.status);
        let gateway_api = reg
            .groups()
            .into_iter()
            .find(|(g, _)| *g == "gateway.networking.k8s.io")
            .unwrap();
        assert_eq!(gateway_api.1, ["v1", "v1alpha2"], "v1 stays preferred");
        let body = json!({
            "apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
            "metadata": {"name": "ssh"},
            "spec": {"parentRefs": [{"name": "ssh", "sectionName": "tcp"}],
                "rules": [{"backendRefs": [{"name": "ssh-0", "port": 22, "weight": 1}]}]},
        });
        let d = route.decode(&body).unwrap();
        assert!(
            d.unknown.is_empty() && d.errors.is_empty(),
            "{:?}",
            d.errors
        );
    }

    #[test]
    fn decode_reports_unknown_fields_and_type_errors() {
        let conn = registry()
            .by_key("connectors.networking.datumapis.com")
            .unwrap();
        let body = json!({
            "apiVersion": "networking.datumapis.com/v1alpha1", "kind": "Connector",
            "metadata": {"name": "c1"},
            "spec": {"connectorClassName": "portway", "bogus": 1, "capabilities": []},
        });
        let d = conn.decode(&body).unwrap();
        assert_eq!(d.unknown, ["spec.bogus"]);
        assert!(d.errors.is_empty());
        let bad = json!({"apiVersion": "x", "kind": "Connector", "metadata": {"name": "c1"}, "spec": {"connectorClassName": 5}});
        let err = conn.decode(&bad).err().unwrap();
        assert_eq!(err.field, "spec.connectorClassName");
        // A capability Portway does not implement is refused, not stored.
        let unknown_capability = json!({"apiVersion": "x", "kind": "Connector", "metadata": {"name": "c1"},
            "spec": {"connectorClassName": "portway", "capabilities": [{"type": "ConnectUDP"}]}});
        let err = conn.decode(&unknown_capability).err().unwrap();
        assert!(err.field.starts_with("spec.capabilities"), "{err:?}");
    }

    #[test]
    fn proxy_rules_get_default_matches() {
        let proxy = registry()
            .by_key("httpproxies.networking.datumapis.com")
            .unwrap();
        let body = json!({
            "apiVersion": "networking.datumapis.com/v1alpha", "kind": "HTTPProxy",
            "metadata": {"name": "p"}, "spec": {"rules": [{"backends": [{"endpoint": "http://127.0.0.1:3000"}]}]},
        });
        let d = proxy.decode(&body).unwrap();
        assert_eq!(
            d.value["spec"]["rules"][0]["matches"][0]["path"]["value"],
            "/"
        );
        assert!(d.errors.is_empty(), "{:?}", d.errors);
    }
}
