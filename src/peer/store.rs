//! The peer's chunk store: the files it shares and the partial downloads it is filling.
//!
//! Names are relative paths (`models/a/shard-1.bin`); sub-directories of the data dir are shared
//! recursively, skipping hidden entries and symlinks. A download of `DIR/BASE` lives in three
//! hidden files beside its final name until it is complete: `DIR/.BASE.shoal-part` (the data,
//! preallocated, chunks written at their offsets), `DIR/.BASE.shoal-meta` (file info, version
//! stamp and chunk hashes, JSON, written durably: temporary file, fsync, rename, fsync of the
//! directory) and `DIR/.BASE.shoal-have` (the bitfield of chunks written, updated one byte at a
//! time: only a hint). Every chunk is verified against its hash before it is written, and
//! resume hashes again every chunk the bitmap claims. A complete file is fsynced, given its
//! version stamp as mtime and renamed over `DIR/BASE`; if its data file was replaced or changed
//! (size, mtime or ctime, see [`Stamp`]) after the last chunk went in, it is first hashed in
//! full again, so damage to the hidden files can cost a refetch but never a corrupt file,
//! without reading back a file nothing touched. The open descriptor keeps serving across the
//! rename. Directories a download needs are created inside the data dir only: every component
//! is checked to be a real directory, never a symlink out.
//!
//! A name may be held in several versions (one per digest); the newest by
//! [`version_key`] is the one offered under the bare name. Verified chunks go to disk with
//! `O_DIRECT` where the file system allows it (see [`ChunkBuf`]): straight from the receive
//! buffer, without a copy into the page cache.

use super::meter::Meter;
use crate::bitfield::Bitfield;
use crate::chunking::{check_chunk_size, hash_file};
use crate::protocol::{validate_name, version_key, FileInfo, Hash, HashList};
use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{ErrorKind, Write};
use std::ops::Deref;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PART: &str = "shoal-part";
const META: &str = "shoal-meta";
const HAVE: &str = "shoal-have";

/// Direct writes need the memory, the file offset and the length aligned to the device's
/// logical block size; 4096 covers the common ones.
pub const DIRECT_ALIGN: usize = 4096;

/// One chunk's bytes, starting at a [`DIRECT_ALIGN`] boundary so that a chunk whose offset and
/// length are aligned too can be written with `O_DIRECT`. A download reuses its buffers, so the
/// memory is zero-filled only when a buffer grows.
#[derive(Default)]
pub struct ChunkBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl ChunkBuf {
    /// Makes room for `len` bytes and returns them to be filled (the old contents remain).
    pub fn reset(&mut self, len: usize) -> &mut [u8] {
        if self.raw.len() < len + DIRECT_ALIGN {
            self.raw = vec![0; len + DIRECT_ALIGN];
        }
        let misalignment = self.raw.as_ptr() as usize % DIRECT_ALIGN;
        self.start = (DIRECT_ALIGN - misalignment) % DIRECT_ALIGN;
        self.len = len;
        &mut self.raw[self.start..self.start + len]
    }
}

impl Deref for ChunkBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

fn aligned(n: usize) -> bool {
    n % DIRECT_ALIGN == 0
}

/// What `lstat` says about a file on disk: enough to notice that it was replaced (device and
/// inode) or written to (size, mtime, and ctime, which no one can set back) since it was hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    pub fn of(m: &Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }

    /// The stamp of `path` itself (a symlink is not followed).
    pub fn read(path: &Path) -> std::io::Result<Stamp> {
        std::fs::symlink_metadata(path).map(|m| Stamp::of(&m))
    }

    /// The mtime in milliseconds since the Unix epoch: the version stamp of a shared file.
    pub fn published(&self) -> u64 {
        u64::try_from(self.mtime_ns / 1_000_000).unwrap_or(0)
    }

    /// How long ago the file was last written (zero for an mtime in the future).
    pub fn age(&self, now: SystemTime) -> Duration {
        let now_ns = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        Duration::from_nanos(u64::try_from(now_ns - self.mtime_ns).unwrap_or(0))
    }
}

/// A download this store will not write, whatever the swarm does: retrying cannot help.
#[derive(Clone, Debug, thiserror::Error)]
#[error("refusing to write {name:?}: {reason}")]
pub struct Unwritable {
    pub name: String,
    pub reason: String,
}

fn unwritable(name: &str, reason: impl Into<String>) -> anyhow::Error {
    Unwritable {
        name: name.to_string(),
        reason: reason.into(),
    }
    .into()
}

/// One file this peer holds all or part of.
pub struct StoredFile {
    pub info: FileInfo,
    pub hashes: Arc<HashList>,
    file: File,
    /// The same file opened with `O_DIRECT`, for aligned chunks of a download; `None` for
    /// shared originals, when direct writes are off, or where the file system refuses them.
    direct: Option<File>,
    /// Held only for in-memory bit flips, never across I/O or an `.await`.
    progress: Mutex<Progress>,
    /// For files this peer shares from its own disk (it is an origin of the file).
    pub seeding: Option<InitialSeeding>,
    /// The version stamp, milliseconds since the Unix epoch (see [`version_key`]).
    pub published: u64,
    /// Set when the bytes on disk were found to differ from what was hashed: nothing more is
    /// served from this version, and the catalogue withdraws it and hashes the file again.
    changed: AtomicBool,
    /// Bytes of it sent to other peers, for its recent upload rate.
    pub sent: Meter,
}

/// How long after sending a chunk an origin refers further requests for it to other peers.
/// Long enough for the recipient to register it and others to hear of it (a few refreshes);
/// short enough that a recipient that vanished costs only a short wait, never a deadlock.
pub const ELSEWHERE_WINDOW: Duration = Duration::from_secs(5);

/// Initial seeding (BitTorrent's super-seeding, in a pull protocol): while some chunks of a
/// file have never been sent, an origin's upload is best spent on those. A request by another
/// peer for a chunk sent within [`ELSEWHERE_WINDOW`] is refused with `elsewhere`; the downloader
/// fetches it from the peer that got it. The peer that got it is served again at once: asking
/// again means it lost the chunk (a transport error), so no one else has it from there. A
/// requester that gives no peer id cannot be told apart, so the refusal applies to it. Once
/// every chunk has gone out, the origin serves everything.
pub struct InitialSeeding {
    /// Held briefly for in-memory bookkeeping only.
    state: Mutex<(Vec<Option<Sent>>, usize)>,
}

/// The last time a chunk went out, and to whom (the requester's peer id, if it gave one).
#[derive(Clone, Copy)]
struct Sent {
    at: Instant,
    to: Option<u64>,
}

impl InitialSeeding {
    fn new(chunks: usize) -> Self {
        InitialSeeding {
            state: Mutex::new((vec![None; chunks], chunks)),
        }
    }

    /// Whether a request for `index` by `requester` should go to the peers that already have it.
    pub fn refer_elsewhere(&self, index: u32, requester: Option<u64>, now: Instant) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (sent, never_sent) = (&s.0, s.1);
        let recent = |last: &Sent| {
            now.duration_since(last.at) < ELSEWHERE_WINDOW
                && (requester.is_none() || last.to != requester)
        };
        never_sent > 0 && sent[index as usize].as_ref().is_some_and(recent)
    }

    /// Records that chunk `index` was sent in full to `requester`; true when that completes the
    /// first copy.
    pub fn sent(&self, index: u32, requester: Option<u64>, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let last = Sent {
            at: now,
            to: requester,
        };
        if s.0[index as usize].replace(last).is_none() {
            s.1 -= 1;
            return s.1 == 0;
        }
        false
    }
}

struct Progress {
    have: Bitfield,
    /// Where the have-bitmap is persisted; `None` once complete (or for shared originals).
    have_file: Option<File>,
    path: PathBuf,
    /// The complete file's stamp at `path` when it was hashed or finished; `None` while partial.
    stamp: Option<Stamp>,
    /// The partial data file's stamp just after its last missing chunk was verified into it
    /// (or after resume hashed every chunk of a complete one); `None` while chunks are missing.
    /// If the file still has it at the finish, nothing wrote to it since.
    completed: Option<Stamp>,
}

