//! Reading ostree objects: metadata objects as checked bytes, file objects as metadata plus
//! an open content file, in each repository mode.
//!
//! Where a file's metadata lives depends on the mode: on the inode (bare), in the
//! `user.ostreemeta` xattr (bare-user), nowhere but the mode bits (bare-user-only), or in the
//! header of the `.filez` object (archive). Whatever the source, it is returned in the form
//! ostree hashes: xattr names with their trailing NUL, sorted bytewise, so a client can
//! recompute the object's checksum from what it receives.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use cstor_protocol::ErrorCode;
use cstor_protocol::ostree::format::{ArchiveHeader, Checksum, Meta, metadata_checksum};
use cstor_protocol::ostree::{ContentEncoding, MAX_METADATA_OBJECT, ObjectType, RepoMode};
use rustix::fs::{FileType, OFlags};

use super::OstreeRepo;
use super::refs::object_path;
use crate::confine;
use crate::error::{Error, Result};

/// The most bytes of metadata a file header may hold (archive header, `user.ostreemeta`):
/// the kernel's largest xattr list and value bound what ostree could have recorded.
const MAX_HEADER: usize = 1 << 20;

/// A file object's metadata and, for a non-empty regular file, its content.
#[derive(Debug)]
pub struct FileObject {
    /// Owner, mode (type bits included) and xattrs as ostree hashes them.
    pub meta: Meta,
    /// Uncompressed content size; 0 for symlinks.
    pub size: u64,
    /// A symlink's target.
    pub symlink_target: Option<String>,
    /// A regular file's content, when it has at least one byte.
    pub content: Option<Content>,
}

/// Where a file's content is.
#[derive(Debug)]
pub struct Content {
    /// The open object file.
    pub file: File,
    /// How the content is encoded in it.
    pub encoding: ContentEncoding,
    /// Where the content starts in it.
    pub offset: u64,
}

fn corrupt(what: String, path: &Path) -> Error {
    Error::new(ErrorCode::CorruptMetadata, what).path(path.display().to_string())
}

impl OstreeRepo {
    fn open_object_error(&self, e: std::io::Error, what: &str, path: &Path) -> Error {
        let missing = e.kind() == std::io::ErrorKind::NotFound;
        let err = Error::io(format!("opening {what} {}", path.display()), e)
            .path(path.display().to_string());
        if missing {
            err.with_code(ErrorCode::MissingFile)
        } else {
            err
        }
    }

    /// Reads metadata object `checksum` of type `kind` and checks that its SHA-256 is its
    /// name ([`ErrorCode::ChecksumMismatch`] otherwise, naming the object).
    pub fn read_metadata(&self, checksum: &Checksum, kind: ObjectType) -> Result<Vec<u8>> {
        let path = object_path(checksum, kind.extension());
        let what = format!("{} object", kind.extension());
        let bytes = confine::read_small(self.root.fd(), &path, MAX_METADATA_OBJECT)
            .map_err(|e| self.open_object_error(e, &what, &path))?;
        let actual = metadata_checksum(&bytes);
        if actual != *checksum {
            return Err(Error::new(
                ErrorCode::ChecksumMismatch,
                format!(
                    "{what} {} is corrupt: its content has checksum {}",
                    hex::encode(checksum),
                    hex::encode(actual)
                ),
            )
            .path(path.display().to_string()));
        }
        Ok(bytes)
    }

    /// Opens file object `checksum`: its metadata, and its content file when it is a regular
    /// file of at least one byte. The content is not checked here.
    pub fn open_file(&self, checksum: &Checksum) -> Result<FileObject> {
        let ext = if self.mode == RepoMode::Archive {
            "filez"
        } else {
            "file"
        };
        let path = object_path(checksum, ext);
        match self.mode {
            RepoMode::Archive => self.open_archive_file(&path),
            RepoMode::BareUser => self.open_bare_user_file(&path),
            RepoMode::Bare | RepoMode::BareUserOnly => self.open_bare_file(&path),
        }
    }

