//! Discovery of containers-storage `storage.conf`, as current containers/storage does it.
//!
//! This follows the algorithm of `LoadStoreOptions` and `configfile.Read` in
//! `containers/container-libs` (module `go.podman.io/storage`). The specification is
//! section 1 of `docs/containers-storage-format.md`. In short:
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
//! Nothing here creates or modifies files. Where containers/storage would create a
//! directory (the fallback runtime directory), we only check what is already there.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Rootful graph root used when no configuration names one.
const DEFAULT_GRAPHROOT: &str = "/var/lib/containers/storage";
/// Rootful run root used when no configuration names one.
const DEFAULT_RUNROOT: &str = "/run/containers/storage";

const ENV_CONF: &str = "CONTAINERS_STORAGE_CONF";
const ENV_CONF_OVERRIDE: &str = "CONTAINERS_STORAGE_CONF_OVERRIDE";
const ENV_ROOTLESS_UID: &str = "_CONTAINERS_ROOTLESS_UID";

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
    fn lookup(&self, name: &str) -> Option<&OsStr> {
        self.vars.get(name).map(OsString::as_os_str)
    }

    /// Like Go's `os.Getenv` tested against `""`: empty counts as unset.
    fn non_empty(&self, name: &str) -> Option<&OsStr> {
        self.lookup(name).filter(|v| !v.is_empty())
    }

    /// Places a built-in absolute path under `fs_root`.
    fn rooted(&self, absolute: &str) -> PathBuf {
        clean(&self.fs_root.join(absolute.trim_start_matches('/')))
    }
}

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

    /// Read-only image stores from the driver options, in order, deduplicated.
    ///
    /// Options are read the way the overlay driver reads them: `imagestore=` or
    /// `additionalimagestore=` (any case), optionally prefixed with `overlay.` or
    /// `overlay2.`, each value a comma-separated list of paths. Options for other drivers
    /// are skipped. Relative paths (which the overlay driver rejects) are skipped with a
    /// warning. Paths are cleaned lexically but not checked for existence. Never fails.
    pub fn additional_image_stores(&self) -> Vec<PathBuf> {
        let mut stores: Vec<PathBuf> = Vec::new();
        for option in &self.driver_options {
            let Some((key, value)) = overlay_option(option) else {
                continue;
            };
            if key != "imagestore" && key != "additionalimagestore" {
                continue;
            }
            if value.is_empty() {
                continue;
            }
            for store in value.split(',') {
                let path = clean(Path::new(store));
                if !path.is_absolute() {
                    tracing::warn!(
                        option = %option,
                        "ignoring relative additional image store {}",
                        path.display()
                    );
                    continue;
                }
                if !stores.contains(&path) {
                    stores.push(path);
                }
            }
        }
        stores
    }

    /// The mount_program option if any (informational).
    ///
    /// Like the overlay driver, the last `mount_program` option (plain or with an
    /// `overlay.`/`overlay2.` prefix) wins, and an empty value means none. Never fails.
    pub fn mount_program(&self) -> Option<String> {
        let mut program = None;
        for option in &self.driver_options {
            if let Some((key, value)) = overlay_option(option)
                && key == "mount_program"
            {
                program = non_empty_string(value);
            }
        }
        program
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

/// Splits a driver option the way the overlay driver does, returning the lower-cased
/// option name without its driver prefix and the trimmed value. `None` for options that
/// are malformed or meant for another driver.
fn overlay_option(option: &str) -> Option<(String, &str)> {
    let (key, value) = option.split_once('=')?;
    let key = key.trim().to_lowercase();
    let name = match key.split_once('.') {
        None => key,
        Some(("" | "overlay" | "overlay2", name)) => name.to_owned(),
        Some(_) => return None,
    };
    Some((name, value.trim()))
}

/// The uid that `$UID` expands to and that selects the rootless drop-in directories.
///
/// Upstream parses `_CONTAINERS_ROOTLESS_UID` with `strconv.Atoi` and ignores errors, so
/// garbage means 0. Negative or oversized values (which upstream would carry through as
/// such) are also taken as 0 here, since a uid cannot hold them.
fn rootless_uid(env: &ConfigEnv) -> u32 {
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
fn user_config_dir(env: &ConfigEnv, uid: u32) -> Result<PathBuf, ConfigError> {
    // Upstream uses LookupEnv here, so an empty XDG_CONFIG_HOME yields the relative
    // directory "containers".
    if let Some(dir) = env.lookup("XDG_CONFIG_HOME") {
        return Ok(clean(&Path::new(dir).join("containers")));
    }
    Ok(clean(&home_dir(env, uid)?.join(".config/containers")))
}

/// Graph root and run root for per-user storage, before any configuration applies.
fn per_user_defaults(env: &ConfigEnv, uid: u32) -> Result<(PathBuf, PathBuf), ConfigError> {
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

/// Upstream's `expandEnvPath`: literal `$UID` first, then Go `os.ExpandEnv`, then symlink
/// resolution when the path exists, else a lexical clean.
fn expand_env_path(raw: &str, uid: u32, env: &ConfigEnv) -> PathBuf {
    let with_uid = raw.replace("$UID", &uid.to_string());
    let expanded = PathBuf::from(OsString::from_vec(go_expand_env(&with_uid, env)));
    std::fs::canonicalize(&expanded).unwrap_or_else(|_| clean(&expanded))
}

/// Go's `os.ExpandEnv`: `$NAME` and `${NAME}`, unset variables become empty, a lone `$`
/// before a non-name byte is kept, and malformed `${` / `${}` are dropped.
fn go_expand_env(s: &str, env: &ConfigEnv) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let rest = bytes.get(i + 1..).unwrap_or_default();
        if b != b'$' || rest.is_empty() {
            out.push(b);
            i += 1;
            continue;
        }
        let (name, width) = shell_name(rest);
        if name.is_empty() {
            if width == 0 {
                out.push(b'$');
            }
        } else if let Some(value) = std::str::from_utf8(name).ok().and_then(|n| env.vars.get(n)) {
            out.extend_from_slice(value.as_bytes());
        }
        i += 1 + width;
    }
    out
}

/// Name following a `$` in Go's expansion rules, and how many bytes it occupies.
fn shell_name(s: &[u8]) -> (&[u8], usize) {
    let is_special = |c: u8| b"*#$@!?-0123456789".contains(&c);
    match s {
        [b'{', c, b'}', ..] if is_special(*c) => (&s[1..2], 3),
        [b'{', ..] => match s.iter().position(|&c| c == b'}') {
            Some(1) => (&[], 2),
            Some(end) => (&s[1..end], end + 1),
            None => (&[], 1),
        },
        [c, ..] if is_special(*c) => (&s[..1], 1),
        _ => {
            let len = s
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
                .count();
            (&s[..len], len)
        }
    }
}

/// Go's `filepath.Clean`: purely lexical, "." for an empty result.
fn clean(path: &Path) -> PathBuf {
    let bytes = path.as_os_str().as_bytes();
    let rooted = bytes.first() == Some(&b'/');
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in bytes.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                if parts.last().is_some_and(|last| *last != b"..") {
                    parts.pop();
                } else if !rooted {
                    parts.push(part);
                }
            }
            _ => parts.push(part),
        }
    }
    let mut out = Vec::with_capacity(bytes.len());
    if rooted {
        out.push(b'/');
    }
    out.extend_from_slice(&parts.join(&b'/'));
    if out.is_empty() {
        out.push(b'.');
    }
    PathBuf::from(OsString::from_vec(out))
}

