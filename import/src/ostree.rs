//! Importing an ostree commit into a composefs repository through the helper, in the layout
//! composefs-ostree 0.9.4 writes (see `docs/dev/composefs-ostree-0.9.4-notes.md`): one
//! `ostree-commit-<checksum>` splitstream holding every object of the commit, linked to the
//! commit's EROFS image by the named ref `composefs.image`, and named
//! `refs/ostree/<escaped ref>`, so upstream `cfsctl ostree` reads what we write.
//!
//! Every checksum is verified here, on the bytes written: each metadata object's SHA-256,
//! and each file's ostree checksum, computed from the metadata the helper served and the
//! content as it is read to be stored (the same bytes composefs digests). A mismatch fails
//! the import naming the object, before anything is named in the repository.
//!
//! The one deliberate difference from upstream: xattr names lose the trailing NUL ostree
//! stores them with, so that the image carries `user.foo`, not `user.foo\0`. Image ids of
//! commits with xattrs therefore differ from upstream's; the others are equal.
//!
//! File objects are stored by a pool of worker threads ([`ImportOptions::object_threads`]).
//! Raw contents (bare modes) are reflinked, copied or hardlinked from the helper's fd as
//! [`ImportOptions::copy_policy`] allows; archive contents, which must be inflated, are
//! inflated a buffer at a time into a new object (a copy); inline files go through memory.
//!
//! Progress goes where [`ImportOptions::events`] and [`ImportOptions::progress`] say, as for
//! an image: the totals once the tree is walked, then each file object as it is stored.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;

use base64::Engine;
use composefs::fsverity::FsVerityHashValue;
use composefs::generic_tree::{LeafContent, LeafId, Stat};
use composefs::repository::Repository;
use composefs::tree::{Directory, FileSystem, Inode, RegularFile};
use cstor_protocol::ostree::format::{
    ArchiveHeader, Checksum, Commit, DirTree, FileHasher, Meta, archive_file_header,
    metadata_checksum,
};
use cstor_protocol::ostree::{
    ContentEncoding, GetOstreeObjectsParams, GetOstreeObjectsResult, ObjectName, ObjectType,
    OpenOstreeFilesParams, OpenOstreeFilesResult, OpenOstreeRepoParams, OpenOstreeRepoResult,
    OstreeFile, OstreeRepoHandle, ResolveOstreeRefParams, ResolveOstreeRefResult, method,
};
use cstor_proxy_client::Client;

use crate::error::{Error, Result, repo_err};
use crate::objects::{
    Expected, Source, WorkerState, object_tmpfile_in, placement, store_as, store_filled,
};
use crate::progress::{ImportEvent, Progress};
use crate::{CopyPolicy, ImportOptions, ObjectStats};

/// The content type of composefs-ostree's commit splitstreams.
pub const OSTREE_COMMIT_CONTENT_TYPE: u64 = 0xAFE1_38C1_8C46_3EF1;

/// The named ref linking a commit splitstream to its EROFS image.
pub const IMAGE_REF_KEY: &str = "composefs.image";

/// The stream name of a commit (`ostree-commit-<checksum>`), as composefs-ostree names it.
pub fn commit_identifier(commit: &str) -> String {
    format!("ostree-commit-{commit}")
}

/// The stream ref of an ostree ref name (`ostree/<name>` with `%` and `/` escaped), as
/// composefs-ostree names it.
pub fn ref_path(name: &str) -> String {
    format!("ostree/{}", name.replace('%', "%25").replace('/', "%2F"))
}

/// What an ostree import did.
#[derive(Debug, Clone)]
pub struct OstreeImportReport {
    /// The commit checksum.
    pub commit: String,
    /// The EROFS image id (hex).
    pub image_id: String,
    /// The commit splitstream's object id (hex).
    pub stream_id: String,
    /// The stream ref written (`ostree/<escaped>`), when a name was given.
    pub reference: Option<String>,
    /// Metadata objects (commit, dirtrees, dirmetas) verified.
    pub metadata_objects: u64,
    /// Distinct file objects verified.
    pub file_objects: u64,
    /// File objects stored as repository objects (the rest are inline or symlinks).
    pub external_objects: u64,
    /// Content bytes read.
    pub content_bytes: u64,
    /// How file contents got into the repository (inline counts files of the tree's
    /// threshold or less; symlinks are in no count).
    pub objects: ObjectStats,
    /// Why the first object that could not be reflinked was copied, if one was.
    pub first_reflink_fallback: Option<String>,
    /// Whether the commit was already in the repository: its stream was read instead of
    /// the ostree repository's files (see [`import_ostree_commit`]).
    pub reused_stream: bool,
}

fn corrupt(object: &str, detail: impl std::fmt::Display) -> Error {
    Error::OstreeObject {
        object: object.to_owned(),
        detail: detail.to_string(),
    }
}

/// A file object as stored in the commit splitstream and the tree.
struct FileEntry<ObjectID> {
    meta: Meta,
    size: u64,
    target: Option<String>,
    inline: Option<Vec<u8>>,
    external: Option<ObjectID>,
}

