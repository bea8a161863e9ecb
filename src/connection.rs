//! Framing over TCP, clear or TLS, for both sides: newline-terminated JSON lines, and raw chunk
//! bytes after a chunk header. The frame cap is enforced while reading, before a line is buffered
//! in full, so a sender cannot make the receiver hold more than `max_frame` bytes of one line.

use bytes::{Buf, BytesMut};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame longer than {0} bytes")]
    TooLong(usize),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("no complete frame within {0:?}")]
    Stalled(Duration),
    #[error("connection idle for {0:?}")]
    Idle(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Limits of one connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest line accepted, newline excluded.
    pub max_frame: usize,
    /// How long a connection may sit with no frame started.
    pub idle_timeout: Duration,
    /// How long a started frame (or chunk body) may take to arrive in full.
    pub frame_timeout: Duration,
}

/// Binds a listening socket with room for `backlog` connections waiting to be accepted (tokio's
/// default of 128 overflows when a thousand peers connect at once, and the dropped ones wait a
/// second for the kernel to retry).
pub fn listen(addr: &str, backlog: usize) -> io::Result<TcpListener> {
    let addr: SocketAddr = addr.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr:?} is not ip:port"),
        )
    })?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog.clamp(128, 65_535) as u32)
}

/// Waits for the next connection on `listener`; `None` once `stop` fires. A failed accept
/// (typically EMFILE) is logged and retried after a short pause instead of spinning.
pub async fn accept(
    listener: &TcpListener,
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(a) => return Some(a),
                Err(e) => {
                    tracing::warn!(addr = ?listener.local_addr().ok(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// A byte stream a [`Connection`] frames: a TCP socket, or TLS over one.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The two ends of a connection and who the other one proved to be.
#[derive(Clone, Debug)]
pub struct Ends {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The names in the other side's TLS certificate (see [`crate::tls::identity`]); `None`
    /// in clear text or when it showed no certificate.
    pub identity: Option<String>,
}

impl Ends {
    /// The ends of a TCP socket, which proves nothing about who is on the other side.
    pub fn of(stream: &TcpStream) -> io::Result<Ends> {
        Ok(Ends {
            local: stream.local_addr()?,
            remote: stream.peer_addr()?,
            identity: None,
        })
    }
}

pub struct Connection {
    // Boxed so clear and TLS connections share this one framing code; the dynamic call per
    // read or write is nothing beside the system call under it.
    stream: BufWriter<Box<dyn Stream>>,
    buf: BytesMut,
    limits: Limits,
    ends: Ends,
}

impl Connection {
    /// A clear-text connection.
    pub fn new(stream: TcpStream, limits: Limits) -> io::Result<Connection> {
        // Small frames dominate the control plane: do not let Nagle hold them back.
        let _ = stream.set_nodelay(true);
        let ends = Ends::of(&stream)?;
        Ok(Connection::over(stream, ends, limits))
    }

    /// A connection over `stream` (TLS already set up), between `ends`.
    pub fn over(stream: impl Stream + 'static, ends: Ends, limits: Limits) -> Connection {
        Connection {
            stream: BufWriter::new(Box::new(stream)),
            buf: BytesMut::with_capacity(8 * 1024),
            limits,
            ends,
        }
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.ends.remote
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.ends.local
    }

    /// Who the other side proved to be with its certificate, if it showed one.
    pub fn identity(&self) -> Option<&str> {
        self.ends.identity.as_deref()
    }

    /// Reads one line, without its newline. `Ok(None)` is a clean close between frames. Once a
    /// line has started, all of it must arrive within the frame timeout (a trickle does not
    /// reset the clock).
    pub async fn read_line(&mut self) -> Result<Option<BytesMut>, FrameError> {
        let mut scanned = 0;
        let mut deadline = None;
        loop {
            if let Some(pos) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let mut line = self.buf.split_to(scanned + pos + 1);
                line.truncate(scanned + pos);
                if line.last() == Some(&b'\r') {
                    line.truncate(line.len() - 1);
                }
                return Ok(Some(line));
            }
            scanned = self.buf.len();
            if scanned > self.limits.max_frame {
                return Err(FrameError::TooLong(self.limits.max_frame));
            }
            if deadline.is_none() && !self.buf.is_empty() {
                deadline = Some(Instant::now() + self.limits.frame_timeout);
            }
            // Never read past the cap: at most max_frame + 1 bytes of one line are ever held.
            let room = (self.limits.max_frame + 1 - scanned).clamp(1, 64 * 1024);
            self.buf.reserve(room);
            let until = deadline.unwrap_or_else(|| Instant::now() + self.limits.idle_timeout);
            let read = {
                let stream = self.stream.get_mut();
                let mut limited = (&mut *stream).take(room as u64);
                timeout_at(until, limited.read_buf(&mut self.buf)).await
            };
            let n = match read {
                Ok(r) => r.map_err(crate::tls::clarify)?,
                Err(_) if deadline.is_some() => {
                    return Err(FrameError::Stalled(self.limits.frame_timeout))
                }
                Err(_) => return Err(FrameError::Idle(self.limits.idle_timeout)),
            };
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// Resolves when the other side closes its end or the connection fails. Bytes that arrive
    /// meanwhile (pipelined requests) are kept for [`Connection::read_line`]; once a frame's
    /// worth is buffered it stops reading and only waits. Cancel-safe.
    pub async fn closed(&mut self) {
        loop {
            if self.buf.len() > self.limits.max_frame {
                return std::future::pending().await;
            }
            self.buf.reserve(4096);
            match self.stream.get_mut().read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Accepts lines of up to `max_frame` bytes from now on.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.limits.max_frame = max_frame;
    }

    /// Resolves when a whole further line is buffered (or more than a frame's worth, which
    /// [`Connection::read_line`] then refuses), or the other side closes its end or the
    /// connection fails. Cancel-safe: what it reads stays buffered.
    pub async fn line_or_close(&mut self) {
        while !self.has_buffered_line() && self.buf.len() <= self.limits.max_frame {
            self.buf.reserve(4096);
            match self.stream.get_mut().read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Whether a whole further line is already buffered (so a reply need not be flushed yet).
    pub fn has_buffered_line(&self) -> bool {
        self.buf.contains(&b'\n')
    }

    /// Fills `out` with raw bytes (a chunk body), within the frame timeout.
    pub async fn read_raw(&mut self, out: &mut [u8]) -> Result<(), FrameError> {
        let from_buf = self.buf.len().min(out.len());
        out[..from_buf].copy_from_slice(&self.buf[..from_buf]);
        self.buf.advance(from_buf);
        let fill = self.stream.get_mut().read_exact(&mut out[from_buf..]);
        match timeout(self.limits.frame_timeout, fill).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
            Ok(Err(e)) => Err(crate::tls::clarify(e).into()),
            Err(_) => Err(FrameError::Stalled(self.limits.frame_timeout)),
        }
    }

    /// Queues one frame (a newline is added). Call [`Connection::flush`] to send. Like every
    /// write here, it fails if the other side stops reading for the frame timeout.
    pub async fn write_line(&mut self, frame: &[u8]) -> io::Result<()> {
        let limit = self.limits.frame_timeout;
        let stream = &mut self.stream;
        bounded(limit, async move {
            stream.write_all(frame).await?;
            stream.write_all(b"\n").await
        })
        .await
    }

    /// Queues raw bytes (a chunk body).
    pub async fn write_raw(&mut self, data: &[u8]) -> io::Result<()> {
        bounded(self.limits.frame_timeout, self.stream.write_all(data)).await
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        bounded(self.limits.frame_timeout, self.stream.flush()).await
    }
}

async fn bounded(
    limit: Duration,
    io: impl std::future::Future<Output = io::Result<()>>,
) -> io::Result<()> {
    match timeout(limit, io).await {
        Ok(r) => r.map_err(crate::tls::clarify),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("peer stopped reading for {limit:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const LIMITS: Limits = Limits {
        max_frame: 16,
        idle_timeout: Duration::from_secs(5),
        frame_timeout: Duration::from_millis(200),
    };

    async fn pair() -> (Connection, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (Connection::new(server, LIMITS).unwrap(), client)
    }

    #[tokio::test]
    async fn reads_lines_then_clean_eof() {
        let (mut conn, mut raw) = pair().await;
        raw.write_all(b"one\r\ntwo\nrest").await.unwrap();
        assert_eq!(&conn.read_line().await.unwrap().unwrap()[..], b"one");
        assert!(conn.has_buffered_line());
        assert_eq!(&conn.read_line().await.unwrap().unwrap()[..], b"two");
        let mut body = [0; 4];
        conn.read_raw(&mut body).await.unwrap();
        assert_eq!(&body, b"rest");
        drop(raw);
        assert!(conn.read_line().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn refuses_a_line_over_the_cap_without_buffering_it() {
        let (mut conn, mut raw) = pair().await;
        tokio::spawn(async move {
            let _ = raw.write_all(&[b'x'; 100_000]).await;
            raw
        });
        assert!(matches!(
            conn.read_line().await,
            Err(FrameError::TooLong(16))
        ));
        assert!(conn.buf.len() <= LIMITS.max_frame + 1);
    }

    #[tokio::test]
    async fn a_half_line_that_stalls_is_dropped() {
        let (mut conn, mut raw) = pair().await;
        raw.write_all(b"{\"v\":1").await.unwrap();
        assert!(matches!(
            conn.read_line().await,
            Err(FrameError::Stalled(_))
        ));
    }

    #[tokio::test]
    async fn a_trickle_does_not_keep_a_partial_line_alive() {
        let (mut conn, mut raw) = pair().await;
        tokio::spawn(async move {
            for _ in 0..20 {
                if raw.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        assert!(matches!(
            conn.read_line().await,
            Err(FrameError::Stalled(_))
        ));
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_truncation() {
        let (mut conn, mut raw) = pair().await;
        raw.write_all(b"partial").await.unwrap();
        drop(raw);
        assert!(matches!(conn.read_line().await, Err(FrameError::Truncated)));
    }
}
