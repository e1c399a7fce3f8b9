//! Portway on one machine: `portway up` runs every part in one process, `portway http`
//! publishes a local port at a hostname and `portway tcp` at a public TCP port.
//!
//! [`up::Up`] starts the API server, DNS, relay, operator, edge and sidecar on one SQLite
//! file, with an admin kubeconfig in the data directory, and saves the addresses in
//! `DATA/portway.json`, where [`http::Http`] finds them. `portway http` joins as a device
//! of its own (a join token minted with the admin kubeconfig, exchanged once for the
//! device's credential), so no agent token spans projects.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let up = portway_local::up::Up::start(portway_local::up::Config::new("portway-data".into())).await?;
//! println!("edge at http://{}", up.info.http);
//! up.shutdown().await;
//! # Ok(()) }
//! ```

pub mod http;
pub mod tcp;
pub mod up;
