//! Which storage.conf files are read, in which order, as podman 4.3.1 picks them: the file
//! named by `CONTAINERS_STORAGE_CONF` alone, or else the first that exists of the per-user
//! file, `/etc/containers/storage.conf` and `/usr/share/containers/storage.conf`.
//!
//! Later containers/storage releases added drop-in directories (`storage.conf.d` and the
//! rootful, rootless and per-uid variants) and `CONTAINERS_STORAGE_CONF_OVERRIDE`. podman
//! 4.3.1 reads neither; when they exist they are read after the main file, for the podman
//! releases that do.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::decode::RawConfig;
use super::env::home_dir;
use super::expand::clean;
use super::{ConfigEnv, ConfigError};

pub(super) const ENV_CONF: &str = "CONTAINERS_STORAGE_CONF";
pub(super) const ENV_CONF_OVERRIDE: &str = "CONTAINERS_STORAGE_CONF_OVERRIDE";

/// Which kind of file the configuration came from; the rules for graph and run roots
/// depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MainFile {
    /// The file `CONTAINERS_STORAGE_CONF` names.
    Named,
    /// The per-user file: `$XDG_CONFIG_HOME/containers/storage.conf`, or for per-user
    /// storage `~/.config/containers/storage.conf`.
    User,
    /// `/etc/containers/storage.conf` or `/usr/share/containers/storage.conf`.
    System,
    /// None exists.
    Absent,
}

/// The outcome of discovery.
#[derive(Debug)]
pub(super) struct Discovered {
    /// Every file read, decoded over one configuration.
    pub(super) config: RawConfig,
    /// The files read, in order.
    pub(super) files: Vec<PathBuf>,
    /// Where the main configuration came from.
    pub(super) main: MainFile,
    /// The per-user file, when it was read.
    pub(super) user_file: Option<PathBuf>,
    /// For per-user storage read from the per-user file: `rootless_storage_path` of the
    /// system file that podman's outer process reads instead (empty when unset or when that
    /// process reads the per-user file too). See `session::outer_process_run_root`.
    pub(super) outer_rootless_storage_path: String,
}

/// Reads the configuration files podman 4.3.1 reads for `uid` (0: rootful storage).
///
/// `env` is the environment as given, `session` the one podman's storage lookups see
/// (see `session::podman_session`; the same as `env` for rootful storage).
pub(super) fn read_config_files(
    env: &ConfigEnv,
    session: &ConfigEnv,
    uid: u32,
) -> Result<Discovered, ConfigError> {
    let mut reader = FileReader {
        config: RawConfig::default(),
        files: Vec::new(),
    };
    let admin_config = env.rooted("/etc/containers/storage.conf");
    let vendor_config = env.rooted("/usr/share/containers/storage.conf");
    let user_config = user_config_file(env, session, uid)?;
    let mut main = MainFile::Absent;

    if let Some(path) = env.lookup(ENV_CONF) {
        // podman stats the empty path and gives up; it does not fall back.
        if path.is_empty() {
            return Err(ConfigError::Invalid(format!("{ENV_CONF} is set but empty")));
        }
        reader.read(Path::new(path), true)?;
        main = MainFile::Named;
    } else {
        let candidates = [
            (user_config.as_deref(), MainFile::User),
            (Some(admin_config.as_path()), MainFile::System),
            (Some(vendor_config.as_path()), MainFile::System),
        ];
        for (path, kind) in candidates {
            if let Some(path) = path
                && reader.read(path, false)?
            {
                main = kind;
                break;
            }
        }
        for drop_in in drop_in_files(&vendor_config, &admin_config, user_config.as_deref(), uid)? {
            reader.read(&drop_in, false)?;
        }
    }

    if let Some(path) = env.non_empty(ENV_CONF_OVERRIDE) {
        reader.read(Path::new(path), true)?;
    }

    let mut outer_rootless_storage_path = String::new();
    if uid > 0 && main == MainFile::User {
        // podman's outer process looks for its defaults before it sets XDG_CONFIG_HOME: it
        // reads the system file unless the variable was already given and names an existing
        // file. A broken system file stops it, as it stops podman.
        let given = env
            .lookup("XDG_CONFIG_HOME")
            .map(|dir| clean(&Path::new(dir).join("containers/storage.conf")))
            .filter(|p| std::fs::metadata(p).is_ok());
        if given.is_none() {
            for system in [&admin_config, &vendor_config] {
                let mut outer = FileReader {
                    config: RawConfig::default(),
                    files: Vec::new(),
                };
                if outer.read(system, false)? {
                    outer_rootless_storage_path = outer.config.rootless_storage_path;
                    break;
                }
            }
        }
    }

    Ok(Discovered {
        config: reader.config,
        files: reader.files,
        main,
        user_file: (main == MainFile::User).then_some(user_config).flatten(),
        outer_rootless_storage_path,
    })
}

