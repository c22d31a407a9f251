//! Image references as skopeo's `containers-storage:` transport and podman accept them.
//!
//! Accepted forms (the `containers-storage:` prefix is optional everywhere):
//!
//! | form | meaning |
//! |------|---------|
//! | `[overlay@/graph+/run:opts]REST` | store selector, then any form below |
//! | 64 hex digits, or `sha256:` + 64 hex | image id |
//! | 3-63 hex digits | unique image id prefix (else a name) |
//! | `NAME[:TAG]` | exact name after normalisation (`busybox` → `docker.io/library/busybox:latest`) |
//! | `NAME@sha256:HEX` | by manifest digest, within repository NAME |
//! | `NAME@ID` or `@ID` | image id (prefix allowed), the name is informational |

use cstor_protocol::ErrorCode;

use crate::error::{Error, Result};

pub use cstor_protocol::reference::StoreSpec;

/// What identifies the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSpec {
    /// A full id (64 hex).
    Id(String),
    /// Hex digits that may be an id prefix or, failing that, a short name.
    IdPrefixOrName {
        /// The hex string.
        prefix: String,
        /// The same string normalised as a name.
        name: NormalizedName,
    },
    /// An id prefix given explicitly after `@`.
    IdPrefix(String),
    /// A name with tag.
    Name(NormalizedName),
    /// A name with a manifest digest.
    Digested {
        /// The repository (and tag, if one was given).
        name: NormalizedName,
        /// `sha256:...`.
        digest: String,
    },
}

/// A normalised docker reference without digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedName {
    /// `docker.io/library/busybox`.
    pub repository: String,
    /// `latest` when none was given.
    pub tag: Option<String>,
    /// True when the input had no registry domain (so `localhost/` may be tried as podman
    /// does).
    pub short: bool,
    /// The path part as typed, for the `localhost/` fallback.
    pub path: String,
}

impl NormalizedName {
    /// `repository:tag`, the form stored in images.json names.
    pub fn with_tag(&self) -> String {
        match &self.tag {
            Some(t) => format!("{}:{t}", self.repository),
            None => self.repository.clone(),
        }
    }

    /// The podman-style `localhost/` candidate of a short name.
    pub fn localhost_candidate(&self) -> Option<String> {
        self.short.then(|| match &self.tag {
            Some(t) => format!("localhost/{}:{t}", self.path),
            None => format!("localhost/{}", self.path),
        })
    }
}

/// A parsed reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The store selector, when given.
    pub store: Option<StoreSpec>,
    /// The image part.
    pub image: ImageSpec,
}

fn invalid(input: &str, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorCode::InvalidReference,
        format!("invalid image reference {input:?}: {why}"),
    )
    .reference(input)
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Parses a reference.
///
/// ```
/// use cstor_helper::storage::reference::{parse, ImageSpec};
/// let r = parse("containers-storage:busybox").unwrap();
/// match r.image {
///     ImageSpec::Name(n) => assert_eq!(n.with_tag(), "docker.io/library/busybox:latest"),
///     other => panic!("{other:?}"),
/// }
/// let r = parse("[overlay@/var/lib/x+/run/x]quay.io/a/b:1").unwrap();
/// assert_eq!(r.store.unwrap().graphroot.unwrap(), std::path::Path::new("/var/lib/x"));
/// ```
pub fn parse(input: &str) -> Result<Reference> {
    if input.trim().is_empty() {
        return Err(invalid(input, "empty reference"));
    }
    let (store, s) =
        cstor_protocol::reference::split_store(input).map_err(|m| invalid(input, m))?;
    if s.is_empty() {
        return Err(invalid(input, "empty reference"));
    }
    let image = parse_image(s, input)?;
    Ok(Reference { store, image })
}

fn parse_image(s: &str, input: &str) -> Result<ImageSpec> {
    if let Some(hex) = s.strip_prefix("sha256:") {
        if hex.len() == 64 && is_hex(hex) {
            return Ok(ImageSpec::Id(hex.to_owned()));
        }
        return Err(invalid(input, "sha256: must be followed by 64 hex digits"));
    }
    if s.len() == 64 && is_hex(s) {
        return Ok(ImageSpec::Id(s.to_owned()));
    }
    if let Some((name, after)) = s.rsplit_once('@') {
        if let Some(hex) = after.strip_prefix("sha256:") {
            if hex.len() != 64 || !is_hex(hex) {
                return Err(invalid(input, "a digest must be sha256: and 64 hex digits"));
            }
            if name.is_empty() {
                return Err(invalid(
                    input,
                    "a digest needs a repository name before '@'",
                ));
            }
            return Ok(ImageSpec::Digested {
                name: normalize(name, input, true)?,
                digest: after.to_owned(),
            });
        }
        if after.len() >= 3 && after.len() <= 64 && is_hex(after) {
            if !name.is_empty() {
                // Validate the name even though the id decides.
                normalize(name, input, false)?;
            }
            return Ok(if after.len() == 64 {
                ImageSpec::Id(after.to_owned())
            } else {
                ImageSpec::IdPrefix(after.to_owned())
            });
        }
        return Err(invalid(
            input,
            "after '@' expected sha256:<digest> or an image id",
        ));
    }
    if s.len() >= 3 && is_hex(s) {
        return Ok(ImageSpec::IdPrefixOrName {
            prefix: s.to_owned(),
            name: normalize(s, input, false)?,
        });
    }
    Ok(ImageSpec::Name(normalize(s, input, false)?))
}

