//! Environment spec: the validated description of one GenOS environment, and the catalog
//! of bases, desktops and apps that spec names refer to.
//!
//! The JSON form of [`Spec`] is a public contract (composer output, admin API, image
//! builder input); its field names never change within one `version`. [`Spec::validate`]
//! checks what can be checked without a catalog (ranges, names, network rules);
//! [`Catalog::check_spec`] checks the names against a catalog, that genos-image has a
//! builder for the base and that the desktop and apps are packaged for it;
//! [`Catalog::install_for`] says what to install. `Spec::json_schema()` returns the JSON Schema of the current version.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The spec version this code reads and writes.
pub const SPEC_VERSION: u32 = 1;

/// Smallest and largest values a spec may ask for. Host capacity is checked later, by
/// admission control; these bounds only reject requests no host could honour.
pub mod limits {
    /// vCPUs per environment (the VMM's own limit).
    pub const VCPUS: std::ops::RangeInclusive<u32> = 1..=32;
    /// Guest memory in MiB: 128 MiB to 256 GiB.
    pub const MEMORY_MIB: std::ops::RangeInclusive<u32> = 128..=262_144;
    /// Root disk in GiB.
    pub const DISK_GIB: std::ops::RangeInclusive<u32> = 1..=4096;
    /// Display width and height in pixels.
    pub const DISPLAY_SIDE: std::ops::RangeInclusive<u32> = 320..=7680;
    /// Frames per second of the stream.
    pub const FPS: std::ops::RangeInclusive<u32> = 1..=120;
    /// Hosts in a network allowlist.
    pub const ALLOW_MAX: usize = 64;
    /// Seconds in a TTL or idle timeout: one minute to 30 days.
    pub const LIFETIME_S: std::ops::RangeInclusive<u64> = 60..=30 * 24 * 3600;
    /// Characters in an environment name.
    pub const NAME_LEN: std::ops::RangeInclusive<usize> = 1..=63;
}

/// One environment, as composed from a request or supplied by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Spec format version; always [`SPEC_VERSION`].
    pub version: u32,
    /// Short DNS-label-like name: lowercase letters, digits and '-'.
    pub name: String,
    /// Catalog base name, e.g. "debian-12".
    pub base: String,
    /// Catalog desktop name: "none", "kiosk", "xfce", "gnome", "kde" or "lxqt".
    pub desktop: String,
    /// Catalog app names, exactly as requested (not what the desktop brings anyway).
    pub apps: Vec<String>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Root disk size in GiB.
    pub disk_gib: u32,
    /// Display and stream settings.
    pub display: Display,
    /// Network access.
    pub network: Network,
    /// When the environment is reaped.
    pub lifetime: Lifetime,
    /// Whether the user's files survive a stop.
    pub persistence: Persistence,
    /// Every default or interpretation the composer filled in, in plain words.
    pub assumptions: Vec<String>,
}

/// Display geometry and stream frame rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Display {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
}

/// Network access of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub mode: NetworkMode,
    /// Host names (or `*.domain` wildcards) reachable in `allowlist` mode; empty otherwise.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// How the guest reaches the outside world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// No network device at all.
    None,
    /// Full outbound access through NAT.
    Nat,
    /// Outbound access only to the hosts in `allow`.
    Allowlist,
}

/// Reaping rules; `null` means "never".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Lifetime {
    /// Seconds after creation at which the environment is destroyed.
    pub ttl_s: Option<u64>,
    /// Seconds without a connected viewer after which the environment is stopped.
    pub idle_s: Option<u64>,
}

/// What happens to the user's files when the environment stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Persistence {
    /// Discarded on stop.
    Ephemeral,
    /// Kept on a per-environment disk until destroyed.
    Persistent,
}

