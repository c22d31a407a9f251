//! Starting and supervising `cstor-helper`.
//!
//! The helper runs as a child process with one end of a socketpair on its fd 0. As root (or
//! with `CAP_DAC_OVERRIDE`) it is started directly; a rootless caller starts it as
//! `podman unshare cstor-helper ...` so that it runs in the user's namespace, where the
//! subordinate-uid files of rootless storage are readable.
//!
//! The child is reaped on a dedicated thread (not through tokio's SIGCHLD handling, which
//! conflicts with other event loops in the same process) and killed through a pidfd when the
//! client is dropped, so a pid can never be confused with a recycled one.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};

/// How to run the helper.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Privilege {
    /// Directly when this process can read any file (root or `CAP_DAC_OVERRIDE`), else
    /// through `podman unshare`.
    #[default]
    Auto,
    /// Run the helper directly.
    Direct,
    /// Run it as `podman unshare cstor-helper ...`.
    PodmanUnshare,
}

/// Which storage the helper serves. Unset fields come from storage.conf as podman reads it.
///
/// ```
/// let storage = cstor_proxy_client::StorageSelection::default()
///     .graphroot("/var/lib/containers/storage")
///     .runroot("/run/containers/storage");
/// assert_eq!(storage.to_args().len(), 4);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StorageSelection {
    /// The graph root (`--root`).
    pub graphroot: Option<PathBuf>,
    /// The run root (`--runroot`).
    pub runroot: Option<PathBuf>,
    /// A separate image store (`--imagestore`).
    pub imagestore: Option<PathBuf>,
    /// The driver (`--storage-driver`); only overlay is served.
    pub driver: Option<String>,
    /// Driver options replacing storage.conf's (`--storage-opt`).
    pub storage_opts: Vec<String>,
    /// Additional read-only image stores.
    pub additional_image_stores: Vec<PathBuf>,
    /// Read only this storage.conf.
    pub storage_conf: Option<PathBuf>,
}

impl StorageSelection {
    /// Sets the graph root.
    pub fn graphroot(mut self, dir: impl Into<PathBuf>) -> Self {
        self.graphroot = Some(dir.into());
        self
    }

    /// Sets the run root.
    pub fn runroot(mut self, dir: impl Into<PathBuf>) -> Self {
        self.runroot = Some(dir.into());
        self
    }

    /// Reads only this storage.conf.
    pub fn storage_conf(mut self, file: impl Into<PathBuf>) -> Self {
        self.storage_conf = Some(file.into());
        self
    }

    /// The helper arguments selecting this storage.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut opt = |flag: &str, v: &Path| {
            a.push(flag.into());
            a.push(v.into());
        };
        if let Some(p) = &self.graphroot {
            opt("--root", p);
        }
        if let Some(p) = &self.runroot {
            opt("--runroot", p);
        }
        if let Some(p) = &self.imagestore {
            opt("--imagestore", p);
        }
        if let Some(p) = &self.storage_conf {
            opt("--storage-conf", p);
        }
        for p in &self.additional_image_stores {
            opt("--additional-image-store", p);
        }
        if let Some(d) = &self.driver {
            a.push("--storage-driver".into());
            a.push(d.into());
        }
        for o in &self.storage_opts {
            a.push("--storage-opt".into());
            a.push(o.into());
        }
        a
    }
}

