//! What a root filesystem build will do for a spec, computed without running anything:
//! the base layer's host command and package list, the packages, repositories and
//! in-chroot scripts of the spec's layer, and every file the session set-up writes.
//! `rootfs` executes a [`Plan`]; the unit tests here check it, as `jailer::plan` is checked.
//!
//! One builder per package manager: [`apt`] (debootstrap; Debian and Ubuntu), [`dnf`]
//! (`dnf --installroot`; Fedora) and [`apk`] (`apk.static --root`; Alpine). Each gives
//! the same two layers (a shared base per release and mirror, the spec's packages on
//! top) and the same session: user `genos`, autologin on tty1 and ttyS0, the desktop or
//! kiosk started from the login shell on tty1, DHCP networking and the optional agent.

pub mod apk;
pub mod apk_static;
pub mod apt;
pub mod dnf;

use std::path::{Path, PathBuf};

use proto::spec::{BaseEntry, Catalog, RepoEntry, Spec, SpecError};

/// Where the agent binary goes in every image.
pub const AGENT_PATH: &str = "usr/local/bin/genos-agent";
/// The X session's client: starts the agent's session part, then execs the desktop.
pub const X_SESSION_PATH: &str = "usr/local/bin/genos-x-session";
/// The kiosk's program under cage: starts the agent's session part, then execs the app.
pub const KIOSK_SESSION_PATH: &str = "usr/local/bin/genos-kiosk-session";
/// The account every environment logs into.
pub const DEFAULT_USER: &str = "genos";
/// Host name baked into images (environments override it on the kernel command line).
pub const DEFAULT_HOSTNAME: &str = "genos";

/// Errors from planning a build.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("desktop {0:?} has no session recipe in genos-image")]
    NoSession(String),
    #[error("the kiosk desktop needs an app to show full screen; the spec lists none")]
    KioskWithoutApp,
    #[error("catalog base {base:?} names builder {builder:?}, which genos-image does not have")]
    NoBuilder { base: String, builder: String },
}

/// The package manager family a base is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builder {
    Debootstrap,
    Dnf,
    Apk,
}

impl Builder {
    /// The builder a catalog base names, `None` when genos-image has no such builder.
    pub fn from_name(name: &str) -> Option<Builder> {
        match name {
            "debootstrap" => Some(Builder::Debootstrap),
            "dnf" => Some(Builder::Dnf),
            "apk" => Some(Builder::Apk),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Builder::Debootstrap => "debootstrap",
            Builder::Dnf => "dnf",
            Builder::Apk => "apk",
        }
    }
}

/// A file the build writes, relative to the tree (or, for host files, to the work dir).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: String,
    pub contents: String,
    pub mode: u32,
}

impl File {
    fn new(path: impl Into<String>, contents: impl Into<String>, mode: u32) -> File {
        File {
            path: path.into(),
            contents: contents.into(),
            mode,
        }
    }
}

/// A host tool a builder needs, and how to get it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// Names to look for in PATH, first found wins.
    pub names: &'static [&'static str],
    /// What to install when none is found.
    pub hint: &'static str,
}

/// The base layer: one tarball per builder, release, mirror and package list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasePlan {
    pub builder: Builder,
    pub release: String,
    pub mirror: String,
    pub components: Vec<String>,
    pub extra_suites: Vec<String>,
    /// Archive keys on the host, and the Debian package installing them.
    pub keyring: Option<PathBuf>,
    pub keyring_package: Option<String>,
    pub debootstrap_script: Option<String>,
    pub packages: Vec<String>,
    /// What the probe fetches before the builder runs.
    pub probe_url: String,
    /// How `apk.static` is fetched and verified when the host has no apk (Alpine bases
    /// with keys only).
    pub apk_static: Option<apk_static::ApkStaticPlan>,
}

