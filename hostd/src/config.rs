//! hostd configuration: `configs/hostd.toml`, with the same file built in as the defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::composer::Defaults;

/// The documented configuration file, also the source of every default.
pub const EMBEDDED_CONFIG: &str = configs::HOSTD;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("no state directory: set --state-dir, state_dir, XDG_STATE_HOME or HOME")]
    NoStateDir,
    #[error("catalog {path}: {source}")]
    Catalog {
        path: PathBuf,
        #[source]
        source: proto::spec::CatalogError,
    },
    #[error(
        "[images.{table}] names base {base:?}, which the catalog does not have (it has {known})"
    )]
    ImagesBase {
        table: &'static str,
        base: String,
        known: String,
    },
    #[error("[images.mirrors] {base} = {url:?} is not an http://, https:// or file:// URL")]
    MirrorUrl { base: String, url: String },
    #[error("encoder_threads must be 0 (automatic) to 4, not {0}")]
    EncoderThreads(u16),
    #[error("[stream] tls_cert and tls_key go together: set both or neither")]
    TlsPair,
    #[error("[metrics] listen must be \"\" (off) or an address like 127.0.0.1:9100, not {0:?}")]
    MetricsListen(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub state_dir: String,
    #[serde(default)]
    pub catalog: String,
    pub admin: AdminConfig,
    pub capacity: CapacityConfig,
    pub images: ImagesConfig,
    pub vmm: VmmConfig,
    pub jail: JailConfig,
    pub reaper: ReaperConfig,
    #[serde(default)]
    pub stream: StreamConfig,
    pub composer: Defaults,
    pub llm: crate::llm::LlmConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
}

/// `[fleet]`: membership of a fleet of hosts over etcd (docs/fleet.md). Off (hostd works
/// alone) while `etcd` is empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// etcd client endpoints, e.g. `["http://10.0.0.1:2379"]`; empty: no fleet.
    pub etcd: Vec<String>,
    /// This node's name in the fleet (unique; letters, digits, `.`, `_`, `-`, at most 63);
    /// empty: the host name.
    pub node: String,
    /// Where viewers reach this node's stream server (`host:port`); empty:
    /// `<node>:<stream port>`.
    pub public_address: String,
    /// Seconds this node's lease lives without a keep-alive: how long until the fleet
    /// considers a silent node gone.
    pub lease_ttl_s: u64,
    /// Key prefix in etcd.
    pub prefix: String,
    /// Operator labels placement can ask for (`zone = "a"`, `gpu = "false"`).
    pub labels: BTreeMap<String, String>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            etcd: Vec::new(),
            node: String::new(),
            public_address: String::new(),
            lease_ttl_s: 10,
            prefix: "/genos/fleet/".into(),
            labels: BTreeMap::new(),
        }
    }
}

/// `[metrics]`: the Prometheus text of the admin socket's `/metrics`, also over plain HTTP
/// on a TCP address (`hostd::orchestrator::serve_metrics`). Off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the listener (`"127.0.0.1:9100"`); `""`: none.
    #[serde(default)]
    pub listen: MetricsListen,
}

/// `[metrics] listen`: an address, or `""` for no listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct MetricsListen(pub Option<std::net::SocketAddr>);

impl TryFrom<String> for MetricsListen {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, ConfigError> {
        if s.trim().is_empty() {
            return Ok(Self(None));
        }
        s.trim()
            .parse()
            .map(|a| Self(Some(a)))
            .map_err(|_| ConfigError::MetricsListen(s))
    }
}

/// Where viewers connect (QUIC) to see environments' screens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Whether hostd streams graphical environments at all.
    pub enabled: bool,
    /// UDP address the stream server listens on.
    pub listen: std::net::SocketAddr,
    /// Frame rate the shared encoder of each environment aims for.
    pub fps: f32,
    /// openh264 tool set of each environment's encoder.
    pub encoder: EncoderUsage,
    /// Threads per encoder.
    pub encoder_threads: EncoderThreads,
    /// PEM certificate chain the browser page (HTTPS on the stream port's TCP side) is served
    /// with; unset: hostd's self-signed stream identity. With `tls_key`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Host name (or address) put in viewers' links; unset: the listen address (loopback for
    /// an unspecified one).
    #[serde(default)]
    pub public_host: Option<String>,
}

impl StreamConfig {
    /// The operator's certificate and key for the browser page, if configured.
    pub fn tls_files(&self) -> Result<Option<(&std::path::Path, &std::path::Path)>, ConfigError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Ok(Some((c, k))),
            (None, None) => Ok(None),
            _ => Err(ConfigError::TlsPair),
        }
    }
}

