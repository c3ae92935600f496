//! Images checked by their format's owner: e2fsck, debugfs and dumpe2fs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

use super::*;
use crate::disk::SeekSink;
use crate::rootfs::{Body, Dentry, InodeIdx, Metadata, RelPath, Tree};

fn opts(size: Ext4Size) -> Ext4Options {
    Ext4Options { size, reserved_percent: 5.0, source_date_epoch: 1_700_000_000, seed: [7; 32], label: Some("osb-test".into()), journal: true }
}

fn auto() -> Ext4Options {
    opts(Ext4Size::Auto { headroom: Headroom::Bytes(1 << 20) })
}

fn p(s: &str) -> RelPath {
    RelPath::parse_user(s).unwrap()
}

/// Lays out and writes `tree` into `dir/name`; returns the path and layout.
fn build(tree: &Tree, opts: &Ext4Options, dir: &Path, name: &str) -> (PathBuf, Ext4Layout) {
    let keep = std::env::var_os("EXT4_TEST_KEEP").map(PathBuf::from);
    let dir = keep.as_deref().unwrap_or(dir);
    let plan = Plan::new(tree).unwrap();
    let layout = layout(&plan, opts).unwrap();
    let path = dir.join(name);
    let file = File::create(&path).unwrap();
    let mut sink = SeekSink::at(file.try_clone().unwrap(), 0).unwrap();
    layout.write(&plan, &mut sink).unwrap();
    assert_eq!(sink.position(), layout.size_bytes());
    file.set_len(layout.size_bytes()).unwrap();
    (path, layout)
}

