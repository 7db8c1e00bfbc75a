//! Object-size padding, so that sizes reveal at most a coarse bucket.
//!
//! Padmé (Nikitin et al., "Reducing Metadata Leakage from Encrypted Files and Communication with
//! PURBs", PETS 2019): a length L is rounded up so that only its top ~log2(log2(L)) bits remain
//! significant, leaking O(log log L) bits at a cost of at most 12 % (less for large L). No object
//! is smaller than [`MIN_OBJECT_LEN`], which hides the size of small metadata entirely.

pub const MIN_OBJECT_LEN: u64 = 4096;

/// The Padmé length for `len`.
pub fn padme(len: u64) -> u64 {
    if len < 2 {
        return len;
    }
    let e = 63 - u64::leading_zeros(len) as u64; // floor(log2(len))
    let s = 64 - u64::leading_zeros(e) as u64; // floor(log2(e)) + 1
    let last_bits = e - s;
    let mask = (1u64 << last_bits) - 1;
    (len + mask) & !mask
}

/// The stored length of an object whose content is `len` bytes.
pub fn padded_len(len: u64) -> u64 {
    padme(len).max(MIN_OBJECT_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padme_rounds_up_within_twelve_percent() {
        for len in [
            2u64,
            3,
            100,
            4095,
            4097,
            1 << 20,
            (1 << 20) + 1,
            8_000_000,
            123_456_789,
        ] {
            let p = padme(len);
            assert!(p >= len, "{len}");
            assert!((p - len) as f64 <= len as f64 * 0.12 + 1.0, "{len} -> {p}");
        }
        // Neighbouring lengths fall into the same bucket.
        assert_eq!(padme(8_000_000), padme(8_000_001));
        assert_eq!(padded_len(10), MIN_OBJECT_LEN);
    }
}
