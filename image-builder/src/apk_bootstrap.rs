//! Runs an [`ApkStaticPlan`]: fetches the mirror's index and the `apk-tools-static`
//! package with curl (short timeouts, so an unreachable mirror fails in seconds), extracts
//! the binary and its signature, accepts it only if `openssl dgst -sha256 -verify` does with
//! the signing key from the base's key directory, and caches it as a `tool` artifact. A
//! cached binary is verified again each time it is used, so a changed file or a key
//! removed from the directory stops it. No unverified byte is ever executed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::cache::{sha256_hex, ArtifactKind, Cache, CacheError, InputHasher};
use crate::path_error::{io_err, PathIoError};
use crate::plan::apk_static::{self, ApkStaticError, ApkStaticPlan};
use crate::tools::{self, ToolError};

/// File names inside the `tool` artifact directory.
pub const BINARY: &str = "apk.static";
pub const SIGNATURE: &str = "apk.static.sig";

/// Why apk.static could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum ApkBootstrapError {
    #[error("fetching {url} failed: {detail}")]
    Fetch { url: String, detail: String },
    #[error("{url} is not usable: {source}")]
    Download {
        url: String,
        #[source]
        source: ApkStaticError,
    },
    #[error("apk.static is signed with {key_name}, which is not in {keys_dir}")]
    UnknownKey { key_name: String, keys_dir: PathBuf },
    #[error("the signature of apk.static from {url} does not verify with {key}: {source}")]
    BadSignature {
        url: String,
        key: PathBuf,
        /// Boxed: it would make this error (and every error that carries it) too large.
        #[source]
        source: Box<VerifyError>,
    },
    #[error("the cached apk.static in {dir} does not verify any more ({detail}); remove {dir} to fetch it again")]
    CachedBadSignature { dir: PathBuf, detail: String },
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Io(#[from] PathIoError),
}

/// Why `openssl dgst -sha256 -verify` did not accept apk.static's signature.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// openssl could not be run.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// openssl ran and refused: its first line of output, and how it exited.
    #[error("openssl: {said} ({status})")]
    Refused { said: String, status: ExitStatus },
}

/// The cache key of the binary `plan` yields.
pub fn hash(plan: &ApkStaticPlan) -> String {
    let mut hasher = InputHasher::new(apk_static::RECIPE);
    for (key, value) in plan.hash_inputs() {
        hasher.add(key, value.as_bytes());
    }
    hasher.finish()
}

