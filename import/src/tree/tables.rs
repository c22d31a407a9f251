//! Tables of the compact tree that grow without ever moving what they hold: a `Vec` that
//! doubles copies itself each time and, where the allocator cannot grow it in place, leaves
//! the old buffer behind, free but resident, about as large as the table. At hundreds of
//! thousands of files those holes were a tenth of the import's peak.

use std::cell::RefCell;
use std::ffi::OsStr;

use composefs::fsverity::FsVerityHashValue;
use composefs::generic_tree::ImageError;

use crate::spill::{IdFile, IdWindow, SpillMaker};

/// A growable table of `T`s kept in chunks of 16k elements.
#[derive(Debug)]
pub(super) struct Chunks<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Chunks<T> {
    const CHUNK: usize = 1 << 14;

    pub fn new() -> Self {
        Chunks {
            chunks: Vec::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn push(&mut self, value: T) {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < Self::CHUNK => chunk.push(value),
            _ => {
                let mut chunk = Vec::with_capacity(Self::CHUNK);
                chunk.push(value);
                self.chunks.push(chunk);
            }
        }
        self.len += 1;
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.chunks.len() * Self::CHUNK
    }

    /// Puts the elements in the order `order` gives, in place: element `i` becomes the one
    /// at `order[i]`. Sorting an index and then building a sorted copy would hold the table
    /// twice, and a table of millions of entries is what sets an import's peak.
    ///
    /// `order` must be a permutation of `0..len` (checked: anything else is
    /// `Err(())`, and the table is then in some order of its elements, none lost).
    pub fn permute(&mut self, mut order: Vec<u32>) -> Result<(), ()>
    where
        T: Copy,
    {
        if order.len() != self.len || order.iter().any(|&o| o as usize >= self.len) {
            return Err(());
        }
        // Each cycle of the permutation moves round once; a position done points at itself.
        for start in 0..order.len() {
            if order[start] as usize == start {
                continue;
            }
            let first = self[start];
            let mut at = start;
            loop {
                let from = order[at] as usize;
                order[at] = at as u32;
                if from == start {
                    self[at] = first;
                    break;
                }
                if order[from] as usize == from {
                    // Reached twice: `order` repeats an index. The value at `at` is the only
                    // copy of `first` now gone; put it back where the cycle started.
                    self[at] = first;
                    return Err(());
                }
                self[at] = self[from];
                at = from;
            }
        }
        Ok(())
    }

    /// The first `keep` elements turned into `U`s by `f`, chunk by chunk: each chunk of `T`
    /// is freed once converted, so the two tables are never both whole in memory.
    pub fn convert<U>(self, keep: usize, mut f: impl FnMut(T) -> U) -> Chunks<U> {
        let mut out = Chunks::new();
        let mut left = keep.min(self.len);
        for chunk in self.chunks {
            if left == 0 {
                break;
            }
            let take = left.min(chunk.len());
            let mut converted = Vec::with_capacity(take);
            converted.extend(chunk.into_iter().take(take).map(&mut f));
            out.len += take;
            out.chunks.push(converted);
            left -= take;
        }
        out
    }
}

impl<T> std::ops::Index<usize> for Chunks<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        &self.chunks[i / Self::CHUNK][i % Self::CHUNK]
    }
}

impl<T> std::ops::IndexMut<usize> for Chunks<T> {
    fn index_mut(&mut self, i: usize) -> &mut T {
        &mut self.chunks[i / Self::CHUNK][i % Self::CHUNK]
    }
}

/// Bytes (names, inline contents, link targets) in blocks of 1 MiB. An address is a block
/// number (12 bits) and an offset in it (20 bits); what does not fit in a block's rest
/// starts a new one, and what is larger than a block gets one of its own size.
#[derive(Debug, Default)]
pub(super) struct Arena {
    blocks: Vec<Vec<u8>>,
}

impl Arena {
    const BLOCK_BITS: u32 = 20;
    const BLOCK: usize = 1 << Self::BLOCK_BITS;
    const MAX_BLOCKS: usize = 1 << (32 - Self::BLOCK_BITS);

    /// Stores `bytes`; their address and length.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(u32, u32), ImageError> {
        let len = u32::try_from(bytes.len()).map_err(|_| {
            let what = format!("{} bytes in one name or file", bytes.len());
            ImageError::InvalidFilename(OsStr::new(&what).into())
        })?;
        let fits = self
            .blocks
            .last()
            .is_some_and(|b| b.capacity() - b.len() >= bytes.len());
        if !fits {
            if self.blocks.len() >= Self::MAX_BLOCKS {
                return Err(ImageError::InvalidFilename(
                    OsStr::new("more than 4 GiB of names and inline data").into(),
                ));
            }
            self.blocks
                .push(Vec::with_capacity(bytes.len().max(Self::BLOCK)));
        }
        // Not empty: a block was pushed above if there was none.
        let number = self.blocks.len() - 1;
        let block = &mut self.blocks[number];
        let at = ((number as u32) << Self::BLOCK_BITS) | block.len() as u32;
        block.extend_from_slice(bytes);
        Ok((at, len))
    }

    pub fn get(&self, at: u32, len: u32) -> &[u8] {
        let block = &self.blocks[(at >> Self::BLOCK_BITS) as usize];
        &block[(at & (Self::BLOCK as u32 - 1)) as usize..][..len as usize]
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.blocks.iter().map(Vec::capacity).sum()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.blocks.iter().map(Vec::len).sum()
    }
}

