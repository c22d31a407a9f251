#!/usr/bin/env python3
# usage: minimal_client.py REFERENCE OUT.tar [helper args...]
import hashlib, json, os, socket, struct, subprocess, sys

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

class Helper:
    def __init__(self, args):
        prog = [os.environ.get("CSTOR_HELPER", "cstor-helper")]
        if os.geteuid() != 0:
            prog = ["podman", "unshare"] + prog
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc = subprocess.Popen(prog + args, stdin=theirs)  # fd 0 is the socket
        theirs.close()
        self.buf, self.fdq, self.id = b"", [], 0

    def call(self, method, params=None):  # one request in flight at a time
        self.id += 1
        req = {"jsonrpc": "2.0", "id": self.id, "method": method, "params": params or {}}
        self.sock.sendall(json.dumps(req).encode())
        while True:
            try:
                text = self.buf.decode().lstrip()
                msg, end = json.JSONDecoder().raw_decode(text)
                n = msg.get("fds", 0)
                if len(self.fdq) >= n:  # every fd of the message has arrived
                    self.buf = text[end:].encode()
                    fds, self.fdq = self.fdq[:n], self.fdq[n:]
                    if "error" in msg:
                        raise RuntimeError(msg["error"])
                    return msg["result"], fds
            except ValueError:
                pass  # incomplete JSON or UTF-8: read more
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 253)
            if not data and not fds:
                raise EOFError("the helper closed the connection")
            self.buf += data
            self.fdq += fds

def rebuild(h, layer, out):
    res, (sfd,) = h.call("GetLayer", {"layer": layer["id"]})
    stream, fds, sha, total = os.fdopen(sfd, "rb"), {}, hashlib.sha256(), 0
    def read(n):
        b = stream.read(n)
        if len(b) != n:
            raise EOFError("layer stream truncated")
        return b
    assert read(8) == b"CSTORLS1"
    while True:
        tag, n = struct.unpack("<BI", read(5))
        p = read(n)
        if tag == 1:  # SEGMENT
            out.write(p); sha.update(p); total += n
        elif tag == 2:  # FILE
            size, crc, idx = struct.unpack_from("<QQQ", p)
            if size == 0:
                continue
            while idx not in fds:  # fetch until the fd this record needs has arrived
                r, got = h.call("FetchFds", {"handle": res["handle"], "max": 200})
                fds.update(zip(range(r["first"], r["first"] + r["count"]), got))
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
            assert struct.unpack("<4Q", p)[3] == total
            break
        elif tag == 4:  # ERROR
            raise RuntimeError(json.loads(p))
        elif tag < 0x80:
            raise ValueError(f"unknown record tag {tag:#x}")
    stream.close()
    h.call("ReleaseLayer", {"handle": res["handle"]})
    digest = "sha256:" + sha.hexdigest()
    return digest, total, digest == layer.get("diff_id") and total == layer.get("diff_size", total)

h = Helper(sys.argv[3:])
h.call("Initialize", {"protocol_version": "1.0", "client": "minimal_client.py"})
for img in h.call("ListImages")[0]["images"]:
    print(img["id"][:12], " ".join(img["names"]))
image, _ = h.call("GetImage", {"reference": sys.argv[1]})
with open(sys.argv[2], "wb") as out:
    print("top layer:", rebuild(h, image["layers"][-1], out))
h.call("Shutdown")
sys.exit(h.proc.wait())
