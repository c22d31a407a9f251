//! A loop-mounted XFS file system (reflinks), and a reflink probe.
//!
//! The root file system here is ext4, which has no reflinks. [`LoopXfs`]
//! makes a sparse image file in a temporary directory, attaches it with
//! `losetup -f --show`, formats it with `mkfs.xfs -q` (reflink=1 is the
//! default) and mounts it. Dropping it unmounts everything below the mount
//! point, the mount itself, and detaches exactly its own loop device.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::{run_command, skip, unmount_all_under};

/// A loop-mounted XFS file system, torn down on drop.
#[derive(Debug)]
pub struct LoopXfs {
    /// Where the file system is mounted.
    pub mountpoint: PathBuf,
    /// The loop device (`/dev/loopN`) this instance attached.
    pub loop_dev: PathBuf,
    /// The backing image file.
    pub image: PathBuf,
    mounted: bool,
    // Holds the image file and the mount point; removed last.
    _dir: TempDir,
}

impl LoopXfs {
    /// Creates, formats and mounts an XFS file system of `size_bytes`
    /// (sparse; XFS needs at least 300 MiB). Needs root.
    pub fn new(size_bytes: u64) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("cstor-xfs-")
            .tempdir()
            .context("creating a temporary directory for a loop XFS")?;
        let image = dir.path().join("xfs.img");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint)
            .with_context(|| format!("creating {}", mountpoint.display()))?;
        let f = std::fs::File::create(&image)
            .with_context(|| format!("creating {}", image.display()))?;
        f.set_len(size_bytes)
            .with_context(|| format!("truncating {} to {size_bytes} bytes", image.display()))?;
        drop(f);
        let dev = run_command(
            Command::new("losetup").arg("-f").arg("--show").arg(&image),
            &format!("attaching {} to a loop device", image.display()),
        )?;
        let mut xfs = LoopXfs {
            mountpoint,
            loop_dev: PathBuf::from(dev.trim()),
            image,
            mounted: false,
            _dir: dir,
        };
        // From here on, Drop detaches the device if a step fails.
        run_command(
            Command::new("mkfs.xfs").arg("-q").arg(&xfs.loop_dev),
            &format!("formatting {} as XFS", xfs.loop_dev.display()),
        )?;
        run_command(
            Command::new("mount")
                .arg(&xfs.loop_dev)
                .arg(&xfs.mountpoint),
            &format!(
                "mounting {} on {}",
                xfs.loop_dev.display(),
                xfs.mountpoint.display()
            ),
        )?;
        xfs.mounted = true;
        Ok(xfs)
    }

    /// A path inside the file system.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mountpoint.join(rel)
    }

    fn teardown(&mut self) -> Result<()> {
        if self.mounted {
            // Also whatever a test mounted below (e.g. skopeo's bind mount of
            // a store's overlay/ onto itself).
            unmount_all_under(&self.mountpoint)?;
            self.mounted = false;
        }
        run_command(
            Command::new("losetup").arg("-d").arg(&self.loop_dev),
            &format!("detaching {}", self.loop_dev.display()),
        )
        .map(drop)
    }
}

impl Drop for LoopXfs {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            crate::note(&format!(
                "cstor-tests: tearing down loop XFS {} on {}: {e:#}",
                self.loop_dev.display(),
                self.mountpoint.display()
            ));
        }
    }
}

/// Whether `dir`'s file system supports reflinks: probes `FICLONE` between
/// two temporary files created in `dir` (and removed again).
pub fn reflink_supported(dir: &Path) -> bool {
    let probe = || -> Result<()> {
        let mut src = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("creating a probe file in {}", dir.display()))?;
        std::io::Write::write_all(&mut src, &[0x5a; 8192])?;
        src.as_file().sync_all()?;
        let dst = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("creating a probe file in {}", dir.display()))?;
        rustix::fs::ioctl_ficlone(dst.as_file(), src.as_file())
            .map_err(std::io::Error::from)
            .context("FICLONE")?;
        Ok(())
    };
    probe().is_ok()
}

/// Default size of [`loop_xfs_or_skip`] file systems: 4 GiB (sparse).
pub const DEFAULT_XFS_SIZE: u64 = 4 << 30;

/// A [`LoopXfs`] of `size_bytes` for test `test`, or `None` after reporting
/// a skip when the machine cannot provide one (not root, tools or
/// `/dev/loop-control` missing, or attaching/formatting/mounting fails).
pub fn loop_xfs_or_skip(test: &str, size_bytes: u64) -> Option<LoopXfs> {
    if !skip::require_root(test) || !skip::require_tools(test, &["losetup", "mkfs.xfs", "mount"]) {
        return None;
    }
    if !Path::new("/dev/loop-control").exists() {
        skip::skip_or_fail(test, "no /dev/loop-control (loop devices unavailable)");
        return None;
    }
    match LoopXfs::new(size_bytes) {
        Ok(xfs) => Some(xfs),
        Err(e) => {
            skip::skip_or_fail(test, &format!("cannot make a loop XFS: {e:#}"));
            None
        }
    }
}