/// Why a spec is not acceptable. Messages name the field and the allowed values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("spec version {0} is not supported (this build reads version {SPEC_VERSION})")]
    Version(u32),
    #[error("invalid spec JSON: {0}")]
    Json(String),
    #[error("name {0:?} is invalid: use 1-63 lowercase letters, digits or '-', not starting or ending with '-'")]
    Name(String),
    #[error("{field} = {value} is out of range ({min}..={max})")]
    Range {
        field: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("app {0:?} is listed twice")]
    DuplicateApp(String),
    #[error("network mode \"allowlist\" needs at least one host in network.allow")]
    EmptyAllowlist,
    #[error("network.allow must be empty unless network.mode is \"allowlist\"")]
    AllowWithoutAllowlist,
    #[error("network.allow has {0} hosts; at most {max} are allowed", max = limits::ALLOW_MAX)]
    AllowTooLong(usize),
    #[error(
        "network.allow entry {0:?} is not a host name (e.g. \"github.com\" or \"*.pypi.org\")"
    )]
    AllowHost(String),
    #[error("unknown base {0:?}; known bases: {1}")]
    UnknownBase(String, String),
    #[error("base {base:?} cannot be built: genos-image has no {builder:?} builder (it has {})", BUILDERS.join(", "))]
    BaseNotBuildable { base: String, builder: String },
    #[error("unknown desktop {0:?}; known desktops: {1}")]
    UnknownDesktop(String, String),
    #[error("unknown app {0:?}; see the catalog for known apps")]
    UnknownApp(String),
    #[error("app {app:?} needs a graphical desktop, but desktop is \"none\"")]
    GuiAppWithoutDesktop { app: String },
    #[error("{what} {name:?} is not available on {base}{}", .note.as_deref().map(|n| format!(": {n}")).unwrap_or_default())]
    NotOnBase {
        what: &'static str,
        name: String,
        base: String,
        note: Option<String>,
    },
}

impl Spec {
    /// Parses and validates the JSON form.
    pub fn from_json(text: &str) -> Result<Spec, SpecError> {
        // Read the version first so an old or future spec gets a version error rather than
        // a confusing field error.
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| SpecError::Json(e.to_string()))?;
        if let Some(v) = value.get("version").and_then(|v| v.as_u64()) {
            if v != u64::from(SPEC_VERSION) {
                return Err(SpecError::Version(u32::try_from(v).unwrap_or(u32::MAX)));
            }
        }
        let spec: Spec =
            serde_json::from_value(value).map_err(|e| SpecError::Json(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The JSON Schema (draft 2020-12) of [`Spec`].
    pub fn json_schema() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(Spec)).expect("schema serialises")
    }

