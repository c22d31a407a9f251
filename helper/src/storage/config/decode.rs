//! The storage.conf decoder: TOML tables decoded over one configuration the way
//! containers/storage's Go decoder does it (keys matched exactly, else without regard to
//! case; unknown keys ignored; known keys type-checked; string arrays that a later file may
//! extend), and the driver option list built from the result.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use super::ConfigError;

/// A string array that a later file may extend instead of replace (upstream
/// `configfile.Slice`).
///
/// The `append` attribute persists across files: once a file says `{append = true}`,
/// later files append too until one says `{append = false}`. Upstream tests pin this.
#[derive(Debug, Default, Clone)]
pub(super) struct Slice {
    pub(super) values: Vec<String>,
    append: Option<bool>,
}

/// The decoded configuration; an empty string or zero means "not set", as upstream.
#[derive(Debug, Default)]
pub(super) struct RawConfig {
    pub(super) driver: String,
    pub(super) driver_priority: Slice,
    pub(super) runroot: String,
    pub(super) imagestore: String,
    pub(super) graphroot: String,
    pub(super) rootless_storage_path: String,
    pub(super) transient_store: bool,
    pub(super) options: RawOptions,
}

#[derive(Debug, Default)]
pub(super) struct RawOptions {
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
    pub(super) pull_options: Option<BTreeMap<String, String>>,
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
    /// Decodes the contents of configuration file `path` over what earlier files set.
    pub(super) fn merge_file(&mut self, path: &Path, bytes: &[u8]) -> Result<(), ConfigError> {
        let parse_error = |message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let text =
            std::str::from_utf8(bytes).map_err(|e| parse_error(format!("not valid UTF-8: {e}")))?;
        let table: toml::Table = toml::from_str(text).map_err(|e| parse_error(e.to_string()))?;
        self.decode(&Decoder { file: path }, &table)
    }

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
        for (name, k, v) in d.entries(prefix, table, FIELDS) {
            match name {
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
    pub(super) fn driver_options(&self) -> Vec<String> {
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
        for (name, k, v) in d.entries(prefix, table, FIELDS) {
            match name {
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

    /// The entries of `table`, each with the field it names among `fields` (if any) and
    /// its dotted key for messages.
    fn entries<'t>(
        &self,
        prefix: &str,
        table: &'t toml::Table,
        fields: &[&'static str],
    ) -> impl Iterator<Item = (Option<&'static str>, String, &'t toml::Value)> {
        table
            .iter()
            .map(move |(key, value)| (field(key, fields), format!("{prefix}.{key}"), value))
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
        for (name, k, value) in self.entries(prefix, table, &names) {
            let target = name.and_then(|name| fields.iter_mut().find(|(n, _)| *n == name));
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
    use crate::storage::config::StorageOptions;
    use crate::storage::config::fixture::Fixture;
    use std::path::PathBuf;

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
            "[storage]\ngraphroot = \"/g\"\nrunroot = \"/r\"\ndriver_priority = [\"overlay\"]\n[storage.options]\nadditionallayerstores = [\"/l1:ref\"]\n",
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
    fn driver_options_in_upstream_order() {
        let f = Fixture::new(0);
        f.write_root(
            "etc/containers/storage.conf",
            r#"
[storage]
driver = "overlay"
graphroot = "/g"
runroot = "/r"
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
        f.write_system("[storage.options.pull_options]\na = \"1\"\nb = \"1\"\n");
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
            "[Storage]\nDriver = \"vfs\"\nGraphRoot = \"/G\"\nRunRoot = \"/R\"\n[Storage.Options]\nMount_Program = \"/mp\"\n\"\u{17F}ize\" = \"3G\"\n",
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
}
