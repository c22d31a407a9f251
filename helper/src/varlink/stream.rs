//! The splitdirfdstream-v0 producer: a layer walk written as the record stream composefs'
//! `org.composefs.Oci.GetLayer` consumers read, with each file either named beneath a
//! passed directory fd (the consumer opens it itself) or sent inline (content the consumer
//! could not open, read and CRC-checked here).
//!
//! The format has three records, integers little-endian: metadata (`0x00`, `u32` length,
//! bytes), inline file content (`0x01`, `u32` length, bytes) and a file-backed reference
//! (`0x02`, `u64` length, `u32` directory index, `u32` name length, name). It has no end
//! record: a stream cut at a record boundary reads as a complete, shorter layer. A failed
//! producer therefore ends its stream with [`POISON`], a type byte no reader accepts.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use cstor_protocol::ErrorCode;
use cstor_protocol::assemble::CRC64;

use crate::confine;
use crate::error::{Error, Result};
use crate::storage::layer_walk::{FileItem, Item, Walker};

/// Record type of stream metadata (tar headers, padding) carried verbatim.
const METADATA: u8 = 0x00;
/// Record type of file content carried in the stream.
const INLINE_DATA: u8 = 0x01;
/// Record type of a file the consumer opens beneath a passed directory.
const FILE_BACKED: u8 = 0x02;
/// Written after the last complete record when production fails. Readers reject unknown
/// record types, so a consumer sees an error instead of a layer that merely ends early.
pub const POISON: u8 = 0xff;
/// The largest metadata or inline record upstream's reader accepts (256 MiB).
pub const MAX_RECORD: u64 = 256 << 20;
/// The longest file-backed name upstream's reader accepts.
pub const MAX_NAME: usize = 4096;

/// Encodes records onto a byte sink.
#[derive(Debug)]
pub struct RecordWriter<W: Write> {
    out: W,
}

impl<W: Write> RecordWriter<W> {
    /// Records go to `out`.
    pub fn new(out: W) -> Self {
        Self { out }
    }

    /// Metadata bytes; split into records of at most [`MAX_RECORD`] bytes, nothing for an
    /// empty slice (readers do not need empty metadata records).
    pub fn metadata(&mut self, bytes: &[u8]) -> io::Result<()> {
        for part in bytes.chunks(MAX_RECORD as usize) {
            self.out.write_all(&[METADATA])?;
            self.out.write_all(&(part.len() as u32).to_le_bytes())?;
            self.out.write_all(part)?;
        }
        Ok(())
    }

    /// The header of an inline record of `len` bytes; exactly `len` bytes must follow,
    /// through [`Self::raw`].
    pub fn inline_header(&mut self, len: u32) -> io::Result<()> {
        self.out.write_all(&[INLINE_DATA])?;
        self.out.write_all(&len.to_le_bytes())
    }

    /// Body bytes of the inline record begun last.
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)
    }

    /// A reference to `len` bytes of the file `name` beneath directory `dir`.
    pub fn file_backed(&mut self, dir: u32, len: u64, name: &[u8]) -> io::Result<()> {
        self.out.write_all(&[FILE_BACKED])?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&dir.to_le_bytes())?;
        self.out.write_all(&(name.len() as u32).to_le_bytes())?;
        self.out.write_all(name)
    }

    /// Marks the stream as failed (see [`POISON`]).
    pub fn poison(&mut self) -> io::Result<()> {
        self.out.write_all(&[POISON])?;
        self.out.flush()
    }

    /// Flushes buffered records.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Decides, per file, whether the consumer can open it through a directory fd.
///
/// A consumer with `CAP_DAC_OVERRIDE` (it says so in the request) opens everything. Any other
/// consumer is assumed to have no rights beyond "other": a file is passed by name only if it
/// is readable by others and every directory from the passed one down to it is searchable
/// by others. The helper does not know the consumer's uid and groups (they are not those of
/// the socket's peer in every set-up), so files the consumer might own are sent inline too.
#[derive(Debug)]
pub struct Reachability {
    trusted: bool,
    /// Directory (index of the passed fd, path beneath it) -> searchable by others down to it.
    searchable: HashMap<(usize, PathBuf), bool>,
}

impl Reachability {
    /// For a consumer that bypasses permission checks (`trusted`) or not.
    pub fn new(trusted: bool) -> Self {
        Self {
            trusted,
            searchable: HashMap::new(),
        }
    }

    fn reachable(&mut self, dirs: &[OwnedFd], dir: usize, rel: &Path, file: &File) -> bool {
        if self.trusted {
            return true;
        }
        let Ok(st) = rustix::fs::fstat(file) else {
            return false;
        };
        if st.st_mode & 0o004 == 0 {
            return false;
        }
        let Some(fd) = dirs.get(dir) else {
            return false;
        };
        self.searchable_dir(fd.as_fd(), dir, rel.parent().unwrap_or(Path::new("")))
    }

