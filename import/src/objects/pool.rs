//! The object workers: a fixed pool of threads that take the layer readers' files from a
//! queue, a batch at a time, digest them together and store each, answering every job on
//! its own channel (or with [`Error::Cancelled`] once the import is stopped).

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender};

use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;

use super::job_queue::GroupQueue;
use super::placement;
use super::policy::{CopyPolicy, Stored};
use super::source::{Expected, Source};
use super::store::{store, store_as};
use super::worker_state::WorkerState;
use crate::error::{Error, Result};

/// A fixed pool of threads storing objects in parallel.
pub struct Pool<ObjectID: FsVerityHashValue> {
    queue: Arc<GroupQueue<Job<ObjectID>>>,
    /// The repository filesystem's XFS allocation groups, to tag jobs with their source's.
    groups: Option<placement::Groups>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What a worker hands back: the object (or why not), and the job's buffer for reuse.
pub type JobResult<ObjectID> = (Result<(ObjectID, Stored)>, Option<Vec<u8>>);

/// One file for the workers to store, as a layer reader hands it over.
#[derive(Debug)]
pub struct Submission {
    /// The file, as the helper (or the source repository) opened it.
    pub file: File,
    /// Its `size` bytes, when the reader already read them: the worker then hashes them
    /// instead of reading the file again, and hands the buffer back.
    pub data: Option<Vec<u8>>,
    /// Length recorded in tar-split (or the source repository).
    pub size: u64,
    /// What its bytes must match.
    pub expected: Expected,
    /// Entry name, for errors and the report.
    pub name: String,
    /// Layer id, for errors.
    pub layer: Arc<str>,
}

impl Submission {
    fn source(&self) -> Source<'_> {
        Source {
            file: &self.file,
            data: self.data.as_deref(),
            size: self.size,
            expected: &self.expected,
            name: &self.name,
            layer: &self.layer,
        }
    }
}

struct Job<ObjectID> {
    file: Submission,
    reply: SyncSender<JobResult<ObjectID>>,
}

/// Jobs a worker takes at once, when that many are queued: their object ids are computed
/// together (see [`digest_batch`]).
const BATCH: usize = 16;

/// The object ids of the jobs whose bytes are in memory (checked against their CRC-64
/// or source object first, and their source object's id after), computed in one go so that the multi-buffer SHA-512 hashes small files eight at
/// a time instead of one by one (one-block files are most of an image's files). `None` for
/// jobs the worker must read itself.
fn digest_batch<ObjectID: FsVerityHashValue>(
    batch: &[(Option<u64>, Job<ObjectID>)],
) -> Vec<Option<Result<ObjectID>>> {
    let mut out: Vec<Option<Result<ObjectID>>> = Vec::with_capacity(batch.len());
    let mut files: Vec<&[u8]> = Vec::with_capacity(batch.len());
    for (_, job) in batch {
        out.push(job.file.data.as_deref().map(|data| {
            job.file.source().check_data::<ObjectID>(data)?;
            files.push(data);
            Ok(ObjectID::EMPTY)
        }));
    }
    // One id per file, in order: they go to the checked jobs in order.
    let mut ids = crate::verity::ids::<ObjectID>(&files).into_iter();
    for ((_, job), slot) in batch.iter().zip(out.iter_mut()) {
        if let Some(r @ Ok(_)) = slot {
            *r = match ids.next() {
                Some(id) => job.file.source().check_id(&id).map(|()| id),
                None => Err(Error::io(
                    "digesting a batch of objects",
                    std::io::Error::other("fewer digests than files"),
                )),
            };
        }
    }
    out
}

