//! Getting `apk.static` onto a host that has no apk (Debian packages none), as pmbootstrap
//! does: the release's `main` index (`APKINDEX`) names the `apk-tools-static` package,
//! that package holds `sbin/apk.static` and `sbin/apk.static.SIGN.RSA.sha256.<key>`, an
//! RSA signature over the binary's SHA-256 by an Alpine developer key, and the binary is
//! used only after `openssl dgst -sha256 -verify` accepts that signature with the key of
//! that name from the base's key directory (Debian's `distribution-gpg-keys`). Everything
//! here is computed without IO: the URLs, the curl and openssl command lines, the index
//! lookup and the extraction from the package; [`crate::apk_bootstrap`] runs it and caches
//! the verified binary.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The Alpine package holding the static apk.
pub const PACKAGE: &str = "apk-tools-static";
/// The binary inside it.
pub const BINARY_MEMBER: &str = "sbin/apk.static";
/// Its SHA-256 signature; the rest of the name is the signing key's file name. (The older
/// SHA-1 signature beside it, `sbin/apk.static.SIGN.RSA.<key>`, is not accepted.)
pub const SIGNATURE_PREFIX: &str = "sbin/apk.static.SIGN.RSA.sha256.";
/// What a downloaded index or package may expand to; an index of `main` is a few MiB.
const MAX_UNPACKED_BYTES: u64 = 256 << 20;
/// Bump when the way the binary is obtained or checked changes.
pub const RECIPE: &str = "genos-apk-static-v1";

/// Why an index or package from the mirror cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ApkStaticError {
    #[error("it is not a gzip'd tar archive: {0}")]
    Gzip(#[source] io::Error),
    #[error("it unpacks to more than {} MiB", MAX_UNPACKED_BYTES >> 20)]
    TooLarge,
    #[error("its tar header at byte {offset} is damaged")]
    BadHeader { offset: usize },
    #[error("it ends inside {member}")]
    Truncated { member: String },
    #[error("it has no APKINDEX file")]
    NoIndex,
    #[error("its APKINDEX lists no {PACKAGE} for {arch}")]
    NotInIndex { arch: String },
    #[error("its APKINDEX gives {PACKAGE} the version {0:?}, which is not an Alpine version")]
    BadVersion(String),
    #[error("it has no {0}")]
    Missing(&'static str),
    #[error("it has {0} more than once")]
    Duplicate(String),
    #[error("its {0} is not a regular file")]
    NotRegular(String),
    #[error("its signature names the key {0:?}, which is not a key file name")]
    BadKeyName(String),
}

/// The `apk-tools-static` package a mirror's index names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub version: String,
    pub url: String,
}

/// What the package yields: the binary, its signature and the signing key's file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub binary: Vec<u8>,
    pub signature: Vec<u8>,
    pub key_name: String,
}

/// How `apk.static` is obtained for one Alpine base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApkStaticPlan {
    /// The base's mirror (no trailing slash) and release directory (`v3.20`).
    pub mirror: String,
    pub release: String,
    pub arch: String,
    /// The keys apk.static itself trusts; the binary's signature must come from one.
    pub keys_dir: PathBuf,
}

impl ApkStaticPlan {
    pub fn new(mirror: &str, release: &str, arch: &str, keys_dir: &Path) -> ApkStaticPlan {
        ApkStaticPlan {
            mirror: mirror.trim_end_matches('/').to_string(),
            release: release.to_string(),
            arch: arch.to_string(),
            keys_dir: keys_dir.to_path_buf(),
        }
    }

    fn main_dir(&self) -> String {
        format!("{}/{}/main/{}", self.mirror, self.release, self.arch)
    }

    /// The first download: the index of the release's `main` repository.
    pub fn index_url(&self) -> String {
        format!("{}/APKINDEX.tar.gz", self.main_dir())
    }

