//! A rootless podman user with native overlay storage.
//!
//! [`RootlessUser::ensure`] creates the user if needed (`useradd -m`, which
//! also assigns subuid/subgid ranges), configures native overlay
//! (`~/.config/containers/storage.conf`; the default rootless driver here is
//! vfs) and quiet engine defaults (`~/.config/containers/containers.conf`:
//! cgroupfs, file events), and runs `podman system migrate`. Commands run as
//! the user through `runuser -u NAME --` with a clean environment: `HOME`,
//! `USER`, `LOGNAME`, `PATH` only, no `XDG_RUNTIME_DIR` (podman then uses
//! `/tmp/podman-run-UID`), and the user's home as working directory.
//!
//! Keep in mind: the rootless pause process pins a mount namespace, so loop
//! mounts made after it started are invisible to the user's podman until
//! [`RootlessUser::migrate`].

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

use crate::podman::ImageRef;
use crate::{run_command, skip};

/// Name of the image [`rootless_feature_image`] builds.
pub const ROOTLESS_IMAGE_NAME: &str = "localhost/cstor-test/rootless:latest";
/// In the rootless image: a 0600 file owned by container uid/gid 1000.
pub const ROOTLESS_PRIVATE_FILE: &str = "secret.txt";
/// In the rootless image: a 0700 directory owned by container uid/gid 1000.
pub const ROOTLESS_PRIVATE_DIR: &str = "private";
/// In the rootless image: a 0644 file (container uid 1000) inside
/// [`ROOTLESS_PRIVATE_DIR`].
pub const ROOTLESS_PUBLIC_IN_PRIVATE: &str = "private/public.txt";
/// In the rootless image: ordinary files owned by container root.
pub const ROOTLESS_ORDINARY_FILES: [&str; 3] = ["etc/hostname", "etc/motd", "usr/share/data.txt"];
/// Content of [`ROOTLESS_PRIVATE_FILE`]: longer than composefs' 64-byte inline threshold, so
/// importing it makes a repository object (a reflink where the filesystem allows).
pub const ROOTLESS_SECRET: &str =
    "secret of container uid 1000, mode 0600: only the user namespace may read these bytes\n";

/// The default name of the rootless test user (used by
/// [`rootless_user_or_skip`]).
pub const DEFAULT_ROOTLESS_USER: &str = "cstortest";

/// A rootless podman user.
#[derive(Debug, Clone)]
pub struct RootlessUser {
    /// Login name.
    pub name: String,
    /// Host uid.
    pub uid: u32,
    /// Host primary gid.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
}

const STORAGE_CONF: &str = "[storage]\ndriver = \"overlay\"\n";
const CONTAINERS_CONF: &str = "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n";

