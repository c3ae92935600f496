//! Kconfig fragments: parsing, merging with provenance, and checking the
//! final `.config` against every request.
//!
//! The check is the point: `make olddefconfig` silently drops an option whose
//! dependencies are not met, and a guest then boots without vsock or DAX. Every
//! requested value must appear identically in the final `.config`, or the build
//! fails naming the option, the fragment line that asked for it and what the
//! kernel made of it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A Kconfig value as written in a fragment or a `.config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptValue {
    /// `# CONFIG_X is not set` (or absent from `.config`).
    NotSet,
    /// `y`, `m`, a number, or a quoted string, kept as written.
    Set(String),
}

impl fmt::Display for OptValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptValue::NotSet => f.write_str("is not set"),
            OptValue::Set(v) => write!(f, "={v}"),
        }
    }
}

/// Where a request came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub fragment: String,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.fragment, self.line)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub name: String,
    pub value: OptValue,
    pub origin: Origin,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{origin}: cannot parse {text:?} (expected CONFIG_NAME=value or `# CONFIG_NAME is not set`)")]
    Syntax { origin: Origin, text: String },
    /// Boxed: the two requests would make every `Result` of this module large.
    #[error("{} is asked for twice with different values: {} at {}, {} at {}", second.name, first.value, first.origin, second.value, second.origin)]
    Conflict { first: Box<Request>, second: Box<Request> },
    #[error("{origin}: {name}=m asks for a module; guest kernels build everything in (no module loading in the guest)")]
    Module { origin: Origin, name: String },
}

fn valid_name(name: &str) -> bool {
    name.strip_prefix("CONFIG_").is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
}

/// Parses one line of a fragment or `.config`: `None` for blanks and comments.
fn parse_line(line: &str) -> Result<Option<(String, OptValue)>, ()> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    if let Some(rest) = line.strip_prefix('#') {
        let rest = rest.trim();
        if let Some(name) = rest.strip_suffix(" is not set") {
            if valid_name(name) {
                return Ok(Some((name.to_string(), OptValue::NotSet)));
            }
        }
        return Ok(None);
    }
    let (name, value) = line.split_once('=').ok_or(())?;
    let value = value.trim();
    if !valid_name(name.trim()) || value.is_empty() {
        return Err(());
    }
    if value.starts_with('"') && !(value.len() >= 2 && value.ends_with('"')) {
        return Err(());
    }
    Ok(Some((name.trim().to_string(), OptValue::Set(value.to_string()))))
}

/// Parses a fragment named `label` (its path relative to kernel-config/).
pub fn parse_fragment(text: &str, label: &str) -> Result<Vec<Request>, ConfigError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let origin = Origin { fragment: label.to_string(), line: i + 1 };
        match parse_line(line) {
            Ok(None) => {}
            Ok(Some((name, value))) => {
                if value == OptValue::Set("m".into()) {
                    return Err(ConfigError::Module { origin, name });
                }
                out.push(Request { name, value, origin });
            }
            Err(()) => return Err(ConfigError::Syntax { origin, text: line.to_string() }),
        }
    }
    Ok(out)
}

/// The union of all fragments: one request per option.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    pub requests: BTreeMap<String, Request>,
}

impl Merged {
    /// Merges fragments in order. Two fragments asking for different values of
    /// one option is an error: which should win is a decision for a person.
    pub fn new(fragments: impl IntoIterator<Item = Request>) -> Result<Self, ConfigError> {
        let mut requests: BTreeMap<String, Request> = BTreeMap::new();
        for r in fragments {
            if let Some(prev) = requests.get(&r.name) {
                if prev.value != r.value {
                    return Err(ConfigError::Conflict { first: Box::new(prev.clone()), second: Box::new(r) });
                }
                continue;
            }
            requests.insert(r.name.clone(), r);
        }
        Ok(Merged { requests })
    }

    /// The text for `KCONFIG_ALLCONFIG`, applied on top of `allnoconfig`.
    pub fn to_allconfig(&self) -> String {
        let mut s = String::new();
        for r in self.requests.values() {
            match &r.value {
                OptValue::NotSet => s.push_str(&format!("# {} is not set\n", r.name)),
                OptValue::Set(v) => s.push_str(&format!("{}={v}\n", r.name)),
            }
        }
        s
    }
}

/// Reads a `.config` into name -> value (absent names are not set).
pub fn parse_dotconfig(text: &str) -> BTreeMap<String, OptValue> {
    text.lines().filter_map(|l| parse_line(l).ok().flatten()).collect()
}

/// One requested option the final configuration does not honour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub name: String,
    pub requested: OptValue,
    pub actual: OptValue,
    pub origin: Origin,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match (&self.requested, &self.actual) {
            (OptValue::Set(_), OptValue::NotSet) => "was dropped (a dependency is missing or the option does not exist in this kernel)".to_string(),
            (_, actual) => format!("ended up {actual}"),
        };
        let gap = if self.requested == OptValue::NotSet { " " } else { "" };
        write!(f, "{}{gap}{} (asked by {}) {what}", self.name, self.requested, self.origin)
    }
}

