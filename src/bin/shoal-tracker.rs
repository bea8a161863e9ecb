//! `shoal-tracker [PORT]`: the swarm's index. Settings come from defaults, `SHOAL_CONFIG`,
//! `SHOAL_*` variables and the flags below, in rising precedence.

use clap::{Parser, Subcommand};
use shoal::config::{self, TrackerConfig};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "shoal-tracker",
    version,
    about = "Shoal tracker: knows which peer holds which chunk of which file"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    /// Port to listen on, on all interfaces (same as --listen 0.0.0.0:PORT).
    port: Option<u16>,
    /// Protocol address [env: SHOAL_LISTEN, default 0.0.0.0:7400].
    #[arg(long)]
    listen: Option<String>,
    /// Address for /metrics, /healthz, /readyz [env: SHOAL_METRICS_ADDR].
    #[arg(long)]
    metrics_addr: Option<String>,
    /// How often peers announce, e.g. 30s [env: SHOAL_ANNOUNCE_INTERVAL].
    #[arg(long)]
    announce_interval: Option<String>,
    /// Shared secret peers must present [env: SHOAL_SECRET].
    #[arg(long)]
    secret: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Exit 0 if this host's tracker answers /healthz on SHOAL_METRICS_ADDR (container HEALTHCHECK).
    Health,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut flags = Vec::new();
    if let Some(port) = cli.port {
        flags.push(("listen", format!("0.0.0.0:{port}")));
    }
    for (key, value) in [
        ("listen", cli.listen),
        ("metrics_addr", cli.metrics_addr),
        ("announce_interval", cli.announce_interval),
        ("secret", cli.secret),
    ] {
        if let Some(v) = value {
            flags.push((key, v));
        }
    }
    let cfg = match config::load::<TrackerConfig>(&flags).and_then(|c| c.validate().map(|_| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shoal-tracker: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    if let Some(Command::Health) = cli.command {
        return runtime.block_on(shoal::peer::cli::health(cfg.metrics_addr.as_deref()));
    }
    if let Err(e) = shoal::logging::init(&cfg.log, cfg.log_format) {
        eprintln!("shoal-tracker: {e:#}");
        return ExitCode::from(2);
    }
    tracing::info!(config = %config::masked(&cfg), "starting shoal-tracker {}", env!("CARGO_PKG_VERSION"));
    let result = runtime.block_on(async {
        let stop = shoal::shutdown::on_signals();
        shoal::tracker::run(cfg, stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("shoal-tracker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
