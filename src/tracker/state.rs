//! The tracker's index: file version (name, digest) -> {metadata, stamp, peer -> chunks held},
//! name -> its versions newest first, and peer -> {name, address, token, lease}. Soft state
//! only: it is rebuilt from peer registrations after a restart, newest version included, because
//! the order comes from the stamps the peers send (see [`version_key`]).
//!
//! One std `Mutex` guards the index. Every operation holds it for microseconds and never across
//! an `.await` (there is none in this module), which is why a blocking mutex is right here.

use super::holders::Holders;
use super::origin::{ClaimLimits, Completed, Origins};
use crate::bitfield::{Bitfield, WireBits};
use crate::chunking::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::protocol::{
    secret_matches, validate_name, version_key, Acknowledged, ChunkRegister, ChunkSource,
    ChunksRecorded, ErrorCode, FileInfo, FileList, FileListReply, FileOffer, FileSummary,
    FileVerdict, Hash, HashList, Holder, Locations, LocationsReply, OriginClaim, OriginGrant,
    PeerAuth, Refusal, Register, Registered, Withdraw,
};
use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Limits on what the index will hold; each has a documented refusal when reached.
#[derive(Clone, Debug)]
pub struct IndexLimits {
    pub max_peers: usize,
    pub max_files: usize,
    pub max_files_per_peer: usize,
    pub max_chunks_per_file: u64,
    pub max_holders: usize,
}

/// A peer is forgotten after this many announce intervals of silence.
pub const LEASE_INTERVALS: u32 = 3;

pub struct TrackerState {
    index: Mutex<Index>,
    limits: IndexLimits,
    announce_interval: Duration,
    secret: Option<String>,
    /// Whether a peer may register an address whose ip is not the one it connects from.
    allow_foreign_addr: bool,
}

#[derive(Default)]
struct Index {
    /// File name -> ids of its versions, newest first. A name has few versions at once, so a
    /// version is found by its digest with a short scan. Peers list the versions they hold by
    /// id: 4 bytes each instead of a name and a digest.
    names: HashMap<String, Vec<u32>>,
    files: HashMap<u32, FileEntry>,
    /// Ids of files that left the index, given to new files first: ids stay below the number
    /// of files indexed at once, so they fit a u32.
    free_file_ids: Vec<u32>,
    peers: HashMap<u64, PeerEntry>,
    next_id: u64,
    /// Starts every token this run of the tracker issues, so that a token from an earlier run
    /// is told apart from a wrong one (`unknown_peer`, not `forbidden`).
    run_tag: String,
    /// Files being pulled from an HTTP origin, not indexed until their digest is known.
    origins: Origins,
}

impl Index {
    /// Version `digest` of `name`, or its newest version when `digest` is `None`.
    fn file(&self, name: &str, digest: Option<Hash>) -> Option<(u32, &FileEntry)> {
        let versions = self.names.get(name)?;
        let id = match digest {
            None => *versions.first()?,
            Some(d) => *versions.iter().find(|id| self.files[id].info.digest == d)?,
        };
        Some((id, &self.files[&id]))
    }

    /// Indexes a version nobody holds yet; returns its id.
    fn add_file(&mut self, file: FileEntry) -> u32 {
        // With none free, ids in use are exactly 0..files.len().
        let id = self.free_file_ids.pop().unwrap_or_else(|| {
            u32::try_from(self.files.len()).expect("fewer than 2^32 files indexed")
        });
        let name = file.info.name.clone();
        self.files.insert(id, file);
        self.names.entry(name.clone()).or_default().push(id);
        self.sort_versions(&name);
        id
    }

    fn remove_file(&mut self, id: u32) {
        let Some(file) = self.files.remove(&id) else {
            return;
        };
        self.free_file_ids.push(id);
        let name = &file.info.name;
        self.origins.forget_version(name, file.info.digest);
        if let Some(versions) = self.names.get_mut(name) {
            versions.retain(|&v| v != id);
            if versions.is_empty() {
                self.names.remove(name);
            }
        }
    }

    /// Puts `name`'s versions back in order, newest first, after one was added or restamped.
    fn sort_versions(&mut self, name: &str) {
        let Some(versions) = self.names.get_mut(name) else {
            return;
        };
        let files = &self.files;
        versions.sort_unstable_by_key(|id| std::cmp::Reverse(files[id].version()));
    }
}

struct FileEntry {
    info: FileInfo,
    /// The highest stamp any holder offered: a version published again (a rollback) becomes
    /// the newest, and the result does not depend on the order peers register in.
    published: u64,
    hashes: Arc<HashList>,
    holders: Holders,
}

impl FileEntry {
    fn version(&self) -> (u64, Hash) {
        version_key(self.published, self.info.digest)
    }
}

struct PeerEntry {
    name: String,
    addr: SocketAddr,
    token: String,
    /// What the certificate it registered with proves (see [`crate::tls::identity`]): every
    /// later request for this peer must come with the same, so one peer's certificate cannot
    /// act for another. `None` in clear text or without client certificates.
    identity: Option<String>,
    expires: Instant,
    /// Ids of the files this peer holds chunks of, to clean up when it goes. Whether it holds
    /// a given file is asked of the file's holders, so a list is enough (and smaller than a set).
    files: Vec<u32>,
}

/// Counts for the gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sizes {
    pub peers: usize,
    /// File versions.
    pub files: usize,
    /// File names (with at least one version).
    pub names: usize,
    /// Files being pulled from an origin, and their live chunk claims.
    pub origin_files: usize,
    pub origin_claims: usize,
}

impl TrackerState {
    pub fn new(limits: IndexLimits, announce_interval: Duration, secret: Option<String>) -> Self {
        TrackerState {
            index: Mutex::new(Index {
                next_id: first_peer_id(),
                run_tag: random_hex(4),
                ..Index::default()
            }),
            limits,
            announce_interval,
            secret,
            allow_foreign_addr: false,
        }
    }

