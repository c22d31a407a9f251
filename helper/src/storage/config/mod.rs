//! Storage configuration: the graph root, run root, driver and driver options that podman
//! would use, found the way podman 4.3.1 (and the containers/storage it is built with)
//! finds them.
//!
//! [`StorageOptions::load`] follows these rules:
//!
//! 1. Files. If `CONTAINERS_STORAGE_CONF` is set, that file alone is read; it must exist
//!    (set but empty is refused, as podman refuses it). Otherwise the first that exists of
//!    the per-user file, `/etc/containers/storage.conf` and
//!    `/usr/share/containers/storage.conf` is read. The per-user file is
//!    `$XDG_CONFIG_HOME/containers/storage.conf`; for per-user storage, without
//!    `XDG_CONFIG_HOME`, `~/.config/containers/storage.conf`. Root reads a per-user file
//!    only through `XDG_CONFIG_HOME`.
//! 2. Rootful roots. When no file exists, `/var/lib/containers/storage` and
//!    `/run/containers/storage`; a file that exists must name both `graphroot` and
//!    `runroot`.
//! 3. Per-user roots. `graphroot` and `runroot` count only in the per-user file: elsewhere
//!    they are root's, also in the file `CONTAINERS_STORAGE_CONF` names. The graph root is
//!    then `rootless_storage_path`, else `$XDG_DATA_HOME/containers/storage` (or
//!    `~/.local/share/...`); the run root is `containers` in the run-time directory.
//! 4. Per-user environment. podman fills in `XDG_RUNTIME_DIR` and `XDG_CONFIG_HOME` before
//!    it looks, and the rules above see its values (`session`). The run-time directory of a
//!    new store is the one podman's outer process records in libpod's database, which in
//!    one case comes from the unmodified environment (`session::outer_process_run_root`).
//! 5. Paths. `graphroot`, `runroot` and `rootless_storage_path` are expanded the way
//!    containers/storage expands them (`$UID`, then `$VAR`, then symlinks).
//!
//! Every file read is decoded over the same configuration. podman 4.3.1 reads one file, but
//! later containers/storage releases also read drop-in directories (`storage.conf.d` and
//! its rootful, rootless and per-uid variants) after it and `CONTAINERS_STORAGE_CONF_OVERRIDE`
//! last; where those exist they are read too. Built-in defaults, `STORAGE_DRIVER` and
//! `STORAGE_OPTS` are then applied.
//!
//! podman keeps using the run root it recorded when it first used a store, whatever the
//! configuration says later; nothing here reads libpod's database, so the run root
//! reported is the one podman records for a store it has not used yet.
//!
//! One concept per module: `env` holds the process inputs (environment, uid, and the
//! per-user directories derived from them), `session` what podman adds to them, `expand`
//! the Go-compatible path expansion, `discovery` which files are read in which order,
//! `decode` the storage.conf decoder, and `overlay_options` how the overlay driver reads
//! its driver options.
//!
//! Nothing here creates or modifies files. Where podman or containers/storage would create
//! a directory (a run-time directory), we check that it could and take it as created.

mod decode;
mod discovery;
mod env;
mod expand;
#[cfg(test)]
mod fixture;
mod overlay_options;
mod session;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::path::PathBuf;

