//! The tracker's delivery side: accepts connections (a task each, capped), reads request lines,
//! hands them to [`TrackerState`], writes replies, and expires silent peers in the background.

use super::state::TrackerState;
use crate::connection::{Connection, FrameError, Limits};
use crate::metrics::TrackerMetrics;
use crate::protocol::{self, decode_body, encode_refusal, encode_reply, ErrorCode, Msg, Refusal};
use crate::tls::Tls;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub struct Tracker {
    pub state: Arc<TrackerState>,
    pub metrics: TrackerMetrics,
    pub limits: Limits,
    pub max_connections: usize,
    pub announce_interval: Duration,
    /// Set, every connection speaks TLS (mutual when its CA is set).
    pub tls: Option<Arc<Tls>>,
}

impl Tracker {
    /// Serves `listener` until `stop` fires, then waits for open connections to finish their
    /// current request.
    pub async fn run(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        let tasks = TaskTracker::new();
        tasks.spawn(self.clone().expire_leases(stop.clone()));
        let slots = Arc::new(Semaphore::new(self.max_connections));
        loop {
            let Some((stream, remote)) = crate::connection::accept(&listener, &stop).await else {
                break;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tasks.spawn(refuse_busy(
                    self.tls.clone(),
                    stream,
                    self.limits,
                    self.max_connections,
                ));
                continue;
            };
            let this = self.clone();
            let stop = stop.clone();
            let span = tracing::debug_span!("conn", remote = %remote);
            tasks.spawn(
                async move {
                    let accepted = tokio::select! {
                        _ = stop.cancelled() => Err("shutdown".to_string()),
                        a = crate::tls::accept(this.tls.as_deref(), stream, this.limits) => a,
                    };
                    let reason = match accepted {
                        Ok(conn) => this.serve(conn, stop).await.to_string(),
                        Err(why) => why,
                    };
                    tracing::debug!(reason, "connection closed");
                    drop(permit);
                }
                .instrument(span),
            );
        }
        tasks.close();
        tasks.wait().await;
    }

