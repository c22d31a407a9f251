//! The fault suite's machinery: an image worth interrupting, private stores holding it,
//! `cstor import` runs that can be killed at any moment, and the checks every fault story
//! ends with.
//!
//! The stories themselves are in `tests/tests/faults.rs`. After every fault they check the
//! same things:
//!
//! - the exit status and message of `cstor` ([`Finished`], [`assert_message_is_clear`]);
//! - no helper left ([`ProcId`], [`wait_gone`], [`helpers_serving`]);
//! - podman's locks free within seconds ([`podman_writes_within`]);
//! - every object of the repository named by its content, and composefs' own `fsck` clean
//!   ([`check_repository`]);
//! - a re-run of the import giving the clean result, equal to an import into a fresh
//!   repository ([`CleanImport`], [`Report::assert_clean`]).
//!
//! How many trials each story runs comes from the environment ([`trials`]): a short run by
//! default (CI), `CSTOR_FAULTS=full` for the full campaign (`contrib/faults.sh`), and
//! `CSTOR_FAULTS_TRIALS=N` to force a count. Random moments come from a seeded generator
//! ([`Rng`]) whose seed is printed, so a failure can be replayed with `CSTOR_FAULTS_SEED`.
//! Each story prints one `FAULTS <story>: ...` line of counts ([`Tally`]).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use composefs::fsverity::{FsVerityHashValue, FsVerityHasher, Sha256HashValue, Sha512HashValue};
use serde_json::{Value, json};

use crate::podman::{ImageRef, PodmanStore};
use crate::rootfs::XorShift;
use crate::{note, run_command};

/// `short` (the default) or `full`.
pub const MODE_ENV: &str = "CSTOR_FAULTS";
/// Forces every story's trial count.
pub const TRIALS_ENV: &str = "CSTOR_FAULTS_TRIALS";
/// Seeds the random moments (else a seed from the clock, printed).
pub const SEED_ENV: &str = "CSTOR_FAULTS_SEED";

/// Whether this is the full campaign (`CSTOR_FAULTS=full`).
pub fn full() -> bool {
    std::env::var(MODE_ENV).is_ok_and(|m| m.eq_ignore_ascii_case("full"))
}

/// The number of trials of a story: `$CSTOR_FAULTS_TRIALS` when set, else `full` in the
/// full campaign, else `short`.
pub fn trials(short: usize, full: usize) -> usize {
    if let Some(n) = std::env::var(TRIALS_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return n;
    }
    if self::full() { full } else { short }
}

