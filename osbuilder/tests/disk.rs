//! End-to-end tests of `osbuilder disk` on real images: the Debian base image
//! and an image with every awkward file type, written to raw disks and read
//! back by the tools that own the formats (e2fsck, debugfs, dumpe2fs from
//! e2fsprogs; sfdisk, sgdisk) and compared entry by entry with umoci's unpack
//! of the same image.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use common::*;

const MIB: u64 = 1 << 20;
const GPT_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const EXT4_FEATURES: &[&str] = &[
    "has_journal",
    "ext_attr",
    "dir_index",
    "filetype",
    "extent",
    "64bit",
    "flex_bg",
    "sparse_super",
    "large_file",
    "huge_file",
    "dir_nlink",
    "extra_isize",
    "metadata_csum",
];

// ---------------------------------------------------------------------------
// Running osbuilder
// ---------------------------------------------------------------------------

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("osbuilder-disk-it-").tempdir().unwrap()
}

/// A disk written by osbuilder and its parsed JSON report.
struct Disk {
    img: PathBuf,
    report: Value,
}

impl Disk {
    fn part_offset(&self) -> u64 {
        self.report["disk"]["partition"]["offset"].as_u64().expect("report disk.partition.offset")
    }
    fn part_size(&self) -> u64 {
        self.report["disk"]["partition"]["size"].as_u64().expect("report disk.partition.size")
    }
    /// Copies the filesystem partition (by the report's offset and size) to
    /// `dest`, sparsely, and returns `dest`.
    fn extract_fs(&self, dest: &Path) -> PathBuf {
        dd_range(&self.img, self.part_offset(), self.part_size(), dest)
    }
}

/// `osbuilder disk --image IMAGE -o DIR/NAME --report DIR/NAME.json EXTRA...`.
fn build_disk(image: &str, dir: &Path, name: &str, extra: &[&str], cache: &Path) -> Disk {
    let img = dir.join(name);
    let report = dir.join(format!("{name}.json"));
    let mut args = vec!["disk", "--image", image, "-o", path_str(&img), "--report", path_str(&report)];
    args.extend_from_slice(extra);
    let out = run_osbuilder(&args, cache);
    assert!(out.status.success(), "osbuilder {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&fs::read(&report).unwrap()).expect("report is JSON");
    Disk { img, report }
}

// ---------------------------------------------------------------------------
// Oracles
// ---------------------------------------------------------------------------

/// `e2fsck -fn FS` must exit 0 (clean, nothing to fix); returns its output.
#[track_caller]
fn assert_e2fsck_clean(fs_image: &Path) -> String {
    let out = tool("e2fsck").arg("-fn").arg(fs_image).stdin(Stdio::null()).output().expect("run e2fsck");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "e2fsck -fn {} is not clean:\n{text}", fs_image.display());
    text
}

/// `dumpe2fs -h`, as "Field name" -> value.
fn dumpe2fs(fs_image: &Path) -> BTreeMap<String, String> {
    let out = run_stdout(tool("dumpe2fs").arg("-h").arg(fs_image));
    out.lines().filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect()
}

fn num(map: &BTreeMap<String, String>, key: &str) -> u64 {
    map.get(key).unwrap_or_else(|| panic!("dumpe2fs has no {key:?}: {map:?}")).parse().unwrap()
}

/// One `sfdisk --dump` partition line.
#[derive(Debug)]
struct SfPart {
    start: u64,
    size: u64,
    kind: String,
}

