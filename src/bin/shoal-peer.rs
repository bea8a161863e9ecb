//! `shoal-peer <tracker_port> <listen_port> <name> [files...]` (the interactive menu), or
//! `shoal-peer run|files|locate|get|fetch|health|completions|man`. Settings come from defaults, a
//! settings file, `SHOAL_*` variables and the flags below, in rising precedence.

use clap::{Args, CommandFactory, Parser, Subcommand};
use shoal::args::{port, Common, ConfigFile, Manual, Overrides};
use shoal::config::{self, PeerConfig};
use shoal::peer::cli::{self, Output};
use shoal::protocol::Hash;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "shoal-peer",
    version,
    about = "Shoal peer: shares files, downloads them from the swarm, serves chunks"
)]
#[command(arg_required_else_help = true, subcommand_required = true)]
#[command(
    after_help = "Seed form: shoal-peer <tracker_port> <listen_port> <name> [files...] starts the numbered menu\n\
(tracker on 127.0.0.1; see shoal-peer 7400 0 x --help). Exit codes: 0 ok, 1 failed, 2 usage or configuration,\n\
3 tracker unreachable, 4 no such file."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The seed's command line, chosen when the first argument is a number.
#[derive(Parser)]
#[command(
    name = "shoal-peer",
    version,
    about = "Shoal peer, seed form: shares the files and answers the numbered menu on stdin"
)]
struct SeedCli {
    /// Tracker port on 127.0.0.1.
    #[arg(value_parser = port)]
    tracker_port: u16,
    /// Port to serve chunks on, on all interfaces (0 = any free port).
    #[arg(value_parser = port)]
    listen_port: u16,
    /// This peer's name.
    #[arg(value_name = "NAME")]
    peer_name: String,
    /// Files to share.
    files: Vec<PathBuf>,
    #[command(flatten)]
    sharing: Sharing,
}

/// The flags of a peer that joins the swarm and shares files: the menu and the daemon.
#[derive(Args)]
struct Sharing {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    secret: Secret,
    #[command(flatten)]
    serve: Serve,
    /// Chunk size for files this peer registers, e.g. 1MiB [env: SHOAL_CHUNK_SIZE, default per file].
    #[arg(long, value_name = "BYTES")]
    chunk_size: Option<String>,
}

impl Sharing {
    fn add_to(&self, o: &mut Overrides) {
        self.common.add_to(o);
        o.set("secret", &self.secret.secret);
        self.serve.add_to(o);
        o.set("chunk_size", &self.chunk_size);
    }
}

/// Where the tracker is.
#[derive(Args)]
struct Tracker {
    /// Tracker host:port, or a host alone for port 7400; several trackers comma-separated, or
    /// one DNS name with several addresses [env: SHOAL_TRACKER, default 127.0.0.1:7400].
    #[arg(long, value_name = "HOST:PORT,...")]
    tracker: Option<String>,
    /// Trackers that own each file [env: SHOAL_TRACKER_REPLICAS, default 2].
    #[arg(long, value_name = "N")]
    tracker_replicas: Option<String>,
}

impl Tracker {
    fn add_to(&self, o: &mut Overrides) {
        o.set("tracker", &self.tracker);
        o.set("tracker_replicas", &self.tracker_replicas);
    }
}

#[derive(Args)]
struct Secret {
    /// Cluster secret [env: SHOAL_SECRET].
    #[arg(long)]
    secret: Option<String>,
}

#[derive(Args)]
struct MetricsAddr {
    /// Address for /metrics, /healthz, /readyz [env: SHOAL_METRICS_ADDR].
    #[arg(long, value_name = "IP:PORT")]
    metrics_addr: Option<String>,
}

/// What the seed form's positional arguments give: where chunks are served and the name.
#[derive(Args)]
struct Identity {
    /// Chunk server address [env: SHOAL_LISTEN, default 0.0.0.0:7401].
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<String>,
    /// Peer name [env: SHOAL_NAME, default the host name].
    #[arg(long)]
    name: Option<String>,
}

impl Identity {
    fn add_to(&self, o: &mut Overrides) {
        o.set("listen", &self.listen);
        o.set("name", &self.name);
    }
}

/// How a peer that serves chunks is reached and where it keeps files.
#[derive(Args)]
struct Serve {
    /// ip:port other peers dial [env: SHOAL_ADVERTISE, default the address the tracker sees].
    #[arg(long, value_name = "IP:PORT")]
    advertise: Option<String>,
    /// Directory of shared files and downloads [env: SHOAL_DATA_DIR, default .].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<String>,
    /// Upload cap in bytes per second, e.g. 10M or 512KiB; 0 = none [env: SHOAL_UPLOAD_LIMIT].
    #[arg(long, value_name = "BYTES")]
    upload_limit: Option<String>,
    #[command(flatten)]
    metrics: MetricsAddr,
}

