//! `cstor-bench-read`: the machine limits of the benchmark.
//!
//! Walks the given directories (layer `diff/` dirs) and reads every byte of every regular file
//! once, spread over all cores (`std::thread::available_parallelism()` threads by default).
//! With `--hash` it also computes each file's fs-verity digest with the
//! importer's fs-verity code, the `cstor-verity` crate (4 KiB blocks, SHA-512 like
//! our repositories unless `--algorithm sha256`; checked against composefs' `FsVerityHasher`),
//! fed in chunks of the read buffer.
//!
//! With `--reflink-into DEST` it instead clones (FICLONE) every file into a new file under
//! `DEST/xx/` (256 subdirectories, like a composefs object store), the other half of a
//! zero-copy import, also on all cores. DEST must be on the same reflink-capable filesystem.
//!
//! Directories, symlinks, devices (overlay whiteouts) and fifos are not read; hardlinked files
//! are read once per name, as an importer that opens every tar entry would. The walk itself
//! runs on the same threads (a shared work stack of directories and files), so a cold run
//! also pays for the inode reads any importer needs.
//!
//! Prints one JSON object on stdout: files, bytes, dirs, threads, seconds, a checksum of the
//! digests (so the work cannot be skipped) and the throughput.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use cstor_verity::Algorithm;

#[derive(Parser, Debug)]
#[command(about = "Read (and optionally fs-verity hash) every file byte under DIRS on all cores")]
struct Args {
    /// Compute every file's fs-verity digest (the importer's own code).
    #[arg(long)]
    hash: bool,
    /// Digest algorithm with --hash.
    #[arg(long, default_value = "sha512", value_parser = ["sha256", "sha512"])]
    algorithm: String,
    /// Reflink every file into a new file under this directory instead of reading it.
    #[arg(long, value_name = "DEST", conflicts_with = "hash")]
    reflink_into: Option<PathBuf>,
    /// Threads (default: std::thread::available_parallelism()).
    #[arg(long)]
    threads: Option<usize>,
    /// Read buffer per thread, in KiB (a multiple of 4).
    #[arg(long, default_value_t = 1024)]
    buffer_kib: usize,
    /// Directories to read.
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
}

#[derive(Debug)]
enum Item {
    Dir(PathBuf),
    File(PathBuf),
}

#[derive(Debug, Default)]
struct State {
    items: Vec<Item>,
    busy: usize,
    error: Option<anyhow::Error>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    files: u64,
    bytes: u64,
    dirs: u64,
    checksum: u64,
}

#[derive(Debug, Clone, Copy)]
enum Mode<'a> {
    Read,
    Sha256,
    Sha512,
    Reflink(&'a Path, &'a AtomicU64),
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn hash_file(alg: Algorithm, f: &mut File, buf: &mut [u8]) -> std::io::Result<(u64, u64)> {
    // The importer's own fs-verity code (composefs' FsVerityHasher is far slower: it creates
    // an OpenSSL context per block), so the limit is what cstor could reach.
    let mut hasher = cstor_verity::Hasher::new(alg);
    let mut total = 0u64;
    loop {
        let n = read_full(f, buf)?;
        hasher.update(&buf[..n]);
        total += n as u64;
        if n < buf.len() {
            break;
        }
    }
    let digest = hasher.finish();
    let bytes = digest.as_bytes();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    Ok((total, u64::from_le_bytes(first)))
}

fn read_file(f: &mut File, buf: &mut [u8]) -> std::io::Result<(u64, u64)> {
    let mut total = 0u64;
    let mut sum = 0u64;
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            break;
        }
        // Touch the data so that the read cannot be elided.
        sum = sum.wrapping_add(u64::from(buf[0]) ^ u64::from(buf[n - 1]));
        total += n as u64;
    }
    Ok((total, sum))
}

fn reflink_file(src: &File, dest: &Path, counter: &AtomicU64) -> std::io::Result<(u64, u64)> {
    let n = counter.fetch_add(1, Ordering::Relaxed);
    let path = dest.join(format!("{:02x}/{n}", n % 256));
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    rustix::fs::ioctl_ficlone(&dst, src)?;
    Ok((src.metadata()?.len(), 0))
}

