//! Images checked by their format's owners: fsck.erofs (erofs-utils) and the
//! host kernel's own erofs driver through a loop mount.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::disk::SeekSink;
use crate::rootfs::{Body, Dentry, InodeIdx, Metadata, RelPath, Tree};

const EPOCH: i64 = 1_700_000_000;

fn opts(compression: Compression) -> ErofsOptions {
    ErofsOptions { compression, inline_data: true, size: None, source_date_epoch: EPOCH, seed: [9; 32], label: Some("osb-test".into()) }
}

fn p(s: &str) -> RelPath {
    RelPath::parse_user(s).unwrap()
}

fn build(tree: &Tree, opts: &ErofsOptions, dir: &Path, name: &str) -> (PathBuf, ErofsLayout) {
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

/// `fsck.erofs --extract` must accept the image (it decompresses every file).
fn fsck(image: &Path) {
    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("x");
    let out = Command::new("fsck.erofs").arg(format!("--extract={}", target.display())).arg(image).output().expect("fsck.erofs runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("<E>"), "fsck.erofs {}: {}\n{text}", image.display(), out.status);
}

/// `fsck.erofs --extract` and the extracted files hold the tree's bytes
/// (erofs-utils 1.5 drops setuid bits and hard links when extracting, so
/// only contents, types and symlink targets are compared here).
fn fsck_extract_matches(image: &Path, tree: &Tree) {
    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("x");
    let out = Command::new("fsck.erofs").arg(format!("--extract={}", target.display())).arg(image).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("<E>"), "fsck.erofs {}: {}\n{text}", image.display(), out.status);
    for (path, idx) in tree.walk() {
        let host = target.join(std::ffi::OsStr::from_bytes(&path));
        let shown = String::from_utf8_lossy(&path);
        match &tree.inode(idx).body {
            Body::File(content) => {
                let mut want = vec![0u8; content.len() as usize];
                tree.open_content(content).unwrap().read_exact_at(&mut want, 0).unwrap();
                assert!(std::fs::read(&host).unwrap() == want, "fsck.erofs --extract: /{shown} content");
            }
            Body::Symlink(t) => assert_eq!(std::fs::read_link(&host).unwrap().as_os_str().as_bytes(), &t[..], "/{shown}"),
            Body::Dir(_) => assert!(host.is_dir(), "/{shown}"),
            _ => {}
        }
    }
}

/// Loop-mounts `image` read-only with the host kernel.
struct Mounted(tempfile::TempDir);

impl Mounted {
    fn new(image: &Path) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount").args(["-t", "erofs", "-o", "loop,ro"]).arg(image).arg(dir.path()).output().unwrap();
        assert!(out.status.success(), "mount {}: {}", image.display(), String::from_utf8_lossy(&out.stderr));
        Mounted(dir)
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

fn xattrs_of(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", path.display());
    let mut out = Vec::new();
    for name in names[..n as usize].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        assert!(m >= 0, "lgetxattr {}", path.display());
        value.truncate(m as usize);
        out.push((name.to_vec(), value));
    }
    out.sort();
    out
}

/// Compares every entry of the mounted image with the tree model.
fn compare(tree: &Tree, root: &Path) -> usize {
    let mut seen = 0;
    for (path, idx) in tree.walk() {
        let inode = tree.inode(idx);
        let host = if path.is_empty() { root.to_path_buf() } else { root.join(std::ffi::OsStr::from_bytes(&path)) };
        let shown = String::from_utf8_lossy(&path).into_owned();
        let md = std::fs::symlink_metadata(&host).unwrap_or_else(|e| panic!("/{shown}: {e}"));
        assert_eq!(md.mode() & 0o7777, inode.meta.mode, "/{shown} mode");
        assert_eq!(md.mode() & libc::S_IFMT, inode.body.file_type_bits(), "/{shown} type");
        assert_eq!((md.uid(), md.gid()), (inode.meta.uid, inode.meta.gid), "/{shown} owner");
        assert_eq!(md.mtime(), inode.meta.mtime.clamp(0, EPOCH), "/{shown} mtime");
        match &inode.body {
            Body::File(content) => {
                let mut want = vec![0u8; content.len() as usize];
                tree.open_content(content).unwrap().read_exact_at(&mut want, 0).unwrap();
                assert!(std::fs::read(&host).unwrap() == want, "/{shown} content");
            }
            Body::Symlink(target) => assert_eq!(std::fs::read_link(&host).unwrap().as_os_str().as_bytes(), &target[..], "/{shown}"),
            Body::CharDevice { major, minor } | Body::BlockDevice { major, minor } => {
                assert_eq!((libc::major(md.rdev()), libc::minor(md.rdev())), (*major, *minor), "/{shown} rdev")
            }
            Body::Fifo => assert!(md.file_type().is_fifo()),
            Body::Socket => assert!(md.file_type().is_socket()),
            Body::Dir(entries) => {
                let mut names: Vec<Vec<u8>> = std::fs::read_dir(&host).unwrap().map(|e| e.unwrap().file_name().as_bytes().to_vec()).collect();
                names.sort();
                assert_eq!(names, entries.keys().cloned().collect::<Vec<_>>(), "/{shown} entries");
            }
        }
        let want: Vec<(Vec<u8>, Vec<u8>)> = inode.meta.xattrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(xattrs_of(&host), want, "/{shown} xattrs");
        seen += 1;
    }
    seen
}

fn dir_idx(tree: &Tree, path: &str) -> InodeIdx {
    tree.lookup(&p(path)).unwrap()
}

/// Every kind of entry, hard links, big and small files, compressible and
/// not, a sparse file, xattrs (shared and inline), large ids and varied times.
fn rich_tree(dir: &Path) -> Tree {
    let mut tree = Tree::new();
    let text: Vec<u8> = (0..300_000u32).flat_map(|i| format!("line {} of a compressible file\n", i % 977).into_bytes()).collect();
    tree.add_bytes(&p("/usr/share/doc/text"), text.clone(), 0o644, 1000).unwrap();
    let mut noise = vec![0u8; 150_001];
    let mut x = 0x1234_5678u32;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    // Compressible heads with incompressible tails of every alignment: the
    // last extent is stored plain and must not cross a logical cluster.
    for k in 1..24usize {
        let mut data = text[..k * 900].to_vec();
        data.extend_from_slice(&noise[k * 100..k * 100 + 3000 + k * 50]);
        tree.add_bytes(&p(&format!("/usr/lib/mix{k}")), data, 0o644, 1000).unwrap();
    }
    tree.add_bytes(&p("/usr/lib/noise"), noise, 0o755, EPOCH + 99).unwrap();
    tree.add_bytes(&p("/etc/hostname"), b"guest\n".to_vec(), 0o644, 1000).unwrap();
    tree.add_bytes(&p("/etc/block"), vec![b'b'; 4096], 0o644, 1000).unwrap();
    tree.add_bytes(&p("/etc/block-and-a-bit"), vec![b'c'; 4097], 0o644, 1000).unwrap();
    tree.add_bytes(&p("/etc/empty"), Vec::new(), 0o600, 1000).unwrap();
    tree.add_bytes(&p("/bin/ping"), vec![0x7f; 9000], 0o4755, 1000).unwrap();
    let ping = dir_idx(&tree, "/bin/ping");
    tree.inode_mut(ping).meta.xattrs.insert(b"security.capability".to_vec(), vec![1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    for i in 0..5 {
        let f = format!("/srv/labelled{i}");
        tree.add_bytes(&p(&f), vec![b'0' + i as u8; 100 + i], 0o644, 5).unwrap();
        let idx = dir_idx(&tree, &f);
        tree.inode_mut(idx).meta.xattrs.insert(b"security.selinux".to_vec(), b"system_u:object_r:etc_t:s0\0".to_vec());
        tree.inode_mut(idx).meta.xattrs.insert(b"user.mine".to_vec(), format!("value {i}").into_bytes());
        tree.inode_mut(idx).meta.xattrs.insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
    }
    // A POSIX ACL in the VFS format: user::rwx, user:1000:r-x, group::r-x, mask::r-x, other::r-x.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [(1u16, 7u16, u32::MAX), (2, 5, 1000), (4, 5, u32::MAX), (0x10, 5, u32::MAX), (0x20, 5, u32::MAX)] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    let srv = dir_idx(&tree, "/srv");
    tree.inode_mut(srv).meta.xattrs.insert(b"system.posix_acl_access".to_vec(), acl.clone());
    tree.inode_mut(srv).meta.mode = 0o755;
    // Hard link.
    let bin = dir_idx(&tree, "/bin");
    tree.dir_entries_mut(bin).unwrap().insert(b"ping6".to_vec(), Dentry { inode: ping, layer: 0 });
    let root = InodeIdx::ROOT;
    tree.put(root, b"dev", Metadata::new(0o755, 0, 0, 5), Body::Dir(Default::default()), 0);
    let dev = dir_idx(&tree, "/dev");
    tree.put(dev, b"null", Metadata::new(0o666, 0, 0, 5), Body::CharDevice { major: 1, minor: 3 }, 0);
    tree.put(dev, b"big", Metadata::new(0o600, 0, 6, 5), Body::CharDevice { major: 300, minor: 70000 }, 0);
    tree.put(dev, b"sda", Metadata::new(0o660, 0, 6, 5), Body::BlockDevice { major: 8, minor: 0 }, 0);
    tree.put(dev, b"fifo", Metadata::new(0o644, 0, 0, 5), Body::Fifo, 0);
    tree.put(dev, b"sock", Metadata::new(0o755, 0, 0, 5), Body::Socket, 0);
    tree.put(root, b"tmp", Metadata::new(0o1777, 0, 0, 5), Body::Dir(Default::default()), 0);
    tree.put(root, b"owned", Metadata::new(0o2775, 100_000, 200_000, 4_000_000_000), Body::Dir(Default::default()), 0);
    tree.put(root, b"fast", Metadata::new(0o777, 0, 0, 5), Body::Symlink(b"bin/ping".to_vec()), 0);
    tree.put(root, b"long", Metadata::new(0o777, 0, 0, 5), Body::Symlink(vec![b'y'; 4000]), 0);
    // Names sorting before "." and "..".
    tree.put(root, b"-dash", Metadata::new(0o644, 0, 0, 5), Body::Fifo, 0);
    tree.put(root, b"!bang", Metadata::new(0o644, 0, 0, 5), Body::Fifo, 0);
    // A directory of many blocks.
    tree.put(root, b"many", Metadata::new(0o755, 0, 0, 5), Body::Dir(Default::default()), 0);
    let many = dir_idx(&tree, "/many");
    for i in 0..3000 {
        tree.put(many, format!("entry-with-a-longish-name-{i:05}").as_bytes(), Metadata::new(0o644, 0, 0, 5), Body::Fifo, 0);
    }
    // A sparse file: data, a hole, data.
    let src = dir.join("sparse-src");
    {
        use std::os::unix::fs::FileExt;
        let f = File::create(&src).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", 64 << 20).unwrap();
    }
    tree.add_host_path(&src, &p("/var/sparse"), None, 7).unwrap();
    tree
}

#[test]
fn every_kind_reads_back_uncompressed_and_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let tree = rich_tree(dir.path());
    for (compression, name) in [(Compression::None, "plain.erofs"), (Compression::Lz4, "lz4.erofs"), (Compression::Lz4hc, "lz4hc.erofs")] {
        let (image, layout) = build(&tree, &opts(compression), dir.path(), name);
        fsck_extract_matches(&image, &tree);
        let m = Mounted::new(&image);
        let seen = compare(&tree, m.path());
        assert!(seen > 3000, "{name}: compared {seen}");
        let s = layout.summary();
        if compression == Compression::None {
            assert_eq!(s.compressed_files, 0);
        } else {
            assert!(s.compressed_files >= 1, "{name}: the text file compresses");
        }
        // The sparse file costs its two data blocks, not 64 MiB.
        assert!(layout.size_bytes() < 16 << 20, "{name}: {} bytes", layout.size_bytes());
        drop(m);
    }
}

#[test]
fn lz4hc_is_smaller_than_plain_and_noise_stays_plain() {
    let dir = tempfile::tempdir().unwrap();
    let tree = rich_tree(dir.path());
    let (_, plain) = build(&tree, &opts(Compression::None), dir.path(), "a");
    let (image, hc) = build(&tree, &opts(Compression::Lz4hc), dir.path(), "b");
    assert!(hc.size_bytes() * 2 < plain.size_bytes(), "{} vs {}", hc.size_bytes(), plain.size_bytes());
    let out = Command::new("dump.erofs").arg("--path=/usr/lib/noise").arg(&image).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("layout: 0") || text.contains("layout: 2"), "incompressible data is stored flat: {text}");
    let out = Command::new("dump.erofs").arg("--path=/usr/share/doc/text").arg(&image).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.contains("layout: 1"), "text is compressed with full indexes: {text}");
}

