//! The orchestrator's error: what its public API refuses or fails with.

use proto::spec::SpecError;

use super::capacity::AdmissionError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum OrchError {
    #[error("invalid spec: {0}")]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error("no environment named {0:?}")]
    NotFound(String),
    #[error("cannot {action} {name}: it is {state}")]
    WrongState {
        name: String,
        action: &'static str,
        state: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("viewer tokens: {0}")]
    Token(String),
    #[error("cannot revoke the token")]
    Revoke(#[source] crate::stream::TokenError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("guest agent of {name}")]
    Agent {
        name: String,
        #[source]
        source: crate::agent::AgentError,
    },
}
