//! Story: a program that imports (bootc, a CLI on Ctrl-C) can stop an import while a layer
//! streams, by triggering its cancellation token or simply by dropping the import's future.
//! Either way the import stops within moments, leaves no tag and no manifest, names no layer
//! that was not complete, releases podman's layers, and leaves none of its threads running;
//! the next import completes the image exactly as an import into a fresh repository does.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use composefs::fsverity::{FsVerityHashValue, FsVerityHasher, Sha512HashValue};
use composefs::repository::Repository;
use cstor_import::{self as import, ImportEvent, ImportOptions, ImportReport};
use cstor_proxy_client::Client;
use cstor_tests::session::{client_for, podman_background, runtime, wait_with_timeout};
use cstor_tests::{ImageRef, StandardImages, standard_images_or_skip};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio_util::sync::CancellationToken;

type Repo = Arc<Repository<Sha512HashValue>>;

/// A hang, not a benchmark: stopping takes a fraction of this.
const PROMPTLY: Duration = Duration::from_secs(5);

/// The import's threads are counted per process: one story at a time.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|p| p.into_inner())
}

fn new_repo(dir: &Path) -> Repo {
    import::init_repository(dir).unwrap();
    import::open_repository::<Sha512HashValue>(dir).unwrap()
}

/// The threads of ours running in this process (the importer names them all `cstor-…`:
/// object workers, the tree thread, syncfs, the image hasher).
fn import_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_owned())
        .filter(|name| name.starts_with("cstor-"))
        .collect()
}

