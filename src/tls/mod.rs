//! The optional TLS layer under [`crate::connection`] (rustls with ring, no OpenSSL): the PEM
//! files, read again when they change on disk so a rotated certificate is used without a restart;
//! accepting and dialling in either mode, with a clear error at once when the two sides' modes
//! differ; and the identity a certificate proves. [`certs`] makes throwaway ones.

pub mod certs;
mod pinned;

use crate::connection::{Connection, Ends, Limits, Stream};
use crate::protocol::{encode_refusal, ErrorCode, Refusal};
use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, ClientConfig, RootCertStore, ServerConfig};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The first byte of every TLS connection: a handshake record.
const HANDSHAKE_RECORD: u8 = 0x16;

/// Where the PEM files are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// This side's certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA the other side's certificate must chain to. On a listener, set, a client must
    /// show a certificate (mutual TLS); as a client, the server's certificate is checked
    /// against it.
    pub ca: Option<PathBuf>,
}

/// TLS settings in force, rebuilt from the files when one of them changes.
pub struct Tls {
    files: TlsFiles,
    /// A std mutex, never held across an await: held to compare file stamps and clone `Arc`s,
    /// and, after a change on disk (rare), while the files are read again, so that one
    /// connection reads them and the others wait for the result rather than read them too.
    loaded: Mutex<Loaded>,
}

/// What a file looked like when read: modified time, length and inode (a rename into place, as
/// a Kubernetes Secret update does, changes the inode even within one clock tick).
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

#[derive(Clone)]
struct Loaded {
    /// The cert's, the key's and the CA's, when they were read.
    stamps: Vec<Stamp>,
    /// For the protocol listeners: a client certificate is required when a CA is set.
    server: Arc<ServerConfig>,
    /// For HTTP endpoints (metrics): no client certificate asked for, so scrapers need none.
    http: Arc<ServerConfig>,
    /// For dialling: checks the server against the CA, shows this side's certificate.
    client: Option<Arc<ClientConfig>>,
}

impl Tls {
    /// Reads the files; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> anyhow::Result<Arc<Tls>> {
        let loaded = build(&files)?;
        tracing::info!(cert = %files.cert.display(), mutual = files.ca.is_some(), "TLS on");
        Ok(Arc::new(Tls {
            files,
            loaded: Mutex::new(loaded),
        }))
    }

    /// The settings built from the files as they are now. A file that changed is read again
    /// (a few `stat` calls per connection); if the new files do not make a valid set (a
    /// certificate replaced before its key), the last good set stays in force until they do.
    fn current(&self) -> Loaded {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamps(&self.files);
        if now != loaded.stamps {
            match build(&self.files) {
                Ok(fresh) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS files changed on disk: new connections use them");
                    *loaded = fresh;
                }
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "TLS files changed on disk but do not make a valid set: still using the previous ones");
                    loaded.stamps = now;
                }
            }
        }
        loaded.clone()
    }

    /// The stream for an accepted HTTP connection (metrics, API): TLS without asking the
    /// client for a certificate. Bounded by `wait`.
    pub async fn accept_http(&self, stream: TcpStream, wait: Duration) -> io::Result<impl Stream> {
        let acceptor = TlsAcceptor::from(self.current().http);
        match timeout(wait, acceptor.accept(stream)).await {
            Ok(r) => r.map_err(clarify),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no TLS handshake within {wait:?}"),
            )),
        }
    }
}

fn stamps(files: &TlsFiles) -> Vec<Stamp> {
    [Some(&files.cert), Some(&files.key), files.ca.as_ref()]
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(p?).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        })
        .collect()
}

fn build(files: &TlsFiles) -> anyhow::Result<Loaded> {
    // Stamped before reading: a file that changes while being read is read again next time.
    let stamps = stamps(files);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("SHOAL_TLS_KEY {}: no private key", files.key.display()))?;
    let roots = match &files.ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert).with_context(|| {
                    format!("SHOAL_TLS_CA {}: not a CA certificate", ca.display())
                })?;
            }
            Some(Arc::new(roots))
        }
        None => None,
    };
    let server_builder = || {
        ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
    };
    let bad_pair = || {
        format!(
            "SHOAL_TLS_CERT {} and SHOAL_TLS_KEY {} do not make a pair",
            files.cert.display(),
            files.key.display()
        )
    };
    let server = match &roots {
        Some(roots) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .context("SHOAL_TLS_CA: cannot check client certificates with it")?;
            server_builder().with_client_cert_verifier(verifier)
        }
        None => server_builder().with_no_client_auth(),
    }
    .with_single_cert(certs.clone(), key.clone_key())
    .with_context(bad_pair)?;
    let http = server_builder()
        .with_no_client_auth()
        .with_single_cert(certs.clone(), key.clone_key())
        .with_context(bad_pair)?;
    let client = match roots {
        Some(roots) => Some(Arc::new(
            ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default versions")
                .with_root_certificates(roots)
                .with_client_auth_cert(certs, key)
                .with_context(bad_pair)?,
        )),
        None => None,
    };
    Ok(Loaded {
        stamps,
        server: Arc::new(server),
        http: Arc::new(http),
        client,
    })
}

