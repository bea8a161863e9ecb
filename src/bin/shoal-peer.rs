//! `shoal-peer <tracker_port> <listen_port> <name> [files...]` (the interactive menu), or
//! `shoal-peer run|files|locate|get|health`. Settings come from defaults, `SHOAL_CONFIG`,
//! `SHOAL_*` variables and the flags below, in rising precedence.

use clap::{Args, Parser, Subcommand};
use shoal::config::{self, PeerConfig};
use shoal::peer::cli::{self, Output};
use shoal::protocol::Hash;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "shoal-peer",
    version,
    about = "Shoal peer: shares files, downloads them from the swarm, serves chunks"
)]
#[command(arg_required_else_help = true, subcommand_required = true)]
#[command(
    after_help = "Seed form: shoal-peer <tracker_port> <listen_port> <name> [files...] starts the numbered menu\n\
(tracker on 127.0.0.1). Exit codes: 0 ok, 1 failed, 2 usage or configuration, 3 tracker unreachable, 4 no such file."
)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The seed's command line, chosen when the first argument is a port number.
#[derive(Parser)]
#[command(
    name = "shoal-peer",
    version,
    about = "Shoal peer, seed form: the numbered menu"
)]
struct SeedCli {
    /// Tracker port on 127.0.0.1.
    tracker_port: u16,
    /// Port to serve chunks on.
    listen_port: u16,
    /// This peer's name.
    #[arg(value_name = "NAME")]
    peer_name: String,
    /// Files to share.
    files: Vec<PathBuf>,
    #[command(flatten)]
    flags: Flags,
}

#[derive(Args)]
struct Flags {
    /// Tracker host:port [env: SHOAL_TRACKER, default 127.0.0.1:7400].
    #[arg(long, global = true)]
    tracker: Option<String>,
    /// Chunk server address [env: SHOAL_LISTEN, default 0.0.0.0:7401].
    #[arg(long, global = true)]
    listen: Option<String>,
    /// ip:port other peers dial [env: SHOAL_ADVERTISE].
    #[arg(long, global = true)]
    advertise: Option<String>,
    /// Peer name [env: SHOAL_NAME, default the host name].
    #[arg(long, global = true)]
    name: Option<String>,
    /// Shared files and downloads [env: SHOAL_DATA_DIR, default .].
    #[arg(long, global = true)]
    data_dir: Option<String>,
    /// Names to fetch, comma-separated, or * [env: SHOAL_WANT].
    #[arg(long, global = true)]
    want: Option<String>,
    /// Chunk size in bytes for files this peer registers [env: SHOAL_CHUNK_SIZE].
    #[arg(long, global = true)]
    chunk_size: Option<String>,
    /// Upload cap in bytes per second, 0 = none [env: SHOAL_UPLOAD_LIMIT].
    #[arg(long, global = true)]
    upload_limit: Option<String>,
    /// Address for /metrics, /healthz, /readyz [env: SHOAL_METRICS_ADDR].
    #[arg(long, global = true)]
    metrics_addr: Option<String>,
    /// Cluster secret [env: SHOAL_SECRET].
    #[arg(long, global = true)]
    secret: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run as a daemon: share the data dir, fetch SHOAL_WANT, keep seeding until SIGTERM.
    Run,
    /// List the swarm's files: the newest version of each name.
    Files {
        /// Print a JSON array (name, size, chunk_size, digest, chunks, peers, seeders,
        /// published, latest) instead of a table.
        #[arg(long)]
        json: bool,
        /// List every version of every name, newest first within a name.
        #[arg(long)]
        all_versions: bool,
    },
    /// Show who holds which chunks of a file (its newest version unless --digest).
    Locate {
        file: String,
        /// The version to locate (64 hex digits, from `files --all-versions`).
        #[arg(long, value_parser = cli::parse_digest)]
        digest: Option<Hash>,
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Download files into the data dir (serving chunks meanwhile), then leave.
    Get {
        #[arg(required = true)]
        files: Vec<String>,
        /// Fetch this version of the one file named (exit 4 when no peer holds it).
        #[arg(long, value_parser = cli::parse_digest)]
        digest: Option<Hash>,
    },
    /// Exit 0 if this host's peer answers /healthz on SHOAL_METRICS_ADDR (container HEALTHCHECK).
    Health,
}

fn flag_overrides(f: &Flags) -> Vec<(&'static str, String)> {
    let mut flags = Vec::new();
    for (key, value) in [
        ("tracker", &f.tracker),
        ("listen", &f.listen),
        ("advertise", &f.advertise),
        ("name", &f.name),
        ("data_dir", &f.data_dir),
        ("want", &f.want),
        ("chunk_size", &f.chunk_size),
        ("upload_limit", &f.upload_limit),
        ("metrics_addr", &f.metrics_addr),
        ("secret", &f.secret),
    ] {
        if let Some(v) = value {
            flags.push((key, v.clone()));
        }
    }
    flags
}

/// Parses either form into (command, files to share, flag overrides); `None` is the menu.
fn parse() -> (Option<Command>, Vec<PathBuf>, Vec<(&'static str, String)>) {
    let seed_form = std::env::args()
        .nth(1)
        .is_some_and(|a| a.parse::<u16>().is_ok());
    if !seed_form {
        let cli = Cli::parse();
        return (cli.command, Vec::new(), flag_overrides(&cli.flags));
    }
    let seed = SeedCli::parse();
    let mut flags = vec![
        ("tracker", format!("127.0.0.1:{}", seed.tracker_port)),
        ("listen", format!("0.0.0.0:{}", seed.listen_port)),
        ("name", seed.peer_name.clone()),
    ];
    flags.extend(flag_overrides(&seed.flags));
    (None, seed.files, flags)
}

fn output(json: bool) -> Output {
    if json {
        Output::Json
    } else {
        Output::Text
    }
}

fn main() -> ExitCode {
    let (command, files, flags) = parse();
    let loaded = config::load::<PeerConfig>(&flags).and_then(|cfg| cfg.validate().map(|_| cfg));
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shoal-peer: {e:#}");
            return ExitCode::from(cli::exit::USAGE);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    if let Some(Command::Health) = command {
        return runtime.block_on(cli::health(cfg.metrics_addr.as_deref()));
    }
    // People at a prompt want answers, not logs: interactive forms log warnings only, unless
    // SHOAL_LOG says otherwise.
    let daemon = matches!(command, Some(Command::Run));
    let filter = if daemon || std::env::var_os("SHOAL_LOG").is_some() {
        cfg.log.clone()
    } else {
        "warn".into()
    };
    if let Err(e) = shoal::logging::init(&filter, cfg.log_format) {
        eprintln!("shoal-peer: {e:#}");
        return ExitCode::from(cli::exit::USAGE);
    }
    tracing::info!(config = %config::masked(&cfg), "starting shoal-peer {}", env!("CARGO_PKG_VERSION"));
    runtime.block_on(async move {
        let stop = shoal::shutdown::on_signals();
        let result = match command {
            Some(Command::Run) => cli::daemon(cfg, stop).await,
            Some(Command::Files { json, all_versions }) => {
                return cli::files(cfg, output(json), all_versions).await
            }
            Some(Command::Locate { file, digest, json }) => {
                return cli::locate_cmd(cfg, &file, digest, output(json)).await
            }
            Some(Command::Get { files, digest }) => {
                return cli::get(cfg, files, digest, stop).await
            }
            Some(Command::Health) => unreachable!("handled above"),
            None => cli::menu(cfg, files, stop).await,
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shoal-peer: {e:#}");
                ExitCode::from(cli::exit::FAILED)
            }
        }
    })
}
