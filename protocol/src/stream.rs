//! The layer stream: the ordered description of one layer's tar, read from the pipe that
//! `GetLayer` returns.
//!
//! The stream tells a client how to rebuild the layer's uncompressed tar bit for bit: raw tar
//! bytes (headers, padding, end-of-archive blocks) are carried inline, and the content of each
//! regular file is named by its position in the sequence of fds that `FetchFds` delivers.
//!
//! # Format, version 1
//!
//! All integers are little-endian.
//!
//! ```text
//! stream  := magic record*
//! magic   := "CSTORLS1"                       (8 bytes)
//! record  := tag:u8 len:u32 payload[len]
//! ```
//!
//! | tag  | record    | payload |
//! |------|-----------|---------|
//! | 0x01 | `SEGMENT` | raw tar bytes, 1 ..= 4 MiB |
//! | 0x02 | `FILE`    | `size:u64 crc64:u64 fd:u64 name[len-24]` |
//! | 0x03 | `END`     | `entries:u64 files:u64 fds:u64 tar_size:u64` |
//! | 0x04 | `ERROR`   | a JSON-RPC error object, UTF-8 JSON |
//! | 0x80-0xff | extension | ignored by readers that do not know it |
//!
//! - `FILE` marks a tar entry. `size` is the number of content bytes that follow its header
//!   in the tar (0 for directories, links, devices, empty files...). When `size > 0`, `fd` is
//!   the index of the fd holding the content, counting from 0 in the order `FetchFds`
//!   delivers them, and `crc64` is the CRC-64/GO-ISO of the content; the reader copies
//!   exactly `size` bytes from offset 0 of that fd and must check the CRC. When `size == 0`,
//!   `fd` is `u64::MAX` and `crc64` is 0. `name` is the entry name as recorded (raw bytes,
//!   not necessarily UTF-8).
//! - Content fds are numbered densely: the n-th `FILE` with `size > 0` has `fd == n`.
//! - The stream ends with exactly one `END` (success) or `ERROR` (the helper failed; the
//!   error says why). End of file before either means the helper died or the layer was
//!   released: the stream is truncated and must not be used.
//! - Tags 0x00 and 0x05-0x7f are reserved; a reader fails on them.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::RpcError;

/// The 8 bytes every stream starts with.
pub const MAGIC: &[u8; 8] = b"CSTORLS1";
/// The format name in [`crate::StreamInfo::format`].
pub const FORMAT_NAME: &str = "cstor-layer-stream";
/// The format version in [`crate::StreamInfo::version`].
pub const FORMAT_VERSION: u32 = 1;
/// Largest `SEGMENT` payload a writer emits and a reader accepts.
pub const MAX_SEGMENT: usize = 4 << 20;
/// Largest entry name accepted.
pub const MAX_NAME: usize = 64 << 10;
/// Largest `ERROR` payload accepted.
pub const MAX_ERROR: usize = 1 << 20;
/// `fd` value of a `FILE` without content.
pub const NO_FD: u64 = u64::MAX;

const TAG_SEGMENT: u8 = 0x01;
const TAG_FILE: u8 = 0x02;
const TAG_END: u8 = 0x03;
const TAG_ERROR: u8 = 0x04;
const FILE_FIXED: usize = 24;
const END_LEN: usize = 32;
/// Extension records are skipped, but not without bound.
const MAX_EXTENSION: usize = 1 << 20;

/// A tar entry as the stream describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// The entry name, raw bytes.
    pub name: Vec<u8>,
    /// Content bytes following the header in the tar.
    pub size: u64,
    /// CRC-64/GO-ISO of the content (0 when `size == 0`).
    pub crc64: u64,
    /// Index of the content fd, when `size > 0`.
    pub fd: Option<u64>,
}

/// Totals carried by `END`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSummary {
    /// `FILE` records (tar entries).
    pub entries: u64,
    /// `FILE` records with content.
    pub files: u64,
    /// Content fds (equal to `files`).
    pub fds: u64,
    /// Length of the tar the stream describes.
    pub tar_size: u64,
}

