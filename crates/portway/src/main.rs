//! `portway`: parses flags and hands over to the library crates (one file per command
//! under `cli/`).

mod cli;
mod logs;

use anyhow::Result;
use clap::Parser;

fn main() -> Result<()> {
    let cli = cli::Cli::parse();
    // Both ring and aws-lc-rs end up linked (reqwest insists on the latter), so rustls
    // cannot pick a process default by itself.
    let _ = rustls::crypto::ring::default_provider().install_default();
    logs::init(cli.log_format);
    // Servers hold one descriptor per connection: take the whole hard limit, so a flood
    // of idle clients meets the connection caps, not EMFILE.
    match portway_serve::raise_fd_limit() {
        Ok(n) => tracing::debug!(limit = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(cli::run(cli.command))
}