/// Imports commit `rev` of the ostree repository at `ostree_repo` (absolute) into `repo`,
/// naming it `refs/ostree/<tag>` when `tag` is given, or after `rev` when `rev` is a ref.
/// Returns what was written.
///
/// A commit whose stream the repository already has is not read again from the ostree
/// repository: its stream holds every object of the commit, metadata and file headers
/// inline, contents as references to objects that were verified when stored (as an image
/// import trusts the stream of a layer it already has). Its metadata objects are
/// checksummed again and the image is rebuilt from them; when that image is not the one
/// the stream links (a stream upstream wrote, whose xattr names keep their NUL) or the
/// stream is not laid out as expected, the commit is imported afresh.
pub async fn import_ostree_commit<ObjectID: FsVerityHashValue>(
    client: &Client,
    repo: &Arc<Repository<ObjectID>>,
    ostree_repo: &Path,
    rev: &str,
    options: &ImportOptions,
) -> Result<OstreeImportReport> {
    let (opened, _): (OpenOstreeRepoResult, _) = client
        .call(
            method::OPEN_OSTREE_REPO,
            &OpenOstreeRepoParams {
                path: ostree_repo.display().to_string(),
            },
        )
        .await?;
    let handle = opened.repo;
    let r = import_open(client, repo, handle, rev, options).await;
    // The handle (and the ostree lock) goes whatever happened; a failure to close it is
    // only worth a log line, the connection's end closes it anyway.
    if let Err(e) = client
        .call::<_, cstor_protocol::Empty>(
            method::CLOSE_OSTREE_REPO,
            &OstreeRepoHandle { repo: handle },
        )
        .await
    {
        tracing::warn!("closing the ostree repository: {e}");
    }
    r
}

