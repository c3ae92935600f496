//! `osbuilder disk --verity` on the host: the Debian base image written with
//! a dm-verity hash tree, judged by `veritysetup` (cryptsetup), the tool
//! that owns the format: `verify` accepts our data, hash area and root hash
//! (partitions copied out with dd, and in place with --hash-offset), and
//! `format` of the same filesystem gives the same root hash and the same
//! hash bytes. Partition tables by sfdisk and sgdisk; errors and
//! reproducibility through the CLI.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use common::*;

const MIB: u64 = 1 << 20;
const GPT_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const GPT_ROOT_VERITY_X86_64: &str = "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5";

struct Disk {
    img: PathBuf,
    report: Value,
    stderr: String,
}

impl Disk {
    fn verity(&self) -> &Value {
        &self.report["disk"]["verity"]
    }
    fn part(&self, number: u64) -> (u64, u64) {
        let p = self.report["disk"]["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["number"] == number)
            .unwrap_or_else(|| panic!("no partition {number} in {}", self.report["disk"]));
        (p["offset"].as_u64().unwrap(), p["size"].as_u64().unwrap())
    }
    fn root_hash(&self) -> &str {
        self.verity()["root_hash"].as_str().unwrap()
    }
    fn salt(&self) -> &str {
        self.verity()["salt"].as_str().unwrap()
    }
}

fn debian() -> String {
    oci_ref(&debian_layout(), DEBIAN_TAG)
}

fn build(dir: &Path, name: &str, extra: &[&str]) -> Disk {
    let img = dir.join(format!("{name}.img"));
    let report = dir.join(format!("{name}.json"));
    let image = debian();
    let mut args = vec!["disk", "--quiet", "--image", &image, "-o", path_str(&img), "--report", path_str(&report)];
    args.extend_from_slice(extra);
    let out = build_ok(&args, &dir.join("cache"));
    let report: Value = serde_json::from_slice(&fs::read(&report).unwrap()).expect("report is JSON");
    Disk { img, report, stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

fn veritysetup(args: &[&str]) -> std::process::Output {
    tool("veritysetup").args(args).output().expect("run veritysetup (cryptsetup-bin)")
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The whole oracle for one disk: the report's numbers, `veritysetup
/// verify` on the copied-out partitions and on the image in place,
/// `veritysetup format` of the copied-out filesystem (same root hash,
/// byte-identical hash area), and a flipped byte rejected.
fn check_with_veritysetup(disk: &Disk, dir: &Path) {
    let v = disk.verity();
    let (data_off, data_len) = disk.part(1);
    let (hash_off, hash_len) = disk.part(2);
    assert_eq!(v["hash_partition"]["offset"].as_u64(), Some(hash_off));
    assert_eq!(v["data_block_size"], 4096);
    assert_eq!(v["hash_block_size"], 4096);
    assert_eq!(v["hash_algorithm"], "sha256");
    let blocks = v["data_blocks"].as_u64().unwrap();
    assert_eq!(blocks * 4096, data_len, "the tree covers the whole filesystem partition");
    assert_eq!(disk.report["disk"]["filesystem"]["blocks"].as_u64(), Some(blocks));
    assert_eq!(disk.salt().len(), 64, "32 bytes of salt");
    assert_eq!(
        v["kernel_verity_params"].as_str().unwrap(),
        format!("root_hash={},salt={},data_blocks={blocks},data_block_size=4096,hash_block_size=4096", disk.root_hash(), disk.salt())
    );
    assert!(disk.stderr.contains(disk.root_hash()), "the run prints the root hash: {}", disk.stderr);

    let data = dd_range(&disk.img, data_off, data_len, &dir.join("data.img"));
    let hash = dd_range(&disk.img, hash_off, hash_len, &dir.join("hash.img"));
    let common = ["--no-superblock", "--hash", "sha256", "--data-block-size", "4096", "--hash-block-size", "4096", "--salt", disk.salt()];
    let mut args = vec!["verify"];
    args.extend_from_slice(&common);
    args.extend_from_slice(&[path_str(&data), path_str(&hash), disk.root_hash()]);
    let out = veritysetup(&args);
    assert!(out.status.success(), "veritysetup verify of the copied-out partitions: {}", text(&out));

    // In place: the hash tree at its partition's offset in the image.
    let (hash_offset, data_blocks) = (hash_off.to_string(), blocks.to_string());
    let mut args = vec!["verify"];
    args.extend_from_slice(&common);
    args.extend_from_slice(&["--hash-offset", &hash_offset, "--data-blocks", &data_blocks]);
    args.extend_from_slice(&[path_str(&data), path_str(&disk.img), disk.root_hash()]);
    let out = veritysetup(&args);
    assert!(out.status.success(), "veritysetup verify with --hash-offset into the image: {}", text(&out));

    // veritysetup's own tree over our filesystem: the same bytes.
    let theirs = dir.join("hash-theirs.img");
    let mut args = vec!["format"];
    args.extend_from_slice(&common);
    args.extend_from_slice(&[path_str(&data), path_str(&theirs)]);
    let out = veritysetup(&args);
    assert!(out.status.success(), "veritysetup format: {}", text(&out));
    let root = text(&out).lines().find_map(|l| l.strip_prefix("Root hash:").map(|r| r.trim().to_string())).expect("Root hash: line");
    assert_eq!(root, disk.root_hash(), "veritysetup format computes our root hash");
    assert_eq!(sha256_file(&theirs), sha256_file(&hash), "veritysetup's hash area is byte-identical to our hash partition");

    // One flipped byte in the data: verify fails.
    let f = fs::OpenOptions::new().write(true).read(true).open(&data).unwrap();
    let at = data_len / 2 + 123;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    drop(f);
    let mut args = vec!["verify"];
    args.extend_from_slice(&common);
    args.extend_from_slice(&[path_str(&data), path_str(&hash), disk.root_hash()]);
    let out = veritysetup(&args);
    assert!(!out.status.success(), "veritysetup verify must reject a flipped byte: {}", text(&out));

    let fs_copy = dd_range(&disk.img, data_off, data_len, &dir.join("fsck.img"));
    let fsck = match disk.report["disk"]["fs"].as_str() {
        Some("erofs") => tool("fsck.erofs").arg(&fs_copy).output().unwrap(),
        _ => tool("e2fsck").arg("-fn").arg(&fs_copy).output().unwrap(),
    };
    assert!(fsck.status.success() && !text(&fsck).contains("<E>"), "fsck of the data partition: {}", text(&fsck));
}

/// `sfdisk --json` partitions (start, size, type[, uuid]).
fn sfdisk_parts(img: &Path) -> Vec<Value> {
    let out = run_stdout(tool("sfdisk").arg("--json").arg(img));
    let json: Value = serde_json::from_str(&out).unwrap();
    json["partitiontable"]["partitions"].as_array().unwrap().clone()
}

/// MBR, Kata's way: data on partition 1, the hash tree on partition 2, and
/// the kernel arguments per device; the same inputs give the same bytes.
#[test]
fn mbr_verity_disk_is_accepted_by_veritysetup() {
    let dir = tempfile::tempdir().unwrap();
    let disk = build(dir.path(), "mbr", &["--verity"]);
    check_with_veritysetup(&disk, dir.path());

    let (data_off, data_len) = disk.part(1);
    let (hash_off, hash_len) = disk.part(2);
    assert_eq!(data_off, MIB);
    assert_eq!(hash_off, (data_off + data_len).next_multiple_of(MIB), "the hash partition follows, 1 MiB aligned");
    let parts = sfdisk_parts(&disk.img);
    assert_eq!(parts.len(), 2, "{parts:?}");
    for (p, (off, len)) in parts.iter().zip([(data_off, data_len), (hash_off, hash_len)]) {
        assert_eq!((p["start"].as_u64().unwrap() * 512, p["size"].as_u64().unwrap() * 512, p["type"].as_str().unwrap()), (off, len, "83"));
    }

    let (root, salt, blocks) = (disk.root_hash(), disk.salt(), disk.verity()["data_blocks"].as_u64().unwrap());
    let dm = |data: &str, hash: &str| {
        format!(
            "dm-mod.create=\"dm-verity,,,ro,0 {} verity 1 {data} {hash} 4096 4096 {blocks} 0 sha256 {root} {salt}\" dm-mod.waitfor={data},{hash}",
            blocks * 8
        )
    };
    let c = &disk.report["cmdline"];
    assert_eq!(
        c["virtio-blk"].as_str().unwrap(),
        format!("{} root=/dev/dm-0 rootfstype=ext4 rootflags=data=ordered,errors=remount-ro ro", dm("/dev/vda1", "/dev/vda2"))
    );
    assert_eq!(
        c["virtio-scsi"].as_str().unwrap(),
        format!("{} root=/dev/dm-0 rootfstype=ext4 rootflags=data=ordered,errors=remount-ro ro", dm("/dev/sda1", "/dev/sda2"))
    );
    assert!(c.get("pmem").is_none(), "no pmem entry without the DAX layout: {c}");
    assert_eq!(disk.report["cmdline"], disk.report["disk"]["cmdline"]);
    let i = &disk.verity()["initrd_cmdline"];
    assert_eq!(
        i["virtio-blk"].as_str().unwrap(),
        format!("{} osb.root=/dev/dm-0 osb.rootfstype=ext4 osb.rootflags=data=ordered,errors=remount-ro osb.ro=1", dm("/dev/vda1", "/dev/vda2"))
    );

    // Reproducible: a second build is byte-identical; without --verity the
    // disk has one partition and no verity section.
    let again = build(dir.path(), "mbr-again", &["--verity"]);
    assert_eq!(again.report["disk"]["sha256"], disk.report["disk"]["sha256"]);
    assert_eq!(sha256_file(&again.img), sha256_file(&disk.img));
    let plain = build(dir.path(), "plain", &[]);
    assert!(plain.report["disk"].get("verity").is_none());
    assert_eq!(sfdisk_parts(&plain.img).len(), 1);
}

/// GPT: the Discoverable Partitions root and root-verity types for x86-64,
/// with the partition UUIDs taken from the root hash as systemd-repart sets
/// them (data: the first 128 bits, hash: the last 128 bits).
#[test]
fn gpt_verity_partitions_are_named_by_the_root_hash() {
    let dir = tempfile::tempdir().unwrap();
    let disk = build(dir.path(), "gpt", &["--verity", "--table", "gpt"]);
    check_with_veritysetup(&disk, dir.path());
    let verify = run_stdout(tool("sgdisk").arg("-v").arg(&disk.img));
    assert!(verify.contains("No problems found"), "sgdisk -v: {verify}");
    let root = disk.root_hash().to_uppercase();
    let uuid = |hex: &str| format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32]);
    let parts = sfdisk_parts(&disk.img);
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert_eq!(parts[0]["type"], GPT_ROOT_X86_64);
    assert_eq!(parts[0]["uuid"].as_str().unwrap(), uuid(&root[..32]));
    assert_eq!(parts[0]["name"], "root-x86-64");
    assert_eq!(parts[1]["type"], GPT_ROOT_VERITY_X86_64);
    assert_eq!(parts[1]["uuid"].as_str().unwrap(), uuid(&root[32..]));
    assert_eq!(parts[1]["name"], "root-x86-64-verity");
    // blkid reads the same UUIDs (systemd finds the partitions through it).
    let (data_off, _) = disk.part(1);
    let probe = run_stdout(tool("blkid").args(["-p", "-o", "export", "-O"]).arg(data_off.to_string()).arg(&disk.img));
    assert!(probe.contains("TYPE=ext4"), "{probe}");
    let again = build(dir.path(), "gpt-again", &["--verity", "--table", "gpt"]);
    assert_eq!(sha256_file(&again.img), sha256_file(&disk.img));
}

/// Kata's DAX layout with verity: data partition 1 at 3 MiB, hash tree on
/// partition 2, both seen through the outer MBR (virtio-blk) and the inner
/// one at 2 MiB (pmem); the pmem entry has no DAX (dm-verity passes none).
#[test]
fn dax_verity_disk_has_the_hash_tree_on_partition_2_for_both_readers() {
    let dir = tempfile::tempdir().unwrap();
    let disk = build(dir.path(), "dax", &["--verity", "--dax"]);
    check_with_veritysetup(&disk, dir.path());
    let (data_off, data_len) = disk.part(1);
    let (hash_off, hash_len) = disk.part(2);
    assert_eq!(data_off, 3 * MIB);
    assert_eq!(disk.report["disk"]["bytes"].as_u64().unwrap() % (2 * MIB), 0);
    let outer = sfdisk_parts(&disk.img);
    assert_eq!(outer.len(), 2);
    assert_eq!(outer[1]["start"].as_u64().unwrap() * 512, hash_off);
    let pmem = dir.path().join("pmem-view.img");
    let total = disk.report["disk"]["bytes"].as_u64().unwrap();
    dd_range(&disk.img, 2 * MIB, total - 2 * MIB, &pmem);
    let inner = sfdisk_parts(&pmem);
    assert_eq!(inner.len(), 2);
    assert_eq!(inner[0]["start"].as_u64().unwrap() * 512, data_off - 2 * MIB);
    assert_eq!(inner[1]["start"].as_u64().unwrap() * 512, hash_off - 2 * MIB);
    assert_eq!(inner[1]["size"].as_u64().unwrap() * 512, hash_len);
    let _ = data_len;
    let pmem_cmdline = disk.report["cmdline"]["pmem"].as_str().unwrap();
    assert!(pmem_cmdline.contains(" verity 1 /dev/pmem0p1 /dev/pmem0p2 4096 4096 "), "{pmem_cmdline}");
    assert!(pmem_cmdline.contains(" root=/dev/dm-0 rootfstype=ext4 rootflags=data=ordered,errors=remount-ro ro"), "{pmem_cmdline}");
    assert!(!pmem_cmdline.contains("dax"), "{pmem_cmdline}");
}

/// `--table none --verity` is refused before anything is written.
#[test]
fn verity_without_a_partition_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bare.img");
    let err = build_err(&["disk", "--quiet", "--image", &debian(), "-o", path_str(&img), "--verity", "--table", "none"], &dir.path().join("cache"));
    assert!(err.contains("--verity needs a partition table"), "{err}");
    assert!(!img.exists(), "no output on error");
    let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).filter(|n| n != "cache").collect();
    assert!(leftovers.is_empty(), "nothing half-written: {leftovers:?}");
}