/// Everything needed to start a helper. Start from [`HelperConfig::default`] and set what
/// differs:
///
/// ```
/// use cstor_proxy_client::{HelperConfig, Privilege, StorageSelection};
/// let config = HelperConfig::default()
///     .storage(StorageSelection::default().graphroot("/srv/containers"))
///     .privilege(Privilege::Direct);
/// assert_eq!(config.privilege, Privilege::Direct);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HelperConfig {
    /// The helper binary; by default `$CSTOR_HELPER`, then `cstor-helper` next to the current
    /// executable, then on `PATH`.
    pub program: Option<PathBuf>,
    /// The storage to serve.
    pub storage: StorageSelection,
    /// The storage root as an already open directory (e.g. by a caller that resolved it
    /// itself); overrides `storage.graphroot`. The helper gets it as its stdout and opens it
    /// as `/proc/self/fd/1`, directly or through `podman unshare`; no other process this
    /// program starts inherits it.
    pub graphroot_fd: Option<std::sync::Arc<OwnedFd>>,
    /// How to run it.
    pub privilege: Privilege,
    /// The `podman` binary used for `podman unshare` (default: `podman` on `PATH`).
    pub podman: PathBuf,
    /// More helper arguments (e.g. `-v`, `--lease-timeout`).
    pub extra_args: Vec<OsString>,
    /// How long the helper may take to answer `Initialize`. `podman unshare` can take a few
    /// seconds on first use.
    pub handshake_timeout: Duration,
    /// How long the helper may take to answer any other call (but `FetchFds`, which waits
    /// for the layer's files and is covered by the keepalive pings instead). A helper that
    /// misses it is taken as frozen: the client kills it, which releases its storage locks,
    /// and the call fails with [`crate::Error::HelperUnresponsive`]. Longer than the helper's
    /// own storage lock timeout (30 s), so that a busy storage is reported as such.
    pub reply_timeout: Duration,
    /// While a layer is open, the client sends the helper a `KeepAlive` this often (also
    /// renewing the layer's lease): a helper blocked in a slow read still answers it, a
    /// frozen one does not, and is killed after `reply_timeout`. So a frozen helper is
    /// detected within `keepalive_interval + reply_timeout` (one minute by default).
    pub keepalive_interval: Duration,
}

impl Default for HelperConfig {
    fn default() -> Self {
        Self {
            program: None,
            storage: StorageSelection::default(),
            graphroot_fd: None,
            privilege: Privilege::Auto,
            podman: PathBuf::from("podman"),
            extra_args: Vec::new(),
            handshake_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(45),
            keepalive_interval: Duration::from_secs(10),
        }
    }
}

impl HelperConfig {
    /// Sets [`HelperConfig::program`].
    pub fn program(mut self, path: impl Into<PathBuf>) -> Self {
        self.program = Some(path.into());
        self
    }

    /// Sets [`HelperConfig::storage`].
    pub fn storage(mut self, storage: StorageSelection) -> Self {
        self.storage = storage;
        self
    }

    /// Sets [`HelperConfig::privilege`].
    pub fn privilege(mut self, privilege: Privilege) -> Self {
        self.privilege = privilege;
        self
    }

    /// Sets [`HelperConfig::reply_timeout`] (at least 1 ms).
    pub fn reply_timeout(mut self, t: Duration) -> Self {
        self.reply_timeout = t.max(Duration::from_millis(1));
        self
    }

    /// Adds helper arguments ([`HelperConfig::extra_args`]).
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// Locates the helper binary: `explicit`, else `$CSTOR_HELPER`, else `cstor-helper` beside
/// the running executable, else `../libexec/cstor/cstor-helper` from it (where
/// `contrib/install.sh` and distribution packages put it, `PREFIX/bin/cstor` beside
/// `PREFIX/libexec/cstor/cstor-helper`), else on `PATH`.
///
/// Fails with [`Error::HelperNotFound`] listing the places searched.
pub fn find_helper(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    if let Some(p) = std::env::var_os("CSTOR_HELPER").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        // Test binaries live in target/<profile>/deps; the helper one level up.
        let libexec = dir.parent().map(|p| p.join("libexec").join("cstor"));
        for d in [
            Some(dir.to_owned()),
            dir.parent()
                .filter(|_| dir.ends_with("deps"))
                .map(Path::to_owned),
            libexec,
        ]
        .into_iter()
        .flatten()
        {
            let c = d.join("cstor-helper");
            if c.is_file() {
                return Ok(c);
            }
            tried.push(c.display().to_string());
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let c = d.join("cstor-helper");
            if c.is_file() {
                return Ok(c);
            }
        }
        tried.push("$PATH".into());
    }
    Err(Error::HelperNotFound(format!(
        "set CSTOR_HELPER or install it; looked in {}",
        tried.join(", ")
    )))
}

/// Whether this process can open any file regardless of its mode.
pub fn can_read_everything() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    // CAP_DAC_OVERRIDE is bit 1 of the effective set in /proc/self/status.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 1) != 0)
}

const STDERR_TAIL: usize = 16 << 10;

/// A running helper: its pidfd, exit status once known, and the tail of its stderr.
#[derive(Debug)]
pub struct HelperProcess {
    pid: u32,
    pidfd: Option<OwnedFd>,
    status: Arc<(Mutex<Option<ExitStatus>>, std::sync::Condvar)>,
    stderr: Arc<Mutex<VecDeque<u8>>>,
    /// Set when the client killed the helper for not answering: the call and the deadline.
    unresponsive: Mutex<Option<(String, Duration)>>,
    /// The helper's own pidfd, which it passes at `Initialize` (protocol 1.1): the process
    /// started may be `podman unshare`, whose death leaves the helper running.
    helper_pidfd: Mutex<Option<OwnedFd>>,
    /// Whether the process started is `podman unshare`, leader of a process group of its
    /// own that the helper belongs to.
    unshare: bool,
}

