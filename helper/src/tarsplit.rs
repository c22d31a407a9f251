//! Reader of tar-split metadata (`<layer-id>.tar-split.gz`).
//!
//! The file is a gzip stream of newline-delimited JSON, one object per tar entry or run of
//! raw bytes, as the tar-split library that containers/storage uses writes it:
//!
//! - `{"type":2,"payload":"<base64>","position":N}`: raw archive bytes (headers, padding,
//!   end-of-archive blocks), to be copied verbatim;
//! - `{"type":1,"name":"./etc/hosts","size":6,"payload":"<base64 crc64>","position":N}`: a
//!   tar entry whose content (`size` bytes, CRC-64/GO-ISO big-endian in `payload`) comes from
//!   the file with that name. Names that are not UTF-8 are in `name_raw` (base64) instead.
//!
//! The reader validates every line and never trusts a size or length it has not bounded.

use std::borrow::Cow;
use std::io::{self, BufRead};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cstor_protocol::ErrorCode;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Longest line accepted. tar-split writes raw segments of at most 1 MiB (1.4 MiB as base64).
pub const MAX_LINE: usize = 8 << 20;

/// One tar-split entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Raw archive bytes.
    Segment(Vec<u8>),
    /// A tar entry.
    File {
        /// Raw name bytes, as the tar reader resolved them (PAX/GNU long names applied).
        name: Vec<u8>,
        /// The header's size field.
        size: u64,
        /// CRC-64/GO-ISO of the content; `None` when tar-split recorded none (empty files).
        crc64: Option<u64>,
    },
}

/// One line as JSON. The strings borrow from the line where they hold no escapes (base64
/// never does), which spares an allocation and a copy per string.
#[derive(Deserialize)]
struct RawEntry<'a> {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default, borrow)]
    name: Option<JsonStr<'a>>,
    #[serde(default, borrow)]
    name_raw: Option<JsonStr<'a>>,
    #[serde(default)]
    size: Option<i64>,
    #[serde(default, borrow)]
    payload: Option<JsonStr<'a>>,
}

/// A JSON string, borrowed when it has no escapes: serde borrows a `Cow` field, but not one
/// inside an `Option`, hence the newtype.
#[derive(Deserialize)]
struct JsonStr<'a>(#[serde(borrow)] Cow<'a, str>);

/// Streaming reader over decompressed tar-split NDJSON.
///
/// ```
/// use cstor_helper::tarsplit::{Entry, TarSplitReader};
/// let ndjson = b"{\"type\":2,\"payload\":\"AAAA\",\"position\":0}\n\
///                {\"type\":1,\"name\":\"./hello.txt\",\"size\":6,\"payload\":\"YUw+7uLYEAA=\",\"position\":1}\n";
/// let mut r = TarSplitReader::new(&ndjson[..]);
/// assert_eq!(r.next().unwrap().unwrap(), Entry::Segment(vec![0, 0, 0]));
/// assert_eq!(r.next().unwrap().unwrap(), Entry::File {
///     name: b"./hello.txt".to_vec(), size: 6, crc64: Some(0x614c3eeee2d81000) });
/// assert!(r.next().is_none());
/// ```
#[derive(Debug)]
pub struct TarSplitReader<R> {
    input: R,
    line: Vec<u8>,
    line_no: u64,
    failed: bool,
}

impl<R: BufRead> TarSplitReader<R> {
    /// Wraps decompressed NDJSON.
    pub fn new(input: R) -> Self {
        Self {
            input,
            line: Vec::new(),
            line_no: 0,
            failed: false,
        }
    }

    fn corrupt(&self, msg: impl std::fmt::Display) -> Error {
        Error::new(
            ErrorCode::CorruptTarSplit,
            format!("tar-split line {}: {msg}", self.line_no),
        )
    }

    /// Reads one line into `self.line`; false at end of input.
    fn read_line(&mut self) -> Result<bool> {
        self.line.clear();
        loop {
            let buf = match self.input.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let code = if e.kind() == io::ErrorKind::InvalidInput
                        || e.kind() == io::ErrorKind::InvalidData
                        || e.kind() == io::ErrorKind::UnexpectedEof
                    {
                        ErrorCode::CorruptTarSplit
                    } else {
                        ErrorCode::Io
                    };
                    return Err(Error::io("reading tar-split", e).with_code(code));
                }
            };
            if buf.is_empty() {
                return Ok(!self.line.is_empty());
            }
            let (chunk, done) = match memchr::memchr(b'\n', buf) {
                Some(i) => (&buf[..i], Some(i + 1)),
                None => (buf, None),
            };
            if self.line.len() + chunk.len() > MAX_LINE {
                self.line_no += 1;
                return Err(self.corrupt(format!("line longer than {MAX_LINE} bytes")));
            }
            self.line.extend_from_slice(chunk);
            match done {
                Some(n) => {
                    self.input.consume(n);
                    return Ok(true);
                }
                None => {
                    let n = buf.len();
                    self.input.consume(n);
                }
            }
        }
    }

    fn parse(&self) -> Result<Entry> {
        let raw: RawEntry =
            serde_json::from_slice(&self.line).map_err(|e| self.corrupt(format!("{e}")))?;
        let payload = match &raw.payload {
            None => None,
            Some(p) => Some(
                B64.decode(p.0.as_bytes())
                    .map_err(|e| self.corrupt(format!("payload is not base64: {e}")))?,
            ),
        };
        match raw.kind {
            2 => Ok(Entry::Segment(payload.unwrap_or_default())),
            1 => {
                let name = match (raw.name, raw.name_raw) {
                    (_, Some(r)) => B64
                        .decode(r.0.as_bytes())
                        .map_err(|e| self.corrupt(format!("name_raw is not base64: {e}")))?,
                    (Some(n), None) => n.0.into_owned().into_bytes(),
                    (None, None) => return Err(self.corrupt("file entry without a name")),
                };
                if name.is_empty() {
                    return Err(self.corrupt("file entry with an empty name"));
                }
                let size = raw.size.unwrap_or(0);
                let size = u64::try_from(size)
                    .map_err(|_| self.corrupt(format!("negative size {size}")))?;
                let crc64 = match payload {
                    None => None,
                    Some(p) => {
                        let b: [u8; 8] = p.as_slice().try_into().map_err(|_| {
                            self.corrupt(format!(
                                "checksum payload of {} bytes, expected 8",
                                p.len()
                            ))
                        })?;
                        Some(u64::from_be_bytes(b))
                    }
                };
                if size > 0 && crc64.is_none() {
                    return Err(self.corrupt(format!(
                        "entry {:?} has {size} bytes but no checksum",
                        String::from_utf8_lossy(&name)
                    )));
                }
                Ok(Entry::File { name, size, crc64 })
            }
            k => Err(self.corrupt(format!("unknown entry type {k}"))),
        }
    }
}

