//! Test fixtures for cstor-proxy: real podman containers-storage built in
//! private directories.
//!
//! The integration tests of the workspace run against storage that podman
//! itself wrote, never against hand-made imitations. This crate builds that
//! storage:
//!
//! - [`podman`]: a private overlay store ([`PodmanStore`]) driven by the real
//!   `podman` and `skopeo` binaries, plus a reference OCI export
//!   ([`OciExport`]).
//! - [`rootfs`]: a root filesystem exercising every tar feature
//!   ([`write_feature_rootfs`], [`FeatureManifest`]).
//! - [`images`]: the standard image set, built once per fixture version and
//!   shared between test processes ([`standard_images`],
//!   [`standard_images_or_skip`]), and a fast private store for tests that
//!   corrupt things ([`small_private_store`]).
//! - [`rootless`]: a rootless podman user ([`RootlessUser`]).
//! - [`ostree`]: ostree repositories made with the `ostree` CLI, for the ostree stories.
//! - [`xfs`]: a loop-mounted XFS file system with reflinks ([`LoopXfs`]).
//! - [`faults`]: the fault suite's image, stores, kills and after-fault checks.
//! - [`skip`]: honest skipping ([`skip_or_fail`]): a missing capability is
//!   reported as `SKIPPED`, and becomes a failure when `CSTOR_TEST_NO_SKIP=1`.
//!
//! Typical use in a test:
//!
//! ```no_run
//! use cstor_tests as fixtures;
//!
//! let Some(images) = fixtures::standard_images_or_skip("my_test") else {
//!     return;
//! };
//! let layers = images.store.image_layers(&images.commit.id).unwrap();
//! assert_eq!(layers.len(), 2);
//! ```

#![warn(missing_docs)]

use std::ffi::OsStr;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

pub mod faults;
pub mod images;
pub mod ostree;
pub mod podman;
pub mod rootfs;
pub mod rootless;
pub mod session;
pub mod skip;
pub mod upstream;
pub mod xfs;

pub use images::{
    FIXTURE_VERSION, StandardImages, fixture_base_dir, many_files_store, small_private_store,
    standard_images, standard_images_or_skip,
};
pub use podman::{ImageRef, OciExport, PodmanStore};
pub use rootfs::{FeatureManifest, tar_rootfs, write_feature_rootfs};
pub use rootless::{RootlessUser, rootless_feature_image, rootless_user_or_skip};
pub use skip::{have_root, have_tool, skip_or_fail};
pub use xfs::{LoopXfs, loop_xfs_or_skip, reflink_supported};

/// Environment variable naming the helper binary to test (overrides the
/// lookup in the cargo target directory).
pub const HELPER_ENV: &str = "CSTOR_HELPER";

/// Name of the helper binary built by the `cstor-helper` package.
pub const HELPER_BINARY_NAME: &str = "cstor-helper";

/// The workspace root: the nearest ancestor of this crate's manifest
/// directory whose `Cargo.toml` declares `[workspace]` (falls back to the
/// parent of the manifest directory).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in manifest_dir.ancestors() {
        let toml = dir.join("Cargo.toml");
        if let Ok(text) = std::fs::read_to_string(&toml)
            && text.lines().any(|l| l.trim() == "[workspace]")
        {
            return dir.to_path_buf();
        }
    }
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The cargo target directory of the workspace.
///
/// In order: `$CARGO_TARGET_DIR` (a relative value is taken relative to the
/// workspace root); the directory that holds the running test executable
/// when it lives in `<target>/<profile>/deps/` (or
/// `<target>/<triple>/<profile>/deps/`), recognised by cargo's
/// `CACHEDIR.TAG`; else `<workspace root>/target`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        };
    }
    if let Some(profile_dir) = exe_profile_dir() {
        for dir in profile_dir.ancestors().take(3) {
            if dir.join("CACHEDIR.TAG").is_file() {
                return dir.to_path_buf();
            }
        }
    }
    workspace_root().join("target")
}

