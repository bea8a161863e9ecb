//! The set of chunks a peer holds. Stored and sent as a BitTorrent-style bitfield: bit `i` is
//! bit `7 - i % 8` of byte `i / 8`, spare bits zero. On the wire it is base64 (standard alphabet,
//! padded), so 1,000 chunks cost 168 characters instead of a list of integers.

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A set of `len` chunks over bytes it owns (the default) or borrows: the tracker keeps every
/// holder's set of a file in one slab and works on its rows in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bitfield<B = Box<[u8]>> {
    bytes: B,
    len: u32,
}

impl Bitfield {
    /// An empty set over `len` chunks.
    pub fn new(len: usize) -> Self {
        Bitfield {
            bytes: vec![0; len.div_ceil(8)].into_boxed_slice(),
            len: bit_count(len),
        }
    }

    /// The set holding every one of `len` chunks.
    pub fn full(len: usize) -> Self {
        let mut b = Bitfield {
            bytes: vec![0xff; len.div_ceil(8)].into_boxed_slice(),
            len: bit_count(len),
        };
        b.clear_spare_bits();
        b
    }

    /// Rebuilds a set of `len` chunks from its bytes; refuses a wrong length or set spare bits.
    pub fn from_bytes(bytes: Vec<u8>, len: usize) -> Option<Self> {
        Bitfield::over(bytes.into_boxed_slice(), len)
    }

    fn clear_spare_bits(&mut self) {
        let spare = self.bytes.len() * 8 - self.len();
        if spare > 0 {
            if let Some(last) = self.bytes.last_mut() {
                *last &= !((1u8 << spare) - 1);
            }
        }
    }
}

