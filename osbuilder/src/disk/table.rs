//! MBR and GPT encoders: pure functions from a few numbers to sector bytes.
//!
//! GPT is hand-written over `crc32fast` rather than taken from the `gpt`
//! crate: `gpt` writes through `Read + Write + Seek` on a device of the final
//! size, seeking back and forth (primary, backup, entries) and generating
//! random GUIDs unless each one is overridden, while our writers stream into a
//! [`super::Sink`] in increasing offset order with every GUID derived from a
//! seed. The format is small: a 92-byte header with two CRC32s and an array of
//! 128-byte entries, once after LBA 0 and once (mirrored) at the end.

use std::fmt;

/// Bytes in one logical block (sector). Our images always use 512.
pub const SECTOR: u64 = 512;

/// A logical block address (a 512-byte sector index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lba(pub u64);

impl Lba {
    /// The LBA of byte `offset`, which must be sector aligned.
    pub fn of_byte(offset: u64) -> Lba {
        debug_assert_eq!(offset % SECTOR, 0, "byte offset {offset} is not sector aligned");
        Lba(offset / SECTOR)
    }

    pub fn byte(self) -> u64 {
        self.0 * SECTOR
    }
}

/// A GUID held in RFC 4122 (text) byte order: `Guid::parse("4f68bce3-...")`
/// gives bytes `4f 68 bc e3 ...`. GPT stores the first three fields little
/// endian; [`Guid::to_gpt_bytes`] does that conversion.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Parses the canonical 8-4-4-4-12 hex form (either case).
    pub const fn parse(text: &str) -> Guid {
        let text = text.as_bytes();
        assert!(text.len() == 36, "a GUID is 36 characters");
        let mut out = [0u8; 16];
        let mut i = 0;
        let mut n = 0;
        while i < 36 {
            if i == 8 || i == 13 || i == 18 || i == 23 {
                assert!(text[i] == b'-', "a GUID has dashes at 8, 13, 18, 23");
                i += 1;
                continue;
            }
            let hi = hex_digit(text[i]);
            let lo = hex_digit(text[i + 1]);
            out[n] = hi << 4 | lo;
            n += 1;
            i += 2;
        }
        Guid(out)
    }

    /// Sets the RFC 4122 version (4, "random") and variant (10xx) bits on
    /// otherwise arbitrary bytes, so derived GUIDs look like any v4 GUID.
    pub fn v4_from_bytes(mut bytes: [u8; 16]) -> Guid {
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        Guid(bytes)
    }

    /// The mixed-endian on-disk form GPT uses.
    pub fn to_gpt_bytes(self) -> [u8; 16] {
        let b = self.0;
        let mut out = b;
        out[0..4].copy_from_slice(&[b[3], b[2], b[1], b[0]]);
        out[4..6].copy_from_slice(&[b[5], b[4]]);
        out[6..8].copy_from_slice(&[b[7], b[6]]);
        out
    }
}

const fn hex_digit(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("not a hex digit in a GUID"),
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

// ---------------------------------------------------------------- MBR

/// MBR partition type for a Linux filesystem.
pub const MBR_TYPE_LINUX: u8 = 0x83;
/// MBR partition type of GPT's protective partition.
pub const MBR_TYPE_PROTECTIVE: u8 = 0xee;

/// One primary MBR partition, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MbrEntry {
    pub kind: u8,
    pub first: Lba,
    /// Number of sectors.
    pub sectors: u32,
}

/// The first LBA that CHS cannot address (1024 cylinders of 255 * 63).
const CHS_LBA_LIMIT: u64 = 1024 * 255 * 63;

/// The three CHS bytes for `lba` under the conventional 255-head,
/// 63-sector geometry that fdisk assumes for images; addresses beyond
/// cylinder 1023 saturate at 1023/254/63 as fdisk writes them.
pub fn chs_bytes(lba: u64) -> [u8; 3] {
    const HEADS: u64 = 255;
    const SECTORS: u64 = 63;
    let (c, h, s) = if lba >= CHS_LBA_LIMIT { (1023, 254, 63) } else { (lba / (HEADS * SECTORS), (lba / SECTORS) % HEADS, lba % SECTORS + 1) };
    [h as u8, (s as u8 & 0x3f) | ((c >> 2) as u8 & 0xc0), c as u8]
}

/// Encodes an MBR (LBA 0) with up to four primary partitions and no boot
/// code. `first` and the end of each entry must fit in 32 bits (the caller's
/// layout checks that).
pub fn encode_mbr(disk_signature: u32, entries: &[MbrEntry]) -> [u8; 512] {
    assert!(entries.len() <= 4, "an MBR has four primary slots");
    let mut sector = [0u8; 512];
    sector[440..444].copy_from_slice(&disk_signature.to_le_bytes());
    for (slot, entry) in entries.iter().enumerate() {
        let at = 446 + 16 * slot;
        let first = u32::try_from(entry.first.0).expect("mbr start fits 32 bits");
        let last = entry.first.0 + u64::from(entry.sectors) - 1;
        let raw = &mut sector[at..at + 16];
        raw[0] = 0x00; // not bootable: the kernel is loaded by the VMM
        raw[1..4].copy_from_slice(&chs_bytes(entry.first.0));
        raw[4] = entry.kind;
        raw[5..8].copy_from_slice(&chs_bytes(last));
        raw[8..12].copy_from_slice(&first.to_le_bytes());
        raw[12..16].copy_from_slice(&entry.sectors.to_le_bytes());
    }
    sector[510] = 0x55;
    sector[511] = 0xaa;
    sector
}

