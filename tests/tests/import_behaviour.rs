//! Story: importing behaves the way bootc and a human at a terminal need: progress with
//! totals up front, layers already present skipped without being read, a reflink-only policy
//! that refuses to copy, no podman needed as root, and a repository that never holds a
//! partial layer or image under a final name, however the import is killed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use composefs::progress::{ProgressEvent, ProgressReporter, ProgressUnit};

use composefs::fsverity::Sha512HashValue;
use cstor_import::{self as import, CopyPolicy, ImportEvent, ImportOptions};
use cstor_proxy_client::{Client, Error};
use cstor_tests::session::{helper_config, runtime};
use cstor_tests::{ImageRef, PodmanStore, skip, standard_images_or_skip};

/// A composefs progress renderer that keeps what it is told.
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<ProgressEvent>>);

impl Recorder {
    fn take(&self) -> Vec<ProgressEvent> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

impl ProgressReporter for Recorder {
    fn report(&self, event: ProgressEvent) {
        self.0.lock().unwrap().push(event);
    }
}

#[test]
fn progress_has_totals_up_front_and_present_layers_are_skipped() {
    let test = "progress_has_totals_up_front_and_present_layers_are_skipped";
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    import::init_repository(work.path()).unwrap();
    let repo = import::open_repository::<Sha512HashValue>(work.path()).unwrap();
    let mut config = helper_config(&images.store).unwrap();
    // As root no podman is needed: a missing podman binary must not matter.
    config.podman = "/nonexistent/podman".into();
    config.privilege = cstor_proxy_client::Privilege::Auto;
    runtime().block_on(async {
        let client = Client::spawn(&config).await.unwrap();
        // The base layer first (features), then the commit image on top of it.
        import::import_image(
            &client,
            &repo,
            &images.features.name,
            &ImportOptions::default(),
        )
        .await
        .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // bootc renders composefs' own progress events: it gets them too.
        let reporter = Arc::new(Recorder::default());
        let options = ImportOptions::new().events(tx).progress(reporter.clone());
        let report = import::import_image(&client, &repo, &images.commit.name, &options)
            .await
            .unwrap();
        drop(options);
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            events.push(e);
        }
        let composefs_events = reporter.take();
        let base_id = report.layers[0].diff_id.as_str();
        let top_id = report.layers[1].diff_id.as_str();
        assert!(
            matches!(&composefs_events[0], ProgressEvent::Skipped { id } if id.as_str() == base_id),
            "{composefs_events:?}"
        );
        assert!(
            matches!(&composefs_events[1], ProgressEvent::Started { id, total: Some(t), unit: ProgressUnit::Bytes }
                if id.as_str() == top_id && *t == report.layers[1].bytes),
            "{composefs_events:?}"
        );
        assert!(composefs_events.iter().any(|e| matches!(e,
            ProgressEvent::Done { id, transferred } if id.as_str() == top_id && *transferred == report.layers[1].bytes)));
        assert!(composefs_events.iter().any(|e| matches!(e,
            ProgressEvent::Progress { id, .. } if id.as_str() == top_id)));
        let base = &report.layers[0];
        let top = &report.layers[1];
        assert!(base.skipped && !top.skipped);
        assert_eq!(base.stats, import::ObjectStats::default());
        match &events[0] {
            ImportEvent::Started {
                layers,
                layers_present,
                bytes,
                bytes_present,
                ..
            } => {
                assert_eq!((*layers, *layers_present), (2, 1));
                assert_eq!(*bytes, base.bytes + top.bytes);
                assert_eq!(*bytes_present, base.bytes);
            }
            other => panic!("first event: {other:?}"),
        }
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| match e {
                ImportEvent::Started { .. } => "started",
                ImportEvent::LayerStarted { .. } => "layer-started",
                ImportEvent::LayerProgress { .. } => "layer-progress",
                ImportEvent::LayerDone { .. } => "layer-done",
                ImportEvent::LayerSkipped { .. } => "layer-skipped",
                ImportEvent::Finalizing => "finalizing",
                ImportEvent::Finished => "finished",
                _ => "other",
            })
            .filter(|k| *k != "layer-progress")
            .collect();
        assert_eq!(
            kinds,
            [
                "started",
                "layer-skipped",
                "layer-started",
                "layer-done",
                "finalizing",
                "finished"
            ]
        );
        assert!(events.iter().any(|e| matches!(e,
            ImportEvent::LayerDone { index: 1, bytes, .. } if *bytes == top.bytes)));

        // Importing again reads no layer at all.
        let again = import::import_image(
            &client,
            &repo,
            &images.commit.name,
            &ImportOptions::default(),
        )
        .await
        .unwrap();
        assert!(again.already_complete);
        assert!(again.layers.iter().all(|l| l.skipped));
        assert_eq!(again.erofs_image, report.erofs_image);
        client.shutdown().await.unwrap();
    });
}

