//! `proto::spec` JSON (`Spec::from_json`, the admin API's and the image builder's input):
//! any text is refused with an error or gives a spec that validates, serialises and parses
//! back to the same spec, and that the catalog checks without panicking.
//!
//! Input: the JSON text (invalid UTF-8 is replaced, so the parser sees every byte pattern
//! the mutator finds).

use proto::spec::{is_valid_name, limits, Catalog, Spec};

/// The target body: see the module documentation.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(spec) = Spec::from_json(&text) else {
        return;
    };
    assert_eq!(spec.validate(), Ok(()));
    assert!(is_valid_name(&spec.name), "{:?}", spec.name);
    assert!(limits::VCPUS.contains(&spec.vcpus));
    assert!(spec.network.allow.len() <= limits::ALLOW_MAX);

    let json = serde_json::to_string(&spec).expect("a spec serialises");
    assert_eq!(Spec::from_json(&json).as_ref(), Ok(&spec), "{json}");

    // Names the catalog does not know are refused there, never a panic.
    let _ = Catalog::embedded().check_spec(&spec);
}
