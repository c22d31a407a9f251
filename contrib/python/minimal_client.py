#!/usr/bin/env python3
# usage: minimal_client.py REFERENCE OUT.tar [helper args...]
import hashlib, json, os, re, socket, struct, subprocess, sys

TABLE = []  # CRC-64/GO-ISO: reflected polynomial 0xD800000000000000
for i in range(256):
    for _ in range(8):
        i = (i >> 1) ^ 0xD800000000000000 if i & 1 else i >> 1
    TABLE.append(i)

def crc64(data, crc=0):
    crc ^= 0xFFFFFFFFFFFFFFFF
    for b in data:
        crc = TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFFFFFFFFFF

def can_read_everything():  # euid 0, or CAP_DAC_OVERRIDE: bit 1 of CapEff
    if os.geteuid() == 0:
        return True
    with open("/proc/self/status") as f:
        caps = [line.split()[1] for line in f if line.startswith("CapEff:")]
    return bool(caps) and int(caps[0], 16) & (1 << 1) != 0

# Where raw_decode fails on a JSON text cut short, other than in an unterminated string:
# at the end of the text, or at the start of the token that was cut (a number's sign,
# fraction or exponent; true, false or null; a \uXXXX escape).
CUT = re.compile(r"(-|[.eE][+-]?|u[0-9a-fA-F]{0,4}|t(r(ue?)?)?|f(a(l(se?)?)?)?|n(u(ll?)?)?)?")

def parse(buf):
    """(first JSON value, bytes after it), or None while buf holds only part of a value."""
    tail = b""
    try:
        text = buf.decode()
    except UnicodeDecodeError as e:  # cut inside a character: keep its bytes for later
        if e.reason != "unexpected end of data":
            raise
        text, tail = buf[:e.start].decode(), buf[e.start:]
    text = text.lstrip(" \t\r\n")
    try:
        msg, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as e:
        if e.msg.startswith("Unterminated string") or CUT.fullmatch(text[e.pos:]):
            return None  # incomplete: read more
        raise  # not JSON: the connection cannot be trusted any more
    return msg, text[end:].encode() + tail

class Helper:
    def __init__(self, args):
        prog = [os.environ.get("CSTOR_HELPER", "cstor-helper")]
        if not can_read_everything():
            prog = ["podman", "unshare"] + prog
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # fd 0 is the socket; stderr, the helper's log, is passed through to ours.
        self.proc = subprocess.Popen(prog + args, stdin=theirs, stdout=subprocess.DEVNULL)
        theirs.close()
        self.buf, self.fdq, self.id = b"", [], 0

    def call(self, method, params=None):  # one request in flight at a time
        self.id += 1
        req = {"jsonrpc": "2.0", "id": self.id, "method": method, "params": params or {}}
        self.sock.sendall(json.dumps(req).encode())
        while True:
            parsed = parse(self.buf)
            if parsed:
                msg, rest = parsed
                n = msg.get("fds", 0)
                if len(self.fdq) >= n:  # every fd of the message has arrived
                    self.buf, fds, self.fdq = rest, self.fdq[:n], self.fdq[n:]
                    if "error" in msg:
                        raise RuntimeError(msg["error"])
                    return msg["result"], fds
                if rest.strip():
                    raise ValueError("framing error: the next message began before the fds")
            # recvmsg with room for 253 fds, received close-on-exec
            data, fds, flags, _ = socket.recv_fds(self.sock, 65536, 253, socket.MSG_CMSG_CLOEXEC)
            if flags & socket.MSG_CTRUNC:
                raise OSError("fds were lost (MSG_CTRUNC): too many fds open for RLIMIT_NOFILE")
            if not data and not fds:
                raise EOFError(f"the helper closed the connection (status {self.proc.wait()})")
            self.buf += data
            self.fdq += fds

NO_FD = 0xFFFFFFFFFFFFFFFF
LENGTHS = {1: (1, 4 << 20), 2: (24, 24 + 65536), 3: (32, 32), 4: (0, 1 << 20)}

def rebuild(h, layer, out):
    res, got = h.call("GetLayer", {"layer": layer["id"]})
    if (res["stream"]["format"], res["stream"]["version"]) != ("cstor-layer-stream", 1):
        raise ValueError(f"unknown layer stream {res['stream']}")
    stream = os.fdopen(got[res["stream"]["fd"]], "rb")
    fds, sha, total, entries, files, done = {}, hashlib.sha256(), 0, 0, 0, False
    def read(n):
        b = stream.read(n)
        if len(b) != n:
            raise EOFError("layer stream truncated")
        return b
    assert read(8) == b"CSTORLS1"
    while True:
        tag, n = struct.unpack("<BI", read(5))
        low, high = LENGTHS.get(tag, (0, 1 << 20) if tag >= 0x80 else (1, 0))
        if not low <= n <= high:
            raise ValueError(f"record {tag:#x} of length {n}")
        p = read(n)
        if tag == 1:  # SEGMENT
            out.write(p); sha.update(p); total += n
        elif tag == 2:  # FILE
            size, crc, idx = struct.unpack_from("<QQQ", p)
            entries += 1
            if size == 0:
                if idx != NO_FD:
                    raise ValueError(f"{p[24:]!r} has no content but names fd {idx}")
                continue
            if idx != files:
                raise ValueError(f"{p[24:]!r} names fd {idx}, not {files}")
            files += 1
            while idx not in fds:  # fetch until the fd this record needs has arrived
                if done:
                    raise ValueError(f"the helper sent no fd {idx}")
                r, got = h.call("FetchFds", {"handle": res["handle"], "max": h.max_fds})
                fds.update(zip(range(r["first"], r["first"] + r["count"]), got))
                done = r["done"]
            fd, off, c = fds.pop(idx), 0, 0
            while off < size:
                chunk = os.pread(fd, min(1 << 20, size - off), off)
                if not chunk:
                    raise ValueError(f"{p[24:]!r} is shorter than recorded")
                c = crc64(chunk, c); out.write(chunk); sha.update(chunk); off += len(chunk)
            if c != crc or os.pread(fd, 1, size):
                raise ValueError(f"{p[24:]!r}: CRC-64 or length mismatch")
            os.close(fd); total += size
        elif tag == 3:  # END: entries, files, fds, tar_size
            if struct.unpack("<4Q", p) != (entries, files, files, total):
                raise ValueError("END totals differ from the stream")
            break
        elif tag == 4:  # ERROR
            raise RuntimeError(json.loads(p))
    stream.close()
    h.call("ReleaseLayer", {"handle": res["handle"]})
    digest = "sha256:" + sha.hexdigest()
    return digest, total, digest == layer.get("diff_id") and total == layer.get("diff_size", total)

h = Helper(sys.argv[3:])
info, _ = h.call("Initialize", {"protocol_version": "1.0", "client": "minimal_client.py"})
if not info["protocol_version"].startswith("1.") or "layer-stream-v1" not in info["capabilities"]:
    sys.exit(f"cannot use helper protocol {info['protocol_version']}, {info['capabilities']}")
h.max_fds = info["limits"]["max_fds_per_message"]
for img in h.call("ListImages")[0]["images"]:
    print(img["id"][:12], " ".join(img["names"]))
image, _ = h.call("GetImage", {"reference": sys.argv[1]})
with open(sys.argv[2], "wb") as out:
    print("top layer:", rebuild(h, image["layers"][-1], out))
h.call("Shutdown")
sys.exit(h.proc.wait())
