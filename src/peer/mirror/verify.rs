//! Registry content checked against its sha256 digest as it goes out. The whole object is read
//! through the hash, whatever range the client asked for, and the last bytes of the response
//! are held back until the hash is known: bytes that do not match end the response cut short
//! (the client never sees it complete) and the data is discarded here and withdrawn from the
//! trackers, so it is never served as good again.

use super::path::Digest;
use crate::peer::api::stream::{self, Body};
use crate::peer::transfers::Transfer;
use crate::peer::Peer;
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::Instrument;

/// How long a discarded object's download may take to end before its file is looked for.
const DISCARD_WAIT: Duration = Duration::from_secs(60);

/// A body of bytes `first..=last` of the transfer's object (`size` bytes in chunks of
/// `chunk_size`), completed only if the whole object hashes to `digest`.
pub fn body(
    peer: &Arc<Peer>,
    transfer: Arc<Transfer>,
    (size, chunk_size): (u64, u32),
    digest: Digest,
    (first, last): (u64, u64),
) -> Body {
    let (tx, body) = Body::channel(last - first + 1);
    let (whole_tx, whole) = mpsc::channel(2);
    stream::feed(peer, transfer.clone(), chunk_size, (0, size - 1), whole_tx);
    let span = tracing::debug_span!("mirror stream", digest = %digest, first, last);
    let relay = relay(
        peer.clone(),
        transfer,
        (size, digest),
        (first, last),
        whole,
        tx,
    );
    peer.tasks.spawn(relay.instrument(span));
    body
}

/// Hashes every byte of the object from `whole` and passes bytes `first..=last` on to `tx`,
/// the last piece only once the hash matched.
async fn relay(
    peer: Arc<Peer>,
    transfer: Arc<Transfer>,
    (size, digest): (u64, Digest),
    (first, last): (u64, u64),
    mut whole: mpsc::Receiver<io::Result<Bytes>>,
    tx: mpsc::Sender<io::Result<Bytes>>,
) {
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    let mut held_back: Option<Bytes> = None;
    while let Some(piece) = whole.recv().await {
        let piece = match piece {
            Ok(piece) => piece,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        hasher.update(&piece);
        let (start, end) = (offset, offset + piece.len() as u64);
        offset = end;
        let (from, to) = (first.max(start), (last + 1).min(end));
        if from < to {
            let part = piece.slice((from - start) as usize..(to - start) as usize);
            if let Some(ready) = held_back.replace(part) {
                if tx.send(Ok(ready)).await.is_err() {
                    return tracing::debug!("client left");
                }
            }
        }
    }
    if offset != size {
        // The feed ended early without an error: the client left or the peer stops.
        return;
    }
    if hasher.finalize().as_slice() == digest.bytes() {
        if let Some(ready) = held_back {
            let _ = tx.send(Ok(ready)).await;
        }
        return tracing::debug!("verified and sent");
    }
    peer.metrics.mirror_verify_failures.inc();
    tracing::warn!(file = %transfer.name, "bytes do not match their sha256 digest: response cut short, data discarded");
    let why = format!("the bytes of {digest} do not match that digest");
    let _ = tx.send(Err(io::Error::other(why))).await;
    drop(tx);
    discard(&peer, &transfer).await;
}

/// Deletes the file the transfer downloaded (once the download ended) and withdraws it from
/// the trackers.
async fn discard(peer: &Arc<Peer>, transfer: &Arc<Transfer>) {
    if tokio::time::timeout(DISCARD_WAIT, transfer.finished())
        .await
        .is_err()
    {
        tracing::warn!(file = %transfer.name, "the download of bad data did not end; not discarded");
        return;
    }
    let Some(digest) = transfer.digest() else {
        return;
    };
    let Some(file) = peer.store.version(&transfer.name, &digest) else {
        return;
    };
    if let Some((path, _)) = file.on_disk() {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete bad data");
        }
    }
    peer.withdraw(&file).await;
}
