//! Where one JSON value ends in a stream of bytes, found in one pass.
//!
//! The receiver used to hand its whole buffer to serde_json after every read and let it fail
//! with "EOF while parsing" until the message was complete: a message of n bytes read in
//! k-byte pieces cost n²/2k bytes of parsing. [`Scanner`] remembers how far it got and in
//! which state (inside a string, after a backslash, how deep in brackets), so every byte is
//! looked at once; serde_json then parses each complete message exactly once.
//!
//! The scanner only finds the boundary. It does not validate: a malformed message (a `]`
//! closing a `{`, a bare word) is cut where the brackets balance, or at the next
//! whitespace, and serde_json reports what is wrong with it.

/// What the scanner knows about the bytes so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum State {
    /// Before a value: whitespace is skipped.
    #[default]
    Between,
    /// Inside an object or array, `depth` brackets deep.
    Container {
        depth: usize,
        in_string: bool,
        escaped: bool,
    },
    /// Inside a string that is the whole value.
    TopString { escaped: bool },
    /// Inside a number or literal that is the whole value: it ends at whitespace.
    Scalar,
}

/// The result of [`Scanner::scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// A value ends at this offset (exclusive) of the buffer.
    Complete(usize),
    /// More bytes are needed; this many at the start are whitespace only.
    Incomplete,
}

/// Finds the end of the first JSON value of a buffer that grows between calls.
#[derive(Debug, Default)]
pub struct Scanner {
    /// Bytes of the buffer already looked at.
    scanned: usize,
    state: State,
    /// Offset of the value's first byte, once seen.
    start: Option<usize>,
}

impl Scanner {
    /// Looks at the bytes of `buf` not seen yet. `buf` must start with the bytes given to
    /// earlier calls since the last [`Scanner::reset`].
    pub fn scan(&mut self, buf: &[u8]) -> Scan {
        while self.scanned < buf.len() {
            let i = self.scanned;
            let b = buf[i];
            self.scanned += 1;
            match &mut self.state {
                State::Between => match b {
                    b' ' | b'\t' | b'\n' | b'\r' => {}
                    b'{' | b'[' => {
                        self.start = Some(i);
                        self.state = State::Container {
                            depth: 1,
                            in_string: false,
                            escaped: false,
                        };
                    }
                    b'"' => {
                        self.start = Some(i);
                        self.state = State::TopString { escaped: false };
                    }
                    // A stray closing bracket or comma: let the parser say what is wrong.
                    b'}' | b']' | b',' | b':' => return Scan::Complete(i + 1),
                    _ => {
                        self.start = Some(i);
                        self.state = State::Scalar;
                    }
                },
                State::Container {
                    depth,
                    in_string,
                    escaped,
                } => {
                    if *in_string {
                        if *escaped {
                            *escaped = false;
                        } else if b == b'\\' {
                            *escaped = true;
                        } else if b == b'"' {
                            *in_string = false;
                        }
                    } else {
                        match b {
                            b'"' => *in_string = true,
                            b'{' | b'[' => *depth += 1,
                            b'}' | b']' => {
                                *depth -= 1;
                                if *depth == 0 {
                                    return Scan::Complete(i + 1);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                State::TopString { escaped } => {
                    if *escaped {
                        *escaped = false;
                    } else if b == b'\\' {
                        *escaped = true;
                    } else if b == b'"' {
                        return Scan::Complete(i + 1);
                    }
                }
                State::Scalar => {
                    if matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'{' | b'[' | b'"') {
                        // The scalar ended before this byte; leave it for the next value.
                        self.scanned -= 1;
                        return Scan::Complete(i);
                    }
                }
            }
        }
        Scan::Incomplete
    }

    /// How many bytes of the value seen so far (0 before its first byte): what a size
    /// limit is checked against.
    pub fn value_len(&self) -> usize {
        self.start.map_or(0, |s| self.scanned - s)
    }

    /// Whether everything scanned so far is whitespace between values.
    pub fn between_values(&self) -> bool {
        self.state == State::Between
    }

    /// Starts over for a buffer whose first `consumed` bytes were removed.
    pub fn reset(&mut self) {
        *self = Scanner::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` to a scanner `piece` bytes at a time, as reads would.
    fn end_of(input: &[u8], piece: usize) -> Option<usize> {
        let mut s = Scanner::default();
        let mut len = 0;
        while len < input.len() {
            len = (len + piece).min(input.len());
            if let Scan::Complete(end) = s.scan(&input[..len]) {
                return Some(end);
            }
        }
        None
    }

    #[test]
    fn finds_the_end_of_objects_whatever_the_read_size() {
        let msg = br#"  {"a":"x}\"{[","b":[1,{"c":"\\"}],"d":{}}{"next":1}"#;
        let first_end = msg.iter().position(|&c| c == b'{').unwrap();
        let expected = msg.len() - br#"{"next":1}"#.len();
        assert!(first_end < expected);
        for piece in 1..msg.len() {
            assert_eq!(end_of(msg, piece), Some(expected), "piece {piece}");
        }
    }

    #[test]
    fn incomplete_values_ask_for_more() {
        for partial in [&b"{"[..], b"{\"a\":\"}", b"  ", b"[1,[2", b"\"abc\\\""] {
            assert_eq!(end_of(partial, 1), None, "{:?}", String::from_utf8_lossy(partial));
        }
    }

    #[test]
    fn top_level_strings_and_scalars_end_where_json_says() {
        assert_eq!(end_of(b"\"a\\\"b\" {}", 3), Some(6));
        assert_eq!(end_of(b"12345 {}", 2), Some(5));
        assert_eq!(end_of(b"true{}", 1), Some(4));
        assert_eq!(end_of(b"]", 1), Some(1));
    }

    #[test]
    fn each_byte_is_looked_at_once() {
        // A 1 MB message read 4 KiB at a time: scanning stays linear (the scanner resumes
        // where it stopped), which the old re-parse did not.
        let mut msg = b"{\"x\":\"".to_vec();
        msg.extend(std::iter::repeat_n(b'a', 1 << 20));
        msg.extend(b"\"}");
        let mut s = Scanner::default();
        let mut calls = 0;
        let mut len = 0;
        let end = loop {
            len = (len + 4096).min(msg.len());
            calls += 1;
            if let Scan::Complete(end) = s.scan(&msg[..len]) {
                break end;
            }
            assert_eq!(s.scanned, len);
        };
        assert_eq!(end, msg.len());
        assert_eq!(calls, msg.len().div_ceil(4096));
        assert_eq!(s.value_len(), msg.len());
    }
}
