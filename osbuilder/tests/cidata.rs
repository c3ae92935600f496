//! `osbuilder cidata`, checked by the tools that own the format: `fsck.fat -n`
//! (dosfstools) finds nothing to fix, mtools' `mcopy` reads every file back
//! byte for byte and `mdir` shows the timestamps, and `blkid -p` (util-linux,
//! which cloud-init's `blkid -tLABEL=cidata` uses) sees a vfat volume labelled
//! `cidata`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("osbuilder-cidata-it-").tempdir().unwrap()
}

/// `osbuilder cidata ARGS` with SOURCE_DATE_EPOCH set to `epoch` or unset.
fn run_cidata(args: &[&str], epoch: Option<&str>) -> Output {
    let mut cmd = osbuilder();
    cmd.arg("cidata").args(args).env_remove("SOURCE_DATE_EPOCH");
    if let Some(epoch) = epoch {
        cmd.env("SOURCE_DATE_EPOCH", epoch);
    }
    cmd.output().expect("run osbuilder")
}

/// Builds a seed, asserts success and returns the summary line.
fn cidata_ok(args: &[&str], epoch: Option<&str>) -> String {
    let out = run_cidata(args, epoch);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "osbuilder cidata {args:?} failed:\n{stderr}");
    stderr
}

/// Runs a build that must fail and returns its stderr.
fn cidata_err(args: &[&str]) -> String {
    let out = run_cidata(args, None);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "osbuilder cidata {args:?} should have failed:\n{stderr}");
    stderr
}

/// Writes the input files into `dir` and returns their paths by name.
fn inputs(dir: &Path, files: &[(&str, &[u8])]) -> Vec<(String, PathBuf)> {
    files
        .iter()
        .map(|(name, bytes)| {
            let path = dir.join(format!("in-{name}"));
            fs::write(&path, bytes).unwrap();
            (name.to_string(), path)
        })
        .collect()
}

/// `--user-data P --meta-data P ...` for the inputs.
fn input_args(inputs: &[(String, PathBuf)]) -> Vec<String> {
    inputs.iter().flat_map(|(name, path)| [format!("--{name}"), path_str(path).to_string()]).collect()
}

fn build(dir: &Path, name: &str, inputs: &[(String, PathBuf)], extra: &[&str], epoch: Option<&str>) -> (PathBuf, String) {
    let seed = dir.join(name);
    let mut args: Vec<String> = vec!["-o".into(), path_str(&seed).into()];
    args.extend(input_args(inputs));
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let summary = cidata_ok(&args, epoch);
    (seed, summary)
}

/// `fsck.fat -n` exits 0 and reports nothing but its banner and the count.
fn assert_fsck_clean(seed: &Path) {
    let out = tool("fsck.fat").arg("-n").arg(seed).output().expect("run fsck.fat");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fsck.fat -n {}: {}\n{text}", seed.display(), out.status);
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("fsck.fat ")).collect();
    assert_eq!(lines.len(), 1, "fsck.fat said more than its summary:\n{text}");
    assert!(lines[0].contains(" files, "), "{text}");
}

/// A file of the seed as mtools reads it.
fn mcopy(seed: &Path, name: &str) -> Vec<u8> {
    run(tool("mcopy").arg("-i").arg(seed).arg(format!("::{name}")).arg("-")).stdout
}

/// `mdir` of the root: the long names with their size, date and time.
fn mdir(seed: &Path) -> String {
    run_stdout(tool("mdir").arg("-i").arg(seed).arg("::"))
}