/// `<target>/<profile>` when the running executable is a cargo-built test in
/// `<target>/<profile>/deps/`.
fn exe_profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    if deps.file_name()? != "deps" {
        return None;
    }
    Some(deps.parent()?.to_path_buf())
}

/// The `cstor-helper` binary to test.
///
/// `$CSTOR_HELPER` if set (it must exist); otherwise `cstor-helper` next to
/// the running test's profile directory, then `<target>/debug/cstor-helper`,
/// then `<target>/release/cstor-helper`. The error tells you to run
/// `cargo build --workspace --bins` first.
pub fn helper_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(HELPER_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "${HELPER_ENV} names {}, which is not a file",
                path.display()
            );
        }
        return Ok(path);
    }
    let target = target_dir();
    let mut candidates = Vec::new();
    if let Some(profile_dir) = exe_profile_dir() {
        candidates.push(profile_dir.join(HELPER_BINARY_NAME));
    }
    candidates.push(target.join("debug").join(HELPER_BINARY_NAME));
    candidates.push(target.join("release").join(HELPER_BINARY_NAME));
    if let Some(found) = candidates.iter().find(|c| c.is_file()) {
        return Ok(found.clone());
    }
    let tried: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    bail!(
        "the helper binary {HELPER_BINARY_NAME} was not found (tried {}); run `cargo build --workspace --bins` first, or set ${HELPER_ENV}",
        tried.join(", ")
    )
}

/// Runs `cmd` to completion and returns its stdout with trailing whitespace
/// removed.
///
/// `what` describes the action for error messages ("importing X into store
/// Y"); a failure reports the command line, the exit status and stderr.
pub fn run_command(cmd: &mut Command, what: &str) -> Result<String> {
    let out = run_command_bytes(cmd, what)?;
    let text = String::from_utf8(out)
        .with_context(|| format!("{what}: output of {} is not UTF-8", describe_command(cmd)))?;
    Ok(text.trim_end().to_string())
}

/// Writes a script `text` to `dst` (mode 0755) that tests then run: written beside it first,
/// then put in place by [`copy_executable`], so that no fd of this process ever had `dst`
/// open for writing (see there: running it could fail with "Text file busy").
pub fn write_script(dst: &Path, text: &str) -> Result<()> {
    let mut draft = dst.as_os_str().to_owned();
    draft.push(".draft");
    let draft = PathBuf::from(draft);
    std::fs::write(&draft, text).with_context(|| format!("writing {}", draft.display()))?;
    copy_executable(&draft, dst)?;
    std::fs::remove_file(&draft).with_context(|| format!("removing {}", draft.display()))
}

/// Copies an executable to `dst` (mode 0755) with `install`, in a child process. Copied in
/// this process, the file would be open for writing while other test threads fork: a child
/// inherits that fd until it execs, and running the copy meanwhile fails with "Text file
/// busy" (ETXTBSY). A file written by a child that has exited has no writer left anywhere.
pub fn copy_executable(src: &Path, dst: &Path) -> Result<()> {
    run_command(
        Command::new("install")
            .args(["-m", "0755", "--"])
            .arg(src)
            .arg(dst),
        &format!("copying {} to {}", src.display(), dst.display()),
    )
    .map(drop)
}