/// A small seeded generator (splitmix64) for random moments and choices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// The generator of story `story`: seeded from `$CSTOR_FAULTS_SEED` (mixed with the
    /// story's name, so stories differ) or from the clock. Prints the seed.
    pub fn for_story(story: &str) -> Self {
        let base = std::env::var(SEED_ENV)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    % 1_000_000_007
            });
        note(&format!(
            "{story}: {SEED_ENV}={base} replays this run's random moments"
        ));
        let mut h = base;
        for b in story.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Rng(h)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A duration spread evenly over `lo..hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let f = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + hi.saturating_sub(lo).mul_f64(f)
    }
}

/// Outcome counts of a story, printed as one `FAULTS` line.
#[derive(Debug, Default)]
pub struct Tally {
    story: String,
    counts: BTreeMap<String, usize>,
}

impl Tally {
    /// An empty tally for `story`.
    pub fn new(story: &str) -> Self {
        Self {
            story: story.to_owned(),
            counts: BTreeMap::new(),
        }
    }

    /// Counts one `outcome`.
    pub fn add(&mut self, outcome: impl Into<String>) {
        *self.counts.entry(outcome.into()).or_default() += 1;
    }

    /// Counts `n` more of `outcome`.
    pub fn add_n(&mut self, outcome: impl Into<String>, n: usize) {
        *self.counts.entry(outcome.into()).or_default() += n;
    }

    /// Prints `FAULTS <story>: outcome=count ...` (uncaptured, see [`note`]).
    pub fn print(&self) {
        let counts: Vec<String> = self
            .counts
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        note(&format!("FAULTS {}: {}", self.story, counts.join(" ")));
    }
}

// ---------------------------------------------------------------------------------------
// The fault image.

/// Name of the fault image in every store.
pub const FAULT_IMAGE_NAME: &str = "localhost/cstor-test/faults:latest";
/// Version of the fault image's content; part of its directory name.
const FAULT_IMAGE_VERSION: u32 = 2;
/// Files in the base layer (most above composefs' 64-byte inline threshold).
const BASE_FILES: usize = 600;
/// Directories they are spread over.
const BASE_DIRS: usize = 12;

/// The fault image as an OCI layout: two layers (about 7 MB of incompressible content in
/// 750 files, two of them 1 MB, some deleted again by whiteouts and an opaque directory in
/// the top layer). Its bytes are a pure function of this code, so its image id, and the
/// repository an import makes of it, are the same in every store and every run.
#[derive(Debug, Clone)]
pub struct FaultImage {
    /// The OCI layout directory.
    pub layout: PathBuf,
    /// The image id (the config digest, hex).
    pub id: String,
}

/// The fault image, written on first use under the target directory (reused by later runs;
/// an exclusive lock makes concurrent test processes share one build).
pub fn fault_image() -> Result<&'static FaultImage> {
    static IMAGE: OnceLock<std::result::Result<FaultImage, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build_fault_image().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("building the fault image: {e}"))
}

fn build_fault_image() -> Result<FaultImage> {
    let base = crate::target_dir().join(format!("cstor-fault-image-v{FAULT_IMAGE_VERSION}"));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let lock = std::fs::File::create(base.join("lock"))
        .with_context(|| format!("creating {}/lock", base.display()))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(std::io::Error::from)
        .context("locking the fault image directory")?;
    let layout = base.join("oci");
    let marker = base.join("complete");
    if let Ok(id) = std::fs::read_to_string(&marker) {
        return Ok(FaultImage {
            layout,
            id: id.trim().to_owned(),
        });
    }
    let work = base.join("work");
    crate::remove_tree(&work)?;
    crate::remove_tree(&layout)?;
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;

    let mut layers = Vec::new();
    for (i, write) in [write_base_layer as fn(&Path) -> Result<()>, write_top_layer]
        .into_iter()
        .enumerate()
    {
        let root = work.join(format!("layer{i}"));
        write(&root).with_context(|| format!("writing layer {i} of the fault image"))?;
        let tar = work.join(format!("layer{i}.tar"));
        run_command(
            Command::new("tar")
                .args([
                    "--format=gnu",
                    "--numeric-owner",
                    "--owner=0",
                    "--group=0",
                    "--mtime=@1000000000",
                    "--sort=name",
                    "-C",
                ])
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
            "packing a layer of the fault image",
        )?;
        let bytes = std::fs::read(&tar).with_context(|| format!("reading {}", tar.display()))?;
        layers.push(put_blob(&blobs, &bytes)?);
    }
    let diff_ids: Vec<String> = layers.iter().map(|(d, _)| format!("sha256:{d}")).collect();
    let config = serde_json::to_vec(&json!({
        "created": "2001-09-09T01:46:40Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Labels": {"cstor-test": "faults"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": "2001-09-09T01:46:40Z", "created_by": "cstor-tests: fault base layer"},
            {"created": "2001-09-09T01:46:40Z", "created_by": "cstor-tests: fault top layer"},
        ],
    }))?;
    let (config_digest, config_size) = put_blob(&blobs, &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config_size,
        },
        "layers": layers.iter().map(|(d, size)| json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{d}"),
            "size": size,
        })).collect::<Vec<_>>(),
    }))?;
    let (manifest_digest, manifest_size) = put_blob(&blobs, &manifest)?;
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{manifest_digest}"),
                "size": manifest_size,
            }],
        }))?,
    )
    .context("writing index.json of the fault image")?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .context("writing oci-layout of the fault image")?;
    crate::remove_tree(&work)?;
    std::fs::write(&marker, &config_digest).context("marking the fault image complete")?;
    Ok(FaultImage {
        layout,
        id: config_digest,
    })
}

/// Stores `bytes` as a blob; returns its hex digest and size.
fn put_blob(blobs: &Path, bytes: &[u8]) -> Result<(String, usize)> {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(bytes));
    std::fs::write(blobs.join(&digest), bytes).context("writing a blob of the fault image")?;
    Ok((digest, bytes.len()))
}

/// Writes `len` pseudo-random bytes seeded by `seed` to `path`.
fn random_file(path: &Path, seed: u64, len: usize) -> Result<()> {
    let mut content = vec![0u8; len];
    XorShift::new(seed).fill(&mut content);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))
}

fn base_file(i: usize) -> PathBuf {
    PathBuf::from(format!("srv/d{:02}/f{i:04}", i % BASE_DIRS))
}

fn write_base_layer(root: &Path) -> Result<()> {
    for i in 0..BASE_FILES {
        let len = 65 + (XorShift::new(i as u64 + 7).next_u64() % 12_000) as usize;
        random_file(&root.join(base_file(i)), i as u64 + 1, len)?;
    }
    random_file(&root.join("opt/big-1"), 0xb16_0001, 1 << 20)?;
    random_file(&root.join("opt/big-2"), 0xb16_0002, 1 << 20)?;
    random_file(&root.join("usr/bin/tool"), 0x7001, 20_000)?;
    std::fs::set_permissions(
        root.join("usr/bin/tool"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    std::os::unix::fs::symlink("../srv/d00/f0000", root.join("opt/link"))?;
    std::fs::hard_link(root.join("opt/big-1"), root.join("opt/big-1.hardlink"))?;
    Ok(())
}

fn write_top_layer(root: &Path) -> Result<()> {
    for i in 0..150 {
        let len = 65 + (XorShift::new(i as u64 + 90_001).next_u64() % 8_000) as usize;
        random_file(
            &root.join(format!("srv/top/t{i:03}")),
            i as u64 + 100_000,
            len,
        )?;
    }
    random_file(&root.join("opt/big-3"), 0xb16_0003, 512 << 10)?;
    // Whiteouts of 15 base files, and d07 replaced by an opaque directory.
    for i in (0..BASE_FILES).step_by(37).filter(|i| i % BASE_DIRS != 7) {
        let f = root.join(base_file(i));
        let wh = f.with_file_name(format!(
            ".wh.{}",
            f.file_name().unwrap_or_default().to_string_lossy()
        ));
        std::fs::create_dir_all(wh.parent().unwrap_or(root))?;
        std::fs::write(&wh, b"").with_context(|| format!("writing {}", wh.display()))?;
    }
    let opaque = root.join("srv/d07");
    std::fs::create_dir_all(&opaque)?;
    std::fs::write(opaque.join(".wh..wh..opq"), b"")?;
    random_file(&opaque.join("replaced"), 0x0bad_cafe, 5_000)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Stores holding the fault image.

/// A private podman store holding the fault image under [`FAULT_IMAGE_NAME`], in a temporary
/// directory; destroyed on drop.
#[derive(Debug)]
pub struct FaultStore {
    /// The store.
    pub store: PodmanStore,
    /// The fault image in it.
    pub image: ImageRef,
    /// Scratch space of the story (repositories, scripts...).
    pub work: PathBuf,
    dir: tempfile::TempDir,
}

impl FaultStore {
    /// A fresh store with the fault image copied in (by skopeo, from the OCI layout).
    pub fn new() -> Result<Self> {
        let image = fault_image()?;
        let dir = tempfile::Builder::new()
            .prefix("cstor-faults-")
            .tempdir()
            .context("creating a temporary directory")?;
        let store = PodmanStore::new(&dir.path().join("store"))?;
        let work = dir.path().join("work");
        std::fs::create_dir(&work).context("creating the work directory")?;
        let s = Self {
            store,
            image: ImageRef {
                name: FAULT_IMAGE_NAME.to_owned(),
                id: image.id.clone(),
            },
            work,
            dir,
        };
        s.restore()?;
        Ok(s)
    }

    /// Copies the fault image (back) into the store unless it is there under its name.
    pub fn restore(&self) -> Result<()> {
        if self.store.image_exists(FAULT_IMAGE_NAME)?
            && self.store.image_id(FAULT_IMAGE_NAME)? == self.image.id
        {
            return Ok(());
        }
        let layout = &fault_image()?.layout;
        let result = run_command(
            self.store
                .skopeo()
                .args(["copy", "--quiet"])
                .arg(format!("oci:{}", layout.display()))
                .arg(self.store.storage_ref(FAULT_IMAGE_NAME)),
            "copying the fault image into a store",
        );
        self.store.settle();
        result.map(drop)
    }

    /// A new, not yet existing, repository path in the work directory.
    pub fn new_repo(&self, what: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.work.join(format!("repo-{what}-{n}"))
    }

    /// The directory everything lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for FaultStore {
    fn drop(&mut self) {
        if let Err(e) = self.store.destroy() {
            note(&format!("cstor-tests: destroying a fault store: {e:#}"));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running cstor.

/// The `cstor` and `cstor-helper` binaries under test.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `cstor`.
    pub cstor: PathBuf,
    /// `cstor-helper`.
    pub helper: PathBuf,
}

impl Binaries {
    /// The binaries of this build (see [`crate::helper_binary`]; `cstor` lies beside it).
    pub fn of_this_build() -> Result<Self> {
        let helper = crate::helper_binary()?;
        let cstor = helper.with_file_name("cstor");
        ensure!(
            cstor.is_file(),
            "{} not found: run `cargo build -p cstor-cli -p cstor-helper` first",
            cstor.display()
        );
        Ok(Self { cstor, helper })
    }

    /// `cstor --json --progress never import --helper H --root R --runroot RR
    /// --storage-conf C --init --repo REPO IMAGE`, as root against `store`.
    pub fn import(&self, store: &PodmanStore, repo: &Path, image: &str) -> Command {
        let mut cmd = Command::new(&self.cstor);
        store.apply_env(&mut cmd);
        cmd.args(["--json", "--progress", "never", "import", "--helper"])
            .arg(&self.helper)
            .arg("--root")
            .arg(&store.root)
            .arg("--runroot")
            .arg(&store.runroot)
            .arg("--storage-conf")
            .arg(&store.storage_conf)
            .args(["--init", "--repo"])
            .arg(repo)
            .arg(image)
            .stdin(Stdio::null());
        cmd
    }
}

