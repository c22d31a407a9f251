//! The store selector of `containers-storage:` references, and the other transports'
//! prefixes, which are refused by name.
//!
//! `containers-storage:[overlay@/var/lib/x+/run/x:opt1,opt2]IMAGE` names an image in a given
//! store. A client spawns its helper for that store; the helper accepts the same form when it
//! names the storage it serves.
//!
//! References in the other transports of containers/image (`docker://busybox`,
//! `oci:DIR`...) name images elsewhere: they are refused with "unsupported transport"
//! rather than read as a short name of containers-storage and reported as an invalid name.

use std::path::PathBuf;

/// The `[driver@graphroot+runroot:options]` part of a reference.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreSpec {
    /// Graph driver name.
    pub driver: Option<String>,
    /// Graph root.
    pub graphroot: Option<PathBuf>,
    /// Run root.
    pub runroot: Option<PathBuf>,
    /// Driver options (comma-separated in the reference).
    pub options: Vec<String>,
}

/// Transports of containers/image other than `containers-storage`, as skopeo and podman
/// spell them before the first `:`.
pub const OTHER_TRANSPORTS: &[&str] = &[
    "docker",
    "docker-archive",
    "docker-daemon",
    "oci",
    "oci-archive",
    "dir",
    "ostree",
    "sif",
    "tarball",
];

/// The transport `input` names, if it is one of [`OTHER_TRANSPORTS`] (or any `name://`).
///
/// A name such as `oci:latest` is an image called `oci` in containers-storage only when
/// written `containers-storage:oci:latest`: as in skopeo, the transport prefix wins.
///
/// ```
/// use cstor_protocol::reference::other_transport;
/// assert_eq!(other_transport("docker://busybox"), Some("docker"));
/// assert_eq!(other_transport("oci:/tmp/dir"), Some("oci"));
/// assert_eq!(other_transport("busybox:latest"), None);
/// assert_eq!(other_transport("localhost:5000/busybox"), None);
/// assert_eq!(other_transport("containers-storage:busybox"), None);
/// ```
pub fn other_transport(input: &str) -> Option<&str> {
    let s = input.trim();
    let (scheme, rest) = s.split_once(':')?;
    if rest.starts_with("//") && !scheme.is_empty() && !scheme.contains('/') {
        return Some(scheme);
    }
    OTHER_TRANSPORTS.iter().copied().find(|t| *t == scheme)
}

/// Splits an optional `containers-storage:` prefix and `[...]` store selector from a
/// reference; returns the selector and the image part.
///
/// Fails with a message when the reference names another transport ([`other_transport`]) or
/// the selector is malformed (no closing `]`, relative roots, an empty driver or nothing
/// after it).
///
/// ```
/// use cstor_protocol::reference::split_store;
/// let (spec, image) = split_store("containers-storage:[overlay@/g+/r]busybox").unwrap();
/// let spec = spec.unwrap();
/// assert_eq!(spec.driver.as_deref(), Some("overlay"));
/// assert_eq!(spec.graphroot.unwrap(), std::path::Path::new("/g"));
/// assert_eq!(image, "busybox");
/// assert_eq!(split_store("quay.io/a/b:1").unwrap(), (None, "quay.io/a/b:1"));
/// ```
pub fn split_store(input: &str) -> Result<(Option<StoreSpec>, &str), String> {
    if let Some(t) = other_transport(input) {
        return Err(format!(
            "unsupported transport \"{t}:\": only containers-storage images can be read"
        ));
    }
    let s = input.trim();
    let s = s.strip_prefix("containers-storage:").unwrap_or(s);
    let Some(rest) = s.strip_prefix('[') else {
        return Ok((None, s));
    };
    let (inner, image) = rest
        .split_once(']')
        .ok_or_else(|| "'[' without a closing ']'".to_owned())?;
    let mut spec = StoreSpec::default();
    let mut roots = inner;
    if let Some((driver, r)) = roots.split_once('@') {
        if driver.is_empty() {
            return Err("empty driver name before '@'".into());
        }
        spec.driver = Some(driver.to_owned());
        roots = r;
    }
    // Options follow the first ':' after the roots, as c/image splits them.
    if let Some((r, opts)) = roots.split_once(':') {
        spec.options = opts
            .split(',')
            .filter(|o| !o.is_empty())
            .map(str::to_owned)
            .collect();
        roots = r;
    }
    let (graph, run) = match roots.split_once('+') {
        Some((g, r)) => (g, Some(r)),
        None => (roots, None),
    };
    for (what, p) in [("graph root", Some(graph)), ("run root", run)] {
        if let Some(p) = p
            && !p.is_empty()
            && !p.starts_with('/')
        {
            return Err(format!("{what} {p:?} is not an absolute path"));
        }
    }
    spec.graphroot = Some(graph).filter(|g| !g.is_empty()).map(PathBuf::from);
    spec.runroot = run.filter(|r| !r.is_empty()).map(PathBuf::from);
    if image.is_empty() {
        return Err("no image after the store selector".into());
    }
    Ok((Some(spec), image))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let (s, i) = split_store("[overlay@/g+/r:overlay.mount_program=/x,a=b]busybox").unwrap();
        let s = s.unwrap();
        assert_eq!(s.runroot.unwrap(), PathBuf::from("/r"));
        assert_eq!(s.options, vec!["overlay.mount_program=/x", "a=b"]);
        assert_eq!(i, "busybox");
        let (s, _) = split_store("[/only/graph]x").unwrap();
        assert_eq!(s.unwrap().graphroot.unwrap(), PathBuf::from("/only/graph"));
        for bad in [
            "[overlay@relative+/r]x",
            "[overlay@/g",
            "[overlay@/g]",
            "[@/g]x",
        ] {
            assert!(split_store(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn other_transports_are_refused_by_name() {
        for (r, t) in [
            ("docker://busybox", "docker"),
            ("oci:/tmp/x:tag", "oci"),
            ("oci-archive:/tmp/x.tar", "oci-archive"),
            ("docker-daemon:busybox:latest", "docker-daemon"),
            ("dir:/tmp/x", "dir"),
        ] {
            let e = split_store(r).unwrap_err();
            assert!(
                e.contains("unsupported transport") && e.contains(t),
                "{r}: {e}"
            );
        }
        for ok in [
            "busybox",
            "busybox:latest",
            "localhost:5000/a/b:1",
            "containers-storage:oci:latest",
            "docker.io/library/busybox",
        ] {
            assert!(split_store(ok).is_ok(), "{ok}");
        }
    }
}