    /// Lets peers register addresses of other hosts (behind NAT or a proxy, a peer's own view
    /// of its address is not the one the tracker sees). Off by default: anyone could otherwise
    /// point the swarm's downloads at a host of their choosing.
    pub fn allowing_foreign_addr(mut self, allow: bool) -> Self {
        self.allow_foreign_addr = allow;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock would be a bug in this module; the index is still
        // structurally valid (every mutation is a single map operation), so keep serving.
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn sizes(&self) -> Sizes {
        let ix = self.lock();
        let (origin_files, origin_claims) = ix.origins.counts(Instant::now());
        Sizes {
            peers: ix.peers.len(),
            files: ix.files.len(),
            names: ix.names.len(),
            origin_files,
            origin_claims,
        }
    }

    fn lease(&self, now: Instant) -> Instant {
        now + self.announce_interval * LEASE_INTERVALS
    }

    /// The cluster secret guards every way in that does not already need a peer's token.
    fn admit(&self, secret: Option<&str>, what: &str) -> Result<(), Refusal> {
        if secret_matches(self.secret.as_deref(), secret) {
            return Ok(());
        }
        let why = format!("{what} refused: missing or wrong cluster secret");
        Err(Refusal::new(ErrorCode::Unauthorized, why))
    }

    /// 1 register: a new peer (or more files for an existing one).
    pub fn register(
        &self,
        req: Register,
        source: IpAddr,
        identity: Option<&str>,
        now: Instant,
    ) -> Result<Registered, Refusal> {
        self.admit(req.secret.as_deref(), "registration")?;
        check_peer_name(&req.name)?;
        let addr = advertised_addr(&req.addr, source, self.allow_foreign_addr)?;
        let lease = self.lease(now);
        let mut ix = self.lock();
        let peer_id = match (req.peer_id, req.token.as_deref()) {
            (Some(id), Some(token)) => {
                let peer = authorised(&mut ix, id, token, identity)?;
                peer.expires = lease;
                peer.name = req.name.clone();
                peer.addr = addr;
                id
            }
            (None, None) => {
                if ix.peers.len() >= self.limits.max_peers {
                    let why = format!(
                        "the tracker already holds its limit of {} peers",
                        self.limits.max_peers
                    );
                    return Err(Refusal::new(ErrorCode::LimitReached, why));
                }
                let id = ix.next_id;
                ix.next_id += 1;
                // 32 hex digits in all, 96 of their bits random.
                let token = format!("{}{}", ix.run_tag, random_hex(12));
                let entry = PeerEntry {
                    name: req.name.clone(),
                    addr,
                    token,
                    identity: identity.map(str::to_string),
                    expires: lease,
                    files: Vec::new(),
                };
                ix.peers.insert(id, entry);
                id
            }
            _ => {
                return Err(Refusal::new(
                    ErrorCode::BadRequest,
                    "peer_id and token go together",
                ))
            }
        };
        let files = req
            .files
            .into_iter()
            .map(|offer| self.offer(&mut ix, peer_id, offer))
            .collect();
        let peer = &ix.peers[&peer_id];
        Ok(Registered {
            peer_id,
            token: peer.token.clone(),
            announce_interval_ms: self.announce_interval.as_millis() as u64,
            addr: peer.addr.to_string(),
            files,
        })
    }

    /// Adds one offered file to the index for `peer_id`; the verdict says whether and why not.
    fn offer(&self, ix: &mut Index, peer_id: u64, offer: FileOffer) -> FileVerdict {
        let name = offer.info.name.clone();
        match self.accept_offer(ix, peer_id, offer) {
            Ok(()) => FileVerdict {
                name,
                accepted: true,
                error: None,
                message: None,
            },
            Err(r) => FileVerdict {
                name,
                accepted: false,
                error: Some(r.code),
                message: Some(r.message),
            },
        }
    }

    /// Indexes the offered version (a new digest under a known name is a new version, never a
    /// conflict) and records the chunks the peer holds of it.
    fn accept_offer(&self, ix: &mut Index, peer_id: u64, offer: FileOffer) -> Result<(), Refusal> {
        let have = self.check_offer(&offer)?;
        let existing = ix.file(&offer.info.name, Some(offer.info.digest));
        match existing {
            Some((_, existing)) if existing.info != offer.info => {
                let why = format!(
                    "version {} of {:?} is already indexed with size {} and chunk size {}",
                    offer.info.digest.to_hex(),
                    offer.info.name,
                    existing.info.size,
                    existing.info.chunk_size
                );
                return Err(Refusal::new(ErrorCode::BadRequest, why));
            }
            None if ix.files.len() >= self.limits.max_files => {
                let why = format!(
                    "the tracker already indexes its limit of {} file versions",
                    self.limits.max_files
                );
                return Err(Refusal::new(ErrorCode::LimitReached, why));
            }
            _ => {}
        }
        if have.count() == 0 && !have.is_full() {
            // Valid, but holding nothing: there is nothing to index. An empty file has no chunk
            // to hold, so whoever offers it holds all of it and is indexed.
            return Ok(());
        }
        let id = existing.map(|(id, _)| id);
        self.check_room(ix, peer_id, id)?;
        let id = match id {
            Some(id) => {
                restamp(ix, id, offer.published);
                id
            }
            None => ix.add_file(FileEntry {
                holders: Holders::new(offer.info.chunks() as usize),
                info: offer.info,
                published: offer.published,
                hashes: Arc::new(offer.hashes),
            }),
        };
        hold(ix, peer_id, id).union_with(&have);
        Ok(())
    }

    /// Validates an offer on its own and returns the chunks it claims.
    fn check_offer(&self, offer: &FileOffer) -> Result<Bitfield, Refusal> {
        let info = &offer.info;
        validate_name(&info.name)?;
        let bad = |why: String| Err(Refusal::new(ErrorCode::BadRequest, why));
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&info.chunk_size) {
            return bad(format!(
                "chunk_size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                info.chunk_size
            ));
        }
        let chunks = info.chunks();
        if chunks > self.limits.max_chunks_per_file {
            let why = format!(
                "{chunks} chunks exceed the limit of {} per file",
                self.limits.max_chunks_per_file
            );
            return Err(Refusal::new(ErrorCode::LimitReached, why));
        }
        if offer.hashes.0.len() as u64 != chunks {
            return bad(format!(
                "{} hashes for {chunks} chunks",
                offer.hashes.0.len()
            ));
        }
        if offer.hashes.digest() != info.digest {
            return bad("digest does not match the chunk hashes".into());
        }
        match &offer.have {
            None => Ok(Bitfield::full(chunks as usize)),
            Some(WireBits(bytes)) => Bitfield::from_bytes(bytes.clone(), chunks as usize)
                .ok_or_else(|| {
                    Refusal::new(
                        ErrorCode::OutOfRange,
                        format!("have bitfield does not fit {chunks} chunks"),
                    )
                }),
        }
    }

    /// Refuses if holding file `id` (`None`: not indexed yet) would take `peer_id` past the
    /// per-peer file limit.
    fn check_room(&self, ix: &Index, peer_id: u64, id: Option<u32>) -> Result<(), Refusal> {
        let holds = id.is_some_and(|id| ix.files[&id].holders.contains(peer_id));
        let held = ix.peers[&peer_id].files.len();
        if !holds && held >= self.limits.max_files_per_peer {
            let why = format!(
                "this peer already holds its limit of {} files",
                self.limits.max_files_per_peer
            );
            return Err(Refusal::new(ErrorCode::LimitReached, why));
        }
        Ok(())
    }

    /// 2 file list: by name, the newest version of each, or every version newest first.
    pub fn file_list(&self, req: &FileList) -> Result<FileListReply, Refusal> {
        self.admit(req.secret.as_deref(), "file list")?;
        let ix = self.lock();
        let mut names: Vec<(&String, &Vec<u32>)> = ix.names.iter().collect();
        names.sort_unstable_by_key(|(name, _)| name.as_str());
        let shown = if req.versions { usize::MAX } else { 1 };
        let mut files = Vec::with_capacity(names.len());
        for (_, versions) in names {
            for (rank, id) in versions.iter().take(shown).enumerate() {
                files.push(summary(&ix.files[id], rank == 0));
            }
        }
        Ok(FileListReply { files })
    }