/// The path of a verified apk.static for `plan`, from the cache or fetched from the mirror.
/// `timeout` bounds connecting and each silence of the mirror (see
/// [`apk_static::fetch_command`]).
pub fn obtain(
    cache: &Cache,
    plan: &ApkStaticPlan,
    timeout: Duration,
) -> Result<PathBuf, ApkBootstrapError> {
    tools::require(&[("curl", "curl"), ("openssl", "openssl")])?;
    let hash = hash(plan);
    if let Some(path) = cached(cache, plan, &hash)? {
        return Ok(path);
    }
    let _lock = cache.lock(ArtifactKind::Tool, &hash)?;
    if let Some(path) = cached(cache, plan, &hash)? {
        return Ok(path);
    }
    let started = Instant::now();
    let staging = cache.stage(ArtifactKind::Tool, &hash)?;
    let dir = staging.path();

    let index_url = plan.index_url();
    eprintln!("genos-image: apk.static is not on PATH; fetching {index_url}");
    let index = fetch(&index_url, &dir.join("APKINDEX.tar.gz"), timeout)?;
    let package = plan
        .package(&index)
        .map_err(|source| ApkBootstrapError::Download {
            url: index_url.clone(),
            source,
        })?;
    eprintln!("genos-image: fetching {}", package.url);
    let bytes = fetch(&package.url, &dir.join("package.apk"), timeout)?;
    let extracted = apk_static::extract(&bytes).map_err(|source| ApkBootstrapError::Download {
        url: package.url.clone(),
        source,
    })?;
    for name in ["APKINDEX.tar.gz", "package.apk"] {
        let path = dir.join(name);
        fs::remove_file(&path).map_err(io_err("removing", &path))?;
    }
    let binary = dir.join(BINARY);
    let signature = dir.join(SIGNATURE);
    fs::write(&binary, &extracted.binary).map_err(io_err("writing", &binary))?;
    fs::write(&signature, &extracted.signature).map_err(io_err("writing", &signature))?;
    let key = plan.key_path(&extracted.key_name);
    if !key.is_file() {
        return Err(ApkBootstrapError::UnknownKey {
            key_name: extracted.key_name,
            keys_dir: plan.keys_dir.clone(),
        });
    }
    verify(&key, &signature, &binary).map_err(|source| ApkBootstrapError::BadSignature {
        url: package.url.clone(),
        key: key.clone(),
        source: Box::new(source),
    })?;
    // Verified: only now may it be made executable and run.
    fs::set_permissions(&binary, fs::Permissions::from_mode(0o755))
        .map_err(io_err("chmod", &binary))?;
    let reports = tools::output(Command::new(&binary).arg("--version"))?;
    eprintln!(
        "genos-image: apk.static {} verified with {}: {}",
        package.version,
        extracted.key_name,
        reports.trim()
    );
    let inputs = serde_json::json!({
        "package": apk_static::PACKAGE,
        "version": package.version,
        "release": plan.release,
        "arch": plan.arch,
        "url": package.url,
        "key": extracted.key_name,
        "sha256": sha256_hex(&extracted.binary),
        "reports": reports.trim(),
    });
    let artifact = cache.publish(
        staging,
        ArtifactKind::Tool,
        &hash,
        BINARY,
        started.elapsed(),
        inputs,
    )?;
    Ok(artifact.path())
}

/// The cached binary, verified again; `None` when there is none.
fn cached(
    cache: &Cache,
    plan: &ApkStaticPlan,
    hash: &str,
) -> Result<Option<PathBuf>, ApkBootstrapError> {
    let Some(artifact) = cache.lookup(ArtifactKind::Tool, hash)? else {
        return Ok(None);
    };
    let stale = |detail: String| ApkBootstrapError::CachedBadSignature {
        dir: artifact.dir.clone(),
        detail,
    };
    let key_name = artifact.manifest.inputs["key"]
        .as_str()
        .ok_or_else(|| stale("its manifest names no key".into()))?;
    let key = plan.key_path(key_name);
    if !key.is_file() {
        return Err(stale(format!(
            "its key {key_name} is not in {}",
            plan.keys_dir.display()
        )));
    }
    verify(&key, &artifact.dir.join(SIGNATURE), &artifact.path())
        .map_err(|e| stale(e.to_string()))?;
    Ok(Some(artifact.path()))
}

/// Downloads `url` to `dest` and returns its bytes.
fn fetch(url: &str, dest: &Path, timeout: Duration) -> Result<Vec<u8>, ApkBootstrapError> {
    let argv = apk_static::fetch_command(url, dest, timeout);
    let out = run_captured(&argv)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        return Err(ApkBootstrapError::Fetch {
            url: url.to_string(),
            detail: format!(
                "{} ({})",
                last.unwrap_or("curl said nothing").trim(),
                out.status
            ),
        });
    }
    Ok(fs::read(dest).map_err(io_err("reading", dest))?)
}

/// Runs the plan's openssl check; the error is what openssl said.
fn verify(key: &Path, signature: &Path, binary: &Path) -> Result<(), VerifyError> {
    let argv = apk_static::verify_command(key, signature, binary);
    let out = run_captured(&argv)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.trim() == "Verified OK" {
        return Ok(());
    }
    let said = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let first = said.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    Err(VerifyError::Refused {
        said: first.trim().to_owned(),
        status: out.status,
    })
}

fn run_captured(argv: &[String]) -> Result<Output, ToolError> {
    Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ToolError::Spawn {
            tool: argv[0].clone(),
            source,
        })
}