/// Checks every request against the final `.config`; whitelisted names may be
/// missing. Returns the mismatches, sorted by option name.
pub fn validate(merged: &Merged, final_config: &BTreeMap<String, OptValue>, whitelist: &BTreeSet<String>) -> Vec<Mismatch> {
    merged
        .requests
        .values()
        .filter(|r| !whitelist.contains(&r.name))
        .filter_map(|r| {
            let actual = final_config.get(&r.name).cloned().unwrap_or(OptValue::NotSet);
            (actual != r.value).then(|| Mismatch { name: r.name.clone(), requested: r.value.clone(), actual, origin: r.origin.clone() })
        })
        .collect()
}

/// Parses a whitelist file: one `CONFIG_NAME` per line, `#` comments.
pub fn parse_whitelist(text: &str, label: &str) -> Result<BTreeSet<String>, ConfigError> {
    let mut out = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if !valid_name(line) {
            return Err(ConfigError::Syntax { origin: Origin { fragment: label.to_string(), line: i + 1 }, text: line.to_string() });
        }
        out.insert(line.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &str) -> OptValue {
        OptValue::Set(v.to_string())
    }

    #[test]
    fn fragments_parse_with_line_numbers() {
        let text = "# Why: vsock for the agent.\nCONFIG_VSOCKETS=y\n\n# CONFIG_MODULES is not set\nCONFIG_CMDLINE=\"console=ttyS0\"\nCONFIG_NR_CPUS=64\n";
        let reqs = parse_fragment(text, "common/vsock.conf").unwrap();
        let got: Vec<(&str, OptValue, usize)> = reqs.iter().map(|r| (r.name.as_str(), r.value.clone(), r.origin.line)).collect();
        assert_eq!(
            got,
            [
                ("CONFIG_VSOCKETS", set("y"), 2),
                ("CONFIG_MODULES", OptValue::NotSet, 4),
                ("CONFIG_CMDLINE", set("\"console=ttyS0\""), 5),
                ("CONFIG_NR_CPUS", set("64"), 6)
            ]
        );
    }

    #[test]
    fn bad_lines_are_errors_naming_the_place() {
        for bad in ["VSOCKETS=y", "CONFIG_X", "CONFIG_X=", "CONFIG_=y", "CONFIG_X=\"open"] {
            let err = parse_fragment(&format!("\n{bad}\n"), "f.conf").unwrap_err();
            assert!(err.to_string().starts_with("f.conf:2: cannot parse"), "{bad}: {err}");
        }
        assert!(matches!(parse_fragment("CONFIG_X=m", "f.conf"), Err(ConfigError::Module { .. })));
    }

    #[test]
    fn merging_rejects_conflicts_and_keeps_the_first_origin() {
        let a = parse_fragment("CONFIG_A=y\nCONFIG_B=y\n", "a.conf").unwrap();
        let b = parse_fragment("CONFIG_B=y\nCONFIG_C=y\n", "b.conf").unwrap();
        let merged = Merged::new(a.into_iter().chain(b)).unwrap();
        assert_eq!(merged.requests["CONFIG_B"].origin.fragment, "a.conf");
        assert_eq!(merged.to_allconfig(), "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=y\n");

        let c = parse_fragment("# CONFIG_A is not set\n", "c.conf").unwrap();
        let err = Merged::new(merged.requests.into_values().chain(c)).unwrap_err();
        assert_eq!(err.to_string(), "CONFIG_A is asked for twice with different values: =y at a.conf:1, is not set at c.conf:1");
    }

    #[test]
    fn validation_names_dropped_options_and_their_fragment() {
        // The classic trap: FS_DAX asked for, but ZONE_DEVICE's dependencies
        // missing, so olddefconfig drops it without a word.
        let merged =
            Merged::new(parse_fragment("CONFIG_DAX=y\nCONFIG_FS_DAX=y\n# CONFIG_MODULES is not set\nCONFIG_NR_CPUS=64\n", "features/dax.conf").unwrap())
                .unwrap();
        let final_config = parse_dotconfig("CONFIG_DAX=y\n# CONFIG_FS_DAX is not set\nCONFIG_NR_CPUS=8\nCONFIG_OTHER=y\n");
        let mismatches = validate(&merged, &final_config, &BTreeSet::new());
        let text: Vec<String> = mismatches.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "CONFIG_FS_DAX=y (asked by features/dax.conf:2) was dropped (a dependency is missing or the option does not exist in this kernel)",
                "CONFIG_NR_CPUS=64 (asked by features/dax.conf:4) ended up =8",
            ]
        );
        let whitelist = parse_whitelist("CONFIG_FS_DAX # renamed\nCONFIG_NR_CPUS\n", "w").unwrap();
        assert!(validate(&merged, &final_config, &whitelist).is_empty());
        assert!(parse_whitelist("not a name\n", "w").is_err());
    }
}
