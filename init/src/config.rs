//! The run config (`/etc/osb/run.json`, baked in by osbuilder from the OCI
//! image config) merged with the kernel command line's overrides into the
//! workload to start.

use std::fmt;

use osb_agent::volume::MountSpec;
use serde_json::Value;

use crate::cmdline::Options;

/// Where osbuilder puts the run config inside the guest root.
pub const RUN_CONFIG_PATH: &str = "/etc/osb/run.json";

/// The default PATH when the image's environment sets none (Docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `/etc/osb/run.json`. Every field is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// `K=V` strings.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub hostname: Option<String>,
    /// `mounts`: made after the root switch, before the agent and the workload start.
    pub mounts: Vec<MountSpec>,
    /// `network`: set up before the mounts.
    pub network: Option<crate::network::Network>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{RUN_CONFIG_PATH}: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

/// A JSON array of strings, or `None`.
pub(crate) fn string_list(value: &Value) -> Option<Vec<String>> {
    value.as_array()?.iter().map(|v| v.as_str().map(str::to_owned)).collect()
}

impl RunConfig {
    /// Parses the file's text. `null` fields count as absent; unknown fields
    /// are ignored (newer osbuilders may add some); wrong types are errors.
    pub fn parse(text: &str) -> Result<RunConfig, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError(format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(ConfigError("not a JSON object".into()));
        };
        let field = |name: &str| map.get(name).filter(|v| !v.is_null());
        let list = |name: &str| -> Result<Option<Vec<String>>, ConfigError> {
            field(name).map(|v| string_list(v).ok_or_else(|| ConfigError(format!("\"{name}\" must be an array of strings")))).transpose()
        };
        let string = |name: &str| -> Result<Option<String>, ConfigError> {
            field(name).map(|v| v.as_str().map(str::to_owned).ok_or_else(|| ConfigError(format!("\"{name}\" must be a string")))).transpose()
        };
        Ok(RunConfig {
            entrypoint: list("entrypoint")?,
            cmd: list("cmd")?,
            env: list("env")?.unwrap_or_default(),
            working_dir: string("working_dir")?,
            user: string("user")?,
            hostname: string("hostname")?,
            mounts: match field("mounts") {
                None => Vec::new(),
                Some(Value::Array(items)) => {
                    items.iter().enumerate().map(|(i, v)| parse_mount(v).map_err(|e| ConfigError(format!("mounts[{i}]: {e}")))).collect::<Result<_, _>>()?
                }
                Some(_) => return Err(ConfigError("\"mounts\" must be an array".into())),
            },
            network: field("network").map(crate::network::Network::parse).transpose().map_err(ConfigError)?,
        })
    }
}