/// `sfdisk --dump IMG`: the header fields and the partitions.
fn sfdisk_dump(img: &Path) -> (BTreeMap<String, String>, Vec<SfPart>) {
    let out = run_stdout(tool("sfdisk").arg("--dump").arg(img));
    let mut header = BTreeMap::new();
    let mut parts = vec![];
    for line in out.lines() {
        if let Some((_, rest)) = line.split_once(" : ") {
            let mut p = SfPart { start: 0, size: 0, kind: String::new() };
            for field in rest.split(',') {
                let Some((k, v)) = field.split_once('=') else { continue };
                match k.trim() {
                    "start" => p.start = v.trim().parse().unwrap(),
                    "size" => p.size = v.trim().parse().unwrap(),
                    "type" => p.kind = v.trim().to_string(),
                    _ => {}
                }
            }
            parts.push(p);
        } else if let Some((k, v)) = line.split_once(": ") {
            header.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    (header, parts)
}

/// Runs one debugfs process over `fs_image` with `cmds` as its command file
/// and returns each command's output, in order. Fails on anything debugfs
/// writes to stderr besides its banner (errors such as "File not found").
fn debugfs(fs_image: &Path, cmds: &[String]) -> Vec<String> {
    let dir = scratch();
    let file = dir.path().join("cmds");
    fs::write(&file, cmds.join("\n") + "\n").unwrap();
    let out = run(tool("debugfs").arg("-f").arg(&file).arg(fs_image));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("debugfs ")).collect();
    assert!(errors.is_empty(), "debugfs on {} reported errors:\n{}", fs_image.display(), errors.join("\n"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut sections: Vec<String> = vec![];
    for line in stdout.lines() {
        if line.starts_with("debugfs: ") {
            sections.push(String::new());
        } else if let Some(s) = sections.last_mut() {
            s.push_str(line);
            s.push('\n');
        }
    }
    assert_eq!(sections.len(), cmds.len(), "debugfs answered {} of {} commands:\n{stdout}", sections.len(), cmds.len());
    sections
}

/// A path quoted for a debugfs command line.
fn q(path: &str) -> String {
    assert!(!path.contains('"'), "cannot quote {path:?} for debugfs");
    format!("\"{path}\"")
}

/// The tree of an ext4 filesystem image as debugfs reads it, in the shape of
/// [`tree_snapshot`]: metadata from `ls -p` (inode, mode, owner, size) level
/// by level, one debugfs process per directory depth; device numbers from
/// `stat`; contents and symlink targets from one `rdump`; hard-link groups
/// from shared inode numbers. Returns the tree and the inode of each path.
fn debugfs_tree(fs_image: &Path) -> (BTreeMap<String, Entry>, BTreeMap<String, u64>) {
    let contents = scratch();
    let rdump = contents.path().join("root");
    fs::create_dir(&rdump).unwrap();
    debugfs(fs_image, &[format!("rdump / {}", q(path_str(&rdump)))]);

    let mut map = BTreeMap::new();
    let mut inodes = BTreeMap::new();
    let mut level = vec![String::new()];
    while !level.is_empty() {
        let cmds: Vec<String> = level.iter().map(|d| format!("ls -p {}", q(&format!("/{d}")))).collect();
        let outputs = debugfs(fs_image, &cmds);
        let mut next = vec![];
        for (dir, listing) in level.iter().zip(outputs) {
            for line in listing.lines().filter(|l| !l.trim().is_empty()) {
                // "/INODE/MODE/UID/GID/NAME/SIZE/", SIZE empty for directories.
                let body = line.strip_prefix('/').and_then(|l| l.strip_suffix('/')).unwrap_or_else(|| panic!("ls -p line {line:?}"));
                let parts: Vec<&str> = body.split('/').collect();
                assert!(parts.len() >= 6, "ls -p line {line:?}");
                let name = parts[4..parts.len() - 1].join("/");
                // Inode 0: an unused entry spanning a directory block (e.g.
                // the preallocated blocks of lost+found), not a file.
                if name == "." || name == ".." || parts[0] == "0" {
                    continue;
                }
                let key = if dir.is_empty() { name } else { format!("{dir}/{name}") };
                let ino: u64 = parts[0].parse().unwrap();
                let mode = u32::from_str_radix(parts[1], 8).unwrap();
                let kind = Kind::of_mode(mode).unwrap_or_else(|| panic!("unknown file type {:o}", mode & 0o170000));
                let host = rdump.join(&key);
                let entry = Entry {
                    kind,
                    mode: mode & 0o7777,
                    uid: parts[2].parse().unwrap(),
                    gid: parts[3].parse().unwrap(),
                    size: parts[parts.len() - 1].parse().unwrap_or(0),
                    sha256: (kind == Kind::File).then(|| sha256_file(&host)),
                    target: (kind == Kind::Symlink).then(|| fs::read_link(&host).unwrap().to_string_lossy().into_owned()),
                    rdev: None,
                    link_group: None,
                    nlink: 0,
                    mtime: 0,
                };
                if kind == Kind::File {
                    assert_eq!(fs::metadata(&host).unwrap().len(), entry.size, "{key}: dumped length != inode size");
                }
                if kind == Kind::Dir {
                    next.push(key.clone());
                }
                inodes.insert(key.clone(), ino);
                map.insert(key, entry);
            }
        }
        level = next;
    }

    let devices: Vec<String> = map.iter().filter(|(_, e)| matches!(e.kind, Kind::CharDev | Kind::BlockDev)).map(|(k, _)| k.clone()).collect();
    if !devices.is_empty() {
        let cmds: Vec<String> = devices.iter().map(|d| format!("stat {}", q(&format!("/{d}")))).collect();
        for (dev, stat) in devices.iter().zip(debugfs(fs_image, &cmds)) {
            // "Device major/minor number: 01:03 (hex 01:03)", maybe "(New-style) " first.
            let line = stat.lines().find(|l| l.contains("Device major/minor number:")).unwrap_or_else(|| panic!("stat /{dev}:\n{stat}"));
            let nums = line.split("number:").nth(1).unwrap().split_whitespace().next().unwrap();
            let (ma, mi) = nums.split_once(':').unwrap();
            map.get_mut(dev).unwrap().rdev = Some((ma.parse().unwrap(), mi.parse().unwrap()));
        }
    }

    let mut groups: HashMap<u64, Vec<String>> = HashMap::new();
    for (k, e) in &map {
        if e.kind != Kind::Dir {
            groups.entry(inodes[k]).or_default().push(k.clone());
        }
    }
    for mut paths in groups.into_values().filter(|p| p.len() > 1) {
        paths.sort();
        let first = paths[0].clone();
        for p in paths {
            map.get_mut(&p).unwrap().link_group = Some(first.clone());
        }
    }
    (map, inodes)
}

/// Removes the filesystem's own `lost+found` (an empty 0700 directory owned
/// by root) unless the image has one itself.
fn drop_lost_found(ours: &mut BTreeMap<String, Entry>, theirs: &BTreeMap<String, Entry>) {
    if theirs.contains_key("lost+found") {
        return;
    }
    let lf = ours.remove("lost+found").expect("mke2fs-style filesystems have /lost+found");
    assert_eq!((lf.kind, lf.mode, lf.uid, lf.gid), (Kind::Dir, 0o700, 0, 0), "lost+found: {lf}");
    assert!(!ours.keys().any(|k| k.starts_with("lost+found/")), "lost+found must be empty");
}

/// The filesystem's tree (debugfs) equals umoci's unpack of the image,
/// except for the paths in `added` (which must exist in ours and are then
/// dropped). Returns both snapshots.
fn assert_fs_matches_umoci(fs_image: &Path, layout: &Path, tag: &str, added: &[&str]) -> (BTreeMap<String, Entry>, BTreeMap<String, Entry>, Scratch) {
    let (mut ours, _) = debugfs_tree(fs_image);
    let unpacked = umoci_unpack(layout, tag);
    let theirs = tree_snapshot(&unpacked);
    drop_lost_found(&mut ours, &theirs);
    let full = ours.clone();
    for a in added {
        assert!(ours.remove(*a).is_some(), "{a} missing from the disk");
    }
    assert_trees_equal(&ours, &theirs);
    (full, theirs, unpacked)
}

// ---------------------------------------------------------------------------
// Shared inputs
// ---------------------------------------------------------------------------

/// A directory under the cargo target tmpdir for this run's shared files
/// (the Debian disk and its blob cache, about 250 MB), left
/// for the next run to remove.
fn shared_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("disk-tests-{}", std::process::id()));
        // Directories of earlier runs whose process is gone are removed.
        if let Ok(rd) = fs::read_dir(env!("CARGO_TARGET_TMPDIR")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("disk-tests-") {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        fs::create_dir_all(&d).unwrap();
        d
    })
}

fn shared_cache() -> PathBuf {
    shared_dir().join("cache")
}

fn debian_image() -> String {
    oci_ref(&debian_layout(), DEBIAN_TAG)
}

/// The Debian image as a default disk (mbr, auto size), built once.
fn debian_disk() -> &'static Disk {
    static DISK: OnceLock<Disk> = OnceLock::new();
    DISK.get_or_init(|| {
        let dir = shared_dir().join("debian");
        fs::create_dir_all(&dir).unwrap();
        build_disk(&debian_image(), &dir, "debian.img", &[], &shared_cache())
    })
}

