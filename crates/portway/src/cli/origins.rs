//! The origin flags (backends without a connector) shared by the commands that check or
//! reach origins: `portway up`, `operator`, `edge` and `sidecar`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use portway_gateway::edge::IpNet;

#[derive(Args, Debug, Clone, Default)]
pub struct AllowFlags {
    /// Let origins (HTTPProxy backends without a connector) be in this network although
    /// it is the edge's own machine or link (loopback, link-local, ...), e.g.
    /// 127.0.0.0/8 on a development machine (repeatable). Refused by default.
    #[arg(long = "allow-origin-network", value_name = "CIDR", value_parser = portway_gateway::edge::parse_cidr)]
    pub allow_origin_network: Vec<IpNet>,
}

#[derive(Args, Debug, Clone, Default)]
pub struct OriginFlags {
    #[command(flatten)]
    pub allow: AllowFlags,
    /// Trust these roots (PEM) for origins' certificates, besides the public ones.
    #[arg(long, value_name = "FILE")]
    pub origin_roots: Option<PathBuf>,
}

impl OriginFlags {
    /// How the sidecar reaches origins.
    pub fn config(&self) -> Result<portway_gateway::origin::Config> {
        let roots = match &self.origin_roots {
            Some(p) => Some(
                std::fs::read(p)
                    .with_context(|| format!("reading --origin-roots {}", p.display()))?,
            ),
            None => None,
        };
        Ok(portway_gateway::origin::Config {
            allowed: self.allow.allow_origin_network.clone(),
            roots,
            ..Default::default()
        })
    }
}