/// A client for this program's own TLS endpoint (the health probe): it trusts exactly the
/// certificate now in `cert`.
pub fn own_endpoint_client(cert: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let leaf = read_certs(cert)?.swap_remove(0);
    Ok(pinned::client(leaf))
}

/// Dials an HTTP endpoint in TLS with `client` (see [`own_endpoint_client`]).
pub async fn connect_http(client: Arc<ClientConfig>, stream: TcpStream) -> io::Result<impl Stream> {
    let name = ServerName::try_from("localhost").expect("a valid DNS name");
    TlsConnector::from(client)
        .connect(name, stream)
        .await
        .map_err(clarify)
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("{}: cannot read PEM certificates", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no PEM certificate in it",
        path.display()
    );
    Ok(certs)
}

/// Takes an accepted connection in this listener's mode (`tls`: TLS, else clear text). A client
/// in the other mode is told so at once, in its own mode where it can read it, and the reason is
/// logged here; a client whose certificate is refused is logged too. `Err` says why the
/// connection ended.
pub async fn accept(
    tls: Option<&Tls>,
    stream: TcpStream,
    limits: Limits,
) -> Result<Connection, String> {
    let _ = stream.set_nodelay(true);
    let ends = Ends::of(&stream).map_err(|e| e.to_string())?;
    let mut first = [0u8; 1];
    let peeked = timeout(limits.idle_timeout, stream.peek(&mut first)).await;
    let speaks_tls = match peeked {
        Ok(Ok(1)) => first[0] == HANDSHAKE_RECORD,
        Ok(Ok(_)) => return Err("closed by peer".into()),
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("idle timeout".into()),
    };
    match (tls, speaks_tls) {
        (None, false) => Ok(Connection::over(stream, ends, limits)),
        (None, true) => {
            tracing::warn!(remote = %ends.remote, "a TLS client connected to this clear-text listener: set SHOAL_TLS_CERT and SHOAL_TLS_KEY here, or unset them there");
            refuse_tls_client(stream).await;
            Err("TLS client on a clear-text listener".into())
        }
        (Some(_), false) => {
            tracing::warn!(remote = %ends.remote, "a clear-text client connected to this TLS listener: set SHOAL_TLS_CERT, SHOAL_TLS_KEY and SHOAL_TLS_CA there");
            refuse_clear_client(Connection::over(stream, ends, limits)).await;
            Err("clear-text client on a TLS listener".into())
        }
        (Some(tls), true) => handshake(tls, stream, ends, limits).await,
    }
}

/// The server's side of the handshake; a refusal is logged with its reason.
async fn handshake(
    tls: &Tls,
    stream: TcpStream,
    ends: Ends,
    limits: Limits,
) -> Result<Connection, String> {
    let acceptor = TlsAcceptor::from(tls.current().server);
    let refused = |why: String| {
        tracing::warn!(remote = %ends.remote, reason = %why, "TLS handshake refused");
        format!("TLS handshake refused: {why}")
    };
    let stream = match timeout(limits.frame_timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(refused(clarify(e).to_string())),
        Err(_) => return Err(refused("no handshake within the frame timeout".into())),
    };
    let proven = stream.get_ref().1.peer_certificates();
    let ends = Ends {
        identity: proven.and_then(|c| c.first()).and_then(identity),
        ..ends
    };
    Ok(Connection::over(stream, ends, limits))
}

/// Answers a clear-text client in clear text: this side speaks TLS. Its first request is read
/// first, so that closing does not reset the answer away.
async fn refuse_clear_client(mut conn: Connection) {
    let _ = conn.read_line().await;
    let why =
        "this side speaks TLS, not clear text: set SHOAL_TLS_CERT, SHOAL_TLS_KEY and SHOAL_TLS_CA";
    let refusal = encode_refusal(0, &Refusal::new(ErrorCode::BadRequest, why));
    let _ = conn.write_line(&refusal).await;
    let _ = conn.flush().await;
}

