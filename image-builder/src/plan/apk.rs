//! Alpine: `apk.static --root --initdb` installs the base into an empty tree from the
//! configured mirror, trusting only the keys in the base's key directory; the tree's own
//! apk installs the spec's packages. Alpine boots with busybox init and OpenRC, so the
//! session set-up writes `/etc/inittab` (agetty autologin on tty1 and ttyS0), ifupdown's
//! DHCP configuration and an OpenRC service for the agent instead of systemd units.

use std::path::Path;

use super::{common_files, user_script, BasePlan, File, Tool, AGENT_PATH};

/// The Alpine base, udev (for the input devices and DRM), D-Bus, sudo, networking, TLS
/// roots, bash (the login shell), useradd (shadow) and agetty for autologin.
pub const BASE_PACKAGES: &[&str] = &[
    "alpine-base",
    "eudev",
    "dbus",
    "sudo",
    "iproute2",
    "ca-certificates",
    "bash",
    "shadow",
    "agetty",
];
/// Xorg started by the user through seatd.
pub const X11_SESSION_PACKAGES: &[&str] = &[
    "xorg-server",
    "xf86-input-libinput",
    "xinit",
    "font-dejavu",
    "seatd",
    // xprop: the session wrapper waits for the window manager before opening the first
    // app; xclip: the clipboard from a shell or `genos exec`.
    "xprop",
    "xclip",
];
pub const KIOSK_SESSION_PACKAGES: &[&str] = &["font-dejavu", "seatd"];

pub const TOOLS: &[Tool] = &[Tool {
    names: &["apk.static", "apk"],
    hint: "install apk.static (sbin/apk.static of Alpine's apk-tools-static package; Debian 12 does not package apk), or give the base its Alpine keys so genos-image can fetch and verify it",
}];

/// The architecture of every GenOS guest.
pub const ARCH: &str = "x86_64";

fn repositories(plan: &BasePlan) -> Vec<String> {
    let components: Vec<&str> = if plan.components.is_empty() {
        vec!["main"]
    } else {
        plan.components.iter().map(String::as_str).collect()
    };
    components
        .iter()
        .map(|c| format!("{}/{}/{c}", plan.mirror, plan.release))
        .collect()
}

/// The main repository's index.
pub fn probe_url(plan: &BasePlan) -> String {
    format!(
        "{}/{}/main/{ARCH}/APKINDEX.tar.gz",
        plan.mirror, plan.release
    )
}

pub fn base_command(plan: &BasePlan, root: &Path) -> Vec<String> {
    let mut cmd = vec![
        "apk.static".to_string(),
        "--root".into(),
        root.display().to_string(),
        "--initdb".into(),
        "--arch".into(),
        ARCH.into(),
        "--no-cache".into(),
        "--update-cache".into(),
    ];
    if let Some(keys) = &plan.keyring {
        cmd.push("--keys-dir".into());
        cmd.push(keys.display().to_string());
    }
    for repo in repositories(plan) {
        cmd.push("--repository".into());
        cmd.push(repo);
    }
    cmd.push("add".into());
    cmd.extend(plan.packages.iter().cloned());
    cmd
}

/// The tree's repositories (the configured mirror), for the spec's layer and the user.
pub fn after(plan: &BasePlan) -> Vec<File> {
    let list: String = repositories(plan)
        .iter()
        .map(|r| format!("{r}\n"))
        .collect();
    vec![File::new("etc/apk/repositories", list, 0o644)]
}

pub fn install_script(packages: &[String]) -> Option<String> {
    (!packages.is_empty()).then(|| format!("apk add --no-cache {}", packages.join(" ")))
}