    fn searchable_dir(&mut self, base: BorrowedFd<'_>, dir: usize, rel: &Path) -> bool {
        let key = (dir, rel.to_path_buf());
        if let Some(&known) = self.searchable.get(&key) {
            return known;
        }
        let own = confine::openat_beneath(
            base,
            if rel.as_os_str().is_empty() {
                Path::new(".")
            } else {
                rel
            },
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
        )
        .and_then(|fd| Ok(rustix::fs::fstat(&fd)?))
        .is_ok_and(|st| st.st_mode & 0o001 != 0);
        let verdict = own
            && match rel.parent() {
                Some(parent) => self.searchable_dir(base, dir, parent),
                None => true,
            };
        self.searchable.insert(key, verdict);
        verdict
    }
}

/// What a produced stream held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    /// Files named by reference.
    pub file_backed: u64,
    /// Files sent inline, CRC-checked by the helper.
    pub inline: u64,
    /// Bytes sent inline.
    pub inline_bytes: u64,
}

/// Walked items are handed from the walking thread to the writing one this many at a time:
/// a hand-over per item would cost a wake-up per file.
const WALK_BATCH: usize = 32;
/// Batches the walk may be ahead of the writer; each item of a batch may hold an open file.
const WALK_AHEAD: usize = 4;

/// Writes the stream of `walker` to `out`. `dirs` are the directory fds passed to the
/// consumer, in the walker's order; a reference names its directory by its index there.
///
/// The walk (tar-split parsing and a confined open of every file) runs on a thread of its
/// own, ahead of this one, which writes the records and closes the files: on one thread the
/// two made the producer, not the consumer, the slower end of the pipe (the JSON-RPC
/// producer splits its work the same way, walking on one thread and passing fds on
/// another).
///
/// On failure (including `cancel` being set) the stream is poisoned, best effort, and the
/// error returned.
pub fn produce<W: Write>(
    walker: Walker,
    dirs: &[OwnedFd],
    reach: &mut Reachability,
    out: W,
    cancel: &AtomicBool,
) -> Result<Produced> {
    let mut w = RecordWriter::new(BufWriter::with_capacity(256 << 10, out));
    let mut done = Produced::default();
    let cancelled = || Error::new(ErrorCode::Cancelled, "the consumer closed its lifetime fd");
    let r = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Result<Item>>>(WALK_AHEAD);
        std::thread::Builder::new()
            .name("layer-walk".into())
            .spawn_scoped(s, move || {
                let mut batch = Vec::with_capacity(WALK_BATCH);
                for item in walker {
                    // A send fails when the writer stopped (an error): so does the walk.
                    if cancel.load(Ordering::Relaxed) {
                        return;
                    }
                    let failed = item.is_err();
                    batch.push(item);
                    if (batch.len() == WALK_BATCH || failed)
                        && tx
                            .send(std::mem::replace(
                                &mut batch,
                                Vec::with_capacity(WALK_BATCH),
                            ))
                            .is_err()
                    {
                        return;
                    }
                    if failed {
                        return;
                    }
                }
                let _ = tx.send(batch);
            })
            .map_err(|e| Error::io("starting the layer walk", e))?;
        for batch in rx {
            for item in batch {
                if cancel.load(Ordering::Relaxed) {
                    return Err(cancelled());
                }
                match item? {
                    Item::Segment(bytes) => w.metadata(&bytes).map_err(write_err)?,
                    Item::File(f) => file(&mut w, dirs, reach, f, &mut done)?,
                }
            }
        }
        // The walk also stops when cancelled: what was written is then not the whole layer.
        if cancel.load(Ordering::Relaxed) {
            return Err(cancelled());
        }
        w.flush().map_err(write_err)
    });
    match r {
        Ok(()) => Ok(done),
        Err(e) => {
            // Best effort: the consumer may be gone.
            let _ = w.poison();
            Err(e)
        }
    }
}

