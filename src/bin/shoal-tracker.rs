//! `shoal-tracker [PORT]`: the swarm's index; `shoal-tracker health|gen-certs|completions|man`. Settings
//! come from defaults, a settings file, `SHOAL_*` variables and the flags below, in rising
//! precedence.

use clap::{CommandFactory, Parser, Subcommand};
use shoal::args::{port, Common, ConfigFile, Manual, Overrides};
use shoal::config::{self, TrackerConfig};
use shoal::peer::cli::exit::USAGE;
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
    #[arg(value_parser = port)]
    port: Option<u16>,
    /// Protocol address [env: SHOAL_LISTEN, default 0.0.0.0:7400].
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<String>,
    /// Address for /metrics, /healthz, /readyz [env: SHOAL_METRICS_ADDR].
    #[arg(long, value_name = "IP:PORT")]
    metrics_addr: Option<String>,
    /// How often peers announce, e.g. 30s [env: SHOAL_ANNOUNCE_INTERVAL, default 30s].
    #[arg(long, value_name = "DURATION")]
    announce_interval: Option<String>,
    /// Shared secret peers must present [env: SHOAL_SECRET].
    #[arg(long)]
    secret: Option<String>,
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Exit 0 if this host's tracker answers /healthz on SHOAL_METRICS_ADDR (container HEALTHCHECK).
    Health {
        #[command(flatten)]
        file: ConfigFile,
        /// Address of the tracker's /healthz [env: SHOAL_METRICS_ADDR].
        #[arg(long, value_name = "IP:PORT")]
        metrics_addr: Option<String>,
    },
    /// Write a throwaway CA (DIR/ca.pem) and certificates it signs, for a demo of TLS:
    /// `gen-certs certs tracker=localhost,127.0.0.1 peer1=shoal-peer,peer1`.
    GenCerts {
        /// Directory to write into (created if missing).
        dir: std::path::PathBuf,
        /// STEM=NAME[,NAME...]: writes STEM.pem and STEM.key for those DNS names or ips.
        #[arg(required = true, value_name = "STEM=NAMES")]
        certs: Vec<String>,
    },
    #[command(flatten)]
    Manual(Manual),
}

impl Cli {
    fn overrides(&self) -> Overrides {
        let mut o = Overrides::default();
        if let Some(Command::Health { file, metrics_addr }) = &self.command {
            file.add_to(&mut o);
            o.set("metrics_addr", metrics_addr);
            return o;
        }
        if let Some(port) = self.port {
            o.flags.push(("listen", format!("0.0.0.0:{port}")));
        }
        o.set("listen", &self.listen);
        o.set("metrics_addr", &self.metrics_addr);
        o.set("announce_interval", &self.announce_interval);
        o.set("secret", &self.secret);
        self.common.add_to(&mut o);
        o
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Manual(manual)) = &cli.command {
        return match manual.print(Cli::command()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shoal-tracker: cannot write to stdout: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::GenCerts { dir, certs }) = &cli.command {
        return match shoal::tls::certs::generate(dir, certs) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shoal-tracker: {e:#}");
                ExitCode::from(USAGE)
            }
        };
    }
    let overrides = cli.overrides();
    let cfg = match config::load::<TrackerConfig>(overrides.file.as_deref(), &overrides.flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shoal-tracker: {e:#}");
            return ExitCode::from(USAGE);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    if let Some(Command::Health { .. }) = cli.command {
        return runtime.block_on(shoal::peer::cli::health(
            cfg.metrics_addr.as_deref(),
            &cfg.tls,
        ));
    }
    if let Err(e) = shoal::logging::init(&cfg.log, cfg.log_format) {
        eprintln!("shoal-tracker: {e:#}");
        return ExitCode::from(USAGE);
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config::masked(&cfg),
        "starting shoal-tracker"
    );
    let result = runtime.block_on(async {
        let stop = shoal::shutdown::on_signals();
        shoal::tracker::run(cfg, stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "tracker failed");
            eprintln!("shoal-tracker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
