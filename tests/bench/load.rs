//! The tracker load generator, shared by `tests/load.rs` and the tracker benchmarks. It opens
//! many concurrent persistent connections to a real `shoal-tracker` and speaks raw NDJSON:
//! each connection registers fake peers (message 1), then pipelines chunk registers
//! (message 4) and locations queries (message 3). Every reply must be `ok`, and [`verify`]
//! compares the tracker's final state with what was sent, so a lost registration is caught.
#![allow(dead_code)] // the test and the benchmarks use different subsets

use crate::common::{Proc, Raw};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::Value;
use shoal::bitfield::Bitfield;
use shoal::connection::{Connection, Limits};
use shoal::protocol::{
    decode_reply, encode_request, ChunkRegister, ChunksRecorded, FileInfo, FileOffer, Hash,
    HashList, Locations, Msg, Register, Registered,
};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Every network await of the generator is bounded by this.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Replies can be long (a locations reply listing every holder), requests never are.
const LIMITS: Limits = Limits {
    max_frame: 256 << 20,
    idle_timeout: TIMEOUT,
    frame_timeout: TIMEOUT,
};

/// Fake files with real-looking metadata: every file has `chunks` chunk hashes and its digest
/// is BLAKE3 of them, exactly as a peer would publish it.
pub struct Catalog {
    pub files: Vec<FileOffer>,
}

impl Catalog {
    pub fn new(prefix: &str, files: usize, chunks: u32, chunk_size: u32) -> Catalog {
        let files = (0..files)
            .map(|f| {
                let hashes = HashList(
                    (0..chunks)
                        .map(|c| Hash::of(format!("{prefix}/{f}/{c}").as_bytes()))
                        .collect(),
                );
                let info = FileInfo {
                    name: format!("{prefix}-{f:03}.bin"),
                    size: u64::from(chunks) * u64::from(chunk_size),
                    chunk_size,
                    digest: hashes.digest(),
                };
                FileOffer {
                    info,
                    published: 0,
                    hashes,
                    have: None,
                }
            })
            .collect();
        Catalog { files }
    }

    pub fn chunks(&self) -> u32 {
        self.files[0].hashes.0.len() as u32
    }

    /// How many files [`seed`] registers per message.
    fn files_per_seed_message(&self) -> usize {
        (SEED_HASHES_PER_MESSAGE / self.chunks().max(1) as usize).max(1)
    }

    fn name(&self, file: usize) -> &str {
        &self.files[file].info.name
    }

    /// Request `r` of peer `g` registers batch `g + r` of the catalog's chunks laid end to end,
    /// file after file: a peer's batches never repeat and peers spread over files and chunks.
    fn batch(&self, plan: &Plan, g: usize, r: usize) -> (usize, Range<u32>) {
        let per = plan.chunks_per_register;
        let batches = self.files.len() * (self.chunks() / per) as usize;
        let start = ((g + r) % batches) as u64 * u64::from(per);
        let chunks = u64::from(self.chunks());
        let first = (start % chunks) as u32;
        ((start / chunks) as usize, first..first + per)
    }

    /// What peer `g` holds per file after its first `done` chunk registers.
    fn expected(&self, plan: &Plan, g: usize, done: usize) -> Vec<Bitfield> {
        let mut have = vec![Bitfield::new(self.chunks() as usize); self.files.len()];
        for r in 0..done {
            let (file, range) = self.batch(plan, g, r);
            for c in range {
                have[file].set(c as usize);
            }
        }
        have
    }
}

/// Hashes per seeding message: about 1 MiB of JSON, well under the tracker's frame limit.
const SEED_HASHES_PER_MESSAGE: usize = 16 * 1024;

