//! The crc32c flavour ext4 and jbd2 use for metadata checksums.
//!
//! The kernel's `ext4_chksum(seed, data)` is the raw CRC register update: no
//! inversion before or after. The `crc32c` crate computes the standard CRC
//! (inverted in and out), so the raw update is the standard one with the
//! seed and the result inverted.

/// The raw crc32c update of `seed` over `data`, as `ext4_chksum` computes it.
pub fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// Chains [`crc32c_raw`] over several pieces.
pub fn crc32c_parts(seed: u32, parts: &[&[u8]]) -> u32 {
    parts.iter().fold(seed, |crc, part| crc32c_raw(crc, part))
}

/// The per-filesystem checksum seed: the raw crc32c of the UUID from `!0`.
pub fn fs_seed(uuid: &[u8; 16]) -> u32 {
    crc32c_raw(!0, uuid)
}

/// The per-inode seed that inode, extent-block and directory checksums start
/// from: the filesystem seed over the inode number and generation.
pub fn inode_seed(fs_seed: u32, ino: u32, generation: u32) -> u32 {
    crc32c_parts(fs_seed, &[&ino.to_le_bytes(), &generation.to_le_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_update_matches_the_standard_crc() {
        // The standard crc32c check value of "123456789" is 0xe3069283; the
        // raw update from !0 is its complement.
        assert_eq!(crc32c_raw(!0, b"123456789"), !0xe306_9283);
        // Chaining is the same as one update over the concatenation.
        assert_eq!(crc32c_parts(7, &[b"1234", b"56789"]), crc32c_raw(7, b"123456789"));
    }
}
