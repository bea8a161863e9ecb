//! Settings, one struct per binary. Layers, lowest first: the `Default` impls below (every default
//! lives there), a settings file (`--config` or `SHOAL_CONFIG`, TOML or JSON), `SHOAL_*`
//! environment variables, then command-line flags. An unknown key stops the program with the
//! nearest known one, and every error names the key as the operator wrote it.

use crate::units;
use anyhow::{anyhow, bail};
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The tracker's port when an address names only its host.
pub const DEFAULT_TRACKER_PORT: u16 = 7400;

/// Log output shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("{s:?} is not a log format: use text or json")),
        }
    }
}

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, |s| s.parse())
    }
}

/// The tracker's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrackerConfig {
    /// Protocol address (`SHOAL_LISTEN`).
    pub listen: String,
    /// HTTP address for `/metrics`, `/healthz`, `/readyz`; unset = no HTTP endpoint.
    pub metrics_addr: Option<String>,
    /// How often peers must announce; a peer silent for 3 intervals is expired.
    #[serde(with = "duration")]
    pub announce_interval: Duration,
    /// Shared secret peers must present to register; unset = open swarm.
    pub secret: Option<String>,
    #[serde(flatten)]
    pub tls: TlsSettings,
    /// Connections served at once; more are refused with `busy`.
    #[serde(deserialize_with = "count")]
    pub max_connections: usize,
    /// Longest request line, in bytes.
    #[serde(deserialize_with = "bytes")]
    pub max_frame_bytes: usize,
    /// A connection with no request started for this long is closed.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// A request line must arrive in full within this time once started.
    #[serde(with = "duration")]
    pub frame_timeout: Duration,
    /// Registered peers at once; further registrations get `limit_reached`.
    #[serde(deserialize_with = "count")]
    pub max_peers: usize,
    /// Distinct files in the index at once.
    #[serde(deserialize_with = "count")]
    pub max_files: usize,
    /// Files one peer may hold entries for.
    #[serde(deserialize_with = "count")]
    pub max_files_per_peer: usize,
    /// Chunks one file may have.
    #[serde(deserialize_with = "count")]
    pub max_chunks_per_file: u64,
    /// Most holders returned by one locations reply.
    #[serde(deserialize_with = "count")]
    pub max_holders: usize,
    /// Let peers register an address whose ip is not the one they connect from (peers behind
    /// NAT or a proxy); off, such a registration is refused.
    #[serde(deserialize_with = "switch")]
    pub allow_foreign_addr: bool,
    /// Log filter, tracing `EnvFilter` syntax.
    pub log: String,
    /// Log lines as readable text or JSON objects.
    pub log_format: LogFormat,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            listen: "0.0.0.0:7400".into(),
            metrics_addr: None,
            announce_interval: Duration::from_secs(30),
            secret: None,
            tls: TlsSettings::default(),
            max_connections: 4096,
            max_frame_bytes: 4 * 1024 * 1024,
            idle_timeout: Duration::from_secs(120),
            frame_timeout: Duration::from_secs(10),
            max_peers: 100_000,
            max_files: 100_000,
            max_files_per_peer: 10_000,
            max_chunks_per_file: 65_536,
            max_holders: 50,
            allow_foreign_addr: false,
            log: "info".into(),
            log_format: LogFormat::Text,
        }
    }
}

impl Settings for TrackerConfig {
    const PROGRAM: &'static str = "shoal-tracker";

    fn checked(self) -> anyhow::Result<Self> {
        parse_addr("SHOAL_LISTEN", &self.listen)?;
        if let Some(m) = &self.metrics_addr {
            parse_addr("SHOAL_METRICS_ADDR", m)?;
        }
        for (var, d) in [
            ("SHOAL_ANNOUNCE_INTERVAL", self.announce_interval),
            ("SHOAL_IDLE_TIMEOUT", self.idle_timeout),
            ("SHOAL_FRAME_TIMEOUT", self.frame_timeout),
        ] {
            nonzero(var, d)?;
        }
        check_secret(&self.secret)?;
        self.tls.check()?;
        at_least_bytes("SHOAL_MAX_FRAME_BYTES", self.max_frame_bytes, 4096)?;
        for (var, n, unit) in [
            ("SHOAL_MAX_CONNECTIONS", self.max_connections, "connection"),
            ("SHOAL_MAX_PEERS", self.max_peers, "peer"),
            ("SHOAL_MAX_FILES", self.max_files, "file"),
            ("SHOAL_MAX_FILES_PER_PEER", self.max_files_per_peer, "file"),
            ("SHOAL_MAX_HOLDERS", self.max_holders, "holder"),
        ] {
            at_least_one(var, n as u64, unit)?;
        }
        at_least_one(
            "SHOAL_MAX_CHUNKS_PER_FILE",
            self.max_chunks_per_file,
            "chunk",
        )?;
        Ok(self)
    }
}

