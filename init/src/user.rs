//! The workload's user, resolved from the guest's own /etc/passwd and
//! /etc/group (parsed by hand: static glibc has no working NSS).
//!
//! Docker's rules: `NAME`, `UID`, `NAME:GROUP`, `UID:GID` and mixes; a
//! numeric uid missing from passwd is fine (gid 0, HOME /), a missing name
//! is an error; supplementary groups are those listing the user by name.

use std::fmt;

/// Who the workload runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, the primary gid first, no repeats.
    pub groups: Vec<u32>,
    pub home: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum UserError {
    UnknownUser(String),
    UnknownGroup(String),
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserError::UnknownUser(name) => write!(f, "no user {name:?} in /etc/passwd; use a name from it or a numeric uid"),
            UserError::UnknownGroup(name) => write!(f, "no group {name:?} in /etc/group; use a name from it or a numeric gid"),
        }
    }
}

impl std::error::Error for UserError {}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

/// `name:password:uid:gid:gecos:home:shell` lines; malformed lines are skipped.
fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry { name: fields[0], uid: fields[2].parse().ok()?, gid: fields[3].parse().ok()?, home: fields[5] })
    })
}

/// `name:password:gid:member,member` lines; malformed lines are skipped.
fn group_entries(group: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    group.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 || line.starts_with('#') {
            return None;
        }
        let members = fields[3].split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
        Some(GroupEntry { name: fields[0], gid: fields[2].parse().ok()?, members })
    })
}

/// Resolves a Docker-style user spec against the text of /etc/passwd and
/// /etc/group (either may be empty when the image has none).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let spec = spec.trim();
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };

    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        Err(_) => Some(passwd_entries(passwd).find(|e| e.name == user_part).ok_or_else(|| UserError::UnknownUser(user_part.to_owned()))?),
    };
    let (uid, mut gid, home, name) = match &entry {
        Some(e) => (e.uid, e.gid, e.home, Some(e.name)),
        // A numeric uid the image does not know: Docker runs it with gid 0.
        None => (user_part.parse().unwrap_or(0), 0, "/", None),
    };

    if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group).find(|e| e.name == g).map(|e| e.gid).ok_or_else(|| UserError::UnknownGroup(g.to_owned()))?,
        };
    }

    let mut groups = vec![gid];
    if let Some(name) = name {
        for e in group_entries(group) {
            if e.members.contains(&name) && !groups.contains(&e.gid) {
                groups.push(e.gid);
            }
        }
    }
    let home = if home.is_empty() { "/" } else { home };
    Ok(Identity { uid, gid, groups, home: home.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        broken line\n\
        app:x:1000:1000:App,,,:/home/app:/bin/bash\n\
        nohome:x:1001:1001:::/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
        daemon:x:1:\n\
        wheel:x:10:app,other\n\
        audio:x:29:other, app\n\
        app:x:1000:\n\
        staff:x:50:\n";

    fn check(spec: &str, expected: Result<(u32, u32, &[u32], &str), UserError>) {
        let got = resolve(spec, PASSWD, GROUP).map(|i| (i.uid, i.gid, i.groups, i.home));
        let expected = expected.map(|(u, g, gs, h)| (u, g, gs.to_vec(), h.to_owned()));
        assert_eq!(got, expected, "user spec {spec:?}");
    }

    #[test]
    fn resolves_docker_user_specs() {
        check("", Ok((0, 0, &[0], "/root")));
        check("root", Ok((0, 0, &[0], "/root")));
        check("app", Ok((1000, 1000, &[1000, 10, 29], "/home/app")));
        check("1000", Ok((1000, 1000, &[1000, 10, 29], "/home/app")));
        check("app:staff", Ok((1000, 50, &[50, 10, 29], "/home/app")));
        check("app:50", Ok((1000, 50, &[50, 10, 29], "/home/app")));
        check("1000:wheel", Ok((1000, 10, &[10, 29], "/home/app")));
        check("daemon", Ok((1, 1, &[1], "/usr/sbin")));
        // Unknown numeric ids are fine, as in Docker.
        check("4242", Ok((4242, 0, &[0], "/")));
        check("4242:4343", Ok((4242, 4343, &[4343], "/")));
        check("nohome", Ok((1001, 1001, &[1001], "/")));
        check(":staff", Ok((0, 50, &[50], "/root")));
    }

    #[test]
    fn unknown_names_are_errors() {
        check("nobody", Err(UserError::UnknownUser("nobody".into())));
        check("app:nogroup", Err(UserError::UnknownGroup("nogroup".into())));
        check("1000:nogroup", Err(UserError::UnknownGroup("nogroup".into())));
        assert!(resolve("app", "", "").is_err(), "no passwd file: names cannot resolve");
        assert_eq!(resolve("0:0", "", "").unwrap().home, "/");
        let msg = UserError::UnknownUser("nobody".into()).to_string();
        assert!(msg.contains("/etc/passwd"), "{msg}");
    }
}
