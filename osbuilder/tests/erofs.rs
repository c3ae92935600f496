//! End-to-end tests of `osbuilder disk --fs erofs` on real images: read back
//! by erofs-utils (`fsck.erofs --extract`, `dump.erofs`) and by the host
//! kernel's erofs driver through a loop mount, compared entry by entry with
//! umoci's unpack of the same image, and sized against `mkfs.erofs` on that
//! unpacked tree.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use osbuilder::disk::image::{cmdline, probe, probe_fs, FsKind};
use serde_json::Value;

use common::*;

const MIB: u64 = 1 << 20;

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("osbuilder-erofs-it-").tempdir().unwrap()
}

fn shared_cache() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::Builder::new().prefix("osbuilder-erofs-cache-").tempdir().unwrap()).path().join("cache")
}

struct Disk {
    img: PathBuf,
    report: Value,
}

impl Disk {
    fn offset(&self) -> u64 {
        self.report["disk"]["partition"]["offset"].as_u64().unwrap()
    }
    fn size(&self) -> u64 {
        self.report["disk"]["partition"]["size"].as_u64().unwrap()
    }
    fn fs_bytes(&self) -> u64 {
        self.report["disk"]["filesystem"]["blocks"].as_u64().unwrap() * 4096
    }
    /// The filesystem partition copied out to `dest`.
    fn extract_fs(&self, dest: &Path) -> PathBuf {
        dd_range(&self.img, self.offset(), self.size(), dest)
    }
}

fn build(image: &str, dir: &Path, name: &str, extra: &[&str]) -> Disk {
    let img = dir.join(name);
    let report = dir.join(format!("{name}.json"));
    let mut args = vec!["disk", "--image", image, "--fs", "erofs", "-o", path_str(&img), "--report", path_str(&report)];
    args.extend_from_slice(extra);
    build_ok(&args, &shared_cache());
    let report: Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    Disk { img, report }
}

/// `fsck.erofs --extract` decodes every file (and so every LZ4 cluster);
/// returns the extracted tree.
fn assert_fsck_clean(fs_image: &Path) -> tempfile::TempDir {
    let out_dir = scratch();
    let out = run(tool("fsck.erofs").arg(format!("--extract={}", out_dir.path().join("x").display())).arg(fs_image));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("<E>"), "fsck.erofs {}:\n{text}", fs_image.display());
    out_dir
}

/// What `fsck.erofs --extract` wrote equals umoci's unpack in every file's
/// bytes, type, owner, permission bits, symlink target and device number
/// (erofs-utils 1.5 extracts without setuid/setgid/sticky bits and without
/// hard links, so those two are compared through the kernel's mount instead).
fn assert_extract_matches_umoci(extracted: &Path, layout: &Path, tag: &str) {
    let unpacked = umoci_unpack(layout, tag);
    let relax = |mut m: std::collections::BTreeMap<String, Entry>| {
        for e in m.values_mut() {
            e.mode &= 0o777;
            e.link_group = None;
        }
        m
    };
    assert_trees_equal(&relax(tree_snapshot(&extracted.join("x"))), &relax(tree_snapshot(&unpacked)));
}

/// The partition loop-mounted read-only by the host kernel.
struct Mounted(tempfile::TempDir);

impl Mounted {
    fn new(disk: &Disk) -> Mounted {
        let dir = scratch();
        run(tool("mount")
            .args(["-t", "erofs", "-o"])
            .arg(format!("loop,ro,offset={},sizelimit={}", disk.offset(), disk.size()))
            .arg(&disk.img)
            .arg(dir.path()));
        Mounted(dir)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = tool("umount").arg(self.0.path()).status();
    }
}

fn debian_image() -> String {
    oci_ref(&debian_layout(), DEBIAN_TAG)
}

/// What the kernel reads equals umoci's unpack, mtimes included (clamped to
/// the build's SOURCE_DATE_EPOCH, as every writer of ours does).
fn assert_matches_umoci(disk: &Disk, layout: &Path, tag: &str) -> usize {
    let epoch = disk.report["source_date_epoch"].as_i64().unwrap();
    let mounted = Mounted::new(disk);
    let ours = tree_snapshot(mounted.0.path());
    let unpacked = umoci_unpack(layout, tag);
    let theirs = tree_snapshot(&unpacked);
    assert_trees_equal(&ours, &theirs);
    let mtimes: Vec<String> =
        ours.iter().filter(|(k, e)| theirs[*k].mtime.min(epoch) != e.mtime).take(10).map(|(k, e)| format!("{k}: {} != {}", e.mtime, theirs[k].mtime)).collect();
    assert!(mtimes.is_empty(), "mtimes differ: {mtimes:?}");
    ours.len()
}

