//! The store selector of `containers-storage:` references.
//!
//! `containers-storage:[overlay@/var/lib/x+/run/x:opt1,opt2]IMAGE` names an image in a given
//! store. A client spawns its helper for that store; the helper accepts the same form when it
//! names the storage it serves.

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

/// Splits an optional `containers-storage:` prefix and `[...]` store selector from a
/// reference; returns the selector and the image part.
///
/// Fails with a message when the selector is malformed (no closing `]`, relative roots, an
/// empty driver or nothing after it).
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
}
