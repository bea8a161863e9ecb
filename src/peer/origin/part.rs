//! The hidden data of a pull from the origin while its digest is not known yet, and the chunks
//! of it this peer holds with their hashes. The chunk server reads from it (message 5 without a
//! digest), so that pulling peers pass chunks to each other while the origin transfer runs.

use crate::protocol::{chunk_span, Hash};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};

pub struct PullPart {
    file: File,
    size: u64,
    /// The chunk size in force and the chunks held, with their hashes. Held for map operations
    /// only, never across I/O or an await.
    held: Mutex<(u32, BTreeMap<u32, Hash>)>,
}

impl PullPart {
    pub fn new(file: File, size: u64, chunk_size: u32) -> PullPart {
        PullPart {
            file,
            size,
            held: Mutex::new((chunk_size, BTreeMap::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (u32, BTreeMap<u32, Hash>)> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file's size at the origin.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_size(&self) -> u32 {
        self.lock().0
    }

    /// Adopts the chunk size the tracker says is in force (set by the file's first claim; no
    /// chunk is held before the first reply, so none is cut otherwise).
    pub fn set_chunk_size(&self, chunk_size: u32) {
        self.lock().0 = chunk_size;
    }

    /// Offset and length of chunk `index`.
    pub fn span(&self, index: u32) -> (u64, u32) {
        chunk_span(self.size, self.chunk_size(), index)
    }

    pub fn holds(&self, index: u32) -> bool {
        self.lock().1.contains_key(&index)
    }

    /// The chunks held, with their hashes.
    pub fn held(&self) -> Vec<(u32, Hash)> {
        self.lock().1.iter().map(|(&i, &h)| (i, h)).collect()
    }

    pub fn forget(&self, index: u32) {
        self.lock().1.remove(&index);
    }

    /// Writes chunk `index` (whose hash is `hash`) at its offset and marks it held (blocking).
    pub fn write(&self, index: u32, hash: Hash, data: &[u8]) -> std::io::Result<()> {
        let (offset, _) = self.span(index);
        self.file.write_all_at(data, offset)?;
        self.lock().1.insert(index, hash);
        Ok(())
    }

    /// Reads chunk `index` into `buf` if it is held and its bytes still match its hash, and
    /// returns the hash (blocking).
    pub fn read_verified(&self, index: u32, buf: &mut Vec<u8>) -> Option<Hash> {
        let hash = *self.lock().1.get(&index)?;
        let (offset, len) = self.span(index);
        buf.resize(len as usize, 0);
        self.file.read_exact_at(buf, offset).ok()?;
        (Hash::of(buf) == hash).then_some(hash)
    }
}