impl BasePlan {
    fn new(
        base_name: &str,
        base: &BaseEntry,
        mirror: Option<&str>,
        keyring: Option<&Path>,
    ) -> Result<BasePlan, PlanError> {
        let builder = Builder::from_name(&base.builder).ok_or_else(|| PlanError::NoBuilder {
            base: base_name.to_string(),
            builder: base.builder.clone(),
        })?;
        let mirror = mirror
            .unwrap_or(&base.mirror)
            .trim_end_matches('/')
            .to_string();
        let mut plan = BasePlan {
            builder,
            release: base.release.clone(),
            mirror,
            components: base.components.clone(),
            extra_suites: base.extra_suites.clone(),
            keyring: keyring
                .map(Path::to_path_buf)
                .or(base.keyring.as_ref().map(PathBuf::from)),
            keyring_package: base.keyring_package.clone(),
            debootstrap_script: base.debootstrap_script.clone(),
            packages: Vec::new(),
            probe_url: String::new(),
            apk_static: None,
        };
        plan.packages = match builder {
            Builder::Debootstrap => apt::BASE_PACKAGES,
            Builder::Dnf => dnf::BASE_PACKAGES,
            Builder::Apk => apk::BASE_PACKAGES,
        }
        .iter()
        .map(|p| p.to_string())
        .collect();
        plan.probe_url = match builder {
            Builder::Debootstrap => apt::probe_url(&plan),
            Builder::Dnf => dnf::probe_url(&plan),
            Builder::Apk => apk::probe_url(&plan),
        };
        if builder == Builder::Apk {
            plan.apk_static = plan.keyring.as_deref().map(|keys| {
                apk_static::ApkStaticPlan::new(&plan.mirror, &plan.release, apk::ARCH, keys)
            });
        }
        Ok(plan)
    }

    /// Host tools the base build needs besides tar and coreutils.
    pub fn tools(&self) -> Vec<Tool> {
        match self.builder {
            Builder::Debootstrap => apt::TOOLS.to_vec(),
            Builder::Dnf => dnf::TOOLS.to_vec(),
            Builder::Apk => apk::TOOLS.to_vec(),
        }
    }

    /// Files written on the host under the build's work directory before the builder runs
    /// (dnf's repository definitions).
    pub fn host_files(&self) -> Vec<File> {
        match self.builder {
            Builder::Dnf => dnf::host_files(self),
            _ => Vec::new(),
        }
    }

    /// Files and symlinks created in the empty tree before the builder runs.
    pub fn before(&self) -> Vec<Prepared> {
        match self.builder {
            Builder::Dnf => dnf::before(),
            _ => Vec::new(),
        }
    }

    /// The builder's command line for a tree at `root`, with work files under `work`.
    pub fn command(&self, root: &Path, work: &Path) -> Vec<String> {
        match self.builder {
            Builder::Debootstrap => apt::base_command(self, root),
            Builder::Dnf => dnf::base_command(self, root, work),
            Builder::Apk => apk::base_command(self, root),
        }
    }

    /// Files written into the tree after the builder (package sources for the top layer
    /// and for the user).
    pub fn after(&self) -> Vec<File> {
        match self.builder {
            Builder::Debootstrap => apt::after(self),
            Builder::Dnf => dnf::after(self),
            Builder::Apk => apk::after(self),
        }
    }

    /// Cache-key inputs. Debian's are the same as before other builders existed, so cached
    /// Debian bases stay valid.
    pub fn hash_inputs(&self) -> Vec<(&'static str, String)> {
        let mut inputs = vec![
            ("suite", self.release.clone()),
            ("mirror", self.mirror.clone()),
            ("packages", self.packages.join(",")),
        ];
        if self.builder != Builder::Debootstrap {
            inputs.push(("builder", self.builder.name().into()));
        }
        for (key, value) in [
            ("components", self.components.join(",")),
            ("extra_suites", self.extra_suites.join(",")),
            (
                "keyring",
                self.keyring
                    .as_ref()
                    .map(|k| k.display().to_string())
                    .unwrap_or_default(),
            ),
            (
                "debootstrap_script",
                self.debootstrap_script.clone().unwrap_or_default(),
            ),
        ] {
            if !value.is_empty() {
                inputs.push((key, value));
            }
        }
        let after: String = self
            .after()
            .iter()
            .map(|f| format!("{}\n{}", f.path, f.contents))
            .collect();
        if !after.is_empty() {
            inputs.push(("after", after));
        }
        inputs
    }
}

/// Something made in the tree before the builder runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    Dir(String),
    Symlink { path: String, target: String },
}

