//! The hostile layers of defect 1 (a 1 EiB sparse entry, a 1 GiB PAX path,
//! gzip and zstd bombs), built cheaply in the test: `tests/intake.rs` holds
//! them to the intake's limits and memory bounds, `tests/hostile.rs` runs
//! them with the rest of the corpus.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{write_layout, LayoutLayer, MT_OCI_LAYER_GZIP, MT_OCI_LAYER_ZSTD};

#[derive(Clone, Copy, Debug)]
pub enum Codec {
    Gzip,
    Zstd,
}

/// A layer as `head`, then `body` `count` times, then `tail`: each part
/// compressed on its own (gzip members and zstd frames concatenate), so a
/// gigabyte of uncompressed layer costs the test one compression of `body`.
pub struct Layer {
    pub head: Vec<u8>,
    pub body: Vec<u8>,
    pub count: usize,
    pub tail: Vec<u8>,
}

impl Layer {
    pub fn plain(tar: Vec<u8>) -> Layer {
        Layer { head: tar, body: Vec::new(), count: 0, tail: Vec::new() }
    }

    pub fn compressed(&self, codec: Codec) -> Vec<u8> {
        let one = |bytes: &[u8]| match codec {
            Codec::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
                gz.write_all(bytes).unwrap();
                gz.finish().unwrap()
            }
            Codec::Zstd => zstd::encode_all(bytes, 19).unwrap(),
        };
        let body = one(&self.body);
        let mut out = one(&self.head);
        for _ in 0..self.count {
            out.extend_from_slice(&body);
        }
        out.extend_from_slice(&one(&self.tail));
        out
    }

    pub fn diff_id(&self) -> String {
        let mut h = Sha256::new();
        h.update(&self.head);
        for _ in 0..self.count {
            h.update(&self.body);
        }
        h.update(&self.tail);
        format!("sha256:{}", hex::encode(h.finalize()))
    }
}

/// An OCI layout (tag `evil`) whose image has this one layer.
pub fn layout_with(dir: &Path, layer: &Layer, codec: Codec) -> PathBuf {
    let media_type = match codec {
        Codec::Gzip => MT_OCI_LAYER_GZIP,
        Codec::Zstd => MT_OCI_LAYER_ZSTD,
    };
    write_layout(dir, "evil", &[LayoutLayer { blob: &layer.compressed(codec), media_type, diff_id: layer.diff_id() }])
}

/// A GNU header for `name` (mode 0755 for directories, else 0644; owner 0:0, mtime 1).
pub fn header(kind: tar::EntryType, name: &str, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(if kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
    h.set_size(size);
    h.set_mtime(1);
    h.set_uid(0);
    h.set_gid(0);
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    h
}

/// A GNU base-256 number field.
pub fn base256<const N: usize>(value: u64) -> [u8; N] {
    let mut field = [0u8; N];
    field[0] = 0x80;
    field[N - 8..].copy_from_slice(&value.to_be_bytes());
    field
}

pub const END_OF_ARCHIVE: [u8; 1024] = [0; 1024];

/// One 512-byte GNU sparse header declaring a 1 EiB file `huge` that is all hole.
pub fn sparse_1eib() -> Layer {
    let mut h = header(tar::EntryType::GNUSparse, "huge", 0);
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.realsize = base256(1 << 60);
        // One empty segment at the end: the whole file is a hole.
        gnu.sparse[0].offset = base256(1 << 60);
        gnu.sparse[0].numbytes = *b"00000000000\0";
    }
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    assert_eq!(tar.len(), 512);
    tar.extend_from_slice(&END_OF_ARCHIVE);
    Layer::plain(tar)
}

/// A PAX header whose one `path` record is 1 GiB long (about 1 MB as gzip).
pub fn pax_1gib() -> Layer {
    const RECORD: u64 = 1 << 30;
    const CHUNK: usize = 16 << 20;
    let prefix = format!("{RECORD} path=");
    let value_len = RECORD as usize - prefix.len() - 1;
    let mut head = header(tar::EntryType::XHeader, "PaxHeaders/x", RECORD).as_bytes().to_vec();
    head.extend_from_slice(prefix.as_bytes());
    let mut tail = vec![b'a'; value_len % CHUNK];
    tail.push(b'\n');
    tail.resize(tail.len() + (512 - (RECORD % 512) as usize) % 512, 0);
    tail.extend_from_slice(header(tar::EntryType::Regular, "x", 0).as_bytes());
    tail.extend_from_slice(&END_OF_ARCHIVE);
    Layer { head, body: vec![b'a'; CHUNK], count: value_len / CHUNK, tail }
}

/// One file of 1 GiB of zeros: 1 MB as gzip, a few KB as zstd.
pub fn zeros_1gib() -> Layer {
    const CHUNK: usize = 16 << 20;
    let mut tail = Vec::new();
    tail.extend_from_slice(&END_OF_ARCHIVE);
    Layer { head: header(tar::EntryType::Regular, "zeros", 64 * CHUNK as u64).as_bytes().to_vec(), body: vec![0; CHUNK], count: 64, tail }
}