    /// Checks everything that needs no catalog.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.version != SPEC_VERSION {
            return Err(SpecError::Version(self.version));
        }
        if !is_valid_name(&self.name) {
            return Err(SpecError::Name(self.name.clone()));
        }
        check_range("vcpus", self.vcpus.into(), &limits::VCPUS)?;
        check_range("memory_mib", self.memory_mib.into(), &limits::MEMORY_MIB)?;
        check_range("disk_gib", self.disk_gib.into(), &limits::DISK_GIB)?;
        check_range(
            "display.width",
            self.display.width.into(),
            &limits::DISPLAY_SIDE,
        )?;
        check_range(
            "display.height",
            self.display.height.into(),
            &limits::DISPLAY_SIDE,
        )?;
        check_range("display.fps", self.display.fps.into(), &limits::FPS)?;
        for (field, v) in [
            ("lifetime.ttl_s", self.lifetime.ttl_s),
            ("lifetime.idle_s", self.lifetime.idle_s),
        ] {
            if let Some(v) = v {
                let r = limits::LIFETIME_S;
                if !r.contains(&v) {
                    return Err(SpecError::Range {
                        field,
                        value: v,
                        min: *r.start(),
                        max: *r.end(),
                    });
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for app in &self.apps {
            if !seen.insert(app.as_str()) {
                return Err(SpecError::DuplicateApp(app.clone()));
            }
        }
        match self.network.mode {
            NetworkMode::Allowlist if self.network.allow.is_empty() => {
                return Err(SpecError::EmptyAllowlist)
            }
            NetworkMode::None | NetworkMode::Nat if !self.network.allow.is_empty() => {
                return Err(SpecError::AllowWithoutAllowlist)
            }
            _ => {}
        }
        if self.network.allow.len() > limits::ALLOW_MAX {
            return Err(SpecError::AllowTooLong(self.network.allow.len()));
        }
        for host in &self.network.allow {
            if !is_valid_allow_host(host) {
                return Err(SpecError::AllowHost(host.clone()));
            }
        }
        Ok(())
    }
}

fn check_range<T: Into<u64> + Copy>(
    field: &'static str,
    value: u64,
    range: &std::ops::RangeInclusive<T>,
) -> Result<(), SpecError> {
    let (min, max) = ((*range.start()).into(), (*range.end()).into());
    if value < min || value > max {
        return Err(SpecError::Range {
            field,
            value,
            min,
            max,
        });
    }
    Ok(())
}

/// True for a DNS-label-like environment name.
pub fn is_valid_name(name: &str) -> bool {
    limits::NAME_LEN.contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// True for a lowercase host name with at least two labels, optionally `*.`-prefixed.
pub fn is_valid_allow_host(host: &str) -> bool {
    let bare = host.strip_prefix("*.").unwrap_or(host);
    let labels: Vec<&str> = bare.split('.').collect();
    bare.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.bytes().any(|b| b.is_ascii_lowercase()))
}

/// The catalog shipped with this build (`configs/catalog.toml`).
pub const EMBEDDED_CATALOG: &str = configs::CATALOG;

/// Bases, desktops and apps a spec may name, with synonyms and Debian package names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub version: u32,
    pub bases: BTreeMap<String, BaseEntry>,
    pub desktops: BTreeMap<String, DesktopEntry>,
    pub apps: BTreeMap<String, AppEntry>,
    /// Third-party repositories named by `on` tables.
    #[serde(default)]
    pub repos: BTreeMap<String, RepoEntry>,
}

/// The root filesystem builders genos-image has. A base naming another builder is refused
/// by [`Catalog::check_spec`]: this is the one fact that makes a base unbuildable, and it
/// is the same on every machine running this build. Whether the base's archive is
/// reachable is found out where the build runs, when it runs.
pub const BUILDERS: &[&str] = &["debootstrap", "dnf", "apk"];

/// One base operating system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseEntry {
    /// Distribution family ("debian", "ubuntu", ...); an unversioned family name means the
    /// entry with `newest = true`. `on` tables of desktops and apps are keyed by family
    /// (or by base name, which wins).
    pub family: String,
    #[serde(default)]
    pub newest: bool,
    /// Other names users say for this exact version ("bookworm", "noble").
    #[serde(default)]
    pub synonyms: Vec<String>,
    /// The genos-image builder for it: one of [`BUILDERS`].
    pub builder: String,
    /// The release as the builder names it: the suite for debootstrap ("noble"), the
    /// release version for dnf ("40"), the branch for apk ("v3.20").
    pub release: String,
    /// Default archive URL; operators override it per base (`[images.mirrors]` in
    /// hostd.toml, `--mirror` of genos-image).
    pub mirror: String,
    /// Archive components (debootstrap: "main", "universe") or repositories (apk: "main",
    /// "community"); empty means the builder's default.
    #[serde(default)]
    pub components: Vec<String>,
    /// Further suites of the same archive in the image's package sources ("noble-updates").
    #[serde(default)]
    pub extra_suites: Vec<String>,
    /// Archive signing keys on the build host: a keyring file (debootstrap), a key file
    /// (dnf) or a directory of keys (apk). `None` uses the host's default (Debian's own
    /// keyring for Debian bases).
    #[serde(default)]
    pub keyring: Option<String>,
    /// The Debian package that installs `keyring` on the build host, for error messages.
    #[serde(default)]
    pub keyring_package: Option<String>,
    /// debootstrap script to use (in /usr/share/debootstrap/scripts) when the host's
    /// debootstrap predates the suite, e.g. "gutsy" for every Ubuntu release.
    #[serde(default)]
    pub debootstrap_script: Option<String>,
}