    /// The second download, from what the index says.
    pub fn package(&self, index_archive: &[u8]) -> Result<Package, ApkStaticError> {
        let members = read_tar_gz(index_archive, |name| name == "APKINDEX")?;
        let index = members
            .into_iter()
            .find(|m| m.name == "APKINDEX" && m.regular)
            .ok_or(ApkStaticError::NoIndex)?;
        let version = version_in_index(&String::from_utf8_lossy(&index.data), &self.arch)?;
        Ok(Package {
            url: format!("{}/{PACKAGE}-{version}.apk", self.main_dir()),
            version,
        })
    }

    /// Where the key that signed the binary must be.
    pub fn key_path(&self, key_name: &str) -> PathBuf {
        self.keys_dir.join(key_name)
    }

    /// Cache-key inputs: the verified binary does not depend on which mirror served it.
    pub fn hash_inputs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("package", PACKAGE.to_string()),
            ("release", self.release.clone()),
            ("arch", self.arch.clone()),
        ]
    }
}

/// The download of `url` to `dest`: failing on HTTP errors, following redirects only to
/// http(s), giving up when connecting takes longer than `timeout` or when less than a
/// byte a second arrives for three times that (a silent server), and after 5 min in all.
pub fn fetch_command(url: &str, dest: &Path, timeout: Duration) -> Vec<String> {
    let secs = timeout.as_secs().max(1);
    vec![
        "curl".into(),
        "--fail".into(),
        "--silent".into(),
        "--show-error".into(),
        "--location".into(),
        "--proto".into(),
        "=http,https,file".into(),
        "--proto-redir".into(),
        "=http,https".into(),
        "--connect-timeout".into(),
        secs.to_string(),
        "--speed-limit".into(),
        "1".into(),
        "--speed-time".into(),
        (3 * secs).to_string(),
        "--max-time".into(),
        "300".into(),
        "--output".into(),
        dest.display().to_string(),
        url.into(),
    ]
}

/// The signature check: exits 0 and prints `Verified OK` only for a good signature.
pub fn verify_command(key: &Path, signature: &Path, binary: &Path) -> Vec<String> {
    vec![
        "openssl".into(),
        "dgst".into(),
        "-sha256".into(),
        "-verify".into(),
        key.display().to_string(),
        "-signature".into(),
        signature.display().to_string(),
        binary.display().to_string(),
    ]
}

/// The binary, its SHA-256 signature and the key's name from an `apk-tools-static`
/// package (concatenated gzip'd tar segments, as every .apk is).
pub fn extract(package: &[u8]) -> Result<Extracted, ApkStaticError> {
    let members = read_tar_gz(package, |name| {
        name == BINARY_MEMBER || name.starts_with(SIGNATURE_PREFIX)
    })?;
    let mut binary = None;
    let mut signature = None;
    for member in members {
        if !member.regular {
            return Err(ApkStaticError::NotRegular(member.name));
        }
        let slot = if member.name == BINARY_MEMBER {
            &mut binary
        } else {
            &mut signature
        };
        if slot.is_some() {
            return Err(ApkStaticError::Duplicate(if member.name == BINARY_MEMBER {
                member.name
            } else {
                "a SHA-256 signature of apk.static".into()
            }));
        }
        *slot = Some(member);
    }
    let binary = binary.ok_or(ApkStaticError::Missing(BINARY_MEMBER))?;
    let signature = signature.ok_or(ApkStaticError::Missing(
        "SHA-256 signature of sbin/apk.static",
    ))?;
    let key_name = signature.name[SIGNATURE_PREFIX.len()..].to_string();
    if !is_key_file_name(&key_name) {
        return Err(ApkStaticError::BadKeyName(key_name));
    }
    Ok(Extracted {
        binary: binary.data,
        signature: signature.data,
        key_name,
    })
}

/// Alpine's key files are named like `alpine-devel@lists.alpinelinux.org-6165ee59.rsa.pub`.
fn is_key_file_name(name: &str) -> bool {
    name.len() > ".rsa.pub".len()
        && name.ends_with(".rsa.pub")
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "@._-+".contains(c))
}