#[test]
fn no_inline_data_for_dax_keeps_files_block_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    tree.add_bytes(&p("/small"), b"tiny".to_vec(), 0o644, 0).unwrap();
    tree.add_bytes(&p("/odd"), vec![3; 5000], 0o644, 0).unwrap();
    let mut o = opts(Compression::None);
    o.inline_data = false;
    let (image, layout) = build(&tree, &o, dir.path(), "dax.erofs");
    fsck(&image);
    assert_eq!(layout.summary().inline_tails, 1, "only the root directory's tail is inline");
    let out = Command::new("dump.erofs").arg("--path=/odd").arg(&image).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.contains("layout: 0"), "flat, not inline: {text}");
    let m = Mounted::new(&image);
    compare(&tree, m.path());
}

#[test]
fn two_writes_are_byte_identical_and_the_seed_decides_the_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let tree = rich_tree(dir.path());
    let (a, la) = build(&tree, &opts(Compression::Lz4hc), dir.path(), "a");
    let (b, _) = build(&tree, &opts(Compression::Lz4hc), dir.path(), "b");
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "same inputs, same bytes");
    let mut other = opts(Compression::Lz4hc);
    other.seed = [1; 32];
    let (_, lc) = build(&tree, &other, dir.path(), "c");
    assert_ne!(la.summary().uuid, lc.summary().uuid);
    let out = Command::new("dump.erofs").arg("-s").arg(&a).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&la.summary().uuid), "dump.erofs shows our uuid: {text}");
}