/// The peer's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerConfig {
    /// Tracker addresses, `host:port` (a host alone means port 7400), comma-separated; a single
    /// DNS name that resolves to several addresses names one tracker per address.
    pub tracker: String,
    /// How many trackers own each file (rendezvous hashing of its name over the trackers).
    #[serde(deserialize_with = "count")]
    pub tracker_replicas: usize,
    /// Address the chunk server listens on.
    pub listen: String,
    /// `ip:port` other peers should dial; unset = this host's address as the tracker sees it,
    /// with the listen port.
    pub advertise: Option<String>,
    /// This peer's name; unset = the host name.
    pub name: Option<String>,
    /// Directory whose files are shared and where downloads land.
    pub data_dir: PathBuf,
    /// Files to fetch: comma-separated names, or `*` for everything offered, now and later.
    pub want: String,
    /// Chunk size for files this peer registers, bytes; unset = chosen per file (about 1,024
    /// chunks, 64 KiB to 16 MiB).
    #[serde(deserialize_with = "optional_bytes")]
    pub chunk_size: Option<u32>,
    /// Total upload rate cap, bytes per second; 0 = unlimited.
    #[serde(deserialize_with = "bytes")]
    pub upload_limit: u64,
    /// Chunks sent at once; more requests wait their turn. Few slots finish each chunk sooner,
    /// so its recipient can pass it on sooner.
    #[serde(deserialize_with = "count")]
    pub upload_slots: usize,
    /// Write downloaded chunks with `O_DIRECT` (past the page cache) where the file system
    /// allows it.
    #[serde(deserialize_with = "switch")]
    pub direct_writes: bool,
    /// HTTP address for `/metrics`, `/healthz`, `/readyz`; unset = no HTTP endpoint.
    pub metrics_addr: Option<String>,
    /// HTTP address of the local file API (`/v1/files`, `/v1/status`); unset = off. It has no
    /// authentication: bind it to loopback or a node-local address.
    pub api_addr: Option<String>,
    /// Serve the file API over TLS; with `tls_ca`, clients must show a certificate from it.
    #[serde(deserialize_with = "switch")]
    pub api_tls: bool,
    /// Shared secret for the tracker and for chunk requests between peers.
    pub secret: Option<String>,
    #[serde(flatten)]
    pub tls: TlsSettings,
    /// The name every peer's certificate carries, which a peer checks when it dials another
    /// (holders are dialled by the address the tracker gives, so their IP proves nothing).
    pub tls_peer_name: String,
    /// Chunk-server connections at once; more are refused with `busy`.
    #[serde(deserialize_with = "count")]
    pub max_connections: usize,
    /// Holders one download talks to at once.
    #[serde(deserialize_with = "count")]
    pub max_sources: usize,
    /// Chunk requests in flight on one connection to a holder.
    #[serde(deserialize_with = "count")]
    pub pipeline_depth: usize,
    /// Longest reply line from the tracker (a locations reply carries the hash list), bytes.
    #[serde(deserialize_with = "bytes")]
    pub max_frame_bytes: usize,
    /// Dialling a tracker or holder must succeed within this time.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// A holder must deliver each chunk within this time or is dropped as stalled.
    #[serde(with = "duration")]
    pub chunk_timeout: Duration,
    /// A tracker request must be answered within this time.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// An idle inbound connection is closed after this time.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// How often an active download asks the tracker for new holders.
    #[serde(with = "duration")]
    pub refresh_interval: Duration,
    /// A daemon shares a new or replaced file of its data dir once its size and mtime have not
    /// changed for this long (a file renamed in with an older mtime is shared at once).
    #[serde(with = "duration")]
    pub settle_time: Duration,
    /// Base URL of an HTTP origin (`http://host:port[/prefix]`): a wanted name that no peer
    /// shares is fetched from `{origin}/{name}` with range requests. Unset = no origin.
    pub origin: Option<String>,
    /// Requests to the origin in flight at once from this peer.
    #[serde(deserialize_with = "count")]
    pub origin_concurrency: usize,
    /// One origin request (connect, headers and body) must finish within this time, or it is
    /// retried (a few times, with backoff).
    #[serde(with = "duration")]
    pub origin_timeout: Duration,
    /// Upstream registries of the OCI registry mirror the API serves under `/v2/`,
    /// comma-separated, each `[alias=]http://host[:port]`. containerd's `ns` query parameter
    /// picks the entry whose alias or `host[:port]` it names; without one the first is used.
    /// Unset = the mirror has no upstream and answers 404.
    pub registry_upstream: Option<String>,
    /// Log filter, tracing `EnvFilter` syntax.
    pub log: String,
    /// Log lines as readable text or JSON objects.
    pub log_format: LogFormat,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            tracker: format!("127.0.0.1:{DEFAULT_TRACKER_PORT}"),
            tracker_replicas: 2,
            listen: "0.0.0.0:7401".into(),
            advertise: None,
            name: None,
            data_dir: PathBuf::from("."),
            want: String::new(),
            chunk_size: None,
            upload_limit: 0,
            upload_slots: 2,
            direct_writes: true,
            metrics_addr: None,
            api_addr: None,
            api_tls: false,
            secret: None,
            tls: TlsSettings::default(),
            tls_peer_name: "shoal-peer".into(),
            max_connections: 256,
            max_sources: 32,
            pipeline_depth: 2,
            max_frame_bytes: 8 * 1024 * 1024,
            connect_timeout: Duration::from_secs(3),
            chunk_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            refresh_interval: Duration::from_secs(2),
            settle_time: Duration::from_secs(1),
            origin: None,
            origin_concurrency: 4,
            origin_timeout: Duration::from_secs(30),
            registry_upstream: None,
            log: "info".into(),
            log_format: LogFormat::Text,
        }
    }
}