/// A small executable to stand for the guest init: `OSBUILDER_GUEST_INIT`
/// if set, else a copy of /bin/true.
fn guest_init() -> PathBuf {
    if let Some(p) = std::env::var_os("OSBUILDER_GUEST_INIT").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let p = shared_dir().join("init");
    if !p.exists() {
        fs::copy("/bin/true", &p).unwrap();
    }
    p
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn debian_mbr_disk_is_clean_ext4_holding_exactly_the_image() {
    let disk = debian_disk();
    let tmp = scratch();
    let bytes = fs::metadata(&disk.img).unwrap().len();
    assert_eq!(disk.report["disk"]["bytes"].as_u64(), Some(bytes));
    assert_eq!(disk.report["disk"]["table"], "mbr");

    let (header, parts) = sfdisk_dump(&disk.img);
    assert_eq!(header.get("label").map(String::as_str), Some("dos"), "{header:?}");
    assert_eq!(parts.len(), 1, "one partition: {parts:?}");
    assert_eq!((parts[0].start, parts[0].kind.as_str()), (2048, "83"), "{parts:?}");
    assert_eq!(parts[0].start * 512, disk.part_offset());
    assert_eq!(parts[0].size * 512, disk.part_size());
    assert!(disk.part_offset() + disk.part_size() <= bytes);
    assert_eq!(disk.report["disk"]["partition"]["kind"], "0x83");

    let fs_image = disk.extract_fs(&tmp.path().join("p1"));
    assert_e2fsck_clean(&fs_image);

    // The report describes the filesystem dumpe2fs sees.
    let sb = dumpe2fs(&fs_image);
    let summary = &disk.report["disk"]["filesystem"];
    assert_eq!(sb["Filesystem UUID"], summary["uuid"].as_str().unwrap());
    assert_eq!(num(&sb, "Block count"), summary["blocks"].as_u64().unwrap());
    assert_eq!(num(&sb, "Free blocks"), summary["free_blocks"].as_u64().unwrap());
    assert_eq!(num(&sb, "Inode count"), summary["inodes"].as_u64().unwrap());
    assert_eq!(num(&sb, "Free inodes"), summary["free_inodes"].as_u64().unwrap());
    assert_eq!(num(&sb, "Block count") * num(&sb, "Block size"), disk.part_size(), "the filesystem fills its partition");

    let (ours, _, _) = assert_fs_matches_umoci(&fs_image, &debian_layout(), DEBIAN_TAG, &[]);
    assert!(ours.len() > 5000, "a Debian minbase has thousands of entries, got {}", ours.len());
    assert!(ours.values().any(|e| e.rdev.is_some()), "Debian's /dev nodes must be compared");
    assert!(ours.values().any(|e| e.mode & 0o4000 != 0), "setuid binaries (su, passwd) must be compared");
}

#[test]
fn same_command_twice_gives_the_same_bytes() {
    let first = debian_disk();
    let tmp = scratch();
    let second = build_disk(&debian_image(), tmp.path(), "again.img", &[], &shared_cache());
    let sha = sha256_file(&first.img);
    assert_eq!(first.report["disk"]["sha256"].as_str(), Some(sha.as_str()), "report sha256 is the file's");
    assert_eq!(sha256_file(&second.img), sha, "two builds of the same image must be byte-identical");
    assert_eq!(second.report["disk"]["sha256"].as_str(), Some(sha.as_str()));
    assert_eq!(first.report["disk"]["filesystem"]["uuid"], second.report["disk"]["filesystem"]["uuid"]);
}

#[test]
fn gpt_disk_has_the_discoverable_root_partition() {
    let tmp = scratch();
    let disk = build_disk(&debian_image(), tmp.path(), "gpt.img", &["--table", "gpt"], &shared_cache());
    let verify = run_stdout(tool("sgdisk").arg("-v").arg(&disk.img));
    assert!(verify.contains("No problems found"), "sgdisk -v:\n{verify}");
    let info = run_stdout(tool("sgdisk").args(["-i", "1"]).arg(&disk.img));
    let field =
        |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_else(|| panic!("sgdisk -i 1 has no {name:?}:\n{info}")).trim().to_string();
    assert!(field("Partition GUID code:").starts_with(GPT_ROOT_X86_64), "{info}");
    let first_sector: u64 = field("First sector:").split_whitespace().next().unwrap().parse().unwrap();
    let last_sector: u64 = field("Last sector:").split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(first_sector * 512, disk.part_offset());
    assert_eq!(first_sector, 2048);
    assert_eq!((last_sector + 1 - first_sector) * 512, disk.part_size());
    assert!(disk.report["disk"]["partition"]["kind"].as_str().unwrap().eq_ignore_ascii_case(GPT_ROOT_X86_64));
    let guid = disk.report["disk"]["partition"]["guid"].as_str().expect("GPT partition guid in the report");
    assert!(field("Partition unique GUID:").eq_ignore_ascii_case(guid), "{info}");
    let listing = run_stdout(tool("sgdisk").arg("-p").arg(&disk.img));
    assert_eq!(listing.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).count(), 1, "one partition:\n{listing}");
    assert_e2fsck_clean(&disk.extract_fs(&tmp.path().join("p1")));
}

