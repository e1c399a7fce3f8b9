//! `ConnectorAdvertisement`: the targets a device offers through its connector.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::LocalObjectReference;

/// What a connector offers: layer-4 services (host + ports) reachable from the device.
/// The agent serves a tunnel only to targets listed here, and the operator programs a
/// route only to such targets.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "networking.datumapis.com",
    version = "v1alpha1",
    kind = "ConnectorAdvertisement",
    namespaced,
    status = "ConnectorAdvertisementStatus",
    shortname = "connadv",
    derive = "Default",
    derive = "PartialEq",
    selectable = ".spec.connectorRef.name",
    printcolumn(
        name = "Connector",
        type_ = "string",
        json_path = ".spec.connectorRef.name"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Services",
        type_ = "string",
        json_path = ".spec.layer4[*].name",
        description = "Names of the advertised layer 4 services.",
        priority = 1
    ),
    printcolumn(
        name = "Addresses",
        type_ = "string",
        json_path = ".spec.layer4[*].services[*].address",
        description = "Addresses of the services, as seen from the device.",
        priority = 1
    ),
    printcolumn(
        name = "Ports",
        type_ = "string",
        json_path = ".spec.layer4[*].services[*].ports[*].port",
        description = "Ports the services listen on.",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorAdvertisementSpec {
    /// The connector (same namespace) that offers these services.
    pub connector_ref: LocalObjectReference,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer4: Vec<Layer4Advertisement>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Layer4Advertisement {
    /// A name for this group of services, unique in the advertisement.
    pub name: String,
    pub services: Vec<Layer4Service>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Layer4Service {
    /// An IP address or DNS name as seen from the device; `*.example.com` matches any
    /// name below `example.com`.
    pub address: String,
    pub ports: Vec<ServicePort>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: i32,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorAdvertisementStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl ConnectorAdvertisementSpec {
    /// Whether `host:port` over `protocol` is offered. Host names compare without case;
    /// `*.example.com` matches names strictly below `example.com`.
    pub fn allows(&self, host: &str, port: u16, protocol: Protocol) -> bool {
        self.layer4.iter().flat_map(|l4| &l4.services).any(|svc| {
            address_matches(&svc.address, host)
                && svc
                    .ports
                    .iter()
                    .any(|p| p.port == i32::from(port) && p.protocol == protocol)
        })
    }
}

/// Matches an advertised address (exact, or `*.` wildcard) against a requested host.
pub fn address_matches(advertised: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.');
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match advertised.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1 && {
                let (head, tail) = host.split_at(host.len() - suffix.len());
                tail.eq_ignore_ascii_case(suffix) && head.ends_with('.')
            }
        }
        None => advertised.eq_ignore_ascii_case(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matches_only_strictly_below() {
        assert!(address_matches("*.example.com", "a.example.com"));
        assert!(address_matches("*.example.com", "a.b.EXAMPLE.com"));
        assert!(!address_matches("*.example.com", "example.com"));
        assert!(!address_matches("*.example.com", "badexample.com"));
        assert!(address_matches("LocalHost", "localhost"));
        assert!(address_matches("::1", "[::1]"));
        assert!(!address_matches("127.0.0.1", "127.0.0.2"));
    }

    #[test]
    fn allows_checks_port_and_protocol() {
        let spec = ConnectorAdvertisementSpec {
            connector_ref: LocalObjectReference { name: "c".into() },
            layer4: vec![Layer4Advertisement {
                name: "web".into(),
                services: vec![Layer4Service {
                    address: "127.0.0.1".into(),
                    ports: vec![ServicePort {
                        name: None,
                        port: 3000,
                        protocol: Protocol::Tcp,
                    }],
                }],
            }],
        };
        assert!(spec.allows("127.0.0.1", 3000, Protocol::Tcp));
        assert!(!spec.allows("127.0.0.1", 3001, Protocol::Tcp));
        assert!(!spec.allows("127.0.0.1", 3000, Protocol::Udp));
        assert!(!spec.allows("localhost", 3000, Protocol::Tcp));
    }
}
