//! The optional TLS layer under [`crate::connection`] (rustls with ring, no OpenSSL): the PEM
//! files, read again when they change on disk so a rotated certificate is used without a restart,
//! and the identity a certificate proves. [`transport`] accepts and dials in either mode;
//! [`certs`] makes throwaway certificates.

pub mod certs;
mod pinned;
pub mod transport;

pub use transport::{accept, accept_to_refuse, clarify, connect};

use crate::connection::Stream;
use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

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

    /// The stream for an accepted HTTP connection: TLS, asking the client for a certificate
    /// from the CA only with `clients` [`HttpClients::Certified`]. Bounded by `wait`.
    pub async fn accept_http(
        &self,
        stream: TcpStream,
        clients: HttpClients,
        wait: Duration,
    ) -> io::Result<impl Stream> {
        let loaded = self.current();
        let config = match clients {
            HttpClients::Anyone => loaded.http,
            HttpClients::Certified => loaded.server,
        };
        match timeout(wait, TlsAcceptor::from(config).accept(stream)).await {
            Ok(r) => r.map_err(clarify),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no TLS handshake within {wait:?}"),
            )),
        }
    }
}

/// Who may connect to an HTTP endpoint served over TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpClients {
    /// Any client that trusts this side (the metrics endpoint: scrapers need no certificate).
    Anyone,
    /// Like the protocol listeners: with `SHOAL_TLS_CA`, only clients showing a certificate
    /// from it (the file API, which has no other authentication).
    Certified,
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

/// A client for servers outside the cluster (https origins and registries): the public web
/// roots built in, plus the CA certificates in `extra` (`SHOAL_ORIGIN_CA`), no client
/// certificate.
pub fn web_client(extra: Option<&Path>) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra {
        for cert in read_certs(path)? {
            roots.add(cert).with_context(|| {
                format!("SHOAL_ORIGIN_CA {}: not a CA certificate", path.display())
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
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
