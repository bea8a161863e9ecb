//! The peer's front ends: the seed's numbered menu, one-shot commands for scripts, the daemon
//! for containers, and the health probe. Output for people goes to stdout; logs go to stderr.

use super::download::{download, DownloadError, Progress};
pub use super::fetch::FetchRequest;
use super::origin::Failure;
use super::tracker_client::TrackerError;
use super::trackers::Trackers;
use super::{catalogue, Peer, Shares};
use crate::bitfield::Bitfield;
use crate::config::{PeerConfig, Want};
use crate::metrics::PeerMetrics;
use crate::protocol::{version_key, FileInfo, FileListReply, FileSummary, Hash, LocationsReply};
use crate::units;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

/// Exit codes of the one-shot commands.
pub mod exit {
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const TRACKER_UNREACHABLE: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
}

fn code_for(e: &DownloadError) -> u8 {
    match e {
        DownloadError::NoSuchFile(_) => exit::NOT_FOUND,
        DownloadError::Origin(e) if e.failure == Failure::NotFound => exit::NOT_FOUND,
        DownloadError::Tracker(TrackerError::Unreachable { .. }) => exit::TRACKER_UNREACHABLE,
        _ => exit::FAILED,
    }
}

const MENU: &str =
    "1 register  2 file list  3 file locations  4 chunk register  5 file chunk request  6 quit";

/// The seed's interactive peer: shares `files`, then answers numbered requests from stdin until
/// 6 or end of input; either way it leaves the swarm and exits 0.
pub async fn menu(
    cfg: PeerConfig,
    files: Vec<PathBuf>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let peer = Peer::start(cfg, Shares::Paths(files), stop.clone()).await?;
    println!("shoal-peer {} serving on {}", peer.name, peer.listen_addr);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        print!("{MENU}\n> ");
        let _ = std::io::stdout().flush();
        let Some(choice) = next_line(&mut lines, &stop).await else {
            break;
        };
        match choice.trim() {
            "" => continue,
            "1" => {
                let Some(path) = ask(&mut lines, &stop, "path of the file to share").await else {
                    break;
                };
                menu_register(&peer, PathBuf::from(path)).await;
            }
            "2" => print_result(
                peer.trackers
                    .file_list(false)
                    .await
                    .map(|l| format_file_list(&l, false)),
            ),
            "3" => {
                let Some(name) = ask(&mut lines, &stop, "file name").await else {
                    break;
                };
                print_result(
                    peer.trackers
                        .locations(&name, None, false)
                        .await
                        .map(|l| format_locations(&l)),
                );
            }
            "4" => {
                let Some(name) = ask(&mut lines, &stop, "file name").await else {
                    break;
                };
                menu_chunk_register(&peer, &name).await;
            }
            "5" => {
                let Some(name) = ask(&mut lines, &stop, "file name").await else {
                    break;
                };
                match download(&peer, &name, None, progress_for(&name)).await {
                    Ok(path) => println!("downloaded {name} to {}", path.display()),
                    Err(e) => println!("download failed: {e}"),
                }
            }
            "6" | "q" | "quit" => break,
            other => println!("unknown choice {other:?}: type a number from 1 to 6"),
        }
    }
    peer.shutdown().await;
    println!("bye");
    Ok(())
}

async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>,
    stop: &CancellationToken,
) -> Option<String> {
    tokio::select! {
        _ = stop.cancelled() => None,
        line = lines.next_line() => line.ok().flatten(),
    }
}

/// Asks for `what` until the answer is not blank; `None` at end of input or on stop.
async fn ask(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>,
    stop: &CancellationToken,
    what: &str,
) -> Option<String> {
    loop {
        print!("{what}: ");
        let _ = std::io::stdout().flush();
        let answer = next_line(lines, stop).await?.trim().to_string();
        if !answer.is_empty() {
            return Some(answer);
        }
        println!("{what} is empty; type one, or end input (Ctrl-D) to quit");
    }
}

fn print_result(r: Result<String, TrackerError>) {
    match r {
        Ok(text) => print!("{text}"),
        Err(e) => println!("error: {e}"),
    }
}

