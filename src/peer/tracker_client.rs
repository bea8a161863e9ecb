//! The peer's side of the control protocol with one tracker: one persistent connection,
//! reopened on failure, one request at a time, every await under a timeout. While the tracker
//! cannot be reached, attempts are spaced by exponential backoff with jitter, and the outage is
//! logged once when it starts and once when it ends. [`super::trackers`] holds one per tracker.

use crate::config::PeerConfig;
use crate::connection::{Connection, Limits};
use crate::protocol::{decode_reply, encode_request, ErrorCode, Msg, Refusal};
use crate::tls::Tls;
use prometheus::IntCounterVec;
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::time::timeout;

/// The wait after the first failed attempt to reach the tracker; it doubles with each further
/// failure up to [`BACKOFF_MAX`] (or the announce interval, if shorter).
pub const BACKOFF_START: Duration = Duration::from_millis(500);
/// The longest wait between attempts while the tracker is unreachable.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("tracker {addr} refused: {refusal}")]
    Refused { addr: String, refusal: Refusal },
    #[error("tracker {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
}

impl TrackerError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            TrackerError::Refused { refusal, .. } => Some(refusal.code),
            TrackerError::Unreachable { .. } => None,
        }
    }
}

/// The tracker has not been reachable since `since`.
struct Outage {
    since: Instant,
    /// Attempts that failed.
    failures: u32,
    /// Requests not sent: refused without an attempt during a backoff, or held back by
    /// callers (see [`TrackerClient::note_held_back`]).
    held_back: u64,
    next_attempt: Instant,
    /// Why the last attempt failed.
    reason: String,
}

pub struct TrackerClient {
    addr: String,
    limits: Limits,
    connect_timeout: Duration,
    request_timeout: Duration,
    /// A tokio mutex because the connection is used across awaits; requests are serialised,
    /// which the tracker protocol expects per connection anyway.
    conn: tokio::sync::Mutex<Option<Connection>>,
    /// `Some` while the tracker is unreachable. Held briefly, never across an await.
    outage: Mutex<Option<Outage>>,
    /// The longest backoff, in milliseconds (see [`TrackerClient::cap_backoff`]).
    backoff_cap_ms: AtomicU64,
    /// `shoal_peer_tracker_requests_total`: requests that reached the network, by outcome.
    requests: IntCounterVec,
    /// Set, the tracker is dialled in TLS and its certificate must carry `.1`.
    tls: Option<(Arc<Tls>, String)>,
}

impl TrackerClient {
    /// A client of the tracker at `addr` (`host:port`), counting its requests in `requests`.
    pub fn new(addr: &str, cfg: &PeerConfig, requests: IntCounterVec) -> Self {
        let limits = Limits {
            max_frame: cfg.max_frame_bytes,
            idle_timeout: cfg.request_timeout,
            frame_timeout: cfg.request_timeout,
        };
        TrackerClient {
            addr: addr.to_string(),
            limits,
            connect_timeout: cfg.connect_timeout,
            request_timeout: cfg.request_timeout,
            conn: tokio::sync::Mutex::new(None),
            outage: Mutex::new(None),
            backoff_cap_ms: AtomicU64::new(BACKOFF_MAX.as_millis() as u64),
            requests,
            tls: None,
        }
    }

    /// Dials the tracker in TLS with these settings (`None`: clear text); its certificate must
    /// carry `name` (see [`super::trackers::Trackers`] for which name that is).
    pub fn with_tls(mut self, tls: Option<Arc<Tls>>, name: &str) -> Self {
        self.tls = tls.map(|t| (t, name.to_string()));
        self
    }

