//! fs-verity digests (4 KiB blocks, no salt), as the kernel and composefs compute them, but
//! fast enough to sit on the import's critical path.
//!
//! composefs' own `FsVerityHasher` creates an OpenSSL context for every 4 KiB block, which
//! caps it at a few hundred MB/s and scales poorly across threads. This one keeps one SHA
//! state per tree level and reuses it; the tests check it against composefs for every shape
//! of tree.

use composefs::fsverity::{Algorithm, FsVerityHashValue};
use sha2::digest::{Digest, FixedOutputReset};

/// Block size of the Merkle tree: 4 KiB (`log_blocksize` 12), what composefs uses.
pub const BLOCK: usize = 4096;

struct Level {
    /// Child hashes not yet hashed into a block.
    buf: Vec<u8>,
    /// Hashes ever appended to this level.
    count: u64,
}

/// An incremental fs-verity digest over one file's bytes.
pub struct Verity<D: Digest + FixedOutputReset> {
    hasher: D,
    levels: Vec<Level>,
    partial: Vec<u8>,
    size: u64,
    alg_id: u8,
}

impl<D: Digest + FixedOutputReset> Verity<D> {
    fn new(alg_id: u8) -> Self {
        Self {
            hasher: D::new(),
            levels: Vec::new(),
            partial: Vec::with_capacity(BLOCK),
            size: 0,
            alg_id,
        }
    }

    fn hash_block(&mut self, block: &[u8]) -> Vec<u8> {
        Digest::update(&mut self.hasher, block);
        if block.len() < BLOCK {
            // The last data block and partial hash blocks are zero-padded.
            let zeros = [0u8; BLOCK];
            Digest::update(&mut self.hasher, &zeros[..BLOCK - block.len()]);
        }
        self.hasher.finalize_reset().to_vec()
    }

    fn push(&mut self, mut level: usize, mut digest: Vec<u8>) {
        loop {
            if self.levels.len() <= level {
                self.levels.push(Level {
                    buf: Vec::with_capacity(BLOCK),
                    count: 0,
                });
            }
            let l = &mut self.levels[level];
            l.buf.extend_from_slice(&digest);
            l.count += 1;
            if l.buf.len() < BLOCK {
                return;
            }
            let full = std::mem::take(&mut l.buf);
            digest = self.hash_block(&full);
            self.levels[level].buf = full;
            self.levels[level].buf.clear();
            level += 1;
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.size += data.len() as u64;
        if !self.partial.is_empty() {
            let take = (BLOCK - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < BLOCK {
                return;
            }
            let block = std::mem::take(&mut self.partial);
            let d = self.hash_block(&block);
            self.partial = block;
            self.partial.clear();
            self.push(0, d);
        }
        let mut chunks = data.chunks_exact(BLOCK);
        for block in &mut chunks {
            let d = self.hash_block(block);
            self.push(0, d);
        }
        self.partial.extend_from_slice(chunks.remainder());
    }

    /// The digest: the hash of the fs-verity descriptor.
    pub fn finish(mut self) -> Vec<u8> {
        if !self.partial.is_empty() {
            let block = std::mem::take(&mut self.partial);
            let d = self.hash_block(&block);
            self.push(0, d);
        }
        let mut root = Vec::new();
        let mut i = 0;
        while i < self.levels.len() {
            let top = i + 1 == self.levels.len();
            if top && self.levels[i].count == 1 {
                root = std::mem::take(&mut self.levels[i].buf);
                break;
            }
            if !self.levels[i].buf.is_empty() {
                let part = std::mem::take(&mut self.levels[i].buf);
                let d = self.hash_block(&part);
                self.push(i + 1, d);
            }
            i += 1;
        }
        // struct fsverity_descriptor: version, hash_algorithm, log_blocksize, salt_size,
        // reserved[4], data_size (le64), root_hash[64], salt[32], reserved[144].
        let mut desc = [0u8; 256];
        desc[0] = 1;
        desc[1] = self.alg_id;
        desc[2] = 12;
        desc[8..16].copy_from_slice(&self.size.to_le_bytes());
        desc[16..16 + root.len()].copy_from_slice(&root);
        Digest::update(&mut self.hasher, desc);
        self.hasher.finalize_reset().to_vec()
    }
}

impl<D: Digest + FixedOutputReset> std::fmt::Debug for Verity<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verity")
            .field("size", &self.size)
            .field("levels", &self.levels.len())
            .finish_non_exhaustive()
    }
}

/// A fs-verity hasher for the algorithm of `ObjectID`.
#[derive(Debug)]
pub enum Hasher {
    /// SHA-256 trees.
    Sha256(Verity<sha2::Sha256>),
    /// SHA-512 trees.
    Sha512(Verity<sha2::Sha512>),
}

impl Hasher {
    /// A hasher for `ObjectID`'s algorithm.
    pub fn for_id<ObjectID: FsVerityHashValue>() -> Self {
        match ObjectID::ALGORITHM {
            Algorithm::Sha256 { .. } => Hasher::Sha256(Verity::new(1)),
            Algorithm::Sha512 { .. } => Hasher::Sha512(Verity::new(2)),
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(v) => v.update(data),
            Hasher::Sha512(v) => v.update(data),
        }
    }

    /// The object id.
    pub fn finish<ObjectID: FsVerityHashValue>(self) -> ObjectID {
        let bytes = match self {
            Hasher::Sha256(v) => v.finish(),
            Hasher::Sha512(v) => v.finish(),
        };
        let mut id = ObjectID::EMPTY;
        zerocopy::IntoBytes::as_mut_bytes(&mut id).copy_from_slice(&bytes);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use composefs::fsverity::{FsVerityHasher, Sha256HashValue, Sha512HashValue};

    fn ours<H: FsVerityHashValue>(data: &[u8], split: usize) -> H {
        let mut h = Hasher::for_id::<H>();
        for c in data.chunks(split.max(1)) {
            h.update(c);
        }
        h.finish()
    }

    #[test]
    fn matches_composefs_for_every_tree_shape() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let data: Vec<u8> = (0..(130 * BLOCK * 2 + 777))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let sizes = [
            0,
            1,
            64,
            4095,
            4096,
            4097,
            2 * 4096,
            32 * 4096,
            64 * 4096 - 1,
            64 * 4096,
            64 * 4096 + 1,
            128 * 4096,
            128 * 4096 + 9,
            129 * 4096,
            130 * 4096 * 2 + 777,
        ];
        for &n in &sizes {
            let d = &data[..n];
            for split in [1usize, 1000, 4096, 65536, usize::MAX] {
                let split = split.min(n.max(1));
                assert_eq!(
                    ours::<Sha256HashValue>(d, split),
                    FsVerityHasher::<Sha256HashValue>::hash(d),
                    "sha256, {n} bytes, chunks of {split}"
                );
                assert_eq!(
                    ours::<Sha512HashValue>(d, split),
                    FsVerityHasher::<Sha512HashValue>::hash(d),
                    "sha512, {n} bytes, chunks of {split}"
                );
            }
        }
    }
}