async fn import_open<ObjectID: FsVerityHashValue>(
    client: &Client,
    repo: &Arc<Repository<ObjectID>>,
    handle: u64,
    rev: &str,
    options: &ImportOptions,
) -> Result<OstreeImportReport> {
    let tag = options.tag.as_deref();
    let (resolved, _): (ResolveOstreeRefResult, _) = client
        .call(
            method::RESOLVE_OSTREE_REF,
            &ResolveOstreeRefParams {
                repo: handle,
                reference: rev.to_owned(),
            },
        )
        .await?;
    let commit_hex = resolved.commit.clone();
    let name = tag.or(resolved.ref_file.as_ref().map(|_| rev));
    let progress = Progress::new(options.events.clone(), options.progress.clone());
    let identifier = commit_identifier(&commit_hex);
    if let Some(stream_id) = repo
        .has_stream(&identifier)
        .map_err(repo_err("looking up the commit stream"))?
        && let Some(report) = reuse_stream(repo, &commit_hex, &stream_id, name, &progress)?
    {
        return Ok(report);
    }

    // Metadata, level by level, each object verified.
    let mut metadata: BTreeMap<Checksum, Vec<u8>> = BTreeMap::new();
    let commit_bytes = fetch(client, handle, &[(commit_hex.clone(), ObjectType::Commit)])
        .await?
        .remove(0);
    let commit =
        Commit::decode(&commit_bytes).map_err(|e| corrupt(&format!("commit {commit_hex}"), e))?;
    let commit_id = metadata_checksum(&commit_bytes);
    metadata.insert(commit_id, commit_bytes);
    let mut trees: HashMap<Checksum, DirTree> = HashMap::new();
    let mut metas: HashMap<Checksum, Meta> = HashMap::new();
    let mut level = vec![(commit.root_tree, commit.root_meta)];
    let mut files: Vec<Checksum> = Vec::new();
    while !level.is_empty() {
        // Identical subtrees (empty directories, say) share objects: each is asked once.
        let mut wanted = Vec::new();
        let mut asked = std::collections::HashSet::new();
        for (t, m) in &level {
            if !trees.contains_key(t) && asked.insert((*t, ObjectType::Dirtree)) {
                wanted.push((hex::encode(t), ObjectType::Dirtree));
            }
            if !metas.contains_key(m) && asked.insert((*m, ObjectType::Dirmeta)) {
                wanted.push((hex::encode(m), ObjectType::Dirmeta));
            }
        }
        let got = fetch(client, handle, &wanted).await?;
        let mut next = Vec::new();
        for ((c, kind), bytes) in wanted.iter().zip(got) {
            let id = metadata_checksum(&bytes);
            match kind {
                ObjectType::Dirtree => {
                    let t =
                        DirTree::decode(&bytes).map_err(|e| corrupt(&format!("dirtree {c}"), e))?;
                    files.extend(t.files.iter().map(|f| f.1));
                    next.extend(t.dirs.iter().map(|d| (d.1, d.2)));
                    trees.insert(id, t);
                }
                _ => {
                    let m =
                        Meta::decode(&bytes).map_err(|e| corrupt(&format!("dirmeta {c}"), e))?;
                    metas.insert(id, m);
                }
            }
            metadata.insert(id, bytes);
        }
        level = next;
    }
    files.sort();
    files.dedup();
    let total_files = files.len() as u64;
    progress.send(ImportEvent::OstreeStarted {
        commit: commit_hex.clone(),
        metadata_objects: metadata.len() as u64,
        files: total_files,
    });

    // Files, in batches the helper accepts, stored by a pool of workers; each verified as
    // it is stored. Two batches at most are in flight, which bounds the fds held while the
    // helper opens the next batch as the workers store the last.
    let threshold = 2 * size_of::<ObjectID>() as u64;
    let batch = (client.info().limits.max_fds_per_message as usize).max(1);
    let mut entries: BTreeMap<Checksum, FileEntry<ObjectID>> = BTreeMap::new();
    let mut content_bytes = 0u64;
    let mut stats = ObjectStats::default();
    let state = Arc::new(WorkerState::new(Arc::new(AtomicBool::new(false))));
    let threads = options
        .object_threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    let mut workers = Workers::start(repo, threads, options.copy_policy, threshold, &state)?;
    let mut in_flight = 0usize;
    for chunk in files.chunks(batch) {
        let (opened, fds): (OpenOstreeFilesResult, _) = client
            .call(
                method::OPEN_OSTREE_FILES,
                &OpenOstreeFilesParams {
                    repo: handle,
                    files: chunk.iter().map(hex::encode).collect(),
                },
            )
            .await?;
        // With a cold cache, the batch's files are then read from disk in parallel rather
        // than each when a worker gets to it (two reads in flight); the probe costs
        // nothing for a cached file.
        for fd in &fds {
            cstor_proxy_client::read_ahead(fd);
        }
        let mut fds: Vec<Option<std::os::fd::OwnedFd>> = fds.into_iter().map(Some).collect();
        for f in opened.files {
            let job = file_job(f, &mut fds)?;
            workers.submit(job)?;
            in_flight += 1;
        }
        while in_flight > batch {
            let done = workers.next().await?;
            in_flight -= 1;
            content_bytes += done.entry.size;
            stats.add(&done.stats);
            entries.insert(done.checksum, done.entry);
            progress.ostree_progress(
                &commit_hex,
                entries.len() as u64,
                total_files,
                content_bytes,
            );
        }
    }
    while in_flight > 0 {
        let done = workers.next().await?;
        in_flight -= 1;
        content_bytes += done.entry.size;
        stats.add(&done.stats);
        entries.insert(done.checksum, done.entry);
        progress.ostree_progress(
            &commit_hex,
            entries.len() as u64,
            total_files,
            content_bytes,
        );
    }
    drop(workers);
    if entries.len() != files.len() {
        return Err(corrupt(
            &format!("commit {commit_hex}"),
            "the helper did not serve every file object",
        ));
    }

    progress.send(ImportEvent::Finalizing);

    let image = write_image(repo, &commit, &trees, &metas, &entries)?;

    // The commit splitstream, byte for byte what composefs-ostree writes.
    let mut ss = repo
        .create_stream(OSTREE_COMMIT_CONTENT_TYPE)
        .map_err(repo_err("creating the commit stream"))?;
    ss.add_named_stream_ref(IMAGE_REF_KEY, &image);
    let metadata_objects = metadata.len() as u64;
    let external_objects = entries.values().filter(|e| e.external.is_some()).count() as u64;
    let mut objects: BTreeMap<Checksum, (Option<ObjectID>, Vec<u8>)> =
        metadata.into_iter().map(|(c, b)| (c, (None, b))).collect();
    for (c, e) in entries {
        let mut data = archive_file_header(e.size, &e.meta, e.target.as_deref().unwrap_or(""));
        if let Some(inline) = e.inline {
            data.extend_from_slice(&inline);
        }
        objects.insert(c, (e.external, data));
    }
    let commit_index = objects
        .keys()
        .position(|c| *c == commit_id)
        .ok_or_else(|| {
            corrupt(
                &format!("commit {commit_hex}"),
                "missing from its own objects",
            )
        })?;
    let mut header = Vec::with_capacity(8 + 1024);
    header.extend_from_slice(&(commit_index as u32).to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    let mut buckets = [0u32; 256];
    for c in objects.keys() {
        buckets[c[0] as usize] += 1;
    }
    for i in 1..256 {
        buckets[i] += buckets[i - 1];
    }
    for b in buckets {
        header.extend_from_slice(&b.to_le_bytes());
    }
    ss.write_inline(&header);
    for c in objects.keys() {
        ss.write_inline(c);
    }
    let mut offset = 0usize;
    for (ext, data) in objects.values() {
        let idx = ext.as_ref().map(|id| ss.add_object_ref(id) as u32);
        let block = u32::try_from(offset / 8).map_err(|_| {
            corrupt(
                &format!("commit {commit_hex}"),
                "more than 32 GiB of metadata",
            )
        })?;
        ss.write_inline(&block.to_le_bytes());
        ss.write_inline(&(data.len() as u32).to_le_bytes());
        ss.write_inline(&idx.unwrap_or(u32::MAX).to_le_bytes());
        offset += data.len().next_multiple_of(8);
    }
    for (_, data) in objects.values() {
        ss.write_inline(data);
        let pad = data.len().next_multiple_of(8) - data.len();
        ss.write_inline(&[0u8; 7][..pad]);
    }
    let reference = name.map(ref_path);
    let stream = repo
        .write_stream(ss, &commit_identifier(&commit_hex), reference.as_deref())
        .map_err(repo_err("writing the commit stream"))?;
    progress.send(ImportEvent::Finished);

    Ok(OstreeImportReport {
        commit: commit_hex,
        image_id: image.to_hex(),
        stream_id: stream.to_hex(),
        reference,
        metadata_objects,
        file_objects: files.len() as u64,
        external_objects,
        content_bytes,
        objects: stats,
        first_reflink_fallback: state.first_fallback(),
        reused_stream: false,
    })
}

/// The commit's tree, as composefs-ostree builds it from the splitstream, written as an
/// EROFS image; returns its id.
fn write_image<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    commit: &Commit,
    trees: &HashMap<Checksum, DirTree>,
    metas: &HashMap<Checksum, Meta>,
    entries: &BTreeMap<Checksum, FileEntry<ObjectID>>,
) -> Result<ObjectID> {
    let root_meta = metas.get(&commit.root_meta).ok_or_else(|| {
        corrupt(
            &format!("dirmeta {}", hex::encode(commit.root_meta)),
            "not fetched",
        )
    })?;
    let mut fs = FileSystem::<ObjectID>::new(stat_of(root_meta));
    let mut leaves: HashMap<Checksum, LeafId> = HashMap::new();
    let root_entries = build_dir(
        &mut fs,
        &mut leaves,
        trees,
        metas,
        entries,
        &commit.root_tree,
    )?;
    for (name, inode) in root_entries {
        fs.root.insert(&name, inode);
    }
    fs.commit_image(repo, None)
        .map_err(repo_err("writing the EROFS image"))
}

