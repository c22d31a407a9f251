//! The command line: global flags, the subcommands, and the storage and helper flags of
//! the subcommands that read containers-storage.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::exit;

/// Move container images out of containers-storage, zero-copy, through cstor-helper.
#[derive(Debug, Parser)]
#[command(
    name = "cstor",
    version,
    about,
    long_about = "Move container images out of podman's containers-storage without copying \
                  them, and without root: a small read-only helper (cstor-helper) opens the \
                  files of each layer and passes them as file descriptors, and cstor reflinks \
                  them into a composefs repository.",
    after_help = exit::HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More logging on stderr (repeat for more); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Errors only on stderr: no progress bars, notices or warnings.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Progress bars on stderr: when it is a terminal (auto), always or never.
    #[arg(long, global = true, value_enum, default_value_t = ProgressWhen::Auto)]
    pub progress: ProgressWhen,
}

/// When to draw progress bars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressWhen {
    /// When stderr is a terminal, and neither --json nor --quiet was given.
    Auto,
    /// Always (even into a pipe or a log).
    Always,
    /// Never.
    Never,
}

/// Which storage to read (default: storage.conf as podman reads it).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Storage")]
pub struct StorageArgs {
    /// Storage root (graphroot); default: storage.conf as podman reads it.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Run root.
    #[arg(long, value_name = "DIR")]
    pub runroot: Option<PathBuf>,
    /// Separate image store.
    #[arg(long, value_name = "DIR")]
    pub imagestore: Option<PathBuf>,
    /// Storage driver (only overlay is supported).
    #[arg(long, value_name = "NAME")]
    pub storage_driver: Option<String>,
    /// Storage driver option (repeatable), replacing storage.conf's.
    #[arg(long = "storage-opt", value_name = "OPT")]
    pub storage_opts: Vec<String>,
    /// Additional read-only image store (repeatable).
    #[arg(long = "additional-image-store", value_name = "DIR")]
    pub additional_image_stores: Vec<PathBuf>,
    /// Read only this storage.conf.
    #[arg(long, value_name = "FILE")]
    pub storage_conf: Option<PathBuf>,
    #[command(flatten)]
    pub helper: HelperArgs,
}

/// How to run the helper.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Helper")]
pub struct HelperArgs {
    /// The helper binary (default: $CSTOR_HELPER, next to cstor, ../libexec/cstor/, then
    /// $PATH).
    #[arg(long, value_name = "PATH")]
    pub helper: Option<PathBuf>,
    /// How to run the helper: directly (root), under `podman unshare` (rootless), or decide.
    #[arg(long, value_enum, default_value_t = PrivilegeArg::Auto)]
    pub privilege: PrivilegeArg,
    /// Seconds the helper may take to answer a request (it is pinged every 10 s while a
    /// layer streams); one that does not is taken as frozen and killed (exit status 5).
    #[arg(long, value_name = "SECS", default_value = "45", value_parser = positive_seconds)]
    pub helper_timeout: std::time::Duration,
}

fn positive_seconds(v: &str) -> Result<std::time::Duration, String> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(|| format!("{v:?} is not a number of seconds between 0 and 86400"))
}

/// `--privilege`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PrivilegeArg {
    /// Directly when this process can read every file (root), else through podman unshare.
    Auto,
    /// Directly.
    Direct,
    /// Through `podman unshare`.
    Unshare,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List images.
    Images {
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Show an image: id, names, digests, layers.
    Inspect {
        /// Image reference, with or without `containers-storage:`.
        image: String,
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Write one layer's uncompressed tar, bit-exact, to stdout (or --output).
    LayerTar {
        /// Image reference.
        image: String,
        /// Layer index (0 = base) or diff id (sha256:...).
        layer: String,
        /// Write here instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Rebuild every layer of an image and check its CRCs and diff id.
    Verify {
        /// Image reference.
        image: String,
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Import an image into a composefs repository, zero-copy where the filesystem allows.
    Import(ImportArgs),
    /// Copy an image from another composefs repository (as `cfsctl oci copy`), reflinked
    /// where both share a filesystem, every object checked against its name.
    Copy(CopyArgs),
    /// ostree commits: import one into a composefs repository.
    Ostree {
        #[command(subcommand)]
        command: OstreeCommand,
    },
    /// Mount an imported image read-only (composefs; needs root). Unmount with umount.
    Mount {
        /// The tag given at import (e.g. containers-storage:localhost/myimage).
        tag: String,
        /// Where to mount it.
        mountpoint: PathBuf,
        /// The composefs repository (same default as import).
        #[arg(long, value_name = "DIR")]
        repo: Option<PathBuf>,
    },
    /// Print a shell completion script for cstor.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages for cstor and its subcommands into a directory.
    Man {
        /// The directory (created if missing).
        dir: PathBuf,
    },
}

/// `cstor import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Image reference, with or without `containers-storage:`.
    pub image: String,
    /// The composefs repository (default: /sysroot/composefs as root, else
    /// ~/.var/lib/composefs, like cfsctl).
    #[arg(long, value_name = "DIR")]
    pub repo: Option<PathBuf>,
    /// Create the repository if it does not exist (as `cfsctl init` does; insecure when the
    /// filesystem has no fs-verity).
    #[arg(long)]
    pub init: bool,
    /// Tag to write (default: containers-storage:IMAGE, as `cfsctl oci pull` names it).
    #[arg(long, value_name = "NAME", value_parser = non_empty_tag)]
    pub tag: Option<String>,
    /// How file contents get into the repository.
    #[arg(long, value_enum, default_value_t = CopyPolicyArg::ReflinkOrCopy)]
    pub copy_policy: CopyPolicyArg,
    /// Threads storing objects (default: the number of CPUs).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=MAX_JOBS))]
    pub jobs: Option<u16>,
    /// Also write the boot variant of the EROFS image (as `cfsctl oci pull --bootable`).
    #[arg(long, conflicts_with = "repo_service")]
    pub bootable: bool,
    /// Import through the composefs repository service on this socket (`cfsctl varlink
    /// --address SOCKET`), which opens --repo and writes it: the layers go to it as
    /// splitdirfdstreams from a second helper.
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["init", "jobs"])]
    pub repo_service: Option<PathBuf>,
    #[command(flatten)]
    pub storage: StorageArgs,
}

