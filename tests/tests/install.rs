//! Story: a packager stages cstor with `contrib/install.sh DESTDIR /usr`, from binaries that
//! are already built, and everything lands where a distribution expects it: `cstor` in
//! `bin/`, its helper in `libexec/cstor/`, a man page for cstor and each subcommand, bash,
//! zsh and fish completions, the licence texts. The staged `cstor --version` names itself,
//! its bash completion offers the subcommands, and it finds its helper beside it in
//! `../libexec/cstor/` with neither `CSTOR_HELPER` nor `PATH` pointing there; the same binary
//! copied out of that tree cannot find it (exit status 5).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use cstor_tests::{run_command, skip, workspace_root};

const TEST: &str = "a_packager_stages_cstor_and_it_finds_its_helper";

/// The words the staged bash completion offers after `cstor ` for `word`.
fn bash_complete(script: &Path, word: &str) -> Vec<String> {
    let out = run_command(
        Command::new("bash")
            .arg("-c")
            .arg(
                r#"source "$1" && complete -p cstor >/dev/null &&
                   COMP_WORDS=(cstor "$2") && COMP_CWORD=1 && _cstor cstor "$2" cstor &&
                   printf '%s\n' "${COMPREPLY[@]}""#,
            )
            .arg("bash")
            .arg(script)
            .arg(word),
        "completing with the installed bash completion",
    )
    .unwrap();
    let mut words: Vec<String> = out.lines().map(str::to_owned).collect();
    words.sort();
    words
}

/// Runs `cstor images` on an empty private store with no `CSTOR_HELPER` and a `PATH` that
/// holds no helper, so the helper can only be found relative to `cstor` itself.
fn images_without_help(cstor: &Path, store: &Path) -> Output {
    Command::new(cstor)
        .args(["images", "--json", "--root"])
        .arg(store.join("root"))
        .arg("--runroot")
        .arg(store.join("run"))
        .env_remove("CSTOR_HELPER")
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap()
}

#[test]
fn a_packager_stages_cstor_and_it_finds_its_helper() {
    if !skip::require_tools(TEST, &["bash", "install"]) {
        return;
    }
    // The binaries this test run uses; install.sh must take them, not build others.
    let helper = cstor_tests::helper_binary().unwrap();
    let profile_dir = helper.parent().unwrap();
    assert!(
        profile_dir.join("cstor").is_file(),
        "no cstor beside {}: run `cargo build --workspace --bins` first",
        helper.display()
    );
    let dest = tempfile::tempdir().unwrap();
    let out = run_command(
        Command::new("bash")
            .arg(workspace_root().join("contrib/install.sh"))
            .arg(dest.path())
            .arg("/usr")
            .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap())
            .env("CSTOR_PROFILE", profile_dir.file_name().unwrap())
            .env("CSTOR_INSTALL_NO_BUILD", "1")
            .current_dir(dest.path()),
        "installing into a staging directory",
    )
    .unwrap();
    let usr = dest.path().join("usr");

    for (file, executable) in [
        ("bin/cstor", true),
        ("libexec/cstor/cstor-helper", true),
        ("share/man/man1/cstor.1", false),
        ("share/man/man1/cstor-import.1", false),
        ("share/bash-completion/completions/cstor", false),
        ("share/zsh/site-functions/_cstor", false),
        ("share/fish/vendor_completions.d/cstor.fish", false),
        ("share/doc/cstor-proxy/LICENSE-MIT", false),
        ("share/doc/cstor-proxy/LICENSE-APACHE", false),
    ] {
        let path = usr.join(file);
        let meta = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{file} was not installed ({e}); install.sh said:\n{out}"));
        assert!(meta.is_file() && meta.len() > 0, "{file} is empty");
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(mode, if executable { 0o755 } else { 0o644 }, "{file}");
        assert!(
            out.contains(&format!("/usr/{file}")),
            "install.sh lists {file}"
        );
    }
    assert_eq!(
        std::fs::read(usr.join("libexec/cstor/cstor-helper")).unwrap(),
        std::fs::read(&helper).unwrap(),
        "the installed helper is the built one"
    );

    let cstor = usr.join("bin/cstor");
    let version = run_command(Command::new(&cstor).arg("--version"), "cstor --version").unwrap();
    assert_eq!(version, format!("cstor {}", env!("CARGO_PKG_VERSION")));

    let import_page = std::fs::read_to_string(usr.join("share/man/man1/cstor-import.1")).unwrap();
    assert!(
        import_page.replace("\\-", "-").contains("--copy-policy"),
        "cstor-import.1 documents --copy-policy"
    );

    // Completion: a prefix narrows the subcommands; every subcommand has its man page.
    let bash = usr.join("share/bash-completion/completions/cstor");
    assert_eq!(bash_complete(&bash, "im"), ["images", "import"]);
    let subcommands: Vec<String> = bash_complete(&bash, "")
        .into_iter()
        .filter(|w| !w.starts_with('-') && w != "help")
        .collect();
    for expected in [
        "images",
        "import",
        "inspect",
        "layer-tar",
        "mount",
        "verify",
    ] {
        assert!(subcommands.iter().any(|s| s == expected), "{subcommands:?}");
    }
    for sub in &subcommands {
        let page = usr.join(format!("share/man/man1/cstor-{sub}.1"));
        assert!(page.is_file(), "no man page for cstor {sub}");
    }

    // The installed cstor finds the installed helper, and only through libexec.
    if !skip::require_root(TEST) {
        return; // unprivileged, cstor would start the helper through podman unshare
    }
    let store = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(store.path().join("root")).unwrap();
    std::fs::create_dir_all(store.path().join("run")).unwrap();
    let listed = images_without_help(&cstor, store.path());
    assert!(listed.status.success(), "{listed:?}");
    let images: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        images,
        serde_json::json!([]),
        "an empty store lists no images"
    );

    let elsewhere = dest.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    cstor_tests::copy_executable(&cstor, &elsewhere.join("cstor")).unwrap();
    let lost = images_without_help(&elsewhere.join("cstor"), store.path());
    assert_eq!(lost.status.code(), Some(5), "{lost:?}");
    assert!(
        String::from_utf8_lossy(&lost.stderr).contains("cannot find cstor-helper"),
        "{lost:?}"
    );
}
