//! Files being pulled from an HTTP origin, before their digest is known (message 9). Such a
//! file is keyed by name, size and the origin's validator (ETag or Last-Modified). Peers claim
//! chunks to fetch from the origin (a few at a time, each claim leased), and publish each
//! chunk's hash once they hold it; the first hash published for a chunk by its claimant stands.
//! When every hash is known the file is complete: [`Completed`] is indexed as an ordinary
//! version by the caller, and later claims of the same key are answered with its digest.
//! A chunk whose only holders go away loses its hash and is granted again.
//!
//! Plain data guarded by the index's lock (see `state.rs`); no I/O, no awaits.

use crate::bitfield::Bitfield;
use crate::protocol::{
    chunk_count, ChunkHash, ErrorCode, FileInfo, Hash, HashList, OriginClaim, Refusal,
};
use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Most chunks granted by one reply: a peer fetches a few at a time, so that the chunks of a
/// file are spread over every peer that asks.
pub const MAX_GRANT: u32 = 8;
/// Longest origin validator accepted (an ETag or an HTTP date).
pub const MAX_VALIDATOR_BYTES: usize = 512;
/// How long a completed origin file still answers claims with its digest (peers that were
/// fetching when it completed learn it from their next claim).
pub const DONE_KEPT: Duration = Duration::from_secs(300);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct OriginKey {
    name: String,
    size: u64,
    validator: String,
}

struct Claim {
    peer: u64,
    until: Instant,
}

struct PendingFile {
    chunk_size: u32,
    published: u64,
    hashes: Vec<Option<Hash>>,
    claims: Vec<Option<Claim>>,
    /// Peer -> chunks it published (and so holds).
    holders: HashMap<u64, Bitfield>,
    /// Last claim of any peer; an abandoned file is dropped a lease after it.
    touched: Instant,
    /// Set once every hash is known.
    done: Option<Hash>,
}

impl PendingFile {
    fn known(&self) -> u64 {
        self.hashes.iter().filter(|h| h.is_some()).count() as u64
    }

    fn live_claim(&self, i: usize, now: Instant) -> Option<u64> {
        self.claims[i]
            .as_ref()
            .filter(|c| c.until > now)
            .map(|c| c.peer)
    }

    /// Records `peer`'s published hashes; returns the chunks refused (another hash stands, or
    /// another peer holds the live claim).
    fn publish(&mut self, peer: u64, hashes: &[ChunkHash], now: Instant) -> Vec<u32> {
        let n = self.hashes.len();
        let mut refused = Vec::new();
        for &ChunkHash { index, hash } in hashes {
            let i = index as usize;
            let accepted = match self.hashes[i] {
                Some(known) => known == hash,
                None => self.live_claim(i, now).is_none_or(|p| p == peer),
            };
            if !accepted {
                refused.push(index);
                continue;
            }
            self.hashes[i] = Some(hash);
            self.claims[i] = None;
            self.holders
                .entry(peer)
                .or_insert_with(|| Bitfield::new(n))
                .set(i);
        }
        refused
    }

    /// `peer` no longer takes part: its claims end at once, and a chunk nobody else holds
    /// loses its hash (it must be fetched from the origin again). A completed file keeps all.
    fn forget(&mut self, peer: u64) {
        if self.done.is_some() {
            return;
        }
        for claim in &mut self.claims {
            if claim.as_ref().is_some_and(|c| c.peer == peer) {
                *claim = None;
            }
        }
        let Some(gone) = self.holders.remove(&peer) else {
            return;
        };
        for i in gone.ones() {
            if !self.holders.values().any(|h| h.get(i)) {
                self.hashes[i] = None;
            }
        }
    }

    /// Up to `fetch` chunks `peer` lacks whose hash is known, each with a random other peer
    /// that holds it: the rarest first (random among equals), so that pulling peers pass new
    /// chunks on to each other while the origin transfer runs. In index order.
    fn sources<R: Rng>(&self, peer: u64, fetch: u32, rng: &mut R) -> Vec<(u32, Hash, u64)> {
        let mine = self.holders.get(&peer);
        let mut candidates: Vec<(usize, usize)> = (0..self.hashes.len())
            .filter(|&i| self.hashes[i].is_some() && !mine.is_some_and(|h| h.get(i)))
            .map(|i| (self.holders.values().filter(|h| h.get(i)).count(), i))
            .filter(|&(holders, _)| holders > 0)
            .collect();
        candidates.shuffle(rng);
        candidates.sort_by_key(|&(holders, _)| holders);
        candidates.truncate(fetch.min(MAX_GRANT) as usize);
        let mut chosen: Vec<(u32, Hash, u64)> = candidates
            .into_iter()
            .filter_map(|(_, i)| {
                let holders: Vec<u64> = self
                    .holders
                    .iter()
                    .filter(|(_, h)| h.get(i))
                    .map(|(&p, _)| p)
                    .collect();
                let holder = *holders.choose(rng)?;
                Some((i as u32, self.hashes[i]?, holder))
            })
            .collect();
        chosen.sort_by_key(|&(i, _, _)| i);
        chosen
    }

