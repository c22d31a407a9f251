//! Layer splitstreams written in bounded memory.
//!
//! composefs' `SplitStreamWriter` keeps the zstd-compressed stream in memory, and every
//! object reference twice (in a list and as a hash map key), then copies all of it into one
//! more buffer to store it; a run of inline bytes (in a layer of empty files, the whole
//! layer's tar headers) is one more buffer: for a layer of a few hundred thousand files, the
//! largest allocations of the whole import, growing with the layer. [`StreamWriter`] writes
//! the same file, byte for byte (a test compares it with composefs' writer), with the
//! compressed stream, the reference table and a long run, once they pass a MiB, in anonymous
//! files beside the repository's objects; what stays in memory is an index of 8-byte id
//! prefixes, a few bytes per distinct object.
//!
//! The layout (composefs 0.9.4's splitstream): a 32-byte header (magic, version 0, flags,
//! the fs-verity algorithm, log2 block size, the info range), the info block (ranges of the
//! stream references, object references, named references and compressed stream, the
//! content type and the uncompressed size), the two reference tables (raw ids), the named
//! references (a zstd frame of `index:name\0` records) and the zstd stream, whose
//! instructions are little-endian i64s: negative, that many inline bytes follow; otherwise
//! the index of an object reference. Layer streams have no stream or named references.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::sync::Arc;

use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;
use zstd::stream::write::Encoder;

use crate::error::{Error, Result, repo_err};
use crate::object_file::ObjectFile;
use crate::spill::{IdFile, SpillMaker, copy_exact, spill_maker};

pub(crate) const MAGIC: &[u8; 11] = b"SplitStream";
/// log2 of the fs-verity block size composefs records (4 KiB).
const LG_BLOCKSIZE: u8 = 12;
/// Header (32 bytes) and info block (4 ranges and 2 numbers).
pub(crate) const HEADER_LEN: u64 = 32;
pub(crate) const INFO_LEN: u64 = 4 * 16 + 2 * 8;
/// composefs' compression level (0: zstd's default).
const LEVEL: i32 = 0;

/// A splitstream being written; [`StreamWriter::done`] stores it as an object.
pub(crate) struct StreamWriter<ObjectID: FsVerityHashValue> {
    repo: Arc<Repository<ObjectID>>,
    /// What the stream is, for errors ("the splitstream of layer sha256:…").
    what: String,
    content_type: u64,
    stream: Compressor,
    /// Instructions not yet handed to the compressor, the last of them maybe the open run of
    /// inline bytes (see `run`).
    pending: Vec<u8>,
    run: Run,
    total_size: u64,
    refs: RefTable<ObjectID>,
}

impl<ObjectID: FsVerityHashValue> StreamWriter<ObjectID> {
    /// An empty stream of `content_type` (e.g. `composefs_oci::LAYER_CONTENT_TYPE`); `what`
    /// names it in errors.
    pub(crate) fn new(
        repo: &Arc<Repository<ObjectID>>,
        content_type: u64,
        what: String,
    ) -> Result<Self> {
        let stream = Encoder::new(Spill::new(spill_maker(repo)), LEVEL)
            .map_err(|e| Error::io(format!("starting the compressor of {what}"), e))?;
        let stream = Compressor::Here {
            encoder: stream,
            handed: 0,
        };
        Ok(Self {
            pending: Vec::new(),
            refs: RefTable::new(spill_maker(repo)),
            repo: repo.clone(),
            what,
            content_type,
            stream,
            run: Run::Closed,
            total_size: 0,
        })
    }

