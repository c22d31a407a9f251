//! Which storage.conf files are read, in which order: the file named by
//! `CONTAINERS_STORAGE_CONF`, or the first main file that exists followed by the drop-ins
//! of every `storage.conf.d` directory (and the rootful, rootless and per-uid variants),
//! then `CONTAINERS_STORAGE_CONF_OVERRIDE`.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::decode::RawConfig;
use super::env::user_config_dir;
use super::{ConfigEnv, ConfigError};

pub(super) const ENV_CONF: &str = "CONTAINERS_STORAGE_CONF";
pub(super) const ENV_CONF_OVERRIDE: &str = "CONTAINERS_STORAGE_CONF_OVERRIDE";

/// Reads every configuration file in upstream order and decodes it over one [`RawConfig`];
/// also returns the files read, in order.
pub(super) fn read_config_files(
    env: &ConfigEnv,
    uid: u32,
) -> Result<(RawConfig, Vec<PathBuf>), ConfigError> {
    let mut reader = FileReader {
        config: RawConfig::default(),
        files: Vec::new(),
    };
    let mut load_main_and_drop_ins = true;

    if let Some(path) = env.non_empty(ENV_CONF) {
        reader.read(Path::new(path), true)?;
        load_main_and_drop_ins = false;
    }

    // Upstream resolves the user directory even when it is not going to use it, so a
    // missing home directory is fatal in every case.
    let user_config = user_config_dir(env, uid)?.join("storage.conf");
    let admin_config = env.rooted("/etc/containers/storage.conf");
    let vendor_config = env.rooted("/usr/share/containers/storage.conf");

    if load_main_and_drop_ins {
        for main in [&user_config, &admin_config, &vendor_config] {
            if reader.read(main, false)? {
                break;
            }
        }
        for drop_in in drop_in_files(&vendor_config, &admin_config, &user_config, uid)? {
            reader.read(&drop_in, false)?;
        }
    }

    if let Some(path) = env.non_empty(ENV_CONF_OVERRIDE) {
        reader.read(Path::new(path), true)?;
    }

    Ok((reader.config, reader.files))
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
    user_config: &Path,
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
    dirs.push(with_suffix(user_config, ".d"));

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
    use crate::storage::config::DEFAULT_RUNROOT;
    use crate::storage::config::env::ENV_ROOTLESS_UID;
    use crate::storage::config::fixture::{Fixture, driver_of};
    use std::os::unix::fs::symlink;

    #[test]
    fn containers_storage_conf_is_read_alone() {
        let mut f = Fixture::new(0);
        f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ndriver = \"vfs\"\n",
        );
        f.write_root(
            "etc/containers/storage.conf.d/10.conf",
            "[storage]\nrunroot = \"/dropin\"\n",
        );
        let custom = f.write(
            &f.tmp.path().join("custom.conf"),
            "[storage]\ngraphroot = \"/custom\"\n",
        );
        f.set(ENV_CONF, &custom);
        let o = f.load();
        assert_eq!(o.config_files, vec![custom.clone()]);
        assert_eq!(o.graphroot, Path::new("/custom"));
        assert_eq!(o.runroot, Path::new(DEFAULT_RUNROOT));
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

        // Empty counts as unset.
        f.set(ENV_CONF, "");
        assert_eq!(driver_of(&f).as_deref(), Some("vfs"));
    }

    #[test]
    fn main_file_precedence() {
        let mut f = Fixture::new(0);
        let usr = f.write_root(
            "usr/share/containers/storage.conf",
            "[storage]\ndriver = \"usr\"\n",
        );
        assert_eq!(f.load().config_files, vec![usr]);
        assert_eq!(driver_of(&f).as_deref(), Some("usr"));
        let etc = f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ndriver = \"etc\"\n",
        );
        assert_eq!(driver_of(&f).as_deref(), Some("etc"));
        let user = f.write(&f.user_conf(), "[storage]\nrunroot = \"/user-run\"\n");
        let o = f.load();
        // Only the first existing main file is read, also for root.
        assert_eq!(o.config_files, vec![user]);
        assert_eq!(o.driver, None);
        assert_eq!(o.runroot, Path::new("/user-run"));

        // XDG_CONFIG_HOME replaces ~/.config.
        let xdg = f.tmp.path().join("xdg");
        f.set("XDG_CONFIG_HOME", &xdg);
        assert_eq!(f.load().config_files, vec![etc.clone()]);
        let xdg_conf = f.write(
            &xdg.join("containers/storage.conf"),
            "[storage]\ndriver = \"xdg\"\n",
        );
        let o = f.load();
        assert_eq!(o.config_files, vec![xdg_conf]);
        assert_eq!(o.driver.as_deref(), Some("xdg"));
    }

    #[test]
    fn drop_ins_sorted_by_base_name_later_dir_wins() {
        let f = Fixture::new(0);
        let main = f.write_root(
            "usr/share/containers/storage.conf",
            "[storage]\ndriver = \"main\"\n",
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
            &f.home().join(".config/containers/storage.conf.d/05-c.conf"),
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
        let main = f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ndriver = \"main\"\n",
        );
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

        // Also after CONTAINERS_STORAGE_CONF.
        let custom = f.write(
            &f.tmp.path().join("custom.conf"),
            "[storage]\ndriver = \"custom\"\n",
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
