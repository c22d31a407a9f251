//! `--stdio`: the same methods for a human at a terminal. Requests are read from stdin, one
//! JSON object per line; each reply is printed as pretty JSON. Nothing is passed as an fd:
//! `GetLayer` walks the whole layer itself and describes every record and the fd that would
//! carry each file, and with `--dump-tar DIR` it also rebuilds the tar and checks its digest.

use std::fs::File;
use std::io::{BufRead, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use base64::Engine as _;
use cstor_protocol::assemble::{AssembleError, ContentSource, assemble};
use cstor_protocol::stream::StreamReader;
use cstor_protocol::{
    DescribedEntry, DescribedLayer, DumpedTar, ErrorCode, FdDescription, GetLayerResult, RpcError,
    StreamInfo, stream,
};
use serde_json::{Value, json};

use super::producer::{FdSink, produce, stream_pipe};
use super::{Connection, Helper, Reply, Transport};
use crate::error::{Error, Result};
use crate::storage::layer_walk::Item;

fn response(id: Value, r: Result<Reply, RpcError>) -> Value {
    match r {
        Ok(reply) => json!({"jsonrpc": "2.0", "id": id, "result": reply.result}),
        Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": e}),
    }
}

fn error_line(e: RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": Value::Null, "error": e})
}

/// One line of input, or what was wrong with it.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Text(String),
    /// Longer than the limit: skipped up to its newline without being kept.
    TooLong(usize),
    NotUtf8(std::str::Utf8Error),
}

/// Reads the next line of at most `max` bytes (without its newline); `None` at end of input.
/// A longer line is consumed and dropped as it streams in, so its length costs no memory.
fn read_line(input: &mut impl BufRead, max: usize) -> std::io::Result<Option<Line>> {
    let mut line = Vec::new();
    let mut len = 0usize;
    let mut seen = false;
    loop {
        let buf = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            if !seen {
                return Ok(None);
            }
            break;
        }
        seen = true;
        let (chunk, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        len = len.saturating_add(chunk.len());
        if len <= max {
            line.extend_from_slice(chunk);
        } else {
            line = Vec::new();
        }
        let used = done.unwrap_or(buf.len());
        input.consume(used);
        if done.is_some() {
            break;
        }
    }
    if len > max {
        return Ok(Some(Line::TooLong(len)));
    }
    Ok(Some(match String::from_utf8(line) {
        Ok(s) => Line::Text(s),
        Err(e) => Line::NotUtf8(e.utf8_error()),
    }))
}

/// Serves stdin/stdout until end of input or `Shutdown`.
pub async fn serve(helper: Arc<Helper>) -> std::io::Result<()> {
    let max = helper.config.max_request_bytes as usize;
    let conn = Connection::new(helper, Transport::Stdio);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Line>>(4);
    // Blocking stdin reads live on their own thread so a slow request never stalls input.
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut input = stdin.lock();
        loop {
            let line = match read_line(&mut input, max) {
                Ok(Some(l)) => Ok(l),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            let failed = line.is_err();
            if tx.blocking_send(line).is_err() || failed {
                break;
            }
        }
    });
    let mut out = std::io::stdout();
    while let Some(line) = rx.recv().await {
        let reply = match line? {
            Line::Text(t) if t.trim().is_empty() => continue,
            Line::Text(t) => match serde_json::from_str::<Value>(&t) {
                Err(e) => Some(error_line(RpcError::new(
                    ErrorCode::ParseError,
                    format!("not JSON: {e}"),
                ))),
                Ok(v) => handle(&conn, v).await,
            },
            Line::TooLong(n) => Some(error_line(RpcError::new(
                ErrorCode::InvalidRequest,
                format!("a request line of {n} bytes is longer than the {max} accepted; skipped"),
            ))),
            Line::NotUtf8(e) => Some(error_line(RpcError::new(
                ErrorCode::ParseError,
                format!("not JSON: the line is not UTF-8 ({e})"),
            ))),
        };
        if let Some(v) = reply {
            let text = serde_json::to_string_pretty(&v).unwrap_or_else(|e| {
                format!("{{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{{\"code\":-32603,\"message\":\"{e}\"}}}}")
            });
            writeln!(out, "{text}")?;
            out.flush()?;
        }
        if *conn.shutdown.borrow() {
            break;
        }
    }
    conn.release_all();
    Ok(())
}

