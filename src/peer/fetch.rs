//! `shoal-peer fetch`: reads one file from a node agent's HTTP API (`GET /v1/files/{name}`) into
//! a local path, for programs and init containers that do not join the swarm themselves. The
//! bytes go to a hidden file beside the target, which is renamed over it only once every byte
//! the agent announced (`Content-Length`) has arrived and reached the disk.

use crate::protocol::{validate_name, Hash};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// Dialling the agent must succeed within this time.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest error body read from the agent (its JSON `{"error": ...}`).
const MAX_ERROR_BODY: usize = 4096;

/// Why a fetch failed; each kind has its own exit code (see [`FetchError::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The command line is wrong: a bad URL, name or output path.
    #[error("{0}")]
    Usage(String),
    /// No TCP connection to the agent.
    #[error("node agent {agent} is unreachable: {why}")]
    Unreachable { agent: String, why: String },
    /// The agent answered 404: no such file (or version) in the swarm.
    #[error("node agent {agent} has no file {name:?}: {why}")]
    NotFound {
        agent: String,
        name: String,
        why: String,
    },
    /// Anything else: an error status, a broken or short transfer, a local write error.
    #[error("{0}")]
    Failed(String),
}

impl FetchError {
    /// The process exit code, as the other one-shot commands use them.
    pub fn exit_code(&self) -> u8 {
        use super::cli::exit;
        match self {
            FetchError::Usage(_) => exit::USAGE,
            FetchError::Unreachable { .. } => exit::TRACKER_UNREACHABLE,
            FetchError::NotFound { .. } => exit::NOT_FOUND,
            FetchError::Failed(_) => exit::FAILED,
        }
    }
}

/// What `shoal-peer fetch` was asked for.
pub struct FetchRequest<'a> {
    /// The agent's base URL, `http://host:port[/prefix]`.
    pub agent: &'a str,
    pub name: &'a str,
    pub digest: Option<Hash>,
    pub output: &'a Path,
    /// Give up when the agent sends nothing for this long (headers or body).
    pub idle_timeout: Duration,
}

/// Fetches the file into `req.output`; returns its length in bytes. On any error nothing is
/// left under the output name (an older file there stays as it was) and the temp file is removed.
pub async fn fetch(req: &FetchRequest<'_>, stop: &CancellationToken) -> Result<u64, FetchError> {
    let agent = Agent::parse(req.agent)?;
    validate_name(req.name).map_err(|r| FetchError::Usage(r.message))?;
    let temp = temp_path(req.output)?;
    let result = tokio::select! {
        r = transfer(&agent, req, &temp) => r,
        _ = stop.cancelled() => Err(FetchError::Failed("stopped by a signal".into())),
    };
    if result.is_err() {
        let _ = tokio::fs::remove_file(&temp).await;
    }
    result
}

/// Where the agent is: host, port and path prefix of its base URL.
struct Agent {
    url: String,
    /// `host:port` as written, for the Host header (an IPv6 address keeps its brackets).
    authority: String,
    /// The host to dial, without brackets.
    host: String,
    port: u16,
    prefix: String,
}