/// erofs under dm-verity, GPT, written as a compressed qcow2: the raw disk
/// inside (converted back by qemu-img) passes veritysetup and fsck.erofs,
/// and the kernel arguments mount erofs read-only.
#[test]
fn erofs_verity_disk_in_a_qcow2_is_accepted_by_veritysetup() {
    let dir = tempfile::tempdir().unwrap();
    let q = build(dir.path(), "erofs.qcow2", &["--verity", "--fs", "erofs", "--compress", "lz4hc", "--table", "gpt", "--format", "qcow2", "--qcow2-compress"]);
    let raw = dir.path().join("erofs.img");
    run(tool("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&q.img).arg(&raw));
    assert_eq!(sha256_file(&raw), q.report["disk"]["raw_sha256"].as_str().unwrap());
    let disk = Disk { img: raw, report: q.report.clone(), stderr: q.stderr.clone() };
    check_with_veritysetup(&disk, dir.path());
    let c = disk.report["cmdline"]["virtio-blk"].as_str().unwrap();
    assert!(c.ends_with(" root=/dev/dm-0 rootfstype=erofs ro"), "{c}");
    let parts = sfdisk_parts(&disk.img);
    assert_eq!(parts[1]["type"].as_str().unwrap().to_lowercase(), "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5");
}
