//! The committed fuzz inputs, replayed: every file of `fuzz/corpus/<target>/`
//! and `fuzz/regressions/<target>/` through the target's function. A crash
//! the fuzzer found gets its input into `regressions/`, so it stays fixed
//! without the fuzzer (which needs cargo-fuzz and a special build).

use std::path::PathBuf;

use super::*;

/// Runs `target` on every committed input for `name`; fails naming each input
/// that panicked.
fn replay(name: &str, target: impl Fn(&[u8])) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut inputs = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = root.join(kind).join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            inputs.push(entry.expect("read a fuzz input directory").path());
        }
    }
    inputs.sort();
    assert!(!inputs.is_empty(), "no committed inputs for fuzz target {name} under {}", root.display());
    let mut failed = Vec::new();
    for path in &inputs {
        let data = std::fs::read(path).expect("read a fuzz input");
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "fuzz target {name} panicked on {} of {} inputs: {failed:#?}", failed.len(), inputs.len());
}

#[test]
fn fuzz_inputs_layer() {
    replay("layer", layer);
}

#[test]
fn fuzz_inputs_oci_manifest() {
    replay("oci_manifest", oci_manifest);
}

#[test]
fn fuzz_inputs_cpio() {
    replay("cpio", cpio_round_trip);
}

#[test]
fn fuzz_inputs_disk() {
    replay("disk", |data| disk(data, Fsck::Always));
}

#[test]
fn fuzz_inputs_kernel_fragment() {
    replay("kernel_fragment", kernel_fragment);
}

/// The tree decoder makes every kind of entry the writers must handle.
#[test]
fn generated_trees_have_every_kind_of_entry() {
    // kind byte, path (depth 1, name index), mode (2), owner, mtime, then per kind.
    let mut data = Vec::new();
    data.extend_from_slice(&[0, 0, 2, 0o55, 0o7, 0, 1]); // dir "c"
    data.extend_from_slice(&[1, 1, 2, 0, 0o44, 0o1, 64, 2, 2, 1, 2, 7, 0x81]); // file "c/b": 4096 + pattern... then zero run
    data.extend_from_slice(&[3, 0, 0, 0o77, 0o1, 0, 9, 6]); // symlink "a" -> "nowhere"
    data.extend_from_slice(&[4, 0, 3, 0, 0, 0, 9, 1]); // hard link "d" -> "c/b"
    data.extend_from_slice(&[5, 0, 14, 0, 0, 0, 9, 1, 0, 3, 0, 0, 0]); // char device "sp ace"
    data.extend_from_slice(&[7, 0, 6, 0, 0, 0, 9]); // fifo "bin"
    let mut tree = Tree::new();
    tree.apply_layer(&treegen::layer(&data)[..], 0, &super::intake()).expect("a valid layer");
    let plan = Plan::new(&tree).unwrap();
    let t = plan.totals();
    assert_eq!((t.dirs, t.files, t.symlinks, t.special), (2, 1, 1, 2), "{t:?}");
    assert_eq!(plan.inodes().iter().map(|p| p.nlink).max(), Some(3), "root: 2 + one subdirectory; the file: 2 names");
}
