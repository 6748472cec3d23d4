//! Which paths a file request may touch: inside the user's home unless it asked as root.
//!
//! The check runs on resolved paths (symlinks followed, `..` removed), so a link in the home
//! pointing at `/etc` does not let a put or get out. A put's final component need not exist;
//! its directory must.

use std::path::{Component, Path, PathBuf};

/// Why a path is refused.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(String),
    #[error("{0:?} names no file")]
    NoFileName(String),
    #[error("{path}: {source}")]
    Resolve {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is outside {home} (ask as root to reach it)")]
    OutsideHome { path: PathBuf, home: PathBuf },
}

impl PathError {
    /// Whether the path simply does not exist (as opposed to being refused).
    pub fn is_not_found(&self) -> bool {
        matches!(self, PathError::Resolve { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn resolve(path: &Path) -> Result<PathBuf, PathError> {
    path.canonicalize().map_err(|source| PathError::Resolve {
        path: path.display().to_string(),
        source,
    })
}

fn confine(resolved: PathBuf, home: Option<&Path>) -> Result<PathBuf, PathError> {
    if let Some(home) = home {
        let home = resolve(home)?;
        if !resolved.starts_with(&home) {
            return Err(PathError::OutsideHome {
                path: resolved,
                home,
            });
        }
    }
    Ok(resolved)
}

fn absolute(path: &str) -> Result<&Path, PathError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(PathError::NotAbsolute(path.to_owned()));
    }
    Ok(p)
}

/// The file a put writes: its directory resolved, its name kept. `home` = `None` for root.
pub fn put_target(path: &str, home: Option<&Path>) -> Result<PathBuf, PathError> {
    let p = absolute(path)?;
    let name = match p.components().next_back() {
        Some(Component::Normal(name)) => name.to_owned(),
        _ => return Err(PathError::NoFileName(path.to_owned())),
    };
    let dir = p
        .parent()
        .ok_or_else(|| PathError::NoFileName(path.to_owned()))?;
    Ok(confine(resolve(dir)?, home)?.join(name))
}

/// The file a get reads, resolved. `home` = `None` for root.
pub fn get_target(path: &str, home: Option<&Path>) -> Result<PathBuf, PathError> {
    confine(resolve(absolute(path)?)?, home)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("genos-agent-paths-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("home/sub")).unwrap();
        d
    }

    #[test]
    fn paths_inside_home_are_allowed_and_outside_refused() {
        let d = scratch("inside");
        let home = d.join("home");
        let put = put_target(home.join("sub/new.txt").to_str().unwrap(), Some(&home)).unwrap();
        assert_eq!(put, home.canonicalize().unwrap().join("sub/new.txt"));
        let escape = format!("{}/sub/../../x", home.display());
        assert!(matches!(
            put_target(&escape, Some(&home)),
            Err(PathError::OutsideHome { .. })
        ));
        assert!(put_target(&escape, None).is_ok(), "root may write anywhere");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_symlink_out_of_home_does_not_let_a_request_out() {
        let d = scratch("link");
        let home = d.join("home");
        std::fs::write(d.join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(d.join("secret"), home.join("link")).unwrap();
        std::os::unix::fs::symlink(&d, home.join("up")).unwrap();
        assert!(matches!(
            get_target(home.join("link").to_str().unwrap(), Some(&home)),
            Err(PathError::OutsideHome { .. })
        ));
        assert!(matches!(
            put_target(home.join("up/new").to_str().unwrap(), Some(&home)),
            Err(PathError::OutsideHome { .. })
        ));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn relative_and_nameless_paths_are_refused() {
        assert!(matches!(
            put_target("a/b", None),
            Err(PathError::NotAbsolute(_))
        ));
        assert!(matches!(
            put_target("/", None),
            Err(PathError::NoFileName(_))
        ));
        assert!(matches!(
            put_target("/tmp/..", None),
            Err(PathError::NoFileName(_))
        ));
        assert!(get_target("/nonexistent/x", None)
            .unwrap_err()
            .is_not_found());
    }
}