/// `[stream] encoder_threads`: 1..=4, or 0 to let the encoder choose by picture size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u16")]
pub struct EncoderThreads(u16);

impl EncoderThreads {
    /// The configured count, `None` for automatic.
    pub fn fixed(self) -> Option<u16> {
        (self.0 != 0).then_some(self.0)
    }
}

impl TryFrom<u16> for EncoderThreads {
    type Error = ConfigError;
    fn try_from(n: u16) -> Result<Self, ConfigError> {
        if n <= 4 {
            Ok(Self(n))
        } else {
            Err(ConfigError::EncoderThreads(n))
        }
    }
}

/// `[stream] encoder`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderUsage {
    Camera,
    Screen,
}

impl From<EncoderUsage> for encoder::Usage {
    fn from(u: EncoderUsage) -> Self {
        match u {
            EncoderUsage::Camera => encoder::Usage::CameraRealTime,
            EncoderUsage::Screen => encoder::Usage::ScreenContentRealTime,
        }
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 4433)),
            fps: 30.0,
            encoder: EncoderUsage::Screen,
            encoder_threads: EncoderThreads(0),
            tls_cert: None,
            tls_key: None,
            public_host: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub group: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub reserve_memory_mib: u64,
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesConfig {
    pub builder: String,
    pub kernel: String,
    pub initramfs: String,
    pub build_rootfs: bool,
    /// The static genos-agent for the initramfs and root filesystems hostd builds; empty:
    /// none.
    pub agent: String,
    /// Archive per catalog base instead of the catalog's (an operator's local mirror),
    /// given to `genos-image rootfs --mirror`.
    #[serde(default)]
    pub mirrors: BTreeMap<String, String>,
    /// Archive signing keys per catalog base on this host, given as `--keyring`.
    #[serde(default)]
    pub keyrings: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmConfig {
    pub binary: String,
    pub api_timeout_s: u64,
    pub boot_timeout_s: u64,
    /// Seconds a desktop's session has to start once its system is up (within
    /// `boot_timeout_s` as a whole).
    pub session_timeout_s: u64,
    pub cmdline: String,
    /// `auto`, `host` or `baseline` (vmm_api::CpuTemplate); `auto` is resolved per VM from
    /// the host's KVM (orchestrator::vm_config).
    pub cpu_template: String,
    /// Extra arguments appended to every genos-vmm command line (tests, debugging).
    pub extra_args: Vec<String>,
    /// What makes an environment ready.
    pub ready: ReadyWhen,
}

/// What makes an environment `ready` (`[vmm] ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadyWhen {
    /// The guest agent reports its stage (`system`: the init system reached its target).
    Agent,
    /// The guest's boot-timer write (the initramfs ran): guests without an agent, such as
    /// the test suite's tiny guests.
    Boot,
}

/// When to start VMMs through `genos-jailer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JailMode {
    /// When hostd runs as root and the jailer binary is found.
    Auto,
    /// Always; an environment fails when the jail cannot be used.
    Always,
    /// Never: genos-vmm runs as hostd's own user, unconfined.
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    pub jailer: JailMode,
    /// `genos-jailer` binary; empty = beside `vmm.binary`, else on PATH.
    pub binary: String,
    /// Jail directories; empty = `STATE_DIR/jail`.
    pub chroot_base: String,
    /// Environment slot N runs as uid `uid_base + N`, gid `gid_base + N`.
    pub uid_base: u32,
    pub gid_base: u32,
    /// Number of slots (concurrently jailed environments).
    pub slots: u32,
    /// Parent cgroup of every VMM's cgroup.
    pub parent_cgroup: String,
    /// Memory limit = guest memory + this much for the VMM itself.
    pub vmm_overhead_mib: u64,
    /// Task limit of each VMM (threads included).
    pub pids_max: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReaperConfig {
    pub interval_s: u64,
}

impl Config {
    /// The built-in defaults.
    pub fn embedded() -> Config {
        toml::from_str(EMBEDDED_CONFIG).expect("embedded hostd.toml is valid (checked by a test)")
    }