fn process(
    item: Item,
    mode: Mode<'_>,
    buf: &mut [u8],
    out: &mut Vec<Item>,
    t: &mut Totals,
) -> Result<()> {
    match item {
        Item::Dir(dir) => {
            t.dirs += 1;
            for entry in
                std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
            {
                let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
                let ft = entry
                    .file_type()
                    .with_context(|| format!("file type of {}", entry.path().display()))?;
                if ft.is_dir() {
                    out.push(Item::Dir(entry.path()));
                } else if ft.is_file() {
                    out.push(Item::File(entry.path()));
                }
            }
        }
        Item::File(path) => {
            let mut f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            let (n, sum) = match mode {
                Mode::Read => read_file(&mut f, buf),
                Mode::Sha256 => hash_file(Algorithm::Sha256, &mut f, buf),
                Mode::Sha512 => hash_file(Algorithm::Sha512, &mut f, buf),
                Mode::Reflink(dest, counter) => reflink_file(&f, dest, counter),
            }
            .with_context(|| format!("reading {}", path.display()))?;
            t.files += 1;
            t.bytes += n;
            t.checksum ^= sum;
        }
    }
    Ok(())
}

fn worker(state: &Mutex<State>, cv: &Condvar, mode: Mode<'_>, buf_size: usize) -> Totals {
    let mut buf = vec![0u8; buf_size];
    let mut totals = Totals::default();
    let mut found = Vec::new();
    loop {
        let item = {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if s.error.is_some() {
                    return totals;
                }
                if let Some(item) = s.items.pop() {
                    s.busy += 1;
                    break item;
                }
                if s.busy == 0 {
                    cv.notify_all();
                    return totals;
                }
                s = cv.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        };
        let r = process(item, mode, &mut buf, &mut found, &mut totals);
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.busy -= 1;
        let wake = !found.is_empty() || s.busy == 0 || r.is_err();
        s.items.append(&mut found);
        if let Err(e) = r {
            s.error.get_or_insert(e);
        }
        if wake {
            cv.notify_all();
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let threads = match args.threads {
        Some(n) => n.max(1),
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    if args.buffer_kib == 0 || args.buffer_kib % 4 != 0 {
        bail!("--buffer-kib must be a positive multiple of 4");
    }
    let counter = AtomicU64::new(0);
    if let Some(dest) = &args.reflink_into {
        for i in 0..256 {
            let d = dest.join(format!("{i:02x}"));
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
    }
    let mode = match (&args.reflink_into, args.hash, args.algorithm.as_str()) {
        (Some(dest), _, _) => Mode::Reflink(dest, &counter),
        (None, false, _) => Mode::Read,
        (None, true, "sha256") => Mode::Sha256,
        (None, true, _) => Mode::Sha512,
    };
    for d in &args.dirs {
        if !d.is_dir() {
            bail!("{} is not a directory", d.display());
        }
    }
    let state = Mutex::new(State {
        items: args.dirs.iter().rev().cloned().map(Item::Dir).collect(),
        ..Default::default()
    });
    let cv = Condvar::new();
    let start = Instant::now();
    let per_thread: Vec<Totals> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| worker(&state, &cv, mode, args.buffer_kib << 10)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("reader thread panicked"))
            .collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    if let Some(e) = state.into_inner().unwrap_or_else(|p| p.into_inner()).error {
        return Err(e);
    }
    let t = per_thread.iter().fold(Totals::default(), |a, b| Totals {
        files: a.files + b.files,
        bytes: a.bytes + b.bytes,
        dirs: a.dirs + b.dirs,
        checksum: a.checksum ^ b.checksum,
    });
    let report = serde_json::json!({
        "mode": match mode {
            Mode::Read => "read",
            Mode::Sha256 => "fsverity-sha256",
            Mode::Sha512 => "fsverity-sha512",
            Mode::Reflink(..) => "reflink",
        },
        "threads": threads,
        "dirs": t.dirs,
        "files": t.files,
        "bytes": t.bytes,
        "seconds": seconds,
        "mb_per_second": t.bytes as f64 / 1e6 / seconds.max(1e-9),
        "files_per_second": t.files as f64 / seconds.max(1e-9),
        "checksum": format!("{:016x}", t.checksum),
    });
    println!("{report}");
    Ok(())
}
