//! The little-endian field codec both protocols' messages are written in (`stream`,
//! `agent`): a bounds-checked reader over one message body and the writers of its
//! length-prefixed fields. One place, so both protocols frame strings and bytes alike.

use crate::stream::DecodeError;

/// Bounds-checked little-endian reader over one message body.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(bad(field, v)),
        }
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// `len` bytes of UTF-8, refused (as `field`) beyond `max`.
    pub(crate) fn string(
        &mut self,
        len: usize,
        max: usize,
        field: &'static str,
    ) -> Result<String, DecodeError> {
        if len > max {
            return Err(bad(field, len as u64));
        }
        std::str::from_utf8(self.take(len)?)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8)
    }
    /// A `u16` length and that many bytes of UTF-8.
    pub(crate) fn str16(&mut self) -> Result<String, DecodeError> {
        let len = usize::from(self.u16()?);
        self.string(len, usize::from(u16::MAX), "str16")
    }
    /// A `u32` length (at most `max`) and that many bytes of UTF-8.
    pub(crate) fn str32(&mut self, max: usize, field: &'static str) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        self.string(len, max, field)
    }
    /// A `u32` length (at most `max`) and that many bytes.
    pub(crate) fn bytes32(
        &mut self,
        max: usize,
        field: &'static str,
    ) -> Result<Vec<u8>, DecodeError> {
        let len = self.u32()?;
        if len as usize > max {
            return Err(bad(field, len));
        }
        Ok(self.take(len as usize)?.to_vec())
    }
    /// The body must end here.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// A field holding a value outside its range.
pub(crate) fn bad(field: &'static str, value: impl Into<u64>) -> DecodeError {
    DecodeError::BadValue {
        field,
        value: value.into(),
    }
}

/// Appends a `str16`. A string too long for the field is cut at a char boundary rather than
/// corrupting the framing; senders refuse such strings before (agent `Session::send`) or
/// pass only short identifiers and messages (stream).
pub(crate) fn put_str16(out: &mut Vec<u8>, s: &str) {
    put_str(out, s, usize::from(u16::MAX), |n, out| {
        out.extend_from_slice(&(n as u16).to_le_bytes())
    });
}

/// Appends a `str32` of at most `max` bytes (cut at a char boundary).
pub(crate) fn put_str32(out: &mut Vec<u8>, s: &str, max: usize) {
    put_str(out, s, max, |n, out| {
        out.extend_from_slice(&(n as u32).to_le_bytes())
    });
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize, len: impl Fn(usize, &mut Vec<u8>)) {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    len(end, out);
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// Appends a `bytes32`.
pub(crate) fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}
