//! Content-addressed artifact cache.
//!
//! Every artifact lives in `<root>/<kind>/<input-hash>/` next to a `manifest.json`
//! describing it. Builds happen in a staging directory under `<root>/tmp/` that is
//! renamed into place only once complete, so an interrupted or failed build never
//! leaves a half-written artifact where a reader could find it. A per-artifact lock
//! file serialises concurrent builders of the same input.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::path_error::PathIoError;

/// Environment variable overriding the default cache directory.
pub const CACHE_DIR_ENV: &str = "GENOS_IMAGE_CACHE";

/// File name of the manifest stored beside each artifact.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Errors from the artifact cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot determine the cache directory: set --cache-dir, {CACHE_DIR_ENV} or HOME")]
    NoCacheDir,
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("manifest {path} is corrupt: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl CacheError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        CacheError::Io(PathIoError::new(action, path, source))
    }
}

/// Kinds of artifact the builder produces; each is a subdirectory of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    Kernel,
    Initramfs,
    Base,
    Rootfs,
    /// A host tool genos-image fetched and verified itself (apk.static).
    Tool,
}

impl ArtifactKind {
    pub const ALL: [ArtifactKind; 5] = [
        ArtifactKind::Kernel,
        ArtifactKind::Initramfs,
        ArtifactKind::Base,
        ArtifactKind::Rootfs,
        ArtifactKind::Tool,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Kernel => "kernel",
            ArtifactKind::Initramfs => "initramfs",
            ArtifactKind::Base => "base",
            ArtifactKind::Rootfs => "rootfs",
            ArtifactKind::Tool => "tool",
        }
    }
}

