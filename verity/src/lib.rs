//! fs-verity digests (4 KiB blocks, no salt), as the kernel computes them
//! (`FS_IOC_MEASURE_VERITY`) and composefs names its objects, fast enough to sit on an
//! importer's critical path.
//!
//! - Each block is hashed with OpenSSL's one-shot SHA functions into a stack buffer: no
//!   allocation or context setup per block (composefs' own hasher creates an OpenSSL context
//!   per block). OpenSSL's SHA-512 assembly is about 1.4x faster than the `sha2` crate's on
//!   the x86-64 machines measured.
//! - SHA-512 data blocks go eight at a time through [`sha512x8`] (AVX-512 multi-buffer)
//!   where the CPU has it: a file's data blocks are independent messages.
//!
//! ```
//! use cstor_verity::{Algorithm, Hasher};
//! let mut h = Hasher::new(Algorithm::Sha256);
//! h.update(b"hello ");
//! h.update(b"world\n");
//! let d = h.finish();
//! assert_eq!(d.as_bytes().len(), 32);
//! assert_eq!(d, Hasher::digest(Algorithm::Sha256, b"hello world\n"));
//! ```

#![deny(missing_docs)]

pub mod sha512x8;

/// Block size of the Merkle tree: 4 KiB (`log_blocksize` 12), what composefs uses.
pub const BLOCK: usize = 4096;

/// The largest digest (SHA-512), in bytes.
pub const MAX_DIGEST: usize = 64;

/// The hash function of a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// SHA-256 (`FS_VERITY_HASH_ALG_SHA256`).
    Sha256,
    /// SHA-512 (`FS_VERITY_HASH_ALG_SHA512`).
    Sha512,
}

impl Algorithm {
    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }

    /// fs-verity's `FS_VERITY_HASH_ALG_*` number, as stored in the descriptor.
    pub fn fsverity_id(self) -> u8 {
        match self {
            Algorithm::Sha256 => 1,
            Algorithm::Sha512 => 2,
        }
    }

    /// Hashes `data` followed by `zeros` zero bytes (at most [`BLOCK`]) into the start of
    /// `out`.
    fn hash(self, data: &[u8], zeros: usize, out: &mut [u8; MAX_DIGEST]) {
        static ZEROS: [u8; BLOCK] = [0; BLOCK];
        let pad = &ZEROS[..zeros.min(BLOCK)];
        match self {
            Algorithm::Sha256 => {
                let mut h = openssl::sha::Sha256::new();
                h.update(data);
                h.update(pad);
                out[..32].copy_from_slice(&h.finish());
            }
            Algorithm::Sha512 => {
                let mut h = openssl::sha::Sha512::new();
                h.update(data);
                h.update(pad);
                out.copy_from_slice(&h.finish());
            }
        }
    }
}

/// A finished fs-verity digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest {
    bytes: [u8; MAX_DIGEST],
    len: usize,
}

