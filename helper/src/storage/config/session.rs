//! What podman 4.3.1 does to its own environment before it looks for per-user storage, and
//! which of its processes records a new store's run root.
//!
//! For per-user storage podman fills in `XDG_RUNTIME_DIR` and `XDG_CONFIG_HOME` when they
//! are unset or empty, and everything it does with storage afterwards (the process that
//! moves into the user namespace inherits them) sees those values: [`podman_session`]
//! returns that environment. But libpod records a new store's run root in its database,
//! and from then on the recorded one wins; the outer process records it, and in one case
//! that process answers from a lookup made before the variables were filled in
//! ([`outer_process_run_root`]).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::ConfigError;
use super::env::{ConfigEnv, creatable, eval_symlinks, home_dir};
use super::expand::clean;

/// The environment podman's storage lookups see.
#[derive(Debug)]
pub(super) struct Session {
    /// The variables as podman leaves them.
    pub(super) env: ConfigEnv,
    /// The run-time directory podman picked and would create (it does not exist yet), which
    /// then counts as existing.
    pub(super) creates: Option<PathBuf>,
}

impl Session {
    /// Rootful storage: podman changes nothing.
    pub(super) fn unchanged(env: &ConfigEnv) -> Self {
        Self {
            env: env.clone(),
            creates: None,
        }
    }
}

/// The environment podman's storage lookups see for per-user storage: `env` with
/// `XDG_RUNTIME_DIR` and `XDG_CONFIG_HOME` filled in when they are unset or empty, the way
/// podman fills them in (see [`podman_runtime_dir`] and [`podman_config_home`]).
///
/// # Errors
///
/// [`ConfigError::Invalid`] where podman gives up: a given `XDG_RUNTIME_DIR` belongs to
/// another user or is not writable, no run-time directory can be found, or `HOME` cannot
/// be resolved.
pub(super) fn podman_session(env: &ConfigEnv, uid: u32) -> Result<Session, ConfigError> {
    check_given_runtime_dir(env)?;
    let mut session = Session::unchanged(env);
    if env.non_empty("XDG_RUNTIME_DIR").is_none() {
        let dir = podman_runtime_dir(env, uid)?;
        if std::fs::symlink_metadata(&dir).is_err() {
            session.creates = Some(dir.clone());
        }
        session
            .env
            .vars
            .insert("XDG_RUNTIME_DIR".into(), dir.into_os_string());
    }
    if env.non_empty("XDG_CONFIG_HOME").is_none() {
        let dir = podman_config_home(env)?;
        session
            .env
            .vars
            .insert("XDG_CONFIG_HOME".into(), dir.into_os_string());
    }
    Ok(session)
}

/// containers/common, reading podman's defaults, refuses an `XDG_RUNTIME_DIR` of another
/// user, and one where it cannot make its `libpod` directory. One that does not resolve
/// is passed over there (and by containers/storage), not refused.
fn check_given_runtime_dir(env: &ConfigEnv) -> Result<(), ConfigError> {
    let Some(given) = env.non_empty("XDG_RUNTIME_DIR") else {
        return Ok(());
    };
    let Ok(dir) = std::fs::canonicalize(given) else {
        return Ok(());
    };
    let meta = std::fs::metadata(&dir)
        .map_err(|e| ConfigError::Invalid(format!("XDG_RUNTIME_DIR {}: {e}", dir.display())))?;
    if meta.uid() != env.euid {
        return Err(ConfigError::Invalid(format!(
            "XDG_RUNTIME_DIR directory {} is not owned by the current user",
            dir.display()
        )));
    }
    let libpod = dir.join("libpod");
    if std::fs::metadata(&libpod).is_err() && !creatable(&libpod) {
        return Err(ConfigError::Invalid(format!(
            "XDG_RUNTIME_DIR: {} cannot be created",
            libpod.display()
        )));
    }
    Ok(())
}