#[test]
fn reflink_only_refuses_to_copy() {
    let test = "reflink_only_refuses_to_copy";
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    // The fixture store and this repository live on ext4 (or at least not on a reflink
    // filesystem shared with the store).
    let work = tempfile::tempdir().unwrap();
    if cstor_tests::reflink_supported(work.path()) {
        skip::skip_or_fail(
            test,
            "the temp dir supports reflinks, so nothing would be refused",
        );
        return;
    }
    import::init_repository(work.path()).unwrap();
    let repo = import::open_repository::<Sha512HashValue>(work.path()).unwrap();
    runtime().block_on(async {
        let client = Client::spawn(&helper_config(&images.store).unwrap())
            .await
            .unwrap();
        let options = ImportOptions::new().copy_policy(CopyPolicy::ReflinkOnly);
        let e = import::import_image(&client, &repo, &images.features.name, &options)
            .await
            .unwrap_err();
        assert!(matches!(e, import::Error::ReflinkRequired { .. }), "{e}");
        // Nothing was committed under a final name.
        let diff_id = client
            .get_image(&images.features.name)
            .await
            .unwrap()
            .layers[0]
            .diff_id
            .clone()
            .unwrap();
        assert!(
            repo.has_stream(&import::layer_identifier(&diff_id))
                .unwrap()
                .is_none()
        );
        client.shutdown().await.unwrap();
    });
    // The CLI says so with exit status 7.
    let helper = cstor_tests::helper_binary().unwrap();
    let out = Command::new(helper.with_file_name("cstor"))
        .args(["import", "--helper"])
        .arg(&helper)
        .arg("--root")
        .arg(&images.store.root)
        .args(["--copy-policy", "reflink-only", "--repo"])
        .arg(work.path())
        .arg(&images.features.name)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be reflinked"));
}

/// Lists `streams/` and `streams/refs/oci/` and checks every stream symlink resolves.
fn check_repository(repo_dir: &Path) -> (usize, usize) {
    let repo = import::open_repository::<Sha512HashValue>(repo_dir).unwrap();
    let fsck = runtime().block_on(repo.fsck()).unwrap();
    assert!(fsck.is_ok(), "composefs fsck after a kill: {fsck:?}");
    let count = |d: &Path| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    (
        count(&repo_dir.join("streams")),
        count(&repo_dir.join("streams/refs/oci")),
    )
}

