//! A hermetic discovery environment for the configuration tests: a file-system root and a
//! home directory inside one temporary directory, and no variables but `HOME`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::env::ENV_ROOTLESS_UID;
use super::{ConfigEnv, ConfigError, StorageOptions};

/// The graph root [`Fixture::write_system`] names.
pub(super) const SYSTEM_GRAPHROOT: &str = "/system/graph";
/// The run root [`Fixture::write_system`] names.
pub(super) const SYSTEM_RUNROOT: &str = "/system/run";

/// A hermetic environment: fs_root and HOME inside one temp dir, no other variables.
pub(super) struct Fixture {
    pub(super) tmp: tempfile::TempDir,
    pub(super) env: ConfigEnv,
}

impl Fixture {
    pub(super) fn new(euid: u32) -> Self {
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
    pub(super) fn per_user() -> Self {
        let mut f = Self::new(rustix::process::geteuid().as_raw());
        f.set(ENV_ROOTLESS_UID, "1000");
        let run = f.tmp.path().join("xdg-run");
        std::fs::create_dir_all(&run).expect("mkdir xdg-run");
        f.set("XDG_RUNTIME_DIR", run);
        f
    }

    pub(super) fn set(&mut self, name: &str, value: impl Into<OsString>) {
        self.env.vars.insert(name.to_owned(), value.into());
    }

    pub(super) fn unset(&mut self, name: &str) {
        self.env.vars.remove(name);
    }

    pub(super) fn home(&self) -> PathBuf {
        self.tmp.path().join("home")
    }

    pub(super) fn root(&self, rel: &str) -> PathBuf {
        self.env.fs_root.join(rel)
    }

    pub(super) fn write(&self, path: &Path, contents: &str) -> PathBuf {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir parent");
        }
        std::fs::write(path, contents).expect("write file");
        path.to_path_buf()
    }

    pub(super) fn write_root(&self, rel: &str, contents: &str) -> PathBuf {
        self.write(&self.root(rel), contents)
    }

    /// Writes `/etc/containers/storage.conf` with `contents` and the graph and run roots
    /// that a rootful file must name ([`SYSTEM_GRAPHROOT`], [`SYSTEM_RUNROOT`]), for tests
    /// about something else. `contents` must not set them itself.
    pub(super) fn write_system(&self, contents: &str) -> PathBuf {
        let roots = format!("graphroot = \"{SYSTEM_GRAPHROOT}\"\nrunroot = \"{SYSTEM_RUNROOT}\"\n");
        let body = match contents.strip_prefix("[storage]\n") {
            Some(rest) => format!("[storage]\n{roots}{rest}"),
            None => format!("[storage]\n{roots}{contents}"),
        };
        self.write_root("etc/containers/storage.conf", &body)
    }

    pub(super) fn user_conf(&self) -> PathBuf {
        self.home().join(".config/containers/storage.conf")
    }

    pub(super) fn load(&self) -> StorageOptions {
        StorageOptions::load(&self.env).expect("load")
    }

    pub(super) fn load_err(&self) -> ConfigError {
        StorageOptions::load(&self.env).expect_err("load should fail")
    }
}

pub(super) fn driver_of(f: &Fixture) -> Option<String> {
    f.load().driver
}
