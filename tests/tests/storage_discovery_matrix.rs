//! Story: wherever podman looks for its storage, the helper looks too. For a matrix of
//! configurations (a system storage.conf, a per-user one in `~/.config` or
//! `$XDG_CONFIG_HOME`, one named by `CONTAINERS_STORAGE_CONF`, `rootless_storage_path` with
//! and without `$UID`/`$HOME`, `XDG_CONFIG_HOME`, `XDG_DATA_HOME` and `XDG_RUNTIME_DIR` set,
//! empty or unset, run roots in the files), run as root and as an unprivileged user,
//! `podman info` and the helper's `Initialize` name the same graph root and run root; where
//! podman refuses a configuration, the helper refuses it too.
//!
//! Each case is run as its subject with exactly its environment: podman first (it creates
//! the store the helper then opens), then `cstor-helper --stdio`. Files live in the case's
//! own directory; `/etc/containers/storage.conf` and the subject's
//! `~/.config/containers/storage.conf` are set for the case and restored afterwards, also
//! when the case fails.
//!
//! The unprivileged subject is a user of its own ([`USER`]), not the rootless user other
//! tests share: a case rewrites its per-user storage.conf and wipes its storage, so that
//! every case starts from a store podman has not used yet. (podman keeps the run root it
//! recorded when it first used a store, whatever the configuration says later.)
//!
//! podman 4.3.1 reads no storage.conf.d drop-ins, so no case has any; and no case breaks
//! the system file, which every podman on the machine reads: the unit tests of
//! `helper/src/storage/config` cover that rule. The graph driver is not what this story is
//! about: every case runs with `STORAGE_DRIVER=overlay`, the only driver the helper serves.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cstor_tests::{RootlessUser, skip};
use serde_json::Value;

/// The unprivileged user of this story.
const USER: &str = "cstordisc";
/// The system file podman reads.
const SYSTEM_CONF: &str = "/etc/containers/storage.conf";
/// Per-user graph roots from the system file's `rootless_storage_path` start with this. They
/// live in /tmp, not in the case's directory, because while the system file names them
/// every user's podman creates its own there (see [`case_file`]).
const SYSTEM_RSP_PREFIX: &str = "/tmp/cstor-discovery-rsp-";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Root,
    User,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// podman answers with a graph root and a run root.
    Roots,
    /// podman refuses the configuration.
    Refused,
}

/// One configuration. In file contents and variables, `{dir}` is the case's directory,
/// `{home}` the subject's home and `{uid}` its uid.
#[derive(Debug)]
struct Case {
    name: &'static str,
    who: Who,
    /// `/etc/containers/storage.conf` (absent when `None`). It always names root's graph
    /// and run roots besides what is given here (see [`case_file`]), unless `bare_system`.
    system: Option<&'static str>,
    /// Leave out the graph and run roots [`Case::system`] otherwise gets.
    bare_system: bool,
    /// The subject's `~/.config/containers/storage.conf` (absent when `None`; for root,
    /// left alone when `None`).
    home_file: Option<&'static str>,
    /// `{dir}/config/containers/storage.conf`; the case sets `XDG_CONFIG_HOME` to use it.
    xdg_file: Option<&'static str>,
    /// `{dir}/named.conf`, for `CONTAINERS_STORAGE_CONF={dir}/named.conf`.
    named: Option<&'static str>,
    /// Variables besides the base ones; `None` removes a base variable.
    vars: &'static [(&'static str, Option<&'static str>)],
    /// What podman does.
    outcome: Outcome,
    /// The graph root podman names, where the story pins it.
    graphroot: Option<&'static str>,
}

const CASE: Case = Case {
    name: "",
    who: Who::Root,
    system: None,
    bare_system: false,
    home_file: None,
    xdg_file: None,
    named: None,
    vars: &[],
    outcome: Outcome::Roots,
    graphroot: None,
};

const ROOTS: &str = "[storage]\ngraphroot = \"{dir}/graph\"\nrunroot = \"{dir}/run-root\"\n";
const OVERLAY: &str = "[storage]\ndriver = \"overlay\"\n";

