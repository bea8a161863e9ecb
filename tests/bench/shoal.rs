//! Shoal's benchmarks: the real `shoal-tracker` and `shoal-peer` on loopback, each figure next
//! to a bound or a baseline measured in the same run, so the ratios hold on a busy machine.
//! `make bench` runs the full scale and rewrites `docs/BENCHMARKS.md`; `make bench-smoke` runs a
//! small scale that asserts nothing about time but fails on any corrupted copy, failed request
//! or lost registration.
//!
//! `cargo bench --bench shoal -- [full|smoke] [shoal-only] [n=N...] [scenario...]` (default
//! smoke, every scenario; `shoal-only` leaves BitTorrent out of the swarm scenarios, `n=N` keeps
//! only their rows of N downloaders).

mod bittorrent;
#[path = "../common/mod.rs"]
mod common;
mod load;
mod netns;
mod report;
mod swarm;
mod tracker;
mod transfer;

use common::Proc;
use netns::{Place, Spot};
use report::{Failure, Outcome, Setup};
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Small and quick, for CI.
    Smoke,
    /// The sizes the goals speak of.
    Full,
}

impl Scale {
    pub fn name(self) -> &'static str {
        match self {
            Scale::Smoke => "smoke",
            Scale::Full => "full",
        }
    }

    /// `smoke` or `full` for this scale.
    pub fn pick<T>(self, smoke: T, full: T) -> T {
        match self {
            Scale::Smoke => smoke,
            Scale::Full => full,
        }
    }
}

type Scenario = fn(Scale) -> anyhow::Result<Outcome>;

const SCENARIOS: [(&str, Scenario); 8] = [
    ("swarm", swarm::run),
    ("swarm_net", swarm::net),
    ("transfer", transfer::raw),
    ("tracker_throughput", tracker::throughput),
    ("tracker_memory", tracker::memory),
    ("peer_memory", transfer::peer_memory),
    ("tracker_replicas", tracker::replicas),
    ("tracker_scale", tracker::scale),
];

fn main() -> ExitCode {
    // Cargo passes `--bench`; everything else is ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let scale = if args.iter().any(|a| a == "full") {
        Scale::Full
    } else {
        Scale::Smoke
    };
    let mut sizes = Vec::new();
    for n in args.iter().filter_map(|a| a.strip_prefix("n=")) {
        match n.parse() {
            Ok(n) => sizes.push(n),
            Err(_) => {
                eprintln!("n={n}: the number of downloaders must be a whole number");
                return ExitCode::from(2);
            }
        }
    }
    let options = Options {
        shoal_only: args.iter().any(|a| a == "shoal-only"),
        sizes,
    };
    let partial = options.shoal_only || !options.sizes.is_empty();
    OPTIONS.set(options).expect("options set once");
    let chosen: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !matches!(*a, "full" | "smoke" | "shoal-only") && !a.starts_with("n="))
        .collect();
    if let Some(bad) = chosen
        .iter()
        .find(|c| !SCENARIOS.iter().any(|(n, _)| n == *c))
    {
        eprintln!(
            "unknown scenario {bad:?}; scenarios: {:?}",
            SCENARIOS.map(|s| s.0)
        );
        return ExitCode::from(2);
    }
    let date = now_utc();
    let setup = Setup::describe();
    println!(
        "Shoal benchmarks, {} scale, {date}, {} cores",
        scale.name(),
        setup.cores
    );
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    for (name, scenario) in SCENARIOS {
        if !chosen.is_empty() && !chosen.contains(&name) {
            continue;
        }
        let started = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| scenario(scale))) {
            Ok(Ok(outcome)) => {
                report::print(&outcome);
                outcomes.push(outcome);
            }
            Ok(Err(e)) => failures.push(Failure {
                name,
                why: format!("{e:#}"),
            }),
            Err(panic) => failures.push(Failure {
                name,
                why: panic_message(&panic),
            }),
        }
        println!("  ({name}: {:.0} s)", started.elapsed().as_secs_f64());
    }
    match report::write_json(scale, &date, &setup, &outcomes, &failures) {
        Ok(dir) => println!("\nJSON results in {}", dir.display()),
        Err(e) => failures.push(Failure {
            name: "report",
            why: format!("cannot write the JSON results: {e}"),
        }),
    }
    if scale == Scale::Full && chosen.is_empty() && !partial && failures.is_empty() {
        let command = "make bench";
        match report::write_doc(&date, &setup, command, &outcomes) {
            Ok(()) => println!("docs/BENCHMARKS.md rewritten"),
            Err(e) => failures.push(Failure {
                name: "report",
                why: format!("cannot rewrite docs/BENCHMARKS.md: {e}"),
            }),
        }
    }
    for f in &failures {
        eprintln!("\nFAILED {}: {}", f.name, f.why);
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What the command line narrows in the swarm scenarios.
#[derive(Debug, Default)]
pub struct Options {
    /// `shoal-only`: leave BitTorrent out.
    pub shoal_only: bool,
    /// `n=N`: only the rows of these numbers of downloaders (every row when empty).
    pub sizes: Vec<usize>,
}

static OPTIONS: std::sync::OnceLock<Options> = std::sync::OnceLock::new();

/// The command line's [`Options`].
pub fn options() -> &'static Options {
    OPTIONS.get_or_init(Options::default)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown date".into(), |d| d.trim().to_string())
}