/// One object of a commit stream: its checksum, the index of its content object when it
/// has one, and its bytes (a metadata object, or a file's archive header and inline
/// content).
type StreamObject<'a> = (Checksum, Option<usize>, &'a [u8]);

/// Reads back the body of a commit stream as [`import_open`] writes it: the commit's index,
/// then every object. `None` when it is not laid out so.
fn parse_commit_stream(body: &[u8]) -> Option<(usize, Vec<StreamObject<'_>>)> {
    let u32_at = |at: usize| -> Option<u32> {
        let b: [u8; 4] = body.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(u32::from_le_bytes(b))
    };
    let commit_index = u32_at(0)? as usize;
    let n = u32_at(8 + 255 * 4)? as usize;
    let sums_at: usize = 8 + 256 * 4;
    let table_at = sums_at.checked_add(n.checked_mul(32)?)?;
    let data_at = table_at.checked_add(n.checked_mul(12)?)?;
    let mut out = Vec::with_capacity(n.min(body.len() / 44));
    for i in 0..n {
        let at = sums_at + 32 * i;
        let checksum: Checksum = body.get(at..at + 32)?.try_into().ok()?;
        let e = table_at + 12 * i;
        let (block, len, idx) = (u32_at(e)?, u32_at(e + 4)?, u32_at(e + 8)?);
        let start = data_at.checked_add((block as usize).checked_mul(8)?)?;
        let data = body.get(start..start.checked_add(len as usize)?)?;
        out.push((checksum, (idx != u32::MAX).then_some(idx as usize), data));
    }
    Some((commit_index, out))
}

/// A commit whose stream `stream_id` the repository has: its tree rebuilt from the stream
/// (see [`import_ostree_commit`]), the stream named, nothing read from the ostree
/// repository. `None` when the stream cannot stand for the commit: the caller imports it
/// afresh.
fn reuse_stream<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    commit_hex: &str,
    stream_id: &ObjectID,
    name: Option<&str>,
    progress: &Progress,
) -> Result<Option<OstreeImportReport>> {
    use composefs::splitstream::SplitStreamData;
    let identifier = commit_identifier(commit_hex);
    let mut reader = repo
        .open_stream(
            &identifier,
            Some(stream_id),
            Some(OSTREE_COMMIT_CONTENT_TYPE),
        )
        .map_err(repo_err(format!("opening the stream {identifier}")))?;
    let mut body = Vec::new();
    let mut chunked = false;
    reader
        .for_each_chunk(|c| {
            match c {
                SplitStreamData::Inline(b) => body.extend_from_slice(&b),
                SplitStreamData::External(_) => chunked = true,
            }
            Ok(())
        })
        .map_err(repo_err(format!("reading the stream {identifier}")))?;
    let Some((commit_index, objects)) = parse_commit_stream(&body).filter(|_| !chunked) else {
        tracing::info!("{identifier} is not laid out as expected: importing afresh");
        return Ok(None);
    };
    let by_checksum: HashMap<Checksum, (Option<usize>, &[u8])> =
        objects.iter().map(|(c, i, d)| (*c, (*i, *d))).collect();
    // Metadata comes out of the stream checksummed again, as from the helper.
    let metadata = |c: &Checksum| -> Option<&[u8]> {
        by_checksum
            .get(c)
            .filter(|(i, d)| i.is_none() && metadata_checksum(d) == *c)
            .map(|(_, d)| *d)
    };
    let Some((commit_sum, _, _)) = objects.get(commit_index) else {
        return Ok(None);
    };
    let Some(commit) = (hex::encode(commit_sum) == commit_hex)
        .then(|| metadata(commit_sum))
        .flatten()
        .and_then(|b| Commit::decode(b).ok())
    else {
        return Ok(None);
    };
    let mut trees: HashMap<Checksum, DirTree> = HashMap::new();
    let mut metas: HashMap<Checksum, Meta> = HashMap::new();
    let mut files: Vec<Checksum> = Vec::new();
    let mut level = vec![(commit.root_tree, commit.root_meta)];
    while !level.is_empty() {
        let mut next = Vec::new();
        for (t, m) in level {
            if let std::collections::hash_map::Entry::Vacant(e) = metas.entry(m) {
                let Some(meta) = metadata(&m).and_then(|b| Meta::decode(b).ok()) else {
                    return Ok(None);
                };
                e.insert(meta);
            }
            if let std::collections::hash_map::Entry::Vacant(e) = trees.entry(t) {
                let Some(tree) = metadata(&t).and_then(|b| DirTree::decode(b).ok()) else {
                    return Ok(None);
                };
                files.extend(tree.files.iter().map(|f| f.1));
                next.extend(tree.dirs.iter().map(|d| (d.1, d.2)));
                e.insert(tree);
            }
        }
        level = next;
    }
    files.sort();
    files.dedup();
    let metadata_objects = (trees.len() + metas.len() + 1) as u64;
    progress.send(ImportEvent::OstreeStarted {
        commit: commit_hex.to_owned(),
        metadata_objects,
        files: files.len() as u64,
    });
    let mut entries: BTreeMap<Checksum, FileEntry<ObjectID>> = BTreeMap::new();
    let mut stats = ObjectStats::default();
    let mut content_bytes = 0u64;
    for c in &files {
        let Some((idx, data)) = by_checksum.get(c) else {
            return Ok(None);
        };
        let Ok(h) = ArchiveHeader::decode(data) else {
            return Ok(None);
        };
        let is_symlink = h.meta.mode & 0o170000 == 0o120000;
        let target = is_symlink.then_some(h.symlink_target);
        let rest = data.get(h.content_offset as usize..).unwrap_or_default();
        let (inline, external) = match idx {
            Some(i) if !is_symlink => {
                let Some(id) = reader.lookup_external_ref(*i) else {
                    return Ok(None);
                };
                stats.present += 1;
                stats.bytes_present += h.size;
                (None, Some(id.clone()))
            }
            Some(_) => return Ok(None),
            // Small files are in the stream whole: checked again, at no cost worth saving.
            None => {
                let mut hasher = FileHasher::new(&h.meta, target.as_deref().unwrap_or(""));
                hasher.update(rest);
                if rest.len() as u64 != h.size || hasher.finish() != *c {
                    return Ok(None);
                }
                if !is_symlink {
                    stats.inlined += 1;
                    stats.bytes_inlined += h.size;
                }
                ((!is_symlink).then(|| rest.to_vec()), None)
            }
        };
        content_bytes += h.size;
        entries.insert(
            *c,
            FileEntry {
                meta: h.meta,
                size: h.size,
                target,
                inline,
                external,
            },
        );
    }
    let file_objects = entries.len() as u64;
    let external_objects = entries.values().filter(|e| e.external.is_some()).count() as u64;
    progress.ostree_progress(commit_hex, file_objects, file_objects, content_bytes);
    progress.send(ImportEvent::Finalizing);
    let image = write_image(repo, &commit, &trees, &metas, &entries)?;
    if reader.lookup_named_ref(IMAGE_REF_KEY) != Some(&image) {
        tracing::info!("{identifier} links another image than ours: importing afresh");
        return Ok(None);
    }
    let reference = name.map(ref_path);
    if let Some(r) = &reference {
        repo.name_stream(&identifier, r)
            .map_err(repo_err(format!("naming {identifier} {r}")))?;
    }
    progress.send(ImportEvent::Finished);
    Ok(Some(OstreeImportReport {
        commit: commit_hex.to_owned(),
        image_id: image.to_hex(),
        stream_id: stream_id.to_hex(),
        reference,
        metadata_objects,
        file_objects,
        external_objects,
        content_bytes,
        objects: stats,
        first_reflink_fallback: None,
        reused_stream: true,
    }))
}