/// Docker-style normalisation: default domain `docker.io`, `library/` for official images,
/// default tag `latest` unless a digest follows.
pub fn normalize(s: &str, input: &str, has_digest: bool) -> Result<NormalizedName> {
    // A tag is a ':' after the last '/'.
    let last_slash = s.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (name, tag) = match s[last_slash..].rfind(':') {
        Some(i) => (&s[..last_slash + i], Some(&s[last_slash + i + 1..])),
        None => (s, None),
    };
    if let Some(t) = tag
        && (t.is_empty()
            || t.len() > 128
            || !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            || t.starts_with(['.', '-']))
    {
        return Err(invalid(input, format!("invalid tag {t:?}")));
    }
    let (domain, path, short) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            let d = if first == "index.docker.io" {
                "docker.io"
            } else {
                first
            };
            // Official images live under library/ on Docker Hub, however they are written.
            let path = if d == "docker.io" && !rest.contains('/') {
                format!("library/{rest}")
            } else {
                rest.to_owned()
            };
            (d.to_owned(), path, false)
        }
        Some(_) => ("docker.io".to_owned(), name.to_owned(), true),
        None => ("docker.io".to_owned(), format!("library/{name}"), true),
    };
    if path.is_empty() {
        return Err(invalid(input, "empty repository path"));
    }
    for comp in path.split('/') {
        let valid = !comp.is_empty()
            && comp
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
            && comp
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
            && comp
                .bytes()
                .last()
                .is_some_and(|b| b.is_ascii_alphanumeric());
        if !valid {
            return Err(invalid(
                input,
                format!(
                    "repository component {comp:?} must be lowercase letters, digits and separators"
                ),
            ));
        }
    }
    if domain
        .bytes()
        .any(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')))
    {
        return Err(invalid(input, format!("invalid registry {domain:?}")));
    }
    let tag = match tag {
        Some(t) => Some(t.to_owned()),
        None if has_digest => None,
        None => Some("latest".to_owned()),
    };
    let path_as_typed = if short { name.to_owned() } else { path.clone() };
    Ok(NormalizedName {
        repository: format!("{domain}/{path}"),
        tag,
        short,
        path: path_as_typed,
    })
}

/// The repository part of a stored name (`quay.io/a/b:tag` → `quay.io/a/b`,
/// `x@sha256:..` → `x`).
pub fn repository_of(stored: &str) -> &str {
    let no_digest = stored.split_once('@').map(|(n, _)| n).unwrap_or(stored);
    let last_slash = no_digest.rfind('/').map(|i| i + 1).unwrap_or(0);
    match no_digest[last_slash..].rfind(':') {
        Some(i) => &no_digest[..last_slash + i],
        None => no_digest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> String {
        match parse(s).unwrap().image {
            ImageSpec::Name(n) => n.with_tag(),
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn normalisation_like_skopeo() {
        assert_eq!(name("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(name("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(name("user/app"), "docker.io/user/app:latest");
        assert_eq!(
            name("docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            name("index.docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(name("index.docker.io/a/b:c"), "docker.io/a/b:c");
        assert_eq!(name("localhost/x"), "localhost/x:latest");
        assert_eq!(name("localhost:5000/x:y"), "localhost:5000/x:y");
        assert_eq!(name("quay.io/a/b/c:t"), "quay.io/a/b/c:t");
        assert_eq!(
            name("containers-storage:fedora"),
            "docker.io/library/fedora:latest"
        );
    }

    #[test]
    fn short_names_offer_a_localhost_candidate() {
        let ImageSpec::Name(n) = parse("myimg:1").unwrap().image else {
            panic!()
        };
        assert_eq!(
            n.localhost_candidate().as_deref(),
            Some("localhost/myimg:1")
        );
        let ImageSpec::Name(n) = parse("a/b").unwrap().image else {
            panic!()
        };
        assert_eq!(
            n.localhost_candidate().as_deref(),
            Some("localhost/a/b:latest")
        );
        let ImageSpec::Name(n) = parse("quay.io/a").unwrap().image else {
            panic!()
        };
        assert_eq!(n.localhost_candidate(), None);
    }

    #[test]
    fn ids_prefixes_and_digests() {
        let id = "0123456789abcdef".repeat(4);
        assert_eq!(parse(&id).unwrap().image, ImageSpec::Id(id.clone()));
        assert_eq!(
            parse(&format!("sha256:{id}")).unwrap().image,
            ImageSpec::Id(id.clone())
        );
        assert!(matches!(
            parse("abc1").unwrap().image,
            ImageSpec::IdPrefixOrName { ref prefix, .. } if prefix == "abc1"
        ));
        assert_eq!(
            parse("busybox@0123").unwrap().image,
            ImageSpec::IdPrefix("0123".into())
        );
        assert_eq!(
            parse(&format!("@{id}")).unwrap().image,
            ImageSpec::Id(id.clone())
        );
        match parse(&format!("quay.io/a/b@sha256:{id}")).unwrap().image {
            ImageSpec::Digested { name, digest } => {
                assert_eq!(name.with_tag(), "quay.io/a/b");
                assert_eq!(digest, format!("sha256:{id}"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_references() {
        for bad in [
            "",
            "  ",
            "UPPER/case",
            "busybox:",
            "busybox:bad tag",
            "[overlay@relative+/r]x",
            "[overlay@/g",
            "[overlay@/g]",
            "sha256:abc",
            "x@sha256:123",
            "x@nothex!",
            "a//b",
            "-lead",
            "@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidReference, "{bad:?}");
        }
    }

    #[test]
    fn repository_of_stored_names() {
        assert_eq!(repository_of("quay.io/a/b:t"), "quay.io/a/b");
        assert_eq!(repository_of("localhost:5000/x"), "localhost:5000/x");
        assert_eq!(repository_of("localhost:5000/x:1"), "localhost:5000/x");
        assert_eq!(repository_of("docker.io/a@sha256:00"), "docker.io/a");
    }
}
