//! A cpio newc reader for the round-trip target, written apart from the
//! encoder (`initrd::cpio`) so that it does not share its mistakes: it
//! follows the kernel's `buffer-format.rst` and is strict where the kernel
//! is (magic, hex fields, NUL-terminated names, 4-byte alignment, the
//! trailer, nothing after it but zeros).

use std::collections::{HashMap, HashSet};

use crate::rootfs::{Body, Plan};

#[derive(Debug)]
pub struct Entry {
    pub name: Vec<u8>,
    /// ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    /// rdevmajor, rdevminor, namesize, check.
    pub fields: [u32; 13],
    pub data: Vec<u8>,
}

impl Entry {
    fn ino(&self) -> u32 {
        self.fields[0]
    }
}

fn align4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// The entries before `TRAILER!!!`.
pub fn read(bytes: &[u8]) -> Result<Vec<Entry>, String> {
    let mut pos = 0usize;
    let mut out = Vec::new();
    loop {
        let head = bytes.get(pos..pos + 110).ok_or_else(|| format!("header at {pos} is cut short"))?;
        if &head[..6] != b"070701" {
            return Err(format!("bad magic at {pos}: {:?}", String::from_utf8_lossy(&head[..6])));
        }
        let mut fields = [0u32; 13];
        for (i, f) in fields.iter_mut().enumerate() {
            let hex = std::str::from_utf8(&head[6 + 8 * i..14 + 8 * i]).map_err(|_| format!("field {i} at {pos} is not ASCII"))?;
            *f = u32::from_str_radix(hex, 16).map_err(|_| format!("field {i} at {pos} is not hex: {hex:?}"))?;
        }
        let namesize = fields[11] as usize;
        if namesize == 0 {
            return Err(format!("entry at {pos} has an empty name field"));
        }
        let name_field = bytes.get(pos + 110..pos + 110 + namesize).ok_or_else(|| format!("name at {pos} is cut short"))?;
        let (name, nul) = name_field.split_at(namesize - 1);
        if nul != [0] || name.contains(&0) {
            return Err(format!("name at {pos} is not one NUL-terminated string"));
        }
        if fields[12] != 0 {
            return Err(format!("check field of {:?} is {} (newc has none)", String::from_utf8_lossy(name), fields[12]));
        }
        let data_at = align4(pos + 110 + namesize);
        let size = fields[6] as usize;
        let data = bytes.get(data_at..data_at + size).ok_or_else(|| format!("data of {:?} is cut short", String::from_utf8_lossy(name)))?;
        if bytes[pos + 110 + namesize..data_at].iter().any(|&b| b != 0) {
            return Err(format!("name padding of {:?} is not zeros", String::from_utf8_lossy(name)));
        }
        let next = align4(data_at + size);
        if bytes.get(data_at + size..next).is_none_or(|pad| pad.iter().any(|&b| b != 0)) {
            return Err(format!("data padding of {:?} is missing or not zeros", String::from_utf8_lossy(name)));
        }
        pos = next;
        if name == b"TRAILER!!!" {
            if bytes[pos..].iter().any(|&b| b != 0) {
                return Err(format!("{} bytes after the trailer", bytes.len() - pos));
            }
            return Ok(out);
        }
        out.push(Entry { name: name.to_vec(), fields, data: data.to_vec() });
    }
}

/// The archive holds the plan: every name once, in walk order, with the
/// inode's type, mode, owner, link count and clamped mtime; hard links share
/// an inode number and carry the data once (on the last name); symlinks
/// carry their target, devices their numbers.
pub fn check_against_plan(entries: &[Entry], plan: &Plan, epoch: i64) {
    let tree = plan.tree();
    let mut expected = Vec::new();
    plan.walk_paths(|path, seq, ino| expected.push((path.to_vec(), seq, ino)));
    assert_eq!(entries.len(), expected.len(), "one entry per name");
    let mut ino_of = HashMap::new();
    let mut with_data = HashSet::new();
    for (entry, (path, seq, ino)) in entries.iter().zip(&expected) {
        let name: &[u8] = if path.is_empty() { b"." } else { path };
        let shown = String::from_utf8_lossy(name);
        assert_eq!(entry.name, name, "names in walk order");
        let planned = plan.inode(*ino);
        let inode = plan.tree_inode(*ino);
        let f = &entry.fields;
        assert_eq!(f[1], inode.body.file_type_bits() | inode.meta.mode, "mode of {shown}");
        assert_eq!((f[2], f[3]), (inode.meta.uid, inode.meta.gid), "owner of {shown}");
        assert_eq!(f[4], planned.nlink, "link count of {shown}");
        let mtime = inode.meta.mtime.min(epoch).clamp(0, i64::from(u32::MAX)) as u32;
        assert_eq!(f[5], mtime, "mtime of {shown}");
        // One cpio inode number per planned inode, different from all others.
        let prev = ino_of.insert(entry.ino(), *ino);
        assert!(prev.is_none_or(|p| p == *ino), "{shown} shares inode number {} with another inode", entry.ino());
        match &inode.body {
            Body::File(content) => {
                if planned.last_name == *seq {
                    let mut want = Vec::new();
                    std::io::Read::read_to_end(&mut tree.open_content(content).expect("open"), &mut want).expect("read");
                    assert!(entry.data == want, "data of {shown}");
                    assert!(with_data.insert(*ino), "{shown}: data carried twice");
                } else {
                    assert!(entry.data.is_empty(), "{shown}: data before the last name of a hard link");
                }
            }
            Body::Symlink(target) => assert_eq!(&entry.data, target, "target of {shown}"),
            Body::CharDevice { major, minor } | Body::BlockDevice { major, minor } => {
                assert_eq!((f[9], f[10]), (*major, *minor), "device numbers of {shown}");
                assert!(entry.data.is_empty());
            }
            _ => assert!(entry.data.is_empty(), "{shown} carries no data"),
        }
    }
    let files = plan.inodes().iter().filter(|p| matches!(tree.inode(p.idx).body, Body::File(_))).count();
    assert_eq!(with_data.len(), files, "every file's data is in the archive once");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_refuses_what_the_kernel_would() {
        let mut good = Vec::new();
        let mut entry = |name: &[u8], data: &[u8]| {
            let fields = [1u32, 0o100644, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
            good.extend_from_slice(b"070701");
            for f in fields {
                good.extend_from_slice(format!("{f:08X}").as_bytes());
            }
            good.extend_from_slice(name);
            good.push(0);
            good.resize(align4(good.len()), 0);
            good.extend_from_slice(data);
            good.resize(align4(good.len()), 0);
        };
        entry(b"a", b"xyz");
        entry(b"TRAILER!!!", b"");
        let entries = read(&good).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!((entries[0].name.as_slice(), entries[0].data.as_slice()), (&b"a"[..], &b"xyz"[..]));
        assert!(read(&good[..good.len() - 4]).unwrap_err().contains("cut short"));
        let mut bad = good.clone();
        bad[0] = b'1';
        assert!(read(&bad).unwrap_err().contains("bad magic"));
        let mut bad = good.clone();
        bad[110 + 2 + 3] = 1; // the data's padding
        assert!(read(&bad).unwrap_err().contains("padding"));
        let mut bad = good.clone();
        bad.push(7);
        assert!(read(&bad).unwrap_err().contains("after the trailer"));
    }
}