/// `osbuilder vm boot --disk` without a report recognises the layout and
/// the filesystem, and so gives the report's kernel arguments.
fn assert_probed(disk: &Disk, fs: FsKind) {
    let (table, dax) = probe(&disk.img).unwrap();
    assert_eq!(probe_fs(&disk.img, table, dax).unwrap(), fs);
    let c = cmdline(table, dax, fs, None);
    assert_eq!(c.virtio_blk, disk.report["cmdline"]["virtio-blk"].as_str().unwrap());
    assert_eq!(c.pmem.as_deref(), disk.report["cmdline"]["pmem"].as_str());
}

fn dump_erofs(args: &[&str], fs_image: &Path) -> String {
    run_stdout(tool("dump.erofs").args(args).arg(fs_image))
}

#[test]
fn debian_erofs_plain_and_lz4hc_hold_exactly_the_image_and_lz4hc_is_within_10_percent_of_mkfs_erofs() {
    let tmp = scratch();
    let plain = build(&debian_image(), tmp.path(), "plain.img", &[]);
    let hc = build(&debian_image(), tmp.path(), "hc.img", &["--compress", "lz4hc"]);
    let lz4 = build(&debian_image(), tmp.path(), "lz4.img", &["--compress", "lz4", "--table", "gpt"]);
    for (disk, compression) in [(&plain, "none"), (&hc, "lz4hc"), (&lz4, "lz4")] {
        assert_eq!(disk.report["disk"]["fs"], "erofs");
        assert_eq!(disk.report["disk"]["filesystem"]["compression"], compression);
        let fs_image = disk.extract_fs(&tmp.path().join(format!("{compression}.erofs")));
        let extracted = assert_fsck_clean(&fs_image);
        assert_extract_matches_umoci(extracted.path(), &debian_layout(), DEBIAN_TAG);
        let sb = dump_erofs(&["-s"], &fs_image);
        assert!(sb.contains(disk.report["disk"]["filesystem"]["uuid"].as_str().unwrap()), "{sb}");
        let entries = assert_matches_umoci(disk, &debian_layout(), DEBIAN_TAG);
        assert!(entries > 5000, "{entries}");
        assert!(disk.report["cmdline"]["virtio-blk"].as_str().unwrap().contains("rootfstype=erofs ro"), "{}", disk.report["cmdline"]);
        assert_probed(disk, FsKind::Erofs);
    }
    assert!(hc.report["disk"]["filesystem"]["compressed_files"].as_u64().unwrap() > 500);
    assert_eq!(plain.report["disk"]["filesystem"]["compressed_files"], 0);

    // mkfs.erofs on umoci's unpack of the same image: the size to stay near.
    let unpacked = umoci_unpack(&debian_layout(), DEBIAN_TAG);
    let theirs = tmp.path().join("mkfs-lz4hc.erofs");
    run(tool("mkfs.erofs").args(["-zlz4hc", "-T0"]).arg(&theirs).arg(unpacked.path()));
    let theirs_plain = tmp.path().join("mkfs-plain.erofs");
    run(tool("mkfs.erofs").arg("-T0").arg(&theirs_plain).arg(unpacked.path()));
    let (ours_hc, mkfs_hc) = (hc.fs_bytes(), fs::metadata(&theirs).unwrap().len());
    let (ours_plain, mkfs_plain) = (plain.fs_bytes(), fs::metadata(&theirs_plain).unwrap().len());
    eprintln!("erofs sizes: lz4hc ours {ours_hc} mkfs.erofs {mkfs_hc}; plain ours {ours_plain} mkfs.erofs {mkfs_plain}");
    assert!(ours_hc * 100 <= mkfs_hc * 110, "lz4hc: ours {ours_hc} vs mkfs.erofs -zlz4hc {mkfs_hc}");
    assert!(ours_plain * 100 <= mkfs_plain * 110, "plain: ours {ours_plain} vs mkfs.erofs {mkfs_plain}");
    assert!(ours_hc * 3 < ours_plain * 2, "lz4hc saves a third or more: {ours_hc} vs {ours_plain}");
}

