//! X servers for tests: started with `-displayfd`, so each picks a free display itself and
//! says which once it accepts clients (tests in parallel never share one), and killed and
//! reaped when dropped, on every exit path.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed and reaped when dropped.
#[derive(Debug)]
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running X server on its own display.
#[derive(Debug)]
pub struct XServer {
    /// `:N`, for `DISPLAY`.
    pub display: String,
    _child: Guard,
}

/// How long an X server has to take a display.
const START_LIMIT: Duration = Duration::from_secs(20);

impl XServer {
    /// Starts `cmd` (an X server's command line, without `-displayfd`); panics with the
    /// server's log (`log`, where its stderr should go) when it ends before taking a display.
    pub fn spawn(mut cmd: Command, log: &Path) -> XServer {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors from pipe, owned from here on.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own: the read end stays out of the child.
        unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        let child = cmd
            .arg("-displayfd")
            .arg(write.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the X server");
        drop(write);
        let mut child = Guard(child);
        let mut reader = std::fs::File::from(read);
        let mut number = Vec::new();
        let deadline = Instant::now() + START_LIMIT;
        while !number.ends_with(b"\n") {
            let mut pfd = libc::pollfd {
                fd: reader.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            if pfd.revents & libc::POLLIN != 0 {
                let mut byte = [0u8; 1];
                if reader.read(&mut byte).unwrap_or(0) == 1 {
                    number.push(byte[0]);
                    continue;
                }
            }
            if let Ok(Some(status)) = child.0.try_wait() {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                panic!("X server exited ({status}) before taking a display: {log}");
            }
            assert!(
                Instant::now() < deadline,
                "X server took no display in {} s",
                START_LIMIT.as_secs()
            );
        }
        XServer {
            display: format!(":{}", String::from_utf8_lossy(&number).trim()),
            _child: child,
        }
    }

    /// Xorg with the dummy video driver (RandR 1.2 with mode changes, which Xvfb lacks),
    /// configured and logging in `dir`.
    pub fn xorg_dummy(dir: &Path) -> XServer {
        let conf = dir.join("xorg.conf");
        std::fs::write(&conf, XORG_DUMMY_CONF).unwrap();
        std::fs::create_dir_all(dir.join("xorg.conf.d")).unwrap();
        let log = dir.join("xorg.log");
        let mut cmd = Command::new("Xorg");
        cmd.args(["-noreset", "-nolisten", "tcp", "-novtswitch", "-sharevts"])
            .arg("-config")
            .arg(&conf)
            .arg("-configdir")
            .arg(dir.join("xorg.conf.d"))
            .arg("-logfile")
            .arg(&log)
            .stderr(Stdio::null());
        XServer::spawn(cmd, &log)
    }

    /// The first line of `xrandr`'s output (`Screen 0: ... current W x H ...`).
    pub fn xrandr_current(&self) -> String {
        let out = Command::new("xrandr")
            .env("DISPLAY", &self.display)
            .output()
            .expect("run xrandr");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().next().unwrap_or_default().to_owned()
    }
}

/// A one-screen dummy-driver configuration without input devices.
const XORG_DUMMY_CONF: &str = r#"Section "ServerFlags"
  Option "AutoAddDevices" "false"
  Option "AutoEnableDevices" "false"
  Option "DontVTSwitch" "true"
EndSection
Section "Device"
  Identifier "dummy"
  Driver "dummy"
  VideoRam 65536
EndSection
Section "Monitor"
  Identifier "monitor"
  HorizSync 5.0-1000.0
  VertRefresh 5.0-1000.0
EndSection
Section "Screen"
  Identifier "screen"
  Device "dummy"
  Monitor "monitor"
  DefaultDepth 24
  SubSection "Display"
    Depth 24
    Virtual 4096 4096
  EndSubSection
EndSection
"#;