/// The version of [`PACKAGE`] for `arch` in an APKINDEX (blank-line separated records of
/// `X:value` lines: `P` package, `V` version, `A` architecture).
pub fn version_in_index(index: &str, arch: &str) -> Result<String, ApkStaticError> {
    for record in index.split("\n\n") {
        let field = |key: &str| {
            record
                .lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        };
        if field("P") != Some(PACKAGE) || field("A").is_some_and(|a| a != arch) {
            continue;
        }
        let version = field("V").unwrap_or("");
        let valid = !version.is_empty()
            && !version.starts_with('.')
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c));
        if !valid {
            return Err(ApkStaticError::BadVersion(version.to_string()));
        }
        return Ok(version.to_string());
    }
    Err(ApkStaticError::NotInIndex {
        arch: arch.to_string(),
    })
}

/// One tar member whose name `read_tar_gz` was asked for.
#[derive(Debug)]
struct Member {
    name: String,
    regular: bool,
    data: Vec<u8>,
}

/// The members of a gzip'd tar whose (normalised) names `wanted` accepts, in order.
/// Concatenated gzip streams and tar segments without end blocks (Alpine's signed
/// archives) read as one archive; zero blocks between segments are skipped.
fn read_tar_gz(bytes: &[u8], wanted: impl Fn(&str) -> bool) -> Result<Vec<Member>, ApkStaticError> {
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .take(MAX_UNPACKED_BYTES + 1)
        .read_to_end(&mut tar)
        .map_err(ApkStaticError::Gzip)?;
    if tar.len() as u64 > MAX_UNPACKED_BYTES {
        return Err(ApkStaticError::TooLarge);
    }
    let mut members = Vec::new();
    let mut offset = 0;
    let mut long_name: Option<String> = None;
    let mut pax_name: Option<String> = None;
    while offset + 512 <= tar.len() {
        let header = &tar[offset..offset + 512];
        if header.iter().all(|&b| b == 0) {
            offset += 512;
            continue;
        }
        let bad = ApkStaticError::BadHeader { offset };
        if !checksum_ok(header) {
            return Err(bad);
        }
        let size = octal(&header[124..136]).ok_or(bad)? as usize;
        let typeflag = header[156];
        let mut name = text(&header[0..100]);
        if &header[257..262] == b"ustar" {
            let prefix = text(&header[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        let start = offset + 512;
        let end = start.checked_add(size).filter(|&e| e <= tar.len());
        let Some(end) = end else {
            return Err(ApkStaticError::Truncated { member: name });
        };
        let data = &tar[start..end];
        offset = start + size.div_ceil(512) * 512;
        match typeflag {
            b'L' => long_name = Some(text(data)),
            b'x' => pax_name = pax_path(data),
            b'g' => {}
            _ => {
                let name = pax_name
                    .take()
                    .or(long_name.take())
                    .unwrap_or(name)
                    .trim_start_matches("./")
                    .to_string();
                if wanted(&name) {
                    let regular = matches!(typeflag, b'0' | 0 | b'7');
                    members.push(Member {
                        name,
                        regular,
                        data: if regular { data.to_vec() } else { Vec::new() },
                    });
                }
            }
        }
    }
    Ok(members)
}

fn text(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn octal(field: &[u8]) -> Option<u64> {
    let digits = text(field);
    let digits = digits.trim_matches(|c: char| c == ' ' || c == '\0');
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, 8).ok()
}

/// The header checksum: the byte sum with the checksum field counted as spaces.
fn checksum_ok(header: &[u8]) -> bool {
    let Some(stored) = octal(&header[148..156]) else {
        return false;
    };
    let sum: u64 = header
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    sum == stored
}

/// The `path` record of a pax extended header (`<len> path=<name>\n` records).
fn pax_path(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    text.lines().find_map(|record| {
        let (_, keyvalue) = record.split_once(' ')?;
        keyvalue.strip_prefix("path=").map(str::to_string)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A ustar header and data for one member (`typeflag` b'0' file, b'2' symlink, ...).
    pub(crate) fn tar_member(name: &str, typeflag: u8, data: &[u8]) -> Vec<u8> {
        let mut header = [0u8; 512];
        header[..name.len()].copy_from_slice(name.as_bytes());
        header[100..107].copy_from_slice(b"0000755");
        header[108..115].copy_from_slice(b"0000000");
        header[116..123].copy_from_slice(b"0000000");
        header[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        header[136..147].copy_from_slice(b"00000000000");
        header[156] = typeflag;
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[148..156].copy_from_slice(b"        ");
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut out = header.to_vec();
        out.extend_from_slice(data);
        out.resize(512 + data.len().div_ceil(512) * 512, 0);
        out
    }

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    const KEY: &str = "alpine-devel@lists.alpinelinux.org-6165ee59.rsa.pub";

    fn alpine_plan() -> ApkStaticPlan {
        super::super::tests::plan_of("alpine-3.20", "none", &[])
            .base
            .apk_static
            .expect("the Alpine base plans how to obtain apk.static")
    }

    /// An .apk as Alpine lays it out: a signature segment and a control segment (tar
    /// without end blocks), then the data segment, each its own gzip stream.
    fn apk_package(data_members: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = gzip(&tar_member(&format!(".SIGN.RSA.{KEY}"), b'0', b"sig"));
        bytes.extend(gzip(&tar_member(
            ".PKGINFO",
            b'0',
            b"pkgname = apk-tools-static\n",
        )));
        let mut data: Vec<u8> = data_members.concat();
        data.extend([0u8; 1024]);
        bytes.extend(gzip(&data));
        bytes
    }

    fn index_archive(index: &str) -> Vec<u8> {
        let mut bytes = gzip(&tar_member(&format!(".SIGN.RSA.{KEY}"), b'0', b"sig"));
        let mut tar = tar_member("DESCRIPTION", b'0', b"v3.20.3");
        tar.extend(tar_member("APKINDEX", b'0', index.as_bytes()));
        tar.extend([0u8; 1024]);
        bytes.extend(gzip(&tar));
        bytes
    }

    const INDEX: &str = "C:Q1aaa=\nP:apk-tools\nV:2.14.4-r1\nA:x86_64\n\n\
                         C:Q1bbb=\nP:apk-tools-static\nV:2.14.4-r0\nA:aarch64\n\n\
                         C:Q1ccc=\nP:apk-tools-static\nV:2.14.4-r1\nA:x86_64\nS:1626112\n\n\
                         C:Q1ddd=\nP:busybox\nV:1.36.1-r29\nA:x86_64\n\n";

    #[test]
    fn the_alpine_plan_fetches_the_index_of_main_and_trusts_the_bases_keys() {
        let plan = alpine_plan();

        assert_eq!(
            plan.index_url(),
            "https://dl-cdn.alpinelinux.org/alpine/v3.20/main/x86_64/APKINDEX.tar.gz"
        );
        assert_eq!(
            plan.key_path(KEY),
            Path::new("/usr/share/distribution-gpg-keys/alpine-linux").join(KEY)
        );
        assert_eq!(
            plan.hash_inputs(),
            [
                ("package", "apk-tools-static".to_string()),
                ("release", "v3.20".to_string()),
                ("arch", "x86_64".to_string()),
            ]
        );
    }

    #[test]
    fn the_package_fetched_is_the_one_the_index_lists_for_the_arch() {
        let package = alpine_plan().package(&index_archive(INDEX)).unwrap();

        assert_eq!(package.version, "2.14.4-r1");
        assert_eq!(
            package.url,
            "https://dl-cdn.alpinelinux.org/alpine/v3.20/main/x86_64/apk-tools-static-2.14.4-r1.apk"
        );
    }

    #[test]
    fn an_index_without_the_package_or_with_a_strange_version_is_refused() {
        let plan = alpine_plan();
        let without = plan
            .package(&index_archive("P:busybox\nV:1.36.1-r29\nA:x86_64\n\n"))
            .unwrap_err();
        let traversal = plan
            .package(&index_archive(
                "P:apk-tools-static\nV:../../evil\nA:x86_64\n\n",
            ))
            .unwrap_err();
        let not_tar = plan
            .package(b"<html>mirror maintenance</html>")
            .unwrap_err();

        assert_eq!(
            without.to_string(),
            "its APKINDEX lists no apk-tools-static for x86_64"
        );
        assert!(
            matches!(traversal, ApkStaticError::BadVersion(ref v) if v == "../../evil"),
            "{traversal:?}"
        );
        assert!(matches!(not_tar, ApkStaticError::Gzip(_)), "{not_tar:?}");
    }

    #[test]
    fn the_binary_and_its_sha256_signature_come_out_of_a_multi_segment_apk() {
        let package = apk_package(&[
            tar_member("sbin/", b'5', b""),
            tar_member("sbin/apk.static", b'0', b"\x7fELF binary"),
            tar_member(
                &format!("sbin/apk.static.SIGN.RSA.{KEY}"),
                b'0',
                b"sha1 sig",
            ),
            tar_member(&format!("{SIGNATURE_PREFIX}{KEY}"), b'0', b"sha256 sig"),
        ]);

        let extracted = extract(&package).unwrap();

        assert_eq!(
            extracted,
            Extracted {
                binary: b"\x7fELF binary".to_vec(),
                signature: b"sha256 sig".to_vec(),
                key_name: KEY.to_string(),
            }
        );
    }

    #[test]
    fn a_package_without_a_sha256_signature_or_with_a_linked_binary_is_refused() {
        let sha1_only = apk_package(&[
            tar_member("sbin/apk.static", b'0', b"bin"),
            tar_member(
                &format!("sbin/apk.static.SIGN.RSA.{KEY}"),
                b'0',
                b"sha1 sig",
            ),
        ]);
        let linked = apk_package(&[
            tar_member("sbin/apk.static", b'2', b""),
            tar_member(&format!("{SIGNATURE_PREFIX}{KEY}"), b'0', b"sig"),
        ]);
        let twice = apk_package(&[
            tar_member("sbin/apk.static", b'0', b"one"),
            tar_member("sbin/apk.static", b'0', b"two"),
            tar_member(&format!("{SIGNATURE_PREFIX}{KEY}"), b'0', b"sig"),
        ]);

        assert_eq!(
            extract(&sha1_only).unwrap_err().to_string(),
            "it has no SHA-256 signature of sbin/apk.static"
        );
        assert!(matches!(
            extract(&linked).unwrap_err(),
            ApkStaticError::NotRegular(name) if name == "sbin/apk.static"
        ));
        assert!(matches!(
            extract(&twice).unwrap_err(),
            ApkStaticError::Duplicate(_)
        ));
    }

    #[test]
    fn a_signature_naming_a_path_instead_of_a_key_file_is_refused() {
        let package = apk_package(&[
            tar_member("sbin/apk.static", b'0', b"bin"),
            tar_member(&format!("{SIGNATURE_PREFIX}..rsa.pub"), b'0', b"sig"),
        ]);

        assert!(matches!(
            extract(&package).unwrap_err(),
            ApkStaticError::BadKeyName(name) if name == "..rsa.pub"
        ));
        assert!(!is_key_file_name("x/../../etc/passwd.rsa.pub"));
        assert!(is_key_file_name(KEY));
    }

    #[test]
    fn a_damaged_tar_header_is_refused() {
        let mut member = tar_member("APKINDEX", b'0', b"P:apk-tools-static\n");
        member[0] = b'B';

        let err = alpine_plan().package(&gzip(&member)).unwrap_err();

        assert!(
            matches!(err, ApkStaticError::BadHeader { offset: 0 }),
            "{err:?}"
        );
    }

    #[test]
    fn downloads_give_up_on_a_silent_server_and_verification_is_openssl_sha256() {
        let fetch = fetch_command(
            "https://m/APKINDEX.tar.gz",
            Path::new("/S/index"),
            Duration::from_secs(5),
        );
        let verify = verify_command(
            Path::new("/K/k.rsa.pub"),
            Path::new("/S/sig"),
            Path::new("/S/apk.static"),
        );

        assert_eq!(
            fetch.join(" "),
            "curl --fail --silent --show-error --location --proto =http,https,file \
             --proto-redir =http,https --connect-timeout 5 --speed-limit 1 --speed-time 15 \
             --max-time 300 --output /S/index https://m/APKINDEX.tar.gz"
        );
        assert_eq!(
            verify.join(" "),
            "openssl dgst -sha256 -verify /K/k.rsa.pub -signature /S/sig /S/apk.static"
        );
    }
}