/// podman's own choice of run-time directory (its `util.GetRuntimeDir`), which differs from
/// containers/storage's: `/run/user/<uid>`, else `$TMPDIR/podman-run-<uid>`, each created
/// when missing and taken when it is a directory of this user that the user may
/// read, write and search; else `$HOME/rundir`, symlinks resolved.
fn podman_runtime_dir(env: &ConfigEnv, uid: u32) -> Result<PathBuf, ConfigError> {
    let candidates = [
        env.rooted("/run/user").join(uid.to_string()),
        clean(&env.temp_dir().join(format!("podman-run-{uid}"))),
    ];
    for dir in candidates {
        // podman stats through symlinks here, unlike containers/storage.
        match std::fs::metadata(&dir) {
            Ok(m) if m.uid() == env.euid && m.mode() & 0o700 == 0o700 => return Ok(dir),
            Ok(_) => {}
            Err(_) if creatable(&dir) => return Ok(dir),
            Err(_) => {}
        }
    }
    let Some(home) = env.non_empty("HOME") else {
        return Err(ConfigError::Invalid(
            "neither XDG_RUNTIME_DIR nor HOME was set non-empty".into(),
        ));
    };
    let resolved = std::fs::canonicalize(home).map_err(|e| {
        ConfigError::Invalid(format!("cannot resolve {}: {e}", Path::new(home).display()))
    })?;
    Ok(resolved.join("rundir"))
}

/// podman's `XDG_CONFIG_HOME` when none is set: `$HOME/.config` with the symlinks of `HOME`
/// resolved, if it is a directory of this user with at least mode 0700; else empty.
///
/// Only the variable counts here, not the passwd entry: an unset `HOME` resolves to ".", so
/// the directory is `.config` below the working directory, as in podman.
fn podman_config_home(env: &ConfigEnv) -> Result<PathBuf, ConfigError> {
    let home = env.lookup("HOME").map(Path::new).unwrap_or(Path::new(""));
    let resolved = eval_symlinks(home)
        .map_err(|e| ConfigError::Invalid(format!("cannot resolve {}: {e}", home.display())))?;
    let dir = clean(&resolved.join(".config"));
    // A numeric comparison in podman: 0o700 and above, whatever the lower bits.
    let usable =
        std::fs::metadata(&dir).is_ok_and(|m| m.uid() == env.euid && m.mode() & 0o777 >= 0o700);
    Ok(if usable { dir } else { PathBuf::new() })
}

/// What decides whose run root libpod records for a new store (see
/// [`outer_process_run_root`]).
pub(super) struct RecordedRunRoot<'a> {
    /// The per-user storage.conf that was read, if any.
    pub(super) user_file: Option<&'a Path>,
    /// Whether the configuration read names a run root.
    pub(super) names_run_root: bool,
    /// The graph root of the process that uses the store.
    pub(super) graphroot: &'a Path,
    /// The graph root the outer process computes before `XDG_*` are filled in.
    pub(super) outer_graphroot: PathBuf,
}