/// Menu item 1: shares the file at `path` under its base name. Other content under a name
/// already held is published as a new version of that name; the reply says which.
async fn menu_register(peer: &Arc<Peer>, path: PathBuf) {
    let chunk_size = peer.cfg.chunk_size;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let held = name
        .as_deref()
        .map(|n| peer.store.versions(n))
        .unwrap_or_default();
    let p2 = peer.clone();
    let shared = tokio::task::spawn_blocking(move || p2.store.share(&path, chunk_size)).await;
    let f = match shared {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => return println!("error: {e:#}"),
        Err(e) => return println!("error: {e}"),
    };
    if held.iter().any(|h| Arc::ptr_eq(h, &f)) {
        return println!("{} is already shared, unchanged", f.info.name);
    }
    peer.metrics.versions_published.inc();
    let replies = match peer.sync().await {
        Ok(replies) => replies,
        Err(e) => return println!("error: {e}"),
    };
    peer.update_file_gauges();
    let verdict = replies
        .iter()
        .flat_map(|r| &r.files)
        .find(|v| v.name == f.info.name && !v.accepted);
    if let Some(v) = verdict {
        return println!(
            "tracker refused {}: {}",
            v.name,
            v.message.as_deref().unwrap_or("")
        );
    }
    let what = if held.is_empty() {
        "registered"
    } else {
        "published a new version of"
    };
    println!(
        "{what} {} ({}, {}, digest {})",
        f.info.name,
        units::bytes(f.info.size),
        units::count(f.info.chunks(), "chunk"),
        f.info.digest.to_hex()
    );
    if let Some(newer) = held.iter().find(|h| h.version_key() > f.version_key()) {
        println!(
            "note: the version {} held here has a later stamp (mtime), so {} still means that one",
            newer.info.digest.to_hex(),
            f.info.name
        );
    }
}

async fn menu_chunk_register(peer: &Peer, name: &str) {
    let Some(f) = peer.store.get(name) else {
        println!("error: this peer holds no chunk of {name:?}");
        return;
    };
    let chunks: Vec<u32> = f.have().ones().map(|i| i as u32).collect();
    let count = chunks.len();
    match peer.register_chunks(name, f.info.digest, chunks).await {
        Ok(new) => println!(
            "registered {} of {name} ({new} new to the tracker)",
            units::count(count as u64, "chunk")
        ),
        Err(e) => println!("error: {e}"),
    }
}

/// The file list as a table; with `versions`, each row also gives the version's digest and
/// whether it is the newest of its name (the five first columns stay as scripts know them).
pub fn format_file_list(list: &FileListReply, versions: bool) -> String {
    if list.files.is_empty() {
        return "no files in the swarm\n".into();
    }
    let mut out = format!(
        "{:<32} {:>14} {:>8} {:>6} {:>8}",
        "NAME", "SIZE", "CHUNKS", "PEERS", "SEEDERS"
    );
    out += if versions { "  DIGEST LATEST\n" } else { "\n" };
    for f in &list.files {
        out += &format!(
            "{:<32} {:>14} {:>8} {:>6} {:>8}",
            f.info.name,
            units::bytes(f.info.size),
            f.chunks,
            f.peers,
            f.seeders
        );
        if versions {
            out += &format!("  {} {}", f.info.digest.to_hex(), f.latest);
        }
        out += "\n";
    }
    out
}

pub fn format_locations(loc: &LocationsReply) -> String {
    let mut out = format!(
        "{}: {}, {} of {}, digest {}; {}\n",
        loc.file.name,
        units::bytes(loc.file.size),
        units::count(loc.chunks, "chunk"),
        units::bytes(loc.file.chunk_size.into()),
        loc.file.digest.to_hex(),
        units::count(loc.total_peers, "holder")
    );
    for h in &loc.peers {
        let chunks = Bitfield::from_bytes(h.have.0.clone(), loc.chunks as usize)
            .map(|b| {
                if b.is_full() {
                    format!("all {}", b.len())
                } else {
                    b.to_ranges()
                }
            })
            .unwrap_or_else(|| "?".into());
        out += &format!("  {} ({}) chunks: {}\n", h.addr, h.name, chunks);
    }
    out
}