/// One file object for a worker: its metadata as the helper served it, and its content.
struct FileJob {
    /// `file <checksum>`, for errors.
    object: String,
    checksum: Checksum,
    meta: Meta,
    target: Option<String>,
    size: u64,
    encoding: Option<ContentEncoding>,
    content_offset: u64,
    fd: Option<OwnedFd>,
}

/// A file object verified and stored.
struct FileDone<ObjectID> {
    checksum: Checksum,
    entry: FileEntry<ObjectID>,
    /// How its content got into the repository (one count at most).
    stats: ObjectStats,
}

/// Takes what the helper served for one file object, with its fd out of `fds`.
fn file_job(f: OstreeFile, fds: &mut [Option<OwnedFd>]) -> Result<FileJob> {
    let object = format!("file {}", f.checksum);
    let decode = |s: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| corrupt(&object, format!("xattr not base64: {e}")))
    };
    let meta = Meta {
        uid: f.uid,
        gid: f.gid,
        mode: f.mode,
        xattrs: f
            .xattrs
            .iter()
            .map(|x| Ok((decode(&x.name)?, decode(&x.value)?)))
            .collect::<Result<_>>()?,
    };
    let fd = match f.fd {
        Some(i) => Some(
            fds.get_mut(i as usize)
                .and_then(Option::take)
                .ok_or_else(|| corrupt(&object, "the helper sent no fd for it"))?,
        ),
        None if f.size > 0 => return Err(corrupt(&object, "the helper sent no content for it")),
        None => None,
    };
    let mut checksum = [0u8; 32];
    hex::decode_to_slice(&f.checksum, &mut checksum)
        .map_err(|_| corrupt(&object, "the helper named it wrongly"))?;
    Ok(FileJob {
        object,
        checksum,
        meta,
        target: f.symlink_target,
        size: f.size,
        encoding: f.content,
        content_offset: f.content_offset,
        fd,
    })
}

/// The threads storing an import's file objects: jobs in through a shared queue, results
/// out through a channel the async import awaits, in the order they finish.
struct Workers<ObjectID: FsVerityHashValue> {
    jobs: Option<std::sync::mpsc::Sender<FileJob>>,
    done: tokio::sync::mpsc::UnboundedReceiver<Result<FileDone<ObjectID>>>,
    state: Arc<WorkerState>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl<ObjectID: FsVerityHashValue> Workers<ObjectID> {
    fn start(
        repo: &Arc<Repository<ObjectID>>,
        n: usize,
        policy: CopyPolicy,
        threshold: u64,
        state: &Arc<WorkerState>,
    ) -> Result<Self> {
        let (jobs, queue) = std::sync::mpsc::channel::<FileJob>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        let (done_tx, done) = tokio::sync::mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let n = n.max(1);
        // As the image import's workers: tmpfiles in an XFS allocation group of each
        // worker's own, and the workers below the threads that feed them (see
        // `objects::pool`): the helper opening the next batch must not wait for them.
        let mut tmp_dirs = match repo.objects_dir() {
            Ok(objects) => {
                let groups = placement::groups_of_dir(objects.as_fd()).filter(|_| n > 1);
                placement::worker_dirs(objects.as_fd(), groups, n)
            }
            Err(_) => vec![None; n],
        };
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let queue = queue.clone();
            let done_tx = done_tx.clone();
            let repo = repo.clone();
            let state = state.clone();
            let stop = stop.clone();
            let tmp_dir = tmp_dirs.get_mut(i).and_then(Option::take);
            let thread = std::thread::Builder::new()
                .name(format!("cstor-ostree-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only to take one job: the sender never blocks.
                        let job = match queue.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                            Ok(job) => job,
                            Err(_) => break,
                        };
                        // After a failure the queued jobs are dropped, not stored: the
                        // import is failing and only waits for the workers to finish.
                        if stop.load(Relaxed) {
                            continue;
                        }
                        let r =
                            store_file(&repo, job, policy, threshold, &state, tmp_dir.as_deref());
                        if done_tx.send(r).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| Error::io("starting an ostree object worker", e))?;
            threads.push(thread);
        }
        Ok(Self {
            jobs: Some(jobs),
            done,
            state: state.clone(),
            stop,
            threads,
        })
    }