/// TLS settings both programs share. Unset, every connection is clear text.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsSettings {
    /// PEM certificate chain this program shows; set, its listeners speak TLS and it dials in
    /// TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle the other side's certificate must chain to; on a listener it makes TLS
    /// mutual (a client without a certificate from it is refused in the handshake).
    pub tls_ca: Option<PathBuf>,
    /// Serve `/metrics`, `/healthz` and `/readyz` over TLS too (no client certificate asked).
    #[serde(deserialize_with = "switch")]
    pub metrics_tls: bool,
}

impl TlsSettings {
    fn check(&self) -> anyhow::Result<()> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => bail!("SHOAL_TLS_CERT is set but SHOAL_TLS_KEY is not: give the certificate's private key"),
            (None, Some(_)) => bail!("SHOAL_TLS_KEY is set but SHOAL_TLS_CERT is not: give the key's certificate"),
            _ => {}
        }
        if self.tls_cert.is_none() && self.tls_ca.is_some() {
            bail!("SHOAL_TLS_CA is set but SHOAL_TLS_CERT is not: TLS needs this side's certificate and key");
        }
        if self.metrics_tls && self.tls_cert.is_none() {
            bail!("SHOAL_METRICS_TLS is on but SHOAL_TLS_CERT is not set: the metrics endpoint needs a certificate");
        }
        Ok(())
    }

    /// The files, when TLS is on.
    pub fn files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ca: self.tls_ca.clone(),
        })
    }

    /// Reads the files, when TLS is on.
    pub fn load(&self) -> anyhow::Result<Option<std::sync::Arc<crate::tls::Tls>>> {
        self.files().map(crate::tls::Tls::load).transpose()
    }
}

/// What `SHOAL_WANT` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    Nothing,
    Everything,
    Names(Vec<String>),
}

impl Settings for PeerConfig {
    const PROGRAM: &'static str = "shoal-peer";

    fn checked(mut self) -> anyhow::Result<Self> {
        parse_addr("SHOAL_LISTEN", &self.listen)?;
        self.tracker = tracker_list(&self.tracker)?;
        if let Some(a) = &self.advertise {
            parse_addr("SHOAL_ADVERTISE", a)?;
        }
        if let Some(m) = &self.metrics_addr {
            parse_addr("SHOAL_METRICS_ADDR", m)?;
        }
        if let Some(a) = &self.api_addr {
            parse_addr("SHOAL_API_ADDR", a)?;
        }
        if self.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            bail!("SHOAL_NAME is empty: give this peer a name, or unset it to use the host name");
        }
        if let Some(size) = self.chunk_size {
            crate::chunking::check_chunk_size(size)
                .map_err(|e| anyhow!("SHOAL_CHUNK_SIZE: {e}"))?;
        }
        check_secret(&self.secret)?;
        self.tls.check()?;
        if self.tls.tls_cert.is_some() && self.tls.tls_ca.is_none() {
            bail!("SHOAL_TLS_CERT is set but SHOAL_TLS_CA is not: a peer needs the CA to check the tracker's and other peers' certificates");
        }
        if self.api_tls && self.tls.tls_cert.is_none() {
            bail!("SHOAL_API_TLS is on but SHOAL_TLS_CERT is not set: the API needs a certificate");
        }
        if self.tls_peer_name.trim().is_empty() {
            bail!("SHOAL_TLS_PEER_NAME is empty: give the name every peer's certificate carries (default shoal-peer)");
        }
        for (var, n, unit) in [
            ("SHOAL_MAX_CONNECTIONS", self.max_connections, "connection"),
            ("SHOAL_MAX_SOURCES", self.max_sources, "holder"),
            ("SHOAL_UPLOAD_SLOTS", self.upload_slots, "slot"),
            ("SHOAL_PIPELINE_DEPTH", self.pipeline_depth, "request"),
            ("SHOAL_TRACKER_REPLICAS", self.tracker_replicas, "tracker"),
            (
                "SHOAL_ORIGIN_CONCURRENCY",
                self.origin_concurrency,
                "request",
            ),
        ] {
            at_least_one(var, n as u64, unit)?;
        }
        at_least_bytes("SHOAL_MAX_FRAME_BYTES", self.max_frame_bytes, 4096)?;
        for (var, d) in [
            ("SHOAL_CONNECT_TIMEOUT", self.connect_timeout),
            ("SHOAL_CHUNK_TIMEOUT", self.chunk_timeout),
            ("SHOAL_REQUEST_TIMEOUT", self.request_timeout),
            ("SHOAL_IDLE_TIMEOUT", self.idle_timeout),
            ("SHOAL_REFRESH_INTERVAL", self.refresh_interval),
            ("SHOAL_ORIGIN_TIMEOUT", self.origin_timeout),
        ] {
            nonzero(var, d)?;
        }
        if let Some(origin) = &self.origin {
            crate::peer::origin::OriginUrl::parse(origin)
                .map_err(|e| anyhow!("SHOAL_ORIGIN: {e}"))?;
        }
        if let Some(list) = &self.registry_upstream {
            crate::peer::mirror::Upstreams::parse(list)
                .map_err(|e| anyhow!("SHOAL_REGISTRY_UPSTREAM: {e}"))?;
        }
        if let Want::Names(names) = self.want() {
            for n in names {
                crate::protocol::validate_name(&n)
                    .map_err(|r| anyhow!("SHOAL_WANT: {}", r.message))?;
            }
        }
        Ok(self)
    }
}

