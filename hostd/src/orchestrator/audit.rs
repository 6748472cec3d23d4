//! The audit chain as the orchestrator writes and reads it, and what it keeps of a
//! request's text.

use super::{OrchError, Orchestrator};
use crate::store::AuditReport;

/// Longest request text the audit log keeps verbatim; longer texts are cut there and
/// recorded with their length and SHA-256.
pub const AUDIT_TEXT_MAX: usize = 1024;

/// What the audit log records of a request's text: all of it up to [`AUDIT_TEXT_MAX`]
/// bytes, else its first bytes (at a character boundary), its length and its SHA-256.
pub fn audit_text(text: &str) -> String {
    if text.len() <= AUDIT_TEXT_MAX {
        return text.to_string();
    }
    let mut end = AUDIT_TEXT_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    format!(
        "{}... ({} bytes, sha256 {})",
        &text[..end],
        text.len(),
        hex::encode(digest)
    )
}

impl Orchestrator {
    pub fn verify_audit(&self) -> Result<AuditReport, OrchError> {
        Ok(self.store().verify_audit()?)
    }

    pub fn audit_entries(&self, limit: i64) -> Result<Vec<crate::store::AuditEntry>, OrchError> {
        Ok(self.store().audit_entries(Some(limit))?)
    }

    /// Records an operator or client action in the audit chain.
    pub fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<(), OrchError> {
        self.store().audit(actor, action, target, detail)?;
        Ok(())
    }
}
