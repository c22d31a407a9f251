//! How the overlay driver reads its driver options (`imagestore=`,
//! `overlay.mount_program=`...): names without regard to case, an optional `overlay.` or
//! `overlay2.` prefix, options for other drivers skipped.

use std::path::{Path, PathBuf};

use super::expand::clean;
use super::{StorageOptions, non_empty_string};

impl StorageOptions {
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
}

/// Splits a driver option the way the overlay driver does, returning the lower-cased
/// option name without its driver prefix and the trimmed value. `None` for options that
/// are malformed or meant for another driver.
pub(super) fn overlay_option(option: &str) -> Option<(String, &str)> {
    let (key, value) = option.split_once('=')?;
    let key = key.trim().to_lowercase();
    let name = match key.split_once('.') {
        None => key,
        Some(("" | "overlay" | "overlay2", name)) => name.to_owned(),
        Some(_) => return None,
    };
    Some((name, value.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::config::fixture::Fixture;

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
}
