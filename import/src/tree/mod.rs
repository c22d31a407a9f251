//! The image's filesystem tree, built while the layers stream.
//!
//! composefs builds the tree for the EROFS image by reading every layer's splitstream back
//! (zstd, then tar headers) once all layers are stored: on one core, after everything else
//! is done, on the import's serial tail. Here a tree thread gets each layer's splitstream
//! contents (inline bytes and object references, as they go into the stream) while the
//! layer is being imported, parses the tar headers and applies the entries in layer order,
//! so that the tree is ready when the last layer is.
//!
//! The entries are what `composefs_oci::tar::get_entry` reads from the stored stream: the
//! same tar parser (`tar-core`), the same inline/external rules, the same path and mtime
//! handling. They are applied to a [`CompactTree`] (composefs' `process_entry` rules, in a
//! fraction of the memory of composefs' own tree) that the EROFS writer reads directly. The
//! tests build trees both ways and compare them with composefs'; the finalize step falls
//! back to reading the streams if the tree thread failed.
//!
//! - `feed`: the layer importers' side, batched, never blocking, with a bounded backlog;
//! - `fed_reader`: tar entries read back from a layer's pieces;
//! - `compact`: the tree itself, and `tables`: its storage that never moves;
//! - here: the tree thread ([`Builder`]), which applies the entries layer by layer.

pub(crate) mod compact;
mod fed_reader;
mod feed;
mod stored;
mod tables;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::Receiver;

use anyhow::Context;
use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;
use composefs_oci::tar::TarEntry;

pub(crate) use compact::{CompactTree, Frozen};
use fed_reader::{FedReader, Input};
pub use feed::{Backlog, Feed, Piece};
pub(crate) use stored::StoredPieces;

/// Entries (of all layers) above which the tree thread gives up and drops its tree. While the
/// layers stream, the tree adds to their buffers, where composefs builds it once they are
/// gone: beyond this, the tree built early would raise the import's peak memory, so large
/// images get their tree after the layers, as composefs builds it.
const MAX_ENTRIES: usize = 80_000;

/// Where the tree thread gets a layer's entries from.
pub enum Source<ObjectID> {
    /// Streamed by this import.
    Fed(Receiver<Vec<Piece<ObjectID>>>),
    /// Stored already: read its splitstream (by fs-verity id) once it is this layer's turn.
    Stored(ObjectID),
}

/// A layer's feed and the matching source for the tree thread, sharing `backlog`.
pub fn channel<ObjectID>(backlog: &Arc<Backlog>) -> (Feed<ObjectID>, Source<ObjectID>) {
    let (tx, rx) = std::sync::mpsc::channel();
    (Feed::new(tx, backlog.clone()), Source::Fed(rx))
}

