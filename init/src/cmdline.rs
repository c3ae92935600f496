//! The kernel command line: split exactly as the kernel splits it
//! (`next_arg` in lib/cmdline.c, double quotes protect spaces), then our
//! `osb.*` options read from it. Other parameters are ignored.

use std::fmt;
use std::time::Duration;

/// Splits a command line into `(key, value)` pairs the way the kernel does:
/// whitespace separates parameters unless inside double quotes; a value
/// wrapped in quotes (`k="a b"`) or a whole quoted parameter (`"k=a b"`)
/// loses those outer quotes; quotes inside a value are kept. A parameter
/// without `=` has no value. Parsing stops at `--` (the rest is init's argv).
pub fn split(cmdline: &str) -> Vec<(String, Option<String>)> {
    let bytes = cmdline.as_bytes();
    let mut params = Vec::new();
    let mut i = 0;
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= bytes.len() {
            break;
        }
        let mut start = i;
        let quoted = bytes[i] == b'"';
        let mut in_quote = false;
        if quoted {
            start += 1;
            i += 1;
            in_quote = true;
        }
        let mut equals = None;
        while i < bytes.len() && (in_quote || !bytes[i].is_ascii_whitespace()) {
            if equals.is_none() && bytes[i] == b'=' {
                equals = Some(i);
            }
            if bytes[i] == b'"' {
                in_quote = !in_quote;
            }
            i += 1;
        }
        let mut end = i;
        let strip_closing = |end: usize| {
            if end > start && bytes[end - 1] == b'"' {
                end - 1
            } else {
                end
            }
        };
        let (key, value) = match equals {
            None => {
                if quoted {
                    end = strip_closing(end);
                }
                (&cmdline[start..end], None)
            }
            Some(eq) => {
                let mut value_start = eq + 1;
                if quoted || bytes.get(value_start) == Some(&b'"') {
                    if bytes.get(value_start) == Some(&b'"') {
                        value_start += 1;
                    }
                    end = strip_closing(end).max(value_start);
                }
                (&cmdline[start..eq], Some(cmdline[value_start..end].to_owned()))
            }
        };
        if key == "--" && value.is_none() {
            break;
        }
        params.push((key.to_owned(), value));
    }
    params
}

/// Where the root filesystem comes from (`osb.root=`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootSource {
    /// Stay in the initramfs.
    Initramfs,
    /// A block device node, e.g. `/dev/vda1` or `/dev/pmem0p1`.
    Block(String),
    /// A virtio-fs tag.
    VirtioFs(String),
    /// A 9p (virtio transport) tag.
    NineP(String),
}

/// What init does when the workload ends (`osb.on_exit=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    PowerOff,
    Reboot,
    /// Stay up (for the agent).
    Stay,
}

/// Every `osb.*` option with its default.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    pub root: RootSource,
    pub rootfstype: Option<String>,
    pub rootflags: Option<String>,
    pub dax: bool,
    pub ro: bool,
    pub overlay: bool,
    pub hostname: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// `K=V` strings, in order.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub on_exit: OnExit,
    pub agent: bool,
    pub agent_port: u32,
    /// The vsock peer the agent serves (`osb.agent.allow_cid=CID|any`); None: its
    /// default, the host (CID 2).
    pub agent_allow_cid: Option<String>,
    pub shutdown_timeout: Duration,
    pub debug: bool,
    pub entropy: Option<Vec<u8>>,
    /// `osb.mount=SOURCE TARGET [TYPE [OPTIONS]]`, in order (repeatable).
    pub mounts: Vec<osb_agent::volume::MountSpec>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            root: RootSource::Initramfs,
            rootfstype: None,
            rootflags: None,
            dax: false,
            ro: false,
            overlay: false,
            hostname: None,
            entrypoint: None,
            cmd: None,
            env: Vec::new(),
            workdir: None,
            user: None,
            on_exit: OnExit::PowerOff,
            agent: true,
            agent_port: 1024,
            agent_allow_cid: None,
            shutdown_timeout: Duration::from_secs(3),
            debug: false,
            entropy: None,
            mounts: Vec::new(),
        }
    }
}

