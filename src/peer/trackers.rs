//! The peer's trackers: which there are (a list, or one DNS name resolved again every
//! [`RESOLVE_EVERY`]), which of them own a file (rendezvous hashing of its name, live trackers
//! first), and reads that go to the first owner to answer. Trackers never talk to each other:
//! the index is soft state that peers write to every owner (docs/OPERATIONS.md says why that
//! is safe).

use super::tracker_client::{TrackerClient, TrackerError};
use crate::config::PeerConfig;
use crate::metrics::PeerMetrics;
use crate::protocol::{
    version_key, FileList, FileListReply, FileSummary, Hash, Locations, LocationsReply, Msg,
};
use crate::tls::Tls;
use prometheus::{IntCounter, IntCounterVec};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Chunk reports waiting for one tracker; when full, it is sent a re-registration instead.
const REPORT_QUEUE: usize = 8192;
/// How often a DNS name that stands for the tracker set is resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);
/// How long a read waits for one tracker before asking the next one as well.
pub const HEDGE_AFTER: Duration = Duration::from_millis(750);

/// "I now hold chunk `.2` of version `.1` of file `.0`", queued for a tracker.
pub type Report = (String, Hash, u32);

/// This peer's identity at one tracker.
#[derive(Clone, Debug)]
pub struct Session {
    pub peer_id: u64,
    pub token: String,
    /// The address this peer registered as reachable at.
    pub advertised: String,
}

/// One tracker of the set: its client and this peer's session with it.
pub struct Member {
    pub client: TrackerClient,
    /// Held briefly, never across an await.
    session: Mutex<Option<Session>>,
    /// Set when this tracker may have missed something: its upkeep re-registers.
    pub needs_sync: AtomicBool,
    /// The announce interval this tracker asked for, in milliseconds.
    pub announce_ms: AtomicU64,
    /// Cancelled when the tracker leaves the set (or the peer stops): ends its upkeep.
    pub gone: CancellationToken,
    reports: mpsc::Sender<Report>,
    /// Taken by the tracker's upkeep task. Held briefly, never across an await.
    report_rx: Mutex<Option<mpsc::Receiver<Report>>>,
    /// The file versions this peer told the tracker it holds, so that the ones it stops owning
    /// are withdrawn rather than left there for as long as this peer announces. Held briefly.
    placed: Mutex<HashSet<(String, Hash)>>,
}

impl Member {
    pub fn addr(&self) -> &str {
        self.client.addr()
    }

    pub fn session(&self) -> Option<Session> {
        self.lock_session().clone()
    }

    pub fn set_session(&self, s: Option<Session>) {
        *self.lock_session() = s;
    }

    fn lock_session(&self) -> MutexGuard<'_, Option<Session>> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adopts the tracker's announce interval, which also caps the backoff while it is away.
    pub fn set_announce_interval(&self, ms: u64) {
        let ms = ms.max(100);
        self.announce_ms.store(ms, Ordering::Relaxed);
        self.client.cap_backoff(Duration::from_millis(ms));
    }

    pub fn announce_interval(&self) -> Duration {
        Duration::from_millis(self.announce_ms.load(Ordering::Relaxed))
    }

    /// Queues a chunk report; when the queue is full, the next sync re-registers everything.
    pub fn report(&self, report: Report) {
        if self.reports.try_send(report).is_err() {
            self.needs_sync.store(true, Ordering::SeqCst);
        }
    }

    /// Notes that the tracker was told this peer holds version `digest` of `name`.
    pub fn note_placed(&self, name: &str, digest: Hash) {
        self.lock_placed().insert((name.to_string(), digest));
    }

    /// Notes that the tracker no longer lists this peer for version `digest` of `name`.
    pub fn forget_placed(&self, name: &str, digest: Hash) {
        self.lock_placed().remove(&(name.to_string(), digest));
    }

    /// Makes `now` what the tracker was told; returns what it was told before and not now.
    pub fn replace_placed(&self, now: HashSet<(String, Hash)>) -> Vec<(String, Hash)> {
        let before = std::mem::replace(&mut *self.lock_placed(), now.clone());
        before.into_iter().filter(|k| !now.contains(k)).collect()
    }

