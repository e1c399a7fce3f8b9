//! The TCPProxy controller: TCPProxy → a public port ([`ports`]), and a Gateway with one
//! TCP listener on it, a TCPRoute, and a Service and EndpointSlices per backend connector
//! (validated against ConnectorAdvertisements, as HTTPProxy backends are).

pub mod certificate;
pub mod desired;
pub mod ports;
pub mod reconcile;
