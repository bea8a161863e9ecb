//! Settings, one struct per binary. Layers, lowest first: the `Default` impls below (every default
//! lives there), the file named by `SHOAL_CONFIG` (TOML or JSON), `SHOAL_*` environment variables,
//! then command-line flags. Errors name the environment variable, which is how operators set them.

use anyhow::{anyhow, bail, Context};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Log output shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrackerConfig {
    /// Protocol address (`SHOAL_LISTEN`).
    pub listen: String,
    /// HTTP address for `/metrics`, `/healthz`, `/readyz`; unset = no HTTP endpoint.
    pub metrics_addr: Option<String>,
    /// How often peers must announce; a peer silent for 3 intervals is expired.
    #[serde(with = "humantime_serde")]
    pub announce_interval: Duration,
    /// Shared secret peers must present to register; unset = open swarm.
    pub secret: Option<String>,
    /// Connections served at once; more are refused with `busy`.
    pub max_connections: usize,
    /// Longest request line, in bytes.
    pub max_frame_bytes: usize,
    /// A connection with no request started for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A request line must arrive in full within this time once started.
    #[serde(with = "humantime_serde")]
    pub frame_timeout: Duration,
    /// Registered peers at once; further registrations get `limit_reached`.
    pub max_peers: usize,
    /// Distinct files in the index at once.
    pub max_files: usize,
    /// Files one peer may hold entries for.
    pub max_files_per_peer: usize,
    /// Chunks one file may have.
    pub max_chunks_per_file: u64,
    /// Most holders returned by one locations reply.
    pub max_holders: usize,
    pub log: String,
    pub log_format: LogFormat,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            listen: "0.0.0.0:7400".into(),
            metrics_addr: None,
            announce_interval: Duration::from_secs(30),
            secret: None,
            max_connections: 4096,
            max_frame_bytes: 4 * 1024 * 1024,
            idle_timeout: Duration::from_secs(120),
            frame_timeout: Duration::from_secs(10),
            max_peers: 100_000,
            max_files: 100_000,
            max_files_per_peer: 10_000,
            max_chunks_per_file: 65_536,
            max_holders: 50,
            log: "info".into(),
            log_format: LogFormat::Text,
        }
    }
}

impl TrackerConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        parse_addr("SHOAL_LISTEN", &self.listen)?;
        if let Some(m) = &self.metrics_addr {
            parse_addr("SHOAL_METRICS_ADDR", m)?;
        }
        positive(
            "SHOAL_ANNOUNCE_INTERVAL",
            self.announce_interval.as_millis() as u64,
        )?;
        positive("SHOAL_MAX_CONNECTIONS", self.max_connections as u64)?;
        check_secret(&self.secret)?;
        at_least("SHOAL_MAX_FRAME_BYTES", self.max_frame_bytes as u64, 4096)?;
        positive("SHOAL_MAX_HOLDERS", self.max_holders as u64)?;
        positive("SHOAL_MAX_CHUNKS_PER_FILE", self.max_chunks_per_file)?;
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerConfig {
    /// Tracker address, `host:port` (DNS names allowed).
    pub tracker: String,
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
    pub chunk_size: Option<u32>,
    /// Total upload rate cap, bytes per second; 0 = unlimited.
    pub upload_limit: u64,
    /// Chunks sent at once; more requests wait their turn. Few slots finish each chunk sooner,
    /// so its recipient can pass it on sooner.
    pub upload_slots: usize,
    /// Write downloaded chunks with `O_DIRECT` (past the page cache) where the file system
    /// allows it.
    pub direct_writes: bool,
    /// HTTP address for `/metrics`, `/healthz`, `/readyz`; unset = no HTTP endpoint.
    pub metrics_addr: Option<String>,
    /// Shared secret for the tracker and for chunk requests between peers.
    pub secret: Option<String>,
    /// Chunk-server connections at once; more are refused with `busy`.
    pub max_connections: usize,
    /// Holders one download talks to at once.
    pub max_sources: usize,
    /// Chunk requests in flight on one connection to a holder.
    pub pipeline_depth: usize,
    /// Longest reply line from the tracker (a locations reply carries the hash list), bytes.
    pub max_frame_bytes: usize,
    /// Dialling a tracker or holder must succeed within this time.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A holder must deliver each chunk within this time or is dropped as stalled.
    #[serde(with = "humantime_serde")]
    pub chunk_timeout: Duration,
    /// A tracker request must be answered within this time.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// An idle inbound connection is closed after this time.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How often an active download asks the tracker for new holders.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    pub log: String,
    pub log_format: LogFormat,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            tracker: "127.0.0.1:7400".into(),
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
            secret: None,
            max_connections: 256,
            max_sources: 32,
            pipeline_depth: 2,
            max_frame_bytes: 8 * 1024 * 1024,
            connect_timeout: Duration::from_secs(3),
            chunk_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            refresh_interval: Duration::from_secs(2),
            log: "info".into(),
            log_format: LogFormat::Text,
        }
    }
}

