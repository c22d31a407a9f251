//! The ostree methods of a connection: repository handles, and the requests that read
//! through them (see [`cstor_protocol::ostree`]).
//!
//! A handle keeps its repository open and ostree's shared lock held until `CloseOstreeRepo`
//! or the end of the connection; there is no lease, since an idle handle costs one directory
//! fd and one lock, and a client that died ends its connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use cstor_protocol::ostree::format::Checksum;
use cstor_protocol::ostree::{
    GetOstreeObjectsParams, GetOstreeObjectsResult, MAX_OBJECT_BYTES_PER_REPLY,
    MAX_OBJECTS_PER_REQUEST, OpenOstreeFilesParams, OpenOstreeFilesResult, OpenOstreeRepoParams,
    OpenOstreeRepoResult, OstreeFile, OstreeObject, OstreeRepoHandle, ResolveOstreeRefParams,
    ResolveOstreeRefResult, Xattr, method,
};
use cstor_protocol::{Empty, ErrorCode, RpcError};
use serde_json::Value;

use super::{Connection, Reply, Transport, blocking, lock, params, stdio_unavailable, to_value};
use crate::ostree::OstreeRepo;
use crate::ostree::refs::parse_checksum;

/// Repositories open at once on one connection.
pub const MAX_OPEN_REPOS: usize = 16;

/// A connection's open ostree repositories.
#[derive(Debug, Default)]
pub struct OstreeRepos {
    repos: Mutex<HashMap<u64, Arc<OstreeRepo>>>,
    next: AtomicU64,
}

impl OstreeRepos {
    /// Closes every repository (end of connection, `Shutdown`).
    pub fn clear(&self) {
        lock(&self.repos).clear();
    }

    fn get(&self, handle: u64) -> Result<Arc<OstreeRepo>, RpcError> {
        lock(&self.repos).get(&handle).cloned().ok_or_else(|| {
            RpcError::new(
                ErrorCode::UnknownHandle,
                format!("no ostree repository is open with handle {handle}"),
            )
        })
    }
}