/// A connection to send one refusal on at once (`busy`), before the client has said anything:
/// in clear text without waiting for its first byte; with TLS once the handshake is done (a TLS
/// client speaks first), within [`REFUSAL_HANDSHAKE`], so that connections refused under load
/// cannot pile up waiting for clients that say nothing.
pub async fn accept_to_refuse(
    tls: Option<&Tls>,
    stream: TcpStream,
    limits: Limits,
) -> Option<Connection> {
    match tls {
        None => Connection::new(stream, limits).ok(),
        Some(_) => timeout(REFUSAL_HANDSHAKE, accept(tls, stream, limits))
            .await
            .ok()?
            .ok(),
    }
}

/// How long a connection about to be refused `busy` may take over its TLS handshake.
const REFUSAL_HANDSHAKE: Duration = Duration::from_secs(1);

/// Answers a TLS client in words it understands: a TLS alert saying the protocol is wrong, after
/// reading its hello so that closing does not reset the answer away.
async fn refuse_tls_client(mut stream: TcpStream) {
    let mut hello = [0u8; 4096];
    let _ = timeout(Duration::from_secs(1), stream.read(&mut hello)).await;
    // A fatal alert record (21), TLS 1.0 framing any client reads, "protocol version" (70).
    let alert = [21, 3, 1, 0, 2, 2, 70];
    let _ = timeout(Duration::from_secs(1), stream.write_all(&alert)).await;
    let _ = stream.shutdown().await;
}

/// Dials `addr` in this side's mode; with TLS, the server's certificate must chain to the CA
/// and carry `name` (a DNS name or an IP address). Bounded by `wait` for the connect and again
/// for the handshake.
pub async fn connect(
    tls: Option<&Tls>,
    addr: std::net::SocketAddr,
    name: &str,
    limits: Limits,
    wait: Duration,
) -> Result<Connection, String> {
    let stream = match timeout(wait, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("cannot connect: {e}")),
        Err(_) => return Err(format!("no connection within {wait:?}")),
    };
    let Some(tls) = tls else {
        return Connection::new(stream, limits).map_err(|e| e.to_string());
    };
    let _ = stream.set_nodelay(true);
    let ends = Ends::of(&stream).map_err(|e| e.to_string())?;
    let client = tls
        .current()
        .client
        .ok_or("TLS as a client needs SHOAL_TLS_CA to check the server's certificate")?;
    let server = ServerName::try_from(name.to_string())
        .map_err(|_| format!("{name:?} is neither a DNS name nor an IP address"))?;
    let handshake = TlsConnector::from(client).connect(server, stream);
    let stream = match timeout(wait, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("TLS handshake with {name} failed: {}", clarify(e))),
        Err(_) => return Err(format!("no TLS handshake with {name} within {wait:?}")),
    };
    Ok(Connection::over(stream, ends, limits))
}

/// The identity a certificate proves: its subject alternative names (DNS names and IP
/// addresses), sorted and joined by commas; its subject when it has none.
pub fn identity(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                GeneralName::IPAddress(ip) => ip_text(ip),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        return Some(cert.subject().to_string());
    }
    names.sort();
    Some(names.join(","))
}

fn ip_text(raw: &[u8]) -> Option<String> {
    let ip = match raw.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(raw).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(raw).ok()?),
        _ => return None,
    };
    Some(ip.to_string())
}

/// An I/O error from a TLS connection, with what to do about it when the cause is one an
/// operator can fix (a missing or foreign certificate, the other side in clear text).
pub fn clarify(e: io::Error) -> io::Error {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e;
    };
    use rustls::Error as E;
    let hint = match tls {
        E::AlertReceived(AlertDescription::CertificateRequired) => {
            "the other side requires a certificate: set SHOAL_TLS_CERT, SHOAL_TLS_KEY and SHOAL_TLS_CA here"
        }
        E::AlertReceived(
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::DecryptError,
        ) => "the other side refused this side's certificate: it must chain to the other side's SHOAL_TLS_CA",
        E::AlertReceived(AlertDescription::ProtocolVersion) => {
            "the other side may speak clear text, not TLS: set SHOAL_TLS_CERT and SHOAL_TLS_KEY there, or unset them here"
        }
        E::NoCertificatesPresented => {
            "the client showed no certificate, and this side requires one (SHOAL_TLS_CA is set)"
        }
        E::InvalidCertificate(_) => {
            "the other side's certificate must chain to SHOAL_TLS_CA and name the host dialled"
        }
        E::InvalidMessage(_) => "the other side does not speak TLS: is it in clear text?",
        _ => return e,
    };
    io::Error::new(e.kind(), format!("{tls}: {hint}"))
}
