//! Storage configuration: the graph root, run root, driver and driver options that
//! containers/storage (the Go library podman is built on) would use, found the way it finds
//! them.
//!
//! [`StorageOptions::load`] follows the library's rules:
//!
//! 1. If `CONTAINERS_STORAGE_CONF` is set, that file alone is read. It must exist.
//! 2. Otherwise the first existing file among `$XDG_CONFIG_HOME/containers/storage.conf`
//!    (or `$HOME/.config/containers/storage.conf`), `/etc/containers/storage.conf` and
//!    `/usr/share/containers/storage.conf` is read. Then the `*.conf` drop-ins are read
//!    from the `storage.conf.d` directories, sorted by base name.
//! 3. `CONTAINERS_STORAGE_CONF_OVERRIDE` is read last, if set. It must exist.
//!
//! Every file is decoded over the same configuration, so a later file overrides the
//! scalar keys it sets. Built-in defaults, `STORAGE_DRIVER` and `STORAGE_OPTS` are then
//! applied, and paths are expanded the way containers/storage expands them.
//!
//! One concept per module: `env` holds the process inputs (environment, uid, and the
//! per-user directories derived from them), `expand` the Go-compatible path expansion,
//! `discovery` which files are read in which order, `decode` the storage.conf decoder, and
//! `overlay_options` how the overlay driver reads its driver options.
//!
//! Nothing here creates or modifies files. Where containers/storage would create a
//! directory (the fallback runtime directory), we only check what is already there.

mod decode;
mod discovery;
mod env;
mod expand;
#[cfg(test)]
mod fixture;
mod overlay_options;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::path::PathBuf;

use discovery::read_config_files;
use env::{per_user_defaults, rootless_uid};
use expand::expand_env_path;

pub use env::ConfigEnv;

/// Rootful graph root used when no configuration names one.
const DEFAULT_GRAPHROOT: &str = "/var/lib/containers/storage";
/// Rootful run root used when no configuration names one.
const DEFAULT_RUNROOT: &str = "/run/containers/storage";

/// The storage options that containers/storage would use, after discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageOptions {
    /// Graph driver name (`overlay2` is already rewritten to `overlay`).
    pub driver: Option<String>,
    /// Drivers to try, in order, when no driver is named.
    pub driver_priority: Vec<String>,
    /// Root of the (read-write) store.
    pub graphroot: PathBuf,
    /// Root of run-time state (locks, mount counts).
    pub runroot: PathBuf,
    /// Separate image store. Like upstream, the value is used verbatim, without
    /// environment expansion.
    pub imagestore: Option<PathBuf>,
    /// Driver options (`key=value`, optionally `driver.key=value`), in upstream order.
    pub driver_options: Vec<String>,
    /// Whether containers are not persisted over reboot.
    pub transient_store: bool,
    /// `[storage.options.pull_options]`, merged across files.
    pub pull_options: BTreeMap<String, String>,
    /// Whether per-user (rootless) storage rules applied.
    pub rootless: bool,
    /// The uid $UID expands to.
    pub rootless_uid: u32,
    /// Files read, in order.
    pub config_files: Vec<PathBuf>,
}

/// Command-line overrides applied after discovery by [`StorageOptions::apply`].
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Replaces the graph root.
    pub graphroot: Option<PathBuf>,
    /// Replaces the run root.
    pub runroot: Option<PathBuf>,
    /// Replaces the separate image store.
    pub imagestore: Option<PathBuf>,
    /// Replaces the driver name.
    pub driver: Option<String>,
    /// Replaces the driver option list, like `STORAGE_OPTS`.
    pub storage_opts: Option<Vec<String>>,
    /// Appended as `imagestore=<path>` driver options.
    pub additional_image_stores: Vec<PathBuf>,
}

/// Why storage configuration could not be determined.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A configuration file exists (or was named explicitly) but could not be read.
    #[error("cannot read storage configuration file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error; `NotFound` for a missing file named by an environment variable.
        #[source]
        source: io::Error,
    },
    /// A drop-in directory exists but could not be listed.
    #[error("cannot list storage configuration directory {}: {source}", path.display())]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A configuration file is not valid TOML, or a known key has the wrong type.
    #[error("cannot decode storage configuration file {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key where there is one.
        message: String,
    },
    /// The resulting configuration or the environment is unusable.
    #[error("invalid storage configuration: {0}")]
    Invalid(String),
}

