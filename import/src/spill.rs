//! Anonymous files for tables that would otherwise grow in memory with the image.
//!
//! Object ids are the largest per-file data an import holds (32 or 64 bytes for each
//! external file): a layer stream's reference table while it is written, and the image
//! tree's ids until its EROFS image is. Both go to an [`IdFile`]: appended in order, read
//! back by index. The file lies beside the repository's objects, so its pages are the
//! kernel's page cache of a real filesystem (reclaimable, not the process's memory), never
//! a tmpfs that would hold them in memory after all.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;

/// Makes an anonymous file for spilled data; shared by the tables of one tree.
pub(crate) type SpillMaker = Arc<dyn Fn() -> std::io::Result<File> + Send + Sync>;

/// Anonymous files in the repository's objects directory, else (no `O_TMPFILE` there) in
/// `$TMPDIR`.
pub(crate) fn spill_maker<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
) -> SpillMaker {
    let repo = repo.clone();
    Arc::new(move || match repo.create_object_tmpfile() {
        Ok(fd) => Ok(File::from(fd)),
        Err(_) => tempfile::tempfile(),
    })
}

/// Copies exactly `len` bytes (a spill file shorter than what was written to it is an I/O
/// error, not a shorter table).
pub(crate) fn copy_exact(from: &mut File, to: &mut dyn Write, len: u64) -> std::io::Result<()> {
    use std::io::Read;
    let copied = std::io::copy(&mut from.take(len), to)?;
    if copied != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("a spill file ended after {copied} of {len} bytes"),
        ));
    }
    Ok(())
}

/// Writes all of `bytes` at `at` (pwrite to a regular file writes it all unless the disk is
/// full).
fn write_all_at(file: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    if rustix::io::pwrite(file, bytes, at)? != bytes.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
    }
    Ok(())
}

/// Fills `out` from `at`: a spill file shorter than what was written to it is an error.
fn read_exact_at(file: &File, out: &mut [u8], at: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < out.len() {
        let n = rustix::io::pread(file, &mut out[done..], at + done as u64)?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        done += n;
    }
    Ok(())
}

/// Byte strings (a tree's inline file contents and link targets) appended and read back by
/// address: the last [`DataFile::BATCH`] bytes in memory, the rest in a file made on first
/// need, read back through a window of [`DataFile::WINDOW`] bytes. Addresses are byte
/// offsets, 32 bits as the tree packs them: at most 4 GiB in all. Without a [`SpillMaker`]
/// everything stays in memory.
pub(crate) struct DataFile {
    file: Option<File>,
    make: Option<SpillMaker>,
    /// Bytes not written to `file` yet; they start at `flushed`.
    pending: Vec<u8>,
    flushed: u64,
    batch: usize,
    window: std::cell::RefCell<Window>,
}

