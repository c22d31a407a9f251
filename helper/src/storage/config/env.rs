//! The process inputs of discovery: environment variables, the effective uid, and the
//! per-user directories (home, `$XDG_DATA_HOME`, the run-time directory) that
//! containers/storage derives from them for per-user storage.
//!
//! The rules are those of the containers/storage that podman 4.3.1 is built with. What
//! podman itself adds to the environment first is in `session`.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::ConfigError;
use super::expand::clean;

/// Set by `podman unshare`: the uid of the rootless user whose storage is meant.
pub(super) const ENV_ROOTLESS_UID: &str = "_CONTAINERS_ROOTLESS_UID";

/// Inputs of discovery, injectable for tests.
#[derive(Debug, Clone)]
pub struct ConfigEnv {
    /// Environment variables (the process environment in production).
    pub vars: HashMap<String, OsString>,
    /// Effective uid of the process.
    pub euid: u32,
    /// Prefix for /etc, /usr/share, /run/user, /tmp and /proc paths: "/" in production, a
    /// temp dir in tests.
    pub fs_root: PathBuf,
}

impl ConfigEnv {
    /// Captures the environment, the effective uid and `/` as the file-system root.
    ///
    /// Variables whose names are not valid UTF-8 are left out; none of the variables
    /// that discovery consults can have such a name. This never fails.
    pub fn from_process() -> Self {
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| k.into_string().ok().map(|k| (k, v)))
            .collect();
        Self {
            vars,
            euid: rustix::process::geteuid().as_raw(),
            fs_root: PathBuf::from("/"),
        }
    }

    /// Like Go's `os.LookupEnv`: set-but-empty counts as set.
    pub(super) fn lookup(&self, name: &str) -> Option<&OsStr> {
        self.vars.get(name).map(OsString::as_os_str)
    }

    /// Like Go's `os.Getenv` tested against `""`: empty counts as unset.
    pub(super) fn non_empty(&self, name: &str) -> Option<&OsStr> {
        self.lookup(name).filter(|v| !v.is_empty())
    }

    /// Places a built-in absolute path under `fs_root`.
    pub(super) fn rooted(&self, absolute: &str) -> PathBuf {
        clean(&self.fs_root.join(absolute.trim_start_matches('/')))
    }

    /// Go's `os.TempDir`: `$TMPDIR`, else `/tmp`.
    pub(super) fn temp_dir(&self) -> PathBuf {
        self.non_empty("TMPDIR")
            .map_or_else(|| self.rooted("/tmp"), PathBuf::from)
    }
}

/// The uid that `$UID` expands to and that selects the rootless drop-in directories.
///
/// Upstream parses `_CONTAINERS_ROOTLESS_UID` with `strconv.Atoi` and ignores errors, so
/// garbage means 0. Negative or oversized values (which upstream would carry through as
/// such) are also taken as 0 here, since a uid cannot hold them.
pub(super) fn rootless_uid(env: &ConfigEnv) -> u32 {
    match env.non_empty(ENV_ROOTLESS_UID) {
        Some(v) => v.to_str().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0),
        None => env.euid,
    }
}

/// Home directory as upstream's `unshare.HomeDir`: `$HOME`, else the passwd entry of the
/// rootless uid.
pub(super) fn home_dir(env: &ConfigEnv, uid: u32) -> Result<PathBuf, ConfigError> {
    if let Some(home) = env.non_empty("HOME") {
        return Ok(PathBuf::from(home));
    }
    let passwd = env.rooted("/etc/passwd");
    let contents = std::fs::read(&passwd).map_err(|e| {
        ConfigError::Invalid(format!(
            "unable to resolve HOME directory: HOME is unset and {} cannot be read: {e}",
            passwd.display()
        ))
    })?;
    let wanted = uid.to_string();
    for line in contents.split(|b| *b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|b| *b == b':').collect();
        if let (Some(entry_uid), Some(home)) = (fields.get(2), fields.get(5))
            && *entry_uid == wanted.as_bytes()
        {
            return Ok(PathBuf::from(OsStr::from_bytes(home)));
        }
    }
    Err(ConfigError::Invalid(format!(
        "unable to resolve HOME directory: HOME is unset and uid {uid} has no entry in {}",
        passwd.display()
    )))
}

/// Go's `filepath.EvalSymlinks` as far as discovery needs it: an empty path is ".", which
/// is what podman makes of an unset `HOME`.
pub(super) fn eval_symlinks(path: &Path) -> io::Result<PathBuf> {
    if path.as_os_str().is_empty() {
        return Ok(PathBuf::from("."));
    }
    std::fs::canonicalize(path)
}

