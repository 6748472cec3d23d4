//! Users and groups from the guest's `/etc/passwd` and `/etc/group`, read directly.
//!
//! The agent is linked statically against glibc, whose NSS functions (`getpwnam`,
//! `initgroups`) would try to load shared modules at run time. Guests keep their accounts in
//! the files anyway, so the agent parses them itself.

use std::path::{Path, PathBuf};

/// Why a user could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no user {0:?} in /etc/passwd")]
    NoSuchUser(String),
}

/// One account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: String,
    /// Supplementary groups (from `/etc/group`), the primary group included.
    pub groups: Vec<u32>,
}

/// The `passwd` line for `name`, if any. Malformed lines are skipped.
pub fn find_passwd(passwd: &str, name: &str) -> Option<(u32, u32, PathBuf, String)> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[0] != name {
            return None;
        }
        Some((
            f[2].parse().ok()?,
            f[3].parse().ok()?,
            PathBuf::from(f[5]),
            f[6].to_owned(),
        ))
    })
}

/// Groups of `/etc/group` listing `name` as a member, plus `primary`, sorted and unique.
pub fn groups_of(group: &str, name: &str, primary: u32) -> Vec<u32> {
    let mut gids: Vec<u32> = group
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || !f[3].split(',').any(|m| m.trim() == name) {
                return None;
            }
            f[2].parse().ok()
        })
        .collect();
    gids.push(primary);
    gids.sort_unstable();
    gids.dedup();
    gids
}

/// Where the account files are (`/etc` in a guest; tests point elsewhere).
#[derive(Debug, Clone)]
pub struct Accounts {
    pub etc: PathBuf,
}

impl Default for Accounts {
    fn default() -> Self {
        Accounts {
            etc: PathBuf::from("/etc"),
        }
    }
}

fn read(path: &Path) -> Result<String, UserError> {
    std::fs::read_to_string(path).map_err(|source| UserError::Read {
        path: path.to_owned(),
        source,
    })
}

impl Accounts {
    /// Resolves `name`; a missing `/etc/group` means no supplementary groups.
    pub fn lookup(&self, name: &str) -> Result<User, UserError> {
        let passwd = read(&self.etc.join("passwd"))?;
        let (uid, gid, home, shell) =
            find_passwd(&passwd, name).ok_or_else(|| UserError::NoSuchUser(name.to_owned()))?;
        let group = match std::fs::read_to_string(self.etc.join("group")) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(UserError::Read {
                    path: self.etc.join("group"),
                    source,
                })
            }
        };
        Ok(User {
            name: name.to_owned(),
            uid,
            gid,
            home,
            shell,
            groups: groups_of(&group, name, gid),
        })
    }

    /// The user a request names, or the agent's own identity when the name is empty.
    pub fn resolve(&self, name: &str) -> Result<User, UserError> {
        if !name.is_empty() {
            return self.lookup(name);
        }
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(if uid == 0 { "/root" } else { "/" }));
        Ok(User {
            name: String::new(),
            uid,
            gid,
            home,
            shell: "/bin/sh".into(),
            groups: vec![gid],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        broken line\n\
        alice:x:1000:1000:Alice,,,:/home/alice:/bin/sh\n\
        bob:x:notanumber:1:b:/home/bob:/bin/sh\n";
    const GROUP: &str = "root:x:0:\naudio:x:29:alice,bob\nvideo:x:44:carol, alice\nalice:x:1000:\n";

    #[test]
    fn passwd_lines_are_found_by_name_and_malformed_ones_skipped() {
        assert_eq!(
            find_passwd(PASSWD, "alice"),
            Some((1000, 1000, "/home/alice".into(), "/bin/sh".into()))
        );
        assert_eq!(find_passwd(PASSWD, "bob"), None);
        assert_eq!(find_passwd(PASSWD, "ali"), None);
    }

    #[test]
    fn supplementary_groups_include_the_primary_group_once() {
        assert_eq!(groups_of(GROUP, "alice", 1000), [29, 44, 1000]);
        assert_eq!(groups_of(GROUP, "root", 0), [0]);
    }

    #[test]
    fn lookup_reads_the_files_and_names_a_missing_user() {
        let dir = std::env::temp_dir().join(format!("genos-agent-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("passwd"), PASSWD).unwrap();
        std::fs::write(dir.join("group"), GROUP).unwrap();
        let accounts = Accounts { etc: dir.clone() };
        let alice = accounts.lookup("alice").unwrap();
        assert_eq!((alice.uid, alice.groups.len()), (1000, 3));
        let err = accounts.lookup("mallory").unwrap_err();
        assert_eq!(err.to_string(), "no user \"mallory\" in /etc/passwd");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