/// `cstor copy`.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The image in the source repository: a tag, or `@sha256:<manifest digest>`.
    pub image: String,
    /// The source composefs repository (with --from-service: its path as the service opens
    /// it; default: the service's system repository).
    #[arg(long, value_name = "DIR", required_unless_present = "from_service")]
    pub from: Option<PathBuf>,
    /// Read the source through a composefs repository service (`cfsctl varlink --address
    /// SOCKET`) instead of opening it: for a repository this user cannot read.
    #[arg(long, value_name = "SOCKET")]
    pub from_service: Option<PathBuf>,
    /// The destination repository (same default as `cstor import`).
    #[arg(long, value_name = "DIR")]
    pub repo: Option<PathBuf>,
    /// Create the destination repository if it does not exist.
    #[arg(long)]
    pub init: bool,
    /// Tag to write (default: the source's tag; required when IMAGE is a digest).
    #[arg(long, value_name = "NAME", value_parser = non_empty_tag)]
    pub tag: Option<String>,
    /// How file contents get into the destination.
    #[arg(long, value_enum, default_value_t = CopyPolicyArg::ReflinkOrCopy)]
    pub copy_policy: CopyPolicyArg,
    /// Threads storing objects (default: the number of CPUs).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=MAX_JOBS))]
    pub jobs: Option<u16>,
    /// Also write the boot variant of the EROFS image.
    #[arg(long)]
    pub bootable: bool,
}

/// `cstor ostree` subcommands.
#[derive(Debug, Subcommand)]
pub enum OstreeCommand {
    /// Import an ostree commit in the layout `cfsctl ostree pull-local` writes.
    Import(OstreeImportArgs),
}

/// `cstor ostree import`.
#[derive(Debug, Args)]
pub struct OstreeImportArgs {
    /// The ostree repository (the directory holding `config` and `objects/`).
    pub ostree_repo: PathBuf,
    /// A ref (`fedora/40/x86_64`, `REMOTE:REF`), a commit checksum or a unique prefix.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// The composefs repository (same default as `cstor import`).
    #[arg(long, value_name = "DIR")]
    pub repo: Option<PathBuf>,
    /// Create the repository if it does not exist.
    #[arg(long)]
    pub init: bool,
    /// Name to give the commit (default: REF when it is a ref; a checksum gets no name).
    #[arg(long, value_name = "NAME", value_parser = non_empty_tag)]
    pub tag: Option<String>,
    /// How file contents get into the repository (archive repositories are always copied:
    /// their contents are compressed).
    #[arg(long, value_enum, default_value_t = CopyPolicyArg::ReflinkOrCopy)]
    pub copy_policy: CopyPolicyArg,
    #[command(flatten)]
    pub helper: HelperArgs,
}

/// Most object threads `--jobs` takes: each holds buffers and fds; more than the machine's
/// cores gains nothing.
pub const MAX_JOBS: i64 = 256;

/// `--copy-policy`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CopyPolicyArg {
    /// Reflink where possible, copy otherwise.
    ReflinkOrCopy,
    /// Reflink or fail (exit status 7).
    ReflinkOnly,
    /// Always copy.
    Copy,
    /// Reflink where possible, else hardlink the layer file itself (privileged callers,
    /// insecure repositories; the object shares podman's inode), else copy.
    ReflinkOrHardlink,
}

impl From<CopyPolicyArg> for cstor_import::CopyPolicy {
    fn from(p: CopyPolicyArg) -> Self {
        match p {
            CopyPolicyArg::ReflinkOrCopy => Self::ReflinkOrCopy,
            CopyPolicyArg::ReflinkOnly => Self::ReflinkOnly,
            CopyPolicyArg::Copy => Self::CopyOnly,
            CopyPolicyArg::ReflinkOrHardlink => Self::ReflinkOrHardlink,
        }
    }
}

fn non_empty_tag(v: &str) -> Result<String, String> {
    if v.trim().is_empty() {
        Err("a tag cannot be empty".into())
    } else if v.contains('\0') {
        Err("a tag cannot contain a NUL byte".into())
    } else {
        Ok(v.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::Cli;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn jobs_out_of_range_and_empty_tags_are_usage_errors() {
        for args in [
            &["cstor", "import", "--jobs", "0", "x"][..],
            &["cstor", "import", "--jobs", "100000", "x"],
            &["cstor", "import", "--tag", "", "x"],
        ] {
            let e = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        }
        assert!(Cli::try_parse_from(["cstor", "import", "--jobs", "4", "x"]).is_ok());
    }

    #[test]
    fn storage_flags_belong_to_the_commands_that_read_storage() {
        assert!(Cli::try_parse_from(["cstor", "images", "--root", "/x"]).is_ok());
        assert!(Cli::try_parse_from(["cstor", "mount", "--root", "/x", "t", "/m"]).is_err());
        assert!(Cli::try_parse_from(["cstor", "completions", "bash", "--root", "/x"]).is_err());
    }
}