/// Like [`run_command`] but returns stdout as raw bytes, untrimmed.
pub fn run_command_bytes(cmd: &mut Command, what: &str) -> Result<Vec<u8>> {
    let output = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot start {}", describe_command(cmd)))?;
    if !output.status.success() {
        bail!(
            "{what}: {} failed ({}): {}",
            describe_command(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}

/// Writes `msg` and a newline straight to the process's stderr.
///
/// Unlike `eprintln!`, this is not captured by the libtest harness, so skip
/// notices and fixture timings show up even for passing tests.
pub fn note(msg: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{msg}");
}

/// A shell-like rendering of a command line for messages.
pub fn describe_command(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        let a = arg.to_string_lossy();
        if a.is_empty() || a.contains([' ', '\'', '"']) {
            s.push('\'');
            s.push_str(&a.replace('\'', "'\\''"));
            s.push('\'');
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Reads the extended attribute `name` of `path` without following a final
/// symlink; `Ok(None)` when the attribute is absent.
pub fn read_xattr(path: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    loop {
        let size = match rustix::fs::lgetxattr_query(path, name) {
            Ok(size) => size,
            Err(rustix::io::Errno::NODATA) => return Ok(None),
            Err(e) => {
                return Err(std::io::Error::from(e))
                    .with_context(|| format!("reading xattr {name} of {}", path.display()));
            }
        };
        let mut buf = vec![0u8; size.max(1)];
        match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(Some(buf));
            }
            // The value grew between the two calls: ask again.
            Err(rustix::io::Errno::RANGE) => continue,
            Err(rustix::io::Errno::NODATA) => return Ok(None),
            Err(e) => {
                return Err(std::io::Error::from(e))
                    .with_context(|| format!("reading xattr {name} of {}", path.display()));
            }
        }
    }
}

/// Lists the extended attribute names of `path` (not following a final
/// symlink), as raw bytes.
pub fn list_xattrs(path: &Path) -> Result<Vec<Vec<u8>>> {
    let what = || format!("listing xattrs of {}", path.display());
    loop {
        let size = rustix::fs::llistxattr_query(path)
            .map_err(std::io::Error::from)
            .with_context(what)?;
        let mut buf = vec![0u8; size.max(1)];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf
                    .split(|b| *b == 0)
                    .filter(|n| !n.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect());
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(std::io::Error::from(e)).with_context(what),
        }
    }
}

/// Mount points at or below `dir` in this process's mount namespace, deepest
/// first (the order to unmount them in).
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut found = Vec::new();
    for line in text.split(|b| *b == b'\n') {
        // Field 5 (index 4) is the mount point, octal-escaped.
        let Some(field) = line.split(|b| *b == b' ').nth(4) else {
            continue;
        };
        let mount_point = PathBuf::from(OsStr::from_bytes(&unescape_mountinfo(field)));
        if mount_point.starts_with(dir) {
            found.push(mount_point);
        }
    }
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    Ok(found)
}

/// Decodes the `\ooo` octal escapes of /proc/self/mountinfo.
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && i + 3 < field.len()
            && field[i + 1..i + 4]
                .iter()
                .all(|c| (b'0'..=b'7').contains(c))
        {
            let v = field[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

/// Unmounts every mount point at or below `dir` (deepest first), falling
/// back to a lazy unmount. Used to clean up after our own stores and loop
/// mounts; it only ever touches paths under `dir`.
pub fn unmount_all_under(dir: &Path) -> Result<()> {
    for mount_point in mounts_under(dir)? {
        let status = Command::new("umount")
            .arg(&mount_point)
            .stderr(std::process::Stdio::null())
            .status()
            .with_context(|| format!("running umount {}", mount_point.display()))?;
        if !status.success() {
            run_command(
                Command::new("umount").arg("-l").arg(&mount_point),
                &format!("lazily unmounting {}", mount_point.display()),
            )?;
        }
    }
    Ok(())
}

/// Removes `path` (a file, a symlink, or a directory recursively after
/// unmounting anything mounted below it); a missing path is not an error.
pub fn remove_tree(path: &Path) -> Result<()> {
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !md.is_dir() {
        return std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()));
    }
    unmount_all_under(path)?;
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(b"/a\\040b"), b"/a b");
        assert_eq!(unescape_mountinfo(b"/plain"), b"/plain");
        assert_eq!(unescape_mountinfo(b"/x\\"), b"/x\\");
    }

    #[test]
    fn workspace_root_has_workspace_manifest() {
        let root = workspace_root();
        let text = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        assert!(text.contains("[workspace]"));
    }
}