impl Digest {
    /// The digest's bytes (32 for SHA-256, 64 for SHA-512).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Lowercase hex, as composefs names objects.
    pub fn to_hex(&self) -> String {
        use std::fmt::Write;
        self.as_bytes()
            .iter()
            .fold(String::with_capacity(2 * self.len), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

/// Data blocks in a run of fewer than this are hashed one by one: eight lanes cost about as
/// much as three blocks hashed alone.
const MULTI_MIN: usize = 3;

/// An incremental fs-verity digest over one file's bytes.
///
/// Feed it with [`Hasher::update`] in chunks of any size (whole files at once let it hash
/// eight blocks at a time); [`Hasher::finish`] yields the digest. It never fails and never
/// panics.
pub struct Hasher {
    alg: Algorithm,
    /// Whether SHA-512 data blocks go through [`sha512x8`].
    multi: bool,
    /// Per tree level, the child hashes not yet hashed into a block. Level 0 holds hashes
    /// of data blocks.
    levels: Vec<Vec<u8>>,
    /// Hashes ever appended to each level.
    counts: Vec<u64>,
    /// The data block being filled.
    partial: Vec<u8>,
    size: u64,
}

impl Hasher {
    /// A hasher for `alg` trees.
    pub fn new(alg: Algorithm) -> Self {
        Self {
            alg,
            multi: alg == Algorithm::Sha512 && sha512x8::available(),
            levels: Vec::new(),
            counts: Vec::new(),
            partial: Vec::new(),
            size: 0,
        }
    }

    /// The digest of `data` in one call.
    pub fn digest(alg: Algorithm, data: &[u8]) -> Digest {
        let mut h = Self::new(alg);
        h.update(data);
        h.finish()
    }

    /// Appends a block hash to `level`, hashing full levels upwards.
    fn push(&mut self, mut level: usize, digest: &[u8]) {
        let len = self.alg.digest_len();
        let mut d = [0u8; MAX_DIGEST];
        d[..len].copy_from_slice(&digest[..len]);
        loop {
            if self.levels.len() <= level {
                self.levels.push(Vec::with_capacity(BLOCK));
                self.counts.push(0);
            }
            let l = &mut self.levels[level];
            l.extend_from_slice(&d[..len]);
            self.counts[level] += 1;
            if l.len() < BLOCK {
                return;
            }
            self.alg.hash(l, 0, &mut d);
            l.clear();
            level += 1;
        }
    }

    fn data_block(&mut self, block: &[u8]) {
        let mut d = [0u8; MAX_DIGEST];
        self.alg.hash(block, BLOCK - block.len(), &mut d);
        self.push(0, &d);
    }

    /// Hashes whole data blocks, eight at a time where that pays.
    fn data_blocks(&mut self, blocks: &[[u8; BLOCK]]) {
        let mut rest = blocks;
        if self.multi {
            while rest.len() >= MULTI_MIN {
                let n = rest.len().min(sha512x8::LANES);
                // Unused lanes hash the first block again; their results are dropped.
                let group: [&[u8; BLOCK]; sha512x8::LANES] =
                    std::array::from_fn(|i| rest.get(i).unwrap_or(&rest[0]));
                let mut out = [[0u8; 64]; sha512x8::LANES];
                sha512x8::hash(group, &mut out);
                for d in &out[..n] {
                    self.push(0, d);
                }
                rest = &rest[n..];
            }
        }
        for block in rest {
            self.data_block(block);
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
            self.data_block(&block);
            self.partial = block;
            self.partial.clear();
        }
        let (blocks, tail) = data.as_chunks::<BLOCK>();
        self.data_blocks(blocks);
        self.partial.extend_from_slice(tail);
    }

    /// The digest: the hash of the fs-verity descriptor.
    pub fn finish(mut self) -> Digest {
        let len = self.alg.digest_len();
        if !self.partial.is_empty() {
            let block = std::mem::take(&mut self.partial);
            self.data_block(&block);
        }
        // The root: the hash of the single block at the top level; an empty file has none
        // (all zeros).
        let mut root = [0u8; MAX_DIGEST];
        let mut i = 0;
        while i < self.levels.len() {
            let top = i + 1 == self.levels.len();
            if top && self.counts[i] == 1 {
                root[..len].copy_from_slice(&self.levels[i][..len]);
                break;
            }
            if !self.levels[i].is_empty() {
                let mut d = [0u8; MAX_DIGEST];
                let part = &self.levels[i];
                self.alg.hash(part, BLOCK - part.len(), &mut d);
                self.levels[i].clear();
                self.push(i + 1, &d);
            }
            i += 1;
        }
        // struct fsverity_descriptor: version, hash_algorithm, log_blocksize, salt_size,
        // reserved[4], data_size (le64), root_hash[64], salt[32], reserved[144].
        let mut desc = [0u8; 256];
        desc[0] = 1;
        desc[1] = self.alg.fsverity_id();
        desc[2] = 12;
        desc[8..16].copy_from_slice(&self.size.to_le_bytes());
        desc[16..16 + len].copy_from_slice(&root[..len]);
        let mut bytes = [0u8; MAX_DIGEST];
        self.alg.hash(&desc, 0, &mut bytes);
        Digest { bytes, len }
    }
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hasher")
            .field("alg", &self.alg)
            .field("multi", &self.multi)
            .field("size", &self.size)
            .field("levels", &self.levels.len())
            .finish_non_exhaustive()
    }
}

/// Deterministic pseudo-random test data (xorshift64).
#[cfg(test)]
pub(crate) fn test_data(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the chunking, and with or without the multi-buffer path, the digest is the
    /// same (the multi-buffer path itself is checked against OpenSSL in `sha512x8`, and the
    /// whole tree against composefs in cstor-proxy-client).
    #[test]
    fn chunking_and_multi_buffer_do_not_change_the_digest() {
        let data = test_data(0x9e37_79b9_7f4a_7c15, 70 * BLOCK + 123);
        for n in [
            0,
            1,
            4096,
            2 * 4096,
            3 * 4096 + 5,
            9 * 4096,
            64 * 4096,
            70 * 4096 + 123,
        ] {
            let d = &data[..n];
            let whole = Hasher::digest(Algorithm::Sha512, d);
            let mut single = Hasher::new(Algorithm::Sha512);
            single.multi = false;
            single.update(d);
            assert_eq!(single.finish(), whole, "{n} bytes, one by one");
            for split in [1usize, 1000, 4096, 3 * 4096 + 1] {
                let mut h = Hasher::new(Algorithm::Sha512);
                for c in d.chunks(split) {
                    h.update(c);
                }
                assert_eq!(h.finish(), whole, "{n} bytes in chunks of {split}");
            }
        }
    }

    #[test]
    fn empty_file_digest_is_the_descriptor_hash() {
        // An empty file's root hash is all zeros; the digest hashes the descriptor only.
        let mut desc = [0u8; 256];
        desc[0] = 1;
        desc[1] = 1;
        desc[2] = 12;
        let d = Hasher::digest(Algorithm::Sha256, b"");
        assert_eq!(d.as_bytes(), openssl::sha::sha256(&desc));
    }
}
