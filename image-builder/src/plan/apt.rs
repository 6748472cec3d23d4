//! Debian and Ubuntu: `debootstrap --variant=minbase` for the base, `apt-get` inside the
//! tree for the spec's packages, third-party APT repositories (Mozilla's, for Firefox on
//! Ubuntu) added with their key checked against the catalog's fingerprint.

use std::path::Path;

use proto::spec::RepoEntry;

use super::{BasePlan, File, Tool};

/// Packages every base gets on top of minbase: an init, device manager, networking,
/// privilege escalation for the user and TLS roots for apps.
pub const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "sudo",
    "iproute2",
    "ca-certificates",
];
/// Packages an X11 session needs besides the desktop's own.
pub const X11_SESSION_PACKAGES: &[&str] = &[
    "xserver-xorg-core",
    "xserver-xorg-input-libinput",
    "xinit",
    "libpam-systemd",
    "fonts-dejavu-core",
    // xprop: the session wrapper waits for the window manager before opening the first
    // app; xclip: the clipboard from a shell or `genos exec`.
    "x11-utils",
    "xclip",
];
/// Packages a Wayland kiosk (cage) session needs besides cage.
pub const KIOSK_SESSION_PACKAGES: &[&str] = &["libpam-systemd", "fonts-dejavu-core"];

pub const TOOLS: &[Tool] = &[Tool {
    names: &["debootstrap"],
    hint: "install the Debian package `debootstrap`",
}];

/// The archive's Release file of the base's suite.
pub fn probe_url(plan: &BasePlan) -> String {
    format!("{}/dists/{}/Release", plan.mirror, plan.release)
}

/// A repository's Release file.
pub fn repo_probe_url(repo: &RepoEntry) -> String {
    format!(
        "{}/dists/{}/Release",
        repo.url.trim_end_matches('/'),
        repo.suite
    )
}

pub fn base_command(plan: &BasePlan, root: &Path) -> Vec<String> {
    let mut cmd = vec!["debootstrap".to_string(), "--variant=minbase".to_string()];
    if !plan.components.is_empty() {
        cmd.push(format!("--components={}", plan.components.join(",")));
    }
    if let Some(keyring) = &plan.keyring {
        cmd.push(format!("--keyring={}", keyring.display()));
    }
    cmd.push(format!("--include={}", plan.packages.join(",")));
    cmd.push(plan.release.clone());
    cmd.push(root.display().to_string());
    cmd.push(plan.mirror.clone());
    if let Some(script) = &plan.debootstrap_script {
        cmd.push(format!("/usr/share/debootstrap/scripts/{script}"));
    }
    cmd
}

/// Package sources naming every suite of the base (debootstrap writes only the first).
pub fn after(plan: &BasePlan) -> Vec<File> {
    if plan.extra_suites.is_empty() {
        return Vec::new();
    }
    let components = if plan.components.is_empty() {
        "main".to_string()
    } else {
        plan.components.join(" ")
    };
    let sources: String = std::iter::once(&plan.release)
        .chain(&plan.extra_suites)
        .map(|suite| format!("deb {} {suite} {components}\n", plan.mirror))
        .collect();
    vec![File::new("etc/apt/sources.list", sources, 0o644)]
}

/// Keeps package maintainer scripts from starting services inside the build chroot.
pub fn build_files() -> Vec<File> {
    vec![File::new(
        "usr/sbin/policy-rc.d",
        "#!/bin/sh\nexit 101\n",
        0o755,
    )]
}

/// `apt-get install` of `packages`, after adding `repos` with their keys checked.
pub fn install_script(packages: &[String], repos: &[(String, RepoEntry)]) -> Option<String> {
    if packages.is_empty() {
        return None;
    }
    let mut script = String::from("apt-get update -q\n");
    if !repos.is_empty() {
        // apt-helper downloads over HTTPS with apt's own TLS; gpg reads the fingerprint.
        script.push_str(
            "apt-get install -y -q --no-install-recommends gpg\nmkdir -p /etc/apt/keyrings\n",
        );
        for (name, repo) in repos {
            let key = format!("/etc/apt/keyrings/{name}.asc");
            script.push_str(&format!(
                "/usr/lib/apt/apt-helper download-file {url} {key}\n\
                 fpr=$(gpg --show-keys --with-colons {key} | awk -F: '$1 == \"fpr\" {{ print $10; exit }}')\n\
                 if [ \"$fpr\" != {fpr} ]; then echo \"genos-image: the {name} repository key has fingerprint $fpr, the catalog says {fpr}\" >&2; exit 1; fi\n\
                 echo 'deb [signed-by={key}] {repo_url} {suite} {components}' > /etc/apt/sources.list.d/{name}.list\n",
                url = repo.key_url,
                fpr = repo.key_fingerprint.to_uppercase(),
                repo_url = repo.url,
                suite = repo.suite,
                components = repo.components.join(" "),
            ));
            if let Some(origin) = &repo.pin_origin {
                script.push_str(&format!(
                    "printf 'Package: *\\nPin: origin {origin}\\nPin-Priority: 1000\\n' > /etc/apt/preferences.d/{name}\n"
                ));
            }
        }
        script.push_str("apt-get update -q\n");
    }
    script.push_str(&format!(
        "apt-get install -y -q --no-install-recommends {}\napt-get clean",
        packages.join(" ")
    ));
    Some(script)
}

