//! Talking to a real `cstor-helper` process from tests: through the client library, or raw
//! bytes on the socket for protocol abuse.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cstor_proxy_client::{Client, HelperConfig, Privilege, StorageSelection};
use serde_json::Value;

use crate::PodmanStore;

/// A current-thread runtime, as bootc uses.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a tokio runtime")
}

/// Helper settings serving `store`, started directly (tests run as root).
pub fn helper_config(store: &PodmanStore) -> Result<HelperConfig> {
    Ok(HelperConfig::default()
        .program(crate::helper_binary()?)
        .storage(
            StorageSelection::default()
                .graphroot(&store.root)
                .runroot(&store.runroot),
        )
        .privilege(Privilege::Direct))
}

/// Spawns a helper for `store` and connects the client library to it.
pub async fn client_for(store: &PodmanStore) -> Result<Client> {
    Client::spawn(&helper_config(store)?)
        .await
        .context("starting cstor-helper")
}

/// A helper process with the raw socket, for sending arbitrary bytes.
#[derive(Debug)]
pub struct RawHelper {
    /// Our end of the socketpair.
    pub sock: UnixStream,
    /// The helper.
    pub child: Child,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// A JSON value read from the socket with the fds that arrived before its end.
#[derive(Debug)]
pub struct RawMessage {
    /// The message.
    pub value: Value,
    /// Fds received (as many as the message's `fds` says).
    pub fds: Vec<OwnedFd>,
}

impl RawHelper {
    /// Starts `cstor-helper --root ... --runroot ... <extra>` with a socketpair on fd 0.
    pub fn spawn(store: &PodmanStore, extra: &[&str]) -> Result<Self> {
        let (ours, theirs) = UnixStream::pair().context("socketpair")?;
        let child = Command::new(crate::helper_binary()?)
            .arg("--root")
            .arg(&store.root)
            .arg("--runroot")
            .arg(&store.runroot)
            .args(extra)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning cstor-helper")?;
        ours.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            sock: ours,
            child,
            buf: Vec::new(),
            fds: Vec::new(),
        })
    }

    /// Writes raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.sock.write_all(bytes).context("writing to the helper")
    }

    /// Sends a JSON value.
    pub fn send_json(&mut self, v: &Value) -> Result<()> {
        let b = serde_json::to_vec(v)?;
        self.send(&b)
    }

    /// Sends bytes with fds attached in one sendmsg.
    pub fn send_with_fds(
        &mut self,
        bytes: &[u8],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<()> {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(16))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(fds)) {
            bail!("too many fds for the test buffer");
        }
        let n = sendmsg(
            &self.sock,
            &[std::io::IoSlice::new(bytes)],
            &mut control,
            SendFlags::empty(),
        )?;
        if n != bytes.len() {
            bail!("short sendmsg");
        }
        Ok(())
    }

    fn recv_some(&mut self) -> Result<usize> {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
        let mut data = [0u8; 65536];
        let mut space =
            [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(253))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let r = recvmsg(
            &self.sock,
            &mut [std::io::IoSliceMut::new(&mut data)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = m {
                self.fds.extend(fds);
            }
        }
        self.buf.extend_from_slice(&data[..r.bytes]);
        Ok(r.bytes)
    }

    /// Reads the next JSON message (with its fds); `None` at end of stream.
    pub fn recv(&mut self) -> Result<Option<RawMessage>> {
        loop {
            let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => {
                    let used = it.byte_offset();
                    let want = v.get("fds").and_then(|f| f.as_u64()).unwrap_or(0) as usize;
                    if self.fds.len() >= want {
                        self.buf.drain(..used);
                        let fds = self.fds.drain(..want).collect();
                        return Ok(Some(RawMessage { value: v, fds }));
                    }
                }
                Some(Err(e)) if !e.is_eof() => bail!("helper sent non-JSON: {e}"),
                _ => {}
            }
            if self.recv_some()? == 0 {
                if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                    return Ok(None);
                }
                bail!("helper closed the socket in the middle of a message");
            }
        }
    }

    /// Sends a request and returns the reply.
    pub fn call(&mut self, id: u64, method: &str, params: Value) -> Result<RawMessage> {
        self.send_json(
            &serde_json::json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}),
        )?;
        self.recv()?
            .context("the helper closed the connection instead of replying")
    }

    /// Sends `Initialize` and checks it succeeded.
    pub fn initialize(&mut self) -> Result<Value> {
        let r = self.call(
            0,
            "Initialize",
            serde_json::json!({"protocol_version":"1.0"}),
        )?;
        match r.value.get("result") {
            Some(v) => Ok(v.clone()),
            None => bail!("Initialize failed: {}", r.value),
        }
    }

    /// Closes our end and waits for the helper to exit; returns its status and stderr.
    pub fn finish(mut self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        drop(self.sock);
        let status = wait_with_timeout(&mut self.child, timeout)?;
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        Ok((status, err))
    }

    /// Whether the helper is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Waits for a child, killing it after `timeout`.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if start.elapsed() > timeout {
            let threads = thread_states(child.id());
            let _ = child.kill();
            let s = child.wait()?;
            bail!(
                "process did not exit within {timeout:?} (killed: {s}); its threads then:\n{threads}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What each thread of process `pid` was doing: its name, state and, where readable (as
/// root), its kernel stack; so that a hang seen once in CI says where it hung.
fn thread_states(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "(its threads cannot be listed)".into();
    };
    let mut out = String::new();
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let state = read("status")
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or("")
            .to_owned();
        let frames: Vec<String> = read("stack")
            .lines()
            .take(6)
            .map(|l| l.split_whitespace().last().unwrap_or("").to_owned())
            .collect();
        out.push_str(&format!(
            "  {} {:?} {state} in {} [{}]\n",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            frames.join(" < ")
        ));
    }
    out
}

/// Runs `podman rmi` (or any podman command) on `store` in the background.
pub fn podman_background(store: &PodmanStore, args: &[&str]) -> Result<Child> {
    store
        .podman()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning podman")
}

/// The error code of a JSON-RPC error reply, if it is one.
pub fn error_code(v: &Value) -> Option<i64> {
    v.pointer("/error/code").and_then(|c| c.as_i64())
}

/// Copies the helper and cstor binaries to a world-readable temp dir (for other users).
pub fn public_binaries() -> Result<(tempfile::TempDir, PathBuf, PathBuf)> {
    let dir = tempfile::Builder::new()
        .prefix("cstor-bin-")
        .tempdir_in("/tmp")
        .context("creating a temp dir for binaries")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let helper = crate::helper_binary()?;
    let cstor = helper.with_file_name("cstor");
    let mut out = Vec::new();
    for src in [&helper, &cstor] {
        let dst = dir.path().join(src.file_name().context("binary name")?);
        crate::copy_executable(src, &dst)?;
        out.push(dst);
    }
    let cstor = out.pop().context("cstor path")?;
    let helper = out.pop().context("helper path")?;
    Ok((dir, helper, cstor))
}

/// Whether `fd` is readable as a regular file of `len` bytes.
pub fn fd_len(fd: &OwnedFd) -> Result<u64> {
    Ok(rustix::fs::fstat(fd.as_fd())?.st_size as u64)
}
