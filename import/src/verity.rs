//! fs-verity object ids, computed by the `cstor-verity` crate (OpenSSL SHA per block,
//! AVX-512 multi-buffer SHA-512 where the CPU has it) and typed as composefs' ids. The tests
//! check it against composefs' own `FsVerityHasher` for every shape of tree.

use composefs::fsverity::{Algorithm, FsVerityHashValue};

/// An incremental fs-verity digest over one file's bytes, for composefs object ids.
#[derive(Debug)]
pub struct Hasher(cstor_verity::Hasher);

impl Hasher {
    /// A hasher for `ObjectID`'s algorithm.
    pub fn for_id<ObjectID: FsVerityHashValue>() -> Self {
        Self(cstor_verity::Hasher::new(algorithm::<ObjectID>()))
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The object id.
    ///
    /// `ObjectID` must use the algorithm the hasher was made for ([`Hasher::for_id`]); the
    /// digest is truncated or zero-filled to its length otherwise.
    pub fn finish<ObjectID: FsVerityHashValue>(self) -> ObjectID {
        to_id(&self.0.finish())
    }
}

/// The `cstor-verity` algorithm of `ObjectID`.
pub fn algorithm<ObjectID: FsVerityHashValue>() -> cstor_verity::Algorithm {
    match ObjectID::ALGORITHM {
        Algorithm::Sha256 { .. } => cstor_verity::Algorithm::Sha256,
        Algorithm::Sha512 { .. } => cstor_verity::Algorithm::Sha512,
    }
}

fn to_id<ObjectID: FsVerityHashValue>(digest: &cstor_verity::Digest) -> ObjectID {
    let mut id = ObjectID::EMPTY;
    let bytes = zerocopy::IntoBytes::as_mut_bytes(&mut id);
    let n = bytes.len().min(digest.as_bytes().len());
    bytes[..n].copy_from_slice(&digest.as_bytes()[..n]);
    id
}

/// The object ids of several whole files at once: with SHA-512 the blocks of all of them
/// share the multi-buffer hasher ([`cstor_verity::digest_many`]), which hashes a batch of
/// small files several at a time instead of one by one.
pub fn ids<ObjectID: FsVerityHashValue>(files: &[&[u8]]) -> Vec<ObjectID> {
    cstor_verity::digest_many(algorithm::<ObjectID>(), files)
        .iter()
        .map(to_id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use composefs::fsverity::{FsVerityHasher, Sha256HashValue, Sha512HashValue};
    use cstor_verity::BLOCK;

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
        let all: Vec<&[u8]> = sizes.iter().map(|&n| &data[..n]).collect();
        let batch256: Vec<Sha256HashValue> = ids(&all);
        let batch512: Vec<Sha512HashValue> = ids(&all);
        for (i, &n) in sizes.iter().enumerate() {
            let d = &data[..n];
            assert_eq!(
                batch256[i],
                FsVerityHasher::<Sha256HashValue>::hash(d),
                "{n}"
            );
            assert_eq!(
                batch512[i],
                FsVerityHasher::<Sha512HashValue>::hash(d),
                "{n}"
            );
        }
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
