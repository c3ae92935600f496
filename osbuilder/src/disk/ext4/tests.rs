//! Images checked by their format's owner: e2fsck, debugfs and dumpe2fs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

use super::*;
use crate::disk::SeekSink;
use crate::rootfs::{Body, Dentry, InodeIdx, Metadata, RelPath, Tree};

fn opts(size: Ext4Size) -> Ext4Options {
    Ext4Options {
        size,
        reserved_percent: 5.0,
        source_date_epoch: 1_700_000_000,
        seed: [7; 32],
        label: Some("osb-test".into()),
        journal: true,
    }
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
