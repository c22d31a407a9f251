//! Story: a composefs program reads layers from `cstor-helper --varlink` with composefs'
//! own consumer code (composefs-oci 0.9.4's `OciProxy` and its diff-id-verifying
//! splitdirfdstream drain), as it reads them from upstream's containers-storage service.
//! What it stores is what `cstor import` stores for the same layers, as root and as a
//! rootless user whose layer holds files only the helper can open; bad requests get
//! upstream's error names and the helper goes on serving; podman's writers wait until the
//! consumer closes its lifetime fd; systemd socket activation works; a layer of 5000
//! files comes out the same too; layers of an additional image store are served under its
//! path; and a damaged layer fails the drain rather than being stored shorter.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use composefs::fsverity::{FsVerityHashValue, Sha512HashValue};
use composefs::repository::{ImportContext, Repository};
use composefs_oci::OciDigest;
use composefs_oci::layer_sync::{VerifiedDrainError, drain_splitdirfdstream_verified};
use composefs_oci::varlink_types::{GetLayerParams, OciError, OciProxy as _, StorageLocator};
use cstor_import::{self as import, ImportOptions, layer_identifier};
use cstor_tests::rootless::ROOTLESS_IMAGE_NAME;
use cstor_tests::session::{client_for, podman_background, public_binaries, runtime};
use cstor_tests::{
    ImageRef, PodmanStore, RootlessUser, faults, helper_binary, rootless_feature_image,
    rootless_user_or_skip, run_command, skip, small_private_store, standard_images_or_skip,
};
use serde_json::{Value, json};

type Repo = Arc<Repository<Sha512HashValue>>;

fn new_repo(dir: &Path) -> Repo {
    import::init_repository(dir).unwrap();
    import::open_repository::<Sha512HashValue>(dir).unwrap()
}

/// A `cstor-helper --varlink` process and its socket; killed when dropped.
struct VarlinkHelper {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    /// Started through `podman unshare`: the helper is a grandchild, found by its socket.
    indirect: bool,
}