/// Whether podman could create `path` with `mkdir -p`: its nearest existing ancestor is a
/// directory this process may write to. podman creates the run-time directories it picks;
/// we do not write, so we ask whether it would have succeeded.
pub(super) fn creatable(path: &Path) -> bool {
    let Some(existing) = path
        .ancestors()
        .skip(1)
        .find(|a| !a.as_os_str().is_empty() && std::fs::symlink_metadata(a).is_ok())
    else {
        return false;
    };
    existing.is_dir()
        && rustix::fs::access(
            existing,
            rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
        )
        .is_ok()
}

/// `$XDG_DATA_HOME`, else `~/.local/share`: where per-user storage lives by default.
pub(super) fn data_home(env: &ConfigEnv, uid: u32) -> Result<PathBuf, ConfigError> {
    if let Some(dir) = env.non_empty("XDG_DATA_HOME") {
        return Ok(PathBuf::from(dir));
    }
    match home_dir(env, uid) {
        Ok(home) if !home.as_os_str().is_empty() => Ok(home.join(".local/share")),
        _ => Err(ConfigError::Invalid(
            "could not get either XDG_DATA_HOME or HOME".into(),
        )),
    }
}

/// The run root of per-user storage that no file names: `containers` in the run-time
/// directory (see [`storage_runtime_dir`]), which must exist or be creatable. `created` is
/// a directory podman makes before it looks, and so counts as existing.
pub(super) fn per_user_run_root(
    env: &ConfigEnv,
    uid: u32,
    created: Option<&Path>,
) -> Result<PathBuf, ConfigError> {
    let run = storage_runtime_dir(env, uid, created)?.join("containers");
    // Upstream creates it and gives up when it cannot.
    if std::fs::metadata(&run).is_err() && !creatable(&run) {
        return Err(ConfigError::Invalid(format!(
            "unable to make rootless runtime: {} cannot be created",
            run.display()
        )));
    }
    Ok(run)
}

