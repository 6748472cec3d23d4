//! Fedora: the host's dnf (Debian packages it) installs the base into an empty tree with
//! `--installroot`, from repository definitions genos-image writes for the configured
//! mirror, with Fedora's key; the spec's packages are then installed by the tree's own dnf.
//!
//! The rpm database goes where Fedora's rpm looks for it (`/usr/lib/sysimage/rpm`, with
//! `/var/lib/rpm` a link to it, as on Fedora) whatever the host's rpm defaults to.

use std::path::Path;

use super::{BasePlan, File, Prepared, Tool};

/// An init, device manager, networkd (a separate package on Fedora), D-Bus, sudo,
/// networking, TLS roots, the user tools and dnf itself for the spec's layer.
pub const BASE_PACKAGES: &[&str] = &[
    "fedora-release",
    "systemd",
    "systemd-udev",
    "systemd-networkd",
    "systemd-pam",
    "dbus-broker",
    "sudo",
    "iproute",
    "ca-certificates",
    "shadow-utils",
    "util-linux",
    "bash",
    "dnf",
];
pub const X11_SESSION_PACKAGES: &[&str] = &[
    "xorg-x11-server-Xorg",
    "xorg-x11-drv-libinput",
    "xorg-x11-xinit",
    "dejavu-sans-fonts",
    // xprop: the session wrapper waits for the window manager before opening the first
    // app; xclip: the clipboard from a shell or `genos exec`.
    "xprop",
    "xclip",
];
pub const KIOSK_SESSION_PACKAGES: &[&str] = &["dejavu-sans-fonts"];

pub const TOOLS: &[Tool] = &[Tool {
    names: &["dnf"],
    hint: "install the Debian package `dnf`",
}];

/// The repository the image's own dnf uses for the spec's layer (the configured mirror);
/// Fedora's stock repositories stay for the user.
pub const IMAGE_REPOS_DIR: &str = "etc/genos/yum.repos.d";
/// Fedora's key as installed in the tree by `fedora-gpg-keys`.
const IMAGE_KEY: &str = "/etc/pki/rpm-gpg/RPM-GPG-KEY-fedora-$releasever-$basearch";

fn os_url(plan: &BasePlan) -> String {
    format!(
        "{}/releases/{}/Everything/x86_64/os/",
        plan.mirror, plan.release
    )
}

fn repos(plan: &BasePlan, key: &str) -> String {
    format!(
        "[genos-fedora]\nname=Fedora {r} from {m}\nbaseurl={os}\ngpgcheck=1\ngpgkey=file://{key}\n\n\
         [genos-fedora-updates]\nname=Fedora {r} updates from {m}\nbaseurl={m}/updates/{r}/Everything/x86_64/\ngpgcheck=1\ngpgkey=file://{key}\n",
        r = plan.release,
        m = plan.mirror,
        os = os_url(plan),
    )
}

/// The release's repository metadata.
pub fn probe_url(plan: &BasePlan) -> String {
    format!("{}repodata/repomd.xml", os_url(plan))
}

pub fn host_files(plan: &BasePlan) -> Vec<File> {
    let key = plan
        .keyring
        .as_ref()
        .map(|k| k.display().to_string())
        .unwrap_or_default();
    vec![File::new(
        "repos.d/genos-fedora.repo",
        repos(plan, &key),
        0o644,
    )]
}

pub fn before() -> Vec<Prepared> {
    vec![
        Prepared::Dir("usr/lib/sysimage/rpm".into()),
        Prepared::Dir("var/lib".into()),
        Prepared::Symlink {
            path: "var/lib/rpm".into(),
            target: "../../usr/lib/sysimage/rpm".into(),
        },
    ]
}

