//! Image references as users type them (`containers-storage:[overlay@/g+/r]name:tag@digest`,
//! short ids, other transports): any string parses or is refused, never a panic; what
//! parses prints back to something that parses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = cstor_protocol::reference::other_transport(s);
    let _ = cstor_protocol::reference::split_store(s);
    if let Ok(r) = cstor_helper::storage::reference::parse(s) {
        let _ = format!("{r:?}");
    }
});