    async fn serve(&self, mut conn: Connection, stop: CancellationToken) -> &'static str {
        let remote = conn.peer_addr().ip();
        loop {
            let line = tokio::select! {
                _ = stop.cancelled() => return "shutdown",
                line = conn.read_line() => line,
            };
            let line = match line {
                Ok(Some(line)) => line,
                Ok(None) => return "closed by peer",
                Err(FrameError::TooLong(max)) => {
                    let r = Refusal::new(
                        ErrorCode::FrameTooLong,
                        format!("request line exceeds {max} bytes"),
                    );
                    let _ = conn.write_line(&encode_refusal(0, &r)).await;
                    let _ = conn.flush().await;
                    return "frame too long";
                }
                Err(FrameError::Idle(_)) => return "idle timeout",
                Err(FrameError::Stalled(_)) => return "partial frame timeout",
                Err(FrameError::Truncated) => return "truncated frame",
                Err(FrameError::Io(_)) => return "i/o error",
            };
            let reply = self.handle(&line, remote, conn.identity());
            if conn.write_line(&reply).await.is_err() {
                return "write failed";
            }
            if !conn.has_buffered_line() && conn.flush().await.is_err() {
                return "write failed";
            }
        }
    }

    /// Turns one request line into one reply line, and counts it. `identity` is what the
    /// client's certificate proves, if it showed one.
    pub fn handle(&self, line: &[u8], remote: IpAddr, identity: Option<&str>) -> Vec<u8> {
        let started = Instant::now();
        let (label, result) = match protocol::decode_envelope(line) {
            Err((n, refusal)) => ("invalid", Err((n, refusal))),
            Ok((msg, _)) => (
                msg.label(),
                self.dispatch(msg, line, remote, identity)
                    .map_err(|r| (msg as u64, r)),
            ),
        };
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .requests
            .with_label_values(&[label, outcome])
            .inc();
        self.metrics
            .request_duration
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(reply) => reply,
            Err((n, refusal)) => {
                tracing::debug!(
                    msg = label,
                    code = refusal.code.as_str(),
                    reason = %refusal.message,
                    "request refused"
                );
                encode_refusal(n, &refusal)
            }
        }
    }

    fn dispatch(
        &self,
        msg: Msg,
        line: &[u8],
        remote: IpAddr,
        identity: Option<&str>,
    ) -> Result<Vec<u8>, Refusal> {
        let now = Instant::now();
        let reply = match msg {
            Msg::Register => {
                let registered = self
                    .state
                    .register(decode_body(line)?, remote, identity, now)?;
                self.metrics.registrations.inc();
                tracing::info!(peer_id = registered.peer_id, addr = %registered.addr, files = registered.files.len(), "peer registered");
                encode_reply(msg, &registered)
            }
            Msg::FileList => {
                let _: protocol::FileList = decode_body(line)?;
                encode_reply(msg, &self.state.file_list(&decode_body(line)?)?)
            }
            Msg::Locations => encode_reply(msg, &self.state.locations(&decode_body(line)?)?),
            Msg::ChunkRegister => {
                let recorded = self
                    .state
                    .chunk_register(&decode_body(line)?, identity, now)?;
                self.metrics.chunk_registrations.inc_by(recorded.recorded);
                encode_reply(msg, &recorded)
            }
            Msg::Leave => {
                let auth: protocol::PeerAuth = decode_body(line)?;
                let ack = self.state.leave(&auth, identity)?;
                tracing::info!(peer_id = auth.peer_id, "peer left");
                encode_reply(msg, &ack)
            }
            Msg::Announce => encode_reply(
                msg,
                &self.state.announce(&decode_body(line)?, identity, now)?,
            ),
            Msg::Withdraw => {
                let req: protocol::Withdraw = decode_body(line)?;
                let ack = self.state.withdraw(&req, identity, now)?;
                tracing::info!(peer_id = req.peer_id, file = %req.file, digest = req.digest.to_hex(), "version withdrawn");
                encode_reply(msg, &ack)
            }
            Msg::Origin => {
                encode_reply(msg, &self.state.origin(&decode_body(line)?, identity, now)?)
            }
            Msg::ChunkRequest | Msg::Have => {
                let why = format!(
                    "message {} ({}) goes to a peer, not the tracker",
                    msg as u8,
                    msg.label().replace('_', " ")
                );
                return Err(Refusal::new(ErrorCode::UnknownMsg, why));
            }
        };
        self.update_gauges();
        Ok(reply)
    }

    fn update_gauges(&self) {
        let sizes = self.state.sizes();
        self.metrics.peers.set(sizes.peers as i64);
        self.metrics.files.set(sizes.files as i64);
        self.metrics.files_owned.set(sizes.names as i64);
        self.metrics.origin_files.set(sizes.origin_files as i64);
        self.metrics.origin_claims.set(sizes.origin_claims as i64);
    }

    async fn expire_leases(self: Arc<Self>, stop: CancellationToken) {
        let period = (self.announce_interval / 4).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let expired = self.state.expire(Instant::now());
            if expired > 0 {
                self.metrics.leases_expired.inc_by(expired as u64);
                self.update_gauges();
                tracing::info!(expired, "peer leases expired");
            }
        }
    }
}

/// Load shedding: tell the client why (in its own mode), then close.
async fn refuse_busy(tls: Option<Arc<Tls>>, stream: TcpStream, limits: Limits, max: usize) {
    let Some(mut conn) = crate::tls::accept_to_refuse(tls.as_deref(), stream, limits).await else {
        return;
    };
    let r = Refusal::new(
        ErrorCode::Busy,
        format!("tracker is at its limit of {max} connections; retry later"),
    );
    let _ = conn.write_line(&encode_refusal(0, &r)).await;
    let _ = conn.flush().await;
}
