//! Story: a user names an image any way podman or skopeo would accept, and the helper finds
//! it; names that match nothing, or too much, get clear errors.

use cstor_protocol::ErrorCode;
use cstor_proxy_client::Error;
use cstor_tests::session::{client_for, runtime};
use cstor_tests::{skip, small_private_store};

#[test]
fn every_reference_form_resolves() {
    if !skip::require_tools("every_reference_form_resolves", &["podman"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, small) = small_private_store(dir.path()).unwrap();
    store
        .tag(&small.id, "docker.io/library/cstor-busybox:latest")
        .unwrap();
    store.tag(&small.id, "quay.io/cstor/tool:1.0").unwrap();
    let manifest_digest = store.image_record(&small.id).unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_owned();

    runtime().block_on(async {
        let client = client_for(&store).await.unwrap();
        let id = small.id.as_str();
        let forms = [
            id.to_owned(),
            format!("sha256:{id}"),
            id[..3].to_owned(),
            id[..12].to_owned(),
            small.name.clone(),
            format!("containers-storage:{}", small.name),
            "cstor-busybox".into(),
            "cstor-busybox:latest".into(),
            "library/cstor-busybox".into(),
            "docker.io/cstor-busybox".into(),
            "quay.io/cstor/tool:1.0".into(),
            format!("quay.io/cstor/tool@{manifest_digest}"),
            format!("whatever@{}", &id[..8]),
            format!("@{id}"),
            format!(
                "containers-storage:[overlay@{}+{}]{}",
                store.root.display(),
                store.runroot.display(),
                small.name
            ),
        ];
        for f in &forms {
            let img = client
                .get_image(f)
                .await
                .unwrap_or_else(|e| panic!("{f:?} did not resolve: {e}"));
            assert_eq!(img.id, small.id, "{f:?}");
        }
        // podman's localhost/ fallback for short names.
        let short = small
            .name
            .strip_prefix("localhost/")
            .unwrap()
            .trim_end_matches(":latest");
        assert_eq!(client.get_image(short).await.unwrap().id, small.id);

        let code = |r: Result<_, Error>| r.err().and_then(|e| e.code());
        assert_eq!(
            code(client.get_image("no-such-image").await),
            Some(ErrorCode::ImageNotFound)
        );
        assert_eq!(
            code(client.get_image("quay.io/cstor/tool:2.0").await),
            Some(ErrorCode::ImageNotFound)
        );
        // The digest exists, but under another repository.
        assert_eq!(
            code(
                client
                    .get_image(&format!("quay.io/other/tool@{manifest_digest}"))
                    .await
            ),
            Some(ErrorCode::ImageNotFound)
        );
        assert_eq!(
            code(client.get_image("Not/Valid").await),
            Some(ErrorCode::InvalidReference)
        );
        assert_eq!(
            code(client.get_image("[overlay@/elsewhere+/run/x]busybox").await),
            Some(ErrorCode::InvalidReference)
        );
        assert_eq!(
            code(client.get_image("[vfs@/x]busybox").await),
            Some(ErrorCode::UnsupportedDriver)
        );
        client.shutdown().await.unwrap();
    });
    store.destroy().unwrap();
}

/// Two images whose ids share a prefix: the prefix is refused with both candidates named.
#[test]
fn ambiguous_prefixes_name_their_candidates() {
    if !skip::require_tools("ambiguous_prefixes_name_their_candidates", &["podman"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, small) = small_private_store(dir.path()).unwrap();
    // Import more images until two ids share their first 3 hex digits (a few dozen at most,
    // by the birthday bound on 4096 prefixes), then ask for that prefix.
    let mut ids = vec![small.id.clone()];
    let rootfs = dir.path().join("extra");
    let mut found = None;
    for i in 0..200 {
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::write(rootfs.join("n"), format!("{i}")).unwrap();
        let tar = dir.path().join("extra.tar");
        cstor_tests::tar_rootfs(&rootfs, &tar).unwrap();
        let id = store
            .import_tar(&tar, &format!("localhost/extra:{i}"))
            .unwrap();
        if let Some(other) = ids.iter().find(|o| o[..3] == id[..3]) {
            found = Some((other.clone(), id.clone()));
            break;
        }
        ids.push(id);
    }
    let (a, b) = found.expect("no shared 3-digit prefix among 200 ids");
    runtime().block_on(async {
        let client = client_for(&store).await.unwrap();
        let err = client.get_image(&a[..3]).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::AmbiguousReference), "{err}");
        let Error::Remote { error, .. } = &err else {
            panic!("{err}")
        };
        let mut cands = error.data.as_ref().unwrap().candidates.clone();
        cands.sort();
        let mut want = vec![a.clone(), b.clone()];
        want.sort();
        assert_eq!(cands, want);
        client.shutdown().await.unwrap();
    });
    store.destroy().unwrap();
}