/// A bad `osb.*` option: reported on the console; the option keeps its default.
#[derive(Debug, PartialEq, Eq)]
pub struct OptionError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernel command line option {}: {}", self.key, self.message)
    }
}

/// A list value: a JSON array of strings when it starts with `[`, else
/// words split on whitespace.
pub fn parse_list(value: &str) -> Result<Vec<String>, String> {
    if value.trim_start().starts_with('[') {
        serde_json::from_str::<serde_json::Value>(value)
            .ok()
            .and_then(|v| crate::config::string_list(&v))
            .ok_or_else(|| format!("{value:?} is not a JSON array of strings"))
    } else {
        Ok(value.split_whitespace().map(str::to_owned).collect())
    }
}

/// Stores an option's value (for match arms that cannot fail).
fn set<T>(slot: &mut T, value: T) -> Result<(), String> {
    *slot = value;
    Ok(())
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value {
        "1" | "y" | "yes" | "true" | "on" => Ok(true),
        "0" | "n" | "no" | "false" | "off" => Ok(false),
        _ => Err(format!("{value:?} is not a boolean; use 1 or 0")),
    }
}

fn parse_root(value: &str) -> Result<RootSource, String> {
    let tagged = |tag: &str, make: fn(String) -> RootSource| {
        if tag.is_empty() {
            Err(format!("{value:?} names no tag"))
        } else {
            Ok(make(tag.to_owned()))
        }
    };
    if value.is_empty() || value == "none" || value == "initramfs" {
        Ok(RootSource::Initramfs)
    } else if let Some(tag) = value.strip_prefix("virtiofs:") {
        tagged(tag, RootSource::VirtioFs)
    } else if let Some(tag) = value.strip_prefix("9p:") {
        tagged(tag, RootSource::NineP)
    } else if value.starts_with("/dev/") {
        Ok(RootSource::Block(value.to_owned()))
    } else {
        Err(format!("{value:?} is not none, /dev/..., virtiofs:TAG or 9p:TAG"))
    }
}

fn parse_hex(value: &str) -> Result<Vec<u8>, String> {
    let digits = value.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    digits
        .chunks(2)
        .map(|pair| std::str::from_utf8(pair).ok().and_then(|s| u8::from_str_radix(s, 16).ok()).ok_or_else(|| format!("{value:?} is not hex")))
        .collect()
}