impl<ObjectID: FsVerityHashValue> std::fmt::Debug for Pool<ObjectID> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl<ObjectID: FsVerityHashValue> Pool<ObjectID> {
    /// Starts `n` workers storing into `repo`. Once the import is stopped (see
    /// [`WorkerState::new`]) they answer the jobs they take with [`Error::Cancelled`] instead
    /// of storing them.
    pub fn new(
        repo: Arc<Repository<ObjectID>>,
        n: usize,
        policy: CopyPolicy,
        state: Arc<WorkerState>,
    ) -> Result<Self> {
        let n = n.max(1);
        let queue = Arc::new(GroupQueue::<Job<ObjectID>>::new(n));
        let (mut tmp_dirs, groups) = match repo.objects_dir() {
            Ok(objects) => {
                let groups = placement::groups_of_dir(objects.as_fd()).filter(|_| n > 1);
                (placement::worker_dirs(objects.as_fd(), groups, n), groups)
            }
            Err(_) => (vec![None; n], None),
        };
        let mut threads = Vec::new();
        for i in 0..n {
            let queue = queue.clone();
            let repo = repo.clone();
            let state = state.clone();
            let tmp_dir = tmp_dirs.get_mut(i).and_then(Option::take);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("cstor-objects-{i}"))
                    .spawn(move || {
                        let mut buf = vec![0u8; 1 << 20];
                        let mut batch = Vec::with_capacity(BATCH);
                        while queue.pop_batch(i, BATCH, &mut batch) {
                            let ids = digest_batch(&batch);
                            let mut todo: Vec<_> = batch.drain(..).zip(ids).collect();
                            while !todo.is_empty() {
                                // Clone first from a group the other worker is not cloning
                                // from (see `job_queue`), whatever the order in the batch.
                                let k = queue.choose(i, todo.iter().map(|((g, _), _)| *g));
                                let ((_, job), id) = todo.remove(k.min(todo.len() - 1));
                                if state.stopped() {
                                    // Cancelled: what is queued is answered, not stored.
                                    let _ = job.reply.send((Err(Error::Cancelled), job.file.data));
                                    continue;
                                }
                                let source = job.file.source();
                                let tmp_dir = tmp_dir.as_deref();
                                let r = match id {
                                    Some(Ok(id)) => {
                                        store_as(&repo, id, &source, policy, &state, tmp_dir)
                                    }
                                    Some(Err(e)) => Err(e),
                                    None => {
                                        store(&repo, &source, policy, &state, tmp_dir, &mut buf)
                                    }
                                };
                                let _ = job.reply.send((r, job.file.data));
                            }
                        }
                    })
                    .map_err(|e| Error::io("starting an object worker", e))?,
            );
        }
        Ok(Self {
            queue,
            groups,
            threads,
        })
    }

    /// Queues `file` for storing; the receiver yields the result.
    pub fn submit(&self, file: Submission) -> Result<Receiver<JobResult<ObjectID>>> {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        // The source's inode group stands for its data's: XFS puts a file's extents in its
        // inode's group while that has room.
        let group = self
            .groups
            .and_then(|g| rustix::fs::fstat(&file.file).ok().map(|st| g.of(st.st_ino)));
        self.queue.push(group, Job { file, reply }).map_err(|_| {
            Error::io(
                "queueing an object",
                std::io::Error::other("the object workers stopped"),
            )
        })?;
        Ok(rx)
    }
}

impl<ObjectID: FsVerityHashValue> Drop for Pool<ObjectID> {
    fn drop(&mut self) {
        // Every layer that succeeded waited for its own jobs, so what is still queued now
        // belongs to layers that failed: storing it would only delay the error (by seconds
        // when large files are queued behind a helper that died).
        self.queue.abandon();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use composefs::fsverity::Sha512HashValue;
    use cstor_protocol::assemble::CRC64;

    use super::*;
    use crate::objects::test_files::source;

    /// A batch's ids are each file's own; a file failing its CRC fails alone; files the
    /// worker must read itself are left to it.
    #[test]
    fn a_batch_digests_each_job_and_fails_only_the_bad_one() {
        use composefs::fsverity::FsVerityHasher;
        let tmp = tempfile::tempdir().unwrap();
        let contents: [&[u8]; 4] = [b"first file", &[9u8; 9000], b"corrupted", b"unread"];
        let batch: Vec<(Option<u64>, Job<Sha512HashValue>)> = contents
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let name = format!("f{i}");
                let crc = CRC64.checksum(c) ^ u64::from(i == 2);
                let job = Job {
                    file: Submission {
                        file: source(tmp.path(), &name, c, 0o644),
                        data: (i != 3).then(|| c.to_vec()),
                        size: c.len() as u64,
                        expected: Expected::Crc64(crc),
                        name,
                        layer: Arc::from("test-layer"),
                    },
                    reply: std::sync::mpsc::sync_channel(1).0,
                };
                (None, job)
            })
            .collect();
        let ids = digest_batch(&batch);
        for i in [0, 1] {
            assert_eq!(
                *ids[i].as_ref().unwrap().as_ref().unwrap(),
                FsVerityHasher::<Sha512HashValue>::hash(contents[i])
            );
        }
        assert!(matches!(
            ids[2],
            Some(Err(Error::Helper(
                cstor_proxy_client::Error::Assemble { .. }
            )))
        ));
        assert!(ids[3].is_none());
    }
}
