//! Cutting a file into fixed-size chunks and hashing each with BLAKE3: what a peer publishes
//! when it registers a file, and what downloaders verify every chunk against.

use crate::protocol::{FileInfo, Hash, HashList};
use crate::units;
use anyhow::{bail, Context};
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Smallest and largest chunk sizes accepted. Tiny chunks bloat the hash list and the tracker's
/// bitsets; huge ones defeat parallelism and the frame cap on chunk bodies.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 64 * 1024 * 1024;

pub fn check_chunk_size(chunk_size: u32) -> anyhow::Result<()> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        bail!(
            "a chunk size must be {} to {}, not {}",
            units::bytes(MIN_CHUNK_SIZE.into()),
            units::bytes(MAX_CHUNK_SIZE.into()),
            units::bytes(chunk_size.into())
        );
    }
    Ok(())
}

/// Chunks per file that [`auto_chunk_size`] aims for: enough that a swarm can pass a file on in
/// small steps (each relay hop costs one chunk's transfer time), few enough that per-chunk costs
/// (requests, hashes, bitfields) stay small.
pub const TARGET_CHUNKS: u64 = 1024;
/// Bounds of the automatic chunk size.
pub const AUTO_MIN_CHUNK: u32 = 64 * 1024;
pub const AUTO_MAX_CHUNK: u32 = 16 * 1024 * 1024;

/// The chunk size for a file of `size` bytes when none is configured: the power of two that
/// gives about [`TARGET_CHUNKS`] chunks, within 64 KiB to 16 MiB (32 MiB -> 64 KiB,
/// 1 GiB -> 1 MiB, 64 GiB -> 16 MiB).
pub fn auto_chunk_size(size: u64) -> u32 {
    let ideal = size.div_ceil(TARGET_CHUNKS).next_power_of_two();
    ideal.clamp(u64::from(AUTO_MIN_CHUNK), u64::from(AUTO_MAX_CHUNK)) as u32
}

/// Reads `path` once and returns its metadata (shared under `name`) and chunk hashes. With no
/// `chunk_size`, the size is chosen by [`auto_chunk_size`].
pub fn hash_file(
    path: &Path,
    name: &str,
    chunk_size: Option<u32>,
) -> anyhow::Result<(FileInfo, HashList)> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    let chunk_size = chunk_size.unwrap_or_else(|| auto_chunk_size(len));
    check_chunk_size(chunk_size)?;
    let mut buf = vec![0u8; chunk_size as usize];
    let mut hashes = Vec::new();
    let mut size = 0u64;
    loop {
        let n = read_full(&mut file, &mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hashes.push(Hash::of(&buf[..n]));
        size += n as u64;
        if n < buf.len() {
            break;
        }
    }
    let hashes = HashList(hashes);
    let info = FileInfo {
        name: name.to_string(),
        size,
        chunk_size,
        digest: hashes.digest(),
    };
    Ok((info, hashes))
}

/// Like `read_exact`, but a short read at end of file is not an error: returns bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn hashes_every_chunk_and_the_short_tail() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        f.write_all(&data).unwrap();
        let (info, hashes) = hash_file(f.path(), "x", Some(4096)).unwrap();
        assert_eq!(info.size, 10_000);
        assert_eq!(info.chunks(), 3);
        assert_eq!(hashes.0.len(), 3);
        assert_eq!(hashes.0[2], Hash::of(&data[8192..]));
        assert_eq!(info.digest, hashes.digest());
    }

    #[test]
    fn empty_file_has_no_chunks() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let (info, hashes) = hash_file(f.path(), "empty", Some(4096)).unwrap();
        assert_eq!((info.size, info.chunks(), hashes.0.len()), (0, 0, 0));
    }

    #[test]
    fn automatic_chunk_size_aims_at_a_thousand_chunks() {
        assert_eq!(auto_chunk_size(0), AUTO_MIN_CHUNK);
        assert_eq!(auto_chunk_size(32 << 20), 64 * 1024);
        assert_eq!(auto_chunk_size(256 << 20), 256 * 1024);
        assert_eq!(auto_chunk_size(1 << 30), 1 << 20);
        assert_eq!(auto_chunk_size((1 << 30) + 1), 2 << 20);
        assert_eq!(auto_chunk_size(1 << 40), AUTO_MAX_CHUNK);
        for size in [1u64, 4096, 10 << 20, 3 << 30] {
            check_chunk_size(auto_chunk_size(size)).unwrap();
        }
    }

    #[test]
    fn refuses_absurd_chunk_sizes() {
        assert!(check_chunk_size(1).is_err());
        assert!(check_chunk_size(u32::MAX).is_err());
        assert!(check_chunk_size(1 << 20).is_ok());
    }
}