/// The protective MBR in front of a GPT disk of `disk_sectors` sectors: one
/// 0xEE partition from LBA 1 to the end (capped at 2^32 - 1 sectors), start
/// CHS 0/0/2 and end CHS 0xFFFFFF when the end is not representable, as the
/// UEFI specification says.
pub fn encode_protective_mbr(disk_sectors: u64) -> [u8; 512] {
    let last_lba = disk_sectors - 1;
    let sectors = u32::try_from(last_lba).unwrap_or(u32::MAX);
    let mut sector = encode_mbr(0, &[MbrEntry { kind: MBR_TYPE_PROTECTIVE, first: Lba(1), sectors }]);
    sector[446 + 1..446 + 4].copy_from_slice(&[0x00, 0x02, 0x00]);
    if last_lba >= CHS_LBA_LIMIT {
        sector[446 + 5..446 + 8].copy_from_slice(&[0xff, 0xff, 0xff]);
    }
    sector
}

// ---------------------------------------------------------------- GPT

/// Entries in each partition array (the minimum the UEFI spec allows and
/// what every tool writes).
pub const GPT_ENTRIES: u32 = 128;
/// Bytes in one partition entry.
pub const GPT_ENTRY_SIZE: u32 = 128;
/// Sectors one partition array takes: 128 * 128 / 512.
pub const GPT_ARRAY_SECTORS: u64 = (GPT_ENTRIES as u64 * GPT_ENTRY_SIZE as u64) / SECTOR;
/// Longest partition name, in UTF-16 code units.
pub const GPT_NAME_UNITS: usize = 36;

/// One GPT partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptEntry {
    pub type_guid: Guid,
    pub guid: Guid,
    pub first: Lba,
    /// Inclusive, as GPT stores it.
    pub last: Lba,
    pub attributes: u64,
    /// At most [`GPT_NAME_UNITS`] UTF-16 code units (checked by the caller).
    pub name: String,
}

/// Encodes the partition array: `GPT_ENTRIES` entries, unused ones zero.
pub fn encode_gpt_entries(entries: &[GptEntry]) -> Vec<u8> {
    assert!(entries.len() <= GPT_ENTRIES as usize, "a GPT array has 128 slots");
    let mut array = vec![0u8; (GPT_ENTRIES * GPT_ENTRY_SIZE) as usize];
    for (slot, entry) in entries.iter().enumerate() {
        let raw = &mut array[slot * GPT_ENTRY_SIZE as usize..][..GPT_ENTRY_SIZE as usize];
        raw[0..16].copy_from_slice(&entry.type_guid.to_gpt_bytes());
        raw[16..32].copy_from_slice(&entry.guid.to_gpt_bytes());
        raw[32..40].copy_from_slice(&entry.first.0.to_le_bytes());
        raw[40..48].copy_from_slice(&entry.last.0.to_le_bytes());
        raw[48..56].copy_from_slice(&entry.attributes.to_le_bytes());
        let units: Vec<u16> = entry.name.encode_utf16().collect();
        assert!(units.len() <= GPT_NAME_UNITS, "gpt partition name longer than 36 UTF-16 units");
        for (i, unit) in units.iter().enumerate() {
            raw[56 + 2 * i..58 + 2 * i].copy_from_slice(&unit.to_le_bytes());
        }
    }
    array
}

/// What differs between the primary and the backup GPT header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptHeader {
    pub disk_guid: Guid,
    /// Where this header is.
    pub my_lba: Lba,
    /// Where the other header is.
    pub alternate_lba: Lba,
    pub first_usable: Lba,
    pub last_usable: Lba,
    /// Where this header's copy of the partition array starts.
    pub entries_lba: Lba,
}

