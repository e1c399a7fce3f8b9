//! `ConnectorClass` and `Connector`: a device that can be reached through an iroh tunnel.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A class of connectors, claimed by one controller. The class also lists the gateways
/// (sidecar iroh endpoints) that connectors of this class accept tunnel dials from.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "networking.datumapis.com",
    version = "v1alpha1",
    kind = "ConnectorClass",
    status = "ConnectorClassStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn(
        name = "Controller",
        type_ = "string",
        json_path = ".spec.controllerName"
    ),
    printcolumn(
        name = "Gateways",
        type_ = "string",
        json_path = ".status.gateways[*].name"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorClassSpec {
    /// The controller responsible for connectors of this class, e.g. `portway.dev/operator`;
    /// as in Datum, [`DATUM_CONNECT_CONTROLLER`] when not given (`spec: {}`).
    #[serde(default = "default_controller_name")]
    pub controller_name: String,
}

/// The controller of Datum's `datum-connect` ConnectorClass, and Datum's default.
pub const DATUM_CONNECT_CONTROLLER: &str = "networking.datumapis.com/datum-connect";

fn default_controller_name() -> String {
    DATUM_CONNECT_CONTROLLER.into()
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorClassStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Gateways allowed to dial connectors of this class. Each sidecar registers itself
    /// here; an agent refuses tunnel streams from any endpoint not listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<AuthorizedGateway>,
}

/// One gateway (sidecar) endpoint that may open tunnels to connectors of a class.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizedGateway {
    /// A stable name for the gateway instance (its registration key).
    pub name: String,
    /// The sidecar's iroh endpoint id, 64 hex characters.
    pub endpoint_id: String,
}

/// A device that runs the Portway agent and can be reached through iroh.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "networking.datumapis.com",
    version = "v1alpha1",
    kind = "Connector",
    namespaced,
    status = "ConnectorStatus",
    shortname = "conn",
    derive = "Default",
    derive = "PartialEq",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Node-ID",
        type_ = "string",
        json_path = ".status.connectionDetails.publicKey.id"
    ),
    printcolumn(
        name = "Relay",
        type_ = "string",
        json_path = ".status.connectionDetails.publicKey.homeRelay"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Class",
        type_ = "string",
        json_path = ".spec.connectorClassName",
        description = "The ConnectorClass of the connector.",
        priority = 1
    ),
    printcolumn(
        name = "Addresses",
        type_ = "string",
        json_path = ".status.connectionDetails.publicKey.addresses[*].address",
        description = "Direct addresses the device listens on.",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorSpec {
    /// The ConnectorClass this connector belongs to.
    pub connector_class_name: String,
    /// What the connector can do; absent means ConnectTCP enabled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<ConnectorCapability>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorCapability {
    #[serde(rename = "type")]
    pub type_: CapabilityType,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "connectTCP"
    )]
    pub connect_tcp: Option<ConnectTcpCapability>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum CapabilityType {
    /// Tunnels TCP streams (HTTP CONNECT) to advertised targets.
    #[default]
    #[serde(rename = "ConnectTCP")]
    ConnectTcp,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectTcpCapability {
    /// Turns the capability off while keeping it declared.
    #[serde(default)]
    pub disabled: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorStatus {
    /// `Accepted` (class found) and `Ready` (lease current), plus `IrohDNSPublished`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// How to reach the device; patched by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_details: Option<ConnectionDetails>,
    /// The Lease the agent renews as its heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ref: Option<LocalObjectReference>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectReference {
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionDetails {
    #[serde(rename = "type")]
    pub type_: ConnectionType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKeyConnectionDetails>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ConnectionType {
    #[default]
    PublicKey,
}

/// The iroh identity and addressing of a device.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublicKeyConnectionDetails {
    /// The iroh endpoint id (ed25519 public key), 64 lowercase hex characters.
    pub id: String,
    #[serde(default)]
    pub discovery_mode: DiscoveryMode,
    /// The relay the device is reachable through, e.g. `http://127.0.0.1:3340/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_relay: Option<String>,
    /// Direct socket addresses the device listens on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<PublicKeyAddress>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DiscoveryMode {
    /// Published as `_iroh.<z32-id>.<zone>` TXT records.
    #[default]
    #[serde(rename = "DNS")]
    Dns,
}

#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct PublicKeyAddress {
    /// An IPv4 or IPv6 address.
    pub address: String,
    pub port: i32,
}

impl Connector {
    /// The endpoint id the connector reported, if any.
    pub fn endpoint_id(&self) -> Option<&str> {
        self.status
            .as_ref()?
            .connection_details
            .as_ref()?
            .public_key
            .as_ref()
            .map(|pk| pk.id.as_str())
    }

    /// Whether the TCP tunnel capability is enabled (declared and not disabled, or no
    /// capabilities declared at all).
    pub fn connect_tcp_enabled(&self) -> bool {
        self.spec.capabilities.is_empty()
            || self.spec.capabilities.iter().any(|c| {
                c.type_ == CapabilityType::ConnectTcp
                    && !c.connect_tcp.as_ref().is_some_and(|t| t.disabled)
            })
    }
}