    fn lock_placed(&self) -> MutexGuard<'_, HashSet<(String, Hash)>> {
        self.placed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The queued chunk reports, for the one task that sends them.
    pub fn take_reports(&self) -> Option<mpsc::Receiver<Report>> {
        self.report_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// The set of trackers and what changed in it.
struct Set {
    /// Sorted by address.
    members: Vec<Arc<Member>>,
    /// Which members answered last time they were asked, as of the last [`Trackers::epoch`].
    live: Vec<bool>,
    /// Bumped whenever the members or their liveness change: files may have new owners.
    epoch: u64,
}

pub struct Trackers {
    /// `SHOAL_TRACKER`'s entries: one is resolved for the set, several are the set.
    entries: Vec<String>,
    replicas: usize,
    cfg: PeerConfig,
    /// Set, every tracker is dialled in TLS (see [`Trackers::tls_name`]).
    tls: Option<Arc<Tls>>,
    requests: IntCounterVec,
    failovers: IntCounter,
    stop: CancellationToken,
    /// Held briefly, never across an await.
    set: Mutex<Set>,
}

impl Trackers {
    /// The trackers `cfg.tracker` lists. A single name stands for itself until [`Trackers::refresh`]
    /// finds it resolves to several addresses. Members' upkeep stops with `stop`. With `tls`,
    /// every tracker is dialled in TLS.
    pub fn new(
        cfg: &PeerConfig,
        metrics: &PeerMetrics,
        stop: &CancellationToken,
        tls: Option<Arc<Tls>>,
    ) -> Trackers {
        let entries: Vec<String> = cfg.tracker.split(',').map(str::to_string).collect();
        let trackers = Trackers {
            replicas: cfg.tracker_replicas.max(1),
            cfg: cfg.clone(),
            tls,
            requests: metrics.tracker_requests.clone(),
            failovers: metrics.tracker_failovers.clone(),
            stop: stop.clone(),
            set: Mutex::new(Set {
                members: Vec::new(),
                live: Vec::new(),
                epoch: 0,
            }),
            entries,
        };
        trackers.replace(trackers.entries.clone());
        trackers
    }

    fn lock(&self) -> MutexGuard<'_, Set> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves a single `SHOAL_TRACKER` name again; returns the trackers that joined the set.
    /// A name with one address stays the tracker's name (dialled as such), so a plain
    /// one-tracker setup behaves as it always did. A failed lookup keeps the set as it was.
    pub async fn refresh(&self) -> Vec<Arc<Member>> {
        let [entry] = self.entries.as_slice() else {
            return Vec::new();
        };
        let addrs = match resolve(entry, self.cfg.connect_timeout).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(tracker = %entry, error = %e, "tracker name not resolved; keeping the set");
                return Vec::new();
            }
        };
        let addrs = one_family(addrs);
        let keys = if addrs.len() > 1 {
            addrs.iter().map(SocketAddr::to_string).collect()
        } else {
            vec![entry.clone()]
        };
        self.replace(keys)
    }

    /// Makes `keys` the set: members already in it keep their sessions, new ones start with
    /// none, and the ones left out are told to stop.
    fn replace(&self, mut keys: Vec<String>) -> Vec<Arc<Member>> {
        keys.sort();
        keys.dedup();
        let mut set = self.lock();
        let current: Vec<&str> = set.members.iter().map(|m| m.addr()).collect();
        if current == keys {
            return Vec::new();
        }
        let mut added = Vec::new();
        let mut members = Vec::with_capacity(keys.len());
        for key in keys {
            match set.members.iter().find(|m| m.addr() == key) {
                Some(m) => members.push(m.clone()),
                None => {
                    let m = Arc::new(self.member(&key));
                    added.push(m.clone());
                    members.push(m);
                }
            }
        }
        for old in &set.members {
            if !members.iter().any(|m| Arc::ptr_eq(m, old)) {
                tracing::info!(tracker = %old.addr(), "tracker left the set");
                old.gone.cancel();
            }
        }
        if !set.members.is_empty() {
            let addrs: Vec<&str> = members.iter().map(|m| m.addr()).collect();
            tracing::info!(trackers = ?addrs, "tracker set changed; files move to their new owners");
        }
        set.live = members.iter().map(|m| !m.client.is_down()).collect();
        set.members = members;
        set.epoch += 1;
        added
    }