// ---------------------------------------------------------------------------------------
// Reading the files
// ---------------------------------------------------------------------------------------

/// Reads every configuration file in upstream order and decodes it over one [`RawConfig`].
fn read_config_files(env: &ConfigEnv, uid: u32) -> Result<(RawConfig, Vec<PathBuf>), ConfigError> {
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
        let text = std::str::from_utf8(&bytes).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: format!("not valid UTF-8: {e}"),
        })?;
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let decoder = Decoder { file: path };
        self.config.decode(&decoder, &table)?;
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

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// A string array that a later file may extend instead of replace (upstream
/// `configfile.Slice`).
///
/// The `append` attribute persists across files: once a file says `{append = true}`,
/// later files append too until one says `{append = false}`. Upstream tests pin this.
#[derive(Debug, Default, Clone)]
struct Slice {
    values: Vec<String>,
    append: Option<bool>,
}

/// The decoded configuration; an empty string or zero means "not set", as upstream.
#[derive(Debug, Default)]
struct RawConfig {
    driver: String,
    driver_priority: Slice,
    runroot: String,
    imagestore: String,
    graphroot: String,
    rootless_storage_path: String,
    transient_store: bool,
    options: RawOptions,
}

#[derive(Debug, Default)]
struct RawOptions {
    additional_image_stores: Slice,
    /// Decoded for type checking only; upstream never uses it.
    imagestore: String,
    additional_layer_stores: Slice,
    size: String,
    ignore_chown_errors: String,
    /// Decoded for type checking only; upstream only honours the overlay table's key.
    use_composefs: String,
    force_mask: u32,
    root_auto_userns_user: String,
    auto_userns_min_size: u32,
    auto_userns_max_size: u32,
    btrfs: RawBtrfs,
    overlay: RawOverlay,
    vfs: RawVfs,
    zfs: RawZfs,
    skip_mount_home: String,
    mount_program: String,
    mountopt: String,
    pull_options: Option<BTreeMap<String, String>>,
    disable_volatile: bool,
}

