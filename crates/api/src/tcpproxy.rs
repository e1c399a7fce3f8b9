//! `TCPProxy`: a public TCP port on the edge, spliced through connectors to a target on a
//! device (`portway tcp 22`). The operator grants the port (the one asked for, or one from
//! the edge's range, kept while the proxy lives) and generates a Gateway listener and a
//! `TCPRoute` for it.
//!
//! With `spec.tls` the proxy is TLS passthrough instead (`portway tls 8443`): no port of
//! its own, but names on the edge's shared TLS port, chosen by the ClientHello's server
//! name; the TLS stream reaches the device undecrypted and the device terminates it. The
//! operator generates a Gateway `TLS` listener in `Passthrough` mode and a `TLSRoute`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ConnectorReference;

/// Publishes one public TCP port; every connection to it is carried to one of the
/// backends (a `host:port` on a device reached through a connector), a ready one first.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "networking.datumapis.com",
    version = "v1alpha",
    kind = "TCPProxy",
    root = "TcpProxy",
    plural = "tcpproxies",
    singular = "tcpproxy",
    namespaced,
    status = "TcpProxyStatus",
    shortname = "tcpp",
    derive = "Default",
    derive = "PartialEq",
    printcolumn(name = "Port", type_ = "integer", json_path = ".status.port"),
    printcolumn(name = "Hostnames", type_ = "string", json_path = ".status.hostnames"),
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
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TcpProxySpec {
    /// The public port wanted (like `ngrok tcp --remote-addr`); absent: the operator
    /// allocates one from the edge's range and keeps it while the proxy exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// TLS passthrough by server name on the edge's shared TLS port, instead of a port of
    /// its own (`spec.port` must then be absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsPassthrough>,
    /// Where connections go: 1 to 16 backends, tried ready ones first.
    pub backends: Vec<TcpProxyBackend>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpProxyBackend {
    /// The target on the device, `tcp://host:port`, e.g. `tcp://127.0.0.1:22`; it must
    /// be advertised by the connector.
    pub endpoint: String,
    /// Which connector(s) carry the connection; several matches mean several backends.
    pub connector: ConnectorReference,
}

/// Which TLS connections come to a passthrough proxy: those whose ClientHello names its
/// canonical name (`<uid>.<zone>`, always) or one of `hostnames`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsPassthrough {
    /// Further names, fully qualified, no wildcards: names outside the zone must be
    /// proven by the project as for HTTPProxy, and a name belongs to one proxy of either
    /// kind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// A PKCS#10 certificate signing request (PEM) made on the device for names among
    /// `status.hostnames`: the installation's issuer signs it (ACME answered over DNS-01
    /// by Portway's DNS server for names in the zone, HTTP-01 by the edges outside it, or
    /// the local CA) and the chain appears in `status.certificate`, renewed before it
    /// expires. The private key never leaves the device (`portway tls --cert-dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_request: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpProxyStatus {
    /// `Accepted`, `Programmed`, `BackendsReady`; `CertificateReady` with
    /// `spec.tls.certificateRequest`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The public port granted; kept across restarts while the proxy exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// A passthrough proxy's names in service, its canonical name last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// The chain (PEM, leaf first) issued for `spec.tls.certificateRequest`: the
    /// device's public key, for the names it asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}
