//! The one VM configuration of an environment (`vmm_api::VmConfig`), from its spec, images
//! and host settings.

use std::path::PathBuf;

use proto::spec::Spec;
use vmm_api::config::KvmHostFacts;
use vmm_api::{
    CpuTemplate, DiskConfig, DisplaySize, NetConfig, SerialConfig, VmConfig, VsockConfig,
};

use super::images::Images;

/// Why an environment's spec and settings make no valid VM configuration.
#[derive(Debug, thiserror::Error)]
pub(super) enum VmConfigError {
    #[error("{field} {value} is out of range for genos-vmm")]
    OutOfRange { field: &'static str, value: u32 },
    #[error("[vmm]")]
    CpuTemplate(#[source] vmm_api::ConfigError),
    #[error("VM configuration")]
    Invalid(#[source] vmm_api::ConfigError),
}

/// What one environment's VM is made of, for [`vm_config`].
pub(super) struct VmSettings<'a> {
    pub(super) spec: &'a Spec,
    pub(super) images: &'a Images,
    /// `[vmm] cpu_template` (`auto` is resolved from this host's KVM: a jailed genos-vmm
    /// cannot see `/sys/module`).
    pub(super) cpu_template: &'a str,
    /// The kernel command line (`[vmm] cmdline`).
    pub(super) cmdline: String,
    /// The console log (COM1), on the host.
    pub(super) console: PathBuf,
    /// Whether the desktop is graphical: a display of the spec's size and input devices.
    pub(super) graphical: bool,
    /// The TAP device of the jail's network namespace, if it has one.
    pub(super) tap: Option<String>,
    /// The VM's virtio-vsock socket on the host, through which hostd reaches its agent.
    pub(super) vsock: PathBuf,
}

/// Every guest's CID: each VM has its own vsock device, so one number serves them all (the
/// first a guest may have, virtio 1.2 §5.10.4).
pub(super) const GUEST_CID: u64 = 3;

/// The one VM configuration of an environment, in host paths: sent as `PUT /vm/config`
/// when unjailed, rendered as genos-vmm flags under the jailer. Every environment gets
/// virtio-rng, virtio-vsock (for its agent) and its root filesystem as a writable disk.
/// The CPU template is concrete: `auto` becomes `host` or `baseline` by this host's KVM.
pub(super) fn vm_config(s: &VmSettings<'_>) -> Result<VmConfig, VmConfigError> {
    vm_config_on(s, &KvmHostFacts::read())
}

/// [`vm_config`] on a host with `facts`.
fn vm_config_on(s: &VmSettings<'_>, facts: &KvmHostFacts) -> Result<VmConfig, VmConfigError> {
    let template: CpuTemplate = s.cpu_template.parse().map_err(VmConfigError::CpuTemplate)?;
    let bad = |field, value| VmConfigError::OutOfRange { field, value };
    let config = VmConfig {
        kernel: s.images.kernel.clone(),
        initrd: s.images.initramfs.clone(),
        cmdline: s.cmdline.clone(),
        vcpus: u8::try_from(s.spec.vcpus).map_err(|_| bad("vcpus", s.spec.vcpus))?,
        mem_mib: s.spec.memory_mib,
        disks: s
            .images
            .rootfs
            .iter()
            .map(|path| DiskConfig {
                path: path.clone(),
                read_only: false,
            })
            .collect(),
        rng: true,
        cpu_template: template.resolve(facts),
        serial: SerialConfig::File(s.console.clone()),
        gpu: s.graphical.then_some(DisplaySize {
            width: s.spec.display.width,
            height: s.spec.display.height,
        }),
        input: s.graphical,
        net: s.tap.clone().map(|tap| NetConfig { tap, mac: None }),
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: s.vsock.clone(),
        }),
    };
    config.validate_values().map_err(VmConfigError::Invalid)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_chain;
    use crate::orchestrator::tests::spec;

    fn images() -> Images {
        Images {
            kernel: "/var/lib/genos/vmlinux".into(),
            initramfs: Some("/var/lib/genos/initramfs.cpio".into()),
            rootfs: Some("/var/lib/genos/envs/a/rootfs.ext4".into()),
        }
    }

    fn settings<'a>(spec: &'a Spec, images: &'a Images, graphical: bool) -> VmSettings<'a> {
        VmSettings {
            spec,
            images,
            cpu_template: "baseline",
            cmdline: "console=ttyS0 ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off".into(),
            console: "/var/lib/genos/envs/a/console.log".into(),
            graphical,
            tap: Some("gvt-e3".into()),
            vsock: "/var/lib/genos/envs/a/vsock.sock".into(),
        }
    }

