//! The tar-split reader (the helper's view of containers-storage's per-layer metadata):
//! any bytes give entries or an error, never a panic, and reading stops after an error.
#![no_main]

use cstor_helper::tarsplit::TarSplitReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = TarSplitReader::new(data);
    let mut failed = false;
    for entry in r.by_ref().take(100_000) {
        assert!(!failed, "an entry after an error");
        failed = entry.is_err();
    }
});