/// Encodes one GPT header sector; `entries_crc` is the CRC32 of the whole
/// encoded partition array ([`gpt_entries_crc`]).
pub fn encode_gpt_header(header: &GptHeader, entries_crc: u32) -> [u8; 512] {
    const HEADER_SIZE: u32 = 92;
    let mut sector = [0u8; 512];
    sector[0..8].copy_from_slice(b"EFI PART");
    sector[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes()); // revision 1.0
    sector[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
    // 16..20: header CRC32, computed below over the header with this zeroed.
    // 20..24: reserved, zero.
    sector[24..32].copy_from_slice(&header.my_lba.0.to_le_bytes());
    sector[32..40].copy_from_slice(&header.alternate_lba.0.to_le_bytes());
    sector[40..48].copy_from_slice(&header.first_usable.0.to_le_bytes());
    sector[48..56].copy_from_slice(&header.last_usable.0.to_le_bytes());
    sector[56..72].copy_from_slice(&header.disk_guid.to_gpt_bytes());
    sector[72..80].copy_from_slice(&header.entries_lba.0.to_le_bytes());
    sector[80..84].copy_from_slice(&GPT_ENTRIES.to_le_bytes());
    sector[84..88].copy_from_slice(&GPT_ENTRY_SIZE.to_le_bytes());
    sector[88..92].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&sector[..HEADER_SIZE as usize]);
    sector[16..20].copy_from_slice(&crc.to_le_bytes());
    sector
}

pub fn gpt_entries_crc(array: &[u8]) -> u32 {
    crc32fast::hash(array)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_round_trips_text_and_mixes_endianness_for_gpt() {
        let guid = Guid::parse("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709");
        assert_eq!(guid.to_string(), "4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
        assert_eq!(guid.to_gpt_bytes(), [0xe3, 0xbc, 0x68, 0x4f, 0xcd, 0xe8, 0xb1, 0x4d, 0x96, 0xe7, 0xfb, 0xca, 0xf9, 0x84, 0xb7, 0x09]);
    }

    #[test]
    fn v4_bits_are_set_on_derived_bytes() {
        let guid = Guid::v4_from_bytes([0xff; 16]);
        assert_eq!(guid.to_string(), "ffffffff-ffff-4fff-bfff-ffffffffffff");
        let guid = Guid::v4_from_bytes([0; 16]);
        assert_eq!(guid.to_string(), "00000000-0000-4000-8000-000000000000");
    }

    #[test]
    fn chs_follows_255_63_geometry_and_saturates() {
        let check = |lba, (c, h, s): (u16, u8, u8)| {
            let b = chs_bytes(lba);
            assert_eq!((u16::from(b[1] & 0xc0) << 2 | u16::from(b[2]), b[0], b[1] & 0x3f), (c, h, s), "lba {lba}");
        };
        check(0, (0, 0, 1));
        check(2048, (0, 32, 33));
        check(255 * 63, (1, 0, 1));
        check(1023 * 255 * 63 + 254 * 63 + 62, (1023, 254, 63));
        check(u64::from(u32::MAX), (1023, 254, 63));
    }

    #[test]
    fn mbr_entry_fields_at_their_offsets() {
        let sector = encode_mbr(0xdead_beef, &[MbrEntry { kind: 0x83, first: Lba(2048), sectors: 4096 }]);
        assert_eq!(&sector[440..444], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(sector[446 + 4], 0x83);
        assert_eq!(&sector[446 + 8..446 + 12], &2048u32.to_le_bytes());
        assert_eq!(&sector[446 + 12..446 + 16], &4096u32.to_le_bytes());
        assert!(sector[462..510].iter().all(|&b| b == 0));
        assert_eq!(&sector[510..], &[0x55, 0xaa]);
    }

    #[test]
    fn protective_mbr_covers_the_disk_or_saturates() {
        let small = encode_protective_mbr(14336);
        assert_eq!(small[446], 0, "not bootable");
        assert_eq!(&small[446 + 1..446 + 4], &[0x00, 0x02, 0x00], "start chs 0/0/2");
        assert_eq!(small[446 + 4], 0xee);
        assert_eq!(&small[446 + 5..446 + 8], &chs_bytes(14335), "end chs is the last lba's");
        assert_eq!(&small[446 + 8..446 + 12], &1u32.to_le_bytes());
        assert_eq!(&small[446 + 12..446 + 16], &14335u32.to_le_bytes());
        let huge = encode_protective_mbr(1 << 40);
        assert_eq!(&huge[446 + 5..446 + 8], &[0xff, 0xff, 0xff]);
        assert_eq!(&huge[446 + 12..446 + 16], &u32::MAX.to_le_bytes());
        assert_eq!(&huge[510..], &[0x55, 0xaa]);
    }

    #[test]
    fn gpt_header_crc_covers_92_bytes_with_its_field_zeroed() {
        let header = GptHeader {
            disk_guid: Guid::parse("01234567-89ab-4def-8123-456789abcdef"),
            my_lba: Lba(1),
            alternate_lba: Lba(100),
            first_usable: Lba(34),
            last_usable: Lba(66),
            entries_lba: Lba(2),
        };
        let sector = encode_gpt_header(&header, 0x1234_5678);
        let mut copy = sector;
        copy[16..20].fill(0);
        assert_eq!(u32::from_le_bytes(sector[16..20].try_into().unwrap()), crc32fast::hash(&copy[..92]));
        assert!(sector[92..].iter().all(|&b| b == 0));
        // A CRC32 check value: "123456789" -> cbf43926 (IEEE, reflected).
        assert_eq!(crc32fast::hash(b"123456789"), 0xcbf4_3926);
    }
}
