//! The layer stream decoder and the tar rebuild on top of it (what a client reads from the
//! helper's pipe): any bytes, with content files served from the input's tail, give records
//! or an error, never a panic; a rebuilt tar is never longer than what the stream described.
#![no_main]

use std::fs::File;
use std::io::Write;

use cstor_protocol::assemble::{ContentSource, assemble};
use cstor_protocol::stream::StreamReader;
use libfuzzer_sys::fuzz_target;

/// Serves every content fd as the same small file.
struct Contents(File);

impl ContentSource for Contents {
    fn content(&mut self, _fd: u64) -> std::io::Result<File> {
        self.0.try_clone()
    }
}

/// The content file every fd stands for, made once (a file per input would dominate).
static CONTENT: std::sync::LazyLock<File> = std::sync::LazyLock::new(|| {
    let mut f = tempfile::tempfile().expect("a temp file");
    f.write_all(&[b'x'; 100]).expect("writing it");
    f
});

fuzz_target!(|data: &[u8]| {
    // Records alone.
    if let Ok(mut r) = StreamReader::new(data) {
        for _ in 0..100_000 {
            match r.next_record() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
    // The whole rebuild, with a 100-byte content file.
    if let Ok(stream) = StreamReader::new(data) {
        let content = CONTENT.try_clone().expect("a second fd of the content file");
        let mut out = Vec::new();
        let _ = assemble(stream, &mut Contents(content), &mut out);
    }
});
