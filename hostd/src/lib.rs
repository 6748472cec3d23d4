//! GenOS host daemon and operator CLI.
//!
//! `composer` turns requests into specs (`llm` is its optional model backend); `config`
//! loads `configs/hostd.toml`; `store` keeps environments and the audit chain in SQLite;
//! `orchestrator` builds, boots and supervises environments; `admin` serves the operator
//! socket; `doctor` checks the host (`genos doctor`, `/v1/health`); `uds` is HTTP over Unix sockets (CLI → hostd, hostd → genos-vmm); `pidfd` holds
//! VMM processes by pidfd; `stream` streams environments to viewers.

pub mod admin;
pub mod agent;
pub mod body_channel;
pub mod composer;
pub mod config;
pub mod doctor;
pub mod fleet;
pub mod llm;
pub mod orchestrator;
pub mod pidfd;
pub mod store;
pub mod stream;
pub mod uds;
pub mod vm_source;
pub mod vmm_client;
pub mod web;

/// An error and its sources on one line, "outer: inner: innermost". A source whose text
/// the line already ends with (an error that prints its source itself) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot start")]
        Wraps(#[source] std::io::Error),
        #[error("cannot run: {0}")]
        Prints(#[source] std::io::Error),
    }

    #[test]
    fn error_chain_joins_sources_once() {
        let io = || std::io::Error::other("no such file");
        assert_eq!(
            error_chain(&Outer::Wraps(io())),
            "cannot start: no such file"
        );
        assert_eq!(
            error_chain(&Outer::Prints(io())),
            "cannot run: no such file"
        );
    }
}
