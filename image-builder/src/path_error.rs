//! The one file-system error of genos-image: what it was doing, on which path, and the
//! system's reason. Each module's error enum carries it as its `Io` variant.

use std::io;
use std::path::{Path, PathBuf};

/// A file-system operation on `path` that failed.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct PathIoError {
    /// What was being done ("reading", "creating", ...).
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl PathIoError {
    pub fn new(action: &'static str, path: &Path, source: io::Error) -> Self {
        PathIoError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// For `map_err`: the error of doing `action` on `path`.
pub fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> PathIoError + 'a {
    move |source| PathIoError::new(action, path, source)
}