/// Why a chunk could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the file changed on disk since it was hashed; it is withdrawn until hashed again")]
    Changed,
    #[error("cannot read the chunk: {0}")]
    Io(#[from] std::io::Error),
}

/// What became of a written chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    /// Recorded; the file still misses chunks.
    Partial,
    /// Recorded, and it was the last one: call [`Store::finish`].
    LastChunk,
    /// Another source delivered it first; nothing changed.
    Duplicate,
}

impl StoredFile {
    pub fn have(&self) -> Bitfield {
        self.lock().have.clone()
    }

    pub fn has_chunk(&self, index: u32) -> bool {
        self.lock().have.get(index as usize)
    }

    pub fn is_complete(&self) -> bool {
        self.lock().have.is_full()
    }

    /// Whether the file is complete and under its final name (shared, or downloaded and
    /// finished).
    pub fn is_final(&self) -> bool {
        let p = self.lock();
        p.have_file.is_none() && p.have.is_full()
    }

    pub fn path(&self) -> PathBuf {
        self.lock().path.clone()
    }

    /// Marks `chunks` as missing again (they failed a check), in memory and in the bitmap.
    fn forget(&self, chunks: &[usize]) -> anyhow::Result<()> {
        let mut p = self.lock();
        for &i in chunks {
            p.have.clear(i);
        }
        if let Some(have_file) = &p.have_file {
            have_file
                .write_all_at(p.have.as_bytes(), 0)
                .with_context(|| format!("cannot record damage to {:?}", self.info.name))?;
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads chunk `index` into `buf` (blocking; call from a blocking context).
    pub fn read_chunk(&self, index: u32, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let (offset, len) = self.info.chunk_span(index);
        buf.resize(len as usize, 0);
        self.file.read_exact_at(buf, offset)
    }

    /// Reads chunk `index` for a requester, making sure it is still the chunk that was
    /// published: the file at its path must have the stamp it was hashed with, and the bytes
    /// read must match the chunk's hash. A file edited in place fails one or the other; it is
    /// then marked changed and nothing more is served from it (blocking).
    pub fn read_verified(&self, index: u32, buf: &mut Vec<u8>) -> Result<(), ReadError> {
        if self.is_changed() || !self.matches_disk() {
            self.changed.store(true, Ordering::Relaxed);
            return Err(ReadError::Changed);
        }
        self.read_chunk(index, buf)?;
        if Hash::of(buf) != self.hashes.0[index as usize] {
            self.changed.store(true, Ordering::Relaxed);
            return Err(ReadError::Changed);
        }
        Ok(())
    }

    /// Whether the bytes on disk were found to differ from the published ones.
    pub fn is_changed(&self) -> bool {
        self.changed.load(Ordering::Relaxed)
    }

    /// The complete file's path and the stamp it had when hashed or finished; `None` while
    /// partial.
    pub fn on_disk(&self) -> Option<(PathBuf, Stamp)> {
        let p = self.lock();
        p.stamp.map(|s| (p.path.clone(), s))
    }

    /// Whether the file at its path still has the stamp it was hashed with (partials always do:
    /// only this peer writes them).
    fn matches_disk(&self) -> bool {
        match self.on_disk() {
            Some((path, stamp)) => Stamp::read(&path).is_ok_and(|now| now == stamp),
            None => true,
        }
    }

    /// Where this version sits in the order of the versions of its name.
    pub fn version_key(&self) -> (u64, Hash) {
        version_key(self.published, self.info.digest)
    }

    /// Whether aligned chunks bypass the page cache.
    pub fn writes_directly(&self) -> bool {
        self.direct.is_some()
    }

    /// Writes a chunk that has been verified against its hash (blocking): with `O_DIRECT` when
    /// the file allows it and the memory, offset and length are aligned, else through the page
    /// cache.
    pub fn write_chunk(&self, index: u32, data: &[u8]) -> anyhow::Result<Written> {
        if self.has_chunk(index) {
            return Ok(Written::Duplicate);
        }
        let (offset, _) = self.info.chunk_span(index);
        let buffered = || self.file.write_all_at(data, offset);
        let written = match &self.direct {
            Some(direct)
                if aligned(data.as_ptr() as usize)
                    && aligned(data.len())
                    && aligned(offset as usize) =>
            {
                // A file system may accept O_DIRECT at open and still refuse this write (a
                // larger logical block size, some overlay set-ups): take the page cache then.
                direct
                    .write_all_at(data, offset)
                    .or_else(|e| match e.raw_os_error() {
                        Some(libc::EINVAL) => buffered(),
                        _ => Err(e),
                    })
            }
            _ => buffered(),
        };
        written.with_context(|| format!("cannot write chunk {index} of {:?}", self.info.name))?;
        let mut p = self.lock();
        if !p.have.set(index as usize) {
            return Ok(Written::Duplicate);
        }
        if let Some(have_file) = &p.have_file {
            let byte = index as usize / 8;
            have_file
                .write_all_at(&p.have.as_bytes()[byte..byte + 1], byte as u64)
                .with_context(|| format!("cannot record chunk {index} of {:?}", self.info.name))?;
        }
        if !p.have.is_full() {
            return Ok(Written::Partial);
        }
        // Every chunk's write has returned before its bit was set, so this stamp follows all
        // of them.
        p.completed = Some(self.stamp_now()?);
        Ok(Written::LastChunk)
    }

    /// The stamp of the open data file.
    fn stamp_now(&self) -> anyhow::Result<Stamp> {
        let m = self
            .file
            .metadata()
            .with_context(|| format!("cannot stat the data of {:?}", self.info.name))?;
        Ok(Stamp::of(&m))
    }

    /// Whether the data file at `path` still has the stamp it had when its last chunk went in:
    /// nothing wrote to it, cut it or replaced it since, so every chunk is as verified.
    fn untouched_since_complete(&self, path: &Path) -> bool {
        let completed = self.lock().completed;
        completed.is_some_and(|c| Stamp::read(path).is_ok_and(|now| now == c))
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    #[serde(flatten)]
    info: FileInfo,
    /// The version stamp of what is being downloaded; absent in metadata of older builds.
    #[serde(default)]
    published: u64,
    hashes: HashList,
}

/// What became of a complete download handed to [`Store::finish`].
#[derive(Debug, PartialEq, Eq)]
pub enum Finished {
    /// Verified in full, durable, and under its final name.
    InPlace(PathBuf),
    /// The final check found damage (the reason says which): the damaged chunks are missing
    /// again, or the partial download must be reopened. Download it again; nothing was renamed.
    Damaged(String),
}

/// What a walk of the data dir found.
pub enum Found {
    /// A visible regular file, shareable under `name`.
    File {
        name: String,
        path: PathBuf,
        stamp: Stamp,
    },
    /// The metadata of a partial download of `name`.
    Partial(String),
}

/// Every file the peer holds, by name and then version. Only these are ever served.
pub struct Store {
    dir: PathBuf,
    direct_writes: bool,
    files: Mutex<HashMap<String, Vec<Arc<StoredFile>>>>,
}

impl Store {
    /// A store in `dir`; `direct_writes` lets downloads bypass the page cache where they can.
    pub fn new(dir: &Path, direct_writes: bool) -> anyhow::Result<Store> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data dir {}", dir.display()))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            direct_writes,
            files: Mutex::new(HashMap::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Vec<Arc<StoredFile>>>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest version of `name` held here: the one offered under the bare name.
    pub fn get(&self, name: &str) -> Option<Arc<StoredFile>> {
        let map = self.map();
        map.get(name)?
            .iter()
            .max_by_key(|f| f.version_key())
            .cloned()
    }

    /// The version of `name` whose digest is `digest`, if held here.
    pub fn version(&self, name: &str, digest: &Hash) -> Option<Arc<StoredFile>> {
        let map = self.map();
        map.get(name)?
            .iter()
            .find(|f| f.info.digest == *digest)
            .cloned()
    }

    /// Version `digest` of `name` if given, else the newest version held here.
    pub fn find(&self, name: &str, digest: Option<&Hash>) -> Option<Arc<StoredFile>> {
        match digest {
            Some(d) => self.version(name, d),
            None => self.get(name),
        }
    }

    /// Every version of `name` held here.
    pub fn versions(&self, name: &str) -> Vec<Arc<StoredFile>> {
        self.map().get(name).cloned().unwrap_or_default()
    }

    /// Every version of every file, by name, newest version first.
    pub fn all(&self) -> Vec<Arc<StoredFile>> {
        let mut v: Vec<_> = self.map().values().flatten().cloned().collect();
        v.sort_by(|a, b| {
            (&a.info.name, std::cmp::Reverse(a.version_key()))
                .cmp(&(&b.info.name, std::cmp::Reverse(b.version_key())))
        });
        v
    }

    pub fn complete_count(&self) -> usize {
        self.map()
            .values()
            .flatten()
            .filter(|f| f.is_complete())
            .count()
    }

    /// Adds a version, replacing one with the same digest.
    fn insert(&self, stored: Arc<StoredFile>) {
        let mut map = self.map();
        let versions = map.entry(stored.info.name.clone()).or_default();
        versions.retain(|f| f.info.digest != stored.info.digest);
        versions.push(stored);
    }

    /// Forgets this version (it is served no more); false when it was not held.
    pub fn remove(&self, stored: &StoredFile) -> bool {
        let mut map = self.map();
        let Some(versions) = map.get_mut(&stored.info.name) else {
            return false;
        };
        let before = versions.len();
        versions.retain(|f| !std::ptr::eq(f.as_ref(), stored));
        let removed = versions.len() < before;
        if versions.is_empty() {
            map.remove(&stored.info.name);
        }
        removed
    }

    /// Shares an existing file under its base name (hashing it, blocking).
    pub fn share(&self, path: &Path, chunk_size: Option<u32>) -> anyhow::Result<Arc<StoredFile>> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("{} has no usable file name", path.display()))?;
        self.share_as(path, name, chunk_size)
    }

    /// Shares the regular file at `path` under `name`, its mtime as version stamp (hashing it,
    /// blocking). The version already held from this very file, unchanged, is returned as is;
    /// other content is a new version of `name`, kept beside the versions already held.
    pub fn share_as(
        &self,
        path: &Path,
        name: &str,
        chunk_size: Option<u32>,
    ) -> anyhow::Result<Arc<StoredFile>> {
        validate_name(name)
            .map_err(|r| anyhow!("cannot share {}: {}", path.display(), r.message))?;
        let meta = std::fs::symlink_metadata(path)
            .with_context(|| format!("cannot stat {}", path.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        let before = Stamp::of(&meta);
        let unchanged = self.versions(name).into_iter().find(|f| {
            !f.is_changed() && f.on_disk().is_some_and(|(p, s)| p == path && s == before)
        });
        if let Some(f) = unchanged {
            return Ok(f);
        }
        let (info, hashes) = hash_file(path, name, chunk_size)?;
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        if Stamp::of(&file.metadata()?) != before {
            bail!(
                "{} changed while it was being hashed; it is shared once it stays unchanged",
                path.display()
            );
        }
        let chunks = info.chunks() as usize;
        let progress = Progress {
            have: Bitfield::full(chunks),
            have_file: None,
            path: path.to_path_buf(),
            stamp: Some(before),
            completed: None,
        };
        let stored = Arc::new(StoredFile {
            info,
            hashes: Arc::new(hashes),
            file,
            direct: None,
            progress: Mutex::new(progress),
            seeding: Some(InitialSeeding::new(chunks)),
            published: before.published(),
            changed: AtomicBool::new(false),
            sent: Meter::default(),
        });
        self.insert(stored.clone());
        Ok(stored)
    }

    /// Shares every visible regular file under the data dir and resumes every partial download
    /// (finishing those found complete). Returns the names that could not be loaded, with the
    /// reason.
    pub fn scan(&self, chunk_size: Option<u32>) -> Vec<(String, anyhow::Error)> {
        let (found, mut failures) = self.walk();
        for f in found {
            let (label, result) = match f {
                Found::Partial(name) => (
                    name.clone(),
                    self.resume(&name, None)
                        .and_then(|f| f.map_or(Ok(()), |f| self.finish_if_complete(&f))),
                ),
                Found::File { name, path, .. } => (
                    name.clone(),
                    self.share_as(&path, &name, chunk_size).map(|_| ()),
                ),
            };
            if let Err(e) = result {
                failures.push((label, e));
            }
        }
        failures
    }

    /// A partial download that was complete when the last run stopped gets its name now.
    fn finish_if_complete(&self, stored: &Arc<StoredFile>) -> anyhow::Result<()> {
        if stored.is_complete() {
            if let Finished::Damaged(why) = self.finish(stored)? {
                tracing::warn!(file = %stored.info.name, reason = %why, "not finished");
            }
        }
        Ok(())
    }

    /// Lists the data dir recursively: visible regular files and the metadata of partial
    /// downloads. Hidden entries (other than partial metadata) and symlinks are skipped, so
    /// nothing outside the data dir is ever reached. Also returns what could not be listed.
    pub fn walk(&self) -> (Vec<Found>, Vec<(String, anyhow::Error)>) {
        let mut found = Vec::new();
        let mut failures = Vec::new();
        let entries = walkdir::WalkDir::new(&self.dir)
            .follow_links(false)
            .min_depth(1)
            .into_iter()
            .filter_entry(|e| {
                let hidden = e.file_name().to_string_lossy().starts_with('.');
                !hidden || (e.file_type().is_file() && is_partial_meta(e.file_name()))
            });
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    failures.push((self.dir.display().to_string(), e.into()));
                    continue;
                }
            };
            if !entry.file_type().is_file() {
                continue;
            }
            match self.found(entry.path()) {
                Ok(f) => found.push(f),
                Err(e) => failures.push((entry.path().display().to_string(), e)),
            }
        }
        (found, failures)
    }

    /// What the regular file at `path` (inside the data dir) is.
    fn found(&self, path: &Path) -> anyhow::Result<Found> {
        let relative = path.strip_prefix(&self.dir)?;
        let name = relative
            .to_str()
            .ok_or_else(|| anyhow!("the name is not UTF-8"))?;
        let base = relative
            .file_name()
            .and_then(|b| b.to_str())
            .unwrap_or_default();
        if let Some(inner) = partial_name(base, META) {
            let parent = name[..name.len() - base.len()].to_string();
            return Ok(Found::Partial(parent + &inner));
        }
        validate_name(name).map_err(|r| anyhow!("{}", r.message))?;
        let stamp = Stamp::read(path)?;
        Ok(Found::File {
            name: name.to_string(),
            path: path.to_path_buf(),
            stamp,
        })
    }

    /// `DIR/.BASE.KIND` for the name `DIR/BASE` (which must be valid).
    fn hidden(&self, name: &str, kind: &str) -> PathBuf {
        let path = self.dir.join(name);
        let base = path
            .file_name()
            .expect("a valid name ends in a file name")
            .to_string_lossy();
        path.with_file_name(format!(".{base}.{kind}"))
    }

    /// Makes sure every directory of `name` exists inside the data dir as a real directory,
    /// creating what is missing; a component that is a symlink or a file is refused for good
    /// ([`Unwritable`]), so nothing is ever written through a link out of the data dir.
    fn make_parents(&self, name: &str) -> anyhow::Result<()> {
        let mut dir = self.dir.clone();
        let components: Vec<&str> = name.split('/').collect();
        for component in &components[..components.len() - 1] {
            dir.push(component);
            if let Err(e) = std::fs::create_dir(&dir) {
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    return Err(e).with_context(|| format!("cannot create {}", dir.display()));
                }
            }
            let meta = std::fs::symlink_metadata(&dir)
                .with_context(|| format!("cannot stat {}", dir.display()))?;
            if !meta.is_dir() {
                let why = format!(
                    "{} is not a directory (a symlink or a file), and nothing is written \
                     through it; move it away",
                    dir.display()
                );
                return Err(unwritable(name, why));
            }
        }
        Ok(())
    }