#[test]
fn table_none_disk_is_a_bare_ext4_with_the_expected_features() {
    let tmp = scratch();
    let disk = build_disk(&debian_image(), tmp.path(), "bare.img", &["--table", "none"], &shared_cache());
    assert_eq!(disk.part_offset(), 0);
    assert_eq!(disk.part_size(), fs::metadata(&disk.img).unwrap().len());
    assert_e2fsck_clean(&disk.img);
    let sb = dumpe2fs(&disk.img);
    let features: Vec<&str> = sb["Filesystem features"].split_whitespace().collect();
    for f in EXT4_FEATURES {
        assert!(features.contains(f), "feature {f} missing: {features:?}");
    }
    assert_eq!(disk.report["cmdline"]["virtio-blk"], "root=/dev/vda rootfstype=ext4 rootflags=data=ordered,errors=remount-ro rw");
    assert!(disk.report["cmdline"].get("pmem").is_none(), "no pmem cmdline without --dax");
}

#[test]
fn dax_disk_has_the_pfn_block_and_the_filesystem_at_3_mib() {
    let tmp = scratch();
    let init = guest_init();
    let disk = build_disk(&debian_image(), tmp.path(), "dax.img", &["--dax", "--init", path_str(&init)], &shared_cache());
    let bytes = fs::metadata(&disk.img).unwrap().len();
    assert_eq!(bytes % (2 * MIB), 0, "a DAX image is a whole number of 2 MiB pages: {bytes}");

    let (_, parts) = sfdisk_dump(&disk.img);
    assert_eq!(parts.len(), 1, "{parts:?}");
    assert_eq!(parts[0].start, 6144, "{parts:?}");
    assert_eq!(disk.part_offset(), 3 * MIB);
    assert_eq!(parts[0].size * 512, disk.part_size());

    let mut head = vec![0u8; 16];
    let mut f = fs::File::open(&disk.img).unwrap();
    f.seek(SeekFrom::Start(4096)).unwrap();
    f.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"NVDIMM_PFN_INFO\0", "PFN info signature at 4 KiB");

    // What the guest sees past the PFN area (the namespace data offset, 2 MiB).
    let past = dd_range(&disk.img, 2 * MIB, bytes - 2 * MIB, &tmp.path().join("past-2m"));
    let (_, inner) = sfdisk_dump(&past);
    assert_eq!(inner.len(), 1, "{inner:?}");
    assert_eq!(inner[0].start, 2048, "from 2 MiB on, partition 1 starts at sector 2048: {inner:?}");

    assert_e2fsck_clean(&disk.extract_fs(&tmp.path().join("p1")));
    assert_eq!(disk.report["cmdline"]["pmem"], "root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4 init=/.osb/init");
    for (via, line) in disk.report["cmdline"].as_object().unwrap() {
        assert!(line.as_str().unwrap().ends_with(" init=/.osb/init"), "{via}: {line}");
    }
}