    fn submit(&self, job: FileJob) -> Result<()> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| {
                Error::io(
                    "queueing an ostree object",
                    std::io::Error::other("the object workers stopped"),
                )
            })
    }

    /// The next file stored, or the first failure (after which queued jobs are dropped).
    async fn next(&mut self) -> Result<FileDone<ObjectID>> {
        let r = self.done.recv().await.unwrap_or_else(|| {
            Err(Error::io(
                "storing ostree objects",
                std::io::Error::other("the object workers stopped"),
            ))
        });
        if r.is_err() {
            self.stop.store(true, Relaxed);
        }
        r
    }
}

impl<ObjectID: FsVerityHashValue> Drop for Workers<ObjectID> {
    fn drop(&mut self) {
        // After a success nothing is queued; dropped early, the import failed, and what is
        // queued is not worth storing.
        self.stop.store(true, Relaxed);
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.state.forget_objects();
    }
}

/// Verifies and stores one file object: its ostree checksum is computed over its metadata
/// and the content bytes as they are read (raw) or inflated (archive), the same bytes its
/// object id is computed from, and compared before the object is named.
///
/// Raw contents larger than `threshold` are reflinked, copied or hardlinked from the
/// helper's fd as `policy` allows; deflated ones are inflated, a buffer at a time, into a
/// tmpfile of the repository, so that memory does not grow with a file's size; smaller
/// contents are read into memory and kept inline.
fn store_file<ObjectID: FsVerityHashValue>(
    repo: &Repository<ObjectID>,
    job: FileJob,
    policy: CopyPolicy,
    threshold: u64,
    state: &WorkerState,
    tmp_dir: Option<&str>,
) -> Result<FileDone<ObjectID>> {
    let FileJob {
        object,
        checksum,
        meta,
        target,
        size,
        encoding,
        content_offset,
        fd,
    } = job;
    let expected = hex::encode(checksum);
    let mut hasher = FileHasher::new(&meta, target.as_deref().unwrap_or(""));
    let is_regular = target.is_none();
    let deflated = encoding == Some(ContentEncoding::Deflate);
    let mut stats = ObjectStats::default();
    let (inline, external) = match fd {
        // Stored from the helper's fd itself: hashed in one pass of reads, then reflinked
        // (or copied, as the policy allows) from the same fd.
        Some(fd) if is_regular && !deflated && size > threshold => {
            let file = std::fs::File::from(fd);
            let id = hash_raw::<ObjectID>(&file, size, &mut hasher, &object)?;
            check_file(hasher, &expected, &object)?;
            let source = Source {
                file: &file,
                data: None,
                size,
                expected: &Expected::CheckedByCaller,
                name: &object,
                layer: "ostree",
            };
            let (id, how) = store_as(repo, id, &source, policy, state, tmp_dir)?;
            stats.count(how, size);
            (None, Some(id))
        }
        Some(fd) if is_regular && size > threshold => {
            if policy == CopyPolicy::ReflinkOnly {
                return Err(Error::ReflinkRequired {
                    file: object,
                    reason: "archive-mode contents are compressed: they can only be inflated \
                             into a copy"
                        .into(),
                });
            }
            // Any objects/XX directory will do for the tmpfile: the worker's own, or else
            // the checksum's, which spreads the workers' over them as object ids would.
            let tmp = object_tmpfile_in(repo, tmp_dir.unwrap_or(&expected[..2]))?;
            let file = std::fs::File::from(fd);
            let id =
                inflate_into::<ObjectID>(file, content_offset, size, &tmp, &mut hasher, &object)?;
            check_file(hasher, &expected, &object)?;
            let (id, how) = store_filled(repo, id, tmp, size, &object, state)?;
            stats.count(how, size);
            (None, Some(id))
        }
        Some(fd) => {
            let content = read_content(fd, encoding, content_offset, size, &object)?;
            hasher.update(&content);
            check_file(hasher, &expected, &object)?;
            stats.inlined += 1;
            stats.bytes_inlined += size;
            (Some(content), None)
        }
        None => {
            check_file(hasher, &expected, &object)?;
            (is_regular.then(Vec::new), None)
        }
    };
    Ok(FileDone {
        checksum,
        entry: FileEntry {
            meta,
            size,
            target,
            inline,
            external,
        },
        stats,
    })
}