#[cfg(test)]
mod tests {
    use super::super::tests::plan_of;
    use super::*;

    #[test]
    fn debian_base_is_debootstrap_minbase_from_debians_mirror() {
        let plan = plan_of("debian-12", "none", &[]);
        assert_eq!(
            plan.base.command(Path::new("/R"), Path::new("/W")),
            [
                "debootstrap",
                "--variant=minbase",
                "--include=systemd-sysv,udev,dbus,sudo,iproute2,ca-certificates",
                "bookworm",
                "/R",
                "http://deb.debian.org/debian"
            ]
        );
        assert_eq!(
            plan.base.probe_url,
            "http://deb.debian.org/debian/dists/bookworm/Release"
        );
        assert!(plan.base.after().is_empty());
    }

    #[test]
    fn ubuntu_base_uses_ubuntus_keyring_main_and_universe_and_the_gutsy_script() {
        let plan = plan_of("ubuntu-24.04", "none", &[]);
        assert_eq!(
            plan.base.command(Path::new("/R"), Path::new("/W")),
            [
                "debootstrap",
                "--variant=minbase",
                "--components=main,universe",
                "--keyring=/usr/share/keyrings/ubuntu-archive-keyring.gpg",
                "--include=systemd-sysv,udev,dbus,sudo,iproute2,ca-certificates",
                "noble",
                "/R",
                "http://archive.ubuntu.com/ubuntu",
                "/usr/share/debootstrap/scripts/gutsy"
            ]
        );
        assert_eq!(plan.base.keyring_package.as_deref(), Some("ubuntu-keyring"));
        let after = plan.base.after();
        assert_eq!(after[0].path, "etc/apt/sources.list");
        assert_eq!(
            after[0].contents,
            "deb http://archive.ubuntu.com/ubuntu noble main universe\n\
             deb http://archive.ubuntu.com/ubuntu noble-updates main universe\n\
             deb http://archive.ubuntu.com/ubuntu noble-security main universe\n"
        );
        assert_eq!(plan_of("ubuntu-22.04", "none", &[]).base.release, "jammy");
    }

    #[test]
    fn ubuntu_firefox_comes_from_mozillas_repository_with_its_key_checked_and_pinned() {
        let plan = plan_of("ubuntu-24.04", "xfce", &["firefox"]);
        let script = plan.install_script.as_deref().unwrap();
        assert!(plan.packages.contains(&"firefox".to_string()));
        assert!(!plan.packages.contains(&"firefox-esr".to_string()));
        assert!(script.contains(
            "/usr/lib/apt/apt-helper download-file https://packages.mozilla.org/apt/repo-signing-key.gpg /etc/apt/keyrings/mozilla.asc"
        ));
        assert!(script.contains("35BAA0B33E9EB396F59CA838C0BA5CE6DC6315A3"));
        assert!(script.contains(
            "deb [signed-by=/etc/apt/keyrings/mozilla.asc] https://packages.mozilla.org/apt mozilla main"
        ));
        assert!(script.contains("Pin: origin packages.mozilla.org\\nPin-Priority: 1000"));
        let repo_at = script.find("sources.list.d/mozilla.list").unwrap();
        let install_at = script.rfind("apt-get install").unwrap();
        assert!(
            repo_at < install_at,
            "the repository is added before the install"
        );
        assert_eq!(
            plan.probe_urls,
            [
                "http://archive.ubuntu.com/ubuntu/dists/noble/Release",
                "https://packages.mozilla.org/apt/dists/mozilla/Release"
            ]
        );
    }

    #[test]
    fn debian_install_is_one_apt_get_without_recommends() {
        let plan = plan_of("debian-12", "xfce", &["firefox", "git"]);
        assert!(plan.repos.is_empty());
        assert_eq!(
            plan.install_script.unwrap(),
            format!(
                "apt-get update -q\napt-get install -y -q --no-install-recommends {}\napt-get clean",
                plan.packages.join(" ")
            )
        );
        assert_eq!(plan.build_files[0].path, "usr/sbin/policy-rc.d");
        assert_eq!(plan.clean_dirs, ["var/lib/apt/lists"]);
    }
}
