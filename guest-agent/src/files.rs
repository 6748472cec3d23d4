//! File put and get: paths checked against the user's home, size limits, an atomic put
//! (a temporary file beside the target, owner and mode set, fsync, rename) and a get that
//! sends exactly the size it announced.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use proto::agent::{ErrorCode, FileGetRequest, FilePutRequest, RequestId};

use crate::paths::{self, PathError};
use crate::users::{Accounts, User, UserError};

/// Largest file put or got unless configured otherwise.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 1 << 30;

/// Why a file request failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("{size} bytes is over the agent's {limit}-byte file limit")]
    TooLarge { size: u64, limit: u64 },
    #[error("the put announced {expected} bytes and sent {got}")]
    WrongSize { expected: u64, got: u64 },
    #[error("{0} is not a regular file")]
    NotRegular(PathBuf),
    #[error("{0} shrank while it was being read")]
    Shrank(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FileError {
    /// The protocol's error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            FileError::User(UserError::NoSuchUser(_)) => ErrorCode::PermissionDenied,
            FileError::User(UserError::Read { .. }) => ErrorCode::Io,
            FileError::Path(p) if p.is_not_found() => ErrorCode::NotFound,
            FileError::Path(PathError::Resolve { .. }) => ErrorCode::Io,
            FileError::Path(PathError::OutsideHome { .. }) => ErrorCode::PermissionDenied,
            FileError::Path(_) => ErrorCode::InvalidArgument,
            FileError::TooLarge { .. } => ErrorCode::TooLarge,
            FileError::WrongSize { .. } | FileError::NotRegular(_) => ErrorCode::InvalidArgument,
            FileError::Io { source, .. } => match source.kind() {
                ErrorKind::NotFound => ErrorCode::NotFound,
                ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
                _ => ErrorCode::Io,
            },
            FileError::Shrank(_) => ErrorCode::Io,
        }
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn home_bound(user: &User, as_root: bool) -> Option<&Path> {
    (!as_root).then_some(user.home.as_path())
}

/// A put in progress. Dropping it before [`Put::finish`] removes the temporary file.
#[derive(Debug)]
pub struct Put {
    target: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    expected: u64,
    written: u64,
    uid: u32,
    gid: u32,
    mode: u32,
}

impl Put {
    /// Checks the request and creates the temporary file.
    pub fn begin(
        req: &FilePutRequest,
        id: RequestId,
        accounts: &Accounts,
        limit: u64,
    ) -> Result<Put, FileError> {
        if req.size > limit {
            return Err(FileError::TooLarge {
                size: req.size,
                limit,
            });
        }
        let user = accounts.resolve(&req.user)?;
        let target = paths::put_target(&req.path, home_bound(&user, req.as_root))?;
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        let tmp =
            target.with_file_name(format!(".{name}.genos-put-{}-{}", std::process::id(), id.0));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        Ok(Put {
            target,
            tmp,
            file: Some(file),
            expected: req.size,
            written: 0,
            uid: user.uid,
            gid: user.gid,
            mode: req.mode,
        })
    }

    /// Appends a chunk; more than the announced size is an error.
    pub fn write(&mut self, data: &[u8]) -> Result<(), FileError> {
        let got = self.written + data.len() as u64;
        if got > self.expected {
            return Err(FileError::WrongSize {
                expected: self.expected,
                got,
            });
        }
        let file = self.file.as_mut().expect("open until finish");
        file.write_all(data).map_err(io("writing", &self.tmp))?;
        self.written = got;
        Ok(())
    }

    /// Sets owner and mode, syncs and renames the file into place.
    pub fn finish(mut self) -> Result<PathBuf, FileError> {
        if self.written != self.expected {
            return Err(FileError::WrongSize {
                expected: self.expected,
                got: self.written,
            });
        }
        let file = self.file.take().expect("open until finish");
        let fd = file.as_raw_fd();
        // SAFETY: fchown/fchmod on a descriptor we own. Ownership first: chown clears the
        // set-id bits that the mode may ask for.
        let failed = unsafe {
            libc::fchown(fd, self.uid, self.gid) != 0 || libc::fchmod(fd, self.mode) != 0
        };
        if failed {
            return Err(io("setting owner and mode of", &self.tmp)(
                std::io::Error::last_os_error(),
            ));
        }
        file.sync_all().map_err(io("syncing", &self.tmp))?;
        std::fs::rename(&self.tmp, &self.target).map_err(io("renaming into", &self.target))?;
        self.tmp = PathBuf::new();
        Ok(std::mem::take(&mut self.target))
    }
}

impl Drop for Put {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A get in progress.
#[derive(Debug)]
pub struct Get {
    path: PathBuf,
    file: File,
    remaining: u64,
}

impl Get {
    /// Checks the request and opens the file; returns it with its size and mode.
    pub fn begin(
        req: &FileGetRequest,
        accounts: &Accounts,
        limit: u64,
    ) -> Result<(Get, u64, u32), FileError> {
        let user = accounts.resolve(&req.user)?;
        let path = paths::get_target(&req.path, home_bound(&user, req.as_root))?;
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)
            .map_err(io("opening", &path))?;
        let meta = file.metadata().map_err(io("reading metadata of", &path))?;
        if !meta.is_file() {
            return Err(FileError::NotRegular(path));
        }
        if meta.len() > limit {
            return Err(FileError::TooLarge {
                size: meta.len(),
                limit,
            });
        }
        let size = meta.len();
        Ok((
            Get {
                path,
                file,
                remaining: size,
            },
            size,
            meta.mode() & 0o7777,
        ))
    }

    /// The next chunk of at most `max` bytes; `None` once the announced size was sent.
    pub fn next_chunk(&mut self, max: usize) -> Result<Option<Vec<u8>>, FileError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let want = (max as u64).min(self.remaining) as usize;
        let mut buf = vec![0; want];
        let n = loop {
            match self.file.read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io("reading", &self.path)(e)),
            }
        };
        if n == 0 {
            return Err(FileError::Shrank(self.path.clone()));
        }
        buf.truncate(n);
        self.remaining -= n as u64;
        Ok(Some(buf))
    }
}
