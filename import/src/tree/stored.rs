//! A stored layer stream read back as the pieces it was written from: for the tree, and for
//! a copy from another repository.
//!
//! composefs' `SplitStreamReader` reads a stream's whole reference table into memory before
//! its first byte: 64 bytes for each distinct object of the layer, 35 MB for a layer of a
//! million files, held while the image's tree is built from it (the import's peak at that
//! point). Here the table stays in the file: each reference is read when the stream names
//! it, through a window of [`WINDOW`] ids (a layer names its objects roughly in table order,
//! which is the order of first use). Large inline runs (a layer's directories and small
//! files, written as one run between two objects) come out in pieces of at most
//! [`INLINE_PIECE`] bytes, which the tar reader joins again; a run's length is never trusted
//! with an allocation (a stream that claims an exabyte of inline bytes ends early, with an
//! error, and asks for no more memory than any other).
//!
//! The layout read is the one [`crate::splitstream`] writes (composefs 0.9.4's); a stream
//! of another shape (another version, stream or named references) is not this reader's:
//! [`StoredPieces::open`] says so with `Ok(None)` and the caller reads it with composefs'.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Take};

use anyhow::{Context, bail, ensure};
use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;

use super::feed::Piece;
use crate::spill::IdWindow;
use crate::splitstream::{HEADER_LEN, INFO_LEN, MAGIC};

/// Ids read from the reference table at a time.
const WINDOW: usize = 1024;
/// The largest inline piece handed out.
const INLINE_PIECE: usize = 64 << 10;
/// Pieces per batch.
const BATCH: usize = 256;

/// A byte range of the stream file, as the header records it.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
}

impl Span {
    fn read(bytes: &[u8]) -> Span {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Span {
            start: word(0),
            end: word(8),
        }
    }

    fn len(self) -> u64 {
        self.end.saturating_sub(self.start)
    }
}

/// The pieces of one stored layer stream, in order, ending with [`Piece::Done`].
pub(crate) struct StoredPieces<ObjectID> {
    file: File,
    /// The uncompressed size the header records (the layer's tar size).
    total_size: u64,
    /// The object reference table.
    refs: Span,
    ref_count: u64,
    window: IdWindow,
    body: zstd::stream::read::Decoder<'static, BufReader<Take<File>>>,
    /// Inline bytes of the current instruction not handed out yet.
    inline_left: u64,
    done: bool,
    _id: std::marker::PhantomData<ObjectID>,
}

impl<ObjectID: FsVerityHashValue> StoredPieces<ObjectID> {
    /// Opens the layer stream `verity` (its fs-verity digest checked unless the repository is
    /// insecure); `Ok(None)` when it is not of the shape this reader knows.
    pub(crate) fn open(
        repo: &Repository<ObjectID>,
        verity: &ObjectID,
    ) -> anyhow::Result<Option<Self>> {
        let file = File::from(
            repo.open_object(verity)
                .context("opening the layer stream")?,
        );
        Self::from_file(file)
    }