    /// bare and bare-user-only: the object is the file itself (a symlink is a symlink).
    fn open_bare_file(&self, path: &Path) -> Result<FileObject> {
        // O_PATH: a symlink is opened as itself, and nothing is read yet.
        let pfd = confine::openat_beneath(self.root.fd(), path, OFlags::PATH | OFlags::NOFOLLOW)
            .map_err(|e| self.open_object_error(e, "file object", path))?;
        let st = rustix::fs::fstat(&pfd)
            .map_err(|e| Error::io(format!("inspecting {}", path.display()), e.into()))?;
        let ftype = FileType::from_raw_mode(st.st_mode);
        let user_only = self.mode == RepoMode::BareUserOnly;
        let (uid, gid) = if user_only {
            (0, 0)
        } else {
            (st.st_uid, st.st_gid)
        };
        match ftype {
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(&pfd, "", Vec::new())
                    .map_err(|e| Error::io(format!("reading {}", path.display()), e.into()))?;
                let target = target.into_string().map_err(|_| {
                    corrupt(format!("symlink {} is not UTF-8", path.display()), path)
                })?;
                let xattrs = if user_only {
                    Vec::new()
                } else {
                    proc_fd_xattrs(&pfd).map_err(|e| {
                        Error::io(format!("reading xattrs of {}", path.display()), e)
                    })?
                };
                Ok(FileObject {
                    meta: Meta {
                        uid,
                        gid,
                        mode: st.st_mode,
                        xattrs,
                    },
                    size: 0,
                    symlink_target: Some(target),
                    content: None,
                })
            }
            FileType::RegularFile => {
                let (file, size) = confine::open_regular_sized(self.root.fd(), path)
                    .map_err(|e| self.open_object_error(e, "file object", path))?;
                rustix::fs::fcntl_setfl(&file, OFlags::empty())
                    .map_err(|e| Error::io("clearing O_NONBLOCK", e.into()))?;
                let xattrs = if user_only {
                    Vec::new()
                } else {
                    fd_xattrs(&file).map_err(|e| {
                        Error::io(format!("reading xattrs of {}", path.display()), e)
                    })?
                };
                Ok(FileObject {
                    meta: Meta {
                        uid,
                        gid,
                        mode: st.st_mode,
                        xattrs,
                    },
                    size,
                    symlink_target: None,
                    content: (size > 0).then_some(Content {
                        file,
                        encoding: ContentEncoding::Raw,
                        offset: 0,
                    }),
                })
            }
            other => Err(Error::new(
                ErrorCode::Unsupported,
                format!("file object {} is a {other:?}", path.display()),
            )
            .path(path.display().to_string())),
        }
    }

    /// bare-user: a regular file whose real metadata is `user.ostreemeta`; a symlink's
    /// target is the file's content (ostree writes it with a trailing NUL).
    fn open_bare_user_file(&self, path: &Path) -> Result<FileObject> {
        let (mut file, size) = confine::open_regular_sized(self.root.fd(), path)
            .map_err(|e| self.open_object_error(e, "file object", path))?;
        rustix::fs::fcntl_setfl(&file, OFlags::empty())
            .map_err(|e| Error::io("clearing O_NONBLOCK", e.into()))?;
        let mut buf = vec![0u8; MAX_HEADER];
        let n = rustix::fs::fgetxattr(&file, "user.ostreemeta", &mut buf[..]).map_err(|e| {
            Error::io(
                format!("reading user.ostreemeta of {}", path.display()),
                e.into(),
            )
            .path(path.display().to_string())
        })?;
        let meta = Meta::decode(&buf[..n])
            .map_err(|e| corrupt(format!("user.ostreemeta of {}: {e}", path.display()), path))?;
        match FileType::from_raw_mode(meta.mode) {
            FileType::Symlink => {
                let mut target = Vec::new();
                (&mut file)
                    .take(64 << 10)
                    .read_to_end(&mut target)
                    .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                if target.last() == Some(&0) {
                    target.pop();
                }
                let target = String::from_utf8(target).map_err(|_| {
                    corrupt(format!("symlink {} is not UTF-8", path.display()), path)
                })?;
                Ok(FileObject {
                    meta,
                    size: 0,
                    symlink_target: Some(target),
                    content: None,
                })
            }
            FileType::RegularFile => Ok(FileObject {
                meta,
                size,
                symlink_target: None,
                content: (size > 0).then_some(Content {
                    file,
                    encoding: ContentEncoding::Raw,
                    offset: 0,
                }),
            }),
            other => Err(Error::new(
                ErrorCode::Unsupported,
                format!("file object {} is a {other:?}", path.display()),
            )
            .path(path.display().to_string())),
        }
    }

    /// archive: a header, then the raw-deflate content, which is passed as stored.
    fn open_archive_file(&self, path: &Path) -> Result<FileObject> {
        let (file, len) = confine::open_regular_sized(self.root.fd(), path)
            .map_err(|e| self.open_object_error(e, "file object", path))?;
        rustix::fs::fcntl_setfl(&file, OFlags::empty())
            .map_err(|e| Error::io("clearing O_NONBLOCK", e.into()))?;
        let mut prefix = [0u8; 8];
        read_exact_at(&file, &mut prefix, 0)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let vlen = ArchiveHeader::variant_len(&prefix)
            .map_err(|e| corrupt(format!("{}: {e}", path.display()), path))?;
        if vlen > MAX_HEADER || 8 + vlen as u64 > len {
            return Err(corrupt(
                format!(
                    "{}: header of {vlen} bytes in a {len}-byte object",
                    path.display()
                ),
                path,
            ));
        }
        let mut head = vec![0u8; 8 + vlen];
        read_exact_at(&file, &mut head, 0)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let h = ArchiveHeader::decode(&head)
            .map_err(|e| corrupt(format!("{}: {e}", path.display()), path))?;
        match FileType::from_raw_mode(h.meta.mode) {
            FileType::Symlink => Ok(FileObject {
                meta: h.meta,
                size: 0,
                symlink_target: Some(h.symlink_target),
                content: None,
            }),
            FileType::RegularFile => {
                if h.size > 0 && h.content_offset >= len {
                    return Err(corrupt(
                        format!(
                            "{}: {} bytes of content announced, none stored",
                            path.display(),
                            h.size
                        ),
                        path,
                    ));
                }
                Ok(FileObject {
                    meta: h.meta,
                    size: h.size,
                    symlink_target: None,
                    content: (h.size > 0).then_some(Content {
                        file,
                        encoding: ContentEncoding::Deflate,
                        offset: h.content_offset,
                    }),
                })
            }
            other => Err(Error::new(
                ErrorCode::Unsupported,
                format!("file object {} is a {other:?}", path.display()),
            )
            .path(path.display().to_string())),
        }
    }
}

