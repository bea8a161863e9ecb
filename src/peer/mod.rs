//! The peer: a chunk [`store`] on disk, a chunk [`server`], a [`download`] engine whose
//! in-flight [`transfers`] readers can join, the pull-through from an HTTP [`origin`], its
//! [`trackers`] (one [`tracker_client`] each) kept up to date by [`upkeep`], the [`catalogue`]
//! that follows the data dir, the local HTTP [`api`] (with rates from [`meter`]), the front ends
//! in [`cli`] (the numbered menu, one-shot commands and the daemon) and [`fetch`], the API's
//! client for programs that do not join the swarm. This module holds what they share: the
//! running peer.

pub mod api;
pub mod catalogue;
pub mod cli;
pub mod download;
pub mod fetch;
pub mod meter;
pub mod mirror;
pub mod mirror_config;
pub mod origin;
pub mod server;
pub mod store;
pub mod tracker_client;
pub mod trackers;
pub mod transfers;
mod upkeep;

use crate::config::PeerConfig;
use crate::metrics::{serve_http, PeerMetrics, Ready};
use anyhow::Context;
use meter::Meter;
use server::RateLimiter;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracker_client::TrackerError;
use trackers::Trackers;
use transfers::Transfers;

/// Longest chunk header line accepted from a holder.
pub(crate) const MAX_HEADER_BYTES: usize = 4096;

/// A running peer. Cheap to share (`Arc<Peer>`); every task holds one.
pub struct Peer {
    pub cfg: PeerConfig,
    pub name: String,
    pub store: Store,
    pub trackers: Trackers,
    pub metrics: PeerMetrics,
    /// Holders that served bad data, kept across download attempts.
    pub bans: download::Bans,
    pub ready: Ready,
    pub upload: RateLimiter,
    /// Chunks sent at once; further requests wait their turn (first come, first served).
    pub upload_slots: tokio::sync::Semaphore,
    pub listen_addr: SocketAddr,
    /// Set, the chunk server and every dial (tracker, holders) speak mutual TLS.
    pub tls: Option<Arc<crate::tls::Tls>>,
    pub stop: CancellationToken,
    pub tasks: TaskTracker,
    /// Wakes the catalogue: a file was found changed on disk while being served.
    pub rescan: tokio::sync::Notify,
    /// Downloads in flight, which API readers and other callers join.
    pub transfers: Transfers,
    /// Bytes of verified chunks landed, for the recent download rate.
    pub down: Meter,
    /// Chunk bytes sent to other peers, for the recent upload rate.
    pub up: Meter,
    /// Where files no peer shares are pulled from (`SHOAL_ORIGIN`, mirror routes).
    pub origin: Arc<origin::Origin>,
    /// The registry mirror's upstreams (`SHOAL_REGISTRY_UPSTREAM`), if any.
    pub mirror: Option<mirror::Upstreams>,
}

/// Which files a starting peer shares.
pub enum Shares {
    /// These paths (the seed's command line); downloads still land in the data dir.
    Paths(Vec<PathBuf>),
    /// Everything in the data dir, resuming partial downloads (daemon mode).
    DataDir,
}