    /// Inline bytes (tar headers, padding, small files).
    ///
    /// Consecutive inline bytes make one instruction whose length comes first, so a run is
    /// kept until the next reference closes it: in `pending` behind a placeholder for its
    /// length, or, past [`LONG_RUN`] (a layer of empty files and directories is one run of
    /// headers), in an anonymous file.
    pub(crate) fn write_inline(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.total_size += data.len() as u64;
        if data.is_empty() {
            // composefs opens no run for nothing, and neither may we: an empty run would be
            // an instruction of its own.
            return Ok(());
        }
        let at = match &mut self.run {
            Run::Spilled(spill) => return spill.write_all(data),
            Run::InPending(at) => *at,
            Run::Closed => {
                let at = self.pending.len();
                self.pending.extend_from_slice(&[0; 8]);
                self.run = Run::InPending(at);
                at
            }
        };
        self.pending.extend_from_slice(data);
        if self.pending.len() - at - 8 > LONG_RUN {
            let mut spill = Spill::new(spill_maker(&self.repo));
            spill.write_all(&self.pending[at + 8..])?;
            self.pending.truncate(at);
            self.run = Run::Spilled(spill);
            // What is left are whole instructions.
            self.hand_over(true)?;
        }
        Ok(())
    }

    /// Counts `size` bytes of external content in the stream's size (as composefs'
    /// `add_external_size`; [`Self::write_reference`] does not).
    pub(crate) fn add_external_size(&mut self, size: u64) {
        self.total_size += size;
    }

    /// A reference to an object already stored.
    pub(crate) fn write_reference(&mut self, id: ObjectID) -> std::io::Result<()> {
        self.flush_inline()?;
        let index = self.refs.ensure(&id)?;
        self.pending
            .extend_from_slice(&(index as i64).to_le_bytes());
        self.hand_over(false)
    }

    /// Gives the pending bytes to the compressor once there are enough of them (or all of
    /// them, `all`).
    fn hand_over(&mut self, all: bool) -> std::io::Result<()> {
        if self.pending.len() >= CHUNK || (all && !self.pending.is_empty()) {
            self.stream.write(&mut self.pending)?;
        }
        Ok(())
    }

    /// Ends the open run of inline bytes, writing its length before it.
    fn flush_inline(&mut self) -> std::io::Result<()> {
        match std::mem::replace(&mut self.run, Run::Closed) {
            Run::Closed => Ok(()),
            Run::InPending(at) => {
                let len = run_word((self.pending.len() - at - 8) as u64)?;
                self.pending[at..at + 8].copy_from_slice(&len);
                Ok(())
            }
            Run::Spilled(spill) => {
                let len = run_word(spill.len)?;
                self.pending.extend_from_slice(&len);
                spill.copy_to(&mut ToCompressor {
                    stream: &mut self.stream,
                    pending: &mut self.pending,
                })
            }
        }
    }

    /// Stores the stream as an object and returns its id (unnamed: the caller names it).
    pub(crate) fn done(mut self) -> Result<ObjectID> {
        let what = std::mem::take(&mut self.what);
        let io = |e| Error::io(format!("writing {what}"), e);
        self.flush_inline().map_err(io)?;
        self.hand_over(true).map_err(io)?;
        let stream = self.stream.finish().map_err(io)?;
        let stream_len = stream.len;
        let refs = self.refs;
        let refs_len = refs.byte_len();
        // An empty named-reference table is still one (empty) zstd frame.
        let named = Encoder::new(Vec::new(), LEVEL)
            .and_then(Encoder::finish)
            .map_err(io)?;

        let object_refs = HEADER_LEN + INFO_LEN..HEADER_LEN + INFO_LEN + refs_len;
        let named_refs = object_refs.end..object_refs.end + named.len() as u64;
        let stream_range = named_refs.end..named_refs.end + stream_len;
        let mut head = Vec::with_capacity((HEADER_LEN + INFO_LEN) as usize);
        head.extend_from_slice(MAGIC);
        head.push(0); // version
        head.extend_from_slice(&0u16.to_le_bytes()); // flags
        head.push(ObjectID::ALGORITHM.kernel_id());
        head.push(LG_BLOCKSIZE);
        for r in [
            HEADER_LEN..HEADER_LEN + INFO_LEN,
            // Stream references: none in a layer stream.
            object_refs.start..object_refs.start,
            object_refs,
            stream_range,
            named_refs,
        ] {
            head.extend_from_slice(&r.start.to_le_bytes());
            head.extend_from_slice(&r.end.to_le_bytes());
        }
        head.extend_from_slice(&self.content_type.to_le_bytes());
        head.extend_from_slice(&self.total_size.to_le_bytes());
        debug_assert_eq!(head.len() as u64, HEADER_LEN + INFO_LEN);

        let copy_into = |out: &mut dyn Write| -> std::io::Result<()> {
            out.write_all(&head)?;
            refs.copy_to(out)?;
            out.write_all(&named)?;
            stream.copy_to(out)
        };
        match ObjectFile::create(&self.repo)? {
            Some(mut object) => {
                copy_into(&mut object).map_err(io)?;
                object.finish(&what)
            }
            None => {
                let mut whole = Vec::new();
                copy_into(&mut whole).map_err(io)?;
                self.repo
                    .ensure_object(&whole)
                    .map_err(repo_err(format!("storing {what}")))
            }
        }
    }
}

