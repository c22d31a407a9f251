//! Story: the fault-injection campaign that hardened the import, kept so that what it found
//! cannot come back. `cstor import` is killed with SIGKILL at random moments and in its
//! commit phase; its helper is killed, or frozen with SIGSTOP, as root and as a rootless
//! user (also before it could pass its pidfd); podman removes, prunes and re-commits the
//! image while it is imported; the repository's filesystem fills up; four imports run at
//! once into one repository; a helper answers nonsense.
//!
//! After every fault: `cstor` exits with the status and a message that say what happened;
//! no helper is left running; podman can take its write locks within seconds; every object
//! of the repository is named by its content and composefs' own fsck is clean; and a re-run
//! gives the result of an undisturbed import into a fresh repository.
//!
//! CI runs a few trials of each story. `contrib/faults.sh` runs the full campaign
//! (`CSTOR_FAULTS=full`); `CSTOR_FAULTS_TRIALS=N` forces a count, `CSTOR_FAULTS_SEED`
//! replays the random moments of a run. Each story prints a `FAULTS` line of counts.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cstor_tests::faults::{
    Binaries, CleanImport, CommitMoment, FAULT_IMAGE_NAME, FaultStore, Finished, RepoState, Rng,
    Running, Tally, assert_message_is_clear, check_repository, commit_phase_reached, descendants,
    error_line, no_helper_left, podman_rmi_within, podman_writes_within, run, trials, wait_gone,
};
use cstor_tests::skip;

/// How long a helper may outlive the client that was killed (it exits when its socket
/// closes).
const HELPER_GONE: Duration = Duration::from_secs(15);
/// How long podman may wait for its locks once the fault is over.
const LOCKS_FREE: Duration = Duration::from_secs(30);
/// An import of the fault image takes a few seconds; this only catches a hang.
const IMPORT_BOUND: Duration = Duration::from_secs(300);

struct Setup {
    bins: Binaries,
    fs: FaultStore,
    clean: CleanImport,
}

fn setup(test: &str) -> Option<Setup> {
    if !skip::require_root(test) || !skip::require_tools(test, &["podman", "skopeo", "tar"]) {
        return None;
    }
    let bins = Binaries::of_this_build().unwrap();
    let fs = FaultStore::new().unwrap();
    let clean = CleanImport::measure(&bins, &fs).unwrap();
    cstor_tests::note(&format!(
        "{test}: a clean import takes {:.2} s here and now",
        clean.duration.as_secs_f64()
    ));
    Some(Setup { bins, fs, clean })
}

impl Setup {
    fn podman(&self) -> impl Fn() -> Command + '_ {
        || self.fs.store.podman()
    }

    fn import(&self, repo: &Path) -> Command {
        self.bins.import(&self.fs.store, repo, FAULT_IMAGE_NAME)
    }

    /// The checks after a fault that left `repo` behind: no helper left, podman's locks
    /// free, the repository consistent. Returns what the repository holds.
    fn after_fault(&self, repo: &Path, context: &str) -> RepoState {
        no_helper_left(&self.fs.store.root, HELPER_GONE)
            .unwrap_or_else(|e| panic!("{context}: {e:#}"));
        podman_writes_within(&self.podman(), FAULT_IMAGE_NAME, LOCKS_FREE)
            .unwrap_or_else(|e| panic!("{context}: podman is blocked: {e:#}"));
        let state = check_repository(repo).unwrap_or_else(|e| panic!("{context}: {e:#}"));
        assert!(
            state.tags == 0 || state.images >= 1,
            "{context}: a tag without an image: {state:?}"
        );
        state
    }

    /// Re-runs the import into `repo`: it must give the clean result.
    fn rerun_is_clean(&self, repo: &Path, context: &str) {
        let done = run(&mut self.import(repo), IMPORT_BOUND).unwrap();
        let report = done
            .report()
            .unwrap_or_else(|e| panic!("{context}: the re-run failed: {e:#}"));
        report.assert_clean(&self.clean.report, context);
        check_repository(repo)
            .unwrap_or_else(|e| panic!("{context}: after the re-run: {e:#}"))
            .assert_complete();
    }

    /// A random moment within an import's duration (a little beyond, to see some finish).
    fn random_moment(&self, rng: &mut Rng) -> Duration {
        rng.between(Duration::ZERO, self.clean.duration.mul_f64(1.1))
    }
}

/// `kill -9 cstor` at `moment` of an import into `repo` (or not at all when it finished
/// first). Returns how far the import got, for the counts.
fn kill_import_at(s: &Setup, repo: &Path, moment: &dyn Fn(&Running) -> bool) -> String {
    let running = Running::start(&mut s.import(repo)).unwrap();
    while !moment(&running) && !running.exited() {
        std::thread::sleep(Duration::from_millis(1));
    }
    if running.exited() {
        let done = running.finish(IMPORT_BOUND).unwrap();
        done.report()
            .unwrap()
            .assert_clean(&s.clean.report, "an import that finished before its kill");
        return "finished-first".into();
    }
    let (left, killed) = running.kill_now().unwrap();
    if killed.status.success() {
        // It exited between the last look and the kill.
        killed
            .report()
            .unwrap()
            .assert_clean(&s.clean.report, "an import that finished before its kill");
        return "finished-first".into();
    }
    assert_eq!(killed.code(), None, "killed by SIGKILL: {killed:?}");
    // What the client started goes by itself: the helper sees its socket close.
    wait_gone(&left, HELPER_GONE).unwrap_or_else(|e| panic!("after killing cstor: {e:#}"));
    let state = s.after_fault(repo, "after killing cstor");
    state.progress()
}