impl VarlinkHelper {
    /// Starts `cmd` (which must serve `sock`) and waits for the socket to accept.
    fn start(mut cmd: Command, sock: &Path, log: &Path, indirect: bool) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut me = Self {
            child,
            sock: sock.to_owned(),
            log: log.to_owned(),
            indirect,
        };
        let start = Instant::now();
        while UnixStream::connect(sock).is_err() {
            if let Some(status) = me.child.try_wait().unwrap() {
                panic!(
                    "the helper exited ({status}) before serving: {}",
                    me.log_text()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no varlink socket after 60 s: {}",
                me.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    /// A root helper serving `store`'s private storage.
    fn for_store(store: &PodmanStore, dir: &Path) -> Self {
        let sock = dir.join("oci.sock");
        let mut cmd = Command::new(helper_binary().unwrap());
        cmd.arg("--root")
            .arg(&store.root)
            .arg("--runroot")
            .arg(&store.runroot)
            .arg("-vv")
            .arg("--varlink")
            .arg(&sock);
        Self::start(cmd, &sock, &dir.join("helper.log"), false)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn connect(&self) -> zlink::tokio::unix::Connection {
        zlink::tokio::unix::connect(&self.sock).await.unwrap()
    }
}

impl Drop for VarlinkHelper {
    fn drop(&mut self) {
        if self.indirect {
            for p in faults::helpers_serving(&self.sock) {
                let _ = faults::kill(&p);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `GetLayer` handed over, split as upstream's consumer splits it.
struct Fetched {
    pipe: OwnedFd,
    dirs: Vec<OwnedFd>,
    lifetime: Vec<OwnedFd>,
    frames: usize,
}

#[derive(Debug)]
enum Failed {
    Oci(OciError),
    Transport(String),
}

/// Calls `GetLayer` and concatenates the fd batches of every reply, then splits them into
/// the pipe, `dir_count` directories and the lifetime fds: what composefs-oci's
/// `import_layer_via_transfer` does.
async fn get_layer(
    conn: &mut zlink::tokio::unix::Connection,
    params: GetLayerParams,
) -> Result<Fetched, Failed> {
    use zlink::futures_util::StreamExt as _;
    let stream = conn
        .get_layer(0, params)
        .await
        .map_err(|e| Failed::Transport(format!("{e:?}")))?;
    let mut stream = std::pin::pin!(stream);
    let mut fds = Vec::new();
    let mut dir_count = None;
    let mut frames = 0;
    while let Some(item) = stream.next().await {
        let (reply, batch) = item.map_err(|e| Failed::Transport(format!("{e:?}")))?;
        let reply = reply.map_err(Failed::Oci)?;
        dir_count = Some(reply.dir_count as usize);
        // zlink 0.7.1 receives fds without MSG_CMSG_CLOEXEC: a child started meanwhile (here
        // `podman rmi`) would inherit the lifetime fd and, waiting for the lock that fd
        // holds, never let it close.
        for fd in &batch {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC).unwrap();
        }
        fds.extend(batch);
        frames += 1;
    }
    let dir_count = dir_count.ok_or_else(|| Failed::Transport("no reply".into()))?;
    assert!(
        fds.len() >= dir_count + 2,
        "{} fds for {dir_count} dirs",
        fds.len()
    );
    let mut it = fds.into_iter();
    let pipe = it.next().unwrap();
    let dirs = it.by_ref().take(dir_count).collect();
    Ok(Fetched {
        pipe,
        dirs,
        lifetime: it.collect(),
        frames,
    })
}

fn locator(store_path: &Path, layer_id: &str, trusted: bool) -> GetLayerParams {
    GetLayerParams {
        diff_id: None,
        storage: Some(StorageLocator {
            storage_path: store_path.to_string_lossy().into_owned(),
            layer_id: layer_id.to_owned(),
        }),
        consumer_has_cap_dac_override: trusted,
    }
}

/// Upstream's verified drain, holding the lifetime fds until it is done.
fn drain(
    repo: &Repo,
    fetched: Fetched,
    diff_id: &str,
) -> Result<Sha512HashValue, VerifiedDrainError> {
    let diff: OciDigest = diff_id.parse().unwrap();
    let _lifetime = fetched.lifetime;
    drain_splitdirfdstream_verified(
        repo.clone(),
        fetched.pipe,
        fetched.dirs,
        &diff,
        false,
        ImportContext::default(),
    )
    .map(|(verity, _, _)| verity)
}

fn stored(repo: &Repo, diff_id: &str) -> Option<String> {
    repo.has_stream(&layer_identifier(diff_id))
        .unwrap()
        .map(|v| v.to_hex())
}

fn equivalent_as_root(test: &str, pick: fn(&cstor_tests::StandardImages) -> &ImageRef) {
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let image = pick(images);
    let work = tempfile::tempdir().unwrap();
    let ours = new_repo(&work.path().join("ours"));
    let theirs = new_repo(&work.path().join("theirs"));
    let by_diff = new_repo(&work.path().join("by-diff-id"));
    let helper = VarlinkHelper::for_store(&images.store, work.path());
    runtime().block_on(async {
        let client = client_for(&images.store).await.unwrap();
        let report = import::import_image(&client, &ours, &image.name, &ImportOptions::default())
            .await
            .unwrap();
        client.shutdown().await.unwrap();

        let mut conn = helper.connect().await;
        let info = conn.get_info().await.unwrap().unwrap();
        assert!(
            info.features.iter().any(|f| f == "splitdirfdstream-v0"),
            "{:?}",
            info.features
        );
        for (i, l) in report.layers.iter().enumerate() {
            let fetched = get_layer(&mut conn, locator(&images.store.root, &l.layer_id, true))
                .await
                .unwrap();
            // The layer's own diff directory and each lower one's.
            assert_eq!(fetched.dirs.len(), i + 1, "layer {i}");
            assert!(fetched.frames >= 3, "{} replies", fetched.frames);
            let diff_id = l.diff_id.clone();
            let repo = theirs.clone();
            let verity = tokio::task::spawn_blocking(move || drain(&repo, fetched, &diff_id))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                verity.to_hex(),
                l.verity.to_hex(),
                "layer {i} of {}",
                image.name
            );
            assert_eq!(stored(&theirs, &l.diff_id), stored(&ours, &l.diff_id));

            // Named by diff id alone, as composefs' repository service is asked.
            let has = conn.has_layer(0, &l.diff_id).await.unwrap().unwrap();
            assert!(has.present && has.layer_verity.is_none());
            let params = GetLayerParams {
                diff_id: Some(l.diff_id.clone()),
                ..Default::default()
            };
            let fetched = get_layer(&mut conn, params).await.unwrap();
            let diff_id = l.diff_id.clone();
            let repo = by_diff.clone();
            let verity = tokio::task::spawn_blocking(move || drain(&repo, fetched, &diff_id))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(verity.to_hex(), l.verity.to_hex());
        }
    });
}

#[test]
fn upstream_drains_the_feature_image_as_cstor_imports_it() {
    equivalent_as_root(
        "upstream_drains_the_feature_image_as_cstor_imports_it",
        |i| &i.features,
    );
}

#[test]
fn upstream_drains_the_commit_image_as_cstor_imports_it() {
    equivalent_as_root(
        "upstream_drains_the_commit_image_as_cstor_imports_it",
        |i| &i.commit,
    );
}

/// Runs `f` on a thread with the user's uid, gid and groups and no capabilities (a thread's
/// credentials are its own on Linux), as a rootless consumer process would.
fn as_user<T: Send>(user: &RootlessUser, f: impl FnOnce() -> T + Send) -> T {
    as_ids(user.uid, user.gid, f)
}

fn as_ids<T: Send>(uid: u32, gid: u32, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let gid = rustix::process::Gid::from_raw(gid);
            let uid = rustix::process::Uid::from_raw(uid);
            rustix::thread::set_thread_groups(&[gid]).unwrap();
            rustix::thread::set_thread_res_gid(gid, gid, gid).unwrap();
            rustix::thread::set_thread_res_uid(uid, uid, uid).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn a_rootless_consumer_gets_files_it_cannot_open_inline() {
    let test = "a_rootless_consumer_gets_files_it_cannot_open_inline";
    let Some(user) = rootless_user_or_skip(test) else {
        return;
    };
    let work = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    rootless_feature_image(&user, &work.path().join("build")).unwrap();
    let (_bins, helper, cstor) = public_binaries().unwrap();

    // What cstor imports for the same layer (root reading the user's storage).
    let reference: Value = serde_json::from_str(
        &run_command(
            Command::new(&cstor)
                .args(["import", "--helper"])
                .arg(&helper)
                .args(["--privilege", "direct", "--root"])
                .arg(user.graphroot())
                .args(["--json", "--init", "--repo"])
                .arg(work.path().join("reference"))
                .arg(ROOTLESS_IMAGE_NAME),
            "cstor import as root from the user's storage",
        )
        .unwrap(),
    )
    .unwrap();
    let layers = reference["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{reference}");
    let layer_id = layers[0]["layer_id"].as_str().unwrap().to_owned();
    let diff_id = layers[0]["diff_id"].as_str().unwrap().to_owned();
    let want = layers[0]["verity"].as_str().unwrap().to_owned();

    let run = work.path().join("run");
    std::fs::create_dir(&run).unwrap();
    user.chown(&run).unwrap();
    let sock = run.join("oci.sock");
    let cmd = user.unshare(
        &helper,
        ["-vv".as_ref(), "--varlink".as_ref(), sock.as_os_str()] as [&std::ffi::OsStr; 3],
    );
    let served = VarlinkHelper::start(cmd, &sock, &work.path().join("helper.log"), true);

    let graphroot = user.graphroot();
    let (verity, refused) = as_user(&user, || {
        assert!(!rustix::process::geteuid().is_root());
        let repo = new_repo(&run.join("repo"));
        let rt = runtime();
        let fetch = |trusted: bool| {
            rt.block_on(async {
                let mut conn = served.connect().await;
                get_layer(&mut conn, locator(&graphroot, &layer_id, trusted))
                    .await
                    .unwrap()
            })
        };
        // Honest about its rights: the 0600 file and the one in the 0700 directory come
        // inline, the rest by name.
        let verity = drain(&repo, fetch(false), &diff_id).map(|v| v.to_hex());
        // Claiming rights it does not have, the consumer cannot open them by name.
        let refused = drain(&new_repo(&run.join("repo2")), fetch(true), &diff_id)
            .map(|v| v.to_hex())
            .map_err(|e| format!("{e:#}"));
        (verity, refused)
    });
    assert_eq!(verity.unwrap(), want, "{}", served.log_text());
    // The helper says what it sent: the private file and the one below the private
    // directory inline (in the first, honest stream), the rest by name.
    let log = served.log_text();
    let first = log
        .lines()
        .find(|l| l.contains("layer stream complete"))
        .unwrap_or_else(|| panic!("{log}"));
    let count = |key: &str| -> u64 {
        first
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {first}"))
    };
    cstor_tests::note(&format!("rootless varlink stream: {first}"));
    assert!(count("inline=") >= 2, "{first}");
    assert!(count("by_name=") >= 1, "{first}");
    let err = refused.unwrap_err();
    assert!(
        err.contains("ermission denied") || err.contains("EACCES"),
        "{err}"
    );
}

/// A root helper for a fresh small store, with the store's first layer and its diff id.
struct Small {
    _dir: tempfile::TempDir,
    store: PodmanStore,
    image: ImageRef,
    layer: String,
    diff_id: String,
    helper: VarlinkHelper,
}

impl Drop for Small {
    fn drop(&mut self) {
        // The helper goes first: it may hold the store's locks and files.
        let _ = self.helper.child.kill();
        let _ = self.helper.child.wait();
        if let Err(e) = self.store.destroy() {
            cstor_tests::note(&format!("leaving {}: {e:#}", self.store.dir.display()));
        }
    }
}

fn small(test: &str) -> Option<Small> {
    if !skip::require_root(test) || !skip::require_tools(test, &["podman"]) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, image) = small_private_store(dir.path()).unwrap();
    let layer = store.image_layers(&image.id).unwrap()[0].clone();
    let diff_id = store.layer_record(&layer).unwrap()["diff-digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let helper = VarlinkHelper::for_store(&store, dir.path());
    Some(Small {
        _dir: dir,
        store,
        image,
        layer,
        diff_id,
        helper,
    })
}

fn error_name(e: &Failed) -> &'static str {
    match e {
        Failed::Oci(OciError::NoSuchLayer { .. }) => "NoSuchLayer",
        Failed::Oci(OciError::InvalidDigest { .. }) => "InvalidDigest",
        Failed::Oci(OciError::InvalidRequest { .. }) => "InvalidRequest",
        Failed::Oci(OciError::RepoNotFound { .. }) => "RepoNotFound",
        Failed::Oci(other) => panic!("unexpected {other:?}"),
        Failed::Transport(t) => panic!("transport failure {t}"),
    }
}

/// Sends raw bytes on a new connection and returns the replies until `n` arrived or the
/// helper closed the connection.
fn raw(sock: &Path, bytes: &[u8], n: usize) -> (Vec<Value>, bool) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    if let Err(e) = s.write_all(bytes) {
        // The helper may close before taking all of an oversized request.
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        );
    }
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while out.len() < n {
        let got = s.read(&mut chunk).unwrap();
        if got == 0 {
            return (out, true);
        }
        buf.extend_from_slice(&chunk[..got]);
        while let Some(end) = buf.iter().position(|&b| b == 0) {
            let msg: Vec<u8> = buf.drain(..=end).take(end).collect();
            out.push(serde_json::from_slice(&msg).unwrap());
        }
    }
    (out, false)
}

#[test]
fn bad_requests_get_upstream_error_names_and_the_helper_keeps_serving() {
    let Some(s) = small("bad_requests_get_upstream_error_names_and_the_helper_keeps_serving")
    else {
        return;
    };
    let absent = format!("sha256:{}", "0".repeat(64));
    runtime().block_on(async {
        let mut conn = s.helper.connect().await;
        let cases = [
            (
                GetLayerParams {
                    diff_id: Some(absent.clone()),
                    ..Default::default()
                },
                "NoSuchLayer",
            ),
            (
                GetLayerParams {
                    diff_id: Some("sha256:not-hex".into()),
                    ..Default::default()
                },
                "InvalidDigest",
            ),
            (locator(&s.store.root, &"0".repeat(64), true), "NoSuchLayer"),
            (locator(&s.store.root, "../../etc", true), "InvalidRequest"),
            (
                locator(Path::new("/nonexistent/storage"), &s.layer, true),
                "RepoNotFound",
            ),
            (GetLayerParams::default(), "InvalidRequest"),
        ];
        for (params, want) in cases {
            let shown = format!("{params:?}");
            let e = get_layer(&mut conn, params).await.err().unwrap();
            assert_eq!(error_name(&e), want, "{shown}: {e:?}");
        }
        let has = conn.has_layer(0, &absent).await.unwrap().unwrap();
        assert!(!has.present);
        match conn.has_layer(0, "md5:x").await.unwrap() {
            Err(OciError::InvalidDigest { .. }) => {}
            other => panic!("{other:?}"),
        }
    });

    let sock = &s.helper.sock;
    let (r, _) = raw(
        sock,
        b"{\"method\":\"org.composefs.Oci.GetLayer\",\"parameters\":{\"handle\":0,\"params\":\"x\"}}\0\
          {\"method\":\"org.composefs.Oci.PutLayer\",\"parameters\":{}}\0\
          {\"method\":\"com.example.Nothing.Here\"}\0\
          {\"parameters\":{}}\0\
          {\"method\":\"org.varlink.service.GetInfo\"}\0",
        5,
    );
    assert_eq!(
        r[0]["error"], "org.varlink.service.InvalidParameter",
        "{r:?}"
    );
    assert_eq!(r[0]["parameters"]["parameter"], "params");
    assert_eq!(r[1]["error"], "org.varlink.service.MethodNotFound");
    assert_eq!(r[2]["error"], "org.varlink.service.InterfaceNotFound");
    assert_eq!(r[2]["parameters"]["interface"], "com.example.Nothing");
    assert_eq!(r[3]["error"], "org.varlink.service.InvalidParameter");
    assert_eq!(r[4]["parameters"]["product"], "cstor-helper");
    // Without "more", one reply carries every fd (here the pipe, one directory and the
    // lifetime fd, which this plain read closes).
    let call = json!({"method": "org.composefs.Oci.GetLayer", "parameters": {
        "handle": 0, "params": {"diff_id": s.diff_id}}});
    let mut bytes = serde_json::to_vec(&call).unwrap();
    bytes.push(0);
    let (r, _) = raw(sock, &bytes, 1);
    assert_eq!(r[0]["parameters"]["dir_count"], 1, "{r:?}");
    assert!(r[0].get("continues").is_none(), "{r:?}");
    // Bytes that are not JSON end that connection only.
    let (r, closed) = raw(sock, b"\x01\x02 garbage\0", 1);
    assert!(closed && r.is_empty(), "{r:?}");
    // A request larger than the helper reads, without its end, too.
    let (r, closed) = raw(sock, &vec![b' '; 1 << 20], 1);
    assert!(closed && r.is_empty());

    // Other users are kept out by the socket's mode, and by their credentials when the mode
    // lets them in: the helper would read root-only files for them.
    let nobody = as_ids(65534, 65534, || UnixStream::connect(sock).map(|_| ()));
    assert_eq!(
        nobody.unwrap_err().kind(),
        std::io::ErrorKind::PermissionDenied
    );
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let answered = as_ids(65534, 65534, || {
        let mut c = UnixStream::connect(sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let _ = c.write_all(b"{\"method\":\"org.composefs.Oci.GetInfo\"}\0");
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf);
        buf
    });
    assert!(
        answered.is_empty(),
        "{}",
        String::from_utf8_lossy(&answered)
    );
    assert!(
        s.helper
            .log_text()
            .contains("refusing a varlink connection")
    );

    // Still serving: a layer drains.
    runtime().block_on(async {
        let mut conn = s.helper.connect().await;
        let fetched = get_layer(&mut conn, locator(&s.store.root, &s.layer, true))
            .await
            .unwrap();
        let repo = new_repo(&s._dir.path().join("repo"));
        let diff_id = s.diff_id.clone();
        tokio::task::spawn_blocking(move || drain(&repo, fetched, &diff_id))
            .await
            .unwrap()
            .unwrap();
    });
    // Nobody crashed meanwhile.
    assert!(
        !s.helper.log_text().contains("panicked"),
        "{}",
        s.helper.log_text()
    );
}

/// The methods `description` (varlink's interface language) declares, parsed by zlink's
/// own parser; fails the test when it does not parse or names another interface.
fn declared_methods(description: &str, interface: &str) -> Vec<String> {
    let parsed = zlink_idl::Interface::try_from(description)
        .unwrap_or_else(|e| panic!("the description of {interface} does not parse: {e}"));
    assert_eq!(parsed.name(), interface);
    parsed.methods().map(|m| m.name().to_owned()).collect()
}

#[test]
fn a_generic_varlink_tool_can_learn_what_the_helper_serves() {
    let Some(s) = small("a_generic_varlink_tool_can_learn_what_the_helper_serves") else {
        return;
    };
    let sock = &s.helper.sock;
    let call = |method: &str, parameters: Value| {
        let mut bytes =
            serde_json::to_vec(&json!({"method": method, "parameters": parameters})).unwrap();
        bytes.push(0);
        let (mut r, _) = raw(sock, &bytes, 1);
        assert_eq!(r.len(), 1, "{method}: {r:?}");
        r.remove(0)
    };
    let info = call("org.varlink.service.GetInfo", json!({}));
    let interfaces: Vec<String> =
        serde_json::from_value(info["parameters"]["interfaces"].clone()).unwrap();
    assert_eq!(interfaces, ["org.varlink.service", "org.composefs.Oci"]);
    for interface in &interfaces {
        let r = call(
            "org.varlink.service.GetInterfaceDescription",
            json!({ "interface": interface }),
        );
        let description = r["parameters"]["description"]
            .as_str()
            .unwrap_or_else(|| panic!("{interface}: {r}"));
        let methods = declared_methods(description, interface);
        if interface == "org.composefs.Oci" {
            // Exactly what answers: what a repository service has besides is not offered.
            assert_eq!(methods, ["GetInfo", "HasLayer", "GetLayer"]);
            let absent = format!("sha256:{}", "0".repeat(64));
            let has = call(
                "org.composefs.Oci.HasLayer",
                json!({"handle": 0, "diff_id": absent}),
            );
            assert_eq!(has["parameters"]["present"], false, "{has}");
        } else {
            assert_eq!(methods, ["GetInfo", "GetInterfaceDescription"]);
        }
    }
    let r = call(
        "org.varlink.service.GetInterfaceDescription",
        json!({"interface": "com.example.Nothing"}),
    );
    assert_eq!(r["error"], "org.varlink.service.InterfaceNotFound", "{r}");
    assert_eq!(r["parameters"]["interface"], "com.example.Nothing");
    let r = call("org.varlink.service.GetInterfaceDescription", json!({}));
    assert_eq!(r["error"], "org.varlink.service.InvalidParameter", "{r}");
}

#[test]
fn podman_waits_until_the_consumer_closes_the_lifetime_fd() {
    let Some(s) = small("podman_waits_until_the_consumer_closes_the_lifetime_fd") else {
        return;
    };
    let (lifetime, frames) = runtime().block_on(async {
        let mut conn = s.helper.connect().await;
        let mut fetched = get_layer(&mut conn, locator(&s.store.root, &s.layer, true))
            .await
            .unwrap();
        // The whole stream is read: what pins the layer now is the lifetime fd alone.
        let lifetime = std::mem::take(&mut fetched.lifetime);
        let frames = fetched.frames;
        let repo = new_repo(&s._dir.path().join("repo"));
        let diff_id = s.diff_id.clone();
        tokio::task::spawn_blocking(move || drain(&repo, fetched, &diff_id))
            .await
            .unwrap()
            .unwrap();
        (lifetime, frames)
    });
    assert!(frames >= 3);
    assert!(!lifetime.is_empty());
    let mut rmi = podman_background(&s.store, &["rmi", "-f", &s.image.id]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        rmi.try_wait().unwrap().is_none(),
        "podman rmi finished while the consumer held the lifetime fd"
    );
    let closed = Instant::now();
    drop(lifetime);
    let status =
        cstor_tests::session::wait_with_timeout(&mut rmi, Duration::from_secs(30)).unwrap();
    assert!(status.success(), "podman rmi failed: {status}");
    assert!(closed.elapsed() < Duration::from_secs(10));
    assert!(!s.store.image_exists(&s.image.id).unwrap());
}

#[test]
fn systemd_socket_activation_serves_the_passed_socket() {
    let test = "systemd_socket_activation_serves_the_passed_socket";
    if !skip::require_root(test)
        || !skip::require_tools(test, &["podman", "systemd-socket-activate"])
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, image) = small_private_store(dir.path()).unwrap();
    let layer = store.image_layers(&image.id).unwrap()[0].clone();
    let diff_id = store.layer_record(&layer).unwrap()["diff-digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let sock = dir.path().join("activated.sock");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("--listen")
        .arg(&sock)
        .arg(helper_binary().unwrap())
        .arg("--root")
        .arg(&store.root)
        .arg("--runroot")
        .arg(&store.runroot)
        .arg("--varlink");
    let helper = VarlinkHelper::start(cmd, &sock, &dir.path().join("helper.log"), false);
    runtime().block_on(async {
        let mut conn = helper.connect().await;
        let info = conn.get_info().await.unwrap().unwrap();
        assert!(
            info.features
                .iter()
                .any(|f| f == "source-containers-storage")
        );
        let fetched = get_layer(&mut conn, locator(&store.root, &layer, true))
            .await
            .unwrap();
        let repo = new_repo(&dir.path().join("repo"));
        tokio::task::spawn_blocking(move || drain(&repo, fetched, &diff_id))
            .await
            .unwrap()
            .unwrap();
    });
    // One process, started by the first connection, serves every later one.
    let again = raw(&sock, b"{\"method\":\"org.composefs.Oci.GetInfo\"}\0", 1).0;
    assert_eq!(
        again[0]["parameters"]["features"][0],
        json!("splitdirfdstream-v0")
    );
    drop(helper);
    store.destroy().unwrap();
}

/// Thousands of files, each an object of its own: the stream stays in step with the
/// consumer's opens and the stored layer is still the one cstor imports.
#[test]
fn a_layer_of_many_files_drains_like_cstor_imports_it() {
    let test = "a_layer_of_many_files_drains_like_cstor_imports_it";
    if !skip::require_root(test) || !skip::require_tools(test, &["podman"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (files, size) = (5000, 1024);
    let (store, image) = cstor_tests::many_files_store(
        &dir.path().join("store"),
        dir.path(),
        "localhost/varlink-many:latest",
        files,
        50,
        |i| format!("{i:0size$}"),
    )
    .unwrap();
    let helper = VarlinkHelper::for_store(&store, dir.path());
    let ours = new_repo(&dir.path().join("ours"));
    let theirs = new_repo(&dir.path().join("theirs"));
    runtime().block_on(async {
        let client = client_for(&store).await.unwrap();
        let report = import::import_image(&client, &ours, &image.name, &ImportOptions::default())
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let l = &report.layers[0];

        // Informative only (a debug build; the store just written flushed first, so that
        // the drain's syncfs does not pay for it).
        rustix::fs::sync();
        let started = Instant::now();
        let mut conn = helper.connect().await;
        let fetched = get_layer(&mut conn, locator(&store.root, &l.layer_id, true))
            .await
            .unwrap();
        let diff_id = l.diff_id.clone();
        let repo = theirs.clone();
        let verity = tokio::task::spawn_blocking(move || drain(&repo, fetched, &diff_id))
            .await
            .unwrap()
            .unwrap();
        let drained = started.elapsed();
        assert_eq!(verity.to_hex(), l.verity.to_hex());
        cstor_tests::note(&format!(
            "{files} files of {size} bytes: varlink GetLayer + upstream verified drain \
             {drained:.2?}"
        ));
    });
    drop(helper);
    store.destroy().unwrap();
}

/// Upstream's unverified drain (what composefs-oci's own containers-storage import uses).
fn drain_unverified(repo: &Repo, fetched: Fetched, diff_id: &str) -> Result<(), String> {
    let diff: OciDigest = diff_id.parse().unwrap();
    let _lifetime = fetched.lifetime;
    composefs_oci::layer_sync::drain_splitdirfdstream(
        repo.clone(),
        fetched.pipe,
        fetched.dirs,
        &diff,
        false,
        ImportContext::default(),
    )
    .map(|_| ())
    .map_err(|e| format!("{e:#}"))
}

/// The format has no end record, so a stream that merely stopped would be stored as a
/// shorter layer, even by upstream's drain that checks no diff id. A file changed on disk
/// (caught by the CRC-64 the helper checks on what it reads itself) or gone makes the
/// helper end the stream with a record no reader accepts, and nothing is stored.
#[test]
fn a_damaged_layer_fails_the_drain_instead_of_storing_a_shorter_one() {
    let Some(s) = small("a_damaged_layer_fails_the_drain_instead_of_storing_a_shorter_one") else {
        return;
    };
    let diff = s.store.layer_diff_dir(&s.layer);
    // Private, so that the helper reads it for a consumer without CAP_DAC_OVERRIDE; one
    // byte changed, the size kept.
    let data = diff.join("usr/share/data.txt");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[10] ^= 0x20;
    std::fs::write(&data, &bytes).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o600)).unwrap();
    let attempt = |what: &str| {
        runtime().block_on(async {
            let mut conn = s.helper.connect().await;
            let fetched = get_layer(&mut conn, locator(&s.store.root, &s.layer, false))
                .await
                .unwrap();
            let repo = new_repo(&s._dir.path().join(what));
            let diff_id = s.diff_id.clone();
            let r = {
                let repo = repo.clone();
                tokio::task::spawn_blocking(move || drain_unverified(&repo, fetched, &diff_id))
                    .await
                    .unwrap()
            };
            (r, stored(&repo, &s.diff_id))
        })
    };
    let (r, kept) = attempt("changed");
    let err = r.unwrap_err();
    assert!(err.contains("0xff"), "{err}");
    assert!(kept.is_none());
    assert!(
        s.helper.log_text().contains("CRC-64"),
        "{}",
        s.helper.log_text()
    );

    // A file gone from the layer: named files are looked up before they are named.
    std::fs::remove_file(&data).unwrap();
    let (r, kept) = attempt("missing");
    let err = r.unwrap_err();
    assert!(err.contains("0xff"), "{err}");
    assert!(kept.is_none());
    assert!(
        s.helper.log_text().contains("missing from the layer"),
        "{}",
        s.helper.log_text()
    );
}

/// Store B holds a base image; store A, with B as its additional image store, a layer
/// committed on top of it, whose parent and overlay lower link are in B.
fn stores_with_a_chain_across(dir: &Path) -> (PodmanStore, PodmanStore) {
    let (b, base) = small_private_store(&dir.join("b")).unwrap();
    let a = PodmanStore::new(&dir.join("a")).unwrap();
    let opt = format!("overlay.imagestore={}", b.root.display());
    let podman_a = |args: &[&str]| {
        let mut c = a.podman();
        c.args(["--storage-opt", &opt]).args(args);
        run_command(&mut c, "podman on store A with B as additional image store").unwrap()
    };
    let c = podman_a(&["create", &base.name, "/bin/true"]);
    let c = c.lines().last().unwrap().trim().to_owned();
    let m = podman_a(&["mount", &c]);
    std::fs::write(Path::new(m.trim()).join("etc/top"), "top layer\n").unwrap();
    podman_a(&["umount", &c]);
    podman_a(&["commit", "--quiet", &c, "localhost/top:latest"]);
    podman_a(&["rm", &c]);
    (a, b)
}

/// The helper's storage selection is the one every mode uses: a layer of an additional
/// image store is served under that store's path (and not under the graph root's), and a
/// layer of the graph root gets its lower directory from the additional store.
#[test]
fn layers_of_an_additional_image_store_are_served_under_its_path() {
    let test = "layers_of_an_additional_image_store_are_served_under_its_path";
    if !skip::require_root(test) || !skip::require_tools(test, &["podman"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = stores_with_a_chain_across(dir.path());
    let sock = dir.path().join("oci.sock");
    let mut cmd = Command::new(helper_binary().unwrap());
    cmd.arg("--root")
        .arg(&a.root)
        .arg("--runroot")
        .arg(&a.runroot)
        .arg("--additional-image-store")
        .arg(&b.root)
        .arg("--varlink")
        .arg(&sock);
    let helper = VarlinkHelper::start(cmd, &sock, &dir.path().join("helper.log"), false);
    // A's records, read directly: podman alone would not find the parent in B.
    let images = a.images_json().unwrap();
    let top = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["names"].to_string().contains("localhost/top"))
        .unwrap();
    let top_layer = top["layer"].as_str().unwrap().to_owned();
    let base_layer = a.layer_record(&top_layer).unwrap()["parent"]
        .as_str()
        .unwrap()
        .to_owned();
    let layers = [base_layer, top_layer];
    let diff_id = |store: &PodmanStore, id: &str| {
        store.layer_record(id).unwrap()["diff-digest"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let cases = [
        (&b, &layers[0], diff_id(&b, &layers[0]), 1),
        (&a, &layers[1], diff_id(&a, &layers[1]), 2),
    ];
    let repo = new_repo(&dir.path().join("repo"));
    runtime().block_on(async {
        let mut conn = helper.connect().await;
        for (store, layer, diff, dirs) in cases {
            let fetched = get_layer(&mut conn, locator(&store.root, layer, true))
                .await
                .unwrap();
            assert_eq!(fetched.dirs.len(), dirs);
            let repo = repo.clone();
            let diff = diff.clone();
            tokio::task::spawn_blocking(move || drain(&repo, fetched, &diff))
                .await
                .unwrap()
                .unwrap();
        }
        // The base layer is not the graph root's to serve.
        let e = get_layer(&mut conn, locator(&a.root, &layers[0], true))
            .await
            .err()
            .unwrap();
        assert_eq!(error_name(&e), "NoSuchLayer");
    });
    drop(helper);
    a.destroy().unwrap();
    b.destroy().unwrap();
}
