//! Story: a script drives `cstor` and relies on its exit statuses and its stderr. Bad
//! command lines are refused before anything runs (status 2, with the allowed values);
//! things that do not exist are "not found" (3) whether the image, the layer or the
//! transport is wrong; and what cstor logs into a pipe or a file is plain text.

use std::process::{Command, Output};

use cstor_tests::standard_images_or_skip;

fn cstor(args: &[&str]) -> Output {
    let helper = cstor_tests::helper_binary().unwrap();
    Command::new(helper.with_file_name("cstor"))
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_command_lines_exit_2_and_say_what_is_allowed() {
    for (args, says) in [
        (&["import", "--jobs", "0", "x"][..], "1..=256"),
        (&["import", "--jobs", "100000", "x"], "1..=256"),
        (&["import", "--tag", "", "x"], "tag cannot be empty"),
        (&["import", "--helper-timeout", "soon", "x"], "seconds"),
        (&["import", "--helper-timeout", "0", "x"], "seconds"),
        (&["mount", "--root", "/x", "tag", "/mnt"], "--root"),
        (&["images", "--progress", "sometimes"], "always"),
        // A repository service stores files its own way: it cannot be told to copy them,
        // or to refuse anything but reflinks.
        (
            &[
                "import",
                "--repo-service",
                "/nonexistent.sock",
                "--copy-policy",
                "copy",
                "x",
            ],
            "cannot be asked of a repository service",
        ),
        (
            &[
                "import",
                "--repo-service",
                "/nonexistent.sock",
                "--copy-policy",
                "reflink-only",
                "x",
            ],
            "reflink-only cannot be asked",
        ),
        (&["import", "--repo-service", "/s", "--init", "x"], "--init"),
    ] {
        let o = cstor(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn what_does_not_exist_exits_3() {
    let test = "what_does_not_exist_exits_3";
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let helper = cstor_tests::helper_binary().unwrap();
    let store = &images.store;
    let with_store = |sub: &str, rest: &[&str]| {
        let mut a = vec![sub.to_owned(), "--helper".into()];
        a.push(helper.display().to_string());
        a.extend(["--root".into(), store.root.display().to_string()]);
        a.extend(["--runroot".into(), store.runroot.display().to_string()]);
        a.extend(rest.iter().map(|s| s.to_string()));
        a
    };
    for args in [
        with_store("inspect", &["localhost/no-such-image"]),
        with_store("layer-tar", &[&images.small.name, "99"]),
        with_store("layer-tar", &[&images.small.name, "sha256:0000"]),
        with_store("inspect", &["docker://busybox"]),
        with_store("import", &["--repo", "/nonexistent", "oci:/tmp/x"]),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = cstor(&args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", stderr(&o));
    }
    let o = cstor(&[
        "inspect",
        "--root",
        &store.root.display().to_string(),
        "docker://busybox",
    ]);
    assert!(
        stderr(&o).contains("unsupported transport"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn logs_into_a_pipe_are_plain_text() {
    let test = "logs_into_a_pipe_are_plain_text";
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let helper = cstor_tests::helper_binary().unwrap();
    // -vv: the client logs at debug level; stderr is a pipe here.
    let o = cstor(&[
        "-vv",
        "inspect",
        "--helper",
        &helper.display().to_string(),
        "--root",
        &images.store.root.display().to_string(),
        "--runroot",
        &images.store.runroot.display().to_string(),
        &images.small.name,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("DEBUG"), "debug lines expected: {err}");
    assert!(!err.contains('\u{1b}'), "colour codes in a pipe: {err:?}");
}