/// Waits (letting the runtime run) until no thread of the import is left; how long that
/// took, or the threads still there after [`PROMPTLY`].
async fn threads_gone() -> Result<Duration, Vec<String>> {
    let start = Instant::now();
    loop {
        let left = import_threads();
        if left.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > PROMPTLY {
            return Err(left);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The index of the first layer reported part-way through (bytes done below its size);
/// `None` if the import reached its end first.
async fn first_layer_midway(events: &mut UnboundedReceiver<ImportEvent>) -> Option<usize> {
    let mut sizes = HashMap::new();
    while let Some(e) = events.recv().await {
        match e {
            ImportEvent::LayerStarted { index, bytes, .. } => {
                sizes.insert(index, bytes);
            }
            ImportEvent::LayerProgress {
                index, bytes_done, ..
            } if sizes.get(&index).is_some_and(|&size| bytes_done < size) => {
                return Some(index);
            }
            ImportEvent::Finalizing | ImportEvent::Finished => return None,
            _ => {}
        }
    }
    None
}

/// podman can write to the store: it gets the layer store's write lock, which the helper
/// holds shared while a layer is open. (A name added and taken away again: the standard
/// store is shared by every test.)
async fn podman_can_write(images: &'static StandardImages, image: &ImageRef, test: &str) {
    let id = image.id.clone();
    let probe = format!("localhost/cstor-test/{}:probe", test.replace('_', "-"));
    tokio::task::spawn_blocking(move || {
        for args in [["tag", &id, &probe], ["untag", &id, &probe]] {
            let mut podman = podman_background(&images.store, &args).unwrap();
            let status = wait_with_timeout(&mut podman, Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("podman {args:?}: {e:#}: a layer is still held"));
            assert!(status.success(), "podman {args:?}: {status}");
        }
    })
    .await
    .unwrap();
}

/// What the stopped import left behind: no tag, no config or manifest stream, and only
/// layer streams that are complete (each rebuilds the tar of its diff id), not the one
/// stopped midway; a repository composefs' fsck finds sound. Returns how many layers are
/// named.
async fn check_what_was_left(repo_dir: &Path, repo: &Repo, midway_diff_id: &str) -> usize {
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        names(&repo_dir.join("streams/refs/oci")),
        Vec::<String>::new(),
        "no tag"
    );
    let streams: Vec<String> = names(&repo_dir.join("streams"))
        .into_iter()
        .filter(|n| n != "refs")
        .collect();
    for name in &streams {
        let diff_id = name
            .strip_prefix("oci-layer-")
            .unwrap_or_else(|| panic!("only layer streams: {name}"));
        // The stream's object is whole: its fs-verity digest is its name.
        let object = std::fs::canonicalize(repo_dir.join("streams").join(name)).unwrap();
        let objects = std::fs::canonicalize(repo_dir.join("objects")).unwrap();
        let id = object
            .strip_prefix(&objects)
            .unwrap()
            .to_string_lossy()
            .replace('/', "");
        let digest = FsVerityHasher::<Sha512HashValue>::hash(&std::fs::read(&object).unwrap());
        assert_eq!(digest.to_hex(), id, "{name}");
        // And the layer is whole: the tar it rebuilds is the one of its diff id.
        let mut tar = Sha256Writer(Sha256::new());
        repo.open_stream(name, None, Some(composefs_oci::LAYER_CONTENT_TYPE))
            .unwrap()
            .cat(repo, &mut tar)
            .unwrap();
        assert_eq!(
            format!("sha256:{}", hex::encode(tar.0.finalize())),
            diff_id,
            "{name}"
        );
    }
    assert!(
        !streams.contains(&import::layer_identifier(midway_diff_id)),
        "the layer stopped midway is not named"
    );
    let fsck = repo.fsck().await.unwrap();
    assert!(fsck.is_ok(), "composefs fsck: {fsck:?}");
    streams.len()
}

/// Feeds what is written to a sha256.
struct Sha256Writer(Sha256);

impl std::io::Write for Sha256Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The image imported again completes it, the same as into a fresh repository.
async fn reimport_matches_a_fresh_import(
    client: &Client,
    repo: &Repo,
    image: &ImageRef,
    named_layers: usize,
) {
    let again = import::import_image(client, repo, &image.name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(again.stats().layers_already_present as usize, named_layers);
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = new_repo(fresh_dir.path());
    let clean = import::import_image(client, &fresh, &image.name, &ImportOptions::default())
        .await
        .unwrap();
    same_image(&again, &clean);
}

fn same_image(a: &ImportReport<Sha512HashValue>, b: &ImportReport<Sha512HashValue>) {
    assert_eq!(a.erofs_image, b.erofs_image, "EROFS image");
    assert_eq!(a.pull.config_verity, b.pull.config_verity, "config stream");
    assert_eq!(
        a.pull.manifest_verity, b.pull.manifest_verity,
        "manifest stream"
    );
}

/// A story: the commit image (the large feature layer below a small one) imported into a
/// fresh repository and stopped by `stop` while a layer streams. `stop` runs the import and
/// returns once it stopped it, with the index of the layer it stopped midway through and
/// how promptly, for the log. Then everything the module's story promises is checked.
fn stopped_midway(test: &str, stop: impl AsyncFnOnce(&Client, &Repo, &str) -> (usize, String)) {
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let _one = one_at_a_time();
    let image = &images.commit;
    let work = tempfile::tempdir().unwrap();
    let repo_dir = work.path().join("repo");
    let repo = new_repo(&repo_dir);
    runtime().block_on(async {
        let client = client_for(&images.store).await.unwrap();
        let layers = client.get_image(&image.name).await.unwrap().layers;
        let (midway, promptly) = stop(&client, &repo, &image.name).await;
        let threads = threads_gone()
            .await
            .expect("no thread of the import keeps running");
        podman_can_write(images, image, test).await;
        let midway_diff_id = layers[midway].diff_id.clone().unwrap();
        let named = check_what_was_left(&repo_dir, &repo, &midway_diff_id).await;
        cstor_tests::note(&format!(
            "{test}: stopped midway through layer {midway}; {promptly}; the import's threads \
             were gone {threads:?} after that; {named} complete layer(s) named"
        ));
        reimport_matches_a_fresh_import(&client, &repo, image, named).await;
        client.shutdown().await.unwrap();
    });
}

#[test]
fn cancelling_while_a_layer_streams_stops_the_import_promptly_and_cleanly() {
    let test = "cancelling_while_a_layer_streams_stops_the_import_promptly_and_cleanly";
    stopped_midway(test, async |client, repo, image| {
        let token = CancellationToken::new();
        let (tx, mut events) = unbounded_channel();
        let options = ImportOptions::new().events(tx).cancel(token.clone());
        let cancel = async {
            let midway = first_layer_midway(&mut events).await;
            token.cancel();
            (midway, Instant::now())
        };
        let (result, (midway, cancelled_at)) =
            tokio::join!(import::import_image(client, repo, image, &options), cancel);
        let stopped_after = cancelled_at.elapsed();
        let midway = midway.expect("a layer was reported part-way through");
        assert!(
            matches!(result, Err(import::Error::Cancelled)),
            "{:?}",
            result.map(|r| r.erofs_image)
        );
        assert!(stopped_after < PROMPTLY, "stopped {stopped_after:?} after");
        (
            midway,
            format!("import_image returned {stopped_after:?} after the cancel"),
        )
    });
}

#[test]
fn dropping_the_import_while_a_layer_streams_stops_it_as_cancelling_does() {
    let test = "dropping_the_import_while_a_layer_streams_stops_it_as_cancelling_does";
    stopped_midway(test, async |client, repo, image| {
        let (tx, mut events) = unbounded_channel();
        let options = ImportOptions::new().events(tx);
        // The caller gives up (a timeout, another branch of a select!) while a layer is
        // part-way through: the import's future is dropped.
        let midway = tokio::select! {
            r = import::import_image(client, repo, image, &options) => {
                panic!("the import ended before a layer was part-way through: {:?}",
                    r.map(|r| r.erofs_image))
            }
            Some(midway) = first_layer_midway(&mut events) => midway,
        };
        (midway, "the future was dropped".to_owned())
    });
}