/// One record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Raw tar bytes.
    Segment(Vec<u8>),
    /// A tar entry.
    File(FileEntry),
    /// Successful end.
    End(StreamSummary),
}

/// Errors reading a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// Reading the pipe failed.
    #[error("reading the layer stream: {0}")]
    Io(io::Error),
    /// The first 8 bytes are not [`MAGIC`].
    #[error("not a cstor layer stream (bad magic)")]
    BadMagic,
    /// The stream ended before `END` or `ERROR`.
    #[error(
        "layer stream truncated after {entries} entries: the helper died or released the layer"
    )]
    Truncated {
        /// Entries read before the end.
        entries: u64,
    },
    /// A record violates the format.
    #[error("malformed layer stream: {0}")]
    Malformed(String),
    /// The helper reported an error in the stream.
    #[error("helper error in layer stream: {0}")]
    Remote(Box<RpcError>),
}

impl From<io::Error> for StreamError {
    fn from(e: io::Error) -> Self {
        StreamError::Io(e)
    }
}

/// Writes a stream. Used by the helper; public so that tests and other servers can produce
/// streams too.
///
/// ```
/// use cstor_protocol::stream::{StreamReader, StreamWriter, Record};
/// let mut buf = Vec::new();
/// let mut w = StreamWriter::new(&mut buf).unwrap();
/// w.segment(&[0u8; 512]).unwrap();
/// w.file(b"./etc/hostname", 5, 0x1234).unwrap();
/// w.segment(&[0u8; 507 + 1024]).unwrap();
/// let summary = w.finish().unwrap();
/// assert_eq!(summary.tar_size, 512 + 5 + 507 + 1024);
///
/// let mut r = StreamReader::new(&buf[..]).unwrap();
/// assert!(matches!(r.next_record().unwrap(), Some(Record::Segment(s)) if s.len() == 512));
/// match r.next_record().unwrap() {
///     Some(Record::File(f)) => assert_eq!((f.size, f.fd), (5, Some(0))),
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    out: W,
    summary: StreamSummary,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the magic.
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(MAGIC)?;
        Ok(Self {
            out,
            summary: StreamSummary::default(),
        })
    }

    fn header(&mut self, tag: u8, len: usize) -> io::Result<()> {
        let len = u32::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record too large"))?;
        let mut h = [0u8; 5];
        h[0] = tag;
        h[1..].copy_from_slice(&len.to_le_bytes());
        self.out.write_all(&h)
    }

    /// Raw tar bytes; split into records of at most [`MAX_SEGMENT`].
    pub fn segment(&mut self, bytes: &[u8]) -> io::Result<()> {
        for chunk in bytes.chunks(MAX_SEGMENT) {
            self.header(TAG_SEGMENT, chunk.len())?;
            self.out.write_all(chunk)?;
        }
        self.summary.tar_size += bytes.len() as u64;
        Ok(())
    }

    /// A tar entry with `size` content bytes; returns the fd index it was given, if any.
    pub fn file(&mut self, name: &[u8], size: u64, crc64: u64) -> io::Result<Option<u64>> {
        if name.len() > MAX_NAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "entry name too long",
            ));
        }
        let fd = (size > 0).then_some(self.summary.fds);
        self.header(TAG_FILE, FILE_FIXED + name.len())?;
        let mut fixed = [0u8; FILE_FIXED];
        fixed[0..8].copy_from_slice(&size.to_le_bytes());
        fixed[8..16].copy_from_slice(&(if size > 0 { crc64 } else { 0 }).to_le_bytes());
        fixed[16..24].copy_from_slice(&fd.unwrap_or(NO_FD).to_le_bytes());
        self.out.write_all(&fixed)?;
        self.out.write_all(name)?;
        self.summary.entries += 1;
        if fd.is_some() {
            self.summary.files += 1;
            self.summary.fds += 1;
            self.summary.tar_size += size;
        }
        Ok(fd)
    }

    /// Flushes what was written so far to the underlying writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Totals so far.
    pub fn summary(&self) -> StreamSummary {
        self.summary
    }

    /// Writes `END` and flushes.
    pub fn finish(mut self) -> io::Result<StreamSummary> {
        let s = self.summary;
        self.header(TAG_END, END_LEN)?;
        let mut p = [0u8; END_LEN];
        p[0..8].copy_from_slice(&s.entries.to_le_bytes());
        p[8..16].copy_from_slice(&s.files.to_le_bytes());
        p[16..24].copy_from_slice(&s.fds.to_le_bytes());
        p[24..32].copy_from_slice(&s.tar_size.to_le_bytes());
        self.out.write_all(&p)?;
        self.out.flush()?;
        Ok(s)
    }

    /// Writes `ERROR` and flushes.
    pub fn fail(mut self, error: &RpcError) -> io::Result<()> {
        let json = serde_json::to_vec(error).map_err(io::Error::other)?;
        self.header(TAG_ERROR, json.len())?;
        self.out.write_all(&json)?;
        self.out.flush()
    }
}