fn cases() -> Vec<Case> {
    use Outcome::Refused;
    use Who::User;
    vec![
        // Root.
        Case {
            name: "root without any file uses the built-in roots",
            graphroot: Some("/var/lib/containers/storage"),
            ..CASE
        },
        Case {
            name: "root reads the system file",
            system: Some(ROOTS),
            bare_system: true,
            graphroot: Some("{dir}/graph"),
            ..CASE
        },
        Case {
            name: "root refuses a system file without runroot",
            system: Some("[storage]\ngraphroot = \"{dir}/graph\"\n"),
            bare_system: true,
            outcome: Refused,
            ..CASE
        },
        Case {
            name: "root refuses a system file without graphroot",
            system: Some("[storage]\nrunroot = \"{dir}/run-root\"\n"),
            bare_system: true,
            outcome: Refused,
            ..CASE
        },
        Case {
            name: "root expands $UID and variables in the system file",
            system: Some(
                "[storage]\ngraphroot = \"{dir}/graph-$UID\"\nrunroot = \"$CASE_DIR/run-${UID}x\"\n",
            ),
            bare_system: true,
            vars: &[("CASE_DIR", Some("{dir}"))],
            graphroot: Some("{dir}/graph-0"),
            ..CASE
        },
        Case {
            name: "root ignores rootless_storage_path",
            system: Some("[storage]\nrootless_storage_path = \"{dir}/rsp\"\n"),
            graphroot: Some("{dir}/sys-graph"),
            ..CASE
        },
        Case {
            name: "root reads the named file instead of the system file",
            system: Some(OVERLAY),
            named: Some(ROOTS),
            vars: &[("CONTAINERS_STORAGE_CONF", Some("{dir}/named.conf"))],
            graphroot: Some("{dir}/graph"),
            ..CASE
        },
        Case {
            name: "root refuses a named file without runroot",
            named: Some("[storage]\ngraphroot = \"{dir}/graph\"\n"),
            vars: &[("CONTAINERS_STORAGE_CONF", Some("{dir}/named.conf"))],
            outcome: Refused,
            ..CASE
        },
        Case {
            name: "root refuses a named file that does not exist",
            vars: &[("CONTAINERS_STORAGE_CONF", Some("{dir}/missing.conf"))],
            outcome: Refused,
            ..CASE
        },
        Case {
            name: "root refuses an empty CONTAINERS_STORAGE_CONF",
            vars: &[("CONTAINERS_STORAGE_CONF", Some(""))],
            outcome: Refused,
            ..CASE
        },
        Case {
            name: "root refuses a malformed named file",
            named: Some("[storage]\ngraphroot = \n"),
            vars: &[("CONTAINERS_STORAGE_CONF", Some("{dir}/named.conf"))],
            outcome: Refused,
            ..CASE
        },
        Case {
            name: "root ignores ~/.config/containers/storage.conf",
            home_file: Some(ROOTS),
            graphroot: Some("/var/lib/containers/storage"),
            ..CASE
        },
        Case {
            name: "root reads $XDG_CONFIG_HOME/containers/storage.conf before the system file",
            system: Some(OVERLAY),
            xdg_file: Some(ROOTS),
            vars: &[("XDG_CONFIG_HOME", Some("{dir}/config"))],
            graphroot: Some("{dir}/graph"),
            ..CASE
        },
        Case {
            name: "root falls back to the system file when XDG_CONFIG_HOME has none",
            system: Some(OVERLAY),
            vars: &[("XDG_CONFIG_HOME", Some("{dir}/config"))],
            graphroot: Some("{dir}/sys-graph"),
            ..CASE
        },
        Case {
            name: "root ignores XDG_DATA_HOME and XDG_RUNTIME_DIR",
            vars: &[
                ("XDG_DATA_HOME", Some("{dir}/data")),
                ("XDG_RUNTIME_DIR", Some("{dir}/run")),
            ],
            graphroot: Some("/var/lib/containers/storage"),
            ..CASE
        },
        // An unprivileged user.
        Case {
            name: "user without any file",
            who: User,
            graphroot: Some("{home}/.local/share/containers/storage"),
            ..CASE
        },
        Case {
            name: "user with a per-user file that names no path",
            who: User,
            home_file: Some(OVERLAY),
            graphroot: Some("{home}/.local/share/containers/storage"),
            ..CASE
        },
        Case {
            name: "user file names the graph root",
            who: User,
            home_file: Some("[storage]\ngraphroot = \"{dir}/graph\"\n"),
            graphroot: Some("{dir}/graph"),
            ..CASE
        },
        Case {
            name: "user file names the run root",
            who: User,
            home_file: Some("[storage]\nrunroot = \"{dir}/run-root\"\n"),
            ..CASE
        },
        Case {
            name: "user file's rootless_storage_path with $UID",
            who: User,
            home_file: Some("[storage]\nrootless_storage_path = \"{dir}/rsp-$UID\"\n"),
            graphroot: Some("{dir}/rsp-{uid}"),
            ..CASE
        },
        Case {
            name: "user file's rootless_storage_path with $HOME",
            who: User,
            home_file: Some(
                "[storage]\nrootless_storage_path = \"$HOME/.local/share/containers/rsp-${UID}\"\n",
            ),
            // Go's os.ExpandEnv sees no UID variable: only the literal $UID is replaced.
            graphroot: Some("{home}/.local/share/containers/rsp-"),
            ..CASE
        },
        Case {
            name: "user file's graphroot beats its rootless_storage_path",
            who: User,
            home_file: Some(
                "[storage]\ngraphroot = \"{dir}/graph\"\nrootless_storage_path = \"{dir}/rsp\"\n",
            ),
            graphroot: Some("{dir}/graph"),
            ..CASE
        },
        Case {
            name: "user ignores the named file's graphroot and runroot",
            who: User,
            named: Some(ROOTS),
            vars: &[("CONTAINERS_STORAGE_CONF", Some("{dir}/named.conf"))],
            graphroot: Some("{home}/.local/share/containers/storage"),
            ..CASE
        },
        Case {
            name: "user takes the named file's rootless_storage_path",
            who: User,
            named: Some(
                "[storage]\ngraphroot = \"{dir}/graph\"\nrootless_storage_path = \"{dir}/rsp-$UID\"\n",
            ),
            vars: &[("CONTAINERS_STORAGE_CONF", Some("{dir}/named.conf"))],
            graphroot: Some("{dir}/rsp-{uid}"),
            ..CASE
        },
        Case {
            name: "user ignores the named file's runroot under XDG_RUNTIME_DIR",
            who: User,
            named: Some("[storage]\nrunroot = \"{dir}/run-root\"\n"),
            vars: &[
                ("CONTAINERS_STORAGE_CONF", Some("{dir}/named.conf")),
                ("XDG_RUNTIME_DIR", Some("{dir}/run")),
            ],
            ..CASE
        },
        Case {
            name: "user refuses a named file that does not exist",
            who: User,
            vars: &[("CONTAINERS_STORAGE_CONF", Some("{dir}/missing.conf"))],
            outcome: Refused,
            ..CASE
        },
        Case {
            name: "user refuses an empty CONTAINERS_STORAGE_CONF",
            who: User,
            home_file: Some(OVERLAY),
            vars: &[("CONTAINERS_STORAGE_CONF", Some(""))],
            outcome: Refused,
            ..CASE
        },
        Case {
            name: "user refuses a malformed named file",
            who: User,
            named: Some("[storage\n"),
            vars: &[("CONTAINERS_STORAGE_CONF", Some("{dir}/named.conf"))],
            outcome: Refused,
            ..CASE
        },
        Case {
            name: "user refuses a malformed per-user file",
            who: User,
            home_file: Some("[storage]\ngraphroot = 1\n"),
            outcome: Refused,
            ..CASE
        },
        Case {
            name: "user ignores the system file's graphroot and runroot",
            who: User,
            system: Some(OVERLAY),
            graphroot: Some("{home}/.local/share/containers/storage"),
            ..CASE
        },
        Case {
            name: "user takes the system file's rootless_storage_path",
            who: User,
            system: Some("[storage]\nrootless_storage_path = \"/tmp/cstor-discovery-rsp-$UID\"\n"),
            graphroot: Some("/tmp/cstor-discovery-rsp-{uid}"),
            ..CASE
        },
        Case {
            name: "user's per-user file hides the system file's rootless_storage_path",
            who: User,
            system: Some("[storage]\nrootless_storage_path = \"/tmp/cstor-discovery-rsp-$UID\"\n"),
            home_file: Some(OVERLAY),
            graphroot: Some("{home}/.local/share/containers/storage"),
            ..CASE
        },
        Case {
            name: "user reads $XDG_CONFIG_HOME/containers/storage.conf",
            who: User,
            home_file: Some(OVERLAY),
            xdg_file: Some("[storage]\ngraphroot = \"{dir}/graph\"\n"),
            vars: &[("XDG_CONFIG_HOME", Some("{dir}/config"))],
            graphroot: Some("{dir}/graph"),
            ..CASE
        },
        Case {
            name: "user's XDG_CONFIG_HOME without a file hides ~/.config",
            who: User,
            home_file: Some("[storage]\ngraphroot = \"{dir}/graph\"\n"),
            vars: &[("XDG_CONFIG_HOME", Some("{dir}/config"))],
            graphroot: Some("{home}/.local/share/containers/storage"),
            ..CASE
        },
        Case {
            name: "user with an empty XDG_CONFIG_HOME",
            who: User,
            home_file: Some("[storage]\ngraphroot = \"{dir}/graph\"\n"),
            vars: &[("XDG_CONFIG_HOME", Some(""))],
            graphroot: Some("{dir}/graph"),
            ..CASE
        },
        Case {
            name: "user's XDG_DATA_HOME",
            who: User,
            vars: &[("XDG_DATA_HOME", Some("{dir}/data"))],
            graphroot: Some("{dir}/data/containers/storage"),
            ..CASE
        },
        Case {
            name: "user with an empty XDG_DATA_HOME",
            who: User,
            home_file: Some(OVERLAY),
            vars: &[("XDG_DATA_HOME", Some(""))],
            graphroot: Some("{home}/.local/share/containers/storage"),
            ..CASE
        },
        Case {
            name: "user's XDG_RUNTIME_DIR",
            who: User,
            home_file: Some(OVERLAY),
            vars: &[("XDG_RUNTIME_DIR", Some("{dir}/run"))],
            ..CASE
        },
        Case {
            name: "user's XDG_RUNTIME_DIR that does not exist",
            who: User,
            home_file: Some(OVERLAY),
            vars: &[("XDG_RUNTIME_DIR", Some("{dir}/missing"))],
            ..CASE
        },
        Case {
            name: "user with an empty XDG_RUNTIME_DIR",
            who: User,
            vars: &[("XDG_RUNTIME_DIR", Some(""))],
            ..CASE
        },
        Case {
            name: "user refuses an XDG_RUNTIME_DIR of another user",
            who: User,
            vars: &[("XDG_RUNTIME_DIR", Some("/tmp"))],
            outcome: Refused,
            ..CASE
        },
        Case {
            name: "user without HOME",
            who: User,
            home_file: Some(OVERLAY),
            vars: &[("HOME", None)],
            graphroot: Some("{home}/.local/share/containers/storage"),
            ..CASE
        },
        Case {
            name: "user with every XDG variable and a per-user file",
            who: User,
            xdg_file: Some("[storage]\nrootless_storage_path = \"$XDG_DATA_HOME/rsp\"\n"),
            vars: &[
                ("XDG_CONFIG_HOME", Some("{dir}/config")),
                ("XDG_DATA_HOME", Some("{dir}/data")),
                ("XDG_RUNTIME_DIR", Some("{dir}/run")),
            ],
            graphroot: Some("{dir}/data/rsp"),
            ..CASE
        },
    ]
}