/// What the session recipe does for a desktop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Extra packages besides the catalog's.
    pub packages: Vec<String>,
    /// Command the autologin shell on tty1 execs; `None` leaves the user at a shell.
    pub command: Option<String>,
    /// The session's own files: the wrapper that starts genos-agent's session part with it.
    pub files: Vec<File>,
}

/// The wrapper a session runs its desktop (or kiosk app) through: it starts
/// `genos-agent session` beside it (when the image has the agent), so the session part
/// lives exactly as long as the session, then execs the program it was given.
/// `first_app`, for X11 desktops, is the spec's first GUI app: opened once the desktop's
/// window manager has claimed the screen (EWMH `_NET_SUPPORTING_WM_CHECK` on the root
/// window, read with xprop), or after [`WM_WAIT_S`] seconds whatever it did. The spec's
/// other apps are installed and stay in the desktop's menu.
fn session_wrapper(path: &str, what: &str, agent_args: &str, first_app: Option<&str>) -> File {
    let mut script = format!(
        "#!/bin/sh\n\
         # Written by genos-image: runs {what} with genos-agent's session part beside it\n\
         # (clipboard, display modes and the session stage for the system agent).\n\
         if [ -x /{AGENT_PATH} ]; then\n    /{AGENT_PATH} session{agent_args} &\nfi\n"
    );
    if let Some(app) = first_app {
        script.push_str(&format!(
            "# The spec's first app, opened once the window manager runs; the others are in the menu.\n\
             (\n    waited=0\n    \
             while [ $waited -lt {WM_WAIT_S} ] && ! xprop -root _NET_SUPPORTING_WM_CHECK 2>/dev/null | grep -q 'window id'; do\n        \
             sleep 1\n        waited=$((waited + 1))\n    done\n    \
             exec {app}\n) >/dev/null 2>&1 &\n"
        ));
    }
    script.push_str("exec \"$@\"\n");
    File::new(path, script, 0o755)
}

/// How long an X11 session wrapper waits for the window manager before opening the first
/// app anyway (a slow guest under TCG takes minutes to start xfce).
pub const WM_WAIT_S: u32 = 600;

/// Everything a spec's image is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub base: BasePlan,
    /// Packages of the spec's layer, sorted: the catalog's for desktop and apps on this
    /// base, plus the session's.
    pub packages: Vec<String>,
    /// Third-party repositories those packages need.
    pub repos: Vec<(String, RepoEntry)>,
    pub session: Session,
    /// Written before the install script and removed at the end (apt's policy-rc.d).
    pub build_files: Vec<File>,
    /// Installs `packages` inside the tree; `None` when there are none.
    pub install_script: Option<String>,
    /// The session set-up's files, written after the install.
    pub files: Vec<File>,
    /// Run inside the tree after `files`: user, services, autologin.
    pub setup_script: String,
    /// The user's own files (the login profile), written after the user exists.
    pub user_files: Vec<File>,
    /// Run inside the tree last: gives `user_files` to the user.
    pub chown_script: String,
    /// Directories whose files are removed at the end (package lists).
    pub clean_dirs: Vec<String>,
    /// Every URL the spec's layer downloads from, probed before it starts.
    pub probe_urls: Vec<String>,
}

/// Build settings that are not part of the spec.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions<'a> {
    /// The base's archive instead of the catalog's.
    pub mirror: Option<&'a str>,
    /// The base's keys instead of the catalog's.
    pub keyring: Option<&'a Path>,
    /// Install the agent with a service.
    pub agent: bool,
    /// The login user (default [`DEFAULT_USER`]).
    pub user: Option<&'a str>,
}