/// `blkid -p -o export` as KEY=VALUE pairs.
fn blkid(seed: &Path) -> Vec<(String, String)> {
    run_stdout(tool("blkid").args(["-p", "-o", "export"]).arg(seed))
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

fn blkid_value(seed: &Path, key: &str) -> Option<String> {
    blkid(seed).into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn every_file_reads_back_and_the_label_is_cidata() {
    let work = scratch();
    // Awkward on purpose: a file crossing a cluster, one exactly two
    // clusters, binary bytes and CRLF, and an empty file (no cluster at all).
    let user_data: Vec<u8> = b"#cloud-config\r\npassword: x\r\n".iter().copied().cycle().take(513).collect();
    let network_config: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 256) as u8).collect();
    let files = inputs(
        work.path(),
        &[("user-data", &user_data), ("meta-data", b"instance-id: iid-local01\n"), ("network-config", &network_config), ("vendor-data", b"")],
    );
    let (seed, summary) = build(work.path(), "seed.img", &files, &[], None);
    assert_fsck_clean(&seed);
    for (name, path) in &files {
        assert_eq!(mcopy(&seed, name), fs::read(path).unwrap(), "{name} reads back byte for byte");
    }
    let listing = mdir(&seed);
    for name in ["user-data", "meta-data", "network-config", "vendor-data"] {
        assert!(listing.lines().any(|l| l.ends_with(&format!(" {name}"))), "mdir lists {name}:\n{listing}");
    }
    assert_eq!(listing.lines().filter(|l| l.contains("1980-01-01")).count(), 4, "four files and nothing else:\n{listing}");

    assert_eq!(blkid_value(&seed, "LABEL").as_deref(), Some("cidata"), "{:?}", blkid(&seed));
    assert_eq!(blkid_value(&seed, "LABEL_FATBOOT").as_deref(), Some("cidata"), "the boot sector's copy too");
    assert_eq!(blkid_value(&seed, "TYPE").as_deref(), Some("vfat"));
    assert_eq!(blkid_value(&seed, "VERSION").as_deref(), Some("FAT12"));
    let uuid = blkid_value(&seed, "UUID").expect("a volume ID");
    assert!(summary.contains(&format!("volume id {uuid}")), "the summary names blkid's UUID {uuid}: {summary}");
    // The plain lookup cloud-init does.
    let found = run_stdout(tool("blkid").args(["-p", "-o", "value", "-s", "LABEL"]).arg(&seed));
    assert_eq!(found.trim(), "cidata");

    // Automatic size: the smallest 64 KiB step with room to spare.
    assert_eq!(fs::metadata(&seed).unwrap().len(), 128 << 10, "{summary}");
    assert!(summary.contains("(131072 bytes, FAT12 labelled cidata"), "{summary}");
    assert_eq!(dir_names(work.path()).iter().filter(|n| n.starts_with(".osbuilder-")).count(), 0, "no temporary file left");
}

#[test]
fn same_inputs_give_the_same_bytes_and_a_changed_input_other_bytes() {
    let work = scratch();
    let files = inputs(work.path(), &[("user-data", b"#cloud-config\nhostname: a\n"), ("meta-data", b"instance-id: i-1\n")]);
    let (first, _) = build(work.path(), "first.img", &files, &[], Some("1700000000"));
    let (second, _) = build(work.path(), "second.img", &files, &[], Some("1700000000"));
    assert_eq!(sha256_file(&first), sha256_file(&second), "two builds of the same inputs");

    fs::write(&files[0].1, b"#cloud-config\nhostname: b\n").unwrap();
    let (changed, _) = build(work.path(), "changed.img", &files, &[], Some("1700000000"));
    assert_ne!(sha256_file(&first), sha256_file(&changed), "one changed byte of user-data");
    assert_ne!(blkid_value(&first, "UUID"), blkid_value(&changed, "UUID"), "the volume ID follows the content");
    assert_eq!(mcopy(&changed, "user-data"), b"#cloud-config\nhostname: b\n");
    assert_fsck_clean(&changed);
}

