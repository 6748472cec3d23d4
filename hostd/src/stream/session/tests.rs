//! Unit tests of the session core's parts.

use proto::stream::Button;

use super::*;

const START_UNIX_S: u64 = 1_800_000_000;
const MS: Duration = Duration::from_millis(1);

fn stream_config() -> StreamConfig {
    StreamConfig {
        width: 640,
        height: 480,
        fps_milli: 30_000,
        codec: Codec::H264AnnexB,
        bitrate_bps: 2_500_000,
    }
}

// Parts of the core on their own.

#[test]
fn held_input_is_released_on_expiry() {
    let mut h = HeldInput::default();
    h.track(&InputEvent::Key {
        code: 30,
        pressed: true,
    });
    h.track(&InputEvent::Key {
        code: 31,
        pressed: true,
    });
    h.track(&InputEvent::Key {
        code: 31,
        pressed: false,
    });
    h.track(&InputEvent::PointerButton {
        button: Button::Right,
        pressed: true,
    });
    let mut r = h.releases();
    r.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        r,
        vec![
            InputEvent::Key {
                code: 30,
                pressed: false
            },
            InputEvent::PointerButton {
                button: Button::Right,
                pressed: false
            },
        ]
    );
}

#[test]
fn pointer_coordinates_are_clamped_to_the_frame() {
    let cfg = StreamConfig {
        width: 100,
        height: 50,
        ..stream_config()
    };
    assert_eq!(
        clamp_event(InputEvent::PointerMove { x: 500, y: 20 }, &cfg),
        InputEvent::PointerMove { x: 99, y: 20 }
    );
}

#[test]
fn in_flight_limit_grows_with_round_trip_time() {
    assert_eq!(in_flight_limit(4, Duration::from_micros(100), 60_000), 5);
    assert_eq!(in_flight_limit(4, Duration::from_millis(40), 60_000), 9);
}

#[test]
fn expiry_instants_are_bounded_for_tokens_that_never_expire() {
    let now = Instant::now();
    let clock = Clock::new(now, START_UNIX_S * 1_000_000);

    let never = clock.instant_at_unix(u64::MAX, now);
    let past = clock.instant_at_unix(1, now);

    assert_eq!(never, now + FAR_FUTURE);
    assert_eq!(past, now);
}

#[test]
fn clock_maps_instants_to_unix_time() {
    let now = Instant::now();
    let c = Clock::new(now, START_UNIX_S * 1_000_000);
    assert_eq!(c.unix_us(now + 5 * MS), START_UNIX_S * 1_000_000 + 5_000);
    assert_eq!(c.unix_us(now - 5 * MS), START_UNIX_S * 1_000_000 - 5_000);
    assert_eq!(
        c.unix_s(now + Duration::from_millis(1500)),
        START_UNIX_S + 1
    );
}