/// Inflates the deflate stream at `offset` of `file` into `tmp`, feeding the ostree hasher
/// and an fs-verity hasher on the way: the object id of the `size` bytes it must yield.
fn inflate_into<ObjectID: FsVerityHashValue>(
    mut file: std::fs::File,
    offset: u64,
    size: u64,
    tmp: &std::fs::File,
    hasher: &mut FileHasher,
    object: &str,
) -> Result<ObjectID> {
    use std::io::Write;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io(format!("reading {object}"), e))?;
    let mut inflate = flate2::read::DeflateDecoder::new(file);
    let mut verity = crate::verity::Hasher::for_id::<ObjectID>();
    let mut buf = vec![0u8; (256 << 10).min(size as usize + 1)];
    let mut out = std::io::BufWriter::with_capacity(buf.len(), tmp);
    let mut at = 0u64;
    loop {
        let n = inflate
            .read(&mut buf)
            .map_err(|e| inflate_error(e, object))?;
        if n == 0 {
            break;
        }
        at += n as u64;
        if at > size {
            break;
        }
        hasher.update(&buf[..n]);
        verity.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| Error::io(format!("writing the object for {object}"), e))?;
    }
    if at != size {
        return Err(corrupt(
            object,
            format!("{size} bytes announced, {at} or more inflated"),
        ));
    }
    out.flush()
        .map_err(|e| Error::io(format!("writing the object for {object}"), e))?;
    Ok(verity.finish())
}

/// A stream that does not inflate is a corrupt object, not an I/O failure; flate2 reports
/// both as io::Error, real I/O errors carry an errno.
fn inflate_error(e: std::io::Error, object: &str) -> Error {
    match e.raw_os_error() {
        Some(_) => Error::io(format!("reading {object}"), e),
        None => corrupt(object, format!("its content does not inflate: {e}")),
    }
}

/// Compares a file's computed ostree checksum with its name.
fn check_file(hasher: FileHasher, checksum: &str, object: &str) -> Result<()> {
    let actual = hex::encode(hasher.finish());
    if actual != checksum {
        return Err(corrupt(
            object,
            format!("its metadata and content have checksum {actual}"),
        ));
    }
    Ok(())
}

/// Reads a raw content fd from offset 0 (positioned reads, so that the fd can then be
/// cloned whole) into the ostree hasher and an fs-verity hasher: the object id.
fn hash_raw<ObjectID: FsVerityHashValue>(
    file: &std::fs::File,
    size: u64,
    hasher: &mut FileHasher,
    object: &str,
) -> Result<ObjectID> {
    use std::os::unix::fs::FileExt;
    let mut verity = crate::verity::Hasher::for_id::<ObjectID>();
    let mut buf = vec![0u8; (1 << 20).min(size as usize + 1)];
    let mut at = 0u64;
    loop {
        let n = file
            .read_at(&mut buf, at)
            .map_err(|e| Error::io(format!("reading {object}"), e))?;
        if n == 0 {
            break;
        }
        at += n as u64;
        if at > size {
            break;
        }
        hasher.update(&buf[..n]);
        verity.update(&buf[..n]);
    }
    if at != size {
        return Err(corrupt(
            object,
            format!("{size} bytes announced, {at} read"),
        ));
    }
    Ok(verity.finish())
}

/// Reads a small content into memory: at most `size` bytes, inflated when `encoding` says
/// it is deflated.
fn read_content(
    fd: OwnedFd,
    encoding: Option<ContentEncoding>,
    offset: u64,
    size: u64,
    object: &str,
) -> Result<Vec<u8>> {
    let mut file = std::fs::File::from(fd);
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io(format!("reading {object}"), e))?;
    let limit = size.saturating_add(1);
    let mut content = Vec::new();
    match encoding {
        Some(ContentEncoding::Deflate) => flate2::read::DeflateDecoder::new(file)
            .take(limit)
            .read_to_end(&mut content)
            .map_err(|e| inflate_error(e, object)),
        _ => file
            .take(limit)
            .read_to_end(&mut content)
            .map_err(|e| Error::io(format!("reading {object}"), e)),
    }?;
    if content.len() as u64 != size {
        return Err(corrupt(
            object,
            format!("{size} bytes announced, {} read", content.len()),
        ));
    }
    Ok(content)
}

/// Fetches metadata objects, following partial replies, and checks each checksum.
async fn fetch(
    client: &Client,
    handle: u64,
    wanted: &[(String, ObjectType)],
) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::with_capacity(wanted.len());
    while out.len() < wanted.len() {
        let ask: Vec<ObjectName> = wanted[out.len()..]
            .iter()
            .take(cstor_protocol::ostree::MAX_OBJECTS_PER_REQUEST)
            .map(|(c, kind)| ObjectName {
                checksum: c.clone(),
                kind: *kind,
            })
            .collect();
        let (r, _): (GetOstreeObjectsResult, _) = client
            .call(
                method::GET_OSTREE_OBJECTS,
                &GetOstreeObjectsParams {
                    repo: handle,
                    objects: ask,
                },
            )
            .await?;
        if r.objects.is_empty() {
            return Err(corrupt(&wanted[out.len()].0, "the helper served nothing"));
        }
        for o in r.objects {
            let (c, kind) = &wanted[out.len()];
            let object = format!("{} {c}", kind.extension());
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&o.data)
                .map_err(|e| corrupt(&object, format!("not base64: {e}")))?;
            let actual = hex::encode(metadata_checksum(&bytes));
            if o.checksum != *c || actual != *c {
                return Err(corrupt(
                    &object,
                    format!("its content has checksum {actual}"),
                ));
            }
            out.push(bytes);
        }
    }
    Ok(out)
}

/// The stat composefs-ostree gives an inode: owner and mode as ostree recorded them, mtime
/// 0, and xattrs — here without the trailing NUL of their names.
fn stat_of(m: &Meta) -> Stat {
    Stat {
        st_mode: m.mode,
        st_uid: m.uid,
        st_gid: m.gid,
        st_mtim_sec: 0,
        st_mtim_nsec: 0,
        xattrs: m
            .xattrs
            .iter()
            .map(|(n, v)| {
                let n = n.strip_suffix(b"\0").unwrap_or(n);
                (Box::from(OsStr::from_bytes(n)), Box::from(v.as_slice()))
            })
            .collect(),
    }
}

