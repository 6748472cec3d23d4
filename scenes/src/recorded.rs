//! Recorded real desktops as a frame source, beside the synthetic scenes.
//!
//! `scripts/record-desktops` grabs real programs on an X server into lossless FFV1 files and
//! writes a manifest (`manifest.tsv`: name, file, size, rate, frame count, sha256). A
//! [`RecordedSource`] checks a recording against its manifest entry, decodes it with ffmpeg
//! (scaled and resampled to the size and rate asked for) into raw BGRX piped to us, and finds
//! each frame's damage by comparing it with the previous one ([`encoder::changed_rects`]),
//! since a recording carries no damage.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Instant;

use encoder::{FrameRef, FrameSource, PixelFormat, Rect, SourceError, SourceFrame};
use sha2::{Digest, Sha256};

use crate::Pacer;

/// Manifest file name inside the recordings directory.
pub const MANIFEST: &str = "manifest.tsv";

/// Why a recording cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("cannot read {path} (make the recordings with scripts/record-desktops)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Manifest {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("no recording named {0:?} in the manifest")]
    Unknown(String),
    #[error(
        "{path} has sha256 {actual}, the manifest says {expected} (re-run scripts/record-desktops)"
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("cannot run ffmpeg to decode {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading decoded frames of {path} failed")]
    Decode {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "size {width}x{height} or rate {fps} is not usable (even sizes 16..=8192, 1..=240 fps)"
    )]
    Format { width: u32, height: u32, fps: f32 },
}

/// One recording as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recording {
    pub name: String,
    pub path: PathBuf,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub frames: u32,
    /// Frames that differ from the one before (the grab repeats frames when nothing was drawn).
    pub distinct_frames: u32,
    /// Hex sha256 of the file.
    pub sha256: String,
}

impl Recording {
    /// Hashes the file and compares it with the manifest's checksum.
    pub fn verify(&self) -> Result<(), RecordingError> {
        let read_err = |source| RecordingError::Read {
            path: self.path.clone(),
            source,
        };
        let mut file = std::fs::File::open(&self.path).map_err(read_err)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let actual: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if actual != self.sha256 {
            return Err(RecordingError::Checksum {
                path: self.path.clone(),
                expected: self.sha256.clone(),
                actual,
            });
        }
        Ok(())
    }
}

/// Where `scripts/record-desktops` puts recordings: `$GENOS_RECORDINGS`, else
/// `~/.cache/genos/recordings`.
pub fn recordings_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GENOS_RECORDINGS") {
        return dir.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/genos/recordings")
}

/// The recordings a manifest lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub recordings: Vec<Recording>,
}

impl Manifest {
    /// Reads `dir/manifest.tsv`.
    pub fn load(dir: &Path) -> Result<Self, RecordingError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|source| RecordingError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(dir, &path, &text)
    }

    /// Parses manifest text; files are taken relative to `dir`, `path` names it in errors.
    pub fn parse(dir: &Path, path: &Path, text: &str) -> Result<Self, RecordingError> {
        let mut recordings = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let bad = |reason: String| RecordingError::Manifest {
                path: path.to_path_buf(),
                line: i + 1,
                reason,
            };
            let fields: Vec<&str> = line.split('\t').collect();
            let [name, file, size, fps, frames, distinct, sha256] = fields[..] else {
                return Err(bad(format!("{} fields, 7 expected", fields.len())));
            };
            let (width, height) = size
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
                .ok_or_else(|| bad(format!("size {size:?} is not WxH")))?;
            let number = |what: &str, v: &str| {
                v.parse::<u32>()
                    .map_err(|e| bad(format!("{what} {v:?}: {e}")))
            };
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("sha256 {sha256:?} is not 64 hex digits")));
            }
            if file.contains('/') {
                return Err(bad(format!("file {file:?} is not a plain name")));
            }
            recordings.push(Recording {
                name: name.to_string(),
                path: dir.join(file),
                width,
                height,
                fps: number("fps", fps)?,
                frames: number("frames", frames)?,
                distinct_frames: number("distinct frames", distinct)?,
                sha256: sha256.to_ascii_lowercase(),
            });
        }
        Ok(Self { recordings })
    }

    pub fn get(&self, name: &str) -> Result<&Recording, RecordingError> {
        self.recordings
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| RecordingError::Unknown(name.to_string()))
    }
}