impl RootlessUser {
    /// Looks up `name` in the passwd database (`getent passwd`).
    pub fn lookup(name: &str) -> Result<Option<Self>> {
        let out = Command::new("getent")
            .args(["passwd", name])
            .output()
            .with_context(|| format!("running getent passwd {name}"))?;
        if out.status.code() == Some(2) {
            return Ok(None);
        }
        if !out.status.success() {
            bail!(
                "getent passwd {name} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let line = String::from_utf8(out.stdout)
            .with_context(|| format!("passwd entry of {name} is not UTF-8"))?;
        let fields: Vec<&str> = line.trim_end().split(':').collect();
        let [_, _, uid, gid, _, home, ..] = fields[..] else {
            bail!("malformed passwd entry of {name}: {line:?}");
        };
        Ok(Some(RootlessUser {
            name: name.to_string(),
            uid: uid
                .parse()
                .with_context(|| format!("uid of {name}: {uid:?}"))?,
            gid: gid
                .parse()
                .with_context(|| format!("gid of {name}: {gid:?}"))?,
            home: PathBuf::from(home),
        }))
    }

    /// Makes `name` a ready rootless podman user (see the module
    /// documentation). Idempotent; concurrent callers (threads or
    /// processes) serialise on a lock file. Needs root.
    pub fn ensure(name: &str) -> Result<Self> {
        if !skip::have_root() {
            bail!("setting up rootless user {name} needs root");
        }
        let lock_path = std::env::temp_dir().join(format!("cstor-tests-rootless-{name}.lock"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(std::io::Error::from)
            .with_context(|| format!("locking {}", lock_path.display()))?;

        let user = match Self::lookup(name)? {
            Some(user) => user,
            None => {
                run_command(
                    Command::new("useradd").args(["-m", "-s", "/bin/sh", name]),
                    &format!("creating rootless test user {name}"),
                )?;
                Self::lookup(name)?
                    .with_context(|| format!("user {name} missing right after useradd"))?
            }
        };
        for file in ["/etc/subuid", "/etc/subgid"] {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            if !text.lines().any(|l| {
                l.split(':').next() == Some(name)
                    || l.split(':').next() == Some(&*user.uid.to_string())
            }) {
                bail!(
                    "user {name} has no range in {file}: add one (usermod --add-subuids / --add-subgids) or delete the user so that useradd recreates it"
                );
            }
        }
        let conf_dir = user.home.join(".config/containers");
        let mut changed = false;
        for (file, content) in [
            ("storage.conf", STORAGE_CONF),
            ("containers.conf", CONTAINERS_CONF),
        ] {
            let path = conf_dir.join(file);
            if std::fs::read_to_string(&path).is_ok_and(|old| old == content) {
                continue;
            }
            user.create_owned_dirs(&conf_dir)?;
            std::fs::write(&path, content)
                .with_context(|| format!("writing {}", path.display()))?;
            user.chown(&path)?;
            changed |= file == "storage.conf";
        }
        if changed {
            // Storage made with another driver would refuse to open.
            user.reset_storage()?;
        }
        user.migrate()?;
        drop(lock);
        Ok(user)
    }

    /// Creates `dir` and its missing ancestors below the home directory,
    /// owned by the user.
    fn create_owned_dirs(&self, dir: &Path) -> Result<()> {
        let rel = dir
            .strip_prefix(&self.home)
            .with_context(|| format!("{} is outside the home of {}", dir.display(), self.name))?;
        let mut path = self.home.clone();
        for c in rel.components() {
            path.push(c);
            if !path.exists() {
                std::fs::create_dir(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                self.chown(&path)?;
            }
        }
        Ok(())
    }

    /// Gives `path` to the user (uid and primary gid).
    pub fn chown(&self, path: &Path) -> Result<()> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("chown {} {}", self.name, path.display()))
    }

    /// A command running `program` as the user: `runuser -u NAME --
    /// program`, with a clean environment and the home as working
    /// directory.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let runuser =
            skip::find_tool("runuser").unwrap_or_else(|| PathBuf::from("/usr/sbin/runuser"));
        let mut cmd = Command::new(runuser);
        cmd.env_clear()
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .current_dir(&self.home)
            .args(["-u", &self.name, "--"])
            .arg(program);
        cmd
    }

    /// Runs `podman <args>` as the user; returns stdout (trailing whitespace
    /// trimmed), a failure reports stderr.
    pub fn podman<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command("podman");
        cmd.args(args);
        run_command(&mut cmd, &format!("running podman as {}", self.name))
    }

    /// A command running `podman unshare program args…` as the user: inside
    /// the user namespace, container uid 0 is the user and 1..65536 map to
    /// the subuid range.
    pub fn unshare<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command("podman");
        cmd.arg("unshare").arg(program).args(args);
        cmd
    }

    /// The user's graph root: `~/.local/share/containers/storage`.
    pub fn graphroot(&self) -> PathBuf {
        self.home.join(".local/share/containers/storage")
    }

    /// `<graphroot>/overlay/<layer_id>/diff`.
    pub fn layer_diff_dir(&self, layer_id: &str) -> PathBuf {
        self.graphroot().join("overlay").join(layer_id).join("diff")
    }

    /// The top layer id of image `image` in the user's storage, read from
    /// `overlay-images/images.json` (as root).
    pub fn top_layer(&self, image: &str) -> Result<String> {
        let id = self.podman(["image", "inspect", "--format", "{{.Id}}", image])?;
        let path = self.graphroot().join("overlay-images/images.json");
        let images = crate::podman::read_json(&path)?;
        images
            .as_array()
            .and_then(|list| {
                list.iter()
                    .find(|i| i.get("id").and_then(|v| v.as_str()) == Some(id.trim()))
            })
            .and_then(|i| i.get("layer").and_then(|l| l.as_str()))
            .map(str::to_string)
            .with_context(|| format!("image {image} ({id}) has no layer in {}", path.display()))
    }

    /// `podman system reset -f` as the user: deletes all the user's images,
    /// containers and storage.
    pub fn reset_storage(&self) -> Result<()> {
        self.podman(["system", "reset", "--force"])
            .with_context(|| format!("resetting the podman storage of {}", self.name))
            .map(drop)
    }

    /// `podman system migrate` as the user (also restarts the pause
    /// process, making new mounts visible to it).
    pub fn migrate(&self) -> Result<()> {
        self.podman(["system", "migrate"])
            .with_context(|| format!("running podman system migrate as {}", self.name))
            .map(drop)
    }
}

