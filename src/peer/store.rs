//! The peer's chunk store: the files it shares and the partial downloads it is filling.
//!
//! A download of `NAME` into the data dir lives in three hidden files until it is complete:
//! `.NAME.shoal-part` (the data, preallocated, chunks written at their offsets),
//! `.NAME.shoal-meta` (file info and chunk hashes, JSON) and `.NAME.shoal-have` (the bitfield of
//! chunks written, updated one byte at a time). On restart the claimed chunks are re-hashed
//! from disk, so a stale or torn bitmap can cost a refetch but never a corrupt file. A complete
//! file is fsynced and renamed to `NAME`; the open descriptor keeps serving across the rename.
//!
//! Verified chunks go to disk with `O_DIRECT` where the file system allows it (see
//! [`ChunkBuf`]): straight from the receive buffer, without a copy into the page cache.

use crate::bitfield::Bitfield;
use crate::chunking::hash_file;
use crate::protocol::{validate_name, FileInfo, Hash, HashList};
use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::ops::Deref;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
}

/// How long after sending a chunk an origin refers further requests for it to other peers.
/// Long enough for the recipient to register it and others to hear of it (a few refreshes);
/// short enough that a recipient that vanished costs only a short wait, never a deadlock.
pub const ELSEWHERE_WINDOW: Duration = Duration::from_secs(5);

/// Initial seeding (BitTorrent's super-seeding, in a pull protocol): while some chunks of a
/// file have never been sent, an origin's upload is best spent on those. A repeat request for a
/// chunk sent within [`ELSEWHERE_WINDOW`] is refused with `elsewhere`; the downloader fetches it
/// from the peer that got it. Once every chunk has gone out, the origin serves everything.
pub struct InitialSeeding {
    /// Held briefly for in-memory bookkeeping only.
    state: Mutex<(Vec<Option<Instant>>, usize)>,
}

impl InitialSeeding {
    fn new(chunks: usize) -> Self {
        InitialSeeding {
            state: Mutex::new((vec![None; chunks], chunks)),
        }
    }

