//! `shoal-peer mirror-config`: points containerd at the node's agent as a registry mirror by
//! writing `{hosts_dir}/{registry}/hosts.toml` for each upstream of `SHOAL_REGISTRY_UPSTREAM`,
//! each file replaced atomically. Files it wrote before for registries no longer configured are
//! removed; a hosts.toml it did not write is never touched.

use super::mirror::Upstreams;
use super::origin::OriginUrl;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The first line of every file written here: how a later run knows the file is its own.
const MARKER: &str = "# Written by shoal-peer mirror-config";

/// What to write.
pub struct MirrorConfig<'a> {
    /// containerd's registry `config_path`, e.g. `/etc/containerd/certs.d`.
    pub hosts_dir: &'a Path,
    /// The agent's API as containerd reaches it, e.g. `http://10.0.0.5:7480`.
    pub agent: &'a str,
    /// The agent's upstreams; `None` removes the files written before.
    pub upstreams: Option<&'a str>,
    /// Whether tag lookups go to the agent too (`resolve`), or only pulls by digest.
    pub resolve: bool,
}

/// Why nothing or not everything was written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad flags: nothing was written.
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} exists and was not written by shoal-peer mirror-config: merge the agent into it \
         by hand or remove it, then run again"
    )]
    Foreign(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The registry containerd falls back to when the agent fails: the registry an alias names
/// (docker.io's API is at registry-1.docker.io), else the entry's own URL.
fn server(name: &str, alias: Option<&str>) -> String {
    match alias {
        Some("docker.io") => "https://registry-1.docker.io".into(),
        Some(alias) => format!("https://{alias}"),
        None => format!("http://{name}"),
    }
}

/// The hosts.toml of one registry.
fn hosts_toml(server: &str, agent: &str, resolve: bool) -> String {
    let capabilities = if resolve {
        r#"["pull", "resolve"]"#
    } else {
        r#"["pull"]"#
    };
    format!(
        "{MARKER}; it is rewritten whenever the agent starts.\n\
         # containerd asks the agent first (adding ?ns=<registry>), then the server itself.\n\
         server = \"{server}\"\n\n\
         [host.\"{agent}\"]\n  capabilities = {capabilities}\n"
    )
}

/// Whether the file at `path` is absent, or was written here.
fn ours_or_absent(path: &Path) -> Result<bool, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.starts_with(MARKER)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(io(path)(e)),
    }
}

/// Writes `text` to `path` through a temporary file in the same directory, so containerd never
/// reads half a file.
fn write_atomically(path: &Path, text: &str) -> Result<(), Error> {
    let dir = path.parent().expect("a file in a registry directory");
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(".hosts.toml.{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io(path))
}

/// Files written here before, for registries other than `keep`.
fn stale_files(hosts_dir: &Path, keep: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    let entries = match std::fs::read_dir(hosts_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(hosts_dir)(e)),
    };
    let mut stale = Vec::new();
    for entry in entries {
        let path = entry.map_err(io(hosts_dir))?.path().join("hosts.toml");
        if path.is_file() && !keep.contains(&path) && ours_or_absent(&path)? {
            stale.push(path);
        }
    }
    Ok(stale)
}

/// Writes a hosts.toml per upstream and removes the stale ones; returns the lines to print.
/// Goes on past a foreign file, then reports it.
pub fn run(req: &MirrorConfig) -> Result<Vec<String>, Error> {
    let agent = OriginUrl::parse(req.agent)
        .map_err(|e| Error::Usage(format!("--agent: {e}")))?
        .host_port();
    let agent = format!("http://{agent}");
    let upstreams = match req.upstreams.filter(|u| !u.trim().is_empty()) {
        Some(list) => Upstreams::parse(list)
            .map_err(|e| Error::Usage(format!("SHOAL_REGISTRY_UPSTREAM: {e}")))?,
        None => Upstreams::default(),
    };
    let mut done = Vec::new();
    let mut written = Vec::new();
    let mut foreign = None;
    for upstream in upstreams.iter() {
        let path = req.hosts_dir.join(upstream.name()).join("hosts.toml");
        if !ours_or_absent(&path)? {
            foreign = Some(Error::Foreign(path));
            continue;
        }
        let server = server(upstream.name(), upstream.alias());
        write_atomically(&path, &hosts_toml(&server, &agent, req.resolve))?;
        done.push(format!(
            "wrote {}: {} via {agent}",
            path.display(),
            upstream.name()
        ));
        written.push(path);
    }
    for path in stale_files(req.hosts_dir, &written)? {
        std::fs::remove_file(&path).map_err(io(&path))?;
        // The registry directory goes too, unless something else (certificates) is in it.
        let _ = std::fs::remove_dir(path.parent().expect("in a registry directory"));
        done.push(format!("removed {}", path.display()));
    }
    match foreign {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_io_falls_back_to_its_api_host_and_a_plain_entry_to_itself() {
        assert_eq!(
            server("docker.io", Some("docker.io")),
            "https://registry-1.docker.io"
        );
        assert_eq!(server("ghcr.io", Some("ghcr.io")), "https://ghcr.io");
        assert_eq!(server("10.0.0.9:5000", None), "http://10.0.0.9:5000");
    }

    #[test]
    fn resolve_is_a_capability_only_when_asked() {
        let pull = hosts_toml("https://r", "http://a:7480", false);
        assert!(pull.starts_with(MARKER));
        assert!(pull.contains("[host.\"http://a:7480\"]\n  capabilities = [\"pull\"]\n"));
        let both = hosts_toml("https://r", "http://a:7480", true);
        assert!(both.contains(r#"capabilities = ["pull", "resolve"]"#));
    }
}