/// A recording decoded by ffmpeg at a chosen size and rate, with damage from frame compares.
pub struct RecordedSource {
    path: PathBuf,
    width: u32,
    height: u32,
    child: Child,
    stdout: BufReader<ChildStdout>,
    /// The frame last returned and the one before it (swapped on each read).
    current: Vec<u8>,
    previous: Vec<u8>,
    read: u64,
    finished: bool,
    pacer: Pacer,
}

impl std::fmt::Debug for RecordedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordedSource")
            .field("path", &self.path)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl RecordedSource {
    /// Decodes `recording` scaled to `width` x `height` (bicubic, when it differs) and at `fps`
    /// (frames dropped or repeated as ffmpeg's `fps` filter does: a 60 fps recording at 30 fps
    /// keeps every second frame, so motion per frame doubles as with a slower capture).
    /// Call [`Recording::verify`] first to be sure of what is read.
    pub fn open(
        recording: &Recording,
        width: u32,
        height: u32,
        fps: u32,
    ) -> Result<Self, RecordingError> {
        if !(16..=8192).contains(&width)
            || !(16..=8192).contains(&height)
            || width % 2 != 0
            || height % 2 != 0
            || !(1..=240).contains(&fps)
        {
            return Err(RecordingError::Format {
                width,
                height,
                fps: fps as f32,
            });
        }
        let mut filters = format!("fps={fps}");
        if (width, height) != (recording.width, recording.height) {
            filters.push_str(&format!(",scale={width}:{height}:flags=bicubic"));
        }
        let mut child = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-i"])
            .arg(&recording.path)
            .args(["-vf", &filters, "-f", "rawvideo", "-pix_fmt", "bgr0", "-"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| RecordingError::Spawn {
                path: recording.path.clone(),
                source,
            })?;
        let stdout = child.stdout.take().ok_or_else(|| RecordingError::Spawn {
            path: recording.path.clone(),
            source: std::io::Error::other("no stdout pipe"),
        })?;
        let bytes = width as usize * height as usize * 4;
        Ok(Self {
            path: recording.path.clone(),
            width,
            height,
            child,
            stdout: BufReader::with_capacity(1 << 20, stdout),
            current: vec![0; bytes],
            previous: vec![0; bytes],
            read: 0,
            finished: false,
            pacer: Pacer::new(fps as f32),
        })
    }

    /// Frames returned so far.
    pub fn frames_read(&self) -> u64 {
        self.read
    }

    /// The next frame at once (no pacing), or `None` at the end of the recording. Damage is
    /// the whole screen for the first frame, then what differs from the frame before.
    pub fn advance(&mut self) -> Result<Option<SourceFrame<'_>>, RecordingError> {
        if self.finished {
            return Ok(None);
        }
        std::mem::swap(&mut self.current, &mut self.previous);
        if let Err(source) = read_full(&mut self.stdout, &mut self.current) {
            self.finished = true;
            let _ = self.child.kill();
            let _ = self.child.wait();
            return match source.kind() {
                std::io::ErrorKind::UnexpectedEof => Ok(None),
                _ => Err(RecordingError::Decode {
                    path: self.path.clone(),
                    source,
                }),
            };
        }
        self.read += 1;
        let (w, h) = (self.width, self.height);
        let cur = FrameRef::packed(w, h, PixelFormat::Bgrx, &self.current);
        let damage = if self.read == 1 {
            vec![Rect::new(0, 0, w, h)]
        } else {
            let prev = FrameRef::packed(w, h, PixelFormat::Bgrx, &self.previous);
            encoder::changed_rects(&prev, &cur).map_err(|e| RecordingError::Decode {
                path: self.path.clone(),
                source: std::io::Error::other(e),
            })?
        };
        Ok(Some(SourceFrame {
            frame: cur,
            damage,
            captured_at: Instant::now(),
        }))
    }
}