/// Plans the build of `spec`'s image. Pure: reads nothing but its arguments.
pub fn plan(spec: &Spec, catalog: &Catalog, options: &PlanOptions) -> Result<Plan, PlanError> {
    let install = catalog.install_for(spec)?;
    let entry = &catalog.bases[&spec.base];
    let base = BasePlan::new(&spec.base, entry, options.mirror, options.keyring)?;
    let first_app = first_gui_app_command(spec, catalog)?;
    let session = session_for(spec, base.builder, first_app.as_deref())?;
    let mut packages = install.packages;
    for p in &session.packages {
        if !packages.contains(p) {
            packages.push(p.clone());
        }
    }
    packages.sort();
    let repos: Vec<(String, RepoEntry)> = install
        .repos
        .iter()
        .map(|r| (r.clone(), catalog.repos[r].clone()))
        .collect();
    let user = options.user.unwrap_or(DEFAULT_USER);
    let (install_script, build_files, clean_dirs) = match base.builder {
        Builder::Debootstrap => (
            apt::install_script(&packages, &repos),
            apt::build_files(),
            vec!["var/lib/apt/lists".to_string()],
        ),
        Builder::Dnf => (dnf::install_script(&packages), Vec::new(), Vec::new()),
        Builder::Apk => (apk::install_script(&packages), Vec::new(), Vec::new()),
    };
    let (mut files, setup_script) = match base.builder {
        Builder::Debootstrap | Builder::Dnf => systemd_setup(user, options.agent),
        Builder::Apk => apk::openrc_setup(user, options.agent),
    };
    files.extend(session.files.iter().cloned());
    let user_files = vec![login_profile(user, &session)];
    let chown_script = user_files
        .iter()
        .map(|f| {
            format!(
                "chown {user}:{user} /{}
",
                f.path
            )
        })
        .collect();
    let mut probe_urls = Vec::new();
    if install_script.is_some() {
        probe_urls.push(base.probe_url.clone());
        probe_urls.extend(repos.iter().map(|(_, r)| apt::repo_probe_url(r)));
    }
    Ok(Plan {
        base,
        packages,
        repos,
        session,
        build_files,
        install_script,
        files,
        setup_script,
        user_files,
        chown_script,
        clean_dirs,
        probe_urls,
    })
}

/// The command of `spec`'s first GUI app on its base (a command-line app such as git
/// listed before it is skipped), `None` when the spec has no GUI app.
pub fn first_gui_app_command(spec: &Spec, catalog: &Catalog) -> Result<Option<String>, PlanError> {
    let Some(app) = spec
        .apps
        .iter()
        .find(|a| catalog.apps.get(*a).is_some_and(|e| e.gui))
    else {
        return Ok(None);
    };
    let mut alone = spec.clone();
    alone.apps = vec![app.clone()];
    Ok(catalog.install_for(&alone)?.first_app_command)
}

/// The session for `spec`'s desktop: X11 desktops start through `startx` and open the
/// spec's first GUI app (`first_app_command`) once the window manager runs; the kiosk runs
/// that app full screen under cage; `none` is a console login. Desktops and kiosks start
/// through a wrapper that runs genos-agent's session part with the session.
pub fn session_for(
    spec: &Spec,
    builder: Builder,
    first_app_command: Option<&str>,
) -> Result<Session, PlanError> {
    let owned = |list: &[&str]| list.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    let (x11, kiosk) = match builder {
        Builder::Debootstrap => (apt::X11_SESSION_PACKAGES, apt::KIOSK_SESSION_PACKAGES),
        Builder::Dnf => (dnf::X11_SESSION_PACKAGES, dnf::KIOSK_SESSION_PACKAGES),
        Builder::Apk => (apk::X11_SESSION_PACKAGES, apk::KIOSK_SESSION_PACKAGES),
    };
    // startx takes the first absolute path as the X client and passes the rest to it.
    let x11 = |program: &str| Session {
        packages: owned(x11),
        command: Some(format!(
            "startx /{X_SESSION_PATH} {program} -- -nolisten tcp vt1"
        )),
        files: vec![session_wrapper(
            X_SESSION_PATH,
            "the X desktop",
            "",
            first_app_command,
        )],
    };
    match spec.desktop.as_str() {
        "none" => Ok(Session {
            packages: Vec::new(),
            command: None,
            files: Vec::new(),
        }),
        "xfce" => Ok(x11("/usr/bin/startxfce4")),
        "lxqt" => Ok(x11("/usr/bin/startlxqt")),
        "kde" => Ok(x11("/usr/bin/startplasma-x11")),
        "gnome" => Ok(x11("/usr/bin/gnome-session")),
        "kiosk" => {
            let program = first_app_command.ok_or(PlanError::KioskWithoutApp)?;
            Ok(Session {
                packages: owned(kiosk),
                command: Some(format!("cage -- /{KIOSK_SESSION_PATH} {program}")),
                files: vec![session_wrapper(
                    KIOSK_SESSION_PATH,
                    "the kiosk app",
                    " --kiosk",
                    None,
                )],
            })
        }
        other => Err(PlanError::NoSession(other.to_string())),
    }
}

