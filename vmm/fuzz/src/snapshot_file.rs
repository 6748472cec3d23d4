//! A snapshot state file from disk (`PUT /snapshot/load`, `--restore`): parsing never panics,
//! whatever the bytes; a file is accepted only with a correct container (magic, versions,
//! length, CRC-64), and an accepted state serialises back to a file that parses to the same
//! state.
//!
//! The first byte picks what the rest is: 0, a whole file as read from disk; otherwise the
//! state JSON, wrapped in a correct container here, so that the fuzzer reaches the state
//! parser and its checks past the checksum.

use vmm::snapshot::{format, parse};

/// The target body.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = match mode {
        0 => rest.to_vec(),
        _ => format::encode(rest),
    };
    let Ok(state) = parse(&file) else {
        return;
    };
    let body = format::decode(&file).expect("an accepted file has a valid container");
    assert_eq!(
        body.len() as u64 + 30 + format::VMM_VERSION.len() as u64,
        file.len() as u64
    );
    let json = serde_json::to_vec(&state).expect("an accepted state serialises");
    let again = parse(&format::encode(&json)).expect("a re-serialised state parses");
    assert_eq!(
        serde_json::to_value(&again).unwrap(),
        serde_json::to_value(&state).unwrap(),
        "the state does not round-trip"
    );
}