impl Agent {
    fn parse(url: &str) -> Result<Agent, FetchError> {
        let bad = |why: &str| FetchError::Usage(format!("--agent {url:?} {why}"));
        let uri: Uri = url
            .parse()
            .map_err(|_| bad("is not a URL: write http://HOST:PORT"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad(
                "must start with http:// (the node agent speaks plain HTTP)",
            ));
        }
        let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
        if uri.query().is_some() {
            return Err(bad("must not have a query"));
        }
        Ok(Agent {
            url: url.trim_end_matches('/').to_string(),
            authority: authority.as_str().to_string(),
            host: authority.host().trim_matches(['[', ']']).to_string(),
            port: authority.port_u16().unwrap_or(80),
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// The request path for `name` (each component percent-encoded) and an optional version.
    fn file_path(&self, name: &str, digest: Option<Hash>) -> String {
        let mut path = format!("{}/v1/files/{}", self.prefix, encode_path(name));
        if let Some(d) = digest {
            path += &format!("?digest={}", d.to_hex());
        }
        path
    }
}

/// What a name keeps unencoded in the request path: RFC 3986's unreserved characters and the
/// `/` between components; the API decodes the rest.
const PATH_KEEPS: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

fn encode_path(name: &str) -> String {
    utf8_percent_encode(name, PATH_KEEPS).to_string()
}

/// The hidden file beside `output` that receives the bytes until they are complete.
fn temp_path(output: &Path) -> Result<PathBuf, FetchError> {
    let file_name = output
        .file_name()
        .ok_or_else(|| FetchError::Usage(format!("--output {output:?} names no file")))?;
    if output.is_dir() {
        return Err(FetchError::Usage(format!(
            "--output {output:?} is a directory: give the path of the file to write"
        )));
    }
    let temp = format!(
        ".{}.{}.shoal-fetch",
        file_name.to_string_lossy(),
        std::process::id()
    );
    Ok(output.with_file_name(temp))
}

async fn transfer(agent: &Agent, req: &FetchRequest<'_>, temp: &Path) -> Result<u64, FetchError> {
    let unreachable = |why: String| FetchError::Unreachable {
        agent: agent.url.clone(),
        why,
    };
    let connect = tokio::net::TcpStream::connect((agent.host.as_str(), agent.port));
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| unreachable(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(conn);
    let path = agent.file_path(req.name, req.digest);
    let request = Request::get(&path)
        .header(hyper::header::HOST, &agent.authority)
        .header(
            hyper::header::USER_AGENT,
            concat!("shoal-peer/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Usage(format!("cannot build a request for {path}: {e}")))?;
    let failed = |what: String| FetchError::Failed(format!("{}{path}: {what}", agent.url));
    let response = tokio::time::timeout(req.idle_timeout, sender.send_request(request))
        .await
        .map_err(|_| failed(format!("no answer within {:?}", req.idle_timeout)))?
        .map_err(|e| failed(format!("request failed: {e}")))?;
    let status = response.status();
    if status != StatusCode::OK {
        let why = error_text(response.into_body(), req.idle_timeout).await;
        return Err(match status {
            StatusCode::NOT_FOUND => FetchError::NotFound {
                agent: agent.url.clone(),
                name: req.name.to_string(),
                why,
            },
            StatusCode::BAD_REQUEST => FetchError::Usage(format!("the agent refused it: {why}")),
            _ => failed(format!("the agent answered {status}: {why}")),
        });
    }
    let expected = content_length(&response).ok_or_else(|| {
        failed("the answer has no Content-Length, so completeness cannot be checked".into())
    })?;
    if let Some(d) = req.digest {
        let etag = response.headers().get(hyper::header::ETAG);
        let want = format!("\"{}\"", d.to_hex());
        if etag.is_some_and(|e| e.as_bytes() != want.as_bytes()) {
            return Err(failed(format!(
                "the agent served version {etag:?}, not the pinned {want}"
            )));
        }
    }
    let mut file = tokio::fs::File::create(temp)
        .await
        .map_err(|e| FetchError::Failed(format!("cannot create {}: {e}", temp.display())))?;
    let write_error =
        |e: std::io::Error| FetchError::Failed(format!("cannot write {}: {e}", temp.display()));
    let mut body = response.into_body();
    let mut received = 0u64;
    loop {
        let frame = tokio::time::timeout(req.idle_timeout, body.frame())
            .await
            .map_err(|_| {
                failed(format!(
                    "nothing arrived for {:?} after {received} of {expected} bytes",
                    req.idle_timeout
                ))
            })?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| {
            failed(format!(
                "the transfer broke after {received} of {expected} bytes: {e}"
            ))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received += data.len() as u64;
        if received > expected {
            return Err(failed(format!("more than the {expected} bytes announced")));
        }
        file.write_all(&data).await.map_err(write_error)?;
    }
    if received != expected {
        return Err(failed(format!(
            "the answer ended after {received} of {expected} bytes"
        )));
    }
    file.sync_all().await.map_err(write_error)?;
    drop(file);
    tokio::fs::rename(temp, req.output).await.map_err(|e| {
        FetchError::Failed(format!(
            "cannot rename {} to {}: {e}",
            temp.display(),
            req.output.display()
        ))
    })?;
    Ok(received)
}

fn content_length<B>(response: &hyper::Response<B>) -> Option<u64> {
    response
        .headers()
        .get(hyper::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The `error` field of the agent's JSON error body, else its text (bounded), else nothing.
async fn error_text(body: hyper::body::Incoming, limit: Duration) -> String {
    let bytes = match tokio::time::timeout(
        limit,
        http_body_util::Limited::new(body, MAX_ERROR_BODY).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => return "no error text".into(),
    };
    let text = String::from_utf8_lossy(&bytes);
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls_give_host_port_and_prefix() {
        let a = Agent::parse("http://shoal-agent.shoal-node.svc:7480/").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.prefix.as_str()),
            ("shoal-agent.shoal-node.svc", 7480, "")
        );
        let a = Agent::parse("http://[::1]/node").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.prefix.as_str()),
            ("::1", 80, "/node")
        );
        assert_eq!(a.authority, "[::1]");
        assert_eq!(a.file_path("m/a b.bin", None), "/node/v1/files/m/a%20b.bin");
        for bad in [
            "127.0.0.1:7480",
            "https://x:1",
            "http://x:1/?a=b",
            "not a url",
        ] {
            assert!(
                matches!(Agent::parse(bad), Err(FetchError::Usage(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_are_encoded_per_component() {
        assert_eq!(
            encode_path("models/llama-3/shard_01.bin"),
            "models/llama-3/shard_01.bin"
        );
        assert_eq!(encode_path("a%b?#é"), "a%25b%3F%23%C3%A9");
    }

    #[test]
    fn the_temp_file_is_hidden_beside_the_output() {
        let t = temp_path(Path::new("/srv/in/model.bin")).unwrap();
        assert_eq!(t.parent(), Some(Path::new("/srv/in")));
        assert!(t
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".model.bin."));
        assert!(matches!(
            temp_path(Path::new("/")),
            Err(FetchError::Usage(_))
        ));
    }
}