/// Reads and validates a stream.
#[derive(Debug)]
pub struct StreamReader<R: Read> {
    input: R,
    seen: StreamSummary,
    done: bool,
    /// Whether the magic was read and checked.
    started: bool,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the magic.
    pub fn new(input: R) -> Result<Self, StreamError> {
        let mut r = Self::deferred(input);
        r.start()?;
        Ok(r)
    }

    /// A reader that reads nothing until the first [`StreamReader::next_record`], which
    /// checks the magic first. For a caller that must not block where it gets the stream
    /// (an async task handing it to a blocking thread: the peer may never write).
    pub fn deferred(input: R) -> Self {
        Self {
            input,
            seen: StreamSummary::default(),
            done: false,
            started: false,
        }
    }

    fn start(&mut self) -> Result<(), StreamError> {
        if self.started {
            return Ok(());
        }
        let mut magic = [0u8; 8];
        read_exact_or_eof(&mut self.input, &mut magic).map_err(|e| match e {
            Eof::Clean | Eof::Partial => StreamError::Truncated { entries: 0 },
            Eof::Io(e) => StreamError::Io(e),
        })?;
        if &magic != MAGIC {
            return Err(StreamError::BadMagic);
        }
        self.started = true;
        Ok(())
    }

    /// Totals of what was read so far.
    pub fn seen(&self) -> StreamSummary {
        self.seen
    }

    /// The next record; `Ok(None)` after `END` was returned.
    pub fn next_record(&mut self) -> Result<Option<Record>, StreamError> {
        self.start()?;
        loop {
            if self.done {
                return Ok(None);
            }
            let mut h = [0u8; 5];
            match read_exact_or_eof(&mut self.input, &mut h) {
                Ok(()) => {}
                Err(Eof::Clean | Eof::Partial) => {
                    return Err(StreamError::Truncated {
                        entries: self.seen.entries,
                    });
                }
                Err(Eof::Io(e)) => return Err(StreamError::Io(e)),
            }
            let tag = h[0];
            let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
            let limit = match tag {
                TAG_SEGMENT => MAX_SEGMENT,
                TAG_FILE => FILE_FIXED + MAX_NAME,
                TAG_END => END_LEN,
                TAG_ERROR => MAX_ERROR,
                0x80..=0xff => MAX_EXTENSION,
                _ => return Err(malformed(format!("unknown record tag {tag:#04x}"))),
            };
            if len > limit {
                return Err(malformed(format!(
                    "record {tag:#04x} of {len} bytes exceeds its limit of {limit}"
                )));
            }
            let payload = self.payload(len)?;
            match tag {
                TAG_SEGMENT => {
                    if payload.is_empty() {
                        return Err(malformed("empty segment".into()));
                    }
                    self.seen.tar_size += payload.len() as u64;
                    return Ok(Some(Record::Segment(payload)));
                }
                TAG_FILE => return self.file(payload).map(Some),
                TAG_END => return self.end(&payload).map(Some),
                TAG_ERROR => {
                    self.done = true;
                    let e: RpcError = serde_json::from_slice(&payload).map_err(|e| {
                        malformed(format!("ERROR record is not a JSON-RPC error: {e}"))
                    })?;
                    return Err(StreamError::Remote(Box::new(e)));
                }
                _ => continue,
            }
        }
    }

