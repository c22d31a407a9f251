//! The unsafe code of cstor-proxy, in one crate.
//!
//! Every other crate of the workspace forbids `unsafe`. What cannot be done without it lives
//! here, each piece behind a safe function with the argument for its soundness written
//! beside the `unsafe` block:
//!
//! - [`sha512x8`]: SHA-512 of eight 4 KiB blocks at once with AVX-512 intrinsics (the
//!   fs-verity hot path of an import); the intrinsics take raw pointers and are `unsafe` to
//!   call without proof that the CPU has the instructions.
//! - [`memory`]: glibc's `mallopt` and `malloc_trim`, to give the memory freed by one phase
//!   of an import back before the next one peaks; no safe binding offers them.
//! - [`xfs`]: the geometry of an XFS filesystem (`XFS_IOC_FSGEOMETRY_V1`), which no safe
//!   binding offers.
//!
//! Keeping them together makes the audit surface one directory, and lets the crates with the
//! logic (`cstor-verity`, `cstor-import`) say `#![forbid(unsafe_code)]`.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod memory;
pub mod sha512x8;
pub mod xfs;