fn file<W: Write>(
    w: &mut RecordWriter<W>,
    dirs: &[OwnedFd],
    reach: &mut Reachability,
    f: FileItem,
    done: &mut Produced,
) -> Result<()> {
    let (Some(content), Some((dir, rel))) = (f.content, f.found) else {
        // Header-only entries: their bytes were in the segments.
        return Ok(());
    };
    let name = rel.as_os_str().as_bytes();
    // Upstream's consumer refuses names that are not UTF-8; the format allows any bytes, so
    // such files go inline rather than fail the layer.
    let nameable = std::str::from_utf8(name).is_ok() && name.len() <= MAX_NAME;
    if nameable && reach.reachable(dirs, dir, &rel, &content) {
        let index = u32::try_from(dir).map_err(|_| too_many_dirs())?;
        w.file_backed(index, f.size, name).map_err(write_err)?;
        done.file_backed += 1;
        return Ok(());
    }
    let shown = || String::from_utf8_lossy(&f.name).into_owned();
    let len = u32::try_from(f.size)
        .ok()
        .filter(|&l| u64::from(l) <= MAX_RECORD)
        .ok_or_else(|| {
            Error::new(
                ErrorCode::Unsupported,
                format!(
                    "{:?} ({} bytes) cannot be opened by the consumer and is larger than the \
                     256 MiB an inline record may carry",
                    shown(),
                    f.size
                ),
            )
            .path(shown())
        })?;
    w.inline_header(len).map_err(write_err)?;
    let mut crc = CRC64.digest();
    let mut left = f.size;
    let mut buf = vec![0u8; (f.size.min(1 << 20)) as usize];
    let mut reader = &content;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = match reader.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(Error::new(
                    ErrorCode::ChecksumMismatch,
                    format!("{:?} became shorter while it was read", shown()),
                )
                .path(shown()));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(format!("reading {:?}", shown()), e).path(shown())),
        };
        crc.update(&buf[..n]);
        w.raw(&buf[..n]).map_err(write_err)?;
        left -= n as u64;
    }
    let actual = crc.finalize();
    if actual != f.crc64 {
        // The bytes are out already: the poison written by the caller makes the consumer
        // discard them.
        return Err(Error::new(
            ErrorCode::ChecksumMismatch,
            format!(
                "{:?} does not match its tar-split record: CRC-64 {actual:016x}, recorded {:016x}",
                shown(),
                f.crc64
            ),
        )
        .path(shown()));
    }
    done.inline += 1;
    done.inline_bytes += f.size;
    Ok(())
}

fn too_many_dirs() -> Error {
    Error::new(ErrorCode::Unsupported, "more than 2^32 layer directories")
}

fn write_err(e: io::Error) -> Error {
    if matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted
    ) {
        return Error::new(
            ErrorCode::Cancelled,
            "the consumer stopped reading the layer stream",
        );
    }
    Error::io("writing the layer stream", e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_laid_out_as_upstream_reads_them() {
        let mut out = Vec::new();
        let mut w = RecordWriter::new(&mut out);
        w.metadata(b"hdr").unwrap();
        w.metadata(b"").unwrap();
        w.inline_header(2).unwrap();
        w.raw(b"hi").unwrap();
        w.file_backed(1, 0x1_0000_0001, b"a/b").unwrap();
        w.poison().unwrap();
        let mut want = vec![0u8, 3, 0, 0, 0];
        want.extend_from_slice(b"hdr");
        want.extend_from_slice(&[1, 2, 0, 0, 0]);
        want.extend_from_slice(b"hi");
        want.push(2);
        want.extend_from_slice(&0x1_0000_0001u64.to_le_bytes());
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&3u32.to_le_bytes());
        want.extend_from_slice(b"a/b");
        want.push(0xff);
        assert_eq!(out, want);
    }

    #[test]
    fn reachability_follows_other_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("open/closed")).unwrap();
        std::fs::write(d.path().join("open/f"), b"x").unwrap();
        std::fs::write(d.path().join("open/closed/g"), b"x").unwrap();
        std::fs::write(d.path().join("secret"), b"x").unwrap();
        let set = |p: &str, m: u32| {
            std::fs::set_permissions(d.path().join(p), std::fs::Permissions::from_mode(m)).unwrap()
        };
        set(".", 0o755);
        set("open", 0o755);
        set("open/closed", 0o700);
        set("open/closed/g", 0o644);
        set("open/f", 0o644);
        set("secret", 0o600);
        let root = confine::Root::open(d.path()).unwrap();
        let dirs = vec![
            confine::openat_beneath(root.fd(), Path::new("."), rustix::fs::OFlags::PATH).unwrap(),
        ];
        let file = |p: &str| File::open(d.path().join(p)).unwrap();
        let mut r = Reachability::new(false);
        assert!(r.reachable(&dirs, 0, Path::new("open/f"), &file("open/f")));
        assert!(!r.reachable(&dirs, 0, Path::new("secret"), &file("secret")));
        assert!(!r.reachable(&dirs, 0, Path::new("open/closed/g"), &file("open/closed/g")));
        let mut trusted = Reachability::new(true);
        assert!(trusted.reachable(&dirs, 0, Path::new("secret"), &file("secret")));
    }
}
