//! Numbered kernel patch series: `patches/<MAJOR.MINOR>.x/series` lists the
//! patches to apply, in order.
//!
//! The series file is required: an empty one says "no patches" explicitly, a
//! missing directory or file is an error (a typo in a version must not build
//! an unpatched kernel). Every `.patch` file in the directory must be listed,
//! names must start with a four-digit number, and the numbers must increase.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("no patch series for kernel {series}: {dir} is missing (create it with an empty `series` file for a version without patches)")]
    MissingDir { series: String, dir: PathBuf },
    #[error("{dir} has no `series` file (an empty one means: no patches)")]
    MissingSeries { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{series_file}:{line}: {name:?} is not a numbered patch (NNNN-description.patch)")]
    BadName { series_file: PathBuf, line: usize, name: String },
    #[error("{series_file}:{line}: {name} does not exist")]
    Missing { series_file: PathBuf, line: usize, name: String },
    #[error("{series_file}:{line}: {name} is out of order (numbers must increase)")]
    Order { series_file: PathBuf, line: usize, name: String },
    #[error("{dir} holds {name}, which the series file does not list")]
    Unlisted { dir: PathBuf, name: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    pub number: u32,
    pub name: String,
    pub path: PathBuf,
}

/// The directory of a kernel series' patches: `6.12` -> `patches/6.12.x`.
pub fn series_dir(patches_root: &Path, series: &str) -> PathBuf {
    patches_root.join(format!("{series}.x"))
}

/// Reads and checks the series for kernel `series` (MAJOR.MINOR).
pub fn read_series(patches_root: &Path, series: &str) -> Result<Vec<Patch>, PatchError> {
    let dir = series_dir(patches_root, series);
    if !dir.is_dir() {
        return Err(PatchError::MissingDir { series: series.to_string(), dir });
    }
    let series_file = dir.join("series");
    if !series_file.is_file() {
        return Err(PatchError::MissingSeries { dir });
    }
    let text = std::fs::read_to_string(&series_file).map_err(|source| PatchError::Read { path: series_file.clone(), source })?;
    let mut patches: Vec<Patch> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let name = line.split('#').next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        let line = i + 1;
        let number = name
            .get(..4)
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            .filter(|_| name.as_bytes().get(4) == Some(&b'-') && name.ends_with(".patch") && !name.contains('/'))
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| PatchError::BadName { series_file: series_file.clone(), line, name: name.to_string() })?;
        let path = dir.join(name);
        if !path.is_file() {
            return Err(PatchError::Missing { series_file: series_file.clone(), line, name: name.to_string() });
        }
        if patches.last().is_some_and(|p| p.number >= number) {
            return Err(PatchError::Order { series_file: series_file.clone(), line, name: name.to_string() });
        }
        patches.push(Patch { number, name: name.to_string(), path });
    }
    let entries = std::fs::read_dir(&dir).map_err(|source| PatchError::Read { path: dir.clone(), source })?;
    let mut unlisted: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".patch") && !patches.iter().any(|p| &p.name == n))
        .collect();
    unlisted.sort();
    if let Some(name) = unlisted.into_iter().next() {
        return Err(PatchError::Unlisted { dir, name });
    }
    Ok(patches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn setup(series: Option<&str>, files: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("6.12.x");
        fs::create_dir(&dir).unwrap();
        if let Some(s) = series {
            fs::write(dir.join("series"), s).unwrap();
        }
        for f in files {
            fs::write(dir.join(f), "--- a\n+++ b\n").unwrap();
        }
        root
    }

    #[test]
    fn explicit_empty_series_and_missing_ones() {
        let root = setup(Some("# no patches for this version\n"), &[]);
        assert_eq!(read_series(root.path(), "6.12").unwrap(), vec![]);
        let err = read_series(root.path(), "6.6").unwrap_err();
        assert!(matches!(err, PatchError::MissingDir { .. }), "{err}");
        let root = setup(None, &[]);
        assert!(matches!(read_series(root.path(), "6.12"), Err(PatchError::MissingSeries { .. })));
    }

    #[test]
    fn series_order_and_listing_are_enforced() {
        let root = setup(Some("0001-a.patch\n0002-b.patch # why b\n"), &["0001-a.patch", "0002-b.patch"]);
        let names: Vec<String> = read_series(root.path(), "6.12").unwrap().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["0001-a.patch", "0002-b.patch"]);

        let check = |series: &str, files: &[&str], want: &str| {
            let root = setup(Some(series), files);
            let err = read_series(root.path(), "6.12").unwrap_err().to_string();
            assert!(err.contains(want), "{series:?}: {err}");
        };
        check("0002-b.patch\n0001-a.patch\n", &["0001-a.patch", "0002-b.patch"], "out of order");
        check("0001-a.patch\n", &["0001-a.patch", "0002-b.patch"], "does not list");
        check("0001-a.patch\n", &[], "does not exist");
        check("fix.patch\n", &["fix.patch"], "not a numbered patch");
        check("../0001-x.patch\n", &[], "not a numbered patch");
    }
}