#[test]
fn guest_init_goes_beside_the_images_own_init() {
    let tmp = scratch();
    let init = guest_init();
    let disk = build_disk(&oci_ref(&awkward_layout(), AWKWARD_TAG), tmp.path(), "init.img", &["--init", path_str(&init)], &shared_cache());
    let fs_image = disk.extract_fs(&tmp.path().join("p1"));
    assert_e2fsck_clean(&fs_image);
    let added = [".osb", ".osb/init", "etc/osb", "etc/osb/run.json"];
    let (ours, theirs, unpacked) = assert_fs_matches_umoci(&fs_image, &awkward_layout(), AWKWARD_TAG, &added);
    let osb_init = &ours[".osb/init"];
    assert_eq!((osb_init.kind, osb_init.mode, osb_init.uid, osb_init.gid), (Kind::File, 0o755, 0, 0), "{osb_init}");
    assert_eq!(osb_init.sha256.as_deref(), Some(sha256_file(&init).as_str()));
    // The image's own /sbin/init is compared by the tree equality above; make
    // sure it is there to compare and is not the guest init.
    assert_eq!(theirs["sbin/init"].kind, Kind::File);
    assert_eq!(ours["sbin/init"].sha256, theirs["sbin/init"].sha256);
    assert_ne!(ours["sbin/init"].sha256, osb_init.sha256, "the image's /sbin/init must be its own");

    let run_json = debugfs(&fs_image, &["cat /etc/osb/run.json".to_string()]).remove(0);
    let run: Value = serde_json::from_str(&run_json).unwrap_or_else(|e| panic!("run.json {run_json:?}: {e}"));
    let config = layout_config(&awkward_layout(), AWKWARD_TAG);
    assert_eq!(run["cmd"], config["config"]["Cmd"], "{run}");
    assert_eq!(ours["etc/osb/run.json"].mode, 0o644);
    drop(unpacked);

    for (via, line) in disk.report["cmdline"].as_object().unwrap() {
        assert!(line.as_str().unwrap().ends_with(" init=/.osb/init"), "{via}: {line}");
    }
    assert!(disk.report["cmdline"].get("pmem").is_none());
}

/// The bytes of an xattr of a host file, read by python3's os.getxattr.
fn host_xattr_hex(path: &Path, name: &str) -> String {
    run_stdout(tool("python3").args(["-c", "import os,sys; print(os.getxattr(sys.argv[1], sys.argv[2]).hex())"]).arg(path).arg(name)).trim().to_string()
}

