//! Where object workers create their tmpfiles: one XFS allocation group per worker.
//!
//! XFS allocates a new file's inode in the allocation group (AG) of its directory and takes
//! that group's AGI buffer lock twice per object: once to allocate the `O_TMPFILE` inode
//! (which also puts it on the group's unlinked list) and once when `linkat` gives it a name
//! and takes it off that list. Workers whose tmpfiles land in the same group serialize on
//! that lock, and with as many workers as cores the holder is regularly preempted by the
//! helper or the stream reader while the other worker waits. With tmpfiles in each object's
//! own `objects/XX`, workers collide on a group as often as chance has their digests share
//! one.
//!
//! So every worker gets an `objects/XX` directory of a group of its own for its tmpfiles;
//! `linkat` then names the object in whichever `objects/XX` its digest says (a link does not
//! move an inode). Elsewhere (ext4, btrfs, tmpfs...) or when the geometry cannot be read,
//! workers fall back to the object's own directory, which spreads them as well as anything.

use std::os::fd::{AsFd, BorrowedFd};

use cstor_sys::xfs::Geometry;

/// What placement needs to know about an XFS filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Groups {
    /// Number of allocation groups.
    pub count: u32,
    /// An inode number's group is `ino >> shift`: XFS inode numbers are the group number
    /// followed by the block within the group (`ceil(log2(agblocks))` bits) and the inode
    /// within that block (`log2(blocksize / inodesize)` bits).
    pub shift: u32,
}

impl Groups {
    /// From the raw geometry; `None` when it makes no sense (a zero or non-power-of-two
    /// size, which no mounted XFS reports).
    fn from_geometry(g: &Geometry) -> Option<Self> {
        if g.agcount == 0
            || g.agblocks == 0
            || g.inodesize == 0
            || g.blocksize < g.inodesize
            || !g.blocksize.is_power_of_two()
            || !g.inodesize.is_power_of_two()
        {
            return None;
        }
        let agblklog = u32::BITS - (g.agblocks - 1).leading_zeros();
        let inopblog = (g.blocksize / g.inodesize).trailing_zeros();
        let shift = agblklog + inopblog;
        (shift < u64::BITS).then_some(Self {
            count: g.agcount,
            shift,
        })
    }

    /// The allocation group of inode number `ino`.
    pub fn of(&self, ino: u64) -> u64 {
        ino >> self.shift
    }
}

/// The allocation groups of the XFS filesystem holding `fd`, or `None` on any other
/// filesystem or if the kernel refuses.
pub(crate) fn xfs_groups(fd: BorrowedFd<'_>) -> Option<Groups> {
    Groups::from_geometry(&cstor_sys::xfs::geometry(fd)?)
}

/// [`xfs_groups`] of the filesystem holding directory `dir`, which may be an `O_PATH`
/// descriptor (as the repository hands out; ioctl refuses those with `EBADF`).
pub(crate) fn groups_of_dir(dir: BorrowedFd<'_>) -> Option<Groups> {
    let dir = rustix::fs::openat(
        dir,
        ".",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    xfs_groups(dir.as_fd())
}

/// For each of `workers` object workers, the `objects/XX` directory (a name relative to
/// `objects`) to create its tmpfiles in, or `None` to use each object's own directory.
///
/// `groups` is the filesystem's layout ([`groups_of_dir`]); with at least two allocation
/// groups and two workers, picks `objects/XX`
/// directories in distinct groups (creating more `objects/XX` directories while fewer
/// groups than workers are covered: XFS spreads new directories over the groups) and deals
/// them out round-robin. Never fails: placement only changes speed, so any error leaves
/// that worker on the default.
pub(crate) fn worker_dirs(
    objects: BorrowedFd<'_>,
    groups: Option<Groups>,
    workers: usize,
) -> Vec<Option<String>> {
    let none = vec![None; workers];
    let Some(groups) = groups.filter(|_| workers >= 2) else {
        return none;
    };
    if groups.count < 2 {
        return none;
    }
    let want = workers.min(groups.count as usize);
    let mut found: Vec<(u64, String)> = Vec::with_capacity(want);
    let note = |found: &mut Vec<(u64, String)>, name: &str, ino: u64| {
        let g = groups.of(ino);
        if !found.iter().any(|(seen, _)| *seen == g) {
            found.push((g, name.to_owned()));
        }
    };
    let stat = |name: &str| {
        rustix::fs::statat(objects, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .filter(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir())
            .map(|st| st.st_ino)
    };
    let names: Vec<String> = (0..=255u8).map(|b| format!("{b:02x}")).collect();
    let mut missing = Vec::new();
    for name in &names {
        match stat(name) {
            Some(ino) => note(&mut found, name, ino),
            None => missing.push(name),
        }
    }
    for name in missing {
        if found.len() >= want {
            break;
        }
        match rustix::fs::mkdirat(objects, name, rustix::fs::Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => {
                tracing::debug!("placement: creating objects/{name}: {e}");
                continue;
            }
        }
        if let Some(ino) = stat(name) {
            note(&mut found, name, ino);
        }
    }
    if found.len() < 2 {
        return none;
    }
    found.sort();
    found.truncate(want);
    tracing::debug!(
        "placement: {} allocation groups; worker tmpfile directories {:?}",
        groups.count,
        found
    );
    (0..workers)
        .map(|i| Some(found[i % found.len()].1.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(agblocks: u32, agcount: u32, blocksize: u32, inodesize: u32) -> Geometry {
        Geometry::new(blocksize, agblocks, agcount, inodesize)
    }

    #[test]
    fn geometry_gives_the_inode_number_layout() {
        // mkfs.xfs of 16 GiB: 4 groups of 1048576 blocks, 4 KiB blocks, 512-byte inodes:
        // 20 bits of block, 3 bits of inode within the block.
        let g = Groups::from_geometry(&geometry(1 << 20, 4, 4096, 512)).unwrap();
        assert_eq!(
            g,
            Groups {
                count: 4,
                shift: 23
            }
        );
        assert_eq!(g.of(128), 0);
        assert_eq!(g.of((3 << 23) | 4711), 3);
        // A group size that is not a power of two rounds up.
        let g = Groups::from_geometry(&geometry(65_500, 2, 4096, 512)).unwrap();
        assert_eq!(g.shift, 16 + 3);
        // Garbage is refused instead of producing a shift that overflows.
        assert!(Groups::from_geometry(&geometry(0, 4, 4096, 512)).is_none());
        assert!(Groups::from_geometry(&geometry(1 << 20, 4, 512, 4096)).is_none());
        assert!(Groups::from_geometry(&geometry(1 << 20, 4, 4096, 500)).is_none());
    }

    #[test]
    fn elsewhere_every_worker_uses_the_objects_own_directory() {
        // The test directory is not XFS on most machines (tmpfs, ext4); where it is, the
        // result must still name existing directories.
        let dir = tempfile::tempdir().unwrap();
        // O_PATH, as the repository hands it out.
        let fd = rustix::fs::open(
            dir.path(),
            rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::PATH,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let groups = groups_of_dir(fd.as_fd());
        let dirs = worker_dirs(fd.as_fd(), groups, 3);
        assert_eq!(dirs.len(), 3);
        let readable = rustix::fs::open(
            dir.path(),
            rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        if xfs_groups(readable.as_fd()).is_none() {
            assert!(dirs.iter().all(Option::is_none), "{dirs:?}");
        } else {
            for d in dirs.iter().flatten() {
                assert!(dir.path().join(d).is_dir());
            }
        }
        assert_eq!(worker_dirs(fd.as_fd(), groups, 1), vec![None]);
    }
}