#[derive(Debug, Default)]
struct RawBtrfs {
    min_space: String,
    size: String,
}

#[derive(Debug, Default)]
struct RawOverlay {
    ignore_chown_errors: String,
    mountopt: String,
    mount_program: String,
    size: String,
    inodes: String,
    skip_mount_home: String,
    use_composefs: String,
    force_mask: String,
    sync: String,
}

#[derive(Debug, Default)]
struct RawVfs {
    ignore_chown_errors: String,
    sync: String,
}

#[derive(Debug, Default)]
struct RawZfs {
    mountopt: String,
    fsname: String,
    size: String,
}

impl RawConfig {
    fn decode(&mut self, d: &Decoder<'_>, top: &toml::Table) -> Result<(), ConfigError> {
        for (key, value) in top {
            match field(key, &["storage"]) {
                Some(_) => self.decode_storage(d, key, d.table(key, value)?)?,
                None => d.unknown(key),
            }
        }
        Ok(())
    }

    fn decode_storage(
        &mut self,
        d: &Decoder<'_>,
        prefix: &str,
        table: &toml::Table,
    ) -> Result<(), ConfigError> {
        const FIELDS: &[&str] = &[
            "driver",
            "driver_priority",
            "runroot",
            "imagestore",
            "graphroot",
            "rootless_storage_path",
            "transient_store",
            "options",
        ];
        for (key, v) in table {
            let k = format!("{prefix}.{key}");
            match field(key, FIELDS) {
                Some("driver") => d.string(&k, v, &mut self.driver)?,
                Some("driver_priority") => d.slice(&k, v, &mut self.driver_priority)?,
                Some("runroot") => d.string(&k, v, &mut self.runroot)?,
                Some("imagestore") => d.string(&k, v, &mut self.imagestore)?,
                Some("graphroot") => d.string(&k, v, &mut self.graphroot)?,
                Some("rootless_storage_path") => {
                    d.string(&k, v, &mut self.rootless_storage_path)?;
                }
                Some("transient_store") => d.boolean(&k, v, &mut self.transient_store)?,
                Some("options") => self.options.decode(d, &k, d.table(&k, v)?)?,
                _ => d.unknown(&k),
            }
        }
        Ok(())
    }

    /// The driver option list built from the configuration, in upstream order.
    fn driver_options(&self) -> Vec<String> {
        let o = &self.options;
        let mut out = Vec::new();
        let mut push = |name: &str, value: &str| {
            if !value.is_empty() {
                out.push(format!("{name}={value}"));
            }
        };
        for store in &o.additional_image_stores.values {
            push("imagestore", store);
        }
        for store in &o.additional_layer_stores.values {
            push("additionallayerstore", store);
        }
        push("size", &o.size);
        push("mount_program", &o.mount_program);
        push("skip_mount_home", &o.skip_mount_home);
        push("ignore_chown_errors", &o.ignore_chown_errors);
        if o.force_mask != 0 {
            push("force_mask", &format!("{:o}", o.force_mask));
        }
        push("mountopt", &o.mountopt);
        push("btrfs.min_space", &o.btrfs.min_space);
        push("btrfs.size", &o.btrfs.size);
        push(
            "overlay.ignore_chown_errors",
            &o.overlay.ignore_chown_errors,
        );
        push("overlay.mount_program", &o.overlay.mount_program);
        push("overlay.mountopt", &o.overlay.mountopt);
        push("overlay.size", &o.overlay.size);
        push("overlay.inodes", &o.overlay.inodes);
        push("overlay.skip_mount_home", &o.overlay.skip_mount_home);
        push("overlay.force_mask", &o.overlay.force_mask);
        push("overlay.use_composefs", &o.overlay.use_composefs);
        push("overlay.sync", &o.overlay.sync);
        push("vfs.ignore_chown_errors", &o.vfs.ignore_chown_errors);
        push("vfs.sync", &o.vfs.sync);
        push("zfs.fsname", &o.zfs.fsname);
        push("zfs.mountopt", &o.zfs.mountopt);
        push("zfs.size", &o.zfs.size);
        out
    }
}