#[derive(Subcommand)]
enum Command {
    /// Run as a daemon: share the data dir, fetch SHOAL_WANT, keep seeding until SIGTERM.
    Run {
        #[command(flatten)]
        tracker: Tracker,
        #[command(flatten)]
        identity: Identity,
        #[command(flatten)]
        sharing: Sharing,
        /// Names to fetch, comma-separated, or * for everything [env: SHOAL_WANT].
        #[arg(long, value_name = "NAMES")]
        want: Option<String>,
        /// Address of the local HTTP file API, e.g. 127.0.0.1:7480; no auth, keep it node-local
        /// [env: SHOAL_API_ADDR, default off].
        #[arg(long, value_name = "IP:PORT")]
        api_addr: Option<String>,
        /// Upstream registries of the OCI mirror under /v2/ of the API, comma-separated, each
        /// [alias=]http[s]://host[:port]; containerd's ns picks one, else the first
        /// [env: SHOAL_REGISTRY_UPSTREAM, default none].
        #[arg(long, value_name = "UPSTREAMS")]
        registry_upstream: Option<String>,
    },
    /// List the swarm's files: the newest version of each name.
    Files {
        /// Print a JSON array (name, size, chunk_size, digest, chunks, peers, seeders,
        /// published, latest) instead of a table.
        #[arg(long)]
        json: bool,
        /// List every version of every name, newest first within a name.
        #[arg(long)]
        all_versions: bool,
        #[command(flatten)]
        query: Query,
    },
    /// Show who holds which chunks of a file (its newest version unless --digest).
    Locate {
        /// The file's name in the swarm.
        file: String,
        /// The version to locate (64 hex digits, from `files --all-versions`).
        #[arg(long, value_parser = cli::parse_digest)]
        digest: Option<Hash>,
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        query: Query,
    },
    /// Download files into the data dir (serving chunks meanwhile), then leave.
    Get {
        /// Names of the files to download.
        #[arg(required = true)]
        files: Vec<String>,
        /// Fetch this version of the one file named (exit 4 when no peer holds it).
        #[arg(long, value_parser = cli::parse_digest)]
        digest: Option<Hash>,
        #[command(flatten)]
        query: Query,
        #[command(flatten)]
        identity: Identity,
        #[command(flatten)]
        serve: Serve,
    },
    /// Read a file from a node agent's HTTP API into PATH (no swarm membership needed).
    Fetch {
        /// The file's name in the swarm.
        name: String,
        /// The node agent's API, e.g. http://127.0.0.1:7480 (its SHOAL_API_ADDR).
        #[arg(long, value_name = "URL")]
        agent: String,
        /// Where to write the file; it appears under this name only when complete.
        #[arg(long, short, value_name = "PATH")]
        output: PathBuf,
        /// Fetch this version (64 hex digits, from `files --json`); exit 4 if the swarm lacks it.
        #[arg(long, value_parser = cli::parse_digest)]
        digest: Option<Hash>,
        /// Give up when the agent sends nothing for this long, e.g. 30s or 5m.
        #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = cli::parse_duration)]
        idle_timeout: Duration,
    },
    /// Point containerd at the agent's registry mirror: write DIR/{registry}/hosts.toml for each
    /// upstream registry, and remove the ones written before for registries no longer listed.
    MirrorConfig {
        /// containerd's registry config_path, e.g. /etc/containerd/certs.d.
        #[arg(long, value_name = "DIR")]
        hosts_dir: PathBuf,
        /// The agent's API as containerd on this node reaches it, e.g. http://10.0.0.5:7480.
        #[arg(long, value_name = "URL")]
        agent: String,
        /// The agent's upstream registries, as in its SHOAL_REGISTRY_UPSTREAM; unset or empty
        /// removes the files written before.
        #[arg(long, value_name = "UPSTREAMS", env = "SHOAL_REGISTRY_UPSTREAM")]
        registry_upstream: Option<String>,
        /// Send tag lookups to the agent too (capability "resolve"), not only pulls by digest.
        #[arg(long)]
        resolve: bool,
    },
    /// Exit 0 if this host's peer answers /healthz on SHOAL_METRICS_ADDR (container HEALTHCHECK).
    Health {
        #[command(flatten)]
        file: ConfigFile,
        #[command(flatten)]
        metrics: MetricsAddr,
    },
    #[command(flatten)]
    Manual(Manual),
}

/// The flags of a command that only asks the tracker.
#[derive(Args)]
struct Query {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    tracker: Tracker,
    #[command(flatten)]
    secret: Secret,
}

impl Query {
    fn add_to(&self, o: &mut Overrides) {
        self.common.add_to(o);
        self.tracker.add_to(o);
        o.set("secret", &self.secret.secret);
    }
}

impl Serve {
    fn add_to(&self, o: &mut Overrides) {
        o.set("advertise", &self.advertise);
        o.set("data_dir", &self.data_dir);
        o.set("upload_limit", &self.upload_limit);
        o.set("metrics_addr", &self.metrics.metrics_addr);
    }
}