/// Runs `e2fsck -fn` and fails the test on any problem.
fn fsck(image: &Path) {
    let out = Command::new("e2fsck").arg("-fn").arg(image).output().expect("e2fsck runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = ["Pass 1", "Pass 2", "Pass 3", "Pass 4", "Pass 5", "files (", "e2fsck 1."];
    let odd: Vec<&str> = stdout.lines().chain(stderr.lines()).filter(|l| !l.trim().is_empty() && !expected.iter().any(|e| l.contains(e))).collect();
    assert!(out.status.success() && odd.is_empty(), "e2fsck -fn {} failed ({}):\n{stdout}\n{stderr}", image.display(), out.status);
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs").arg("-R").arg(request).arg(image).output().expect("debugfs runs");
    assert!(out.status.success(), "debugfs {request}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn debugfs_bytes(image: &Path, request: &str) -> Vec<u8> {
    let out = Command::new("debugfs").arg("-R").arg(request).arg(image).output().expect("debugfs runs");
    out.stdout
}

#[test]
fn tiny_tree_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    tree.add_bytes(&p("/etc/hostname"), b"guest\n".to_vec(), 0o644, 1000).unwrap();
    tree.add_bytes(&p("/bin/sh"), vec![0x7f; 10000], 0o755, 2_000_000_000).unwrap();
    let (image, layout) = build(&tree, &auto(), dir.path(), "tiny.img");
    fsck(&image);
    assert_eq!(debugfs_bytes(&image, "cat /etc/hostname"), b"guest\n");
    assert_eq!(debugfs_bytes(&image, "cat /bin/sh"), vec![0x7f; 10000]);
    let summary = layout.summary();
    assert_eq!(summary.label.as_deref(), Some("osb-test"));
    let header = String::from_utf8(Command::new("dumpe2fs").arg("-h").arg(&image).output().unwrap().stdout).unwrap();
    assert!(header.contains(&summary.uuid), "{header}");
    assert!(header.contains("metadata_csum"), "{header}");
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The directory index of `path` in `tree` (created by `add_bytes` parents).
fn dir_idx(tree: &Tree, path: &str) -> InodeIdx {
    tree.lookup(&p(path)).unwrap()
}

#[test]
fn every_file_type_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    tree.add_bytes(&p("/a/one"), data.clone(), 0o4755, 1000).unwrap();
    tree.add_bytes(&p("/b/two"), b"2".to_vec(), 0o644, 1000).unwrap();
    let root = InodeIdx::ROOT;
    let one = dir_idx(&tree, "a/one");
    let b = dir_idx(&tree, "b");
    tree.dir_entries_mut(b).unwrap().insert(b"link".to_vec(), Dentry { inode: one, layer: 0 });
    tree.put(root, b"dev", Metadata::new(0o755, 0, 0, 5), Body::Dir(Default::default()), 0);
    let dev = dir_idx(&tree, "dev");
    tree.put(dev, b"null", Metadata::new(0o666, 0, 0, 5), Body::CharDevice { major: 1, minor: 3 }, 0);
    tree.put(dev, b"big", Metadata::new(0o600, 0, 6, 5), Body::CharDevice { major: 300, minor: 70000 }, 0);
    tree.put(dev, b"sda", Metadata::new(0o660, 0, 6, 5), Body::BlockDevice { major: 8, minor: 0 }, 0);
    tree.put(dev, b"fifo", Metadata::new(0o644, 0, 0, 5), Body::Fifo, 0);
    tree.put(dev, b"sock", Metadata::new(0o755, 0, 0, 5), Body::Socket, 0);
    tree.put(root, b"tmp", Metadata::new(0o1777, 0, 0, 5), Body::Dir(Default::default()), 0);
    tree.put(root, b"shared", Metadata::new(0o2775, 100_000, 200_000, 5), Body::Dir(Default::default()), 0);
    tree.put(root, b"fast", Metadata::new(0o777, 0, 0, 5), Body::Symlink(b"a/one".to_vec()), 0);
    let slow_target = format!("/{}", "x".repeat(100));
    tree.put(root, b"slow", Metadata::new(0o777, 0, 0, 5), Body::Symlink(slow_target.clone().into_bytes()), 0);
    // A future mtime is clamped to the epoch.
    tree.put(root, b"owned", Metadata::new(0o640, 100_000, 200_000, 4_000_000_000), Body::Fifo, 0);

    let (image, _) = build(&tree, &auto(), dir.path(), "types.img");
    fsck(&image);
    let stat = |path: &str| debugfs(&image, &format!("stat {path}"));
    assert_eq!(sha256(&debugfs_bytes(&image, "cat /b/link")), sha256(&data));
    let s = stat("/a/one");
    assert!(s.contains("Mode:  04755") && s.contains("Links: 2") && s.contains("Size: 100000"), "{s}");
    assert_eq!(stat("/b/link"), s, "a hard link is one inode");
    let s = stat("/dev/null");
    assert!(s.contains("character special") && s.contains("Device major/minor number: 01:03"), "{s}");
    let s = stat("/dev/big");
    assert!(s.contains("Device major/minor number: 300:70000"), "{s}");
    let s = stat("/dev/sda");
    assert!(s.contains("block special") && s.contains("08:00"), "{s}");
    assert!(stat("/dev/fifo").contains("Type: FIFO"));
    assert!(stat("/dev/sock").contains("Type: socket"));
    assert!(stat("/tmp").contains("Mode:  01777"));
    let s = stat("/shared");
    assert!(s.contains("Mode:  02775") && s.contains("User: 100000   Group: 200000"), "{s}");
    assert!(stat("/fast").contains("Fast link dest: \"a/one\""));
    assert_eq!(debugfs_bytes(&image, "cat /slow"), slow_target.as_bytes());
    let s = stat("/owned");
    assert!(s.contains("User: 100000   Group: 200000") && s.contains("mtime: 0x6553f100"), "{s}");
    let s = stat("/");
    assert!(s.contains("Links: 8"), "2 + a, b, dev, tmp, shared, lost+found: {s}");
    let s = stat("/lost+found");
    assert!(s.contains("Mode:  0700") && s.contains("Size: 16384"), "{s}");
    assert!(debugfs(&image, "ls -l /").contains("lost+found"));
}

#[test]
fn xattrs_in_the_inode_and_in_shared_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    for f in ["/bin/ping", "/small", "/big1", "/big2"] {
        tree.add_bytes(&p(f), b"x".to_vec(), 0o755, 0).unwrap();
    }
    let cap: Vec<u8> = vec![0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let set = |tree: &mut Tree, path: &str, name: &str, value: Vec<u8>| {
        let idx = dir_idx(tree, path);
        tree.inode_mut(idx).meta.xattrs.insert(name.as_bytes().to_vec(), value);
    };
    set(&mut tree, "bin/ping", "security.capability", cap.clone());
    set(&mut tree, "small", "user.note", b"hi".to_vec());
    // An ACL in the VFS format: user::rwx, user:1000:r-x, group::r-x, mask::r-x, other::---.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [(1u16, 7u16, u32::MAX), (2, 5, 1000), (4, 5, u32::MAX), (0x10, 5, u32::MAX), (0x20, 0, u32::MAX)] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    for f in ["big1", "big2"] {
        set(&mut tree, f, "security.capability", cap.clone());
        set(&mut tree, f, "user.long", vec![b'v'; 500]);
        set(&mut tree, f, "trusted.t", b"trusted".to_vec());
        set(&mut tree, f, "system.posix_acl_access", acl.clone());
    }
    let (image, _) = build(&tree, &auto(), dir.path(), "xattrs.img");
    fsck(&image);
    let ea = debugfs(&image, "ea_list /bin/ping");
    assert!(ea.contains("security.capability (20) = 01 00 00 02 00 20 00 00"), "{ea}");
    assert!(debugfs(&image, "ea_list /small").contains("user.note (2) = \"hi\""));
    let ea = debugfs(&image, "ea_list /big1");
    assert!(ea.contains("security.capability (20)") && ea.contains("user.long (500)") && ea.contains("trusted.t (7)"), "{ea}");
    assert!(ea.contains("system.posix_acl_access"), "{ea}");
    let acl_of = |s: &str| s.lines().find(|l| l.contains("File ACL:")).unwrap().to_string();
    let (s1, s2) = (debugfs(&image, "stat /big1"), debugfs(&image, "stat /big2"));
    assert_eq!(acl_of(&s1), acl_of(&s2), "identical xattr sets share one block");
    assert!(!acl_of(&s1).contains("File ACL: 0 "), "{s1}");
    assert!(acl_of(&debugfs(&image, "stat /bin/ping")).contains("File ACL: 0"), "in the inode");
}

#[test]
fn a_hundred_thousand_entries_make_a_two_level_htree() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    tree.put(InodeIdx::ROOT, b"many", Metadata::new(0o755, 0, 0, 0), Body::Dir(Default::default()), 0);
    let many = dir_idx(&tree, "many");
    // Names long enough that the leaves outgrow what the root indexes alone.
    for i in 0..100_000 {
        let name = format!("name-{i}-with-a-suffix-for-two-levels");
        tree.put(many, name.as_bytes(), Metadata::new(0o644, 0, 0, 0), Body::Fifo, 0);
    }
    let (image, _) = build(&tree, &auto(), dir.path(), "htree.img");
    fsck(&image);
    let dump = debugfs(&image, "htree_dump /many");
    assert!(dump.contains("Indirect levels: 1"), "{}", &dump[..dump.len().min(2000)]);
    let s = debugfs(&image, "stat /many/name-77777-with-a-suffix-for-two-levels");
    assert!(s.contains("Type: FIFO"), "{s}");
    assert!(debugfs(&image, "stat /many").contains("Flags: 0x81000"), "indexed and extents");
}