impl<R: BufRead> Iterator for TarSplitReader<R> {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            let r = match self.read_line() {
                Ok(false) => return None,
                Ok(true) => {
                    self.line_no += 1;
                    // Blank lines carry nothing; Go's json.Decoder would skip the whitespace.
                    if self.line.iter().all(|b| b.is_ascii_whitespace()) {
                        continue;
                    }
                    self.parse()
                }
                Err(e) => Err(e),
            };
            if r.is_err() {
                self.failed = true;
            }
            return Some(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(s: &str) -> Vec<Result<Entry>> {
        TarSplitReader::new(s.as_bytes()).collect()
    }

    #[test]
    fn name_raw_wins_and_decodes() {
        // "caf\xe9" in base64 is "Y2Fm6Q==".
        let e = read(r#"{"type":1,"name_raw":"Y2Fm6Q==","position":0}"#);
        assert_eq!(
            e[0].as_ref().unwrap(),
            &Entry::File {
                name: b"caf\xe9".to_vec(),
                size: 0,
                crc64: None
            }
        );
    }

    #[test]
    fn bad_lines_are_corrupt_tar_split() {
        for bad in [
            "{not json}",
            r#"{"type":3,"position":0}"#,
            r#"{"type":1,"position":0}"#,
            r#"{"type":1,"name":"","position":0}"#,
            r#"{"type":1,"name":"a","size":-1,"position":0}"#,
            r#"{"type":1,"name":"a","size":5,"payload":null,"position":0}"#,
            r#"{"type":1,"name":"a","size":5,"payload":"AAAA","position":0}"#,
            r#"{"type":2,"payload":"!!!","position":0}"#,
            r#"{"type":1,"name_raw":"%%%","position":0}"#,
            r#"[1,2,3]"#,
        ] {
            let r = read(bad);
            assert_eq!(r.len(), 1, "{bad}");
            let e = r[0].as_ref().unwrap_err();
            assert_eq!(e.code(), ErrorCode::CorruptTarSplit, "{bad}: {e}");
            assert!(e.to_string().contains("line 1"), "{e}");
        }
    }

    #[test]
    fn stops_after_first_error_and_skips_blank_lines() {
        let r = read("\n{\"type\":2,\"payload\":null}\n  \nnope\n{\"type\":2,\"payload\":null}\n");
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].as_ref().unwrap(), &Entry::Segment(vec![]));
        assert!(r[1].as_ref().unwrap_err().to_string().contains("line 4"));
    }

    #[test]
    fn overlong_lines_are_refused() {
        let long = format!("{{\"type\":2,\"payload\":\"{}\"}}", "A".repeat(MAX_LINE));
        let r = read(&long);
        assert_eq!(
            r[0].as_ref().unwrap_err().code(),
            ErrorCode::CorruptTarSplit
        );
    }

    #[test]
    fn last_line_without_newline() {
        let r = read(r#"{"type":1,"name":"x","size":1,"payload":"AAAAAAAAAAE="}"#);
        assert_eq!(
            r[0].as_ref().unwrap(),
            &Entry::File {
                name: b"x".to_vec(),
                size: 1,
                crc64: Some(1)
            }
        );
    }

    /// Strings are borrowed from the line when they can be; JSON escapes (which tar-split's
    /// Go encoder writes for names, and any writer may use) still decode.
    #[test]
    fn escaped_strings_decode_like_plain_ones() {
        let r = read(concat!(
            r#"{"type":2,"payload":"AA\/A"}"#,
            "\n",
            r#"{"type":1,"name":"./caf\u00e9 \"q\"","size":1,"payload":"AAAAAAAAAAE="}"#,
        ));
        assert_eq!(r[0].as_ref().unwrap(), &Entry::Segment(vec![0, 15, 192]));
        assert_eq!(
            r[1].as_ref().unwrap(),
            &Entry::File {
                name: "./café \"q\"".as_bytes().to_vec(),
                size: 1,
                crc64: Some(1)
            }
        );
    }

    /// The payload of a plain line is borrowed from it, not copied.
    #[test]
    fn plain_strings_are_borrowed() {
        let raw: RawEntry = serde_json::from_slice(br#"{"type":2,"payload":"AAAA"}"#).unwrap();
        assert!(matches!(raw.payload, Some(JsonStr(Cow::Borrowed("AAAA")))));
        let raw: RawEntry = serde_json::from_slice(br#"{"type":2,"payload":"AA\/A"}"#).unwrap();
        assert!(matches!(raw.payload, Some(JsonStr(Cow::Owned(_)))));
    }
}