impl BaseEntry {
    /// True when this build of genos-image has the base's builder.
    pub fn buildable(&self) -> bool {
        BUILDERS.contains(&self.builder.as_str())
    }

    /// True when the base uses Debian's package names (every debootstrap base), so the
    /// catalog's default `packages` apply unless an `on` table says otherwise.
    pub fn uses_debian_names(&self) -> bool {
        self.builder == "debootstrap"
    }
}

/// Packages installing a desktop or an app on one family or base (an `on` table entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageSet {
    /// Package names in that distribution; empty when it does not package the thing.
    pub packages: Vec<String>,
    /// A catalog `[repos]` entry the packages come from instead of the base's archive.
    #[serde(default)]
    pub repo: Option<String>,
    /// The program a kiosk runs when it is not the first package's name.
    #[serde(default)]
    pub command: Option<String>,
    /// Why `packages` is empty, when it is.
    #[serde(default)]
    pub note: Option<String>,
}

/// A third-party APT repository some package sets come from (e.g. Mozilla's, for Firefox
/// on Ubuntu, which ships it only as a snap).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoEntry {
    pub url: String,
    pub suite: String,
    pub components: Vec<String>,
    /// Where the repository's signing key is downloaded from during the build.
    pub key_url: String,
    /// The key's OpenPGP fingerprint (40 hex digits); a downloaded key with another
    /// fingerprint fails the build.
    pub key_fingerprint: String,
    /// `Pin: origin` value giving this repository's packages priority over the base's.
    #[serde(default)]
    pub pin_origin: Option<String>,
}

/// One desktop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesktopEntry {
    #[serde(default)]
    pub synonyms: Vec<String>,
    /// Whether it draws a graphical session (false only for "none").
    pub graphical: bool,
    /// Debian packages installing it (also used by other Debian-named bases).
    pub packages: Vec<String>,
    /// App names this desktop brings anyway (never repeated in `apps`).
    #[serde(default)]
    pub provides: Vec<String>,
    /// Package names per family or base where they differ from Debian's.
    #[serde(default)]
    pub on: BTreeMap<String, PackageSet>,
}

/// One app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppEntry {
    #[serde(default)]
    pub synonyms: Vec<String>,
    /// Needs a graphical desktop.
    pub gui: bool,
    /// Debian packages installing it (empty when Debian does not package it).
    pub packages: Vec<String>,
    /// Why `packages` is empty, when it is.
    #[serde(default)]
    pub note: Option<String>,
    /// Package names per family or base where they differ from Debian's.
    #[serde(default)]
    pub on: BTreeMap<String, PackageSet>,
}

/// What a spec installs on its base: packages (desktop first, then apps, deduplicated),
/// the extra repositories they come from, and the program a kiosk shows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Install {
    pub packages: Vec<String>,
    /// `[repos]` names, in first-use order.
    pub repos: Vec<String>,
    /// The kiosk's program (the first app's `command`, else its first package).
    pub first_app_command: Option<String>,
}

/// Why a catalog could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog is not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("catalog version {0} is not supported (expected 1)")]
    Version(u32),
    #[error("catalog: {0}")]
    Invalid(String),
}

impl Catalog {
    /// Parses and checks a catalog.
    pub fn from_toml(text: &str) -> Result<Catalog, CatalogError> {
        let cat: Catalog = toml::from_str(text)?;
        if cat.version != 1 {
            return Err(CatalogError::Version(cat.version));
        }
        cat.check_consistency()?;
        Ok(cat)
    }

    /// The catalog compiled into this build.
    pub fn embedded() -> Catalog {
        Catalog::from_toml(EMBEDDED_CATALOG).expect("embedded catalog is valid (checked by a test)")
    }