/// What `SHOAL_WANT` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    Nothing,
    Everything,
    Names(Vec<String>),
}

impl PeerConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        parse_addr("SHOAL_LISTEN", &self.listen)?;
        if self.tracker.trim().is_empty() || !self.tracker.contains(':') {
            bail!("SHOAL_TRACKER: {:?} is not host:port", self.tracker);
        }
        if let Some(a) = &self.advertise {
            parse_addr("SHOAL_ADVERTISE", a)?;
        }
        if let Some(m) = &self.metrics_addr {
            parse_addr("SHOAL_METRICS_ADDR", m)?;
        }
        if let Some(size) = self.chunk_size {
            crate::chunking::check_chunk_size(size).context("SHOAL_CHUNK_SIZE")?;
        }
        positive("SHOAL_MAX_CONNECTIONS", self.max_connections as u64)?;
        check_secret(&self.secret)?;
        positive("SHOAL_MAX_SOURCES", self.max_sources as u64)?;
        positive("SHOAL_UPLOAD_SLOTS", self.upload_slots as u64)?;
        positive("SHOAL_PIPELINE_DEPTH", self.pipeline_depth as u64)?;
        at_least("SHOAL_MAX_FRAME_BYTES", self.max_frame_bytes as u64, 4096)?;
        for (var, d) in [
            ("SHOAL_CONNECT_TIMEOUT", self.connect_timeout),
            ("SHOAL_CHUNK_TIMEOUT", self.chunk_timeout),
            ("SHOAL_REQUEST_TIMEOUT", self.request_timeout),
            ("SHOAL_REFRESH_INTERVAL", self.refresh_interval),
        ] {
            positive(var, d.as_millis() as u64)?;
        }
        if let Want::Names(names) = self.want() {
            for n in names {
                crate::protocol::validate_name(&n)
                    .map_err(|r| anyhow!("SHOAL_WANT: {}", r.message))?;
            }
        }
        Ok(())
    }

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

/// Longest cluster secret: it travels in every chunk request, whose line a peer caps at 4 KiB.
pub const MAX_SECRET_BYTES: usize = 1024;

fn check_secret(secret: &Option<String>) -> anyhow::Result<()> {
    match secret {
        Some(s) if s.is_empty() || s.len() > MAX_SECRET_BYTES => {
            bail!(
                "SHOAL_SECRET: must be 1 to {MAX_SECRET_BYTES} bytes (unset it for an open swarm)"
            )
        }
        _ => Ok(()),
    }
}

fn parse_addr(var: &str, value: &str) -> anyhow::Result<SocketAddr> {
    value
        .parse()
        .map_err(|_| anyhow!("{var}: {value:?} is not an ip:port address"))
}

fn positive(var: &str, value: u64) -> anyhow::Result<()> {
    at_least(var, value, 1)
}

fn at_least(var: &str, value: u64, min: u64) -> anyhow::Result<()> {
    if value < min {
        bail!("{var}: {value} is below the minimum {min}");
    }
    Ok(())
}

/// Builds a settings struct from defaults, the `SHOAL_CONFIG` file, `SHOAL_*` variables and the
/// given flag overrides (keys are field names), in that order of precedence.
pub fn load<T: Serialize + DeserializeOwned + Default>(
    flags: &[(&str, String)],
) -> anyhow::Result<T> {
    load_from(std::env::vars(), flags)
}

