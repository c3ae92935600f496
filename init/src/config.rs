//! The run config (`/etc/osb/run.json`, baked in by osbuilder from the OCI
//! image config) merged with the kernel command line's overrides into the
//! workload to start.

use std::fmt;

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
        })
    }
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
    }

    fn image() -> RunConfig {
        RunConfig {
            entrypoint: Some(strings(&["/entry"])),
            cmd: Some(strings(&["serve", "--port", "80"])),
            env: strings(&["PATH=/usr/bin:/bin", "LANG=C", "A=image"]),
            working_dir: Some("/app".into()),
            user: Some("app".into()),
            hostname: None,
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