/// Registers every file of the catalog, hash lists included, as one seeding peer holding all
/// chunks (the "first connection" of a load run), in as many messages as the frame limit
/// needs: the first registers the peer, the others add files to it. Returns its peer id.
pub fn seed(tracker: SocketAddr, catalog: &Catalog) -> u64 {
    let mut raw = Raw::connect(tracker);
    let mut seeder: Option<(u64, String)> = None;
    for files in catalog.files.chunks(catalog.files_per_seed_message()) {
        let req = Register {
            name: "seeder".into(),
            addr: "127.0.0.1:1".into(),
            secret: None,
            peer_id: seeder.as_ref().map(|s| s.0),
            token: seeder.as_ref().map(|s| s.1.clone()),
            files: files.to_vec(),
        };
        let line = encode_request(Msg::Register, &req);
        let reply = raw.ask(std::str::from_utf8(&line).expect("JSON is UTF-8"));
        assert_eq!(reply["ok"], true, "seeding refused: {reply}");
        let refused: Vec<&Value> = reply["files"]
            .as_array()
            .expect("verdicts")
            .iter()
            .filter(|v| v["accepted"] != true)
            .collect();
        assert!(refused.is_empty(), "seed files refused: {refused:?}");
        let id = reply["peer_id"].as_u64().expect("peer id");
        let token = reply["token"].as_str().expect("token").to_string();
        seeder = Some((id, token));
    }
    seeder.expect("a catalog has files").0
}

/// What every connection of a run does, bounded by these counts and by `time_limit`.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Peer names are `{label}-{n}`; runs on one tracker need different labels.
    pub label: &'static str,
    pub connections: usize,
    /// Peer identities registered on each connection (message 1 without files).
    pub peers_per_connection: usize,
    /// Message-4 requests per peer, each naming `chunks_per_register` consecutive chunks.
    pub chunk_registers: usize,
    /// Must divide the catalog's chunks per file.
    pub chunks_per_register: u32,
    /// Message-3 requests per connection, over the catalog's files in turn.
    pub locations: usize,
    /// `want` of those locations queries (`None`: the tracker's cap).
    pub locations_want: Option<u32>,
    /// Requests in flight on one connection.
    pub pipeline: usize,
    /// After this, counted from the start, no new request is sent; those in flight are drained.
    pub time_limit: Duration,
}

impl Plan {
    fn peers(&self) -> usize {
        self.connections * self.peers_per_connection
    }
}

/// Latencies in log-linear buckets of about 3 %: enough for p50 and p99 without keeping
/// every sample of a million-request run.
#[derive(Clone, Debug, Default)]
pub struct Latencies {
    counts: Vec<u64>,
    total: u64,
}

/// Sub-buckets per power of two.
const SUB: u64 = 32;

impl Latencies {
    fn bucket(us: u64) -> usize {
        if us < SUB {
            return us as usize;
        }
        let exp = 63 - u64::from(us.leading_zeros());
        let mantissa = us >> (exp - 5);
        (SUB + (exp - 5) * SUB + (mantissa - SUB)) as usize
    }

    /// The lower bound of a bucket, microseconds.
    fn floor(bucket: usize) -> u64 {
        let b = bucket as u64;
        if b < SUB {
            return b;
        }
        let exp = (b - SUB) / SUB + 5;
        let mantissa = (b - SUB) % SUB + SUB;
        mantissa << (exp - 5)
    }

    pub fn record(&mut self, d: Duration) {
        let b = Self::bucket(d.as_micros() as u64);
        if self.counts.len() <= b {
            self.counts.resize(b + 1, 0);
        }
        self.counts[b] += 1;
        self.total += 1;
    }