async fn handle(conn: &Arc<Connection>, v: Value) -> Option<Value> {
    let Value::Object(mut obj) = v else {
        return Some(error_line(RpcError::new(
            ErrorCode::InvalidRequest,
            "a request must be a JSON object",
        )));
    };
    let id = obj.remove("id");
    if let Some(e) = id.as_ref().and_then(super::id_problem) {
        return Some(error_line(e));
    }
    let bad = |msg: String| {
        Some(
            json!({"jsonrpc": "2.0", "id": id.clone().unwrap_or(Value::Null),
                     "error": RpcError::new(ErrorCode::InvalidRequest, msg)}),
        )
    };
    if obj.get("jsonrpc").and_then(|v| v.as_str()) != Some("2.0") {
        return bad("\"jsonrpc\": \"2.0\" is required".into());
    }
    let Some(method) = obj
        .get("method")
        .and_then(|m| m.as_str())
        .map(str::to_owned)
    else {
        return bad("\"method\" must be a string".into());
    };
    let fds = obj.get("fds").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let r = conn.dispatch(&method, obj.remove("params"), fds).await;
    match id {
        // A notification gets no reply, as JSON-RPC says; errors still reach the log.
        None => {
            if let Err(e) = r {
                tracing::warn!(%method, "notification failed: {e}");
            }
            None
        }
        Some(id) => Some(response(id, r)),
    }
}

/// A sink that keeps content files for [`ContentSource`] on the same thread, or drops them
/// when no tar is dumped.
struct Forward {
    tx: std::sync::mpsc::SyncSender<File>,
}

impl FdSink for Forward {
    fn try_push(&mut self, _i: u64, f: File) -> Result<Option<File>> {
        match self.tx.try_send(f) {
            Ok(()) => Ok(None),
            Err(std::sync::mpsc::TrySendError::Full(f)) => Ok(Some(f)),
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                Err(Error::new(ErrorCode::Cancelled, "the tar writer stopped"))
            }
        }
    }

    fn push_blocking(&mut self, _i: u64, f: File) -> Result<()> {
        self.tx
            .send(f)
            .map_err(|_| Error::new(ErrorCode::Cancelled, "the tar writer stopped"))
    }
}

struct Received(std::sync::mpsc::Receiver<File>);

impl ContentSource for Received {
    fn content(&mut self, fd: u64) -> std::io::Result<File> {
        self.0.recv().map_err(|_| {
            std::io::Error::other(format!(
                "content fd {fd} never arrived (the producer stopped)"
            ))
        })
    }
}

/// `GetLayer` in `--stdio` mode: runs the real producer into a pipe, rebuilds and checks
/// the tar from it (or just validates the stream), and describes what would have been
/// passed.
pub async fn describe_layer(helper: Arc<Helper>, layer: String) -> Result<Reply, RpcError> {
    let h = helper.clone();
    let r = tokio::task::spawn_blocking(move || describe_blocking(&h, &layer)).await;
    match r {
        Ok(r) => r,
        Err(e) => Err(RpcError::new(
            ErrorCode::Internal,
            format!("describe task failed: {e}"),
        )),
    }
}

fn describe_blocking(helper: &Helper, layer: &str) -> Result<Reply, RpcError> {
    let open = helper.storage.open_layer(layer)?;
    let info = open.info.clone();
    let _locks = open.locks;
    let walker = open.source.walk()?;
    let limit = helper.config.describe_limit;
    let (read_end, write_end) = stream_pipe()
        .map_err(|e| RpcError::from(Error::io("creating the layer stream pipe", e)))?;
    let (ftx, frx) = std::sync::mpsc::sync_channel::<File>(64);

    let producer = std::thread::spawn(move || {
        let mut entries: Vec<DescribedEntry> = Vec::new();
        let mut truncated = false;
        let mut observe = |item: &Item, fd: Option<u64>| {
            if entries.len() >= limit {
                truncated = true;
                return;
            }
            entries.push(describe(item, fd));
        };
        let cancel = AtomicBool::new(false);
        let mut sink = Forward { tx: ftx };
        let r = produce(
            walker,
            File::from(write_end),
            &mut sink,
            Some(&mut observe),
            &cancel,
        );
        (r, entries, truncated)
    });

    let reader = File::from(read_end);
    let tar_target = helper.config.dump_tar.as_ref().map(|dir| {
        let name = info
            .diff_id
            .as_deref()
            .and_then(|d| d.strip_prefix("sha256:"))
            .unwrap_or(&info.id);
        dir.join(format!("{name}.tar"))
    });
    let consumed = consume(reader, Received(frx), tar_target.as_deref());
    let (produced, entries, truncated) = producer
        .join()
        .map_err(|_| RpcError::new(ErrorCode::Internal, "the producer thread panicked"))?;
    // The producer's error is the more precise one, unless it only says that the consumer
    // stopped: then the consumer's error is the cause.
    let summary = match (produced, consumed.as_ref()) {
        (Err(e), Err(c)) if e.code() == ErrorCode::Cancelled => return Err(c.clone()),
        (p, _) => p?,
    };
    let assembled = consumed?;
    let tar = match (tar_target, assembled) {
        (Some(path), Some(a)) => {
            let matches = info.diff_id.as_deref() == Some(a.digest.as_str());
            if !matches {
                tracing::warn!(
                    layer = %info.id,
                    "rebuilt tar has digest {} but the layer's diff id is {:?}",
                    a.digest,
                    info.diff_id
                );
            }
            Some(DumpedTar {
                path: path.to_string_lossy().into_owned(),
                size: a.size,
                digest: a.digest,
                matches_diff_id: matches,
            })
        }
        _ => None,
    };
    let result = GetLayerResult {
        handle: 0,
        layer: info,
        stream: StreamInfo {
            format: stream::FORMAT_NAME.into(),
            version: stream::FORMAT_VERSION,
            fd: 0,
        },
        described: Some(DescribedLayer {
            entries,
            truncated,
            summary,
            tar,
        }),
    };
    Ok(Reply {
        result: serde_json::to_value(&result).map_err(|e| {
            RpcError::new(ErrorCode::Internal, format!("serializing the reply: {e}"))
        })?,
        fds: Vec::<OwnedFd>::new(),
    })
}