fn tracker_exit(e: &TrackerError) -> ExitCode {
    eprintln!("shoal-peer: {e}");
    match e {
        TrackerError::Unreachable { .. } => ExitCode::from(exit::TRACKER_UNREACHABLE),
        TrackerError::Refused { .. } => ExitCode::from(exit::FAILED),
    }
}

/// Parses a `--digest` value: a file digest as 64 hex digits.
pub fn parse_digest(text: &str) -> Result<Hash, String> {
    Hash::from_hex(text).ok_or_else(|| {
        format!("{text:?} is not a digest: expected 64 hex digits, as `files --json` shows")
    })
}

/// How the one-shot commands print: a table for people or JSON for scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// Prints `value` as one line of JSON on stdout.
fn print_json<T: Serialize>(value: &T) {
    println!("{}", serde_json::to_string(value).expect("serialisable"));
}

/// The trackers of a command that only asks them: the set as resolved now, dialled in TLS when
/// the settings say so.
async fn one_shot_trackers(cfg: &PeerConfig) -> Result<Trackers, ExitCode> {
    let tls = match cfg.tls.load() {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("shoal-peer: {e:#}");
            return Err(ExitCode::from(exit::USAGE));
        }
    };
    let trackers = Trackers::new(cfg, &PeerMetrics::default(), &CancellationToken::new(), tls);
    trackers.refresh().await;
    Ok(trackers)
}

/// `shoal-peer files [--json] [--all-versions]`: the JSON form is the message 2 entries
/// (`name`, `size`, `chunk_size`, `digest`, `chunks`, `peers`, `seeders`, `published`,
/// `latest`).
pub async fn files(cfg: PeerConfig, output: Output, all_versions: bool) -> ExitCode {
    let trackers = match one_shot_trackers(&cfg).await {
        Ok(t) => t,
        Err(code) => return code,
    };
    match trackers.file_list(all_versions).await {
        Ok(l) if output == Output::Json => {
            print_json(&l.files);
            ExitCode::SUCCESS
        }
        Ok(l) => {
            print!("{}", format_file_list(&l, all_versions));
            ExitCode::SUCCESS
        }
        Err(e) => tracker_exit(&e),
    }
}

/// `shoal-peer locate --json`: one version and, per holder, its chunks as inclusive ranges.
#[derive(Serialize)]
struct LocationsJson<'a> {
    #[serde(flatten)]
    file: &'a FileInfo,
    chunks: u64,
    published: u64,
    total_peers: u64,
    peers: Vec<HolderJson<'a>>,
}

#[derive(Serialize)]
struct HolderJson<'a> {
    addr: &'a str,
    name: &'a str,
    /// `[first, last]` pairs: `[[0,15],[20,20]]`.
    chunks: Vec<(usize, usize)>,
}

fn locations_json(loc: &LocationsReply) -> LocationsJson<'_> {
    let peers = loc
        .peers
        .iter()
        .map(|h| HolderJson {
            addr: &h.addr,
            name: &h.name,
            chunks: Bitfield::from_bytes(h.have.0.clone(), loc.chunks as usize)
                .map(|b| b.runs())
                .unwrap_or_default(),
        })
        .collect();
    LocationsJson {
        file: &loc.file,
        chunks: loc.chunks,
        published: loc.published,
        total_peers: loc.total_peers,
        peers,
    }
}

/// `shoal-peer locate NAME [--digest D] [--json]`
pub async fn locate_cmd(
    cfg: PeerConfig,
    name: &str,
    digest: Option<Hash>,
    output: Output,
) -> ExitCode {
    let trackers = match one_shot_trackers(&cfg).await {
        Ok(t) => t,
        Err(code) => return code,
    };
    match trackers.locations(name, digest, false).await {
        Ok(l) if output == Output::Json => {
            print_json(&locations_json(&l));
            ExitCode::SUCCESS
        }
        Ok(l) => {
            print!("{}", format_locations(&l));
            ExitCode::SUCCESS
        }
        Err(e) if e.code() == Some(crate::protocol::ErrorCode::UnknownFile) => {
            eprintln!("shoal-peer: {e}");
            ExitCode::from(exit::NOT_FOUND)
        }
        Err(e) => tracker_exit(&e),
    }
}