fn read_exact_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
}

/// Parses a `listxattr` buffer and reads each value with `get`, in ostree's form: names
/// with their NUL, sorted, and xattrs with an empty value left out as ostree leaves them out
/// when it reads a file's xattrs.
fn collect_xattrs(
    names: &[u8],
    mut get: impl FnMut(&std::ffi::CStr, &mut [u8]) -> rustix::io::Result<usize>,
) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut value = vec![0u8; 64 << 10];
    for name in names.split_inclusive(|b| *b == 0) {
        let Ok(c) = std::ffi::CStr::from_bytes_with_nul(name) else {
            continue;
        };
        match get(c, &mut value) {
            Ok(0) => {}
            Ok(n) => out.push((name.to_vec(), value[..n].to_vec())),
            // Removed between the listing and the read.
            Err(rustix::io::Errno::NODATA) => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.sort();
    Ok(out)
}

fn fd_xattrs(f: &impl AsFd) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 64 << 10];
    let n = rustix::fs::flistxattr(f, &mut names[..])?;
    collect_xattrs(&names[..n], |name, buf| rustix::fs::fgetxattr(f, name, buf))
}

/// The xattrs of an `O_PATH` fd (a symlink, which cannot be opened for reading): the
/// kernel has no fd-based call for those, so the fd's own `/proc/self/fd` entry is used,
/// which names the inode the fd holds and nothing the repository's contents could redirect.
fn proc_fd_xattrs(fd: &OwnedFd) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let p = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let mut names = vec![0u8; 64 << 10];
    let n = rustix::fs::listxattr(p.as_str(), &mut names[..])?;
    collect_xattrs(&names[..n], |name, buf| {
        rustix::fs::getxattr(p.as_str(), name, buf)
    })
}