/// What podman or the helper said.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Roots { graphroot: String, runroot: String },
    Refused(String),
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Roots { graphroot, runroot } => {
                write!(f, "graphroot {graphroot}, runroot {runroot}")
            }
            Answer::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

/// Who runs a case.
struct Subject {
    who: Who,
    uid: u32,
    gid: u32,
    home: PathBuf,
    user: Option<RootlessUser>,
}

impl Subject {
    fn root() -> Self {
        Subject {
            who: Who::Root,
            uid: 0,
            gid: 0,
            home: PathBuf::from("/root"),
            user: None,
        }
    }

    fn user(user: &RootlessUser) -> Self {
        Subject {
            who: Who::User,
            uid: user.uid,
            gid: user.gid,
            home: user.home.clone(),
            user: Some(user.clone()),
        }
    }

    fn base_env(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            ("HOME".to_owned(), self.home.display().to_string()),
            (
                "PATH".to_owned(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ),
            ("LANG".to_owned(), "C.UTF-8".to_owned()),
            ("STORAGE_DRIVER".to_owned(), "overlay".to_owned()),
        ];
        if let Some(u) = &self.user {
            vars.push(("USER".to_owned(), u.name.clone()));
            vars.push(("LOGNAME".to_owned(), u.name.clone()));
        }
        vars
    }