impl PeerConfig {
    /// What `SHOAL_WANT` asks for, parsed.
    pub fn want(&self) -> Want {
        let names: Vec<String> = self
            .want
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if names.iter().any(|n| n == "*") {
            Want::Everything
        } else if names.is_empty() {
            Want::Nothing
        } else {
            Want::Names(names)
        }
    }
}

/// Each entry of a comma-separated tracker list with its port (see [`with_tracker_port`]),
/// joined again by commas.
fn tracker_list(list: &str) -> anyhow::Result<String> {
    let entries: Vec<String> = list
        .split(',')
        .map(with_tracker_port)
        .collect::<anyhow::Result<_>>()?;
    Ok(entries.join(","))
}

/// `host` alone means `host:7400`; `host:port` must carry a usable port.
fn with_tracker_port(tracker: &str) -> anyhow::Result<String> {
    let tracker = tracker.trim();
    let bare_ip = tracker.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare_ip.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_TRACKER_PORT).to_string());
    }
    let Some((host, port)) = tracker.rsplit_once(':') else {
        if tracker.is_empty() {
            bail!(
                "SHOAL_TRACKER is empty or has an empty entry: give each tracker as host or \
                 host:port, separated by commas"
            );
        }
        return Ok(format!("{tracker}:{DEFAULT_TRACKER_PORT}"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !host.is_empty() => Ok(tracker.to_string()),
        _ => bail!(
            "SHOAL_TRACKER: {tracker:?} is not host:port (a port is 1 to 65535; without one, \
             {DEFAULT_TRACKER_PORT} is used)"
        ),
    }
}

/// Longest cluster secret: it travels in every chunk request, whose line a peer caps at 4 KiB.
pub const MAX_SECRET_BYTES: usize = 1024;

fn check_secret(secret: &Option<String>) -> anyhow::Result<()> {
    match secret {
        Some(s) if s.is_empty() || s.len() > MAX_SECRET_BYTES => {
            bail!(
                "SHOAL_SECRET must be 1 to {MAX_SECRET_BYTES} bytes long, not {} (unset it for an \
                 open swarm)",
                units::count(s.len() as u64, "byte")
            )
        }
        _ => Ok(()),
    }
}

fn parse_addr(var: &str, value: &str) -> anyhow::Result<SocketAddr> {
    value.parse().map_err(|_| {
        anyhow!("{var}: {value:?} is not an ip:port address such as 0.0.0.0:7401 or [::1]:7401")
    })
}

fn at_least_one(var: &str, value: u64, unit: &str) -> anyhow::Result<()> {
    if value == 0 {
        bail!("{var} must be at least 1 {unit}, not 0 {unit}s: the program could do nothing");
    }
    Ok(())
}

fn at_least_bytes(var: &str, value: usize, min: usize) -> anyhow::Result<()> {
    if value < min {
        bail!(
            "{var} must be at least {}, not {}",
            units::bytes(min as u64),
            units::bytes(value as u64)
        );
    }
    Ok(())
}

fn nonzero(var: &str, value: Duration) -> anyhow::Result<()> {
    if value.is_zero() {
        bail!("{var} must be longer than 0s: write a duration such as 500ms, 10s or 2m");
    }
    Ok(())
}

/// What [`load`] needs of a settings struct.
pub trait Settings: Serialize + DeserializeOwned + Default {
    /// The program these settings are for, as messages name it.
    const PROGRAM: &'static str;

    /// Refuses values the program cannot work with and completes those with a default part
    /// (a tracker host without a port).
    fn checked(self) -> anyhow::Result<Self>;
}

const PREFIX: &str = "SHOAL_";
/// The variable naming the settings file; it is no setting itself.
const CONFIG_VAR: &str = "SHOAL_CONFIG";

/// Builds a settings struct from defaults, the settings file (`file`, else `SHOAL_CONFIG`),
/// `SHOAL_*` variables and the given flag overrides (keys are field names), in that order of
/// precedence, and checks it.
pub fn load<T: Settings>(file: Option<&Path>, flags: &[(&str, String)]) -> anyhow::Result<T> {
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        let Some(key) = key.to_str().filter(|k| k.starts_with(PREFIX)) else {
            continue;
        };
        let value = value
            .into_string()
            .map_err(|_| anyhow!("{key} is not valid UTF-8 text"))?;
        env.push((key.to_string(), value));
    }
    load_from(env, file, flags)
}