    /// Grants up to `want` chunks with no hash and no live claim to `peer`, lowest first.
    fn grant(&mut self, peer: u64, want: u32, until: Instant, now: Instant) -> Vec<u32> {
        let mut granted = Vec::new();
        for i in 0..self.hashes.len() {
            if granted.len() as u32 >= want.min(MAX_GRANT) {
                break;
            }
            if self.hashes[i].is_none() && self.live_claim(i, now).is_none() {
                self.claims[i] = Some(Claim { peer, until });
                granted.push(i as u32);
            }
        }
        granted
    }
}

/// What completed: the ordinary version to index and who holds which of its chunks.
pub struct Completed {
    pub info: FileInfo,
    pub published: u64,
    pub hashes: HashList,
    pub holders: Vec<(u64, Bitfield)>,
}

/// The answer to one claim, before the caller indexes a completed file.
pub struct Claimed {
    pub chunk_size: u32,
    pub chunks: u64,
    pub known: u64,
    pub granted: Vec<u32>,
    /// (chunk, hash, holder's peer id) to fetch from other peers.
    pub sources: Vec<(u32, Hash, u64)>,
    pub refused: Vec<u32>,
    pub digest: Option<Hash>,
    /// Set once, by the claim that published the last hash.
    pub completed: Option<Completed>,
}

/// Every origin file being pulled, and those completed recently.
#[derive(Default)]
pub struct Origins {
    files: HashMap<OriginKey, PendingFile>,
}

/// The bounds a claim is checked against.
pub struct ClaimLimits {
    pub max_files: usize,
    pub max_chunks: u64,
}

impl Origins {
    /// Handles one message 9 of `req.peer_id` (already authorised).
    pub fn claim(
        &mut self,
        req: &OriginClaim,
        limits: &ClaimLimits,
        lease: Duration,
        now: Instant,
    ) -> Result<Claimed, Refusal> {
        let key = OriginKey {
            name: req.file.clone(),
            size: req.size,
            validator: req.validator.clone(),
        };
        if !self.files.contains_key(&key) {
            if req.abandon {
                let why = format!("{:?} is not being pulled from an origin", req.file);
                return Err(Refusal::new(ErrorCode::UnknownFile, why));
            }
            let pending = self.new_file(req, limits, now)?;
            self.files.insert(key.clone(), pending);
        }
        let file = self.files.get_mut(&key).expect("inserted above");
        file.touched = now;
        let chunks = file.hashes.len() as u64;
        if let Some(bad) = req.hashes.iter().find(|h| u64::from(h.index) >= chunks) {
            let why = format!(
                "chunk {} is out of range: {:?} has {chunks} chunks",
                bad.index, req.file
            );
            return Err(Refusal::new(ErrorCode::OutOfRange, why));
        }
        if req.abandon {
            file.forget(req.peer_id);
        }
        if let Some(digest) = file.done {
            return Ok(Claimed {
                chunk_size: file.chunk_size,
                chunks,
                known: chunks,
                granted: Vec::new(),
                sources: Vec::new(),
                refused: Vec::new(),
                digest: Some(digest),
                completed: None,
            });
        }
        if req.abandon {
            return Ok(Claimed {
                chunk_size: file.chunk_size,
                chunks,
                known: file.known(),
                granted: Vec::new(),
                sources: Vec::new(),
                refused: Vec::new(),
                digest: None,
                completed: None,
            });
        }
        let refused = file.publish(req.peer_id, &req.hashes, now);
        let until = now + lease;
        for claim in file.claims.iter_mut().flatten() {
            if claim.peer == req.peer_id && claim.until > now {
                claim.until = until;
            }
        }
        let completed = (file.known() == chunks).then(|| complete(&key, file, req.peer_id));
        let (granted, sources) = match completed {
            Some(_) => (Vec::new(), Vec::new()),
            None => (
                file.grant(req.peer_id, req.want, until, now),
                file.sources(req.peer_id, req.fetch, &mut rand::thread_rng()),
            ),
        };
        Ok(Claimed {
            chunk_size: file.chunk_size,
            chunks,
            known: file.known(),
            granted,
            sources,
            refused,
            digest: file.done,
            completed,
        })
    }