/// [`load`] with the environment passed in, so tests need not touch the process environment.
pub fn load_from<T: Serialize + DeserializeOwned + Default>(
    env: impl Iterator<Item = (String, String)>,
    flags: &[(&str, String)],
) -> anyhow::Result<T> {
    let env: Vec<(String, String)> = env.filter(|(k, _)| k.starts_with("SHOAL_")).collect();
    let file = env
        .iter()
        .find(|(k, v)| k == "SHOAL_CONFIG" && !v.is_empty())
        .map(|(_, v)| v.clone());
    build::<T>(file.as_deref(), &env, flags).map_err(|e| {
        // Say which setting is wrong: retry each variable and flag alone on top of the defaults.
        let culprit = env
            .iter()
            .filter(|(k, _)| k != "SHOAL_CONFIG")
            .find(|pair| build::<T>(None, std::slice::from_ref(*pair), &[]).is_err())
            .map(|(k, _)| k.clone())
            .or_else(|| {
                let bad = flags
                    .iter()
                    .find(|f| build::<T>(None, &[], std::slice::from_ref(*f)).is_err())?;
                Some(format!("--{}", bad.0.replace('_', "-")))
            })
            .or(file.map(|f| format!("SHOAL_CONFIG file {f}")));
        match culprit {
            Some(c) => anyhow!("invalid configuration: {c}: {e}"),
            None => anyhow!("invalid configuration: {e}"),
        }
    })
}

fn build<T: Serialize + DeserializeOwned + Default>(
    file: Option<&str>,
    env: &[(String, String)],
    flags: &[(&str, String)],
) -> Result<T, config::ConfigError> {
    let mut builder =
        config::Config::builder().add_source(config::Config::try_from(&T::default())?);
    if let Some(path) = file {
        builder = builder.add_source(config::File::with_name(path).required(true));
    }
    let vars = env.iter().cloned().collect();
    builder = builder.add_source(
        config::Environment::with_prefix("SHOAL")
            .prefix_separator("_")
            .source(Some(vars)),
    );
    for (key, value) in flags {
        builder = builder.set_override(*key, value.as_str())?;
    }
    builder.build()?.try_deserialize()
}

/// The settings as JSON with secrets replaced by `***`, for the start-up log line.
pub fn masked<T: Serialize>(settings: &T) -> String {
    let mut v = serde_json::to_value(settings).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        for (k, val) in obj.iter_mut() {
            if k.contains("secret") && !val.is_null() {
                *val = "***".into();
            }
        }
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn defaults_hold_without_any_source() {
        let c: PeerConfig = load_from(env(&[]), &[]).unwrap();
        assert_eq!(c, PeerConfig::default());
    }

    #[test]
    fn env_overrides_defaults_and_flags_override_env() {
        let vars = [
            ("SHOAL_ANNOUNCE_INTERVAL", "2s"),
            ("SHOAL_LISTEN", "127.0.0.1:9"),
            ("SHOAL_MAX_HOLDERS", "7"),
        ];
        let c: TrackerConfig = load_from(env(&vars), &[("listen", "127.0.0.1:10".into())]).unwrap();
        assert_eq!(c.announce_interval, Duration::from_secs(2));
        assert_eq!(c.max_holders, 7);
        assert_eq!(c.listen, "127.0.0.1:10");
    }

    #[test]
    fn file_sits_between_defaults_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shoal.toml");
        std::fs::write(
            &path,
            "chunk_size = 65536\nwant = \"a,b\"\nupload_limit = 5\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c: PeerConfig = load_from(
            env(&[("SHOAL_CONFIG", p), ("SHOAL_UPLOAD_LIMIT", "9")]),
            &[],
        )
        .unwrap();
        assert_eq!(c.chunk_size, Some(65536));
        assert_eq!(c.want(), Want::Names(vec!["a".into(), "b".into()]));
        assert_eq!(c.upload_limit, 9);
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let err = load_from::<PeerConfig>(env(&[("SHOAL_CHUNK_SIZE", "big")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("SHOAL_CHUNK_SIZE"), "{err}");
        let vars = [
            ("SHOAL_LISTEN", "127.0.0.1:1"),
            ("SHOAL_ANNOUNCE_INTERVAL", "soon"),
        ];
        let err = load_from::<TrackerConfig>(env(&vars), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("SHOAL_ANNOUNCE_INTERVAL") && !err.contains("SHOAL_LISTEN"),
            "{err}"
        );
        let err = load_from::<TrackerConfig>(env(&[]), &[("max_holders", "x".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--max-holders"), "{err}");
        let c: PeerConfig = load_from(env(&[("SHOAL_LISTEN", "nowhere")]), &[]).unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("SHOAL_LISTEN"));
        let c: PeerConfig = load_from(env(&[("SHOAL_WANT", "../etc")]), &[]).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("SHOAL_WANT"));
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
    fn secrets_are_masked() {
        let c = TrackerConfig {
            secret: Some("hunter2".into()),
            ..TrackerConfig::default()
        };
        let shown = masked(&c);
        assert!(
            !shown.contains("hunter2") && shown.contains("***"),
            "{shown}"
        );
    }
}
