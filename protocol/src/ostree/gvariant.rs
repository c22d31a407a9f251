//! A strict reader and a minimal writer of the GVariant serialisation, for the handful of
//! types ostree objects use.
//!
//! GVariant (GLib's binary format) lays out fixed-size values at their natural alignment and
//! records where variable-size values end in "framing offsets" at the end of their
//! container, little-endian, each as wide as the container's size needs (1 byte up to 255
//! bytes, 2 up to 65535, then 4, then 8). GLib itself reads malformed data leniently,
//! substituting default values; here every offset, length and alignment is checked and
//! malformed data is an error, because a helper that invented defaults would hand a client
//! a tree nobody committed. Only what ostree's commit, dirtree, dirmeta and file-header
//! types need is implemented: tuples, arrays, byte strings, strings, `u32` and `u64`.

use std::fmt;

/// Why bytes do not decode as the expected type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed GVariant {what}: {why}")]
pub struct DecodeError {
    /// The value being decoded (e.g. "dirtree file entry").
    pub what: &'static str,
    /// What was wrong.
    pub why: String,
}

fn err(what: &'static str, why: impl fmt::Display) -> DecodeError {
    DecodeError {
        what,
        why: why.to_string(),
    }
}

/// The width of the framing offsets of a container of `size` bytes.
fn offset_width(size: usize) -> usize {
    match size {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xffff_ffff => 4,
        _ => 8,
    }
}

fn read_offset(bytes: &[u8], at: usize, width: usize) -> u64 {
    let mut v = 0u64;
    for (i, b) in bytes[at..at + width].iter().enumerate() {
        v |= u64::from(*b) << (8 * i);
    }
    v
}

fn align(pos: usize, alignment: usize) -> usize {
    pos.next_multiple_of(alignment)
}

/// The shape of one member of a tuple, as far as laying it out is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    /// A fixed-size value of `size` bytes aligned to `align`.
    Fixed {
        /// Size in bytes.
        size: usize,
        /// Alignment in bytes.
        align: usize,
    },
    /// A variable-size value aligned to `align`.
    Variable {
        /// Alignment in bytes.
        align: usize,
    },
}

/// `u`: a 32-bit integer.
pub const U32: Member = Member::Fixed { size: 4, align: 4 };
/// `t`: a 64-bit integer.
pub const U64: Member = Member::Fixed { size: 8, align: 8 };
/// `s`, `ay`, and arrays or tuples of byte-aligned variable members.
pub const VAR1: Member = Member::Variable { align: 1 };
/// `a{sv}`: dictionary entries hold a variant, which is 8-aligned.
pub const VAR8: Member = Member::Variable { align: 8 };

/// Splits a non-fixed-size tuple into its members' bytes.
///
/// `members` lists the tuple's member types in order; the result has one slice per member.
pub fn tuple<'a>(
    what: &'static str,
    bytes: &'a [u8],
    members: &[Member],
) -> Result<Vec<&'a [u8]>, DecodeError> {
    let w = offset_width(bytes.len());
    let framed = members
        .iter()
        .enumerate()
        .filter(|(i, m)| matches!(m, Member::Variable { .. }) && *i + 1 < members.len())
        .count();
    let limit = bytes
        .len()
        .checked_sub(framed * w)
        .ok_or_else(|| err(what, "too short for its framing offsets"))?;
    let mut out = Vec::with_capacity(members.len());
    let mut pos = 0usize;
    let mut next_offset = 0usize;
    for (i, m) in members.iter().enumerate() {
        let (start, end) = match *m {
            Member::Fixed { size, align: a } => {
                let start = align(pos, a);
                (start, start + size)
            }
            Member::Variable { align: a } => {
                let start = align(pos, a);
                let end = if i + 1 == members.len() {
                    limit
                } else {
                    let at = bytes.len() - (next_offset + 1) * w;
                    next_offset += 1;
                    usize::try_from(read_offset(bytes, at, w))
                        .map_err(|_| err(what, "framing offset out of range"))?
                };
                (start, end)
            }
        };
        if start > end || end > limit {
            return Err(err(
                what,
                format!("member {i} spans {start}..{end}, beyond the {limit} bytes of data"),
            ));
        }
        out.push(&bytes[start..end]);
        pos = end;
    }
    Ok(out)
}

/// Splits an array of variable-size elements aligned to `elem_align` into its elements.
pub fn array<'a>(
    what: &'static str,
    bytes: &'a [u8],
    elem_align: usize,
) -> Result<Vec<&'a [u8]>, DecodeError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let w = offset_width(bytes.len());
    if bytes.len() < w {
        return Err(err(what, "too short for a framing offset"));
    }
    let table = usize::try_from(read_offset(bytes, bytes.len() - w, w))
        .map_err(|_| err(what, "framing offset out of range"))?;
    if table > bytes.len() || !(bytes.len() - table).is_multiple_of(w) {
        return Err(err(what, "framing offset table is misplaced"));
    }
    let count = (bytes.len() - table) / w;
    let mut out = Vec::with_capacity(count);
    let mut pos = 0usize;
    for i in 0..count {
        let end = usize::try_from(read_offset(bytes, table + i * w, w))
            .map_err(|_| err(what, "framing offset out of range"))?;
        let start = align(pos, elem_align);
        if start > end || end > table {
            return Err(err(
                what,
                format!("element {i} spans {start}..{end}, beyond the {table} bytes of data"),
            ));
        }
        out.push(&bytes[start..end]);
        pos = end;
    }
    Ok(out)
}

