//! The geometry of an XFS filesystem, from `XFS_IOC_FSGEOMETRY_V1`.
//!
//! An importer uses it to tell which allocation group an inode lives in (XFS takes
//! per-group locks), so that its threads spread over groups instead of queueing on one.

use std::os::fd::BorrowedFd;

/// XFS's `struct xfs_fsop_geom_v1`, the reply of `XFS_IOC_FSGEOMETRY_V1` (in every kernel
/// since XFS was merged; later versions only append fields).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct GeometryV1 {
    blocksize: u32,
    rtextsize: u32,
    agblocks: u32,
    agcount: u32,
    logblocks: u32,
    sectsize: u32,
    inodesize: u32,
    imaxpct: u32,
    datablocks: u64,
    rtblocks: u64,
    rtextents: u64,
    logstart: u64,
    uuid: [u8; 16],
    sunit: u32,
    swidth: u32,
    version: i32,
    flags: u32,
    logsectsize: u32,
    rtsectsize: u32,
    dirblocksize: u32,
}

/// What the geometry says about allocation groups and inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Geometry {
    /// Filesystem block size, in bytes.
    pub blocksize: u32,
    /// Blocks per allocation group.
    pub agblocks: u32,
    /// Number of allocation groups.
    pub agcount: u32,
    /// Inode size, in bytes.
    pub inodesize: u32,
}

impl Geometry {
    /// A geometry with these values (for callers that compute with one).
    pub fn new(blocksize: u32, agblocks: u32, agcount: u32, inodesize: u32) -> Self {
        Self {
            blocksize,
            agblocks,
            agcount,
            inodesize,
        }
    }
}

/// The geometry of the XFS filesystem holding `fd` (a file or directory opened for reading,
/// not `O_PATH`), or `None` on any other filesystem (the ioctl fails with `ENOTTY`) or if the
/// kernel refuses.
///
/// ```
/// let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
/// // Usually not XFS; either way, no panic and no error to handle.
/// let _ = cstor_sys::xfs::geometry(std::os::fd::AsFd::as_fd(&dir));
/// ```
pub fn geometry(fd: BorrowedFd<'_>) -> Option<Geometry> {
    use rustix::ioctl::{Getter, ioctl, opcode};
    const XFS_IOC_FSGEOMETRY_V1: rustix::ioctl::Opcode = opcode::read::<GeometryV1>(b'X', 100);
    // SAFETY: XFS_IOC_FSGEOMETRY_V1 is `_IOR('X', 100, struct xfs_fsop_geom_v1)`; the opcode
    // above encodes that direction, number and size (112 bytes, checked by a test), and
    // `GeometryV1` is that struct field for field in `repr(C)`, all of it plain integers, so
    // any bytes the kernel writes form a valid value. Other filesystems reject the opcode
    // without writing (`ENOTTY`), and rustix only reads the output after a successful call.
    let g = unsafe {
        let getter = Getter::<XFS_IOC_FSGEOMETRY_V1, GeometryV1>::new();
        ioctl(fd, getter)
    }
    .ok()?;
    Some(Geometry {
        blocksize: g.blocksize,
        agblocks: g.agblocks,
        agcount: g.agcount,
        inodesize: g.inodesize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_matches_the_struct() {
        // _IOR('X', 100, 112 bytes) as the kernel headers spell it: dir 2 (read) << 30,
        // size << 16, type << 8, number.
        assert_eq!(std::mem::size_of::<GeometryV1>(), 112);
        let expected = (2u32 << 30) | (112 << 16) | (u32::from(b'X') << 8) | 100;
        assert_eq!(
            rustix::ioctl::opcode::read::<GeometryV1>(b'X', 100) as u64,
            u64::from(expected)
        );
    }

    #[test]
    fn elsewhere_there_is_no_geometry_and_no_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::open(dir.path()).unwrap();
        if let Some(g) = geometry(std::os::fd::AsFd::as_fd(&f)) {
            // The temp dir happens to be on XFS: the geometry must make sense.
            assert!(g.agcount > 0 && g.blocksize.is_power_of_two());
        }
    }
}
