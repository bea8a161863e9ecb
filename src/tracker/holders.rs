//! The holders of one indexed file and the chunks each holds, in a slab: each holder's bitfield
//! is a row of a shared block, found through a 16-byte map entry, instead of an allocation of
//! its own (with the allocator's header) behind a 32-byte one. The tracker keeps one bitfield
//! per (peer, file), so this is most of its memory.

use crate::bitfield::Bitfield;
use std::collections::HashMap;
use std::ops::Range;

/// Rows live in blocks of at most this many bytes (or one row, if larger). Growing one buffer
/// by doubling would copy it and free the old copy each time, leaving holes in the heap that
/// stay resident; blocks after the first are allocated whole and never move, and are small
/// enough to fill holes that other allocations leave.
const BLOCK_BYTES: usize = 4096;

/// Peer id -> the chunks it holds, for one file.
pub struct Holders {
    /// Bits per row: the file's chunk count.
    chunks: usize,
    /// Bytes per row.
    stride: usize,
    /// A block holds `1 << block_shift` rows: a power of two, so that finding a row takes a
    /// shift and a mask, not a division.
    block_shift: u32,
    /// Peer id -> its row.
    slots: HashMap<u64, usize>,
    /// Row `slot` is in block `slot >> block_shift`. Blocks are not released when holders
    /// leave (their rows are reused); they go with the file when the last holder does.
    blocks: Vec<Vec<u8>>,
    /// Rows of holders that were removed, handed out again before a block is added.
    free: Vec<usize>,
}

impl Holders {
    pub fn new(chunks: usize) -> Holders {
        let stride = chunks.div_ceil(8);
        Holders {
            chunks,
            stride,
            block_shift: (BLOCK_BYTES / stride.max(1)).max(1).ilog2(),
            slots: HashMap::new(),
            blocks: Vec::new(),
            free: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn contains(&self, peer_id: u64) -> bool {
        self.slots.contains_key(&peer_id)
    }

    /// Every holder with the number of its row (see [`Holders::row`]; valid until the holder
    /// is removed), in no particular order.
    pub fn rows(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.slots.iter().map(|(&id, &slot)| (id, slot))
    }

    /// The chunks held by the holder in row `slot`.
    pub fn row(&self, slot: usize) -> Bitfield<&[u8]> {
        let (block, bytes) = self.locate(slot);
        Bitfield::over(&self.blocks[block][bytes], self.chunks)
            .expect("rows are bitfields of the file's chunks")
    }

    /// Every holder with the chunks it holds, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Bitfield<&[u8]>)> + '_ {
        self.rows().map(|(id, slot)| (id, self.row(slot)))
    }

    /// The chunks `peer_id` holds, to add to; a peer that was not a holder becomes one holding
    /// nothing yet.
    pub fn row_mut(&mut self, peer_id: u64) -> Bitfield<&mut [u8]> {
        let slot = match self.slots.get(&peer_id) {
            Some(&slot) => slot,
            None => {
                let slot = self.new_row();
                self.slots.insert(peer_id, slot);
                slot
            }
        };
        let (block, bytes) = self.locate(slot);
        Bitfield::over(&mut self.blocks[block][bytes], self.chunks)
            .expect("rows are bitfields of the file's chunks")
    }

    /// Forgets `peer_id`'s chunks, if it held any.
    pub fn remove(&mut self, peer_id: u64) {
        if let Some(slot) = self.slots.remove(&peer_id) {
            self.free.push(slot);
        }
    }

    /// An empty row nobody holds: a free one, or the first past the end.
    fn new_row(&mut self) -> usize {
        if let Some(slot) = self.free.pop() {
            // The row still holds the chunks of the holder that left.
            let (block, bytes) = self.locate(slot);
            self.blocks[block][bytes].fill(0);
            return slot;
        }
        // Every row is either someone's or free, so with none free the next is at the end.
        let slot = self.slots.len();
        let (block, _) = self.locate(slot);
        if block == self.blocks.len() {
            // The first block grows with its rows, so a file with few holders costs little.
            let whole = if block == 0 {
                0
            } else {
                self.stride << self.block_shift
            };
            self.blocks.push(Vec::with_capacity(whole));
        }
        let rows = &mut self.blocks[block];
        rows.resize(rows.len() + self.stride, 0);
        slot
    }

    /// The block holding row `slot` and the row's bytes in it.
    fn locate(&self, slot: usize) -> (usize, Range<usize>) {
        let start = (slot & ((1 << self.block_shift) - 1)) * self.stride;
        (slot >> self.block_shift, start..start + self.stride)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(h: &Holders, peer_id: u64) -> Vec<usize> {
        let (_, row) = h.iter().find(|(id, _)| *id == peer_id).expect("a holder");
        row.ones().collect()
    }

    #[test]
    fn each_holder_keeps_its_own_chunks() {
        let mut h = Holders::new(20);
        h.row_mut(7).set(0);
        h.row_mut(9).set(19);
        h.row_mut(7).set(10);
        assert_eq!(
            (h.len(), held(&h, 7), held(&h, 9)),
            (2, vec![0, 10], vec![19])
        );
        assert!(h.contains(9) && !h.contains(8));
    }

    #[test]
    fn a_removed_holders_row_is_reused_empty_without_growing() {
        let mut h = Holders::new(16);
        h.row_mut(1).union_with(&Bitfield::full(16));
        h.row_mut(2).set(3);
        h.remove(1);
        assert!(!h.contains(1));
        h.row_mut(3).set(5);
        assert_eq!((held(&h, 3), held(&h, 2)), (vec![5], vec![3]));
        assert_eq!(
            h.slots.values().max(),
            Some(&1),
            "a free row was there to reuse"
        );
    }

    #[test]
    fn removing_twice_frees_one_row_once() {
        let mut h = Holders::new(8);
        h.row_mut(1).set(0);
        h.remove(1);
        h.remove(1);
        h.row_mut(2).set(1);
        h.row_mut(3).set(2);
        assert_eq!((held(&h, 2), held(&h, 3)), (vec![1], vec![2]));
    }

    #[test]
    fn removing_every_holder_leaves_it_empty() {
        let mut h = Holders::new(8);
        h.row_mut(1).set(0);
        h.row_mut(2).set(0);
        h.remove(2);
        assert!(!h.is_empty());
        h.remove(1);
        assert!(h.is_empty());
        assert_eq!(h.iter().count(), 0);
    }

    #[test]
    fn rows_in_later_blocks_are_kept_apart() {
        // 2,048-byte rows: two to a block.
        let mut h = Holders::new(8 * 2048);
        for peer in 0..5 {
            h.row_mut(peer).set(peer as usize * 1000);
        }
        assert_eq!(h.blocks.len(), 3);
        for peer in 0..5 {
            assert_eq!(held(&h, peer), vec![peer as usize * 1000]);
        }
    }

    #[test]
    fn a_file_with_one_holder_costs_a_row_not_a_block() {
        let mut h = Holders::new(8);
        h.row_mut(1).set(0);
        assert!(h.blocks[0].capacity() < BLOCK_BYTES / 8);
    }
}