#[test]
fn a_killed_import_never_leaves_a_partial_layer_or_image() {
    let test = "a_killed_import_never_leaves_a_partial_layer_or_image";
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let helper = cstor_tests::helper_binary().unwrap();
    let cstor = helper.with_file_name("cstor");
    let work = tempfile::tempdir().unwrap();
    let repo_dir = work.path().join("repo");
    import::init_repository(&repo_dir).unwrap();
    let run = || {
        Command::new(&cstor)
            .args(["import", "--helper"])
            .arg(&helper)
            .arg("--root")
            .arg(&images.store.root)
            .args(["--repo"])
            .arg(&repo_dir)
            .arg(&images.commit.name)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // Kill earlier and later until an import completes; check the repository each time.
    let mut delay = Duration::from_millis(5);
    let mut kills = 0;
    loop {
        let mut child = run();
        std::thread::sleep(delay);
        let finished = child.try_wait().unwrap().is_some_and(|s| s.success());
        if !finished {
            let _ = child.kill();
        }
        let status = child.wait().unwrap();
        let (_streams, tags) = check_repository(&repo_dir);
        if finished || status.success() {
            assert_eq!(tags, 1);
            break;
        }
        kills += 1;
        // A tag exists only once the image is complete: if one appeared, the import
        // finished just before the kill.
        if tags > 0 {
            break;
        }
        delay = delay * 3 / 2;
        assert!(kills < 40, "the import never completed");
    }
    cstor_tests::note(&format!(
        "{test}: {kills} imports killed before one completed"
    ));
    // The final state is the same as an undisturbed import.
    let clean = tempfile::tempdir().unwrap();
    import::init_repository(clean.path()).unwrap();
    let a = import::open_repository::<Sha512HashValue>(&repo_dir).unwrap();
    let b = import::open_repository::<Sha512HashValue>(clean.path()).unwrap();
    runtime().block_on(async {
        let client = Client::spawn(&helper_config(&images.store).unwrap())
            .await
            .unwrap();
        let ra = import::import_image(&client, &a, &images.commit.name, &ImportOptions::default())
            .await
            .unwrap();
        let rb = import::import_image(&client, &b, &images.commit.name, &ImportOptions::default())
            .await
            .unwrap();
        assert_eq!(ra.erofs_image, rb.erofs_image);
        assert_eq!(ra.pull.config_verity, rb.pull.config_verity);
        assert_eq!(ra.pull.manifest_verity, rb.pull.manifest_verity);
        client.shutdown().await.unwrap();
    });
}

#[test]
fn a_helper_that_hangs_or_dies_at_start_is_reported() {
    let work = tempfile::tempdir().unwrap();
    let hang = work.path().join("hang.sh");
    let die = work.path().join("die.sh");
    cstor_tests::write_script(&hang, "#!/bin/sh\nexec sleep 60\n").unwrap();
    cstor_tests::write_script(
        &die,
        "#!/bin/sh\necho 'cannot open the storage: no such thing' >&2\nexit 3\n",
    )
    .unwrap();
    runtime().block_on(async {
        let mut config = cstor_proxy_client::HelperConfig::default()
            .program(&hang)
            .privilege(cstor_proxy_client::Privilege::Direct);
        config.handshake_timeout = Duration::from_millis(500);
        let start = std::time::Instant::now();
        let e = Client::spawn(&config).await.unwrap_err();
        // It is killed, as any helper that misses a deadline.
        assert!(matches!(e, Error::HelperUnresponsive { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));

        let config = cstor_proxy_client::HelperConfig::default()
            .program(&die)
            .privilege(cstor_proxy_client::Privilege::Direct);
        let e = Client::spawn(&config).await.unwrap_err();
        let Error::HelperDied { status, stderr, .. } = &e else {
            panic!("{e}")
        };
        assert!(status.contains('3'), "{status}");
        assert!(stderr.contains("cannot open the storage"), "{stderr}");
    });
}

/// `--init` writes the meta.json `cfsctl init` writes (SHA-512 objects, EROFS format 1),
/// byte for byte, so upstream tools open the repository as their own.
#[test]
fn init_writes_the_meta_json_of_cfsctl_init() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = import::init_repository(dir.path()).unwrap();
    assert_ne!(outcome, import::InitOutcome::Existed);
    let meta = std::fs::read_to_string(dir.path().join("meta.json")).unwrap();
    let expected = "{\n  \"version\": 1,\n  \"algorithm\": \"fsverity-sha512-12\",\n  \"features\": {\n    \"compatible\": [],\n    \"read-only-compatible\": [\n      \"v1_erofs\"\n    ],\n    \"incompatible\": []\n  },\n  \"erofs_formats\": {\n    \"default\": 1\n  }\n}\n";
    assert_eq!(meta, expected);
    assert_eq!(
        import::init_repository(dir.path()).unwrap(),
        import::InitOutcome::Existed
    );
    assert_eq!(
        import::repository_algorithm(dir.path()).unwrap(),
        import::RepoAlgorithm::Sha512
    );
}

/// A private store in `dir` with one small image, its first layer, and that layer's
/// `usr/share/data.txt`: above the 64-byte inline threshold, so the client's layer reader
/// and an object worker both read it.
fn store_with_data_file(dir: &Path) -> (PodmanStore, ImageRef, String, PathBuf) {
    let (store, image) = cstor_tests::small_private_store(dir).unwrap();
    let layer = store.image_layers(&image.id).unwrap()[0].clone();
    let f = store.layer_diff_dir(&layer).join("usr/share/data.txt");
    assert!(std::fs::metadata(&f).unwrap().len() > 64);
    (store, image, layer, f)
}

/// A layer file changed behind podman's back (same size, other bytes) is caught by its
/// tar-split CRC in the object worker, and the layer is not committed.
#[test]
fn a_changed_file_fails_the_import_and_commits_nothing() {
    let test = "a_changed_file_fails_the_import_and_commits_nothing";
    if !skip::require_root(test) || !skip::require_tools(test, &["podman"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, image, layer, f) = store_with_data_file(dir.path());
    let mut content = std::fs::read(&f).unwrap();
    assert!(content.len() > 64);
    content[100] ^= 0x20;
    std::fs::write(&f, content).unwrap();
    let repo_dir = dir.path().join("repo");
    import::init_repository(&repo_dir).unwrap();
    let repo = import::open_repository::<Sha512HashValue>(&repo_dir).unwrap();
    runtime().block_on(async {
        let client = Client::spawn(&helper_config(&store).unwrap()).await.unwrap();
        let e = import::import_image(&client, &repo, &image.name, &ImportOptions::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, import::Error::Helper(Error::Assemble { cause: cstor_protocol::assemble::AssembleError::Crc { name, .. }, .. }) if name.ends_with("data.txt")),
            "{e}"
        );
        client.shutdown().await.unwrap();
    });
    let diff_id = store.layer_record(&layer).unwrap()["diff-digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        repo.has_stream(&import::layer_identifier(&diff_id))
            .unwrap()
            .is_none()
    );
    assert!(
        std::fs::read_dir(repo_dir.join("streams"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    );
    store.destroy().unwrap();
}

/// The helper only reads podman's storage: an import does not even move the layer files'
/// access times. (Under `relatime` a read updates an access time older than the file's
/// modification time, so the file is given one first; the helper opens with `O_NOATIME`.)
#[test]
fn an_import_leaves_the_layer_files_access_times_alone() {
    let test = "an_import_leaves_the_layer_files_access_times_alone";
    if !skip::require_root(test) || !skip::require_tools(test, &["podman"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, image, _, f) = store_with_data_file(dir.path());
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_accessed(old))
        .unwrap();
    let before = std::fs::metadata(&f).unwrap();
    assert_eq!(before.accessed().unwrap(), old);
    assert!(before.modified().unwrap() > old);
    let repo_dir = dir.path().join("repo");
    import::init_repository(&repo_dir).unwrap();
    let repo = import::open_repository::<Sha512HashValue>(&repo_dir).unwrap();
    runtime().block_on(async {
        let client = Client::spawn(&helper_config(&store).unwrap())
            .await
            .unwrap();
        let report = import::import_image(&client, &repo, &image.name, &ImportOptions::default())
            .await
            .unwrap();
        assert!(report.layers.iter().all(|l| !l.skipped));
        client.shutdown().await.unwrap();
    });
    assert_eq!(std::fs::metadata(&f).unwrap().accessed().unwrap(), old);
    store.destroy().unwrap();
}

/// When one layer fails, the layers stored beside it still get their names (after a
/// syncfs), so that the retry, once the damage is repaired, skips them.
#[test]
fn a_failed_layer_keeps_the_layers_stored_beside_it_for_the_retry() {
    let test = "a_failed_layer_keeps_the_layers_stored_beside_it_for_the_retry";
    if !skip::require_root(test) || !skip::require_tools(test, &["podman"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, base) = cstor_tests::small_private_store(dir.path()).unwrap();
    let top_name = "localhost/cstor-test/two-layers:latest";
    let top_id = store
        .commit_with(&base.name, top_name, |root| {
            std::fs::write(root.join("top.txt"), "top layer ".repeat(20))
                .map_err(anyhow::Error::from)
        })
        .unwrap();
    let layers = store.image_layers(&top_id).unwrap();
    assert_eq!(layers.len(), 2);
    let diff_id = |layer: &str| {
        store.layer_record(layer).unwrap()["diff-digest"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let f = store.layer_diff_dir(&layers[1]).join("top.txt");
    let good = std::fs::read(&f).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 0x20;
    std::fs::write(&f, &bad).unwrap();

    let repo_dir = dir.path().join("repo");
    import::init_repository(&repo_dir).unwrap();
    let repo = import::open_repository::<Sha512HashValue>(&repo_dir).unwrap();
    let import = || {
        runtime().block_on(async {
            let client = Client::spawn(&helper_config(&store).unwrap())
                .await
                .unwrap();
            let r = import::import_image(&client, &repo, top_name, &ImportOptions::default()).await;
            client.shutdown().await.unwrap();
            r
        })
    };
    let e = import().unwrap_err();
    assert!(e.to_string().contains("top.txt"), "{e}");
    let named = |layer: &str| {
        repo.has_stream(&import::layer_identifier(&diff_id(layer)))
            .unwrap()
            .is_some()
    };
    assert!(
        named(&layers[0]),
        "the base layer was stored and must be named"
    );
    assert!(!named(&layers[1]), "the damaged layer must not be");

    std::fs::write(&f, &good).unwrap();
    let report = import().unwrap();
    assert_eq!(report.stats().layers_already_present, 1, "{report:?}");
    assert!(named(&layers[1]));
    store.destroy().unwrap();
}

/// Counts the repository's objects whose inode has other names (hardlinked from elsewhere),
/// and checks that none is setuid/setgid or writable by group or others.
fn shared_objects(repo_dir: &Path) -> (usize, usize) {
    use std::os::unix::fs::MetadataExt;
    let (mut all, mut shared) = (0, 0);
    for dir in std::fs::read_dir(repo_dir.join("objects")).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap();
            let md = f.metadata().unwrap();
            assert_eq!(
                md.mode() & 0o6022,
                0,
                "{:?}: mode {:o}",
                f.path(),
                md.mode()
            );
            if md.is_file() {
                all += 1;
                if md.nlink() > 1 {
                    shared += 1;
                }
            }
        }
    }
    (all, shared)
}

#[test]
fn a_privileged_caller_without_reflinks_can_opt_into_hardlinks() {
    let test = "a_privileged_caller_without_reflinks_can_opt_into_hardlinks";
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    if cstor_tests::reflink_supported(work.path()) {
        skip::skip_or_fail(
            test,
            "the temp dir supports reflinks, so the hardlink fallback would not be used",
        );
        return;
    }
    if !rustix::process::geteuid().is_root() {
        skip::skip_or_fail(
            test,
            "hardlinking podman's files needs root (fs.protected_hardlinks)",
        );
        return;
    }
    let linked_dir = work.path().join("linked");
    let copied_dir = work.path().join("copied");
    let outcome = import::init_repository(&linked_dir).unwrap();
    import::init_repository(&copied_dir).unwrap();
    let linked = import::open_repository::<Sha512HashValue>(&linked_dir).unwrap();
    let copied = import::open_repository::<Sha512HashValue>(&copied_dir).unwrap();
    let image = &images.features.name;
    let (hl, cp) = runtime().block_on(async {
        let client = Client::spawn(&helper_config(&images.store).unwrap())
            .await
            .unwrap();
        let hardlink = ImportOptions::new().copy_policy(CopyPolicy::ReflinkOrHardlink);
        let hl = import::import_image(&client, &linked, image, &hardlink)
            .await
            .unwrap();
        let cp = import::import_image(&client, &copied, image, &ImportOptions::default())
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        (hl, cp)
    });
    // Linking changes how objects are stored, never what the repository says.
    assert_eq!(hl.erofs_image, cp.erofs_image);
    assert_eq!(hl.pull.manifest_verity, cp.pull.manifest_verity);
    let new_objects = |o: &import::ObjectStats| o.reflinked + o.copied + o.hardlinked;
    assert_eq!(new_objects(&hl.objects), new_objects(&cp.objects));
    let (all, shared) = shared_objects(&linked_dir);
    match outcome {
        import::InitOutcome::CreatedInsecure => {
            assert!(hl.objects.hardlinked > 0, "{:?}", hl.objects);
            assert_eq!(shared as u64, hl.objects.hardlinked, "{all} objects");
            // What could not be linked (setuid files above the inline size, say) was copied,
            // and the report says why.
            if hl.objects.copied > 0 {
                let why = hl.first_reflink_fallback.clone().unwrap_or_default();
                assert!(why.contains("not hardlinked"), "{why}");
            }
        }
        _ => {
            // fs-verity would have to be enabled on podman's files: everything is copied.
            assert_eq!((hl.objects.hardlinked, shared), (0, 0));
            let why = hl.first_reflink_fallback.clone().unwrap_or_default();
            assert!(why.contains("fs-verity"), "{why}");
        }
    }
    let fsck = runtime().block_on(linked.fsck()).unwrap();
    assert!(fsck.is_ok(), "{fsck:?}");
    // podman's files are unchanged: the layers still verify against their diff ids.
    let helper = cstor_tests::helper_binary().unwrap();
    let out = Command::new(helper.with_file_name("cstor"))
        .args(["verify", "--helper"])
        .arg(&helper)
        .arg("--root")
        .arg(&images.store.root)
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}