impl HelperProcess {
    /// Starts the helper with `socket` as its fd 0.
    pub fn start(config: &HelperConfig, socket: OwnedFd) -> Result<Self> {
        let program = find_helper(config.program.as_deref())?;
        let direct = match config.privilege {
            Privilege::Direct => true,
            Privilege::PodmanUnshare => false,
            Privilege::Auto => can_read_everything(),
        };
        let mut cmd = if direct {
            Command::new(&program)
        } else {
            let mut c = Command::new(&config.podman);
            c.arg("unshare").arg(&program);
            // A process group of its own: the helper podman starts stays in it, and until the
            // helper has passed its pidfd at Initialize, killing the group is the only way to
            // reach it (see HelperProcess::kill).
            std::os::unix::process::CommandExt::process_group(&mut c, 0);
            c
        };
        // The storage root fd becomes the helper's stdout, which it does not write to when
        // it serves a socket. std puts it there in the child (dup2, whose copy has no
        // O_CLOEXEC) from a copy of ours that keeps O_CLOEXEC: a process another thread of
        // this program starts meanwhile does not inherit it, as it would an fd duplicated
        // without O_CLOEXEC for the child to find under its own number.
        let mut storage = config.storage.clone();
        let stdout = match &config.graphroot_fd {
            Some(fd) => {
                storage.graphroot = Some(PathBuf::from("/proc/self/fd/1"));
                Stdio::from(
                    fd.try_clone()
                        .map_err(|e| Error::io("passing the storage root fd", e))?,
                )
            }
            None => Stdio::null(),
        };
        cmd.args(storage.to_args())
            .args(&config.extra_args)
            .stdin(Stdio::from(socket))
            .stdout(stdout)
            .stderr(Stdio::piped());
        tracing::debug!(?cmd, "starting the helper");
        let shown = if direct {
            program.clone()
        } else {
            config.podman.clone()
        };
        let mut child = cmd.spawn().map_err(|cause| Error::Spawn {
            program: shown,
            cause,
        })?;
        let pid = child.id();
        // Opened before anyone can reap the child, so it always names this process.
        let pidfd = rustix::process::Pid::from_raw(pid as i32).and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });
        let stderr = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        if let Some(mut pipe) = child.stderr.take() {
            let tail = stderr.clone();
            std::thread::Builder::new()
                .name("helper-stderr".into())
                .spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut line = Vec::new();
                    while let Ok(n) = pipe.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                        t.extend(&buf[..n]);
                        let excess = t.len().saturating_sub(STDERR_TAIL);
                        t.drain(..excess);
                        drop(t);
                        for &b in &buf[..n] {
                            if b == b'\n' {
                                tracing::info!(target: "cstor_helper", "{}", String::from_utf8_lossy(&line));
                                line.clear();
                            } else {
                                line.push(b);
                            }
                        }
                    }
                })
                .map_err(|e| Error::io("starting the helper stderr thread", e))?;
        }
        let status = Arc::new((Mutex::new(None), std::sync::Condvar::new()));
        let st = status.clone();
        std::thread::Builder::new()
            .name("helper-reaper".into())
            .spawn(move || {
                let s = child.wait();
                let (lock, cv) = &*st;
                let mut slot = lock.lock().unwrap_or_else(|p| p.into_inner());
                if let Ok(s) = s {
                    tracing::debug!("helper exited: {s}");
                    *slot = Some(s);
                }
                cv.notify_all();
            })
            .map_err(|e| Error::io("starting the helper reaper thread", e))?;
        Ok(Self {
            pid,
            pidfd,
            status,
            stderr,
            unresponsive: Mutex::new(None),
            helper_pidfd: Mutex::new(None),
            unshare: !direct,
        })
    }

    /// The helper's pid (or `podman`'s when started through `podman unshare`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status, waiting up to `wait` for it.
    pub fn exit_status(&self, wait: Duration) -> Option<ExitStatus> {
        let (lock, cv) = &*self.status;
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, wait, |s| s.is_none())
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }

    /// The last bytes the helper wrote on stderr.
    pub fn stderr_tail(&self) -> String {
        let t = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let (a, b) = t.as_slices();
        let mut v = a.to_vec();
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }

    /// Kills the helper because it did not answer `what` within `deadline`; every later
    /// error about its death says so ([`Error::HelperUnresponsive`]).
    pub fn kill_unresponsive(&self, what: &str, deadline: Duration) -> Error {
        self.unresponsive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| (what.to_owned(), deadline));
        tracing::warn!(
            "cstor-helper did not answer {what} within {:.1} s: killing it",
            deadline.as_secs_f64()
        );
        self.kill();
        let _ = self.exit_status(Duration::from_secs(2));
        self.died(what)
    }

    /// An error describing the helper's death while doing `during`.
    pub fn died(&self, during: &str) -> Error {
        let unresponsive = self
            .unresponsive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some((what, deadline)) = unresponsive {
            return Error::HelperUnresponsive {
                what,
                seconds: deadline.as_secs_f64(),
                stderr: self.stderr_tail(),
            };
        }
        let status = match self.exit_status(Duration::from_secs(2)) {
            Some(s) => s.to_string(),
            None => "it closed the connection but is still running".to_owned(),
        };
        // Give the stderr thread a moment to collect the last words.
        std::thread::sleep(Duration::from_millis(20));
        Error::HelperDied {
            during: during.to_owned(),
            status,
            stderr: self.stderr_tail(),
        }
    }

    /// An error describing a connection that broke while doing `during`, for `reason` (what
    /// the client's reader saw: end of stream, a reply that is not JSON, one over the size
    /// limit...). When the helper exited, its exit status ([`HelperProcess::died`]); when it
    /// still runs, the reason, and it is killed: it can serve nothing more on a broken
    /// connection.
    pub fn broke(&self, during: &str, reason: &str) -> Error {
        let unresponsive = self
            .unresponsive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if unresponsive || self.exit_status(Duration::from_secs(2)).is_some() {
            return self.died(during);
        }
        self.kill();
        let _ = self.exit_status(Duration::from_secs(2));
        Error::HelperDied {
            during: during.to_owned(),
            status: format!("{reason} (it was still running, and was killed)"),
            stderr: self.stderr_tail(),
        }
    }

    /// Kills the helper (SIGKILL through its pidfd) unless it already exited.
    pub fn kill(&self) {
        // The helper itself first: when it runs under `podman unshare`, killing podman
        // would leave it (and its locks) behind. Its pidfd names it even after it exited.
        let helper_pidfd = self.helper_pidfd.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fd) = &*helper_pidfd {
            let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
        }
        if self.exit_status(Duration::ZERO).is_some() {
            return;
        }
        if self.unshare && helper_pidfd.is_none() {
            // No pidfd yet (the helper froze before it answered Initialize): kill podman's
            // process group, which holds the helper (podman's rootless pause process starts a
            // session of its own and is not in it). podman was not reaped a moment ago, so
            // the group's id is its pid and names no other group: the id stays taken while
            // any member lives.
            if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
        }
        drop(helper_pidfd);
        if let Some(fd) = &self.pidfd {
            let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
        }
    }

    /// Keeps the helper's own pidfd (from `Initialize`), which [`HelperProcess::kill`]
    /// signals first.
    pub fn set_helper_pidfd(&self, fd: OwnedFd) {
        *self.helper_pidfd.lock().unwrap_or_else(|p| p.into_inner()) = Some(fd);
    }
}

impl Drop for HelperProcess {
    fn drop(&mut self) {
        // The helper exits by itself once its socket closes; give it a moment, then make sure.
        if self.exit_status(Duration::from_millis(200)).is_none() {
            self.kill();
            let _ = self.exit_status(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_args() {
        let s = StorageSelection {
            graphroot: Some("/g".into()),
            runroot: Some("/r".into()),
            additional_image_stores: vec!["/a".into(), "/b".into()],
            storage_opts: vec!["overlay.mount_program=/x".into()],
            ..Default::default()
        };
        let a: Vec<String> = s
            .to_args()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            a,
            [
                "--root",
                "/g",
                "--runroot",
                "/r",
                "--additional-image-store",
                "/a",
                "--additional-image-store",
                "/b",
                "--storage-opt",
                "overlay.mount_program=/x"
            ]
        );
    }

    #[test]
    fn explicit_program_wins() {
        assert_eq!(
            find_helper(Some(Path::new("/x/h"))).unwrap(),
            PathBuf::from("/x/h")
        );
    }
}