    /// 3 file locations: a bounded, randomised sample of holders that covers the rarest chunks.
    pub fn locations(&self, req: &Locations) -> Result<LocationsReply, Refusal> {
        self.admit(req.secret.as_deref(), "locations")?;
        validate_name(&req.file)?;
        let want = req.want.map_or(self.limits.max_holders, |w| {
            (w as usize).min(self.limits.max_holders)
        });
        let ix = self.lock();
        let (_, file) = ix
            .file(&req.file, req.digest)
            .ok_or_else(|| unknown_file(&req.file, req.digest))?;
        let mut candidates: Vec<(u64, usize)> = file
            .holders
            .rows()
            .filter(|(id, _)| Some(*id) != req.peer_id)
            .collect();
        let total_peers = candidates.len() as u64;
        let chosen = sample_holders(
            &mut candidates,
            want,
            file.info.chunks() as usize,
            |(_, slot)| file.holders.row(slot),
            &mut rand::thread_rng(),
        );
        let peers = chosen
            .into_iter()
            .filter_map(|(id, slot)| {
                let p = ix.peers.get(&id)?;
                Some(Holder {
                    addr: p.addr.to_string(),
                    name: p.name.clone(),
                    have: WireBits::from(&file.holders.row(slot)),
                })
            })
            .collect();
        Ok(LocationsReply {
            file: file.info.clone(),
            published: file.published,
            chunks: file.info.chunks(),
            hashes: req.hashes.then(|| HashList::clone(&file.hashes)),
            total_peers,
            peers,
        })
    }

    /// 4 chunk register: all indexes are checked before any is recorded.
    pub fn chunk_register(
        &self,
        req: &ChunkRegister,
        identity: Option<&str>,
        now: Instant,
    ) -> Result<ChunksRecorded, Refusal> {
        let lease = self.lease(now);
        let mut ix = self.lock();
        authorised(&mut ix, req.peer_id, &req.token, identity)?.expires = lease;
        let (id, file) = ix
            .file(&req.file, req.digest)
            .ok_or_else(|| unknown_file(&req.file, req.digest))?;
        let chunks = file.info.chunks();
        if let Some(bad) = req.chunks.iter().find(|&&i| u64::from(i) >= chunks) {
            let why = format!(
                "chunk {bad} is out of range: {:?} has {chunks} chunks",
                req.file
            );
            return Err(Refusal::new(ErrorCode::OutOfRange, why));
        }
        if req.chunks.is_empty() {
            return Ok(ChunksRecorded { recorded: 0 });
        }
        self.check_room(&ix, req.peer_id, Some(id))?;
        let mut held = hold(&mut ix, req.peer_id, id);
        let recorded = req.chunks.iter().filter(|&&i| held.set(i as usize)).count() as u64;
        Ok(ChunksRecorded { recorded })
    }

    /// 6 leave: the peer and every entry it had are removed at once.
    pub fn leave(&self, req: &PeerAuth, identity: Option<&str>) -> Result<Acknowledged, Refusal> {
        let mut ix = self.lock();
        authorised(&mut ix, req.peer_id, &req.token, identity)?;
        remove_peer(&mut ix, req.peer_id);
        Ok(Acknowledged {
            announce_interval_ms: None,
        })
    }

    /// 8 withdraw: the peer no longer holds this version; a version nobody holds leaves.
    /// Withdrawing a version the peer is not listed for changes nothing and is acknowledged,
    /// so a repeated withdraw is harmless.
    pub fn withdraw(
        &self,
        req: &Withdraw,
        identity: Option<&str>,
        now: Instant,
    ) -> Result<Acknowledged, Refusal> {
        validate_name(&req.file)?;
        let lease = self.lease(now);
        let mut ix = self.lock();
        authorised(&mut ix, req.peer_id, &req.token, identity)?.expires = lease;
        if let Some((id, _)) = ix.file(&req.file, Some(req.digest)) {
            release(&mut ix, req.peer_id, id);
            let peer = ix.peers.get_mut(&req.peer_id).expect("authorised above");
            peer.files.retain(|&held| held != id);
        }
        Ok(Acknowledged {
            announce_interval_ms: None,
        })
    }

    /// 7 announce: renews the lease.
    pub fn announce(
        &self,
        req: &PeerAuth,
        identity: Option<&str>,
        now: Instant,
    ) -> Result<Acknowledged, Refusal> {
        let lease = self.lease(now);
        let mut ix = self.lock();
        authorised(&mut ix, req.peer_id, &req.token, identity)?.expires = lease;
        Ok(Acknowledged {
            announce_interval_ms: Some(self.announce_interval.as_millis() as u64),
        })
    }

    /// 9 origin: publishes the hashes of chunks the peer fetched from the origin, renews its
    /// claims and grants it more; indexes the file as an ordinary version once every chunk
    /// hash is known. The peer's lease is renewed too.
    pub fn origin(
        &self,
        req: &OriginClaim,
        identity: Option<&str>,
        now: Instant,
    ) -> Result<OriginGrant, Refusal> {
        validate_name(&req.file)?;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&req.chunk_size) {
            let why = format!(
                "chunk_size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                req.chunk_size
            );
            return Err(Refusal::new(ErrorCode::BadRequest, why));
        }
        let lease = self.lease(now);
        let mut ix = self.lock();
        authorised(&mut ix, req.peer_id, &req.token, identity)?.expires = lease;
        let limits = ClaimLimits {
            max_files: self.limits.max_files,
            max_chunks: self.limits.max_chunks_per_file,
        };
        let claim_lease = lease - now;
        let claimed = ix.origins.claim(req, &limits, claim_lease, now)?;
        if let Some(done) = claimed.completed {
            self.index_completed(&mut ix, done);
        }
        let sources = claimed
            .sources
            .into_iter()
            .filter_map(|(index, hash, holder)| {
                let addr = ix.peers.get(&holder)?.addr.to_string();
                Some(ChunkSource { index, hash, addr })
            })
            .collect();
        Ok(OriginGrant {
            chunk_size: claimed.chunk_size,
            chunks: claimed.chunks,
            known: claimed.known,
            granted: claimed.granted,
            sources,
            refused: claimed.refused,
            claim_ms: claim_lease.as_millis() as u64,
            digest: claimed.digest,
        })
    }

    /// Indexes an origin file whose every hash is now known, with the stamp its first claim
    /// gave and the peers that published its chunks as their holders.
    fn index_completed(&self, ix: &mut Index, done: Completed) {
        let published = done.published;
        let id = match ix.file(&done.info.name, Some(done.info.digest)) {
            Some((id, _)) => {
                restamp(ix, id, published);
                id
            }
            None => ix.add_file(FileEntry {
                holders: Holders::new(done.info.chunks() as usize),
                info: done.info,
                published,
                hashes: Arc::new(done.hashes),
            }),
        };
        for (peer_id, have) in done.holders {
            if !ix.peers.contains_key(&peer_id) || self.check_room(ix, peer_id, Some(id)).is_err() {
                continue;
            }
            hold(ix, peer_id, id).union_with(&have);
        }
        if ix.files[&id].holders.is_empty() {
            // Its holders all left meanwhile: nothing to offer.
            ix.remove_file(id);
        }
    }

    /// Forgets every peer whose lease ran out before `now`; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut ix = self.lock();
        let lease = self.lease(now) - now;
        ix.origins.expire(lease, now);
        let expired: Vec<u64> = ix
            .peers
            .iter()
            .filter(|(_, p)| p.expires < now)
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            remove_peer(&mut ix, *id);
        }
        expired.len()
    }
}