/// The login profile that starts the session on tty1.
fn login_profile(user: &str, session: &Session) -> File {
    let mut profile = String::from("# Written by genos-image.\n[ -f ~/.bashrc ] && . ~/.bashrc\n");
    if let Some(command) = &session.command {
        profile.push_str(&format!(
            "if [ \"$(tty)\" = /dev/tty1 ] && [ -z \"$DISPLAY\" ] && [ -z \"$WAYLAND_DISPLAY\" ]; then\n    exec {command}\nfi\n"
        ));
    }
    File::new(format!("home/{user}/.bash_profile"), profile, 0o644)
}

/// Files every image gets whatever its init: host name, hosts, fstab, sudo rule.
fn common_files(user: &str) -> Vec<File> {
    vec![
        // The image is shared by every environment with the same packages; the VM gets its
        // own name from `systemd.hostname=` on the kernel command line.
        File::new("etc/hostname", format!("{DEFAULT_HOSTNAME}\n"), 0o644),
        File::new(
            "etc/hosts",
            "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
            0o644,
        ),
        File::new(
            "etc/fstab",
            "# The root file system is mounted by the GenOS initramfs.\n",
            0o644,
        ),
        File::new(
            format!("etc/sudoers.d/{user}"),
            format!("{user} ALL=(ALL) NOPASSWD:ALL\n"),
            0o440,
        ),
    ]
}

/// The user: a home, no password (autologin only), the groups a desktop needs.
fn user_script(user: &str) -> String {
    format!(
        "useradd --create-home --shell /bin/bash {user}\n\
         usermod --password '*' {user}\n\
         for g in sudo wheel video input render audio seat; do getent group $g >/dev/null && usermod -aG $g {user}; done\n"
    )
}