/// `shoal-peer get NAME... [--digest D]`: joins the swarm (serving while it downloads),
/// fetches, leaves. A digest pins the version and so goes with exactly one name.
pub async fn get(
    cfg: PeerConfig,
    names: Vec<String>,
    digest: Option<Hash>,
    stop: CancellationToken,
) -> ExitCode {
    if digest.is_some() && names.len() != 1 {
        eprintln!("shoal-peer: --digest pins the version of one file: give exactly one name");
        return ExitCode::from(exit::USAGE);
    }
    let peer = match Peer::start(cfg, Shares::Paths(Vec::new()), stop).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("shoal-peer: {e:#}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let mut code = ExitCode::SUCCESS;
    for name in names {
        match download(&peer, &name, digest, progress_for(&name)).await {
            Ok(path) => println!("{}", path.display()),
            Err(e) => code = ExitCode::from(report_failure(&name, digest, &e)),
        }
    }
    peer.shutdown().await;
    code
}

/// Says why a download of `name` failed, naming the pinned version when that is what the swarm
/// lacks; returns the exit code.
fn report_failure(name: &str, digest: Option<Hash>, e: &DownloadError) -> u8 {
    match (e, digest) {
        (DownloadError::NoSuchFile(_), Some(d)) => eprintln!(
            "shoal-peer: no peer shares version {} of {name:?}; `shoal-peer files --all-versions` lists the versions",
            d.to_hex()
        ),
        _ => eprintln!("shoal-peer: {e}"),
    }
    code_for(e)
}

/// Parses a duration flag: a number with a unit, as the settings take them (`30s`, `5m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|_| {
        format!("{text:?} is not a duration: write a number with a unit, e.g. 30s or 5m")
    })
}