    /// Whether the file at `path` is a version of `name` held here, unchanged: a download may
    /// replace that, never a file someone else put there.
    fn holds_file_at(&self, name: &str, path: &Path) -> bool {
        let Ok(now) = Stamp::read(path) else {
            return false;
        };
        let here = Some((path.to_path_buf(), now));
        self.versions(name).iter().any(|f| f.on_disk() == here)
    }

    /// Whether a download may take the final path of `name`: free, or a version of it held here
    /// (another version is replaced, not refused). A directory, a symlink or any other non-file
    /// there is not this peer's and is refused for good ([`Unwritable`]). A regular file not
    /// held is refused for now: a daemon follows its data dir, so it is soon hashed and held.
    fn check_target(&self, name: &str) -> anyhow::Result<()> {
        let target = self.dir.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&target) else {
            return Ok(());
        };
        if self.holds_file_at(name, &target) {
            return Ok(());
        }
        let why = format!(
            "{} already exists; move it away or choose another data dir",
            target.display()
        );
        if meta.is_file() {
            bail!("{why}");
        }
        Err(unwritable(name, why))
    }

    /// Opens (or creates) the partial download of `info` (version stamp `published`), keeping
    /// the chunks on disk that verify. A partial download of another version of the file is
    /// replaced; a complete older version held here stays served until the new one replaces it.
    /// A name this store will never write fails with an [`Unwritable`] error.
    pub fn begin_download(
        &self,
        info: &FileInfo,
        hashes: &HashList,
        published: u64,
    ) -> anyhow::Result<Arc<StoredFile>> {
        validate_name(&info.name).map_err(|r| unwritable(&info.name, r.message))?;
        if hashes.digest() != info.digest || hashes.0.len() as u64 != info.chunks() {
            bail!(
                "the tracker's hash list for {:?} does not match its digest",
                info.name
            );
        }
        if let Some(existing) = self.version(&info.name, &info.digest) {
            if existing.info == *info {
                return Ok(existing);
            }
            if existing.is_final() {
                bail!("{:?} is held here with other chunking", info.name);
            }
        }
        // A partial download of another version (or one whose metadata disagrees) shares the
        // hidden files: resuming below finds its metadata and starts over.
        for other in self.versions(&info.name) {
            if !other.is_final() {
                self.remove(&other);
            }
        }
        self.make_parents(&info.name)?;
        self.check_target(&info.name)?;
        // A data file without metadata is a leftover too (and gets a log line); anything else
        // in its place makes creating it fail with a clear error.
        let leftover = |kind| {
            std::fs::symlink_metadata(self.hidden(&info.name, kind)).is_ok_and(|m| m.is_file())
        };
        if leftover(META) || leftover(PART) {
            if let Some(resumed) = self.resume(&info.name, Some(info))? {
                return Ok(resumed);
            }
        }
        self.create_partial(info, hashes, published)
    }

    fn create_partial(
        &self,
        info: &FileInfo,
        hashes: &HashList,
        published: u64,
    ) -> anyhow::Result<Arc<StoredFile>> {
        let file = self.create_part(&info.name, info.size)?;
        let chunks = info.chunks() as usize;
        let have = Bitfield::new(chunks);
        write_durably(&self.hidden(&info.name, HAVE), have.as_bytes())?;
        let meta = Meta {
            info: info.clone(),
            published,
            hashes: hashes.clone(),
        };
        // Written last: metadata on disk means the data file and the bitmap exist.
        write_durably(&self.hidden(&info.name, META), &serde_json::to_vec(&meta)?)?;
        self.insert_partial(meta, file, have)
    }

    /// Creates the hidden data file of a download of `name`, `size` bytes, empty.
    fn create_part(&self, name: &str, size: u64) -> anyhow::Result<File> {
        let part = self.hidden(name, PART);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&part)
            .with_context(|| format!("cannot create {}", part.display()))?;
        file.set_len(size)
            .with_context(|| format!("cannot size {} to {} bytes", part.display(), size))?;
        Ok(file)
    }

    /// Starts the hidden data file of a pull of `name` from an origin (its digest is not known
    /// yet): `size` bytes, empty, where a download of `name` keeps its data. Partial downloads
    /// of other versions of `name` give way, as in [`Store::begin_download`].
    pub fn origin_part(&self, name: &str, size: u64) -> anyhow::Result<File> {
        validate_name(name).map_err(|r| unwritable(name, r.message))?;
        for other in self.versions(name) {
            if !other.is_final() {
                self.remove(&other);
            }
        }
        self.make_parents(name)?;
        self.check_target(name)?;
        self.remove_hidden(name, &[META, HAVE])?;
        self.create_part(name, size)
    }

    /// Describes what a pull from an origin left in the hidden data file of `info.name` as a
    /// partial download of that version holding `have`, so that [`Store::begin_download`]
    /// resumes it (hashing each of those chunks again) instead of starting over.
    pub fn adopt_origin_part(
        &self,
        info: &FileInfo,
        hashes: &HashList,
        published: u64,
        have: &Bitfield,
    ) -> anyhow::Result<()> {
        write_durably(&self.hidden(&info.name, HAVE), have.as_bytes())?;
        let meta = Meta {
            info: info.clone(),
            published,
            hashes: hashes.clone(),
        };
        write_durably(&self.hidden(&info.name, META), &serde_json::to_vec(&meta)?)
    }

    /// Loads the partial download of `name` left by an earlier run, trusting nothing on disk it
    /// has not checked: the data file is cut or extended to the file's size and every chunk the
    /// bitmap claims (every chunk, if the bitmap is unreadable) is hashed again. Metadata that is
    /// missing, empty, unparsable, about another file or (given `expected`) another version,
    /// or a data file that is gone, starts the file over: `None`.
    fn resume(
        &self,
        name: &str,
        expected: Option<&FileInfo>,
    ) -> anyhow::Result<Option<Arc<StoredFile>>> {
        let meta_path = self.hidden(name, META);
        let meta = match read_meta(&meta_path, name, expected) {
            Ok(meta) => meta,
            Err(why) => return self.start_over(name, &meta_path, &why).map(|()| None),
        };
        let part = self.hidden(name, PART);
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&part)
        {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return self
                    .start_over(name, &part, "its data file is missing")
                    .map(|()| None)
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", part.display())),
        };
        fit_length(&file, &part, meta.info.size)?;
        let chunks = meta.info.chunks() as usize;
        // The bitmap is only a hint, written in place: if it is unreadable, check every chunk.
        let mut have = std::fs::read(self.hidden(name, HAVE))
            .ok()
            .and_then(|b| Bitfield::from_bytes(b, chunks))
            .unwrap_or_else(|| Bitfield::full(chunks));
        for i in failing_chunks(&file, &meta.info, &meta.hashes, have.clone().ones()) {
            have.clear(i);
        }
        write_durably(&self.hidden(name, HAVE), have.as_bytes())?;
        tracing::info!(file = %name, verified = have.count(), chunks, "resuming partial download");
        self.insert_partial(meta, file, have).map(Some)
    }

    /// Gives up on a partial download that cannot be trusted: one warning naming `path` and
    /// why, and its hidden files removed, so that the next attempt begins afresh instead of
    /// failing the same way for ever.
    fn start_over(&self, name: &str, path: &Path, why: &str) -> anyhow::Result<()> {
        tracing::warn!(file = name, path = %path.display(), reason = why, "partial download cannot be resumed; starting this file over");
        self.remove_hidden(name, &[PART, HAVE, META])
    }

    /// Removes the hidden files of `name` of these kinds, with any temporary copies.
    fn remove_hidden(&self, name: &str, kinds: &[&str]) -> anyhow::Result<()> {
        for kind in kinds {
            let path = self.hidden(name, kind);
            for p in [tmp_path(&path), path] {
                match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("cannot remove {}", p.display()))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn insert_partial(
        &self,
        meta: Meta,
        file: File,
        have: Bitfield,
    ) -> anyhow::Result<Arc<StoredFile>> {
        let Meta {
            info,
            published,
            hashes,
        } = meta;
        let have_path = self.hidden(&info.name, HAVE);
        let have_file = OpenOptions::new()
            .write(true)
            .open(&have_path)
            .with_context(|| format!("cannot open {}", have_path.display()))?;
        let part = self.hidden(&info.name, PART);
        let direct = self.direct_writes.then(|| open_direct(&part)).flatten();
        let progress = Progress {
            have,
            have_file: Some(have_file),
            path: part,
            stamp: None,
            completed: None,
        };
        let stored = Arc::new(StoredFile {
            info,
            hashes: Arc::new(hashes),
            file,
            direct,
            progress: Mutex::new(progress),
            seeding: None,
            published,
            changed: AtomicBool::new(false),
            sent: Meter::default(),
        });
        if stored.is_complete() {
            // Every chunk held was verified just now (hashed by resume), so it needs no
            // second look at the finish unless something touches it.
            stored.lock().completed = Some(stored.stamp_now()?);
        }
        self.insert(stored.clone());
        Ok(stored)
    }

    /// Makes a complete download durable and visible under its name (blocking), replacing an
    /// older version held there in one rename: a reader sees the old bytes or the new, never a
    /// mix. Whatever changed the partial file after its last chunk was written (another
    /// program, a restore, a human) is caught here by its stamp, and the file is then read and
    /// hashed in full, so a corrupt file never gets the final name; a file nothing touched is
    /// not read back (its chunks were verified as they were written). The file's mtime becomes
    /// its version stamp, so a rescan after a restart derives the same.
    pub fn finish(&self, stored: &Arc<StoredFile>) -> anyhow::Result<Finished> {
        let name = &stored.info.name;
        if stored.is_final() {
            return Ok(Finished::InPlace(stored.path()));
        }
        if !stored.is_complete() {
            bail!("{name:?} is not complete");
        }
        let part = self.hidden(name, PART);
        if !same_file(&part, &stored.file) {
            self.remove(stored);
            let why = format!("{} was removed or replaced meanwhile", part.display());
            return Ok(Finished::Damaged(why));
        }
        // A length set right changes the stamp, so a file cut or extended at any time is
        // hashed again below.
        fit_length(&stored.file, &part, stored.info.size)?;
        if !stored.untouched_since_complete(&part) {
            tracing::info!(file = %name, "its data file changed after the last chunk was written; hashing it again");
            let all = 0..stored.info.chunks() as usize;
            let damaged = failing_chunks(&stored.file, &stored.info, &stored.hashes, all);
            if !damaged.is_empty() {
                stored.forget(&damaged)?;
                let why = format!(
                    "{} of its chunks in {} no longer match their hashes",
                    damaged.len(),
                    part.display()
                );
                return Ok(Finished::Damaged(why));
            }
        }
        stored
            .file
            .sync_all()
            .with_context(|| format!("cannot sync {}", part.display()))?;
        if stored.published > 0 {
            let mtime = UNIX_EPOCH + Duration::from_millis(stored.published);
            stored
                .file
                .set_modified(mtime)
                .with_context(|| format!("cannot stamp {name:?} with its version"))?;
        }
        let target = self.dir.join(name);
        if std::fs::symlink_metadata(&target).is_ok() && !self.holds_file_at(name, &target) {
            bail!(
                "{} appeared while {name:?} was downloading; the download stays hidden until it \
                 is moved away",
                target.display()
            );
        }
        let mut p = stored.lock();
        if p.have_file.is_none() {
            return Ok(Finished::InPlace(p.path.clone()));
        }
        std::fs::rename(&p.path, &target)
            .with_context(|| format!("cannot move {name:?} into place"))?;
        p.stamp = Some(Stamp::of(&stored.file.metadata()?));
        p.path = target.clone();
        p.have_file = None;
        drop(p);
        if let Err(e) = self.remove_hidden(name, &[META, HAVE]) {
            tracing::warn!(file = %name, error = format!("{e:#}"), "finished, but its hidden files remain");
        }
        let dir = target.parent().unwrap_or(&self.dir);
        sync_dir(dir).with_context(|| format!("cannot sync {}", dir.display()))?;
        Ok(Finished::InPlace(target))
    }

    /// Fills the missing chunks of the download `target` with equal chunks (same hash) already
    /// held here (of an older version, any other file, or another download), so that only
    /// what is new crosses the network. Each copy is verified before it is written. Returns the
    /// chunks filled (blocking).
    pub fn reuse_local(&self, target: &StoredFile) -> anyhow::Result<Vec<u32>> {
        let missing: Vec<u32> = (0..target.info.chunks() as u32)
            .filter(|&i| !target.has_chunk(i))
            .collect();
        if missing.is_empty() {
            return Ok(missing);
        }
        let mut sources: HashMap<Hash, (Arc<StoredFile>, u32)> = HashMap::new();
        for f in self.all() {
            if std::ptr::eq(f.as_ref(), target) || f.is_changed() {
                continue;
            }
            for i in f.have().ones() {
                sources
                    .entry(f.hashes.0[i])
                    .or_insert_with(|| (f.clone(), i as u32));
            }
        }
        let mut reused = Vec::new();
        let mut buf = Vec::new();
        for i in missing {
            let want = target.hashes.0[i as usize];
            let Some((source, j)) = sources.get(&want) else {
                continue;
            };
            if source.read_chunk(*j, &mut buf).is_ok()
                && Hash::of(&buf) == want
                && target.write_chunk(i, &buf)? != Written::Duplicate
            {
                reused.push(i);
            }
        }
        Ok(reused)
    }
}

/// Whether a hidden file name is the metadata of a partial download.
fn is_partial_meta(file_name: &std::ffi::OsStr) -> bool {
    file_name
        .to_str()
        .is_some_and(|n| partial_name(n, META).is_some())
}

/// The metadata at `path` if it describes `name` (and is `expected`, when given); else why not,
/// as a phrase for the log.
fn read_meta(path: &Path, name: &str, expected: Option<&FileInfo>) -> Result<Meta, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) if b.is_empty() => return Err("its metadata file is empty".into()),
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err("its metadata file is missing".into())
        }
        Err(e) => return Err(format!("its metadata cannot be read ({e})")),
    };
    let meta: Meta =
        serde_json::from_slice(&bytes).map_err(|e| format!("its metadata is not valid ({e})"))?;
    let consistent = meta.info.name == name
        && check_chunk_size(meta.info.chunk_size).is_ok()
        && meta.hashes.0.len() as u64 == meta.info.chunks()
        && meta.hashes.digest() == meta.info.digest;
    if !consistent {
        return Err("its metadata does not describe this file".into());
    }
    if expected.is_some_and(|e| *e != meta.info) {
        return Err("it is of another version of the file".into());
    }
    Ok(meta)
}

