//! How file contents may get into the repository ([`CopyPolicy`], the caller's choice) and
//! how one file's did ([`Stored`], counted in the report).

/// How file contents get into the repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CopyPolicy {
    /// Reflink where possible, copy otherwise (and report why in the import report).
    #[default]
    ReflinkOrCopy,
    /// Reflink or fail: for callers that must not duplicate data, or whose security labels
    /// differ between stores so that a silent copy would be wrong.
    ReflinkOnly,
    /// Always copy (e.g. to measure, or to decouple the repository from podman's disk).
    CopyOnly,
    /// Reflink where possible; where not (ext4), **hardlink** the layer file itself into
    /// the repository, and copy only what cannot be linked.
    ///
    /// Zero-copy without reflinks, as upstream composefs does by default as root, but an
    /// explicit opt-in here because the object *is* the layer file: one inode, so its mode,
    /// owner, timestamps, xattrs and SELinux label are podman's, a later change to either
    /// side (chmod, relabel, an in-place write by a misbehaving tool) shows on both, and
    /// disk space stays in use until both the image and the object are gone. Needs a
    /// privileged caller (the kernel's `fs.protected_hardlinks` rule: owner or
    /// CAP_FOWNER) and an insecure repository (enabling fs-verity would change podman's
    /// file). Files with setuid/setgid bits or writable by group or others are copied, not
    /// linked: linking would make them reachable through the repository's object store.
    ReflinkOrHardlink,
}

/// How one object was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Cloned with FICLONE: no data written.
    Reflinked,
    /// Copied with copy_file_range.
    Copied,
    /// The layer file itself, hardlinked ([`CopyPolicy::ReflinkOrHardlink`]).
    Hardlinked,
    /// The repository already had it.
    AlreadyPresent,
}