    /// `env -i VARS program`, as the subject, in its home directory.
    fn command(&self, vars: &[(String, String)], program: &Path) -> Command {
        let mut cmd = match &self.user {
            Some(u) => u.command("env"),
            None => {
                let mut c = Command::new("env");
                c.current_dir(&self.home);
                c
            }
        };
        cmd.arg("-i");
        for (k, v) in vars {
            cmd.arg(format!("{k}={v}"));
        }
        cmd.arg(program);
        cmd
    }

    /// Gives `path` to the subject.
    fn own(&self, path: &Path) {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid)).unwrap();
    }
}

/// Puts `contents` (or nothing) at `path` for the life of the guard, then restores what was
/// there, removing directories it had to create.
struct FileGuard {
    path: PathBuf,
    original: Option<Vec<u8>>,
    created_dirs: Vec<PathBuf>,
}

impl FileGuard {
    fn set(path: &Path, contents: Option<&str>, owner: Option<&Subject>) -> Self {
        let original = std::fs::read(path).ok();
        let mut created_dirs = Vec::new();
        if let Some(parent) = path.parent() {
            for dir in parent.ancestors() {
                if dir.exists() {
                    break;
                }
                created_dirs.push(dir.to_path_buf());
            }
        }
        // Outermost first.
        created_dirs.reverse();
        let guard = FileGuard {
            path: path.to_path_buf(),
            original,
            created_dirs,
        };
        match contents {
            Some(text) => {
                for dir in &guard.created_dirs {
                    std::fs::create_dir(dir).unwrap();
                    if let Some(o) = owner {
                        o.own(dir);
                    }
                }
                std::fs::write(path, text).unwrap();
                if let Some(o) = owner {
                    o.own(path);
                }
            }
            None => {
                let _ = std::fs::remove_file(path);
            }
        }
        guard
    }
}