    /// Reads the layer stream opened as `file` (not checked here); `Ok(None)` when it is not
    /// of the shape this reader knows, `file`'s offset then unchanged.
    pub(crate) fn from_file(file: File) -> anyhow::Result<Option<Self>> {
        use std::os::unix::fs::FileExt;
        let size = file
            .metadata()
            .context("reading the layer stream's size")?
            .len();
        let mut head = [0u8; (HEADER_LEN + INFO_LEN) as usize];
        if size < head.len() as u64 {
            bail!("the layer stream is {size} bytes, shorter than its header");
        }
        file.read_exact_at(&mut head, 0)
            .context("reading the layer stream's header")?;
        let (magic, rest) = head.split_at(MAGIC.len());
        if magic != MAGIC {
            bail!("the layer stream is not a splitstream");
        }
        let (version, algorithm, lg_block) = (rest[0], rest[3], rest[4]);
        let info = Span::read(&head[16..32]);
        if version != 0 || info.start != HEADER_LEN || info.len() < INFO_LEN {
            return Ok(None);
        }
        ensure!(
            algorithm == ObjectID::ALGORITHM.kernel_id(),
            "the layer stream's hash algorithm ({algorithm}) is not the repository's"
        );
        ensure!(
            lg_block == 12,
            "the layer stream's block size is 2^{lg_block}, not 4096"
        );
        let at = |i: usize| Span::read(&head[32 + 16 * i..48 + 16 * i]);
        let (stream_refs, refs, body, named) = (at(0), at(1), at(2), at(3));
        let mut word = [0u8; 8];
        word.copy_from_slice(&head[96..104]);
        let content_type = u64::from_le_bytes(word);
        word.copy_from_slice(&head[104..112]);
        let total_size = u64::from_le_bytes(word);
        ensure!(
            content_type == composefs_oci::LAYER_CONTENT_TYPE,
            "the stream is not a layer stream (content type {content_type:#x})"
        );
        if stream_refs.len() != 0 {
            return Ok(None);
        }
        for (what, span) in [
            ("reference table", refs),
            ("compressed stream", body),
            ("named references", named),
        ] {
            ensure!(
                span.start <= span.end && span.end <= size,
                "the layer stream's {what} ({}..{}) is outside its {size} bytes",
                span.start,
                span.end
            );
        }
        let id_len = size_of::<ObjectID>() as u64;
        ensure!(
            refs.len() % id_len == 0,
            "the layer stream's reference table is {} bytes, not a whole number of ids",
            refs.len()
        );
        let mut body_file = file.try_clone().context("opening the layer stream again")?;
        body_file
            .seek(SeekFrom::Start(body.start))
            .context("seeking to the layer stream's body")?;
        let decoder = zstd::stream::read::Decoder::new(body_file.take(body.len()))
            .context("starting the layer stream's decompressor")?;
        Ok(Some(StoredPieces {
            file,
            total_size,
            refs,
            ref_count: refs.len() / id_len,
            window: IdWindow::new(WINDOW),
            body: decoder,
            inline_left: 0,
            done: false,
            _id: std::marker::PhantomData,
        }))
    }

    /// The uncompressed size the stream's header records.
    pub(crate) fn total_size(&self) -> u64 {
        self.total_size
    }

    /// The id of reference `i`.
    fn reference(&mut self, i: u64) -> anyhow::Result<ObjectID> {
        ensure!(
            i < self.ref_count,
            "the layer stream names reference {i} of {}",
            self.ref_count
        );
        self.window
            .get(&self.file, self.refs.start, self.ref_count, i)
            .context("reading the layer stream's reference table")
    }

    /// Reads exactly `buf.len()` bytes of the decompressed body; false at its clean end
    /// (nothing read).
    fn body_exact(&mut self, buf: &mut [u8]) -> anyhow::Result<bool> {
        let mut filled = 0;
        while filled < buf.len() {
            let n = self
                .body
                .read(&mut buf[filled..])
                .context("decompressing the layer stream")?;
            if n == 0 {
                if filled == 0 {
                    return Ok(false);
                }
                bail!("the layer stream ends inside an instruction");
            }
            filled += n;
        }
        Ok(true)
    }

    /// The next batch of pieces; the last one ends with [`Piece::Done`].
    pub(crate) fn next_batch(&mut self) -> anyhow::Result<Vec<Piece<ObjectID>>> {
        let mut batch = Vec::with_capacity(BATCH);
        while batch.len() < BATCH && !self.done {
            if self.inline_left > 0 {
                let n = self.inline_left.min(INLINE_PIECE as u64) as usize;
                let mut bytes = vec![0u8; n];
                if !self.body_exact(&mut bytes)? {
                    bail!("the layer stream ends inside an inline run");
                }
                self.inline_left -= n as u64;
                batch.push(Piece::Inline(bytes));
                continue;
            }
            let mut word = [0u8; 8];
            if !self.body_exact(&mut word)? {
                self.done = true;
                batch.push(Piece::Done);
                break;
            }
            match i64::from_le_bytes(word) {
                n if n < 0 => self.inline_left = n.unsigned_abs(),
                i => {
                    let id = self.reference(i as u64)?;
                    batch.push(Piece::External(id));
                }
            }
        }
        Ok(batch)
    }
}
