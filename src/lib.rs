//! Shoal: peer-to-peer file distribution. A tracker indexes which peer holds which chunk of which
//! file; peers download verified chunks from many holders at once and serve what they have.
//!
//! Module map:
//! - [`protocol`]: wire messages (serde types only, no I/O) and error codes.
//! - [`connection`]: newline-delimited JSON framing plus raw chunk bytes, for both sides.
//! - [`args`]: command-line flags both binaries share, completions and man pages.
//! - [`bitfield`]: the set of chunks a peer holds, and its base64 wire form.
//! - [`chunking`]: cutting a file into chunks and hashing them (BLAKE3).
//! - [`config`]: one settings struct per binary, layered defaults < file < env < flags.
//! - [`logging`]: tracing set-up, readable text or one JSON object per line.
//! - [`metrics`]: Prometheus metric handles and the `/metrics` `/healthz` `/readyz` server.
//! - [`shutdown`]: the shared stop signal (SIGINT/SIGTERM).
//! - [`tls`]: the optional TLS layer: certificates reloaded from disk, accept and dial, identity.
//! - [`tracker`]: the tracker's state (files, peers, leases) and its server.
//! - [`peer`]: the peer's chunk store, chunk server, download engine, origin pull-through,
//!   trackers and front ends.
//! - [`units`]: byte sizes and counts as people write and read them.

pub mod args;
pub mod bitfield;
pub mod chunking;
pub mod config;
pub mod connection;
pub mod logging;
pub mod metrics;
pub mod peer;
pub mod protocol;
pub mod shutdown;
pub mod tls;
pub mod tracker;
pub mod units;
