//! /etc/passwd and /etc/group, parsed by hand (static glibc's NSS does not work).

/// One /etc/passwd line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

fn entries(passwd: &str) -> impl Iterator<Item = PasswdEntry> + '_ {
    passwd.lines().filter_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        Some(PasswdEntry { name: f[0].to_string(), uid: f[2].parse().ok()?, gid: f[3].parse().ok()?, home: f[5].to_string() })
    })
}

pub fn user_by_name(passwd: &str, name: &str) -> Option<PasswdEntry> {
    entries(passwd).find(|e| e.name == name)
}

pub fn user_by_uid(passwd: &str, uid: u32) -> Option<PasswdEntry> {
    entries(passwd).find(|e| e.uid == uid)
}

/// The groups of /etc/group that list `user` as a member.
pub fn member_groups(group: &str, user: &str) -> Vec<u32> {
    group
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || line.starts_with('#') {
                return None;
            }
            let gid: u32 = f[2].parse().ok()?;
            f[3].split(',').any(|m| m.trim() == user).then_some(gid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken\nwww-data:x:33:33:www:/var/www:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nadm:x:4:www-data,syslog\nwww-data:x:33:\nbad:x:y:www-data\n";

    #[test]
    fn users() {
        let www = user_by_name(PASSWD, "www-data").unwrap();
        assert_eq!((www.uid, www.gid, www.home.as_str()), (33, 33, "/var/www"));
        assert_eq!(user_by_uid(PASSWD, 0).unwrap().name, "root");
        assert_eq!(user_by_name(PASSWD, "broken"), None);
        assert_eq!(user_by_uid(PASSWD, 1000), None);
    }

    #[test]
    fn groups() {
        assert_eq!(member_groups(GROUP, "www-data"), vec![4]);
        assert_eq!(member_groups(GROUP, "nobody"), Vec::<u32>::new());
    }
}