    pub fn merge(&mut self, other: &Latencies) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q` quantile (0..=1) in microseconds, to the bucket's lower bound.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let rank = ((q * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::floor(b);
            }
        }
        0
    }
}

/// What a run did and saw.
#[derive(Debug)]
pub struct Report {
    pub plan: Plan,
    /// Message-4 requests answered `ok`, per peer of the run (in schedule order).
    pub done: Vec<usize>,
    /// The sum of `recorded` over message-4 replies.
    pub recorded: u64,
    pub errors: u64,
    /// The first few errors, for the failure message.
    pub error_samples: Vec<String>,
    /// Connecting and registering every peer.
    pub setup: Duration,
    /// From the moment every connection had registered its peers until the last reply.
    pub elapsed: Duration,
    pub latency: HashMap<Msg, Latencies>,
}

/// One message type's figures in a run.
pub struct MessageStats {
    pub msg: Msg,
    pub requests: u64,
    pub per_second: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// The message types a run sends, in report order.
pub const KINDS: [Msg; 3] = [Msg::Register, Msg::ChunkRegister, Msg::Locations];

impl Report {
    /// Requests of `kind` answered per second, over the phase that sent them.
    pub fn rate(&self, kind: Msg) -> f64 {
        let n = self.latency.get(&kind).map_or(0, Latencies::count) as f64;
        let phase = if kind == Msg::Register {
            self.setup
        } else {
            self.elapsed
        };
        n / phase.as_secs_f64().max(1e-9)
    }

    /// Requests, rate and latency per message type sent.
    pub fn stats(&self) -> Vec<MessageStats> {
        KINDS
            .iter()
            .filter_map(|&msg| {
                let l = self.latency.get(&msg).filter(|l| l.count() > 0)?;
                Some(MessageStats {
                    msg,
                    requests: l.count(),
                    per_second: self.rate(msg),
                    p50_us: l.quantile_us(0.5),
                    p99_us: l.quantile_us(0.99),
                })
            })
            .collect()
    }

    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} connections, {} peers, setup {:.2} s, requests {:.2} s, errors {}\n",
            self.plan.connections,
            self.plan.peers(),
            self.setup.as_secs_f64(),
            self.elapsed.as_secs_f64(),
            self.errors
        );
        out += &format!(
            "  {:<15}{:>10}{:>12}{:>10}{:>10}\n",
            "message", "requests", "per second", "p50 µs", "p99 µs"
        );
        for m in self.stats() {
            out += &format!(
                "  {:<15}{:>10}{:>12.0}{:>10}{:>10}\n",
                m.msg.label(),
                m.requests,
                m.per_second,
                m.p50_us,
                m.p99_us
            );
        }
        out
    }
}

/// Runs `plan` against the tracker at `addr` (whose catalog was [`seed`]ed) and waits for it.
pub fn run(addr: SocketAddr, catalog: &Arc<Catalog>, plan: &Plan) -> Report {
    assert_eq!(
        catalog.chunks() % plan.chunks_per_register,
        0,
        "chunks_per_register must divide the chunks per file"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run_async(addr, catalog.clone(), Arc::new(plan.clone())))
}

async fn run_async(addr: SocketAddr, catalog: Arc<Catalog>, plan: Arc<Plan>) -> Report {
    let started = Instant::now();
    let deadline = started + plan.time_limit;
    let barrier = Arc::new(tokio::sync::Barrier::new(plan.connections));
    let go: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..plan.connections {
        let client = Client::new(c, catalog.clone(), plan.clone());
        let (barrier, go) = (barrier.clone(), go.clone());
        tasks.spawn(async move { client.drive(addr, deadline, &barrier, &go).await });
    }
    let mut report = Report {
        plan: (*plan).clone(),
        done: vec![0; plan.peers()],
        recorded: 0,
        errors: 0,
        error_samples: Vec::new(),
        setup: Duration::ZERO,
        elapsed: Duration::ZERO,
        latency: HashMap::new(),
    };
    while let Some(joined) = tasks.join_next().await {
        let client = joined.expect("connection task panicked");
        client.add_to(&mut report);
    }
    let go = *go.get().expect("every connection passed the barrier");
    report.setup = go - started;
    report.elapsed = go.elapsed();
    report
}

/// The identity a registration returned.
#[derive(Clone)]
struct Session {
    peer_id: u64,
    token: String,
}

/// A request written and not yet answered.
struct Sent {
    msg: Msg,
    /// The peer (index on this connection) it speaks for.
    peer: usize,
    at: Instant,
}

/// One connection and the peers it speaks for.
struct Client {
    index: usize,
    catalog: Arc<Catalog>,
    plan: Arc<Plan>,
    sessions: Vec<Option<Session>>,
    done: Vec<usize>,
    recorded: u64,
    errors: Vec<String>,
    latency: HashMap<Msg, Latencies>,
}

impl Client {
    fn new(index: usize, catalog: Arc<Catalog>, plan: Arc<Plan>) -> Client {
        let peers = plan.peers_per_connection;
        Client {
            index,
            catalog,
            plan,
            sessions: vec![None; peers],
            done: vec![0; peers],
            recorded: 0,
            errors: Vec::new(),
            latency: HashMap::new(),
        }
    }

    /// The run-wide number of this connection's `k`-th peer.
    fn global(&self, k: usize) -> usize {
        self.index * self.plan.peers_per_connection + k
    }

    /// Registers this connection's peers, waits for every other connection to do the same,
    /// then sends the chunk registers and locations queries.
    async fn drive(
        mut self,
        addr: SocketAddr,
        deadline: Instant,
        barrier: &tokio::sync::Barrier,
        go: &OnceLock<Instant>,
    ) -> Client {
        let mut conn = self.connect(addr).await;
        if let Some(c) = conn.as_mut() {
            let registers: Vec<_> = (0..self.plan.peers_per_connection)
                .map(|k| (Msg::Register, k, self.register(k)))
                .collect();
            if !self.exchange(c, registers.into_iter(), None).await {
                conn = None;
            }
        }
        // Every connection reaches the barrier, even a failed one, or the others would wait.
        if barrier.wait().await.is_leader() {
            let _ = go.set(Instant::now());
        }
        if let Some(conn) = conn.as_mut() {
            let requests = self.requests();
            self.exchange(conn, requests, Some(deadline)).await;
        }
        self
    }

    async fn connect(&mut self, addr: SocketAddr) -> Option<Connection> {
        match tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => match Connection::new(stream, LIMITS) {
                Ok(conn) => return Some(conn),
                Err(e) => self.fail(format!("cannot connect: {e}")),
            },
            Ok(Err(e)) => self.fail(format!("cannot connect: {e}")),
            Err(_) => self.fail(format!("no connection within {TIMEOUT:?}")),
        }
        None
    }

    fn fail(&mut self, why: String) {
        self.errors
            .push(format!("connection {}: {why}", self.index));
    }

    fn register(&self, k: usize) -> Vec<u8> {
        let g = self.global(k);
        let req = Register {
            name: format!("{}-{g}", self.plan.label),
            // Never dialled: the tracker only stores it.
            addr: format!("127.0.0.1:{}", 1024 + g % 60_000),
            secret: None,
            peer_id: None,
            token: None,
            files: Vec::new(),
        };
        encode_request(Msg::Register, &req)
    }

    /// The request phase: chunk registers round-robin over the peers, locations interleaved.
    fn requests(&self) -> impl Iterator<Item = (Msg, usize, Vec<u8>)> {
        let peers = self.plan.peers_per_connection;
        let registers = peers * self.plan.chunk_registers;
        let (catalog, plan) = (self.catalog.clone(), self.plan.clone());
        let sessions = self.sessions.clone();
        let first = self.global(0);
        let index = self.index;
        (0..registers.max(plan.locations)).flat_map(move |j| {
            let mut out = Vec::with_capacity(2);
            if j < registers {
                let (k, r) = (j % peers, j / peers);
                if let Some(s) = &sessions[k] {
                    let (file, chunks) = catalog.batch(&plan, first + k, r);
                    let req = ChunkRegister {
                        peer_id: s.peer_id,
                        token: s.token.clone(),
                        file: catalog.name(file).to_string(),
                        // As Shoal peers do: the version the chunks belong to.
                        digest: Some(catalog.files[file].info.digest),
                        chunks: chunks.collect(),
                    };
                    out.push((
                        Msg::ChunkRegister,
                        k,
                        encode_request(Msg::ChunkRegister, &req),
                    ));
                }
            }
            if j < plan.locations {
                let req = Locations {
                    file: catalog.name((index + j) % catalog.files.len()).to_string(),
                    digest: None,
                    hashes: false,
                    peer_id: sessions[0].as_ref().map(|s| s.peer_id),
                    want: plan.locations_want,
                    secret: None,
                };
                out.push((Msg::Locations, 0, encode_request(Msg::Locations, &req)));
            }
            out
        })
    }

    /// Sends `requests` with up to `pipeline` in flight and handles each reply; stops sending
    /// at `deadline`. Returns whether the connection is still usable.
    async fn exchange(
        &mut self,
        conn: &mut Connection,
        mut requests: impl Iterator<Item = (Msg, usize, Vec<u8>)>,
        deadline: Option<Instant>,
    ) -> bool {
        let mut inflight: VecDeque<Sent> = VecDeque::new();
        loop {
            while inflight.len() < self.plan.pipeline && deadline.is_none_or(|d| Instant::now() < d)
            {
                let Some((msg, peer, line)) = requests.next() else {
                    break;
                };
                if let Err(e) = conn.write_line(&line).await {
                    self.fail(format!("send failed: {e}"));
                    return false;
                }
                inflight.push_back(Sent {
                    msg,
                    peer,
                    at: Instant::now(),
                });
            }
            let Some(sent) = inflight.pop_front() else {
                return true;
            };
            if let Err(e) = conn.flush().await {
                self.fail(format!("send failed: {e}"));
                return false;
            }
            let line = match conn.read_line().await {
                Ok(Some(line)) => line,
                Ok(None) => {
                    self.fail("tracker closed the connection".into());
                    return false;
                }
                Err(e) => {
                    self.fail(format!("reply: {e}"));
                    return false;
                }
            };
            self.latency
                .entry(sent.msg)
                .or_default()
                .record(sent.at.elapsed());
            self.on_reply(&sent, &line);
        }
    }

    fn on_reply(&mut self, sent: &Sent, line: &[u8]) {
        let outcome = match sent.msg {
            Msg::Register => decode::<Registered>(sent.msg, line).map(|r| {
                self.sessions[sent.peer] = Some(Session {
                    peer_id: r.peer_id,
                    token: r.token,
                });
            }),
            Msg::ChunkRegister => decode::<ChunksRecorded>(sent.msg, line).map(|r| {
                self.recorded += r.recorded;
                self.done[sent.peer] += 1;
            }),
            _ => decode::<IgnoredAny>(sent.msg, line).map(drop),
        };
        if let Err(why) = outcome {
            let g = self.global(sent.peer);
            self.errors
                .push(format!("{} of peer {g}: {why}", sent.msg.label()));
        }
    }

    fn add_to(self, report: &mut Report) {
        let first = self.global(0);
        report.done[first..first + self.done.len()].copy_from_slice(&self.done);
        report.recorded += self.recorded;
        report.errors += self.errors.len() as u64;
        let room = 10usize.saturating_sub(report.error_samples.len());
        report
            .error_samples
            .extend(self.errors.into_iter().take(room));
        for (msg, l) in &self.latency {
            report.latency.entry(*msg).or_default().merge(l);
        }
    }
}

fn decode<T: DeserializeOwned>(msg: Msg, line: &[u8]) -> Result<T, String> {
    decode_reply(msg, line).map_err(|r| r.to_string())
}

/// Checks the tracker's final state against everything the `runs` sent after [`seed`]: the
/// file list's holders and seeders, each holder's bitfield in a locations reply listing every
/// holder (the tracker must run with `SHOAL_MAX_HOLDERS` at least the peer count), and the
/// registration counters. Returns the mismatches; empty means nothing was lost.
pub fn verify(tracker: &Proc, catalog: &Catalog, runs: &[&Report]) -> Vec<String> {
    let mut problems: Vec<String> = runs
        .iter()
        .flat_map(|r| &r.error_samples)
        .cloned()
        .collect();
    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    if errors > 0 {
        problems.push(format!("{errors} requests or connections failed"));
    }
    // name -> expected bitfield per file, for every peer that registered any chunk.
    let mut expected: HashMap<String, Vec<Bitfield>> = HashMap::new();
    for run in runs {
        for (g, &done) in run.done.iter().enumerate() {
            if done > 0 {
                let name = format!("{}-{g}", run.plan.label);
                expected.insert(name, catalog.expected(&run.plan, g, done));
            }
        }
    }
    let files = Raw::connect(tracker.addr).ask(r#"{"v":1,"msg":2}"#);
    for (f, offer) in catalog.files.iter().enumerate() {
        let holders: Vec<(&String, &Bitfield)> = expected
            .iter()
            .map(|(name, have)| (name, &have[f]))
            .filter(|(_, have)| have.count() > 0)
            .collect();
        let name = &offer.info.name;
        // The seeder holds every chunk of every file.
        let peers = 1 + holders.len() as u64;
        let seeders = 1 + holders.iter().filter(|(_, h)| h.is_full()).count() as u64;
        let listed = files["files"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["name"] == name.as_str()));
        match listed {
            Some(x) if x["peers"] == peers && x["seeders"] == seeders => {}
            other => problems.push(format!(
                "file list: {name} should have {peers} peers and {seeders} seeders: {other:?}"
            )),
        }
        problems.extend(check_holders(tracker.addr, offer, &holders));
    }
    let seeding = catalog
        .files
        .len()
        .div_ceil(catalog.files_per_seed_message());
    let sent_registrations: usize = runs.iter().map(|r| r.plan.peers()).sum();
    let sent_chunks: u64 = expected.values().flatten().map(|b| b.count() as u64).sum();
    let recorded: u64 = runs.iter().map(|r| r.recorded).sum();
    for (metric, want) in [
        (
            "shoal_tracker_registrations_total",
            (seeding + sent_registrations) as u64,
        ),
        ("shoal_tracker_chunk_registrations_total", sent_chunks),
    ] {
        let got = tracker.metric(metric);
        if got != want as f64 {
            problems.push(format!("{metric} is {got}, {want} were sent"));
        }
    }
    if recorded != sent_chunks {
        problems.push(format!(
            "replies recorded {recorded} new chunks, {sent_chunks} were sent"
        ));
    }
    problems
}

/// Compares one file's holders in a locations reply that lists all of them with `holders`.
fn check_holders(
    tracker: SocketAddr,
    offer: &FileOffer,
    holders: &[(&String, &Bitfield)],
) -> Vec<String> {
    let name = &offer.info.name;
    let reply = Raw::connect(tracker).ask(&format!(
        r#"{{"v":1,"msg":3,"file":"{name}","want":{}}}"#,
        u32::MAX
    ));
    let total = holders.len() as u64 + 1;
    if reply["total_peers"] != total {
        return vec![format!(
            "locations: {name} should have {total} holders, reply says {}",
            reply["total_peers"]
        )];
    }
    let listed = reply["peers"].as_array().map_or(0, Vec::len) as u64;
    if listed != total {
        return vec![format!(
            "locations: {name} lists {listed} of {total} holders; raise SHOAL_MAX_HOLDERS"
        )];
    }
    let chunks = offer.hashes.0.len();
    let wanted: HashMap<&str, &Bitfield> = holders.iter().map(|(n, b)| (n.as_str(), *b)).collect();
    let mut problems = Vec::new();
    for p in reply["peers"].as_array().into_iter().flatten() {
        let holder = p["name"].as_str().unwrap_or_default();
        let have: shoal::bitfield::WireBits =
            serde_json::from_value(p["have"].clone()).expect("have is a bitfield");
        let have = Bitfield::from_bytes(have.0, chunks);
        let expected = match holder {
            "seeder" => Some(Bitfield::full(chunks)),
            other => wanted.get(other).map(|b| (*b).clone()),
        };
        if have != expected {
            problems.push(format!(
                "locations: {name} holder {holder} has {:?}, expected {:?}",
                have.map(|b| b.to_ranges()),
                expected.map(|b| b.to_ranges())
            ));
        }
    }
    problems
}

/// The soft limit on open files of this process (children inherit it).
pub fn open_file_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Makes sure this process (and the tracker it starts, which inherits the limit) can open
/// `connections` sockets at once: raises the soft limit on open files up to the hard one if
/// needed, and fails clearly if even that is too low.
pub fn require_open_files(connections: usize) {
    let need = connections as u64 + 256;
    if open_file_limit() < need {
        raise_open_file_limit(need);
    }
    let limit = open_file_limit();
    assert!(
        limit >= need,
        "the open file limit is {limit} (the hard limit: it cannot be raised from here), but \
         {connections} connections need at least {need}: raise it (`ulimit -Hn {need}` as root) \
         and run again"
    );
}

/// Raises the soft limit on open files to `want`, or to the hard limit if that is lower.
fn raise_open_file_limit(want: u64) {
    let mut limits = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limits) == 0 {
            limits.rlim_cur = want.min(limits.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limits);
        }
    }
}

#[test]
fn latency_buckets_are_ordered_and_tight() {
    let mut last = 0;
    for us in [0, 1, 31, 32, 33, 63, 64, 100, 1_000, 12_345, 10_000_000] {
        let b = Latencies::bucket(us);
        assert!(b >= last, "{us}");
        last = b;
        let floor = Latencies::floor(b);
        assert!(floor <= us && us - floor <= us / 32, "{us} -> {floor}");
    }
}