impl Options {
    /// Reads the `osb.*` options from a command line. Repeated options: the
    /// last wins, except `osb.env`, which accumulates. Bad values and unknown
    /// `osb.*` keys are returned as errors beside the options (the option
    /// keeps its default), except `osb.root` and `osb.mount`, whose errors are
    /// fatal: booting the wrong root, or without a volume, is worse than not booting.
    pub fn parse(cmdline: &str) -> Result<(Options, Vec<OptionError>), OptionError> {
        let mut opts = Options::default();
        let mut errors = Vec::new();
        for (key, value) in split(cmdline) {
            let Some(name) = key.strip_prefix("osb.") else {
                continue;
            };
            let value = value.unwrap_or_default();
            let result = match name {
                "root" => {
                    opts.root = parse_root(&value).map_err(|message| OptionError { key: key.clone(), message })?;
                    Ok(())
                }
                // Fatal too: a workload started without the volume it was given would
                // write where nothing persists.
                "mount" => {
                    let spec = osb_agent::volume::MountSpec::parse_line(&value).map_err(|e| OptionError { key: key.clone(), message: e.0 })?;
                    opts.mounts.push(spec);
                    Ok(())
                }
                "rootfstype" => set(&mut opts.rootfstype, Some(value).filter(|v| !v.is_empty())),
                "rootflags" => set(&mut opts.rootflags, Some(value).filter(|v| !v.is_empty())),
                "dax" => parse_bool(&value).map(|b| opts.dax = b),
                "ro" => parse_bool(&value).map(|b| opts.ro = b),
                "overlay" => parse_bool(&value).map(|b| opts.overlay = b),
                "hostname" => set(&mut opts.hostname, Some(value)),
                "entrypoint" => parse_list(&value).map(|l| opts.entrypoint = Some(l)),
                "cmd" => parse_list(&value).map(|l| opts.cmd = Some(l)),
                "env" if value.contains('=') => {
                    opts.env.push(value);
                    Ok(())
                }
                "env" => Err(format!("{value:?} is not KEY=VALUE")),
                "workdir" => set(&mut opts.workdir, Some(value)),
                "user" => set(&mut opts.user, Some(value)),
                "on_exit" => match value.as_str() {
                    "poweroff" => set(&mut opts.on_exit, OnExit::PowerOff),
                    "reboot" => set(&mut opts.on_exit, OnExit::Reboot),
                    "stay" => set(&mut opts.on_exit, OnExit::Stay),
                    _ => Err(format!("{value:?} is not poweroff, reboot or stay")),
                },
                "agent" => parse_bool(&value).map(|b| opts.agent = b),
                "agent.port" => value.parse().map(|p| opts.agent_port = p).map_err(|_| format!("{value:?} is not a port number")),
                "agent.allow_cid" if value == "any" || value.parse::<u32>().is_ok() => set(&mut opts.agent_allow_cid, Some(value)),
                "agent.allow_cid" => Err(format!("{value:?} is neither a vsock CID nor \"any\"")),
                "shutdown_timeout" => value
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 3600.0)
                    .map(|s| opts.shutdown_timeout = Duration::from_secs_f64(s))
                    .ok_or_else(|| format!("{value:?} is not a number of seconds")),
                "debug" => parse_bool(&value).map(|b| opts.debug = b),
                "entropy" => parse_hex(&value).map(|seed| opts.entropy = Some(seed)),
                _ => Err("unknown option".to_owned()),
            };
            if let Err(message) = result {
                errors.push(OptionError { key, message });
            }
        }
        Ok((opts, errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_split(cmdline: &str, expected: &[(&str, Option<&str>)]) {
        let got = split(cmdline);
        let expected: Vec<(String, Option<String>)> = expected.iter().map(|(k, v)| (k.to_string(), v.map(str::to_owned))).collect();
        assert_eq!(got, expected, "cmdline {cmdline:?}");
    }

    #[test]
    fn splits_like_the_kernel() {
        check_split("", &[]);
        check_split("  console=ttyS0   quiet\n", &[("console", Some("ttyS0")), ("quiet", None)]);
        check_split(r#"osb.cmd="echo hi there" x=1"#, &[("osb.cmd", Some("echo hi there")), ("x", Some("1"))]);
        check_split(r#""osb.hostname=a b" y"#, &[("osb.hostname", Some("a b")), ("y", None)]);
        // Quotes inside a value protect spaces and are kept.
        check_split(r#"osb.cmd=["sh","-c","echo a b"] z"#, &[("osb.cmd", Some(r#"["sh","-c","echo a b"]"#)), ("z", None)]);
        check_split("a==b", &[("a", Some("=b"))]);
        check_split("a= b", &[("a", Some("")), ("b", None)]);
        check_split(r#"a="" b"#, &[("a", Some("")), ("b", None)]);
        check_split(r#""quoted""#, &[("quoted", None)]);
        // An unterminated quote runs to the end, as in the kernel.
        check_split(r#"a="x y"#, &[("a", Some("x y"))]);
        check_split("a=1 -- osb.cmd=ignored", &[("a", Some("1"))]);
    }

    #[test]
    fn reads_osb_options() {
        let (opts, errors) = Options::parse(
            r#"console=ttyS0 osb.root=/dev/pmem0p1 osb.dax=1 osb.rootfstype=ext4 osb.overlay=1 osb.hostname=box
               osb.cmd=["/bin/sh","-c","echo a b"] osb.entrypoint="tini --" osb.env=A=1 osb.env="B=two words" osb.env=A=3
               osb.workdir=/srv osb.user=app:staff osb.on_exit=stay osb.agent.port=2048 osb.shutdown_timeout=0.5
               osb.agent.allow_cid=any osb.debug=1 osb.entropy=00ff10 osb.user=1000"#,
        )
        .unwrap();
        assert_eq!(errors, []);
        assert_eq!(
            opts,
            Options {
                root: RootSource::Block("/dev/pmem0p1".into()),
                rootfstype: Some("ext4".into()),
                rootflags: None,
                dax: true,
                ro: false,
                overlay: true,
                hostname: Some("box".into()),
                entrypoint: Some(vec!["tini".into(), "--".into()]),
                cmd: Some(vec!["/bin/sh".into(), "-c".into(), "echo a b".into()]),
                env: vec!["A=1".into(), "B=two words".into(), "A=3".into()],
                workdir: Some("/srv".into()),
                user: Some("1000".into()),
                on_exit: OnExit::Stay,
                agent: true,
                agent_port: 2048,
                agent_allow_cid: Some("any".into()),
                shutdown_timeout: Duration::from_millis(500),
                debug: true,
                entropy: Some(vec![0, 0xff, 0x10]),
                mounts: Vec::new(),
            }
        );
        assert_eq!(Options::parse("quiet").unwrap().0, Options::default());
    }

    #[test]
    fn root_sources() {
        let root = |v: &str| Options::parse(&format!("osb.root={v}")).map(|(o, _)| o.root).map_err(|e| e.to_string());
        assert_eq!(root("none"), Ok(RootSource::Initramfs));
        assert_eq!(root("/dev/vda1"), Ok(RootSource::Block("/dev/vda1".into())));
        assert_eq!(root("virtiofs:myfs"), Ok(RootSource::VirtioFs("myfs".into())));
        assert_eq!(root("9p:share"), Ok(RootSource::NineP("share".into())));
        let err = root("vda1").unwrap_err();
        assert!(err.starts_with("kernel command line option osb.root: \"vda1\" is not"), "{err}");
        assert!(root("virtiofs:").is_err());
    }

    #[test]
    fn mounts_accumulate_and_a_bad_one_stops_the_boot() {
        let (opts, errors) = Options::parse(r#"osb.mount="LABEL=data /data ext4 noatime" "osb.mount=share /srv 9p ro" quiet"#).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let lines: Vec<String> = opts.mounts.iter().map(|m| m.to_line()).collect();
        assert_eq!(lines, ["LABEL=data /data ext4 rw,noatime", "share /srv 9p ro"]);
        let err = Options::parse(r#"osb.mount="/dev/vdb data""#).unwrap_err().to_string();
        assert_eq!(err, "kernel command line option osb.mount: target \"data\" is not an absolute path");
    }

    #[test]
    fn bad_values_keep_defaults_and_are_reported() {
        let (opts, errors) = Options::parse(
            "osb.on_exit=explode osb.dax=maybe osb.agent.port=x osb.frobnicate=1 osb.env=NOEQUALS osb.entropy=abc osb.cmd=[1] osb.agent.allow_cid=host",
        )
        .unwrap();
        assert_eq!(opts, Options::default());
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["osb.on_exit", "osb.dax", "osb.agent.port", "osb.frobnicate", "osb.env", "osb.entropy", "osb.cmd", "osb.agent.allow_cid"]);
        assert_eq!(errors[3].to_string(), "kernel command line option osb.frobnicate: unknown option");
    }

    #[test]
    fn lists_are_json_or_words() {
        assert_eq!(parse_list("a  b c"), Ok(vec!["a".to_owned(), "b".into(), "c".into()]));
        assert_eq!(parse_list(r#"["a b", "c"]"#), Ok(vec!["a b".to_owned(), "c".into()]));
        assert_eq!(parse_list("[]"), Ok(vec![]));
        assert!(parse_list("[\"a\"").is_err());
    }
}
