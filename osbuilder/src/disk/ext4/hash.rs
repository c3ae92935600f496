//! The hashes ext4 keeps on disk: the htree directory hash (half MD4 over the
//! name, unsigned-char flavour) and the extended attribute entry and block
//! hashes.

/// The htree hash of `name` with `seed` (the superblock's `s_hash_seed`),
/// `DX_HASH_HALF_MD4_UNSIGNED`: returns `(hash, minor_hash)` with the low bit
/// of `hash` clear, as the kernel's `ext4fs_dirhash` does.
pub fn dx_hash(name: &[u8], seed: &[u32; 4]) -> (u32, u32) {
    let mut buf = if seed.iter().any(|&w| w != 0) { *seed } else { [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476] };
    let mut rest = name;
    // The kernel hashes while `len > 0`, so an empty name hashes nothing.
    while !rest.is_empty() {
        let input = str_to_hash_buf(rest, rest.len());
        half_md4_transform(&mut buf, &input);
        rest = &rest[rest.len().min(32)..];
    }
    let mut hash = buf[1] & !1;
    if hash == 0x7fff_ffff << 1 {
        hash = (0x7fff_ffff - 1) << 1;
    }
    (hash, buf[2])
}

/// Packs up to 32 bytes of `msg` into eight words, padded with the length
/// (`str2hashbuf_unsigned`); `len` is the length of the remaining name.
fn str_to_hash_buf(msg: &[u8], len: usize) -> [u32; 8] {
    let len32 = len as u32;
    let mut pad = len32 | (len32 << 8);
    pad |= pad << 16;
    let mut out = [pad; 8];
    let mut val = pad;
    let mut slot = 0;
    for (i, &byte) in msg.iter().take(32).enumerate() {
        val = u32::from(byte).wrapping_add(val << 8);
        if i % 4 == 3 {
            out[slot] = val;
            slot += 1;
            val = pad;
        }
    }
    if slot < 8 {
        out[slot] = val;
    }
    out
}

fn half_md4_transform(buf: &mut [u32; 4], input: &[u32; 8]) {
    const K2: u32 = 0o13240474631;
    const K3: u32 = 0o15666365641;
    let f = |x: u32, y: u32, z: u32| z ^ (x & (y ^ z));
    let g = |x: u32, y: u32, z: u32| (x & y).wrapping_add((x ^ y) & z);
    let h = |x: u32, y: u32, z: u32| x ^ y ^ z;
    let [mut a, mut b, mut c, mut d] = *buf;
    macro_rules! round {
        ($f:expr, $a:ident, $b:ident, $c:ident, $d:ident, $x:expr, $s:expr) => {
            $a = $a.wrapping_add($f($b, $c, $d)).wrapping_add($x).rotate_left($s);
        };
    }
    round!(f, a, b, c, d, input[0], 3);
    round!(f, d, a, b, c, input[1], 7);
    round!(f, c, d, a, b, input[2], 11);
    round!(f, b, c, d, a, input[3], 19);
    round!(f, a, b, c, d, input[4], 3);
    round!(f, d, a, b, c, input[5], 7);
    round!(f, c, d, a, b, input[6], 11);
    round!(f, b, c, d, a, input[7], 19);

    round!(g, a, b, c, d, input[1].wrapping_add(K2), 3);
    round!(g, d, a, b, c, input[3].wrapping_add(K2), 5);
    round!(g, c, d, a, b, input[5].wrapping_add(K2), 9);
    round!(g, b, c, d, a, input[7].wrapping_add(K2), 13);
    round!(g, a, b, c, d, input[0].wrapping_add(K2), 3);
    round!(g, d, a, b, c, input[2].wrapping_add(K2), 5);
    round!(g, c, d, a, b, input[4].wrapping_add(K2), 9);
    round!(g, b, c, d, a, input[6].wrapping_add(K2), 13);

    round!(h, a, b, c, d, input[3].wrapping_add(K3), 3);
    round!(h, d, a, b, c, input[7].wrapping_add(K3), 9);
    round!(h, c, d, a, b, input[2].wrapping_add(K3), 11);
    round!(h, b, c, d, a, input[6].wrapping_add(K3), 15);
    round!(h, a, b, c, d, input[1].wrapping_add(K3), 3);
    round!(h, d, a, b, c, input[5].wrapping_add(K3), 9);
    round!(h, c, d, a, b, input[0].wrapping_add(K3), 11);
    round!(h, b, c, d, a, input[4].wrapping_add(K3), 15);

    buf[0] = buf[0].wrapping_add(a);
    buf[1] = buf[1].wrapping_add(b);
    buf[2] = buf[2].wrapping_add(c);
    buf[3] = buf[3].wrapping_add(d);
}

