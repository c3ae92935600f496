//! Registry credentials: from the command line, the environment, or the auth
//! files docker, podman and skopeo write.
//!
//! Order: `--creds USER:PASSWORD`; `OSBUILDER_REGISTRY_TOKEN=HOST[:PORT]=TOKEN`
//! (a bearer token, sent only to that registry: a token given for one host
//! must not reach whatever registry an image reference names);
//! `OSBUILDER_REGISTRY_USER` + `OSBUILDER_REGISTRY_PASSWORD`; then
//! `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json` and
//! `$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`), first match
//! wins; otherwise anonymous. With basic credentials the client follows the
//! registry's challenge: HTTP basic, or a bearer token fetched from the realm.
//! Credential helpers (`credsStore`, `credHelpers`) are not run.

use std::path::PathBuf;

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;

use super::OciError;

/// How the credentials were found, for messages (never the secret itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthSource {
    Anonymous,
    CommandLine,
    Environment,
    File(PathBuf),
}

pub fn resolve(registry: &str, cli: Option<&str>) -> Result<(RegistryAuth, AuthSource), OciError> {
    resolve_with(registry, cli, |k| std::env::var(k).ok())
}

/// [`resolve`] with the environment given as a lookup (tests).
fn resolve_with(registry: &str, cli: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Result<(RegistryAuth, AuthSource), OciError> {
    if let Some(creds) = cli {
        let (user, pass) = creds.split_once(':').ok_or_else(|| OciError::Invalid("--creds must be USER:PASSWORD".into()))?;
        return Ok((RegistryAuth::Basic(user.into(), pass.into()), AuthSource::CommandLine));
    }
    let env = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(scoped) = env("OSBUILDER_REGISTRY_TOKEN") {
        // Host names hold no `=`; the first one ends the host.
        let (host, token) = scoped
            .split_once('=')
            .filter(|(h, t)| !h.is_empty() && !t.is_empty())
            .ok_or_else(|| OciError::Invalid("OSBUILDER_REGISTRY_TOKEN must be HOST[:PORT]=TOKEN, naming the registry the token is for".into()))?;
        if host == registry {
            return Ok((RegistryAuth::Bearer(token.to_string()), AuthSource::Environment));
        }
    }
    if let (Some(user), Some(pass)) = (env("OSBUILDER_REGISTRY_USER"), env("OSBUILDER_REGISTRY_PASSWORD")) {
        return Ok((RegistryAuth::Basic(user, pass), AuthSource::Environment));
    }
    for file in auth_files() {
        let Ok(bytes) = std::fs::read(&file) else { continue };
        if let Some(auth) = from_auth_file(&bytes, registry).map_err(|e| OciError::Invalid(format!("{}: {e}", file.display())))? {
            return Ok((auth, AuthSource::File(file)));
        }
    }
    Ok((RegistryAuth::Anonymous, AuthSource::Anonymous))
}

fn auth_files() -> Vec<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let mut files = Vec::new();
    files.extend(var("REGISTRY_AUTH_FILE"));
    files.extend(var("XDG_RUNTIME_DIR").map(|d| d.join("containers/auth.json")));
    match var("DOCKER_CONFIG") {
        Some(d) => files.push(d.join("config.json")),
        None => files.extend(var("HOME").map(|h| h.join(".docker/config.json"))),
    }
    files
}

/// Finds `registry`'s entry in a docker/containers auth file.
pub fn from_auth_file(bytes: &[u8], registry: &str) -> Result<Option<RegistryAuth>, String> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
        registrytoken: Option<String>,
    }
    let file: File = serde_json::from_slice(bytes).map_err(|e| format!("malformed auth file: {e}"))?;
    let wanted: Vec<String> = if registry == "docker.io" || registry == "index.docker.io" || registry == "registry-1.docker.io" {
        vec!["https://index.docker.io/v1/".into(), "docker.io".into(), "index.docker.io".into()]
    } else {
        vec![registry.into(), format!("https://{registry}"), format!("http://{registry}"), format!("https://{registry}/v1/")]
    };
    let Some(entry) = wanted.iter().find_map(|k| file.auths.get(k)) else { return Ok(None) };
    if let Some(token) = &entry.registrytoken {
        return Ok(Some(RegistryAuth::Bearer(token.clone())));
    }
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(RegistryAuth::Basic(u.clone(), p.clone())));
    }
    let Some(encoded) = &entry.auth else { return Ok(None) };
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|e| format!("the auth entry for {registry} is not base64: {e}"))?;
    let decoded = String::from_utf8(decoded).map_err(|_| format!("the auth entry for {registry} is not UTF-8"))?;
    let (u, p) = decoded.split_once(':').ok_or_else(|| format!("the auth entry for {registry} is not USER:PASSWORD"))?;
    Ok(Some(RegistryAuth::Basic(u.into(), p.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(a: Option<RegistryAuth>) -> Option<(String, String)> {
        match a {
            Some(RegistryAuth::Basic(u, p)) => Some((u, p)),
            _ => None,
        }
    }

    #[test]
    fn auth_file_entries() {
        let file = br#"{"auths":{
            "127.0.0.1:5000":{"auth":"YWxpY2U6czNjcjN0"},
            "https://reg.example":{"username":"bob","password":"pw"},
            "https://index.docker.io/v1/":{"auth":"ZGg6cHc="}}}"#;
        assert_eq!(basic(from_auth_file(file, "127.0.0.1:5000").unwrap()), Some(("alice".into(), "s3cr3t".into())));
        assert_eq!(basic(from_auth_file(file, "reg.example").unwrap()), Some(("bob".into(), "pw".into())));
        assert_eq!(basic(from_auth_file(file, "docker.io").unwrap()), Some(("dh".into(), "pw".into())));
        assert!(from_auth_file(file, "other:5000").unwrap().is_none());
        assert!(from_auth_file(br#"{"auths":{"x":{"auth":"!!!"}}}"#, "x").is_err());
    }

    #[test]
    fn the_environment_token_goes_only_to_its_registry() {
        let env = |value: &'static str| move |k: &str| (k == "OSBUILDER_REGISTRY_TOKEN").then(|| value.to_string());
        let bearer = |r: Result<(RegistryAuth, AuthSource), OciError>| match r.unwrap().0 {
            RegistryAuth::Bearer(t) => Some(t),
            _ => None,
        };
        assert_eq!(bearer(resolve_with("127.0.0.1:5000", None, env("127.0.0.1:5000=t0k=en"))), Some("t0k=en".into()));
        // Another port is another registry: it gets no token.
        assert_eq!(bearer(resolve_with("127.0.0.1:5001", None, env("127.0.0.1:5000=t0k"))), None);
        assert_eq!(bearer(resolve_with("127.0.0.1", None, env("127.0.0.1:5000=t0k"))), None);
        // A bare token names no registry and is refused, not sent anywhere.
        let err = resolve_with("127.0.0.1:5000", None, env("t0k")).unwrap_err().to_string();
        assert!(err.contains("HOST[:PORT]=TOKEN"), "{err}");
    }

    #[test]
    fn command_line_wins() {
        let (auth, source) = resolve("any", Some("u:p:with:colons")).unwrap();
        assert_eq!(basic(Some(auth)), Some(("u".into(), "p:with:colons".into())));
        assert_eq!(source, AuthSource::CommandLine);
        assert!(resolve("any", Some("nocolon")).is_err());
    }
}
