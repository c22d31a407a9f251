//! Story: on XFS, an import with two object workers puts each worker's new inodes in an
//! allocation group of its own, whatever `objects/XX` directory the object is named in, so
//! the workers do not queue on one group's inode (AGI) lock. Checked with `xfs_info`'s
//! geometry, not with the importer's own ioctl.

use std::path::Path;
use std::process::Command;

use cstor_tests::{loop_xfs_or_skip, run_command, skip};

/// `(agcount, bits of an inode number below the group number)` from `xfs_info MOUNTPOINT`.
fn xfs_groups(mountpoint: &Path) -> (u64, u32) {
    let out = run_command(Command::new("xfs_info").arg(mountpoint), "xfs_info").unwrap();
    let field = |name: &str| -> u64 {
        let at = out
            .find(&format!("{name}="))
            .unwrap_or_else(|| panic!("no {name}= in {out}"));
        out[at + name.len() + 1..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    };
    let agcount = field("agcount");
    let agsize = field("agsize");
    let bsize = field("bsize");
    let isize = field("isize");
    // Inode numbers: group, then block within the group (rounded up to a power of two),
    // then inode within the block.
    let agblklog = u64::BITS - (agsize - 1).leading_zeros();
    let inopblog = (bsize / isize).trailing_zeros();
    (agcount, agblklog + inopblog)
}

#[test]
fn each_object_worker_creates_inodes_in_its_own_allocation_group() {
    let test = "each_object_worker_creates_inodes_in_its_own_allocation_group";
    if !skip::require_root(test)
        || !skip::require_tools(test, &["podman", "tar", "mkfs.xfs", "xfs_info"])
    {
        return;
    }
    let Some(xfs) = loop_xfs_or_skip(test, 1 << 30) else {
        return;
    };
    let (agcount, shift) = xfs_groups(&xfs.mountpoint);
    if agcount < 4 {
        // mkfs.xfs gives a 1 GiB filesystem 4 groups; with fewer, two workers in groups of
        // their own look the same as objects in their directories' groups.
        cstor_tests::skip_or_fail(
            test,
            &format!("mkfs.xfs made {agcount} allocation groups; the story needs 4"),
        );
        return;
    }
    const FILES: usize = 800;
    let work = tempfile::tempdir().unwrap();
    let (store, _) = cstor_tests::many_files_store(
        &xfs.path("store"),
        work.path(),
        "localhost/placement:latest",
        FILES,
        40,
        |i| format!("{i:0>300}\n"),
    )
    .unwrap();
    let helper = cstor_tests::helper_binary().unwrap();
    let repo = xfs.path("repo");
    let out = run_command(
        Command::new(helper.with_file_name("cstor"))
            .args(["import", "--helper"])
            .arg(&helper)
            .arg("--root")
            .arg(&store.root)
            .arg("--runroot")
            .arg(&store.runroot)
            .args(["--json", "--jobs", "2", "--init", "--repo"])
            .arg(&repo)
            .arg("localhost/placement"),
        "importing onto XFS with two workers",
    )
    .unwrap();
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["objects"]["reflinked"], FILES as u64, "{report}");

    // Where the objects' directories are, and where their inodes are.
    let mut dir_groups = std::collections::BTreeSet::new();
    let mut inode_groups = std::collections::BTreeMap::<u64, usize>::new();
    for dir in std::fs::read_dir(repo.join("objects")).unwrap() {
        let dir = dir.unwrap();
        if !dir.file_type().unwrap().is_dir() {
            continue;
        }
        let mut has_objects = false;
        for obj in std::fs::read_dir(dir.path()).unwrap() {
            let ino = std::os::unix::fs::DirEntryExt::ino(&obj.unwrap());
            *inode_groups.entry(ino >> shift).or_default() += 1;
            has_objects = true;
        }
        if has_objects {
            dir_groups
                .insert(std::os::unix::fs::MetadataExt::ino(&dir.metadata().unwrap()) >> shift);
        }
    }
    let total: usize = inode_groups.values().sum();
    let mut counts: Vec<usize> = inode_groups.values().copied().collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let in_two: usize = counts.iter().take(2).sum();
    eprintln!(
        "{test}: objects named in directories of groups {dir_groups:?}; their inodes per group {inode_groups:?}"
    );
    // Without placement each object's inode would sit in its directory's group: spread
    // over all of them, as the directories are.
    assert!(dir_groups.len() >= 3, "{dir_groups:?}");
    // Every one of the workers' objects in two groups (composefs' own few objects, the
    // streams and the EROFS image, are made in objects/ and may sit anywhere).
    assert!(total >= FILES, "{inode_groups:?}");
    assert!(in_two >= FILES, "{inode_groups:?}");
    store.destroy().unwrap();
}