impl std::fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Description of one cached artifact, stored as `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub kind: ArtifactKind,
    /// Hex SHA-256 of every input that determines the artifact's content.
    pub input_hash: String,
    /// File name of the main artifact inside the artifact directory.
    pub artifact: String,
    /// Size of the main artifact in bytes (apparent size).
    pub size_bytes: u64,
    /// Wall-clock time the build took.
    pub build_seconds: f64,
    /// Build completion time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Human-readable description of the inputs (versions, package lists).
    pub inputs: serde_json::Value,
}

/// Incremental SHA-256 over labelled inputs; labels and lengths are hashed too, so
/// no two different input sequences can produce the same byte stream.
#[derive(Default)]
pub struct InputHasher(Sha256);

impl InputHasher {
    pub fn new(recipe: &str) -> Self {
        let mut hasher = InputHasher(Sha256::new());
        hasher.add("recipe", recipe.as_bytes());
        hasher
    }

    pub fn add(&mut self, label: &str, value: &[u8]) -> &mut Self {
        for part in [label.as_bytes(), value] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    pub fn finish(self) -> String {
        format!("{:x}", self.0.finalize())
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// An artifact found in (or just added to) the cache.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Artifact {
    /// Path of the main artifact file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.manifest.artifact)
    }
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Cache {
    /// Opens the cache at `explicit`, else `$GENOS_IMAGE_CACHE`, else `~/.cache/genos/images`.
    pub fn open(explicit: Option<&Path>) -> Result<Self, CacheError> {
        let root = match explicit {
            Some(path) => path.to_path_buf(),
            None => match std::env::var_os(CACHE_DIR_ENV) {
                Some(dir) if !dir.is_empty() => PathBuf::from(dir),
                _ => {
                    let home = std::env::var_os("HOME").ok_or(CacheError::NoCacheDir)?;
                    PathBuf::from(home).join(".cache/genos/images")
                }
            },
        };
        Self::at(root)
    }

    /// Opens (creating if needed) a cache rooted at `root`.
    pub fn at(root: PathBuf) -> Result<Self, CacheError> {
        for sub in ["tmp", "work", "locks"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(|e| CacheError::io("creating", &dir, e))?;
        }
        Ok(Cache { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory for long-lived build state (kernel source and object trees).
    pub fn work_dir(&self) -> PathBuf {
        self.root.join("work")
    }

    fn artifact_dir(&self, kind: ArtifactKind, hash: &str) -> PathBuf {
        self.root.join(kind.as_str()).join(hash)
    }

    /// Returns the cached artifact for `hash`, if complete.
    pub fn lookup(&self, kind: ArtifactKind, hash: &str) -> Result<Option<Artifact>, CacheError> {
        let dir = self.artifact_dir(kind, hash);
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = match fs::read_to_string(&manifest_path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::io("reading", &manifest_path, e)),
        };
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|source| CacheError::Manifest {
                path: manifest_path,
                source,
            })?;
        if !dir.join(&manifest.artifact).is_file() {
            return Ok(None);
        }
        Ok(Some(Artifact { dir, manifest }))
    }

    /// The cached artifact for `hash`, or on a miss the build lock for it, looked up again
    /// once the lock is held (another process may have built it meanwhile).
    pub fn lookup_or_lock(&self, kind: ArtifactKind, hash: &str) -> Result<Cached, CacheError> {
        if let Some(hit) = self.lookup(kind, hash)? {
            return Ok(Cached::Hit(hit));
        }
        let lock = self.lock(kind, hash)?;
        Ok(match self.lookup(kind, hash)? {
            Some(hit) => Cached::Hit(hit),
            None => Cached::Miss(lock),
        })
    }

    /// Takes the exclusive build lock for `(kind, hash)`, blocking while another
    /// process holds it. Released when the returned guard drops.
    pub fn lock(&self, kind: ArtifactKind, name: &str) -> Result<BuildLock, CacheError> {
        let path = self.root.join("locks").join(format!("{kind}-{name}.lock"));
        let file = File::create(&path).map_err(|e| CacheError::io("creating", &path, e))?;
        // SAFETY: `file` owns a valid open descriptor for the duration of the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(CacheError::io("locking", &path, io::Error::last_os_error()));
        }
        Ok(BuildLock { _file: file })
    }

    /// Creates an empty staging directory for a new artifact. It is removed on drop
    /// unless [`Cache::publish`] consumed it.
    pub fn stage(&self, kind: ArtifactKind, hash: &str) -> Result<Staging, CacheError> {
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let short = &hash[..hash.len().min(16)];
        let dir = self
            .root
            .join("tmp")
            .join(format!("{kind}-{short}.{}.{n}", std::process::id()));
        if dir.exists() {
            remove_tree(&dir)?;
        }
        fs::create_dir_all(&dir).map_err(|e| CacheError::io("creating", &dir, e))?;
        Ok(Staging { dir: Some(dir) })
    }

    /// Writes the manifest into the staging directory and renames it into place.
    pub fn publish(
        &self,
        staging: Staging,
        kind: ArtifactKind,
        hash: &str,
        artifact: &str,
        build_time: Duration,
        inputs: serde_json::Value,
    ) -> Result<Artifact, CacheError> {
        let dir = staging.path().to_path_buf();
        let artifact_path = dir.join(artifact);
        let size_bytes = fs::metadata(&artifact_path)
            .map_err(|e| CacheError::io("inspecting", &artifact_path, e))?
            .len();
        let manifest = Manifest {
            kind,
            input_hash: hash.to_string(),
            artifact: artifact.to_string(),
            size_bytes,
            build_seconds: (build_time.as_secs_f64() * 1000.0).round() / 1000.0,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            inputs,
        };
        let manifest_path = dir.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        fs::write(&manifest_path, json)
            .map_err(|e| CacheError::io("writing", &manifest_path, e))?;

        let final_dir = self.artifact_dir(kind, hash);
        let parent = final_dir.parent().expect("artifact dir has a parent");
        fs::create_dir_all(parent).map_err(|e| CacheError::io("creating", parent, e))?;
        if final_dir.exists() {
            // A stale, incomplete directory (no valid manifest); replace it.
            remove_tree(&final_dir)?;
        }
        fs::rename(&dir, &final_dir).map_err(|e| CacheError::io("renaming into", &final_dir, e))?;
        staging.disarm();
        Ok(Artifact {
            dir: final_dir,
            manifest,
        })
    }

    /// Every complete artifact in the cache, newest first within each kind.
    pub fn list(&self) -> Result<Vec<Artifact>, CacheError> {
        let mut all = Vec::new();
        for kind in ArtifactKind::ALL {
            let kind_dir = self.root.join(kind.as_str());
            let entries = match fs::read_dir(&kind_dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CacheError::io("listing", &kind_dir, e)),
            };
            let mut of_kind = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| CacheError::io("listing", &kind_dir, e))?;
                let name = entry.file_name();
                if let Some(artifact) = self.lookup(kind, &name.to_string_lossy())? {
                    of_kind.push(artifact);
                }
            }
            of_kind.sort_by_key(|a| std::cmp::Reverse(a.manifest.created_unix));
            all.extend(of_kind);
        }
        Ok(all)
    }

    /// Removes abandoned staging directories, incomplete artifact directories and all
    /// but the `keep` newest artifacts of each kind. Returns the removed paths.
    pub fn gc(&self, keep: usize) -> Result<Vec<PathBuf>, CacheError> {
        let mut removed = Vec::new();
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(|e| CacheError::io("listing", &tmp, e))? {
            let entry = entry.map_err(|e| CacheError::io("listing", &tmp, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if staging_owner_alive(&name) {
                continue;
            }
            remove_tree(&entry.path())?;
            removed.push(entry.path());
        }
        for kind in ArtifactKind::ALL {
            let kind_dir = self.root.join(kind.as_str());
            let Ok(entries) = fs::read_dir(&kind_dir) else {
                continue;
            };
            let mut complete = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| CacheError::io("listing", &kind_dir, e))?;
                let hash = entry.file_name().to_string_lossy().into_owned();
                match self.lookup(kind, &hash) {
                    Ok(Some(artifact)) => complete.push(artifact),
                    _ => {
                        remove_tree(&entry.path())?;
                        removed.push(entry.path());
                    }
                }
            }
            complete.sort_by_key(|a| std::cmp::Reverse(a.manifest.created_unix));
            for artifact in complete.into_iter().skip(keep) {
                remove_tree(&artifact.dir)?;
                removed.push(artifact.dir);
            }
        }
        Ok(removed)
    }
}

/// Whether the process that created staging directory `name` (`kind-hash.PID.N`) runs.
fn staging_owner_alive(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    let _counter = parts.next();
    let Some(pid) = parts.next().and_then(|p| p.parse::<libc::pid_t>().ok()) else {
        return false;
    };
    pid == std::process::id() as libc::pid_t || Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes a directory tree, treating "already gone" as success.
pub fn remove_tree(path: &Path) -> Result<(), CacheError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CacheError::io("removing", path, e)),
    }
}

/// What [`Cache::lookup_or_lock`] found.
#[derive(Debug)]
pub enum Cached {
    /// Built already.
    Hit(Artifact),
    /// Not built: the caller builds it while holding this lock.
    Miss(BuildLock),
}

/// Exclusive lock on one artifact's build.
#[derive(Debug)]
pub struct BuildLock {
    _file: File,
}

/// A staging directory, deleted on drop unless published.
#[derive(Debug)]
pub struct Staging {
    dir: Option<PathBuf>,
}

impl Staging {
    pub fn path(&self) -> &Path {
        self.dir
            .as_deref()
            .expect("staging dir present until published")
    }

    fn disarm(mut self) {
        self.dir = None;
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = remove_tree(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_cache(name: &str) -> Cache {
        let root =
            std::env::temp_dir().join(format!("genos-cache-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        Cache::at(root).unwrap()
    }

    #[test]
    fn input_hash_separates_fields() {
        let mut a = InputHasher::new("r");
        a.add("x", b"ab").add("y", b"c");
        let mut b = InputHasher::new("r");
        b.add("x", b"a").add("y", b"bc");
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn published_artifact_is_found_with_its_manifest() {
        let cache = temp_cache("publish");
        let staging = cache.stage(ArtifactKind::Initramfs, "abc").unwrap();
        fs::write(staging.path().join("blob"), b"12345").unwrap();
        let inputs = serde_json::json!({"k": "v"});
        cache
            .publish(
                staging,
                ArtifactKind::Initramfs,
                "abc",
                "blob",
                Duration::from_millis(1500),
                inputs,
            )
            .unwrap();

        let found = cache
            .lookup(ArtifactKind::Initramfs, "abc")
            .unwrap()
            .unwrap();

        assert_eq!(found.manifest.size_bytes, 5);
        assert_eq!(found.manifest.build_seconds, 1.5);
        assert_eq!(fs::read(found.path()).unwrap(), b"12345");
        assert_eq!(cache.list().unwrap().len(), 1);
        fs::remove_dir_all(cache.root()).unwrap();
    }

    #[test]
    fn dropped_staging_leaves_nothing_behind() {
        let cache = temp_cache("drop");
        let staging = cache.stage(ArtifactKind::Rootfs, "def").unwrap();
        let dir = staging.path().to_path_buf();
        fs::write(dir.join("partial"), b"x").unwrap();

        drop(staging);

        assert!(!dir.exists());
        assert!(cache.lookup(ArtifactKind::Rootfs, "def").unwrap().is_none());
        fs::remove_dir_all(cache.root()).unwrap();
    }

    #[test]
    fn gc_keeps_newest_and_removes_incomplete_and_orphans() {
        let cache = temp_cache("gc");
        for (hash, created) in [("old", 1), ("new", 2)] {
            let staging = cache.stage(ArtifactKind::Kernel, hash).unwrap();
            fs::write(staging.path().join("vmlinux"), b"k").unwrap();
            let artifact = cache
                .publish(
                    staging,
                    ArtifactKind::Kernel,
                    hash,
                    "vmlinux",
                    Duration::ZERO,
                    serde_json::Value::Null,
                )
                .unwrap();
            let mut manifest = artifact.manifest.clone();
            manifest.created_unix = created;
            fs::write(
                artifact.dir.join(MANIFEST_FILE),
                serde_json::to_vec(&manifest).unwrap(),
            )
            .unwrap();
        }
        fs::create_dir_all(cache.root().join("kernel/incomplete")).unwrap();
        // A staging dir whose owner is gone (the pid exceeds any pid_max).
        fs::create_dir_all(cache.root().join("tmp/kernel-x.999999999.0")).unwrap();

        let removed = cache.gc(1).unwrap();

        assert_eq!(removed.len(), 3, "{removed:?}");
        assert!(cache.lookup(ArtifactKind::Kernel, "new").unwrap().is_some());
        assert!(cache.lookup(ArtifactKind::Kernel, "old").unwrap().is_none());
        fs::remove_dir_all(cache.root()).unwrap();
    }
}