    /// Caps the backoff at `interval` (the announce interval) when that is shorter than
    /// [`BACKOFF_MAX`]: waiting longer would leave a restarted tracker empty for longer than a
    /// lease lasts.
    pub fn cap_backoff(&self, interval: Duration) {
        let cap = interval.clamp(BACKOFF_START, BACKOFF_MAX);
        self.backoff_cap_ms
            .store(cap.as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether the last attempt to reach the tracker failed.
    pub fn is_down(&self) -> bool {
        self.outage().is_some()
    }

    fn outage(&self) -> MutexGuard<'_, Option<Outage>> {
        self.outage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one attempt to reach the tracker, unless an outage's backoff says to wait: then it
    /// fails at once, without touching the network. Tracks the outage and logs its start (WARN)
    /// and end (INFO) once each.
    async fn attempt<T>(
        &self,
        work: impl Future<Output = Result<T, TrackerError>>,
    ) -> Result<T, TrackerError> {
        self.wait_for_backoff()?;
        let result = work.await;
        match &result {
            Err(TrackerError::Unreachable { reason, .. }) => self.note_failure(reason),
            _ => self.note_answer(),
        }
        result
    }

    fn wait_for_backoff(&self) -> Result<(), TrackerError> {
        let mut outage = self.outage();
        let Some(o) = outage.as_mut() else {
            return Ok(());
        };
        let now = Instant::now();
        if now >= o.next_attempt {
            return Ok(());
        }
        o.held_back += 1;
        // No "next attempt in": a one-shot command gives up with this very message.
        let why = format!(
            "{} (down for {:.1}s)",
            o.reason,
            now.duration_since(o.since).as_secs_f64()
        );
        Err(self.unreachable(why))
    }

    /// Counts requests a caller did not send because the tracker is away (queued chunk
    /// reports), for the log line when it is back.
    pub fn note_held_back(&self, requests: u64) {
        if let Some(o) = self.outage().as_mut() {
            o.held_back += requests;
        }
    }

    fn note_failure(&self, reason: &str) {
        let cap = Duration::from_millis(self.backoff_cap_ms.load(Ordering::Relaxed));
        let jitter = rand::thread_rng().gen::<f64>();
        let now = Instant::now();
        let mut outage = self.outage();
        let o = outage.get_or_insert_with(|| {
            tracing::warn!(tracker = %self.addr, reason, backoff_cap_seconds = cap.as_secs_f64(), "tracker unreachable");
            Outage {
                since: now,
                failures: 0,
                held_back: 0,
                next_attempt: now,
                reason: String::new(),
            }
        });
        o.failures += 1;
        o.reason = reason.to_string();
        o.next_attempt = now + backoff(o.failures, cap, jitter);
        tracing::debug!(tracker = %self.addr, failures = o.failures, reason, "tracker still unreachable");
    }

    fn note_answer(&self) {
        if let Some(o) = self.outage().take() {
            let down_secs = (o.since.elapsed().as_secs_f64() * 10.0).round() / 10.0;
            tracing::info!(
                tracker = %self.addr,
                down_secs,
                failed_attempts = o.failures,
                requests_held_back = o.held_back,
                "tracker is back"
            );
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn unreachable(&self, reason: impl ToString) -> TrackerError {
        TrackerError::Unreachable {
            addr: self.addr.clone(),
            reason: reason.to_string(),
        }
    }

    async fn connect(&self) -> Result<Connection, TrackerError> {
        let addrs: Vec<SocketAddr> =
            match timeout(self.connect_timeout, tokio::net::lookup_host(&self.addr)).await {
                Ok(Ok(a)) => a.collect(),
                Ok(Err(e)) => return Err(self.unreachable(format!("cannot resolve: {e}"))),
                Err(_) => return Err(self.unreachable("name resolution timed out")),
            };
        let (tls, name) = match &self.tls {
            Some((tls, name)) => (Some(&**tls), name.as_str()),
            None => (None, ""),
        };
        let mut last = String::from("no address");
        for addr in addrs {
            match crate::tls::connect(tls, addr, name, self.limits, self.connect_timeout).await {
                Ok(conn) => return Ok(conn),
                Err(e) => last = e,
            }
        }
        Err(self.unreachable(last))
    }

    /// The local ip of the connection to the tracker: the default address others should dial.
    pub async fn local_ip(&self) -> Result<IpAddr, TrackerError> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            *guard = Some(self.attempt(self.connect()).await?);
        }
        let conn = guard.as_ref().expect("just set");
        Ok(conn.local_addr().ip())
    }

    /// Sends one request and waits for its reply. A broken connection is reopened once.
    pub async fn request<T: Serialize, R: DeserializeOwned>(
        &self,
        msg: Msg,
        body: &T,
    ) -> Result<R, TrackerError> {
        self.attempt(async {
            let result = self.exchange_reopening(msg, body).await;
            let outcome = match &result {
                Ok(_) => "ok",
                Err(TrackerError::Refused { .. }) => "refused",
                Err(TrackerError::Unreachable { .. }) => "unreachable",
            };
            self.requests
                .with_label_values(&[self.addr.as_str(), outcome])
                .inc();
            result
        })
        .await
    }

    async fn exchange_reopening<T: Serialize, R: DeserializeOwned>(
        &self,
        msg: Msg,
        body: &T,
    ) -> Result<R, TrackerError> {
        let frame = encode_request(msg, body);
        let mut guard = self.conn.lock().await;
        for attempt in 0..2 {
            // Taken out while in use and put back only after a whole exchange: a caller that
            // gives up mid-request (a failover that got its answer elsewhere) leaves no
            // half-read reply behind for the next request to mistake for its own.
            let mut conn = match guard.take() {
                Some(c) => c,
                None => self.connect().await?,
            };
            match timeout(self.request_timeout, exchange(&mut conn, &frame)).await {
                Ok(Ok(line)) => {
                    *guard = Some(conn);
                    return decode_reply(msg, &line).map_err(|refusal| TrackerError::Refused {
                        addr: self.addr.clone(),
                        refusal,
                    });
                }
                Ok(Err(e)) => {
                    if attempt == 1 {
                        return Err(self.unreachable(e));
                    }
                }
                Err(_) => {
                    return Err(
                        self.unreachable(format!("no reply within {:?}", self.request_timeout))
                    );
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }
}

/// The wait before attempt `failures + 1`: [`BACKOFF_START`] doubled per failure, capped, and
/// spread by `jitter` (0 to 1) over its upper half, so that peers waiting for one restarting
/// tracker do not all come back in the same instant.
fn backoff(failures: u32, cap: Duration, jitter: f64) -> Duration {
    let doubled = BACKOFF_START.saturating_mul(1 << failures.saturating_sub(1).min(16));
    let full = doubled.min(cap);
    full / 2 + full.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

async fn exchange(conn: &mut Connection, frame: &[u8]) -> anyhow::Result<bytes::BytesMut> {
    conn.write_line(frame).await?;
    conn.flush().await?;
    match conn.read_line().await? {
        Some(line) => Ok(line),
        None => anyhow::bail!("connection closed before the reply"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let cap = Duration::from_secs(30);
        assert_eq!(backoff(1, cap, 1.0), BACKOFF_START);
        assert_eq!(backoff(1, cap, 0.0), BACKOFF_START / 2);
        assert_eq!(backoff(3, cap, 1.0), BACKOFF_START * 4);
        assert_eq!(backoff(40, cap, 1.0), cap);
        assert_eq!(backoff(40, cap, 0.0), cap / 2);
        let short = Duration::from_secs(1);
        assert_eq!(backoff(5, short, 1.0), short);
    }

    #[tokio::test]
    async fn an_unreachable_tracker_is_not_dialled_again_before_its_backoff() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let requests = crate::metrics::PeerMetrics::default().tracker_requests;
        let client = TrackerClient::new(&addr, &PeerConfig::default(), requests.clone());
        let body = crate::protocol::FileList {
            secret: None,
            versions: false,
        };
        let list = || client.request::<_, crate::protocol::FileListReply>(Msg::FileList, &body);
        let first = list().await.unwrap_err();
        assert!(client.is_down(), "{first}");
        let second = list().await.unwrap_err().to_string();
        assert!(second.contains("down for"), "{second}");
        let outage = client.outage();
        let o = outage.as_ref().unwrap();
        assert_eq!((o.failures, o.held_back), (1, 1));
        drop(outage);
        let sent = requests.with_label_values(&[addr.as_str(), "unreachable"]);
        assert_eq!(
            sent.get(),
            1,
            "a request held back by the backoff is not counted"
        );
        client.note_answer();
        assert!(!client.is_down());
    }
}