    /// Reads `path`, taking every key it leaves out from the built-in defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    /// Parses a (possibly partial) file over the defaults.
    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        let mut base: toml::Table = toml::from_str(EMBEDDED_CONFIG)?;
        let over: toml::Table = toml::from_str(text)?;
        merge(&mut base, over);
        toml::Value::Table(base).try_into()
    }

    /// The catalog named by `catalog`, or the built-in one.
    pub fn load_catalog(&self) -> Result<proto::spec::Catalog, ConfigError> {
        if self.catalog.is_empty() {
            return Ok(proto::spec::Catalog::embedded());
        }
        let path = PathBuf::from(&self.catalog);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        proto::spec::Catalog::from_toml(&text)
            .map_err(|source| ConfigError::Catalog { path, source })
    }

    /// Checks `[images.mirrors]` and `[images.keyrings]` against the catalog, so a typo in
    /// a base name is an error at start, not a mirror silently unused.
    pub fn check_images(&self, catalog: &proto::spec::Catalog) -> Result<(), ConfigError> {
        for (table, map) in [
            ("mirrors", &self.images.mirrors),
            ("keyrings", &self.images.keyrings),
        ] {
            if let Some(base) = map.keys().find(|b| !catalog.bases.contains_key(*b)) {
                return Err(ConfigError::ImagesBase {
                    table,
                    base: base.clone(),
                    known: catalog.bases.keys().cloned().collect::<Vec<_>>().join(", "),
                });
            }
        }
        for (base, url) in &self.images.mirrors {
            if !["http://", "https://", "file://"]
                .iter()
                .any(|scheme| url.starts_with(scheme))
            {
                return Err(ConfigError::MirrorUrl {
                    base: base.clone(),
                    url: url.clone(),
                });
            }
        }
        Ok(())
    }

    /// The `genos-image` arguments building `base`'s root filesystem from `spec` into
    /// `out`: this host's catalog, and the base's mirror and keys when configured.
    pub fn rootfs_args(
        &self,
        base: &str,
        spec: &str,
        out: &str,
        agent: Option<&Path>,
    ) -> Vec<String> {
        let mut args: Vec<String> = ["rootfs", "--spec", spec, "--out", out]
            .map(String::from)
            .into();
        if let Some(agent) = agent {
            args.extend(["--agent".to_string(), agent.display().to_string()]);
        }
        if !self.catalog.is_empty() {
            args.extend(["--catalog".to_string(), self.catalog.clone()]);
        }
        if let Some(mirror) = self.images.mirrors.get(base) {
            args.extend(["--mirror".to_string(), mirror.clone()]);
        }
        if let Some(keyring) = self.images.keyrings.get(base) {
            args.extend(["--keyring".to_string(), keyring.clone()]);
        }
        args
    }

    /// The state directory: `--state-dir`, then `state_dir`, then the XDG default.
    pub fn state_dir(&self, flag: Option<&Path>) -> Result<PathBuf, ConfigError> {
        if let Some(p) = flag {
            return Ok(p.into());
        }
        if !self.state_dir.is_empty() {
            return Ok(self.state_dir.clone().into());
        }
        default_state_dir().ok_or(ConfigError::NoStateDir)
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// `$XDG_STATE_HOME/genos`, else `~/.local/state/genos`.
pub fn default_state_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("genos"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".local/state/genos"))
}

