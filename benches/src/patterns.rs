//! Data patterns that name their block: what verify-mode tools write and check, so a block
//! read back from the wrong place, or stale, is told apart from the right one.

/// 64-bit mix (splitmix64).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fills `out` with the pattern of the blocks starting at `lba`.
pub fn fill_pattern(seed: u64, lba: u64, block_size: usize, out: &mut [u8]) {
    for (i, block) in out.chunks_mut(block_size).enumerate() {
        let b = lba + i as u64;
        let base = mix(seed ^ b.wrapping_mul(0x1000_0000_01b3));
        for (w, word) in block.chunks_mut(8).enumerate() {
            let v = if w == 0 {
                b
            } else {
                mix(base.wrapping_add(w as u64))
            };
            word.copy_from_slice(&v.to_le_bytes()[..word.len()]);
        }
    }
}

/// Index of the first block in `data` (starting at `lba`) that does not hold its pattern.
pub fn check_pattern(seed: u64, lba: u64, block_size: usize, data: &[u8]) -> Option<u64> {
    let mut expect = vec![0u8; block_size];
    for (i, block) in data.chunks(block_size).enumerate() {
        fill_pattern(seed, lba + i as u64, block_size, &mut expect);
        if block != &expect[..block.len()] {
            return Some(lba + i as u64);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_depends_on_lba_and_seed_and_checks() {
        let mut a = vec![0u8; 1024];
        fill_pattern(7, 100, 512, &mut a);
        assert_eq!(check_pattern(7, 100, 512, &a), None);
        assert_eq!(check_pattern(8, 100, 512, &a), Some(100));
        assert_eq!(check_pattern(7, 101, 512, &a), Some(101));
        // The second block alone matches its own pattern: content is per block.
        assert_eq!(check_pattern(7, 101, 512, &a[512..]), None);
        a[700] ^= 1;
        assert_eq!(check_pattern(7, 100, 512, &a), Some(101));
    }
}