    fn new_file(
        &self,
        req: &OriginClaim,
        limits: &ClaimLimits,
        now: Instant,
    ) -> Result<PendingFile, Refusal> {
        if req.validator.len() > MAX_VALIDATOR_BYTES {
            let why = format!("validator is longer than {MAX_VALIDATOR_BYTES} bytes");
            return Err(Refusal::new(ErrorCode::BadRequest, why));
        }
        if self.files.len() >= limits.max_files {
            let why = format!(
                "the tracker already follows its limit of {} origin files",
                limits.max_files
            );
            return Err(Refusal::new(ErrorCode::LimitReached, why));
        }
        let chunks = chunk_count(req.size, req.chunk_size);
        if chunks > limits.max_chunks {
            let why = format!(
                "{chunks} chunks exceed the limit of {} per file",
                limits.max_chunks
            );
            return Err(Refusal::new(ErrorCode::LimitReached, why));
        }
        Ok(PendingFile {
            chunk_size: req.chunk_size,
            published: req.published,
            hashes: vec![None; chunks as usize],
            claims: (0..chunks).map(|_| None).collect(),
            holders: HashMap::new(),
            touched: now,
            done: None,
        })
    }

    /// Version `digest` of `name` left the index (its last holder withdrew it or left): a
    /// completed pull that found it is forgotten, so that the next claim pulls the file afresh
    /// instead of naming a version nobody offers.
    pub fn forget_version(&mut self, name: &str, digest: Hash) {
        self.files
            .retain(|key, f| key.name != name || f.done != Some(digest));
    }

    /// A peer went away: see [`PendingFile::forget`].
    pub fn forget_peer(&mut self, peer: u64) {
        for file in self.files.values_mut() {
            file.forget(peer);
        }
    }

    /// Drops files nobody claimed for `lease` that have no holder, and completed files after
    /// [`DONE_KEPT`].
    pub fn expire(&mut self, lease: Duration, now: Instant) {
        self.files.retain(|_, f| {
            let idle = now.duration_since(f.touched);
            match f.done {
                Some(_) => idle < DONE_KEPT,
                None => idle < lease || !f.holders.is_empty(),
            }
        });
    }

    /// (files being pulled, live claims), for the gauges.
    pub fn counts(&self, now: Instant) -> (usize, usize) {
        let pulling = self.files.values().filter(|f| f.done.is_none());
        let mut files = 0;
        let mut claims = 0;
        for f in pulling {
            files += 1;
            claims += (0..f.claims.len())
                .filter(|&i| f.live_claim(i, now).is_some())
                .count();
        }
        (files, claims)
    }
}

