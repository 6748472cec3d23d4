//! The `genos-vmm` binary's argument handling: every error in the arguments or the files
//! they name is one line on stderr and exit status 2, before any VM is built.

use std::process::{Command, Output};

use vmm_sys_util::tempfile::TempFile;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_genos-vmm"))
        .args(args)
        .output()
        .expect("run genos-vmm")
}

fn assert_usage_error(args: &[&str], expected: &str) {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: stderr {stderr:?}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?}: not one line: {stderr:?}"
    );
    assert!(stderr.starts_with("genos-vmm: "), "{args:?}: {stderr:?}");
    assert!(
        stderr.contains(expected),
        "{args:?}: {stderr:?} lacks {expected:?}"
    );
    assert!(out.stdout.is_empty(), "{args:?}: wrote to stdout");
}

#[test]
fn bad_arguments_are_one_line_and_exit_2() {
    let kernel = TempFile::new().unwrap();
    let k = kernel.as_path().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&[], "nothing to run"),
        (
            &["--kernel", k, "--frobnicate"],
            "unexpected argument '--frobnicate'",
        ),
        (
            &["--kernel", k, "--vcpus", "40"],
            "vcpus must be between 1 and 32, got 40",
        ),
        (
            &["--kernel", k, "--mem-mib", "lots"],
            "invalid value 'lots' for '--mem-mib <N>'",
        ),
        (
            &["--kernel", k, "--cpu-template", "turbo"],
            "cpu_template must be host or baseline",
        ),
        (
            &["--kernel", k, "--serial", "com2"],
            "serial must be stdout, none or file:PATH",
        ),
        (
            &["--kernel", k, "--gpu", "1920"],
            "display size must look like WIDTHxHEIGHT",
        ),
        (
            &["--kernel", k, "--disk", "/nonexistent/disk.img:ro"],
            "disk 0 /nonexistent/disk.img",
        ),
        (
            &["--kernel", "/nonexistent/vmlinux"],
            "kernel /nonexistent/vmlinux: No such file",
        ),
        (
            &["--config", "/nonexistent/vm.json"],
            "config file /nonexistent/vm.json",
        ),
        (
            &["--api-sock", "/tmp/genos-cli-test.sock", "--rng"],
            "VM options need a kernel",
        ),
    ];
    for (args, expected) in cases {
        assert_usage_error(args, expected);
    }
}

#[test]
fn malformed_config_file_is_one_line_with_position() {
    let file = TempFile::new().unwrap();
    std::fs::write(
        file.as_path(),
        b"{\n  \"kernel\": \"/k\",\n  \"vcpus\": \"two\"\n}",
    )
    .unwrap();
    assert_usage_error(
        &["--config", file.as_path().to_str().unwrap()],
        "invalid type: string \"two\", expected u64 at line 3 column 16",
    );
}

#[test]
fn help_goes_to_stdout_and_exits_0() {
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--vcpus",
        "--mem-mib",
        "--disk",
        "--rng",
        "--cpu-template",
        "--serial",
        "--api-sock",
        "--config",
        "--gpu",
        "--input",
    ] {
        assert!(help.contains(flag), "help lacks {flag}");
    }
}
