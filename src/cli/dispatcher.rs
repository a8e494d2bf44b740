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
}

pub async fn run(mut config: Config, args: Args) -> anyhow::Result<ExitCode> {
    if let Some(p) = args.prefetch {
        config.dispatcher.prefetch = p;
    }
    let trigger = ShutdownTrigger::new();
    on_signals(trigger.clone());
    conveyor::runtime::run_dispatcher(
        &config,
        conveyor_builtin_handlers::registry(),
        trigger.subscribe(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
