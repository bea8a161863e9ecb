//! The peer's side of the control protocol: one persistent connection to the tracker, reopened
//! on failure, one request at a time, every await under a timeout.

use crate::config::PeerConfig;
use crate::connection::{Connection, Limits};
use crate::protocol::{
    decode_reply, encode_request, ErrorCode, FileList, FileListReply, Hash, Locations,
    LocationsReply, Msg, Refusal,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::timeout;

#[derive(Debug, thiserror::Error)]
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

pub struct TrackerClient {
    addr: String,
    /// The cluster secret, sent with the requests that carry one (1, 2, 3).
    pub secret: Option<String>,
    limits: Limits,
    connect_timeout: Duration,
    request_timeout: Duration,
    /// A tokio mutex because the connection is used across awaits; requests are serialised,
    /// which the tracker protocol expects per connection anyway.
    conn: tokio::sync::Mutex<Option<Connection>>,
}

impl TrackerClient {
    pub fn new(cfg: &PeerConfig) -> Self {
        let limits = Limits {
            max_frame: cfg.max_frame_bytes,
            idle_timeout: cfg.request_timeout,
            frame_timeout: cfg.request_timeout,
        };
        TrackerClient {
            addr: cfg.tracker.clone(),
            secret: cfg.secret.clone(),
            limits,
            connect_timeout: cfg.connect_timeout,
            request_timeout: cfg.request_timeout,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// 2 file list: the newest version of each name.
    pub async fn file_list(&self) -> Result<FileListReply, TrackerError> {
        self.list_files(false).await
    }

    /// 2 file list; with `versions`, every version of every name, newest first within a name.
    pub async fn list_files(&self, versions: bool) -> Result<FileListReply, TrackerError> {
        let req = FileList {
            secret: self.secret.clone(),
            versions,
        };
        self.request(Msg::FileList, &req).await
    }

    /// 3 file locations of version `digest` of `file` (absent: the newest), leaving `exclude`
    /// (this peer) out.
    pub async fn locations(
        &self,
        file: &str,
        digest: Option<Hash>,
        hashes: bool,
        exclude: Option<u64>,
    ) -> Result<LocationsReply, TrackerError> {
        let req = Locations {
            file: file.to_string(),
            digest,
            hashes,
            peer_id: exclude,
            want: None,
            secret: self.secret.clone(),
        };
        self.request(Msg::Locations, &req).await
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
        let mut last = String::from("no address");
        for addr in addrs {
            match timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return Ok(Connection::new(stream, self.limits)),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("connect timed out after {:?}", self.connect_timeout),
            }
        }
        Err(self.unreachable(last))
    }

    /// The local ip of the connection to the tracker: the default address others should dial.
    pub async fn local_ip(&self) -> Result<IpAddr, TrackerError> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            *guard = Some(self.connect().await?);
        }
        let conn = guard.as_ref().expect("just set");
        conn.local_addr()
            .map(|a| a.ip())
            .map_err(|e| self.unreachable(e))
    }

    /// Sends one request and waits for its reply. A broken connection is reopened once.
    pub async fn request<T: Serialize, R: DeserializeOwned>(
        &self,
        msg: Msg,
        body: &T,
    ) -> Result<R, TrackerError> {
        let frame = encode_request(msg, body);
        let mut guard = self.conn.lock().await;
        for attempt in 0..2 {
            if guard.is_none() {
                *guard = Some(self.connect().await?);
            }
            let conn = guard.as_mut().expect("just set");
            match timeout(self.request_timeout, exchange(conn, &frame)).await {
                Ok(Ok(line)) => {
                    return decode_reply(msg, &line).map_err(|refusal| TrackerError::Refused {
                        addr: self.addr.clone(),
                        refusal,
                    });
                }
                Ok(Err(e)) => {
                    *guard = None;
                    if attempt == 1 {
                        return Err(self.unreachable(e));
                    }
                }
                Err(_) => {
                    *guard = None;
                    return Err(
                        self.unreachable(format!("no reply within {:?}", self.request_timeout))
                    );
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }
}

async fn exchange(conn: &mut Connection, frame: &[u8]) -> anyhow::Result<bytes::BytesMut> {
    conn.write_line(frame).await?;
    conn.flush().await?;
    match conn.read_line().await? {
        Some(line) => Ok(line),
        None => anyhow::bail!("connection closed before the reply"),
    }
}