/// Bytes of a spill file read at once, starting at `start`.
#[derive(Debug, Default)]
struct Window {
    start: u64,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for DataFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataFile")
            .field("spilled", &self.flushed)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl DataFile {
    /// Bytes kept in memory before they are written out.
    const BATCH: usize = 1 << 20;
    /// Bytes read at once: the writer asks for contents in inode order, which for the
    /// files of one directory is the order they were added, so most reads are a copy from
    /// the window, and a read that misses costs a few pages, not a megabyte.
    const WINDOW: usize = 16 << 10;

    pub fn new(make: Option<SpillMaker>) -> Self {
        Self::with_batch(make, Self::BATCH)
    }

    /// Writes out every `batch` bytes (tests spill after a few).
    pub fn with_batch(make: Option<SpillMaker>, batch: usize) -> Self {
        DataFile {
            file: None,
            make,
            pending: Vec::new(),
            flushed: 0,
            batch: batch.max(1),
            window: Default::default(),
        }
    }

    /// Bytes stored.
    pub fn len(&self) -> u64 {
        self.flushed + self.pending.len() as u64
    }

    /// Stores `bytes`; their address and length, or `None` past 4 GiB in all.
    pub fn push(&mut self, bytes: &[u8]) -> std::io::Result<Option<(u32, u32)>> {
        let (Ok(at), Ok(len)) = (u32::try_from(self.len()), u32::try_from(bytes.len())) else {
            return Ok(None);
        };
        if at.checked_add(len).is_none() {
            return Ok(None);
        }
        if self.pending.is_empty() && self.make.is_some() {
            // Filled once to the batch, then reused: no doubling, no holes left behind.
            self.pending.reserve_exact(self.batch);
        }
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= self.batch && self.make.is_some() {
            let file = match (&mut self.file, &mut self.make) {
                (Some(file), _) => file,
                (file @ None, Some(make)) => file.insert(make()?),
                (None, None) => return Ok(Some((at, len))),
            };
            write_all_at(file, &self.pending, self.flushed)?;
            self.flushed += self.pending.len() as u64;
            self.pending.clear();
        }
        Ok(Some((at, len)))
    }

    /// The `len` bytes at `at`, as [`DataFile::push`] returned them.
    pub fn get(&self, at: u32, len: u32) -> std::io::Result<std::borrow::Cow<'_, [u8]>> {
        let (at, len) = (u64::from(at), len as usize);
        let end = at + len as u64;
        if end > self.len() {
            return Err(std::io::Error::other(format!(
                "data at {at}..{end} is past the end of the table ({} bytes)",
                self.len()
            )));
        }
        if at >= self.flushed {
            let from = (at - self.flushed) as usize;
            return Ok(std::borrow::Cow::Borrowed(&self.pending[from..from + len]));
        }
        // Everything is flushed or pending whole: what starts in the file ends there.
        let Some(file) = &self.file else {
            return Err(std::io::Error::other("data was spilled without a file"));
        };
        let mut w = self.window.borrow_mut();
        let held = w.start..w.start + w.bytes.len() as u64;
        if !(held.contains(&at) && end <= held.end) {
            let start = at - at % 4096;
            let want = (end - start)
                .max(Self::WINDOW as u64)
                .min(self.flushed - start);
            let mut bytes = std::mem::take(&mut w.bytes);
            // Emptied first: a failed read leaves no stale window behind.
            bytes.clear();
            bytes.resize(want as usize, 0);
            read_exact_at(file, &mut bytes, start)?;
            *w = Window { start, bytes };
        }
        let from = (at - w.start) as usize;
        Ok(std::borrow::Cow::Owned(w.bytes[from..from + len].to_vec()))
    }
}

/// Object ids of a table in a file, read back through a window of a few hundred at a time:
/// readers ask for them in nearly the order they were written, so most reads are a copy
/// from the window. The compact tree's ids and a stored layer stream's reference table are
/// read this way.
#[derive(Debug)]
pub(crate) struct IdWindow {
    /// Ids per read.
    ids: usize,
    first: u64,
    held: u64,
    bytes: Vec<u8>,
}

impl IdWindow {
    pub fn new(ids: usize) -> Self {
        IdWindow {
            ids: ids.max(1),
            first: 0,
            held: 0,
            bytes: Vec::new(),
        }
    }

    /// Id `i` of the `count` ids stored from offset `base` of `file`.
    pub fn get<ObjectID: FsVerityHashValue>(
        &mut self,
        file: &File,
        base: u64,
        count: u64,
        i: u64,
    ) -> std::io::Result<ObjectID> {
        if i >= count {
            return Err(std::io::Error::other(format!(
                "id {i} asked of a table of {count}"
            )));
        }
        let len = size_of::<ObjectID>() as u64;
        if !(self.first..self.first + self.held).contains(&i) {
            let first = i - i % self.ids as u64;
            let n = (count - first).min(self.ids as u64);
            // Emptied first: a failed read leaves no stale window behind.
            self.held = 0;
            self.bytes.resize((n * len) as usize, 0);
            read_exact_at(file, &mut self.bytes, base + first * len)?;
            self.first = first;
            self.held = n;
        }
        let at = ((i - self.first) * len) as usize;
        let mut id = ObjectID::EMPTY;
        id.as_mut_bytes()
            .copy_from_slice(&self.bytes[at..at + len as usize]);
        Ok(id)
    }
}

/// The first 8 bytes of an object id (fewer for a shorter slice), for in-memory tables that
/// find ids by prefix and keep the whole ids elsewhere: ids are digests, so prefixes spread
/// evenly, but two ids may still share one and every such table must allow for it.
pub(crate) fn id_prefix(id: &[u8]) -> u64 {
    let mut p = [0u8; 8];
    let n = id.len().min(8);
    p[..n].copy_from_slice(&id[..n]);
    u64::from_le_bytes(p)
}