/// `shoal-peer fetch NAME --agent URL --output PATH`: prints the path written, or says why
/// not and exits with the code of the failure.
pub async fn fetch(req: &FetchRequest<'_>, stop: CancellationToken) -> ExitCode {
    match super::fetch::fetch(req, &stop).await {
        Ok(_) => {
            println!("{}", req.output.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shoal-peer: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `shoal-peer mirror-config`: prints what it wrote and removed, one line each.
pub fn mirror_config(req: &super::mirror_config::MirrorConfig) -> ExitCode {
    use super::mirror_config::Error;
    match super::mirror_config::run(req) {
        Ok(lines) => {
            lines.iter().for_each(|l| println!("{l}"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shoal-peer mirror-config: {e}");
            let usage = matches!(e, Error::Usage(_));
            ExitCode::from(if usage { exit::USAGE } else { exit::FAILED })
        }
    }
}

/// `shoal-peer health` / `shoal-tracker health`: probes `/healthz` on the metrics address, in
/// TLS when `SHOAL_METRICS_TLS` is on (the endpoint must show this program's own certificate).
pub async fn health(metrics_addr: Option<&str>, tls: &crate::config::TlsSettings) -> ExitCode {
    let Some(addr) = metrics_addr else {
        eprintln!("health: SHOAL_METRICS_ADDR is not set, so there is no endpoint to probe");
        return ExitCode::from(exit::USAGE);
    };
    let Ok(addr) = addr.parse() else {
        eprintln!("health: SHOAL_METRICS_ADDR {addr:?} is not ip:port");
        return ExitCode::from(exit::USAGE);
    };
    let client = match tls.tls_cert.as_deref().filter(|_| tls.metrics_tls) {
        Some(cert) => match crate::tls::own_endpoint_client(cert) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("health: {e:#}");
                return ExitCode::from(exit::USAGE);
            }
        },
        None => None,
    };
    match crate::metrics::probe(addr, "/healthz", client).await {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("health: /healthz answered {status}");
            ExitCode::from(exit::FAILED)
        }
        Err(e) => {
            eprintln!("health: {e:#}");
            ExitCode::from(exit::FAILED)
        }
    }
}

/// `shoal-peer run`: shares the data dir and follows it (new files published, deleted ones
/// withdrawn, replaced ones published as new versions), fetches what `SHOAL_WANT` names and
/// every newer version of it (with `*`: of every file in the swarm, now and later), keeps
/// seeding, and leaves the swarm on SIGTERM/SIGINT.
pub async fn daemon(cfg: PeerConfig, stop: CancellationToken) -> anyhow::Result<()> {
    let want = cfg.want();
    let peer = Peer::start(cfg, Shares::DataDir, stop.clone()).await?;
    peer.tasks.spawn(catalogue::watch(peer.clone()));
    let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut backoff: HashMap<String, tokio::time::Instant> = HashMap::new();
    // Names this peer will never write (invalid, or their path taken by something that is not
    // this peer's): said once, never retried. A newer version of a name held here is fetched.
    let refused = Arc::new(Mutex::new(HashSet::new()));
    // Names neither the swarm nor the origin has: said once, asked again less often (the file
    // may appear at the origin later).
    let absent = Arc::new(Mutex::new(HashSet::new()));
    let finished = Arc::new(tokio::sync::Notify::new());
    loop {
        let (wanted, unlisted) = wanted_versions(&peer, &want).await;
        running.retain(|name, task| {
            if !task.is_finished() {
                return true;
            }
            let rounds = if listed(&absent, name) {
                ABSENT_RETRY_ROUNDS
            } else {
                2
            };
            let retry = tokio::time::Instant::now() + peer.cfg.refresh_interval * rounds;
            backoff.insert(name.clone(), retry);
            false
        });
        let now = tokio::time::Instant::now();
        let mut pending = unlisted.len();
        // A name the swarm does not offer comes from the origin, if there is one.
        let from_origin = unlisted.into_iter().filter(|n| peer.origin.has(n));
        let versions = wanted.into_iter().map(|v| {
            let current = holds_current(&peer, &v);
            (v.info.name, Some(v.info.digest), current)
        });
        for (name, digest, current) in versions.chain(from_origin.map(|n| (n, None, false))) {
            if current || listed(&refused, &name) {
                continue;
            }
            pending += usize::from(digest.is_some());
            if running.contains_key(&name) || backoff.get(&name).is_some_and(|t| *t > now) {
                continue;
            }
            let p = peer.clone();
            let n = name.clone();
            let (finished, refused, absent) = (finished.clone(), refused.clone(), absent.clone());
            let task = tokio::spawn(async move {
                match download(&p, &n, digest, Arc::new(LogProgress::new(&n))).await {
                    Ok(_) | Err(DownloadError::Stopped(_)) => {
                        absent.lock().unwrap_or_else(|p| p.into_inner()).remove(&n);
                    }
                    Err(DownloadError::Origin(e)) if e.failure == Failure::NotFound => {
                        let first = absent
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(n.clone());
                        if first {
                            tracing::warn!(file = %n, error = %e, "neither the swarm nor the origin has it; asking again now and then");
                        } else {
                            tracing::debug!(file = %n, error = %e, "still not at the origin");
                        }
                    }
                    // The tracker client logs an outage once; one line per retry is noise.
                    Err(DownloadError::Tracker(e)) if e.code().is_none() => {
                        tracing::debug!(file = %n, error = %e, "download waits for the tracker")
                    }
                    Err(e @ DownloadError::Unwritable(_)) => {
                        tracing::warn!(file = %n, error = %e, "not downloading it, and not retrying");
                        refused.lock().unwrap_or_else(|p| p.into_inner()).insert(n);
                    }
                    Err(e) => tracing::warn!(file = %n, error = %e, "download failed"),
                }
                finished.notify_one();
            });
            running.insert(name, task);
        }
        peer.metrics.files_wanted.set(pending as i64);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = finished.notified() => {}
            _ = tokio::time::sleep(peer.cfg.refresh_interval) => {}
        }
    }
    for (_, task) in running {
        let _ = tokio::time::timeout(Duration::from_millis(500), task).await;
    }
    peer.shutdown().await;
    Ok(())
}

/// Refresh intervals a daemon waits before asking the origin again for a name it lacks.
const ABSENT_RETRY_ROUNDS: u32 = 15;

/// Whether `name` is among `names` (given up on for good, or absent everywhere).
fn listed(names: &Mutex<HashSet<String>>, name: &str) -> bool {
    names
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(name)
}

/// What the daemon should hold now: the newest version of each wanted name the swarm offers,
/// and the wanted names it does not offer yet (and are not held here either).
async fn wanted_versions(peer: &Peer, want: &Want) -> (Vec<FileSummary>, Vec<String>) {
    if *want == Want::Nothing {
        return (Vec::new(), Vec::new());
    }
    let listed = match peer.trackers.file_list(false).await {
        Ok(l) => l.files,
        Err(e) => {
            tracing::debug!(error = %e, "file list failed");
            Vec::new()
        }
    };
    match want {
        Want::Names(names) => {
            let unlisted = names
                .iter()
                .filter(|n| !listed.iter().any(|f| f.info.name == **n))
                .filter(|n| peer.store.get(n).is_none_or(|f| !f.is_complete()))
                .cloned()
                .collect();
            let wanted = listed
                .into_iter()
                .filter(|f| names.contains(&f.info.name))
                .collect();
            (wanted, unlisted)
        }
        _ => (listed, Vec::new()),
    }
}

/// Whether this peer holds `version`, or a newer version of its name, under its final name.
/// Complete is not enough: a file whose final check or rename failed is still due.
fn holds_current(peer: &Peer, version: &FileSummary) -> bool {
    let key = version_key(version.published, version.info.digest);
    peer.store
        .versions(&version.info.name)
        .iter()
        .any(|f| f.is_final() && f.version_key() >= key)
}

/// A progress bar on a terminal, plain lines otherwise.
fn progress_for(name: &str) -> Arc<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Arc::new(Bar(Mutex::new(None)))
    } else {
        Arc::new(Lines {
            name: name.to_string(),
            state: Mutex::new((0, 0, 0)),
        })
    }
}