#[test]
fn a_sparse_five_gib_file_stays_sparse() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("sparse");
    let f = File::create(&src).unwrap();
    let size = 5u64 << 30;
    f.set_len(size).unwrap();
    // 1500 separate data blocks: more extents than four leaf blocks hold
    // under one index level, so the tree is two levels deep.
    let stride = size / 1500 / 4096 * 4096;
    for i in 0..1500u64 {
        f.write_all_at(&[(i % 250 + 1) as u8; 4096], i * stride + 4096).unwrap();
    }
    let mut tree = Tree::new();
    tree.add_host_path(&src, &p("/big"), None, 0).unwrap();
    let (image, layout) = build(&tree, &auto(), dir.path(), "sparse.img");
    fsck(&image);
    assert!(layout.size_bytes() < size, "only the data blocks are allocated");
    let on_disk = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(on_disk < 64 << 20, "the image uses {on_disk} bytes on disk");
    let s = debugfs(&image, "stat /big");
    assert!(s.contains(&format!("Size: {size}")), "{s}");
    let ex = debugfs(&image, "ex /big");
    assert!(ex.contains(" 2/ 2 "), "a two-level tree: {}", &ex[..ex.len().min(1500)]);
    // Spot-check data blocks through the extent tree.
    let img = File::open(&image).unwrap();
    for i in [0u64, 777, 1499] {
        let logical = (i * stride + 4096) / 4096;
        let out = debugfs(&image, &format!("bmap /big {logical}"));
        let phys: u64 = out.trim().parse().unwrap_or_else(|_| panic!("bmap: {out}"));
        let mut buf = [0u8; 4096];
        img.read_exact_at(&mut buf, phys * 4096).unwrap();
        assert_eq!(buf, [(i % 250 + 1) as u8; 4096]);
        let hole = debugfs(&image, &format!("bmap /big {}", logical + 1));
        assert_eq!(hole.trim(), "0", "a hole after block {logical}");
    }
}

fn some_tree() -> Tree {
    let mut tree = Tree::new();
    for i in 0..300 {
        let data: Vec<u8> = (0..(i * 97 % 20000)).map(|j| (i + j) as u8 | 1).collect();
        tree.add_bytes(&p(&format!("/d{}/f{i}", i % 7)), data, 0o644, i as i64).unwrap();
    }
    tree
}