/// A finished `cstor` run.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
}

impl Finished {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The `--json` report of a successful import.
    pub fn report(&self) -> Result<Report> {
        ensure!(
            self.status.success(),
            "the import failed ({}): {}",
            self.status,
            self.stderr.trim()
        );
        Report::parse(&self.stdout)
    }
}

/// How long [`Running::finish`] waits for a process's output to end once it has exited.
const OUTPUT_AFTER_EXIT: Duration = Duration::from_secs(30);

/// A command started with its output collected in the background, so that it can be
/// stopped, killed or waited for at any moment.
#[derive(Debug)]
pub struct Running {
    /// The process.
    pub child: Child,
    started: Instant,
    stdout: std::thread::JoinHandle<String>,
    stderr_lines: Arc<Mutex<Vec<String>>>,
    stderr: std::thread::JoinHandle<()>,
}

impl Running {
    /// Starts `cmd` with stdout and stderr piped.
    pub fn start(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", crate::describe_command(cmd)))?;
        let mut out = child.stdout.take().context("stdout pipe")?;
        let err = child.stderr.take().context("stderr pipe")?;
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let stderr_lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let lines = stderr_lines.clone();
        let stderr = std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        Ok(Self {
            child,
            started: Instant::now(),
            stdout,
            stderr_lines,
            stderr,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How long it has been running.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether it has exited (without reaping it: it stays a zombie until waited for, so
    /// its pid cannot be reused meanwhile).
    pub fn exited(&self) -> bool {
        proc_stat(self.pid()).is_none_or(|s| s.state == 'Z')
    }

    /// Whether a line of its stderr so far contains `needle`.
    pub fn stderr_has(&self, needle: &str) -> bool {
        self.stderr_lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Waits until a stderr line contains `needle` or the process exits (false), at most
    /// `bound`.
    pub fn wait_for_stderr(&self, needle: &str, bound: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < bound {
            if self.stderr_has(needle) {
                return true;
            }
            if self.exited() {
                return self.stderr_has(needle);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// Waits for it to exit, killing it (and failing) after `bound`. Fails too when its
    /// output stays open long after it exited: a process it started holds the pipes.
    pub fn finish(mut self, bound: Duration) -> Result<Finished> {
        let waited = crate::session::wait_with_timeout(&mut self.child, bound);
        let elapsed = self.started.elapsed();
        let exited = Instant::now();
        while !(self.stdout.is_finished() && self.stderr.is_finished()) {
            ensure!(
                exited.elapsed() < OUTPUT_AFTER_EXIT,
                "{:?} exited ({waited:?}) but its stdout or stderr is still open {:.0?} later: \
                 a process it started holds them",
                self.child,
                OUTPUT_AFTER_EXIT
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let stdout = self.stdout.join().unwrap_or_default();
        let _ = self.stderr.join();
        let stderr = self
            .stderr_lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n");
        let status = waited.with_context(|| format!("its stderr: {stderr}"))?;
        Ok(Finished {
            status,
            stdout,
            stderr,
            elapsed,
        })
    }

    /// `kill -9` at this very moment, and what it left running: stops the process
    /// (SIGSTOP), records its descendants (it cannot start more while stopped), kills it
    /// (SIGKILL) and reaps it. Returns the descendants, which must go by themselves.
    pub fn kill_now(mut self) -> Result<(Vec<ProcId>, Finished)> {
        let pid = self.pid();
        signal(pid, rustix::process::Signal::STOP)?;
        let start = Instant::now();
        while proc_stat(pid).is_some_and(|s| !matches!(s.state, 'T' | 't' | 'Z'))
            && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let left = descendants(pid);
        let _ = self.child.kill();
        let finished = self.finish(Duration::from_secs(30))?;
        Ok((left, finished))
    }
}

/// Runs `cmd` to the end (at most `bound`).
pub fn run(cmd: &mut Command, bound: Duration) -> Result<Finished> {
    Running::start(cmd)?.finish(bound)
}

fn signal(pid: u32, sig: rustix::process::Signal) -> Result<()> {
    let p = rustix::process::Pid::from_raw(pid as i32).context("pid 0")?;
    rustix::process::kill_process(p, sig)
        .map_err(std::io::Error::from)
        .with_context(|| format!("sending {sig:?} to {pid}"))
}

/// Sends SIGSTOP to `p` (if it is still that process).
pub fn stop(p: &ProcId) -> Result<()> {
    ensure!(p.alive(), "process {} is gone already", p.pid);
    signal(p.pid, rustix::process::Signal::STOP)
}

/// Sends SIGKILL to `p` (if it is still that process).
pub fn kill(p: &ProcId) -> Result<()> {
    ensure!(p.alive(), "process {} is gone already", p.pid);
    signal(p.pid, rustix::process::Signal::KILL)
}

/// The parts of an import's `--json` report the fault stories compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The image id.
    pub image_id: String,
    /// The manifest digest.
    pub manifest_digest: String,
    /// The manifest stream's verity.
    pub manifest_verity: String,
    /// The config stream's verity.
    pub config_verity: String,
    /// The EROFS image's object id.
    pub erofs_image: String,
    /// The tag written.
    pub tag: String,
    /// The layer streams' verities, base first.
    pub layers: Vec<String>,
}

impl Report {
    /// Parses `cstor import --json` output.
    pub fn parse(stdout: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(stdout)
            .with_context(|| format!("parsing the import report {stdout:?}"))?;
        let s = |k: &str| -> Result<String> {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .with_context(|| format!("the import report has no {k}: {v}"))
        };
        let layers = v
            .get("layers")
            .and_then(Value::as_array)
            .context("the import report has no layers")?
            .iter()
            .map(|l| {
                l.get("verity")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .context("a layer without verity")
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            image_id: s("image_id")?,
            manifest_digest: s("manifest_digest")?,
            manifest_verity: s("manifest_verity")?,
            config_verity: s("config_verity")?,
            erofs_image: s("erofs_image")?,
            tag: s("tag")?,
            layers,
        })
    }

    /// Fails unless this is the clean result.
    pub fn assert_clean(&self, clean: &Report, context: &str) {
        assert_eq!(
            self, clean,
            "{context}: the import's result differs from an undisturbed import into a fresh repository"
        );
    }
}

/// An undisturbed import of the fault image into a fresh repository: the result every
/// interrupted import must end up with once re-run, and how long an import takes here and
/// now (to spread random moments over).
#[derive(Debug, Clone)]
pub struct CleanImport {
    /// The report.
    pub report: Report,
    /// How long it took.
    pub duration: Duration,
    /// The repository it made.
    pub repo: PathBuf,
}

impl CleanImport {
    /// Imports the fault image of `store` into a fresh repository. The result must equal
    /// every other clean import of this process (the fault image is deterministic).
    pub fn measure(bins: &Binaries, store: &FaultStore) -> Result<Self> {
        static FIRST: OnceLock<Report> = OnceLock::new();
        let repo = store.new_repo("clean");
        let done = run(
            &mut bins.import(&store.store, &repo, FAULT_IMAGE_NAME),
            Duration::from_secs(300),
        )?;
        let report = done.report().context("the clean import")?;
        ensure!(
            report.image_id == store.image.id,
            "the clean import names image {}, the store holds {}",
            report.image_id,
            store.image.id
        );
        let first = FIRST.get_or_init(|| report.clone());
        ensure!(
            *first == report,
            "two clean imports of the fault image differ: {first:?} and {report:?}"
        );
        check_repository(&repo)?.assert_complete();
        Ok(Self {
            report,
            duration: done.elapsed,
            repo,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Messages.

/// Fails unless `stderr` is a clear `cstor` error: it says `cstor:`, names no panic, and
/// does not repeat itself (no two neighbouring `: `-separated parts equal, as in "writing
/// X: writing X: ...").
pub fn assert_message_is_clear(stderr: &str, context: &str) {
    assert!(
        !stderr.contains("panicked"),
        "{context}: cstor panicked: {stderr}"
    );
    let Some(line) = stderr.lines().rev().find(|l| l.starts_with("cstor: ")) else {
        panic!("{context}: no `cstor: ` error line in {stderr:?}");
    };
    let parts: Vec<&str> = line.split(": ").collect();
    for w in parts.windows(2) {
        assert!(
            w[0] != w[1],
            "{context}: the message repeats {:?}: {line}",
            w[0]
        );
    }
}

/// The `cstor: ` error line of `stderr` (the last one), or all of it.
pub fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("cstor: "))
        .unwrap_or(stderr)
}

// ---------------------------------------------------------------------------------------
// Processes.

/// A process that must not outlive the story that faulted it: SIGKILLed when dropped, if
/// it still runs. A helper left stopped by a failed story would hold its read lock on the
/// store for ever, and the store's teardown (a podman command) would wait on it.
#[derive(Debug)]
pub struct KillOnDrop(pub ProcId);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.alive() {
            let _ = kill(&self.0);
        }
    }
}

/// A process, told apart from a later one with the same pid by its start time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcId {
    /// Its pid.
    pub pid: u32,
    /// Its start time (clock ticks after boot).
    pub start: u64,
    /// Its command line, for messages.
    pub cmdline: Vec<OsString>,
}

impl ProcId {
    /// Whether this very process still runs (a zombie does not).
    pub fn alive(&self) -> bool {
        proc_stat(self.pid).is_some_and(|s| s.start == self.start && s.state != 'Z')
    }

    /// Its state letter (`R`, `S`, `T`...), while it lives.
    pub fn state(&self) -> Option<char> {
        proc_stat(self.pid)
            .filter(|s| s.start == self.start)
            .map(|s| s.state)
    }

    /// The process `pid`, if it runs.
    pub fn of(pid: u32) -> Option<Self> {
        let s = proc_stat(pid)?;
        Some(Self {
            pid,
            start: s.start,
            cmdline: cmdline(pid),
        })
    }
}

impl std::fmt::Display for ProcId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let args: Vec<String> = self
            .cmdline
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        write!(f, "{} ({})", self.pid, args.join(" "))
    }
}

struct Stat {
    state: char,
    ppid: u32,
    start: u64,
}

fn proc_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

fn cmdline(pid: u32) -> Vec<OsString> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| OsStr::from_bytes(a).to_owned())
        .collect()
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Every living descendant of `pid` (children, their children...).
pub fn descendants(pid: u32) -> Vec<ProcId> {
    let table: Vec<(u32, u32)> = all_pids()
        .into_iter()
        .filter_map(|p| proc_stat(p).filter(|s| s.state != 'Z').map(|s| (p, s.ppid)))
        .collect();
    let mut out: Vec<ProcId> = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(p, pp) in &table {
            if pp == parent
                && !out.iter().any(|o| o.pid == p)
                && let Some(id) = ProcId::of(p)
            {
                frontier.push(p);
                out.push(id);
            }
        }
    }
    out
}

/// Living processes whose command line satisfies `pred` (argv as given).
pub fn processes_where(pred: impl Fn(&[OsString]) -> bool) -> Vec<ProcId> {
    all_pids()
        .into_iter()
        .filter(|&p| p != std::process::id())
        .filter_map(|p| {
            let args = cmdline(p);
            if args.is_empty() || !pred(&args) {
                return None;
            }
            ProcId::of(p).filter(ProcId::alive)
        })
        .collect()
}

/// Living `cstor-helper` processes (argv\[0\] ending in `cstor-helper`) with `arg` among
/// their arguments: the helpers serving a store (`arg` = its root), or started from a
/// given binary (`arg` = its path).
pub fn helpers_serving(arg: &Path) -> Vec<ProcId> {
    processes_where(|args| {
        args[0].as_bytes().ends_with(b"cstor-helper") && args.iter().any(|a| Path::new(a) == arg)
    })
}

/// Waits until none of `procs` runs, at most `bound`; fails naming the survivors.
pub fn wait_gone(procs: &[ProcId], bound: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let alive: Vec<String> = procs
            .iter()
            .filter(|p| p.alive())
            .map(|p| format!("{p} [{}]", p.state().unwrap_or('?')))
            .collect();
        if alive.is_empty() {
            return Ok(());
        }
        if start.elapsed() > bound {
            bail!("still running {:.0?} later: {}", bound, alive.join("; "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until no helper serving `arg` runs (see [`helpers_serving`]), at most `bound`.
pub fn no_helper_left(arg: &Path, bound: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let left = helpers_serving(arg);
        if left.is_empty() {
            return Ok(());
        }
        if start.elapsed() > bound {
            let left: Vec<String> = left.iter().map(ToString::to_string).collect();
            bail!(
                "cstor-helper processes for {} still run {bound:.0?} later: {}",
                arg.display(),
                left.join("; ")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// podman.

/// Fails unless podman can take its write locks within `bound`: a container is created on
/// `image` (writing layers.lock and containers.lock, which a helper's read lock on a layer
/// would hold up) and removed again. `podman` makes a podman command for the store (root's
/// [`PodmanStore::podman`], or a rootless user's). Returns how long that took.
pub fn podman_writes_within(
    podman: &dyn Fn() -> Command,
    image: &str,
    bound: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    let mut create = podman();
    create.args([
        "create",
        "--pull",
        "never",
        "--network",
        "none",
        image,
        "/cstor-lock-probe",
    ]);
    let created = run(&mut create, bound).context("podman create (a write lock probe)")?;
    ensure!(
        created.status.success(),
        "podman create failed ({}): {}",
        created.status,
        created.stderr
    );
    let cid = created
        .stdout
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mut rm = podman();
    rm.args(["rm", "--force", &cid]);
    let removed = run(&mut rm, bound).context("podman rm (a write lock probe)")?;
    ensure!(
        removed.status.success(),
        "podman rm failed ({}): {}",
        removed.status,
        removed.stderr
    );
    Ok(start.elapsed())
}

/// Runs `podman rmi image` (`podman` as for [`podman_writes_within`]), which must succeed
/// within `bound`.
pub fn podman_rmi_within(
    podman: &dyn Fn() -> Command,
    image: &str,
    bound: Duration,
) -> Result<Duration> {
    let mut cmd = podman();
    cmd.args(["rmi", image]);
    let done = run(&mut cmd, bound).context("podman rmi")?;
    ensure!(
        done.status.success(),
        "podman rmi {image} failed ({}): {}",
        done.status,
        done.stderr
    );
    Ok(done.elapsed)
}

// ---------------------------------------------------------------------------------------
// The repository.

/// What a repository holds, after it was checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoState {
    /// Objects, each verified to be named by its content.
    pub objects: usize,
    /// Layer streams named (`streams/oci-layer-*`).
    pub layer_streams: usize,
    /// Entries of `streams/` in all.
    pub streams: usize,
    /// Entries of `images/`.
    pub images: usize,
    /// Tags (`streams/refs/oci/*`).
    pub tags: usize,
}

impl RepoState {
    /// Fails unless the repository holds one complete, tagged image (checked by
    /// [`check_repository`]: its names resolve and its objects verify).
    pub fn assert_complete(&self) {
        assert_eq!(self.tags, 1, "{self:?}");
        assert!(self.images >= 1, "{self:?}");
    }

    /// A short name of how far an interrupted import got: `nothing`, or which of objects,
    /// an EROFS image, layer names and a tag it left (`objects+image+layers`...).
    pub fn progress(&self) -> String {
        let parts: Vec<&str> = [
            (self.objects > 0, "objects"),
            (self.images > 0, "image"),
            (self.layer_streams > 0, "layers"),
            (self.tags > 0, "tagged"),
        ]
        .into_iter()
        .filter_map(|(has, name)| has.then_some(name))
        .collect();
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join("+")
        }
    }
}

/// Checks the repository at `repo` (if it exists): every file under `objects/` is named by
/// its fs-verity digest (recomputed here), every name under `streams/`, `images/` and the
/// tags resolves, and composefs' own `fsck` finds nothing wrong.
pub fn check_repository(repo: &Path) -> Result<RepoState> {
    if !repo.join("meta.json").exists() {
        // Killed before `--init` wrote meta.json (atomically, last): nothing else is there.
        let stray: Vec<_> = std::fs::read_dir(repo)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        ensure!(
            stray.is_empty(),
            "{} has no meta.json but holds {stray:?}",
            repo.display()
        );
        return Ok(RepoState::default());
    }
    match cstor_import::repository_algorithm(repo)
        .with_context(|| format!("reading the algorithm of {}", repo.display()))?
    {
        cstor_import::RepoAlgorithm::Sha512 => check_repository_as::<Sha512HashValue>(repo),
        cstor_import::RepoAlgorithm::Sha256 => check_repository_as::<Sha256HashValue>(repo),
    }
}

fn check_repository_as<H: FsVerityHashValue>(repo: &Path) -> Result<RepoState> {
    let mut state = RepoState::default();
    let objects = repo.join("objects");
    for dir in read_dir_sorted(&objects)? {
        let md = std::fs::symlink_metadata(&dir)?;
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        ensure!(
            md.is_dir() && name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit()),
            "objects/{name} is not an object directory"
        );
        for file in read_dir_sorted(&dir)? {
            let md = std::fs::symlink_metadata(&file)?;
            let rel = file.strip_prefix(&objects).unwrap_or(&file).to_path_buf();
            ensure!(
                md.is_file(),
                "objects/{} is not a regular file",
                rel.display()
            );
            let mut hasher = FsVerityHasher::<H, 12>::new();
            let mut f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            std::io::copy(&mut f, &mut hasher)
                .with_context(|| format!("reading {}", file.display()))?;
            hasher.flush()?;
            let actual = hasher.digest().to_object_pathname();
            ensure!(
                Path::new(&actual) == rel,
                "objects/{} holds content whose fs-verity digest is {actual}",
                rel.display()
            );
            state.objects += 1;
        }
    }
    for e in read_dir_sorted(&repo.join("streams"))? {
        let name = e
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name == "refs" {
            continue;
        }
        ensure!(
            std::fs::metadata(&e).is_ok(),
            "streams/{name} does not resolve"
        );
        state.streams += 1;
        if name.starts_with("oci-layer-") {
            state.layer_streams += 1;
        }
    }
    for e in read_dir_sorted(&repo.join("images"))? {
        ensure!(
            std::fs::metadata(&e).is_ok(),
            "{} does not resolve",
            e.display()
        );
        state.images += 1;
    }
    let tags = repo.join("streams/refs/oci");
    for e in walk_files(&tags)? {
        ensure!(
            std::fs::metadata(&e).is_ok(),
            "tag {} does not resolve",
            e.display()
        );
        state.tags += 1;
    }
    let repository = cstor_import::open_repository::<H>(repo)
        .with_context(|| format!("opening {}", repo.display()))?;
    let fsck = crate::session::runtime()
        .block_on(repository.fsck())
        .with_context(|| format!("composefs fsck of {}", repo.display()))?;
    ensure!(
        fsck.is_ok(),
        "composefs fsck of {} found problems: {fsck:?}",
        repo.display()
    );
    Ok(state)
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(d) => d
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading {}", dir.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    v.sort();
    Ok(v)
}

/// Files and symlinks below `dir` (recursively; directories themselves are not listed).
fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in read_dir_sorted(dir)? {
        if std::fs::symlink_metadata(&e)?.is_dir() {
            out.extend(walk_files(&e)?);
        } else {
            out.push(e);
        }
    }
    Ok(out)
}

/// Whether the repository at `repo` has named a layer stream, its images directory holds
/// something, or a config stream exists: the moments of the commit phase a kill aims at.
pub fn commit_phase_reached(repo: &Path, moment: CommitMoment) -> bool {
    let any = |dir: &str, prefix: &str| {
        std::fs::read_dir(repo.join(dir)).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().as_bytes().starts_with(prefix.as_bytes()))
        })
    };
    match moment {
        CommitMoment::FirstLayerName => any("streams", "oci-layer-"),
        CommitMoment::ConfigStream => any("streams", "oci-config-"),
        CommitMoment::ErofsImage => any("images", ""),
    }
}

/// A moment of the commit phase, seen from outside in the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitMoment {
    /// `streams/` gets its first layer name (after the one syncfs).
    FirstLayerName,
    /// `streams/` gets the config stream.
    ConfigStream,
    /// `images/` gets the EROFS image.
    ErofsImage,
}

impl CommitMoment {
    /// All of them.
    pub const ALL: [CommitMoment; 3] = [
        CommitMoment::FirstLayerName,
        CommitMoment::ConfigStream,
        CommitMoment::ErofsImage,
    ];

    /// A short name for counts.
    pub fn name(self) -> &'static str {
        match self {
            CommitMoment::FirstLayerName => "first-layer-name",
            CommitMoment::ConfigStream => "config-stream",
            CommitMoment::ErofsImage => "erofs-image",
        }
    }
}