pub fn base_command(plan: &BasePlan, root: &Path, work: &Path) -> Vec<String> {
    let mut cmd: Vec<String> = [
        "dnf".to_string(),
        "-y".into(),
        format!("--installroot={}", root.display()),
        format!("--releasever={}", plan.release),
        format!("--setopt=reposdir={}", work.join("repos.d").display()),
        format!("--setopt=cachedir={}", work.join("dnf-cache").display()),
        "--setopt=install_weak_deps=False".into(),
        "--setopt=keepcache=False".into(),
        "--disableplugin=*".into(),
        "--nodocs".into(),
        "install".into(),
    ]
    .into();
    cmd.extend(plan.packages.iter().cloned());
    cmd
}

pub fn after(plan: &BasePlan) -> Vec<File> {
    vec![File::new(
        format!("{IMAGE_REPOS_DIR}/genos-fedora.repo"),
        repos(plan, IMAGE_KEY),
        0o644,
    )]
}

pub fn install_script(packages: &[String]) -> Option<String> {
    (!packages.is_empty()).then(|| {
        format!(
            "dnf -y --setopt=reposdir=/{IMAGE_REPOS_DIR} --setopt=install_weak_deps=False --nodocs install {}\ndnf clean all",
            packages.join(" ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{file, plan_of};
    use super::*;

    #[test]
    fn fedora_base_is_dnf_installroot_from_the_mirror_with_fedoras_key() {
        let plan = plan_of("fedora-40", "none", &[]);
        let cmd = plan.base.command(Path::new("/R"), Path::new("/W"));
        assert_eq!(
            cmd[..11],
            [
                "dnf",
                "-y",
                "--installroot=/R",
                "--releasever=40",
                "--setopt=reposdir=/W/repos.d",
                "--setopt=cachedir=/W/dnf-cache",
                "--setopt=install_weak_deps=False",
                "--setopt=keepcache=False",
                "--disableplugin=*",
                "--nodocs",
                "install"
            ]
        );
        assert_eq!(
            cmd[11..],
            BASE_PACKAGES
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()[..]
        );
        let repo = &plan.base.host_files()[0];
        assert_eq!(repo.path, "repos.d/genos-fedora.repo");
        assert!(repo.contents.contains(
            "baseurl=https://dl.fedoraproject.org/pub/fedora/linux/releases/40/Everything/x86_64/os/\ngpgcheck=1\ngpgkey=file:///usr/share/distribution-gpg-keys/fedora/RPM-GPG-KEY-fedora-40-primary\n"
        ));
        assert!(repo.contents.contains("/updates/40/Everything/x86_64/"));
        assert_eq!(
            plan.base.probe_url,
            "https://dl.fedoraproject.org/pub/fedora/linux/releases/40/Everything/x86_64/os/repodata/repomd.xml"
        );
        assert!(plan.base.before().contains(&Prepared::Symlink {
            path: "var/lib/rpm".into(),
            target: "../../usr/lib/sysimage/rpm".into()
        }));
    }

    #[test]
    fn fedora_spec_layer_uses_fedora_names_from_the_configured_mirror() {
        let plan = plan_of("fedora-40", "xfce", &["firefox", "docker", "vim"]);
        for p in [
            "xfce4-session",
            "firefox",
            "moby-engine",
            "vim-enhanced",
            "xorg-x11-server-Xorg",
        ] {
            assert!(
                plan.packages.iter().any(|x| x == p),
                "{p}: {:?}",
                plan.packages
            );
        }
        assert!(!plan
            .packages
            .iter()
            .any(|x| x == "firefox-esr" || x == "xserver-xorg-core"));
        let script = plan.install_script.clone().unwrap();
        assert!(script.starts_with(
            "dnf -y --setopt=reposdir=/etc/genos/yum.repos.d --setopt=install_weak_deps=False --nodocs install "
        ));
        let image_repo = &plan.base.after()[0];
        assert_eq!(image_repo.path, "etc/genos/yum.repos.d/genos-fedora.repo");
        assert!(image_repo
            .contents
            .contains("gpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-fedora-$releasever-$basearch"));
        assert!(file(&plan, "etc/systemd/network/20-wired.network").contains("DHCP=yes"));
    }
}