/// Why the tree thread has no tree.
#[derive(Debug)]
enum Stop {
    /// A feed or the thread gave up: nothing wrong, the streams have it all.
    GaveUp,
    Failed(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Stop {
    fn from(e: E) -> Self {
        Stop::Failed(e.into())
    }
}

/// The tree thread.
#[derive(Debug)]
pub struct Builder<ObjectID: FsVerityHashValue> {
    thread: std::thread::JoinHandle<Result<CompactTree<ObjectID>, Stop>>,
    backlog: Arc<Backlog>,
}

impl<ObjectID: FsVerityHashValue> Builder<ObjectID> {
    /// Starts applying `layers` (in the image's layer order) to an empty tree.
    pub fn start(
        repo: Arc<Repository<ObjectID>>,
        layers: Vec<Source<ObjectID>>,
        backlog: Arc<Backlog>,
    ) -> std::io::Result<Self> {
        Self::start_with_limit(repo, layers, backlog, MAX_ENTRIES)
    }

    fn start_with_limit(
        repo: Arc<Repository<ObjectID>>,
        layers: Vec<Source<ObjectID>>,
        backlog: Arc<Backlog>,
        max_entries: usize,
    ) -> std::io::Result<Self> {
        let shared = backlog.clone();
        let thread = std::thread::Builder::new()
            .name("cstor-tree".into())
            .spawn(move || {
                let mut tree = CompactTree::spilling(Some(crate::spill::spill_maker(&repo)));
                let mut entries = 0usize;
                for (i, layer) in layers.into_iter().enumerate() {
                    match layer {
                        Source::Fed(rx) => {
                            let mut reader = FedReader::new(Input::Fed(rx), &shared);
                            while let Some(entry) = reader.next_entry().map_err(|e| match e {
                                Stop::Failed(e) => {
                                    Stop::Failed(e.context(format!("reading layer {i}")))
                                }
                                gave_up => gave_up,
                            })? {
                                tree.apply(entry)
                                    .with_context(|| format!("applying layer {i}"))?;
                                entries += 1;
                                if entries > max_entries {
                                    return Err(Stop::GaveUp);
                                }
                            }
                            reader.finish()?;
                        }
                        Source::Stored(verity) => {
                            entries += apply_stored(&repo, &verity, |e| tree.apply(e))
                                .with_context(|| format!("layer {i}"))?;
                            if entries > max_entries {
                                return Err(Stop::GaveUp);
                            }
                        }
                    }
                }
                Ok(tree)
            })?;
        Ok(Self { thread, backlog })
    }

    /// The tree, once every layer was applied; `Ok(None)` when the thread gave up (too much
    /// waiting, see [`Backlog`], or too many entries, see [`MAX_ENTRIES`]).
    pub fn finish(self) -> anyhow::Result<Option<CompactTree<ObjectID>>> {
        let r = self
            .thread
            .join()
            .unwrap_or_else(|_| Err(Stop::Failed(anyhow::anyhow!("the tree thread panicked"))));
        tracing::debug!(
            peak_backlog_kib = self.backlog.peak.load(Relaxed) >> 10,
            "tree thread done"
        );
        match r {
            Ok(tree) => Ok(Some(tree)),
            Err(Stop::GaveUp) => Ok(None),
            Err(Stop::Failed(e)) => Err(e),
        }
    }
}

/// Reads a stored layer stream's entries, as composefs does to build an image, and hands
/// each to `apply` (a tree's own rule for it); returns the number of entries applied. The
/// stream is read with [`StoredPieces`] (its reference table left in the file), or with
/// composefs' reader when it is of a shape ours does not know.
pub fn apply_stored<ObjectID: FsVerityHashValue>(
    repo: &Repository<ObjectID>,
    verity: &ObjectID,
    mut apply: impl FnMut(TarEntry<ObjectID>) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let mut entries = 0;
    if let Some(stored) = StoredPieces::open(repo, verity)? {
        let backlog = Backlog::default();
        let mut reader = FedReader::new(Input::Stored(stored), &backlog);
        let failed = |e: Stop| match e {
            Stop::Failed(e) => e.context("reading the layer stream"),
            Stop::GaveUp => anyhow::anyhow!("reading the layer stream stopped"),
        };
        while let Some(entry) = reader.next_entry().map_err(failed)? {
            apply(entry).context("applying the layer")?;
            entries += 1;
        }
        reader.finish().map_err(failed)?;
        return Ok(entries);
    }
    apply_stored_by_composefs(repo, verity, apply)
}

/// [`apply_stored`] with composefs' own reader.
fn apply_stored_by_composefs<ObjectID: FsVerityHashValue>(
    repo: &Repository<ObjectID>,
    verity: &ObjectID,
    mut apply: impl FnMut(TarEntry<ObjectID>) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let mut entries = 0;
    let mut stream = repo
        .open_stream("", Some(verity), Some(composefs_oci::LAYER_CONTENT_TYPE))
        .context("opening the layer stream")?;
    while let Some(entry) =
        composefs_oci::tar::get_entry(&mut stream).context("reading the layer stream")?
    {
        apply(entry).context("applying the layer")?;
        entries += 1;
    }
    Ok(entries)
}

/// composefs' dumpfile of `fs`: how the tests compare trees built different ways.
#[cfg(test)]
pub(crate) fn dump<ObjectID: FsVerityHashValue>(
    fs: &composefs::tree::FileSystem<ObjectID>,
) -> String {
    let mut out = Vec::new();
    composefs::dumpfile::write_dumpfile(&mut out, fs).expect("dumping a tree to memory");
    String::from_utf8(out).expect("a dumpfile is UTF-8")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::path::Path;

    use composefs::fsverity::{Algorithm, Sha512HashValue};
    use composefs::generic_tree::Stat;
    use composefs::repository::RepositoryConfig;
    use composefs::tree::FileSystem;
    use tar_core::EntryType;
    use tar_core::parse::{ParseEvent, Parser};

    use super::feed::BACKLOG_MAX;
    use super::*;
    use crate::INLINE_MAX;

    type Id = Sha512HashValue;

    /// A tree of every kind of entry the tree builder must handle, with names and link
    /// targets too long for a plain ustar header, sub-second mtimes, an xattr, and
    /// whiteouts.
    fn make_tree(root: &Path, variant: &str) {
        let long = "d".repeat(120);
        std::fs::create_dir_all(root.join("a/b").join(&long)).unwrap();
        std::fs::write(root.join("a/empty"), b"").unwrap();
        std::fs::write(root.join("a/small"), format!("hi from {variant}")).unwrap();
        std::fs::write(root.join("a/b/exactly-64"), [b'x'; 64]).unwrap();
        std::fs::write(root.join("a/b/just-over-64"), [b'y'; 65]).unwrap();
        let big: Vec<u8> = (0..5000u32)
            .map(|i| (i * 7 + variant.len() as u32) as u8)
            .collect();
        std::fs::write(root.join("a/b").join(&long).join("big"), &big).unwrap();
        std::fs::hard_link(
            root.join("a/b").join(&long).join("big"),
            root.join("a/hard"),
        )
        .unwrap();
        symlink(
            format!("/{}/target", "t".repeat(150)),
            root.join("a/long-link"),
        )
        .unwrap();
        symlink("small", root.join("a/short-link")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("a/fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o640),
            0,
        )
        .unwrap();
        // Not every filesystem takes user xattrs; the rest of the test stands without.
        let _ = rustix::fs::setxattr(
            root.join("a/small"),
            "user.cstor-test",
            b"value",
            rustix::fs::XattrFlags::empty(),
        );
        if variant == "upper" {
            std::fs::write(root.join("a/.wh.empty"), b"").unwrap();
            std::fs::write(root.join("a/b/.wh..wh..opq"), b"").unwrap();
        }
        for (i, entry) in ["a", "a/small", "a/b", "a/fifo"].iter().enumerate() {
            let t = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: 1_700_000_000,
                    tv_nsec: 0,
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: 1_700_000_000 + i as i64,
                    tv_nsec: 123_456_789 * (i as i64 % 3) / 2,
                },
            };
            rustix::fs::utimensat(
                rustix::fs::CWD,
                root.join(entry),
                &t,
                rustix::fs::AtFlags::empty(),
            )
            .unwrap();
        }
    }

    fn tar_of(root: &Path, format: &str) -> Vec<u8> {
        let mut tar = std::process::Command::new("tar");
        tar.args(["--numeric-owner", "--sort=name"])
            .arg(format!("--format={format}"));
        if format == "posix" {
            tar.arg("--xattrs");
        }
        let out = tar
            .arg("-C")
            .arg(root)
            .args(["-cf", "-", "."])
            .output()
            .expect("GNU tar");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// A tar cut into splitstream pieces the way the importer cuts a layer: headers,
    /// padding and files up to 64 bytes inline, larger files as objects.
    fn pieces(tar: &[u8]) -> Vec<Piece<Id>> {
        let mut out = Vec::new();
        let mut parser = Parser::with_defaults();
        let mut pos = 0;
        loop {
            match parser.parse(&tar[pos..]).unwrap() {
                ParseEvent::Entry { consumed, entry } => {
                    out.push(Piece::Inline(tar[pos..pos + consumed].to_vec()));
                    pos += consumed;
                    let size = entry.size as usize;
                    let stored = size.next_multiple_of(512);
                    let regular = matches!(entry.entry_type, EntryType::Regular);
                    if regular && size as u64 > INLINE_MAX {
                        let ids: Vec<Id> = crate::verity::ids(&[&tar[pos..pos + size]]);
                        out.push(Piece::External(ids[0].clone()));
                        out.push(Piece::Inline(tar[pos + size..pos + stored].to_vec()));
                    } else {
                        out.push(Piece::Inline(tar[pos..pos + stored].to_vec()));
                    }
                    pos += stored;
                }
                ParseEvent::GlobalExtensions { consumed, .. } => {
                    out.push(Piece::Inline(tar[pos..pos + consumed].to_vec()));
                    pos += consumed;
                }
                ParseEvent::End { .. } => {
                    out.push(Piece::Inline(tar[pos..].to_vec()));
                    return out;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn repo(dir: &Path) -> Arc<Repository<Id>> {
        let config = RepositoryConfig::new(Algorithm::SHA512).set_insecure();
        Arc::new(
            Repository::init_path(rustix::fs::CWD, dir, config)
                .unwrap()
                .0,
        )
    }

    /// Stores `pieces` as a layer splitstream, as the importer does.
    fn store(repo: &Arc<Repository<Id>>, pieces: &[Piece<Id>]) -> Id {
        let mut w = repo
            .create_stream(composefs_oci::LAYER_CONTENT_TYPE)
            .unwrap();
        for p in pieces {
            match p {
                Piece::Inline(b) => w.write_inline(b),
                Piece::External(id) => w.write_reference(id.clone()).unwrap(),
                _ => unreachable!(),
            }
        }
        w.done().unwrap()
    }

    fn feed(f: &mut Feed<Id>, pieces: Vec<Piece<Id>>) {
        for p in pieces {
            match p {
                Piece::Inline(b) => f.inline(b),
                Piece::External(id) => f.external(id),
                _ => unreachable!(),
            }
        }
    }

    /// A ustar header of a regular file `name` whose size field says `size` (base-256,
    /// which can say any size).
    fn ustar_header(name: &str, size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        for (at, field) in [(100, &b"0000644"[..]), (108, b"0000000"), (116, b"0000000")] {
            h[at..at + field.len()].copy_from_slice(field);
        }
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[148..156].copy_from_slice(b"        ");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    #[test]
    fn a_stored_stream_claiming_huge_inline_contents_fails_without_allocating_them() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo(&tmp.path().join("repo"));
        let layer = |size: u64| {
            let mut tar = ustar_header("f", size);
            tar.extend_from_slice(b"hello");
            tar.resize(1024 + 1024, 0); // the contents' block, then the end
            store(&repo, &[Piece::Inline(tar)])
        };
        // Control: the header says what the stream holds.
        let mut entries = Vec::new();
        apply_stored(&repo, &layer(5), |e| {
            entries.push(e.path);
            Ok(())
        })
        .unwrap();
        assert_eq!(entries, [std::path::PathBuf::from("/f")]);
        // 2^40 bytes claimed, five there.
        let err = apply_stored(&repo, &layer(1 << 40), |_| Ok(())).unwrap_err();
        assert!(format!("{err:#}").contains("contents inline"), "{err:#}");
    }

    /// A stored stream read back by [`StoredPieces`] gives the entries composefs' reader
    /// gives, for streams composefs wrote: long names and links, both tar formats, and a
    /// layer whose inline run (a few hundred small files between two objects) is larger than
    /// one inline piece.
    #[test]
    fn stored_streams_read_back_as_composefs_reads_them() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo(&tmp.path().join("repo"));
        let small = tmp.path().join("small");
        std::fs::create_dir_all(small.join("many")).unwrap();
        for i in 0..400 {
            std::fs::write(small.join("many").join(format!("f{i:04}")), format!("{i}")).unwrap();
        }
        std::fs::write(small.join("z-big"), vec![7u8; 9000]).unwrap();
        let mut trees = vec![(small.clone(), "posix")];
        for (variant, format) in [("lower", "posix"), ("middle", "gnu")] {
            let root = tmp.path().join(variant);
            make_tree(&root, variant);
            trees.push((root, format));
        }
        for (root, format) in trees {
            let pieces = pieces(&tar_of(&root, format));
            let run = pieces
                .iter()
                .map(|p| match p {
                    Piece::Inline(b) => b.len(),
                    _ => 0,
                })
                .collect::<Vec<_>>()
                .split(|&n| n == 0)
                .map(|r| r.iter().sum::<usize>())
                .max()
                .unwrap_or(0);
            let verity = store(&repo, &pieces);
            assert!(StoredPieces::open(&repo, &verity).unwrap().is_some());
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let n = apply_stored(&repo, &verity, |e| {
                ours.push(format!("{e:?}"));
                Ok(())
            })
            .unwrap();
            apply_stored_by_composefs(&repo, &verity, |e| {
                theirs.push(format!("{e:?}"));
                Ok(())
            })
            .unwrap();
            assert_eq!(n, theirs.len());
            assert_eq!(ours, theirs, "{}", root.display());
            if root == small {
                assert!(run > 64 << 10, "the inline run is {run} bytes");
            }
        }
    }

    /// A stream cut short fails to read back, naming the stream; it never panics.
    #[test]
    fn a_truncated_stored_stream_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo(&tmp.path().join("repo"));
        let root = tmp.path().join("t");
        make_tree(&root, "t");
        let verity = store(&repo, &pieces(&tar_of(&root, "posix")));
        let path = tmp
            .path()
            .join("repo/objects")
            .join(verity.to_object_pathname());
        let len = std::fs::metadata(&path).unwrap().len();
        for keep in [10, 100, len / 2, len - 3] {
            let bytes = std::fs::read(&path).unwrap();
            let _ = std::fs::remove_file(&path);
            std::fs::write(&path, &bytes[..keep as usize]).unwrap();
            let r = apply_stored(&repo, &verity, |_| Ok(()));
            let e = r.expect_err("a truncated stream read back");
            assert!(format!("{e:#}").contains("layer stream"), "{e:#}");
            std::fs::remove_file(&path).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
    }

    /// The tree built from fed pieces (a stored layer below, fed layers above, in PAX and
    /// GNU formats) is the tree composefs builds by reading the stored streams.
    #[test]
    fn fed_layers_make_the_tree_composefs_reads_from_the_streams() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo(&tmp.path().join("repo"));
        let mut layers = Vec::new();
        for (variant, format) in [("lower", "posix"), ("middle", "gnu"), ("upper", "posix")] {
            let root = tmp.path().join(variant);
            make_tree(&root, variant);
            layers.push(pieces(&tar_of(&root, format)));
        }
        let verities: Vec<Id> = layers.iter().map(|p| store(&repo, p)).collect();
        let mut expected = FileSystem::new(Stat::uninitialized());
        for v in &verities {
            apply_stored_by_composefs(&repo, v, |e| {
                composefs_oci::image::process_entry(&mut expected, e)
            })
            .unwrap();
        }

        let backlog = Arc::new(Backlog::default());
        let mut sources = vec![Source::Stored(verities[0].clone())];
        let mut feeds = Vec::new();
        for _ in 1..layers.len() {
            let (f, s) = channel(&backlog);
            feeds.push(f);
            sources.push(s);
        }
        let builder = Builder::start(repo.clone(), sources, backlog.clone()).unwrap();
        // The upper layer first, as when layers stream in parallel: its pieces wait.
        let mut layers = layers.into_iter().skip(1);
        let (middle, upper) = (layers.next().unwrap(), layers.next().unwrap());
        let mut upper_feed = feeds.pop().unwrap();
        let mut middle_feed = feeds.pop().unwrap();
        feed(&mut upper_feed, upper);
        upper_feed.done();
        feed(&mut middle_feed, middle);
        middle_feed.done();
        let built = builder.finish().unwrap().expect("a tree");

        let (want, got) = (dump(&expected), dump(&built.to_composefs().unwrap()));
        assert!(
            want.contains("long-link") && want.contains(&"d".repeat(120)),
            "{want}"
        );
        assert_eq!(got, want);
        assert_eq!(backlog.bytes.load(Relaxed), 0);
    }

    #[test]
    fn over_a_limit_the_tree_thread_gives_up_and_a_dropped_feed_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo(&tmp.path().join("repo"));
        let root = tmp.path().join("tree");
        make_tree(&root, "only");
        let layer = pieces(&tar_of(&root, "posix"));

        let backlog = Arc::new(Backlog::default());
        backlog.bytes.store(BACKLOG_MAX, Relaxed);
        let (mut f, s) = channel(&backlog);
        let builder = Builder::start(repo.clone(), vec![s], backlog.clone()).unwrap();
        feed(&mut f, layer);
        f.done();
        assert!(
            builder.finish().unwrap().is_none(),
            "gave up: no tree, no error"
        );

        // Too many entries: the thread drops its tree (and later pieces go nowhere).
        let backlog = Arc::new(Backlog::default());
        let (mut f, s) = channel(&backlog);
        let builder = Builder::start_with_limit(repo.clone(), vec![s], backlog, 5).unwrap();
        feed(&mut f, pieces(&tar_of(&root, "posix")));
        f.done();
        assert!(builder.finish().unwrap().is_none(), "over the entry limit");

        let backlog = Arc::new(Backlog::default());
        let (mut f, s) = channel(&backlog);
        let builder = Builder::start(repo, vec![s], backlog).unwrap();
        feed(&mut f, pieces(&tar_of(&root, "posix")));
        // A layer that failed (say, its diff id did not match) never says done.
        drop(f);
        let e = builder.finish().unwrap_err();
        assert!(format!("{e:#}").contains("stopped before its end"), "{e:#}");
    }
}