impl Peer {
    /// Loads the store, binds the chunk server (and metrics), registers, and starts the
    /// background tasks. Tracker trouble is not fatal: the maintenance loop keeps retrying.
    pub async fn start(
        cfg: PeerConfig,
        shares: Shares,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<Peer>> {
        let name = cfg.name.clone().unwrap_or_else(host_name);
        let store = Store::new(&cfg.data_dir, cfg.direct_writes)?;
        let chunk_size = cfg.chunk_size;
        let store = tokio::task::spawn_blocking(move || -> anyhow::Result<Store> {
            match shares {
                Shares::DataDir => {
                    for (file, e) in store.scan(chunk_size) {
                        tracing::warn!(file, error = format!("{e:#}"), "not shared");
                    }
                }
                Shares::Paths(paths) => {
                    for p in paths {
                        store.share(&p, chunk_size)?;
                    }
                }
            }
            Ok(store)
        })
        .await??;
        let listener = crate::connection::listen(&cfg.listen, cfg.max_connections)
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let listen_addr = listener.local_addr()?;
        let metrics = PeerMetrics::default();
        let tls = cfg.tls.load()?;
        let trackers = Trackers::new(&cfg, &metrics, &stop, tls.clone());
        trackers.refresh().await;
        let base = match &cfg.origin {
            Some(url) => Some(
                origin::OriginUrl::parse(url).map_err(|e| anyhow::anyhow!("SHOAL_ORIGIN: {e}"))?,
            ),
            None => None,
        };
        let web = crate::tls::web_client(cfg.origin_ca.as_deref())?;
        let origin = Arc::new(origin::Origin::new(base, cfg.origin_concurrency, web));
        let mirror = match &cfg.registry_upstream {
            Some(list) => Some(
                mirror::Upstreams::parse(list)
                    .map_err(|e| anyhow::anyhow!("SHOAL_REGISTRY_UPSTREAM: {e}"))?,
            ),
            None => None,
        };
        let peer = Arc::new(Peer {
            name,
            store,
            trackers,
            metrics,
            bans: download::Bans::default(),
            ready: Ready::default(),
            upload: RateLimiter::new(cfg.upload_limit),
            upload_slots: tokio::sync::Semaphore::new(cfg.upload_slots),
            listen_addr,
            tls,
            stop,
            tasks: TaskTracker::new(),
            rescan: tokio::sync::Notify::new(),
            transfers: Transfers::default(),
            down: Meter::default(),
            up: Meter::default(),
            origin,
            mirror,
            cfg,
        });
        peer.update_file_gauges();
        let mut metrics_addr = None;
        if let Some(http) = bind_http(&peer.cfg.metrics_addr, "metrics").await? {
            metrics_addr = Some(http.local_addr()?);
            peer.tasks.spawn(serve_http(
                http,
                peer.tls.clone().filter(|_| peer.cfg.tls.metrics_tls),
                peer.metrics.registry.clone(),
                peer.ready.clone(),
                peer.stop.clone(),
            ));
        }
        let mut api_addr = None;
        if let Some(http) = bind_http(&peer.cfg.api_addr, "the HTTP API").await? {
            api_addr = Some(http.local_addr()?);
            peer.tasks.spawn(api::serve(peer.clone(), http));
        }
        tracing::info!(addr = %listen_addr, metrics = metrics_addr.map(tracing::field::display), api = api_addr.map(tracing::field::display), peer = %peer.name, files = peer.store.all().len(), "peer listening");
        peer.tasks.spawn(server::run(peer.clone(), listener));
        peer.join_trackers().await;
        Ok(peer)
    }

    /// Whether some tracker knows this peer now.
    pub fn is_registered(&self) -> bool {
        self.trackers.registered() && self.ready.get()
    }

    /// A connection to the chunk server of the holder at `addr` (`ip:port`), in this peer's mode;
    /// with TLS, the holder's certificate must carry `SHOAL_TLS_PEER_NAME`.
    pub async fn dial_holder(&self, addr: &str) -> Result<crate::connection::Connection, String> {
        let cfg = &self.cfg;
        let limits = crate::connection::Limits {
            max_frame: MAX_HEADER_BYTES,
            idle_timeout: cfg.chunk_timeout,
            frame_timeout: cfg.chunk_timeout,
        };
        let socket: SocketAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not ip:port"))?;
        let tls = self.tls.as_deref();
        crate::tls::connect(tls, socket, &cfg.tls_peer_name, limits, cfg.connect_timeout).await
    }

    /// This peer's id at one of its trackers, to name itself to other peers.
    pub fn peer_id(&self) -> Option<u64> {
        self.trackers.peer_id()
    }

    /// The address other peers should dial.
    async fn advertised(&self) -> Result<String, TrackerError> {
        if let Some(a) = &self.cfg.advertise {
            return Ok(a.clone());
        }
        let ip = if self.listen_addr.ip().is_unspecified() {
            self.trackers.first_live().client.local_ip().await?
        } else {
            self.listen_addr.ip()
        };
        Ok(SocketAddr::new(ip, self.listen_addr.port()).to_string())
    }

    /// Leaves, stops every task, and waits for them (bounded).
    pub async fn shutdown(&self) {
        self.leave().await;
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(2), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within 2s");
        }
    }

    pub fn update_file_gauges(&self) {
        self.metrics
            .files_shared
            .set(self.store.complete_count() as i64);
    }
}

/// Binds the HTTP listener for `what` if its address is set.
async fn bind_http(addr: &Option<String>, what: &str) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))?;
    Ok(Some(listener))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "shoal-peer".into())
}