    fn check_consistency(&self) -> Result<(), CatalogError> {
        let invalid = |m: String| Err(CatalogError::Invalid(m));
        let mut families: BTreeMap<&str, usize> = BTreeMap::new();
        for b in self.bases.values() {
            *families.entry(&b.family).or_default() += usize::from(b.newest);
        }
        if let Some((f, _)) = families.iter().find(|(_, n)| **n > 1) {
            return invalid(format!("family {f} has more than one newest base"));
        }
        if !self.desktops.contains_key("none") {
            return invalid("desktop \"none\" is missing".into());
        }
        for (name, d) in &self.desktops {
            if let Some(p) = d.provides.iter().find(|p| !self.apps.contains_key(*p)) {
                return invalid(format!("desktop {name} provides unknown app {p}"));
            }
        }
        for (name, a) in &self.apps {
            if a.packages.is_empty() && a.note.is_none() {
                return invalid(format!("app {name} has no packages and no note"));
            }
        }
        let tables = self
            .desktops
            .iter()
            .map(|(n, d)| (n, &d.on))
            .chain(self.apps.iter().map(|(n, a)| (n, &a.on)));
        for (name, on) in tables {
            for (key, set) in on {
                if !self.bases.contains_key(key) && !families.contains_key(key.as_str()) {
                    return invalid(format!("{name}: `on.{key}` names no base or family"));
                }
                if set.packages.is_empty() && set.note.is_none() {
                    return invalid(format!("{name}: `on.{key}` has no packages and no note"));
                }
                if let Some(r) = set.repo.as_ref().filter(|r| !self.repos.contains_key(*r)) {
                    return invalid(format!("{name}: `on.{key}` names unknown repo {r}"));
                }
            }
        }
        for (name, r) in &self.repos {
            if r.key_fingerprint.len() != 40
                || !r.key_fingerprint.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return invalid(format!("repo {name}: key_fingerprint is not 40 hex digits"));
            }
        }
        Ok(())
    }

    /// The package set of a desktop or app on `base`: the base's own `on` entry, else its
    /// family's, else the Debian default for Debian-named bases. `None`: nothing maps it.
    fn resolve<'a>(
        &self,
        base_name: &str,
        base: &BaseEntry,
        default: &'a [String],
        default_note: Option<&'a str>,
        on: &'a BTreeMap<String, PackageSet>,
    ) -> Option<Resolved<'a>> {
        if let Some(set) = on.get(base_name).or_else(|| on.get(&base.family)) {
            return Some(Resolved {
                packages: &set.packages,
                repo: set.repo.as_deref(),
                command: set.command.as_deref(),
                note: set.note.as_deref(),
                explicit: true,
            });
        }
        // Debian-named bases take the default; so does a thing no distribution packages
        // (an empty default with a note, e.g. VS Code), which is then not installed anywhere.
        (base.uses_debian_names() || default.is_empty()).then_some(Resolved {
            packages: default,
            repo: None,
            command: None,
            note: default_note,
            explicit: false,
        })
    }

    /// Checks that every name in `spec` is known, the base has a builder, GUI apps have a
    /// desktop and the desktop and apps are packaged for the base. Call after
    /// [`Spec::validate`].
    pub fn check_spec(&self, spec: &Spec) -> Result<(), SpecError> {
        self.install_for(spec).map(|_| ())
    }

    /// What `spec` installs on its base, after the checks of [`Catalog::check_spec`].
    pub fn install_for(&self, spec: &Spec) -> Result<Install, SpecError> {
        let base = self.bases.get(&spec.base).ok_or_else(|| {
            SpecError::UnknownBase(spec.base.clone(), join_keys(self.bases.keys()))
        })?;
        if !base.buildable() {
            return Err(SpecError::BaseNotBuildable {
                base: spec.base.clone(),
                builder: base.builder.clone(),
            });
        }
        let desktop = self.desktops.get(&spec.desktop).ok_or_else(|| {
            SpecError::UnknownDesktop(spec.desktop.clone(), join_keys(self.desktops.keys()))
        })?;
        let not_on = |what, name: &str, note: Option<&str>| SpecError::NotOnBase {
            what,
            name: name.to_string(),
            base: spec.base.clone(),
            note: note.map(str::to_string),
        };
        let mut sets = Vec::new();
        let d = self
            .resolve(&spec.base, base, &desktop.packages, None, &desktop.on)
            .filter(|r| !(r.explicit && r.packages.is_empty()))
            .ok_or_else(|| {
                let note = desktop.on.get(&spec.base).or(desktop.on.get(&base.family));
                not_on(
                    "desktop",
                    &spec.desktop,
                    note.and_then(|s| s.note.as_deref()),
                )
            })?;
        sets.push(d);
        let mut first_app_command = None;
        for app in &spec.apps {
            let entry = self
                .apps
                .get(app)
                .ok_or_else(|| SpecError::UnknownApp(app.clone()))?;
            if entry.gui && !desktop.graphical {
                return Err(SpecError::GuiAppWithoutDesktop { app: app.clone() });
            }
            let r = self
                .resolve(
                    &spec.base,
                    base,
                    &entry.packages,
                    entry.note.as_deref(),
                    &entry.on,
                )
                .ok_or_else(|| not_on("app", app, None))?;
            if r.explicit && r.packages.is_empty() {
                return Err(not_on("app", app, r.note));
            }
            if first_app_command.is_none() {
                first_app_command = r
                    .command
                    .or(r.packages.first().map(String::as_str))
                    .map(str::to_string);
            }
            sets.push(r);
        }
        let mut install = Install {
            first_app_command,
            ..Install::default()
        };
        for set in sets {
            for p in set.packages {
                if !install.packages.contains(p) {
                    install.packages.push(p.clone());
                }
            }
            if let Some(repo) = set.repo {
                if !install.repos.iter().any(|r| r == repo) {
                    install.repos.push(repo.to_string());
                }
            }
        }
        Ok(install)
    }
}