/// Decodes a big-endian `u` as ostree stores it.
pub fn be_u32(what: &'static str, bytes: &[u8]) -> Result<u32, DecodeError> {
    let a: [u8; 4] = bytes
        .try_into()
        .map_err(|_| err(what, format!("a u32 of {} bytes", bytes.len())))?;
    Ok(u32::from_be_bytes(a))
}

/// Decodes a big-endian `t` as ostree stores it.
pub fn be_u64(what: &'static str, bytes: &[u8]) -> Result<u64, DecodeError> {
    let a: [u8; 8] = bytes
        .try_into()
        .map_err(|_| err(what, format!("a u64 of {} bytes", bytes.len())))?;
    Ok(u64::from_be_bytes(a))
}

/// Decodes an `s`: UTF-8 ending in one NUL, no NUL inside.
pub fn string<'a>(what: &'static str, bytes: &'a [u8]) -> Result<&'a str, DecodeError> {
    let Some((&0, body)) = bytes.split_last() else {
        return Err(err(what, "string without its terminating NUL"));
    };
    if body.contains(&0) {
        return Err(err(what, "string with a NUL inside"));
    }
    std::str::from_utf8(body).map_err(|_| err(what, "string is not UTF-8"))
}

/// Decodes an `ay` that must hold a SHA-256 checksum.
pub fn checksum(what: &'static str, bytes: &[u8]) -> Result<[u8; 32], DecodeError> {
    bytes
        .try_into()
        .map_err(|_| err(what, format!("a checksum of {} bytes", bytes.len())))
}

/// Appends `values` to `out` as the framing offsets of a container whose body is `out`
/// (already holding `body_start..` as the container), choosing the width GVariant requires.
fn push_offsets(out: &mut Vec<u8>, body_start: usize, ends: &[usize]) {
    let body = out.len() - body_start;
    let mut w = 1;
    while offset_width(body + w * ends.len()) != w {
        w *= 2;
    }
    for end in ends {
        out.extend_from_slice(&(*end as u64).to_le_bytes()[..w]);
    }
}

/// Extended attributes as `(name, value)` byte pairs.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Serialises an `a(ayay)` of `(name, value)` pairs into `out`.
pub fn write_xattrs(out: &mut Vec<u8>, xattrs: &[(Vec<u8>, Vec<u8>)]) {
    if xattrs.is_empty() {
        return;
    }
    let start = out.len();
    let mut ends = Vec::with_capacity(xattrs.len());
    for (name, value) in xattrs {
        let elem = out.len();
        out.extend_from_slice(name);
        let name_end = out.len() - elem;
        out.extend_from_slice(value);
        push_offsets(out, elem, &[name_end]);
        ends.push(out.len() - start);
    }
    push_offsets(out, start, &ends);
}

/// Decodes an `a(ayay)` into `(name, value)` pairs, bytes as stored.
pub fn read_xattrs(what: &'static str, bytes: &[u8]) -> Result<Xattrs, DecodeError> {
    array(what, bytes, 1)?
        .into_iter()
        .map(|e| {
            let m = tuple(what, e, &[VAR1, VAR1])?;
            Ok((m[0].to_vec(), m[1].to_vec()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_widen_with_the_container() {
        assert_eq!(offset_width(0), 1);
        assert_eq!(offset_width(255), 1);
        assert_eq!(offset_width(256), 2);
        assert_eq!(offset_width(65536), 4);
    }

    #[test]
    fn xattrs_round_trip_and_match_glib() {
        // Bytes ostree 2022.7 wrote into user.ostreemeta for uid 0, gid 0, mode 0100644 and
        // user.foo=bar: the a(ayay) part is everything after the three u32.
        let glib = b"user.foo\0bar\x09\x0d";
        let x = vec![(b"user.foo\0".to_vec(), b"bar".to_vec())];
        let mut out = Vec::new();
        write_xattrs(&mut out, &x);
        assert_eq!(out, glib);
        assert_eq!(read_xattrs("xattrs", glib).unwrap(), x);
        assert!(read_xattrs("xattrs", b"").unwrap().is_empty());
    }

    #[test]
    fn malformed_data_is_an_error_not_a_default() {
        // An offset pointing past the data.
        assert!(array("a", b"ab\x09", 1).is_err());
        // An offset table that does not divide evenly.
        assert!(array("a", b"\x00\x05", 1).is_err());
        // A string without NUL, with a NUL inside, not UTF-8.
        assert!(string("s", b"abc").is_err());
        assert!(string("s", b"a\0c\0").is_err());
        assert!(string("s", b"\xff\0").is_err());
        // A tuple too short for its fixed members.
        assert!(tuple("t", b"\0\0", &[U32, VAR1]).is_err());
        assert!(be_u32("u", b"\0\0\0").is_err());
    }

    #[test]
    fn wide_offsets() {
        let big = vec![(b"user.big\0".to_vec(), vec![7u8; 300])];
        let mut out = Vec::new();
        write_xattrs(&mut out, &big);
        assert_eq!(read_xattrs("xattrs", &out).unwrap(), big);
    }
}