pub const MIB: u64 = 1 << 20;

/// A tracker as an operator would run it, with leases that outlive any scenario and a holder
/// cap high enough for [`load::verify`] to see every holder; in mutual TLS with `tls`.
pub fn start_tracker(tls: Option<&common::Certs>) -> Proc {
    start_tracker_at(&Place::Loopback, tls)
}

/// [`start_tracker`] at the hub of `place`, its metrics on that place's 127.0.0.1.
pub fn start_tracker_at(place: &Place, tls: Option<&common::Certs>) -> Proc {
    let mut cmd = place.command(Spot::Hub, common::TRACKER);
    cmd.env("SHOAL_LISTEN", format!("{}:0", place.ip(Spot::Hub)))
        .env("SHOAL_METRICS_ADDR", "127.0.0.1:0")
        .env("SHOAL_ANNOUNCE_INTERVAL", "10m")
        .env("SHOAL_MAX_HOLDERS", "100000")
        .envs(tls_settings(tls, "tracker"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    Proc::spawn(cmd, "tracker listening")
}

/// The `SHOAL_TLS_*` settings of the holder of certificate `stem` of `tls`; none without TLS.
/// Every peer of a benchmark shows the same certificate, `p0`.
pub fn tls_settings(tls: Option<&common::Certs>, stem: &str) -> Vec<(&'static str, String)> {
    tls.map_or_else(Vec::new, |certs| certs.env(stem))
}

/// `shoal-peer run` sharing `dir`, with every setting at its default except `settings`.
pub fn start_peer(tracker: SocketAddr, dir: &Path, name: &str, settings: &[(&str, &str)]) -> Proc {
    start_peer_at(&Place::Loopback, 0, tracker, dir, name, settings)
}

/// [`start_peer`] as peer `i` of `place`, listening on its address.
pub fn start_peer_at(
    place: &Place,
    i: usize,
    tracker: SocketAddr,
    dir: &Path,
    name: &str,
    settings: &[(&str, &str)],
) -> Proc {
    std::fs::create_dir_all(dir).expect("data dir");
    let listen = format!("{}:0", place.ip(Spot::Peer(i)));
    let mut all = vec![("SHOAL_LISTEN", listen.as_str())];
    all.extend_from_slice(settings);
    let mut cmd = place.command(Spot::Peer(i), common::PEER);
    cmd.arg("run");
    common::placed_peer(&mut cmd, tracker, dir, name, &all);
    Proc::spawn(cmd, "peer listening")
}

/// BLAKE3 of a whole file, hex.
pub fn digest_of(path: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        )
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Waits until each path exists (a peer renames a download into place once it is complete
/// and synced); returns when each appeared, measured from `since`, `None` for the missing.
pub fn wait_for_files(paths: &[&Path], since: Instant, limit: Duration) -> Vec<Option<Duration>> {
    let mut seen: Vec<Option<Duration>> = vec![None; paths.len()];
    common::wait_until(limit, || {
        for (p, s) in paths.iter().zip(seen.iter_mut()) {
            if s.is_none() && p.exists() {
                *s = Some(since.elapsed());
            }
        }
        seen.iter().all(Option::is_some)
    });
    seen
}

/// Resident memory of process `pid`, bytes: `VmRSS` (now) or `VmHWM` (peak) from /proc.
pub fn memory_of(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// CPU time (user + system) used so far by process `pid`.
pub fn cpu_of(pid: i32) -> Duration {
    cpu_in(&format!("/proc/{pid}/stat"))
}

/// CPU time (user + system) used so far by the calling thread.
pub fn thread_cpu() -> Duration {
    cpu_in("/proc/thread-self/stat")
}

fn cpu_in(stat: &str) -> Duration {
    let text = std::fs::read_to_string(stat).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let fields: Vec<&str> = text
        .rsplit_once(") ")
        .map_or(Vec::new(), |(_, rest)| rest.split(' ').collect());
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // The kernel reports these in USER_HZ, which is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// Whether the bench runs as root (namespaces, installing packages).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Seconds with two decimals, for tables.
pub fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}