impl Command {
    fn overrides(&self) -> Overrides {
        let mut o = Overrides::default();
        match self {
            Command::Run {
                tracker,
                identity,
                sharing,
                want,
                api_addr,
                registry_upstream,
            } => {
                tracker.add_to(&mut o);
                identity.add_to(&mut o);
                sharing.add_to(&mut o);
                o.set("want", want);
                o.set("api_addr", api_addr);
                o.set("registry_upstream", registry_upstream);
            }
            Command::Files { query, .. } | Command::Locate { query, .. } => query.add_to(&mut o),
            Command::Get {
                query,
                identity,
                serve,
                ..
            } => {
                query.add_to(&mut o);
                identity.add_to(&mut o);
                serve.add_to(&mut o);
            }
            Command::Health { file, metrics } => {
                file.add_to(&mut o);
                o.set("metrics_addr", &metrics.metrics_addr);
            }
            Command::Fetch { .. } | Command::MirrorConfig { .. } | Command::Manual(_) => {}
        }
        o
    }
}

/// Parses either form into (command, files to share, overrides); no command is the menu.
fn parse() -> (Option<Command>, Vec<PathBuf>, Overrides) {
    // A number first is the seed form, even one too large for a port, so that the error is
    // about the port and not about an unknown subcommand.
    let seed_form = std::env::args()
        .nth(1)
        .is_some_and(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()));
    if !seed_form {
        let command = Cli::parse().command;
        let overrides = command.overrides();
        return (Some(command), Vec::new(), overrides);
    }
    let seed = SeedCli::parse();
    let mut o = Overrides {
        file: None,
        flags: vec![
            ("tracker", format!("127.0.0.1:{}", seed.tracker_port)),
            ("listen", format!("0.0.0.0:{}", seed.listen_port)),
            ("name", seed.peer_name.clone()),
        ],
    };
    seed.sharing.add_to(&mut o);
    (None, seed.files, o)
}

fn output(json: bool) -> Output {
    if json {
        Output::Json
    } else {
        Output::Text
    }
}

fn main() -> ExitCode {
    let (command, files, overrides) = parse();
    if let Some(Command::Manual(manual)) = &command {
        return match manual.print(Cli::command()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shoal-peer: cannot write to stdout: {e}");
                ExitCode::from(cli::exit::FAILED)
            }
        };
    }
    // fetch reads no settings: it is a plain HTTP client of the agent, often run where the
    // environment holds another program's variables.
    if let Some(Command::Fetch {
        name,
        agent,
        output,
        digest,
        idle_timeout,
    }) = &command
    {
        let req = cli::FetchRequest {
            agent,
            name,
            digest: *digest,
            output,
            idle_timeout: *idle_timeout,
        };
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
        return runtime.block_on(async { cli::fetch(&req, shoal::shutdown::on_signals()).await });
    }
    // mirror-config reads no settings file either: it writes the runtime's files and leaves.
    if let Some(Command::MirrorConfig {
        hosts_dir,
        agent,
        registry_upstream,
        resolve,
    }) = &command
    {
        return cli::mirror_config(&shoal::peer::mirror_config::MirrorConfig {
            hosts_dir,
            agent,
            upstreams: registry_upstream.as_deref(),
            resolve: *resolve,
        });
    }
    let cfg = match config::load::<PeerConfig>(overrides.file.as_deref(), &overrides.flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shoal-peer: {e:#}");
            return ExitCode::from(cli::exit::USAGE);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    if let Some(Command::Health { .. }) = command {
        return runtime.block_on(cli::health(cfg.metrics_addr.as_deref(), &cfg.tls));
    }
    // People at a prompt want answers, not logs: interactive forms log warnings only, unless
    // SHOAL_LOG or --log says otherwise.
    let daemon = matches!(command, Some(Command::Run { .. }));
    let filter = if daemon || overrides.has("log") || std::env::var_os("SHOAL_LOG").is_some() {
        cfg.log.clone()
    } else {
        "warn".into()
    };
    if let Err(e) = shoal::logging::init(&filter, cfg.log_format) {
        eprintln!("shoal-peer: {e:#}");
        return ExitCode::from(cli::exit::USAGE);
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config::masked(&cfg),
        "starting shoal-peer"
    );
    runtime.block_on(async move {
        let stop = shoal::shutdown::on_signals();
        let result = match command {
            Some(Command::Run { .. }) => cli::daemon(cfg, stop).await,
            Some(Command::Files {
                json, all_versions, ..
            }) => return cli::files(cfg, output(json), all_versions).await,
            Some(Command::Locate {
                file, digest, json, ..
            }) => return cli::locate_cmd(cfg, &file, digest, output(json)).await,
            Some(Command::Get { files, digest, .. }) => {
                return cli::get(cfg, files, digest, stop).await
            }
            Some(
                Command::Health { .. }
                | Command::Fetch { .. }
                | Command::MirrorConfig { .. }
                | Command::Manual(_),
            ) => {
                unreachable!("handled above")
            }
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
