//! The HTTP side of an origin: `HEAD` and single-range `GET` of a [`Source`] (a URL and the
//! request headers it needs) over hyper's HTTP/1 client, one connection per request, each
//! bounded in time as a whole (connect, headers and body). Every response is checked against
//! what the first one said of the file (size, ETag or Last-Modified), so a file that changes
//! at the origin mid-transfer is caught.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_RANGE, ETAG, HOST, LAST_MODIFIED,
    RANGE,
};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use std::time::Duration;
use tokio::net::TcpStream;

/// Bytes of a name component that are written percent-encoded in a URL path.
const PATH_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// A parsed base URL: `http://host[:port][/prefix]` (`SHOAL_ORIGIN`, a registry upstream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginUrl {
    host: String,
    port: u16,
    /// The path prefix without a trailing `/` (empty for the root).
    prefix: String,
}

impl OriginUrl {
    pub fn parse(text: &str) -> Result<OriginUrl, String> {
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "{text:?}: https origins are not supported yet; use http:// (a TLS-terminating \
                     proxy beside the peer can reach an https origin)"
                ))
            }
            _ => return Err(format!("{text:?} is not an http:// URL")),
        }
        let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
            return Err(format!("{text:?} has no host"));
        };
        if uri.query().is_some() {
            return Err(format!("{text:?} has a query; give a base URL only"));
        }
        Ok(OriginUrl {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: uri.port_u16().unwrap_or(80),
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// The path of file `name` at the origin, each component percent-encoded.
    fn path_of(&self, name: &str) -> String {
        let mut path = self.prefix.clone();
        for component in name.split('/') {
            path.push('/');
            path.extend(utf8_percent_encode(component, PATH_SEGMENT));
        }
        path
    }

    /// File `name` under this base, without extra request headers.
    pub fn source(&self, name: &str) -> Source {
        self.at(self.path_of(name))
    }

    /// The resource at `path` (already encoded, starting with `/`) under this base.
    pub fn at(&self, path: String) -> Source {
        Source {
            base: self.clone(),
            path,
            headers: HeaderMap::new(),
        }
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The full URL of `name`, for messages.
    pub fn url_of(&self, name: &str) -> String {
        self.source(name).url()
    }

    /// `host:port`, as a registry's clients name it (containerd's `ns`).
    pub fn host_port(&self) -> String {
        self.authority()
    }
}

/// Where the bytes of one pull come from: a URL, and the headers every request for it carries
/// (a registry client's `Authorization`, say).
#[derive(Clone, Debug)]
pub struct Source {
    base: OriginUrl,
    path: String,
    headers: HeaderMap,
}

impl Source {
    /// The full URL, for messages.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.base.authority(), self.path)
    }

    /// Sends `value` as header `name` with every request.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Source {
        self.headers.insert(name, value);
        self
    }
}

/// What the origin said of a file: checked again on every response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    pub size: u64,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

impl Remote {
    /// The validator that, with name and size, identifies this copy among peers: the ETag,
    /// else the Last-Modified date, else nothing (size alone).
    pub fn validator(&self) -> String {
        match (&self.etag, &self.last_modified) {
            (Some(etag), _) => etag.clone(),
            (None, Some(date)) => format!("date:{date}"),
            (None, None) => String::new(),
        }
    }

    /// The version stamp of this copy: its Last-Modified date in milliseconds since the Unix
    /// epoch, if the origin gave a valid one.
    pub fn modified_ms(&self) -> Option<u64> {
        let date = httpdate::parse_http_date(self.last_modified.as_deref()?).ok()?;
        let since = date.duration_since(std::time::UNIX_EPOCH).ok()?;
        Some(since.as_millis() as u64)
    }

    /// Why a response describes another copy than this one, if it does.
    fn differs(&self, headers: &HeaderMap, size: u64) -> Option<String> {
        if size != self.size {
            return Some(format!("its size went from {} to {size} bytes", self.size));
        }
        let now = |name| header(headers, name);
        if self.etag.is_some() && now(ETAG) != self.etag {
            return Some(format!(
                "its ETag went from {} to {}",
                shown(&self.etag),
                shown(&now(ETAG))
            ));
        }
        if self.etag.is_none()
            && self.last_modified.is_some()
            && now(LAST_MODIFIED) != self.last_modified
        {
            return Some(format!(
                "its Last-Modified went from {} to {}",
                shown(&self.last_modified),
                shown(&now(LAST_MODIFIED))
            ));
        }
        None
    }
}