/// Ids buffered before they are written out.
const PENDING_MAX: usize = 1024;

/// Ids appended in order and read back by index: the last [`PENDING_MAX`] in memory, the
/// rest in a file made on first need (a small table never makes one). Without a
/// [`SpillMaker`] everything stays in memory.
pub(crate) struct IdFile<ObjectID> {
    file: Option<File>,
    make: Option<SpillMaker>,
    /// Ids not written to `file` yet.
    pending: Vec<ObjectID>,
    /// How many ids `file` holds.
    flushed: usize,
    /// Pending ids written out at once.
    batch: usize,
}

impl<ObjectID> std::fmt::Debug for IdFile<ObjectID> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdFile")
            .field("spilled", &self.flushed)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl<ObjectID: FsVerityHashValue> IdFile<ObjectID> {
    pub fn new(make: Option<SpillMaker>) -> Self {
        Self::with_batch(make, PENDING_MAX)
    }

    /// Writes out every `batch` ids (tests spill after a few).
    pub fn with_batch(make: Option<SpillMaker>, batch: usize) -> Self {
        Self {
            file: None,
            make,
            pending: Vec::new(),
            flushed: 0,
            batch: batch.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.flushed + self.pending.len()
    }

    /// Appends `id`; its index is the length before.
    pub fn push(&mut self, id: ObjectID) -> std::io::Result<()> {
        self.pending.push(id);
        if self.pending.len() >= self.batch && self.make.is_some() {
            self.write_pending()?;
        }
        Ok(())
    }

    fn write_pending(&mut self) -> std::io::Result<()> {
        let mut bytes = Vec::with_capacity(self.pending.len() * size_of::<ObjectID>());
        for id in &self.pending {
            bytes.extend_from_slice(id.as_bytes());
        }
        let at = (self.flushed * size_of::<ObjectID>()) as u64;
        let file = match (&mut self.file, &mut self.make) {
            (Some(file), _) => file,
            (file @ None, Some(make)) => file.insert(make()?),
            (None, None) => return Ok(()),
        };
        write_all_at(file, &bytes, at)?;
        self.flushed += self.pending.len();
        self.pending.clear();
        Ok(())
    }

    /// The id of index `i`.
    pub fn get(&self, i: usize) -> std::io::Result<ObjectID> {
        if let Some(id) = i
            .checked_sub(self.flushed)
            .and_then(|j| self.pending.get(j))
        {
            return Ok(id.clone());
        }
        let mut id = ObjectID::EMPTY;
        self.read_spilled(i, id.as_mut_bytes())?;
        Ok(id)
    }

    /// Fills `out` (a whole number of ids) from the spilled ids starting at index `first`;
    /// the number of ids read (fewer at the end of the file, none for a pending index).
    pub fn read_spilled(&self, first: usize, out: &mut [u8]) -> std::io::Result<usize> {
        let len = size_of::<ObjectID>();
        if first >= self.flushed {
            return Err(std::io::Error::other(format!(
                "id {first} is not in the spill file ({} are)",
                self.flushed
            )));
        }
        let Some(file) = &self.file else {
            return Err(std::io::Error::other("ids were spilled without a file"));
        };
        let want = out.len().min((self.flushed - first) * len);
        let out = &mut out[..want];
        read_exact_at(file, out, (first * len) as u64)?;
        Ok(want / len)
    }

    /// The spill file and how many ids it holds, once there is one.
    pub fn spilled(&self) -> Option<(&File, u64)> {
        self.file.as_ref().map(|f| (f, self.flushed as u64))
    }

    /// Whether index `i` is held in memory (not in the file).
    pub fn is_pending(&self, i: usize) -> bool {
        i >= self.flushed
    }

    /// Writes every id, in index order, to `out`.
    pub fn copy_to(self, out: &mut dyn Write) -> std::io::Result<()> {
        if let Some(mut file) = self.file {
            file.seek(SeekFrom::Start(0))?;
            copy_exact(
                &mut file,
                out,
                (self.flushed * size_of::<ObjectID>()) as u64,
            )?;
        }
        for id in &self.pending {
            out.write_all(id.as_bytes())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use composefs::fsverity::Sha512HashValue;
    use zerocopy::{FromBytes, IntoBytes};

    use super::*;

    fn id(i: usize) -> Sha512HashValue {
        let mut bytes = [0u8; 64];
        bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
        bytes[63] = (i % 251) as u8;
        Sha512HashValue::read_from_bytes(&bytes).unwrap()
    }

    #[test]
    fn ids_come_back_by_index_from_memory_and_from_the_file() {
        let n = 3 * PENDING_MAX + 17;
        let mut spilled = IdFile::new(Some(Arc::new(tempfile::tempfile) as SpillMaker));
        let mut kept = IdFile::new(None);
        for i in 0..n {
            spilled.push(id(i)).unwrap();
            kept.push(id(i)).unwrap();
        }
        assert_eq!((spilled.len(), kept.len()), (n, n));
        assert!(!spilled.is_pending(0) && spilled.is_pending(n - 1));
        assert!(kept.is_pending(0), "without a maker nothing is spilled");
        for i in [
            0,
            1,
            PENDING_MAX - 1,
            PENDING_MAX,
            2 * PENDING_MAX + 5,
            n - 1,
        ] {
            assert_eq!(spilled.get(i).unwrap(), id(i), "{i}");
            assert_eq!(kept.get(i).unwrap(), id(i), "{i}");
        }
        // A window read stops at the end of the file.
        let mut buf = vec![0u8; 64 * 100];
        let read = spilled
            .read_spilled(3 * PENDING_MAX - 10, &mut buf)
            .unwrap();
        assert_eq!(read, 10);
        assert_eq!(&buf[..64], id(3 * PENDING_MAX - 10).as_bytes());
        assert!(spilled.read_spilled(n - 1, &mut buf).is_err());
        let mut all = Vec::new();
        spilled.copy_to(&mut all).unwrap();
        assert_eq!(all.len(), 64 * n);
        assert_eq!(&all[64 * (n - 1)..], id(n - 1).as_bytes());
    }

    /// Contents of every size, some larger than the read window, come back whole from
    /// memory and from the file, in any order; a file cut short is an error, not data.
    #[test]
    fn data_comes_back_by_address_in_any_order() {
        let file = Arc::new(std::sync::Mutex::new(None::<File>));
        let kept_file = file.clone();
        let make: SpillMaker = Arc::new(move || {
            let f = tempfile::tempfile()?;
            *kept_file.lock().unwrap() = Some(f.try_clone()?);
            Ok(f)
        });
        let mut spilled = DataFile::with_batch(Some(make), 1000);
        let mut kept = DataFile::new(None);
        let content = |i: usize| -> Vec<u8> {
            let len = match i % 50 {
                0 => DataFile::WINDOW + 4096 + i,
                n => n * 7,
            };
            (0..len).map(|j| (i * 31 + j) as u8).collect()
        };
        let mut stored = Vec::new();
        for i in 0..600 {
            let bytes = content(i);
            let at = spilled.push(&bytes).unwrap().unwrap();
            assert_eq!(kept.push(&bytes).unwrap().unwrap(), at);
            stored.push(at);
        }
        assert!(
            spilled.flushed > 20 * DataFile::WINDOW as u64,
            "most are in the file"
        );
        assert!(!spilled.pending.is_empty() && kept.flushed == 0);
        // Forwards, backwards, and hopping across the whole table.
        let order = (0..600)
            .chain((0..600).rev())
            .chain((0..600).map(|i| i * 257 % 600));
        for i in order {
            let (at, len) = stored[i];
            assert_eq!(&*spilled.get(at, len).unwrap(), &content(i)[..], "{i}");
            assert_eq!(&*kept.get(at, len).unwrap(), &content(i)[..], "{i}");
        }
        assert!(spilled.get(u32::MAX - 3, 3).is_err(), "past the end");

        let cut = spilled.flushed / 2;
        file.lock().unwrap().as_ref().unwrap().set_len(cut).unwrap();
        let beyond = stored
            .iter()
            .rev()
            .find(|&&(at, _)| u64::from(at) > cut && u64::from(at) < spilled.flushed);
        let &(at, len) = beyond.unwrap();
        assert!(spilled.get(at, len).is_err(), "a truncated spill file");
    }
}
