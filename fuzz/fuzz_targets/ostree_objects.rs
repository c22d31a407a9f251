//! ostree objects as the helper reads them from a repository it does not trust (commit,
//! dirtree, dirmeta, an archive file header): any bytes decode or are refused, never a
//! panic. An archive header that decodes is written back with our encoder and must decode
//! to the same file (xattrs compared as a set: the encoder sorts them as ostree does).
#![no_main]

use cstor_protocol::ostree::format::{ArchiveHeader, Commit, DirTree, Meta, archive_file_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            let _ = Commit::decode(bytes);
        }
        1 => {
            let _ = DirTree::decode(bytes);
        }
        2 => {
            let _ = Meta::decode(bytes);
        }
        _ => {
            let Ok(h) = ArchiveHeader::decode(bytes) else {
                return;
            };
            let again = archive_file_header(h.size, &h.meta, &h.symlink_target);
            let back = ArchiveHeader::decode(&again).expect("our own header decodes");
            assert_eq!(
                (back.size, back.meta.uid, back.meta.gid, back.meta.mode),
                (h.size, h.meta.uid, h.meta.gid, h.meta.mode)
            );
            assert_eq!(back.symlink_target, h.symlink_target);
            let mut a = h.meta.xattrs.clone();
            let mut b = back.meta.xattrs.clone();
            a.sort();
            b.sort();
            assert_eq!(a, b, "xattrs changed in a round trip");
        }
    }
});