/// The per-user storage.conf podman 4.3.1 would read: for per-user storage the one in the
/// `XDG_CONFIG_HOME` of `session`, else in `~/.config`; for rootful storage only one in an
/// `XDG_CONFIG_HOME` given in `env` (set but empty means the relative directory
/// `containers`, as upstream), never `~/.config`.
fn user_config_file(
    env: &ConfigEnv,
    session: &ConfigEnv,
    uid: u32,
) -> Result<Option<PathBuf>, ConfigError> {
    let in_dir = |dir: &Path| clean(&dir.join("containers/storage.conf"));
    if uid == 0 {
        return Ok(env.lookup("XDG_CONFIG_HOME").map(|d| in_dir(Path::new(d))));
    }
    Ok(Some(match session.non_empty("XDG_CONFIG_HOME") {
        Some(dir) => in_dir(Path::new(dir)),
        None => in_dir(&home_dir(session, uid)?.join(".config")),
    }))
}

struct FileReader {
    config: RawConfig,
    files: Vec<PathBuf>,
}

impl FileReader {
    /// Decodes one file. Returns `false` when it does not exist and `required` is false.
    fn read(&mut self, path: &Path, required: bool) -> Result<bool, ConfigError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if !required && e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        self.config.merge_file(path, &bytes)?;
        tracing::debug!("read storage configuration file {}", path.display());
        self.files.push(path.to_path_buf());
        Ok(true)
    }
}