/// Cuts or extends a partial data file to the file's size: bytes past the size belong to no
/// chunk, and a short file only misses chunks, which hashing finds.
fn fit_length(file: &File, path: &Path, size: u64) -> anyhow::Result<()> {
    let len = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    if len != size {
        tracing::warn!(path = %path.display(), len, size, "partial data file has the wrong length; setting it to the file's size");
        file.set_len(size)
            .with_context(|| format!("cannot size {} to {size} bytes", path.display()))?;
    }
    Ok(())
}

/// The chunks among `chunks` whose bytes in `file` cannot be read or do not match their hash.
fn failing_chunks(
    file: &File,
    info: &FileInfo,
    hashes: &HashList,
    chunks: impl Iterator<Item = usize>,
) -> Vec<usize> {
    let mut buf = Vec::new();
    chunks
        .filter(|&i| {
            let (offset, len) = info.chunk_span(i as u32);
            buf.resize(len as usize, 0);
            file.read_exact_at(&mut buf, offset).is_err() || Hash::of(&buf) != hashes.0[i]
        })
        .collect()
}

/// Whether `path` still names the file open as `file` (it was not deleted or replaced).
fn same_file(path: &Path, file: &File) -> bool {
    match (std::fs::metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Replaces `path` with `bytes` so that a crash at any moment leaves the old contents or the
/// new ones in full, never a mix or an empty file: a temporary file is written and synced,
/// renamed over `path`, and the directory synced so that the rename itself is durable.
fn write_durably(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = tmp_path(path);
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Opens `path` for writing with `O_DIRECT`; `None` where the file system refuses it (tmpfs).
fn open_direct(path: &Path) -> Option<File> {
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "writing through the page cache: no O_DIRECT");
            None
        }
    }
}