/// Where the CLI looks for the admin socket: `--socket`, `GENOS_SOCKET`, the default state dir.
pub fn admin_socket_path(flag: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = flag {
        return Some(p.into());
    }
    if let Some(s) = std::env::var_os("GENOS_SOCKET").filter(|s| !s.is_empty()) {
        return Some(s.into());
    }
    default_state_dir().map(|d| d.join("admin.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_listener_is_off_by_default_and_takes_an_address() {
        assert_eq!(Config::embedded().metrics.listen, MetricsListen(None));

        let on = Config::from_toml("[metrics]\nlisten = \"127.0.0.1:9100\"\n").unwrap();
        let bad = Config::from_toml("[metrics]\nlisten = \"localhost\"\n").unwrap_err();

        assert_eq!(
            on.metrics.listen,
            MetricsListen(Some(([127, 0, 0, 1], 9100).into()))
        );
        assert!(
            bad.to_string().contains("[metrics] listen must be"),
            "{bad}"
        );
    }

    #[test]
    fn a_bases_mirror_and_keys_are_passed_to_genos_image() {
        let c = Config::from_toml(
            "[images.mirrors]\n\"ubuntu-24.04\" = \"http://mirror.lan/ubuntu\"\n\
             [images.keyrings]\n\"ubuntu-24.04\" = \"/srv/keys/ubuntu.gpg\"\n",
        )
        .unwrap();
        c.check_images(&proto::spec::Catalog::embedded()).unwrap();

        let ubuntu = c.rootfs_args("ubuntu-24.04", "S", "O", None);
        let debian = c.rootfs_args("debian-12", "S", "O", Some(Path::new("/opt/genos-agent")));

        assert_eq!(
            ubuntu,
            [
                "rootfs",
                "--spec",
                "S",
                "--out",
                "O",
                "--mirror",
                "http://mirror.lan/ubuntu",
                "--keyring",
                "/srv/keys/ubuntu.gpg"
            ]
        );
        assert_eq!(
            debian,
            [
                "rootfs",
                "--spec",
                "S",
                "--out",
                "O",
                "--agent",
                "/opt/genos-agent"
            ]
        );
    }

    #[test]
    fn a_mirror_for_an_unknown_base_or_without_a_scheme_is_refused() {
        let catalog = proto::spec::Catalog::embedded();
        let typo =
            Config::from_toml("[images.mirrors]\n\"ubuntu-24.4\" = \"http://m/u\"\n").unwrap();
        let bare =
            Config::from_toml("[images.mirrors]\n\"fedora-40\" = \"mirror.lan/fedora\"\n").unwrap();

        let typo = typo.check_images(&catalog).unwrap_err().to_string();
        let bare = bare.check_images(&catalog).unwrap_err().to_string();

        assert!(
            typo.starts_with("[images.mirrors] names base \"ubuntu-24.4\""),
            "{typo}"
        );
        assert!(
            bare.contains("is not an http://, https:// or file:// URL"),
            "{bare}"
        );
    }

    #[test]
    fn embedded_config_parses_and_matches_composer_defaults() {
        let c = Config::embedded();
        assert_eq!(c.composer, Defaults::default());
        assert_eq!(c.admin.group, "genos");
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::from_toml("[capacity]\ncpu_overcommit = 2.0\n").unwrap();
        assert_eq!(c.capacity.cpu_overcommit, 2.0);
        assert_eq!(c.capacity.memory_overcommit, 1.0);
        assert_eq!(c.vmm.binary, "genos-vmm");
        assert_eq!(c.jail.jailer, JailMode::Auto);
    }

    #[test]
    fn jail_mode_reads_its_three_values_and_refuses_others() {
        let c = Config::from_toml("[jail]\njailer = \"never\"\n").unwrap();
        assert_eq!(c.jail.jailer, JailMode::Never);
        assert_eq!(c.jail.uid_base, 64000);
        let err = Config::from_toml("[jail]\njailer = \"sometimes\"\n").unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
    }

    #[test]
    fn stream_tls_files_and_public_host_parse_and_a_half_pair_is_refused() {
        let c = Config::from_toml(
            "[stream]\ntls_cert = \"/etc/genos/web.pem\"\ntls_key = \"/etc/genos/web.key\"\npublic_host = \"genos.example\"\n",
        )
        .unwrap();
        let (cert, key) = c.stream.tls_files().unwrap().unwrap();
        assert_eq!(cert, std::path::Path::new("/etc/genos/web.pem"));
        assert_eq!(key, std::path::Path::new("/etc/genos/web.key"));
        assert_eq!(c.stream.public_host.as_deref(), Some("genos.example"));
        let embedded = Config::embedded();
        assert!(embedded.stream.tls_files().unwrap().is_none());
        assert_eq!(embedded.stream.public_host, None);
        let half = Config::from_toml("[stream]\ntls_cert = \"/c.pem\"\n").unwrap();
        assert!(matches!(half.stream.tls_files(), Err(ConfigError::TlsPair)));
    }

    #[test]
    fn stream_encoder_settings_parse_and_out_of_range_threads_are_refused() {
        let c = Config::from_toml("[stream]\nencoder = \"screen\"\nencoder_threads = 2\n").unwrap();
        assert_eq!(c.stream.encoder, EncoderUsage::Screen);
        assert_eq!(c.stream.encoder_threads.fixed(), Some(2));
        assert_eq!(Config::embedded().stream.encoder_threads.fixed(), None);
        let err = Config::from_toml("[stream]\nencoder_threads = 9\n").unwrap_err();
        assert!(
            err.to_string().contains("0 (automatic) to 4, not 9"),
            "{err}"
        );
        let err = Config::from_toml("[stream]\nencoder = \"film\"\n").unwrap_err();
        assert!(err.to_string().contains("film"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::from_toml("[vmm]\nbinaryy = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("binaryy"), "{err}");
    }

    #[test]
    fn the_default_cpu_template_is_auto_and_names_a_template() {
        let c = Config::embedded();
        assert_eq!(c.vmm.cpu_template, "auto");
        assert_eq!(
            c.vmm.cpu_template.parse::<vmm_api::CpuTemplate>().unwrap(),
            vmm_api::CpuTemplate::Auto
        );
    }

    #[test]
    fn state_dir_flag_wins() {
        let c = Config::embedded();
        assert_eq!(
            c.state_dir(Some(Path::new("/x"))).unwrap(),
            PathBuf::from("/x")
        );
    }
}
