//! Kata's DAX / NVDIMM rootfs layout: the NVDIMM PFN info block.
//!
//! Kata reserves the first 2 MiB of a DAX image for namespace metadata. The
//! kernel's pmem driver finds the PFN info block (`struct nd_pfn_sb`,
//! drivers/nvdimm/pfn.h) at 4 KiB, checks its signature and fletcher64
//! checksum, and exposes the device's data from `dataoff` (2 MiB) on as
//! `/dev/pmem0`. So the image holds two MBRs: one at 0 for virtio-blk
//! readers, whose partition 1 starts at 3 MiB, and one at 2 MiB for pmem
//! readers, whose partition 1 starts 1 MiB after it (the same 3 MiB point).
//! The MBRs and the rest of the layout are planned in [`super::layout`].

/// Where the PFN info block sits in the image.
pub const PFN_INFO_OFFSET: u64 = 4096;
/// Size of the PFN info block.
pub const PFN_INFO_SIZE: usize = 4096;
/// Bytes reserved for namespace metadata; pmem data (and the second MBR)
/// start here.
pub const DAX_DATA_OFFSET: u64 = 2 << 20;
/// Mapping alignment Kata records, and the multiple the image is padded to
/// (guest memory regions for pmem are 2 MiB aligned).
pub const DAX_ALIGN: u64 = 2 << 20;

const PFN_SIGNATURE: &[u8; 16] = b"NVDIMM_PFN_INFO\0";
/// `PFN_MODE_RAM`: the page array lives in guest RAM, not on the device.
const PFN_MODE_RAM: u32 = 1;
/// Version 1.2 has start_pad, end_trunc and align; Kata writes 2, so the
/// kernel fills page_size and page_struct_size with its own defaults.
const PFN_VERSION_MINOR: u16 = 2;
const CHECKSUM_OFFSET: usize = 4088;

/// The kernel's `nd_fletcher64` over the block as 1024 little-endian u32
/// words: `lo += w; hi += lo`, both wrapping at 32 bits, giving `hi << 32 | lo`.
pub fn fletcher64(block: &[u8; PFN_INFO_SIZE]) -> u64 {
    let (mut lo, mut hi) = (0u32, 0u32);
    for word in block.chunks_exact(4) {
        lo = lo.wrapping_add(u32::from_le_bytes(word.try_into().expect("chunks of 4")));
        hi = hi.wrapping_add(lo);
    }
    u64::from(hi) << 32 | u64::from(lo)
}

/// The PFN info block exactly as Kata writes it: uuid and parent uuid zero
/// (an unlabelled namespace has a zero parent uuid), version 0.2, data at
/// 2 MiB, npfns 0, mode RAM, no padding or truncation, 2 MiB alignment.
pub fn encode_pfn_info() -> [u8; PFN_INFO_SIZE] {
    let mut block = [0u8; PFN_INFO_SIZE];
    block[0..16].copy_from_slice(PFN_SIGNATURE);
    // 16..32 uuid, 32..48 parent_uuid, 48..52 flags: zero.
    block[52..54].copy_from_slice(&0u16.to_le_bytes()); // version_major
    block[54..56].copy_from_slice(&PFN_VERSION_MINOR.to_le_bytes());
    block[56..64].copy_from_slice(&DAX_DATA_OFFSET.to_le_bytes()); // dataoff
    block[64..72].copy_from_slice(&0u64.to_le_bytes()); // npfns
    block[72..76].copy_from_slice(&PFN_MODE_RAM.to_le_bytes());
    block[76..80].copy_from_slice(&0u32.to_le_bytes()); // start_pad
    block[80..84].copy_from_slice(&0u32.to_le_bytes()); // end_trunc
    block[84..88].copy_from_slice(&(DAX_ALIGN as u32).to_le_bytes()); // align
                                                                      // 88..4088 padding (page_size and page_struct_size only from 1.4): zero.
    let checksum = fletcher64(&block);
    block[CHECKSUM_OFFSET..].copy_from_slice(&checksum.to_le_bytes());
    block
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Reads `block` with an independent Python implementation and returns
    /// its fields and its own fletcher64 of the block (checksum zeroed).
    fn python_view(block: &[u8]) -> serde_json::Value {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pfn");
        std::fs::write(&path, block).unwrap();
        let script = r#"
import json, struct, sys
b = open(sys.argv[1], 'rb').read()
assert len(b) == 4096
def fletcher(data):
    lo = hi = 0
    for (w,) in struct.iter_unpack('<I', data):
        lo = (lo + w) & 0xffffffff
        hi = (hi + lo) & 0xffffffff
    return (hi << 32) | lo
zeroed = b[:4088] + bytes(8)
print(json.dumps({
    'signature': b[0:16].hex(),
    'uuid': b[16:32].hex(), 'parent_uuid': b[32:48].hex(),
    'flags': struct.unpack_from('<I', b, 48)[0],
    'version_major': struct.unpack_from('<H', b, 52)[0],
    'version_minor': struct.unpack_from('<H', b, 54)[0],
    'dataoff': struct.unpack_from('<Q', b, 56)[0],
    'npfns': struct.unpack_from('<Q', b, 64)[0],
    'mode': struct.unpack_from('<I', b, 72)[0],
    'start_pad': struct.unpack_from('<I', b, 76)[0],
    'end_trunc': struct.unpack_from('<I', b, 80)[0],
    'align': struct.unpack_from('<I', b, 84)[0],
    'padding_zero': all(x == 0 for x in b[88:4088]),
    'checksum': struct.unpack_from('<Q', b, 4088)[0],
    'fletcher_of_zeroed': fletcher(zeroed),
    'fletcher_raw': fletcher(b),
}))
"#;
        let out = Command::new("python3").arg("-c").arg(script).arg(&path).output().expect("python3 runs");
        assert!(out.status.success(), "python3: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    #[test]
    fn pfn_info_fields_and_checksum_match_an_independent_reader() {
        let block = encode_pfn_info();
        let view = python_view(&block);
        let expected = serde_json::json!({
            "signature": hex::encode(b"NVDIMM_PFN_INFO\0"),
            "uuid": "00".repeat(16), "parent_uuid": "00".repeat(16),
            "flags": 0, "version_major": 0, "version_minor": 2,
            "dataoff": 2 * 1024 * 1024, "npfns": 0, "mode": 1,
            "start_pad": 0, "end_trunc": 0, "align": 2 * 1024 * 1024,
            "padding_zero": true,
            "checksum": view["fletcher_of_zeroed"],
            "fletcher_of_zeroed": view["fletcher_of_zeroed"],
            "fletcher_raw": view["fletcher_raw"],
        });
        assert_eq!(view, expected);
        assert_ne!(view["checksum"], serde_json::json!(0));
    }

    #[test]
    fn fletcher64_agrees_with_python_on_an_arbitrary_block() {
        // Words large enough that both sums wrap many times.
        let mut block = [0u8; PFN_INFO_SIZE];
        for (i, byte) in block.iter_mut().enumerate() {
            *byte = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] | 0x80;
        }
        let view = python_view(&block);
        assert_eq!(serde_json::json!(fletcher64(&block)), view["fletcher_raw"]);
        assert_eq!(fletcher64(&[0; PFN_INFO_SIZE]), 0);
    }

    #[test]
    fn fletcher64_small_known_value() {
        // Two words 1, 2 then zeros: lo = 3, hi = 1 + 3 * 1023 (lo stays 3).
        let mut block = [0u8; PFN_INFO_SIZE];
        block[0] = 1;
        block[4] = 2;
        assert_eq!(fletcher64(&block), (1 + 3 * 1023) << 32 | 3);
    }
}