    #[test]
    fn a_graphical_spec_becomes_one_typed_vm_config() {
        let mut spec = spec(2, 1024);
        (spec.display.width, spec.display.height) = (1280, 800);
        let images = images();

        let config = vm_config(&settings(&spec, &images, true)).unwrap();

        assert_eq!(config.kernel, images.kernel);
        assert_eq!(config.initrd, images.initramfs);
        assert_eq!((config.vcpus, config.mem_mib), (2, 1024));
        assert_eq!(
            config.disks,
            vec![DiskConfig {
                path: "/var/lib/genos/envs/a/rootfs.ext4".into(),
                read_only: false
            }]
        );
        assert!(config.rng && config.input);
        assert_eq!(config.cpu_template, vmm_api::CpuTemplate::Baseline);
        assert_eq!(
            config.serial,
            SerialConfig::File("/var/lib/genos/envs/a/console.log".into())
        );
        assert_eq!(
            config.gpu,
            Some(DisplaySize {
                width: 1280,
                height: 800
            })
        );
        assert_eq!(config.net.map(|n| n.tap).as_deref(), Some("gvt-e3"));
        assert_eq!(
            config.vsock,
            Some(VsockConfig {
                guest_cid: GUEST_CID,
                uds_path: "/var/lib/genos/envs/a/vsock.sock".into()
            })
        );
    }

    #[test]
    fn a_headless_spec_has_no_display_or_input() {
        let spec = spec(1, 256);
        let images = images();

        let config = vm_config(&settings(&spec, &images, false)).unwrap();

        assert_eq!((config.gpu, config.input), (None, false));
    }

    #[test]
    fn the_jailed_flags_are_the_config_and_the_jailer_rewrites_its_paths() {
        let spec = spec(2, 512);
        let images = images();
        let config = vm_config(&settings(&spec, &images, true)).unwrap();

        let args: Vec<String> = config
            .to_cli_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let jailed = jailer::vmm_args::rewrite(&args).unwrap();

        let mounted: Vec<_> = jailed.binds.iter().map(|b| b.source.clone()).collect();
        for host in [
            &images.kernel,
            images.initramfs.as_ref().unwrap(),
            images.rootfs.as_ref().unwrap(),
        ] {
            assert!(mounted.contains(host), "{} not mounted", host.display());
        }
        for flag in [
            "--rng",
            "--input",
            "--gpu",
            "--net",
            "--cpu-template",
            "--vsock",
        ] {
            assert!(jailed.args.iter().any(|a| a == flag), "{flag} missing");
        }
        assert!(
            jailed.args.iter().any(|a| a == "3:/run/vsock.sock"),
            "the vsock socket is in the jail's /run: {:?}",
            jailed.args
        );
        assert!(!args.iter().any(|a| a == "--config"));
    }

    fn host(kvm_pvm: bool) -> KvmHostFacts {
        KvmHostFacts {
            dev_kvm: true,
            modules_visible: true,
            kvm_pvm,
            kvm_intel: true,
            kvm_amd: false,
        }
    }

    #[test]
    fn auto_becomes_host_on_real_kvm_and_baseline_on_nested_kvm_pvm() {
        let spec = spec(2, 512);
        let images = images();
        let auto = VmSettings {
            cpu_template: "auto",
            ..settings(&spec, &images, false)
        };

        let real = vm_config_on(&auto, &host(false)).unwrap();
        let nested = vm_config_on(&auto, &host(true)).unwrap();

        assert_eq!(real.cpu_template, CpuTemplate::Host);
        assert_eq!(nested.cpu_template, CpuTemplate::Baseline);
        let flags: Vec<_> = real.to_cli_args();
        assert!(
            flags
                .windows(2)
                .any(|w| w[0] == "--cpu-template" && w[1] == "host"),
            "the jailed VMM gets the resolved template: {flags:?}"
        );
    }

    #[test]
    fn an_explicit_template_is_kept_whatever_the_host() {
        let spec = spec(2, 512);
        let images = images();
        let host_template = VmSettings {
            cpu_template: "host",
            ..settings(&spec, &images, false)
        };

        let config = vm_config_on(&host_template, &host(true)).unwrap();

        assert_eq!(config.cpu_template, CpuTemplate::Host);
    }

    #[test]
    fn an_unknown_cpu_template_or_too_many_vcpus_is_refused() {
        let spec_ok = spec(2, 512);
        let spec_wide = spec(300, 512);
        let images = images();
        let bad_template = VmSettings {
            cpu_template: "fast",
            ..settings(&spec_ok, &images, false)
        };

        let template = error_chain(&vm_config(&bad_template).unwrap_err());
        let vcpus = error_chain(&vm_config(&settings(&spec_wide, &images, false)).unwrap_err());

        assert!(
            template.contains("cpu_template must be auto, host or baseline"),
            "{template}"
        );
        assert!(vcpus.contains("vcpus 300"), "{vcpus}");
    }
}