/// systemd images (Debian, Ubuntu, Fedora): networkd with DHCP, getty autologin drop-ins,
/// e2scrub masked, the agent as a service.
fn systemd_setup(user: &str, agent: bool) -> (Vec<File>, String) {
    let mut files = common_files(user);
    files.push(File::new(
        "etc/systemd/network/20-wired.network",
        "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n",
        0o644,
    ));
    let autologin = |agetty_args: &str| {
        format!("[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin {user} {agetty_args}\n")
    };
    files.push(File::new(
        "etc/systemd/system/getty@tty1.service.d/autologin.conf",
        autologin("--noclear %I $TERM"),
        0o644,
    ));
    files.push(File::new(
        "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf",
        autologin("--keep-baud 115200,57600,38400,9600 %I $TERM"),
        0o644,
    ));
    let mut script = user_script(user);
    script.push_str(
        "systemctl enable systemd-networkd\n\
         systemctl set-default multi-user.target\n\
         systemctl mask e2scrub_reap.service e2scrub_all.timer\n",
    );
    if agent {
        files.push(File::new(
            "etc/systemd/system/genos-agent.service",
            format!("[Unit]\nDescription=GenOS guest agent\n\n[Service]\nExecStart=/{AGENT_PATH} --session-user {user}\nRestart=always\n\n[Install]\nWantedBy=multi-user.target\n"),
            0o644,
        ));
        script.push_str("systemctl enable genos-agent.service\n");
    }
    (files, script)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn spec(base: &str, desktop: &str, apps: &[&str]) -> Spec {
        let json = serde_json::json!({
            "version": 1, "name": "t", "base": base, "desktop": desktop,
            "apps": apps, "vcpus": 1, "memory_mib": 512, "disk_gib": 1,
            "display": {"width": 1280, "height": 720, "fps": 30},
            "network": {"mode": "none", "allow": []},
            "lifetime": {"ttl_s": null, "idle_s": null},
            "persistence": "ephemeral", "assumptions": []
        });
        Spec::from_json(&json.to_string()).unwrap()
    }

    pub(crate) fn plan_of(base: &str, desktop: &str, apps: &[&str]) -> Plan {
        plan(
            &spec(base, desktop, apps),
            &Catalog::embedded(),
            &PlanOptions::default(),
        )
        .unwrap()
    }

    pub(crate) fn file<'a>(plan: &'a Plan, path: &str) -> &'a str {
        &plan
            .files
            .iter()
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("{path} not in {:?}", plan.files))
            .contents
    }

    #[test]
    fn every_catalog_builder_is_one_genos_image_has() {
        for name in proto::spec::BUILDERS {
            assert!(Builder::from_name(name).is_some(), "{name}");
        }
        for (name, base) in &Catalog::embedded().bases {
            assert!(Builder::from_name(&base.builder).is_some(), "{name}");
        }
    }

    #[test]
    fn xfce_session_starts_x_with_the_desktop() {
        let plan = plan_of("debian-12", "xfce", &[]);
        assert!(plan
            .session
            .command
            .as_deref()
            .unwrap()
            .starts_with("startx /usr/local/bin/genos-x-session /usr/bin/startxfce4"));
        assert!(plan.packages.iter().any(|p| p == "xserver-xorg-core"));
    }

    #[test]
    fn kiosk_session_runs_the_first_app_under_cage() {
        assert_eq!(
            plan_of("debian-12", "kiosk", &["firefox"])
                .session
                .command
                .unwrap(),
            "cage -- /usr/local/bin/genos-kiosk-session firefox-esr"
        );
        assert_eq!(
            plan_of("fedora-40", "kiosk", &["chromium"])
                .session
                .command
                .unwrap(),
            "cage -- /usr/local/bin/genos-kiosk-session chromium-browser"
        );
    }

    #[test]
    fn desktop_and_kiosk_sessions_start_the_agents_session_part_with_them() {
        for (desktop, apps, wrapper, part) in [
            (
                "xfce",
                &[][..],
                "usr/local/bin/genos-x-session",
                "genos-agent session &",
            ),
            (
                "kiosk",
                &["firefox"][..],
                "usr/local/bin/genos-kiosk-session",
                "genos-agent session --kiosk &",
            ),
        ] {
            let plan = plan_of("debian-12", desktop, apps);
            let command = plan.session.command.clone().unwrap();
            let script = plan.files.iter().find(|f| f.path == wrapper).unwrap();

            assert!(command.contains(&format!("/{wrapper} ")), "{command}");
            assert!(script.contents.contains(part), "{}", script.contents);
            assert!(script.contents.ends_with("exec \"$@\"\n"));
            assert_eq!(script.mode, 0o755);
        }
        let console = plan_of("debian-12", "none", &[]);
        assert!(!console.files.iter().any(|f| f.path.contains("session")));
    }

    #[test]
    fn x11_desktops_open_the_first_gui_app_once_the_window_manager_runs() {
        for desktop in ["xfce", "lxqt", "kde", "gnome"] {
            let plan = plan_of("debian-12", desktop, &["git", "firefox", "gimp"]);
            let wrapper = file(&plan, X_SESSION_PATH);

            let wait = wrapper
                .find("xprop -root _NET_SUPPORTING_WM_CHECK")
                .unwrap_or_else(|| panic!("{desktop}: {wrapper}"));
            let open = wrapper.find("    exec firefox-esr\n").unwrap();
            let session = wrapper.find("exec \"$@\"").unwrap();
            assert!(wait < open && open < session, "{desktop}: {wrapper}");
            assert!(!wrapper.contains("gimp"), "{desktop}: {wrapper}");
            assert!(plan.packages.iter().any(|p| p == "gimp"), "{desktop}");
            assert!(plan.packages.iter().any(|p| p == "x11-utils"), "{desktop}");
        }
    }

    #[test]
    fn the_first_app_is_started_by_its_command_on_that_base() {
        let plan = plan_of("fedora-40", "xfce", &["chromium"]);

        assert!(file(&plan, X_SESSION_PATH).contains("    exec chromium-browser\n"));
    }

    #[test]
    fn a_desktop_without_gui_apps_opens_none() {
        for apps in [&[][..], &["git", "python"][..]] {
            let plan = plan_of("debian-12", "xfce", apps);
            let wrapper = file(&plan, X_SESSION_PATH);

            assert!(!wrapper.contains("xprop"), "{apps:?}: {wrapper}");
            assert_eq!(wrapper.matches("exec ").count(), 1, "{wrapper}");
        }
    }

    #[test]
    fn the_kiosk_shows_the_first_gui_app_not_a_command_line_one() {
        let plan = plan_of("debian-12", "kiosk", &["git", "firefox"]);

        assert_eq!(
            plan.session.command.as_deref(),
            Some("cage -- /usr/local/bin/genos-kiosk-session firefox-esr")
        );
        assert!(!file(&plan, KIOSK_SESSION_PATH).contains("xprop"));
    }

    #[test]
    fn kiosk_without_app_is_an_error() {
        let err = plan(
            &spec("debian-12", "kiosk", &[]),
            &Catalog::embedded(),
            &PlanOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, PlanError::KioskWithoutApp));
    }

    #[test]
    fn packages_merge_catalog_and_session_sorted() {
        let plan = plan_of("debian-12", "xfce", &["git"]);
        let mut sorted = plan.packages.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(plan.packages, sorted);
        for p in ["xfce4", "xinit", "git"] {
            assert!(plan.packages.iter().any(|x| x == p), "{p}");
        }
    }

    #[test]
    fn systemd_images_log_in_on_tty1_and_serial_and_start_the_session() {
        for base in ["debian-12", "ubuntu-24.04", "fedora-40"] {
            let plan = plan_of(base, "xfce", &[]);
            assert!(
                file(
                    &plan,
                    "etc/systemd/system/getty@tty1.service.d/autologin.conf"
                )
                .contains("--autologin genos"),
                "{base}"
            );
            assert!(plan.user_files[0].contents.contains("exec startx"));
            assert_eq!(
                plan.chown_script,
                "chown genos:genos /home/genos/.bash_profile\n"
            );
            assert!(file(&plan, "etc/systemd/network/20-wired.network").contains("DHCP=yes"));
            assert!(plan.setup_script.contains("useradd --create-home"));
            assert!(plan
                .setup_script
                .contains("systemctl enable systemd-networkd"));
        }
    }

    #[test]
    fn the_agent_gets_a_service_only_when_installed() {
        let catalog = Catalog::embedded();
        let with = plan(
            &spec("fedora-40", "none", &[]),
            &catalog,
            &PlanOptions {
                agent: true,
                ..Default::default()
            },
        )
        .unwrap();
        let without = plan_of("fedora-40", "none", &[]);
        assert!(file(&with, "etc/systemd/system/genos-agent.service")
            .contains("ExecStart=/usr/local/bin/genos-agent"));
        assert!(with
            .setup_script
            .contains("systemctl enable genos-agent.service"));
        assert!(!without.files.iter().any(|f| f.path.contains("genos-agent")));
    }

    #[test]
    fn a_mirror_and_keyring_override_the_catalogs() {
        let plan = plan(
            &spec("ubuntu-24.04", "none", &["git"]),
            &Catalog::embedded(),
            &PlanOptions {
                mirror: Some("http://mirror.lan/ubuntu/"),
                keyring: Some(Path::new("/srv/keys/ubuntu.gpg")),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(plan.base.mirror, "http://mirror.lan/ubuntu");
        assert_eq!(
            plan.base.probe_url,
            "http://mirror.lan/ubuntu/dists/noble/Release"
        );
        assert_eq!(
            plan.probe_urls,
            ["http://mirror.lan/ubuntu/dists/noble/Release"]
        );
        assert!(plan
            .base
            .command(Path::new("/R"), Path::new("/W"))
            .contains(&"--keyring=/srv/keys/ubuntu.gpg".to_string()));
    }

    #[test]
    fn a_spec_without_packages_needs_no_archive_for_its_layer() {
        let plan = plan_of("debian-12", "none", &[]);
        assert_eq!(plan.install_script, None);
        assert!(plan.probe_urls.is_empty());
    }

    #[test]
    fn debian_base_cache_key_inputs_are_unchanged() {
        let plan = plan_of("debian-12", "none", &[]);
        assert_eq!(
            plan.base.hash_inputs(),
            [
                ("suite", "bookworm".to_string()),
                ("mirror", "http://deb.debian.org/debian".to_string()),
                (
                    "packages",
                    "systemd-sysv,udev,dbus,sudo,iproute2,ca-certificates".to_string()
                ),
            ]
        );
    }
}
