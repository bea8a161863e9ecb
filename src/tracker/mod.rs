//! The tracker: [`state`] is the index (domain logic, no I/O), [`server`] delivers it over TCP,
//! `holders` is the index's slab of each file's holders and the chunks they hold, and `origin`
//! follows the files peers pull from an HTTP origin until their digest is known.

mod holders;
pub mod origin;
pub mod server;
pub mod state;

use crate::config::TrackerConfig;
use crate::connection::Limits;
use crate::metrics::{serve_http, Ready, TrackerMetrics};
pub use server::Tracker;
use state::{IndexLimits, TrackerState};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

impl Tracker {
    /// A tracker with these settings; fails only on unreadable TLS files.
    pub fn from_config(cfg: &TrackerConfig) -> anyhow::Result<Tracker> {
        let limits = IndexLimits {
            max_peers: cfg.max_peers,
            max_files: cfg.max_files,
            max_files_per_peer: cfg.max_files_per_peer,
            max_chunks_per_file: cfg.max_chunks_per_file,
            max_holders: cfg.max_holders,
        };
        Ok(Tracker {
            tls: cfg.tls.load()?,
            state: Arc::new(
                TrackerState::new(limits, cfg.announce_interval, cfg.secret.clone())
                    .allowing_foreign_addr(cfg.allow_foreign_addr),
            ),
            metrics: TrackerMetrics::default(),
            limits: Limits {
                max_frame: cfg.max_frame_bytes,
                idle_timeout: cfg.idle_timeout,
                frame_timeout: cfg.frame_timeout,
            },
            max_connections: cfg.max_connections,
            announce_interval: cfg.announce_interval,
        })
    }
}

/// Binds the configured addresses, logs them (tests read the real ports from this line), and
/// serves until `stop` fires.
pub async fn run(cfg: TrackerConfig, stop: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener = crate::connection::listen(&cfg.listen, cfg.max_connections)
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let tracker = Arc::new(Tracker::from_config(&cfg)?);
    let mut metrics_addr = None;
    if let Some(addr) = &cfg.metrics_addr {
        let http = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for metrics"))?;
        metrics_addr = Some(http.local_addr()?);
        let ready = Ready::default();
        ready.set(true);
        tokio::spawn(serve_http(
            http,
            tracker.tls.clone().filter(|_| cfg.tls.metrics_tls),
            tracker.metrics.registry.clone(),
            ready,
            stop.clone(),
        ));
    }
    let addr = listener.local_addr()?;
    tracing::info!(addr = %addr, metrics = metrics_addr.map(tracing::field::display), "tracker listening");
    tracker.run(listener, stop).await;
    tracing::info!("tracker stopped");
    Ok(())
}
