//! Response bodies of the HTTP API: a small JSON document, or a file's bytes streamed in order
//! as its chunks are held, and the `Range` header that picks which bytes. A stream reads only
//! chunks held and checks each against its hash again as it reads it; a transfer that fails
//! ends the body with an error, so that the client sees the connection cut short, never a
//! body that looks complete.

use crate::metrics::Active;
use crate::peer::store::ReadError;
use crate::peer::transfers::{Data, Transfer};
use crate::peer::Peer;
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tracing::Instrument;

/// Chunks read ahead of what the client has taken, per stream.
const STREAM_BUFFER_CHUNKS: usize = 2;

/// A response body: whole bytes, or a stream fed by a task as chunks are held.
pub struct Body(Kind);

enum Kind {
    Whole(Option<Bytes>),
    Stream {
        rx: mpsc::Receiver<io::Result<Bytes>>,
        len: u64,
    },
}

impl Body {
    pub fn whole(bytes: impl Into<Bytes>) -> Body {
        Body(Kind::Whole(Some(bytes.into())))
    }

    pub fn empty() -> Body {
        Body(Kind::Whole(None))
    }

    /// A body of `len` bytes fed through the sender; an error sent ends it cut short.
    pub fn channel(len: u64) -> (mpsc::Sender<io::Result<Bytes>>, Body) {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER_CHUNKS);
        (tx, Body(Kind::Stream { rx, len }))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut self.get_mut().0 {
            Kind::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream { rx, .. } => rx.poll_recv(cx).map(|r| r.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.0, Kind::Whole(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Whole(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Kind::Stream { len, .. } => SizeHint::with_exact(*len),
        }
    }
}

/// Which bytes a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Wanted {
    /// The whole file: no `Range`, one this server ignores (another unit, several ranges, or
    /// malformed, as RFC 9110 allows), or one covering the file.
    Whole,
    /// Bytes `.0..=.1`.
    Part(u64, u64),
    /// A range that starts past the end (or a zero-length suffix): `416`.
    Unsatisfiable,
}

/// Reads a `Range` header against a file of `size` bytes: `bytes=a-b`, `bytes=a-`, `bytes=-n`.
pub fn wanted(range: Option<&str>, size: u64) -> Wanted {
    let Some(spec) = range.and_then(|r| r.trim().strip_prefix("bytes=")) else {
        return Wanted::Whole;
    };
    if spec.contains(',') {
        return Wanted::Whole;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Wanted::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return match b.parse::<u64>() {
            Ok(0) => Wanted::Unsatisfiable,
            Ok(_) if size == 0 => Wanted::Unsatisfiable,
            Ok(n) => Wanted::Part(size.saturating_sub(n), size - 1),
            Err(_) => Wanted::Whole,
        };
    }
    let Ok(start) = a.parse::<u64>() else {
        return Wanted::Whole;
    };
    let end = match b {
        "" => u64::MAX,
        b => match b.parse::<u64>() {
            Ok(end) if end >= start => end,
            _ => return Wanted::Whole,
        },
    };
    if start >= size {
        return Wanted::Unsatisfiable;
    }
    Wanted::Part(start, end.min(size - 1))
}

/// A body of bytes `first..=last` of the transfer's file (in chunks of `chunk_size`), sent in
/// order as chunks are held.
pub fn file_bytes(
    peer: &Arc<Peer>,
    transfer: Arc<Transfer>,
    chunk_size: u32,
    (first, last): (u64, u64),
) -> Body {
    let (tx, body) = Body::channel(last - first + 1);
    feed(peer, transfer, chunk_size, (first, last), tx);
    body
}

/// Sends bytes `first..=last` of the transfer's file into `tx` from a task of its own, in
/// order as chunks are held; a failure ends with an error.
pub fn feed(
    peer: &Arc<Peer>,
    transfer: Arc<Transfer>,
    chunk_size: u32,
    (first, last): (u64, u64),
    tx: mpsc::Sender<io::Result<Bytes>>,
) {
    let span = tracing::debug_span!("api stream", file = %transfer.name, first, last);
    let send = send(
        peer.clone(),
        transfer,
        u64::from(chunk_size),
        first,
        last,
        tx,
    );
    peer.tasks.spawn(send.instrument(span));
}

/// Feeds `tx` with bytes `first..=last`, chunk by chunk, until done, the client leaves, or
/// the transfer fails (then an error ends the body).
async fn send(
    peer: Arc<Peer>,
    transfer: Arc<Transfer>,
    chunk_size: u64,
    first: u64,
    last: u64,
    tx: mpsc::Sender<io::Result<Bytes>>,
) {
    let _active = Active::new(&peer.metrics.api_streams);
    let (first_chunk, last_chunk) = ((first / chunk_size) as u32, (last / chunk_size) as u32);
    let reader = transfer.reader(first_chunk, last_chunk);
    for index in first_chunk..=last_chunk {
        reader.at(index);
        let read = tokio::select! {
            _ = tx.closed() => return tracing::debug!("client left"),
            _ = peer.stop.cancelled() => Err("the peer is shutting down".to_string()),
            held = transfer.chunk(index) => match held {
                Ok(data) => read_chunk(&peer, data, index).await,
                Err(e) => Err(e.to_string()),
            },
        };
        let data = match read {
            Ok(data) => data,
            Err(why) => {
                tracing::warn!(chunk = index, error = %why, "file stream aborted");
                let _ = tx.send(Err(io::Error::other(why))).await;
                return;
            }
        };
        let offset = u64::from(index) * chunk_size;
        let from = first.max(offset) - offset;
        let to = (last + 1).min(offset + data.len() as u64) - offset;
        let part = data.slice(from as usize..to as usize);
        let sent = part.len() as u64;
        if tx.send(Ok(part)).await.is_err() {
            return tracing::debug!("client left");
        }
        peer.metrics.api_bytes_sent.inc_by(sent);
    }
    tracing::debug!("file stream complete");
}

/// Reads chunk `index` and checks it against its hash (on a blocking thread).
async fn read_chunk(peer: &Peer, data: Data, index: u32) -> Result<Bytes, String> {
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        let read = match data {
            Data::File(file) => file.read_verified(index, &mut buf).map_err(Some),
            // A chunk of a pull that no longer matches its hash is `None` (the pull failed and
            // its data was started afresh).
            Data::Pull(part) => part.read_verified(index, &mut buf).map(drop).ok_or(None),
        };
        read.map(|()| buf)
    })
    .await
    .map_err(|e| format!("read task failed: {e}"))?;
    match read {
        Ok(buf) => Ok(Bytes::from(buf)),
        Err(Some(e @ ReadError::Changed)) => {
            peer.rescan.notify_one();
            Err(format!("chunk {index}: {e}"))
        }
        Err(Some(e)) => Err(format!("chunk {index}: {e}")),
        Err(None) => Err(format!(
            "chunk {index} no longer matches its hash in the data pulled from the origin"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        let w = |r: &str| wanted(Some(r), 1000);
        assert_eq!(wanted(None, 1000), Wanted::Whole);
        assert_eq!(w("bytes=0-99"), Wanted::Part(0, 99));
        assert_eq!(w("bytes=500-"), Wanted::Part(500, 999));
        assert_eq!(w("bytes=900-5000"), Wanted::Part(900, 999));
        assert_eq!(w("bytes=-100"), Wanted::Part(900, 999));
        assert_eq!(w("bytes=-5000"), Wanted::Part(0, 999));
        assert_eq!(w("bytes=1000-"), Wanted::Unsatisfiable);
        assert_eq!(w("bytes=-0"), Wanted::Unsatisfiable);
        assert_eq!(wanted(Some("bytes=-1"), 0), Wanted::Unsatisfiable);
        for ignored in [
            "bytes=0-1,5-9",
            "items=0-1",
            "bytes=9-1",
            "bytes=a-",
            "bytes=5",
        ] {
            assert_eq!(w(ignored), Wanted::Whole, "{ignored}");
        }
    }
}