/// One value from one layer, with the name the operator gave it there.
struct Entry {
    label: String,
    key: String,
    value: config::Value,
}

/// [`load`] with the environment passed in, so tests need not touch the process environment.
pub fn load_from<T: Settings>(
    env: Vec<(String, String)>,
    file: Option<&Path>,
    flags: &[(&str, String)],
) -> anyhow::Result<T> {
    let known = keys::<T>();
    let env_file = env
        .iter()
        .find(|(k, v)| k == CONFIG_VAR && !v.is_empty())
        .map(|(_, v)| PathBuf::from(v));
    let mut entries = match file.or(env_file.as_deref()) {
        Some(path) => file_entries::<T>(path, &known)?,
        None => Vec::new(),
    };
    for (var, value) in env.into_iter().filter(|(k, _)| k != CONFIG_VAR) {
        let Some(key) = var.strip_prefix(PREFIX).map(str::to_lowercase) else {
            continue;
        };
        if !known.contains(&key) {
            return Err(unknown::<T>(&var, &key, &known, |k| {
                format!("{PREFIX}{}", k.to_uppercase())
            }));
        }
        entries.push(Entry {
            label: var,
            key,
            value: value.into(),
        });
    }
    entries.extend(flags.iter().map(|(key, value)| Entry {
        label: format!("--{}", key.replace('_', "-")),
        key: key.to_string(),
        value: value.as_str().into(),
    }));
    build::<T>(&entries)
        .map_err(|e| blame::<T>(&entries, e))?
        .checked()
}

/// The keys of the settings file, each checked against the known ones.
fn file_entries<T: Settings>(path: &Path, known: &[String]) -> anyhow::Result<Vec<Entry>> {
    let shown = path.display().to_string();
    let table = config::Config::builder()
        .add_source(config::File::with_name(&shown).required(true))
        .build()
        .and_then(|c| config::Source::collect(&c))
        .map_err(|e| anyhow!("settings file {shown}: {}", reason(&e)))?;
    let mut entries = Vec::new();
    for (key, value) in table {
        let label = format!("{key} in {shown}");
        if !known.contains(&key) {
            return Err(unknown::<T>(&label, &key, known, str::to_string));
        }
        entries.push(Entry { label, key, value });
    }
    // The file's own order is lost in its table; a fixed one keeps error messages stable.
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(entries)
}

/// The setting keys of `T`: its field names, as the file writes them.
fn keys<T: Serialize + Default>() -> Vec<String> {
    match serde_json::to_value(T::default()) {
        Ok(serde_json::Value::Object(fields)) => fields.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// The error for a key no setting of `T` has: the nearest known key, or the program it is for.
fn unknown<T: Settings>(
    label: &str,
    key: &str,
    known: &[String],
    shown: fn(&str) -> String,
) -> anyhow::Error {
    let program = T::PROGRAM;
    let owner = [
        (PeerConfig::PROGRAM, keys::<PeerConfig>()),
        (TrackerConfig::PROGRAM, keys::<TrackerConfig>()),
    ]
    .into_iter()
    .find(|(_, keys)| keys.iter().any(|k| k == key));
    if let Some((other, _)) = owner {
        return anyhow!("unknown setting {label}: it is a setting of {other}, not of {program}");
    }
    let nearest = known
        .iter()
        .map(|k| (strsim::jaro(key, k), k))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match nearest {
        Some((_, k)) => anyhow!("unknown setting {label}: did you mean {}?", shown(k)),
        None => anyhow!("unknown setting {label}: {program} has no such setting (see --help)"),
    }
}

fn build<T: Settings>(entries: &[Entry]) -> Result<T, config::ConfigError> {
    let mut builder =
        config::Config::builder().add_source(config::Config::try_from(&T::default())?);
    for entry in entries {
        builder = builder.set_override(entry.key.as_str(), entry.value.clone())?;
    }
    builder.build()?.try_deserialize()
}

/// Names the setting behind a failed build: the first entry that fails on the defaults alone.
fn blame<T: Settings>(entries: &[Entry], err: config::ConfigError) -> anyhow::Error {
    for entry in entries {
        if let Err(e) = build::<T>(std::slice::from_ref(entry)) {
            return anyhow!("{}: {}", entry.label, reason(&e));
        }
    }
    anyhow!("invalid configuration: {}", reason(&err))
}

/// The part of a `config` error an operator needs: the value and what was expected.
fn reason(err: &config::ConfigError) -> String {
    match err {
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("expected {expected}, found {unexpected}"),
        other => other.to_string(),
    }
}

/// Reads a value from whatever a layer holds (text from the environment or a flag, a number or
/// a boolean from a file) through `parse`, whose error is what the operator is shown.
fn parsed<'de, D: Deserializer<'de>, T>(
    d: D,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    d.deserialize_any(Parsed(parse))
}

struct Parsed<T>(fn(&str) -> Result<T, String>);

impl<T> Visitor<'_> for Parsed<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a single value")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v.trim()).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
}

fn fit<T: TryFrom<u64>>(n: u64, shown: String) -> Result<T, String> {
    T::try_from(n).map_err(|_| format!("{shown} is more than this setting can hold"))
}

/// A count of things: a whole number.
fn count<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
    parsed(d, |s| match s.parse::<u64>() {
        Ok(n) => fit(n, n.to_string()),
        Err(_) => Err(format!("{s:?} is not a whole number such as 0, 1 or 50")),
    })
}