#[test]
fn source_date_epoch_sets_the_timestamps() {
    let work = scratch();
    let files = inputs(work.path(), &[("user-data", b"#cloud-config\n"), ("meta-data", b"instance-id: i-1\n")]);
    let (fixed, _) = build(work.path(), "fixed.img", &files, &[], None);
    let (dated, _) = build(work.path(), "dated.img", &files, &[], Some("1700000000"));
    let (early, _) = build(work.path(), "early.img", &files, &[], Some("0"));
    let (late, _) = build(work.path(), "late.img", &files, &[], Some("99999999999"));
    let (flag, _) = build(work.path(), "flag.img", &files, &["--source-date-epoch", "1700000000"], None);

    let times = |seed: &Path| -> Vec<String> {
        mdir(seed)
            .lines()
            .filter(|l| l.ends_with(" user-data") || l.ends_with(" meta-data"))
            .map(|l| l.split_whitespace().skip(2).take(2).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(times(&fixed), ["1980-01-01 0:00", "1980-01-01 0:00"], "without SOURCE_DATE_EPOCH: FAT's first day\n{}", mdir(&fixed));
    // 1700000000 is 2023-11-14 22:13:20 UTC.
    assert_eq!(times(&dated), ["2023-11-14 22:13", "2023-11-14 22:13"], "{}", mdir(&dated));
    assert_eq!(times(&early), times(&fixed), "before 1980 clamps to 1980-01-01");
    assert_eq!(times(&late), ["2107-12-31 23:59", "2107-12-31 23:59"], "after 2107 clamps to FAT's last time\n{}", mdir(&late));
    assert_ne!(sha256_file(&fixed), sha256_file(&dated));
    assert_eq!(sha256_file(&fixed), sha256_file(&early));
    assert_eq!(sha256_file(&dated), sha256_file(&flag), "--source-date-epoch is SOURCE_DATE_EPOCH");
    for seed in [&fixed, &dated, &late] {
        assert_fsck_clean(seed);
    }
}

#[test]
fn generated_meta_data() {
    let work = scratch();
    let files = inputs(work.path(), &[("user-data", b"#cloud-config\n")]);
    let (seed, _) = build(work.path(), "seed.img", &files, &["--instance-id", "iid-abc", "--hostname", "vm1"], None);
    assert_fsck_clean(&seed);
    assert_eq!(mcopy(&seed, "meta-data"), b"instance-id: iid-abc\nlocal-hostname: vm1\n");
    assert_eq!(mcopy(&seed, "user-data"), b"#cloud-config\n");
    let (bare, _) = build(work.path(), "bare.img", &files, &["--instance-id", "iid-abc"], None);
    assert_eq!(mcopy(&bare, "meta-data"), b"instance-id: iid-abc\n");
    assert_eq!(blkid_value(&bare, "LABEL").as_deref(), Some("cidata"));
}

#[test]
fn larger_and_fixed_sizes_are_fat16_and_clean() {
    let work = scratch();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let files = inputs(work.path(), &[("user-data", &big), ("meta-data", b"instance-id: i-1\n")]);
    let (auto, summary) = build(work.path(), "auto.img", &files, &[], None);
    assert_eq!(blkid_value(&auto, "VERSION").as_deref(), Some("FAT16"), "{summary}");
    let len = fs::metadata(&auto).unwrap().len();
    assert_eq!(len % (64 << 10), 0);
    assert!((3_000_000 + 750_000..4_500_000).contains(&len), "the files, a quarter of them free, a little more: {len}");
    assert_fsck_clean(&auto);
    assert_eq!(mcopy(&auto, "user-data"), big);

    let (fixed, _) = build(work.path(), "fixed.img", &files, &["--size", "8M"], None);
    assert_eq!(fs::metadata(&fixed).unwrap().len(), 8 << 20);
    assert_fsck_clean(&fixed);
    assert_eq!(mcopy(&fixed, "user-data"), big);
    assert_eq!(blkid_value(&fixed, "LABEL").as_deref(), Some("cidata"));
}

/// Every refusal names what is wrong and leaves the output directory as it
/// was: no seed, no temporary file, an older seed untouched.
#[test]
fn errors_are_clear_and_leave_nothing() {
    let work = scratch();
    let files = inputs(work.path(), &[("user-data", &[b'#'; 100_000]), ("meta-data", b"instance-id: i-1\n")]);
    let out_dir = work.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let seed = out_dir.join("seed.img");
    let (user, meta) = (path_str(&files[0].1), path_str(&files[1].1));
    let missing = work.path().join("no-such-network-config");
    let check = |args: &[&str], expected: &[&str]| {
        let mut full = vec!["-o", path_str(&seed)];
        full.extend_from_slice(args);
        let err = cidata_err(&full);
        for text in expected {
            assert!(err.contains(text), "{args:?}: the error should say {text:?}:\n{err}");
        }
        let left = dir_names(&out_dir);
        assert!(left.is_empty() || left == ["seed.img"], "{args:?} left {left:?}");
        err
    };

    check(&["--user-data", user, "--meta-data", meta, "--network-config", path_str(&missing)], &["network-config", "no-such-network-config", "No such file"]);
    check(&["--user-data", path_str(&work.path().join("nope")), "--meta-data", meta], &["user-data", "nope"]);
    check(&["--user-data", user, "--meta-data", path_str(work.path())], &["meta-data", "not a regular file"]);
    check(&["--user-data", user, "--meta-data", meta, "--instance-id", "i-2"], &["--meta-data", "--instance-id", "cannot be used with"]);
    check(&["--user-data", user], &["--meta-data"]);
    check(&["--meta-data", meta], &["--user-data"]);
    check(&["--user-data", user, "--meta-data", meta, "--hostname", "h"], &["--meta-data", "--hostname", "cannot be used with"]);
    check(&["--user-data", user, "--hostname", "h"], &["--instance-id"]);
    check(&["--user-data", user, "--instance-id", "1234"], &["--instance-id \"1234\"", "--meta-data file"]);
    check(&["--user-data", user, "--meta-data", meta, "--size", "1000"], &["--size 1000", "multiple of 512"]);
    check(&["--user-data", user, "--meta-data", meta, "--size", "3G"], &["--size", "FAT16"]);
    let err = check(&["--user-data", user, "--meta-data", meta, "--size", "64K"], &["--size 65536 is too small", "user-data is 100000", "needs at least"]);
    assert!(dir_names(&out_dir).is_empty(), "no seed and no temporary file: {:?}", dir_names(&out_dir));

    // The size the error names is enough.
    let needed = err.split("needs at least ").nth(1).and_then(|t| t.split_whitespace().next()).expect("a size");
    cidata_ok(&["-o", path_str(&seed), "--user-data", user, "--meta-data", meta, "--size", needed], None);
    assert_eq!(fs::metadata(&seed).unwrap().len(), needed.parse::<u64>().unwrap());
    assert_fsck_clean(&seed);

    // A failed rebuild keeps the good seed already there.
    let before = sha256_file(&seed);
    check(&["--user-data", user, "--meta-data", meta, "--size", "64K"], &["too small"]);
    assert_eq!(sha256_file(&seed), before, "the earlier seed is untouched");
    assert_eq!(dir_names(&out_dir), ["seed.img"]);
}
