//! Paths inside the guest tree, validated on the way in.
//!
//! A [`RelPath`] is a list of plain components relative to the root: never
//! absolute, never `..`, never empty components. Names from layers are parsed
//! strictly: an absolute name or a `..` component is an error, not something to
//! clean up silently, because a benign image never carries one.

use std::fmt;

/// Linux's PATH_MAX and NAME_MAX: anything longer is an absurd header value.
pub const PATH_MAX: usize = 4096;
pub const NAME_MAX: usize = 255;

/// How many bytes of a name a message shows.
pub const SHOWN_MAX: usize = 200;

/// A name from an image (path, link target, header value) as a message shows
/// it: lossy UTF-8, cut to [`SHOWN_MAX`] bytes with an ellipsis and the full
/// length when longer, so a hostile megabyte-long name cannot make a
/// megabyte-long error. Every message naming an entry goes through here.
pub fn excerpt(raw: &[u8]) -> String {
    match raw.get(..SHOWN_MAX) {
        Some(head) if raw.len() > SHOWN_MAX => format!("{}… ({} bytes)", String::from_utf8_lossy(head), raw.len()),
        _ => String::from_utf8_lossy(raw).into_owned(),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("absolute path {0:?} (layer entries must be relative to the root)")]
    Absolute(String),
    #[error("path {0:?} has a `..` component and could escape the root")]
    DotDot(String),
    #[error("path {path:?} is {len} bytes, over the limit of {PATH_MAX}")]
    TooLong { path: String, len: usize },
    #[error("path {path:?} has a component of {len} bytes, over the limit of {NAME_MAX}")]
    NameTooLong { path: String, len: usize },
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
}

/// A validated path relative to the root of the tree.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath {
    parts: Vec<Vec<u8>>,
}

impl RelPath {
    /// The root directory itself.
    pub fn root() -> Self {
        RelPath::default()
    }

    /// Parses a name as found in a layer: leading `./` is accepted (many tools
    /// write it), a leading `/` or any `..` component is rejected.
    pub fn parse_layer(raw: &[u8]) -> Result<Self, PathError> {
        let show = || excerpt(raw);
        if raw.starts_with(b"/") {
            return Err(PathError::Absolute(show()));
        }
        Self::parse_components(raw, show)
    }

    /// Parses a destination given by the user (`--add SRC:/etc/x`, `--remove /x`):
    /// absolute or relative, both meaning "from the guest root"; `..` rejected.
    pub fn parse_user(raw: &str) -> Result<Self, PathError> {
        Self::parse_components(raw.trim_start_matches('/').as_bytes(), || excerpt(raw.as_bytes()))
    }

    fn parse_components(raw: &[u8], shown: impl Fn() -> String) -> Result<Self, PathError> {
        if raw.len() > PATH_MAX {
            return Err(PathError::TooLong { path: shown(), len: raw.len() });
        }
        if raw.contains(&0) {
            return Err(PathError::Nul(shown()));
        }
        let mut parts = Vec::new();
        for comp in raw.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => continue,
                b".." => return Err(PathError::DotDot(shown())),
                name if name.len() > NAME_MAX => return Err(PathError::NameTooLong { path: shown(), len: name.len() }),
                name => parts.push(name.to_vec()),
            }
        }
        Ok(RelPath { parts })
    }

    pub fn is_root(&self) -> bool {
        self.parts.is_empty()
    }

    pub fn components(&self) -> impl DoubleEndedIterator<Item = &[u8]> {
        self.parts.iter().map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.parts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    pub fn file_name(&self) -> Option<&[u8]> {
        self.parts.last().map(Vec::as_slice)
    }

    /// Splits into the parent directory and the last name; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &[u8])> {
        let (last, rest) = self.parts.split_last()?;
        Some((RelPath { parts: rest.to_vec() }, last))
    }

    pub fn join(&self, name: &[u8]) -> RelPath {
        let mut parts = self.parts.clone();
        parts.push(name.to_vec());
        RelPath { parts }
    }

    /// The path as bytes without a leading slash (`usr/bin/env`), `.` for the root.
    pub fn to_bytes(&self) -> Vec<u8> {
        if self.parts.is_empty() {
            return b".".to_vec();
        }
        self.parts.join(&b'/')
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.to_bytes()))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", String::from_utf8_lossy(&self.parts.join(&b'/')))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expected: Result<&str, &str>) {
        let got = RelPath::parse_layer(raw.as_bytes());
        match (got, expected) {
            (Ok(p), Ok(want)) => assert_eq!(String::from_utf8(p.to_bytes()).unwrap(), want, "{raw}"),
            (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{raw}: {e}"),
            (got, want) => panic!("{raw}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn layer_paths() {
        check("etc/passwd", Ok("etc/passwd"));
        check("./etc/passwd", Ok("etc/passwd"));
        check("./", Ok("."));
        check("usr//lib/./x/", Ok("usr/lib/x"));
        check("/etc/passwd", Err("absolute"));
        check("../etc/passwd", Err("`..`"));
        check("a/../../b", Err("`..`"));
        check("a/..", Err("`..`"));
        check(&"x".repeat(256), Err("component of 256 bytes"));
        check(&"a/".repeat(2049), Err("over the limit of 4096"));
    }

    #[test]
    fn long_names_are_shown_cut() {
        assert_eq!(excerpt(b"etc/passwd"), "etc/passwd");
        assert_eq!(excerpt(&[b'a'; SHOWN_MAX]), "a".repeat(SHOWN_MAX));
        assert_eq!(excerpt(&[b'a'; 5000]), format!("{}… (5000 bytes)", "a".repeat(SHOWN_MAX)));
        let err = RelPath::parse_layer(&[b'a'; 5000]).unwrap_err().to_string();
        assert!(err.len() < 400 && err.contains("5000 bytes"), "{err}");
    }

    #[test]
    fn user_paths_may_be_absolute() {
        assert_eq!(RelPath::parse_user("/sbin/init").unwrap().to_bytes(), b"sbin/init");
        assert_eq!(RelPath::parse_user("/").unwrap(), RelPath::root());
        assert!(RelPath::parse_user("/../x").is_err());
    }

    #[test]
    fn split_and_join() {
        let p = RelPath::parse_user("a/b/c").unwrap();
        let (parent, name) = p.split_last().unwrap();
        assert_eq!(parent.to_bytes(), b"a/b");
        assert_eq!(name, b"c");
        assert_eq!(parent.join(b"c"), p);
        assert!(RelPath::root().split_last().is_none());
        assert_eq!(format!("{p}"), "/a/b/c");
    }
}
