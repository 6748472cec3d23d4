//! Display modes through RandR 1.3: the first connected output gets a mode of the asked
//! size (one the server has, else one made from CVT timings and added to the output, as
//! `xrandr --newmode/--addmode` and spice-vdagent do), the screen takes that size and the
//! output's CRTC shows the mode at 0,0.

use x11rb::connection::Connection;
use x11rb::errors::{ConnectionError, ReplyError};
use x11rb::protocol::randr::{self, ConnectionExt as _, ModeFlag, ModeInfo, Rotation, SetConfig};
use x11rb::protocol::xproto::Window;

use super::cvt::cvt;

/// Why a mode could not be set.
#[derive(Debug, thiserror::Error)]
pub enum DisplayError {
    #[error("{width}x{height} is outside the screen's range {min_w}x{min_h} to {max_w}x{max_h}")]
    OutOfRange {
        width: u16,
        height: u16,
        min_w: u16,
        min_h: u16,
        max_w: u16,
        max_h: u16,
    },
    #[error("the X server has no RandR extension")]
    NoRandr,
    #[error("no connected output on the X screen")]
    NoOutput,
    #[error("output {0} has no CRTC to drive it")]
    NoCrtc(String),
    #[error("no CVT timings for {0}x{1}")]
    NoTimings(u16, u16),
    #[error("the X server refused the CRTC configuration ({0:?})")]
    Refused(SetConfig),
    #[error("RandR request failed: {0}")]
    Request(#[from] ReplyError),
    #[error("X connection lost: {0}")]
    Connection(#[from] ConnectionError),
}

impl DisplayError {
    /// Whether the X connection is gone (as opposed to this request failing).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            DisplayError::Connection(_) | DisplayError::Request(ReplyError::ConnectionError(_))
        )
    }
}

/// A mode the server knows: id and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownMode {
    pub id: u32,
    pub width: u16,
    pub height: u16,
}

/// Which mode to use for a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeChoice {
    /// One of the output's own modes.
    OnOutput(u32),
    /// A mode the server has but the output does not list yet: add it first.
    AddToOutput(u32),
    /// None of that size: create one.
    Create,
}

/// Picks the mode for `width`×`height`: the output's own first, then any of the screen's.
pub fn choose_mode(output_modes: &[u32], all: &[KnownMode], width: u16, height: u16) -> ModeChoice {
    let sized = |m: &&KnownMode| m.width == width && m.height == height;
    if let Some(m) = all
        .iter()
        .filter(sized)
        .find(|m| output_modes.contains(&m.id))
    {
        return ModeChoice::OnOutput(m.id);
    }
    match all.iter().find(sized) {
        Some(m) => ModeChoice::AddToOutput(m.id),
        None => ModeChoice::Create,
    }
}

/// Physical size in mm that makes the screen 96 dpi (what desktops assume for a VM).
fn mm(pixels: u16) -> u32 {
    (f64::from(pixels) * 25.4 / 96.0).round() as u32
}