struct Bar(Mutex<Option<indicatif::ProgressBar>>);

impl Progress for Bar {
    fn begin(&self, info: &FileInfo, chunks_held: u64) {
        let bar = indicatif::ProgressBar::new(info.size);
        let style = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(info.name.clone());
        bar.set_position((chunks_held * u64::from(info.chunk_size)).min(info.size));
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar);
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            b.inc(bytes);
        }
    }

    fn end(&self) {
        if let Some(b) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

/// One line per tenth of the file: (bytes done, total, last tenth printed).
struct Lines {
    name: String,
    state: Mutex<(u64, u64, u64)>,
}

impl Progress for Lines {
    fn begin(&self, info: &FileInfo, chunks_held: u64) {
        let done = (chunks_held * u64::from(info.chunk_size)).min(info.size);
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = (done, info.size, 0);
        println!(
            "{}: fetching {} in {} ({} already here)",
            info.name,
            units::bytes(info.size),
            units::count(info.chunks(), "chunk"),
            chunks_held
        );
    }

    fn advance(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 += bytes;
        let tenth = (s.0 * 10).checked_div(s.1).unwrap_or(10);
        if tenth > s.2 {
            s.2 = tenth;
            println!(
                "{}: {}% ({} of {})",
                self.name,
                tenth * 10,
                units::bytes(s.0.min(s.1)),
                units::bytes(s.1)
            );
        }
    }

    fn end(&self) {}
}

/// Daemon downloads log their progress at each quarter.
struct LogProgress {
    file: String,
    total: AtomicU64,
    done: AtomicU64,
}

impl LogProgress {
    fn new(file: &str) -> Self {
        LogProgress {
            file: file.to_string(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
        }
    }
}

impl Progress for LogProgress {
    fn begin(&self, info: &FileInfo, chunks_held: u64) {
        self.total.store(info.size, Ordering::Relaxed);
        self.done.store(
            (chunks_held * u64::from(info.chunk_size)).min(info.size),
            Ordering::Relaxed,
        );
    }

    fn advance(&self, bytes: u64) {
        let total = self.total.load(Ordering::Relaxed).max(1);
        let before = self.done.fetch_add(bytes, Ordering::Relaxed);
        if before * 4 / total != (before + bytes) * 4 / total {
            tracing::info!(
                file = %self.file,
                percent = (before + bytes) * 100 / total,
                "download progress"
            );
        }
    }

    fn end(&self) {}
}