#[test]
fn awkward_image_keeps_every_file_type_owner_link_and_xattr() {
    let tmp = scratch();
    let disk = build_disk(&oci_ref(&awkward_layout(), AWKWARD_TAG), tmp.path(), "awkward.img", &[], &shared_cache());
    let fs_image = disk.extract_fs(&tmp.path().join("p1"));
    assert_e2fsck_clean(&fs_image);
    let (ours, _, unpacked) = assert_fs_matches_umoci(&fs_image, &awkward_layout(), AWKWARD_TAG, &[]);

    // The fixture really has what the comparison is meant to cover.
    assert_eq!(ours["bin/both"].mode, 0o6711);
    assert_eq!(ours["srv/sticky"].mode, 0o1777);
    assert_eq!((ours["srv/huge"].uid, ours["srv/huge"].gid), (2000000000, 2000000001));
    assert_eq!(ours["dev/wide"].rdev, Some((4095, 1048575)));
    assert_eq!(ours["srv/fifo"].kind, Kind::Fifo);
    assert_eq!(ours["links/c/deep/three"].link_group.as_deref(), Some("links/a/one"));
    assert!(ours["srv/slow-link"].target.as_ref().unwrap().len() > 60);

    let cap_hex = host_xattr_hex(&unpacked.join("bin/cap"), "security.capability");
    assert!(!cap_hex.is_empty());
    let xattrs = debugfs(&fs_image, &["ea_list /bin/cap".to_string(), "ea_list /srv/tagged".to_string()]);
    // "  security.capability (20) = 01 00 00 02 00 30 00 00 ..."
    let line = xattrs[0].lines().find(|l| l.trim_start().starts_with("security.capability")).unwrap_or_else(|| panic!("ea_list /bin/cap:\n{}", xattrs[0]));
    let bytes: String = line.split(" = ").nth(1).unwrap().split_whitespace().collect();
    assert_eq!(bytes, cap_hex, "security.capability bytes: {line}");
    assert_eq!(file_capability(&unpacked.join("bin/cap")).as_deref(), Some("cap_net_admin,cap_net_raw=ep"));
    assert!(xattrs[1].contains("user.osbuilder (7) = \"awkward\""), "ea_list /srv/tagged:\n{}", xattrs[1]);
    assert!(xattrs[1].lines().filter(|l| l.contains(" = ")).count() == 1, "only the one xattr: {}", xattrs[1]);
}