impl RawOptions {
    fn decode(
        &mut self,
        d: &Decoder<'_>,
        prefix: &str,
        table: &toml::Table,
    ) -> Result<(), ConfigError> {
        const FIELDS: &[&str] = &[
            "additionalimagestores",
            "imagestore",
            "additionallayerstores",
            "size",
            "ignore_chown_errors",
            "use_composefs",
            "force_mask",
            "root-auto-userns-user",
            "auto-userns-min-size",
            "auto-userns-max-size",
            "btrfs",
            "overlay",
            "vfs",
            "zfs",
            "skip_mount_home",
            "mount_program",
            "mountopt",
            "pull_options",
            "disable-volatile",
        ];
        for (key, v) in table {
            let k = format!("{prefix}.{key}");
            match field(key, FIELDS) {
                Some("additionalimagestores") => {
                    d.slice(&k, v, &mut self.additional_image_stores)?
                }
                Some("imagestore") => d.string(&k, v, &mut self.imagestore)?,
                Some("additionallayerstores") => {
                    d.slice(&k, v, &mut self.additional_layer_stores)?
                }
                Some("size") => d.string(&k, v, &mut self.size)?,
                Some("ignore_chown_errors") => d.string(&k, v, &mut self.ignore_chown_errors)?,
                Some("use_composefs") => d.string(&k, v, &mut self.use_composefs)?,
                Some("force_mask") => d.uint32(&k, v, &mut self.force_mask)?,
                Some("root-auto-userns-user") => {
                    d.string(&k, v, &mut self.root_auto_userns_user)?
                }
                Some("auto-userns-min-size") => d.uint32(&k, v, &mut self.auto_userns_min_size)?,
                Some("auto-userns-max-size") => d.uint32(&k, v, &mut self.auto_userns_max_size)?,
                Some("btrfs") => d.strings(
                    &k,
                    d.table(&k, v)?,
                    &mut [
                        ("min_space", &mut self.btrfs.min_space),
                        ("size", &mut self.btrfs.size),
                    ],
                )?,
                Some("overlay") => {
                    let o = &mut self.overlay;
                    d.strings(
                        &k,
                        d.table(&k, v)?,
                        &mut [
                            ("ignore_chown_errors", &mut o.ignore_chown_errors),
                            ("mountopt", &mut o.mountopt),
                            ("mount_program", &mut o.mount_program),
                            ("size", &mut o.size),
                            ("inodes", &mut o.inodes),
                            ("skip_mount_home", &mut o.skip_mount_home),
                            ("use_composefs", &mut o.use_composefs),
                            ("force_mask", &mut o.force_mask),
                            ("sync", &mut o.sync),
                        ],
                    )?;
                }
                Some("vfs") => d.strings(
                    &k,
                    d.table(&k, v)?,
                    &mut [
                        ("ignore_chown_errors", &mut self.vfs.ignore_chown_errors),
                        ("sync", &mut self.vfs.sync),
                    ],
                )?,
                Some("zfs") => d.strings(
                    &k,
                    d.table(&k, v)?,
                    &mut [
                        ("mountopt", &mut self.zfs.mountopt),
                        ("fsname", &mut self.zfs.fsname),
                        ("size", &mut self.zfs.size),
                    ],
                )?,
                Some("skip_mount_home") => d.string(&k, v, &mut self.skip_mount_home)?,
                Some("mount_program") => d.string(&k, v, &mut self.mount_program)?,
                Some("mountopt") => d.string(&k, v, &mut self.mountopt)?,
                Some("pull_options") => d.string_map(&k, v, &mut self.pull_options)?,
                Some("disable-volatile") => d.boolean(&k, v, &mut self.disable_volatile)?,
                _ => d.unknown(&k),
            }
        }
        Ok(())
    }
}

