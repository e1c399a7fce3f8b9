//! `HTTPProxy`: public hostnames routed through connectors to targets on devices.

use gateway_api::apis::standard::gateways::GatewayStatusAddresses;
use gateway_api::apis::standard::httproutes::{
    HttpRouteRulesBackendRefsFilters, HttpRouteRulesFilters, HttpRouteRulesMatches,
    HttpRouteRulesMatchesPath, HttpRouteRulesMatchesPathType,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Publishes `hostnames`; each rule matches requests and sends them to backends, each a
/// target URL on a device reached through a connector chosen by name or by labels.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "networking.datumapis.com",
    version = "v1alpha",
    kind = "HTTPProxy",
    root = "HttpProxy",
    plural = "httpproxies",
    singular = "httpproxy",
    namespaced,
    status = "HttpProxyStatus",
    shortname = "proxy",
    derive = "Default",
    derive = "PartialEq",
    printcolumn(name = "Hostnames", type_ = "string", json_path = ".spec.hostnames"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Programmed",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Programmed\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "BackendsReady",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"BackendsReady\")].status",
        description = "True while at least one backend's connector is Ready.",
        priority = 1
    ),
    printcolumn(
        name = "Canonical-Hostname",
        type_ = "string",
        json_path = ".status.canonicalHostname",
        description = "A hostname that always routes to this proxy.",
        priority = 1
    ),
    printcolumn(
        name = "Addresses",
        type_ = "string",
        json_path = ".status.addresses[*].value",
        description = "The addresses the gateway serving this proxy reported.",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct HttpProxySpec {
    /// Public hostnames (`app.example.com`, or `*.example.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    pub rules: Vec<HttpProxyRule>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpProxyRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Gateway API matches; absent means `PathPrefix /`.
    #[serde(default = "default_matches")]
    pub matches: Vec<HttpRouteRulesMatches>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteRulesFilters>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<HttpProxyBackend>,
}

/// The default match of a rule: every path.
pub fn default_matches() -> Vec<HttpRouteRulesMatches> {
    vec![HttpRouteRulesMatches {
        path: Some(HttpRouteRulesMatchesPath {
            r#type: Some(HttpRouteRulesMatchesPathType::PathPrefix),
            value: Some("/".into()),
        }),
        ..Default::default()
    }]
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpProxyBackend {
    /// Where the device sends the request, e.g. `http://127.0.0.1:3000`; without a
    /// connector, the origin the edge reaches itself, e.g. `https://api.example.com`.
    /// Required (the schema leaves it optional only so that Datum's `instance` backends
    /// decode and are refused by name).
    #[serde(default)]
    pub endpoint: String,
    /// Which connector(s) carry the request; several matches mean several backends.
    /// Absent: the endpoint is a public origin, reached without a tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector: Option<ConnectorReference>,
    /// TLS to an `https://` origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BackendTls>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteRulesBackendRefsFilters>,
    /// Datum's backend on one of its compute Instances: not available in Portway, so a
    /// backend that names one is refused at admission (Portway has no Instances).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<BackendInstance>,
}

/// Datum's `instance` backend reference, kept so that it is refused by name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendInstance {
    pub name: String,
    pub port: i32,
}

/// TLS to an origin.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendTls {
    /// The name the origin's certificate must carry (and SNI); default: the endpoint's
    /// host. Required for an `https://` endpoint at an IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// A connector by name, or every connector whose labels match, in the proxy's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpProxyStatus {
    /// `Accepted`, `Programmed`, `ConnectorMetadataProgrammed`, `HostnamesInUse`, and, as
    /// Datum sets them, `HostnamesVerified` (with spec hostnames to prove) and
    /// `CertificatesReady` (with an issuer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Every hostname the proxy is served at, sorted (the canonical one included), once the
    /// gateway accepted its route: where Datum's agent reads its public URL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostname_statuses: Vec<HostnameStatus>,
    /// A hostname that always routes to this proxy: `<uid>.<zone>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canonical_hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<GatewayStatusAddresses>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostnameStatus {
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