/// A run of inline bytes longer than this goes to an anonymous file until it closes.
const LONG_RUN: usize = 1 << 20;

/// The open run of inline bytes.
enum Run {
    Closed,
    /// In `pending`, its length word (a placeholder until the run closes) at this offset.
    InPending(usize),
    /// Longer than [`LONG_RUN`]: its bytes so far; its length word is not written yet.
    Spilled(Spill),
}

/// The instruction word that opens a run of `len` inline bytes.
fn run_word(len: u64) -> std::io::Result<[u8; 8]> {
    let len = i64::try_from(len).map_err(std::io::Error::other)?;
    Ok((-len).to_le_bytes())
}

/// Hands bytes to the compressor through `pending`, a [`CHUNK`] at a time.
struct ToCompressor<'a> {
    stream: &'a mut Compressor,
    pending: &'a mut Vec<u8>,
}

impl Write for ToCompressor<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let take = buf
            .len()
            .min(CHUNK.saturating_sub(self.pending.len()).max(1));
        self.pending.extend_from_slice(&buf[..take]);
        if self.pending.len() >= CHUNK {
            self.stream.write(self.pending)?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Uncompressed bytes handed to the compressor at once.
const CHUNK: usize = 256 << 10;
/// Uncompressed bytes after which a stream's compression moves to a thread of its own.
const THREAD_AT: u64 = 4 << 20;
/// Chunks on their way to the compressor thread: bounds the memory when it falls behind.
const IN_FLIGHT: usize = 4;

/// The stream's zstd compressor: on the writer's thread for a small stream (most layers of
/// an image of many: no thread to start), on a thread of its own once the stream passes
/// [`THREAD_AT`]. The thread running the import also reads every file and runs the layer's
/// sha256; compression there made it the import's slowest stage on layers of many small
/// files. zstd's output does not depend on how its input is cut into writes, so both give
/// composefs' bytes.
enum Compressor {
    Here {
        encoder: Encoder<'static, Spill>,
        /// Uncompressed bytes compressed so far.
        handed: u64,
    },
    Thread {
        chunks: std::sync::mpsc::SyncSender<Vec<u8>>,
        /// Emptied chunks coming back, to be filled again.
        spare: std::sync::mpsc::Receiver<Vec<u8>>,
        thread: std::thread::JoinHandle<std::io::Result<Spill>>,
    },
    /// Between the two, or after the thread stopped on an error (reported once, by the
    /// write that found it; later writes only say the compressor is gone).
    Gone,
}

impl Compressor {
    /// Compresses `chunk`, leaving it empty.
    fn write(&mut self, chunk: &mut Vec<u8>) -> std::io::Result<()> {
        if let Compressor::Here { encoder, handed } = self {
            *handed += chunk.len() as u64;
            if *handed < THREAD_AT {
                encoder.write_all(chunk)?;
                chunk.clear();
                return Ok(());
            }
            self.start()?;
        }
        match self {
            Compressor::Thread { chunks, spare, .. } => {
                let next = spare.try_recv().unwrap_or_default();
                let full = std::mem::replace(chunk, next);
                if chunks.send(full).is_ok() {
                    return Ok(());
                }
                // The thread stopped on an error: that error is the one to report.
                match std::mem::replace(self, Compressor::Gone).finish() {
                    Err(e) => Err(e),
                    Ok(_) => Err(std::io::Error::other("the stream's compressor stopped")),
                }
            }
            _ => Err(std::io::Error::other("the stream's compressor is gone")),
        }
    }

    fn start(&mut self) -> std::io::Result<()> {
        let Compressor::Here { encoder, .. } = std::mem::replace(self, Compressor::Gone) else {
            return Ok(());
        };
        let (chunks, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT);
        let (back, spare) = std::sync::mpsc::sync_channel(IN_FLIGHT + 1);
        let thread = std::thread::Builder::new()
            .name("cstor-zstd".into())
            .spawn(move || {
                let mut encoder = encoder;
                for mut chunk in rx {
                    encoder.write_all(&chunk)?;
                    chunk.clear();
                    // The writer may have enough spares already.
                    let _ = back.try_send(chunk);
                }
                encoder.finish()
            })?;
        *self = Compressor::Thread {
            chunks,
            spare,
            thread,
        };
        Ok(())
    }

    fn finish(self) -> std::io::Result<Spill> {
        match self {
            Compressor::Here { encoder, .. } => encoder.finish(),
            Compressor::Thread { chunks, thread, .. } => {
                drop(chunks);
                thread
                    .join()
                    .map_err(|_| std::io::Error::other("the stream's compressor panicked"))?
            }
            Compressor::Gone => Err(std::io::Error::other("the stream's compressor is gone")),
        }
    }
}

/// Bytes held in memory up to [`SPILL_AT`], then in an anonymous file: a small layer (most
/// layers of an image of many) creates no file at all (each costs an inode allocation).
struct Spill {
    mem: Vec<u8>,
    file: Option<BufWriter<File>>,
    len: u64,
    make: SpillMaker,
}

/// Bytes kept in memory before a [`Spill`] goes to a file.
const SPILL_AT: usize = 1 << 20;

impl Spill {
    fn new(make: SpillMaker) -> Self {
        Self {
            mem: Vec::new(),
            file: None,
            len: 0,
            make,
        }
    }

    /// Writes everything written, in order, to `out`.
    fn copy_to(self, out: &mut dyn Write) -> std::io::Result<()> {
        match self.file {
            None => out.write_all(&self.mem),
            Some(file) => {
                let mut file = file.into_inner().map_err(|e| e.into_error())?;
                file.seek(SeekFrom::Start(0))?;
                copy_exact(&mut file, out, self.len)
            }
        }
    }
}

impl Write for Spill {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.file.is_none() && self.mem.len() + buf.len() > SPILL_AT {
            let mut file = BufWriter::with_capacity(256 << 10, (self.make)()?);
            file.write_all(&self.mem)?;
            self.mem = Vec::new();
            self.file = Some(file);
        }
        match &mut self.file {
            Some(file) => file.write_all(buf)?,
            None => self.mem.extend_from_slice(buf),
        }
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

/// The object references of a stream, each once, in order of first use: the ids in an
/// [`IdFile`], and in memory only their 8-byte prefixes (ids are cryptographic digests, so a
/// prefix shared by two different ids is astronomically rare; it is handled all the same).
struct RefTable<ObjectID> {
    ids: IdFile<ObjectID>,
    by_prefix: HashMap<u64, u32>,
    /// Ids whose prefix was taken by another id.
    collided: HashMap<ObjectID, u32>,
}

impl<ObjectID: FsVerityHashValue> RefTable<ObjectID> {
    fn new(make: SpillMaker) -> Self {
        Self {
            ids: IdFile::new(Some(make)),
            by_prefix: HashMap::new(),
            collided: HashMap::new(),
        }
    }

    /// The index of `id`, added if it is new.
    fn ensure(&mut self, id: &ObjectID) -> std::io::Result<u32> {
        let prefix = crate::spill::id_prefix(id.as_bytes());
        match self.by_prefix.get(&prefix).copied() {
            Some(i) if self.ids.get(i as usize)? == *id => Ok(i),
            Some(_) => {
                if let Some(&i) = self.collided.get(id) {
                    return Ok(i);
                }
                let i = self.push(id)?;
                self.collided.insert(id.clone(), i);
                Ok(i)
            }
            None => {
                let i = self.push(id)?;
                self.by_prefix.insert(prefix, i);
                Ok(i)
            }
        }
    }

    fn push(&mut self, id: &ObjectID) -> std::io::Result<u32> {
        let i = u32::try_from(self.ids.len())
            .map_err(|_| std::io::Error::other("more than 2^32 objects in one stream"))?;
        self.ids.push(id.clone())?;
        Ok(i)
    }

    /// The table's length in bytes.
    fn byte_len(&self) -> u64 {
        self.ids.len() as u64 * size_of::<ObjectID>() as u64
    }

    /// Writes every id, in index order, to `out`.
    fn copy_to(self, out: &mut dyn Write) -> std::io::Result<()> {
        self.ids.copy_to(out)
    }
}

#[cfg(test)]
mod tests {
    use composefs::fsverity::{Algorithm, Sha256HashValue, Sha512HashValue};
    use composefs::repository::RepositoryConfig;
    use zerocopy::{FromBytes, IntoBytes};

    use super::*;

    fn repo<ObjectID: FsVerityHashValue>(
        dir: &std::path::Path,
        algorithm: Algorithm,
    ) -> Arc<Repository<ObjectID>> {
        let config = RepositoryConfig::new(algorithm).set_insecure();
        Arc::new(
            Repository::init_path(rustix::fs::CWD, dir, config)
                .unwrap()
                .0,
        )
    }

    /// A pseudo-random sequence of inline runs and references, with repeats, as a layer of
    /// many files makes.
    fn pieces<ObjectID: FsVerityHashValue>(n: usize) -> Vec<Result<Vec<u8>, ObjectID>> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut ids: Vec<ObjectID> = Vec::new();
        (0..n)
            .map(|_| match next() % 3 {
                0 => {
                    let len = (next() % 1500) as usize;
                    Ok((0..len).map(|_| next() as u8).collect())
                }
                1 if !ids.is_empty() && next() % 4 == 0 => {
                    Err(ids[(next() as usize) % ids.len()].clone())
                }
                _ => {
                    let seed = next().to_le_bytes();
                    let id: ObjectID = crate::verity::ids::<ObjectID>(&[&seed[..]])[0].clone();
                    ids.push(id.clone());
                    Err(id)
                }
            })
            .collect()
    }

    fn same_bytes_as_composefs<ObjectID: FsVerityHashValue>(algorithm: Algorithm, n: usize) {
        let pieces = pieces::<ObjectID>(n);
        let inline: usize = pieces.iter().flatten().map(Vec::len).sum();
        assert!(
            n < 40_000 || inline as u64 > 2 * THREAD_AT,
            "{inline} inline bytes"
        );
        compare_with_composefs(algorithm, &pieces, &format!("{n} pieces"));
    }

    /// Writes `pieces` with composefs' writer and ours; both must store the same object.
    /// Returns the largest `pending` buffer ours had.
    fn compare_with_composefs<ObjectID: FsVerityHashValue>(
        algorithm: Algorithm,
        pieces: &[Result<Vec<u8>, ObjectID>],
        what: &str,
    ) -> usize {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo::<ObjectID>(tmp.path(), algorithm);
        let mut theirs = repo
            .create_stream(composefs_oci::LAYER_CONTENT_TYPE)
            .unwrap();
        let mut ours = StreamWriter::new(
            &repo,
            composefs_oci::LAYER_CONTENT_TYPE,
            "a test stream".into(),
        )
        .unwrap();
        let mut most = 0;
        for p in pieces {
            match p {
                Ok(bytes) => {
                    theirs.write_inline(bytes);
                    ours.write_inline(bytes).unwrap();
                }
                Err(id) => {
                    theirs.add_external_size(4096);
                    ours.add_external_size(4096);
                    theirs.write_reference(id.clone()).unwrap();
                    ours.write_reference(id.clone()).unwrap();
                }
            }
            most = most.max(ours.pending.capacity());
        }
        let want = theirs.done().unwrap();
        let got = ours.done().unwrap();
        assert_eq!(got.to_hex(), want.to_hex(), "{what}");
        most
    }

    #[test]
    fn the_stream_is_composefs_own_byte_for_byte() {
        // 40,000 pieces pass THREAD_AT: the compressor moves to its thread mid-stream.
        for n in [0, 1, 7, 5000, 40_000] {
            same_bytes_as_composefs::<Sha512HashValue>(Algorithm::SHA512, n);
        }
        same_bytes_as_composefs::<Sha256HashValue>(Algorithm::SHA256, 3000);
    }

    #[test]
    fn a_long_run_of_inline_bytes_waits_in_a_file_not_in_memory() {
        // A layer of empty files is one run of tar headers, as long as the layer: runs of
        // several times LONG_RUN (with empty writes among them) between and after
        // references, and runs just under and over the limit.
        let ids = crate::verity::ids::<Sha512HashValue>(&[&b"a"[..], &b"b"[..]]);
        let header: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
        let run = |bytes: usize| {
            let mut run = Vec::new();
            for i in 0..bytes / 512 {
                run.push(Ok(header[..512 - i % 3].to_vec()));
                if i % 100 == 0 {
                    run.push(Ok(Vec::new()));
                }
            }
            run
        };
        let mut pieces = vec![Err(ids[0].clone())];
        pieces.extend(run(5 * LONG_RUN));
        pieces.push(Err(ids[1].clone()));
        pieces.extend(run(LONG_RUN - 2048));
        pieces.push(Err(ids[0].clone()));
        pieces.extend(run(LONG_RUN + 2048));
        pieces.push(Err(ids[1].clone()));
        pieces.extend(run(3 * LONG_RUN));
        let most = compare_with_composefs(Algorithm::SHA512, &pieces, "long runs");
        assert!(most <= 2 * LONG_RUN + CHUNK, "{most} bytes pending at once");
    }

    #[test]
    fn a_spill_keeps_small_contents_in_memory_and_large_ones_in_a_file() {
        let bytes: Vec<u8> = (0..3 * SPILL_AT as u32)
            .map(|i| ((i * 31) >> 3) as u8)
            .collect();
        for len in [0, 100, SPILL_AT, SPILL_AT + 1, bytes.len()] {
            let mut spill = Spill::new(Arc::new(tempfile::tempfile));
            for chunk in bytes[..len].chunks(70_000) {
                spill.write_all(chunk).unwrap();
            }
            assert_eq!(spill.file.is_some(), len > SPILL_AT, "{len} bytes");
            assert_eq!(spill.len, len as u64);
            let mut back = Vec::new();
            spill.copy_to(&mut back).unwrap();
            assert!(back == bytes[..len], "{len} bytes come back as written");
        }
    }

    #[test]
    fn a_shared_prefix_does_not_merge_two_objects() {
        let mut t = RefTable::<Sha256HashValue>::new(Arc::new(tempfile::tempfile));
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        a[31] = 1;
        b[31] = 2;
        let (a, b) = (
            Sha256HashValue::read_from_bytes(&a).unwrap(),
            Sha256HashValue::read_from_bytes(&b).unwrap(),
        );
        // Enough others that the first ones are read back from the file.
        let others: Vec<Sha256HashValue> = (0..3000u32)
            .map(|i| crate::verity::ids::<Sha256HashValue>(&[&i.to_le_bytes()[..]])[0].clone())
            .collect();
        assert_eq!(t.ensure(&a).unwrap(), 0);
        for o in &others {
            t.ensure(o).unwrap();
        }
        let ib = t.ensure(&b).unwrap();
        assert_eq!(ib, 3001);
        assert_eq!(t.ensure(&a).unwrap(), 0);
        assert_eq!(t.ensure(&b).unwrap(), ib);
        assert_eq!(t.ensure(&others[1234]).unwrap(), 1235);
        assert_eq!(t.byte_len(), 3002 * 32);
        let mut all = Vec::new();
        t.copy_to(&mut all).unwrap();
        assert_eq!(all.len(), 3002 * 32);
        assert_eq!(&all[..32], a.as_bytes());
        assert_eq!(&all[3001 * 32..], b.as_bytes());
    }
}
