//! Control API input: arbitrary bytes through the HTTP parser (as a stream of pipelined
//! requests, the way the server reads a connection) and every complete request through
//! the router. Nothing may panic; parsing a prefix must agree with parsing the whole.

use vmm::api::http::{parse_request, Limits, Parsed};
use vmm::api::router::route;

/// The target body: any input, no panic, and the oracle above.
pub fn run(data: &[u8]) {
    let limits = Limits {
        max_head_bytes: 2048,
        max_headers: 16,
        max_body_bytes: 16 * 1024,
    };

    // A request complete within a prefix is the same request in the whole buffer.
    if let Some(&cut) = data.first() {
        let cut = usize::from(cut).min(data.len());
        if let Ok(prefix @ Parsed::Complete { .. }) = parse_request(&data[..cut], &limits) {
            assert_eq!(parse_request(data, &limits), Ok(prefix));
        }
    }

    let mut rest = data;
    while let Ok(Parsed::Complete { request, consumed }) = parse_request(rest, &limits) {
        assert!(consumed > 0 && consumed <= rest.len());
        assert!(request.body.len() <= limits.max_body_bytes);
        if let Err(e) = route(&request) {
            assert!((400..500).contains(&e.status), "{e:?}");
        }
        rest = &rest[consumed..];
    }
}
