//! Upstream's tools the tests compare with or talk to: the `cfsctl` 0.9.4 binary
//! (`$CSTOR_CFSCTL`, else on `$PATH`; the test command installs it) and its repository
//! service, `cfsctl varlink`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::skip;

/// The upstream `cfsctl`, or `None` after reporting the skip (or failing where skips are
/// forbidden).
pub fn cfsctl_or_skip(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("CSTOR_CFSCTL")
        .map(PathBuf::from)
        .or_else(|| skip::find_tool("cfsctl"));
    if found.is_none() {
        skip::skip_or_fail(
            test,
            "no upstream cfsctl 0.9.4 (set CSTOR_CFSCTL or put cfsctl on PATH)",
        );
    }
    found
}

/// Upstream's repository service, `cfsctl varlink --address SOCK`, run as root; killed when
/// dropped.
#[derive(Debug)]
pub struct RepositoryService {
    child: std::process::Child,
    /// The socket it listens on.
    pub socket: PathBuf,
}

impl RepositoryService {
    /// Starts `cfsctl varlink` on `dir/composefs.sock`, logging to `dir/service.log`.
    pub fn start(cfsctl: &Path, dir: &Path) -> Self {
        Self::start_command(Command::new(cfsctl), dir)
    }

    /// [`RepositoryService::start`] with `cfsctl`, the command given (e.g. run as another
    /// user); `dir` must be writable by whoever runs it.
    pub fn start_command(mut cfsctl: Command, dir: &Path) -> Self {
        let socket = dir.join("composefs.sock");
        let child = cfsctl
            .args(["varlink", "--address"])
            .arg(&socket)
            // Its own stdin/stdout: a test harness waiting for the end of its output must not
            // wait for this process too.
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("service.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "cfsctl varlink did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        RepositoryService { child, socket }
    }
}

impl Drop for RepositoryService {
    fn drop(&mut self) {
        // Started through runuser, the service is a grandchild: found by its socket.
        let serving =
            crate::faults::processes_where(|args| args.iter().any(|a| Path::new(a) == self.socket));
        for p in &serving {
            let _ = crate::faults::kill(p);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