#[test]
fn cstor_killed_at_random_moments_and_in_its_commit_phase() {
    let story = "cstor_killed_at_random_moments_and_in_its_commit_phase";
    let Some(s) = setup(story) else {
        return;
    };
    let mut rng = Rng::for_story(story);
    let mut tally = Tally::new(story);
    // Random moments over the whole import; sometimes twice in a row into one repository,
    // so that an import starts from what a killed one left. As many kills as asked for,
    // however many imports finish before theirs.
    let wanted = trials(3, 30);
    let mut kills = 0;
    for trial in 0.. {
        if kills >= wanted {
            break;
        }
        assert!(
            trial < 3 * wanted.max(1),
            "the imports keep finishing first"
        );
        let repo = s.fs.new_repo("killed");
        for _ in 0..1 + rng.below(2) {
            let at = s.random_moment(&mut rng);
            let outcome = kill_import_at(&s, &repo, &|r: &Running| r.elapsed() >= at);
            if outcome != "finished-first" {
                kills += 1;
            }
            tally.add(format!("random:{outcome}"));
        }
        s.rerun_is_clean(&repo, &format!("random trial {trial}"));
    }
    tally.add_n("kills", kills);
    // The commit phase: right after the layers are named, the config is written, the
    // EROFS image is named.
    for trial in 0..trials(3, 12) {
        let repo = s.fs.new_repo("commit");
        let moment = CommitMoment::ALL[rng.below(CommitMoment::ALL.len())];
        let outcome = kill_import_at(&s, &repo, &|_: &Running| {
            commit_phase_reached(&repo, moment)
        });
        if outcome != "finished-first" {
            tally.add("kills");
        }
        tally.add(format!("commit:{}:{outcome}", moment.name()));
        s.rerun_is_clean(&repo, &format!("commit trial {trial}"));
    }
    tally.print();
}

/// Makes `cstor` log when it has connected to its helper (a `-vv` line, without the rest).
const CONNECTED_LOG: (&str, &str) = ("RUST_LOG", "warn,cstor_proxy_client=debug");
/// What `cstor` logs once its helper answered `Initialize`.
const CONNECTED: &str = "connected to cstor-helper";
/// `--helper-timeout` of the stories that freeze the helper.
const HELPER_TIMEOUT: Duration = Duration::from_secs(3);