#[test]
fn fixed_sizes_and_bad_options_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    tree.add_bytes(&p("/a"), vec![1; 10_000], 0o644, 0).unwrap();
    let plan = Plan::new(&tree).unwrap();
    let mut o = opts(Compression::None);
    let need = layout(&plan, &o).unwrap().size_bytes();
    o.size = Some(need - 4096);
    let e = layout(&plan, &o).unwrap_err().to_string();
    assert!(e.contains("at least"), "{e}");
    o.size = Some(need + 1);
    assert!(layout(&plan, &o).unwrap_err().to_string().contains("multiple of 4096"));
    o.size = Some(need + (1 << 20));
    let (image, l) = build(&tree, &o, dir.path(), "padded");
    assert_eq!(l.size_bytes(), need + (1 << 20));
    fsck(&image);
    let mut o = opts(Compression::None);
    o.label = Some("a-label-that-is-far-too-long".into());
    assert!(layout(&plan, &o).unwrap_err().to_string().contains("15 bytes"));
    let mut bad = Tree::new();
    bad.add_bytes(&p("/x"), b"x".to_vec(), 0o644, 0).unwrap();
    let x = dir_idx(&bad, "/x");
    bad.inode_mut(x).meta.xattrs.insert(b"system.odd".to_vec(), b"v".to_vec());
    let e = layout(&Plan::new(&bad).unwrap(), &opts(Compression::None)).unwrap_err().to_string();
    assert!(e.contains("/x") && e.contains("system.odd"), "{e}");
}
