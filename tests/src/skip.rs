//! Honest skipping.
//!
//! A test that cannot run because the machine lacks a capability (root, a
//! tool, loop devices, …) calls [`skip_or_fail`] and returns. Locally that
//! prints `SKIPPED <test>: <reason>` on stderr, so a skip is visible in the
//! output instead of passing silently. In CI, which can do everything,
//! `CSTOR_TEST_NO_SKIP=1` turns every skip into a panic, so a capability that
//! went missing fails the run.
//!
//! ```no_run
//! use cstor_tests::skip;
//!
//! if !skip::require_root("my_test") || !skip::require_tools("my_test", &["podman"]) {
//!     return;
//! }
//! ```
//!
//! or, for a test that needs the shared images:
//!
//! ```no_run
//! let Some(images) = cstor_tests::standard_images_or_skip("my_test") else {
//!     return;
//! };
//! # let _ = images;
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// The environment variable that turns skips into failures when set to `1`.
pub const NO_SKIP_ENV: &str = "CSTOR_TEST_NO_SKIP";

/// Whether skips must fail (`CSTOR_TEST_NO_SKIP=1`, as CI sets it).
pub fn skips_forbidden() -> bool {
    std::env::var_os(NO_SKIP_ENV).is_some_and(|v| v == "1")
}

/// Reports that `test` cannot run because of `reason`.
///
/// Prints `SKIPPED <test>: <reason>` on stderr (uncaptured, see
/// [`crate::note`]); the caller then returns.
///
/// # Panics
///
/// When `CSTOR_TEST_NO_SKIP=1` is set: a run that requires every capability
/// must not skip.
pub fn skip_or_fail(test: &str, reason: &str) {
    if skips_forbidden() {
        panic!("{test}: capability missing in a run that requires it ({NO_SKIP_ENV}=1): {reason}");
    }
    crate::note(&format!("SKIPPED {test}: {reason}"));
}

/// Whether the process runs with effective uid 0.
pub fn have_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The path of the executable `name` found in `$PATH` (or `name` itself when
/// it contains a `/`), if it exists and is executable.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let is_exec = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_exec(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    // Root-only tools live in sbin, which a non-login PATH may lack.
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_exec(p))
}

/// Whether the executable `name` is available (see [`find_tool`]).
pub fn have_tool(name: &str) -> bool {
    find_tool(name).is_some()
}

/// Returns `true` when running as root; otherwise reports a skip of `test`
/// (see [`skip_or_fail`]) and returns `false`.
pub fn require_root(test: &str) -> bool {
    if have_root() {
        return true;
    }
    skip_or_fail(test, "needs root (uid 0)");
    false
}

/// Returns `true` when every tool in `tools` is available; otherwise reports
/// a skip of `test` naming the missing ones and returns `false`.
pub fn require_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have_tool(t)).collect();
    if missing.is_empty() {
        return true;
    }
    skip_or_fail(test, &format!("missing tools: {}", missing.join(", ")));
    false
}

/// Returns from the enclosing test (after [`skip_or_fail`]) unless the
/// condition holds.
///
/// ```no_run
/// # fn t() {
/// cstor_tests::skip_unless!("my_test", cstor_tests::have_tool("mkfs.btrfs"), "mkfs.btrfs not installed");
/// # }
/// ```
#[macro_export]
macro_rules! skip_unless {
    ($test:expr, $cond:expr, $reason:expr) => {
        if !$cond {
            $crate::skip::skip_or_fail($test, &$reason);
            return;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh() {
        assert!(have_tool("sh"));
        assert!(!have_tool("definitely-not-a-tool-cstor"));
    }
}
