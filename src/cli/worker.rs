//! `conveyor worker`

use std::process::ExitCode;

use conveyor::config::Config;
use conveyor::shutdown::{ShutdownTrigger, on_signals};

/// Worker options (the rest come from the config).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Queues to consume, comma-separated (without prefix).
    #[arg(long, value_delimiter = ',')]
    queues: Option<Vec<String>>,
    /// Handlers run at once.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Whether to take submissions and run one root task of each new job
    /// here (one broker hop fewer; on by default): `--accept-submissions
    /// false` leaves them to the dispatchers. See `accept_submissions` in
    /// the config.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    accept_submissions: Option<bool>,
    /// Serve `/healthz` and `/readyz` on this address (e.g. 0.0.0.0:8080).
    #[arg(long)]
    http_addr: Option<std::net::SocketAddr>,
}

pub async fn run(mut config: Config, args: Args) -> anyhow::Result<ExitCode> {
    if let Some(q) = args.queues {
        // As `CONVEYOR_QUEUES` is read: `--queues "default, gpu"` names
        // `gpu`. One that names nothing is left for the check to refuse.
        let named: Vec<String> = q
            .iter()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .collect();
        config.worker.queues = if named.is_empty() { q } else { named };
    }
    if let Some(c) = args.concurrency {
        config.worker.concurrency = c;
    }
    if let Some(accept) = args.accept_submissions {
        config.worker.accept_submissions = accept;
    }
    if let Some(a) = args.http_addr {
        config.http_addr = Some(a);
    }
    let trigger = ShutdownTrigger::new();
    on_signals(trigger.clone(), false);
    conveyor::runtime::run_worker(
        &config,
        conveyor_builtin_handlers::registry(),
        trigger.subscribe(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