/// containers/storage's run-time directory for per-user storage (`GetRootlessRuntimeDir`
/// of the version podman 4.3.1 is built with), minus the directory creation:
///
/// 1. `$XDG_RUNTIME_DIR`, symlinks resolved, when it resolves. One that does not exist is
///    passed over, not an error.
/// 2. `/run/user/<uid>`, only when `/proc/1/comm` cannot be read or holds exactly
///    `systemd`. The kernel ends that file with a newline, so in practice a readable one
///    never matches: upstream compares without trimming.
/// 3. `$TMPDIR/containers-user-<uid>` (`/tmp` without `TMPDIR`), which upstream creates when
///    it is missing.
/// 4. `~/rundir`, the home directory's symlinks resolved.
///
/// Candidates 2 and 3 count only when they are directories of this user that neither
/// group nor others may read or write.
fn storage_runtime_dir(
    env: &ConfigEnv,
    uid: u32,
    created: Option<&Path>,
) -> Result<PathBuf, ConfigError> {
    if let Some(dir) = env.non_empty("XDG_RUNTIME_DIR") {
        if let Ok(resolved) = std::fs::canonicalize(dir) {
            return Ok(resolved);
        }
        if created == Some(Path::new(dir)) {
            return Ok(PathBuf::from(dir));
        }
    }
    let private = |p: &Path| {
        std::fs::symlink_metadata(p).is_ok_and(|m| {
            m.uid() == env.euid && m.mode() & 0o700 == 0o700 && m.mode() & 0o066 == 0
        })
    };

    let comm = std::fs::read(env.rooted("/proc/1/comm"));
    if comm.as_ref().map_or(true, |c| c == b"systemd") {
        let run_user = env.rooted("/run/user").join(uid.to_string());
        if private(&run_user) {
            return Ok(run_user);
        }
    }

    let per_user_tmp = clean(&env.temp_dir().join(format!("containers-user-{uid}")));
    let usable = match std::fs::symlink_metadata(&per_user_tmp) {
        // Upstream creates it; when it cannot, it goes on to the home directory.
        Err(e) if e.kind() == io::ErrorKind::NotFound => creatable(&per_user_tmp),
        _ => private(&per_user_tmp),
    };
    if usable {
        return Ok(per_user_tmp);
    }

    let home = home_dir(env, uid)?;
    let home = std::fs::canonicalize(&home).map_err(|e| {
        ConfigError::Invalid(format!(
            "no run-time directory: home directory {} cannot be resolved: {e}",
            home.display()
        ))
    })?;
    Ok(home.join("rundir"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::config::fixture::Fixture;
    use crate::storage::config::{ConfigError, DEFAULT_GRAPHROOT};
    use std::os::unix::fs::{PermissionsExt, symlink};

    #[test]
    fn per_user_defaults_without_files() {
        let mut f = Fixture::per_user();
        let o = f.load();
        assert!(o.rootless);
        assert_eq!(o.rootless_uid, 1000);
        assert_eq!(
            o.graphroot,
            f.home().join(".local/share/containers/storage")
        );
        let run = std::fs::canonicalize(f.tmp.path().join("xdg-run")).expect("canon");
        assert_eq!(o.runroot, run.join("containers"));

        let data = f.tmp.path().join("data");
        f.set("XDG_DATA_HOME", &data);
        assert_eq!(f.load().graphroot, data.join("containers/storage"));
    }

    #[test]
    fn plain_nonzero_euid_is_per_user() {
        let f = Fixture::new(4242);
        let o = f.load();
        assert!(o.rootless);
        assert_eq!(o.rootless_uid, 4242);
        assert_eq!(
            o.graphroot,
            f.home().join(".local/share/containers/storage")
        );
    }

    #[test]
    fn rootless_uid_zero_in_env_means_rootful() {
        let mut f = Fixture::new(1000);
        f.set(ENV_ROOTLESS_UID, "0");
        let o = f.load();
        assert!(!o.rootless);
        assert_eq!(o.graphroot, Path::new(DEFAULT_GRAPHROOT));
        f.set(ENV_ROOTLESS_UID, "garbage");
        assert_eq!(f.load().rootless_uid, 0);
    }

    #[test]
    fn run_time_directory_fallbacks() {
        let mut f = Fixture::per_user();
        let tmpdir = f.tmp.path().join("tmp");
        std::fs::create_dir_all(&tmpdir).expect("mkdir tmp");
        f.set("TMPDIR", &tmpdir);
        let dir = |f: &Fixture| storage_runtime_dir(&f.env, 1000, None).expect("runtime dir");
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
        };

        // An XDG_RUNTIME_DIR that does not resolve is passed over, not an error.
        f.set("XDG_RUNTIME_DIR", f.tmp.path().join("nope"));
        let per_user_tmp = tmpdir.join("containers-user-1000");
        assert_eq!(dir(&f), per_user_tmp);

        // /run/user/<uid>, private to us, while /proc/1/comm cannot be read...
        let run_user = f.root("run/user/1000");
        std::fs::create_dir_all(&run_user).expect("mkdir run/user");
        mode(&run_user, 0o700);
        assert_eq!(dir(&f), run_user);
        // ...or says exactly "systemd". The kernel's newline spoils that comparison.
        f.write_root("proc/1/comm", "systemd\n");
        assert_eq!(dir(&f), per_user_tmp);
        f.write_root("proc/1/comm", "systemd");
        assert_eq!(dir(&f), run_user);
        // Group or others may not read it.
        mode(&run_user, 0o740);
        assert_eq!(dir(&f), per_user_tmp);
        f.write_root("proc/1/comm", "systemd\n");

        // $TMPDIR/containers-user-<uid> once it exists: private, and not a symlink.
        std::fs::create_dir(&per_user_tmp).expect("mkdir");
        mode(&per_user_tmp, 0o700);
        assert_eq!(dir(&f), per_user_tmp);
        mode(&per_user_tmp, 0o704);
        let rundir = std::fs::canonicalize(f.home())
            .expect("canon")
            .join("rundir");
        assert_eq!(dir(&f), rundir);
        std::fs::remove_dir(&per_user_tmp).expect("rmdir");
        symlink(&run_user, &per_user_tmp).expect("symlink");
        mode(&run_user, 0o700);
        assert_eq!(dir(&f), rundir);
    }

    #[test]
    fn run_root_must_be_creatable() {
        let mut f = Fixture::per_user();
        let file = f.write(&f.tmp.path().join("file"), "");
        f.set("XDG_RUNTIME_DIR", &file);
        assert!(
            matches!(per_user_run_root(&f.env, 1000, None), Err(ConfigError::Invalid(m)) if m.contains("unable to make rootless runtime"))
        );
        // The whole lookup stops earlier, where podman does: it cannot make libpod's
        // directory there either.
        assert!(matches!(f.load_err(), ConfigError::Invalid(m) if m.contains("libpod")));
    }

    #[test]
    fn home_from_passwd_when_home_unset() {
        let mut f = Fixture::per_user();
        f.unset("HOME");
        let pw_home = f.tmp.path().join("pwhome");
        f.write_root(
            "etc/passwd",
            &format!(
                "root:x:0:0:root:/root:/bin/sh\nbad line\nuser:x:1000:1000::{}:/bin/sh\n",
                pw_home.display()
            ),
        );
        let o = f.load();
        assert_eq!(o.graphroot, pw_home.join(".local/share/containers/storage"));

        std::fs::remove_file(f.root("etc/passwd")).expect("rm passwd");
        assert!(matches!(f.load_err(), ConfigError::Invalid(m) if m.contains("HOME")));
    }

    #[test]
    fn from_process_reads_the_real_process() {
        let env = ConfigEnv::from_process();
        assert_eq!(env.fs_root, Path::new("/"));
        assert_eq!(env.euid, rustix::process::geteuid().as_raw());
    }
}
