//! The `genos-vmm` binary's front end: every error in the arguments or the files they
//! name is one line on stderr and exit status 2; `--api-sock` alone waits to be configured.

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
            "cpu_template must be auto, host or baseline",
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

/// Sends one request on a fresh connection and returns (status, body).
fn http(sock: &std::path::Path, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[test]
fn api_sock_alone_waits_for_configuration_and_stop_exits_0() {
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    let kernel = TempFile::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_genos-vmm"))
        .arg("--api-sock")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "API socket never appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }

    let (status, body) = http(&sock, "GET", "/vm", "");
    assert_eq!(status, 200);
    assert!(body.contains(r#""state":"not-configured""#), "{body}");
    let config = format!(r#"{{"kernel":"{}","vcpus":2}}"#, kernel.as_path().display());
    assert_eq!(http(&sock, "PUT", "/vm/config", &config).0, 204);
    let (status, body) = http(&sock, "GET", "/vm", "");
    assert_eq!(status, 200);
    assert!(body.contains(r#""state":"configured""#), "{body}");
    assert!(body.contains(r#""vcpus":2"#), "{body}");
    assert_eq!(
        http(&sock, "PUT", "/vm/actions", r#"{"action":"stop"}"#).0,
        204
    );

    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}