#[test]
fn fixed_sizes_nearly_full_and_too_small() {
    let dir = tempfile::tempdir().unwrap();
    let tree = some_tree();
    let plan = Plan::new(&tree).unwrap();
    let mut tight = opts(Ext4Size::Auto { headroom: Headroom::Bytes(0) });
    tight.reserved_percent = 0.0;
    let minimal = layout(&plan, &tight).unwrap().size_bytes();
    let (image, full) = build(&tree, &Ext4Options { size: Ext4Size::Fixed(minimal), ..tight.clone() }, dir.path(), "full.img");
    fsck(&image);
    assert_eq!(full.size_bytes(), minimal);
    assert!(full.summary().free_blocks < 64, "{:?}", full.summary());
    let bigger = minimal + (64 << 20);
    let (image, roomy) = build(&tree, &Ext4Options { size: Ext4Size::Fixed(bigger), ..tight.clone() }, dir.path(), "roomy.img");
    fsck(&image);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), bigger);
    assert!(roomy.summary().free_blocks > (60 << 20) / 4096);

    let small = minimal - (1 << 20);
    let err = layout(&plan, &Ext4Options { size: Ext4Size::Fixed(small), ..tight.clone() }).unwrap_err();
    match &err {
        Ext4Error::TooSmall { needed, given } => assert!(*given == small && *needed > small, "{err}"),
        other => panic!("expected TooSmall, got {other}"),
    }
    assert!(err.to_string().contains(&small.to_string()), "{err}");
    let err = layout(&plan, &Ext4Options { size: Ext4Size::Fixed(12345), ..tight }).unwrap_err();
    assert!(matches!(err, Ext4Error::SizeNotBlockMultiple { .. }), "{err}");
}

#[test]
fn two_writes_are_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let tree = some_tree();
    let (a, _) = build(&tree, &auto(), dir.path(), "a.img");
    let (b, _) = build(&tree, &auto(), dir.path(), "b.img");
    fsck(&a);
    assert_eq!(sha256(&std::fs::read(&a).unwrap()), sha256(&std::fs::read(&b).unwrap()));
    // And a stream sink writes the same bytes as a seekable one.
    let plan = Plan::new(&tree).unwrap();
    let layout = layout(&plan, &auto()).unwrap();
    let mut stream = crate::disk::StreamSink::new(Vec::new());
    layout.write(&plan, &mut stream).unwrap();
    assert_eq!(sha256(stream.get_ref()), sha256(&std::fs::read(&a).unwrap()));
    // Another seed, another filesystem UUID.
    let other = super::layout(&plan, &Ext4Options { seed: [8; 32], ..auto() }).unwrap();
    assert_ne!(other.summary().uuid, layout.summary().uuid);
}

#[test]
fn options_are_checked() {
    let tree = Tree::new();
    let plan = Plan::new(&tree).unwrap();
    let err = layout(&plan, &Ext4Options { label: Some("x".repeat(17)), ..auto() }).unwrap_err();
    assert!(matches!(err, Ext4Error::LabelTooLong { .. }), "{err}");
    let err = layout(&plan, &Ext4Options { reserved_percent: 60.0, ..auto() }).unwrap_err();
    assert!(matches!(err, Ext4Error::ReservedPercent(_)), "{err}");
    let mut tree = Tree::new();
    tree.add_bytes(&p("/lost+found"), b"not a dir".to_vec(), 0o644, 0).unwrap();
    let plan = Plan::new(&tree).unwrap();
    let err = layout(&plan, &auto()).unwrap_err();
    assert!(matches!(err, Ext4Error::LostFoundNotDirectory), "{err}");
    // A name longer than a dirent's one-byte length (the tree's own API lets it in).
    let mut tree = Tree::new();
    tree.put(InodeIdx::ROOT, &[b'n'; 256], Metadata::new(0o755, 0, 0, 0), Body::Dir(Default::default()), 0);
    let plan = Plan::new(&tree).unwrap();
    let err = layout(&plan, &auto()).unwrap_err();
    assert!(matches!(err, Ext4Error::NameTooLong { len: 256, .. }), "{err}");
    assert!(err.to_string().ends_with("a name of 256 bytes; ext4 names hold at most 255 bytes"), "{err}");
}

#[test]
fn a_lost_found_from_the_tree_becomes_inode_11() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    tree.add_bytes(&p("/lost+found/kept"), b"k".to_vec(), 0o644, 0).unwrap();
    tree.add_bytes(&p("/a"), b"a".to_vec(), 0o644, 0).unwrap();
    let (image, _) = build(&tree, &auto(), dir.path(), "lf.img");
    fsck(&image);
    assert!(debugfs(&image, "stat /lost+found").starts_with("Inode: 11 "));
    assert_eq!(debugfs_bytes(&image, "cat /lost+found/kept"), b"k");
}
