//! Erasure coding of one page (`ec:K+M`): the page and its trailer, `payload` bytes, are cut into
//! K data shards of `shard_len` bytes (the last one padded with zeros) and M parity shards are
//! computed from them with Reed-Solomon over GF(2^8) (`reed-solomon-erasure`, SIMD). A *stripe*
//! is the K + M shards of one page laid end to end; shard `s` goes to the group's slab `s`.
//!
//! The code is systematic: while the K data shards arrive, a page is read without decoding.

use reed_solomon_erasure::galois_8::ReedSolomon;

use crate::{PagerError, PAGE_SIZE};

/// The code of a store: shard counts and sizes, and the Reed-Solomon matrices.
#[derive(Debug)]
pub(super) struct PageCode {
    rs: ReedSolomon,
    data: usize,
    parity: usize,
    shard_len: usize,
    trailer: usize,
}

impl PageCode {
    /// The code of `data` + `parity` shards of a page followed by `trailer` bytes.
    pub(super) fn new(data: usize, parity: usize, trailer: usize) -> Result<Self, PagerError> {
        let rs = ReedSolomon::new(data, parity)
            .map_err(|e| PagerError::Config(format!("ec:{data}+{parity} cannot be used: {e:?}")))?;
        // Shards are a multiple of 8 bytes, so every shard of a record starts aligned.
        let shard_len = (PAGE_SIZE + trailer).div_ceil(data).next_multiple_of(8);
        Ok(Self { rs, data, parity, shard_len, trailer })
    }

    /// Data shards (K).
    pub(super) fn data(&self) -> usize {
        self.data
    }

    /// Data plus parity shards (K + M).
    pub(super) fn shards(&self) -> usize {
        self.data + self.parity
    }

    /// Bytes of one shard: what each slab of a group keeps per record.
    pub(super) fn shard_len(&self) -> usize {
        self.shard_len
    }

    /// Bytes of one page's stripe (every shard).
    pub(super) fn stripe_len(&self) -> usize {
        self.shards() * self.shard_len
    }

    /// Fills `stripe` with the shards of `page` and `trailer` (empty when the store keeps none).
    pub(super) fn encode(&self, page: &[u8], trailer: &[u8], stripe: &mut [u8]) -> Result<(), String> {
        let (data, parity) = stripe.split_at_mut(self.data * self.shard_len);
        data[..PAGE_SIZE].copy_from_slice(page);
        data[PAGE_SIZE..PAGE_SIZE + trailer.len()].copy_from_slice(trailer);
        data[PAGE_SIZE + trailer.len()..].fill(0);
        let data: Vec<&[u8]> = data.chunks_exact(self.shard_len).collect();
        let mut parity: Vec<&mut [u8]> = parity.chunks_exact_mut(self.shard_len).collect();
        self.rs.encode_sep(&data, &mut parity).map_err(|e| format!("encoding a page failed: {e:?}"))
    }

    /// Rebuilds the shards of `stripe` that are not `present` from those that are (at least K):
    /// the data shards only, or with `all` every missing shard.
    pub(super) fn rebuild(&self, stripe: &mut [u8], present: &[bool], all: bool) -> Result<(), String> {
        let mut shards: Vec<(&mut [u8], bool)> =
            stripe.chunks_exact_mut(self.shard_len).zip(present.iter().copied()).collect();
        let rebuilt = if all { self.rs.reconstruct(&mut shards) } else { self.rs.reconstruct_data(&mut shards) };
        rebuilt.map_err(|e| format!("too few shards to rebuild the page: {e:?}"))
    }

    /// Whether every shard of `stripe` agrees with the others (parity recomputed from the data).
    pub(super) fn consistent(&self, stripe: &[u8]) -> bool {
        let shards: Vec<&[u8]> = stripe.chunks_exact(self.shard_len).collect();
        self.rs.verify(&shards).unwrap_or(false)
    }

    /// Copies the page and its trailer out of a stripe whose data shards are whole.
    pub(super) fn split(&self, stripe: &[u8], page: &mut [u8], trailer: &mut [u8]) {
        page.copy_from_slice(&stripe[..PAGE_SIZE]);
        let n = trailer.len().min(self.trailer);
        trailer[..n].copy_from_slice(&stripe[PAGE_SIZE..PAGE_SIZE + n]);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn page(seed: u8) -> Vec<u8> {
        (0..PAGE_SIZE).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn any_k_shards_give_the_page_and_trailer_back() {
        for (k, m, trailer) in [(2, 1, 0), (4, 2, 16), (8, 2, 16), (3, 2, 16)] {
            let code = PageCode::new(k, m, trailer).unwrap();
            assert_eq!(code.shard_len() % 8, 0);
            assert!(code.shard_len() * k >= PAGE_SIZE + trailer);
            let (p, t) = (page(k as u8), vec![0xA5; trailer]);
            let mut stripe = vec![0; code.stripe_len()];
            code.encode(&p, &t, &mut stripe).unwrap();
            assert!(code.consistent(&stripe));
            // Lose every choice of M shards (here: a sliding window of them).
            for first in 0..k + m {
                let mut damaged = stripe.clone();
                let mut present = vec![true; k + m];
                for lost in (first..first + m).map(|s| s % (k + m)) {
                    present[lost] = false;
                    damaged[lost * code.shard_len()..(lost + 1) * code.shard_len()].fill(0xEE);
                }
                code.rebuild(&mut damaged, &present, false).unwrap();
                let (mut back, mut tag) = (vec![0; PAGE_SIZE], vec![0; trailer]);
                code.split(&damaged, &mut back, &mut tag);
                assert_eq!(back, p, "ec:{k}+{m}, lost from shard {first}");
                assert_eq!(tag, t);
                code.rebuild(&mut damaged, &present, true).unwrap();
                assert_eq!(damaged, stripe, "every shard rebuilt");
            }
        }
    }

    #[test]
    fn fewer_than_k_shards_fail_and_a_changed_shard_is_inconsistent() {
        let code = PageCode::new(4, 2, 0).unwrap();
        let mut stripe = vec![0; code.stripe_len()];
        code.encode(&page(7), &[], &mut stripe).unwrap();
        let mut present = vec![true; 6];
        present[0] = false;
        present[1] = false;
        present[5] = false;
        assert!(code.rebuild(&mut stripe.clone(), &present, false).is_err());
        stripe[3 * code.shard_len() + 9] ^= 1;
        assert!(!code.consistent(&stripe));
    }
}