/// `.NAME.KIND` -> `NAME`.
fn partial_name(file_name: &str, kind: &str) -> Option<String> {
    let inner = file_name
        .strip_prefix('.')?
        .strip_suffix(kind)?
        .strip_suffix('.')?;
    validate_name(inner).ok().map(|_| inner.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunking::hash_file;

    fn sample(dir: &Path, name: &str, len: usize) -> PathBuf {
        let path = dir.join(name);
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, data).unwrap();
        path
    }

    #[test]
    fn download_survives_restart_and_lands_byte_identical() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let path = sample(src.path(), "f.bin", 20_000);
        let (info, hashes) = hash_file(&path, "f.bin", Some(4096)).unwrap();
        let original = std::fs::read(&path).unwrap();
        // As a download receives them: aligned in memory, so all but the short last chunk can
        // go to disk directly.
        let chunk = |i: u32| {
            let (o, l) = info.chunk_span(i);
            let mut buf = ChunkBuf::default();
            buf.reset(l as usize)
                .copy_from_slice(&original[o as usize..(o + l as u64) as usize]);
            buf
        };

        let store = Store::new(dst.path(), true).unwrap();
        let f = store.begin_download(&info, &hashes, 0).unwrap();
        let probe = dst.path().join("probe");
        std::fs::write(&probe, b"").unwrap();
        assert_eq!(f.writes_directly(), open_direct(&probe).is_some());
        std::fs::remove_file(probe).unwrap();
        assert_eq!(f.write_chunk(0, &chunk(0)).unwrap(), Written::Partial);
        assert_eq!(f.write_chunk(3, &chunk(3)).unwrap(), Written::Partial);
        assert_eq!(f.write_chunk(3, &chunk(3)).unwrap(), Written::Duplicate);
        drop((f, store));

        // A new run finds the partial, keeps the verified chunks, serves them, finishes.
        let store = Store::new(dst.path(), true).unwrap();
        assert!(store.scan(Some(4096)).is_empty());
        let f = store.get("f.bin").unwrap();
        assert_eq!(f.have().ones().collect::<Vec<_>>(), vec![0, 3]);
        let mut buf = Vec::new();
        f.read_chunk(3, &mut buf).unwrap();
        assert_eq!(buf, &chunk(3)[..]);
        assert!(!dst.path().join("f.bin").exists());
        for i in [1, 2] {
            assert_eq!(f.write_chunk(i, &chunk(i)).unwrap(), Written::Partial);
        }
        assert_eq!(f.write_chunk(4, &chunk(4)).unwrap(), Written::LastChunk);
        let done = dst.path().join("f.bin");
        assert_eq!(store.finish(&f).unwrap(), Finished::InPlace(done.clone()));
        assert_eq!(std::fs::read(done).unwrap(), original);
        let left: Vec<_> = std::fs::read_dir(dst.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("f.bin")]);
        f.read_chunk(4, &mut buf).unwrap();
        assert_eq!(buf, &chunk(4)[..]);
    }

    #[test]
    fn chunk_buffers_are_aligned_and_reused() {
        let mut buf = ChunkBuf::default();
        buf.reset(3 * DIRECT_ALIGN).fill(7);
        let (start, len) = (buf.as_ptr(), buf.len());
        assert_eq!((start as usize % DIRECT_ALIGN, len), (0, 3 * DIRECT_ALIGN));
        assert!(buf.iter().all(|&b| b == 7));
        buf.reset(100);
        assert_eq!((buf.as_ptr(), buf.len()), (start, 100));
    }

    #[test]
    fn direct_writes_can_be_turned_off() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_, _store, f) = begin(src.path(), dst.path(), "h.bin", false);
        assert!(!f.writes_directly());
    }

    /// A download of an 8 KiB sample in 4 KiB chunks, begun in `dst`.
    fn begin(
        src: &Path,
        dst: &Path,
        name: &str,
        direct: bool,
    ) -> (PathBuf, Store, Arc<StoredFile>) {
        let path = sample(src, name, 8192);
        let (info, hashes) = hash_file(&path, name, Some(4096)).unwrap();
        let store = Store::new(dst, direct).unwrap();
        let f = store.begin_download(&info, &hashes, 0).unwrap();
        (path, store, f)
    }

    #[test]
    fn resume_drops_claimed_chunks_that_do_not_verify() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (path, store, f) = begin(src.path(), dst.path(), "g.bin", true);
        f.write_chunk(1, &std::fs::read(&path).unwrap()[4096..])
            .unwrap();
        drop((f, store));
        std::fs::write(dst.path().join(".g.bin.shoal-have"), [0xc0]).unwrap(); // claims chunk 0 too
        let store = Store::new(dst.path(), true).unwrap();
        store.scan(Some(4096));
        assert_eq!(
            store
                .get("g.bin")
                .unwrap()
                .have()
                .ones()
                .collect::<Vec<_>>(),
            vec![1]
        );
    }

    /// The hidden files of a download of `name` in `dir`, by kind.
    fn hidden(dir: &Path, name: &str, kind: &str) -> PathBuf {
        dir.join(format!(".{name}.{kind}"))
    }

    /// The files in `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Something done to the hidden files of a download in a data dir.
    type Damage = dyn Fn(&Path);

    /// Begins a download of an 8 KiB sample, writes chunk 1, and damages the result with
    /// `damage(dst)` as a crash or a human might; returns what a new run makes of it.
    fn resume_after(damage: impl Fn(&Path)) -> (Vec<usize>, Vec<String>) {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (path, store, f) = begin(src.path(), dst.path(), "r.bin", true);
        let original = std::fs::read(&path).unwrap();
        f.write_chunk(1, &original[4096..]).unwrap();
        let info = f.info.clone();
        let hashes = (*f.hashes).clone();
        drop((f, store));
        damage(dst.path());
        let store = Store::new(dst.path(), true).unwrap();
        assert!(store.scan(Some(4096)).is_empty(), "damage is no failure");
        let f = store.begin_download(&info, &hashes, 0).unwrap();
        let have = f.have().ones().collect();
        f.write_chunk(0, &original[..4096]).unwrap();
        f.write_chunk(1, &original[4096..]).unwrap();
        assert_eq!(
            store.finish(&f).unwrap(),
            Finished::InPlace(dst.path().join("r.bin"))
        );
        assert_eq!(std::fs::read(dst.path().join("r.bin")).unwrap(), original);
        (have, listing(dst.path()))
    }

    #[test]
    fn untrustworthy_metadata_starts_the_file_over_instead_of_failing_for_ever() {
        fn meta(dir: &Path) -> PathBuf {
            hidden(dir, "r.bin", META)
        }
        let other_version = |dir: &Path| {
            let mut m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(meta(dir)).unwrap()).unwrap();
            m["size"] = serde_json::json!(8191);
            std::fs::write(meta(dir), serde_json::to_vec(&m).unwrap()).unwrap();
        };
        let damages: [(&str, &Damage); 5] = [
            ("missing", &|d| std::fs::remove_file(meta(d)).unwrap()),
            ("empty", &|d| std::fs::write(meta(d), b"").unwrap()),
            ("garbled", &|d| {
                std::fs::write(meta(d), b"{\"name\":").unwrap()
            }),
            ("another version", &other_version),
            ("data file gone", &|d| {
                std::fs::remove_file(hidden(d, "r.bin", PART)).unwrap()
            }),
        ];
        for (what, damage) in damages {
            let (have, left) = resume_after(damage);
            assert_eq!(have, Vec::<usize>::new(), "{what}: started over");
            assert_eq!(left, vec!["r.bin"], "{what}: nothing hidden left behind");
        }
    }

    #[test]
    fn a_partial_file_of_the_wrong_length_is_cut_or_extended_and_its_chunks_rechecked() {
        let grow = |dir: &Path| {
            let part = hidden(dir, "r.bin", PART);
            let f = OpenOptions::new().write(true).open(part).unwrap();
            f.set_len(8192 + 5000).unwrap();
        };
        assert_eq!(resume_after(grow), (vec![1], vec!["r.bin".into()]));
        let shrink = |dir: &Path| {
            let part = hidden(dir, "r.bin", PART);
            let f = OpenOptions::new().write(true).open(part).unwrap();
            f.set_len(6000).unwrap();
        };
        assert_eq!(resume_after(shrink).0, Vec::<usize>::new());
    }

    #[test]
    fn an_unreadable_bitmap_means_every_chunk_is_checked_not_lost() {
        let garble = |dir: &Path| std::fs::write(hidden(dir, "r.bin", HAVE), b"junk").unwrap();
        assert_eq!(resume_after(garble).0, vec![1]);
        let remove = |dir: &Path| std::fs::remove_file(hidden(dir, "r.bin", HAVE)).unwrap();
        assert_eq!(resume_after(remove).0, vec![1]);
    }

    #[test]
    fn metadata_is_replaced_whole_through_a_synced_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".m.shoal-meta");
        std::fs::write(&path, b"old").unwrap();
        write_durably(&path, b"new contents").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
        assert_eq!(listing(dir.path()), vec![".m.shoal-meta"]);
    }

    /// A download like [`begin`]'s with both chunks written, not finished yet; with the bytes.
    fn complete(src: &Path, dst: &Path, name: &str) -> (Vec<u8>, Store, Arc<StoredFile>) {
        let (path, store, f) = begin(src, dst, name, false);
        let original = std::fs::read(&path).unwrap();
        f.write_chunk(0, &original[..4096]).unwrap();
        f.write_chunk(1, &original[4096..]).unwrap();
        (original, store, f)
    }

    #[test]
    fn a_complete_file_damaged_before_its_rename_is_fetched_again_never_named() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (original, store, f) = complete(src.path(), dst.path(), "d.bin");
        let part = hidden(dst.path(), "d.bin", PART);
        let writer = OpenOptions::new().write(true).open(&part).unwrap();
        writer.write_all_at(b"garbage", 5000).unwrap();
        writer.set_len(9000).unwrap();
        let Finished::Damaged(why) = store.finish(&f).unwrap() else {
            panic!("a damaged file was finished");
        };
        assert!(why.contains("1 of its chunks"), "{why}");
        assert!(!dst.path().join("d.bin").exists());
        assert_eq!(f.have().ones().collect::<Vec<_>>(), vec![0]);
        f.write_chunk(1, &original[4096..]).unwrap();
        let done = dst.path().join("d.bin");
        assert_eq!(store.finish(&f).unwrap(), Finished::InPlace(done.clone()));
        assert_eq!(std::fs::read(done).unwrap(), original, "cut to size too");
    }

    #[test]
    fn bytes_overwritten_in_place_after_the_last_chunk_are_caught_by_the_stamp() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_, store, f) = complete(src.path(), dst.path(), "g.bin");
        let part = hidden(dst.path(), "g.bin", PART);
        let writer = OpenOptions::new().write(true).open(&part).unwrap();
        writer.write_all_at(b"garbage", 100).unwrap();
        let Finished::Damaged(why) = store.finish(&f).unwrap() else {
            panic!("a file changed in place was finished");
        };
        assert!(why.contains("1 of its chunks"), "{why}");
        assert_eq!(f.have().ones().collect::<Vec<_>>(), vec![1]);
        assert!(!dst.path().join("g.bin").exists());
    }

    #[test]
    fn a_partial_file_replaced_during_the_download_is_reopened_not_named() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_, store, f) = complete(src.path(), dst.path(), "e.bin");
        let part = hidden(dst.path(), "e.bin", PART);
        std::fs::remove_file(&part).unwrap();
        std::fs::write(&part, vec![0u8; 8192]).unwrap();
        assert!(matches!(store.finish(&f).unwrap(), Finished::Damaged(_)));
        assert!(store.get("e.bin").is_none(), "the stale entry is dropped");
        let f = store.begin_download(&f.info, &f.hashes, 0).unwrap();
        assert_eq!(f.have().count(), 0, "zeros do not verify");
    }

    #[test]
    fn a_partial_found_complete_at_start_gets_its_name() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (original, store, f) = complete(src.path(), dst.path(), "c.bin");
        drop((f, store));
        let store = Store::new(dst.path(), true).unwrap();
        assert!(store.scan(None).is_empty());
        assert!(store.get("c.bin").unwrap().is_final());
        assert_eq!(std::fs::read(dst.path().join("c.bin")).unwrap(), original);
    }

    #[test]
    fn a_file_that_appeared_under_the_final_name_is_never_replaced() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_, store, f) = complete(src.path(), dst.path(), "f.bin");
        std::fs::write(dst.path().join("f.bin"), b"someone else's").unwrap();
        let err = store.finish(&f).unwrap_err().to_string();
        assert!(err.contains("appeared while"), "{err}");
        assert_eq!(
            std::fs::read(dst.path().join("f.bin")).unwrap(),
            b"someone else's"
        );
    }

    #[test]
    fn scan_shares_visible_files_only() {
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path(), "a.bin", 100);
        sample(dir.path(), ".hidden", 100);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let store = Store::new(dir.path(), true).unwrap();
        assert!(store.scan(Some(4096)).is_empty());
        let names: Vec<_> = store.all().iter().map(|f| f.info.name.clone()).collect();
        assert_eq!(names, vec!["a.bin"]);
        assert!(store.get("a.bin").unwrap().is_complete());
    }

    #[test]
    fn refuses_to_overwrite_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path(), "a.bin", 100);
        let (info, hashes) = hash_file(&path, "a.bin", Some(4096)).unwrap();
        let store = Store::new(dir.path(), true).unwrap();
        let err = refused(&store, &info, &hashes);
        assert!(err.contains("already exists"), "{err}");
    }

    #[test]
    fn only_what_is_not_this_peers_is_refused_for_good() {
        // Another version of a name held here is not refused at all: it is replaced (see
        // a_new_version_replaces_the_one_held_under_its_name_in_one_rename).
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = Store::new(dst.path(), true).unwrap();
        let refused_for_good = |name: &str| {
            let (_, info, hashes) = described(src.path(), name, 100);
            match store.begin_download(&info, &hashes, 0) {
                Ok(_) => panic!("{name:?} was accepted"),
                Err(e) => e.is::<Unwritable>(),
            }
        };
        sample(dst.path(), "put-there.bin", 10);
        assert!(
            !refused_for_good("put-there.bin"),
            "a file put in the data dir is shared once hashed"
        );
        std::fs::create_dir(dst.path().join("dir.bin")).unwrap();
        std::os::unix::fs::symlink(src.path(), dst.path().join("link")).unwrap();
        for name in ["dir.bin", "link/x.bin", "../x.bin"] {
            assert!(refused_for_good(name), "{name}");
        }
    }

    /// Why `store` refuses to begin downloading `info`.
    fn refused(store: &Store, info: &FileInfo, hashes: &HashList) -> String {
        match store.begin_download(info, hashes, 0) {
            Ok(_) => panic!("{:?} was accepted", info.name),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_origin_sends_every_chunk_once_before_any_twice() {
        let seeding = InitialSeeding::new(3);
        let t0 = Instant::now();
        assert!(!seeding.refer_elsewhere(0, Some(1), t0));
        seeding.sent(0, Some(1), t0);
        assert!(
            seeding.refer_elsewhere(0, Some(2), t0),
            "chunk 0 went out and 1, 2 never did"
        );
        assert!(
            seeding.refer_elsewhere(0, None, t0),
            "a requester without an id may be the one that got it"
        );
        assert!(
            !seeding.refer_elsewhere(0, Some(2), t0 + ELSEWHERE_WINDOW),
            "the referral expires"
        );
        seeding.sent(1, None, t0);
        seeding.sent(2, None, t0);
        assert!(
            !seeding.refer_elsewhere(0, Some(2), t0),
            "every chunk went out: serve freely"
        );
    }

    #[test]
    fn sub_directories_are_shared_but_hidden_ones_and_symlinks_are_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("models/llama")).unwrap();
        std::fs::create_dir_all(dir.path().join(".cache")).unwrap();
        sample(dir.path(), "models/llama/shard-1.bin", 100);
        sample(dir.path(), "models/.tmp-upload", 100);
        sample(dir.path(), ".cache/x.bin", 100);
        let outside = tempfile::tempdir().unwrap();
        sample(outside.path(), "secret", 100);
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link-dir")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        let store = Store::new(dir.path(), true).unwrap();
        assert!(store.scan(Some(4096)).is_empty());
        let names: Vec<_> = store.all().iter().map(|f| f.info.name.clone()).collect();
        assert_eq!(names, vec!["models/llama/shard-1.bin"]);
    }

    /// A sample file of `len` bytes in `src`, described under `name` (a path, or a hostile one).
    fn described(src: &Path, name: &str, len: usize) -> (PathBuf, FileInfo, HashList) {
        let path = sample(src, "f.bin", len);
        let (mut info, hashes) = hash_file(&path, "f.bin", Some(4096)).unwrap();
        info.name = name.into();
        (path, info, hashes)
    }

    #[test]
    fn a_download_lands_in_its_directory_with_its_partials_beside_it() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (path, info, hashes) = described(src.path(), "a/b/f.bin", 8192);
        let store = Store::new(dst.path(), true).unwrap();
        let f = store
            .begin_download(&info, &hashes, 1_700_000_000_123)
            .unwrap();
        assert!(dst.path().join("a/b/.f.bin.shoal-part").is_file());
        assert!(dst.path().join("a/b/.f.bin.shoal-meta").is_file());
        let data = std::fs::read(&path).unwrap();
        f.write_chunk(0, &data[..4096]).unwrap();
        drop((f, store));
        // A restart finds the partial in its directory and resumes it under its path name.
        let store = Store::new(dst.path(), true).unwrap();
        assert!(store.scan(Some(4096)).is_empty());
        let f = store.get("a/b/f.bin").expect("resumed");
        assert_eq!(f.published, 1_700_000_000_123);
        f.write_chunk(1, &data[4096..]).unwrap();
        let done = dst.path().join("a/b/f.bin");
        assert_eq!(store.finish(&f).unwrap(), Finished::InPlace(done.clone()));
        assert_eq!(std::fs::read(&done).unwrap(), data);
        let stamp = Stamp::read(&done).unwrap();
        assert_eq!(
            stamp.published(),
            1_700_000_000_123,
            "mtime is the version stamp"
        );
        assert_eq!(f.on_disk(), Some((done, stamp)));
    }

    #[test]
    fn a_download_never_writes_through_a_symlink_out_of_the_data_dir() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dst.path().join("evil")).unwrap();
        let (_, mut info, hashes) = described(src.path(), "evil/f.bin", 100);
        let store = Store::new(dst.path(), true).unwrap();
        let err = refused(&store, &info, &hashes);
        assert!(err.contains("not a directory"), "{err}");
        for hostile in ["../f.bin", "/tmp/f.bin", "a/../../f.bin"] {
            info.name = hostile.into();
            assert!(
                refused(&store, &info, &hashes).contains("name"),
                "{hostile}"
            );
        }
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        let parent = dst.path().parent().unwrap();
        assert!(!parent.join("f.bin").exists());
    }

    /// A store in `dir` sharing a 9000-byte `a.bin` in 4 KiB chunks.
    fn shared_sample(dir: &Path) -> (PathBuf, Store, Arc<StoredFile>) {
        let path = sample(dir, "a.bin", 9000);
        let store = Store::new(dir, true).unwrap();
        let f = store.share_as(&path, "a.bin", Some(4096)).unwrap();
        (path, store, f)
    }

    #[test]
    fn other_content_under_a_held_name_is_a_new_version() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store, v1) = shared_sample(dir.path());
        let again = store.share_as(&path, "a.bin", Some(4096)).unwrap();
        assert!(Arc::ptr_eq(&v1, &again), "unchanged: the same version");
        let mut data = std::fs::read(&path).unwrap();
        data[5000] ^= 1;
        let replacement = dir.path().join(".a.bin.new");
        std::fs::write(&replacement, &data).unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        File::options()
            .write(true)
            .open(&replacement)
            .unwrap()
            .set_modified(later)
            .unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        let v2 = store.share_as(&path, "a.bin", Some(4096)).unwrap();
        assert_ne!(v1.info.digest, v2.info.digest);
        assert_eq!(store.versions("a.bin").len(), 2);
        assert!(
            Arc::ptr_eq(&store.get("a.bin").unwrap(), &v2),
            "newest offered"
        );
        // The old version's file is gone from its path: it must not be served as good.
        let mut buf = Vec::new();
        assert!(matches!(
            v1.read_verified(0, &mut buf),
            Err(ReadError::Changed)
        ));
        assert!(v1.is_changed());
        assert!(store.remove(&v1));
        assert!(!store.remove(&v1));
        assert_eq!(store.versions("a.bin").len(), 1);
    }

    #[test]
    fn a_new_version_replaces_the_one_held_under_its_name_in_one_rename() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (path, store, v1) = shared_sample(dst.path());
        let mut data = std::fs::read(&path).unwrap();
        data[100] ^= 1;
        let next = src.path().join("a.bin");
        std::fs::write(&next, &data).unwrap();
        let (info, hashes) = hash_file(&next, "a.bin", Some(4096)).unwrap();
        let v2 = store
            .begin_download(&info, &hashes, 1_800_000_000_000)
            .unwrap();
        assert_eq!(
            store.reuse_local(&v2).unwrap(),
            vec![1, 2],
            "only chunk 0 differs"
        );
        v2.write_chunk(0, &data[..4096]).unwrap();
        assert_eq!(store.finish(&v2).unwrap(), Finished::InPlace(path.clone()));
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(Arc::ptr_eq(&store.get("a.bin").unwrap(), &v2));
        // The old version's bytes are gone from the path: it is no longer served as good.
        let mut buf = Vec::new();
        assert!(matches!(
            v1.read_verified(1, &mut buf),
            Err(ReadError::Changed)
        ));
    }

    #[test]
    fn a_file_edited_in_place_is_never_served_as_good() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _store, f) = shared_sample(dir.path());
        let mut buf = Vec::new();
        f.read_verified(1, &mut buf).unwrap();
        // Same size, mtime put back: the ctime still tells, so even the untouched chunk 0 is
        // withheld until the file is hashed again.
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let file = File::options().write(true).open(&path).unwrap();
        file.write_all_at(b"edited", 4096).unwrap();
        file.set_modified(mtime).unwrap();
        assert!(matches!(
            f.read_verified(0, &mut buf),
            Err(ReadError::Changed)
        ));
        assert!(f.is_changed());
        assert!(matches!(
            f.read_verified(1, &mut buf),
            Err(ReadError::Changed)
        ));
    }

    #[test]
    fn equal_chunks_are_copied_from_files_held_here() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let old = sample(dst.path(), "old.bin", 16384);
        let store = Store::new(dst.path(), true).unwrap();
        store.share_as(&old, "old.bin", Some(4096)).unwrap();
        let mut data = std::fs::read(&old).unwrap();
        data[4096 * 2 + 7] ^= 0xff;
        let new = src.path().join("new.bin");
        std::fs::write(&new, &data).unwrap();
        let (info, hashes) = hash_file(&new, "new.bin", Some(4096)).unwrap();
        let f = store.begin_download(&info, &hashes, 0).unwrap();
        assert_eq!(store.reuse_local(&f).unwrap(), vec![0, 1, 3]);
        assert_eq!(f.have().ones().collect::<Vec<_>>(), vec![0, 1, 3]);
        let mut buf = Vec::new();
        f.read_chunk(3, &mut buf).unwrap();
        assert_eq!(buf, &data[4096 * 3..]);
    }

    #[test]
    fn the_peer_that_got_a_chunk_may_ask_for_it_again_at_once() {
        let seeding = InitialSeeding::new(2);
        let t0 = Instant::now();
        seeding.sent(0, Some(7), t0);
        assert!(!seeding.refer_elsewhere(0, Some(7), t0));
        seeding.sent(0, Some(7), t0);
        assert!(
            seeding.refer_elsewhere(0, Some(8), t0),
            "a repeat does not end the referral for others"
        );
        seeding.sent(0, Some(8), t0);
        assert!(
            seeding.refer_elsewhere(0, Some(7), t0),
            "only the last recipient is served again"
        );
    }

    #[test]
    fn partial_names_round_trip() {
        assert_eq!(
            partial_name(".movie.bin.shoal-meta", META),
            Some("movie.bin".into())
        );
        assert_eq!(partial_name("movie.bin.shoal-meta", META), None);
        assert_eq!(partial_name("..shoal-meta", META), None);
    }
}