/// Maps a TOML key to a field name the way BurntSushi/toml does: an exact match, else a
/// case-insensitive one.
fn field(key: &str, fields: &[&'static str]) -> Option<&'static str> {
    fields
        .iter()
        .find(|f| **f == key)
        .or_else(|| fields.iter().find(|f| go_equal_fold(f, key)))
        .copied()
}

/// Go's `strings.EqualFold` restricted to what can match an ASCII field name: ASCII case
/// plus the two non-ASCII letters that fold onto ASCII ones (long s and the Kelvin sign).
fn go_equal_fold(a: &str, b: &str) -> bool {
    let fold = |c: char| match c {
        '\u{17F}' => 's',
        '\u{212A}' => 'k',
        c => c.to_ascii_lowercase(),
    };
    a.chars().map(fold).eq(b.chars().map(fold))
}

/// Type-checked assignment of TOML values, with errors naming the file and key.
struct Decoder<'a> {
    file: &'a Path,
}

impl Decoder<'_> {
    fn error(&self, key: &str, message: impl fmt::Display) -> ConfigError {
        ConfigError::Parse {
            path: self.file.to_path_buf(),
            message: format!("key `{key}`: {message}"),
        }
    }

    fn mismatch(&self, key: &str, value: &toml::Value, expected: &str) -> ConfigError {
        self.error(
            key,
            format_args!("expected {expected}, found {}", value.type_str()),
        )
    }

    fn unknown(&self, key: &str) {
        tracing::debug!("ignoring unknown key `{key}` in {}", self.file.display());
    }

    fn table<'v>(&self, key: &str, value: &'v toml::Value) -> Result<&'v toml::Table, ConfigError> {
        value
            .as_table()
            .ok_or_else(|| self.mismatch(key, value, "a table"))
    }

    fn string(&self, key: &str, value: &toml::Value, dst: &mut String) -> Result<(), ConfigError> {
        let s = value
            .as_str()
            .ok_or_else(|| self.mismatch(key, value, "a string"))?;
        s.clone_into(dst);
        Ok(())
    }

    fn boolean(&self, key: &str, value: &toml::Value, dst: &mut bool) -> Result<(), ConfigError> {
        *dst = value
            .as_bool()
            .ok_or_else(|| self.mismatch(key, value, "a boolean"))?;
        Ok(())
    }

    fn uint32(&self, key: &str, value: &toml::Value, dst: &mut u32) -> Result<(), ConfigError> {
        let n = value
            .as_integer()
            .ok_or_else(|| self.mismatch(key, value, "an integer"))?;
        *dst = u32::try_from(n)
            .map_err(|_| self.error(key, format_args!("value {n} is out of range for uint32")))?;
        Ok(())
    }

    /// A table whose known keys are all strings.
    fn strings(
        &self,
        prefix: &str,
        table: &toml::Table,
        fields: &mut [(&'static str, &mut String)],
    ) -> Result<(), ConfigError> {
        let names: Vec<&'static str> = fields.iter().map(|(name, _)| *name).collect();
        for (key, value) in table {
            let k = format!("{prefix}.{key}");
            let target =
                field(key, &names).and_then(|name| fields.iter_mut().find(|(n, _)| *n == name));
            match target {
                Some((_, dst)) => self.string(&k, value, dst)?,
                None => self.unknown(&k),
            }
        }
        Ok(())
    }

    /// `pull_options`: keys merge into what earlier files set. Like BurntSushi/toml, a
    /// value that is not a table at all is silently ignored.
    fn string_map(
        &self,
        key: &str,
        value: &toml::Value,
        dst: &mut Option<BTreeMap<String, String>>,
    ) -> Result<(), ConfigError> {
        let Some(table) = value.as_table() else {
            tracing::debug!("ignoring non-table `{key}` in {}", self.file.display());
            return Ok(());
        };
        let map = dst.get_or_insert_with(BTreeMap::new);
        for (k, v) in table {
            let s = v
                .as_str()
                .ok_or_else(|| self.mismatch(&format!("{key}.{k}"), v, "a string"))?;
            map.insert(k.clone(), s.to_owned());
        }
        Ok(())
    }

    /// Upstream `configfile.Slice`: strings plus optional `{append = <bool>}` elements.
    fn slice(&self, key: &str, value: &toml::Value, dst: &mut Slice) -> Result<(), ConfigError> {
        let items = value
            .as_array()
            .ok_or_else(|| self.mismatch(key, value, "an array"))?;
        let mut loaded = Vec::with_capacity(items.len());
        for item in items {
            match item {
                toml::Value::String(s) => loaded.push(s.clone()),
                toml::Value::Table(attributes) => {
                    for (name, v) in attributes {
                        if name != "append" {
                            return Err(self.error(
                                key,
                                format_args!("unsupported key {name:?} in array attributes"),
                            ));
                        }
                        let append = v.as_bool().ok_or_else(|| {
                            self.error(
                                key,
                                format_args!("`append` must be a boolean, found {}", v.type_str()),
                            )
                        })?;
                        dst.append = Some(append);
                    }
                }
                other => {
                    return Err(self.error(
                        key,
                        format_args!("unsupported {} item in string array", other.type_str()),
                    ));
                }
            }
        }
        if dst.append == Some(true) {
            dst.values.extend(loaded);
        } else {
            dst.values = loaded;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// A hermetic environment: fs_root and HOME inside one temp dir, no other variables.
    struct Fixture {
        tmp: tempfile::TempDir,
        env: ConfigEnv,
    }

    impl Fixture {
        fn new(euid: u32) -> Self {
            let tmp = tempfile::tempdir().expect("tempdir");
            let root = tmp.path().join("root");
            let home = tmp.path().join("home");
            std::fs::create_dir_all(&root).expect("mkdir root");
            std::fs::create_dir_all(&home).expect("mkdir home");
            let mut vars = HashMap::new();
            vars.insert("HOME".to_owned(), home.into_os_string());
            Self {
                tmp,
                env: ConfigEnv {
                    vars,
                    euid,
                    fs_root: root,
                },
            }
        }

        /// Per-user storage for uid 1000 while the files stay owned by the test runner:
        /// the nested-userns shape, where `_CONTAINERS_ROOTLESS_UID` carries the uid.
        fn per_user() -> Self {
            let mut f = Self::new(rustix::process::geteuid().as_raw());
            f.set(ENV_ROOTLESS_UID, "1000");
            let run = f.tmp.path().join("xdg-run");
            std::fs::create_dir_all(&run).expect("mkdir xdg-run");
            f.set("XDG_RUNTIME_DIR", run);
            f
        }

        fn set(&mut self, name: &str, value: impl Into<OsString>) {
            self.env.vars.insert(name.to_owned(), value.into());
        }

        fn unset(&mut self, name: &str) {
            self.env.vars.remove(name);
        }

        fn home(&self) -> PathBuf {
            self.tmp.path().join("home")
        }

        fn root(&self, rel: &str) -> PathBuf {
            self.env.fs_root.join(rel)
        }

        fn write(&self, path: &Path, contents: &str) -> PathBuf {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("mkdir parent");
            }
            std::fs::write(path, contents).expect("write file");
            path.to_path_buf()
        }

        fn write_root(&self, rel: &str, contents: &str) -> PathBuf {
            self.write(&self.root(rel), contents)
        }

        fn user_conf(&self) -> PathBuf {
            self.home().join(".config/containers/storage.conf")
        }

        fn load(&self) -> StorageOptions {
            StorageOptions::load(&self.env).expect("load")
        }

        fn load_err(&self) -> ConfigError {
            StorageOptions::load(&self.env).expect_err("load should fail")
        }
    }

    fn driver_of(f: &Fixture) -> Option<String> {
        f.load().driver
    }

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

    fn stores_after(files: &[&str]) -> Result<Vec<String>, ConfigError> {
        let f = Fixture::new(0);
        for (i, body) in files.iter().enumerate() {
            f.write_root(
                &format!("etc/containers/storage.conf.d/{i:02}.conf"),
                &format!("[storage.options]\nadditionalimagestores = {body}\n"),
            );
        }
        let o = StorageOptions::load(&f.env)?;
        Ok(o.driver_options)
    }

    #[test]
    fn append_slices() {
        let opts = |v: &[&str]| {
            v.iter()
                .map(|s| format!("imagestore={s}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            stores_after(&[r#"["/a"]"#, r#"["/b"]"#]).expect("ok"),
            opts(&["/b"])
        );
        assert_eq!(
            stores_after(&[r#"["/a"]"#, r#"["/b", {append = true}]"#]).expect("ok"),
            opts(&["/a", "/b"])
        );
        // The append attribute is sticky until a later file turns it off.
        assert_eq!(
            stores_after(&[r#"[{append = true}, "/a"]"#, r#"["/b"]"#, r#"["/c"]"#]).expect("ok"),
            opts(&["/a", "/b", "/c"])
        );
        assert_eq!(
            stores_after(&[
                r#"["/a", {append = true}]"#,
                r#"["/b", {append = false}]"#,
                r#"["/c"]"#
            ])
            .expect("ok"),
            opts(&["/c"])
        );
        assert_eq!(
            stores_after(&[
                r#"["/a"]"#,
                r#"["/b", {append = false}]"#,
                r#"["/c", {append = true}]"#
            ])
            .expect("ok"),
            opts(&["/b", "/c"])
        );
        for bad in [
            r#"["/a", 1]"#,
            r#"["/a", {foo = true}]"#,
            r#"["/a", {append = "true"}]"#,
            r#""/a""#,
        ] {
            match stores_after(&[bad]) {
                Err(ConfigError::Parse { message, .. }) => {
                    assert!(
                        message.contains("storage.options.additionalimagestores"),
                        "{message}"
                    );
                }
                other => panic!("{bad}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn driver_priority_and_layer_stores_are_slices() {
        let f = Fixture::new(0);
        f.write_root(
            "usr/share/containers/storage.conf",
            "[storage]\ndriver_priority = [\"overlay\"]\n[storage.options]\nadditionallayerstores = [\"/l1:ref\"]\n",
        );
        f.write_root(
            "etc/containers/storage.conf.d/1.conf",
            "[storage]\ndriver_priority = [\"vfs\", {append = true}]\n[storage.options]\nadditionallayerstores = [\"/l2\"]\n",
        );
        let o = f.load();
        assert_eq!(o.driver_priority, vec!["overlay", "vfs"]);
        assert_eq!(o.driver_options, vec!["additionallayerstore=/l2"]);
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
    fn driver_options_in_upstream_order() {
        let f = Fixture::new(0);
        f.write_root(
            "etc/containers/storage.conf",
            r#"
[storage]
driver = "overlay"
transient_store = true

[storage.options]
additionalimagestores = ["/s1", "/s2"]
additionallayerstores = ["/l1:ref"]
size = "10G"
mount_program = "/usr/bin/fuse-overlayfs"
skip_mount_home = "true"
ignore_chown_errors = "false"
force_mask = 0o700
mountopt = "nodev"
use_composefs = "true"
imagestore = "/ignored"
root-auto-userns-user = "containers"
auto-userns-min-size = 1024
disable-volatile = true
unknown_key = 1

[storage.options.pull_options]
enable_partial_images = "true"
ostree_repos = ""

[storage.options.overlay]
mountopt = "nodev,metacopy=on"
mount_program = "/o/fuse"
use_composefs = "false"
force_mask = "shared"
inodes = "100"
sync = "none"
size = "1G"
skip_mount_home = "false"
ignore_chown_errors = "true"
bogus = "x"

[storage.options.btrfs]
min_space = "1G"

[storage.options.vfs]
ignore_chown_errors = "true"

[storage.options.zfs]
fsname = "tank"

[other]
x = 1
"#,
        );
        let o = f.load();
        assert_eq!(
            o.driver_options,
            vec![
                "imagestore=/s1",
                "imagestore=/s2",
                "additionallayerstore=/l1:ref",
                "size=10G",
                "mount_program=/usr/bin/fuse-overlayfs",
                "skip_mount_home=true",
                "ignore_chown_errors=false",
                "force_mask=700",
                "mountopt=nodev",
                "btrfs.min_space=1G",
                "overlay.ignore_chown_errors=true",
                "overlay.mount_program=/o/fuse",
                "overlay.mountopt=nodev,metacopy=on",
                "overlay.size=1G",
                "overlay.inodes=100",
                "overlay.skip_mount_home=false",
                "overlay.force_mask=shared",
                "overlay.use_composefs=false",
                "overlay.sync=none",
                "vfs.ignore_chown_errors=true",
                "zfs.fsname=tank",
            ]
        );
        assert!(o.transient_store);
        assert_eq!(
            o.pull_options
                .get("enable_partial_images")
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(
            o.pull_options.get("ostree_repos").map(String::as_str),
            Some("")
        );
        assert_eq!(o.mount_program().as_deref(), Some("/o/fuse"));
        assert_eq!(
            o.additional_image_stores(),
            vec![PathBuf::from("/s1"), PathBuf::from("/s2")]
        );
    }

    #[test]
    fn pull_options_merge_across_files() {
        let f = Fixture::new(0);
        f.write_root(
            "etc/containers/storage.conf",
            "[storage.options.pull_options]\na = \"1\"\nb = \"1\"\n",
        );
        f.write_root(
            "etc/containers/storage.conf.d/1.conf",
            "[storage.options.pull_options]\nb = \"2\"\n",
        );
        f.write_root(
            "etc/containers/storage.conf.d/2.conf",
            "[storage.options]\npull_options = 7\n",
        );
        let o = f.load();
        let expected: BTreeMap<String, String> = [
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]
        .into();
        assert_eq!(o.pull_options, expected);

        f.write_root(
            "etc/containers/storage.conf.d/3.conf",
            "[storage.options.pull_options]\nc = true\n",
        );
        assert!(
            matches!(f.load_err(), ConfigError::Parse { message, .. } if message.contains("pull_options.c"))
        );
    }

    #[test]
    fn keys_match_case_insensitively_like_go() {
        let f = Fixture::new(0);
        f.write_root(
            "etc/containers/storage.conf",
            "[Storage]\nDriver = \"vfs\"\nGraphRoot = \"/G\"\n[Storage.Options]\nMount_Program = \"/mp\"\n\"\u{17F}ize\" = \"3G\"\n",
        );
        let o = f.load();
        assert_eq!(o.driver.as_deref(), Some("vfs"));
        assert_eq!(o.graphroot, Path::new("/G"));
        assert_eq!(o.driver_options, vec!["size=3G", "mount_program=/mp"]);
    }

    #[test]
    fn type_errors_name_file_and_key() {
        let f = Fixture::new(0);
        let path = f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ntransient_store = \"true\"\n",
        );
        match f.load_err() {
            ConfigError::Parse { path: p, message } => {
                assert_eq!(p, path);
                assert!(message.contains("storage.transient_store"), "{message}");
            }
            other => panic!("unexpected {other}"),
        }
        for body in [
            "[storage.options]\nforce_mask = \"0700\"\n",
            "[storage.options]\nforce_mask = -1\n",
            "[storage]\ndriver = 1\n",
            "storage = 1\n",
            "[storage]\noptions = \"x\"\n",
            "[storage.options]\noverlay = 1\n",
            "[storage.options.overlay]\nsize = 1\n",
        ] {
            f.write_root("etc/containers/storage.conf", body);
            assert!(matches!(f.load_err(), ConfigError::Parse { .. }), "{body}");
        }
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

    #[test]
    fn additional_image_stores_from_driver_options() {
        let f = Fixture::new(0);
        let mut o = f.load();
        o.driver_options = [
            "imagestore=/a",
            "overlay.imagestore=/b,/c/",
            "overlay2.additionalimagestore=/d",
            "OVERLAY.ImageStore = /e ",
            "additionalimagestore=/a",
            ".imagestore=/f",
            "btrfs.imagestore=/nope",
            "vfs.additionalimagestore=/nope",
            "imagestore=relative",
            "imagestore=",
            "imagestore",
            "mount_program=/x",
            "imagestore=/g/../h//i",
        ]
        .map(String::from)
        .to_vec();
        let expected: Vec<PathBuf> = ["/a", "/b", "/c", "/d", "/e", "/f", "/h/i"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(o.additional_image_stores(), expected);
    }

    #[test]
    fn mount_program_last_wins() {
        let f = Fixture::new(0);
        let mut o = f.load();
        assert_eq!(o.mount_program(), None);
        o.driver_options = vec![
            "mount_program=/a".into(),
            "overlay2.mount_program=/b".into(),
        ];
        assert_eq!(o.mount_program().as_deref(), Some("/b"));
        o.driver_options.push("btrfs.mount_program=/c".into());
        assert_eq!(o.mount_program().as_deref(), Some("/b"));
        o.driver_options.push("overlay.mount_program=".into());
        assert_eq!(o.mount_program(), None);
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
    fn path_expansion() {
        let mut f = Fixture::per_user();
        f.set("FOO", "/foo");
        f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ngraphroot = \"$HOME/store-$UID\"\nrunroot = \"${FOO}/run/$UNSET/x/./\"\nimagestore = \"$HOME/img\"\n",
        );
        let o = f.load();
        assert_eq!(o.graphroot, f.home().join("store-1000"));
        assert_eq!(o.runroot, Path::new("/foo/run/x"));
        // imagestore is not expanded, as upstream.
        assert_eq!(o.imagestore.as_deref(), Some(Path::new("$HOME/img")));

        // Symlinks are resolved when the path exists.
        let real = f.tmp.path().join("real");
        std::fs::create_dir_all(&real).expect("mkdir real");
        symlink(&real, f.tmp.path().join("link")).expect("symlink");
        f.set("LINK", f.tmp.path().join("link"));
        f.write_root(
            "etc/containers/storage.conf",
            "[storage]\ngraphroot = \"$LINK\"\n",
        );
        assert_eq!(
            f.load().graphroot,
            std::fs::canonicalize(&real).expect("canon")
        );
    }

    #[test]
    fn go_expand_env_rules() {
        let mut f = Fixture::new(0);
        f.set("A", "x");
        f.set("AB", "y");
        f.set("1", "one");
        let expand = |s: &str| String::from_utf8(go_expand_env(s, &f.env)).expect("utf8");
        assert_eq!(expand("$A/$AB/${A}B/$A-"), "x/y/xB/x-");
        assert_eq!(expand("a$"), "a$");
        assert_eq!(expand("$/a"), "$/a");
        assert_eq!(expand("${}z"), "z");
        assert_eq!(expand("${Az"), "Az");
        assert_eq!(expand("$1x${1}"), "onexone");
        assert_eq!(expand("$$A"), "A");
        assert_eq!(expand("${A B}|$NOPE|"), "||");
        assert_eq!(expand("é$A"), "éx");
    }

    #[test]
    fn go_clean_rules() {
        for (input, want) in [
            ("", "."),
            ("/", "/"),
            ("//a//b/", "/a/b"),
            ("a/./b/..", "a"),
            ("/../a", "/a"),
            ("../a/..", ".."),
            ("a/..", "."),
            ("./", "."),
        ] {
            assert_eq!(clean(Path::new(input)), Path::new(want), "{input}");
        }
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

    #[test]
    fn from_process_reads_the_real_process() {
        let env = ConfigEnv::from_process();
        assert_eq!(env.fs_root, Path::new("/"));
        assert_eq!(env.euid, rustix::process::geteuid().as_raw());
    }
}