use discovery::{Discovered, MainFile, read_config_files};
use env::{data_home, per_user_run_root, rootless_uid};
use expand::{expand_env_path, expand_path};
use session::{RecordedRunRoot, Session, outer_process_run_root, podman_session};

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
    /// Files whose settings were read, in order.
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
    /// Reads the storage configuration the way podman 4.3.1 does (see the module
    /// documentation).
    ///
    /// # Errors
    ///
    /// - [`ConfigError::Read`] when `CONTAINERS_STORAGE_CONF` or
    ///   `CONTAINERS_STORAGE_CONF_OVERRIDE` names a missing or unreadable file, or when a
    ///   configuration file exists but cannot be read (permissions, a directory, ...).
    /// - [`ConfigError::ReadDir`] when a drop-in directory exists but cannot be listed.
    /// - [`ConfigError::Parse`] on a TOML syntax error, a known key of the wrong type, or a
    ///   malformed `{append = ...}` element; for per-user storage also in the system file
    ///   that podman's outer process reads before it picks the per-user file.
    /// - [`ConfigError::Invalid`] when `CONTAINERS_STORAGE_CONF` is set but empty, when a
    ///   rootful configuration file lacks `runroot` or `graphroot`, when the home directory
    ///   is needed but cannot be found, when a given `XDG_RUNTIME_DIR` belongs to another
    ///   user or podman could not make its directories there, when no run-time directory can
    ///   be found or made, when `STORAGE_DRIVER`/`STORAGE_OPTS` are not UTF-8, and when
    ///   imagestore equals graphroot.
    pub fn load(env: &ConfigEnv) -> Result<Self, ConfigError> {
        let rootless_uid = rootless_uid(env);
        // Upstream wants IsRootless() and a non-zero rootless uid. IsRootless() is already
        // true whenever that uid is non-zero; its other signals (_CONTAINERS_USERNS_CONFIGURED,
        // missing CAP_SYS_ADMIN, partial uid maps) only matter when the uid is 0, and then
        // per-user storage is off anyway.
        let per_user = rootless_uid != 0;
        // What podman's storage lookups see: for per-user storage it fills in XDG_* first.
        let session = if per_user {
            podman_session(env, rootless_uid)?
        } else {
            Session::unchanged(env)
        };

        let found = read_config_files(env, &session.env, rootless_uid)?;
        let cfg = &found.config;

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

        let (graphroot, runroot) = if per_user {
            per_user_roots(env, &session, rootless_uid, &found)?
        } else {
            rootful_roots(env, &found)?
        };

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
            driver_priority: cfg.driver_priority.values.clone(),
            graphroot,
            runroot,
            imagestore,
            driver_options,
            transient_store: cfg.transient_store,
            pull_options: cfg.options.pull_options.clone().unwrap_or_default(),
            rootless: per_user,
            rootless_uid,
            config_files: found.files,
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

/// Rootful graph and run roots. A file read must name both, since podman 4.3.1 fills in
/// its defaults only when no file exists (and then refuses with these very messages).
fn rootful_roots(env: &ConfigEnv, found: &Discovered) -> Result<(PathBuf, PathBuf), ConfigError> {
    let cfg = &found.config;
    let pick = |configured: &str, default: &str, key: &str| {
        if !configured.is_empty() {
            Ok(expand_env_path(configured, 0, env))
        } else if found.main == MainFile::Absent {
            Ok(expand_env_path(default, 0, env))
        } else {
            Err(ConfigError::Invalid(format!("{key} must be set")))
        }
    };
    // Upstream checks the run root first.
    let runroot = pick(&cfg.runroot, DEFAULT_RUNROOT, "runroot")?;
    let graphroot = pick(&cfg.graphroot, DEFAULT_GRAPHROOT, "graphroot")?;
    Ok((graphroot, runroot))
}

/// Per-user graph and run roots, as podman 4.3.1 computes them in `session`:
///
/// - `graphroot` and `runroot` count only from the per-user file. In the file
///   `CONTAINERS_STORAGE_CONF` names, and in the system files, they are meant for root.
/// - `rootless_storage_path` from whichever file was read comes next for the graph root
///   (graphroot beats it), then `$XDG_DATA_HOME/containers/storage`.
/// - The run root is `containers` in the run-time directory, from the unmodified
///   environment where podman's outer process records it (see
///   [`session::outer_process_run_root`]).
fn per_user_roots(
    env: &ConfigEnv,
    session: &Session,
    uid: u32,
    found: &Discovered,
) -> Result<(PathBuf, PathBuf), ConfigError> {
    let created = session.creates.as_deref();
    let session = &session.env;
    let cfg = &found.config;
    let user_file = found.main == MainFile::User;
    let rsp = &cfg.rootless_storage_path;
    // Upstream computes both defaults whether or not a file overrides them, so their errors
    // stand either way.
    let default_graphroot = data_home(session, uid)?.join("containers/storage");
    let default_runroot = per_user_run_root(session, uid, created)?;

    let graphroot = if user_file && !cfg.graphroot.is_empty() {
        if !rsp.is_empty() {
            tracing::warn!(
                "both rootless_storage_path and graphroot are set in storage.conf; using graphroot"
            );
        }
        expand_env_path(&cfg.graphroot, uid, session)
    } else if !rsp.is_empty() {
        expand_env_path(rsp, uid, session)
    } else {
        expand_path(&default_graphroot)
    };

    let names_run_root = user_file && !cfg.runroot.is_empty();
    let outer_graphroot = if (user_file && !cfg.graphroot.is_empty()) || !rsp.is_empty() {
        graphroot.clone()
    } else if !found.outer_rootless_storage_path.is_empty() {
        expand_env_path(&found.outer_rootless_storage_path, uid, env)
    } else {
        expand_path(&data_home(env, uid)?.join("containers/storage"))
    };
    let recorded = RecordedRunRoot {
        user_file: found.user_file.as_deref(),
        names_run_root,
        graphroot: &graphroot,
        outer_graphroot,
    };
    let runroot = if names_run_root {
        expand_env_path(&cfg.runroot, uid, session)
    } else if outer_process_run_root(env, uid, &recorded) {
        expand_path(&per_user_run_root(env, uid, None)?)
    } else {
        expand_path(&default_runroot)
    };
    Ok((graphroot, runroot))
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
    use crate::storage::config::discovery::ENV_CONF;
    use crate::storage::config::env::ENV_ROOTLESS_UID;
    use crate::storage::config::fixture::{Fixture, SYSTEM_GRAPHROOT, driver_of};
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
        f.write_system("[storage]\ndriver = \"overlay2\"\n");
        assert_eq!(driver_of(&f).as_deref(), Some("overlay"));
        f.set("STORAGE_DRIVER", "vfs");
        assert_eq!(driver_of(&f).as_deref(), Some("vfs"));
        f.set("STORAGE_DRIVER", "overlay2");
        assert_eq!(driver_of(&f).as_deref(), Some("overlay"));
        f.set("STORAGE_DRIVER", "");
        f.write_system("[storage]\ndriver = \"btrfs\"\n");
        assert_eq!(driver_of(&f).as_deref(), Some("btrfs"));
    }

    #[test]
    fn storage_opts_replaces_config_options() {
        let mut f = Fixture::new(0);
        f.write_system(
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
    fn per_user_roots_ignore_the_named_file() {
        // The reported disagreement: for a user, the graphroot and runroot of the file
        // CONTAINERS_STORAGE_CONF names are root's; rootless_storage_path is the user's.
        let mut f = Fixture::per_user();
        let named = f.write(
            &f.tmp.path().join("named.conf"),
            "[storage]\ngraphroot = \"/graph\"\nrunroot = \"/run\"\n",
        );
        f.set(ENV_CONF, &named);
        let o = f.load();
        let run = std::fs::canonicalize(f.tmp.path().join("xdg-run")).expect("canon");
        assert_eq!(
            o.graphroot,
            f.home().join(".local/share/containers/storage")
        );
        assert_eq!(o.runroot, run.join("containers"));
        assert_eq!(o.config_files, vec![named.clone()]);

        f.write(
            &named,
            "[storage]\ngraphroot = \"/graph\"\nrootless_storage_path = \"/rsp/$UID\"\n",
        );
        assert_eq!(f.load().graphroot, Path::new("/rsp/1000"));
    }

    #[test]
    fn per_user_roots_ignore_the_system_file() {
        let mut f = Fixture::per_user();
        f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ngraphroot = \"/graph\"\nrunroot = \"/run\"\n",
        );
        let run = std::fs::canonicalize(f.tmp.path().join("xdg-run")).expect("canon");
        let o = f.load();
        assert_eq!(
            o.graphroot,
            f.home().join(".local/share/containers/storage")
        );
        assert_eq!(o.runroot, run.join("containers"));

        f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ngraphroot = \"/graph\"\nrootless_storage_path = \"/rsp/$UID\"\n",
        );
        assert_eq!(f.load().graphroot, Path::new("/rsp/1000"));

        // A per-user file, even one without any path, hides the system file.
        f.write(&f.user_conf(), "[storage]\ndriver = \"overlay\"\n");
        assert_eq!(
            f.load().graphroot,
            f.home().join(".local/share/containers/storage")
        );

        // Rootful storage ignores rootless_storage_path.
        f.unset(ENV_ROOTLESS_UID);
        f.env.euid = 0;
        f.write_system("[storage]\nrootless_storage_path = \"/rsp\"\n");
        assert_eq!(f.load().graphroot, Path::new(SYSTEM_GRAPHROOT));
    }

    #[test]
    fn per_user_file_names_the_roots() {
        let f = Fixture::per_user();
        f.write(
            &f.user_conf(),
            "[storage]\nrootless_storage_path = \"/rsp/$UID\"\nrunroot = \"/run/$UID\"\n",
        );
        let o = f.load();
        assert_eq!(o.graphroot, Path::new("/rsp/1000"));
        assert_eq!(o.runroot, Path::new("/run/1000"));
        // graphroot beats rootless_storage_path.
        f.write(
            &f.user_conf(),
            "[storage]\nrootless_storage_path = \"/rsp\"\ngraphroot = \"/graph\"\n",
        );
        assert_eq!(f.load().graphroot, Path::new("/graph"));
        // So it does from a drop-in, for the podman releases that read them.
        f.write(
            &f.user_conf(),
            "[storage]\nrootless_storage_path = \"/rsp\"\n",
        );
        f.write(
            &f.home().join(".config/containers/storage.conf.d/1.conf"),
            "[storage]\ngraphroot = \"/graph\"\n",
        );
        assert_eq!(f.load().graphroot, Path::new("/graph"));
    }

    #[test]
    fn rootful_files_must_name_both_roots() {
        let mut f = Fixture::new(0);
        // No file at all: the built-in defaults.
        assert_eq!(f.load().runroot, Path::new(DEFAULT_RUNROOT));

        let conf = "etc/containers/storage.conf";
        f.write_root(conf, "[storage]\ngraphroot = \"/g\"\n");
        assert!(matches!(f.load_err(), ConfigError::Invalid(m) if m == "runroot must be set"));
        f.write_root(conf, "[storage]\nrunroot = \"/r\"\n");
        assert!(matches!(f.load_err(), ConfigError::Invalid(m) if m == "graphroot must be set"));
        // An empty file too: the run root is checked first.
        f.write_root(conf, "");
        assert!(matches!(f.load_err(), ConfigError::Invalid(m) if m == "runroot must be set"));
        f.write_root(conf, "[storage]\nrunroot = \"/r\"\ngraphroot = \"/g\"\n");
        let o = f.load();
        assert_eq!(
            (o.graphroot.as_path(), o.runroot.as_path()),
            (Path::new("/g"), Path::new("/r"))
        );

        // The same for the file CONTAINERS_STORAGE_CONF names.
        let named = f.write(
            &f.tmp.path().join("named.conf"),
            "[storage]\ngraphroot = \"/g\"\n",
        );
        f.set(ENV_CONF, &named);
        assert!(matches!(f.load_err(), ConfigError::Invalid(m) if m == "runroot must be set"));
    }

    #[test]
    fn imagestore_equal_to_graphroot_is_an_error() {
        let f = Fixture::new(0);
        f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ngraphroot = \"/srv/s\"\nrunroot = \"/r\"\nimagestore = \"/srv/s\"\n",
        );
        assert!(matches!(f.load_err(), ConfigError::Invalid(m) if m.contains("imagestore")));
        f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ngraphroot = \"/srv/s\"\nrunroot = \"/r\"\nimagestore = \"/srv/i\"\n",
        );
        assert_eq!(f.load().imagestore.as_deref(), Some(Path::new("/srv/i")));
    }

    #[test]
    fn overrides_apply() {
        let f = Fixture::new(0);
        f.write_system(
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