fn checksum_param(s: &str) -> Result<Checksum, RpcError> {
    parse_checksum(s).ok_or_else(|| {
        RpcError::new(
            ErrorCode::InvalidParams,
            format!("{s:?} is not an object checksum (64 lowercase hex digits)"),
        )
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl Connection {
    /// Handles a method of [`cstor_protocol::ostree::method::ALL`].
    pub(super) async fn dispatch_ostree(
        self: &Arc<Self>,
        m: &str,
        p: Option<Value>,
    ) -> Result<Reply, RpcError> {
        match m {
            method::OPEN_OSTREE_REPO => {
                let OpenOstreeRepoParams { path } = params(m, p)?;
                if lock(&self.ostree.repos).len() >= MAX_OPEN_REPOS {
                    return Err(RpcError::new(
                        ErrorCode::TooManyHandles,
                        format!(
                            "{MAX_OPEN_REPOS} ostree repositories are open on this connection; close one first"
                        ),
                    ));
                }
                let timeout = self.helper.storage.lock_timeout();
                let repo = blocking(move || OstreeRepo::open(std::path::Path::new(&path), timeout))
                    .await?;
                let handle = self.ostree.next.fetch_add(1, Ordering::Relaxed) + 1;
                let result = OpenOstreeRepoResult {
                    repo: handle,
                    mode: repo.mode(),
                    locked: repo.locked(),
                };
                lock(&self.ostree.repos).insert(handle, Arc::new(repo));
                Reply::of(&result)
            }
            method::CLOSE_OSTREE_REPO => {
                let OstreeRepoHandle { repo } = params(m, p)?;
                match lock(&self.ostree.repos).remove(&repo) {
                    Some(_) => Reply::of(&Empty {}),
                    None => Err(self.ostree.get(repo).err().unwrap_or_else(|| {
                        RpcError::new(ErrorCode::UnknownHandle, "no such repository")
                    })),
                }
            }
            method::RESOLVE_OSTREE_REF => {
                let ResolveOstreeRefParams { repo, reference } = params(m, p)?;
                let repo = self.ostree.get(repo)?;
                let r = blocking(move || repo.resolve(&reference)).await?;
                Reply::of(&ResolveOstreeRefResult {
                    commit: hex::encode(r.commit),
                    ref_file: r.ref_file,
                })
            }
            method::GET_OSTREE_OBJECTS => {
                let GetOstreeObjectsParams { repo, objects } = params(m, p)?;
                if objects.len() > MAX_OBJECTS_PER_REQUEST {
                    return Err(RpcError::new(
                        ErrorCode::InvalidParams,
                        format!(
                            "{} objects asked for; at most {MAX_OBJECTS_PER_REQUEST} per request",
                            objects.len()
                        ),
                    ));
                }
                let wanted = objects
                    .iter()
                    .map(|o| Ok((checksum_param(&o.checksum)?, o.kind)))
                    .collect::<Result<Vec<_>, RpcError>>()?;
                let repo = self.ostree.get(repo)?;
                let served = blocking(move || {
                    let mut out = Vec::new();
                    let mut bytes = 0u64;
                    for (c, kind) in wanted {
                        if !out.is_empty() && bytes >= MAX_OBJECT_BYTES_PER_REPLY {
                            break;
                        }
                        let data = repo.read_metadata(&c, kind)?;
                        bytes += data.len() as u64;
                        out.push((c, kind, data));
                    }
                    Ok(out)
                })
                .await?;
                Reply::of(&GetOstreeObjectsResult {
                    objects: served
                        .into_iter()
                        .map(|(c, kind, data)| OstreeObject {
                            checksum: hex::encode(c),
                            kind,
                            data: b64(&data),
                        })
                        .collect(),
                })
            }
            method::OPEN_OSTREE_FILES => {
                let OpenOstreeFilesParams { repo, files } = params(m, p)?;
                if self.transport == Transport::Stdio {
                    return Err(stdio_unavailable(m));
                }
                let max = self.helper.config.max_fds_per_message as usize;
                if files.len() > max {
                    return Err(RpcError::new(
                        ErrorCode::InvalidParams,
                        format!(
                            "{} files asked for; at most limits.max_fds_per_message ({max}) per request",
                            files.len()
                        ),
                    ));
                }
                let wanted = files
                    .iter()
                    .map(|c| checksum_param(c))
                    .collect::<Result<Vec<_>, RpcError>>()?;
                let repo = self.ostree.get(repo)?;
                let opened = blocking(move || {
                    wanted
                        .into_iter()
                        .map(|c| {
                            repo.open_file(&c)
                                .map(|f| (c, f))
                                .map_err(|e| e.context(format!("file object {}", hex::encode(c))))
                        })
                        .collect::<crate::error::Result<Vec<_>>>()
                })
                .await?;
                let mut fds = Vec::new();
                let mut out = Vec::with_capacity(opened.len());
                for (c, f) in opened {
                    let mut entry = OstreeFile {
                        checksum: hex::encode(c),
                        uid: f.meta.uid,
                        gid: f.meta.gid,
                        mode: f.meta.mode,
                        size: f.size,
                        xattrs: f
                            .meta
                            .xattrs
                            .iter()
                            .map(|(n, v)| Xattr {
                                name: b64(n),
                                value: b64(v),
                            })
                            .collect(),
                        symlink_target: f.symlink_target,
                        fd: None,
                        content: None,
                        content_offset: 0,
                    };
                    if let Some(content) = f.content {
                        entry.fd = Some(fds.len() as u32);
                        entry.content = Some(content.encoding);
                        entry.content_offset = content.offset;
                        fds.push(std::os::fd::OwnedFd::from(content.file));
                    }
                    out.push(entry);
                }
                Ok(Reply {
                    result: to_value(&OpenOstreeFilesResult { files: out })?,
                    fds,
                })
            }
            other => Err(RpcError::new(
                ErrorCode::MethodNotFound,
                format!("no ostree method {other:?}"),
            )),
        }
    }
}