impl StorageOptions {
    /// Reads the storage configuration the way containers/storage does.
    ///
    /// # Errors
    ///
    /// - [`ConfigError::Read`] when `CONTAINERS_STORAGE_CONF` or
    ///   `CONTAINERS_STORAGE_CONF_OVERRIDE` names a missing or unreadable file, or when a
    ///   configuration file exists but cannot be read (permissions, a directory, ...).
    /// - [`ConfigError::ReadDir`] when a drop-in directory exists but cannot be listed.
    /// - [`ConfigError::Parse`] on a TOML syntax error, a known key of the wrong type, or a
    ///   malformed `{append = ...}` element.
    /// - [`ConfigError::Invalid`] when the home directory is needed but cannot be found,
    ///   when `XDG_RUNTIME_DIR` is set for per-user storage but does not resolve, when the
    ///   fallback runtime directory exists with the wrong owner or mode, when
    ///   `STORAGE_DRIVER`/`STORAGE_OPTS` are not UTF-8, when graphroot or runroot end up
    ///   empty, and when imagestore equals graphroot.
    pub fn load(env: &ConfigEnv) -> Result<Self, ConfigError> {
        let rootless_uid = rootless_uid(env);
        // Upstream wants IsRootless() and a non-zero rootless uid. IsRootless() is already
        // true whenever that uid is non-zero; its other signals (_CONTAINERS_USERNS_CONFIGURED,
        // missing CAP_SYS_ADMIN, partial uid maps) only matter when the uid is 0, and then
        // per-user storage is off anyway.
        let per_user = rootless_uid != 0;

        let (cfg, config_files) = read_config_files(env, rootless_uid)?;

        let (mut graphroot, mut runroot) = if per_user {
            per_user_defaults(env, rootless_uid)?
        } else {
            (
                PathBuf::from(DEFAULT_GRAPHROOT),
                PathBuf::from(DEFAULT_RUNROOT),
            )
        };

        let mut driver = non_empty_string(&cfg.driver);
        if let Some(v) = env.non_empty("STORAGE_DRIVER") {
            driver = Some(utf8_var("STORAGE_DRIVER", v)?.to_owned());
        }
        let driver = driver.map(normalize_driver);

        let imagestore = non_empty_string(&cfg.imagestore).map(PathBuf::from);

        let mut driver_options = cfg.driver_options();
        if let Some(v) = env.lookup("STORAGE_OPTS") {
            driver_options = split_storage_opts(utf8_var("STORAGE_OPTS", v)?);
        }

        if !cfg.runroot.is_empty() {
            runroot = expand_env_path(&cfg.runroot, rootless_uid, env);
        }
        if runroot.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("runroot must be set".into()));
        }

        // rootless_storage_path is deprecated; graphroot, wherever it was set, beats it.
        if !cfg.rootless_storage_path.is_empty() && per_user {
            graphroot = expand_env_path(&cfg.rootless_storage_path, rootless_uid, env);
        }
        if !cfg.graphroot.is_empty() {
            if !cfg.rootless_storage_path.is_empty() {
                tracing::warn!(
                    "both rootless_storage_path and graphroot are set in storage.conf; using graphroot"
                );
            }
            graphroot = expand_env_path(&cfg.graphroot, rootless_uid, env);
        }
        if graphroot.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("graphroot must be set".into()));
        }

        // Upstream compares the strings, so "/a/" and "/a" count as different.
        if let Some(store) = &imagestore
            && store.as_os_str() == graphroot.as_os_str()
        {
            return Err(ConfigError::Invalid(format!(
                "imagestore {} must either be not set or be different than graphroot",
                store.display()
            )));
        }

        Ok(Self {
            driver,
            driver_priority: cfg.driver_priority.values,
            graphroot,
            runroot,
            imagestore,
            driver_options,
            transient_store: cfg.transient_store,
            pull_options: cfg.options.pull_options.unwrap_or_default(),
            rootless: per_user,
            rootless_uid,
            config_files,
        })
    }

    /// Apply command-line overrides (each Some/non-empty field replaces the discovered value;
    /// `storage_opts` behaves like STORAGE_OPTS; `additional_image_stores` are appended as
    /// `imagestore=` options).
    ///
    /// A `Some` holding an empty path or driver name is ignored. Empty strings inside
    /// `storage_opts` are dropped, so `Some(vec![String::new()])` clears the options like
    /// an empty `STORAGE_OPTS` does. The driver name `overlay2` becomes `overlay`.
    /// Additional image stores whose path is not UTF-8 cannot be expressed as a driver
    /// option and are skipped with a warning. Values are used verbatim (no `$VAR`
    /// expansion) and the imagestore-versus-graphroot check of [`StorageOptions::load`]
    /// is not repeated. Never fails.
    pub fn apply(&mut self, o: &Overrides) {
        let replace = |dst: &mut PathBuf, src: &Option<PathBuf>| {
            if let Some(p) = src
                && !p.as_os_str().is_empty()
            {
                *dst = p.clone();
            }
        };
        replace(&mut self.graphroot, &o.graphroot);
        replace(&mut self.runroot, &o.runroot);
        if let Some(p) = &o.imagestore
            && !p.as_os_str().is_empty()
        {
            self.imagestore = Some(p.clone());
        }
        if let Some(d) = o.driver.as_deref().and_then(non_empty_string) {
            self.driver = Some(normalize_driver(d));
        }
        if let Some(opts) = &o.storage_opts {
            self.driver_options = opts.iter().filter(|s| !s.is_empty()).cloned().collect();
        }
        for store in &o.additional_image_stores {
            match store.to_str() {
                Some(s) => self.driver_options.push(format!("imagestore={s}")),
                None => tracing::warn!(
                    "ignoring additional image store {} whose path is not UTF-8",
                    store.display()
                ),
            }
        }
    }
}

