//! Storing file contents as repository objects: reflink (FICLONE) where the filesystem
//! allows, a kernel-side copy otherwise, and a hardlink to the source only when the caller
//! opted into [`CopyPolicy::ReflinkOrHardlink`].
//!
//! The source fd belongs to containers-storage. By default we clone or copy its bytes into
//! an `O_TMPFILE` of the repository and link that under the object's name, so the object
//! never shares an inode (mode, owner, SELinux label, fs-verity state) with the layer file.
//!
//! - `policy`: what the caller allows ([`CopyPolicy`]) and how a file was stored
//!   ([`Stored`]);
//! - `source`: a layer file and the checks that it holds what tar-split recorded;
//! - `store`: storing one file: look-up, reflink, copy or hardlink, checks, naming;
//! - `reflink_or_copy`: filling an object's tmpfile from the layer file;
//! - `naming`: object paths, tmpfiles in `objects/XX`, and the `linkat` that names them;
//! - `worker_state`: what the workers of one import learn and share ([`WorkerState`]);
//! - `pool`: the worker threads ([`Pool`]), fed through `job_queue` and given tmpfile
//!   directories by `placement`.

mod job_queue;
mod naming;
pub(crate) mod placement;
mod policy;
mod pool;
mod reflink_or_copy;
mod source;
mod store;
mod worker_state;

pub(crate) use naming::link_tmpfile;
pub use policy::{CopyPolicy, Stored};
pub use pool::{JobResult, Pool, Submission};
pub(crate) use source::{Expected, Source, assemble_error, check_crc, read_error, unless_stopped};
pub(crate) use store::{object_tmpfile_in, store_as, store_filled};
pub use worker_state::WorkerState;

/// Layer files for the tests of this module.
#[cfg(test)]
mod test_files {
    use std::fs::File;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use composefs::fsverity::{Algorithm, Sha512HashValue};
    use composefs::repository::{Repository, RepositoryConfig};

    pub fn insecure_repo(dir: &Path) -> Repository<Sha512HashValue> {
        let config = RepositoryConfig::new(Algorithm::SHA512).set_insecure();
        Repository::init_path(rustix::fs::CWD, dir, config)
            .expect("a repository in a temp dir")
            .0
    }

    /// `dir/name` holding `content` with permissions `mode`, opened for reading.
    pub fn source(dir: &Path, name: &str, content: &[u8], mode: u32) -> File {
        let path = dir.join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        File::open(&path).unwrap()
    }
}