/// The chunks `peer_id` holds of file `id`, to add to; a file new to the peer joins its list
/// (the caller checked the limit with [`TrackerState::check_room`]).
fn hold(ix: &mut Index, peer_id: u64, id: u32) -> Bitfield<&mut [u8]> {
    let holders = &mut ix.files.get_mut(&id).expect("an indexed file").holders;
    if !holders.contains(peer_id) {
        let peer = ix.peers.get_mut(&peer_id).expect("caller checked the peer");
        peer.files.push(id);
    }
    holders.row_mut(peer_id)
}

/// Raises version `id`'s stamp to `published` if that is higher, keeping its name's order.
fn restamp(ix: &mut Index, id: u32, published: u64) {
    let file = ix.files.get_mut(&id).expect("an indexed file");
    if published > file.published {
        file.published = published;
        let name = file.info.name.clone();
        ix.sort_versions(&name);
    }
}

/// One line of the file list.
fn summary(f: &FileEntry, latest: bool) -> FileSummary {
    FileSummary {
        info: f.info.clone(),
        chunks: f.info.chunks(),
        peers: f.holders.len() as u64,
        seeders: f.holders.iter().filter(|(_, h)| h.is_full()).count() as u64,
        published: f.published,
        latest,
    }
}

fn unknown_file(name: &str, digest: Option<Hash>) -> Refusal {
    let why = match digest {
        None => format!("no peer shares {name:?}"),
        Some(d) => format!(
            "no peer shares version {} of {name:?} (message 2 with \"versions\":true lists the versions)",
            d.to_hex()
        ),
    };
    Refusal::new(ErrorCode::UnknownFile, why)
}

/// The entry of `peer_id`, if `token` is its token and `identity` the one it registered with.
fn authorised<'a>(
    ix: &'a mut Index,
    peer_id: u64,
    token: &str,
    identity: Option<&str>,
) -> Result<&'a mut PeerEntry, Refusal> {
    let unknown = || {
        Refusal::new(ErrorCode::UnknownPeer, format!("peer {peer_id} is not registered (left, expired, or the tracker restarted): register again"))
    };
    if from_another_run(token, &ix.run_tag) {
        return Err(unknown());
    }
    let peer = ix.peers.get_mut(&peer_id).ok_or_else(unknown)?;
    if !secret_matches(Some(&peer.token), Some(token)) {
        return Err(Refusal::new(
            ErrorCode::Forbidden,
            format!("token does not belong to peer {peer_id}"),
        ));
    }
    if peer.identity.as_deref() != identity {
        let shown =
            |i: Option<&str>| i.map_or("no certificate".into(), |i| format!("certificate {i:?}"));
        let why = format!(
            "peer {peer_id} registered with {}, this connection shows {}: a peer's certificate cannot act for another peer",
            shown(peer.identity.as_deref()),
            shown(identity)
        );
        return Err(Refusal::new(ErrorCode::Forbidden, why));
    }
    Ok(peer)
}

fn remove_peer(ix: &mut Index, peer_id: u64) {
    ix.origins.forget_peer(peer_id);
    let Some(peer) = ix.peers.remove(&peer_id) else {
        return;
    };
    for id in peer.files {
        release(ix, peer_id, id);
    }
}

/// Drops `peer_id` from the holders of file `id`; the file leaves with its last holder.
fn release(ix: &mut Index, peer_id: u64, id: u32) {
    if let Some(file) = ix.files.get_mut(&id) {
        file.holders.remove(peer_id);
        if file.holders.is_empty() {
            ix.remove_file(id);
        }
    }
}

fn check_peer_name(name: &str) -> Result<(), Refusal> {
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            "peer name must be 1-255 bytes without control characters",
        ));
    }
    Ok(())
}

/// The address to give out for a peer: its own claim, with an unspecified ip replaced by the
/// address it connected from. A claim of another ip is refused unless `foreign` allows it.
fn advertised_addr(claimed: &str, source: IpAddr, foreign: bool) -> Result<SocketAddr, Refusal> {
    let mut addr: SocketAddr = claimed.parse().map_err(|_| {
        Refusal::new(
            ErrorCode::BadRequest,
            format!("addr {claimed:?} is not ip:port"),
        )
    })?;
    if addr.port() == 0 {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            "addr port must not be 0",
        ));
    }
    if addr.ip().is_unspecified() {
        addr.set_ip(source);
    }
    // A tracker listening on `[::]` sees IPv4 peers as `::ffff:a.b.c.d`.
    if !foreign && addr.ip().to_canonical() != source.to_canonical() {
        let why = format!(
            "addr {addr} is not this peer's: it connects from {}; advertise this host's address \
             (or 0.0.0.0:PORT to let the tracker fill it in), or, behind NAT or a proxy, have the \
             tracker allow foreign addresses (SHOAL_ALLOW_FOREIGN_ADDR=true)",
            source.to_canonical()
        );
        return Err(Refusal::new(ErrorCode::Unauthorized, why));
    }
    Ok(addr)
}

/// Whether `token` looks like one a tracker issues (32 hex digits) but not of this run: the
/// peer holds a session this tracker cannot know of, not someone else's token.
fn from_another_run(token: &str, run_tag: &str) -> bool {
    token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit()) && !token.starts_with(run_tag)
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}

/// Where this run's peer ids start: the start time in seconds times 2^20, plus a random offset
/// below 2^19. A restarted tracker (it has no disk) thus never hands out an id an earlier run
/// gave, unless that run issued over half a million ids per second it was up; a peer still
/// holding such an id is answered `unknown_peer` and registers again. Ids stay below 2^53, so
/// clients that read JSON numbers as doubles keep them exact.
fn first_peer_id() -> u64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    id_base(secs, rand::thread_rng().gen_range(1..1 << 19))
}

fn id_base(secs: u64, offset: u64) -> u64 {
    ((secs & ((1 << 32) - 1)) << 20) + offset
}