#[test]
fn awkward_image_keeps_every_file_type_owner_link_and_xattr_in_erofs() {
    let tmp = scratch();
    for (name, extra) in [("awkward-plain.img", &[][..]), ("awkward-lz4.img", &["--compress", "lz4"][..])] {
        let disk = build(&oci_ref(&awkward_layout(), AWKWARD_TAG), tmp.path(), name, extra);
        let extracted = assert_fsck_clean(&disk.extract_fs(&tmp.path().join("p1")));
        assert_extract_matches_umoci(extracted.path(), &awkward_layout(), AWKWARD_TAG);
        assert_matches_umoci(&disk, &awkward_layout(), AWKWARD_TAG);
        let m = Mounted::new(&disk);
        let root = m.0.path();
        assert_eq!(file_capability(&root.join("bin/cap")).as_deref(), Some("cap_net_admin,cap_net_raw=ep"));
        let unpacked = umoci_unpack(&awkward_layout(), AWKWARD_TAG);
        let hex =
            |p: &Path, n: &str| run_stdout(tool("python3").args(["-c", "import os,sys; print(os.getxattr(sys.argv[1], sys.argv[2]).hex())"]).arg(p).arg(n));
        assert_eq!(hex(&root.join("bin/cap"), "security.capability"), hex(&unpacked.join("bin/cap"), "security.capability"));
        assert_eq!(hex(&root.join("srv/tagged"), "user.osbuilder"), hex(&unpacked.join("srv/tagged"), "user.osbuilder"));
    }
}

#[test]
fn dax_erofs_is_plain_with_kata_root_flags_and_bad_combinations_are_refused() {
    let tmp = scratch();
    let disk = build(&debian_image(), tmp.path(), "dax.img", &["--dax"]);
    assert_eq!(disk.offset(), 3 * MIB);
    assert_eq!(disk.report["cmdline"]["pmem"], "root=/dev/pmem0p1 rootflags=dax ro rootfstype=erofs");
    assert_probed(&disk, FsKind::Erofs);
    let bare = build(&oci_ref(&awkward_layout(), AWKWARD_TAG), tmp.path(), "bare.img", &["--table", "none"]);
    assert_probed(&bare, FsKind::Erofs);
    let ext4 = tmp.path().join("ext4.img");
    build_ok(&["disk", "--image", &oci_ref(&awkward_layout(), AWKWARD_TAG), "--table", "gpt", "-o", path_str(&ext4)], &shared_cache());
    let (table, dax) = probe(&ext4).unwrap();
    assert_eq!(probe_fs(&ext4, table, dax).unwrap(), FsKind::Ext4);
    let fs_image = disk.extract_fs(&tmp.path().join("p1"));
    assert_fsck_clean(&fs_image);
    // No inline tails for files: every regular file maps directly under DAX.
    let info = dump_erofs(&["--path=/usr/bin/bash"], &fs_image).to_lowercase();
    assert!(info.contains("layout: 0"), "{info}");
    assert_matches_umoci(&disk, &debian_layout(), DEBIAN_TAG);

    let out = tmp.path().join("bad.img");
    let image = debian_image();
    for (extra, expect) in [
        (&["--dax", "--compress", "lz4"][..], "DAX maps only uncompressed"),
        (&["--headroom", "5%"][..], "--headroom is for ext4"),
        (&["--no-journal"][..], "--no-journal is for ext4"),
        (&["--label", "sixteen-bytes-xx"][..], "15 bytes"),
    ] {
        let mut args = vec!["disk", "--image", &image, "--fs", "erofs", "-o", path_str(&out)];
        args.extend_from_slice(extra);
        let err = build_err(&args, &shared_cache());
        assert!(err.contains(expect), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} left an output");
    }
    let err = build_err(&["disk", "--image", &image, "--compress", "lz4", "-o", path_str(&out)], &shared_cache());
    assert!(err.contains("--compress is for erofs"), "{err}");
}

#[test]
fn same_erofs_command_twice_gives_the_same_bytes() {
    let tmp = scratch();
    let a = build(&debian_image(), tmp.path(), "a.img", &["--compress", "lz4hc", "--table", "gpt"]);
    let b = build(&debian_image(), tmp.path(), "b.img", &["--compress", "lz4hc", "--table", "gpt"]);
    assert_eq!(sha256_file(&a.img), sha256_file(&b.img));
    assert_eq!(a.report["disk"]["sha256"], b.report["disk"]["sha256"]);
    assert_eq!(a.report["disk"]["sha256"].as_str().unwrap(), sha256_file(&a.img));
}