/// Marks `file` done and returns the ordinary version it became. An empty file has no chunk
/// to publish: the peer that asked holds it.
fn complete(key: &OriginKey, file: &mut PendingFile, asker: u64) -> Completed {
    if file.hashes.is_empty() {
        file.holders.insert(asker, Bitfield::new(0));
    }
    let hashes = HashList(file.hashes.iter().map(|h| h.expect("all known")).collect());
    let digest = hashes.digest();
    file.done = Some(digest);
    file.claims.iter_mut().for_each(|c| *c = None);
    Completed {
        info: FileInfo {
            name: key.name.clone(),
            size: key.size,
            chunk_size: file.chunk_size,
            digest,
        },
        published: file.published,
        hashes,
        holders: file.holders.drain().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(3);
    const LIMITS: ClaimLimits = ClaimLimits {
        max_files: 10,
        max_chunks: 100,
    };

    fn claim(peer: u64, want: u32, hashes: Vec<ChunkHash>) -> OriginClaim {
        OriginClaim {
            peer_id: peer,
            token: "t".into(),
            file: "a".into(),
            size: 10 * 4096,
            validator: "\"v1\"".into(),
            chunk_size: 4096,
            published: 1,
            hashes,
            want,
            fetch: 0,
            abandon: false,
        }
    }

    fn h(index: u32) -> ChunkHash {
        ChunkHash {
            index,
            hash: Hash([index as u8; 32]),
        }
    }

    #[test]
    fn chunks_are_granted_once_and_again_after_the_claim_lapses() {
        let mut o = Origins::default();
        let t0 = Instant::now();
        let a = o.claim(&claim(1, 4, vec![]), &LIMITS, LEASE, t0).unwrap();
        assert_eq!(a.granted, vec![0, 1, 2, 3]);
        let b = o.claim(&claim(2, 20, vec![]), &LIMITS, LEASE, t0).unwrap();
        assert_eq!(b.granted, vec![4, 5, 6, 7, 8, 9]);
        let later = t0 + LEASE + Duration::from_millis(1);
        let c = o
            .claim(&claim(3, 4, vec![]), &LIMITS, LEASE, later)
            .unwrap();
        assert_eq!(
            c.granted,
            vec![0, 1, 2, 3],
            "lapsed claims are granted again"
        );
    }

    #[test]
    fn the_first_hash_stands_and_completion_gives_the_digest() {
        let mut o = Origins::default();
        let t0 = Instant::now();
        o.claim(&claim(1, 8, vec![]), &LIMITS, LEASE, t0).unwrap();
        o.claim(&claim(2, 8, vec![]), &LIMITS, LEASE, t0).unwrap();
        let forged = ChunkHash {
            index: 0,
            hash: Hash([9; 32]),
        };
        let r = o
            .claim(&claim(2, 0, vec![forged]), &LIMITS, LEASE, t0)
            .unwrap();
        assert_eq!(
            r.refused,
            vec![0],
            "peer 2 does not hold the claim of chunk 0"
        );
        let mine: Vec<ChunkHash> = (0..8).map(h).collect();
        let r = o.claim(&claim(1, 0, mine), &LIMITS, LEASE, t0).unwrap();
        assert_eq!((r.known, r.digest), (8, None));
        let r = o
            .claim(&claim(2, 0, vec![h(8), h(9)]), &LIMITS, LEASE, t0)
            .unwrap();
        let done = r.completed.expect("complete");
        let expected = HashList((0..10).map(|i| h(i).hash).collect()).digest();
        assert_eq!((r.digest, done.info.digest), (Some(expected), expected));
        assert_eq!(done.holders.len(), 2);
        let late = o.claim(&claim(3, 4, vec![]), &LIMITS, LEASE, t0).unwrap();
        assert_eq!((late.digest, late.granted.len()), (Some(expected), 0));
        o.forget_version("a", Hash([0; 32]));
        let other = o.claim(&claim(3, 4, vec![]), &LIMITS, LEASE, t0).unwrap();
        assert_eq!(other.digest, Some(expected), "another version left");
        o.forget_version("a", expected);
        let afresh = o.claim(&claim(3, 4, vec![]), &LIMITS, LEASE, t0).unwrap();
        assert_eq!((afresh.digest, afresh.granted.len()), (None, 4));
    }

    #[test]
    fn a_chunk_whose_only_holder_leaves_is_granted_again() {
        let mut o = Origins::default();
        let t0 = Instant::now();
        o.claim(&claim(1, 2, vec![]), &LIMITS, LEASE, t0).unwrap();
        o.claim(&claim(1, 0, vec![h(0), h(1)]), &LIMITS, LEASE, t0)
            .unwrap();
        o.forget_peer(1);
        let r = o.claim(&claim(2, 2, vec![]), &LIMITS, LEASE, t0).unwrap();
        assert_eq!((r.known, r.granted), (0, vec![0, 1]));
        assert_eq!(o.counts(t0), (1, 2));
    }

    #[test]
    fn chunks_published_by_others_are_offered_with_a_holder_rarest_first() {
        let mut o = Origins::default();
        let t0 = Instant::now();
        o.claim(&claim(1, 3, vec![]), &LIMITS, LEASE, t0).unwrap();
        o.claim(&claim(1, 0, vec![h(0), h(1), h(2)]), &LIMITS, LEASE, t0)
            .unwrap();
        o.claim(&claim(2, 0, vec![]), &LIMITS, LEASE, t0).unwrap();
        let ask = |peer, fetch| OriginClaim {
            fetch,
            ..claim(peer, 0, vec![])
        };
        // Peer 2 takes chunk 1 from peer 1 and publishes it.
        o.claim(&ask(2, 0), &LIMITS, LEASE, t0).unwrap();
        o.claim(&claim(2, 0, vec![h(1)]), &LIMITS, LEASE, t0)
            .unwrap();
        let r = o.claim(&ask(3, 2), &LIMITS, LEASE, t0).unwrap();
        let offered: Vec<u32> = r.sources.iter().map(|s| s.0).collect();
        assert_eq!(
            offered,
            vec![0, 2],
            "chunk 1 has two holders: it comes last"
        );
        assert!(r
            .sources
            .iter()
            .all(|&(i, hash, holder)| hash == h(i).hash && holder == 1));
        let r = o.claim(&ask(1, 8), &LIMITS, LEASE, t0).unwrap();
        assert!(
            r.sources.is_empty(),
            "nothing to offer a peer that holds it all"
        );
    }

    #[test]
    fn a_peer_that_abandons_a_file_gives_its_claims_and_chunks_back() {
        let mut o = Origins::default();
        let t0 = Instant::now();
        o.claim(&claim(1, 3, vec![]), &LIMITS, LEASE, t0).unwrap();
        o.claim(&claim(1, 0, vec![h(0)]), &LIMITS, LEASE, t0)
            .unwrap();
        let give_up = OriginClaim {
            abandon: true,
            ..claim(1, 5, vec![])
        };
        let r = o.claim(&give_up, &LIMITS, LEASE, t0).unwrap();
        assert_eq!(
            (r.known, r.granted.len()),
            (0, 0),
            "nothing granted to a peer giving up"
        );
        let r = o.claim(&claim(2, 3, vec![]), &LIMITS, LEASE, t0).unwrap();
        assert_eq!(r.granted, vec![0, 1, 2]);
    }
}
