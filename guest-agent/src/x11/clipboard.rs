//! The clipboard's pure parts: which selection targets the agent offers and how it answers
//! each, which MIME types a host may ask for, the text encodings, and the bounded
//! accumulation of an incoming transfer (whole or INCR).

use proto::agent::{MAX_CLIPBOARD_LEN, MIME_TEXT_UTF8};

/// The atoms the clipboard speaks, as numbers (interned once per connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetAtoms {
    pub targets: u32,
    pub utf8_string: u32,
    pub string: u32,
    pub text: u32,
    pub mime_utf8: u32,
}

/// How to answer a `SelectionRequest` for a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The list of targets, type ATOM.
    Targets,
    /// The text as UTF-8, with this property type.
    Utf8 { type_: u32 },
    /// The text as ISO 8859-1 (type STRING).
    Latin1,
    /// Not offered: the property is None in the SelectionNotify (ICCCM's refusal).
    Refuse,
}

impl TargetAtoms {
    /// What the agent offers as owner, in order of preference (the TARGETS reply).
    pub fn offered(&self) -> [u32; 5] {
        [
            self.targets,
            self.utf8_string,
            self.mime_utf8,
            self.text,
            self.string,
        ]
    }

    /// The answer to a request for `target`. TEXT is answered as UTF8_STRING (ICCCM lets
    /// the owner pick TEXT's encoding); MULTIPLE, TIMESTAMP and others are refused.
    pub fn answer(&self, target: u32) -> Answer {
        if target == self.targets {
            Answer::Targets
        } else if target == self.utf8_string || target == self.text {
            Answer::Utf8 {
                type_: self.utf8_string,
            }
        } else if target == self.mime_utf8 {
            Answer::Utf8 {
                type_: self.mime_utf8,
            }
        } else if target == self.string {
            Answer::Latin1
        } else {
            Answer::Refuse
        }
    }

    /// Turns a received property of type `type_` into UTF-8; `None` for a type that is not
    /// text.
    pub fn decode(&self, type_: u32, data: &[u8]) -> Option<Vec<u8>> {
        if type_ == self.string {
            Some(latin1_to_utf8(data).into_bytes())
        } else if type_ == self.utf8_string || type_ == self.mime_utf8 || type_ == self.text {
            Some(data.to_vec())
        } else {
            None
        }
    }
}

/// Whether a host's MIME type asks for UTF-8 text (the one type this agent moves):
/// `text/plain;charset=utf-8` in any case and spacing, or plain `text/plain`.
pub fn is_text_mime(mime: &str) -> bool {
    let norm: String = mime
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    norm == MIME_TEXT_UTF8 || norm == "text/plain" || norm == "text/plain;charset=\"utf-8\""
}

/// ISO 8859-1 bytes as a string (every byte is the code point of the same value).
pub fn latin1_to_utf8(data: &[u8]) -> String {
    data.iter().map(|&b| char::from(b)).collect()
}

/// A string as ISO 8859-1; characters outside it become `?`.
pub fn utf8_to_latin1(text: &str) -> Vec<u8> {
    text.chars()
        .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
        .collect()
}

/// Why an incoming transfer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("the clipboard holds more than {MAX_CLIPBOARD_LEN} bytes")]
    TooLarge,
}

/// The bytes of one incoming transfer, bounded by the protocol's clipboard limit.
#[derive(Debug, Default)]
pub struct Incoming {
    data: Vec<u8>,
}

impl Incoming {
    /// Appends a chunk (an INCR piece or the whole value).
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), TransferError> {
        if self.data.len() + chunk.len() > MAX_CLIPBOARD_LEN {
            return Err(TransferError::TooLarge);
        }
        self.data.extend_from_slice(chunk);
        Ok(())
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ATOMS: TargetAtoms = TargetAtoms {
        targets: 100,
        utf8_string: 101,
        string: 31,
        text: 102,
        mime_utf8: 103,
    };

    #[test]
    fn text_targets_are_answered_in_their_encoding_and_others_refused() {
        assert_eq!(ATOMS.answer(100), Answer::Targets);
        assert_eq!(ATOMS.answer(101), Answer::Utf8 { type_: 101 });
        assert_eq!(ATOMS.answer(102), Answer::Utf8 { type_: 101 });
        assert_eq!(ATOMS.answer(103), Answer::Utf8 { type_: 103 });
        assert_eq!(ATOMS.answer(31), Answer::Latin1);
        assert_eq!(ATOMS.answer(4), Answer::Refuse);
    }

    #[test]
    fn targets_lists_every_target_answered() {
        for t in ATOMS.offered() {
            assert_ne!(ATOMS.answer(t), Answer::Refuse, "{t}");
        }
    }

    #[test]
    fn latin1_round_trips_and_wider_characters_become_question_marks() {
        assert_eq!(latin1_to_utf8(&[b'a', 0xe9]), "aé");
        assert_eq!(utf8_to_latin1("aé€"), vec![b'a', 0xe9, b'?']);
        assert_eq!(ATOMS.decode(31, &[0xe9]), Some("é".as_bytes().to_vec()));
        assert_eq!(
            ATOMS.decode(101, "€".as_bytes()),
            Some("€".as_bytes().to_vec())
        );
        assert_eq!(ATOMS.decode(4, b"x"), None);
    }

    #[test]
    fn only_utf8_text_mime_types_are_accepted() {
        for m in [
            MIME_TEXT_UTF8,
            "text/plain; charset=UTF-8",
            "text/plain",
            "TEXT/PLAIN;CHARSET=\"utf-8\"",
        ] {
            assert!(is_text_mime(m), "{m}");
        }
        for m in ["image/png", "text/html", "text/plain;charset=latin1", ""] {
            assert!(!is_text_mime(m), "{m}");
        }
    }

    #[test]
    fn an_incoming_transfer_stops_at_the_protocol_limit() {
        let mut incoming = Incoming::default();
        incoming.push(&vec![b'x'; MAX_CLIPBOARD_LEN - 1]).unwrap();
        incoming.push(b"y").unwrap();

        assert_eq!(incoming.push(b"z"), Err(TransferError::TooLarge));
        assert_eq!(incoming.into_inner().len(), MAX_CLIPBOARD_LEN);
    }
}