#[test]
fn five_gib_sparse_host_file_stays_sparse() {
    let tmp = scratch();
    let host = tmp.path().join("sparse");
    run(tool("truncate").args(["-s", "5G"]).arg(&host));
    let writes: [(u64, &str); 4] = [(0, "start"), (1 << 30, "one gib"), ((4 << 30) + 12345, "unaligned past 4 GiB"), ((5 << 30) - 3, "end")];
    for (off, text) in writes {
        let mut dd = tool("dd");
        dd.arg(format!("of={}", host.display())).args(["bs=1", "conv=notrunc", "status=none"]).arg(format!("seek={off}")).stdin(Stdio::piped());
        let mut child = dd.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(fs::metadata(&host).unwrap().len(), 5 << 30);

    let disk = build_disk(
        &oci_ref(&awkward_layout(), AWKWARD_TAG),
        tmp.path(),
        "sparse.img",
        &["--add", &format!("{}:/data/sparse", host.display())],
        &shared_cache(),
    );
    let on_disk = fs::metadata(&disk.img).unwrap().blocks() * 512;
    assert!(on_disk < 100 * MIB, "the image takes {on_disk} bytes on disk");
    let fs_image = disk.extract_fs(&tmp.path().join("p1"));
    assert_e2fsck_clean(&fs_image);

    let mut cmds = vec!["stat /data/sparse".to_string()];
    for (off, _) in writes {
        cmds.push(format!("bmap /data/sparse {}", off / 4096));
    }
    cmds.push(format!("bmap /data/sparse {}", (2u64 << 30) / 4096));
    let out = debugfs(&fs_image, &cmds);
    assert!(out[0].contains("Size: 5368709120"), "stat /data/sparse:\n{}", out[0]);
    // The blocks that hold data hold the host file's bytes; a hole stays a hole.
    let mut fs_file = fs::File::open(&fs_image).unwrap();
    let mut host_file = fs::File::open(&host).unwrap();
    for ((off, _), bmap) in writes.iter().zip(&out[1..]) {
        let phys: u64 = bmap.trim().parse().unwrap_or_else(|_| panic!("bmap: {bmap:?}"));
        assert_ne!(phys, 0, "block of offset {off} must be mapped");
        let mut ours = vec![0u8; 4096];
        let mut theirs = vec![0u8; 4096];
        fs_file.seek(SeekFrom::Start(phys * 4096)).unwrap();
        fs_file.read_exact(&mut ours).unwrap();
        host_file.seek(SeekFrom::Start(off / 4096 * 4096)).unwrap();
        let n = host_file.read(&mut theirs).unwrap();
        assert_eq!(&ours[..n], &theirs[..n], "content of the block at {off}");
    }
    assert_eq!(out[out.len() - 1].trim(), "0", "2 GiB into the file is a hole");
}

#[test]
fn fixed_sizes_headroom_and_bad_outputs() {
    let tmp = scratch();
    let cache = shared_cache();
    let image = debian_image();

    // Too small: refused before any file is made, naming the size needed.
    let dir = tmp.path().join("small");
    fs::create_dir(&dir).unwrap();
    let out = dir.join("small.img");
    let err = build_err(&["disk", "--image", &image, "-o", path_str(&out), "--size", "64M"], &cache);
    let needed: u64 = err
        .split("needs at least ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the error must name the size needed: {err}"));
    assert!(needed > 64 * MIB, "{err}");
    let left: Vec<_> = fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "a failed build must leave nothing in the output directory: {left:?}");

    // The size the error names is enough.
    let exact = build_disk(&image, &dir, "exact.img", &["--size", &needed.to_string()], &cache);
    assert_eq!(exact.part_size(), needed);
    assert_e2fsck_clean(&exact.extract_fs(&tmp.path().join("exact-p1")));
    fs::remove_file(&exact.img).unwrap();

    // A little above the auto size: works, nearly full, clean.
    let auto = debian_disk();
    let size = (auto.part_size() + 3 * MIB) / 4096 * 4096;
    let fixed = build_disk(&image, tmp.path(), "fixed.img", &["--size", &size.to_string()], &cache);
    assert_eq!(fixed.part_size(), size);
    let fs_image = fixed.extract_fs(&tmp.path().join("fixed-p1"));
    assert_e2fsck_clean(&fs_image);
    let sb = dumpe2fs(&fs_image);
    assert_eq!(num(&sb, "Block count") * 4096, size);
    fs::remove_file(&fixed.img).unwrap();
    fs::remove_file(&fs_image).unwrap();

    // --headroom 100M: at least that much free.
    let roomy = build_disk(&image, tmp.path(), "roomy.img", &["--headroom", "100M"], &cache);
    let fs_image = roomy.extract_fs(&tmp.path().join("roomy-p1"));
    assert_e2fsck_clean(&fs_image);
    let sb = dumpe2fs(&fs_image);
    let free = num(&sb, "Free blocks") * num(&sb, "Block size");
    assert!(free >= 100 * MIB, "--headroom 100M left {free} bytes free");
    assert_eq!(num(&sb, "Reserved block count"), 0, "default --reserved-percent 0");
    fs::remove_file(&roomy.img).unwrap();

    // A report that would land on the image, or in no directory, is refused
    // before anything is built.
    let img = tmp.path().join("same.img");
    let err = build_err(&["disk", "--image", &image, "-o", path_str(&img), "--report", &format!("{}/./same.img", tmp.path().display())], &cache);
    assert!(err.contains("--report") && err.contains("output file"), "{err}");
    assert!(!img.exists(), "no image when the report would overwrite it");
    let err = build_err(&["disk", "--image", &image, "-o", path_str(&img), "--report", "/nonexistent-dir/r.json"], &cache);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!img.exists(), "no image when the report cannot be written");

    // -o naming a directory is refused.
    let as_dir = tmp.path().join("a-directory");
    fs::create_dir(&as_dir).unwrap();
    let err = build_err(&["disk", "--image", &image, "-o", path_str(&as_dir)], &cache);
    assert!(err.contains("is a directory"), "{err}");
    assert!(fs::read_dir(&as_dir).unwrap().next().is_none(), "nothing written into the directory");
}

/// A 1 GiB file of non-zero bytes (`yes` output) at `path`.
fn big_file(path: &Path) -> PathBuf {
    run(tool("sh").arg("-c").arg(format!("yes osbuilder-disk-interrupt | head -c 1073741824 > '{}'", path.display())));
    assert_eq!(fs::metadata(path).unwrap().len(), 1 << 30);
    path.to_path_buf()
}

#[test]
fn sigint_during_the_write_leaves_nothing_behind() {
    let tmp = scratch();
    let big = big_file(&tmp.path().join("big"));
    let dir = tmp.path().join("out");
    fs::create_dir(&dir).unwrap();
    let out = dir.join("interrupted.img");
    let mut cmd = osbuilder();
    cmd.args(["disk", "--image", &debian_image(), "-o", path_str(&out), "--add", &format!("{}:/big", big.display())]).arg("--cache-dir").arg(shared_cache());
    // Let it write a little, then interrupt.
    assert_sigint_leaves_nothing(cmd, &dir, Duration::from_millis(100));
}

/// `stat` of every path through one debugfs: path -> (mtime, links count).
fn debugfs_mtimes_and_links(fs_image: &Path, paths: &[String]) -> BTreeMap<String, (u64, u64)> {
    let cmds: Vec<String> = paths.iter().map(|p| format!("stat {}", q(&format!("/{p}")))).collect();
    let mut out = BTreeMap::new();
    for (p, stat) in paths.iter().zip(debugfs(fs_image, &cmds)) {
        // " mtime: 0x00015180:00000000 -- Fri Jan  2 00:00:00 1970"
        let mtime = stat
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("mtime: 0x"))
            .and_then(|v| u64::from_str_radix(&v[..8], 16).ok())
            .unwrap_or_else(|| panic!("stat /{p}:\n{stat}"));
        let links = stat
            .lines()
            .find_map(|l| l.strip_prefix("Links: "))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("stat /{p}:\n{stat}"));
        out.insert(p.clone(), (mtime, links));
    }
    out
}

