//! Accepting and dialling in this side's mode, clear text or TLS: a client in the other mode
//! is told so at once, in words it can read, and both sides log why a connection was refused.

use super::{identity, Tls};
use crate::connection::{Connection, Ends, Limits};
use crate::protocol::{encode_refusal, ErrorCode, Refusal};
use rustls::pki_types::ServerName;
use rustls::AlertDescription;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The first byte of every TLS connection: a handshake record.
const HANDSHAKE_RECORD: u8 = 0x16;

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