    fn member(&self, addr: &str) -> Member {
        let (reports, report_rx) = mpsc::channel(REPORT_QUEUE);
        Member {
            reports,
            report_rx: Mutex::new(Some(report_rx)),
            placed: Mutex::new(HashSet::new()),
            client: TrackerClient::new(addr, &self.cfg, self.requests.clone())
                .with_tls(self.tls.clone(), &self.tls_name(addr)),
            session: Mutex::new(None),
            needs_sync: AtomicBool::new(true),
            announce_ms: AtomicU64::new(30_000),
            gone: self.stop.child_token(),
        }
    }

    /// The name the certificate of the tracker at `addr` must carry: the host part of the
    /// `SHOAL_TRACKER` entry it came from. One name resolved into several trackers (a headless
    /// Service) is still that name, as a client of a replicated service expects; a tracker of a
    /// list is its own entry's host (a DNS name, or an ip when listed by ip).
    fn tls_name(&self, addr: &str) -> String {
        let entry = match self.entries.as_slice() {
            [single] => single.as_str(),
            _ => addr,
        };
        let host = entry.rsplit_once(':').map_or(entry, |(host, _)| host);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    }

    /// Resolves the name again every [`RESOLVE_EVERY`]; `joined` starts the upkeep of each
    /// tracker that joins. Returns when the peer stops.
    pub async fn follow(&self, joined: impl Fn(Arc<Member>)) {
        if self.entries.len() > 1 {
            return;
        }
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(RESOLVE_EVERY) => {}
            }
            for m in self.refresh().await {
                joined(m);
            }
        }
    }

    pub fn members(&self) -> Vec<Arc<Member>> {
        self.lock().members.clone()
    }

    /// A number that changes whenever a file may have changed owners: the set changed, or a
    /// tracker went down or came back. Whoever sees it change re-registers.
    pub fn epoch(&self) -> u64 {
        let mut set = self.lock();
        let live: Vec<bool> = set.members.iter().map(|m| !m.client.is_down()).collect();
        if live != set.live {
            set.live = live;
            set.epoch += 1;
        }
        set.epoch
    }

    /// Every tracker, the ones that answered last ahead of the rest, each group in rendezvous
    /// order for `name`: the first [`PeerConfig::tracker_replicas`] are its owners.
    pub fn ranking(&self, name: &str) -> Vec<Arc<Member>> {
        let members = self.members();
        let keys: Vec<&str> = members.iter().map(|m| m.addr()).collect();
        let order = rendezvous(&keys, name);
        let (live, down): (Vec<_>, Vec<_>) = order
            .into_iter()
            .map(|i| members[i].clone())
            .partition(|m| !m.client.is_down());
        live.into_iter().chain(down).collect()
    }

    /// The trackers that hold `name` now: the first live ones in its rendezvous order.
    pub fn owners(&self, name: &str) -> Vec<Arc<Member>> {
        let mut ranking = self.ranking(name);
        ranking.truncate(self.replicas);
        ranking
    }

    pub fn is_owner(&self, member: &Member, name: &str) -> bool {
        self.owners(name)
            .iter()
            .any(|m| std::ptr::eq(m.as_ref(), member))
    }

    /// The first tracker that answered last time, if any does.
    pub fn first_live(&self) -> Arc<Member> {
        let members = self.members();
        let live = members.iter().find(|m| !m.client.is_down());
        live.unwrap_or(&members[0]).clone()
    }

    /// The peer id of this peer at some tracker, to name itself to other peers.
    pub fn peer_id(&self) -> Option<u64> {
        self.members()
            .iter()
            .find_map(|m| m.session().map(|s| s.peer_id))
    }

    /// Whether some tracker holds a session of this peer and answered last time.
    pub fn registered(&self) -> bool {
        self.members()
            .iter()
            .any(|m| m.session().is_some() && !m.client.is_down())
    }

    /// 3 file locations of version `digest` of `file` (absent: the newest), leaving this peer out.
    pub async fn locations(
        &self,
        file: &str,
        digest: Option<Hash>,
        hashes: bool,
    ) -> Result<LocationsReply, TrackerError> {
        let secret = self.cfg.secret.clone();
        let body = |m: &Member| Locations {
            file: file.to_string(),
            digest,
            hashes,
            peer_id: m.session().map(|s| s.peer_id),
            want: None,
            secret: secret.clone(),
        };
        self.ask_owner(file, Msg::Locations, body).await
    }

    /// Sends a request about file `name` to its trackers in [`Trackers::ranking`] order and
    /// returns the first answer. The next tracker is asked when one fails or refuses (it may
    /// not know the file yet), or when it has not answered within [`HEDGE_AFTER`]. If none
    /// answers, the error is a refusal when one refused, else the last tracker's failure.
    pub async fn ask_owner<T, R>(
        &self,
        name: &str,
        msg: Msg,
        body: impl Fn(&Member) -> T,
    ) -> Result<R, TrackerError>
    where
        T: Serialize + Send + Sync + 'static,
        R: DeserializeOwned + Send + 'static,
    {
        let ranking = self.ranking(name);
        let first_owner = self.first_in_rendezvous(name);
        let mut waiting = ranking.into_iter();
        let mut asked = JoinSet::new();
        let mut failure: Option<TrackerError> = None;
        loop {
            if asked.is_empty() {
                let Some(m) = waiting.next() else { break };
                asked.spawn(request(m.clone(), msg, body(&m)));
            }
            let done = tokio::select! {
                done = asked.join_next() => done,
                _ = tokio::time::sleep(HEDGE_AFTER) => {
                    if let Some(m) = waiting.next() {
                        asked.spawn(request(m.clone(), msg, body(&m)));
                    }
                    continue;
                }
            };
            let Some(Ok((m, result))) = done else {
                continue;
            };
            match result {
                Ok(reply) => {
                    if first_owner.as_deref() != Some(m.addr()) {
                        self.failovers.inc();
                    }
                    return Ok(reply);
                }
                Err(e) => {
                    if failure.as_ref().is_none_or(|f| f.code().is_none()) {
                        failure = Some(e);
                    }
                }
            }
        }
        Err(failure.unwrap_or_else(|| TrackerError::Unreachable {
            addr: self.cfg.tracker.clone(),
            reason: "no tracker answered".into(),
        }))
    }

    fn first_in_rendezvous(&self, name: &str) -> Option<String> {
        let members = self.members();
        let keys: Vec<&str> = members.iter().map(|m| m.addr()).collect();
        rendezvous(&keys, name)
            .first()
            .map(|&i| members[i].addr().to_string())
    }

    /// 2 file list, merged from every tracker that answers: one entry per (name, digest) with
    /// the largest counts any tracker gave, and `latest` decided over the merged versions.
    /// Fails only when no tracker answers.
    pub async fn file_list(&self, versions: bool) -> Result<FileListReply, TrackerError> {
        let mut asked = JoinSet::new();
        for m in self.members() {
            let body = FileList {
                secret: self.cfg.secret.clone(),
                versions,
            };
            asked.spawn(request::<_, FileListReply>(m, Msg::FileList, body));
        }
        let mut lists = Vec::new();
        let mut failure = None;
        while let Some(done) = asked.join_next().await {
            match done {
                Ok((_, Ok(list))) => lists.push(list),
                Ok((_, Err(e))) => failure = Some(e),
                Err(_) => {}
            }
        }
        match failure {
            Some(e) if lists.is_empty() => Err(e),
            _ => Ok(merge_lists(lists, versions)),
        }
    }
}

