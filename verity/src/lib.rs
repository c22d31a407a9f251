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
//! - [`digest_many`] does the same across files: the blocks of many small files (and their
//!   partial last blocks and tree blocks) share the eight lanes.
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
#![forbid(unsafe_code)]

pub use cstor_sys::sha512x8;

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
        descriptor_digest(self.alg, self.size, &root)
    }
}

/// The digest of a file of `size` bytes whose Merkle tree has root hash `root`: the hash of
/// its fs-verity descriptor.
fn descriptor_digest(alg: Algorithm, size: u64, root: &[u8; MAX_DIGEST]) -> Digest {
    let len = alg.digest_len();
    // struct fsverity_descriptor: version, hash_algorithm, log_blocksize, salt_size,
    // reserved[4], data_size (le64), root_hash[64], salt[32], reserved[144].
    let mut desc = [0u8; 256];
    desc[0] = 1;
    desc[1] = alg.fsverity_id();
    desc[2] = 12;
    desc[8..16].copy_from_slice(&size.to_le_bytes());
    desc[16..16 + len].copy_from_slice(&root[..len]);
    let mut bytes = [0u8; MAX_DIGEST];
    alg.hash(&desc, 0, &mut bytes);
    Digest { bytes, len }
}

/// The digests of several whole files, in order.
///
/// Same results as [`Hasher::digest`] per file. With SHA-512 on a CPU with AVX-512 it is
/// cheaper for small files: [`sha512x8`] hashes eight blocks at a time *whatever file they
/// belong to* (each file's data blocks, then each level of the trees), where a [`Hasher`]
/// sees one file and must hash a one- or two-block file, and every partial last block and
/// tree block, alone. Eight one-block files cost about what three cost one by one.
///
/// ```
/// use cstor_verity::{Algorithm, Hasher, digest_many};
/// let files: [&[u8]; 3] = [b"", b"small", &[7u8; 10_000]];
/// let digests = digest_many(Algorithm::Sha512, &files);
/// for (file, digest) in files.iter().zip(&digests) {
///     assert_eq!(*digest, Hasher::digest(Algorithm::Sha512, file));
/// }
/// ```
pub fn digest_many(alg: Algorithm, files: &[&[u8]]) -> Vec<Digest> {
    if !(alg == Algorithm::Sha512 && sha512x8::available()) {
        return files.iter().map(|f| Hasher::digest(alg, f)).collect();
    }
    // Each file's partial last block, zero-filled to a whole block (fs-verity hashes it
    // padded), made before the block list below borrows them.
    let tails: Vec<[u8; BLOCK]> = files
        .iter()
        .filter_map(|f| {
            let (_, tail) = f.as_chunks::<BLOCK>();
            (!tail.is_empty()).then(|| {
                let mut block = [0u8; BLOCK];
                block[..tail.len()].copy_from_slice(tail);
                block
            })
        })
        .collect();
    let mut tail_blocks = tails.iter();
    let mut blocks: Vec<(usize, &[u8; BLOCK])> = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let (whole, tail) = f.as_chunks::<BLOCK>();
        blocks.extend(whole.iter().map(|b| (i, b)));
        if !tail.is_empty()
            && let Some(t) = tail_blocks.next()
        {
            blocks.push((i, t));
        }
    }
    // Per file, the hashes of its current tree level, concatenated.
    let mut level: Vec<Vec<u8>> = vec![Vec::new(); files.len()];
    hash_blocks(&blocks, &mut level);
    drop(blocks);
    // Up the trees until every file has one hash left (its root) or none (empty file).
    loop {
        let mut more = false;
        for l in level.iter_mut().filter(|l| l.len() > MAX_DIGEST) {
            l.resize(l.len().next_multiple_of(BLOCK), 0);
            more = true;
        }
        if !more {
            break;
        }
        let mut next: Vec<Vec<u8>> = vec![Vec::new(); files.len()];
        let blocks: Vec<(usize, &[u8; BLOCK])> = level
            .iter()
            .enumerate()
            .filter(|(_, l)| l.len() > MAX_DIGEST)
            .flat_map(|(i, l)| l.as_chunks::<BLOCK>().0.iter().map(move |b| (i, b)))
            .collect();
        hash_blocks(&blocks, &mut next);
        drop(blocks);
        for (l, n) in level.iter_mut().zip(next) {
            if l.len() > MAX_DIGEST {
                *l = n;
            }
        }
    }
    files
        .iter()
        .zip(&level)
        .map(|(f, l)| {
            let mut root = [0u8; MAX_DIGEST];
            let n = l.len().min(MAX_DIGEST);
            root[..n].copy_from_slice(&l[..n]);
            descriptor_digest(alg, f.len() as u64, &root)
        })
        .collect()
}

/// SHA-512 of each block, appended to its file's entry in `out`, eight at a time (a file's
/// blocks come in order, so its hashes do too).
fn hash_blocks(blocks: &[(usize, &[u8; BLOCK])], out: &mut [Vec<u8>]) {
    for group in blocks.chunks(sha512x8::LANES) {
        let mut digests = [[0u8; 64]; sha512x8::LANES];
        if group.len() >= MULTI_MIN {
            // Unused lanes hash the first block again; their results are dropped.
            let messages = std::array::from_fn(|k| group.get(k).unwrap_or(&group[0]).1);
            sha512x8::hash(messages, &mut digests);
        } else {
            for ((_, block), d) in group.iter().zip(digests.iter_mut()) {
                *d = openssl::sha::sha512(&block[..]);
            }
        }
        for ((file, _), d) in group.iter().zip(&digests) {
            if let Some(o) = out.get_mut(*file) {
                o.extend_from_slice(d);
            }
        }
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

    /// Batches mixing every tree shape (empty, one partial block, whole blocks, two and
    /// three levels) give each file the digest it has alone, with and without the
    /// multi-buffer path (`digest_many` falls back to `Hasher` for SHA-256).
    #[test]
    fn digest_many_gives_each_file_its_own_digest() {
        let data = test_data(0x2545_f491_4f6c_dd1d, 130 * BLOCK * 2 + 777);
        let sizes = [
            0,
            1,
            100,
            4095,
            4096,
            4097,
            2 * 4096,
            3 * 4096 + 5,
            8 * 4096,
            64 * 4096,
            128 * 4096 + 9,
            129 * 4096,
            130 * 4096 * 2 + 777,
        ];
        // Each size alone, all sizes in one batch, and a run of small files (lanes filled
        // by different files) around a large one.
        let mut batches: Vec<Vec<&[u8]>> = sizes.iter().map(|&n| vec![&data[..n]]).collect();
        batches.push(sizes.iter().map(|&n| &data[..n]).collect());
        batches.push(
            (0..21)
                .map(|i| match i {
                    10 => &data[..],
                    _ => &data[i * 311..i * 311 + 200 + i * 97],
                })
                .collect(),
        );
        for alg in [Algorithm::Sha512, Algorithm::Sha256] {
            for files in &batches {
                let many = digest_many(alg, files);
                assert_eq!(many.len(), files.len());
                for (f, d) in files.iter().zip(&many) {
                    assert_eq!(*d, Hasher::digest(alg, f), "{alg:?}, {} bytes", f.len());
                }
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