/// A size in bytes: a plain integer, or a number with a unit (`512KiB`, `10M`, `1GiB`).
fn bytes<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
    parsed(d, |s| {
        let n = units::parse_bytes(s)?;
        fit(n, units::bytes(n))
    })
}

/// [`bytes`] for a setting that may be unset.
fn optional_bytes<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<Option<T>, D::Error> {
    Ok(Option::<Bytes<T>>::deserialize(d)?.map(|Bytes(n)| n))
}

#[derive(Deserialize)]
struct Bytes<T: TryFrom<u64>>(#[serde(deserialize_with = "bytes")] T);

/// A yes-or-no setting.
fn switch<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    parsed(d, |s| match s.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(format!("{s:?} is not true or false")),
    })
}

/// Durations as people write them (`500ms`, `10s`, `2m`), in both directions.
mod duration {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(d, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::parsed(d, |s| {
            humantime::parse_duration(s).map_err(|_| {
                format!(
                    "{s:?} is not a duration: write a number with a unit, such as 500ms, 10s or 2m"
                )
            })
        })
    }
}

/// The settings as a JSON object with secrets replaced by `***`, for the start-up log line.
pub fn masked<T: Serialize>(settings: &T) -> serde_json::Value {
    let mut v = serde_json::to_value(settings).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        for (k, val) in obj.iter_mut() {
            if k.contains("secret") && !val.is_null() {
                *val = "***".into();
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn peer_err(pairs: &[(&str, &str)]) -> String {
        load_from::<PeerConfig>(env(pairs), None, &[])
            .unwrap_err()
            .to_string()
    }

    fn tracker_err(pairs: &[(&str, &str)]) -> String {
        load_from::<TrackerConfig>(env(pairs), None, &[])
            .unwrap_err()
            .to_string()
    }

    fn settings_file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn defaults_hold_without_any_source() {
        let c: PeerConfig = load_from(env(&[]), None, &[]).unwrap();
        assert_eq!(c, PeerConfig::default());
    }

    #[test]
    fn env_overrides_defaults_and_flags_override_env() {
        let vars = [
            ("SHOAL_ANNOUNCE_INTERVAL", "2s"),
            ("SHOAL_LISTEN", "127.0.0.1:9"),
            ("SHOAL_MAX_HOLDERS", "7"),
        ];
        let c: TrackerConfig =
            load_from(env(&vars), None, &[("listen", "127.0.0.1:10".into())]).unwrap();
        assert_eq!(c.announce_interval, Duration::from_secs(2));
        assert_eq!(c.max_holders, 7);
        assert_eq!(c.listen, "127.0.0.1:10");
    }

    #[test]
    fn file_sits_between_defaults_and_env() {
        let (_dir, path) = settings_file(
            "shoal.toml",
            "chunk_size = 65536\nwant = \"a,b\"\nupload_limit = 5\n",
        );
        let p = path.to_str().unwrap();
        let vars = [("SHOAL_CONFIG", p), ("SHOAL_UPLOAD_LIMIT", "9")];
        let c: PeerConfig = load_from(env(&vars), None, &[]).unwrap();
        assert_eq!(c.chunk_size, Some(65536));
        assert_eq!(c.want(), Want::Names(vec!["a".into(), "b".into()]));
        assert_eq!(c.upload_limit, 9);
    }

    #[test]
    fn the_config_flag_wins_over_the_variable() {
        let (_dir, flagged) = settings_file("flag.json", r#"{"max_holders": 3}"#);
        let vars = [("SHOAL_CONFIG", "/nonexistent/shoal.toml")];
        let c: TrackerConfig = load_from(env(&vars), Some(&flagged), &[]).unwrap();
        assert_eq!(c.max_holders, 3);
    }

    #[test]
    fn a_misspelt_variable_is_refused_with_the_nearest_one() {
        let err = peer_err(&[("SHOAL_LISTN", "127.0.0.1:1")]);
        assert!(
            err.contains("SHOAL_LISTN") && err.contains("did you mean SHOAL_LISTEN?"),
            "{err}"
        );
        let err = peer_err(&[("SHOAL_TRAKER", "t:1")]);
        assert!(err.contains("did you mean SHOAL_TRACKER?"), "{err}");
        let err = tracker_err(&[("SHOAL_XYZZY_QUUX", "1")]);
        assert!(
            err.contains("SHOAL_XYZZY_QUUX") && !err.contains("did you mean"),
            "{err}"
        );
    }

    #[test]
    fn the_other_programs_setting_is_named_as_such() {
        let err = tracker_err(&[("SHOAL_WANT", "*")]);
        assert!(
            err.contains("SHOAL_WANT") && err.contains("shoal-peer"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_file_key_is_refused_with_the_nearest_one() {
        let (_dir, path) = settings_file("shoal.toml", "anounce_interval = \"5s\"\n");
        let err = load_from::<TrackerConfig>(env(&[]), Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("anounce_interval in") && err.contains("did you mean announce_interval?"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_value_names_its_variable_flag_or_file_key() {
        let err = peer_err(&[("SHOAL_CHUNK_SIZE", "big")]);
        assert!(err.starts_with("SHOAL_CHUNK_SIZE: \"big\" is not"), "{err}");
        let err = tracker_err(&[
            ("SHOAL_LISTEN", "127.0.0.1:1"),
            ("SHOAL_ANNOUNCE_INTERVAL", "soon"),
        ]);
        assert!(
            err.starts_with("SHOAL_ANNOUNCE_INTERVAL: \"soon\" is not a duration"),
            "{err}"
        );
        let err = load_from::<TrackerConfig>(env(&[]), None, &[("max_holders", "x".into())])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--max-holders: \"x\" is not a whole number"),
            "{err}"
        );
        let (_dir, path) = settings_file("shoal.toml", "idle_timeout = \"forever\"\n");
        let err = load_from::<TrackerConfig>(env(&[]), Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("idle_timeout in "), "{err}");
        assert!(err.contains("is not a duration"), "{err}");
    }

    #[test]
    fn errors_speak_of_values_not_rust_types() {
        let err = tracker_err(&[("SHOAL_LOG_FORMAT", "yaml")]);
        assert_eq!(
            err,
            "SHOAL_LOG_FORMAT: \"yaml\" is not a log format: use text or json"
        );
        let err = peer_err(&[("SHOAL_DIRECT_WRITES", "maybe")]);
        assert!(err.ends_with("\"maybe\" is not true or false"), "{err}");
        let err = peer_err(&[("SHOAL_MAX_SOURCES", "-1")]);
        assert!(err.contains("is not a whole number"), "{err}");
        for text in [&err, &tracker_err(&[("SHOAL_LOG_FORMAT", "yaml")])] {
            assert!(!text.contains("enum") && !text.contains("usize"), "{text}");
        }
    }

    #[test]
    fn useless_values_are_refused_with_units() {
        let err = tracker_err(&[("SHOAL_MAX_PEERS", "0")]);
        assert_eq!(
            err,
            "SHOAL_MAX_PEERS must be at least 1 peer, not 0 peers: the program could do nothing"
        );
        let err = tracker_err(&[("SHOAL_MAX_FRAME_BYTES", "100")]);
        assert_eq!(
            err,
            "SHOAL_MAX_FRAME_BYTES must be at least 4.0 KiB, not 100 bytes"
        );
        let err = tracker_err(&[("SHOAL_IDLE_TIMEOUT", "0s")]);
        assert!(
            err.starts_with("SHOAL_IDLE_TIMEOUT must be longer than 0s"),
            "{err}"
        );
        for var in [
            "SHOAL_MAX_FILES",
            "SHOAL_MAX_FILES_PER_PEER",
            "SHOAL_MAX_HOLDERS",
            "SHOAL_MAX_CHUNKS_PER_FILE",
            "SHOAL_MAX_CONNECTIONS",
        ] {
            assert!(tracker_err(&[(var, "0")]).starts_with(var));
        }
        for var in [
            "SHOAL_UPLOAD_SLOTS",
            "SHOAL_MAX_SOURCES",
            "SHOAL_PIPELINE_DEPTH",
        ] {
            assert!(peer_err(&[(var, "0")]).starts_with(var));
        }
        assert!(peer_err(&[("SHOAL_NAME", " ")]).starts_with("SHOAL_NAME is empty"));
        let err = peer_err(&[("SHOAL_CHUNK_SIZE", "100")]);
        assert!(
            err.starts_with("SHOAL_CHUNK_SIZE: ") && err.contains("KiB"),
            "{err}"
        );
    }

    #[test]
    fn byte_settings_accept_units() {
        let vars = [
            ("SHOAL_CHUNK_SIZE", "512KiB"),
            ("SHOAL_UPLOAD_LIMIT", "10M"),
            ("SHOAL_MAX_FRAME_BYTES", "1GiB"),
        ];
        let c: PeerConfig = load_from(env(&vars), None, &[]).unwrap();
        assert_eq!(c.chunk_size, Some(512 * 1024));
        assert_eq!(c.upload_limit, 10_000_000);
        assert_eq!(c.max_frame_bytes, 1 << 30);
        let (_dir, path) = settings_file("shoal.toml", "max_frame_bytes = \"64KiB\"\n");
        let c: TrackerConfig = load_from(env(&[]), Some(&path), &[]).unwrap();
        assert_eq!(c.max_frame_bytes, 64 * 1024);
        let err = peer_err(&[("SHOAL_CHUNK_SIZE", "8GiB")]);
        assert!(err.contains("more than this setting can hold"), "{err}");
    }

    #[test]
    fn a_tracker_host_without_a_port_means_7400() {
        let tracker = |t: &str| {
            load_from::<PeerConfig>(env(&[("SHOAL_TRACKER", t)]), None, &[]).map(|c| c.tracker)
        };
        assert_eq!(tracker("tracker").unwrap(), "tracker:7400");
        assert_eq!(tracker("10.0.0.5").unwrap(), "10.0.0.5:7400");
        assert_eq!(tracker("::1").unwrap(), "[::1]:7400");
        assert_eq!(tracker("[::1]").unwrap(), "[::1]:7400");
        assert_eq!(tracker("tracker:7500").unwrap(), "tracker:7500");
        assert_eq!(
            tracker("t1, 10.0.0.6,t3:7500").unwrap(),
            "t1:7400,10.0.0.6:7400,t3:7500"
        );
        for bad in [
            "tracker:0",
            "tracker:99999",
            ":7400",
            "",
            "t1,,t2",
            "t1:0,t2",
        ] {
            let err = tracker(bad).unwrap_err().to_string();
            assert!(err.starts_with("SHOAL_TRACKER"), "{err}");
        }
    }

    #[test]
    fn addresses_and_names_are_checked() {
        assert!(peer_err(&[("SHOAL_LISTEN", "nowhere")]).starts_with("SHOAL_LISTEN"));
        assert!(peer_err(&[("SHOAL_WANT", "../etc")]).starts_with("SHOAL_WANT"));
    }

    #[test]
    fn want_star_means_everything() {
        let c = PeerConfig {
            want: "a, *".into(),
            ..PeerConfig::default()
        };
        assert_eq!(c.want(), Want::Everything);
        assert_eq!(PeerConfig::default().want(), Want::Nothing);
    }

    #[test]
    fn tls_settings_come_together_or_are_refused_with_what_is_missing() {
        let on = load_from::<PeerConfig>(
            env(&[
                ("SHOAL_TLS_CERT", "c.pem"),
                ("SHOAL_TLS_KEY", "k.pem"),
                ("SHOAL_TLS_CA", "ca.pem"),
                ("SHOAL_METRICS_TLS", "1"),
            ]),
            None,
            &[],
        )
        .unwrap();
        assert_eq!(on.tls.tls_ca, Some(PathBuf::from("ca.pem")));
        assert!(on.tls.metrics_tls);
        assert_eq!(on.tls_peer_name, "shoal-peer");
        let err = peer_err(&[("SHOAL_TLS_CERT", "c.pem")]);
        assert!(err.contains("SHOAL_TLS_KEY is not"), "{err}");
        let err = peer_err(&[("SHOAL_TLS_CERT", "c.pem"), ("SHOAL_TLS_KEY", "k.pem")]);
        assert!(err.contains("SHOAL_TLS_CA is not"), "{err}");
        let err = tracker_err(&[("SHOAL_TLS_CA", "ca.pem")]);
        assert!(err.contains("SHOAL_TLS_CERT is not"), "{err}");
        let err = tracker_err(&[("SHOAL_METRICS_TLS", "yes")]);
        assert!(err.contains("SHOAL_METRICS_TLS"), "{err}");
        let err = tracker_err(&[("SHOAL_TLS_PEER_NAME", "x")]);
        assert!(err.contains("setting of shoal-peer"), "{err}");
        // Server-only TLS is the tracker's choice to make.
        let tracker = load_from::<TrackerConfig>(
            env(&[("SHOAL_TLS_CERT", "c.pem"), ("SHOAL_TLS_KEY", "k.pem")]),
            None,
            &[],
        )
        .unwrap();
        assert!(tracker.tls.files().is_some_and(|f| f.ca.is_none()));
        // The settings file names them like every other key.
        let (_dir, path) = settings_file(
            "shoal.toml",
            "tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\nmetrics_tls = true\n",
        );
        let from_file: TrackerConfig = load_from(Vec::new(), Some(&path), &[]).unwrap();
        assert_eq!(from_file.tls.tls_key, Some(PathBuf::from("k.pem")));
        assert!(from_file.tls.metrics_tls);
    }

    #[test]
    fn secrets_are_masked_in_an_object() {
        let c = TrackerConfig {
            secret: Some("hunter2".into()),
            ..TrackerConfig::default()
        };
        let shown = masked(&c);
        assert_eq!(shown["secret"], "***");
        assert_eq!(shown["announce_interval"], "30s");
        assert!(!shown.to_string().contains("hunter2"));
    }
}
