//! The ostree methods (capability [`crate::capability::OSTREE`]): a helper opens an ostree
//! repository read-only, resolves refs, serves metadata objects as verified bytes and file
//! objects as fds with their metadata, so that a client can import a commit into composefs.
//!
//! A client walks a commit in a bounded number of round trips: one `ResolveOstreeRef`, one
//! `GetOstreeObjects` per level of the tree (every dirtree and dirmeta of a level at once),
//! and one `OpenOstreeFiles` per batch of up to `limits.max_fds_per_message` files.
//! [`format`] decodes the objects; [`gvariant`] is the serialisation they use.

pub mod format;
pub mod gvariant;

use serde::{Deserialize, Serialize};

/// Method names of the ostree capability.
pub mod method {
    /// Open a repository: read its mode, take its shared lock, return a handle.
    pub const OPEN_OSTREE_REPO: &str = "OpenOstreeRepo";
    /// Resolve a ref, `REMOTE:REF`, commit checksum or unique checksum prefix to a commit.
    pub const RESOLVE_OSTREE_REF: &str = "ResolveOstreeRef";
    /// Read metadata objects (commit, dirtree, dirmeta), checksums verified.
    pub const GET_OSTREE_OBJECTS: &str = "GetOstreeObjects";
    /// Open file objects: metadata plus a content fd per regular file.
    pub const OPEN_OSTREE_FILES: &str = "OpenOstreeFiles";
    /// Release a repository handle and its lock.
    pub const CLOSE_OSTREE_REPO: &str = "CloseOstreeRepo";

    /// Every method of the ostree capability.
    pub const ALL: &[&str] = &[
        OPEN_OSTREE_REPO,
        RESOLVE_OSTREE_REF,
        GET_OSTREE_OBJECTS,
        OPEN_OSTREE_FILES,
        CLOSE_OSTREE_REPO,
    ];
}

/// Most metadata bytes one `GetOstreeObjects` reply carries (before base64); objects past
/// it are left for the next request. A single larger object is still served alone.
pub const MAX_OBJECT_BYTES_PER_REPLY: u64 = 8 << 20;

/// Most objects one `GetOstreeObjects` request may name.
pub const MAX_OBJECTS_PER_REQUEST: usize = 512;

/// The largest metadata object served.
pub const MAX_METADATA_OBJECT: u64 = 32 << 20;

/// How an ostree repository stores objects (`core.mode` in its `config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RepoMode {
    /// Files as themselves, with owner, mode and xattrs on the inode.
    Bare,
    /// Files owned by the repository's user; the real owner, mode and xattrs in the
    /// `user.ostreemeta` xattr; symlinks as regular files holding the target.
    BareUser,
    /// Files owned by the repository's user, no owners or xattrs at all.
    BareUserOnly,
    /// `.filez` objects: a header, then the raw-deflate content (`archive` or `archive-z2`).
    Archive,
}

/// The three metadata object types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectType {
    /// `.commit`.
    Commit,
    /// `.dirtree`.
    Dirtree,
    /// `.dirmeta`.
    Dirmeta,
}

impl ObjectType {
    /// The object file's extension.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Commit => "commit",
            Self::Dirtree => "dirtree",
            Self::Dirmeta => "dirmeta",
        }
    }
}

/// Params of `OpenOstreeRepo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenOstreeRepoParams {
    /// The repository directory (the one holding `config` and `objects/`), absolute.
    pub path: String,
}

/// Result of `OpenOstreeRepo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenOstreeRepoResult {
    /// Names the repository in the other ostree methods.
    pub repo: u64,
    /// The repository mode.
    pub mode: RepoMode,
    /// Whether the helper holds ostree's shared repository lock (false when the repository
    /// has no `.lock` file yet, which a read-only helper does not create).
    pub locked: bool,
}

/// Params naming an open repository (`CloseOstreeRepo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OstreeRepoHandle {
    /// The handle `OpenOstreeRepo` returned.
    pub repo: u64,
}

/// Params of `ResolveOstreeRef`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolveOstreeRefParams {
    /// The repository handle.
    pub repo: u64,
    /// A ref (`fedora/40/x86_64`), `REMOTE:REF`, a commit checksum (64 hex digits) or a
    /// unique prefix of one (at least 4 hex digits).
    #[serde(rename = "ref")]
    pub reference: String,
}

/// Result of `ResolveOstreeRef`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolveOstreeRefResult {
    /// The commit checksum, 64 lowercase hex digits.
    pub commit: String,
    /// The ref file that named it, relative to the repository (`refs/heads/main`); absent
    /// when the argument was a checksum or a prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_file: Option<String>,
}

/// One metadata object, named by checksum and type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectName {
    /// 64 lowercase hex digits.
    pub checksum: String,
    /// The object type.
    #[serde(rename = "type")]
    pub kind: ObjectType,
}

/// Params of `GetOstreeObjects`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetOstreeObjectsParams {
    /// The repository handle.
    pub repo: u64,
    /// Up to [`MAX_OBJECTS_PER_REQUEST`] objects.
    pub objects: Vec<ObjectName>,
}

/// Result of `GetOstreeObjects`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetOstreeObjectsResult {
    /// The first objects asked for, in order, each checked against its checksum; fewer than
    /// asked when [`MAX_OBJECT_BYTES_PER_REPLY`] was reached (at least one).
    pub objects: Vec<OstreeObject>,
}

/// A metadata object's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OstreeObject {
    /// 64 lowercase hex digits.
    pub checksum: String,
    /// The object type.
    #[serde(rename = "type")]
    pub kind: ObjectType,
    /// The object's bytes, base64 (standard alphabet, padded).
    pub data: String,
}

/// Params of `OpenOstreeFiles`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenOstreeFilesParams {
    /// The repository handle.
    pub repo: u64,
    /// File object checksums; at most `limits.max_fds_per_message`.
    pub files: Vec<String>,
}

/// Result of `OpenOstreeFiles`; the reply carries one fd per file that has `fd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenOstreeFilesResult {
    /// One entry per checksum asked for, in order.
    pub files: Vec<OstreeFile>,
}

/// How a file's content is encoded in its fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContentEncoding {
    /// The content itself, from offset 0.
    Raw,
    /// A raw deflate stream (RFC 1951, no zlib header) from `content_offset`: an archive
    /// object, passed as stored; the client inflates it.
    Deflate,
}

/// A file object's metadata, as ostree checksums it, and where its content is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OstreeFile {
    /// 64 lowercase hex digits.
    pub checksum: String,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// `st_mode`, file type bits included.
    pub mode: u32,
    /// Content size (uncompressed); 0 for symlinks.
    pub size: u64,
    /// Extended attributes as ostree checksums them: sorted, names ending with a NUL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
    /// For a symlink, its target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
    /// For a regular file of at least one byte: the index of its content fd in the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<u32>,
    /// With `fd`: how the content is encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<ContentEncoding>,
    /// With `fd`: where the (possibly compressed) content starts in it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub content_offset: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One extended attribute, exact bytes in base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    /// The name as ostree stores it (with a trailing NUL), base64.
    pub name: String,
    /// The value, base64.
    pub value: String,
}