/// A resolved `on` entry or default.
struct Resolved<'a> {
    packages: &'a [String],
    repo: Option<&'a str>,
    command: Option<&'a str>,
    note: Option<&'a str>,
    /// From an `on` table (an empty list there means "not on this base").
    explicit: bool,
}

fn join_keys<'a>(keys: impl Iterator<Item = &'a String>) -> String {
    keys.map(String::as_str).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Spec {
        Spec {
            version: 1,
            name: "firefox-xfce".into(),
            base: "debian-12".into(),
            desktop: "xfce".into(),
            apps: vec!["firefox".into()],
            vcpus: 2,
            memory_mib: 4096,
            disk_gib: 16,
            display: Display {
                width: 1920,
                height: 1080,
                fps: 30,
            },
            network: Network {
                mode: NetworkMode::Nat,
                allow: vec![],
            },
            lifetime: Lifetime {
                ttl_s: Some(7200),
                idle_s: None,
            },
            persistence: Persistence::Ephemeral,
            assumptions: vec![],
        }
    }

    #[test]
    fn json_uses_the_documented_field_names() {
        let v = serde_json::to_value(sample()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in [
            "version",
            "name",
            "base",
            "desktop",
            "apps",
            "vcpus",
            "memory_mib",
            "disk_gib",
            "display",
            "network",
            "lifetime",
            "persistence",
            "assumptions",
        ] {
            assert!(keys.contains(&k), "missing {k}");
        }
        assert_eq!(v["network"]["mode"], "nat");
        assert_eq!(v["persistence"], "ephemeral");
        assert_eq!(v["lifetime"]["idle_s"], serde_json::Value::Null);
    }

    #[test]
    fn json_round_trips() {
        let text = serde_json::to_string(&sample()).unwrap();
        assert_eq!(Spec::from_json(&text).unwrap(), sample());
    }

    #[test]
    fn unknown_field_is_rejected() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["colour"] = "blue".into();
        let err = Spec::from_json(&v.to_string()).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn future_version_is_rejected_with_version_error() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["version"] = 2.into();
        v["newfield"] = 1.into();
        assert_eq!(Spec::from_json(&v.to_string()), Err(SpecError::Version(2)));
    }

    #[test]
    fn out_of_range_memory_names_field_and_bounds() {
        let mut s = sample();
        s.memory_mib = 64;
        let err = s.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "memory_mib = 64 is out of range (128..=262144)"
        );
    }

    #[test]
    fn allowlist_rules_are_enforced() {
        let mut s = sample();
        s.network = Network {
            mode: NetworkMode::Allowlist,
            allow: vec![],
        };
        assert_eq!(s.validate(), Err(SpecError::EmptyAllowlist));
        s.network = Network {
            mode: NetworkMode::Nat,
            allow: vec!["github.com".into()],
        };
        assert_eq!(s.validate(), Err(SpecError::AllowWithoutAllowlist));
        s.network = Network {
            mode: NetworkMode::Allowlist,
            allow: vec!["http://x".into()],
        };
        assert_eq!(s.validate(), Err(SpecError::AllowHost("http://x".into())));
        s.network = Network {
            mode: NetworkMode::Allowlist,
            allow: vec!["*.pypi.org".into()],
        };
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(is_valid_name("dev-box-2"));
        assert!(!is_valid_name("Dev"));
        assert!(!is_valid_name("-x"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name(&"a".repeat(64)));
    }

    #[test]
    fn duplicate_app_is_rejected() {
        let mut s = sample();
        s.apps.push("firefox".into());
        assert_eq!(s.validate(), Err(SpecError::DuplicateApp("firefox".into())));
    }

    #[test]
    fn schema_describes_every_field_and_the_enums() {
        let schema = Spec::json_schema();
        let props = schema["properties"].as_object().unwrap();
        assert_eq!(props.len(), 13);
        let text = schema.to_string();
        for needle in ["\"allowlist\"", "\"persistent\"", "memory_mib", "ttl_s"] {
            assert!(text.contains(needle), "schema lacks {needle}");
        }
    }

    #[test]
    fn schema_file_in_docs_matches_the_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/spec.schema.json");
        if std::env::var_os("GENOS_BLESS").is_some() {
            let text = serde_json::to_string_pretty(&Spec::json_schema()).unwrap() + "\n";
            std::fs::write(path, text).unwrap();
        }
        let on_disk: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(path).expect("docs/spec.schema.json exists"),
        )
        .unwrap();
        assert_eq!(
            on_disk,
            Spec::json_schema(),
            "docs/spec.schema.json is stale: regenerate with `GENOS_BLESS=1 cargo test -p genos-proto schema_file`"
        );
    }

    #[test]
    fn embedded_catalog_loads_and_has_required_entries() {
        let cat = Catalog::embedded();
        for b in [
            "debian-12",
            "ubuntu-22.04",
            "ubuntu-24.04",
            "fedora-40",
            "alpine-3.20",
        ] {
            assert!(cat.bases.contains_key(b), "{b}");
        }
        assert!(cat.bases.values().all(BaseEntry::buildable));
        for d in ["none", "kiosk", "xfce", "gnome", "kde", "lxqt"] {
            assert!(cat.desktops.contains_key(d), "{d}");
        }
        for a in [
            "firefox",
            "chromium",
            "vscode",
            "libreoffice",
            "gimp",
            "inkscape",
            "krita",
            "blender",
            "vlc",
            "thunderbird",
            "terminal",
            "python",
            "nodejs",
            "git",
            "docker",
            "audacity",
        ] {
            assert!(cat.apps.contains_key(a), "{a}");
        }
    }

    #[test]
    fn check_spec_refuses_a_base_without_a_builder_and_names_the_builders() {
        let mut cat = Catalog::embedded();
        cat.bases.get_mut("fedora-40").unwrap().builder = "pacman".into();
        let mut s = sample();
        s.base = "fedora-40".into();
        let err = cat.check_spec(&s).unwrap_err();
        assert_eq!(
            err.to_string(),
            "base \"fedora-40\" cannot be built: genos-image has no \"pacman\" builder (it has debootstrap, dnf, apk)"
        );
    }

    #[test]
    fn every_catalog_base_is_buildable_with_a_desktop_and_firefox_or_says_why_not() {
        let cat = Catalog::embedded();
        for base in cat.bases.keys() {
            let mut s = sample();
            s.base = base.clone();
            match cat.install_for(&s) {
                Ok(install) => assert!(install.packages.len() >= 2, "{base}: {install:?}"),
                Err(e) => panic!("{base}: {e}"),
            }
        }
    }

    #[test]
    fn firefox_on_ubuntu_comes_from_mozillas_repository_as_a_deb() {
        let cat = Catalog::embedded();
        let mut s = sample();
        s.base = "ubuntu-24.04".into();
        let install = cat.install_for(&s).unwrap();
        assert!(install.packages.contains(&"firefox".to_string()));
        assert!(!install.packages.contains(&"firefox-esr".to_string()));
        assert_eq!(install.repos, ["mozilla"]);
        assert_eq!(install.first_app_command.as_deref(), Some("firefox"));
    }

    #[test]
    fn package_names_follow_the_base_family() {
        let cat = Catalog::embedded();
        let mut s = sample();
        s.apps = vec!["docker".into(), "vim".into()];
        s.desktop = "none".into();
        let on = |base: &str| {
            let mut s = s.clone();
            s.base = base.into();
            cat.install_for(&s).unwrap().packages
        };
        assert_eq!(on("debian-12"), ["docker.io", "vim"]);
        assert_eq!(on("ubuntu-22.04"), ["docker.io", "vim"]);
        assert_eq!(on("fedora-40"), ["moby-engine", "vim-enhanced"]);
        assert_eq!(on("alpine-3.20"), ["docker", "vim"]);
    }

    #[test]
    fn an_app_a_base_does_not_package_is_refused_with_the_note() {
        let cat = Catalog::embedded();
        let mut s = sample();
        s.base = "ubuntu-24.04".into();
        s.apps = vec!["chromium".into()];
        let err = cat.check_spec(&s).unwrap_err();
        assert!(matches!(err, SpecError::NotOnBase { .. }), "{err}");
        assert!(err.to_string().contains("snap"), "{err}");
    }

    #[test]
    fn an_app_without_a_mapping_on_a_non_debian_base_is_refused() {
        let mut cat = Catalog::embedded();
        cat.apps.get_mut("htop").unwrap().on.clear();
        let mut s = sample();
        s.base = "alpine-3.20".into();
        s.desktop = "none".into();
        s.apps = vec!["htop".into()];
        assert_eq!(
            cat.check_spec(&s).unwrap_err().to_string(),
            "app \"htop\" is not available on alpine-3.20"
        );
    }

    #[test]
    fn check_spec_refuses_gui_app_without_desktop() {
        let cat = Catalog::embedded();
        let mut s = sample();
        s.desktop = "none".into();
        assert_eq!(
            cat.check_spec(&s),
            Err(SpecError::GuiAppWithoutDesktop {
                app: "firefox".into()
            })
        );
    }

    #[test]
    fn install_lists_desktop_then_apps() {
        let cat = Catalog::embedded();
        let pkgs = cat.install_for(&sample()).unwrap().packages;
        assert!(pkgs.contains(&"firefox-esr".to_string()));
        assert!(
            pkgs.iter().position(|p| p == "firefox-esr") > pkgs.iter().position(|p| p == "xfce4")
        );
    }

    #[test]
    fn catalog_with_an_on_table_for_an_unknown_family_is_rejected() {
        let text = r#"
version = 1
[bases.x-1]
family = "x"
builder = "debootstrap"
release = "x"
mirror = "http://example.org/x"
[desktops.none]
graphical = false
packages = []
[apps.vim]
gui = false
packages = ["vim"]
on.gentoo = { packages = ["app-editors/vim"] }
"#;
        let err = Catalog::from_toml(text).unwrap_err();
        assert!(
            err.to_string()
                .contains("`on.gentoo` names no base or family"),
            "{err}"
        );
    }
}