fn shown(value: &Option<String>) -> String {
    value.as_deref().unwrap_or("(none)").to_string()
}

/// Why one origin request failed. `kind` labels the error metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// 404 or 410: the file is not there; retrying cannot help.
    NotFound,
    /// 5xx: the origin may recover.
    ServerError(String),
    /// No complete answer within the origin timeout (a stalled origin).
    Timeout(Duration),
    /// The file is another one than at the start of the transfer.
    Changed(String),
    /// Connection refused, reset or broken.
    Connect(String),
    /// Another answer the transfer cannot use (403, no Content-Length, no range support).
    Refused(String),
}

impl Failure {
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::NotFound => "not_found",
            Failure::ServerError(_) => "server_error",
            Failure::Timeout(_) => "timeout",
            Failure::Changed(_) => "changed",
            Failure::Connect(_) | Failure::Refused(_) => "connect",
        }
    }

    /// Whether the same request may succeed later.
    pub fn transient(&self) -> bool {
        matches!(
            self,
            Failure::ServerError(_) | Failure::Timeout(_) | Failure::Connect(_)
        )
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NotFound => write!(f, "not found at the origin (HTTP 404)"),
            Failure::ServerError(why) => write!(f, "origin server error: {why}"),
            Failure::Timeout(t) => write!(f, "no complete answer within {t:?}"),
            Failure::Changed(why) => write!(f, "the file changed at the origin: {why}"),
            Failure::Connect(why) => write!(f, "cannot reach the origin: {why}"),
            Failure::Refused(why) => write!(f, "unusable origin answer: {why}"),
        }
    }
}