async fn request<T: Serialize, R: DeserializeOwned>(
    m: Arc<Member>,
    msg: Msg,
    body: T,
) -> (Arc<Member>, Result<R, TrackerError>) {
    let result = m.client.request(msg, &body).await;
    (m, result)
}

/// The addresses `host:port` resolves to, sorted, without repeats.
pub async fn resolve(entry: &str, limit: Duration) -> anyhow::Result<Vec<SocketAddr>> {
    let found = tokio::time::timeout(limit, tokio::net::lookup_host(entry))
        .await
        .map_err(|_| anyhow::anyhow!("name resolution timed out after {limit:?}"))??;
    let mut addrs: Vec<SocketAddr> = found.collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// The IPv4 addresses among `addrs`, or the IPv6 ones when there are none: a dual-stack host
/// (or `localhost`) has one address of each family, and counting it twice would register this
/// peer twice with the same tracker.
fn one_family(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let has_v4 = addrs.iter().any(SocketAddr::is_ipv4);
    addrs
        .into_iter()
        .filter(|a| a.is_ipv4() == has_v4)
        .collect()
}

/// Indices of `trackers` by descending rendezvous weight for file `name` (ties, which need a
/// hash collision, by address). Each tracker's rank depends only on its own address and the
/// name, so adding or removing one tracker moves only the files it gains or loses.
pub fn rendezvous(trackers: &[&str], name: &str) -> Vec<usize> {
    let mut order: Vec<(u64, &str, usize)> = trackers
        .iter()
        .enumerate()
        .map(|(i, t)| (weight(t, name), *t, i))
        .collect();
    order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    order.into_iter().map(|(_, _, i)| i).collect()
}

fn weight(tracker: &str, name: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(tracker.as_bytes());
    h.update(&[0]);
    h.update(name.as_bytes());
    let bytes = h.finalize();
    u64::from_le_bytes(bytes.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// One list out of several trackers' lists (see [`Trackers::file_list`]): by name, newest
/// version first.
fn merge_lists(lists: Vec<FileListReply>, versions: bool) -> FileListReply {
    let mut merged: BTreeMap<(String, Hash), FileSummary> = BTreeMap::new();
    for f in lists.into_iter().flat_map(|l| l.files) {
        let key = (f.info.name.clone(), f.info.digest);
        match merged.get_mut(&key) {
            Some(seen) => {
                seen.peers = seen.peers.max(f.peers);
                seen.seeders = seen.seeders.max(f.seeders);
            }
            None => {
                merged.insert(key, f);
            }
        }
    }
    let mut by_name: BTreeMap<String, Vec<FileSummary>> = BTreeMap::new();
    for ((name, _), f) in merged {
        by_name.entry(name).or_default().push(f);
    }
    let mut files = Vec::new();
    for (_, mut all) in by_name {
        all.sort_by_key(|f| std::cmp::Reverse(version_key(f.published, f.info.digest)));
        let shown = if versions { all.len() } else { 1 };
        for (rank, mut f) in all.into_iter().take(shown).enumerate() {
            f.latest = rank == 0;
            files.push(f);
        }
    }
    FileListReply { files }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners_of(trackers: &[&str], name: &str, replicas: usize) -> Vec<String> {
        let order = rendezvous(trackers, name);
        let mut owners: Vec<String> = order[..replicas]
            .iter()
            .map(|&i| trackers[i].to_string())
            .collect();
        owners.sort();
        owners
    }

    #[test]
    fn every_file_has_distinct_owners_spread_over_all_trackers() {
        let trackers = ["10.0.0.1:7400", "10.0.0.2:7400", "10.0.0.3:7400"];
        let mut held = [0usize; 3];
        for i in 0..3000 {
            let order = rendezvous(&trackers, &format!("file-{i}"));
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2]);
            for &t in &order[..2] {
                held[t] += 1;
            }
        }
        // Each tracker owns about 2/3 of 3000 files.
        for h in held {
            assert!((1800..2200).contains(&h), "{held:?}");
        }
    }

    #[test]
    fn adding_a_fourth_tracker_moves_about_a_quarter_of_the_files() {
        let three = ["t1:7400", "t2:7400", "t3:7400"];
        let four = ["t1:7400", "t2:7400", "t3:7400", "t4:7400"];
        let files = 4000;
        let mut moved = 0;
        for i in 0..files {
            let name = format!("models/m{i}.bin");
            let before = owners_of(&three, &name, 1);
            let after = owners_of(&four, &name, 1);
            if before != after {
                assert_eq!(after, ["t4:7400"], "a file moves only to the new tracker");
                moved += 1;
            }
        }
        // 1/4 of the files, give or take.
        assert!((800..1200).contains(&moved), "{moved} of {files} moved");
        // With two owners each, a file gains the new tracker in place of one old owner in
        // about half the cases (2/4), and never trades one old tracker for another.
        let mut gained = 0;
        for i in 0..files {
            let name = format!("models/m{i}.bin");
            let before = owners_of(&three, &name, 2);
            let after = owners_of(&four, &name, 2);
            let kept = after.iter().filter(|t| before.contains(t)).count();
            if after.iter().any(|t| t == "t4:7400") {
                assert_eq!(kept, 1, "{before:?} -> {after:?}");
                gained += 1;
            } else {
                assert_eq!(before, after);
            }
        }
        assert!((1800..2200).contains(&gained), "{gained} of {files} moved");
    }

    #[test]
    fn removing_a_tracker_moves_only_its_files() {
        let three = ["t1:7400", "t2:7400", "t3:7400"];
        let two = ["t1:7400", "t3:7400"];
        for i in 0..1000 {
            let name = format!("f{i}");
            let before = owners_of(&three, &name, 1);
            if before != ["t2:7400"] {
                assert_eq!(owners_of(&two, &name, 1), before);
            }
        }
    }

    fn summary(name: &str, digest: u8, published: u64, peers: u64) -> FileSummary {
        FileSummary {
            info: crate::protocol::FileInfo {
                name: name.into(),
                size: 1,
                chunk_size: 65536,
                digest: Hash([digest; 32]),
            },
            chunks: 1,
            peers,
            seeders: peers,
            published,
            latest: true,
        }
    }

    #[test]
    fn merged_lists_keep_one_entry_per_version_and_the_newest_as_latest() {
        let a = FileListReply {
            files: vec![summary("a", 1, 10, 3), summary("b", 2, 5, 1)],
        };
        let b = FileListReply {
            files: vec![summary("a", 1, 10, 1), summary("b", 3, 7, 2)],
        };
        let all = merge_lists(vec![a.clone(), b.clone()], true).files;
        let seen: Vec<(&str, u8, u64, bool)> = all
            .iter()
            .map(|f| (f.info.name.as_str(), f.info.digest.0[0], f.peers, f.latest))
            .collect();
        assert_eq!(
            seen,
            [("a", 1, 3, true), ("b", 3, 2, true), ("b", 2, 1, false)]
        );
        let newest = merge_lists(vec![a, b], false).files;
        let names: Vec<(&str, u8)> = newest
            .iter()
            .map(|f| (f.info.name.as_str(), f.info.digest.0[0]))
            .collect();
        assert_eq!(names, [("a", 1), ("b", 3)]);
    }

    #[test]
    fn a_dual_stack_name_counts_one_address_family() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mixed = vec![
            addr("10.0.0.1:7400"),
            addr("[fd00::1]:7400"),
            addr("10.0.0.2:7400"),
        ];
        assert_eq!(
            one_family(mixed),
            [addr("10.0.0.1:7400"), addr("10.0.0.2:7400")]
        );
        let v6 = vec![addr("[fd00::1]:7400"), addr("[fd00::2]:7400")];
        assert_eq!(one_family(v6.clone()), v6);
    }

    #[tokio::test]
    async fn a_name_with_several_addresses_is_one_tracker_per_address() {
        let addrs = one_family(
            resolve("localhost:7400", Duration::from_secs(5))
                .await
                .unwrap(),
        );
        assert!(!addrs.is_empty());
        assert!(addrs
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 7400));
        let cfg = PeerConfig {
            tracker: "localhost:7400".into(),
            ..PeerConfig::default()
        };
        let stop = CancellationToken::new();
        let trackers = Trackers::new(&cfg, &PeerMetrics::default(), &stop, None);
        assert_eq!(trackers.members()[0].addr(), "localhost:7400");
        let joined = trackers.refresh().await;
        let set: Vec<String> = trackers
            .members()
            .iter()
            .map(|m| m.addr().to_string())
            .collect();
        if addrs.len() > 1 {
            let expected: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
            assert_eq!(set, expected);
            assert_eq!(joined.len(), addrs.len());
        } else {
            assert_eq!(set, ["localhost:7400"]);
            assert!(joined.is_empty());
        }
        stop.cancel();
        assert!(trackers.members().iter().all(|m| m.gone.is_cancelled()));
    }

    #[test]
    fn a_listed_set_keeps_every_entry_and_never_resolves() {
        let cfg = PeerConfig {
            tracker: "t2:7400,t1:7400,t3:7400".into(),
            ..PeerConfig::default()
        };
        let trackers = Trackers::new(
            &cfg,
            &PeerMetrics::default(),
            &CancellationToken::new(),
            None,
        );
        let set: Vec<String> = trackers
            .members()
            .iter()
            .map(|m| m.addr().to_string())
            .collect();
        assert_eq!(set, ["t1:7400", "t2:7400", "t3:7400"]);
        assert_eq!(trackers.owners("any").len(), 2);
        let before = trackers.epoch();
        assert_eq!(trackers.epoch(), before, "nothing changed");
    }
}