/// Reads the whole stream: rebuilds the tar into `target` when given (checking every CRC),
/// otherwise validates the stream and closes the content files.
fn consume(
    reader: File,
    mut source: Received,
    target: Option<&Path>,
) -> Result<Option<cstor_protocol::assemble::AssembledTar>, RpcError> {
    let stream = StreamReader::new(std::io::BufReader::with_capacity(256 << 10, reader))
        .map_err(stream_err)?;
    match target {
        Some(path) => {
            let out = File::create(path).map_err(|e| {
                RpcError::from(Error::io(format!("creating {}", path.display()), e))
            })?;
            let a = assemble(
                stream,
                &mut source,
                std::io::BufWriter::with_capacity(1 << 20, out),
            )
            .map_err(|e| match e {
                AssembleError::Stream(s) => stream_err(s),
                AssembleError::Crc { .. } | AssembleError::Size { .. } => {
                    RpcError::new(ErrorCode::ChecksumMismatch, e.to_string())
                }
                other => RpcError::new(ErrorCode::Io, other.to_string()),
            })?;
            Ok(Some(a))
        }
        None => {
            let mut stream = stream;
            while let Some(rec) = stream.next_record().map_err(stream_err)? {
                if let stream::Record::File(f) = rec
                    && let Some(i) = f.fd
                {
                    drop(source.content(i));
                }
            }
            Ok(None)
        }
    }
}

fn stream_err(e: stream::StreamError) -> RpcError {
    match e {
        stream::StreamError::Remote(r) => *r,
        other => RpcError::new(ErrorCode::Internal, other.to_string()),
    }
}

fn describe(item: &Item, fd: Option<u64>) -> DescribedEntry {
    match item {
        Item::Segment(b) => DescribedEntry::Segment {
            len: b.len() as u64,
        },
        Item::File(f) => {
            let name = String::from_utf8_lossy(&f.name).into_owned();
            let name_base64 = std::str::from_utf8(&f.name)
                .is_err()
                .then(|| base64::engine::general_purpose::STANDARD.encode(&f.name));
            DescribedEntry::File {
                name: name.clone(),
                name_base64,
                size: f.size,
                crc64: (f.size > 0).then(|| format!("{:016x}", f.crc64)),
                fd: fd.map(|index| FdDescription {
                    index,
                    kind: "regular".into(),
                    name,
                    size: Some(f.size),
                }),
            }
        }
    }
}

#[cfg(test)]
mod lines {
    use super::{Line, read_line};

    fn all(input: &[u8], max: usize) -> Vec<Line> {
        let mut r = std::io::BufReader::with_capacity(7, input);
        std::iter::from_fn(|| read_line(&mut r, max).unwrap()).collect()
    }

    #[test]
    fn long_and_broken_lines_are_reported_and_skipped() {
        let got = all(b"{}\nabcdefghijklmnop\n\xff\xfe\n\nlast", 10);
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], Line::Text("{}".into()));
        assert_eq!(got[1], Line::TooLong(16));
        assert!(matches!(got[2], Line::NotUtf8(_)));
        assert_eq!(got[3], Line::Text(String::new()));
        assert_eq!(got[4], Line::Text("last".into()));
    }
}
