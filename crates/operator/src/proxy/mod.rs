//! The HTTPProxy controller: HTTPProxy → Gateway, HTTPRoute, Service, EndpointSlice,
//! BackendTrafficPolicy, validated against ConnectorAdvertisements.

pub mod desired;
pub mod reconcile;