/// Sets the first connected output of `root`'s screen to `width`×`height`.
pub fn set_mode(
    conn: &impl Connection,
    root: Window,
    width: u16,
    height: u16,
) -> Result<(), DisplayError> {
    if conn
        .extension_information(randr::X11_EXTENSION_NAME)?
        .is_none()
    {
        return Err(DisplayError::NoRandr);
    }
    conn.randr_query_version(1, 3)?.reply()?;
    let range = conn.randr_get_screen_size_range(root)?.reply()?;
    if width < range.min_width
        || height < range.min_height
        || width > range.max_width
        || height > range.max_height
    {
        return Err(DisplayError::OutOfRange {
            width,
            height,
            min_w: range.min_width,
            min_h: range.min_height,
            max_w: range.max_width,
            max_h: range.max_height,
        });
    }
    let res = conn.randr_get_screen_resources_current(root)?.reply()?;
    let mut chosen = None;
    for &output in &res.outputs {
        let info = conn
            .randr_get_output_info(output, res.config_timestamp)?
            .reply()?;
        if info.connection == randr::Connection::CONNECTED {
            chosen = Some((output, info));
            break;
        }
    }
    let (output, info) = chosen.ok_or(DisplayError::NoOutput)?;
    let name = String::from_utf8_lossy(&info.name).into_owned();
    let known: Vec<KnownMode> = res
        .modes
        .iter()
        .map(|m| KnownMode {
            id: m.id,
            width: m.width,
            height: m.height,
        })
        .collect();
    let mode = match choose_mode(&info.modes, &known, width, height) {
        ModeChoice::OnOutput(id) => id,
        ModeChoice::AddToOutput(id) => {
            conn.randr_add_output_mode(output, id)?.check()?;
            id
        }
        ModeChoice::Create => {
            let t = cvt(width, height, 60.0).ok_or(DisplayError::NoTimings(width, height))?;
            let mode_name = format!("{width}x{height}_genos");
            let mode_info = ModeInfo {
                id: 0,
                width,
                height,
                dot_clock: t.clock_khz * 1000,
                hsync_start: t.hsync_start,
                hsync_end: t.hsync_end,
                htotal: t.htotal,
                hskew: 0,
                vsync_start: t.vsync_start,
                vsync_end: t.vsync_end,
                vtotal: t.vtotal,
                name_len: mode_name.len() as u16,
                mode_flags: ModeFlag::HSYNC_NEGATIVE | ModeFlag::VSYNC_POSITIVE,
            };
            let id = conn
                .randr_create_mode(root, mode_info, mode_name.as_bytes())?
                .reply()?
                .mode;
            conn.randr_add_output_mode(output, id)?.check()?;
            id
        }
    };
    let crtc = if info.crtc != 0 {
        info.crtc
    } else {
        *info.crtcs.first().ok_or(DisplayError::NoCrtc(name))?
    };
    // A CRTC showing beyond the new screen makes the resize fail: switch those off first.
    for &c in &res.crtcs {
        let ci = conn.randr_get_crtc_info(c, res.config_timestamp)?.reply()?;
        let right = i32::from(ci.x) + i32::from(ci.width);
        let bottom = i32::from(ci.y) + i32::from(ci.height);
        if ci.mode != 0 && (right > i32::from(width) || bottom > i32::from(height)) {
            let off = conn
                .randr_set_crtc_config(
                    c,
                    x11rb::CURRENT_TIME,
                    res.config_timestamp,
                    0,
                    0,
                    0,
                    Rotation::ROTATE0,
                    &[],
                )?
                .reply()?;
            if off.status != SetConfig::SUCCESS {
                return Err(DisplayError::Refused(off.status));
            }
        }
    }
    conn.randr_set_screen_size(root, width, height, mm(width), mm(height))?
        .check()?;
    let set = conn
        .randr_set_crtc_config(
            crtc,
            x11rb::CURRENT_TIME,
            res.config_timestamp,
            0,
            0,
            mode,
            Rotation::ROTATE0,
            &[output],
        )?
        .reply()?;
    if set.status != SetConfig::SUCCESS {
        return Err(DisplayError::Refused(set.status));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODES: [KnownMode; 3] = [
        KnownMode {
            id: 1,
            width: 1024,
            height: 768,
        },
        KnownMode {
            id: 2,
            width: 1280,
            height: 720,
        },
        KnownMode {
            id: 3,
            width: 1280,
            height: 720,
        },
    ];

    #[test]
    fn the_outputs_own_mode_of_the_size_is_preferred() {
        assert_eq!(
            choose_mode(&[1, 3], &MODES, 1280, 720),
            ModeChoice::OnOutput(3)
        );
    }

    #[test]
    fn a_screen_mode_the_output_lacks_is_added_and_a_missing_size_created() {
        assert_eq!(
            choose_mode(&[1], &MODES, 1280, 720),
            ModeChoice::AddToOutput(2)
        );
        assert_eq!(choose_mode(&[1], &MODES, 1366, 768), ModeChoice::Create);
    }

    #[test]
    fn the_physical_size_is_96_dpi() {
        assert_eq!(mm(1920), 508);
    }
}