/// The helper process among `running`'s descendants whose argv\[0\] is `helper` (or ends
/// in `cstor-helper` when `helper` is `None`), waiting for it at most 30 s.
fn helper_of(running: &Running, helper: Option<&Path>) -> cstor_tests::faults::ProcId {
    let start = Instant::now();
    loop {
        let found = descendants(running.pid()).into_iter().find(|p| {
            p.cmdline.first().is_some_and(|a| match helper {
                Some(h) => Path::new(a) == h,
                None => a.to_string_lossy().ends_with("cstor-helper"),
            })
        });
        if let Some(p) = found {
            return p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30) && !running.exited(),
            "no helper process under cstor"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// What a fault done to the helper led to: `cstor`'s exit, checked. A killed helper
/// fails the import with status 5 naming its death; a frozen one is killed by the client
/// after `--helper-timeout` (plus one keepalive interval when a layer was streaming), with
/// status 5 naming the deadline. When the fault came after the helper's last answer the
/// import succeeds.
fn helper_fault_outcome(
    done: &Finished,
    frozen: bool,
    clean: &cstor_tests::faults::Report,
) -> String {
    match done.code() {
        Some(0) => {
            done.report()
                .unwrap()
                .assert_clean(clean, "an import whose helper failed late");
            "exit-0".into()
        }
        Some(5) => {
            assert_message_is_clear(&done.stderr, "helper fault");
            let line = error_line(&done.stderr);
            if frozen {
                assert!(
                    line.contains("did not answer") && line.contains("was killed"),
                    "{line}"
                );
            } else {
                assert!(line.contains("cstor-helper died"), "{line}");
            }
            "exit-5".into()
        }
        _ => panic!("a helper fault ends with status 5 (or 0 when late): {done:?}"),
    }
}

/// Runs one helper fault (SIGKILL, or SIGSTOP when `frozen`) at a random moment after the
/// handshake of an import `running`, whose helper binary is `helper`. Returns the finished
/// import, or `None` when it finished first.
fn fault_the_helper(
    running: Running,
    helper: Option<&Path>,
    frozen: bool,
    duration: Duration,
    rng: &mut Rng,
) -> Option<Finished> {
    assert!(
        running.wait_for_stderr(CONNECTED, Duration::from_secs(60)),
        "cstor never connected to its helper"
    );
    let victim = helper_of(&running, helper);
    // Whatever check fails below, the helper does not stay stopped.
    let _victim = cstor_tests::faults::KillOnDrop(victim.clone());
    // Over the part of the import after the handshake (most of it, less the process
    // starts and the commit phase, where the helper has nothing left to do).
    let at = Instant::now() + rng.between(Duration::ZERO, duration.mul_f64(0.7));
    while Instant::now() < at && !running.exited() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let hit = if frozen {
        cstor_tests::faults::stop(&victim)
    } else {
        cstor_tests::faults::kill(&victim)
    };
    if hit.is_err() {
        // Gone already: the import finished first.
        let done = running.finish(IMPORT_BOUND).unwrap();
        assert!(done.status.success(), "{done:?}");
        return None;
    }
    let faulted = Instant::now();
    let done = running.finish(IMPORT_BOUND).unwrap();
    let took = faulted.elapsed();
    // Detected within the deadline (one keepalive interval more while a layer streams);
    // the rest of the bound is slack for a loaded machine.
    let keepalive = cstor_proxy_client::HelperConfig::default().keepalive_interval;
    let bound = HELPER_TIMEOUT + keepalive + Duration::from_secs(20);
    assert!(
        took <= bound,
        "cstor took {took:?} to give up on its {} helper",
        if frozen { "stopped" } else { "killed" }
    );
    // The client killed a frozen helper: it is gone, not left stopped.
    wait_gone(&[victim], Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the faulted helper: {e:#}"));
    Some(done)
}

#[test]
fn the_helper_killed_or_frozen_mid_import_as_root() {
    let story = "the_helper_killed_or_frozen_mid_import_as_root";
    let Some(s) = setup(story) else {
        return;
    };
    let mut rng = Rng::for_story(story);
    let mut tally = Tally::new(story);
    let n = trials(2, 10);
    for trial in 0..2 * n {
        let frozen = trial % 2 == 1;
        let kind = if frozen { "sigstop" } else { "sigkill" };
        let repo = s.fs.new_repo(kind);
        let mut cmd = s.import(&repo);
        cmd.arg("--helper-timeout")
            .arg(HELPER_TIMEOUT.as_secs().to_string())
            .env(CONNECTED_LOG.0, CONNECTED_LOG.1);
        let running = Running::start(&mut cmd).unwrap();
        let Some(done) = fault_the_helper(running, None, frozen, s.clean.duration, &mut rng) else {
            tally.add(format!("{kind}:finished-first"));
            continue;
        };
        let outcome = helper_fault_outcome(&done, frozen, &s.clean.report);
        let state = s.after_fault(&repo, &format!("after a {kind} of the helper"));
        tally.add(format!("{kind}:{outcome}:{}", state.progress()));
        s.rerun_is_clean(&repo, &format!("{kind} trial {trial}"));
    }
    // podman can delete the image at once.
    podman_rmi_within(&s.podman(), FAULT_IMAGE_NAME, LOCKS_FREE).unwrap();
    tally.print();
}

/// The rootless user of these stories: their own, so that no other test's images or pause
/// process are disturbed.
const ROOTLESS_USER: &str = "cstorfaults";

#[test]
fn the_helper_killed_or_frozen_mid_import_as_a_rootless_user() {
    let story = "the_helper_killed_or_frozen_mid_import_as_a_rootless_user";
    if !skip::require_root(story)
        || !skip::require_tools(
            story,
            &[
                "podman",
                "skopeo",
                "runuser",
                "useradd",
                "newuidmap",
                "newgidmap",
            ],
        )
    {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let user = cstor_tests::RootlessUser::ensure(ROOTLESS_USER).unwrap();
    let work = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The user copies the fault image into their own storage, from a layout they can read.
    let layout = work.path().join("oci");
    cstor_tests::run_command(
        Command::new("cp")
            .arg("-r")
            .arg(&cstor_tests::faults::fault_image().unwrap().layout)
            .arg(&layout),
        "copying the fault image layout",
    )
    .unwrap();
    cstor_tests::run_command(
        Command::new("chmod").args(["-R", "a+rX"]).arg(&layout),
        "opening up the layout",
    )
    .unwrap();
    let podman = || user.command("podman");
    let _ = cstor_tests::run_command(
        podman().args(["rmi", "--force", "--ignore", FAULT_IMAGE_NAME]),
        "removing an earlier fault image",
    );
    cstor_tests::run_command(
        user.command("skopeo")
            .args(["copy", "--quiet"])
            .arg(format!("oci:{}", layout.display()))
            .arg(format!("containers-storage:{FAULT_IMAGE_NAME}")),
        "copying the fault image into the user's storage",
    )
    .unwrap();
    let (_bins, helper, cstor) = cstor_tests::session::public_binaries().unwrap();
    let repos = work.path().join("repos");
    std::fs::create_dir(&repos).unwrap();
    user.chown(&repos).unwrap();
    let import = |repo: &Path| {
        let mut cmd = user.command(&cstor);
        cmd.args(["--json", "--progress", "never", "import", "--helper"])
            .arg(&helper)
            .args(["--init", "--repo"])
            .arg(repo)
            .arg(FAULT_IMAGE_NAME);
        cmd
    };
    let clean_repo = repos.join("clean");
    let clean = run(&mut import(&clean_repo), IMPORT_BOUND).unwrap();
    let clean_report = clean.report().unwrap();
    assert_eq!(
        clean_report.image_id,
        cstor_tests::faults::fault_image().unwrap().id
    );
    check_repository(&clean_repo).unwrap().assert_complete();

    let mut rng = Rng::for_story(story);
    let mut tally = Tally::new(story);
    for trial in 0..2 * trials(1, 5) {
        let frozen = trial % 2 == 0;
        let kind = if frozen { "sigstop" } else { "sigkill" };
        let repo = repos.join(format!("{kind}-{trial}"));
        let mut cmd = import(&repo);
        cmd.arg("--helper-timeout")
            .arg(HELPER_TIMEOUT.as_secs().to_string())
            .env(CONNECTED_LOG.0, CONNECTED_LOG.1);
        let running = Running::start(&mut cmd).unwrap();
        // The real helper: the child of `podman unshare`, in the user's namespace.
        let Some(done) = fault_the_helper(running, Some(&helper), frozen, clean.elapsed, &mut rng)
        else {
            tally.add(format!("{kind}:finished-first"));
            continue;
        };
        let outcome = helper_fault_outcome(&done, frozen, &clean_report);
        // Nothing started from these binaries is left: neither the helper nor the
        // `podman unshare` that started it.
        let left = || {
            cstor_tests::faults::processes_where(|args| args.iter().any(|a| Path::new(a) == helper))
        };
        let start = Instant::now();
        while !left().is_empty() && start.elapsed() < HELPER_GONE {
            std::thread::sleep(Duration::from_millis(20));
        }
        let still: Vec<String> = left().iter().map(ToString::to_string).collect();
        assert!(still.is_empty(), "left running: {still:?}");
        podman_writes_within(&podman, FAULT_IMAGE_NAME, LOCKS_FREE).unwrap();
        let state = check_repository(&repo).unwrap();
        tally.add(format!("{kind}:{outcome}:{}", state.progress()));
        let rerun = run(&mut import(&repo), IMPORT_BOUND).unwrap();
        rerun
            .report()
            .unwrap()
            .assert_clean(&clean_report, &format!("{kind} trial {trial}"));
        check_repository(&repo).unwrap().assert_complete();
    }
    // Frozen before it could pass its pidfd: a stand-in that stops itself at once, and that
    // a hangup does not end (a frozen helper would not react to one either), never answers
    // `Initialize`. The handshake deadline (30 s, not --helper-timeout: a first
    // `podman unshare` is slow) must kill it all the same, although podman is in between.
    let stopper = work.path().join("stopped-helper");
    cstor_tests::write_script(
        &stopper,
        "#!/bin/sh\ntrap '' HUP\nkill -STOP $$\nexec sleep 600\n",
    )
    .unwrap();
    let repo = repos.join("stopped-before-initialize");
    let mut cmd = user.command(&cstor);
    cmd.args(["--json", "--progress", "never", "import", "--helper"])
        .arg(&stopper)
        .args(["--init", "--repo"])
        .arg(&repo)
        .arg(FAULT_IMAGE_NAME);
    let running = Running::start(&mut cmd).unwrap();
    let start = Instant::now();
    let stopped = loop {
        // The shell running the stand-in: `sh stopped-helper`, stopped.
        let found = descendants(running.pid()).into_iter().find(|p| {
            p.cmdline.get(1).is_some_and(|a| Path::new(a) == stopper) && p.state() == Some('T')
        });
        if let Some(p) = found {
            break p;
        }
        if running.exited() || start.elapsed() > Duration::from_secs(60) {
            panic!(
                "the stand-in never stopped: {:?}",
                running.finish(IMPORT_BOUND).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let done = running.finish(IMPORT_BOUND).unwrap();
    assert_eq!(done.code(), Some(5), "{done:?}");
    let line = error_line(&done.stderr);
    assert!(
        line.contains("did not answer Initialize") && line.contains("was killed"),
        "{line}"
    );
    wait_gone(&[stopped], HELPER_GONE)
        .unwrap_or_else(|e| panic!("a helper frozen before Initialize: {e:#}"));
    tally.add("sigstop-before-initialize:exit-5");

    podman_rmi_within(&podman, FAULT_IMAGE_NAME, LOCKS_FREE).unwrap();
    tally.print();
}

/// What podman does to the image while it is imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Race {
    /// `podman rmi IMAGE`.
    Rmi,
    /// `podman image prune --all --force`.
    Prune,
    /// `podman commit CONTAINER IMAGE`: the name moves to a new image.
    Commit,
}

/// podman changes the image under an import, at a random moment. The import either
/// completes with the clean result (of the image it resolved), or fails with a clear message
/// and leaves no tag; podman either waits for the layer the helper reads or fails cleanly.
fn podman_racing_an_import(story: &str, race: Race) {
    let Some(s) = setup(story) else {
        return;
    };
    let mut rng = Rng::for_story(story);
    let mut tally = Tally::new(story);
    let store = &s.fs.store;
    let container = (race == Race::Commit).then(|| {
        store
            .run([
                "create",
                "--pull",
                "never",
                "--network",
                "none",
                FAULT_IMAGE_NAME,
                "/cstor-commit-source",
            ])
            .unwrap()
    });
    for trial in 0..trials(3, 20) {
        s.fs.restore().unwrap();
        let repo = s.fs.new_repo("race");
        // podman starts at a random moment of the import, or up to half a second before it.
        let head_start = Duration::from_millis(500);
        let at = rng.between(Duration::ZERO, s.clean.duration.mul_f64(1.1) + head_start);
        let podman_first = at < head_start;
        let mut cmd = store.podman();
        match (race, &container) {
            (Race::Rmi, _) => cmd.args(["rmi", FAULT_IMAGE_NAME]),
            (Race::Prune, _) => cmd.args(["image", "prune", "--all", "--force"]),
            (Race::Commit, Some(c)) => cmd.args(["commit", "--quiet", c, FAULT_IMAGE_NAME]),
            (Race::Commit, None) => unreachable!(),
        };
        let (import, podman) = if podman_first {
            let podman = Running::start(&mut cmd).unwrap();
            std::thread::sleep(head_start - at);
            (Running::start(&mut s.import(&repo)).unwrap(), podman)
        } else {
            let import = Running::start(&mut s.import(&repo)).unwrap();
            std::thread::sleep(at - head_start);
            (import, Running::start(&mut cmd).unwrap())
        };
        tally.add(if podman_first {
            "podman-first"
        } else {
            "import-first"
        });
        let done = import.finish(IMPORT_BOUND).unwrap();
        // podman waited for the helper's read lock, or did not need to: either way it ends.
        let podman = podman.finish(Duration::from_secs(120)).unwrap();
        if podman.status.success() {
            tally.add("podman-ok");
        } else {
            assert!(
                !podman.stderr.trim().is_empty() && !podman.stderr.contains("panic"),
                "podman failed without a clear message: {podman:?}"
            );
            tally.add(format!(
                "podman-failed:{}",
                message_kind(podman.stderr.lines().last().unwrap_or_default())
            ));
        }
        let context = format!("{race:?} trial {trial}");
        no_helper_left(&store.root, HELPER_GONE).unwrap_or_else(|e| panic!("{context}: {e:#}"));
        let state = check_repository(&repo).unwrap_or_else(|e| panic!("{context}: {e:#}"));
        if done.status.success() {
            let report = done.report().unwrap();
            if report.image_id == s.clean.report.image_id {
                report.assert_clean(&s.clean.report, &context);
                tally.add("import-ok");
            } else {
                // The name had moved to the committed image, and was imported as such: as
                // an import of that image into a fresh repository would.
                assert_eq!(race, Race::Commit, "{report:?}");
                let fresh = s.fs.new_repo("committed");
                let again = run(
                    &mut s.bins.import(store, &fresh, &report.image_id),
                    IMPORT_BOUND,
                )
                .unwrap();
                let mut expected = again.report().unwrap();
                expected.tag = report.tag.clone();
                assert_eq!(report, expected, "{context}");
                tally.add("import-ok-of-the-new-image");
            }
            state.assert_complete();
        } else {
            assert_message_is_clear(&done.stderr, &context);
            assert_eq!(state.tags, 0, "{context}: a failed import left a tag");
            tally.add(format!("import-exit-{}", done.code().unwrap_or(-1)));
            tally.add(format!(
                "import-failed:{}",
                message_kind(error_line(&done.stderr))
            ));
        }
        // Back to the original image under its name, and podman's locks are free.
        if race == Race::Commit
            && let Ok(id) = store.image_id(FAULT_IMAGE_NAME)
            && id != s.fs.image.id
        {
            // The name back to the original first: removing the committed image alone then
            // leaves its parent (and the container on it) alone.
            store.tag(&s.fs.image.id, FAULT_IMAGE_NAME).unwrap();
            store.run(["rmi", &id]).unwrap();
        }
        s.fs.restore().unwrap();
        podman_writes_within(&s.podman(), FAULT_IMAGE_NAME, LOCKS_FREE)
            .unwrap_or_else(|e| panic!("{context}: {e:#}"));
        if !done.status.success() {
            s.rerun_is_clean(&repo, &context);
        }
    }
    if let Some(c) = container {
        store.run(["rm", "--force", &c]).unwrap();
    }
    tally.print();
}

/// A short, stable name for an error message: its first words, without digests, paths,
/// numbers and quotes, and without the "importing IMAGE into REPO" every import error starts
/// with.
fn message_kind(line: &str) -> String {
    let line = line.trim_start_matches("cstor: ");
    let line = match line.split_once(": ") {
        Some((head, rest)) if head.starts_with("importing ") => rest,
        _ => line,
    };
    let words: Vec<&str> = line
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-'))
        .take(6)
        .collect();
    words.join("-")
}

#[test]
fn podman_rmi_racing_an_import() {
    podman_racing_an_import("podman_rmi_racing_an_import", Race::Rmi);
}

#[test]
fn podman_image_prune_racing_an_import() {
    podman_racing_an_import("podman_image_prune_racing_an_import", Race::Prune);
}

#[test]
fn podman_commit_racing_an_import() {
    podman_racing_an_import("podman_commit_racing_an_import", Race::Commit);
}

/// A tmpfs mounted for a story; unmounted on drop.
struct Tmpfs {
    path: std::path::PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, bytes: u64) -> Self {
        std::fs::create_dir_all(path).unwrap();
        cstor_tests::run_command(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={bytes},mode=0755"))
                .arg("tmpfs")
                .arg(path),
            "mounting a tmpfs",
        )
        .unwrap();
        Self {
            path: path.to_owned(),
        }
    }

    /// Bytes free.
    fn free(&self) -> u64 {
        let st = rustix::fs::statvfs(&self.path).unwrap();
        st.f_bavail * st.f_frsize
    }

    /// Fills the filesystem until `left` bytes are free (a file `filler`).
    fn fill_until(&self, left: u64) {
        let f = std::fs::File::create(self.path.join("filler")).unwrap();
        let len = self.free().saturating_sub(left);
        if len > 0 {
            rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, len).unwrap();
        }
    }

    fn unfill(&self) {
        let _ = std::fs::remove_file(self.path.join("filler"));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(e) = cstor_tests::unmount_all_under(&self.path) {
            cstor_tests::note(&format!("unmounting {}: {e:#}", self.path.display()));
        }
    }
}

#[test]
fn a_full_disk_fails_the_import_clearly_and_a_rerun_after_freeing_space_succeeds() {
    let story = "a_full_disk_fails_the_import_clearly_and_a_rerun_after_freeing_space_succeeds";
    if !skip::require_tools(story, &["mount", "umount"]) {
        return;
    }
    let Some(s) = setup(story) else {
        return;
    };
    let mut tally = Tally::new(story);
    // How much room an import takes on a tmpfs, and how big its EROFS image is.
    let fs = Tmpfs::mount(&s.fs.dir().join("small-fs"), 64 << 20);
    let empty = fs.free();
    let repo = fs.path.join("repo");
    run(&mut s.import(&repo), IMPORT_BOUND)
        .unwrap()
        .report()
        .unwrap();
    let needed = empty - fs.free();
    let erofs = std::fs::metadata(repo.join("images").join(&s.clean.report.erofs_image))
        .unwrap()
        .len();
    std::fs::remove_dir_all(&repo).unwrap();
    drop(fs);
    // The repository on a small tmpfs (20 MB for the fault image), filled with a file until
    // some of what the import needs is left: a part of its objects, or all but the end of
    // its EROFS image.
    let fs = Tmpfs::mount(&s.fs.dir().join("full-fs"), (needed * 2).max(20 << 20));
    let mut room: Vec<u64> = if cstor_tests::faults::full() {
        (0..10).map(|i| needed * (2 * i + 1) / 20).collect()
    } else {
        vec![needed / 2]
    };
    room.push(needed - erofs / 2 - (16 << 10));
    room.extend(
        cstor_tests::faults::full()
            .then_some([needed - erofs - (8 << 10), needed - (16 << 10)])
            .into_iter()
            .flatten(),
    );
    let n = trials(room.len(), room.len()).min(room.len()).max(1);
    let mut failures = 0;
    for (trial, &left) in room.iter().take(n).enumerate() {
        let repo = fs.path.join(format!("repo-{trial}"));
        fs.fill_until(left);
        let done = run(&mut s.import(&repo), IMPORT_BOUND).unwrap();
        let context = format!("{left} of the {needed} bytes an import needs left free");
        if done.status.success() {
            // The estimate was generous: it fitted.
            done.report()
                .unwrap()
                .assert_clean(&s.clean.report, &context);
            tally.add("fitted");
        } else {
            assert_eq!(done.code(), Some(1), "{context}: {done:?}");
            assert_message_is_clear(&done.stderr, &context);
            let line = error_line(&done.stderr);
            assert!(
                line.contains("No space left on device"),
                "{context}: {line}"
            );
            // The part before the system's error says what was being written.
            let parts: Vec<&str> = line.split(": ").collect();
            let at = parts
                .iter()
                .position(|p| p.contains("No space left on device"))
                .unwrap();
            assert!(
                at >= 3 && !parts[at - 1].starts_with("importing "),
                "{context}: the message does not say what was being written: {line}"
            );
            tally.add(format!("enospc:{}", message_kind(parts[at - 1])));
            failures += 1;
        }
        let state = s.after_fault(&repo, &context);
        assert!(
            done.status.success() || state.tags == 0,
            "{context}: {state:?}"
        );
        // Space again: the import completes.
        fs.unfill();
        s.rerun_is_clean(&repo, &context);
        std::fs::remove_dir_all(&repo).unwrap();
    }
    assert!(failures > 0, "no import ran out of space: {tally:?}");
    tally.print();
}

#[test]
fn four_imports_at_once_into_one_repository() {
    let story = "four_imports_at_once_into_one_repository";
    let Some(s) = setup(story) else {
        return;
    };
    let mut tally = Tally::new(story);
    for round in 0..trials(1, 5) {
        // Into an existing repository, and into one that all four create at once.
        for exists in [true, false] {
            let repo = s.fs.new_repo("concurrent");
            if exists {
                cstor_import::init_repository(&repo).unwrap();
            }
            let imports: Vec<Running> = (0..4)
                .map(|_| Running::start(&mut s.import(&repo)).unwrap())
                .collect();
            let context = format!("round {round}, repository existed: {exists}");
            for import in imports {
                let done = import.finish(IMPORT_BOUND).unwrap();
                let report = done.report().unwrap_or_else(|e| panic!("{context}: {e:#}"));
                report.assert_clean(&s.clean.report, &context);
            }
            no_helper_left(&s.fs.store.root, HELPER_GONE).unwrap();
            check_repository(&repo)
                .unwrap_or_else(|e| panic!("{context}: {e:#}"))
                .assert_complete();
            tally.add(if exists { "existing:ok" } else { "created:ok" });
        }
    }
    tally.print();
}

/// `--helper-timeout` for the lying helper. Its first answer (to `Initialize`) counts against
/// the deadline too, and a Python interpreter started beside a loaded CI run's other tests
/// can take seconds to get there: with the 3 s of the other stories, a slow start was
/// reported as "did not answer Initialize" instead of the lie the story is about.
const LYING_HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// A stand-in for `cstor-helper` that answers `Initialize` as the real one does, and then
/// misbehaves as its `--storage-opt` says.
const LYING_HELPER: &str = r#"#!/usr/bin/env python3
import hashlib, json, os, socket, sys
mode = sys.argv[sys.argv.index("--storage-opt") + 1]
sock = socket.socket(fileno=0)
init = {"protocol_version": "1.1", "helper_version": "0.1.0",
        "capabilities": ["layer-stream-v1", "leases"],
        "storage": {"driver": "overlay", "graphroot": "/nowhere", "runroot": "/nowhere",
                    "additional_image_stores": [], "rootless": False, "config_files": []},
        "limits": {"max_fds_per_message": 200, "max_fds_queued": 512,
                   "lease_timeout_ms": 120000, "max_open_layers": 64,
                   "max_request_bytes": 65536, "max_requests_in_flight": 64}}
def blob(doc, media_type):
    content = json.dumps(doc)
    return {"digest": "sha256:" + hashlib.sha256(content.encode()).hexdigest(),
            "media_type": media_type, "size": len(content.encode()), "content": content}
# An image that passes every check the client makes before it reads a layer: one layer, an
# empty tar (its two end-of-archive blocks), named alike by the config and the chain.
empty_tar = bytes(1024)
diff_id = "sha256:" + hashlib.sha256(empty_tar).hexdigest()
layer = {"id": diff_id[len("sha256:"):], "diff_id": diff_id, "diff_size": len(empty_tar),
         "tar_split": True, "store": "/nowhere"}
config = blob({"architecture": "amd64", "os": "linux",
               "rootfs": {"type": "layers", "diff_ids": [diff_id]}},
              "application/vnd.oci.image.config.v1+json")
manifest = blob({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "config": {"mediaType": config["media_type"], "digest": config["digest"],
                            "size": config["size"]},
                 "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                             "digest": diff_id, "size": len(empty_tar)}]},
                "application/vnd.oci.image.manifest.v1+json")
image = {"id": config["digest"][len("sha256:"):], "names": ["localhost/lying:latest"],
         "store": "/nowhere", "manifest": manifest, "config": config, "layers": [layer]}
# Write ends of layer streams, held open for as long as the fake lives: the client sees
# neither a byte nor an end.
never_written = []
def send(v, fds=()):
    data = v if isinstance(v, bytes) else json.dumps(v).encode()
    if fds:
        data = data[socket.send_fds(sock, [data], fds):]
    sock.sendall(data)
def reply(req, fds=(), **kw):
    msg = dict({"jsonrpc": "2.0", "id": req["id"]}, **kw)
    if fds:
        msg["fds"] = len(fds)
    send(msg, fds)
def handle(req):
    if req.get("method") == "Initialize":
        if mode == "not-json":
            send(b"}} this is not JSON {{\n")
        elif mode == "wrong-shape":
            reply(req, result={"hello": "world"})
        else:
            reply(req, result=init)
    elif mode == "fds-never-sent":
        send({"jsonrpc": "2.0", "id": req["id"], "result": {}, "fds": 2})
    elif mode == "unknown-id":
        send({"jsonrpc": "2.0", "id": req["id"] + 1000, "result": {}})
    elif mode == "huge-reply":
        reply(req, result={"padding": "x" * (65 << 20)})
    elif mode == "cut-mid-reply":
        send(b'{"jsonrpc": "2.0", "id": %d, "result": {"ima' % req["id"])
        os._exit(0)
    elif mode == "stream-never-written":
        # A helper frozen right after it handed out a layer's stream, before the stream's
        # first byte: every answer up to then is right, and nothing comes after it (no
        # FetchFds, no KeepAlive). Unlike a stopped process, it still goes away when the
        # client closes the socket, so a client that hangs leaves nothing behind.
        if req.get("method") == "GetImage":
            reply(req, result=image)
        elif req.get("method") == "GetLayer":
            stream, w = os.pipe()
            never_written.append(w)
            reply(req, fds=[stream], result={
                "handle": 1, "layer": layer,
                "stream": {"format": "cstor-layer-stream", "version": 1, "fd": 0}})
            os.close(stream)
buf, dec = "", json.JSONDecoder()
while True:
    data = sock.recv(65536)
    if not data:
        sys.exit(0)
    buf += data.decode()
    while True:
        s = buf.lstrip()
        try:
            req, end = dec.raw_decode(s)
        except ValueError:
            break
        buf = s[end:]
        handle(req)
"#;

#[test]
fn a_helper_that_answers_garbage_is_given_up_on_clearly() {
    let story = "a_helper_that_answers_garbage_is_given_up_on_clearly";
    if !skip::require_tools(story, &["python3"]) {
        return;
    }
    let bins = Binaries::of_this_build().unwrap();
    let work = tempfile::tempdir().unwrap();
    let fake = work.path().join("lying-helper");
    cstor_tests::write_script(&fake, LYING_HELPER).unwrap();
    let mut tally = Tally::new(story);
    // What cstor must say: the helper is the problem (status 5), or its reply did not make
    // sense (status 1); within the reply deadline, and never by hanging.
    // A reply the client cannot read breaks the connection: the message says why (not
    // that the helper closed it), and the helper, still running, is killed.
    let broke = [
        "reading from the helper",
        "was still running, and was killed",
    ];
    for (mode, status, says) in [
        ("not-json", 5, &[&broke[..], &["JSON"]].concat()),
        ("wrong-shape", 1, &vec!["unexpected reply to Initialize"]),
        (
            "fds-never-sent",
            5,
            &vec!["did not answer GetImage", "was killed"],
        ),
        (
            "unknown-id",
            5,
            &vec!["did not answer GetImage", "was killed"],
        ),
        ("huge-reply", 5, &[&broke[..], &["larger than"]].concat()),
        (
            "cut-mid-reply",
            5,
            &vec!["cstor-helper died while answering GetImage: exit status: 0"],
        ),
        // A layer's stream that never starts must not stop the clock: the layer's keepalive
        // goes unanswered, and the helper is killed for it. (An import that read the
        // stream's first bytes where it took the stream, on the runtime's only thread,
        // waited for them for ever, deaf to its own deadlines.)
        (
            "stream-never-written",
            5,
            &vec!["did not answer KeepAlive", "was killed"],
        ),
    ] {
        let repo = work.path().join(format!("repo-{mode}"));
        let mut cmd = Command::new(&bins.cstor);
        cmd.args([
            "--json",
            "--progress",
            "never",
            "import",
            "--privilege",
            "direct",
        ])
        .arg("--helper")
        .arg(&fake)
        .arg("--helper-timeout")
        .arg(LYING_HELPER_TIMEOUT.as_secs().to_string())
        .args(["--root", "/nowhere", "--init", "--repo"])
        .arg(&repo)
        // The fake takes its mode where the real helper takes more storage options.
        .args(["--storage-opt", mode, FAULT_IMAGE_NAME]);
        let done = run(&mut cmd, Duration::from_secs(120)).unwrap();
        let context = format!("a helper answering {mode}");
        assert_eq!(done.code(), Some(status), "{context}: {done:?}");
        assert_message_is_clear(&done.stderr, &context);
        let line = error_line(&done.stderr);
        for says in says {
            assert!(line.contains(says), "{context}: {line}");
        }
        // One keepalive interval more when the silence comes while a layer is open.
        let keepalive = cstor_proxy_client::HelperConfig::default().keepalive_interval;
        assert!(
            done.elapsed < LYING_HELPER_TIMEOUT + keepalive + Duration::from_secs(20),
            "{context}: took {:?}",
            done.elapsed
        );
        let left = cstor_tests::faults::processes_where(|a| a.iter().any(|x| Path::new(x) == fake));
        wait_gone(&left, HELPER_GONE).unwrap_or_else(|e| panic!("{context}: {e:#}"));
        assert_eq!(check_repository(&repo).unwrap().objects, 0);
        tally.add(format!("{mode}:exit-{status}"));
    }
    tally.print();
}