/// One entry of `mounts`: an fstab-style line (`"LABEL=data /data ext4 noatime"`) or an
/// object: `source`, `target` (required), `type`, `options` (a string of
/// comma-separated options or an array of them), `wait` (seconds), `read_only`,
/// `uid`, `gid`, `mode` (an octal string such as `"0750"`), `nofail`.
pub fn parse_mount(value: &Value) -> Result<MountSpec, String> {
    if let Some(line) = value.as_str() {
        return MountSpec::parse_line(line).map_err(|e| e.0);
    }
    let Value::Object(map) = value else {
        return Err("must be a string (SOURCE TARGET [TYPE [OPTIONS]]) or an object".into());
    };
    const KNOWN: [&str; 10] = ["source", "target", "type", "options", "wait", "read_only", "uid", "gid", "mode", "nofail"];
    if let Some(unknown) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        // A misspelt field would silently change what is mounted: refused.
        return Err(format!("unknown field {unknown:?} (known: {})", KNOWN.join(", ")));
    }
    let field = |name: &str| map.get(name).filter(|v| !v.is_null());
    let string = |name: &str| -> Result<Option<String>, String> {
        field(name).map(|v| v.as_str().map(str::to_owned).ok_or_else(|| format!("\"{name}\" must be a string"))).transpose()
    };
    let flag =
        |name: &str| -> Result<bool, String> { field(name).map_or(Ok(false), |v| v.as_bool().ok_or_else(|| format!("\"{name}\" must be true or false"))) };
    let id = |name: &str| -> Result<Option<u32>, String> {
        field(name)
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| format!("\"{name}\" must be a number from 0 to 4294967295")))
            .transpose()
    };
    let mut spec = MountSpec {
        source: string("source")?.unwrap_or_default(),
        target: string("target")?.ok_or("\"target\" is missing")?,
        fstype: string("type")?,
        ..MountSpec::default()
    };
    spec.normalize();
    let options: Vec<String> = match field("options") {
        None => Vec::new(),
        Some(Value::String(s)) => s.split(',').filter(|o| !o.is_empty()).map(str::to_owned).collect(),
        // An entry may hold several, as Kata's options do ("rw,noatime").
        Some(v) => string_list(v)
            .ok_or("\"options\" must be a string or an array of strings")?
            .iter()
            .flat_map(|o| o.split(',').filter(|o| !o.is_empty()).map(str::to_owned).collect::<Vec<_>>())
            .collect(),
    };
    spec.add_options(options.iter().map(String::as_str)).map_err(|e| e.0)?;
    // The object's own fields win over the same settings among the options.
    if let Some(w) = field("wait") {
        let secs = w.as_f64().filter(|s| s.is_finite() && (0.0..=3600.0).contains(s)).ok_or("\"wait\" must be a number of seconds from 0 to 3600")?;
        spec.wait = Some(std::time::Duration::from_secs_f64(secs));
    }
    if field("read_only").is_some() {
        spec.read_only = flag("read_only")?;
    }
    if field("nofail").is_some() {
        spec.nofail = flag("nofail")?;
    }
    spec.uid = id("uid")?.or(spec.uid);
    spec.gid = id("gid")?.or(spec.gid);
    if let Some(mode) = string("mode")? {
        spec.set_mode(&mode).map_err(|e| e.0)?;
    }
    spec.validate().map_err(|e| e.0)?;
    Ok(spec)
}

/// The mounts to make: the run config's, with `osb.mount=` entries replacing one on the
/// same target or added after them, in dependency order.
pub fn mounts(run: &RunConfig, opts: &Options) -> Result<Vec<MountSpec>, ConfigError> {
    let same = |a: &MountSpec, b: &MountSpec| a.target.trim_end_matches('/') == b.target.trim_end_matches('/');
    let mut all: Vec<MountSpec> = run.mounts.iter().filter(|m| !opts.mounts.iter().any(|o| same(m, o))).cloned().collect();
    all.extend(opts.mounts.iter().cloned());
    osb_agent::volume::order(all).map_err(|e| ConfigError(format!("mounts: {e}")))
}

/// The process to start, fully decided (before user and PATH resolution,
/// which need the guest's files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Never empty.
    pub argv: Vec<String>,
    /// `K=V` strings, each key once, PATH always present.
    pub env: Vec<String>,
    pub working_dir: String,
    /// A Docker-style user spec (`""` = root).
    pub user: String,
}

/// Sets `K=V` in `env`: replaces the first entry with that key in place
/// (dropping any later duplicates) or appends.
fn set_env(env: &mut Vec<String>, entry: &str) {
    let key = entry.split_once('=').map_or(entry, |(k, _)| k);
    let same_key = |e: &String| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key;
    match env.iter().position(same_key) {
        Some(i) => {
            env[i] = entry.to_owned();
            let mut seen = 0;
            env.retain(|e| {
                !same_key(e) || {
                    seen += 1;
                    seen == 1
                }
            });
        }
        None => env.push(entry.to_owned()),
    }
}

