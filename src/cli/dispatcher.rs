//! `conveyor dispatcher`

use std::process::ExitCode;

use conveyor::config::Config;
use conveyor::shutdown::{ShutdownTrigger, on_signals};

/// Dispatcher options (the rest come from the config).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Unacked submissions handled at once.
    #[arg(long)]
    prefetch: Option<u16>,
    /// Serve `/healthz` and `/readyz` on this address (e.g. 0.0.0.0:8080).
    #[arg(long)]
    http_addr: Option<std::net::SocketAddr>,
}

pub async fn run(mut config: Config, args: Args) -> anyhow::Result<ExitCode> {
    if let Some(p) = args.prefetch {
        config.dispatcher.prefetch = p;
    }
    if let Some(a) = args.http_addr {
        config.http_addr = Some(a);
    }
    let trigger = ShutdownTrigger::new();
    on_signals(trigger.clone(), false);
    conveyor::runtime::run_dispatcher(
        &config,
        conveyor_builtin_handlers::registry(),
        trigger.subscribe(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
