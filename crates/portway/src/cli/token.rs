//! `portway token create`: a join token for one project.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use super::kube_client;

#[derive(Parser)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a short-lived join token for one project (needs an admin kubeconfig). The
    /// device exchanges it once for its own credential: `portway agent --join-token T`.
    Create {
        /// The project (namespace) the device joins.
        #[arg(long, default_value = "default")]
        project: String,
        /// How long the token may be used, in seconds (at most 7 days).
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
        /// How many devices may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Admin kubeconfig (default: $KUBECONFIG, ~/.kube/config).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Print a bootstrap kubeconfig (server, CA and the join token) instead of the
        /// bare token: hand it to the device as `--kubeconfig`.
        #[arg(long)]
        bootstrap_kubeconfig: bool,
    },
}

pub async fn run(args: Args) -> Result<()> {
    let Command::Create {
        project,
        ttl_seconds,
        uses,
        kubeconfig,
        bootstrap_kubeconfig,
    } = args.command;
    let client = kube_client(kubeconfig.as_deref()).await?;
    let (token, expires) =
        portway_agent::join::create_join_token(&client, &project, ttl_seconds, uses).await?;
    if bootstrap_kubeconfig {
        let kc = match &kubeconfig {
            Some(p) => kube::config::Kubeconfig::read_from(p)?,
            None => kube::config::Kubeconfig::read()?,
        };
        print!(
            "{}",
            serde_yaml::to_string(&portway_agent::join::with_token(kc, &token))?
        );
    } else {
        println!("{token}");
        eprintln!(
            "join token for project {project}: {uses} use(s), expires at unix time {expires}.\n\
             On the device: portway agent --project {project} --kubeconfig SERVER.kubeconfig --join-token {token} ..."
        );
    }
    Ok(())
}