/// busybox init + OpenRC: inittab with agetty autologin, DHCP on eth0, services enabled.
pub fn openrc_setup(user: &str, agent: bool) -> (Vec<File>, String) {
    let mut files = common_files(user);
    files.push(File::new(
        "etc/network/interfaces",
        "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n",
        0o644,
    ));
    files.push(File::new(
        "etc/inittab",
        format!(
            "# Written by genos-image.\n\
             ::sysinit:/sbin/openrc sysinit\n\
             ::sysinit:/sbin/openrc boot\n\
             ::wait:/sbin/openrc default\n\
             tty1::respawn:/sbin/agetty --autologin {user} --noclear tty1 linux\n\
             ttyS0::respawn:/sbin/agetty --autologin {user} --keep-baud 115200,57600,38400,9600 ttyS0 vt100\n\
             ::ctrlaltdel:/sbin/reboot\n\
             ::shutdown:/sbin/openrc shutdown\n"
        ),
        0o644,
    ));
    let mut script = user_script(user);
    script.push_str(
        "rc-update add udev sysinit\n\
         rc-update add udev-trigger sysinit\n\
         rc-update add udev-settle sysinit\n\
         rc-update add networking default\n\
         rc-update add dbus default\n\
         if [ -e /etc/init.d/seatd ]; then rc-update add seatd default; fi\n",
    );
    if agent {
        files.push(File::new(
            "etc/init.d/genos-agent",
            format!(
                "#!/sbin/openrc-run\ndescription=\"GenOS guest agent\"\ncommand=/{AGENT_PATH}\ncommand_args=\"--session-user {user}\"\nsupervisor=supervise-daemon\nrespawn_delay=1\n"
            ),
            0o755,
        ));
        script.push_str("rc-update add genos-agent default\n");
    }
    (files, script)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{file, plan_of};
    use super::super::{plan, PlanOptions};
    use super::*;
    use proto::spec::Catalog;

    #[test]
    fn alpine_base_is_apk_static_initdb_with_only_the_configured_keys() {
        let plan = plan_of("alpine-3.20", "none", &[]);
        let mut expected: Vec<String> = [
            "apk.static",
            "--root",
            "/R",
            "--initdb",
            "--arch",
            "x86_64",
            "--no-cache",
            "--update-cache",
            "--keys-dir",
            "/usr/share/distribution-gpg-keys/alpine-linux",
            "--repository",
            "https://dl-cdn.alpinelinux.org/alpine/v3.20/main",
            "--repository",
            "https://dl-cdn.alpinelinux.org/alpine/v3.20/community",
            "add",
        ]
        .map(String::from)
        .into();
        expected.extend(BASE_PACKAGES.iter().map(|p| p.to_string()));
        assert_eq!(
            plan.base.command(Path::new("/R"), Path::new("/W")),
            expected
        );
        assert_eq!(
            plan.base.probe_url,
            "https://dl-cdn.alpinelinux.org/alpine/v3.20/main/x86_64/APKINDEX.tar.gz"
        );
        assert_eq!(
            plan.base.after()[0].contents,
            "https://dl-cdn.alpinelinux.org/alpine/v3.20/main\nhttps://dl-cdn.alpinelinux.org/alpine/v3.20/community\n"
        );
    }

    #[test]
    fn alpine_session_is_openrc_with_agetty_autologin_and_dhcp() {
        let plan = plan(
            &super::super::tests::spec("alpine-3.20", "xfce", &["firefox"]),
            &Catalog::embedded(),
            &PlanOptions {
                agent: true,
                ..Default::default()
            },
        )
        .unwrap();
        let inittab = file(&plan, "etc/inittab");
        assert!(
            inittab.contains("tty1::respawn:/sbin/agetty --autologin genos --noclear tty1 linux")
        );
        assert!(inittab.contains("ttyS0::respawn:/sbin/agetty --autologin genos"));
        assert!(file(&plan, "etc/network/interfaces").contains("iface eth0 inet dhcp"));
        assert!(
            file(&plan, "etc/init.d/genos-agent").contains("command=/usr/local/bin/genos-agent")
        );
        assert!(plan
            .setup_script
            .contains("rc-update add genos-agent default"));
        assert!(plan
            .setup_script
            .contains("rc-update add networking default"));
        assert!(!plan.files.iter().any(|f| f.path.starts_with("etc/systemd")));
        assert!(plan.user_files[0]
            .contents
            .contains("exec startx /usr/local/bin/genos-x-session /usr/bin/startxfce4"));
        for p in ["xfce4", "firefox-esr", "xorg-server", "seatd"] {
            assert!(plan.packages.iter().any(|x| x == p), "{p}");
        }
        assert_eq!(
            plan.install_script.unwrap(),
            format!("apk add --no-cache {}", plan.packages.join(" "))
        );
    }
}