    fn payload(&mut self, len: usize) -> Result<Vec<u8>, StreamError> {
        let mut payload = vec![0u8; len];
        read_exact_or_eof(&mut self.input, &mut payload).map_err(|e| match e {
            Eof::Clean | Eof::Partial => StreamError::Truncated {
                entries: self.seen.entries,
            },
            Eof::Io(e) => StreamError::Io(e),
        })?;
        Ok(payload)
    }

    fn file(&mut self, mut payload: Vec<u8>) -> Result<Record, StreamError> {
        if payload.len() < FILE_FIXED {
            return Err(malformed(format!(
                "FILE record of {} bytes is shorter than {FILE_FIXED}",
                payload.len()
            )));
        }
        let u = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&payload[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let (size, crc64, fd) = (u(0), u(8), u(16));
        let name = payload.split_off(FILE_FIXED);
        let fd = if size == 0 {
            if fd != NO_FD {
                return Err(malformed(format!(
                    "empty entry {:?} names fd {fd}",
                    lossy(&name)
                )));
            }
            None
        } else {
            if fd != self.seen.fds {
                return Err(malformed(format!(
                    "entry {:?} names fd {fd}, expected {}",
                    lossy(&name),
                    self.seen.fds
                )));
            }
            self.seen.fds += 1;
            self.seen.files += 1;
            self.seen.tar_size = self
                .seen
                .tar_size
                .checked_add(size)
                .ok_or_else(|| malformed("tar size overflows".into()))?;
            Some(fd)
        };
        self.seen.entries += 1;
        Ok(Record::File(FileEntry {
            name,
            size,
            crc64,
            fd,
        }))
    }

    fn end(&mut self, p: &[u8]) -> Result<Record, StreamError> {
        if p.len() != END_LEN {
            return Err(malformed(format!("END record of {} bytes", p.len())));
        }
        let u = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&p[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let s = StreamSummary {
            entries: u(0),
            files: u(8),
            fds: u(16),
            tar_size: u(24),
        };
        if s != self.seen {
            return Err(malformed(format!(
                "END announces {s:?} but the stream held {:?}",
                self.seen
            )));
        }
        self.done = true;
        Ok(Record::End(s))
    }
}

fn malformed(msg: String) -> StreamError {
    StreamError::Malformed(msg)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

enum Eof {
    Clean,
    Partial,
    Io(io::Error),
}

fn read_exact_or_eof<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), Eof> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) if n == 0 => return Err(Eof::Clean),
            Ok(0) => return Err(Eof::Partial),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Eof::Io(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    fn sample() -> Vec<u8> {
        let mut buf = Vec::new();
        let mut w = StreamWriter::new(&mut buf).unwrap();
        w.segment(&[1u8; 512]).unwrap();
        assert_eq!(w.file(b"./", 0, 99).unwrap(), None);
        w.segment(&[2u8; 512]).unwrap();
        assert_eq!(w.file(b"./a", 3, 7).unwrap(), Some(0));
        w.segment(&[3u8; 509]).unwrap();
        assert_eq!(w.file(&[0xff, b'x'], 1, 8).unwrap(), Some(1));
        w.segment(&[0u8; 1535]).unwrap();
        w.finish().unwrap();
        buf
    }

    fn read_all(buf: &[u8]) -> Result<Vec<Record>, StreamError> {
        let mut r = StreamReader::new(buf)?;
        let mut v = Vec::new();
        while let Some(rec) = r.next_record()? {
            v.push(rec);
        }
        Ok(v)
    }

    #[test]
    fn roundtrip() {
        let recs = read_all(&sample()).unwrap();
        assert_eq!(recs.len(), 8);
        assert_eq!(
            recs[1],
            Record::File(FileEntry {
                name: b"./".to_vec(),
                size: 0,
                crc64: 0,
                fd: None
            })
        );
        assert_eq!(
            recs[5],
            Record::File(FileEntry {
                name: vec![0xff, b'x'],
                size: 1,
                crc64: 8,
                fd: Some(1)
            })
        );
        match &recs[7] {
            Record::End(s) => {
                assert_eq!(s.entries, 3);
                assert_eq!(s.fds, 2);
                assert_eq!(s.tar_size, 512 * 2 + 509 + 1535 + 4);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let buf = sample();
        for cut in 0..buf.len() {
            let r = read_all(&buf[..cut]);
            assert!(
                matches!(r, Err(StreamError::Truncated { .. })),
                "cut at {cut}: {r:?}"
            );
        }
    }

    #[test]
    fn big_segments_are_split() {
        let mut buf = Vec::new();
        let mut w = StreamWriter::new(&mut buf).unwrap();
        w.segment(&vec![0u8; MAX_SEGMENT * 2 + 1]).unwrap();
        w.finish().unwrap();
        let recs = read_all(&buf).unwrap();
        assert_eq!(recs.len(), 4);
    }

    #[test]
    fn error_record_surfaces() {
        let mut buf = Vec::new();
        let mut w = StreamWriter::new(&mut buf).unwrap();
        w.segment(&[0u8; 512]).unwrap();
        w.fail(&RpcError::new(ErrorCode::MissingFile, "gone").with_path("etc/x"))
            .unwrap();
        match read_all(&buf) {
            Err(StreamError::Remote(e)) => {
                assert_eq!(e.error_code(), Some(ErrorCode::MissingFile));
                assert_eq!(e.data.unwrap().path.as_deref(), Some("etc/x"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A reader that never got a byte does not block where it is made: the first record
    /// reads and checks the magic, with the same errors as `new`.
    #[test]
    fn a_deferred_reader_reads_nothing_until_asked() {
        struct Never;
        impl Read for Never {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                panic!("read before the first record was asked for");
            }
        }
        let _ = StreamReader::deferred(Never);
        let mut r = StreamReader::deferred(&b"NOTMAGIC"[..]);
        assert!(matches!(r.next_record(), Err(StreamError::BadMagic)));
        let mut r = StreamReader::deferred(&b""[..]);
        assert!(matches!(
            r.next_record(),
            Err(StreamError::Truncated { entries: 0 })
        ));
        let sample = sample();
        let mut r = StreamReader::deferred(&sample[..]);
        let mut n = 0;
        while r.next_record().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 8);
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(matches!(read_all(b"NOTMAGIC"), Err(StreamError::BadMagic)));
        let mut bad_tag = MAGIC.to_vec();
        bad_tag.extend_from_slice(&[0x09, 0, 0, 0, 0]);
        assert!(matches!(read_all(&bad_tag), Err(StreamError::Malformed(_))));
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&[TAG_SEGMENT, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(read_all(&huge), Err(StreamError::Malformed(_))));
        // An END whose totals lie.
        let mut lie = MAGIC.to_vec();
        lie.push(TAG_END);
        lie.extend_from_slice(&(END_LEN as u32).to_le_bytes());
        lie.extend_from_slice(&[1u8; END_LEN]);
        assert!(matches!(read_all(&lie), Err(StreamError::Malformed(_))));
        // A FILE whose fd skips one.
        let mut skip = MAGIC.to_vec();
        skip.push(TAG_FILE);
        skip.extend_from_slice(&(FILE_FIXED as u32 + 1).to_le_bytes());
        skip.extend_from_slice(&1u64.to_le_bytes());
        skip.extend_from_slice(&0u64.to_le_bytes());
        skip.extend_from_slice(&5u64.to_le_bytes());
        skip.push(b'a');
        assert!(matches!(read_all(&skip), Err(StreamError::Malformed(_))));
    }

    #[test]
    fn extensions_are_skipped() {
        let full = sample();
        let mut buf = MAGIC.to_vec();
        buf.extend_from_slice(&[0x80, 3, 0, 0, 0, 9, 9, 9]);
        buf.extend_from_slice(&full[8..]);
        assert_eq!(read_all(&buf).unwrap(), read_all(&full).unwrap());
    }
}
