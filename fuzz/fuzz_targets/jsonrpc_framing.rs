//! The message framing of the JSON-RPC transport: the scanner that finds where a message ends
//! must agree with serde_json on every input that starts with a JSON value, whatever the
//! pieces the bytes arrive in, and never panic on the rest.
#![no_main]

use jsonrpc_fdpass::frame::{Scan, Scanner};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, &[u8])| {
    let (piece, data) = input;
    let piece = usize::from(piece.max(1));
    let mut s = Scanner::default();
    let mut end = None;
    let mut len = 0;
    while len < data.len() {
        len = (len + piece).min(data.len());
        if let Scan::Complete(e) = s.scan(&data[..len]) {
            end = Some(e);
            break;
        }
    }
    // serde_json's own boundary, when the input starts with a valid value.
    let mut values =
        serde_json::Deserializer::from_slice(data).into_iter::<serde_json::Value>();
    if let Some(Ok(_)) = values.next() {
        let serde_end = values.byte_offset();
        let starts_with_container = data
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| matches!(b, b'{' | b'[' | b'"'));
        if starts_with_container {
            assert_eq!(end, Some(serde_end), "scanner and serde_json disagree");
        } else if let Some(e) = end {
            // A bare number or literal: it ends at whitespace or the next value, which
            // serde_json may see earlier (`1x`): never later.
            assert!(e >= serde_end, "scanner ended a scalar early: {e} < {serde_end}");
        }
    }
});
