//! What every Portway controller needs from a Kubernetes API, written once: a client from
//! a kubeconfig ([`client`]), a watch feeding a cache without `managedFields`
//! ([`watch`]), when a Lease runs out ([`lease`]), leader election among replicas
//! ([`leader`]), events for `kubectl describe`
//! ([`events`]), and a status writer that merges
//! conditions, guards on `resourceVersion` and retries on 409 ([`status`]), so two
//! controllers owning different conditions of one object never erase each other's.
//!
//! It sits above `portway-api` and below every part that talks to an API server: the
//! operator, the gateway, the agent, discovery and the CLI.

pub mod client;
pub mod events;
pub mod leader;
pub mod lease;
pub mod status;
pub mod watch;

pub use client::{ClientError, client, client_from};
pub use events::Events;
pub use status::{StatusError, patch_conditions, patch_status_with};
