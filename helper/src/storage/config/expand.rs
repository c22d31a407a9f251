//! Path expansion as containers/storage does it for `graphroot`, `runroot` and
//! `rootless_storage_path`: a literal `$UID`, then the rules of Go's `os.ExpandEnv`, then
//! symlink resolution, with Go's lexical `filepath.Clean` where a path does not exist.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::ConfigEnv;

/// Upstream's `expandEnvPath`: literal `$UID` first, then Go `os.ExpandEnv`, then symlink
/// resolution when the path exists, else a lexical clean.
pub(super) fn expand_env_path(raw: &str, uid: u32, env: &ConfigEnv) -> PathBuf {
    let with_uid = raw.replace("$UID", &uid.to_string());
    let expanded = PathBuf::from(OsString::from_vec(go_expand_env(&with_uid, env)));
    expand_path(&expanded)
}

/// The last step of [`expand_env_path`], for paths that are built rather than configured
/// (upstream passes its defaults through the whole function, but they hold no `$`): symlinks
/// resolved when the path exists, else a lexical clean.
pub(super) fn expand_path(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| clean(path))
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
pub(super) fn clean(path: &Path) -> PathBuf {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::config::fixture::Fixture;
    use std::os::unix::fs::symlink;

    #[test]
    fn path_expansion() {
        let mut f = Fixture::per_user();
        f.set("FOO", "/foo");
        f.write(
            &f.user_conf(),
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
        f.write(&f.user_conf(), "[storage]\ngraphroot = \"$LINK\"\n");
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
}