/// The tree's object ids, one per external file: at a million files the largest table of
/// the tree (64 MB of SHA-512 ids), and one the writer reads only once per file and pass.
/// They go to an [`IdFile`] as they come and are read back through an [`IdWindow`] of
/// [`WINDOW`] ids: the writer asks for them in inode order, which for a layer's files is
/// close to the order they were added.
#[derive(Debug)]
pub(super) struct IdTable<ObjectID> {
    ids: IdFile<ObjectID>,
    window: RefCell<IdWindow>,
}

/// Ids per read of the spill file.
const WINDOW: usize = 1024;

impl<ObjectID: FsVerityHashValue> IdTable<ObjectID> {
    /// Ids spilled to files from `make`, or all kept in memory without it.
    pub fn new(make: Option<SpillMaker>) -> Self {
        IdTable {
            ids: IdFile::new(make),
            window: RefCell::new(IdWindow::new(WINDOW)),
        }
    }

    /// Spills every `batch` ids and reads `window` at a time: small numbers, so that a
    /// test's few files cross both boundaries.
    #[cfg(test)]
    pub fn small(make: SpillMaker, batch: usize, window: usize) -> Self {
        IdTable {
            ids: IdFile::with_batch(Some(make), batch),
            window: RefCell::new(IdWindow::new(window)),
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn push(&mut self, id: ObjectID) -> std::io::Result<()> {
        self.ids.push(id)
    }

    pub fn get(&self, i: usize) -> std::io::Result<ObjectID> {
        match self.ids.spilled() {
            Some((file, count)) if !self.ids.is_pending(i) => {
                self.window.borrow_mut().get(file, 0, count, i as u64)
            }
            _ => self.ids.get(i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(n: u32) -> Chunks<u32> {
        let mut t = Chunks::new();
        for v in 0..n {
            t.push(v);
        }
        t
    }

    #[test]
    fn a_table_takes_any_order_in_place_and_converts_a_prefix() {
        let n = 2 * Chunks::<u32>::CHUNK as u32 + 123;
        // A permutation with long and short cycles: multiplying by a number prime to n.
        let order: Vec<u32> = (0..n)
            .map(|i| ((i as u64 * 7919) % n as u64) as u32)
            .collect();
        let mut t = table(n);
        t.permute(order.clone()).unwrap();
        assert!((0..n as usize).all(|i| t[i] == order[i]));

        let keep = Chunks::<u32>::CHUNK + 5;
        let converted = t.convert(keep, |v| u64::from(v) * 2);
        assert_eq!(converted.len(), keep);
        assert!((0..keep).all(|i| converted[i] == u64::from(order[i]) * 2));
        assert_eq!(
            converted.chunks.len(),
            2,
            "only the chunks kept are converted"
        );
    }

    #[test]
    fn an_order_that_is_not_a_permutation_is_refused_and_loses_nothing() {
        let n = Chunks::<u32>::CHUNK as u32 + 10;
        for order in [
            (0..n)
                .map(|i| if i == 3 { 7 } else { (i + 1) % n })
                .collect::<Vec<u32>>(),
            (0..n).map(|i| if i == 5 { n } else { i }).collect(),
            vec![0, 1, 2],
        ] {
            let mut t = table(n);
            assert!(t.permute(order).is_err());
            let mut values: Vec<u32> = t.iter().copied().collect();
            values.sort_unstable();
            assert_eq!(values, (0..n).collect::<Vec<u32>>());
        }
    }

    #[test]
    fn the_arena_gives_back_what_it_was_given_across_blocks() {
        let mut arena = Arena::default();
        let big = vec![7u8; Arena::BLOCK + 3];
        let mut stored = Vec::new();
        for i in 0..3000u32 {
            let bytes: Vec<u8> = match i {
                1000 => big.clone(),
                _ => vec![i as u8; (i % 700) as usize],
            };
            stored.push((arena.push(&bytes).unwrap(), bytes));
        }
        for ((at, len), bytes) in &stored {
            assert_eq!(arena.get(*at, *len), &bytes[..]);
        }
        assert!(arena.blocks.len() > 2, "spans blocks");
        assert_eq!(
            arena.len(),
            stored.iter().map(|(_, b)| b.len()).sum::<usize>()
        );
        // Nothing was copied: every block but the oversized one has the block's size.
        assert!(
            arena
                .blocks
                .iter()
                .all(|b| b.capacity() == Arena::BLOCK || b.len() == big.len())
        );
        assert!(arena.capacity() < arena.len() + 3 * Arena::BLOCK);
    }
}