/// Asks the origin for the size and validators of `source`.
pub async fn head(source: &Source, timeout: Duration) -> Result<Remote, Failure> {
    let exchange = async {
        let (status, headers, _) = send(source, Method::HEAD, None).await?;
        check_status(status)?;
        let size = header(&headers, CONTENT_LENGTH)
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| Failure::Refused("no Content-Length in the HEAD answer".into()))?;
        Ok(Remote {
            size,
            etag: header(&headers, ETAG),
            last_modified: header(&headers, LAST_MODIFIED),
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Failure::Timeout(timeout))?
}

/// Fetches the `len` bytes at `offset` of `source`, checking that the answer is exactly that
/// range of the copy `remote` describes.
pub async fn range(
    source: &Source,
    remote: &Remote,
    (offset, len): (u64, u32),
    timeout: Duration,
) -> Result<Vec<u8>, Failure> {
    let last = offset + u64::from(len) - 1;
    let exchange = async {
        let (status, headers, body) = send(source, Method::GET, Some((offset, last))).await?;
        check_status(status)?;
        let size = match status {
            StatusCode::PARTIAL_CONTENT => {
                let (first, end, size) = header(&headers, CONTENT_RANGE)
                    .as_deref()
                    .and_then(parse_content_range)
                    .ok_or_else(|| {
                        Failure::Changed("a 206 answer without a valid Content-Range".into())
                    })?;
                if (first, end) != (offset, last) {
                    let why = format!("asked for bytes {offset}-{last}, got {first}-{end}");
                    return Err(Failure::Changed(why));
                }
                size
            }
            // A server without range support sends the whole file: usable for a whole file only.
            _ if offset == 0 && u64::from(len) == remote.size => remote.size,
            _ => {
                return Err(Failure::Refused(format!(
                    "answered {status} to a range request: the origin must support Range"
                )))
            }
        };
        if let Some(why) = remote.differs(&headers, size) {
            return Err(Failure::Changed(why));
        }
        read_body(body, len as usize).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Failure::Timeout(timeout))?
}

fn check_status(status: StatusCode) -> Result<(), Failure> {
    match status.as_u16() {
        200..=299 => Ok(()),
        404 | 410 => Err(Failure::NotFound),
        416 => Err(Failure::Changed(
            "the origin refused the range (416): the file is shorter now".into(),
        )),
        500..=599 => Err(Failure::ServerError(status.to_string())),
        _ => Err(Failure::Refused(format!("HTTP {status}"))),
    }
}

/// Aborts the task driving a connection when the request using it ends or is dropped (a
/// timeout), so a stalled origin holds nothing after its deadline.
struct Driver(tokio::task::JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Answer = (StatusCode, HeaderMap, (hyper::body::Incoming, Driver));

/// One whole exchange with `source`: the status, the headers and the body (at most
/// `max_body` bytes), within `timeout`. For answers passed on to a client as they are.
pub async fn exchange(
    source: &Source,
    method: Method,
    max_body: usize,
    timeout: Duration,
) -> Result<(StatusCode, HeaderMap, Bytes), Failure> {
    let exchange = async {
        let (status, headers, (mut body, _driver)) = send(source, method, None).await?;
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Failure::Connect(format!("body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > max_body {
                    let why = format!("an answer longer than {max_body} bytes");
                    return Err(Failure::Refused(why));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok((status, headers, Bytes::from(buf)))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Failure::Timeout(timeout))?
}

async fn send(
    source: &Source,
    method: Method,
    range: Option<(u64, u64)>,
) -> Result<Answer, Failure> {
    let url = &source.base;
    let connect = |e: &dyn std::fmt::Display| Failure::Connect(format!("{}: {e}", url.authority()));
    let stream = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| connect(&e))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| connect(&e))?;
    let driver = Driver(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let mut req = Request::builder()
        .method(method)
        .uri(source.path.as_str())
        .header(HOST, url.authority())
        .header("user-agent", concat!("shoal/", env!("CARGO_PKG_VERSION")));
    if let Some((first, last)) = range {
        req = req.header(RANGE, format!("bytes={first}-{last}"));
    }
    let mut req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| Failure::Refused(format!("cannot build the request: {e}")))?;
    req.headers_mut().extend(source.headers.clone());
    let response = sender.send_request(req).await.map_err(|e| connect(&e))?;
    let (parts, body) = response.into_parts();
    Ok((parts.status, parts.headers, (body, driver)))
}

/// Reads exactly `len` body bytes; a shorter or longer body is an error.
async fn read_body(
    (mut body, _driver): (hyper::body::Incoming, Driver),
    len: usize,
) -> Result<Vec<u8>, Failure> {
    let mut buf = Vec::with_capacity(len);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::Connect(format!("body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > len {
                return Err(Failure::Changed(format!(
                    "the body is longer than {len} bytes"
                )));
            }
            buf.extend_from_slice(&data);
        }
    }
    if buf.len() != len {
        let why = format!("the body ended after {} of {len} bytes", buf.len());
        return Err(Failure::Connect(why));
    }
    Ok(buf)
}

fn header(headers: &HeaderMap, name: hyper::header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `bytes FIRST-LAST/SIZE` -> (first, last, size).
fn parse_content_range(value: &str) -> Option<(u64, u64, u64)> {
    let (range, size) = value.strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, size) = (first.parse().ok()?, last.parse().ok()?, size.parse().ok()?);
    (first <= last && last < size).then_some((first, last, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_urls_are_http_with_an_optional_prefix() {
        let u = OriginUrl::parse("http://files.example:8080/base/").unwrap();
        assert_eq!(
            u.url_of("models/a b.bin"),
            "http://files.example:8080/base/models/a%20b.bin"
        );
        let root = OriginUrl::parse("http://127.0.0.1").unwrap();
        assert_eq!(root.url_of("x#1"), "http://127.0.0.1:80/x%231");
        assert!(OriginUrl::parse("https://a").unwrap_err().contains("https"));
        assert!(OriginUrl::parse("ftp://a").is_err());
        assert!(OriginUrl::parse("http://a/?q=1").is_err());
        assert!(OriginUrl::parse("files.example").is_err());
    }

    #[test]
    fn content_ranges_are_parsed_strictly() {
        assert_eq!(parse_content_range("bytes 0-9/10"), Some((0, 9, 10)));
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_content_range("bytes 0-10/10"), None);
        assert_eq!(parse_content_range("bytes */10"), None);
    }
}