/// Looks up `key` in `K=V` strings.
pub fn env_get<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter().find_map(|e| e.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

/// Merges the run config with the command line, Docker's way: `osb.cmd`
/// replaces the image's Cmd; `osb.entrypoint` replaces its Entrypoint and
/// drops its Cmd (as `docker run --entrypoint` does); `osb.env` entries
/// override or add variables; workdir and user replace. `None` when neither
/// gives a command: no workload, init stays up for the agent.
pub fn merge(run: &RunConfig, opts: &Options) -> Option<Workload> {
    let entrypoint = opts.entrypoint.as_ref().or(run.entrypoint.as_ref()).cloned().unwrap_or_default();
    let cmd = match (&opts.cmd, &opts.entrypoint) {
        (Some(cmd), _) => cmd.clone(),
        (None, Some(_)) => Vec::new(),
        (None, None) => run.cmd.clone().unwrap_or_default(),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return None;
    }
    let mut env = Vec::new();
    // An entry without `=` is no variable: Docker reads a bare `NAME` from the host's
    // environment, which the guest does not have. Kept, it would sit beside the
    // default PATH as a second `PATH` (found by the init_run_json fuzz target).
    for entry in run.env.iter().chain(&opts.env).filter(|e| e.contains('=')) {
        set_env(&mut env, entry);
    }
    if env_get(&env, "PATH").is_none() {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    let working_dir = opts.workdir.as_ref().or(run.working_dir.as_ref()).filter(|w| !w.is_empty()).cloned().unwrap_or_else(|| "/".into());
    let user = opts.user.as_ref().or(run.user.as_ref()).cloned().unwrap_or_default();
    Some(Workload { argv, env, working_dir, user })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_run_json() {
        let run = RunConfig::parse(
            r#"{"entrypoint":["/docker-entrypoint.sh"],"cmd":["nginx","-g","daemon off;"],"env":["PATH=/usr/bin","A=1"],
                "working_dir":"/srv","user":"101:101","hostname":null,"future_field":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(
            run,
            RunConfig {
                entrypoint: Some(strings(&["/docker-entrypoint.sh"])),
                cmd: Some(strings(&["nginx", "-g", "daemon off;"])),
                env: strings(&["PATH=/usr/bin", "A=1"]),
                working_dir: Some("/srv".into()),
                user: Some("101:101".into()),
                hostname: None,
                mounts: Vec::new(),
                network: None,
            }
        );
        assert_eq!(RunConfig::parse("{}").unwrap(), RunConfig::default());
    }

    #[test]
    fn rejects_bad_run_json() {
        let check = |text: &str, message: &str| {
            let err = RunConfig::parse(text).unwrap_err().to_string();
            assert!(err.starts_with("/etc/osb/run.json: ") && err.contains(message), "{text}: {err}");
        };
        check("{", "not valid JSON");
        check("[]", "not a JSON object");
        check(r#"{"cmd":"sh -c x"}"#, "\"cmd\" must be an array of strings");
        check(r#"{"env":[1]}"#, "\"env\" must be an array of strings");
        check(r#"{"user":1000}"#, "\"user\" must be a string");
        check(r#"{"mounts":{}}"#, "\"mounts\" must be an array");
        check(r#"{"mounts":[1]}"#, "mounts[0]: must be a string");
        check(r#"{"mounts":["/dev/vdb"]}"#, "mounts[0]: \"/dev/vdb\": expected SOURCE TARGET");
        check(r#"{"mounts":[{"source":"/dev/vdb"}]}"#, "mounts[0]: \"target\" is missing");
        check(r#"{"mounts":[{"source":"/dev/vdb","target":"/d","readonly":true}]}"#, "mounts[0]: unknown field \"readonly\"");
        check(r#"{"mounts":[{"source":"/dev/vdb","target":"/d","mode":755}]}"#, "\"mode\" must be a string");
        check(r#"{"mounts":[{"source":"/dev/vdb","target":"/d","wait":-1}]}"#, "\"wait\" must be a number of seconds");
        check(r#"{"mounts":[{"source":"/dev/vdb","target":"/d","uid":-1}]}"#, "\"uid\" must be a number");
        check(r#"{"mounts":[{"source":"data","target":"/d"}]}"#, "no block device");
    }

    #[test]
    fn parses_mounts_in_both_forms() {
        let run = RunConfig::parse(
            r#"{"mounts":["LABEL=data /data ext4 noatime,nofail",
                {"source":"share","target":"/srv","type":"9p","options":["msize=262144"],"read_only":true},
                {"target":"/scratch","type":"tmpfs","options":"size=16m","mode":"1777","uid":1000,"gid":1000,"wait":0.5}]}"#,
        )
        .unwrap();
        assert_eq!(run.mounts.len(), 3);
        assert_eq!(run.mounts[0], MountSpec::parse_line("LABEL=data /data ext4 noatime,nofail").unwrap());
        assert!(run.mounts[0].nofail);
        assert_eq!((run.mounts[1].read_only, run.mounts[1].options.as_slice()), (true, &["msize=262144".to_owned()][..]));
        let scratch = &run.mounts[2];
        assert_eq!((scratch.mode, scratch.uid, scratch.gid, scratch.wait), (Some(0o1777), Some(1000), Some(1000), Some(std::time::Duration::from_millis(500))));

        // osb.mount= replaces the run config's mount on the same target and adds the rest;
        // the whole list comes out in dependency order.
        let opts = Options {
            mounts: vec![MountSpec::parse_line("none /data/cache tmpfs").unwrap(), MountSpec::parse_line("/dev/vdc /srv/ ext4").unwrap()],
            ..Options::default()
        };
        let merged = mounts(&run, &opts).unwrap();
        let targets: Vec<&str> = merged.iter().map(|m| m.target.as_str()).collect();
        assert_eq!(targets, ["/data", "/scratch", "/data/cache", "/srv"], "trailing slashes normalised");
        assert_eq!(merged[3].source, "/dev/vdc");
    }

    fn image() -> RunConfig {
        RunConfig {
            entrypoint: Some(strings(&["/entry"])),
            cmd: Some(strings(&["serve", "--port", "80"])),
            env: strings(&["PATH=/usr/bin:/bin", "LANG=C", "A=image"]),
            working_dir: Some("/app".into()),
            user: Some("app".into()),
            hostname: None,
            mounts: Vec::new(),
            network: None,
        }
    }

    #[test]
    fn image_config_alone() {
        let w = merge(&image(), &Options::default()).unwrap();
        assert_eq!(w.argv, strings(&["/entry", "serve", "--port", "80"]));
        assert_eq!(w.env, strings(&["PATH=/usr/bin:/bin", "LANG=C", "A=image"]));
        assert_eq!((w.working_dir.as_str(), w.user.as_str()), ("/app", "app"));
    }

    #[test]
    fn command_line_overrides() {
        let opts = Options {
            cmd: Some(strings(&["sh"])),
            env: strings(&["A=cmdline", "NEW=1", "LANG=C.UTF-8"]),
            workdir: Some("/tmp".into()),
            user: Some("0:0".into()),
            ..Options::default()
        };
        let w = merge(&image(), &opts).unwrap();
        assert_eq!(w.argv, strings(&["/entry", "sh"]), "osb.cmd keeps the entrypoint");
        assert_eq!(w.env, strings(&["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "A=cmdline", "NEW=1"]));
        assert_eq!((w.working_dir.as_str(), w.user.as_str()), ("/tmp", "0:0"));

        let opts = Options { entrypoint: Some(strings(&["/bin/true"])), ..Options::default() };
        assert_eq!(merge(&image(), &opts).unwrap().argv, strings(&["/bin/true"]), "osb.entrypoint drops the image's cmd");

        let opts = Options { entrypoint: Some(vec![]), cmd: Some(strings(&["ls", "/"])), ..Options::default() };
        assert_eq!(merge(&image(), &opts).unwrap().argv, strings(&["ls", "/"]), "an empty entrypoint clears it");
    }

    #[test]
    fn defaults_and_no_workload() {
        assert_eq!(merge(&RunConfig::default(), &Options::default()), None, "nothing to run: agent-only guest");
        let run = RunConfig { cmd: Some(strings(&["sh"])), env: strings(&["A=1", "A=2"]), ..RunConfig::default() };
        let w = merge(&run, &Options::default()).unwrap();
        assert_eq!(w.env, strings(&["A=2", &format!("PATH={DEFAULT_PATH}")]));
        assert_eq!((w.working_dir.as_str(), w.user.as_str()), ("/", ""));
        assert_eq!(env_get(&w.env, "A"), Some("2"));
    }
}