#[test]
fn options_label_journal_reserve_epoch_add_and_remove() {
    let tmp = scratch();
    let host = tmp.path().join("secret.conf");
    fs::write(&host, b"key=value\n").unwrap();
    let disk = build_disk(
        &oci_ref(&awkward_layout(), AWKWARD_TAG),
        tmp.path(),
        "opts.img",
        &[
            "--label",
            "osb-root",
            "--no-journal",
            "--reserved-percent",
            "5",
            "--source-date-epoch",
            "86400",
            "--add",
            &format!("{}:/opt/new/secret.conf:0600", host.display()),
            "--remove",
            "/srv/mib",
            "--remove",
            "/links/b/two",
            "--remove",
            "/srv/sticky",
        ],
        &shared_cache(),
    );
    let fs_image = disk.extract_fs(&tmp.path().join("p1"));
    assert_e2fsck_clean(&fs_image);
    let sb = dumpe2fs(&fs_image);
    assert_eq!(sb["Filesystem volume name"], "osb-root");
    assert_eq!(disk.report["disk"]["filesystem"]["label"], "osb-root");
    let features: Vec<&str> = sb["Filesystem features"].split_whitespace().collect();
    assert!(!features.contains(&"has_journal"), "--no-journal: {features:?}");
    assert!(!sb.contains_key("Journal inode"), "--no-journal: {sb:?}");
    let (blocks, reserved) = (num(&sb, "Block count"), num(&sb, "Reserved block count"));
    assert!(reserved.abs_diff(blocks * 5 / 100) <= 1, "5% of {blocks} blocks reserved, got {reserved}");

    let (mut ours, _) = debugfs_tree(&fs_image);
    let unpacked = umoci_unpack(&awkward_layout(), AWKWARD_TAG);
    let mut theirs = tree_snapshot(&unpacked);
    drop_lost_found(&mut ours, &theirs);
    let added = &ours["opt/new/secret.conf"];
    assert_eq!((added.kind, added.mode, added.uid, added.gid), (Kind::File, 0o600, 0, 0), "{added}");
    assert_eq!(added.sha256.as_deref(), Some(sha256_file(&host).as_str()));
    for dir in ["opt", "opt/new"] {
        assert_eq!((ours[dir].kind, ours[dir].mode, ours[dir].uid), (Kind::Dir, 0o755, 0), "{dir}: {}", ours[dir]);
    }
    let all_paths: Vec<String> = ours.keys().cloned().collect();
    for p in ["opt", "opt/new", "opt/new/secret.conf"] {
        ours.remove(p);
    }
    for p in ["srv/mib", "links/b/two", "srv/sticky"] {
        assert!(theirs.remove(p).is_some(), "{p} is in the fixture");
    }
    assert_trees_equal(&ours, &theirs);

    // A removed hard link leaves a link count e2fsck agreed with, and every
    // mtime is clamped to --source-date-epoch.
    let stats = debugfs_mtimes_and_links(&fs_image, &all_paths);
    assert_eq!(stats["links/a/one"].1, 2, "links/a/one after removing one of its three names");
    let late: Vec<_> = stats.iter().filter(|(_, (m, _))| *m > 86400).collect();
    assert!(late.is_empty(), "mtimes after --source-date-epoch 86400: {late:?}");
    assert_eq!(stats["srv/huge"].0, 86400, "a file made after 1970 gets the epoch itself");
}

#[test]
fn failed_build_keeps_the_previous_output_and_a_good_one_replaces_it() {
    let tmp = scratch();
    let image = oci_ref(&awkward_layout(), AWKWARD_TAG);
    let out = tmp.path().join("disk.img");
    fs::write(&out, b"previous good output").unwrap();
    let err = build_err(&["disk", "--image", &image, "-o", path_str(&out), "--size", "1M"], &shared_cache());
    assert!(err.contains("needs at least"), "{err}");
    let err = build_err(&["disk", "--image", &image, "-o", path_str(&out), "--size", "9000001"], &shared_cache());
    assert!(err.contains("4096"), "a size that is not whole blocks is refused: {err}");
    assert_eq!(fs::read(&out).unwrap(), b"previous good output");
    let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(names.len(), 1, "only the old output: {names:?}");
    let disk = build_disk(&image, tmp.path(), "disk.img", &[], &shared_cache());
    assert_eq!(sha256_file(&disk.img), disk.report["disk"]["sha256"].as_str().unwrap());
    assert_e2fsck_clean(&disk.extract_fs(&tmp.path().join("p1")));
}