/// Picks at most `want` holders. First, in random order, holders that add a chunk the sample
/// does not cover yet (so the rarest chunks are always reachable); then random others.
/// Random order spreads load: two askers rarely get the same sample of a popular file.
/// `have` gives a candidate's chunks: the index passes a peer id and a row number, so that
/// gathering and shuffling thousands of candidates stays cheap and only the rows looked at are
/// read.
pub fn sample_holders<'a, T: Copy, R: Rng>(
    candidates: &mut [T],
    want: usize,
    chunks: usize,
    have: impl Fn(T) -> Bitfield<&'a [u8]>,
    rng: &mut R,
) -> Vec<T> {
    candidates.shuffle(rng);
    if candidates.len() <= want {
        return candidates.to_vec();
    }
    let mut covered = Bitfield::new(chunks);
    let mut all_covered = chunks == 0;
    let mut chosen = Vec::with_capacity(want);
    let mut skipped = Vec::new();
    let mut unseen = candidates.iter();
    // Stop as soon as the sample is full or covers every chunk: a popular file has thousands
    // of holders and this runs under the index lock.
    while chosen.len() < want && !all_covered {
        let Some(&candidate) = unseen.next() else {
            break;
        };
        let bits = have(candidate);
        if bits.has_any_not_in(&covered) {
            covered.union_with(&bits);
            all_covered = covered.is_full();
            chosen.push(candidate);
        } else {
            skipped.push(candidate);
        }
    }
    let missing = want - chosen.len();
    chosen.extend(skipped.into_iter().chain(unseen.copied()).take(missing));
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes of an index holding one version of each name.
    fn sized(peers: usize, files: usize) -> Sizes {
        Sizes {
            peers,
            files,
            names: files,
            ..Sizes::default()
        }
    }

    fn state() -> TrackerState {
        let limits = IndexLimits {
            max_peers: 10,
            max_files: 10,
            max_files_per_peer: 3,
            max_chunks_per_file: 100,
            max_holders: 5,
        };
        TrackerState::new(limits, Duration::from_secs(1), None)
    }

    fn offer(name: &str, content: u8, chunks: usize) -> FileOffer {
        let hashes = HashList(
            (0..chunks)
                .map(|i| Hash([content.wrapping_add(i as u8); 32]))
                .collect(),
        );
        let info = FileInfo {
            name: name.into(),
            size: chunks as u64 * 4096,
            chunk_size: 4096,
            digest: hashes.digest(),
        };
        FileOffer {
            info,
            published: 0,
            hashes,
            have: None,
        }
    }

    fn register(s: &TrackerState, name: &str, port: u16, files: Vec<FileOffer>) -> Registered {
        let req = Register {
            name: name.into(),
            addr: format!("0.0.0.0:{port}"),
            secret: None,
            peer_id: None,
            token: None,
            files,
        };
        s.register(req, "10.1.2.3".parse().unwrap(), None, Instant::now())
            .unwrap()
    }

    /// The borrowed form the index's slab hands out.
    fn view(b: &Bitfield) -> Bitfield<&[u8]> {
        Bitfield::over(b.as_bytes(), b.len()).unwrap()
    }

    fn locate(s: &TrackerState, file: &str) -> LocationsReply {
        s.locations(&Locations {
            file: file.into(),
            digest: None,
            hashes: true,
            peer_id: None,
            want: None,
            secret: None,
        })
        .unwrap()
    }

    #[test]
    fn register_then_locate_gives_source_ip_and_chunks() {
        let s = state();
        let r = register(&s, "seed", 7401, vec![offer("a", 1, 4)]);
        assert!(r.files[0].accepted);
        assert_eq!(r.addr, "10.1.2.3:7401");
        let loc = locate(&s, "a");
        assert_eq!(loc.peers.len(), 1);
        assert_eq!(loc.peers[0].addr, "10.1.2.3:7401");
        assert_eq!(loc.peers[0].have, WireBits(vec![0xf0]));
        assert_eq!(loc.hashes.unwrap().0.len(), 4);
    }

    /// `file` with the publisher's stamp `published`.
    fn stamped(published: u64, file: FileOffer) -> FileOffer {
        FileOffer { published, ..file }
    }

    /// Two versions of "a": contents `old` stamped 1000 and `new` stamped 2000.
    fn two_versions(old: u8, new: u8) -> (FileOffer, FileOffer) {
        (
            stamped(1_000, offer("a", old, 4)),
            stamped(2_000, offer("a", new, 4)),
        )
    }

    fn locate_version(
        s: &TrackerState,
        file: &str,
        digest: Hash,
    ) -> Result<LocationsReply, Refusal> {
        s.locations(&Locations {
            file: file.into(),
            digest: Some(digest),
            hashes: false,
            peer_id: None,
            want: None,
            secret: None,
        })
    }

    /// (digest, published, latest) of each entry of the file list.
    fn listed(s: &TrackerState, versions: bool) -> Vec<(String, Hash, u64, bool)> {
        let req = FileList {
            secret: None,
            versions,
        };
        let reply = s.file_list(&req).unwrap();
        reply
            .files
            .into_iter()
            .map(|f| (f.info.name, f.info.digest, f.published, f.latest))
            .collect()
    }

    #[test]
    fn same_name_different_content_is_a_new_version_and_the_later_stamp_is_newest() {
        let s = state();
        let (old, new) = two_versions(1, 9);
        register(&s, "one", 1, vec![new.clone()]);
        let r = register(&s, "two", 2, vec![old.clone(), offer("b", 1, 2)]);
        assert!(r.files.iter().all(|f| f.accepted), "{:?}", r.files);
        let newest = locate(&s, "a");
        assert_eq!(
            (newest.file.digest, newest.published),
            (new.info.digest, 2_000)
        );
        assert_eq!(newest.peers[0].name, "one");
        let older = locate_version(&s, "a", old.info.digest).unwrap();
        assert_eq!(
            (older.published, older.peers[0].name.as_str()),
            (1_000, "two")
        );
        assert_eq!(s.sizes().files, 3, "each version counts as a file");
    }

    #[test]
    fn equal_stamps_are_ordered_by_the_higher_digest() {
        let s = state();
        let (x, y) = (stamped(5, offer("a", 1, 4)), stamped(5, offer("a", 2, 4)));
        let higher = x.info.digest.max(y.info.digest);
        register(&s, "x", 1, vec![x]);
        register(&s, "y", 2, vec![y]);
        assert_eq!(locate(&s, "a").file.digest, higher);
    }

    #[test]
    fn the_file_list_shows_the_newest_version_or_every_version_newest_first() {
        let s = state();
        let versions =
            [(3_000, 3), (1_000, 1), (2_000, 2)].map(|(t, c)| stamped(t, offer("a", c, 4)));
        let digest = |i: usize| versions[i].info.digest;
        register(&s, "p", 1, versions.to_vec());
        register(&s, "q", 2, vec![offer("b", 7, 1)]);
        let b = offer("b", 7, 1).info.digest;
        assert_eq!(
            listed(&s, false),
            [
                ("a".into(), digest(0), 3_000, true),
                ("b".into(), b, 0, true)
            ]
        );
        assert_eq!(
            listed(&s, true),
            [
                ("a".into(), digest(0), 3_000, true),
                ("a".into(), digest(2), 2_000, false),
                ("a".into(), digest(1), 1_000, false),
                ("b".into(), b, 0, true),
            ]
        );
    }

    #[test]
    fn a_restarted_tracker_rebuilds_the_same_newest_from_re_registrations() {
        let offers = [
            stamped(2_000, offer("a", 1, 4)),
            stamped(9_000, offer("a", 2, 4)),
            stamped(9_000, offer("a", 3, 4)),
            stamped(4_000, offer("a", 4, 4)),
        ];
        let newest = |order: &[usize]| {
            let s = state();
            for (port, &i) in order.iter().enumerate() {
                register(&s, "p", port as u16 + 1, vec![offers[i].clone()]);
            }
            locate(&s, "a").file.digest
        };
        let before = newest(&[0, 1, 2, 3]);
        for order in [[3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]] {
            assert_eq!(newest(&order), before, "registered in order {order:?}");
        }
    }

    #[test]
    fn a_version_offered_again_with_a_later_stamp_becomes_newest() {
        let s = state();
        let (old, new) = two_versions(1, 2);
        register(&s, "p", 1, vec![old.clone(), new]);
        register(&s, "q", 2, vec![stamped(3_000, old.clone())]);
        let newest = locate(&s, "a");
        assert_eq!(
            (newest.file.digest, newest.published),
            (old.info.digest, 3_000)
        );
        register(&s, "r", 3, vec![stamped(500, old.clone())]);
        assert_eq!(locate(&s, "a").published, 3_000, "a stamp never goes down");
    }

    #[test]
    fn withdraw_removes_the_holder_and_a_version_nobody_holds_leaves() {
        let s = state();
        let (old, new) = two_versions(1, 2);
        let p = register(&s, "p", 1, vec![old.clone(), new.clone()]);
        register(&s, "q", 2, vec![new.clone()]);
        let withdraw = |file: &FileOffer, token: &str| {
            s.withdraw(
                &Withdraw {
                    peer_id: p.peer_id,
                    token: token.into(),
                    file: file.info.name.clone(),
                    digest: file.info.digest,
                },
                None,
                Instant::now(),
            )
        };
        assert_eq!(
            withdraw(&new, "wrong").unwrap_err().code,
            ErrorCode::Forbidden
        );
        withdraw(&new, &p.token).unwrap();
        assert_eq!(locate(&s, "a").peers.len(), 1, "q still holds the newest");
        assert_eq!(locate(&s, "a").peers[0].name, "q");
        withdraw(&old, &p.token).unwrap();
        let gone = locate_version(&s, "a", old.info.digest).unwrap_err();
        assert_eq!(gone.code, ErrorCode::UnknownFile);
        assert!(
            gone.message.contains(&old.info.digest.to_hex()),
            "{}",
            gone.message
        );
        assert_eq!(listed(&s, true).len(), 1);
        withdraw(&old, &p.token).expect("a repeated withdraw is harmless");
        assert_eq!(s.sizes(), sized(2, 1));
    }

    #[test]
    fn chunks_register_against_the_version_named_by_digest() {
        let s = state();
        let (old, new) = two_versions(1, 2);
        register(&s, "seed", 1, vec![old.clone(), new.clone()]);
        let leecher = register(&s, "leech", 2, vec![]);
        let mut req = ChunkRegister {
            peer_id: leecher.peer_id,
            token: leecher.token,
            file: "a".into(),
            digest: Some(old.info.digest),
            chunks: vec![0],
        };
        assert_eq!(
            s.chunk_register(&req, None, Instant::now())
                .unwrap()
                .recorded,
            1
        );
        assert_eq!(
            locate_version(&s, "a", old.info.digest)
                .unwrap()
                .total_peers,
            2
        );
        assert_eq!(locate(&s, "a").total_peers, 1);
        req.digest = Some(Hash([0xee; 32]));
        let unknown = s.chunk_register(&req, None, Instant::now()).unwrap_err();
        assert_eq!(unknown.code, ErrorCode::UnknownFile);
        req.digest = None;
        s.chunk_register(&req, None, Instant::now()).unwrap();
        assert_eq!(locate(&s, "a").total_peers, 2, "no digest means the newest");
    }

    #[test]
    fn hostile_names_are_refused_everywhere() {
        let s = state();
        let r = register(&s, "p", 1, vec![]);
        for name in ["../x", "/etc/passwd", "a//b", "a/.b", "a\\b", "a/../../b"] {
            let reg = register(&s, "q", 2, vec![offer(name, 1, 1)]);
            assert_eq!(reg.files[0].error, Some(ErrorCode::InvalidName), "{name:?}");
            let mut req = Locations {
                file: name.into(),
                digest: None,
                hashes: false,
                peer_id: None,
                want: None,
                secret: None,
            };
            assert_eq!(s.locations(&req).unwrap_err().code, ErrorCode::InvalidName);
            req.digest = Some(Hash([1; 32]));
            assert_eq!(s.locations(&req).unwrap_err().code, ErrorCode::InvalidName);
            let withdraw = Withdraw {
                peer_id: r.peer_id,
                token: r.token.clone(),
                file: name.into(),
                digest: Hash([1; 32]),
            };
            let refused = s.withdraw(&withdraw, None, Instant::now()).unwrap_err();
            assert_eq!(refused.code, ErrorCode::InvalidName, "{name:?}");
        }
        let nested = register(&s, "q", 3, vec![offer("models/llama/shard-1.bin", 1, 1)]);
        assert!(nested.files[0].accepted, "{:?}", nested.files[0]);
        assert_eq!(s.sizes().files, 1);
    }

    #[test]
    fn one_digest_offered_with_another_size_is_refused() {
        let s = state();
        let honest = offer("a", 1, 4);
        register(&s, "p", 1, vec![honest.clone()]);
        let mut liar = honest;
        liar.info.size -= 1;
        let r = register(&s, "q", 2, vec![liar]);
        assert_eq!(r.files[0].error, Some(ErrorCode::BadRequest));
        assert_eq!(locate(&s, "a").total_peers, 1);
    }

    #[test]
    fn offers_that_lie_about_their_hashes_are_refused() {
        let s = state();
        let mut bad = offer("a", 1, 4);
        bad.info.digest = Hash([0; 32]);
        let mut short = offer("b", 1, 4);
        short.hashes.0.pop();
        let mut big = offer("c", 1, 4);
        big.have = Some(WireBits(vec![0xff, 0xff]));
        let r = register(&s, "p", 1, vec![bad, short, big, offer("../x", 1, 1)]);
        let codes: Vec<_> = r.files.iter().map(|f| f.error).collect();
        let expected = [
            Some(ErrorCode::BadRequest),
            Some(ErrorCode::BadRequest),
            Some(ErrorCode::OutOfRange),
            Some(ErrorCode::InvalidName),
        ];
        assert_eq!(codes, expected);
        assert_eq!(s.sizes(), sized(1, 0));
    }

    #[test]
    fn a_token_from_an_earlier_run_is_unknown_not_forbidden_even_where_its_id_exists() {
        let (before, after) = (state(), state());
        let old = register(&before, "p", 1, vec![]);
        let new = register(&after, "q", 2, vec![]);
        let stale = PeerAuth {
            peer_id: new.peer_id,
            token: old.token,
        };
        let refusal = after.announce(&stale, None, Instant::now()).unwrap_err();
        assert_eq!(refusal.code, ErrorCode::UnknownPeer);
    }

    #[test]
    fn peer_ids_of_a_later_run_start_past_every_id_of_an_earlier_one() {
        let earlier = id_base(1_800_000_000, (1 << 19) - 1);
        let later = id_base(1_800_000_001, 1);
        assert!(
            earlier + (1 << 19) < later,
            "half a million ids per second fit"
        );
        assert!(
            id_base(u64::MAX, 1 << 19) + (1 << 20) < 1 << 53,
            "exact as doubles"
        );
    }

    #[test]
    fn chunk_register_needs_the_right_token_and_range() {
        let s = state();
        let seed = register(&s, "seed", 1, vec![offer("a", 1, 4)]);
        let leecher = register(&s, "leech", 2, vec![]);
        let mut req = ChunkRegister {
            peer_id: leecher.peer_id,
            token: seed.token,
            file: "a".into(),
            digest: None,
            chunks: vec![1],
        };
        assert_eq!(
            s.chunk_register(&req, None, Instant::now())
                .unwrap_err()
                .code,
            ErrorCode::Forbidden
        );
        req.token = leecher.token.clone();
        req.chunks = vec![1, 4];
        assert_eq!(
            s.chunk_register(&req, None, Instant::now())
                .unwrap_err()
                .code,
            ErrorCode::OutOfRange
        );
        req.chunks = vec![1, 1, 3];
        assert_eq!(
            s.chunk_register(&req, None, Instant::now())
                .unwrap()
                .recorded,
            2
        );
        req.file = "nope".into();
        assert_eq!(
            s.chunk_register(&req, None, Instant::now())
                .unwrap_err()
                .code,
            ErrorCode::UnknownFile
        );
        req.peer_id = 999;
        assert_eq!(
            s.chunk_register(&req, None, Instant::now())
                .unwrap_err()
                .code,
            ErrorCode::UnknownPeer
        );
        assert_eq!(locate(&s, "a").total_peers, 2);
    }

    #[test]
    fn leave_removes_peer_and_orphaned_files() {
        let s = state();
        let r = register(&s, "seed", 1, vec![offer("a", 1, 4)]);
        let other = register(&s, "other", 2, vec![]);
        let auth = PeerAuth {
            peer_id: r.peer_id,
            token: other.token,
        };
        assert_eq!(s.leave(&auth, None).unwrap_err().code, ErrorCode::Forbidden);
        s.leave(
            &PeerAuth {
                peer_id: r.peer_id,
                token: r.token,
            },
            None,
        )
        .unwrap();
        assert_eq!(s.sizes(), sized(1, 0));
    }

    #[test]
    fn a_registration_is_bound_to_the_certificate_it_came_with() {
        let s = state();
        let req = Register {
            name: "p0".into(),
            addr: "0.0.0.0:1".into(),
            secret: None,
            peer_id: None,
            token: None,
            files: vec![offer("a", 1, 4)],
        };
        let ip = "10.1.2.3".parse().unwrap();
        let r = s
            .register(req, ip, Some("p0,shoal-peer"), Instant::now())
            .unwrap();
        let auth = PeerAuth {
            peer_id: r.peer_id,
            token: r.token.clone(),
        };
        let now = Instant::now();
        for other in [Some("p1,shoal-peer"), None] {
            let refused = s.announce(&auth, other, now).unwrap_err();
            assert_eq!(refused.code, ErrorCode::Forbidden);
            assert!(
                refused.message.contains("certificate"),
                "{}",
                refused.message
            );
            assert_eq!(
                s.leave(&auth, other).unwrap_err().code,
                ErrorCode::Forbidden
            );
        }
        s.announce(&auth, Some("p0,shoal-peer"), now).unwrap();
        s.leave(&auth, Some("p0,shoal-peer")).unwrap();
        assert_eq!(s.sizes(), sized(0, 0));
    }

    #[test]
    fn silent_peers_expire_and_announcing_ones_stay() {
        let s = state();
        let quiet = register(&s, "quiet", 1, vec![offer("a", 1, 4)]);
        let live = register(&s, "live", 2, vec![offer("b", 1, 4)]);
        let later = Instant::now() + Duration::from_secs(2);
        s.announce(
            &PeerAuth {
                peer_id: live.peer_id,
                token: live.token.clone(),
            },
            None,
            later,
        )
        .unwrap();
        assert_eq!(s.expire(later + Duration::from_millis(1500)), 1);
        assert_eq!(s.sizes(), sized(1, 1));
        let gone = PeerAuth {
            peer_id: quiet.peer_id,
            token: quiet.token,
        };
        assert_eq!(
            s.announce(&gone, None, later).unwrap_err().code,
            ErrorCode::UnknownPeer
        );
    }

    #[test]
    fn limits_refuse_with_limit_reached() {
        let s = state();
        let r = register(
            &s,
            "p",
            1,
            vec![
                offer("a", 1, 1),
                offer("b", 1, 1),
                offer("c", 1, 1),
                offer("d", 1, 1),
            ],
        );
        assert_eq!(r.files[3].error, Some(ErrorCode::LimitReached));
        let r = register(&s, "q", 2, vec![offer("e", 1, 101)]);
        assert_eq!(r.files[0].error, Some(ErrorCode::LimitReached));
        for port in 3..11 {
            register(&s, "x", port, vec![]);
        }
        let req = Register {
            name: "y".into(),
            addr: "1.2.3.4:5".into(),
            secret: None,
            peer_id: None,
            token: None,
            files: vec![],
        };
        assert_eq!(
            s.register(req, "1.2.3.4".parse().unwrap(), None, Instant::now())
                .unwrap_err()
                .code,
            ErrorCode::LimitReached
        );
    }

    #[test]
    fn secret_is_required_when_set() {
        let s = TrackerState::new(state().limits, Duration::from_secs(1), Some("k".into()));
        let mut req = Register {
            name: "p".into(),
            addr: "1.2.3.4:5".into(),
            secret: None,
            peer_id: None,
            token: None,
            files: vec![],
        };
        let ip = "1.2.3.4".parse().unwrap();
        assert_eq!(
            s.register(req.clone(), ip, None, Instant::now())
                .unwrap_err()
                .code,
            ErrorCode::Unauthorized
        );
        req.secret = Some("k".into());
        assert!(s.register(req, ip, None, Instant::now()).is_ok());
    }

    fn leave(s: &TrackerState, r: Registered) {
        s.leave(
            &PeerAuth {
                peer_id: r.peer_id,
                token: r.token,
            },
            None,
        )
        .unwrap();
    }

    /// `file` offered with only the chunks whose bits are set in `have`.
    fn holding(have: u8, file: FileOffer) -> FileOffer {
        FileOffer {
            have: Some(WireBits(vec![have])),
            ..file
        }
    }

    #[test]
    fn a_holder_that_left_passes_no_chunks_to_the_next() {
        let s = state();
        let gone = register(&s, "gone", 1, vec![holding(0xc0, offer("a", 1, 4))]);
        register(&s, "stays", 2, vec![holding(0x10, offer("a", 1, 4))]);
        leave(&s, gone);
        register(&s, "next", 3, vec![holding(0x20, offer("a", 1, 4))]);
        let mut held: Vec<_> = locate(&s, "a")
            .peers
            .into_iter()
            .map(|h| (h.name, h.have))
            .collect();
        held.sort_by(|a, b| a.0.cmp(&b.0));
        let expected = [("next", vec![0x20]), ("stays", vec![0x10])]
            .map(|(name, have)| (name.to_string(), WireBits(have)));
        assert_eq!(held, expected);
    }

    #[test]
    fn a_file_gone_with_its_last_holder_is_not_mistaken_for_the_next() {
        let s = state();
        let first = register(&s, "first", 1, vec![offer("a", 1, 4)]);
        leave(&s, first);
        let b = register(&s, "b", 2, vec![offer("b", 2, 2)]);
        assert_eq!(
            s.locations(&Locations {
                file: "a".into(),
                digest: None,
                hashes: false,
                peer_id: None,
                want: None,
                secret: None,
            })
            .unwrap_err()
            .code,
            ErrorCode::UnknownFile
        );
        let again = register(&s, "a", 3, vec![offer("a", 3, 8)]);
        assert!(again.files[0].accepted, "{:?}", again.files[0]);
        assert_eq!((locate(&s, "a").chunks, locate(&s, "b").chunks), (8, 2));
        leave(&s, b);
        assert_eq!(s.sizes(), sized(1, 1));
        assert_eq!(locate(&s, "a").peers[0].name, "a");
    }

    #[test]
    fn files_already_held_do_not_count_again_against_the_per_peer_limit() {
        let s = state();
        let files = ["a", "b", "c"].map(|n| holding(0x80, offer(n, 1, 4)));
        let r = register(&s, "p", 1, files.to_vec());
        let req = ChunkRegister {
            peer_id: r.peer_id,
            token: r.token.clone(),
            file: "a".into(),
            digest: None,
            chunks: vec![1],
        };
        assert_eq!(
            s.chunk_register(&req, None, Instant::now())
                .unwrap()
                .recorded,
            1
        );
        let again = Register {
            name: "p".into(),
            addr: "0.0.0.0:77".into(),
            secret: None,
            peer_id: Some(r.peer_id),
            token: Some(r.token),
            files: vec![offer("b", 1, 4), offer("d", 1, 4)],
        };
        let reply = s
            .register(again, "10.1.2.3".parse().unwrap(), None, Instant::now())
            .unwrap();
        let codes: Vec<_> = reply.files.iter().map(|f| f.error).collect();
        assert_eq!(codes, [None, Some(ErrorCode::LimitReached)]);
        assert_eq!(locate(&s, "b").peers[0].have, WireBits(vec![0xf0]));
    }

    #[test]
    fn holders_of_no_chunk_are_not_indexed() {
        let s = state();
        let mut empty = offer("a", 1, 4);
        empty.have = Some(WireBits(vec![0]));
        let r = register(&s, "p", 1, vec![empty]);
        assert!(r.files[0].accepted);
        assert_eq!(s.sizes().files, 0);
        register(&s, "seed", 2, vec![offer("a", 1, 4)]);
        let req = ChunkRegister {
            peer_id: r.peer_id,
            token: r.token,
            file: "a".into(),
            digest: None,
            chunks: vec![],
        };
        assert_eq!(
            s.chunk_register(&req, None, Instant::now())
                .unwrap()
                .recorded,
            0
        );
        assert_eq!(locate(&s, "a").total_peers, 1);
    }

    #[test]
    fn an_empty_file_is_indexed_listed_and_located_like_any_other() {
        let s = state();
        let r = register(&s, "seed", 1, vec![offer("empty", 1, 0)]);
        assert!(r.files[0].accepted, "{:?}", r.files[0]);
        let list = s.file_list(&FileList::default()).unwrap();
        let summary = &list.files[0];
        assert_eq!(
            (
                summary.info.size,
                summary.chunks,
                summary.peers,
                summary.seeders
            ),
            (0, 0, 1, 1)
        );
        let loc = locate(&s, "empty");
        assert_eq!((loc.chunks, loc.total_peers), (0, 1));
        assert_eq!(loc.hashes, Some(HashList::default()));
        assert_eq!(loc.peers[0].have, WireBits(vec![]));
        let second = register(&s, "second", 2, vec![offer("empty", 1, 0)]);
        assert_eq!(locate(&s, "empty").total_peers, 2);
        leave(&s, r);
        leave(&s, second);
        assert_eq!(s.sizes(), sized(0, 0));
    }

    #[test]
    fn registering_again_under_an_identity_updates_its_address() {
        let s = state();
        let r = register(&s, "p", 1, vec![offer("a", 1, 4)]);
        let again = Register {
            name: "p2".into(),
            addr: "10.9.9.9:77".into(),
            secret: None,
            peer_id: Some(r.peer_id),
            token: Some(r.token.clone()),
            files: vec![],
        };
        let reply = s
            .register(again, "10.9.9.9".parse().unwrap(), None, Instant::now())
            .unwrap();
        assert_eq!(
            (reply.peer_id, reply.addr.as_str()),
            (r.peer_id, "10.9.9.9:77")
        );
        assert_eq!(locate(&s, "a").peers[0].name, "p2");
    }

    #[test]
    fn an_address_of_another_host_is_refused_unless_allowed() {
        let claim = |addr: &str| Register {
            name: "p".into(),
            addr: addr.into(),
            secret: None,
            peer_id: None,
            token: None,
            files: vec![offer("a", 1, 4)],
        };
        let from: IpAddr = "10.1.2.3".parse().unwrap();
        let s = state();
        let refused = s
            .register(claim("192.0.2.7:7401"), from, None, Instant::now())
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::Unauthorized);
        assert!(
            refused.message.contains("SHOAL_ALLOW_FOREIGN_ADDR"),
            "{refused}"
        );
        assert_eq!(s.sizes(), sized(0, 0));
        for own in ["10.1.2.3:7401", "0.0.0.0:7401"] {
            assert!(
                s.register(claim(own), from, None, Instant::now()).is_ok(),
                "{own}"
            );
        }
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(s
            .register(claim("10.1.2.3:7402"), mapped, None, Instant::now())
            .is_ok());
        let open = state().allowing_foreign_addr(true);
        let reply = open
            .register(claim("192.0.2.7:7401"), from, None, Instant::now())
            .unwrap();
        assert_eq!(reply.addr, "192.0.2.7:7401");
    }

    #[test]
    fn sample_is_bounded_and_covers_rare_chunks() {
        let mut common = Bitfield::new(8);
        common.set(0);
        let mut rare = Bitfield::new(8);
        rare.set(7);
        let (common, rare) = (view(&common), view(&rare));
        let mut rng = rand::thread_rng();
        for _ in 0..50 {
            let mut candidates: Vec<_> = (0..20).map(|i| (i, common)).collect();
            candidates.push((99, rare));
            let chosen = sample_holders(&mut candidates, 3, 8, |(_, b)| b, &mut rng);
            assert_eq!(chosen.len(), 3);
            assert!(
                chosen.iter().any(|(id, _)| *id == 99),
                "the only holder of chunk 7 was left out"
            );
        }
    }
}