fn non_empty_string(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

fn normalize_driver(driver: String) -> String {
    if driver == "overlay2" {
        tracing::warn!("switching driver from overlay2 to the equivalent overlay driver");
        "overlay".to_owned()
    } else {
        driver
    }
}

fn utf8_var<'a>(name: &str, value: &'a OsStr) -> Result<&'a str, ConfigError> {
    value.to_str().ok_or_else(|| {
        ConfigError::Invalid(format!("environment variable {name} is not valid UTF-8"))
    })
}

/// `STORAGE_OPTS` is split on every comma (empty elements kept, as upstream), except that
/// an entirely empty value means "no options".
fn split_storage_opts(value: &str) -> Vec<String> {
    if value.is_empty() {
        Vec::new()
    } else {
        value.split(',').map(str::to_owned).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::config::env::ENV_ROOTLESS_UID;
    use crate::storage::config::fixture::{Fixture, driver_of};
    use std::path::Path;

    #[test]
    fn rootful_defaults_without_files() {
        let f = Fixture::new(0);
        let o = f.load();
        assert_eq!(o.graphroot, Path::new(DEFAULT_GRAPHROOT));
        assert_eq!(o.runroot, Path::new(DEFAULT_RUNROOT));
        assert_eq!(o.driver, None);
        assert!(o.driver_options.is_empty());
        assert!(o.driver_priority.is_empty());
        assert!(o.config_files.is_empty());
        assert!(!o.rootless);
        assert_eq!(o.rootless_uid, 0);
        assert_eq!(o.imagestore, None);
        assert!(!o.transient_store);
        assert!(o.pull_options.is_empty());
    }

    #[test]
    fn storage_driver_env_and_overlay2() {
        let mut f = Fixture::new(0);
        f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ndriver = \"overlay2\"\n",
        );
        assert_eq!(driver_of(&f).as_deref(), Some("overlay"));
        f.set("STORAGE_DRIVER", "vfs");
        assert_eq!(driver_of(&f).as_deref(), Some("vfs"));
        f.set("STORAGE_DRIVER", "overlay2");
        assert_eq!(driver_of(&f).as_deref(), Some("overlay"));
        f.set("STORAGE_DRIVER", "");
        f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ndriver = \"btrfs\"\n",
        );
        assert_eq!(driver_of(&f).as_deref(), Some("btrfs"));
    }

    #[test]
    fn storage_opts_replaces_config_options() {
        let mut f = Fixture::new(0);
        f.write_root(
            "etc/containers/storage.conf",
            "[storage.options]\nadditionalimagestores = [\"/a\"]\nmount_program = \"/bin/fuse\"\n",
        );
        assert_eq!(
            f.load().driver_options,
            vec!["imagestore=/a", "mount_program=/bin/fuse"]
        );
        f.set("STORAGE_OPTS", "overlay.imagestore=/b,,size=5G");
        assert_eq!(
            f.load().driver_options,
            vec!["overlay.imagestore=/b", "", "size=5G"]
        );
        // Set but empty clears the list.
        f.set("STORAGE_OPTS", "");
        assert!(f.load().driver_options.is_empty());
    }

    #[test]
    fn rootless_storage_path_versus_graphroot() {
        let mut f = Fixture::per_user();
        f.write_root(
            "etc/containers/storage.conf",
            "[storage]\nrootless_storage_path = \"/rsp/$UID\"\n",
        );
        assert_eq!(f.load().graphroot, Path::new("/rsp/1000"));

        // graphroot from any file beats rootless_storage_path.
        f.write_root(
            "etc/containers/storage.conf.d/1.conf",
            "[storage]\ngraphroot = \"/graph\"\n",
        );
        assert_eq!(f.load().graphroot, Path::new("/graph"));

        // Rootful ignores rootless_storage_path.
        std::fs::remove_file(f.root("etc/containers/storage.conf.d/1.conf")).expect("rm");
        f.unset(ENV_ROOTLESS_UID);
        f.env.euid = 0;
        assert_eq!(f.load().graphroot, Path::new(DEFAULT_GRAPHROOT));
    }

    #[test]
    fn imagestore_equal_to_graphroot_is_an_error() {
        let f = Fixture::new(0);
        f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ngraphroot = \"/srv/s\"\nimagestore = \"/srv/s\"\n",
        );
        assert!(matches!(f.load_err(), ConfigError::Invalid(m) if m.contains("imagestore")));
        f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ngraphroot = \"/srv/s\"\nimagestore = \"/srv/i\"\n",
        );
        assert_eq!(f.load().imagestore.as_deref(), Some(Path::new("/srv/i")));
    }

    #[test]
    fn overrides_apply() {
        let f = Fixture::new(0);
        f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ndriver = \"vfs\"\n[storage.options]\nadditionalimagestores = [\"/a\"]\n",
        );
        let mut o = f.load();
        let before = o.clone();
        o.apply(&Overrides::default());
        assert_eq!(o, before);

        o.apply(&Overrides {
            graphroot: Some("/g".into()),
            runroot: Some("/r".into()),
            imagestore: Some("/i".into()),
            driver: Some("overlay2".into()),
            storage_opts: Some(vec!["overlay.mountopt=nodev".into()]),
            additional_image_stores: vec!["/extra".into()],
        });
        assert_eq!(o.graphroot, Path::new("/g"));
        assert_eq!(o.runroot, Path::new("/r"));
        assert_eq!(o.imagestore.as_deref(), Some(Path::new("/i")));
        assert_eq!(o.driver.as_deref(), Some("overlay"));
        assert_eq!(
            o.driver_options,
            vec!["overlay.mountopt=nodev", "imagestore=/extra"]
        );
        assert_eq!(o.additional_image_stores(), vec![PathBuf::from("/extra")]);

        // Empty values do not replace; an empty option list clears.
        o.apply(&Overrides {
            graphroot: Some(PathBuf::new()),
            driver: Some(String::new()),
            storage_opts: Some(vec![String::new()]),
            ..Overrides::default()
        });
        assert_eq!(o.graphroot, Path::new("/g"));
        assert_eq!(o.driver.as_deref(), Some("overlay"));
        assert!(o.driver_options.is_empty());

        // Without storage_opts, stores are appended to the discovered options.
        let mut o = before.clone();
        o.apply(&Overrides {
            additional_image_stores: vec!["/b".into(), "/a".into()],
            ..Overrides::default()
        });
        assert_eq!(
            o.driver_options,
            vec!["imagestore=/a", "imagestore=/b", "imagestore=/a"]
        );
        assert_eq!(
            o.additional_image_stores(),
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
    }
}
