//! Checks the page's key table (`web/keymap.js`, KeyboardEvent.code → evdev code) against
//! the keys genos-vmm's keyboard accepts and the values of `linux/input-event-codes.h`, and
//! that every key the page names (the overlay's buttons in `web/index.html`, `K.Name` in
//! `web/genos.js`) is in the table: key codes are written down nowhere else.

use std::collections::HashMap;

const KEYMAP_JS: &str = include_str!("../../../web/keymap.js");
const INDEX_HTML: &str = include_str!("../../../web/index.html");
const GENOS_JS: &str = include_str!("../../../web/genos.js");

/// The table's entries, in file order.
fn entries() -> Vec<(&'static str, u16)> {
    let body = KEYMAP_JS
        .split_once("Object.freeze({")
        .and_then(|(_, rest)| rest.split_once("});"))
        .expect("keymap.js has the GENOS_KEYMAP object")
        .0;
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .map(|l| {
            let (code, value) = l
                .trim_end_matches(',')
                .split_once(':')
                .unwrap_or_else(|| panic!("not `Code: number,`: {l:?}"));
            let value = value
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {l:?}"));
            (code.trim(), value)
        })
        .collect()
}

#[test]
fn every_mapped_key_is_one_the_vmm_keyboard_accepts() {
    let entries = entries();
    assert!(entries.len() > 100, "only {} keys", entries.len());
    for (code, key) in &entries {
        assert!(
            vmm_api::input::keyboard_accepts(*key),
            "{code} maps to {key}, which the VMM keyboard refuses"
        );
    }
}

#[test]
fn no_key_is_mapped_twice_and_no_code_appears_twice() {
    let entries = entries();
    let mut by_code = HashMap::new();
    let mut by_key = HashMap::new();
    for (code, key) in entries {
        assert!(by_code.insert(code, key).is_none(), "{code} twice");
        if let Some(other) = by_key.insert(key, code) {
            panic!("{code} and {other} both map to {key}");
        }
    }
}

#[test]
fn keys_have_their_input_event_codes_values() {
    let map: HashMap<_, _> = entries().into_iter().collect();
    // From linux/input-event-codes.h.
    let expected = [
        ("Escape", 1),
        ("Digit1", 2),
        ("Digit0", 11),
        ("Backspace", 14),
        ("Tab", 15),
        ("KeyQ", 16),
        ("KeyP", 25),
        ("Enter", 28),
        ("ControlLeft", 29),
        ("KeyA", 30),
        ("KeyL", 38),
        ("ShiftLeft", 42),
        ("KeyZ", 44),
        ("KeyM", 50),
        ("AltLeft", 56),
        ("Space", 57),
        ("F1", 59),
        ("F10", 68),
        ("F11", 87),
        ("F12", 88),
        ("ControlRight", 97),
        ("AltRight", 100),
        ("Home", 102),
        ("ArrowUp", 103),
        ("ArrowLeft", 105),
        ("ArrowRight", 106),
        ("ArrowDown", 108),
        ("Delete", 111),
        ("MetaLeft", 125),
        ("ContextMenu", 127),
        ("F13", 183),
        ("F24", 194),
    ];
    for (code, key) in expected {
        assert_eq!(map.get(code), Some(&key), "{code}");
    }
    for c in 'A'..='Z' {
        assert!(
            map.contains_key(format!("Key{c}").as_str()),
            "Key{c} missing"
        );
    }
    for d in 0..=9 {
        assert!(map.contains_key(format!("Digit{d}").as_str()), "Digit{d}");
    }
}

/// The names after each `marker` in `text` (not preceded by a letter, digit or `_`), up to
/// the first character that cannot be in a KeyboardEvent.code.
fn names_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
    text.match_indices(marker)
        .filter(|(i, _)| {
            !text[..*i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(|(i, _)| {
            let rest = &text[i + marker.len()..];
            let end = rest
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

#[test]
fn every_key_the_page_names_is_in_the_table() {
    let map: HashMap<_, _> = entries().into_iter().collect();
    let buttons: Vec<_> = names_after(INDEX_HTML, "data-key=\"")
        .into_iter()
        .chain(names_after(INDEX_HTML, "data-mod=\""))
        .collect();
    for f in 1..=12 {
        assert!(
            buttons.contains(&format!("F{f}").as_str()),
            "the overlay has no F{f}"
        );
    }
    let in_script = names_after(GENOS_JS, "K.");
    assert!(in_script.len() >= 8, "genos.js names keys as K.Name");
    for name in buttons.into_iter().chain(in_script) {
        assert!(map.contains_key(name), "{name} is not in web/keymap.js");
    }
}