/// Fills `buf` completely; a stream that ends at a frame boundary is `UnexpectedEof` with
/// nothing read, one that ends inside a frame is an error of its own.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("stream ended {filled} bytes into a frame"),
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Drop for RecordedSource {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl FrameSource for RecordedSource {
    fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// Paced like the synthetic scenes; the end of the recording is [`SourceError::Closed`].
    fn next_frame(&mut self, deadline: Instant) -> Result<Option<SourceFrame<'_>>, SourceError> {
        if !self.pacer.wait(deadline) {
            return Ok(None);
        }
        match self.advance() {
            Ok(Some(frame)) => Ok(Some(frame)),
            Ok(None) => Err(SourceError::Closed),
            Err(e) => Err(SourceError::Other(crate::error_chain(&e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "fd09e861a11ca97d52480f04b34ecb33198e1abcf22c597d5b603c0ca93bb2ac";

    #[test]
    fn manifest_lines_become_recordings_and_comments_are_skipped() {
        let text = format!("# comment\nterm\tterm.mkv\t1920x1080\t60\t310\t42\t{SHA}\n\n");

        let m = Manifest::parse(Path::new("/rec"), Path::new("/rec/m"), &text).unwrap();

        assert_eq!(
            m.recordings,
            vec![Recording {
                name: "term".into(),
                path: "/rec/term.mkv".into(),
                width: 1920,
                height: 1080,
                fps: 60,
                frames: 310,
                distinct_frames: 42,
                sha256: SHA.into(),
            }]
        );
        assert!(m.get("term").is_ok());
        assert!(matches!(m.get("nope"), Err(RecordingError::Unknown(_))));
    }

    #[test]
    fn malformed_manifest_lines_say_which_line_and_why() {
        let cases = [
            "a\tb.mkv\t1920x1080\t60\t1\t1".to_string(),
            format!("a\tb.mkv\t1920-1080\t60\t1\t1\t{SHA}"),
            format!("a\tb.mkv\t1920x1080\tsixty\t1\t1\t{SHA}"),
            "a\tb.mkv\t1920x1080\t60\t1\t1\tnothex".to_string(),
            format!("a\t../b.mkv\t1920x1080\t60\t1\t1\t{SHA}"),
        ];
        for case in cases {
            let text = format!("# header\n{case}\n");

            let err = Manifest::parse(Path::new("/r"), Path::new("/r/m"), &text).unwrap_err();

            assert!(
                matches!(err, RecordingError::Manifest { line: 2, .. }),
                "{case:?}: {err}"
            );
        }
    }

    #[test]
    fn a_file_that_does_not_match_its_checksum_is_refused() {
        let dir = std::env::temp_dir().join(format!("genos-rec-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x.mkv"), b"not the recording").unwrap();
        let rec = Recording {
            name: "x".into(),
            path: dir.join("x.mkv"),
            width: 16,
            height: 16,
            fps: 60,
            frames: 1,
            distinct_frames: 1,
            sha256: SHA.into(),
        };

        let result = rec.verify();
        std::fs::remove_dir_all(&dir).unwrap();

        assert!(matches!(result, Err(RecordingError::Checksum { .. })));
    }

    #[test]
    fn read_full_tells_a_clean_end_from_a_cut_frame() {
        let mut buf = [0u8; 4];

        let clean = read_full(&mut &[][..], &mut buf).unwrap_err();
        let cut = read_full(&mut &[1u8, 2][..], &mut buf).unwrap_err();
        read_full(&mut &[1u8, 2, 3, 4][..], &mut buf).unwrap();

        assert_eq!(clean.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(cut.kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(buf, [1, 2, 3, 4]);
    }
}
