//! storage.conf as the helper reads it (TOML, then containers-storage's rules): any bytes in
//! the file named by CONTAINERS_STORAGE_CONF give options or a configuration error, never a
//! panic.
#![no_main]

use std::collections::HashMap;

use cstor_helper::storage::config::{ConfigEnv, StorageOptions};
use libfuzzer_sys::fuzz_target;

/// One directory for the whole run: a new one per input would cost more than the parse.
static DIR: std::sync::LazyLock<tempfile::TempDir> =
    std::sync::LazyLock::new(|| tempfile::tempdir().expect("a temp dir"));

fuzz_target!(|data: &[u8]| {
    let dir = &*DIR;
    let conf = dir.path().join("storage.conf");
    std::fs::write(&conf, data).expect("writing the file");
    for euid in [0, 1000] {
        let mut vars = HashMap::new();
        vars.insert("CONTAINERS_STORAGE_CONF".to_owned(), conf.clone().into());
        vars.insert("HOME".to_owned(), dir.path().join("home").into());
        let env = ConfigEnv {
            vars,
            euid,
            fs_root: dir.path().to_owned(),
        };
        let _ = StorageOptions::load(&env);
    }
});