/// The hash of one xattr entry (`ext4_xattr_hash_entry`): the name bytes
/// (without the namespace prefix), then the value as little-endian words,
/// zero-padded to a multiple of four.
pub fn xattr_entry_hash(name: &[u8], value: &[u8]) -> u32 {
    let mut hash = 0u32;
    for &byte in name {
        hash = (hash << 5) ^ (hash >> 27) ^ u32::from(byte);
    }
    for chunk in value.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        hash = (hash << 16) ^ (hash >> 16) ^ u32::from_le_bytes(word);
    }
    hash
}

/// The hash of an xattr block (`ext4_xattr_rehash`) from its entries' hashes.
pub fn xattr_block_hash(entry_hashes: impl IntoIterator<Item = u32>) -> u32 {
    let mut hash = 0u32;
    for h in entry_hashes {
        if h == 0 {
            return 0;
        }
        hash = (hash << 16) ^ (hash >> 16) ^ h;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn str_to_hash_buf_pads_with_the_length() {
        // "abcde": one full word, then "e" on the pad, then pad words.
        let buf = str_to_hash_buf(b"abcde", 5);
        let pad = 0x0505_0505u32;
        assert_eq!(buf[0], 0x6162_6364);
        assert_eq!(buf[1], (pad << 8).wrapping_add(0x65));
        assert!(buf[2..].iter().all(|&w| w == pad));
    }

    #[test]
    fn dx_hash_is_stable_and_even() {
        let seed = [1, 2, 3, 4];
        let (h1, _) = dx_hash(b"name-77777", &seed);
        let (h2, _) = dx_hash(b"name-77777", &seed);
        assert_eq!(h1, h2);
        assert_eq!(h1 & 1, 0);
        assert_ne!(dx_hash(b"name-77778", &seed).0, h1);
        // Names longer than one 32-byte chunk hash every chunk.
        let long = [b'x'; 40];
        let mut other = long;
        other[39] = b'y';
        assert_ne!(dx_hash(&long, &seed), dx_hash(&other, &seed));
    }

    #[test]
    fn dx_hash_matches_debugfs() {
        // `debugfs -R "dx_hash -h 4 -s 00000001-0000-0002-0000-000300000004 NAME"`
        // (hash 4 is half_md4 unsigned; the seed's bytes are read as
        // little-endian words, as the superblock stores them).
        let seed = [0x0100_0000, 0x0200_0000, 0x0300_0000, 0x0400_0000];
        assert_eq!(dx_hash(b"name-77777", &seed), (0xecab_6826, 0x244e_4af7));
        let long = "café-with-a-name-longer-than-32-bytes-total".as_bytes();
        assert_eq!(dx_hash(long, &seed), (0xae51_2c06, 0xaa21_9c36));
    }

    #[test]
    fn xattr_hashes() {
        // One name byte and one value word, by hand.
        assert_eq!(xattr_entry_hash(b"a", b"\x01"), (0x61u32 << 16) ^ 1);
        assert_eq!(xattr_block_hash([1, 2]), (1 << 16) ^ 2);
        assert_eq!(xattr_block_hash([1, 0, 2]), 0, "an unhashed entry zeroes the block hash");
    }
}