impl Drop for FileGuard {
    fn drop(&mut self) {
        match &self.original {
            Some(bytes) => {
                if let Err(e) = std::fs::write(&self.path, bytes) {
                    eprintln!("restoring {}: {e}", self.path.display());
                }
            }
            None => {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        for dir in self.created_dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A case's file contents: placeholders filled in; a system file also names root's graph
/// and run roots (in the case's directory) unless the case is about their absence. That
/// keeps every root podman on the machine working while the case runs, and with
/// `rootless_storage_path` in /tmp every user's podman too: podman's outer process creates
/// its database there (see `helper/src/storage/config/session.rs`).
fn case_file(text: &str, dir: &Path, subject: &Subject, roots: bool) -> String {
    let filled = fill(text, dir, subject);
    if !roots {
        return filled;
    }
    let names = fill(
        "graphroot = \"{dir}/sys-graph\"\nrunroot = \"{dir}/sys-run\"\n",
        dir,
        subject,
    );
    match filled.strip_prefix("[storage]\n") {
        Some(rest) => format!("[storage]\n{names}{rest}"),
        None => format!("[storage]\n{names}{filled}"),
    }
}

fn fill(text: &str, dir: &Path, subject: &Subject) -> String {
    text.replace("{dir}", &dir.display().to_string())
        .replace("{home}", &subject.home.display().to_string())
        .replace("{uid}", &subject.uid.to_string())
}

fn podman_answer(subject: &Subject, vars: &[(String, String)]) -> Answer {
    let out = subject
        .command(vars, Path::new("podman"))
        .args([
            "info",
            "--format",
            "{{.Store.GraphRoot}}\n{{.Store.RunRoot}}",
        ])
        .output()
        .unwrap();
    // podman warns on stderr (cgroups, "/" not a shared mount): only stdout counts.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines().filter(|l| !l.trim().is_empty());
    match (out.status.success(), lines.next(), lines.next()) {
        (true, Some(g), Some(r)) => Answer::Roots {
            graphroot: g.trim().to_owned(),
            runroot: r.trim().to_owned(),
        },
        _ => Answer::Refused(last_line(&out.stderr)),
    }
}

fn helper_answer(subject: &Subject, vars: &[(String, String)], helper: &Path) -> Answer {
    let mut child = subject
        .command(vars, helper)
        .arg("--stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let request =
        r#"{"jsonrpc":"2.0","id":1,"method":"Initialize","params":{"protocol_version":"1.1"}}"#;
    let mut stdin = child.stdin.take().unwrap();
    // A helper that refuses the configuration exits before it reads.
    let _ = stdin.write_all(format!("{request}\n").as_bytes());
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // Only a refusal of the configuration counts as one; failing to open what it found
        // is a wrong answer.
        return if stderr.contains("reading storage configuration") {
            Answer::Refused(last_line(&out.stderr))
        } else {
            Answer::Roots {
                graphroot: format!("<helper failed: {}>", last_line(&out.stderr)),
                runroot: String::new(),
            }
        };
    }
    let reply: Value = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no JSON reply from the helper; stderr: {stderr}"));
    let storage = &reply["result"]["storage"];
    let field = |k: &str| {
        storage[k]
            .as_str()
            .unwrap_or_else(|| panic!("reply without storage.{k}: {reply}"))
            .to_owned()
    };
    Answer::Roots {
        graphroot: field("graphroot"),
        runroot: field("runroot"),
    }
}

fn last_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// Stops the pause processes the subject's podman left under `dir` (run-time directories
/// of the case), by the pids they recorded there.
fn stop_pause_processes(dir: &Path, uid: u32) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if entry.file_name() == "pause.pid"
                && let Some(pid) = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                && std::fs::metadata(format!("/proc/{pid}"))
                    .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == uid)
                && let Some(pid) = rustix::process::Pid::from_raw(pid)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

fn remove_system_rsp_dirs() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path
            .to_str()
            .is_some_and(|p| p.starts_with(SYSTEM_RSP_PREFIX))
        {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Runs one case; returns a description of what went wrong, if anything.
fn run_case(case: &Case, subject: &Subject, helper: &Path) -> Option<String> {
    let tmp = tempfile::Builder::new()
        .prefix("cstor-discovery-")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    subject.own(dir);
    let run = dir.join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    subject.own(&run);
    if subject.who == Who::User {
        // A store podman has not used yet: it records the run root when it first does.
        let _ = std::fs::remove_dir_all(subject.home.join(".local/share/containers"));
    }

    let mut vars = subject.base_env();
    for (k, v) in case.vars {
        vars.retain(|(name, _)| name != k);
        if let Some(v) = v {
            vars.push(((*k).to_owned(), fill(v, dir, subject)));
        }
    }
    if let Some(text) = case.named {
        let path = dir.join("named.conf");
        std::fs::write(&path, fill(text, dir, subject)).unwrap();
        subject.own(&path);
    }
    if let Some(text) = case.xdg_file {
        let conf = dir.join("config/containers");
        std::fs::create_dir_all(&conf).unwrap();
        for d in [dir.join("config"), conf.clone()] {
            subject.own(&d);
        }
        let path = conf.join("storage.conf");
        std::fs::write(&path, fill(text, dir, subject)).unwrap();
        subject.own(&path);
    } else {
        // An XDG_CONFIG_HOME podman can write to, with no storage.conf in it.
        let config = dir.join("config");
        std::fs::create_dir(&config).unwrap();
        subject.own(&config);
    }

    let home_file = subject.home.join(".config/containers/storage.conf");
    let _home_guard = match (subject.who, case.home_file) {
        (Who::Root, None) => None,
        (_, text) => Some(FileGuard::set(
            &home_file,
            text.map(|t| fill(t, dir, subject)).as_deref(),
            Some(subject),
        )),
    };
    let system = case
        .system
        .map(|t| case_file(t, dir, subject, !case.bare_system));
    let (podman, helper_says) = {
        let _system_guard = FileGuard::set(Path::new(SYSTEM_CONF), system.as_deref(), None);
        let podman = podman_answer(subject, &vars);
        let helper_says = helper_answer(subject, &vars, helper);
        (podman, helper_says)
    };
    stop_pause_processes(dir, subject.uid);
    if case.system.is_some() {
        remove_system_rsp_dirs();
    }

    let report = |what: &str| {
        Some(format!(
            "{}: {what}\n    podman: {podman}\n    helper: {helper_says}\n    environment: {vars:?}\n    system file: {system:?}\n    per-user file: {:?}, XDG_CONFIG_HOME file: {:?}, named file: {:?}",
            case.name, case.home_file, case.xdg_file, case.named
        ))
    };
    match (&podman, case.outcome) {
        (Answer::Roots { .. }, Outcome::Refused) => {
            return report("podman accepted a case it should refuse");
        }
        (Answer::Refused(_), Outcome::Roots) => {
            return report("podman refused a case it should accept");
        }
        _ => {}
    }
    if let (Answer::Roots { graphroot, .. }, Some(want)) = (&podman, case.graphroot)
        && *graphroot != fill(want, dir, subject)
    {
        return report(&format!(
            "podman's graph root is not {}",
            fill(want, dir, subject)
        ));
    }
    let agree = match (&podman, &helper_says) {
        (Answer::Refused(_), Answer::Refused(_)) => true,
        (a, b) => a == b,
    };
    if agree {
        None
    } else {
        report("the helper disagrees with podman")
    }
}

#[test]
fn the_helper_finds_the_storage_podman_uses() {
    let test = "the_helper_finds_the_storage_podman_uses";
    if !skip::require_root(test)
        || !skip::require_tools(
            test,
            &[
                "podman",
                "runuser",
                "useradd",
                "newuidmap",
                "newgidmap",
                "env",
            ],
        )
    {
        return;
    }
    // The helper runs as the user too: from a directory every user may read.
    let bin = tempfile::Builder::new()
        .prefix("cstor-discovery-bin-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(bin.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let helper = bin.path().join("cstor-helper");
    cstor_tests::copy_executable(&cstor_tests::helper_binary().unwrap(), &helper).unwrap();

    let user = RootlessUser::ensure(USER).unwrap();
    let root = Subject::root();
    let unprivileged = Subject::user(&user);

    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let subject = match case.who {
            Who::Root => &root,
            Who::User => &unprivileged,
        };
        eprintln!("case: {}", case.name);
        if let Some(failure) = run_case(case, subject, &helper) {
            eprintln!("{failure}");
            failures.push(failure);
        }
    }
    // Leave the user's storage as podman would start it.
    let _ = std::fs::remove_dir_all(unprivileged.home.join(".local/share/containers"));
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}