impl<B: AsRef<[u8]>> Bitfield<B> {
    /// The set of `len` chunks stored in `bytes`; refuses a wrong length or set spare bits.
    pub fn over(bytes: B, len: usize) -> Option<Self> {
        let b = Bitfield {
            bytes,
            len: u32::try_from(len).ok()?,
        };
        (b.as_bytes().len() == len.div_ceil(8) && b.spare_bits_clear()).then_some(b)
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.as_ref()
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> bool {
        i < self.len() && self.as_bytes()[i / 8] & (0x80 >> (i % 8)) != 0
    }

    pub fn count(&self) -> usize {
        self.as_bytes()
            .iter()
            .map(|b| b.count_ones() as usize)
            .sum()
    }

    pub fn is_full(&self) -> bool {
        self.count() == self.len()
    }

    /// Indexes of the chunks held, ascending.
    pub fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len()).filter(|&i| self.get(i))
    }

    /// Whether `self` holds any chunk that `other` lacks.
    pub fn has_any_not_in<O: AsRef<[u8]>>(&self, other: &Bitfield<O>) -> bool {
        self.any_word(other, |a, b| a & !b != 0)
    }

    /// Whether `self` and `other` hold a chunk in common.
    pub fn intersects<O: AsRef<[u8]>>(&self, other: &Bitfield<O>) -> bool {
        self.any_word(other, |a, b| a & b != 0)
    }

    /// Whether `test` holds for some pair of words at the same place in `self` and `other`.
    fn any_word<O: AsRef<[u8]>>(
        &self,
        other: &Bitfield<O>,
        test: impl Fn(u64, u64) -> bool,
    ) -> bool {
        // Eight bytes at a time: the tracker runs this over every holder of a popular file.
        let word = |b: &[u8]| {
            let mut w = [0u8; 8];
            w[..b.len()].copy_from_slice(b);
            u64::from_ne_bytes(w)
        };
        self.as_bytes()
            .chunks(8)
            .zip(other.as_bytes().chunks(8))
            .any(|(a, b)| test(word(a), word(b)))
    }

    /// Human form for the menu: `0-15,17,20-21`.
    pub fn to_ranges(&self) -> String {
        let runs: Vec<String> = self
            .runs()
            .into_iter()
            .map(|(start, end)| {
                if start == end {
                    format!("{start}")
                } else {
                    format!("{start}-{end}")
                }
            })
            .collect();
        runs.join(",")
    }

    /// The set chunks as inclusive runs `(first, last)`, in order.
    pub fn runs(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.len() {
            if !self.get(i) {
                i += 1;
                continue;
            }
            let start = i;
            while i + 1 < self.len() && self.get(i + 1) {
                i += 1;
            }
            out.push((start, i));
            i += 1;
        }
        out
    }

    fn spare_bits_clear(&self) -> bool {
        let spare = self.as_bytes().len() * 8 - self.len();
        spare == 0
            || self
                .as_bytes()
                .last()
                .is_none_or(|b| b & ((1u8 << spare) - 1) == 0)
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Bitfield<B> {
    /// Sets bit `i`; returns whether it was newly set.
    pub fn set(&mut self, i: usize) -> bool {
        assert!(i < self.len(), "chunk {i} out of range 0..{}", self.len());
        let was = self.get(i);
        self.bytes.as_mut()[i / 8] |= 0x80 >> (i % 8);
        !was
    }

    /// Clears bit `i`; returns whether it was set.
    pub fn clear(&mut self, i: usize) -> bool {
        assert!(i < self.len(), "chunk {i} out of range 0..{}", self.len());
        let was = self.get(i);
        self.bytes.as_mut()[i / 8] &= !(0x80 >> (i % 8));
        was
    }

    /// Adds every chunk of `other` (same length) to `self`.
    pub fn union_with<O: AsRef<[u8]>>(&mut self, other: &Bitfield<O>) {
        for (a, b) in self.bytes.as_mut().iter_mut().zip(other.as_bytes()) {
            *a |= b;
        }
    }
}

/// Bit counts are file chunk counts, far below `u32::MAX` (the tracker caps them).
fn bit_count(len: usize) -> u32 {
    u32::try_from(len).expect("a bitfield of at most u32::MAX chunks")
}

/// The wire form of a bitfield before its length is known (the length comes from the file's
/// metadata); see [`Bitfield::from_bytes`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireBits(pub Vec<u8>);

impl<B: AsRef<[u8]>> From<&Bitfield<B>> for WireBits {
    fn from(b: &Bitfield<B>) -> Self {
        WireBits(b.as_bytes().to_vec())
    }
}

impl Serialize for WireBits {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for WireBits {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map(WireBits)
            .map_err(|e| serde::de::Error::custom(format!("bitfield is not base64: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bit_order_matches_bittorrent() {
        let mut b = Bitfield::new(10);
        b.set(0);
        b.set(9);
        assert_eq!(b.as_bytes(), &[0x80, 0x40]);
        assert_eq!(b.to_ranges(), "0,9");
        assert!(b.clear(0) && !b.clear(0));
        assert_eq!(b.as_bytes(), &[0, 0x40]);
    }

    #[test]
    fn full_clears_spare_bits_and_round_trips() {
        let b = Bitfield::full(10);
        assert_eq!(b.as_bytes(), &[0xff, 0xc0]);
        assert!(b.is_full());
        assert_eq!(Bitfield::from_bytes(b.as_bytes().to_vec(), 10), Some(b));
    }

    #[test]
    fn from_bytes_rejects_wrong_length_and_spare_bits() {
        assert!(Bitfield::from_bytes(vec![0xff], 10).is_none());
        assert!(Bitfield::from_bytes(vec![0xff, 0xff], 10).is_none());
        assert!(Bitfield::from_bytes(vec![], 0).is_some());
    }

    #[test]
    fn a_set_over_borrowed_bytes_is_checked_and_edited_in_place() {
        let mut bytes = [0u8; 4];
        assert!(Bitfield::over(&bytes[..2], 10).is_some());
        assert!(Bitfield::over(&bytes[..1], 10).is_none());
        let mut row = Bitfield::over(&mut bytes[1..3], 10).unwrap();
        assert!(row.set(9) && !row.set(9));
        row.union_with(&Bitfield::full(10));
        assert_eq!(bytes, [0, 0xff, 0xc0, 0]);
        assert!(Bitfield::over(&[0xff, 0xff][..], 10).is_none());
    }

    #[test]
    fn ranges_collapse_runs() {
        let mut b = Bitfield::new(24);
        for i in [0, 1, 2, 3, 5, 7, 8, 23] {
            b.set(i);
        }
        assert_eq!(b.to_ranges(), "0-3,5,7-8,23");
        assert_eq!(b.runs(), [(0, 3), (5, 5), (7, 8), (23, 23)]);
    }

    proptest! {
        #[test]
        fn has_any_not_in_and_intersects_match_bit_by_bit(a in proptest::collection::vec(any::<bool>(), 0..200), seed in any::<u64>()) {
            let mut x = Bitfield::new(a.len());
            let mut y = Bitfield::new(a.len());
            for (i, &on) in a.iter().enumerate() {
                if on { x.set(i); }
                if (seed >> (i % 64)) & 1 == 1 { y.set(i); }
            }
            let naive = (0..a.len()).any(|i| x.get(i) && !y.get(i));
            prop_assert_eq!(x.has_any_not_in(&y), naive);
            let common = (0..a.len()).any(|i| x.get(i) && y.get(i));
            prop_assert_eq!(x.intersects(&y), common);
        }

        #[test]
        fn wire_round_trip(bits in proptest::collection::vec(any::<bool>(), 0..300)) {
            let mut b = Bitfield::new(bits.len());
            for (i, &on) in bits.iter().enumerate() { if on { b.set(i); } }
            let json = serde_json::to_string(&WireBits::from(&b)).unwrap();
            let back: WireBits = serde_json::from_str(&json).unwrap();
            let back = Bitfield::from_bytes(back.0, bits.len()).unwrap();
            prop_assert_eq!(back.count(), bits.iter().filter(|&&x| x).count());
            prop_assert_eq!(back, b);
        }
    }
}
