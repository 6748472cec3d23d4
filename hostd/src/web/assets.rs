//! The page's files, embedded in the binary from `web/` at the workspace root (no build
//! step, no CDN, nothing fetched at run time).

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file served, by request path.
pub const ASSETS: &[(&str, Asset)] = &[
    (
        "/",
        Asset {
            content_type: HTML,
            body: include_bytes!("../../../web/index.html"),
        },
    ),
    (
        "/genos.css",
        Asset {
            content_type: CSS,
            body: include_bytes!("../../../web/genos.css"),
        },
    ),
    (
        "/keymap.js",
        Asset {
            content_type: JS,
            body: include_bytes!("../../../web/keymap.js"),
        },
    ),
    (
        "/genos.js",
        Asset {
            content_type: JS,
            body: include_bytes!("../../../web/genos.js"),
        },
    ),
];

/// The file served at `path` (`/index.html` is `/`).
pub fn get(path: &str) -> Option<Asset> {
    let path = if path == "/index.html" { "/" } else { path };
    ASSETS.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_scripts_are_served_and_nothing_else() {
        assert!(get("/").unwrap().content_type.starts_with("text/html"));
        assert_eq!(get("/index.html").unwrap().body, get("/").unwrap().body);
        let page = std::str::from_utf8(get("/").unwrap().body).unwrap();
        for script in ["/keymap.js", "/genos.js", "/genos.css"] {
            assert!(page.contains(script), "index.html does not load {script}");
            assert!(get(script).is_some());
        }
        assert!(get("/../Cargo.toml").is_none());
        assert!(get("/ws").is_none());
    }
}