/// Lists the drop-in files: `*.conf` regular files (symlinks do not count) from every
/// drop-in directory, sorted by base name, a later directory replacing an earlier one's
/// file of the same name.
fn drop_in_files(
    vendor_config: &Path,
    admin_config: &Path,
    user_config: Option<&Path>,
    uid: u32,
) -> Result<Vec<PathBuf>, ConfigError> {
    let mut dirs = Vec::with_capacity(7);
    for main in [vendor_config, admin_config] {
        dirs.push(with_suffix(main, ".d"));
        let variant = if uid > 0 {
            "storage.rootless.conf.d"
        } else {
            "storage.rootful.conf.d"
        };
        let special = main.with_file_name(variant);
        if uid > 0 {
            let per_uid = special.join(uid.to_string());
            dirs.push(special);
            dirs.push(per_uid);
        } else {
            dirs.push(special);
        }
    }
    // The user directory has no rootful/rootless variants.
    dirs.extend(user_config.map(|u| with_suffix(u, ".d")));

    let mut by_name: BTreeMap<Vec<u8>, PathBuf> = BTreeMap::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(ConfigError::ReadDir { path: dir, source }),
        };
        for entry in entries {
            let entry = entry.map_err(|source| ConfigError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            let file_type = entry.file_type().map_err(|source| ConfigError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            if file_type.is_file() && name.as_bytes().ends_with(b".conf") {
                by_name.insert(name.into_vec(), entry.path());
            }
        }
    }
    Ok(by_name.into_values().collect())
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::config::env::ENV_ROOTLESS_UID;
    use crate::storage::config::fixture::{Fixture, SYSTEM_GRAPHROOT, driver_of};
    use std::os::unix::fs::symlink;

    /// `[storage]` with both roots, as a rootful file must have them.
    const ROOTS: &str = "[storage]\ngraphroot = \"/g\"\nrunroot = \"/r\"\n";

    #[test]
    fn containers_storage_conf_is_read_alone() {
        let mut f = Fixture::new(0);
        f.write_system("[storage]\ndriver = \"vfs\"\n");
        f.write_root(
            "etc/containers/storage.conf.d/10.conf",
            "[storage]\nrunroot = \"/dropin\"\n",
        );
        let custom = f.write(
            &f.tmp.path().join("custom.conf"),
            "[storage]\ngraphroot = \"/custom\"\nrunroot = \"/custom-run\"\n",
        );
        f.set(ENV_CONF, &custom);
        let o = f.load();
        assert_eq!(o.config_files, vec![custom.clone()]);
        assert_eq!(o.graphroot, Path::new("/custom"));
        assert_eq!(o.runroot, Path::new("/custom-run"));
        assert_eq!(o.driver, None);

        let missing = f.tmp.path().join("missing.conf");
        f.set(ENV_CONF, missing);
        match f.load_err() {
            ConfigError::Read { path, source } => {
                assert_eq!(path, f.tmp.path().join("missing.conf"));
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("unexpected error {other}"),
        }

        // Set but empty is not unset: podman looks for the empty path and gives up.
        f.set(ENV_CONF, "");
        assert!(matches!(f.load_err(), ConfigError::Invalid(m) if m.contains(ENV_CONF)));
        f.unset(ENV_CONF);
        assert_eq!(driver_of(&f).as_deref(), Some("vfs"));
    }

    #[test]
    fn main_file_precedence() {
        let mut f = Fixture::new(0);
        let usr = f.write_root(
            "usr/share/containers/storage.conf",
            &format!("{ROOTS}driver = \"usr\"\n"),
        );
        assert_eq!(f.load().config_files, vec![usr]);
        assert_eq!(driver_of(&f).as_deref(), Some("usr"));
        let etc = f.write_system("[storage]\ndriver = \"etc\"\n");
        assert_eq!(f.load().config_files, vec![etc.clone()]);
        assert_eq!(driver_of(&f).as_deref(), Some("etc"));

        // Root never reads ~/.config/containers/storage.conf...
        f.write(&f.user_conf(), &format!("{ROOTS}driver = \"home\"\n"));
        assert_eq!(f.load().config_files, vec![etc.clone()]);

        // ...but does read $XDG_CONFIG_HOME/containers/storage.conf, before the others.
        let xdg = f.tmp.path().join("xdg");
        f.set("XDG_CONFIG_HOME", &xdg);
        assert_eq!(f.load().config_files, vec![etc.clone()]);
        let xdg_conf = f.write(
            &xdg.join("containers/storage.conf"),
            &format!("{ROOTS}driver = \"xdg\"\n"),
        );
        let o = f.load();
        assert_eq!(o.config_files, vec![xdg_conf]);
        assert_eq!(o.driver.as_deref(), Some("xdg"));
    }

    #[test]
    fn per_user_file_precedence() {
        let mut f = Fixture::per_user();
        let etc = f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ndriver = \"etc\"\n",
        );
        assert_eq!(f.load().config_files, vec![etc]);
        let home = f.write(&f.user_conf(), "[storage]\ndriver = \"home\"\n");
        let o = f.load();
        assert_eq!(o.config_files, vec![home.clone()]);
        assert_eq!(o.driver.as_deref(), Some("home"));

        // XDG_CONFIG_HOME replaces ~/.config; set but empty, podman replaces it.
        let xdg = f.tmp.path().join("xdg");
        f.set("XDG_CONFIG_HOME", &xdg);
        assert_eq!(driver_of(&f).as_deref(), Some("etc"));
        f.write(
            &xdg.join("containers/storage.conf"),
            "[storage]\ndriver = \"xdg\"\n",
        );
        assert_eq!(driver_of(&f).as_deref(), Some("xdg"));
        f.set("XDG_CONFIG_HOME", "");
        assert_eq!(f.load().config_files, vec![home]);
    }

    #[test]
    fn outer_podman_process_reads_the_system_file() {
        // podman's outer process looks at the system file before it sets XDG_CONFIG_HOME,
        // even when the per-user file is the one that counts: a broken one stops it.
        let mut f = Fixture::per_user();
        f.write(&f.user_conf(), "[storage]\ndriver = \"overlay\"\n");
        let etc = f.write_root("etc/containers/storage.conf", "[storage\n");
        assert!(matches!(f.load_err(), ConfigError::Parse { path, .. } if path == etc));
        // Not when XDG_CONFIG_HOME was given and holds the file.
        f.set("XDG_CONFIG_HOME", f.home().join(".config"));
        assert_eq!(f.load().config_files, vec![f.user_conf()]);
        // Nor when the file CONTAINERS_STORAGE_CONF names is the only one read.
        f.unset("XDG_CONFIG_HOME");
        let named = f.write(&f.tmp.path().join("named.conf"), "");
        f.set(ENV_CONF, &named);
        assert_eq!(f.load().config_files, vec![named]);
    }

    #[test]
    fn drop_ins_sorted_by_base_name_later_dir_wins() {
        let mut f = Fixture::new(0);
        let xdg = f.tmp.path().join("xdg");
        f.set("XDG_CONFIG_HOME", &xdg);
        let main = f.write_root(
            "usr/share/containers/storage.conf",
            &format!("{ROOTS}driver = \"main\"\n"),
        );
        f.write_root(
            "usr/share/containers/storage.conf.d/10-a.conf",
            "[storage]\ndriver = \"usr-10\"\n",
        );
        let etc10 = f.write_root(
            "etc/containers/storage.conf.d/10-a.conf",
            "[storage]\ndriver = \"etc-10\"\ngraphroot = \"/g10\"\n",
        );
        let usr20 = f.write_root(
            "usr/share/containers/storage.conf.d/20-b.conf",
            "[storage]\ndriver = \"usr-20\"\n",
        );
        let user05 = f.write(
            &xdg.join("containers/storage.conf.d/05-c.conf"),
            "[storage]\ndriver = \"user-05\"\nrunroot = \"/r05\"\n",
        );
        // Not *.conf, a directory, and a symlink: all ignored.
        f.write_root(
            "etc/containers/storage.conf.d/99-z.toml",
            "[storage]\ndriver = \"bad\"\n",
        );
        std::fs::create_dir_all(f.root("etc/containers/storage.conf.d/98-dir.conf"))
            .expect("mkdir");
        symlink(&usr20, f.root("etc/containers/storage.conf.d/97-link.conf")).expect("symlink");

        let o = f.load();
        assert_eq!(o.config_files, vec![main, user05, etc10, usr20]);
        assert_eq!(o.driver.as_deref(), Some("usr-20"));
        assert_eq!(o.graphroot, Path::new("/g10"));
        assert_eq!(o.runroot, Path::new("/r05"));

        // Without XDG_CONFIG_HOME, root has no per-user drop-in directory.
        f.unset("XDG_CONFIG_HOME");
        assert_eq!(f.load().runroot, Path::new("/r"));
    }

    #[test]
    fn rootful_and_rootless_drop_in_directories() {
        let mut f = Fixture::new(0);
        let rootful = f.write_root(
            "etc/containers/storage.rootful.conf.d/10.conf",
            "[storage]\ndriver = \"rootful\"\n",
        );
        let rootless = f.write_root(
            "usr/share/containers/storage.rootless.conf.d/20.conf",
            "[storage]\ndriver = \"rootless\"\n",
        );
        let mine = f.write_root(
            "etc/containers/storage.rootless.conf.d/1000/30.conf",
            "[storage]\ndriver = \"uid1000\"\n",
        );
        f.write_root(
            "etc/containers/storage.rootless.conf.d/1001/40.conf",
            "[storage]\ndriver = \"uid1001\"\n",
        );
        assert_eq!(f.load().config_files, vec![rootful]);

        f.set(ENV_ROOTLESS_UID, "1000");
        f.set("XDG_RUNTIME_DIR", f.tmp.path().to_path_buf());
        let o = f.load();
        assert_eq!(o.config_files, vec![rootless, mine]);
        assert_eq!(o.driver.as_deref(), Some("uid1000"));
    }

    #[test]
    fn override_file_is_read_last() {
        let mut f = Fixture::new(0);
        let main = f.write_system("[storage]\ndriver = \"main\"\n");
        let drop_in = f.write_root(
            "etc/containers/storage.conf.d/10.conf",
            "[storage]\ndriver = \"dropin\"\n",
        );
        let over = f.write(
            &f.tmp.path().join("over.conf"),
            "[storage]\ndriver = \"override\"\n",
        );
        f.set(ENV_CONF_OVERRIDE, &over);
        let o = f.load();
        assert_eq!(o.config_files, vec![main, drop_in, over.clone()]);
        assert_eq!(o.driver.as_deref(), Some("override"));
        assert_eq!(o.graphroot, Path::new(SYSTEM_GRAPHROOT));

        // Also after CONTAINERS_STORAGE_CONF.
        let custom = f.write(
            &f.tmp.path().join("custom.conf"),
            &format!("{ROOTS}driver = \"custom\"\n"),
        );
        f.set(ENV_CONF, &custom);
        assert_eq!(f.load().config_files, vec![custom, over]);

        f.set(ENV_CONF_OVERRIDE, f.tmp.path().join("missing.conf"));
        assert!(
            matches!(f.load_err(), ConfigError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
    }

    #[test]
    fn toml_syntax_error_names_the_file() {
        let f = Fixture::new(0);
        let path = f.write_root(
            "etc/containers/storage.conf.d/broken.conf",
            "[storage\ndriver = \n",
        );
        let err = f.load_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(matches!(err, ConfigError::Parse { path: p, .. } if p == path));

        std::fs::write(
            f.root("etc/containers/storage.conf.d/broken.conf"),
            b"\xff\xfe",
        )
        .expect("write");
        assert!(matches!(f.load_err(), ConfigError::Parse { .. }));
    }

    #[test]
    fn unreadable_main_file_is_an_error() {
        let f = Fixture::new(0);
        // A directory where the file should be is not "missing".
        std::fs::create_dir_all(f.root("etc/containers/storage.conf")).expect("mkdir");
        assert!(matches!(f.load_err(), ConfigError::Read { .. }));
    }
}