#[allow(clippy::type_complexity)]
fn build_dir<ObjectID: FsVerityHashValue>(
    fs: &mut FileSystem<ObjectID>,
    leaves: &mut HashMap<Checksum, LeafId>,
    trees: &HashMap<Checksum, DirTree>,
    metas: &HashMap<Checksum, Meta>,
    files: &BTreeMap<Checksum, FileEntry<ObjectID>>,
    tree: &Checksum,
) -> Result<Vec<(Box<OsStr>, Inode<ObjectID>)>> {
    let missing =
        |what: &str, c: &Checksum| corrupt(&format!("{what} {}", hex::encode(c)), "not fetched");
    let t = trees.get(tree).ok_or_else(|| missing("dirtree", tree))?;
    let mut out = Vec::with_capacity(t.files.len() + t.dirs.len());
    for (name, c) in &t.files {
        let leaf = match leaves.get(c) {
            Some(l) => *l,
            None => {
                let e = files.get(c).ok_or_else(|| missing("file", c))?;
                let content = match (&e.target, &e.external, &e.inline) {
                    (Some(target), _, _) => LeafContent::Symlink(Box::from(OsStr::new(target))),
                    (None, Some(id), _) => {
                        LeafContent::Regular(RegularFile::External(id.clone(), e.size))
                    }
                    (None, None, inline) => LeafContent::Regular(RegularFile::Inline(
                        inline.clone().unwrap_or_default().into_boxed_slice(),
                    )),
                };
                let l = fs.push_leaf(stat_of(&e.meta), content);
                leaves.insert(*c, l);
                l
            }
        };
        out.push((Box::from(OsStr::new(name)), Inode::leaf(leaf)));
    }
    for (name, t, m) in &t.dirs {
        let meta = metas.get(m).ok_or_else(|| missing("dirmeta", m))?;
        let mut dir = Directory::new(stat_of(meta));
        for (n, inode) in build_dir(fs, leaves, trees, metas, files, t)? {
            dir.insert(&n, inode);
        }
        out.push((Box::from(OsStr::new(name)), Inode::Directory(Box::new(dir))));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use composefs::fsverity::{FsVerityHasher, Sha512HashValue};

    use super::*;

    const META: Meta = Meta {
        uid: 0,
        gid: 0,
        mode: 0o100644,
        xattrs: Vec::new(),
    };

    /// A file holding `prefix` then `content` deflated, as an archive-mode `.filez` does.
    fn deflated(prefix: &[u8], content: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(prefix).unwrap();
        let mut enc = flate2::write::DeflateEncoder::new(&mut f, flate2::Compression::fast());
        enc.write_all(content).unwrap();
        enc.finish().unwrap();
        f
    }

    /// Larger than the inflating buffer, so that the object is written in several pieces.
    fn content() -> Vec<u8> {
        (0..3_000_000u32).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn archive_contents_inflate_into_the_object_with_its_id_and_checksum() {
        let content = content();
        let mut tmp = tempfile::tempfile().unwrap();
        let mut hasher = FileHasher::new(&META, "");
        let id: Sha512HashValue = inflate_into(
            deflated(b"header", &content),
            6,
            content.len() as u64,
            &tmp,
            &mut hasher,
            "file x",
        )
        .unwrap();
        assert_eq!(id, FsVerityHasher::<Sha512HashValue>::hash(&content));
        let mut expected = FileHasher::new(&META, "");
        expected.update(&content);
        assert_eq!(hasher.finish(), expected.finish());
        let mut written = Vec::new();
        tmp.seek(SeekFrom::Start(0)).unwrap();
        tmp.read_to_end(&mut written).unwrap();
        assert!(written == content, "the object holds the inflated bytes");
    }

    /// A stream body of one object, laid out as `import_open` writes it.
    fn one_object_body(checksum: Checksum, data: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 8];
        for i in 0..256u32 {
            b.extend_from_slice(&u32::from(i >= u32::from(checksum[0])).to_le_bytes());
        }
        b.extend_from_slice(&checksum);
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn a_commit_stream_body_reads_back_and_a_cut_one_does_not() {
        let body = one_object_body([7; 32], b"metadata");
        let (index, objects) = parse_commit_stream(&body).unwrap();
        assert_eq!(index, 0);
        assert_eq!(objects, [([7; 32], None, b"metadata".as_slice())]);
        for len in [0, 4, 8 + 1024, body.len() - 1] {
            assert!(parse_commit_stream(&body[..len]).is_none(), "{len} bytes");
        }
        let mut huge = body.clone();
        huge[8 + 255 * 4..8 + 256 * 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_commit_stream(&huge).is_none());
    }

    #[test]
    fn an_archive_content_of_another_size_or_not_deflate_is_a_corrupt_object() {
        let content = content();
        let inflate = |src, size| {
            inflate_into::<Sha512HashValue>(
                src,
                0,
                size,
                &tempfile::tempfile().unwrap(),
                &mut FileHasher::new(&META, ""),
                "file y",
            )
            .unwrap_err()
        };
        for size in [content.len() as u64 - 1, content.len() as u64 + 1] {
            let e = inflate(deflated(b"", &content), size);
            assert!(
                matches!(&e, Error::OstreeObject { object, .. } if object == "file y"),
                "{e}"
            );
        }
        let mut garbage = tempfile::tempfile().unwrap();
        garbage.write_all(&[0xff; 4096]).unwrap();
        let e = inflate(garbage, 4096);
        assert!(
            matches!(&e, Error::OstreeObject { detail, .. } if detail.contains("inflate")),
            "{e}"
        );
    }
}