/// Whether libpod records, for a new per-user store, the run root the outer podman
/// process computed from the unmodified environment (containers/storage's fallbacks,
/// `$TMPDIR/containers-user-<uid>` typically) rather than the one in the filled-in
/// environment (`$TMPDIR/podman-run-<uid>/containers` typically).
///
/// That happens when neither `XDG_CONFIG_HOME` nor `XDG_RUNTIME_DIR` is set, the per-user
/// storage.conf exists (at the same path from `$HOME` as from the filled-in
/// `XDG_CONFIG_HOME`) and names no run root, and the outer process works on the same graph
/// root. containers/storage 1.43 caches the options read from that file together with what
/// its first lookup derived from them, so later lookups in the outer process repeat the
/// first one's run root; the outer process creates libpod's database, and the database's
/// run root wins from then on.
pub(super) fn outer_process_run_root(env: &ConfigEnv, uid: u32, r: &RecordedRunRoot<'_>) -> bool {
    let Some(user_file) = r.user_file else {
        return false;
    };
    if r.names_run_root
        || env.non_empty("XDG_CONFIG_HOME").is_some()
        || env.non_empty("XDG_RUNTIME_DIR").is_some()
    {
        return false;
    }
    let Ok(home) = home_dir(env, uid) else {
        return false;
    };
    clean(&home.join(".config/containers/storage.conf")) == clean(user_file)
        && r.outer_graphroot == r.graphroot
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::config::fixture::Fixture;
    use std::os::unix::fs::PermissionsExt;

    /// A per-user fixture without XDG_* and with its own TMPDIR, where /run/user/1000 is
    /// unusable (a file), so that podman's choice is `$TMPDIR/podman-run-1000`.
    fn bare() -> (Fixture, PathBuf) {
        let mut f = Fixture::per_user();
        f.unset("XDG_RUNTIME_DIR");
        let tmpdir = f.tmp.path().join("tmp");
        std::fs::create_dir_all(&tmpdir).expect("mkdir tmp");
        f.set("TMPDIR", &tmpdir);
        f.write_root("run/user/1000", "");
        (f, tmpdir)
    }

    fn var(env: &ConfigEnv, name: &str) -> PathBuf {
        PathBuf::from(env.lookup(name).expect("variable set"))
    }

    #[test]
    fn podman_fills_in_xdg_variables() {
        let (mut f, tmpdir) = bare();
        let session = podman_session(&f.env, 1000).expect("session").env;
        assert_eq!(
            var(&session, "XDG_RUNTIME_DIR"),
            tmpdir.join("podman-run-1000")
        );
        // No ~/.config yet: podman sets the variable to the empty string.
        assert_eq!(var(&session, "XDG_CONFIG_HOME"), Path::new(""));

        std::fs::create_dir_all(f.home().join(".config")).expect("mkdir");
        let session = podman_session(&f.env, 1000).expect("session").env;
        let home = std::fs::canonicalize(f.home()).expect("canon");
        assert_eq!(var(&session, "XDG_CONFIG_HOME"), home.join(".config"));

        // /run/user/<uid> first, when it is ours; podman does not mind group access.
        std::fs::remove_file(f.root("run/user/1000")).expect("rm");
        std::fs::create_dir(f.root("run/user/1000")).expect("mkdir");
        std::fs::set_permissions(
            f.root("run/user/1000"),
            std::fs::Permissions::from_mode(0o750),
        )
        .expect("chmod");
        let session = podman_session(&f.env, 1000).expect("session").env;
        assert_eq!(var(&session, "XDG_RUNTIME_DIR"), f.root("run/user/1000"));

        // Given values stay, and set-but-empty counts as not given.
        f.set("XDG_RUNTIME_DIR", "");
        f.set("XDG_CONFIG_HOME", f.tmp.path().to_path_buf());
        let session = podman_session(&f.env, 1000).expect("session").env;
        assert_eq!(var(&session, "XDG_RUNTIME_DIR"), f.root("run/user/1000"));
        assert_eq!(var(&session, "XDG_CONFIG_HOME"), f.tmp.path());
    }

    #[test]
    fn given_runtime_dir_of_another_user_is_refused() {
        let (mut f, _) = bare();
        f.set("XDG_RUNTIME_DIR", f.tmp.path().to_path_buf());
        f.env.euid += 1;
        assert!(matches!(f.load_err(), ConfigError::Invalid(m) if m.contains("not owned")));
        // One that does not exist is passed over.
        f.set("XDG_RUNTIME_DIR", f.tmp.path().join("nope"));
        assert!(f.load().rootless);
    }

    #[test]
    fn outer_process_records_the_run_root_of_a_new_store() {
        let (mut f, tmpdir) = bare();
        let outer = tmpdir.join("containers-user-1000/containers");
        let filled_in = tmpdir.join("podman-run-1000/containers");
        // No per-user file: the run root of the filled-in environment.
        assert_eq!(f.load().runroot, filled_in);

        // A per-user file that names no run root: the outer process's.
        f.write(&f.user_conf(), "[storage]\ndriver = \"overlay\"\n");
        assert_eq!(f.load().runroot, outer);
        // Also with a graph root of its own.
        f.write(&f.user_conf(), "[storage]\ngraphroot = \"/g\"\n");
        assert_eq!(f.load().runroot, outer);
        // Set but empty variables count as unset there.
        f.set("XDG_RUNTIME_DIR", "");
        f.set("XDG_CONFIG_HOME", "");
        assert_eq!(f.load().runroot, outer);

        // XDG_CONFIG_HOME given: no difference between the processes.
        f.set("XDG_CONFIG_HOME", f.home().join(".config"));
        assert_eq!(f.load().runroot, filled_in);
        f.unset("XDG_CONFIG_HOME");

        // The outer process uses the system file's rootless_storage_path while the per-user
        // file names no path, so it records a database elsewhere and the inner process
        // makes its own.
        f.write(&f.user_conf(), "[storage]\ndriver = \"overlay\"\n");
        f.write_root(
            "etc/containers/storage.conf",
            "[storage]\nrootless_storage_path = \"/elsewhere\"\n",
        );
        let o = f.load();
        assert_eq!(
            o.graphroot,
            f.home().join(".local/share/containers/storage")
        );
        assert_eq!(o.runroot, filled_in);

        // A run root in the per-user file settles it.
        f.write(&f.user_conf(), "[storage]\nrunroot = \"/r\"\n");
        assert_eq!(f.load().runroot, Path::new("/r"));
    }
}
