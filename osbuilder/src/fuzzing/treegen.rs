//! Random trees for the writer targets, decoded from the fuzzer's bytes.
//!
//! The bytes are read as a list of entries (kind, path, mode, owner, mtime,
//! size or target, xattrs) and written as a tar layer with the `tar` crate,
//! then applied with the real applier, so the tree has exactly the shapes a
//! layer can give it: every entry kind, hard links, long and non-UTF-8 names,
//! xattrs (POSIX ACLs included), files with zero runs, and whatever the
//! applier makes of replacements and whiteouts. Every byte string decodes to
//! some tree, and small changes to the bytes make small changes to the tree.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use tar::{EntryType, Header};

use crate::rootfs::Tree;

/// At most this many entries and this many bytes of file data per tree.
const MAX_ENTRIES: usize = 96;
const MAX_DATA: usize = 1 << 20;

/// Names a component is drawn from: short ones collide (replacements, hard
/// links, whiteouts), odd ones test the writers' encoders.
const NAMES: &[&[u8]] = &[
    b"a",
    b"b",
    b"c",
    b"d",
    b"etc",
    b"usr",
    b"bin",
    b"lib",
    b"x.so",
    b".hidden",
    b".wh.a",
    b".wh..wh..opq",
    b"\xff\xfe",
    b"sp ace",
    b"TRAILER!!!",
    b"lost+found",
];

/// Symlink targets: relative, absolute, dangling, looping, long.
const TARGETS: &[&[u8]] = &[b"a", b"../b", b"/etc", b"/", b".", b"c/d", b"nowhere", b"../../.."];

/// Xattr names, with the prefixes the writers treat specially.
const XATTRS: &[&str] = &[
    "user.k",
    "user.longer.name.for.the.shared.block",
    "security.capability",
    "security.selinux",
    "trusted.t",
    "system.posix_acl_access",
    "system.posix_acl_default",
];

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The tree the bytes describe, or `None` when the applier refused the layer
/// they make (a hard link to nothing, a path through a file ...).
pub fn tree(data: &[u8]) -> Option<Tree> {
    let tar = layer(data);
    let mut tree = Tree::new();
    tree.apply_layer(&tar[..], 0, &super::intake()).ok()?;
    Some(tree)
}

/// The tar layer the bytes describe.
pub fn layer(data: &[u8]) -> Vec<u8> {
    let mut b = Bytes(data);
    let mut builder = tar::Builder::new(Vec::new());
    let mut paths: Vec<Vec<u8>> = Vec::new();
    let mut data_left = MAX_DATA;
    while !b.is_empty() && paths.len() < MAX_ENTRIES {
        let kind = b.u8();
        let path = path(&mut b);
        let mut h = Header::new_gnu();
        h.set_size(0);
        h.set_mode(u32::from(b.u16() & 0o7777));
        let owner = b.u8();
        let (uid, gid) = match owner >> 6 {
            0 => (0, 0),
            1 => (u32::from(owner & 0x3f), 100),
            2 => (65_534, 65_534),
            _ => (b.u32() >> 1, b.u32() >> 1),
        };
        h.set_uid(u64::from(uid));
        h.set_gid(u64::from(gid));
        h.set_mtime(match b.u8() {
            0 => 0,
            255 => u64::from(u32::MAX) + 7, // past 2106: clamped by every writer
            m => 1_600_000_000 + u64::from(m) * 1_000_003,
        });
        let xattr_count = kind >> 5;
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        for _ in 0..xattr_count {
            let name = XATTRS[usize::from(b.u8()) % XATTRS.len()];
            let len = usize::from(b.u8() % 80);
            pax.push((format!("SCHILY.xattr.{name}"), b.take(len).to_vec()));
        }
        if !pax.is_empty() {
            let records: Vec<(&str, &[u8])> = pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
            let _ = builder.append_pax_extensions(records);
        }
        let name = OsStr::from_bytes(&path);
        let appended = match kind & 7 {
            0 => {
                h.set_entry_type(EntryType::Directory);
                builder.append_data(&mut h, name, std::io::empty())
            }
            1 | 2 => {
                let content = file_data(&mut b, &mut data_left);
                h.set_entry_type(EntryType::Regular);
                h.set_size(content.len() as u64);
                builder.append_data(&mut h, name, &content[..])
            }
            3 => {
                h.set_entry_type(EntryType::Symlink);
                let t = b.u8();
                let target = if t == 255 { vec![b'l'; 4000] } else { TARGETS[usize::from(t) % TARGETS.len()].to_vec() };
                builder.append_link(&mut h, name, OsStr::from_bytes(&target))
            }
            4 if !paths.is_empty() => {
                h.set_entry_type(EntryType::Link);
                let target = paths[usize::from(b.u8()) % paths.len()].clone();
                builder.append_link(&mut h, name, OsStr::from_bytes(&target))
            }
            5 | 6 => {
                h.set_entry_type(if kind & 7 == 5 { EntryType::Char } else { EntryType::Block });
                let _ = h.set_device_major(u32::from(b.u16()));
                let _ = h.set_device_minor(b.u32() & 0xfffff);
                builder.append_data(&mut h, name, std::io::empty())
            }
            _ => {
                h.set_entry_type(EntryType::Fifo);
                builder.append_data(&mut h, name, std::io::empty())
            }
        };
        if appended.is_ok() {
            paths.push(path);
        }
    }
    builder.into_inner().unwrap_or_default()
}

/// A relative path of one to four components.
fn path(b: &mut Bytes) -> Vec<u8> {
    let depth = 1 + usize::from(b.u8() % 4);
    let mut out = Vec::new();
    for i in 0..depth {
        if i > 0 {
            out.push(b'/');
        }
        let n = b.u8();
        if n >= 240 {
            // Long names: directory blocks fill, htree indexes appear.
            let len = 16 + usize::from(n - 240) * 15;
            out.extend(std::iter::repeat_n(b'n', len - 3));
            out.extend_from_slice(format!("{:03}", b.u8()).as_bytes());
        } else if n >= 200 {
            // Many distinct short names in one directory.
            out.extend_from_slice(format!("f{}", b.u16() % 512).as_bytes());
        } else {
            out.extend_from_slice(NAMES[usize::from(n) % NAMES.len()]);
        }
    }
    out
}

/// File contents: runs of zeros (holes for the disk writers) and of a
/// pattern, each a size class chosen near block boundaries.
fn file_data(b: &mut Bytes, left: &mut usize) -> Vec<u8> {
    let runs = usize::from(b.u8() % 4);
    let mut out = Vec::new();
    for _ in 0..runs {
        let class = b.u8();
        let len = match class % 8 {
            0 => usize::from(b.u8()),
            1 => 4096,
            2 => 4095,
            3 => 4097,
            4 => 4096 * usize::from(1 + b.u8() % 40),
            5 => usize::from(b.u16()),
            6 => 3000 + usize::from(b.u8()),
            _ => 1,
        }
        .min(*left);
        *left -= len;
        if class & 0x80 != 0 {
            out.resize(out.len() + len, 0);
        } else {
            let seed = b.u8();
            // Compressible and not: repeated bytes or a cheap generator.
            let mut x = u32::from(seed) | 1;
            out.extend((0..len).map(|i| {
                if seed & 1 == 0 {
                    seed.wrapping_add((i / 64) as u8)
                } else {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                }
            }));
        }
    }
    out
}