    /// Whether a request for `index` should go to the peers that already have it.
    pub fn refer_elsewhere(&self, index: u32, now: Instant) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (sent, never_sent) = (&s.0, s.1);
        never_sent > 0
            && sent[index as usize].is_some_and(|t| now.duration_since(t) < ELSEWHERE_WINDOW)
    }

    /// Records that chunk `index` was sent in full; true when that completes the first copy.
    pub fn sent(&self, index: u32, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0[index as usize].replace(now).is_none() {
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

    pub fn path(&self) -> PathBuf {
        self.lock().path.clone()
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
        Ok(if p.have.is_full() {
            Written::LastChunk
        } else {
            Written::Partial
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    #[serde(flatten)]
    info: FileInfo,
    hashes: HashList,
}

/// Every file the peer holds, by name. Only these are ever served.
pub struct Store {
    dir: PathBuf,
    direct_writes: bool,
    files: Mutex<HashMap<String, Arc<StoredFile>>>,
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

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<StoredFile>>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, name: &str) -> Option<Arc<StoredFile>> {
        self.map().get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<StoredFile>> {
        let mut v: Vec<_> = self.map().values().cloned().collect();
        v.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        v
    }

    pub fn complete_count(&self) -> usize {
        self.map().values().filter(|f| f.is_complete()).count()
    }

    /// Shares an existing file under its base name (hashing it once, blocking).
    pub fn share(&self, path: &Path, chunk_size: Option<u32>) -> anyhow::Result<Arc<StoredFile>> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("{} has no usable file name", path.display()))?;
        validate_name(name)
            .map_err(|r| anyhow!("cannot share {}: {}", path.display(), r.message))?;
        if let Some(existing) = self.get(name) {
            return Ok(existing);
        }
        let (info, hashes) = hash_file(path, name, chunk_size)?;
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let chunks = info.chunks() as usize;
        let progress = Progress {
            have: Bitfield::full(chunks),
            have_file: None,
            path: path.to_path_buf(),
        };
        let stored = Arc::new(StoredFile {
            info,
            hashes: Arc::new(hashes),
            file,
            direct: None,
            progress: Mutex::new(progress),
            seeding: Some(InitialSeeding::new(chunks)),
        });
        self.map().insert(name.to_string(), stored.clone());
        Ok(stored)
    }

    /// Shares every visible regular file in the data dir and resumes every partial download.
    /// Returns the names that could not be loaded, with the reason.
    pub fn scan(&self, chunk_size: Option<u32>) -> Vec<(String, anyhow::Error)> {
        let mut failures = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => return vec![(self.dir.display().to_string(), e.into())],
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
            let result = if !is_file {
                continue;
            } else if let Some(name) = partial_name(&file_name, META) {
                self.resume(&name).map(|_| ())
            } else if file_name.starts_with('.') {
                continue;
            } else {
                self.share(&entry.path(), chunk_size).map(|_| ())
            };
            if let Err(e) = result {
                failures.push((file_name, e));
            }
        }
        failures
    }

    fn hidden(&self, name: &str, kind: &str) -> PathBuf {
        self.dir.join(format!(".{name}.{kind}"))
    }

    /// Opens (or creates) the partial download of `info`, keeping its verified chunks.
    pub fn begin_download(
        &self,
        info: &FileInfo,
        hashes: &HashList,
    ) -> anyhow::Result<Arc<StoredFile>> {
        validate_name(&info.name).map_err(|r| anyhow!("{}", r.message))?;
        if hashes.digest() != info.digest || hashes.0.len() as u64 != info.chunks() {
            bail!(
                "the tracker's hash list for {:?} does not match its digest",
                info.name
            );
        }
        if let Some(existing) = self.get(&info.name) {
            if existing.info != *info {
                bail!(
                    "{:?} is already held here with different content",
                    info.name
                );
            }
            return Ok(existing);
        }
        let target = self.dir.join(&info.name);
        if target.exists() {
            bail!(
                "{} already exists; move it away or choose another data dir",
                target.display()
            );
        }
        if self.hidden(&info.name, META).exists() {
            let resumed = self.resume(&info.name)?;
            if resumed.info == *info {
                return Ok(resumed);
            }
            self.map().remove(&info.name);
            tracing::warn!(file = %info.name, "partial download is of different content; starting over");
        }
        self.create_partial(info, hashes)
    }

    fn create_partial(
        &self,
        info: &FileInfo,
        hashes: &HashList,
    ) -> anyhow::Result<Arc<StoredFile>> {
        let part = self.hidden(&info.name, PART);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&part)
            .with_context(|| format!("cannot create {}", part.display()))?;
        file.set_len(info.size)
            .with_context(|| format!("cannot size {} to {} bytes", part.display(), info.size))?;
        let chunks = info.chunks() as usize;
        let have = Bitfield::new(chunks);
        let have_path = self.hidden(&info.name, HAVE);
        std::fs::write(&have_path, have.as_bytes())
            .with_context(|| format!("cannot write {}", have_path.display()))?;
        let meta = Meta {
            info: info.clone(),
            hashes: hashes.clone(),
        };
        let meta_path = self.hidden(&info.name, META);
        std::fs::write(&meta_path, serde_json::to_vec(&meta)?)
            .with_context(|| format!("cannot write {}", meta_path.display()))?;
        self.insert_partial(info.clone(), hashes.clone(), file, have)
    }

    /// Loads a partial download left by an earlier run, re-hashing the chunks it claims.
    fn resume(&self, name: &str) -> anyhow::Result<Arc<StoredFile>> {
        let meta_path = self.hidden(name, META);
        let meta: Meta = serde_json::from_slice(&std::fs::read(&meta_path)?)
            .with_context(|| format!("{} is not valid", meta_path.display()))?;
        if meta.info.name != name || meta.hashes.digest() != meta.info.digest {
            bail!("{} does not describe {name:?}", meta_path.display());
        }
        let part = self.hidden(name, PART);
        let file = OpenOptions::new().read(true).write(true).open(&part)?;
        let chunks = meta.info.chunks() as usize;
        let claimed = std::fs::read(self.hidden(name, HAVE))
            .ok()
            .and_then(|b| Bitfield::from_bytes(b, chunks));
        let claimed = claimed.unwrap_or_else(|| Bitfield::new(chunks));
        let mut have = Bitfield::new(chunks);
        let mut buf = Vec::new();
        for i in claimed.ones() {
            let (offset, len) = meta.info.chunk_span(i as u32);
            buf.resize(len as usize, 0);
            if file.read_exact_at(&mut buf, offset).is_ok() && Hash::of(&buf) == meta.hashes.0[i] {
                have.set(i);
            }
        }
        std::fs::write(self.hidden(name, HAVE), have.as_bytes())?;
        tracing::info!(file = %name, verified = have.count(), chunks, "resuming partial download");
        self.insert_partial(meta.info, meta.hashes, file, have)
    }

    fn insert_partial(
        &self,
        info: FileInfo,
        hashes: HashList,
        file: File,
        have: Bitfield,
    ) -> anyhow::Result<Arc<StoredFile>> {
        let have_path = self.hidden(&info.name, HAVE);
        let have_file = OpenOptions::new().write(true).open(&have_path)?;
        let part = self.hidden(&info.name, PART);
        let direct = self.direct_writes.then(|| open_direct(&part)).flatten();
        let progress = Progress {
            have,
            have_file: Some(have_file),
            path: part,
        };
        let name = info.name.clone();
        let stored = Arc::new(StoredFile {
            info,
            hashes: Arc::new(hashes),
            file,
            direct,
            progress: Mutex::new(progress),
            seeding: None,
        });
        self.map().insert(name, stored.clone());
        Ok(stored)
    }

    /// Makes a complete download durable and visible under its name (blocking).
    pub fn finish(&self, stored: &StoredFile) -> anyhow::Result<PathBuf> {
        let name = &stored.info.name;
        if !stored.is_complete() {
            bail!("{name:?} is not complete");
        }
        stored
            .file
            .sync_all()
            .with_context(|| format!("cannot sync {name:?}"))?;
        let target = self.dir.join(name);
        let mut p = stored.lock();
        if p.have_file.is_none() {
            return Ok(p.path.clone());
        }
        std::fs::rename(&p.path, &target)
            .with_context(|| format!("cannot move {name:?} into place"))?;
        p.path = target.clone();
        p.have_file = None;
        drop(p);
        let _ = std::fs::remove_file(self.hidden(name, META));
        let _ = std::fs::remove_file(self.hidden(name, HAVE));
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(target)
    }
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
            tracing::debug!(path = %path.display(), "writing through the page cache: no O_DIRECT: {e}");
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
        let f = store.begin_download(&info, &hashes).unwrap();
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
        let done = store.finish(&f).unwrap();
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
        let f = store.begin_download(&info, &hashes).unwrap();
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
        let err = store.begin_download(&info, &hashes).err().expect("refused");
        assert!(err.to_string().contains("already exists"), "{err}");
    }

    #[test]
    fn an_origin_sends_every_chunk_once_before_any_twice() {
        let seeding = InitialSeeding::new(3);
        let t0 = Instant::now();
        assert!(!seeding.refer_elsewhere(0, t0));
        seeding.sent(0, t0);
        assert!(
            seeding.refer_elsewhere(0, t0),
            "chunk 0 went out and 1, 2 never did"
        );
        assert!(
            !seeding.refer_elsewhere(0, t0 + ELSEWHERE_WINDOW),
            "the referral expires"
        );
        seeding.sent(1, t0);
        seeding.sent(2, t0);
        assert!(
            !seeding.refer_elsewhere(0, t0),
            "every chunk went out: serve freely"
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
