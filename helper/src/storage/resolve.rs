//! Which image a reference names: its store selector checked against the storage served,
//! then matching by id, id prefix, name (with podman's `localhost/` fallback for short
//! names) or manifest digest, in image lookup order.

use std::path::Path;

use cstor_protocol::ErrorCode;

use super::Storage;
use super::image_records::ImageRecord;
use super::reference::{self, ImageSpec, NormalizedName};
use crate::error::{Error, Result};

impl Storage {
    /// Checks that a reference's `[driver@graph+run]` selector names this storage.
    pub(super) fn check_store_spec(&self, spec: &reference::StoreSpec, input: &str) -> Result<()> {
        if let Some(d) = &spec.driver
            && d != "overlay"
            && d != "overlay2"
        {
            return Err(Error::new(
                ErrorCode::UnsupportedDriver,
                format!("the reference selects the {d:?} driver; only overlay is supported"),
            )
            .reference(input));
        }
        if let Some(g) = &spec.graphroot {
            let same = |a: &Path, b: &Path| {
                a == b
                    || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
            };
            if !same(g, &self.options.graphroot) {
                return Err(Error::new(
                    ErrorCode::InvalidReference,
                    format!(
                        "the reference names graph root {}, but this helper serves {}; \
                         start the helper with --root {}",
                        g.display(),
                        self.options.graphroot.display(),
                        g.display()
                    ),
                )
                .reference(input));
            }
        }
        Ok(())
    }
}

/// Picks the image a reference names.
pub(super) fn resolve<'a>(
    images: &'a [(usize, ImageRecord)],
    spec: &ImageSpec,
    input: &str,
) -> Result<&'a (usize, ImageRecord)> {
    let not_found = || {
        Error::new(
            ErrorCode::ImageNotFound,
            format!("no image matches {input:?}"),
        )
        .reference(input)
    };
    let by_name = |n: &NormalizedName| {
        let want = n.with_tag();
        images
            .iter()
            .find(|(_, r)| r.names.contains(&want))
            .or_else(|| {
                let alt = n.localhost_candidate()?;
                images.iter().find(|(_, r)| r.names.contains(&alt))
            })
    };
    let by_prefix = |p: &str| -> Result<Option<&'a (usize, ImageRecord)>> {
        let hits: Vec<&(usize, ImageRecord)> =
            images.iter().filter(|(_, r)| r.id.starts_with(p)).collect();
        match hits.len() {
            0 => Ok(None),
            1 => Ok(Some(hits[0])),
            _ => Err(Error::new(
                ErrorCode::AmbiguousReference,
                format!("{p:?} is a prefix of {} image ids", hits.len()),
            )
            .reference(input)
            .candidates(hits.iter().map(|(_, r)| r.id.clone()).collect())),
        }
    };
    match spec {
        ImageSpec::Id(id) => images
            .iter()
            .find(|(_, r)| r.id == *id)
            .ok_or_else(not_found),
        ImageSpec::IdPrefix(p) => by_prefix(p)?.ok_or_else(not_found),
        ImageSpec::IdPrefixOrName { prefix, name } => match by_name(name) {
            Some(hit) => Ok(hit),
            None => by_prefix(prefix)?.ok_or_else(not_found),
        },
        ImageSpec::Name(n) => by_name(n).ok_or_else(not_found),
        ImageSpec::Digested { name, digest } => {
            let exact = format!("{}@{digest}", name.repository);
            if let Some(hit) = images.iter().find(|(_, r)| r.names.contains(&exact)) {
                return Ok(hit);
            }
            let repos = std::iter::once(name.repository.clone())
                .chain(
                    name.localhost_candidate()
                        .map(|c| reference::repository_of(&c).to_owned()),
                )
                .collect::<Vec<_>>();
            images
                .iter()
                .find(|(_, r)| {
                    r.manifest_digests().any(|d| d == digest)
                        && r.names
                            .iter()
                            .any(|n| repos.iter().any(|repo| reference::repository_of(n) == repo))
                })
                .ok_or_else(not_found)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, names: &[&str], digest: Option<&str>) -> (usize, ImageRecord) {
        (
            0,
            ImageRecord {
                id: id.into(),
                digest: digest.map(Into::into),
                names: names.iter().map(|s| s.to_string()).collect(),
                top_layer: None,
                big_data_digests: Default::default(),
                big_data_names: vec![],
                created: None,
            },
        )
    }

    fn images() -> Vec<(usize, ImageRecord)> {
        vec![
            rec(
                &format!("abc1{}", "0".repeat(60)),
                &["docker.io/library/busybox:latest"],
                None,
            ),
            rec(
                &format!("abc2{}", "0".repeat(60)),
                &["localhost/myimg:latest", "quay.io/x/y:1"],
                Some(&format!("sha256:{}", "d".repeat(64))),
            ),
            rec(&format!("fed{}", "0".repeat(61)), &[], None),
        ]
    }

    fn find(input: &str) -> Result<String> {
        let imgs = images();
        let r = reference::parse(input)?;
        resolve(&imgs, &r.image, input).map(|(_, r)| r.id.clone())
    }

    #[test]
    fn resolves_every_form() {
        let a = format!("abc1{}", "0".repeat(60));
        let b = format!("abc2{}", "0".repeat(60));
        let c = format!("fed{}", "0".repeat(61));
        assert_eq!(find("busybox").unwrap(), a);
        assert_eq!(find("docker.io/library/busybox").unwrap(), a);
        assert_eq!(find(&a).unwrap(), a);
        assert_eq!(find(&format!("sha256:{a}")).unwrap(), a);
        assert_eq!(find("abc1").unwrap(), a);
        assert_eq!(find("fed").unwrap(), c);
        assert_eq!(find("myimg").unwrap(), b);
        assert_eq!(find("localhost/myimg").unwrap(), b);
        assert_eq!(find("quay.io/x/y:1").unwrap(), b);
        assert_eq!(
            find(&format!("quay.io/x/y@sha256:{}", "d".repeat(64))).unwrap(),
            b
        );
        assert_eq!(find("whatever@abc2").unwrap(), b);
    }

    #[test]
    fn failures_have_codes() {
        assert_eq!(
            find("abc").unwrap_err().code(),
            ErrorCode::AmbiguousReference
        );
        assert_eq!(find("abc").unwrap_err().details().candidates.len(), 2);
        assert_eq!(find("nope").unwrap_err().code(), ErrorCode::ImageNotFound);
        assert_eq!(
            find("quay.io/x/y:2").unwrap_err().code(),
            ErrorCode::ImageNotFound
        );
        // The digest matches, but the repository does not.
        assert_eq!(
            find(&format!("quay.io/other@sha256:{}", "d".repeat(64)))
                .unwrap_err()
                .code(),
            ErrorCode::ImageNotFound
        );
    }
}
