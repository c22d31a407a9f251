//! The process inputs of discovery: environment variables, the effective uid, and the
//! per-user directories (home, `$XDG_CONFIG_HOME`, `$XDG_DATA_HOME`, the runtime directory)
//! that containers/storage derives from them for rootless storage.

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
    /// Prefix for /etc, /usr/share and /run/user paths: "/" in production, a temp dir in tests.
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
fn home_dir(env: &ConfigEnv, uid: u32) -> Result<PathBuf, ConfigError> {
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

/// `$XDG_CONFIG_HOME/containers`, or `~/.config/containers`.
pub(super) fn user_config_dir(env: &ConfigEnv, uid: u32) -> Result<PathBuf, ConfigError> {
    // Upstream uses LookupEnv here, so an empty XDG_CONFIG_HOME yields the relative
    // directory "containers".
    if let Some(dir) = env.lookup("XDG_CONFIG_HOME") {
        return Ok(clean(&Path::new(dir).join("containers")));
    }
    Ok(clean(&home_dir(env, uid)?.join(".config/containers")))
}

/// Graph root and run root for per-user storage, before any configuration applies.
pub(super) fn per_user_defaults(
    env: &ConfigEnv,
    uid: u32,
) -> Result<(PathBuf, PathBuf), ConfigError> {
    let data_home = match env.non_empty("XDG_DATA_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => match home_dir(env, uid) {
            Ok(home) if !home.as_os_str().is_empty() => home.join(".local/share"),
            _ => {
                return Err(ConfigError::Invalid(
                    "could not get either XDG_DATA_HOME or HOME".into(),
                ));
            }
        },
    };
    let graphroot = clean(&data_home.join("containers/storage"));
    let runroot = clean(&runtime_dir(env, uid)?.join("containers"));
    Ok((graphroot, runroot))
}

/// Upstream's `homedir.GetRuntimeDir`, minus the directory creation.
fn runtime_dir(env: &ConfigEnv, uid: u32) -> Result<PathBuf, ConfigError> {
    if let Some(dir) = env.non_empty("XDG_RUNTIME_DIR") {
        return std::fs::canonicalize(dir).map_err(|e| {
            ConfigError::Invalid(format!(
                "XDG_RUNTIME_DIR {} cannot be resolved: {e}",
                Path::new(dir).display()
            ))
        });
    }
    let owned_privately = |m: &std::fs::Metadata| m.uid() == env.euid && m.mode() & 0o722 == 0o700;

    let run_user = env.rooted("/run/user").join(uid.to_string());
    if std::fs::symlink_metadata(&run_user).is_ok_and(|m| owned_privately(&m)) {
        return Ok(run_user);
    }

    let tmp = env
        .non_empty("TMPDIR")
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    let fallback = clean(&tmp.join(format!("storage-run-{uid}")));
    match std::fs::symlink_metadata(&fallback) {
        Ok(m) if owned_privately(&m) => Ok(fallback),
        // Upstream would create it (mode 0700); we do not write, and the result is the same.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(fallback),
        _ => Err(ConfigError::Invalid(format!(
            "path {} exists and it is not writeable only by the current user",
            fallback.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::config::fixture::Fixture;
    use crate::storage::config::{ConfigError, DEFAULT_GRAPHROOT, DEFAULT_RUNROOT};
    use std::os::unix::fs::PermissionsExt;

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
        let mut f = Fixture::new(4242);
        f.set("XDG_RUNTIME_DIR", f.tmp.path().to_path_buf());
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
    fn runtime_dir_fallbacks() {
        let mut f = Fixture::per_user();
        f.unset("XDG_RUNTIME_DIR");
        let tmpdir = f.tmp.path().join("tmp");
        std::fs::create_dir_all(&tmpdir).expect("mkdir tmp");
        f.set("TMPDIR", &tmpdir);

        // /run/user/<uid> owned by us with mode 0700 is used.
        let run_user = f.root("run/user/1000");
        std::fs::create_dir_all(&run_user).expect("mkdir run/user");
        std::fs::set_permissions(&run_user, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        assert_eq!(f.load().runroot, run_user.join("containers"));

        // Group-writable: rejected, fall back to $TMPDIR/storage-run-<uid>.
        std::fs::set_permissions(&run_user, std::fs::Permissions::from_mode(0o770)).expect("chmod");
        assert_eq!(f.load().runroot, tmpdir.join("storage-run-1000/containers"));

        // An existing fallback directory must be writable only by its owner.
        let fallback = tmpdir.join("storage-run-1000");
        std::fs::create_dir_all(&fallback).expect("mkdir fallback");
        std::fs::set_permissions(&fallback, std::fs::Permissions::from_mode(0o757)).expect("chmod");
        assert!(matches!(f.load_err(), ConfigError::Invalid(m) if m.contains("storage-run-1000")));
        // Only write access for others matters.
        std::fs::set_permissions(&fallback, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(f.load().runroot, fallback.join("containers"));

        // The runtime dir is only consulted for per-user storage.
        let rootful = Fixture::new(0);
        assert_eq!(rootful.load().runroot, Path::new(DEFAULT_RUNROOT));
    }

    #[test]
    fn missing_xdg_runtime_dir_is_an_error_for_per_user_storage() {
        let mut f = Fixture::per_user();
        f.set("XDG_RUNTIME_DIR", f.tmp.path().join("nope"));
        assert!(matches!(f.load_err(), ConfigError::Invalid(m) if m.contains("XDG_RUNTIME_DIR")));
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