/// The default rootless user ([`DEFAULT_ROOTLESS_USER`]) for test `test`, or
/// `None` after reporting a skip when the machine cannot provide one (not
/// root; podman, runuser, useradd or newuidmap missing).
///
/// # Panics
///
/// When the capabilities are there but setting the user up fails.
pub fn rootless_user_or_skip(test: &str) -> Option<RootlessUser> {
    static USER: OnceLock<std::result::Result<RootlessUser, String>> = OnceLock::new();
    if !skip::require_root(test)
        || !skip::require_tools(
            test,
            &["podman", "runuser", "useradd", "newuidmap", "newgidmap"],
        )
    {
        return None;
    }
    // Once per process: `podman system migrate` restarts the pause process,
    // which should not happen under the feet of another test.
    match USER
        .get_or_init(|| RootlessUser::ensure(DEFAULT_ROOTLESS_USER).map_err(|e| format!("{e:#}")))
    {
        Ok(user) => Some(user.clone()),
        Err(e) => panic!("{test}: setting up rootless user {DEFAULT_ROOTLESS_USER}: {e}"),
    }
}

/// Builds, as `user`, the image [`ROOTLESS_IMAGE_NAME`]: a 0600 file owned
/// by container uid 1000 ([`ROOTLESS_PRIVATE_FILE`]), a 0700 directory
/// owned by container uid 1000 ([`ROOTLESS_PRIVATE_DIR`]) holding a
/// world-readable file ([`ROOTLESS_PUBLIC_IN_PRIVATE`]), and ordinary files
/// ([`ROOTLESS_ORDINARY_FILES`]). The tree is written and packed inside
/// `podman unshare`, so ownership maps into the user namespace, then
/// imported with `podman import`.
///
/// `work` is created if needed and given to the user; its ancestors must be
/// searchable by the user (a `tempfile::tempdir()` in /tmp is fine). An
/// earlier image of that name is removed first, so do not build it from two
/// tests of the same user at once.
///
/// Not in the image: an opaque directory. (Rootless overlay would mark one
/// with `user.overlay.opaque=y`; build it with `podman create`/`mount`
/// inside `podman unshare` if a test needs it.)
pub fn rootless_feature_image(user: &RootlessUser, work: &Path) -> Result<ImageRef> {
    let what = || {
        format!(
            "building the rootless image as {} in {}",
            user.name,
            work.display()
        )
    };
    std::fs::create_dir_all(work)
        .with_context(|| format!("creating {}", work.display()))
        .with_context(what)?;
    user.chown(work).with_context(what)?;
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 755 {}", work.display()))?;
    let rootfs = work.join("rootless-rootfs");
    let tar = work.join("rootless.tar");
    // Runs inside `podman unshare`: uid 0 is the user, 1000 maps to a subuid.
    let script = format!(
        r#"set -eu
r="$1"; out="$2"
rm -rf "$r" "$out"
mkdir -p "$r/etc" "$r/usr/share" "$r/{private_dir}"
echo rootless > "$r/etc/hostname"
echo "built by podman unshare" > "$r/etc/motd"
printf 'data\n%.0s' $(seq 1 100) > "$r/usr/share/data.txt"
printf '%s' '{secret}' > "$r/{private_file}"
printf 'world-readable, but inside a 0700 directory of container uid 1000 (%s)\n' "$(seq -s, 1 40)" > "$r/{public}"
chown 1000:1000 "$r/{private_file}" "$r/{private_dir}" "$r/{public}"
chmod 0600 "$r/{private_file}"
chmod 0644 "$r/{public}"
chmod 0700 "$r/{private_dir}"
tar --numeric-owner --sort=name -C "$r" -cf "$out" .
"#,
        private_dir = ROOTLESS_PRIVATE_DIR,
        private_file = ROOTLESS_PRIVATE_FILE,
        public = ROOTLESS_PUBLIC_IN_PRIVATE,
        secret = ROOTLESS_SECRET,
    );
    let mut cmd = user.unshare(
        "sh",
        [
            "-c".as_ref(),
            script.as_str().as_ref(),
            "sh".as_ref(),
            rootfs.as_os_str(),
            tar.as_os_str(),
        ] as [&OsStr; 5],
    );
    run_command(
        &mut cmd,
        "writing and packing the rootless rootfs under podman unshare",
    )
    .with_context(what)?;
    // Replace an earlier build instead of leaving it dangling.
    user.podman(["rmi", "--force", "--ignore", ROOTLESS_IMAGE_NAME])
        .with_context(what)?;
    let mut cmd = user.command("podman");
    cmd.arg("import")
        .arg("--quiet")
        .arg(&tar)
        .arg(ROOTLESS_IMAGE_NAME);
    let out = run_command(
        &mut cmd,
        &format!("importing {} as {}", tar.display(), user.name),
    )
    .with_context(what)?;
    let id = out.lines().last().unwrap_or_default().trim();
    let id = id.strip_prefix("sha256:").unwrap_or(id).to_string();
    // The rootfs belongs to subuids: remove it inside the namespace too.
    let mut cmd = user.unshare("rm", ["-rf".as_ref(), rootfs.as_os_str()] as [&OsStr; 2]);
    run_command(&mut cmd, "removing the rootless rootfs").with_context(what)?;
    Ok(ImageRef {
        name: ROOTLESS_IMAGE_NAME.to_string(),
        id,
    })
}
